"""The Ray Tune trainable: a thin adapter that runs `lm.train.train` for one trial.

trial config = the sweep's base config + the sampled overrides. Each evaluation of the loop writes a
training-state checkpoint and calls our reporter, which hands metrics and checkpoint to `tune.report`.
A restarted trial (worker killed, driver resumed) continues from `tune.get_checkpoint()`, or, when that state is
damaged, from the trial's newest checkpoint that loads (`resume_state`). Under PBT/PB2 that checkpoint may be another
trial's, with this trial's config perturbed: each reported checkpoint carries its owner (sweeps/lineage.py), and a
trial continuing from another's records the exploit in its run directory and tells the driver with its first report.
Only `tune.*` calls are used here: `ray.train.report` fails a Tune trial in Ray 2.60.
"""

from __future__ import annotations

import os
import posixpath
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

# Heavy imports at module level: with reused actors they are paid once per worker, not once per trial.
import pyarrow.fs
import ray
import torch  # noqa: F401
from ray import tune

from lm.checkpoint import CheckpointError, read_checkpoint
from lm.config import Config
from lm.record import Key
from lm.train import train
from sweeps.console import CHECKPOINT_NOTE
from sweeps.layout import STATE_FILE, TRIAL_RUN_DIR
from sweeps.lineage import LINEAGE_NOTE, OWNER_FILE, Exploit, Owner
from sweeps.ray_compat import NODE_ID
from sweeps.space import SweepSpec


def trial_config(
    spec: SweepSpec,
    sampled: dict[str, Any],
    run_dir: Path,
    gpu: float,
    threads: int,
    checkpoint_dir: Path | None = None,
) -> Config:
    """The sweep's base config + sampled overrides, with this trial's device, threads and output dirs."""
    config = spec.trial_config(sampled)
    overrides: dict[str, Any] = {
        "train.out_dir": str(run_dir),
        "train.checkpoint_dir": str(checkpoint_dir) if checkpoint_dir is not None else None,
        # Ray keeps the trial's checkpoints (num_to_keep): locally only the one being reported is needed.
        "train.keep_checkpoints": 1,
        "train.save_best_and_final": False,
        "train.device": "cuda" if gpu > 0 else "cpu",  # Ray set CUDA_VISIBLE_DEVICES to this trial's share
        "train.progress": "off",  # the driver prints one line per result
        "train.tensorboard": False,  # the driver's tracking callbacks cover the sweep (sweeps/tracking.py)
        "train.wandb_project": None,
    }
    if config.train.num_threads is None:
        overrides["train.num_threads"] = threads
    return config.replace(overrides, source="trial")


CKPT_PREFIX = "lm-trial-ckpt-"  # + the owning process id + "-" + a random suffix, in the temp directory


def remove_orphaned_checkpoint_dirs(tmp_dir: str | Path | None = None) -> list[Path]:
    """Delete trial checkpoint directories whose process is gone (a SIGKILLed worker cannot clean up).

    A directory whose process still runs, or may (no permission to signal it), is left alone. Returns
    the directories removed.
    """
    removed = []
    for path in Path(tmp_dir or tempfile.gettempdir()).glob(f"{CKPT_PREFIX}*-*"):
        pid_text = path.name[len(CKPT_PREFIX) :].split("-", 1)[0]
        if not pid_text.isdigit() or int(pid_text) <= 0:
            continue
        try:
            os.kill(int(pid_text), 0)
            continue  # alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # someone else's live process
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def train_trial(sampled: dict[str, Any], spec: SweepSpec, threads: int, gpu: float, exp_dir: str) -> None:
    """Function trainable: `sampled` is the searcher's config for this trial (dotted config paths).

    The loop's logs (train.log, metrics.jsonl/.csv) go to EXP_DIR/<trial dir name>/run: Ray's trial
    directory of a reused actor is a session directory that is never copied to storage, so logs written
    there would be lost. Its checkpoints go to Ray (which keeps num_to_keep of them in storage).
    """
    trial_dir = Path(exp_dir) / Path(tune.get_context().get_trial_dir()).name
    # The checkpoint being reported lives in a directory private to this process: after a driver crash
    # an orphaned worker of the same trial may still be writing into the shared run directory.
    remove_orphaned_checkpoint_dirs()
    private_ckpts = Path(tempfile.mkdtemp(prefix=f"{CKPT_PREFIX}{os.getpid()}-"))
    try:
        _run_trial(spec, sampled, threads, gpu, trial_dir, private_ckpts)
    finally:
        shutil.rmtree(private_ckpts, ignore_errors=True)  # also when ASHA stops the trial inside report


