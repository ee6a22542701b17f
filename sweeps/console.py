"""The sweep's console: one line per evaluation and per trial end, instead of Ray's tables; and the stall watch.

Lines that need attention are printed also under `--quiet`: a trial resumed from another checkpoint than the one
Ray named (its own was damaged), a trial silent for much longer than its own interval between reports, and a
trial failed for its silence (`stall.timeout_s`).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any

from lm.record import Key
from sweeps import ray_compat
from sweeps.lineage import LINEAGE_NOTE
from sweeps.space import SweepSpec

LINE_START = "\r\033[K" if sys.stdout.isatty() else ""
CHECKPOINT_NOTE = "checkpoint_note"
"""Result key: on the first report after a restore whose checkpoint was damaged, what was damaged and what the
trial resumed from instead (sweeps/trainable.py sets it)."""


def stamp() -> str:
    """The time that starts every console line; in a terminal, first clears the live status line (sweeps/progress.py)
    that the line is printed over."""
    return f"{LINE_START}{time.strftime('%H:%M:%S')}"


def make_callback(spec: SweepSpec, quiet: bool):
    from ray import tune

    swept = spec.swept_params

    def describe(config: dict[str, Any]) -> str:
        parts = []
        for key in swept:
            value = config.get(key)
            short = key.split(".")[-1]
            parts.append(f"{short}={value:.3g}" if isinstance(value, float) else f"{short}={value}")
        return " ".join(parts)

    class ConsoleLines(tune.Callback):
        """One line per evaluation and per trial end, instead of Ray's tables."""

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if result.get(CHECKPOINT_NOTE):
                print(f"{stamp()} {trial.trial_id} damaged checkpoint: {result[CHECKPOINT_NOTE]}", flush=True)
            if result.get(LINEAGE_NOTE):  # PBT/PB2: this trial continues from another's checkpoint
                print(f"{stamp()} {trial.trial_id} {result[LINEAGE_NOTE]}", flush=True)
            if quiet:
                return
            mark = " DIVERGED" if result.get(Key.diverged) else ""
            val = result.get(Key.val_loss)
            val_text = f"{val:.4f}" if isinstance(val, float) else str(val)
            print(
                f"{stamp()} {trial.trial_id} | tokens {result.get(Key.tokens_seen, 0):>11,} | "
                f"val_loss {val_text}{mark} | {describe(trial.config)}",
                flush=True,
            )

        def on_trial_complete(self, iteration, trials, trial, **info):
            last = trial.last_result or {}
            print(
                f"{stamp()} {trial.trial_id} finished at {last.get(Key.tokens_seen, 0):,} tokens "
                f"(best val_loss {last.get(Key.best_val_loss)})",
                flush=True,
            )

        def on_trial_error(self, iteration, trials, trial, **info):
            print(f"{stamp()} {trial.trial_id} ERROR (see results for the message)", flush=True)

    return ConsoleLines()


# ---------------------------------------------------------------------------------------------------
# Stalls: a running trial that reports nothing for much longer than its own interval between reports
# ---------------------------------------------------------------------------------------------------

STALL_FACTOR = 5.0
"""A trial is stalled when silent for this many times its longest interval between reports (stall.warn_after_s
at least)."""
DRIVER_PAUSE_S = 5.0
"""A gap this long between two steps of the driver's loop means the driver itself was not running (suspended,
blocked): that time is not counted as any trial's silence."""


@dataclass
class _Run:
    """One run of a trial: from its (re)start to its end, failure or restart."""

    started: float
    last: float  # its start or its latest report
    reports: int = 0
    warned: bool = False
    failed: bool = False


@dataclass
class Stall:
    """What `StallClock.check` found: a trial to warn about, or (`fail`) to fail and retry."""

    trial_id: str
    silent_s: float
    interval_s: float | None  # the trial's measured interval (or time to its first report), if known
    fail: bool


