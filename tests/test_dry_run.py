"""`run_sweep.py --dry-run`: validation as a real start, then the resolved space, resources, rungs, budget and the
first suggested configurations, with no Ray started and no experiment directory created."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml
from support.experiment import base_config_dict, write_yaml

REPO = Path(__file__).resolve().parents[1]


def dry_run(tmp_path: Path, space: dict, *extra: str) -> subprocess.CompletedProcess:
    path = write_yaml(tmp_path / "space.yaml", space)
    return subprocess.run(
        [sys.executable, str(REPO / "sweeps" / "run_sweep.py"), "--space", str(path), "--dry-run",
         "--storage-path", str(tmp_path / "store"), *extra],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def space(tmp_path: Path, small_corpus: Path, **overrides) -> dict:
    base = write_yaml(tmp_path / "base.yaml", base_config_dict(small_corpus))
    data = {
        "name": "dry",
        "base_config": str(base),
        "search": {"algorithm": "optuna", "seed": 3, "points_to_evaluate": {"start": {"optimizer.lr": 2.0e-3}}},
        "scheduler": {"type": "asha", "grace_period": 2_560, "reduction_factor": 2},
        "num_samples": 4,
        "resources_per_trial": {"cpu": 1, "gpu": 0},
        "stop": {"max_tokens": 25_600},
        "parameters": {
            "optimizer.lr": {"distribution": "log_uniform_values", "min": 1.0e-3, "max": 1.0e-2},
            "width": {"values": [1, 2]},
        },
        "derived": {"model.d_ff": "64 * width"},
    }
    data.update(overrides)
    return data


def test_dry_run_prints_the_plan_and_starts_nothing(tmp_path, small_corpus):
    proc = dry_run(tmp_path, space(tmp_path, small_corpus), "--set", "num_samples=3", "--num-cpus", "2")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith(f"dry run: nothing started. The sweep 'dry' would write to {tmp_path / 'store' / 'dry'}")
    resolved = yaml.safe_load(out.split("resolved space:\n", 1)[1].split("\n\n", 1)[0])
    assert resolved["num_samples"] == 3 and resolved["derived"] == {"model.d_ff": "64 * width"}  # after --set
    assert "resources per trial: cpu 1, gpu 0" in out and "trials at once: 2 (on 2 CPUs of a local Ray)" in out
    # ASHA: grace 2,560, factor 2, budget 25,600 -> rungs 2,560, 5,120, 10,240, 20,480.
    assert "rungs at 2,560, 5,120, 10,240, 20,480 tokens_seen (the best 1/2 go on); end 25,600" in out
    assert "budget: 3 trials x 25,600 tokens = 76,800 tokens if none is stopped" in out
    configs = [line for line in out.splitlines() if line.startswith("  ") and ". optimizer.lr=" in line]
    assert len(configs) == 3
    assert configs[0].startswith("  1. optimizer.lr=0.002, width=")  # the named start comes first
    for line in configs:
        width = int(line.split("width=")[1].split(",")[0])
        assert f"model.d_ff={64 * width}" in line  # derived from the drawn free name
    assert not (tmp_path / "store" / "dry").exists()  # no experiment directory, no study, no Ray
    assert "Ray" not in proc.stderr


def test_dry_run_lists_a_grid_in_order_with_its_seeds(tmp_path, small_corpus):
    grid = space(
        tmp_path,
        small_corpus,
        search={"algorithm": "grid"},
        scheduler={"type": "fifo"},
        repeats=2,
        num_samples=None,
        derived={},
        parameters={"optimizer.lr": {"values": [1.0e-3, 3.0e-3]}},
    )
    proc = dry_run(tmp_path, grid)
    assert proc.returncode == 0, proc.stderr
    assert "budget: 4 trials (2 configurations x 2 seeds) x 25,600 tokens" in proc.stdout
    assert "scheduler: fifo: every trial runs its whole budget" in proc.stdout
    configs = [line.strip() for line in proc.stdout.splitlines() if line.startswith("  ") and "train.seed=" in line]
    assert configs == [
        "1. train.seed=0, optimizer.lr=0.001",
        "2. train.seed=0, optimizer.lr=0.003",
        "3. train.seed=1, optimizer.lr=0.001",
        "4. train.seed=1, optimizer.lr=0.003",
    ]


def test_dry_run_refuses_bad_input_like_a_start(tmp_path, small_corpus):
    bad = space(tmp_path, small_corpus, derived={"model.d_ff": "64 * nothing"})
    proc = dry_run(tmp_path, bad)
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and "derived.model.d_ff" in proc.stderr