def _run_trial(
    spec: SweepSpec, sampled: dict[str, Any], threads: int, gpu: float, trial_dir: Path, checkpoint_dir: Path
) -> None:
    config = trial_config(spec, sampled, trial_dir / TRIAL_RUN_DIR, gpu, threads, checkpoint_dir)
    _check_data_here(config)

    run_dir = Path(config.train.out_dir)
    trial_id = tune.get_context().get_trial_id()
    resume_from, note, exploit_note = None, None, None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        resume_from, note, used = _resume_state(checkpoint, checkpoint_dir / "resume_state.pt")
        if note is not None:
            _log_line(run_dir, f"damaged checkpoint: {note}")
        owner = read_owner(checkpoint.filesystem, used) if used is not None else None
        exploit = Exploit.of(trial_id, sampled, owner) if owner is not None else None
        if exploit is not None:  # PBT/PB2 restarted this trial from another trial's checkpoint
            exploit.append_to(run_dir)
            exploit_note = exploit.line()
            _log_line(run_dir, exploit_note)

    node_id = ray.get_runtime_context().get_node_id()

    def report(metrics: dict[str, Any], checkpoint_path: Path | None) -> None:
        nonlocal note, exploit_note
        metrics = {**metrics, NODE_ID: node_id}
        if note is not None:  # the driver prints it (sweeps/console.py): once, with the first report
            metrics[CHECKPOINT_NOTE], note = note, None
        if exploit_note is not None:
            metrics[LINEAGE_NOTE], exploit_note = exploit_note, None
        if checkpoint_path is None:
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="lm-ckpt-") as d:
            _link_or_copy(checkpoint_path, Path(d) / STATE_FILE)
            Owner(trial_id, sampled, int(metrics[Key.tokens_seen]), int(metrics[Key.step])).write(Path(d))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))

    summary = train(config, reporter=report, resume_from=resume_from)
    if summary.diverged:
        return  # the loop already reported the diverged result
    if summary.final_val_loss is None:
        raise RuntimeError(f"trial ended without an evaluation: {summary}")


CHECKPOINT_DIR_RE = re.compile(r"^checkpoint_\d+$")  # Ray's checkpoint_000007: the index orders them


def resume_state(checkpoint: tune.Checkpoint, dest: Path) -> tuple[Path | None, str | None]:
    """The training state a restarted trial continues from, copied to `dest`, and a line saying what was damaged.

    Ray names the trial's latest checkpoint. When its state does not load (truncated, empty or missing: a worker
    killed while Ray copied it into storage, a full disk), the trial's other `checkpoint_*` directories beside it
    in storage are tried, newest first, through the same filesystem (local or a URI): returns (dest, "STORAGE
    FILE: what is wrong: resuming from OTHER instead"). When none loads, returns (None, a line saying so): the
    trial starts from scratch, since its config and seed give the same run again (only later), where failing
    would lose the trial after max_failures identical retries. Returns (dest, None) when Ray's state loads.
    A storage error other than a missing file propagates (the trial fails and Ray retries it, as before);
    so does CheckpointError, naming the damaged file, when the other checkpoints cannot be listed.
    """
    path, note, _ = _resume_state(checkpoint, dest)
    return path, note


