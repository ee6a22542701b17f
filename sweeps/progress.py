"""The sweep's status line: trials running / completed / stopped early / diverged / errored out of the total,
tokens trained out of the sweep's maximum, best so far, elapsed time and an ETA that accounts for early stopping.

In a terminal it is a live line on stderr, redrawn every second; otherwise (CI logs, a file) a plain line every
`PLAIN_EVERY_S` seconds on stdout (30; env LM_SWEEPS_STATUS_EVERY_S). `--quiet` turns it off.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO

from lm.record import Key
from sweeps.trial_status import end_status

if TYPE_CHECKING:
    from sweeps.space import SweepSpec

LIVE_EVERY_S = 1.0
PLAIN_EVERY_S = float(os.environ.get("LM_SWEEPS_STATUS_EVERY_S", 30.0))
"""Seconds between plain status lines (env LM_SWEEPS_STATUS_EVERY_S)."""


@dataclass
class Progress:
    """A snapshot of the sweep, from the trials Ray holds."""

    total: int
    running: int = 0
    completed: int = 0
    stopped_early: int = 0
    diverged: int = 0
    errored: int = 0
    tokens: int = 0
    max_tokens: int = 0
    best: float | None = None
    elapsed_s: float = 0.0
    eta_s: float | None = None

    def line(self, metric: str) -> str:
        best = f"{self.best:.4f}" if self.best is not None else "-"
        eta = _duration(self.eta_s) if self.eta_s is not None else "?"
        return (
            f"trials {self.running} running, {self.completed} completed, {self.stopped_early} stopped early, "
            f"{self.diverged} diverged, {self.errored} errored of {self.total} | tokens {self.tokens:,}/"
            f"{self.max_tokens:,} | best {metric} {best} | {_duration(self.elapsed_s)} elapsed, ETA {eta}"
        )


def snapshot(trials: list[Any], spec: SweepSpec, elapsed_s: float) -> Progress:
    """The sweep's progress from Ray's trials (anything with .status and .last_result).

    ETA: the tokens still to train, at the sweep's rate so far. A trial yet to start is expected to train what the
    ended trials trained on average (early stopping shortens it); a running trial, that much less what it has
    already trained (at least one evaluation interval more).
    """
    budget = spec.total_tokens
    p = Progress(
        total=max(spec.expected_trials, len(trials)), max_tokens=budget * max(spec.expected_trials, len(trials))
    )
    better = min if spec.metric.mode == "min" else max
    ended_tokens, running_tokens = [], []
    for trial in trials:
        last = trial.last_result or {}
        seen = int(last.get(Key.tokens_seen, 0) or 0)
        p.tokens += seen
        value = last.get(Key.best_val_loss if spec.metric.name == Key.val_loss else spec.metric.name)
        if isinstance(value, (int, float)) and math.isfinite(value):
            p.best = value if p.best is None else better(p.best, value)
        status = str(trial.status)
        if status == "RUNNING":
            p.running += 1
            running_tokens.append(seen)
        elif status == "ERROR":
            p.errored += 1
            ended_tokens.append(seen)
        elif status == "TERMINATED":
            ended = end_status(last)  # diverged, completed or stopped_early: the Progress field of that name
            setattr(p, ended, getattr(p, ended) + 1)
            ended_tokens.append(seen)
    p.elapsed_s = elapsed_s
    expected = sum(ended_tokens) / len(ended_tokens) if ended_tokens else budget
    not_started = p.total - p.running - len(ended_tokens)
    interval = _eval_interval_tokens(spec)
    left = not_started * expected + sum(max(expected - seen, min(interval, budget - seen)) for seen in running_tokens)
    if p.tokens > 0 and elapsed_s > 0:
        p.eta_s = max(0.0, left) / (p.tokens / elapsed_s)
    return p


def progress_callback(spec: SweepSpec, stream: TextIO | None = None) -> Any:
    """A Ray Tune callback printing the status line (live in a terminal, every PLAIN_EVERY_S s otherwise)."""
    from ray import tune

    out = stream or (sys.stderr if sys.stderr.isatty() else sys.stdout)
    live = out.isatty()
    every = LIVE_EVERY_S if live else PLAIN_EVERY_S

    class StatusLine(tune.Callback):
        def __init__(self) -> None:
            self.started = time.monotonic()
            self.last = self.started

        def on_step_end(self, iteration, trials, **info):
            now = time.monotonic()
            if now - self.last < every:
                return
            self.last = now
            line = snapshot(trials, spec, now - self.started).line(spec.metric.name)
            if live:
                out.write(f"\r\033[K{line}")
            else:
                out.write(f"{time.strftime('%H:%M:%S')} {line}\n")
            out.flush()

        def on_experiment_end(self, trials, **info):
            if live:
                out.write("\r\033[K")
                out.flush()

    return StatusLine()


def _eval_interval_tokens(spec: SweepSpec) -> int:
    try:
        config = spec.trial_config({})  # the base with the constants (a swept interval: the base's)
    except Exception:  # a derived field that needs sampled values
        config = spec.trial_base()
    return config.train.eval_interval_tokens or 0


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
