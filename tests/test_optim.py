"""Tests for ``lm.optim``: AdamW (vs torch.optim.AdamW), the cosine schedule and gradient clipping."""

from __future__ import annotations

import copy
import inspect
import io
import math

import pytest
import torch
from torch import nn

import lm

# ---------------------------------------------------------------------------------------------------------
# AdamW
# ---------------------------------------------------------------------------------------------------------

SHAPES = [(), (7,), (4, 5), (2, 3, 4)]


def _make_params(seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def _run_synthetic(opt_cls, params, steps, grad_seed=1, skip=(), **kw):
    """Step with fixed random gradients (independent of the parameters, so no feedback amplification).

    Parameters whose index is in ``skip`` never get a gradient (grad stays None).
    """
    opt = opt_cls(params, **kw)
    g = torch.Generator().manual_seed(grad_seed)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        for i, p in enumerate(params):
            grad = torch.randn(p.shape, generator=g)
            if i not in skip:
                p.grad = grad
        opt.step()
    return opt


def test_adamw_is_torch_optimizer_and_defaults():
    p = _make_params()
    opt = lm.AdamW(p)
    assert isinstance(opt, torch.optim.Optimizer)
    group = opt.param_groups[0]
    assert group["lr"] == 1e-3
    assert tuple(group["betas"]) == (0.9, 0.999)
    assert group["eps"] == 1e-8
    assert group["weight_decay"] == 0.01


def test_adamw_uses_foreach():
    src = inspect.getsource(type(lm.AdamW([nn.Parameter(torch.zeros(1))])))
    assert "_foreach_" in src


@pytest.mark.parametrize(
    "kw",
    [
        dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01),
        dict(),  # the defaults
        dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.0),
    ],
    ids=["cs336", "defaults", "other-betas-no-decay"],
)
def test_adamw_matches_torch_100_steps_synthetic(kw):
    ours = _make_params()
    ref = [nn.Parameter(p.detach().clone()) for p in ours]
    _run_synthetic(lm.AdamW, ours, 100, **kw)
    _run_synthetic(torch.optim.AdamW, ref, 100, **kw)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), atol=1e-6, rtol=0)


def test_adamw_matches_torch_on_model_with_gradless_param():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    unused = nn.Parameter(torch.randn(5, 2))  # never receives a gradient
    ref_model = copy.deepcopy(model)
    ref_unused = nn.Parameter(unused.detach().clone())
    kw = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    opt = lm.AdamW([*model.parameters(), unused], **kw)
    ref_opt = torch.optim.AdamW([*ref_model.parameters(), ref_unused], **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(100):
        x = torch.randn(16, 6, generator=g)
        y = torch.randn(16, 3, generator=g)
        for m, o in ((model, opt), (ref_model, ref_opt)):
            o.zero_grad(set_to_none=True)
            ((m(x) - y) ** 2).mean().backward()
            o.step()
    for a, b in zip(model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), atol=1e-6, rtol=0)
    assert unused.grad is None
    assert torch.equal(unused.detach(), ref_unused.detach())  # untouched: no update and no decay


def test_adamw_gradless_param_untouched_synthetic():
    ours = _make_params()
    before = [p.detach().clone() for p in ours]
    _run_synthetic(lm.AdamW, ours, 10, skip={2}, weight_decay=0.1)
    assert torch.equal(ours[2].detach(), before[2])
    assert not torch.equal(ours[1].detach(), before[1])


def test_adamw_param_groups_and_lr_changes_match_torch():
    ours = _make_params()
    ref = [nn.Parameter(p.detach().clone()) for p in ours]

    def groups(ps):
        return [
            {"params": ps[:2], "lr": 2e-3, "weight_decay": 0.0},
            {"params": ps[2:], "weight_decay": 0.05, "betas": (0.85, 0.99)},
        ]

    opt = lm.AdamW(groups(ours), lr=1e-3)
    ref_opt = torch.optim.AdamW(groups(ref), lr=1e-3)
    g = torch.Generator().manual_seed(3)
    for step in range(60):
        # A schedule sets the group lr between steps, as the training loop does.
        scale = 0.5 * (1 + math.cos(math.pi * step / 60))
        for o in (opt, ref_opt):
            o.param_groups[0]["lr"] = 2e-3 * scale
            o.param_groups[1]["lr"] = 1e-3 * scale
        grads = [torch.randn(p.shape, generator=g) for p in ours]
        for ps, o in ((ours, opt), (ref, ref_opt)):
            for p, gr in zip(ps, grads, strict=True):
                p.grad = gr.clone()
            o.step()
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), atol=1e-6, rtol=0)