def _resume_state(checkpoint: tune.Checkpoint, dest: Path) -> tuple[Path | None, str | None, str | None]:
    """`resume_state`, and the checkpoint directory (on the checkpoint's filesystem) the state came from."""
    fs, named = checkpoint.filesystem, checkpoint.path.rstrip("/")
    damaged = _fetch_state(fs, named, dest)
    if damaged is None:
        return dest, None, named
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(posixpath.dirname(named)))
    except OSError as e:
        raise CheckpointError(f"{damaged} (the trial's other checkpoints could not be listed: {e})") from None
    others = sorted(
        (i.path.rstrip("/") for i in infos if i.type == pyarrow.fs.FileType.Directory),
        key=posixpath.basename,
        reverse=True,
    )
    skipped = []
    for path in others:
        if path == named or not CHECKPOINT_DIR_RE.match(posixpath.basename(path)):
            continue
        if _fetch_state(fs, path, dest) is None:
            also = f" (also damaged: {', '.join(skipped)})" if skipped else ""
            return dest, f"{damaged}: resuming from {_display(fs, path)}/{STATE_FILE} instead{also}", path
        skipped.append(posixpath.basename(path))
    dest.unlink(missing_ok=True)
    also = f" (also damaged: {', '.join(skipped)})" if skipped else ""
    return None, f"{damaged}, and no other checkpoint of this trial loads{also}: starting the trial from scratch", None


def read_owner(fs: pyarrow.fs.FileSystem, checkpoint_path: str) -> Owner | None:
    """The owner record of a checkpoint directory, or None (none there: a checkpoint written before lineage)."""
    try:
        with fs.open_input_stream(f"{checkpoint_path}/{OWNER_FILE}") as stream:
            return Owner.parse(stream.read().decode(errors="replace"))
    except (FileNotFoundError, OSError):
        return None


def _fetch_state(fs: pyarrow.fs.FileSystem, checkpoint_path: str, dest: Path) -> str | None:
    """Copy the checkpoint's state file to `dest` (a private local copy: a remote checkpoint is downloaded, and
    storage may prune the checkpoint while the trial runs) and check that it loads.

    Returns None when it does, else "STORAGE FILE: what is wrong", naming the file in storage, not the copy.
    """
    src = f"{checkpoint_path}/{STATE_FILE}"
    try:
        with fs.open_input_stream(src) as stream, open(dest, "wb") as out:
            shutil.copyfileobj(stream, out, 1 << 20)
    except FileNotFoundError:
        return f"{_display(fs, src)}: missing"
    try:
        read_checkpoint(dest)  # read once more by the loop's setup: a restore pays it twice, next to training
    except CheckpointError as e:
        return f"{_display(fs, src)}: {str(e).removeprefix(f'{dest}: ')}"
    return None


def _display(fs: pyarrow.fs.FileSystem, path: str) -> str:
    """A path on `fs` as the user knows it: a local path, or a URI (s3://bucket/...)."""
    return path if isinstance(fs, pyarrow.fs.LocalFileSystem) else f"{fs.type_name}://{path}"


def _log_line(run_dir: Path, message: str) -> None:
    """A line in the trial's train.log (before the loop opens it), stamped as the loop stamps its own."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "train.log", "a") as log:
        log.write(f"{time.strftime('%H:%M:%S')} {message}\n")


def _check_data_here(config: Config) -> None:
    """On a cluster every node needs the data files: fail with a clear message where they are missing."""
    for key, value in (("data.train_path", config.data.train_path), ("data.val_path", config.data.val_path)):
        if value is not None and not os.path.exists(value):
            raise FileNotFoundError(
                f"{value}: {key} does not exist on node {ray.get_runtime_context().get_node_id()[:12]} "
                f"(on a cluster, data paths must exist on every node: a shared filesystem or a copy on each)"
            )


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # free when on the same filesystem; Ray copies the directory into storage
    except OSError:
        shutil.copyfile(src, dst)
