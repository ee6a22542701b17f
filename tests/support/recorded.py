"""A small recorded experiment directory, made by real `lm.train` runs, for fast tests of results and plots.

Four trials of the tiny config on the small corpus, each trained for real (a fraction of a second) with the
reporter the sweep's trainable uses replaced by one that records what Ray would have received:

    t1  lr 3e-3, runs to the end                         -> completed
    t2  lr 1e-3, its scheduler stops it after 2 reports  -> stopped_early
    t3  lr 1e3, the loss explodes                         -> diverged
    t4  lr 1e-4, fails before its first report           -> error

Each reported checkpoint is copied to `<trial>/checkpoint_<n>/state.pt`, as Ray keeps them, and each trial's
logs go to `<trial>/run/`. `records()` turns the directory into the `TrialRecord`s that `sweeps.ray_compat`
reads from a real Ray experiment, so `build_sweep` sees what it sees after a sweep.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
from conftest import tiny_config

from lm.record import Key
from lm.train import train
from sweeps.layout import META_FILE, STATE_FILE, TRIAL_RUN_DIR
from sweeps.ray_compat import TRAINING_ITERATION, TrialRecord

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
    """Train the four trials into `exp_dir` and write its sweep_meta.json; returns `exp_dir`."""
    for trial_id, (lr, fate) in TRIALS.items():
        trial_dir = exp_dir / trial_id
        reports: list[dict] = []
        if fate != "error":
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

            def reporter(metrics, checkpoint, trial_dir=trial_dir, reports=reports, fate=fate):
                reports.append({**metrics, TRAINING_ITERATION: len(reports) + 1})
                if checkpoint is not None:
                    kept = trial_dir / f"checkpoint_{len(reports) - 1:06d}"
                    kept.mkdir()
                    shutil.copyfile(checkpoint, kept / STATE_FILE)
                if fate == "stopped_early" and len(reports) == 2:
                    raise _Stopped

            try:
                train(config, reporter=reporter)
            except _Stopped:
                pass
        trial_dir.mkdir(parents=True, exist_ok=True)
        (trial_dir / "reports.json").write_text(json.dumps(reports))
    swept = ["optimizer.lr"]
    meta = {
        "name": "recorded",
        "metric": metric,
        "mode": mode,
        "swept": swept,
        "max_tokens": 8 * 32 * 40,
        "entropy_floor": ENTROPY_FLOOR,
    }
    (exp_dir / META_FILE).write_text(json.dumps(meta))
    return exp_dir


def records(exp_dir: Path, metric: str = "val_loss", mode: str = "min") -> list[TrialRecord]:
    """The TrialRecords of a recorded directory; the best checkpoint chosen by `metric`/`mode` as Ray does."""
    out = []
    for number, (trial_id, (lr, fate)) in enumerate(TRIALS.items(), start=1):
        trial_dir = exp_dir / trial_id
        reports = json.loads((trial_dir / "reports.json").read_text())
        scored = [(r[metric], i) for i, r in enumerate(reports) if metric in r and not r.get(Key.diverged)]
        best = None
        if scored:
            _, index = min(scored) if mode == "min" else max(scored)
            best = str(trial_dir / f"checkpoint_{index:06d}" / STATE_FILE)
        out.append(
            TrialRecord(
                trial_id=trial_id,
                number=number,
                ray_status="ERROR" if fate == "error" else "TERMINATED",
                config={"optimizer.lr": lr},
                last=reports[-1] if reports else {},
                history=pd.DataFrame(reports) if reports else None,
                error=ERROR if fate == "error" else None,
                best_checkpoint=best,
                path=str(trial_dir),
            )
        )
    return out
