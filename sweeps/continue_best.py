"""Continue the best trial of a sweep with a larger token budget.

    python sweeps/continue_best.py sweep_results/lr_sweep --train.max_tokens 20_000_000

Restores the best trial's best checkpoint (weights, optimizer, step, data sampler) into `lm.train` and
trains on with its config plus any dotted overrides. The schedule is recomputed for the new budget
(see README: "Continuing beyond the budget"). Output goes to SWEEP/best/continued unless
--train.out_dir says otherwise.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lm.checkpoint import CheckpointError
from lm.config import Config, ConfigError, parse_override_args
from lm.train import run_cli, train


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    sweep_dir, rest = Path(argv[0]), [a for a in argv[1:] if a != "--debug"]

    def body() -> dict:
        overrides = parse_override_args(rest)
        from sweeps.results import load_sweep

        if not (sweep_dir / "sweep_meta.json").is_file():
            raise ConfigError(f"{sweep_dir}: not a sweep directory (no sweep_meta.json)")
        sweep = load_sweep(sweep_dir)
        checkpoint = sweep.best_checkpoint
        if checkpoint is None:
            raise CheckpointError(f"{sweep_dir}: no trial of this sweep left a checkpoint")
        # A trial's run settings (its device share, threads, Ray-managed checkpoints) do not carry over.
        for key, value in {
            "train.out_dir": str(sweep_dir / "best" / "continued"),
            "train.progress": "auto",
            "train.device": "auto",
            "train.num_threads": None,
            "train.keep_checkpoints": 2,
            "train.save_best_and_final": True,
            "train.checkpoint_dir": None,
        }.items():
            overrides.setdefault(key, value)
        config = Config.from_dict(sweep.best_config, source=str(checkpoint)).replace(overrides, "command line")
        print(f"continuing trial {sweep.best_trial_id} from {checkpoint} to {config.train.max_tokens:,} tokens")
        return train(config, resume_from=checkpoint)

    return run_cli(body, debug="--debug" in argv)


if __name__ == "__main__":
    sys.exit(main())
