"""Every use of Ray's internals, in one place, checked against the installed Ray by tests/test_ray_compat.py.

- Ray's plain per-trial files (params.json, result.json, error.txt, checkpoint_*): `read_trial_files` reads a
  finished or interrupted sweep from them and from the driver's own trial_status.jsonl, unpickling nothing.
- Ray's experiment state (partly cloudpickled objects: loading those runs code, so only Ray's own --resume and,
  for now, URI storage load it, through Ray): `read_trials` through Ray's ExperimentAnalysis (URIs), and
  `recorded_latest_checkpoints`, which reads only its plain JSON fields for the checkpoint repair before a resume.
- The environment Ray should see, `loopback_only` for a local Ray, and the keys Ray adds to each result.

`RayLayoutError` says so, loudly, when an installed Ray no longer has the shapes relied on. Tested with the Ray
range pinned in pyproject.toml.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from lm.record import Key
from sweeps.layout import STATE_FILE

RAY_ENV_DEFAULTS = {
    "RAY_USAGE_STATS_ENABLED": "0",  # no usage reporting from a sweep tool
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",  # a checkpoint per eval is the design
    "RAY_DEDUP_LOGS": "0",
    "RAY_AIR_NEW_OUTPUT": "0",  # the legacy reporter honours verbose=0: no tables
}
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
"""On Linux Ray gives even a one-machine instance the machine's network address, and its servers (GCS, raylet,
object manager, workers) listen on every interface. This flag, meant for Windows and macOS, makes Ray take the
loopback address as the node's, and Ray 2.60 binds each server to the node's address: 127.0.0.1 only. Read when
Ray's constants are first imported and by every process Ray starts."""
TRAINING_ITERATION = "training_iteration"  # Ray's count of reports
TIME_TOTAL_S = "time_total_s"  # Ray's seconds since the trial started
NODE_ID = "node_id"  # ours: the trainable adds the Ray node a report came from


class RayLayoutError(RuntimeError):
    """The installed Ray does not have an internal shape this module relies on (name it, and the Ray version)."""


def set_env_defaults() -> None:
    """Put RAY_ENV_DEFAULTS into os.environ where unset; call before Ray is imported."""
    for key, value in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


@contextlib.contextmanager
def loopback_only() -> Iterator[None]:
    """Within the block, a Ray started locally (`ray.init(address="local")`) listens on 127.0.0.1 only.

    The environment is restored afterwards, so that later processes (a driver joining a real cluster, say) are
    not affected; the processes started inside the block keep it.
    """
    saved = {key: os.environ.get(key) for key in LOOPBACK_ENV}
    os.environ.update(LOOPBACK_ENV)
    # Ray imported already (a notebook, a test): its constant was read then; set it for this start too.
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None and not hasattr(constants, "ENABLE_RAY_CLUSTER"):
        raise RayLayoutError(f"ray {_ray_version()}: ray._private.ray_constants has no ENABLE_RAY_CLUSTER")
    flag = getattr(constants, "ENABLE_RAY_CLUSTER", None)
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if constants is not None:
            constants.ENABLE_RAY_CLUSTER = flag
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def trial_actor(trial: Any) -> Any:
    """The Ray actor running `trial` (a Tune Trial), or None between runs: where Ray 2.60 keeps it
    (`Trial.set_ray_actor`), checked by tests/test_stalls.py."""
    return getattr(getattr(trial, "temporary_state", None), "ray_actor", None)


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


