"""The sweep's status line (sweeps/progress.py): counts, tokens, best so far and an ETA that accounts for early
stopping, from trials as Ray holds them (objects with .status and .last_result)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from sweeps.progress import snapshot
from sweeps.space import parse_space

BUDGET = 10_000


def spec(num_samples: int = 6):
    return parse_space(
        {
            "name": "p",
            "num_samples": num_samples,
            "stop": {"max_tokens": BUDGET},
            "parameters": {
                "optimizer.lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2},
                "train.eval_interval_tokens": {"value": 500},  # a running trial goes on at least this much
            },
            "scheduler": {"type": "fifo"},
        }
    )


def trial(status: str, tokens: int, best: float | None = None, **last):
    result = {"tokens_seen": tokens, **({"best_val_loss": best} if best is not None else {}), **last}
    return SimpleNamespace(status=status, last_result=result)


def test_counts_tokens_and_best():
    s = spec()
    p = snapshot(
        [
            trial("TERMINATED", BUDGET, 2.0, final_eval=True),
            trial("TERMINATED", 2_000, 3.0),  # stopped early
            trial("TERMINATED", 500, None, diverged=True),
            trial("ERROR", 0),
            trial("RUNNING", 4_000, 2.5),
        ],
        s,
        elapsed_s=100.0,
    )
    assert (p.running, p.completed, p.stopped_early, p.diverged, p.errored, p.total) == (1, 1, 1, 1, 1, 6)
    assert p.tokens == BUDGET + 2_000 + 500 + 4_000
    assert p.max_tokens == 6 * BUDGET
    assert p.best == 2.0
    line = p.line("val_loss")
    assert "1 running, 1 completed, 1 stopped early, 1 diverged, 1 errored of 6" in line
    assert f"tokens {p.tokens:,}/{6 * BUDGET:,}" in line and "best val_loss 2.0000" in line


def test_eta_expects_new_trials_to_stop_as_early_as_the_ended_ones():
    s = spec(num_samples=4)
    # Two ended trials trained 2,000 and 4,000 tokens: a trial yet to start is expected to train 3,000.
    trials = [trial("TERMINATED", 2_000, 3.0), trial("TERMINATED", 4_000, 2.0), trial("RUNNING", 1_000)]
    p = snapshot(trials, s, elapsed_s=70.0)
    rate = 7_000 / 70.0
    left = 1 * 3_000 + (3_000 - 1_000)  # one not started, one running
    assert p.eta_s == pytest.approx(left / rate)


def test_no_eta_before_any_tokens():
    p = snapshot([], spec(), elapsed_s=5.0)
    assert p.eta_s is None and "ETA ?" in p.line("val_loss")
