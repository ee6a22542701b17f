"""Tests for the from-scratch CS336 Transformer LM (``lm.model`` / ``lm.functional``).

Every part is compared in float32, on random inputs and random weights, against an independent
reference built from plain PyTorch ops (``F.scaled_dot_product_attention``, ``F.rms_norm``,
``F.silu``, ``F.softmax``, ``F.cross_entropy``, ``nn.Linear``, ``nn.Embedding``) and a complex-number
RoPE written here.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lm

ATOL = 1e-5
RTOL = 1e-5

# Small LM config used throughout.
VOCAB = 67
CTX = 16
D_MODEL = 32
N_LAYERS = 2
N_HEADS = 4
D_FF = 48
THETA = 10000.0
BASE_KW = dict(
    vocab_size=VOCAB,
    context_length=CTX,
    d_model=D_MODEL,
    num_layers=N_LAYERS,
    num_heads=N_HEADS,
    d_ff=D_FF,
    rope_theta=THETA,
)


def close(actual, expected, atol=ATOL, rtol=RTOL):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def make_lm(seed=0, **overrides):
    torch.manual_seed(seed)
    kw = {**BASE_KW, **overrides}
    return lm.TransformerLM(**kw)


def randomize_(module: nn.Module, seed: int = 1) -> nn.Module:
    """Fill every parameter with random values (norm gains around 1, so they matter)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                fan = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan))
    return module


def expected_lm_keys(num_layers, norm="pre", ffn="swiglu", final_norm=True):
    keys = {"token_embeddings.weight", "lm_head.weight"}
    if final_norm:
        keys.add("ln_final.weight")
    for i in range(num_layers):
        p = f"layers.{i}."
        keys |= {p + f"attn.{n}_proj.weight" for n in ("q", "k", "v", "output")}
        keys |= {p + "ffn.w1.weight", p + "ffn.w2.weight"}
        if ffn == "swiglu":
            keys.add(p + "ffn.w3.weight")
        if norm != "none":
            keys |= {p + "ln1.weight", p + "ln2.weight"}
    return keys


def expected_lm_shapes(vocab, d_model, num_layers, d_ff):
    shapes = {
        "token_embeddings.weight": (vocab, d_model),
        "ln_final.weight": (d_model,),
        "lm_head.weight": (vocab, d_model),
    }
    for i in range(num_layers):
        p = f"layers.{i}."
        shapes[p + "ln1.weight"] = (d_model,)
        shapes[p + "ln2.weight"] = (d_model,)
        for n in ("q", "k", "v", "output"):
            shapes[p + f"attn.{n}_proj.weight"] = (d_model, d_model)
        shapes[p + "ffn.w1.weight"] = (d_ff, d_model)
        shapes[p + "ffn.w2.weight"] = (d_model, d_ff)
        shapes[p + "ffn.w3.weight"] = (d_ff, d_model)
    return shapes


# ---------------------------------------------------------------------------------------------------------
# Independent reference implementations (plain torch ops only)
# ---------------------------------------------------------------------------------------------------------


def ref_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate adjacent pairs (x[2k], x[2k+1]) by pos * theta**(-2k/d) using complex multiplication.

    ``positions`` must broadcast against ``x.shape[:-1]``.
    """
    d = x.shape[-1]
    k = torch.arange(d // 2, dtype=torch.float64)
    inv_freq = theta ** (-2.0 * k / d)
    angles = positions.to(torch.float64)[..., None] * inv_freq  # (..., seq, d/2)
    rot = torch.polar(torch.ones_like(angles), angles).to(torch.complex64)
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], d // 2, 2).contiguous())
    return torch.view_as_real(xc * rot).flatten(-2).to(x.dtype)


def ref_linear(x, w):
    return x @ w.T


def ref_swiglu(x, w1, w2, w3):
    return ref_linear(F.silu(ref_linear(x, w1)) * ref_linear(x, w3), w2)


def ref_silu_ffn(x, w1, w2):
    return ref_linear(F.silu(ref_linear(x, w1)), w2)


def ref_rms(x, w, eps=1e-5):
    return F.rms_norm(x, (x.shape[-1],), weight=w, eps=eps)


def ref_mha(x, wq, wk, wv, wo, num_heads, theta=None, positions=None):
    """Causal MHA via F.scaled_dot_product_attention(is_causal=True); RoPE on q, k if theta is given."""
    b, s, d = x.shape
    dk = d // num_heads

    def split(t):
        return t.view(b, s, num_heads, dk).transpose(1, 2)  # (b, h, s, dk)

    q, k, v = split(ref_linear(x, wq)), split(ref_linear(x, wk)), split(ref_linear(x, wv))
    if theta is not None:
        if positions is None:
            positions = torch.arange(s)
        pos = positions if positions.ndim == 1 else positions[:, None, :]  # broadcast over heads
        q, k = ref_rope(q, pos, theta), ref_rope(k, pos, theta)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return ref_linear(o.transpose(1, 2).reshape(b, s, d), wo)


def ref_block(x, sd, prefix, num_heads, theta=None, norm="pre", ffn="swiglu", positions=None):
    def attn(h):
        return ref_mha(
            h,
            sd[prefix + "attn.q_proj.weight"],
            sd[prefix + "attn.k_proj.weight"],
            sd[prefix + "attn.v_proj.weight"],
            sd[prefix + "attn.output_proj.weight"],
            num_heads,
            theta=theta,
            positions=positions,
        )

    def ff(h):
        if ffn == "swiglu":
            return ref_swiglu(
                h, sd[prefix + "ffn.w1.weight"], sd[prefix + "ffn.w2.weight"], sd[prefix + "ffn.w3.weight"]
            )
        return ref_silu_ffn(h, sd[prefix + "ffn.w1.weight"], sd[prefix + "ffn.w2.weight"])

    if norm == "pre":
        x = x + attn(ref_rms(x, sd[prefix + "ln1.weight"]))
        return x + ff(ref_rms(x, sd[prefix + "ln2.weight"]))
    if norm == "post":
        z = ref_rms(x + attn(x), sd[prefix + "ln1.weight"])
        return ref_rms(z + ff(z), sd[prefix + "ln2.weight"])
    assert norm == "none"
    x = x + attn(x)
    return x + ff(x)


def ref_lm(idx, sd, num_layers, num_heads, theta=THETA, norm="pre", pos_emb="rope", ffn="swiglu"):
    x = F.embedding(idx, sd["token_embeddings.weight"])
    for i in range(num_layers):
        x = ref_block(
            x,
            sd,
            f"layers.{i}.",
            num_heads,
            theta=theta if pos_emb == "rope" else None,
            norm=norm,
            ffn=ffn,
        )
    if "ln_final.weight" in sd:
        x = ref_rms(x, sd["ln_final.weight"])
    return ref_linear(x, sd["lm_head.weight"])


def state_dict_leaves(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached leaf copies of the state dict (tied entries share one leaf) for gradient checks."""
    leaves: dict[int, torch.Tensor] = {}
    out = {}
    for k, v in model.state_dict(keep_vars=True).items():
        if id(v) not in leaves:
            leaves[id(v)] = v.detach().clone().requires_grad_(True)
        out[k] = leaves[id(v)]
    return out


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------

