"""Disk space of a sweep's local storage: what it will write, checked before start; files written whole or not at
all; and the watch that stops a sweep cleanly, resumable, when its disk runs out.

- `check_free_space` (before Ray starts): the estimate of what the sweep writes (`estimate`: trials x kept
  checkpoints x the size of one training state, computed from the model's parameters, + logs and results)
  against the free space of the storage; not enough is a one-line input error (exit 2).
- `atomic_storage_writes` (the driver and every trial worker): Ray copies experiment state, per-trial result
  files and checkpoints into storage with pyarrow, which writes each file in place; a full disk leaves it cut
  short (a truncated experiment_state-*.json cannot be resumed; a truncated state.pt cannot be loaded). Into a
  local storage path each file is written under a temporary name and renamed instead: a file in storage is
  whole (the new or the old one) or absent.
- `make_disk_watch`: a Tune callback that stops the sweep the way Ctrl-C does (Ray saves its state one last
  time, running trials stay resumable) when the free space drops below what the next checkpoints need, or when
  a write failed for lack of space (another writer filled the disk, or the estimate was wrong). The driver then
  prints one line saying so and how to resume, writes no results (there is no room), and exits DISK_FULL_EXIT.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lm.cli import InputError
from lm.config import Config
from sweeps import ray_compat
from sweeps.schedulers import checkpoints_to_keep
from sweeps.space import SweepSpec

DISK_FULL_EXIT = 75
"""Exit code of a sweep stopped because its storage is full (sysexits' EX_TEMPFAIL: try again later); resumable
with --resume once there is space, like an interrupted sweep (130)."""
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
"""The errors a write gets from a full disk or an exhausted quota."""

CHECKPOINT_FIXED_BYTES = 16 * 1024
"""A training state's size beyond its tensors' data: format, config, RNG and sampler states, pickle framing
(measured: 10.7 KB for the tiny configs of tests/test_disk_full.py)."""
CHECKPOINT_BYTES_PER_TENSOR = 1024
"""Per parameter tensor (saved three times: weights and AdamW's two moments): its storage record and keys
(measured: 0.92 KB)."""
LOG_BYTES_PER_TRIAL = 16 * 1024
"""A trial's fixed files: params.json/.pkl, error files, the beginning of its logs."""
LOG_BYTES_PER_EVAL = 8 * 1024
"""Per evaluation of a trial: its lines in result.json, progress.csv, the event file and run/ logs (3.9 KB
measured, doubled: longer configs and parameter names)."""
SWEEP_FIXED_BYTES = 1024 * 1024
"""The sweep's own files: experiment state, searcher state, spec and status files, results, plots, summary (0.35 MB
measured for three trials)."""
WATCH_INTERVAL_S = 1.0
"""How often the driver looks at the storage's free space while the sweep runs."""
WATCH_MARGIN_BYTES = 1024 * 1024
"""Room kept, beyond the next checkpoint of each running trial, for Ray's last experiment state and the logs."""


class DiskSpaceError(InputError):
    """The storage cannot hold what the sweep will write (one-line message)."""


def mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


# ---------------------------------------------------------------------------------------------------
# Before start: the estimate, against the free space
# ---------------------------------------------------------------------------------------------------


def checkpoint_bytes(config: Config) -> int:
    """The size of one training-state checkpoint (lm.train) of `config`'s model, in bytes.

    Computed from the model built on the meta device (no memory, no time): each parameter is saved three times
    (weights, AdamW's exp_avg and exp_avg_sq, in the parameters' dtype), plus a per-tensor and a fixed overhead
    (measured; an upper bound within a few percent for small models, tested against real checkpoints).
    """
    import torch

    from lm.model import TransformerLM

    with torch.device("meta"):
        model = TransformerLM.from_config(config.model)
    params = list(model.parameters())
    data = sum(p.numel() * p.element_size() for p in params)
    return 3 * data + CHECKPOINT_BYTES_PER_TENSOR * len(params) + CHECKPOINT_FIXED_BYTES


@dataclass
class Estimate:
    """What a sweep writes into its storage, at most (checkpoints pruned to num_to_keep + the latest)."""

    trials: int
    checkpoints_per_trial: int  # num_to_keep + the latest, kept for resume
    checkpoint_bytes: int  # one training state, the largest model the space can sample
    logs_bytes: int  # every trial's result and log files, and the sweep's own files

    @property
    def total(self) -> int:
        return self.trials * self.checkpoints_per_trial * self.checkpoint_bytes + self.logs_bytes

    def describe(self) -> str:
        return (
            f"{self.trials} trials x {self.checkpoints_per_trial} checkpoints x {mb(self.checkpoint_bytes)} "
            f"+ {mb(self.logs_bytes)} of logs and results"
        )


def estimate(spec: SweepSpec) -> Estimate:
    """An upper estimate of what `spec`'s sweep writes into its storage (see Estimate)."""
    base = spec.trial_config({})
    evals = math.ceil(base.train.max_tokens / max(1, base.train.eval_interval_tokens or base.train.max_tokens))
    trials = spec.expected_trials
    return Estimate(
        trials=trials,
        checkpoints_per_trial=checkpoints_to_keep(spec) + 1,
        checkpoint_bytes=max(checkpoint_bytes(config) for config in _largest_models(spec)),
        logs_bytes=trials * (LOG_BYTES_PER_TRIAL + evals * LOG_BYTES_PER_EVAL) + SWEEP_FIXED_BYTES,
    )


def _largest_models(spec: SweepSpec) -> list[Config]:
    """The base config, and the config with every swept model.* parameter at its largest value (when that
    combination is a valid config): the biggest checkpoint a trial of the space can write."""
    configs = [spec.trial_config({})]
    largest = {}
    for path, param in spec.parameters.items():
        if not (path.startswith("model.") and param.swept):
            continue
        candidates = param.values if param.distribution == "values" else [param.max]
        numbers = [v for v in candidates if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if numbers:
            largest[path] = max(numbers)
    if largest:
        with contextlib.suppress(Exception):  # e.g. num_heads not dividing d_model: the base config decides
            configs.append(spec.trial_config(largest))
    return configs


def used_bytes(path: Path) -> int:
    """Bytes of the files under `path` (0 when it does not exist)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def check_free_space(spec: SweepSpec, storage: str, exp_dir: Path, resume: bool = False) -> Estimate | None:
    """Before Ray starts: the local storage of `exp_dir` (its parent exists) has room for what the sweep writes
    (a resumed sweep: what it writes beyond what its directory already holds). Prints the estimate in one line.

    Returns the estimate (None for a URI `storage`: not checked); raises DiskSpaceError "DIR: --storage-path:
    about X free, the sweep writes about Y (N trials x ...)" when it does not fit.
    """
    if "://" in storage:
        return None
    need = estimate(spec)
    root = exp_dir if exp_dir.exists() else exp_dir.parent
    free = shutil.disk_usage(root).free
    written = used_bytes(exp_dir) if resume else 0
    more = max(0, need.total - written)
    so_far = f", {mb(written)} of it written" if resume else ""
    if more > free:
        raise DiskSpaceError(
            f"{exp_dir.parent}: --storage-path: about {mb(free)} free, the sweep writes about {mb(need.total)} "
            f"({need.describe()}){so_far}: free some space, choose another --storage-path or lower "
            "checkpoint.num_to_keep / num_samples"
        )
    print(
        f"disk: the sweep writes about {mb(need.total)} ({need.describe()}){so_far}; {mb(free)} free in "
        f"{exp_dir.parent}",
        flush=True,
    )
    return need


# ---------------------------------------------------------------------------------------------------
# While it runs: whole files, and the watch
# ---------------------------------------------------------------------------------------------------

_disk_full = threading.Event()  # set (in this process) when a copy into local storage failed for lack of space
_disk_full_path: list[str] = []


def atomic_storage_writes() -> None:
    """Make Ray's copies into local storage write each file under a temporary name, then rename it: a file in
    storage is whole or absent, never cut short by a full disk. Idempotent; remote storage (URIs) is unchanged.

    Called in the driver (sweeps.cluster.start_ray) and, through Ray's worker_process_setup_hook, in every
    worker (checkpoints are copied into storage by the trial's own process).
    """
    ray_compat.replace_storage_copy(_copy_whole_files)
    for name in ray_compat.NO_SPACE_LOGGERS:  # the watch says it in one line: no traceback from Ray's loggers
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoSpaceFilter) for f in logger.filters):
            logger.addFilter(_NoSpaceFilter())


class _NoSpaceFilter(logging.Filter):
    """Drops a log record that carries a full-disk exception (remembering it for the watch)."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if is_no_space(error):
            _disk_full.set()
            return False
        return True


def _copy_whole_files(original: Any, source: str, destination: str, **kwargs: Any) -> Any:
    """pyarrow.fs.copy_files's replacement: local to local file by file, each written whole then renamed; any other
    copy (a URI on either side, a filtered source) goes to `original`."""
    import pyarrow.fs

    local = (type(None), pyarrow.fs.LocalFileSystem)
    if not (
        isinstance(kwargs.get("source_filesystem"), local) and isinstance(kwargs.get("destination_filesystem"), local)
    ):
        return original(source, destination, **kwargs)
    src, dst = Path(source), Path(destination)
    if src.is_dir():
        for root, _, files in os.walk(src):
            for name in files:
                rel = Path(root, name).relative_to(src)
                copy_whole(Path(root, name), dst / rel)
    else:
        copy_whole(src, dst)
    return None


def copy_whole(src: Path, dst: Path) -> None:
    """Copy `src` to `dst` through a temporary file beside it and a rename. On a full disk the temporary file is
    removed (the old `dst`, if any, stays as it was), the failure is remembered for the disk watch, and the
    OSError propagates."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if e.errno in NO_SPACE:
            _disk_full_path[:] = [str(dst)]
            _disk_full.set()
        raise


def is_no_space(error: BaseException | None) -> bool:
    """Whether `error`, or an exception it was raised from, is a full disk (ENOSPC, EDQUOT)."""
    seen = 0
    while error is not None and seen < 20:
        if isinstance(error, OSError) and error.errno in NO_SPACE:
            return True
        if isinstance(error, OSError) and "No space left on device" in str(error):  # pyarrow's errors
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False


@dataclass
class Stop:
    """Why the driver ended the run before its trials finished: the line to print and the exit code."""

    line: str
    exit_code: int
    write_results: bool  # whether the results files can and should be written
    resumable: bool  # whether the line ends with the command that resumes the sweep


def make_disk_watch(spec: SweepSpec, exp_dir: Path) -> Any:
    """The Tune callback that stops the sweep when its local storage has too little room left (module docstring).

    Its `stop` is None, or the Stop the driver reports after `fit()`; `catching()` wraps `fit()` to turn a full
    disk met by the driver's own writes into the same Stop instead of a traceback.
    """
    from ray import tune

    per_checkpoint = estimate(spec).checkpoint_bytes

    def full_here() -> bool:
        """A write failed for lack of space in this sweep's storage (a failure recorded elsewhere in this process,
        e.g. an earlier sweep of the same notebook or test session, is not this sweep's)."""
        if not _disk_full.is_set():
            return False
        return not _disk_full_path or Path(_disk_full_path[0]).resolve().is_relative_to(exp_dir.resolve())

    class DiskWatch(tune.Callback):
        def __init__(self) -> None:
            self.stop: Stop | None = None
            self.last = 0.0
            _disk_full.clear()  # what an earlier run in this process met is not this run's
            _disk_full_path.clear()

        def reserve(self, running: int) -> int:
            return max(1, running) * per_checkpoint + WATCH_MARGIN_BYTES

        def on_step_begin(self, iteration, trials, **info):
            if self.stop is not None:
                return
            now = time.monotonic()
            if now - self.last < WATCH_INTERVAL_S and not full_here():
                return
            self.last = now
            self.check(sum(1 for t in trials if t.status == "RUNNING"))

        def on_trial_error(self, iteration, trials, trial, **info):
            if self.stop is None:  # a write failed for lack of space? look now, not at the next interval
                self.check(sum(1 for t in trials if t.status == "RUNNING"))

        def check(self, running: int) -> None:
            try:
                free = shutil.disk_usage(exp_dir).free
            except OSError:
                return
            reserve = self.reserve(running)
            if free >= reserve and not full_here():
                return
            failed = f" (writing {_disk_full_path[0]} failed)" if full_here() and _disk_full_path else ""
            self.stopped(
                f"{mb(free)} free, the next checkpoints need about {mb(reserve)}{failed}; the sweep stopped with "
                "every file whole"
            )
            ray_compat.interrupt_tune_run()

        def stopped(self, why: str) -> None:
            self.stop = Stop(
                f"disk full: {exp_dir.parent}: {why}. Free space there (or move {exp_dir} to a larger disk and "
                "give its new parent as --storage-path), then resume with",
                DISK_FULL_EXIT,
                write_results=False,
                resumable=True,
            )

        @contextlib.contextmanager
        def catching(self) -> Iterator[None]:
            try:
                yield
            except Exception as e:
                if not is_no_space(e):
                    raise
                self.stopped("a write of the driver failed (No space left on device); Ray's last saved state is whole")

    return DiskWatch()


class RunWatches:
    """The driver's watches that may end a run early: the disk watch (local storage) and the pending watch
    (sweeps.cluster). `callbacks` go to Tune; after `fit()` (inside `catching()`), `stop` says why it ended early,
    if it did, and `report` prints that line and returns the exit code."""

    def __init__(self, spec: SweepSpec, exp_dir: Path, storage: str) -> None:
        from sweeps.cluster import make_pending_watch

        self.disk = make_disk_watch(spec, exp_dir) if "://" not in storage else None
        self.callbacks = [w for w in (self.disk, make_pending_watch(spec)) if w is not None]

    @property
    def stop(self) -> Stop | None:
        return next((w.stop for w in self.callbacks if w.stop is not None), None)

    def catching(self) -> contextlib.AbstractContextManager[None]:
        return self.disk.catching() if self.disk is not None else contextlib.nullcontext()

    def report(self, resume_command: str) -> int:
        stop = self.stop
        assert stop is not None
        print(f"{stop.line}\n  {resume_command}" if stop.resumable else stop.line, flush=True)
        return stop.exit_code
