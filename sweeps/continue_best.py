"""Continue the best trial of a sweep with a larger token budget.

    python sweeps/continue_best.py sweep_results/lr_sweep --train.max_tokens 20_000_000

Restores the best trial's best checkpoint (weights, optimizer, step, data sampler) into `lm.train` and
trains on with its config plus any dotted overrides. The schedule is recomputed for the new budget
(see README: "Continuing beyond the budget"). Output goes to SWEEP/best/continued unless
--train.out_dir says otherwise. SWEEP may be a URI (s3://bucket/sweeps/NAME): the checkpoint is downloaded through
Ray's Checkpoint API into $LM_SWEEPS_CACHE/checkpoints/NAME/, and output goes to ./sweep_results/NAME/best/continued.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lm import cli
from lm.checkpoint import CheckpointError
from lm.config import Config
from lm.train import train_exit_code
from sweeps.layout import BEST_DIR, DEFAULT_STORAGE
from sweeps.storage import Storage, scrub

if TYPE_CHECKING:
    from sweeps.sweep import Sweep

# A trial's run settings (its device share, threads, Ray-managed checkpoints) do not carry over.
RUN_SETTINGS = {
    "train.progress": "auto",
    "train.device": "auto",
    "train.num_threads": None,
    "train.keep_checkpoints": 2,
    "train.save_best_and_final": True,
    "train.checkpoint_dir": None,
}


def build_parser() -> cli.ArgumentParser:
    ap = cli.ArgumentParser(
        prog="python sweeps/continue_best.py",
        description=__doc__.split("\n")[0] + " Any config field can be set with --section.field VALUE.",
        overrides=True,
    )
    ap.add_argument("sweep_dir", help="the sweep's experiment directory (STORAGE/NAME)")
    return ap


def continued_config(sweep: Sweep, overrides: dict[str, Any]) -> tuple[Config, Path]:
    """The best trial's config with `overrides` (dotted paths) and this machine's run settings, and its best
    checkpoint on this machine (downloaded for a remote sweep). Output goes to SWEEP/best/continued unless
    `train.out_dir` is given. Raises CheckpointError when no trial left a checkpoint."""
    if sweep.best_checkpoint is None:
        raise CheckpointError(f"{scrub(sweep.path)}: no trial of this sweep left a checkpoint")
    checkpoint = sweep.local_best_checkpoint()  # a remote sweep's: downloaded into $LM_SWEEPS_CACHE/checkpoints
    storage = Storage.at(str(sweep.path))
    local_dir = storage.local_path or Path.cwd() / DEFAULT_STORAGE / storage.name
    overrides = {"train.out_dir": str(local_dir / BEST_DIR / "continued"), **RUN_SETTINGS, **overrides}
    config = Config.from_dict(sweep.best_config, source=str(checkpoint)).replace(overrides, "command line")
    return config, checkpoint


def _command(args: argparse.Namespace) -> int:
    from sweeps.results import load_sweep

    sweep = load_sweep(args.sweep_dir)
    config, checkpoint = continued_config(sweep, args.overrides)
    print(
        f"continuing trial {sweep.best_trial_id} from {sweep.best_checkpoint}"
        + (f" (downloaded to {checkpoint})" if checkpoint != sweep.best_checkpoint else "")
        + f" to {config.train.max_tokens:,} tokens"
    )
    return train_exit_code(config, resume_from=checkpoint)


def main(argv: list[str] | None = None) -> int:
    """`lm-sweep-continue`: exit 0 when trained, 1 when the run diverged, 2 on bad input (one `error:` line)."""
    return cli.run(_command, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
