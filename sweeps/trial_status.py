"""The driver's own record of each trial's state (trial_status.jsonl in the experiment directory).

Ray keeps trial states only in its experiment state, a file of cloudpickled objects: reading it runs whatever
it holds, and a lost or truncated one would lose the sweep's results. So the driver also appends, as Ray tells
it, a plain JSON line per change of a trial's state: its directory, id, creation number and state. With Ray's
plain per-trial files (params.json, result.json, error.txt, checkpoint_*), that is all results need
(`sweeps.ray_compat.read_trial_files`).

States are Ray's names: RUNNING from the trial's start (also while it is retried after a failure), TERMINATED
once it ended on its own (its last step's evaluation, a divergence, or its scheduler stopping it), ERROR when it
failed for good. A trial the driver was interrupted in stays RUNNING: --resume continues it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lm.record import Key
from sweeps.layout import STATUS_FILE


def read_status(exp_dir: Path) -> dict[str, dict[str, Any]]:
    """{trial directory name: {"trial_id", "number", "status"}}, the last record of each trial; {} when none.

    A line cut short by a crash is left out (the record before it stands).
    """
    try:
        return parse_status((Path(exp_dir) / STATUS_FILE).read_text(errors="replace"))
    except OSError:
        return {}


def parse_status(text: str) -> dict[str, dict[str, Any]]:
    """`read_status` of the file's text (from any storage)."""
    records: dict[str, dict[str, Any]] = {}
    for line in text.splitlines():
        try:
            record = json.loads(line)
            records[str(record.pop("dir"))] = record
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
    return records


def _append(exp_dir: Path, record: dict[str, Any]) -> None:
    # One line per change, appended: no rewrite for a crash to cut short. (Not a .json file: Ray copies the
    # experiment directory's *.json into its staging area when it resumes and uploads them back later, which
    # would put a stale copy over a file rewritten in place.)
    with open(exp_dir / STATUS_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def ended_on_its_own(last_result: dict[str, Any] | None) -> bool:
    """Whether a trial's last result is an ending: its final evaluation, a divergence, or a scheduler's stop."""
    last = last_result or {}
    return bool(last.get(Key.final_eval) or last.get(Key.diverged) or last.get("done"))


def end_status(last_result: dict[str, Any] | None, failed: bool = False) -> str:
    """How an ended trial ended, from its last result: error, diverged, completed (its final evaluation) or
    stopped_early (its scheduler stopped it)."""
    last = last_result or {}
    if failed:
        return "error"
    if last.get(Key.diverged):
        return "diverged"
    return "completed" if last.get(Key.final_eval) else "stopped_early"


def status_callback(exp_dir: Path) -> Any:
    """A Ray Tune callback keeping `exp_dir`/trial_status.jsonl up to date (Ray must be importable)."""
    from ray import tune

    exp_dir = Path(exp_dir)

    def update(trial: Any, status: str) -> None:
        tag = str(trial.experiment_tag or "").split("_", 1)[0]
        record = {"trial_id": trial.trial_id, "number": int(tag) if tag.isdigit() else 0, "status": status}
        _append(exp_dir, {"dir": Path(trial.path).name, **record})

    class TrialStatus(tune.Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            update(trial, "RUNNING")

        def on_trial_complete(self, iteration, trials, trial, **info):
            # Ray also "completes" the trials it stops when the driver is interrupted: those stay RUNNING.
            update(trial, "TERMINATED" if ended_on_its_own(trial.last_result) else "RUNNING")

        def on_trial_error(self, iteration, trials, trial, **info):
            update(trial, "ERROR")

    return TrialStatus()
