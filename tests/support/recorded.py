"""A small recorded experiment directory, made by real `lm.train` runs, for fast tests of results and plots.

Four trials of the tiny config on the small corpus, each trained for real (a fraction of a second) with the
reporter the sweep's trainable uses replaced by one that records what Ray would have received:

    t1  lr 3e-3, runs to the end                         -> completed
    t2  lr 1e-3, its scheduler stops it after 2 reports  -> stopped_early
    t3  lr 1e3, the loss explodes                         -> diverged
    t4  lr 1e-4, fails before its first report           -> error

The directory is laid out as a sweep's: per trial, Ray's plain files (params.json, result.json with one line per
report, error.txt, checkpoint_<n>/state.pt for each reported checkpoint) and the loop's logs in run/; beside them
sweep_meta.json and the driver's trial_status.jsonl. `load_sweep` reads it as it reads a real sweep.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from conftest import tiny_config

from lm.train import train
from sweeps.layout import META_FILE, STATE_FILE, STATUS_FILE, TRIAL_RUN_DIR
from sweeps.ray_compat import TRAINING_ITERATION

ENTROPY_FLOOR = 0.1234  # a made-up floor: results must take it from sweep_meta.json, not from any corpus
TRIALS = {  # trial id: (lr, what happens)
    "t1": (3e-3, "completed"),
    "t2": (1e-3, "stopped_early"),
    "t3": (1e3, "diverged"),
    "t4": (1e-4, "error"),
}
ERROR = "Traceback (most recent call last):\n  ...\nRuntimeError: CUDA out of memory (recorded)"


class _Stopped(Exception):
    """Raised from the reporter, as ASHA stops a trial inside its report call."""


def record_experiment(exp_dir: Path, corpus: Path, metric: str = "val_loss", mode: str = "min") -> Path:
    """Train the four trials into `exp_dir` and write its sweep_meta.json and trial_status.jsonl."""
    status = {}
    for number, (trial_id, (lr, fate)) in enumerate(TRIALS.items(), start=1):
        trial_dir = exp_dir / f"train_trial_{trial_id}_{number}_optimizer_lr={lr:.4g}"
        trial_dir.mkdir(parents=True)
        (trial_dir / "params.json").write_text(json.dumps({"optimizer.lr": lr}))
        reports = _train(trial_dir, corpus, lr, fate) if fate != "error" else []
        (trial_dir / "result.json").write_text("".join(json.dumps(r) + "\n" for r in reports))
        if fate == "error":
            (trial_dir / "error.txt").write_text(ERROR)
        status[trial_dir.name] = {
            "trial_id": trial_id,
            "number": number,
            "status": "ERROR" if fate == "error" else "TERMINATED",
        }
    (exp_dir / STATUS_FILE).write_text("".join(json.dumps({"dir": d, **r}) + "\n" for d, r in status.items()))
    meta = {
        "name": "recorded",
        "metric": metric,
        "mode": mode,
        "swept": ["optimizer.lr"],
        "max_tokens": 8 * 32 * 40,
        "entropy_floor": ENTROPY_FLOOR,
    }
    (exp_dir / META_FILE).write_text(json.dumps(meta))
    return exp_dir


def _train(trial_dir: Path, corpus: Path, lr: float, fate: str) -> list[dict]:
    """Train one trial; returns its reports as Ray's result.json holds them."""
    config = tiny_config(
        corpus,
        trial_dir / TRIAL_RUN_DIR,
        {
            "optimizer.lr": lr,
            "train.num_threads": 1,
            "train.save_best_and_final": False,
            "train.checkpoint_dir": str(trial_dir / "private"),
        },
    )
    reports: list[dict] = []
    checkpoints = 0

    def reporter(metrics, checkpoint):
        nonlocal checkpoints
        row = {**metrics, TRAINING_ITERATION: len(reports) + 1, "trial_id": trial_dir.name.split("_")[2]}
        if checkpoint is not None:
            row["checkpoint_dir_name"] = f"checkpoint_{checkpoints:06d}"
            (trial_dir / row["checkpoint_dir_name"]).mkdir()
            shutil.copyfile(checkpoint, trial_dir / row["checkpoint_dir_name"] / STATE_FILE)
            checkpoints += 1
        reports.append(row)
        if fate == "stopped_early" and len(reports) == 2:
            row["done"] = True  # as Ray marks the result at which a scheduler stops a trial
            raise _Stopped

    try:
        train(config, reporter=reporter)
    except _Stopped:
        pass
    shutil.rmtree(trial_dir / "private", ignore_errors=True)  # the loop's own copies (a diverged run has none)
    return reports


def trial_dir(exp_dir: Path, trial_id: str) -> Path:
    """The directory of trial `trial_id` ("t1" ... "t4")."""
    (found,) = exp_dir.glob(f"train_trial_{trial_id}_*")
    return found


def reports(exp_dir: Path, trial_id: str) -> list[dict]:
    """What trial `trial_id` reported, from its result.json."""
    return [json.loads(line) for line in (trial_dir(exp_dir, trial_id) / "result.json").read_text().splitlines()]
