"""The tiny sweep the process tests run, and reading its experiment directory back.

One trial: 100 steps of 8 x 32 = 256 tokens, an evaluation (and a Ray checkpoint) every 10 steps, on CPU
with a tiny model (context 32, d_model 32, 2 layers, batch 8).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import yaml

from lm.train import train

TOKENS_PER_STEP = 8 * 32
MAX_TOKENS = 100 * TOKENS_PER_STEP
EVAL_TOKENS = 10 * TOKENS_PER_STEP
FIRST_EVAL_STEP = 10
NUM_TO_KEEP = 2


# ---------------------------------------------------------------------------------------------------
# Files: base config and search spaces
# ---------------------------------------------------------------------------------------------------


def base_config_dict(corpus: Path, **train: Any) -> dict[str, Any]:
    return {
        "model": {
            "vocab_size": 257,
            "context_length": 32,
            "d_model": 32,
            "num_layers": 2,
            "num_heads": 2,
            "d_ff": 64,
        },
        "optimizer": {"lr": 3.0e-3},
        "data": {
            "train_path": str(corpus / "train.npy"),
            "val_path": str(corpus / "val.npy"),
            "batch_size": 8,
            "val_windows": 16,
        },
        "train": {
            "max_tokens": MAX_TOKENS,
            "eval_interval_tokens": EVAL_TOKENS,
            "log_interval": 10,
            "device": "cpu",
            "num_threads": 1,
            "progress": "off",
            "tensorboard": False,
            **train,
        },
    }


def write_yaml(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def seq_space(base: Path, **overrides: Any) -> dict[str, Any]:
    """Optuna (seeded TPE), FIFO, three trials one at a time, ten evaluations each."""
    space = {
        "name": "rel",
        "base_config": str(base),
        "metric": {"name": "val_loss", "goal": "minimize"},
        "search": {"algorithm": "optuna", "sampler": "tpe", "seed": 0, "max_concurrent_trials": 1},
        "scheduler": {"type": "fifo"},
        "num_samples": 3,
        "resources_per_trial": {"cpu": 1, "gpu": 0},
        "stop": {"max_tokens": MAX_TOKENS, "divergence_loss": 10.0},
        "checkpoint": {"num_to_keep": NUM_TO_KEEP},
        "parameters": {"optimizer.lr": {"distribution": "log_uniform_values", "min": 1.0e-3, "max": 1.0e-2}},
    }
    space.update(overrides)
    return space


def make_space(tmp: Path, corpus: Path, **overrides: Any) -> Path:
    base = write_yaml(tmp / "base.yaml", base_config_dict(corpus, out_dir=str(tmp / "unused_run")))
    return write_yaml(tmp / "space.yaml", seq_space(base, **overrides))


# ---------------------------------------------------------------------------------------------------
# Reading a sweep back: trial directories, Ray's per-trial result log, results.csv, train.log
# ---------------------------------------------------------------------------------------------------


TRIAL_DIR_RE = re.compile(r"^train_trial_([0-9a-f]+(?:_\d{5})?)_(\d+)_")  # Optuna: 1a2b3c4d; grid: 1a2b3_00000


def trial_dirs(exp_dir: Path) -> dict[str, Path]:
    """trial id -> trial directory in storage (train_trial_<id>_<number>_<params>_<date>)."""
    return {m.group(1): p for p in exp_dir.glob("train_trial_*") if (m := TRIAL_DIR_RE.match(p.name)) and p.is_dir()}


def trial_number(trial_dir: Path) -> int:
    m = TRIAL_DIR_RE.match(trial_dir.name)
    assert m, trial_dir
    return int(m.group(2))


def result_log(trial_dir: Path) -> list[dict[str, Any]]:
    """Every result Ray recorded for the trial (result.json: one JSON object per report, across restores)."""
    path = trial_dir / "result.json"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def restores(records: list[dict[str, Any]]) -> list[int]:
    """Indices of the first report after each restore (Ray resets iterations_since_restore to 1 there)."""
    return [i for i, r in enumerate(records) if i > 0 and r.get("iterations_since_restore") == 1]


def train_logs(trial_dir_name: str, exp_dir: Path, ray_tmp: Path) -> list[Path]:
    """The trial's run/train.log wherever Ray put the trial's working directory (storage or session dir)."""
    found = list((exp_dir / trial_dir_name / "run").glob("train.log"))
    found += ray_tmp.glob(f"ray/session_*/artifacts/*/*/*/{glob_escape(trial_dir_name)}/run/train.log")
    return found


def glob_escape(name: str) -> str:
    return re.sub(r"([\[\]*?])", r"[\1]", name)


def resumed_steps(logs: list[Path]) -> list[int]:
    steps = []
    for log in logs:
        steps += [int(s) for s in re.findall(r"resumed at step (\d+)", log.read_text())]
    return steps


def read_results(exp_dir: Path) -> pd.DataFrame:
    return pd.read_csv(exp_dir / "results.csv").sort_values("trial_number").reset_index(drop=True)


def reference_evals(space: Path, sampled: dict[str, Any], out_dir: Path) -> dict[int, float]:
    """val loss by step of the trial's config trained directly by lm.train (never killed, CPU, 1 thread)."""
    from sweeps.space import load_space

    config = (
        load_space(space)
        .trial_config(sampled)
        .replace(
            {
                "train.device": "cpu",
                "train.num_threads": 1,
                "train.out_dir": str(out_dir),
                "train.progress": "off",
                "train.tensorboard": False,
            }
        )
    )
    evals: dict[int, float] = {}
    threads = torch.get_num_threads()
    try:
        train(config, reporter=lambda metrics, _ckpt: evals.__setitem__(metrics["step"], metrics["val_loss"]))
    finally:
        torch.set_num_threads(threads)
    return evals


def assert_same_losses_as_uninterrupted(trial_dir: Path, space: Path, tmp: Path) -> None:
    """Every val loss the trial reported (before and after its restart) equals a clean run's, bitwise."""
    sampled = json.loads((trial_dir / "params.json").read_text())
    expected = reference_evals(space, sampled, tmp / f"reference_{trial_dir.name[:40]}")
    reported = [(r["step"], r["val_loss"]) for r in result_log(trial_dir)]
    assert [step for step, _ in reported if step not in expected] == []
    mismatched = [(step, loss, expected[step]) for step, loss in reported if loss != expected[step]]
    assert mismatched == [], "val losses differ from the uninterrupted run (step, reported, expected)"
    assert max(step for step, _ in reported) == max(expected)
