"""From-scratch numeric functions of the CS336 Transformer: softmax, SiLU, attention, cross-entropy.

These are the exact references the model's fast path is tested against. The model itself may call
PyTorch's fused kernels where they are faster (see `lm/model.py`), never different math.
Also here: `linear_cross_entropy`, the output layer fused with the loss, which computes the mean
cross-entropy of `h @ W.T` in row chunks without ever holding the full (tokens, vocab) logits.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def softmax(x: Tensor, dim: int) -> Tensor:
    """Softmax along `dim`, stable for huge inputs (the max is subtracted first)."""
    x = x - x.amax(dim=dim, keepdim=True)
    e = torch.exp(x)
    return e / e.sum(dim=dim, keepdim=True)


def silu(x: Tensor) -> Tensor:
    """SiLU / swish: x * sigmoid(x)."""
    return x * torch.sigmoid(x)


def scaled_dot_product_attention(Q: Tensor, K: Tensor, V: Tensor, mask: Tensor | None = None) -> Tensor:
    """softmax(Q K^T / sqrt(d_k)) V.

    Q: (..., queries, d_k), K: (..., keys, d_k), V: (..., keys, d_v) -> (..., queries, d_v).
    `mask` is boolean and broadcastable to (..., queries, keys); True means "may attend".
    """
    d_k = Q.shape[-1]
    scores = Q @ K.transpose(-2, -1) / math.sqrt(d_k)  # (..., queries, keys)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return softmax(scores, dim=-1) @ V


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean negative log-likelihood of `targets` under `logits`.

    logits: (..., vocab) unnormalized; targets: (...) int64. The mean runs over every leading dim.
    Stable for huge logits: log-softmax is computed as x - max - log(sum(exp(x - max))).
    """
    logits = logits.reshape(-1, logits.shape[-1]).float()
    targets = targets.reshape(-1)
    shifted = logits - logits.amax(dim=-1, keepdim=True)
    log_norm = torch.log(torch.exp(shifted).sum(dim=-1))  # (n,)
    target_logit = shifted.gather(-1, targets[:, None]).squeeze(-1)
    return (log_norm - target_logit).mean()


def default_chunk_rows(vocab_size: int) -> int:
    """Rows per chunk for `linear_cross_entropy`: about 4 MB of fp32 logits, so a chunk stays in cache."""
    return max(64, (1 << 20) // vocab_size)


def _linear_cross_entropy_chunks(h: Tensor, weight: Tensor, targets: Tensor, chunk_rows: int, need_grad: bool):
    """Sum of CE over rows of h @ weight.T, chunk by chunk; with need_grad also n * dL/dh and n * dL/dW."""
    grad_h = torch.empty_like(h) if need_grad else None
    grad_w = torch.zeros_like(weight) if need_grad else None
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for start in range(0, h.shape[0], chunk_rows):
        hc = h[start : start + chunk_rows]  # (c, d)
        tc = targets[start : start + chunk_rows]  # (c,)
        logits = (hc @ weight.T).float()  # (c, vocab)
        target_logit = logits.gather(1, tc[:, None]).squeeze(1)
        row_max = logits.amax(dim=1, keepdim=True)
        probs = logits.sub_(row_max).exp_()  # in place: the logits are not needed again
        row_sum = probs.sum(dim=1, keepdim=True)
        total += (row_max.squeeze(1) + row_sum.log().squeeze(1) - target_logit).sum()
        if need_grad:
            probs.div_(row_sum)
            probs[torch.arange(tc.shape[0], device=tc.device), tc] -= 1.0  # n * dL/dlogits
            probs = probs.to(h.dtype)
            torch.mm(probs, weight, out=grad_h[start : start + chunk_rows])
            grad_w.addmm_(probs.T, hc)
    return total, grad_h, grad_w


class _LinearCrossEntropy(torch.autograd.Function):
    """mean CE(h @ W.T, targets), with both gradients computed during the forward pass.

    The loss is the graph's end, so dL/dlogits = (softmax - onehot) / n is known in the forward pass. Doing
    the backward matmuls there, chunk by chunk, means the (n, vocab) logits, log-probs and their gradient
    are never allocated whole: at small CPU configs these big buffers (page faults, three passes over
    memory) cost more than the output matmul itself.
    """

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, targets: Tensor, chunk_rows: int) -> Tensor:
        total, grad_h, grad_w = _linear_cross_entropy_chunks(h, weight, targets, chunk_rows, need_grad=True)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.n = h.shape[0]
        return total / h.shape[0]

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        grad_h, grad_w = ctx.saved_tensors
        scale = grad_loss / ctx.n
        return grad_h * scale, grad_w * scale, None, None


def linear_cross_entropy(h: Tensor, weight: Tensor, targets: Tensor, chunk_rows: int | None = None) -> Tensor:
    """Mean cross-entropy of logits `h @ weight.T` against `targets`, never materializing all logits.

    h: (n, d) float; weight: (vocab, d); targets: (n,) int64 -> scalar float32 loss. Equal to
    `cross_entropy(h @ weight.T, targets)` (tests check values and gradients). Meant for fp32 on CPU;
    under CUDA autocast use the unfused path. Without grad mode (evaluation) no gradients are computed.
    """
    chunk_rows = chunk_rows or default_chunk_rows(weight.shape[0])
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(h, weight, targets, chunk_rows)
    total, _, _ = _linear_cross_entropy_chunks(h, weight, targets, chunk_rows, need_grad=False)
    return total / h.shape[0]
