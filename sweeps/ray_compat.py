"""Every use of Ray's internals, in one place, checked against the installed Ray by tests/test_ray_compat.py.

Ray Tune's public API gives a finished experiment's results, but not (a) the Trial objects beside them (status,
creation order, the config of a trial that failed before reporting) nor (b) which checkpoint Ray's saved
experiment state will restore a running trial from. Both are read here from Ray's objects and files;
`RayLayoutError` says so, loudly, when an installed Ray no longer has the shapes relied on. Tested with the Ray
range pinned in pyproject.toml.

Also here: the environment Ray should see (set before Ray is imported) and the keys Ray adds to each result.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from sweeps.layout import STATE_FILE

RAY_ENV_DEFAULTS = {
    "RAY_USAGE_STATS_ENABLED": "0",  # no usage reporting from a sweep tool
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",  # a checkpoint per eval is the design
    "RAY_DEDUP_LOGS": "0",
    "RAY_AIR_NEW_OUTPUT": "0",  # the legacy reporter honours verbose=0: no tables
}
TRAINING_ITERATION = "training_iteration"  # Ray's count of reports
TIME_TOTAL_S = "time_total_s"  # Ray's seconds since the trial started
NODE_ID = "node_id"  # ours: the trainable adds the Ray node a report came from


class RayLayoutError(RuntimeError):
    """The installed Ray does not have an internal shape this module relies on (name it, and the Ray version)."""


def set_env_defaults() -> None:
    """Put RAY_ENV_DEFAULTS into os.environ where unset; call before Ray is imported."""
    for key, value in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


@dataclass
class TrialRecord:
    """One trial of a Ray Tune experiment, in plain Python and pandas."""

    trial_id: str
    number: int  # Tune's 1-based creation order (Optuna's trial ids are random hex: no order in them)
    ray_status: str  # TERMINATED, ERROR, RUNNING, PAUSED or PENDING
    config: dict[str, Any]  # the searcher's sampled values (dotted config paths)
    last: dict[str, Any]  # the last reported result
    history: pd.DataFrame | None  # every reported result, one row each (None: never reported)
    error: str | None  # the exception Ray recorded, as text
    best_checkpoint: str | None  # the state.pt of the trial's best kept checkpoint by the sweep's metric
    path: str  # the trial's directory in storage


def _ray_version() -> str:
    import ray

    return ray.__version__


def result_grid(path: str, metric: str, mode: str) -> Any:
    """Ray's `ResultGrid` of the experiment at `path` (a local directory or a URI)."""
    from ray import tune

    analysis = tune.ExperimentAnalysis(path, default_metric=metric, default_mode=mode)
    return tune.ResultGrid(analysis)


def read_trials(path: str, metric: str, mode: str) -> list[TrialRecord]:
    """The trials of the experiment at `path`, each with its results; `metric`/`mode` pick best checkpoints."""
    grid = result_grid(path, metric, mode)
    try:
        trials = grid._experiment_analysis.trials  # same order as the grid's results
    except AttributeError as e:
        raise RayLayoutError(f"ray {_ray_version()}: ResultGrid has no _experiment_analysis.trials ({e})") from None
    if len(trials) != len(grid):
        raise RayLayoutError(f"ray {_ray_version()}: {len(trials)} trials but {len(grid)} results")
    return [_record(trial, result, metric, mode) for trial, result in zip(trials, grid, strict=True)]


def _record(trial: Any, result: Any, metric: str, mode: str) -> TrialRecord:
    best = None
    if result.best_checkpoints:
        checkpoint = result.get_best_checkpoint(metric, mode)
        if checkpoint is not None:
            best = str(Path(checkpoint.path) / STATE_FILE)
    head = str(getattr(trial, "experiment_tag", "") or "").split("_", 1)[0]  # "3_optimizer.lr=..." -> 3
    history = result.metrics_dataframe
    return TrialRecord(
        trial_id=trial.trial_id,
        number=int(head) if head.isdigit() else 0,
        ray_status=str(trial.status),
        config=dict(trial.config or result.config or {}),  # a trial that failed before reporting has no result
        last=dict(result.metrics or {}),
        history=history if history is not None and not history.empty else None,
        error=str(result.error) if result.error is not None else None,
        best_checkpoint=best,
        path=str(result.path),
    )


def recorded_latest_checkpoints(exp_dir: Path) -> dict[str, Path]:
    """For each trial in Ray's newest saved experiment state: the checkpoint directory a resume restores it from.

    Read from the cloudpickled checkpoint manager inside `experiment_state-*.json` (local storage only; {} when
    there is no saved state). Raises RayLayoutError when the file does not have the shape of this Ray version.
    """
    states = sorted(Path(exp_dir).glob("experiment_state-*.json"))
    if not states:
        return {}
    from ray import cloudpickle

    latest: dict[str, Path] = {}
    try:
        trial_data = json.loads(states[-1].read_text())["trial_data"]
        for _, runtime in trial_data:
            meta = json.loads(runtime) if isinstance(runtime, str) else runtime
            manager = cloudpickle.loads(bytes.fromhex(meta["checkpoint_manager"]["value"]))
            result = manager._latest_checkpoint_result
            if result is not None and result.checkpoint is not None:
                path = Path(result.checkpoint.path)
                latest[path.parent.name] = path
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise RayLayoutError(
            f"ray {_ray_version()}: {states[-1].name} does not hold trial checkpoint managers as expected "
            f"({type(e).__name__}: {e})"
        ) from None
    return latest