PUBLIC_NAMES = (  # CS336's names, spelled out here rather than read from lm.__all__
    "Linear Embedding RMSNorm SwiGLU RotaryPositionalEmbedding MultiHeadSelfAttention TransformerBlock "
    "TransformerLM scaled_dot_product_attention softmax silu cross_entropy count_parameters flops_per_token "
    "linear_cross_entropy"
).split()


@pytest.mark.parametrize("name", PUBLIC_NAMES)
def test_public_name_exported(name):
    assert hasattr(lm, name), f"lm.{name} is not exported"


# ---------------------------------------------------------------------------------------------------------
# Linear / Embedding
# ---------------------------------------------------------------------------------------------------------


def test_linear_matches_nn_linear():
    torch.manual_seed(0)
    layer = lm.Linear(12, 7)
    assert tuple(layer.weight.shape) == (7, 12)  # (out_features, in_features)
    assert list(dict(layer.named_parameters())) == ["weight"]  # no bias
    ref = nn.Linear(12, 7, bias=False)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(7, 12))
    layer.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(3, 5, 12)
    close(layer(x), ref(x))
    close(layer(x[0, 0]), ref(x[0, 0]))  # 1-D input
    # Gradients agree too.
    gx1 = x.clone().requires_grad_(True)
    gx2 = x.clone().requires_grad_(True)
    layer(gx1).square().sum().backward()
    ref(gx2).square().sum().backward()
    close(gx1.grad, gx2.grad)
    close(layer.weight.grad, ref.weight.grad)


def test_linear_device_dtype_kwargs():
    layer = lm.Linear(4, 3, device="cpu", dtype=torch.float64)
    assert layer.weight.dtype == torch.float64
    assert layer.weight.device.type == "cpu"
    assert isinstance(layer.weight, nn.Parameter)


def test_embedding_matches_nn_embedding():
    torch.manual_seed(0)
    emb = lm.Embedding(50, 16)
    assert tuple(emb.weight.shape) == (50, 16)
    ref = nn.Embedding(50, 16)
    emb.load_state_dict(ref.state_dict(), strict=True)
    idx = torch.randint(0, 50, (4, 9))
    close(emb(idx), ref(idx), atol=0, rtol=0)
    # The gradient sums the output gradients of every position holding a row's id (ids repeat here):
    # that is one_hot(ids)^T @ grad_out.
    grad_out = torch.randn(4, 9, 16)
    emb(idx).backward(grad_out)
    one_hot = F.one_hot(idx.reshape(-1), 50).float()  # (36, 50)
    close(emb.weight.grad, one_hot.T @ grad_out.reshape(-1, 16), atol=1e-6, rtol=1e-6)
    e64 = lm.Embedding(5, 3, device="cpu", dtype=torch.float64)
    assert e64.weight.dtype == torch.float64


# ---------------------------------------------------------------------------------------------------------
# Initialization
# ---------------------------------------------------------------------------------------------------------


def test_linear_init_statistics():
    torch.manual_seed(0)
    d_in, d_out = 512, 256
    w = lm.Linear(d_in, d_out).weight.detach()
    sigma = math.sqrt(2.0 / (d_in + d_out))
    # A N(0, sigma^2) truncated at 3 sigma has std ~0.9866 sigma.
    assert abs(w.std().item() - 0.9866 * sigma) < 0.03 * sigma
    assert abs(w.mean().item()) < 0.01 * sigma
    assert w.abs().max().item() <= 3 * sigma * (1 + 1e-6)
    # Not all identical and not trivially small: a decent fraction beyond 2 sigma.
    frac = (w.abs() > 2 * sigma).float().mean().item()
    assert 0.03 < frac < 0.06


def test_embedding_init_statistics():
    torch.manual_seed(0)
    w = lm.Embedding(1000, 128).weight.detach()
    assert abs(w.std().item() - 0.9866) < 0.03
    assert abs(w.mean().item()) < 0.02
    assert w.abs().max().item() <= 3.0 + 1e-6


def test_rmsnorm_init_gain_ones():
    norm = lm.RMSNorm(24)
    assert tuple(norm.weight.shape) == (24,)
    assert torch.equal(norm.weight.detach(), torch.ones(24))


def test_transformer_lm_init():
    model = make_lm()
    sd = model.state_dict()
    for key, t in sd.items():
        if key.endswith("ln1.weight") or key.endswith("ln2.weight") or key == "ln_final.weight":
            assert torch.equal(t, torch.ones_like(t)), key
        elif key == "token_embeddings.weight":
            assert t.abs().max() <= 3.0 + 1e-6
            assert 0.8 < t.std().item() < 1.1
        else:
            d_out, d_in = t.shape
            sigma = math.sqrt(2.0 / (d_in + d_out))
            assert t.abs().max() <= 3 * sigma * (1 + 1e-6), key
            assert 0.7 * sigma < t.std().item() < 1.2 * sigma, key


# ---------------------------------------------------------------------------------------------------------
# RMSNorm
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [1e-5, 1e-3])
def test_rmsnorm_matches_torch(eps):
    torch.manual_seed(0)
    d = 24
    norm = lm.RMSNorm(d, eps=eps)
    ref = nn.RMSNorm(d, eps=eps)
    with torch.no_grad():
        ref.weight.copy_(1 + 0.3 * torch.randn(d))
    norm.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(3, 5, d) * 2.0
    close(norm(x), ref(x))
    close(norm(x), F.rms_norm(x, (d,), weight=ref.weight, eps=eps))
    # Tiny-magnitude inputs: eps matters and must be inside the sqrt like CS336/torch.
    xs = torch.randn(4, d) * 1e-3
    close(norm(xs), ref(xs))
    # Gradients.
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    g = torch.randn_like(x)
    (norm(x1) * g).sum().backward()
    (ref(x2) * g).sum().backward()
    close(x1.grad, x2.grad)
    close(norm.weight.grad, ref.weight.grad)


