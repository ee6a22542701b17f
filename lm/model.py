"""The CS336 assignment-1 Transformer LM, from scratch, with CS336-compatible names and state-dict keys.

token embedding -> num_layers pre-norm blocks (x + MHA(RMSNorm(x)); x + SwiGLU(RMSNorm(x))) -> RMSNorm ->
untied lm_head. No biases. Weights are stored (out_features, in_features) like `nn.Linear`.

Ablation switches (CS336 section 7), all off by default: `norm="post"|"none"`, `pos_emb="nope"`,
`ffn="silu"`, `tie_embeddings=True`. `attention="reference"` selects the from-scratch attention math; the
default `"sdpa"` calls PyTorch's fused causal kernel (same math, tested equal).
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lm.functional import cross_entropy, linear_cross_entropy, scaled_dot_product_attention

if TYPE_CHECKING:
    from lm.config import ModelConfig

NORMS = ("pre", "post", "none")
POS_EMBS = ("rope", "nope")
FFNS = ("swiglu", "silu")
ATTENTIONS = ("sdpa", "reference")


class Linear(nn.Module):
    """y = x W^T without bias; W: (out_features, in_features), init N(0, 2/(in+out)) truncated at 3 sigma."""

    def __init__(self, in_features: int, out_features: int, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        std = math.sqrt(2.0 / (in_features + out_features))
        nn.init.trunc_normal_(self.weight, mean=0.0, std=std, a=-3 * std, b=3 * std)

    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out)
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class Embedding(nn.Module):
    """Lookup table (num_embeddings, embedding_dim), init N(0, 1) truncated at +-3."""

    def __init__(self, num_embeddings: int, embedding_dim: int, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, device=device, dtype=dtype))
        nn.init.trunc_normal_(self.weight, mean=0.0, std=1.0, a=-3.0, b=3.0)

    def forward(self, token_ids: Tensor) -> Tensor:  # (...) int -> (..., embedding_dim)
        # The same row lookup as self.weight[token_ids], but its backward is embedding_dense_backward
        # instead of index_put_ with accumulate (which sorts the indices): several times faster (README, Performance).
        return F.embedding(token_ids, self.weight)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * g, computed in float32, returned in the input dtype; g starts at 1."""

    def __init__(self, d_model: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:  # (..., d_model) -> same
        # F.rms_norm is PyTorch's fused kernel for exactly this math (tests hold it to the from-scratch
        # `rms_norm_reference`); one kernel instead of five elementwise passes and their buffers.
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float = 1e-5) -> Tensor:
    """From-scratch RMSNorm over the last dim, in float32, returned in x's dtype."""
    in_dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (x * weight).to(in_dtype)


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x); with `gated=False` the plain SiLU network w2(silu(w1 x)) (no w3)."""

    def __init__(self, d_model: int, d_ff: int, device=None, dtype=None, gated: bool = True):
        super().__init__()
        self.w1 = Linear(d_model, d_ff, device=device, dtype=dtype)
        self.w2 = Linear(d_ff, d_model, device=device, dtype=dtype)
        self.w3 = Linear(d_model, d_ff, device=device, dtype=dtype) if gated else None

    def forward(self, x: Tensor) -> Tensor:  # (..., d_model) -> same
        # F.silu is a fused kernel for lm.functional.silu (tests check they agree).
        hidden = F.silu(self.w1(x))
        if self.w3 is not None:
            hidden = hidden * self.w3(x)
        return self.w2(hidden)


class RotaryPositionalEmbedding(nn.Module):
    """RoPE: rotates adjacent pairs (x[2k], x[2k+1]) by angle pos * theta^(-2k/d_k).

    cos/sin tables (max_seq_len, d_k/2) are non-persistent buffers, so state dicts hold no RoPE entries.
    """

    def __init__(self, theta: float, d_k: int, max_seq_len: int, device=None):
        super().__init__()
        if d_k % 2:
            raise ValueError(f"RoPE needs an even d_k, got {d_k}")
        inv_freq = theta ** (-torch.arange(0, d_k, 2, device=device, dtype=torch.float64) / d_k)
        angles = torch.arange(max_seq_len, device=device, dtype=torch.float64)[:, None] * inv_freq
        self.register_buffer("cos", angles.cos().float(), persistent=False)  # (max_seq_len, d_k/2)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x: Tensor, token_positions: Tensor | None = None) -> Tensor:
        """x: (..., seq, d_k); token_positions: None (0..seq-1), (seq,) or (batch, seq) -> like x.

        Positions broadcast over any dims between batch and seq (e.g. heads in (batch, heads, seq, d_k)).
        """
        seq = x.shape[-2]
        if token_positions is None:
            cos, sin = self.cos[:seq], self.sin[:seq]  # (seq, d_k/2)
        else:
            cos, sin = self.cos[token_positions], self.sin[token_positions]  # (..., seq, d_k/2)
            # (batch, seq, d/2) against x (batch, heads, seq, d): add the head dims between.
            while cos.dim() < x.dim() and cos.dim() > 2:
                cos, sin = cos.unsqueeze(-3), sin.unsqueeze(-3)
        if x.dtype == torch.float32 and not torch.compiler.is_compiling():
            # Adjacent pairs are exactly a complex number's (real, imag): one complex multiply forward and
            # one backward, instead of six real elementwise ops, a stack and their buffers. Under
            # torch.compile the real form below is used: inductor fuses it, but cannot generate complex code.
            pairs = torch.view_as_complex(x.unflatten(-1, (-1, 2)))  # (..., seq, d_k/2) complex64
            return torch.view_as_real(pairs * torch.complex(cos, sin)).flatten(-2)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        x_even, x_odd = x[..., 0::2], x[..., 1::2]  # (..., seq, d_k/2)
        out = torch.stack((x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), dim=-1)
        return out.flatten(-2)


class MultiHeadSelfAttention(nn.Module):
    """Causal multi-head self-attention with optional RoPE on queries and keys (not values)."""

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        rope: RotaryPositionalEmbedding | None = None,
        device=None,
        dtype=None,
        attention: str = "sdpa",
    ):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model {d_model} is not divisible by num_heads {num_heads}")
        self.num_heads, self.d_head, self.attention = num_heads, d_model // num_heads, attention
        self.q_proj = Linear(d_model, d_model, device=device, dtype=dtype)
        self.k_proj = Linear(d_model, d_model, device=device, dtype=dtype)
        self.v_proj = Linear(d_model, d_model, device=device, dtype=dtype)
        self.output_proj = Linear(d_model, d_model, device=device, dtype=dtype)
        self.rope = rope

    def forward(self, x: Tensor, token_positions: Tensor | None = None) -> Tensor:
        """x: (..., seq, d_model) -> (..., seq, d_model); position t attends to positions <= t."""
        *lead, seq, d_model = x.shape
        # One matmul for q, k and v: the concatenated weight is rebuilt each call (cheap next to the
        # matmul) so the CS336 parameter names and state-dict keys stay as they are.
        w_qkv = torch.cat((self.q_proj.weight, self.k_proj.weight, self.v_proj.weight))
        qkv = F.linear(x, w_qkv).view(*lead, seq, 3, self.num_heads, self.d_head)
        q, k, v = (t.transpose(-3, -2) for t in qkv.unbind(-3))  # each (..., heads, seq, d_head)
        if self.rope is not None:
            if token_positions is not None and token_positions.dim() > 1:
                token_positions = token_positions.unsqueeze(-2)  # (batch, 1, seq): broadcast over heads
            q, k = self.rope(q, token_positions), self.rope(k, token_positions)
        if self.attention == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            causal = torch.ones(seq, seq, dtype=torch.bool, device=x.device).tril()
            out = scaled_dot_product_attention(q, k, v, mask=causal)
        out = out.transpose(-3, -2).reshape(*lead, seq, d_model)  # (..., seq, heads * d_head)
        return self.output_proj(out)


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(ln1(x)), then x + ffn(ln2(x)). `norm="post"`: ln1(x + attn(x)), etc."""

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        d_ff: int,
        max_seq_len: int,
        theta: float,
        device=None,
        dtype=None,
        norm: str = "pre",
        pos_emb: str = "rope",
        ffn: str = "swiglu",
        attention: str = "sdpa",
    ):
        super().__init__()
        self.norm = norm
        rope = (
            RotaryPositionalEmbedding(theta, d_model // num_heads, max_seq_len, device=device)
            if pos_emb == "rope"
            else None
        )
        self.ln1 = RMSNorm(d_model, device=device, dtype=dtype) if norm != "none" else nn.Identity()
        self.attn = MultiHeadSelfAttention(d_model, num_heads, rope, device, dtype, attention=attention)
        self.ln2 = RMSNorm(d_model, device=device, dtype=dtype) if norm != "none" else nn.Identity()
        self.ffn = SwiGLU(d_model, d_ff, device=device, dtype=dtype, gated=(ffn == "swiglu"))

    def forward(self, x: Tensor, token_positions: Tensor | None = None) -> Tensor:  # (b, seq, d) -> same
        if self.norm == "post":
            x = self.ln1(x + self.attn(x, token_positions))
            return self.ln2(x + self.ffn(x))
        x = x + self.attn(self.ln1(x), token_positions)
        return x + self.ffn(self.ln2(x))


class TransformerLM(nn.Module):
    """The full language model; `forward(idx)` returns unnormalized logits (batch, seq, vocab)."""

    def __init__(
        self,
        vocab_size: int,
        context_length: int,
        d_model: int,
        num_layers: int,
        num_heads: int,
        d_ff: int,
        rope_theta: float = 10000.0,
        device=None,
        dtype=None,
        norm: str = "pre",
        pos_emb: str = "rope",
        ffn: str = "swiglu",
        tie_embeddings: bool = False,
        attention: str = "sdpa",
    ):
        super().__init__()
        for name, value, allowed in (
            ("norm", norm, NORMS),
            ("pos_emb", pos_emb, POS_EMBS),
            ("ffn", ffn, FFNS),
            ("attention", attention, ATTENTIONS),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        self.vocab_size, self.context_length = vocab_size, context_length
        self.token_embeddings = Embedding(vocab_size, d_model, device=device, dtype=dtype)
        self.layers = nn.ModuleList(
            TransformerBlock(
                d_model,
                num_heads,
                d_ff,
                context_length,
                rope_theta,
                device,
                dtype,
                norm,
                pos_emb,
                ffn,
                attention,
            )
            for _ in range(num_layers)
        )
        # Post-norm blocks already end in a norm; only pre-norm needs the final one.
        self.ln_final = RMSNorm(d_model, device=device, dtype=dtype) if norm == "pre" else nn.Identity()
        self.lm_head = Linear(d_model, vocab_size, device=device, dtype=dtype)
        self.compiled_loss = None  # set by compile_layers
        if tie_embeddings:
            self.lm_head.weight = self.token_embeddings.weight

    @classmethod
    def from_config(cls, config: ModelConfig, device=None, dtype=None) -> TransformerLM:
        """Build the model described by a `lm.config.ModelConfig`."""
        # ModelConfig's fields are exactly this constructor's architecture arguments.
        return cls(**dataclasses.asdict(config), device=device, dtype=dtype)

    def body(self, idx: Tensor, token_positions: Tensor | None = None) -> Tensor:
        """idx: (batch, seq) int64 -> the last block's output (batch, seq, d_model), before the final norm."""
        x = self.token_embeddings(idx)
        for layer in self.layers:
            x = layer(x, token_positions)
        return x

    def hidden_states(self, idx: Tensor, token_positions: Tensor | None = None) -> Tensor:
        """idx: (batch, seq) int64 -> final normalized hidden states (batch, seq, d_model)."""
        return self.ln_final(self.body(idx, token_positions))

    def head_loss(self, x: Tensor, targets: Tensor) -> Tensor:
        """x: (n, d_model) last block outputs, targets: (n,) -> mean cross-entropy after the final norm and
        the output layer, with the logits taken in float32 (what `compile_layers` compiles)."""
        return logits_cross_entropy(self.ln_final(x), self.lm_head.weight, targets)

    def forward(self, idx: Tensor, targets: Tensor | None = None, token_positions: Tensor | None = None):
        """idx: (batch, seq) int64 -> logits (batch, seq, vocab).

        With `targets` (batch, seq) it returns the scalar mean cross-entropy instead. In fp32 that goes
        through `linear_cross_entropy`, which never holds the full logits; under reduced precision
        (CUDA autocast) the logits are built and the loss is taken in float32. After `compile_layers`,
        the final norm and the loss are a compiled `head_loss` where the full logits are small or under
        autocast.
        """
        x = self.body(idx, token_positions)  # (batch, seq, d_model)
        if targets is None:
            return self.lm_head(self.ln_final(x))
        x, targets = x.reshape(-1, x.shape[-1]), targets.reshape(-1)  # (n, d_model), (n,)
        fp32 = x.dtype == torch.float32 and not torch.is_autocast_enabled(x.device.type)
        if self.compiled_loss is not None and (not fp32 or x.shape[0] * self.vocab_size <= COMPILED_LOSS_MAX_LOGITS):
            return self.compiled_loss(x, targets)
        if fp32:
            return linear_cross_entropy(self.ln_final(x), self.lm_head.weight, targets)
        return self.head_loss(x, targets)


# Up to this many logits (4M floats, 16 MB) inductor's fused softmax-cross-entropy beats the chunked
# eager one; above it the chunked one wins by never holding the (n, vocab) buffers (measured at tiny/small).
COMPILED_LOSS_MAX_LOGITS = 1 << 22


def logits_cross_entropy(h: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    """h: (n, d), weight: (vocab, d), targets: (n,) -> mean cross-entropy of h @ weight.T, taken in float32."""
    return F.cross_entropy(F.linear(h, weight).float(), targets)


def compile_layers(model: TransformerLM, dynamic: bool | None = None) -> TransformerLM:
    """torch.compile each transformer block and the final norm + loss (`head_loss`), in place; returns the model.

    Every block runs the same code on same-shaped tensors, so one compiled graph serves all layers:
    compile time does not grow with depth, unlike compiling the whole model (which also unrolls the
    chunked output layer + cross-entropy loop, slow to compile at a large vocabulary). Parameter names and
    state-dict keys are unchanged. Run uncompiled code (evaluation, say) under
    `torch.compiler.set_stance("force_eager")`.
    """
    for layer in model.layers:
        layer.compile(dynamic=dynamic)
    # The final norm is compiled with the loss: in eager it is five elementwise passes each way.
    model.compiled_loss = torch.compile(model.head_loss, dynamic=dynamic)
    return model


def count_parameters(model_or_config: nn.Module | ModelConfig, include_embeddings: bool = True) -> int:
    """Number of parameters (shared tensors counted once).

    Without embeddings, the token embedding and the output layer are left out (Kaplan et al.'s
    "non-embedding" count), so the figure compares across vocabularies.
    """
    if isinstance(model_or_config, nn.Module):
        model = model_or_config
        total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
        if not include_embeddings:
            total -= model.token_embeddings.weight.numel()
            if model.lm_head.weight is not model.token_embeddings.weight:
                total -= model.lm_head.weight.numel()
        return total
    c = model_or_config
    norms = 0 if c.norm == "none" else 2 * c.d_model
    per_layer = 4 * c.d_model * c.d_model + _ffn_params(c) + norms
    body = c.num_layers * per_layer + (c.d_model if c.norm == "pre" else 0)
    if not include_embeddings:
        return body
    embeddings = c.vocab_size * c.d_model * (1 if c.tie_embeddings else 2)
    return body + embeddings


def _ffn_params(c: ModelConfig) -> int:
    """Weights of one feed-forward network: w1, w2 (and the gate w3 for SwiGLU)."""
    return (3 if c.ffn == "swiglu" else 2) * c.d_model * c.d_ff


def flops_per_token(config: ModelConfig) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), counting matmuls only.

    6 * (matmul weights: per-layer projections and FFN, plus the output layer)
    + 6 * num_layers * context_length * d_model for the attention scores and the weighted sum
    (Kaplan et al. 2020, without the causal halving, as MFU figures usually quote it).
    """
    c = config
    matmul_params = c.num_layers * (4 * c.d_model * c.d_model + _ffn_params(c)) + c.vocab_size * c.d_model
    return 6.0 * matmul_params + 6.0 * c.num_layers * c.context_length * c.d_model


__all__ = [
    "Linear",
    "Embedding",
    "RMSNorm",
    "SwiGLU",
    "RotaryPositionalEmbedding",
    "MultiHeadSelfAttention",
    "TransformerBlock",
    "TransformerLM",
    "count_parameters",
    "flops_per_token",
    "cross_entropy",
]
