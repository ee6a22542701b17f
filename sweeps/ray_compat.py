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
from typing import TYPE_CHECKING, Any

import pandas as pd

from lm.record import Key
from sweeps.layout import STATE_FILE

if TYPE_CHECKING:
    from sweeps.storage import Storage

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


def interrupt_tune_run() -> None:
    """End the running `Tuner.fit()` as Ctrl-C does, from the driver's main thread (a Tune callback): Ray saves the
    experiment state one last time and running trials stay resumable. Ray 2.60's tune.run installs its stop
    handler for SIGUSR1 as well as SIGINT; SIGUSR1 leaves the user's Ctrl-C to mean what it always does."""
    import logging
    import signal

    # What tune.run logs from here on (a stop "via SIGINT/Ctrl+C", a Tuner.restore hint, the unfinished trials)
    # is not what happened: the caller says why the run ended and how to resume it, in its own line.
    logging.getLogger(TUNE_RUN_LOGGER).setLevel(logging.CRITICAL)
    os.kill(os.getpid(), signal.SIGUSR1)


@contextlib.contextmanager
def sigterm_ends_tune_run() -> Iterator[None]:
    """Within the block (around `Tuner.fit()`), a SIGTERM ends the run as Ctrl-C does (`interrupt_tune_run`): Ray
    saves the experiment state one last time, running trials stay resumable, and the driver writes its results
    and exits 130 with the resume command. A second SIGTERM does what the previous handler does.

    `ray job stop` sends the job's driver SIGTERM (SIGINT is blocked in it), then SIGKILL after
    RAY_JOB_STOP_WAIT_TIME_S (3 s by default). Without this, the handler `ray.init` installs exits at once from
    wherever the driver is: no last snapshot, only the periodic one. A SIGTERM before Tune's own handler is in
    place (it is installed when the run starts) also gets the previous handler. Main thread only (else nothing).
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        if signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, signal.SIG_IGN, None):  # Tune not running yet
            if callable(previous):
                previous(signum, frame)
            elif previous != signal.SIG_IGN:
                raise SystemExit(128 + signum)
            return
        print("SIGTERM: stopping the sweep; Ray saves its state (resumable with --resume)", flush=True)
        interrupt_tune_run()

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


TUNE_RUN_LOGGER = "ray.tune.tune"
NO_SPACE_LOGGERS = ("ray.tune.execution.experiment_state", "ray.tune.execution.tune_controller", TUNE_RUN_LOGGER)
"""Ray's loggers that print a traceback when a write into storage fails: saving the experiment state (the
periodic and the last one) and a trial's failure."""


def replace_storage_copy(copy: Any) -> None:
    """Route every copy Ray makes into or out of storage (experiment state, result files, checkpoints) through
    `copy(original, source, destination, **kwargs)`, where `original` is Ray 2.60's
    `ray.train._internal.storage._pyarrow_fs_copy_files` (called by module name from the same module). Idempotent.
    """
    from ray.train._internal import storage

    original = getattr(storage, "_pyarrow_fs_copy_files", None)
    if original is None:
        raise RayLayoutError(f"ray {_ray_version()}: ray.train._internal.storage has no _pyarrow_fs_copy_files")
    if getattr(original, "_lm_sweeps_copy", False):
        return

    def copy_files(source: Any, destination: Any, source_filesystem: Any = None, destination_filesystem: Any = None,
                   **kwargs: Any) -> Any:  # fmt: skip
        return copy(original, source, destination, source_filesystem=source_filesystem,
                    destination_filesystem=destination_filesystem, **kwargs)  # fmt: skip

    copy_files._lm_sweeps_copy = True  # type: ignore[attr-defined]
    storage._pyarrow_fs_copy_files = copy_files