def test_rmsnorm_bf16_returns_bf16_computed_in_fp32():
    torch.manual_seed(0)
    d = 64
    norm = lm.RMSNorm(d)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(d))
    x = (torch.randn(8, 16, d) * 3).to(torch.bfloat16)
    out = norm(x)
    assert out.dtype == torch.bfloat16
    assert out.shape == x.shape
    expected = F.rms_norm(x.float(), (d,), weight=norm.weight.detach().float(), eps=1e-5).to(torch.bfloat16)
    # Within one bf16 ulp everywhere, and bit-identical almost everywhere (a bf16 computation is not).
    torch.testing.assert_close(out.float(), expected.float(), atol=1e-6, rtol=2**-7)
    assert (out == expected).float().mean().item() > 0.99


# ---------------------------------------------------------------------------------------------------------
# Elementwise functions
# ---------------------------------------------------------------------------------------------------------


def test_silu_matches_torch():
    torch.manual_seed(0)
    x = torch.randn(5, 7) * 4
    close(lm.silu(x), F.silu(x))
    big = torch.tensor([-1000.0, -100.0, -20.0, 0.0, 20.0, 100.0, 1000.0])
    out = lm.silu(big)
    assert torch.isfinite(out).all()
    close(out, F.silu(big))


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_softmax_matches_torch(dim):
    torch.manual_seed(0)
    x = torch.randn(4, 6, 9) * 3
    close(lm.softmax(x, dim), F.softmax(x, dim=dim))


def test_softmax_huge_inputs_stable():
    torch.manual_seed(0)
    x = torch.randn(5, 11) * 1e4
    out = lm.softmax(x, -1)
    assert torch.isfinite(out).all()
    close(out, F.softmax(x, dim=-1))
    close(out.sum(-1), torch.ones(5))
    # Large common offset (shift invariance must not cost precision).
    y = torch.randn(3, 8) + 1e4
    close(lm.softmax(y, -1), F.softmax(y, dim=-1))
    close(lm.softmax(torch.full((2, 4), 1e30), -1), torch.full((2, 4), 0.25))


# ---------------------------------------------------------------------------------------------------------
# cross_entropy
# ---------------------------------------------------------------------------------------------------------


def test_cross_entropy_matches_torch_2d():
    torch.manual_seed(0)
    logits = torch.randn(12, 31) * 2
    targets = torch.randint(0, 31, (12,))
    loss = lm.cross_entropy(logits, targets)
    assert loss.ndim == 0
    close(loss, F.cross_entropy(logits, targets))
    # Gradient w.r.t. logits.
    l1 = logits.clone().requires_grad_(True)
    l2 = logits.clone().requires_grad_(True)
    lm.cross_entropy(l1, targets).backward()
    F.cross_entropy(l2, targets).backward()
    close(l1.grad, l2.grad)


@pytest.mark.parametrize("lead", [(3, 5), (2, 3, 4)])
def test_cross_entropy_leading_dims(lead):
    torch.manual_seed(0)
    v = 17
    logits = torch.randn(*lead, v)
    targets = torch.randint(0, v, lead)
    expected = F.cross_entropy(logits.reshape(-1, v), targets.reshape(-1))
    close(lm.cross_entropy(logits, targets), expected)


def test_cross_entropy_huge_logits():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 23) * 1e4
    targets = torch.randint(0, 23, (2, 6))
    loss = lm.cross_entropy(logits, targets)
    assert torch.isfinite(loss)
    close(loss, F.cross_entropy(logits.flatten(0, 1), targets.flatten()))
    # Gradient finite and correct as well.
    lg = logits.clone().requires_grad_(True)
    lg2 = logits.clone().requires_grad_(True)
    lm.cross_entropy(lg, targets).backward()
    F.cross_entropy(lg2.flatten(0, 1), targets.flatten()).backward()
    assert torch.isfinite(lg.grad).all()
    close(lg.grad, lg2.grad)


def test_cross_entropy_large_offset_keeps_precision():
    """O(1) loss on top of a huge common offset: computed as log_softmax after subtracting the max."""
    torch.manual_seed(0)
    logits = torch.randn(8, 23) + 1e4
    targets = torch.randint(0, 23, (8,))
    close(lm.cross_entropy(logits, targets), F.cross_entropy(logits, targets))
    flat = torch.full((4, 23), 1e30)
    close(lm.cross_entropy(flat, torch.zeros(4, dtype=torch.long)), torch.tensor(math.log(23)))


@pytest.mark.parametrize("chunk_rows", [None, 1, 5, 23, 64])
def test_linear_cross_entropy_matches_unfused(chunk_rows):
    """The output layer fused with the loss (chunked over rows) equals cross_entropy(h @ W.T, targets)."""
    gen = torch.Generator().manual_seed(0)
    n, d, v = 23, 16, 41
    h = torch.randn(n, d, generator=gen)
    w = torch.randn(v, d, generator=gen) / 2
    targets = torch.randint(0, v, (n,), generator=gen)
    h1, w1 = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    h2, w2 = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    kw = {} if chunk_rows is None else {"chunk_rows": chunk_rows}
    fused = lm.linear_cross_entropy(h1, w1, targets, **kw)
    ref = F.cross_entropy(h2 @ w2.T, targets)
    assert fused.ndim == 0
    close(fused, ref)
    # A non-unit upstream gradient (e.g. loss scaling / gradient accumulation) is honoured.
    (3.0 * fused).backward()
    (3.0 * ref).backward()
    close(h1.grad, h2.grad)
    close(w1.grad, w2.grad)
    # Without autograd (evaluation) the value is the same.
    with torch.no_grad():
        close(lm.linear_cross_entropy(h, w, targets, **kw), ref.detach())
    # Only one input requiring grad.
    w3 = w.clone().requires_grad_(True)
    lm.linear_cross_entropy(h, w3, targets, **kw).backward()
    close(w3.grad, w2.grad / 3.0)


def test_linear_cross_entropy_huge_logits():
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(10, 8, generator=gen) * 100
    w = torch.randn(30, 8, generator=gen) * 10
    targets = torch.randint(0, 30, (10,), generator=gen)
    out = lm.linear_cross_entropy(h, w, targets, chunk_rows=3)
    assert torch.isfinite(out)
    close(out, F.cross_entropy(h @ w.T, targets))


# ---------------------------------------------------------------------------------------------------------
# scaled_dot_product_attention
# ---------------------------------------------------------------------------------------------------------