def test_adamw_decoupled_weight_decay_scaled_by_lr():
    """With zero gradients the Adam update is zero and only decay acts: theta *= (1 - lr * wd) per step."""
    p = nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    start = p.detach().clone()
    lr, wd, steps = 0.1, 0.5, 20
    opt = lm.AdamW([p], lr=lr, weight_decay=wd)
    for _ in range(steps):
        p.grad = torch.zeros_like(p)
        opt.step()
    torch.testing.assert_close(p.detach(), start * (1 - lr * wd) ** steps, atol=1e-12, rtol=1e-10)


def test_adamw_first_step_closed_form():
    """Step 1 of Algorithm 1 with wd=0: m = (1-b1) g, v = (1-b2) g^2, update = lr * g / (|g| + eps')."""
    p = nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    grad = torch.tensor([0.3, -4.0, 2.0], dtype=torch.float64)
    opt = lm.AdamW([p], lr=0.01, betas=(0.9, 0.999), eps=0.0, weight_decay=0.0)
    p.grad = grad.clone()
    opt.step()
    expected = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) - 0.01 * torch.sign(grad)
    torch.testing.assert_close(p.detach(), expected, atol=1e-12, rtol=1e-12)


def test_adamw_state_dict_round_trip():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.GELU(), nn.Linear(7, 2))
    opt = lm.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    g = torch.Generator().manual_seed(4)
    batches = [(torch.randn(8, 5, generator=g), torch.randn(8, 2, generator=g)) for _ in range(10)]

    def step(m, o, batch):
        x, y = batch
        o.zero_grad(set_to_none=True)
        ((m(x) - y) ** 2).mean().backward()
        o.step()

    for b in batches[:5]:
        step(model, opt, b)
    # Checkpoint through serialization, as a real resume does.
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    fresh = nn.Sequential(nn.Linear(5, 7), nn.GELU(), nn.Linear(7, 2))
    fresh.load_state_dict(ckpt["model"])
    fresh_opt = lm.AdamW(fresh.parameters())  # hyperparameters come from the state dict
    fresh_opt.load_state_dict(ckpt["opt"])
    assert fresh_opt.param_groups[0]["lr"] == 1e-2
    assert fresh_opt.param_groups[0]["weight_decay"] == 0.1
    for b in batches[5:]:
        step(model, opt, b)
        step(fresh, fresh_opt, b)
    for a, c in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, c)
    # The restored state equals the original's as well.
    s1, s2 = opt.state_dict()["state"], fresh_opt.state_dict()["state"]
    assert s1.keys() == s2.keys()
    for k in s1:
        for name, v in s1[k].items():
            if torch.is_tensor(v):
                assert torch.equal(v, s2[k][name]), name
            else:
                assert v == s2[k][name], name


def test_adamw_state_dict_round_trip_deepcopy():
    """Same round trip with copy.deepcopy of model and optimizer (as the spec describes)."""
    torch.manual_seed(1)
    model = nn.Linear(4, 3)
    opt = lm.AdamW(model.parameters(), lr=5e-3, weight_decay=0.02)
    g = torch.Generator().manual_seed(5)
    grads = [[torch.randn(p.shape, generator=g) for p in model.parameters()] for _ in range(10)]

    def step(m, o, gs):
        for p, gr in zip(m.parameters(), gs, strict=True):
            p.grad = gr.clone()
        o.step()

    for gs in grads[:5]:
        step(model, opt, gs)
    saved = copy.deepcopy(opt.state_dict())
    fresh = copy.deepcopy(model)
    fresh_opt = lm.AdamW(fresh.parameters(), lr=5e-3, weight_decay=0.02)
    fresh_opt.load_state_dict(saved)
    for gs in grads[5:]:
        step(model, opt, gs)
        step(fresh, fresh_opt, gs)
    for a, c in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, c)


# ---------------------------------------------------------------------------------------------------------
# Learning-rate schedule
# ---------------------------------------------------------------------------------------------------------

# CS336 reference values: max 1, min 0.1, warmup 7, cosine cycle 21, it in range(25).
EXPECTED_LRS = [
    0.0,
    0.14285714285714285,
    0.2857142857142857,
    0.42857142857142855,
    0.5714285714285714,
    0.7142857142857143,
    0.8571428571428571,
    1.0,
    0.9887175604818206,
    0.9554359905560885,
    0.9018241671106134,
    0.8305704108364301,
    0.7452476826029011,
    0.6501344202803414,
    0.55,
    0.44986557971965857,
    0.3547523173970989,
    0.26942958916356996,
    0.19817583288938673,
    0.14456400944391146,
    0.11128243951817933,
    0.1,
    0.1,
    0.1,
    0.1,
]


