"""Determinism: the same config and seed give the same losses and weights bit for bit (CPU); the same sweep
seed gives the same Optuna suggestions, in order, when trials run one at a time.
"""

from __future__ import annotations

import json

import pytest
import torch
from support.experiment import read_results, trial_dirs, trial_number

from lm.checkpoint import read_checkpoint
from lm.train import train


def test_same_config_and_seed_give_bitwise_identical_losses(make_config, tmp_path):
    threads = torch.get_num_threads()
    runs = []
    try:
        for name in ("first", "second"):
            config = make_config({"train.device": "cpu", "train.num_threads": 1, "train.out_dir": str(tmp_path / name)})
            train(config)
            rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            runs.append([(r["kind"], r["step"], r.get("train_loss"), r.get("val_loss")) for r in rows])
    finally:
        torch.set_num_threads(threads)
    assert runs[0] == runs[1]  # exact float equality of every logged train and val loss
    assert sum(kind == "eval" for kind, *_ in runs[0]) == 4
    first = read_checkpoint(tmp_path / "first" / "checkpoints" / "final.pt")["model"]
    second = read_checkpoint(tmp_path / "second" / "checkpoints" / "final.pt")["model"]
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.slow
def test_same_sweep_seed_gives_same_suggestions_in_order(twin_sweeps):
    # twin_sweeps (tests/support/fixtures.py): the same sweep run twice, concurrently, under two names.
    a, b = read_results(twin_sweeps["a"]), read_results(twin_sweeps["b"])
    assert len(a) == len(b) == 3
    params = [
        [json.loads((p / "params.json").read_text()) for p in sorted(trial_dirs(exp).values(), key=trial_number)]
        for exp in (twin_sweeps["a"], twin_sweeps["b"])
    ]
    assert params[0] == params[1]  # identical sampled configs, in trial order
    assert len({p["optimizer.lr"] for p in params[0]}) == 3
    assert a["optimizer.lr"].tolist() == b["optimizer.lr"].tolist()
    assert a["best_val_loss"].tolist() == b["best_val_loss"].tolist()  # and identical results (CPU)