def _random_mask(shape, gen):
    mask = torch.rand(shape, generator=gen) > 0.4
    mask[..., 0] = True  # no fully-masked rows
    return mask


@pytest.mark.parametrize(
    "lead,mask_shape",
    [
        ((2,), None),
        ((2, 3), None),
        ((2, 3), "2d"),
        ((2, 3), "full"),
        ((2, 3), "head_broadcast"),
        ((2,), "full"),
        ((2, 2, 3), "full"),
        ((2, 2, 3), "2d"),
    ],
)
def test_sdpa_matches_torch(lead, mask_shape):
    gen = torch.Generator().manual_seed(0)
    n_q, n_k, d_k, d_v = 5, 7, 8, 6
    q = torch.randn(*lead, n_q, d_k, generator=gen)
    k = torch.randn(*lead, n_k, d_k, generator=gen)
    v = torch.randn(*lead, n_k, d_v, generator=gen)
    if mask_shape is None:
        mask = None
    elif mask_shape == "2d":
        mask = _random_mask((n_q, n_k), gen)
    elif mask_shape == "full":
        mask = _random_mask((*lead, n_q, n_k), gen)
    else:  # (batch, 1, n_q, n_k): broadcast over heads
        mask = _random_mask((lead[0], 1, n_q, n_k), gen)
    if mask is None:
        out = lm.scaled_dot_product_attention(q, k, v)
    else:
        out = lm.scaled_dot_product_attention(q, k, v, mask)
    assert out.shape == (*lead, n_q, d_v)
    close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def test_sdpa_causal_mask_and_gradients():
    torch.manual_seed(0)
    s, d = 6, 8
    q, k, v = (torch.randn(2, 3, s, d, requires_grad=True) for _ in range(3))
    mask = torch.ones(s, s, dtype=torch.bool).tril()
    out = lm.scaled_dot_product_attention(q, k, v, mask=mask)
    q2, k2, v2 = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    ref = F.scaled_dot_product_attention(q2, k2, v2, is_causal=True)
    close(out, ref)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    for a, b in ((q, q2), (k, k2), (v, v2)):
        close(a.grad, b.grad)


def test_sdpa_large_scores_stable():
    torch.manual_seed(0)
    q = torch.randn(2, 4, 8) * 100
    k = torch.randn(2, 4, 8) * 100
    v = torch.randn(2, 4, 8)
    out = lm.scaled_dot_product_attention(q, k, v)
    assert torch.isfinite(out).all()
    close(out, F.scaled_dot_product_attention(q, k, v))


# ---------------------------------------------------------------------------------------------------------
# SwiGLU
# ---------------------------------------------------------------------------------------------------------


def test_swiglu_matches_reference():
    torch.manual_seed(0)
    d, d_ff = 16, 40
    ffn = randomize_(lm.SwiGLU(d, d_ff))
    assert set(ffn.state_dict()) == {"w1.weight", "w2.weight", "w3.weight"}
    assert tuple(ffn.w1.weight.shape) == (d_ff, d)
    assert tuple(ffn.w2.weight.shape) == (d, d_ff)
    assert tuple(ffn.w3.weight.shape) == (d_ff, d)
    x = torch.randn(3, 5, d)
    w1, w2, w3 = ffn.w1.weight.detach(), ffn.w2.weight.detach(), ffn.w3.weight.detach()
    close(ffn(x), ref_swiglu(x, w1, w2, w3))
    close(ffn(x), F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2))


def test_swiglu_loads_foreign_state_dict():
    torch.manual_seed(0)
    d, d_ff = 8, 24
    sd = {
        "w1.weight": torch.randn(d_ff, d),
        "w2.weight": torch.randn(d, d_ff),
        "w3.weight": torch.randn(d_ff, d),
    }
    ffn = lm.SwiGLU(d, d_ff)
    ffn.load_state_dict(sd, strict=True)
    x = torch.randn(4, d)
    close(ffn(x), ref_swiglu(x, sd["w1.weight"], sd["w2.weight"], sd["w3.weight"]))


# ---------------------------------------------------------------------------------------------------------
# RoPE
# ---------------------------------------------------------------------------------------------------------

ROPE_THETA, ROPE_DK, ROPE_MAX = 10000.0, 16, 32


def make_rope():
    return lm.RotaryPositionalEmbedding(ROPE_THETA, ROPE_DK, ROPE_MAX)


def test_rope_buffers_not_persistent():
    rope = make_rope()
    assert len(rope.state_dict()) == 0
    assert len(list(rope.parameters())) == 0


def test_rope_positions_absent():
    torch.manual_seed(0)
    x = torch.randn(3, 10, ROPE_DK)
    out = make_rope()(x)
    assert out.shape == x.shape
    close(out, ref_rope(x, torch.arange(10), ROPE_THETA))


def test_rope_positions_1d():
    torch.manual_seed(0)
    x = torch.randn(3, 10, ROPE_DK)
    pos = torch.randperm(ROPE_MAX)[:10]
    out = make_rope()(x, pos)
    close(out, ref_rope(x, pos, ROPE_THETA))
    # Explicit arange equals the default.
    close(make_rope()(x, torch.arange(10)), ref_rope(x, torch.arange(10), ROPE_THETA))


def test_rope_positions_batched():
    torch.manual_seed(0)
    x = torch.randn(3, 10, ROPE_DK)
    pos = torch.randint(0, ROPE_MAX, (3, 10))
    close(make_rope()(x, pos), ref_rope(x, pos, ROPE_THETA))


def test_rope_4d_input_broadcasts_over_heads():
    torch.manual_seed(0)
    b, h, s = 2, 3, 10  # b != h so a wrong broadcast cannot silently line up
    x = torch.randn(b, h, s, ROPE_DK)
    rope = make_rope()
    pos_b = torch.randint(0, ROPE_MAX, (b, s))
    close(rope(x, pos_b), ref_rope(x, pos_b[:, None, :], ROPE_THETA))
    pos_1 = torch.randint(0, ROPE_MAX, (s,))
    close(rope(x, pos_1), ref_rope(x, pos_1, ROPE_THETA))
    close(rope(x), ref_rope(x, torch.arange(s), ROPE_THETA))