def new_trials_follow_a_moved_sweep() -> None:
    """After `Tuner.restore` of a sweep moved to another storage path, the trials its searcher creates from then on
    go to the new path too. Ray 2.60 moves the restored trials (TuneController._restore_trials) but restores the
    search algorithm's pickled experiment spec, storage context included, as it was: new trials were created under
    the old path (on a full disk: failing; on another machine: somewhere else). This applies Ray's own propagation
    (storage filesystem, path, experiment name) to that context after `TuneController.resume`. Idempotent.
    """
    from ray.tune.execution.tune_controller import TuneController

    original = getattr(TuneController, "resume", None)
    if original is None:
        raise RayLayoutError(f"ray {_ray_version()}: TuneController has no resume()")
    if getattr(original, "_lm_sweeps_resume", False):
        return

    def resume(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        search = getattr(self, "_search_alg", None)
        specs = [getattr(getattr(search, "_experiment", None), "spec", None) or {}]  # SearchGenerator (optuna)
        specs += [getattr(it, "unresolved_spec", None) or {} for it in getattr(search, "_iterators", [])]  # random
        for storage in {id(s.get("storage")): s.get("storage") for s in specs if s.get("storage")}.values():
            storage.storage_filesystem = self._storage.storage_filesystem
            storage.storage_fs_path = self._storage.storage_fs_path
            storage.experiment_dir_name = self._storage.experiment_dir_name
        return result

    resume._lm_sweeps_resume = True  # type: ignore[attr-defined]
    TuneController.resume = resume


def add_tuner_callbacks(tuner: Any, callbacks: list[Any], replace: bool = False) -> None:
    """Give a built or restored `tune.Tuner` more callbacks for its `fit()` (`replace`: these instead of its own),
    kept out of its tuner.pkl (written when the Tuner is built; a restored Tuner's callbacks are the pickled ones,
    with the paths and settings of the run that pickled them): Ray 2.60 reads
    `tuner._local_tuner.get_run_config().callbacks` when fit() starts."""
    try:
        run_config = tuner._local_tuner.get_run_config()
    except AttributeError as e:
        raise RayLayoutError(f"ray {_ray_version()}: a Tuner has no _local_tuner.get_run_config() ({e})") from None
    run_config.callbacks = [*([] if replace else run_config.callbacks or []), *callbacks]


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


def read_trial_files(
    exp: Storage | Path, metric: str, mode: str, status: dict[str, dict[str, Any]]
) -> list[TrialRecord]:
    """The trials of an experiment directory (local, or behind a URI), from Ray's plain per-trial files alone
    (nothing unpickled).

    Each trial directory holds params.json (the sampled config), result.json (one JSON line per report, with
    `checkpoint_dir_name` when it carried a checkpoint) and, after a failure, error.txt. `status` is the
    driver's record (sweeps.trial_status) by directory name; a trial without one gets its state from its files.
    The best checkpoint is the kept checkpoint_* directory whose report scored best on `metric`; it and `path`
    are given as the user knows them (a local path, or a URI without credentials).
    """
    from sweeps.storage import Storage
    from sweeps.trial_status import ended_on_its_own

    exp = exp if isinstance(exp, Storage) else Storage.at(exp)
    records = []
    for name in exp.subdirs():
        params = exp.read_text(name, "params.json")
        if params is None:
            continue
        rows = _json_rows(exp.read_text(name, "result.json") or "")
        last = rows[-1] if rows else {}
        known = status.get(name, {})
        error_text = exp.read_text(name, "error.txt")
        state = known.get("status") or (
            "TERMINATED" if ended_on_its_own(last) else "ERROR" if error_text is not None else "RUNNING"
        )
        head = _TRIAL_DIR.match(name)
        records.append(
            TrialRecord(
                trial_id=str(known.get("trial_id") or last.get("trial_id") or (head and head["id"]) or name),
                number=int(known.get("number") or (head and head["number"]) or 0),
                ray_status=state,
                config=json.loads(params),
                last=last,
                history=pd.DataFrame(rows) if rows else None,
                # A trial retried after a failure that then finished is not an error.
                error=error_text if state == "ERROR" else None,
                best_checkpoint=_best_kept_checkpoint(exp.child(name), rows, metric, mode),
                path=exp.show(name),
            )
        )
    return records


# Ray names a trial's directory <trainable>_<trial id>_<creation number>_<parameters>_<date>.
_TRIAL_DIR = re.compile(r"^.*?_(?P<id>[0-9a-f]{8}|[0-9a-f]{5}_\d{5})_(?P<number>\d+)_")


def _json_rows(text: str) -> list[dict[str, Any]]:
    """The complete JSON object lines of `text`; a line cut short by a crash is left out."""
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _json_lines(path: Path) -> list[dict[str, Any]]:
    """The complete JSON lines of `path` ([] if missing); a line cut short by a crash is left out."""
    try:
        return _json_rows(path.read_text(errors="replace"))
    except OSError:
        return []


def _best_kept_checkpoint(trial: Storage, rows: list[dict[str, Any]], metric: str, mode: str) -> str | None:
    kept = set(trial.subdirs())
    scored = [
        (row[metric], name)
        for row in rows
        if isinstance(row.get(metric), (int, float))
        and not row.get(Key.diverged)
        and (name := row.get("checkpoint_dir_name")) in kept
    ]
    for _, name in sorted(scored, reverse=mode != "min"):
        if trial.is_file(name, STATE_FILE):
            return trial.show(name, STATE_FILE)
    return None


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


def best_checkpoint_path(trial: Any) -> str | None:
    """The storage path of a live Ray trial's best kept checkpoint (by the sweep's metric), or None when it has
    none; read from the trial's checkpoint manager (driver side, during or right after the sweep)."""
    try:
        best = trial.run_metadata.checkpoint_manager.best_checkpoint_result
    except AttributeError:
        return None
    return None if best is None or best.checkpoint is None else str(best.checkpoint.path)


def hyperband_scheduler(time_attr: str, max_t: int, min_t: int, reduction_factor: float) -> Any:
    """Ray's HyperBandScheduler with brackets from `min_t` (its smallest rung) to `max_t`.

    Ray sizes HyperBand for a clock of a few dozen units (max_t=81 reports): log_eta(max_t) + 1 brackets whose
    smallest rung is max_t / eta^s. On a token clock (max_t ~ 10^6..10^9) that is a rung of one token and a first
    bracket of eta^s trials. Here the bracket count is floor(log_eta(max_t / min_t)) + 1, so the smallest rung is
    at least `min_t`, as in the paper's R = max_t / min_t. Sets the private `_s_max_1`, `_get_n0` and `_get_r0`
    that Ray 2.60's __init__ sets (RayLayoutError if they are gone).

    A trial HyperBand stops while it waits paused at a rung has no last result marked done (it was stopped between
    reports), so the driver's status record would take it for a trial interrupted with the driver and --resume
    would wait for it. Its last result is marked done before Ray stops it (`_process_bracket`'s stop_trial).
    """
    import math

    from ray.tune.schedulers import HyperBandScheduler

    class MarkStopped:
        def __init__(self, controller: Any):
            self._controller = controller

        def __getattr__(self, name: str) -> Any:
            return getattr(self._controller, name)

        def stop_trial(self, trial: Any) -> Any:
            trial.run_metadata.last_result = {**trial.last_result, "done": True}
            return self._controller.stop_trial(trial)

    class Scheduler(HyperBandScheduler):
        def _process_bracket(self, tune_controller: Any, bracket: Any) -> Any:
            return super()._process_bracket(MarkStopped(tune_controller), bracket)

    Scheduler.__name__ = Scheduler.__qualname__ = HyperBandScheduler.__name__
    hb = Scheduler(time_attr=time_attr, max_t=max_t, reduction_factor=reduction_factor)
    missing = [a for a in ("_s_max_1", "_get_n0", "_get_r0", "_process_bracket") if not hasattr(hb, a)]
    if missing:
        raise RayLayoutError(f"ray {_ray_version()}: HyperBandScheduler has no {', '.join(missing)}")
    eta = reduction_factor
    s_max_1 = int(math.floor(math.log(max(max_t / min_t, 1.0)) / math.log(eta) + 1e-9)) + 1
    hb._s_max_1 = s_max_1
    hb._get_n0 = lambda s: int(math.ceil(s_max_1 / (s + 1) * eta**s))
    hb._get_r0 = lambda s: int(max_t * eta ** (-s))
    return hb


def population_based_training(pb2: bool = False, **kwargs: Any) -> Any:
    """Ray's PopulationBasedTraining (PB2 with `pb2`), built from `kwargs`, that exploits the checkpoint a trial last
    reported instead of asking the trial to save one more time.

    At a perturbation point Ray's PBT asks a top trial to save (`_schedule_trial_save`). A function trainable's save
    returns the checkpoint it last reported, which Ray also registers for the report itself (each of our reports
    carries one): the trial's checkpoint manager then holds two entries for one directory, deletes the directory
    while one entry is still kept, and logs "Error handling checkpoint ... Path not found" when it deletes the other,
    and a trial may find the checkpoint it exploits gone. Here PBT gets a stand-in for the save that resolves to the
    trial's latest registered checkpoint: this report's (Ray registers it right after the scheduler's decision) or
    a newer one. Uses the private `_schedule_trial_save`, `_FutureTrainingResult` and `Trial.latest_checkpoint_result`.
    """
    from ray.train._internal.session import _FutureTrainingResult
    from ray.tune.schedulers import PopulationBasedTraining

    if pb2:
        from ray.tune.schedulers.pb2 import PB2 as base
    else:
        base = PopulationBasedTraining

    class LatestReported(_FutureTrainingResult):
        def __init__(self, trial: Any):
            self.trial = trial

        def resolve(self, block: bool = True) -> Any:
            return self.trial.latest_checkpoint_result

    class NoExtraSave:
        def __init__(self, controller: Any):
            self._controller = controller

        def __getattr__(self, name: str) -> Any:
            return getattr(self._controller, name)

        def _schedule_trial_save(self, trial: Any, result: Any = None) -> Any:
            return LatestReported(trial)

    class Scheduler(base):  # type: ignore[misc, valid-type]
        def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> Any:
            return super().on_trial_result(NoExtraSave(tune_controller), trial, result)

    Scheduler.__name__ = Scheduler.__qualname__ = base.__name__
    if not hasattr(base, "_checkpoint_or_exploit"):
        raise RayLayoutError(f"ray {_ray_version()}: {base.__name__} has no _checkpoint_or_exploit")
    return Scheduler(**kwargs)


def restored_tune_config(tuner: Any) -> Any:
    """The TuneConfig a `tune.Tuner.restore`d tuner will run with (its searcher as pickled in tuner.pkl, the
    saved num_samples and max_concurrent_trials): Ray 2.60 keeps it at `tuner._local_tuner._tune_config` and
    reads it when fit() starts, so changes made here apply to the resumed run."""
    config = getattr(getattr(tuner, "_local_tuner", None), "_tune_config", None)
    if config is None or not all(hasattr(config, a) for a in ("search_alg", "num_samples", "max_concurrent_trials")):
        raise RayLayoutError(f"ray {_ray_version()}: a restored Tuner has no _local_tuner._tune_config")
    return config
