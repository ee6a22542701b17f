"""AdamW (CS336 Algorithm 1), the cosine learning-rate schedule with warmup, and global-norm clipping."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor


class AdamW(torch.optim.Optimizer):
    """AdamW with decoupled weight decay scaled by lr (Loshchilov & Hutter; CS336 Algorithm 1).

    Per parameter: m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
    theta -= lr * sqrt(1-b2^t)/(1-b1^t) * m / (sqrt(v) + eps); theta -= lr * wd * theta.
    Numerically this is `torch.optim.AdamW` (tests hold it to 1e-6 over 100 steps). The update runs over
    all parameters of a group at once with `torch._foreach_*` kernels, not a Python loop per tensor.
    State per parameter: "step" (int), "exp_avg", "exp_avg_sq", so `state_dict()` round-trips.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
    ):
        if lr < 0:
            raise ValueError(f"invalid learning rate {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas {betas}")
        if eps < 0 or weight_decay < 0:
            raise ValueError(f"invalid eps {eps} or weight_decay {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            grads, exp_avgs, exp_avg_sqs = [], [], []
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
            # Parameters of one group share a step count unless some skipped steps (no grad): bucket by it.
            by_step: dict[int, list[int]] = {}
            for i, p in enumerate(params):
                by_step.setdefault(self.state[p]["step"], []).append(i)
            for t, idx in by_step.items():
                _adamw_foreach(
                    [params[i] for i in idx],
                    [grads[i] for i in idx],
                    [exp_avgs[i] for i in idx],
                    [exp_avg_sqs[i] for i in idx],
                    t,
                    lr,
                    beta1,
                    beta2,
                    eps,
                    wd,
                )
        return loss


def _adamw_foreach(params, grads, exp_avgs, exp_avg_sqs, t, lr, beta1, beta2, eps, wd) -> None:
    # Same operation order as torch.optim.AdamW's foreach path, so results agree to rounding.
    torch._foreach_mul_(params, 1.0 - lr * wd)
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)
    bias_correction1 = 1.0 - beta1**t
    bias_correction2 = 1.0 - beta2**t
    step_size = lr / bias_correction1
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, math.sqrt(bias_correction2))
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, -step_size)


def get_lr_cosine_schedule(
    it: int, max_learning_rate: float, min_learning_rate: float, warmup_iters: int, cosine_cycle_iters: int
) -> float:
    """Learning rate at iteration `it`: linear warmup from 0 over `warmup_iters`, cosine decay to
    `min_learning_rate` at `cosine_cycle_iters`, then flat at the minimum."""
    if it < warmup_iters:
        return max_learning_rate * it / warmup_iters
    if it <= cosine_cycle_iters:
        progress = (it - warmup_iters) / max(1, cosine_cycle_iters - warmup_iters)
        return min_learning_rate + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_learning_rate - min_learning_rate)
    return min_learning_rate


def clip_gradients(parameters: Iterable[torch.nn.Parameter], max_l2_norm: float, eps: float = 1e-6) -> Tensor:
    """Scale all gradients in place so their global L2 norm is at most `max_l2_norm`.

    Parameters without a gradient are skipped. Returns the norm before clipping (a 0-dim tensor, so the
    caller decides when to sync it to the host). Same result as `torch.nn.utils.clip_grad_norm_`.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    # Multiply by min(1, max/(norm+eps)) without a host sync: the same kernel whether or not it clips.
    scale = torch.clamp(max_l2_norm / (total + eps), max=1.0)
    torch._foreach_mul_(grads, scale)
    return total