class StallClock:
    """Per trial, the time since its latest report, measured against its own intervals (no Ray in here).

    A trial's interval is its longest gap between two consecutive reports of the same run (a gap that was warned
    about is a stall, not an interval, and is left out). A run that has not
    reported yet is measured against the longest time to a first report (its own earlier runs', else any trial's):
    that includes loading data and compiling. A run with one report and no interval yet uses its own time to that
    report. `check` returns a warning once per stall when the silence exceeds max(warn_after_s, STALL_FACTOR x
    that reference), and a failure once per stall when it exceeds timeout_s (whatever the reference).
    """

    def __init__(self, warn_after_s: float | None, timeout_s: float | None):
        self.warn_after_s, self.timeout_s = warn_after_s, timeout_s
        self.runs: dict[str, _Run] = {}
        self.interval: dict[str, float] = {}  # trial -> longest gap between reports
        self.startup: dict[str, float] = {}  # trial -> longest time from a (re)start to the first report
        self.last_check: float | None = None

    def started(self, trial_id: str, now: float) -> None:
        self.runs[trial_id] = _Run(started=now, last=now)

    def ended(self, trial_id: str) -> None:
        self.runs.pop(trial_id, None)

    def reported(self, trial_id: str, now: float) -> float | None:
        """Record a report; returns the silence it ends when that silence had been warned about, else None."""
        run = self.runs.get(trial_id)
        if run is None:  # a report from a run we did not see start (cannot happen in Ray 2.60): start here
            self.started(trial_id, now)
            return None
        gap, warned = now - run.last, run.warned
        if not warned:  # a stall is not the trial's interval: the next one is measured against the usual
            table = self.startup if run.reports == 0 else self.interval
            table[trial_id] = max(table.get(trial_id, 0.0), gap)
        run.last, run.reports, run.warned, run.failed = now, run.reports + 1, False, False
        return gap if warned else None

    def reference(self, trial_id: str) -> float | None:
        """The interval the trial's current silence is measured against (see the class docstring)."""
        run = self.runs[trial_id]
        if run.reports == 0:
            startup = self.startup.get(trial_id) or max(self.startup.values(), default=None)
            known = [t for t in (startup, self.interval.get(trial_id)) if t]
            return max(known) if known else None
        return self.interval.get(trial_id) or (self.startup.get(trial_id) if run.reports == 1 else None)

    def check(self, running: list[str], now: float) -> list[Stall]:
        """The running trials to warn about or fail now (each once per stall)."""
        if self.last_check is not None and now - self.last_check > DRIVER_PAUSE_S:
            for run in self.runs.values():  # the driver was not looking: that time is nobody's silence
                run.last += now - self.last_check
        self.last_check = now
        found = []
        for trial_id in running:
            run = self.runs.get(trial_id)
            if run is None or run.failed:
                continue
            silent, reference = now - run.last, self.reference(trial_id)
            if self.timeout_s is not None and silent > self.timeout_s:
                run.failed = run.warned = True
                found.append(Stall(trial_id, silent, reference, fail=True))
            elif (
                not run.warned
                and self.warn_after_s is not None
                and reference is not None
                and silent > max(self.warn_after_s, STALL_FACTOR * reference)
            ):
                run.warned = True
                found.append(Stall(trial_id, silent, reference, fail=False))
        return found


def make_stall_watch(spec: SweepSpec):
    """A Tune callback that watches every running trial (StallClock), prints a warning line per stall, and with
    `stall.timeout_s` fails a silent trial by killing its actor: Ray handles that as a worker that died, and
    retries the trial from its last checkpoint (max_failures), as after a SIGKILL."""
    import ray
    from ray import tune

    class StallWatch(tune.Callback):
        def __init__(self) -> None:
            self.clock = StallClock(spec.stall.warn_after_s, spec.stall.timeout_s)

        def on_trial_start(self, iteration, trials, trial, **info):
            self.clock.started(trial.trial_id, time.monotonic())

        def on_trial_result(self, iteration, trials, trial, result, **info):
            silent = self.clock.reported(trial.trial_id, time.monotonic())
            if silent is not None:
                print(f"{stamp()} {trial.trial_id} reports again after {silent:.0f} s of silence", flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.clock.ended(trial.trial_id)

        def on_trial_error(self, iteration, trials, trial, **info):
            self.clock.ended(trial.trial_id)

        def on_trial_recover(self, iteration, trials, trial, **info):
            self.clock.ended(trial.trial_id)  # restarted later: on_trial_start begins its next run

        def on_step_begin(self, iteration, trials, **info):
            by_id = {t.trial_id: t for t in trials if t.status == "RUNNING"}
            for stall in self.clock.check(list(by_id), time.monotonic()):
                interval = f"{stall.interval_s:.1f} s" if stall.interval_s else "not measured yet"
                head = f"{stamp()} {stall.trial_id} has reported nothing for {stall.silent_s:.0f} s"
                if not stall.fail:
                    then = (
                        f"stall.timeout_s ({spec.stall.timeout_s:g} s) fails and retries it"
                        if spec.stall.timeout_s is not None
                        else "set stall.timeout_s to fail and retry stalled trials"
                    )
                    print(f"{head} (its longest interval between reports: {interval}): stalled? {then}", flush=True)
                    continue
                actor = ray_compat.trial_actor(by_id[stall.trial_id])
                if actor is None:
                    print(f"{head}: stall.timeout_s passed, but its worker cannot be reached to fail it", flush=True)
                    continue
                print(
                    f"{head}, over stall.timeout_s ({spec.stall.timeout_s:g} s): failing it; Ray retries it from "
                    f"its last checkpoint (max_failures {spec.max_failures})",
                    flush=True,
                )
                ray.kill(actor)

    return StallWatch()