def test_rope_pairs_are_adjacent_and_norm_preserving():
    rope = make_rope()
    x = torch.zeros(1, 4, ROPE_DK)
    x[..., 0] = 1.0  # only the first adjacent pair (0, 1) is non-zero
    out = rope(x, torch.tensor([0, 1, 2, 3]))
    # Only dims 0, 1 change (pair k=0 has frequency 1): (cos p, sin p).
    close(out[0, :, 2:], torch.zeros(4, ROPE_DK - 2))
    p = torch.arange(4, dtype=torch.float32)
    close(out[0, :, 0], torch.cos(p))
    close(out[0, :, 1], torch.sin(p))
    y = torch.randn(2, 7, ROPE_DK)
    close(rope(y).norm(dim=-1), y.norm(dim=-1))
    # Position 0 is the identity.
    close(rope(y, torch.zeros(7, dtype=torch.long)), y)


# ---------------------------------------------------------------------------------------------------------
# Multi-head self-attention
# ---------------------------------------------------------------------------------------------------------

MHA_D, MHA_H, MHA_S = 32, 4, 12


def _mha_weights(attn):
    return [getattr(attn, f"{n}_proj").weight.detach() for n in ("q", "k", "v", "output")]


def test_mha_structure():
    attn = lm.MultiHeadSelfAttention(MHA_D, MHA_H)
    assert set(attn.state_dict()) == {f"{n}_proj.weight" for n in ("q", "k", "v", "output")}
    for n in ("q", "k", "v", "output"):
        assert tuple(getattr(attn, f"{n}_proj").weight.shape) == (MHA_D, MHA_D)
    rope = lm.RotaryPositionalEmbedding(THETA, MHA_D // MHA_H, 64)
    attn_r = lm.MultiHeadSelfAttention(MHA_D, MHA_H, rope=rope)
    assert set(attn_r.state_dict()) == set(attn.state_dict())  # RoPE adds no persistent state


@pytest.mark.parametrize("attention", [None, "sdpa", "reference"])
def test_mha_no_rope_matches_reference(attention):
    torch.manual_seed(0)
    kw = {} if attention is None else {"attention": attention}
    attn = randomize_(lm.MultiHeadSelfAttention(MHA_D, MHA_H, **kw))
    x = torch.randn(2, MHA_S, MHA_D)
    out = attn(x)
    assert out.shape == x.shape
    close(out, ref_mha(x, *_mha_weights(attn), MHA_H))


@pytest.mark.parametrize("attention", [None, "sdpa", "reference"])
@pytest.mark.parametrize("positions", ["absent", "1d", "2d"])
def test_mha_rope_matches_reference(attention, positions):
    torch.manual_seed(0)
    kw = {} if attention is None else {"attention": attention}
    rope = lm.RotaryPositionalEmbedding(THETA, MHA_D // MHA_H, 32)
    attn = randomize_(lm.MultiHeadSelfAttention(MHA_D, MHA_H, rope=rope, **kw))
    b = 3
    x = torch.randn(b, MHA_S, MHA_D)
    if positions == "absent":
        pos = None
        out = attn(x)
    elif positions == "1d":
        # Irregular positions: RoPE scores only see relative offsets, so a constant shift would be invisible.
        pos = torch.randperm(32)[:MHA_S].sort().values
        out = attn(x, token_positions=pos)
    else:
        pos = torch.stack([torch.randperm(32)[:MHA_S].sort().values for _ in range(b)])  # differ per row
        out = attn(x, pos)
    assert out.shape == x.shape
    close(out, ref_mha(x, *_mha_weights(attn), MHA_H, theta=THETA, positions=pos))
    if pos is not None:
        # The positions matter: default positions give a different result.
        assert not torch.allclose(out, attn(x), atol=1e-4, rtol=1e-4)


def test_mha_sdpa_and_reference_paths_agree_with_grads():
    torch.manual_seed(0)
    rope = lm.RotaryPositionalEmbedding(THETA, MHA_D // MHA_H, 32)
    a1 = randomize_(lm.MultiHeadSelfAttention(MHA_D, MHA_H, rope=rope, attention="sdpa"))
    a2 = lm.MultiHeadSelfAttention(MHA_D, MHA_H, rope=rope, attention="reference")
    a2.load_state_dict(a1.state_dict(), strict=True)
    x1 = torch.randn(2, MHA_S, MHA_D, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    o1, o2 = a1(x1), a2(x2)
    close(o1, o2)
    g = torch.randn_like(o1)
    (o1 * g).sum().backward()
    (o2 * g).sum().backward()
    close(x1.grad, x2.grad)
    p2 = dict(a2.named_parameters())
    for n, p1 in a1.named_parameters():
        close(p1.grad, p2[n].grad)


def test_mha_is_causal():
    torch.manual_seed(0)
    attn = lm.MultiHeadSelfAttention(MHA_D, MHA_H, rope=lm.RotaryPositionalEmbedding(THETA, MHA_D // MHA_H, 32))
    x = torch.randn(1, MHA_S, MHA_D)
    y = x.clone()
    y[:, 7:] = torch.randn(1, MHA_S - 7, MHA_D)
    close(attn(x)[:, :7], attn(y)[:, :7], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(attn(x)[:, 7:], attn(y)[:, 7:])


# ---------------------------------------------------------------------------------------------------------
# TransformerBlock
# ---------------------------------------------------------------------------------------------------------

BLOCK_KEYS_PRE = {
    "ln1.weight",
    "attn.q_proj.weight",
    "attn.k_proj.weight",
    "attn.v_proj.weight",
    "attn.output_proj.weight",
    "ln2.weight",
    "ffn.w1.weight",
    "ffn.w2.weight",
    "ffn.w3.weight",
}


def test_block_state_dict_keys():
    block = lm.TransformerBlock(D_MODEL, N_HEADS, D_FF, CTX, THETA)
    assert set(block.state_dict()) == BLOCK_KEYS_PRE


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"attention": "reference"},
        {"norm": "post"},
        {"norm": "none"},
        {"pos_emb": "nope"},
        {"ffn": "silu"},
        {"norm": "post", "ffn": "silu", "pos_emb": "nope", "attention": "reference"},
    ],
    ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()) or "default",
)
def test_block_matches_reference(kw):
    torch.manual_seed(0)
    block = randomize_(lm.TransformerBlock(D_MODEL, N_HEADS, D_FF, CTX, THETA, **kw))
    norm = kw.get("norm", "pre")
    ffn = kw.get("ffn", "swiglu")
    keys = set(block.state_dict())
    expected = set(BLOCK_KEYS_PRE)
    if norm == "none":
        expected -= {"ln1.weight", "ln2.weight"}
    if ffn == "silu":
        expected -= {"ffn.w3.weight"}
    assert keys == expected
    if ffn == "silu":
        assert tuple(block.ffn.w1.weight.shape) == (D_FF, D_MODEL)
        assert tuple(block.ffn.w2.weight.shape) == (D_MODEL, D_FF)
    x = torch.randn(2, CTX, D_MODEL)
    sd = {k: v.detach() for k, v in block.state_dict().items()}
    theta = None if kw.get("pos_emb") == "nope" else THETA
    expected_out = ref_block(x, sd, "", N_HEADS, theta=theta, norm=norm, ffn=ffn)
    out = block(x)
    assert out.shape == x.shape
    close(out, expected_out)


def test_block_shorter_sequence():
    torch.manual_seed(0)
    block = randomize_(lm.TransformerBlock(D_MODEL, N_HEADS, D_FF, CTX, THETA))
    x = torch.randn(3, 5, D_MODEL)
    sd = {k: v.detach() for k, v in block.state_dict().items()}
    close(block(x), ref_block(x, sd, "", N_HEADS, theta=THETA))


# ---------------------------------------------------------------------------------------------------------
# TransformerLM: structure and state-dict compatibility
# ---------------------------------------------------------------------------------------------------------


def test_lm_state_dict_keys_and_shapes():
    model = make_lm()
    sd = model.state_dict()
    assert set(sd) == expected_lm_keys(N_LAYERS)
    shapes = expected_lm_shapes(VOCAB, D_MODEL, N_LAYERS, D_FF)
    for k, v in sd.items():
        assert tuple(v.shape) == shapes[k], k
    # Attribute names of the CS336 layout.
    assert isinstance(model.layers, nn.ModuleList)
    assert len(model.layers) == N_LAYERS
    for name in ("token_embeddings", "ln_final", "lm_head"):
        assert hasattr(model, name)
    for name in ("ln1", "attn", "ln2", "ffn"):
        assert hasattr(model.layers[0], name)
    # No biases anywhere.
    assert not any("bias" in k for k in sd)


def test_lm_strict_load_of_cs336_state_dict():
    """A state dict built purely from the CS336 key list / shapes loads with strict=True."""
    g = torch.Generator().manual_seed(123)
    shapes = expected_lm_shapes(VOCAB, D_MODEL, N_LAYERS, D_FF)
    sd = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    model = make_lm()
    result = model.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    # And the model then computes exactly the reference forward with those weights.
    idx = torch.randint(0, VOCAB, (2, CTX), generator=g)
    # Rescale so activations stay O(1) for a meaningful fp32 comparison.
    sd2 = {k: (v if v.ndim == 1 else v / math.sqrt(v.shape[-1])) for k, v in sd.items()}
    model.load_state_dict(sd2, strict=True)
    with torch.no_grad():
        close(model(idx), ref_lm(idx, sd2, N_LAYERS, N_HEADS))


def test_lm_round_trip_state_dict():
    m1 = randomize_(make_lm(seed=0))
    m2 = make_lm(seed=1)
    m2.load_state_dict(m1.state_dict(), strict=True)
    idx = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        assert torch.equal(m1(idx), m2(idx))


# ---------------------------------------------------------------------------------------------------------
# TransformerLM: numerics
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attention", [None, "sdpa", "reference"])
@pytest.mark.parametrize("seq", [CTX, 7])
def test_lm_matches_reference_forward(attention, seq):
    kw = {} if attention is None else {"attention": attention}
    model = randomize_(make_lm(**kw))
    idx = torch.randint(0, VOCAB, (3, seq), generator=torch.Generator().manual_seed(5))
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    with torch.no_grad():
        logits = model(idx)
    assert logits.shape == (3, seq, VOCAB)
    assert logits.dtype == torch.float32
    close(logits, ref_lm(idx, sd, N_LAYERS, N_HEADS))


def test_lm_gradients_match_reference():
    model = randomize_(make_lm())
    idx = torch.randint(0, VOCAB, (2, CTX), generator=torch.Generator().manual_seed(5))
    targets = torch.randint(0, VOCAB, (2, CTX), generator=torch.Generator().manual_seed(6))
    leaves = state_dict_leaves(model)
    ref_loss = F.cross_entropy(ref_lm(idx, leaves, N_LAYERS, N_HEADS).flatten(0, 1), targets.flatten())
    ref_loss.backward()
    loss = F.cross_entropy(model(idx).flatten(0, 1), targets.flatten())
    loss.backward()
    close(loss, ref_loss)
    for name, p in model.named_parameters():
        close(p.grad, leaves[name].grad)


def test_lm_sdpa_and_reference_attention_agree():
    m_sdpa = randomize_(make_lm(attention="sdpa"))
    m_ref = make_lm(attention="reference")
    m_ref.load_state_dict(m_sdpa.state_dict(), strict=True)
    idx = torch.randint(0, VOCAB, (3, CTX), generator=torch.Generator().manual_seed(7))
    l1, l2 = m_sdpa(idx), m_ref(idx)
    close(l1, l2)
    # Upstream gradient scaled like a mean loss so parameter gradients are O(1) and 1e-5 is meaningful.
    g = torch.randn(l1.shape, generator=torch.Generator().manual_seed(8)) / math.sqrt(l1.numel())
    (l1 * g).sum().backward()
    (l2 * g).sum().backward()
    p_ref = dict(m_ref.named_parameters())
    for name, p in m_sdpa.named_parameters():
        close(p.grad, p_ref[name].grad)


@pytest.mark.parametrize("attention", ["sdpa", "reference"])
def test_lm_is_causal(attention):
    model = randomize_(make_lm(attention=attention))
    gen = torch.Generator().manual_seed(9)
    idx = torch.randint(0, VOCAB, (2, CTX), generator=gen)
    with torch.no_grad():
        base = model(idx)
        for t in (0, 5, CTX - 2):
            changed = idx.clone()
            changed[:, t + 1] = (idx[:, t + 1] + 1 + torch.randint(0, VOCAB - 1, (2,), generator=gen)) % VOCAB
            out = model(changed)
            close(out[:, : t + 1], base[:, : t + 1], atol=1e-6, rtol=1e-6)
            assert not torch.allclose(out[:, t + 1], base[:, t + 1])
        # Changing the whole suffix never changes the prefix either.
        changed = idx.clone()
        changed[:, 4:] = torch.randint(0, VOCAB, (2, CTX - 4), generator=gen)
        close(model(changed)[:, :4], base[:, :4], atol=1e-6, rtol=1e-6)


def _last_logits_after_prefix_permutation(model):
    gen = torch.Generator().manual_seed(13)
    idx = torch.randint(0, VOCAB, (1, 8), generator=gen)
    perm = torch.tensor([3, 0, 6, 1, 5, 2, 4, 7])  # last position fixed
    with torch.no_grad():
        return model(idx)[0, -1], model(idx[:, perm])[0, -1]


def test_lm_rope_uses_positions():
    """One layer with RoPE: permuting the prefix changes the last position's logits."""
    a, b = _last_logits_after_prefix_permutation(randomize_(make_lm(num_layers=1)))
    assert not torch.allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("attention", ["sdpa", "reference"])
def test_lm_targets_returns_fused_loss(attention):
    m1 = randomize_(make_lm(attention=attention))
    m2 = make_lm(attention=attention)
    m2.load_state_dict(m1.state_dict(), strict=True)
    gen = torch.Generator().manual_seed(10)
    idx = torch.randint(0, VOCAB, (3, CTX), generator=gen)
    targets = torch.randint(0, VOCAB, (3, CTX), generator=gen)
    fused = m1(idx, targets)
    assert fused.ndim == 0
    unfused = F.cross_entropy(m2(idx).flatten(0, 1), targets.flatten())
    close(fused, unfused)
    fused.backward()
    unfused.backward()
    p2 = dict(m2.named_parameters())
    for name, p in m1.named_parameters():
        close(p.grad, p2[name].grad)
    # Keyword form too.
    close(m1(idx, targets=targets), unfused)


def test_lm_targets_large_vocab_many_rows():
    """Bigger vocab and more rows than one chunk of a chunked fused loss would hold."""
    kw = {**BASE_KW, "vocab_size": 16411, "num_layers": 1}
    torch.manual_seed(0)
    m1 = randomize_(lm.TransformerLM(**kw))
    m2 = lm.TransformerLM(**kw)
    m2.load_state_dict(m1.state_dict(), strict=True)
    gen = torch.Generator().manual_seed(14)
    idx = torch.randint(0, kw["vocab_size"], (9, CTX), generator=gen)
    targets = torch.randint(0, kw["vocab_size"], (9, CTX), generator=gen)
    fused = m1(idx, targets)
    unfused = F.cross_entropy(m2(idx).flatten(0, 1), targets.flatten())
    close(fused, unfused)
    fused.backward()
    unfused.backward()
    p2 = dict(m2.named_parameters())
    for name, p in m1.named_parameters():
        close(p.grad, p2[name].grad)


def test_lm_targets_shorter_sequence():
    model = randomize_(make_lm())
    gen = torch.Generator().manual_seed(11)
    idx = torch.randint(0, VOCAB, (2, 5), generator=gen)
    targets = torch.randint(0, VOCAB, (2, 5), generator=gen)
    with torch.no_grad():
        close(model(idx, targets), F.cross_entropy(model(idx).flatten(0, 1), targets.flatten()))


# ---------------------------------------------------------------------------------------------------------
# Ablation switches (CS336 section 7)
# ---------------------------------------------------------------------------------------------------------

ABLATIONS = [
    {"norm": "post"},
    {"norm": "none"},
    {"pos_emb": "nope"},
    {"ffn": "silu"},
    {"tie_embeddings": True},
    {"norm": "none", "ffn": "silu", "pos_emb": "nope", "tie_embeddings": True},
]


def _ablation_id(kw):
    return "-".join(f"{k}={v}" for k, v in kw.items())


def test_default_switches_are_off():
    default = make_lm()
    explicit = make_lm(norm="pre", pos_emb="rope", ffn="swiglu", tie_embeddings=False, attention="sdpa")
    assert set(default.state_dict()) == set(explicit.state_dict())
    explicit.load_state_dict(default.state_dict(), strict=True)
    idx = torch.randint(0, VOCAB, (2, 8))
    with torch.no_grad():
        close(default(idx), explicit(idx))
    assert default.lm_head.weight is not default.token_embeddings.weight


@pytest.mark.parametrize("kw", ABLATIONS, ids=_ablation_id)
def test_ablation_parameter_sets(kw):
    model = make_lm(**kw)
    keys = set(model.state_dict())
    norm = kw.get("norm", "pre")
    ffn = kw.get("ffn", "swiglu")
    if norm == "none":
        assert not any("ln" in k for k in keys), keys
        assert keys == expected_lm_keys(N_LAYERS, norm="none", ffn=ffn, final_norm=False)
    elif norm == "post":
        # Block norms exist; whether a final norm is kept is an implementation choice.
        assert keys - {"ln_final.weight"} == expected_lm_keys(N_LAYERS, ffn=ffn, final_norm=False)
    else:
        assert keys == expected_lm_keys(N_LAYERS, ffn=ffn)
    if ffn == "silu":
        assert not any("w3" in k for k in keys)
        assert tuple(model.layers[0].ffn.w1.weight.shape) == (D_FF, D_MODEL)
        assert tuple(model.layers[0].ffn.w2.weight.shape) == (D_MODEL, D_FF)
    if kw.get("tie_embeddings"):
        assert model.lm_head.weight is model.token_embeddings.weight
        # One shared Parameter: parameters() yields it once, the state dict names it twice.
        assert len(list(model.parameters())) == len(keys) - 1
    else:
        assert model.lm_head.weight is not model.token_embeddings.weight


@pytest.mark.parametrize("kw", ABLATIONS, ids=_ablation_id)
def test_ablation_matches_reference_forward_backward(kw):
    model = randomize_(make_lm(**kw))
    gen = torch.Generator().manual_seed(12)
    idx = torch.randint(0, VOCAB, (2, CTX), generator=gen)
    targets = torch.randint(0, VOCAB, (2, CTX), generator=gen)
    leaves = state_dict_leaves(model)
    ref_logits = ref_lm(
        idx,
        leaves,
        N_LAYERS,
        N_HEADS,
        norm=kw.get("norm", "pre"),
        pos_emb=kw.get("pos_emb", "rope"),
        ffn=kw.get("ffn", "swiglu"),
    )
    logits = model(idx)
    close(logits, ref_logits)
    F.cross_entropy(ref_logits.flatten(0, 1), targets.flatten()).backward()
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    loss.backward()
    assert torch.isfinite(loss)
    named = dict(model.named_parameters())
    for name, p in named.items():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        close(p.grad, leaves[name].grad)
    # The fused-loss path gives the same loss and gradients for every variant (tied weights included).
    unfused_grads = {name: p.grad.clone() for name, p in named.items()}
    model.zero_grad(set_to_none=True)
    fused = model(idx, targets)
    close(fused, loss.detach())
    fused.backward()
    for name, p in named.items():
        close(p.grad, unfused_grads[name])


@pytest.mark.parametrize("attention", ["sdpa", "reference"])
def test_nope_ignores_positions(attention):
    """One layer without positional encoding: the last position only sees the *set* of earlier tokens."""
    model = randomize_(make_lm(num_layers=1, pos_emb="nope", attention=attention))
    a, b = _last_logits_after_prefix_permutation(model)
    close(a, b)


def test_tied_embeddings_state_dict_and_grads():
    m1 = randomize_(make_lm(tie_embeddings=True))
    m2 = make_lm(seed=3, tie_embeddings=True)
    sd = m1.state_dict()
    assert "token_embeddings.weight" in sd
    m2.load_state_dict(sd, strict=True)
    assert m2.lm_head.weight is m2.token_embeddings.weight
    assert torch.equal(m2.token_embeddings.weight, m1.token_embeddings.weight)
    idx = torch.randint(0, VOCAB, (2, 8))
    with torch.no_grad():
        assert torch.equal(m1(idx), m2(idx))
    # Shared weight receives the sum of both contributions: compare against an untied copy.
    untied = make_lm()
    untied_sd = {**sd, "lm_head.weight": sd["token_embeddings.weight"].clone()}
    untied.load_state_dict(untied_sd, strict=True)
    m2(idx).square().mean().backward()
    untied(idx).square().mean().backward()
    close(
        m2.token_embeddings.weight.grad,
        untied.token_embeddings.weight.grad + untied.lm_head.weight.grad,
    )


# ---------------------------------------------------------------------------------------------------------
# Parameter count / FLOPs helpers
# ---------------------------------------------------------------------------------------------------------


def _config(**overrides):
    from lm.config import ModelConfig

    kw = {
        **BASE_KW,
        "norm": "pre",
        "pos_emb": "rope",
        "ffn": "swiglu",
        "tie_embeddings": False,
        "attention": "sdpa",
        **overrides,
    }
    return ModelConfig(**kw), kw


@pytest.mark.parametrize("kw", [{}, *ABLATIONS], ids=lambda kw: _ablation_id(kw) or "default")
def test_count_parameters(kw):
    cfg, full_kw = _config(**kw)
    torch.manual_seed(0)
    model = lm.TransformerLM(**full_kw)
    total = sum(p.numel() for p in model.parameters())
    assert lm.count_parameters(model) == total
    assert lm.count_parameters(cfg) == total
    assert lm.count_parameters(model, include_embeddings=True) == total
    emb = VOCAB * D_MODEL
    expected_non_emb = total - emb if kw.get("tie_embeddings") else total - 2 * emb
    assert lm.count_parameters(model, include_embeddings=False) == expected_non_emb
    assert lm.count_parameters(cfg, include_embeddings=False) == expected_non_emb
    assert isinstance(lm.count_parameters(cfg), int)


def test_count_parameters_closed_form():
    cfg, _ = _config()
    per_layer = 4 * D_MODEL * D_MODEL + 3 * D_MODEL * D_FF + 2 * D_MODEL
    non_emb = N_LAYERS * per_layer + D_MODEL
    assert lm.count_parameters(cfg, include_embeddings=False) == non_emb
    assert lm.count_parameters(cfg) == non_emb + 2 * VOCAB * D_MODEL


def test_flops_per_token():
    cfg, _ = _config(context_length=64)
    f = lm.flops_per_token(cfg)
    assert isinstance(f, float | int)
    assert f > 6 * lm.count_parameters(cfg, include_embeddings=False)
    # Linear (affine) in num_layers.
    f1, f2, f3, f5 = (lm.flops_per_token(_config(context_length=64, num_layers=n)[0]) for n in (1, 2, 3, 5))
    assert f1 < f2 < f3 < f5
    assert math.isclose(f3 - f2, f2 - f1, rel_tol=1e-9)
    assert math.isclose(f5 - f3, 2 * (f2 - f1), rel_tol=1e-9)
    # The attention term grows with the context length.
    assert lm.flops_per_token(_config(context_length=128)[0]) > f


# ---- fused fast paths against lm's own from-scratch math ----


def test_rmsnorm_module_equals_from_scratch_reference():
    from lm.model import rms_norm_reference

    torch.manual_seed(0)
    norm = lm.RMSNorm(48, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(48))
    x = torch.randn(3, 7, 48)
    torch.testing.assert_close(norm(x), rms_norm_reference(x, norm.weight, 1e-5), atol=1e-6, rtol=1e-6)
    xb = x.to(torch.bfloat16)
    assert norm(xb).dtype == torch.bfloat16
    torch.testing.assert_close(norm(xb), rms_norm_reference(xb, norm.weight, 1e-5))


def test_rope_complex_fast_path_equals_real_pair_path():
    """fp32 inputs take the complex-multiply path; other dtypes the explicit pair rotation."""
    torch.manual_seed(0)
    rope = lm.RotaryPositionalEmbedding(10000.0, 16, 64)
    x = torch.randn(2, 3, 10, 16, dtype=torch.float64)
    pos = torch.randint(0, 64, (2, 10))
    fast = rope(x.float(), pos.unsqueeze(1))  # complex path
    slow = rope(x, pos.unsqueeze(1)).float()  # float64: the real pair path
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# compile_layers: the compiled training path computes what the eager one does
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow  # compiles (about 20 s cold on the CI machines)
@pytest.mark.parametrize("batch", [2, 40])  # 2 x 16 x 64 logits: compiled loss; 40 x 16 x ...: chunked eager loss
def test_compile_layers_matches_eager(batch, monkeypatch):
    # A tiny threshold makes the larger batch take the chunked eager loss, so both loss paths are checked.
    monkeypatch.setattr(lm.model, "COMPILED_LOSS_MAX_LOGITS", 2 * 16 * 64)
    torch.manual_seed(0)
    eager = make_lm(seed=3, vocab_size=64, context_length=16, num_layers=2)
    compiled = make_lm(seed=3, vocab_size=64, context_length=16, num_layers=2)
    keys = list(compiled.state_dict())
    assert lm.compile_layers(compiled) is compiled
    assert list(compiled.state_dict()) == keys  # CS336 names survive compilation
    idx, targets = torch.randint(0, 64, (batch, 16)), torch.randint(0, 64, (batch, 16))
    for model in (eager, compiled):
        model(idx, targets).backward()
    close(compiled(idx, targets), eager(idx, targets))
    for p, q in zip(compiled.parameters(), eager.parameters(), strict=True):
        close(p.grad, q.grad, atol=1e-5, rtol=1e-4)
    assert all(layer._compiled_call_impl is not None for layer in compiled.layers)
