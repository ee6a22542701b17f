"""The Ray Tune trainable: a thin adapter that runs `lm.train.train` for one trial.

trial config = the sweep's base config + the sampled overrides. Each evaluation of the loop writes a
training-state checkpoint and calls our reporter, which hands metrics and checkpoint to `tune.report`.
A restarted trial (worker killed, driver resumed) continues from `tune.get_checkpoint()`.
Only `tune.*` calls are used here: `ray.train.report` fails a Tune trial in Ray 2.60.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

# Heavy imports at module level: with reused actors they are paid once per worker, not once per trial.
import ray
import torch  # noqa: F401
from ray import tune

from lm.config import Config
from lm.train import train
from sweeps.layout import STATE_FILE, TRIAL_RUN_DIR
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
        "train.tensorboard": False,  # Ray's own result files cover the sweep
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

    resume_from = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        # Copy the state out: the checkpoint directory may be a temporary download that goes away.
        with checkpoint.as_directory() as d:
            resume_from = checkpoint_dir / "resume_state.pt"
            shutil.copyfile(Path(d) / STATE_FILE, resume_from)

    node_id = ray.get_runtime_context().get_node_id()

    def report(metrics: dict[str, Any], checkpoint_path: Path | None) -> None:
        metrics = {**metrics, NODE_ID: node_id}
        if checkpoint_path is None:
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="lm-ckpt-") as d:
            _link_or_copy(checkpoint_path, Path(d) / STATE_FILE)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))

    summary = train(config, reporter=report, resume_from=resume_from)
    if summary.diverged:
        return  # the loop already reported the diverged result
    if summary.final_val_loss is None:
        raise RuntimeError(f"trial ended without an evaluation: {summary}")


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