def read_trial_files(exp_dir: Path, metric: str, mode: str, status: dict[str, dict[str, Any]]) -> list[TrialRecord]:
    """The trials of a local experiment directory, from Ray's plain per-trial files alone (nothing unpickled).

    Each trial directory holds params.json (the sampled config), result.json (one JSON line per report, with
    `checkpoint_dir_name` when it carried a checkpoint) and, after a failure, error.txt. `status` is the
    driver's record (sweeps.trial_status) by directory name; a trial without one gets its state from its files.
    The best checkpoint is the kept checkpoint_* directory whose report scored best on `metric`.
    """
    from sweeps.trial_status import ended_on_its_own

    records = []
    for trial_dir in sorted(p for p in Path(exp_dir).iterdir() if (p / "params.json").is_file()):
        rows = _json_lines(trial_dir / "result.json")
        last = rows[-1] if rows else {}
        known = status.get(trial_dir.name, {})
        error_file = trial_dir / "error.txt"
        state = known.get("status") or (
            "TERMINATED" if ended_on_its_own(last) else "ERROR" if error_file.is_file() else "RUNNING"
        )
        head = _TRIAL_DIR.match(trial_dir.name)
        records.append(
            TrialRecord(
                trial_id=str(known.get("trial_id") or last.get("trial_id") or (head and head["id"]) or trial_dir.name),
                number=int(known.get("number") or (head and head["number"]) or 0),
                ray_status=state,
                config=json.loads((trial_dir / "params.json").read_text()),
                last=last,
                history=pd.DataFrame(rows) if rows else None,
                # A trial retried after a failure that then finished is not an error.
                error=error_file.read_text(errors="replace") if state == "ERROR" and error_file.is_file() else None,
                best_checkpoint=_best_kept_checkpoint(trial_dir, rows, metric, mode),
                path=str(trial_dir),
            )
        )
    return records


# Ray names a trial's directory <trainable>_<trial id>_<creation number>_<parameters>_<date>.
_TRIAL_DIR = re.compile(r"^.*?_(?P<id>[0-9a-f]{8}|[0-9a-f]{5}_\d{5})_(?P<number>\d+)_")


def _json_lines(path: Path) -> list[dict[str, Any]]:
    """The complete JSON lines of `path` ([] if missing); a line cut short by a crash is left out."""
    rows = []
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return rows
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _best_kept_checkpoint(trial_dir: Path, rows: list[dict[str, Any]], metric: str, mode: str) -> str | None:
    scored = [
        (row[metric], name)
        for row in rows
        if isinstance(row.get(metric), (int, float))
        and not row.get(Key.diverged)
        and (name := row.get("checkpoint_dir_name"))
        and (trial_dir / name / STATE_FILE).is_file()
    ]
    if not scored:
        return None
    _, name = min(scored) if mode == "min" else max(scored)
    return str(trial_dir / name / STATE_FILE)


def recorded_latest_checkpoints(exp_dir: Path) -> dict[str, Path]:
    """For each trial in Ray's newest saved experiment state: the checkpoint directory a resume restores it from.

    Read from the plain JSON fields of `experiment_state-*.json` (each trial's `relative_logdir` and the
    `checkpoint_dir_name` of its `last_result`, else of its last checkpointed report in result.json up to then);
    the cloudpickled fields are never loaded. Local storage only; {} when there is no saved state. Raises
    RayLayoutError when the file does not have the shape of this Ray version.
    """
    states = sorted(Path(exp_dir).glob("experiment_state-*.json"))
    if not states:
        return {}
    latest: dict[str, Path] = {}
    try:
        for trial_json, runtime in json.loads(states[-1].read_text())["trial_data"]:
            trial = json.loads(trial_json)
            meta = json.loads(runtime) if isinstance(runtime, str) else runtime
            trial_dir = Path(exp_dir) / trial["relative_logdir"]
            last = meta["last_result"] or {}
            name = last.get("checkpoint_dir_name") or _last_checkpoint_name(trial_dir, last.get(TRAINING_ITERATION))
            if name:
                latest[trial_dir.name] = trial_dir / name
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise RayLayoutError(
            f"ray {_ray_version()}: {states[-1].name} does not hold trials with relative_logdir and last_result "
            f"as expected ({type(e).__name__}: {e})"
        ) from None
    return latest


def _last_checkpoint_name(trial_dir: Path, up_to_iteration: int | None) -> str | None:
    """The checkpoint_dir_name of the trial's last checkpointed report at or before `up_to_iteration`."""
    if up_to_iteration is None:
        return None
    names = [
        row["checkpoint_dir_name"]
        for row in _json_lines(trial_dir / "result.json")
        if row.get("checkpoint_dir_name") and row.get(TRAINING_ITERATION, 0) <= up_to_iteration
    ]
    return names[-1] if names else None