def test_cosine_schedule_cs336_values():
    got = [
        lm.get_lr_cosine_schedule(
            it, max_learning_rate=1.0, min_learning_rate=0.1, warmup_iters=7, cosine_cycle_iters=21
        )
        for it in range(25)
    ]
    assert got == pytest.approx(EXPECTED_LRS, abs=1e-12, rel=1e-12)


def test_cosine_schedule_positional_and_scaling():
    max_lr, min_lr, warm, cycle = 3e-3, 3e-4, 10, 100
    assert lm.get_lr_cosine_schedule(0, max_lr, min_lr, warm, cycle) == 0.0
    assert lm.get_lr_cosine_schedule(5, max_lr, min_lr, warm, cycle) == pytest.approx(1.5e-3, rel=1e-12)
    assert lm.get_lr_cosine_schedule(warm, max_lr, min_lr, warm, cycle) == pytest.approx(max_lr, rel=1e-12)
    mid = (warm + cycle) // 2
    assert lm.get_lr_cosine_schedule(mid, max_lr, min_lr, warm, cycle) == pytest.approx(
        (max_lr + min_lr) / 2, rel=1e-12
    )
    assert lm.get_lr_cosine_schedule(cycle, max_lr, min_lr, warm, cycle) == pytest.approx(min_lr, rel=1e-12)
    for it in (cycle + 1, cycle + 50, 10**6):
        assert lm.get_lr_cosine_schedule(it, max_lr, min_lr, warm, cycle) == pytest.approx(min_lr, rel=1e-12)
    # Monotone: up during warmup, down during the cosine.
    vals = [lm.get_lr_cosine_schedule(it, max_lr, min_lr, warm, cycle) for it in range(cycle + 5)]
    assert all(a < b for a, b in zip(vals[:warm], vals[1 : warm + 1], strict=True))
    assert all(a >= b for a, b in zip(vals[warm:], vals[warm + 1 :], strict=False))


# ---------------------------------------------------------------------------------------------------------
# Gradient clipping
# ---------------------------------------------------------------------------------------------------------


def _params_with_grads(seed, grad_scale):
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 4), (5,), (2, 2, 2), ()]
    params = [nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * grad_scale
    no_grad = nn.Parameter(torch.randn(4, generator=g))  # grad None: skipped
    return [params[0], no_grad, *params[1:]]


def _clone_params(params):
    out = []
    for p in params:
        q = nn.Parameter(p.detach().clone())
        q.grad = None if p.grad is None else p.grad.clone()
        out.append(q)
    return out


@pytest.mark.parametrize(
    "max_norm,grad_scale",
    [(1.0, 1.0), (0.01, 1.0), (1e-3, 10.0), (100.0, 1.0), (5.0, 0.1)],
    ids=["clips", "clips-hard", "clips-large", "no-clip", "no-clip-small"],
)
def test_clip_gradients_matches_torch(max_norm, grad_scale):
    ours = _params_with_grads(0, grad_scale)
    ref = _clone_params(ours)
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in ref if p.grad is not None]))
    triggered = total.item() > max_norm
    before = [None if p.grad is None else p.grad.clone() for p in ours]
    lm.clip_gradients(ours, max_norm)
    torch.nn.utils.clip_grad_norm_(ref, max_norm)
    for a, b, b0 in zip(ours, ref, before, strict=True):
        if b.grad is None:
            assert a.grad is None
            continue
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-6)
        if not triggered:
            torch.testing.assert_close(a.grad, b0, atol=0, rtol=1e-7)
    if triggered:
        new_total = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(p.grad) for p in ours if p.grad is not None])
        )
        assert new_total.item() == pytest.approx(max_norm, rel=1e-4)
        assert new_total.item() <= max_norm * (1 + 1e-6)  # eps 1e-6 keeps it just under (up to fp32)


def test_clip_gradients_accepts_generator():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2))
    ref = copy.deepcopy(model)
    x = torch.randn(8, 4)
    for m in (model, ref):
        (m(x) ** 2).sum().mul(10).backward()
    lm.clip_gradients(model.parameters(), 0.5)
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-6)


def test_clip_gradients_does_not_touch_params():
    ours = _params_with_grads(1, 5.0)
    before = [p.detach().clone() for p in ours]
    lm.clip_gradients(ours, 0.1)
    for p, b in zip(ours, before, strict=True):
        assert torch.equal(p.detach(), b)
