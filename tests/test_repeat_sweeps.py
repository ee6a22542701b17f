"""Repeats and derived parameters in real sweeps (the CLI as a process, real Ray, tiny models):

- a grid sweep with repeats 2 and derived fields: distinct seeds per configuration and differing losses, the
  derived values in the configs the trials trained with, mean ± std per configuration against a hand computation
  from Ray's per-trial results, the best configuration chosen on the mean;
- an optuna sweep with repeats 2 (Ray's Repeater): each suggestion trained with two seeds, and the Optuna study
  told each group's mean.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from support.experiment import EVAL_TOKENS, TOKENS_PER_STEP, base_config_dict, result_log, trial_dirs, write_yaml
from support.processes import driver, sweep_args

from lm.checkpoint import read_checkpoint
from sweeps.repeats import CONFIG_ID, SEED, TRIAL_INDEX
from sweeps.sweep import load_sweep

pytestmark = pytest.mark.slow

MAX_TOKENS = 30 * TOKENS_PER_STEP  # three evaluations per trial
DERIVED = {
    "model.num_heads": "model.d_model // 16",
    "model.d_ff": "round(8 / 3 * model.d_model / 16) * 16",
    "optimizer.lr": "base_lr * (data.batch_size / 8) ** 0.5",
}


def space(name: str, **overrides: Any) -> dict[str, Any]:
    raw = {
        "name": name,
        "metric": {"name": "val_loss", "goal": "minimize"},
        "scheduler": {"type": "fifo"},
        "resources_per_trial": {"cpu": 1, "gpu": 0},
        "stop": {"max_tokens": MAX_TOKENS, "divergence_loss": 10.0},
        "checkpoint": {"num_to_keep": 1},
    }
    raw.update(overrides)
    return raw


def run(tmp: Path, corpus: Path, ray_tmp: Path, raw: dict[str, Any]) -> tuple[Path, str, float]:
    """Run the sweep `raw` through the CLI; returns (experiment dir, output, wall seconds)."""
    base = write_yaml(tmp / "base.yaml", base_config_dict(corpus, out_dir=str(tmp / "unused_run")))
    raw = {**raw, "base_config": str(base)}
    space_file = write_yaml(tmp / f"{raw['name']}.yaml", raw)
    start = time.monotonic()
    with driver(sweep_args(space_file, raw["name"], tmp / "store", "--quiet"), ray_tmp, tmp) as d:
        code = d.wait()
        output = d.output
    assert code == 0, output[-6000:]
    return tmp / "store" / raw["name"], output, time.monotonic() - start


@pytest.fixture(scope="module")
def grid_sweep(small_corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grid_repeats")
    raw = space(
        "grid_rep",
        search={"algorithm": "grid", "max_concurrent_trials": 2},
        repeats=2,
        parameters={
            "model.d_model": {"values": [32, 48]},
            "base_lr": {"value": 3.0e-3},
            "train.eval_interval_tokens": {"value": EVAL_TOKENS},
        },
        derived=DERIVED,
    )
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths
    try:
        yield run(tmp, small_corpus, ray_tmp, raw)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def optuna_sweep(small_corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("optuna_repeats")
    raw = space(
        "optuna_rep",
        search={"algorithm": "optuna", "sampler": "tpe", "seed": 0, "max_concurrent_trials": 2},
        num_samples=2,
        repeats=2,
        parameters={
            "optimizer.lr": {"distribution": "log_uniform_values", "min": 1.0e-3, "max": 1.0e-2},
            "train.eval_interval_tokens": {"value": EVAL_TOKENS},
        },
    )
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths
    try:
        yield run(tmp, small_corpus, ray_tmp, raw)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def trained_configs(exp_dir: Path) -> dict[str, dict[str, Any]]:
    """trial id -> the config the trial trained with, as its checkpoint recorded it."""
    out = {}
    for trial_id, path in trial_dirs(exp_dir).items():
        state = next(path.glob("checkpoint_*/state.pt"))
        out[trial_id] = read_checkpoint(state)["config"]
    return out


def best_losses(exp_dir: Path) -> dict[str, float]:
    """trial id -> its lowest reported val_loss, from Ray's per-trial result.json (not our results files)."""
    return {tid: min(r["val_loss"] for r in result_log(path)) for tid, path in trial_dirs(exp_dir).items()}


def test_grid_repeats_train_each_configuration_with_distinct_seeds_and_differing_losses(grid_sweep):
    exp_dir, _, _ = grid_sweep
    configs = trained_configs(exp_dir)
    assert len(configs) == 4
    by_width: dict[int, list[tuple[int, float]]] = {}
    losses = best_losses(exp_dir)
    for trial_id, config in configs.items():
        by_width.setdefault(config["model"]["d_model"], []).append((config["train"]["seed"], losses[trial_id]))
    assert sorted(by_width) == [32, 48]
    for width, runs in by_width.items():
        assert sorted(seed for seed, _ in runs) == [0, 1], width
        assert runs[0][1] != runs[1][1], f"d_model {width}: both seeds gave the same loss"


def test_derived_values_land_in_the_trial_configs(grid_sweep):
    exp_dir, _, _ = grid_sweep
    results = pd.read_csv(exp_dir / "results.csv")
    for trial_id, config in trained_configs(exp_dir).items():
        d_model = config["model"]["d_model"]
        assert config["model"]["num_heads"] == d_model // 16
        assert config["model"]["d_ff"] == round(8 / 3 * d_model / 16) * 16
        assert config["optimizer"]["lr"] == pytest.approx(3.0e-3 * (8 / 8) ** 0.5)
        row = results[results["trial_id"] == trial_id].iloc[0]
        assert (row["model.num_heads"], row["model.d_ff"]) == (d_model // 16, round(8 / 3 * d_model / 16) * 16)


def test_grid_results_show_mean_std_per_configuration_and_best_on_the_mean(grid_sweep):
    exp_dir, output, _ = grid_sweep
    losses = best_losses(exp_dir)
    sweep = load_sweep(exp_dir)
    df = sweep.dataframe.set_index("trial_id")
    groups: dict[int, list[float]] = {}
    for trial_id, loss in losses.items():
        groups.setdefault(int(df.loc[trial_id, "model.d_model"]), []).append(loss)
    hand = {}
    for width, values in groups.items():
        mean = sum(values) / len(values)
        hand[width] = (mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)))
    table = sweep.by_config.set_index("model.d_model")
    for width, (mean, std) in hand.items():
        assert table.loc[width, "n"] == 2
        assert table.loc[width, "best_val_loss_mean"] == pytest.approx(mean, rel=1e-12)
        assert table.loc[width, "best_val_loss_std"] == pytest.approx(std, rel=1e-12)
    best_width = min(hand, key=lambda w: hand[w][0])
    best_trial = min((t for t in losses if df.loc[t, "model.d_model"] == best_width), key=losses.get)
    assert sweep.best_trial_id == best_trial
    assert (exp_dir / "best" / "checkpoint.txt").read_text().strip() == str(sweep.best_checkpoint)
    assert str(sweep.best_checkpoint).startswith(str(trial_dirs(exp_dir)[best_trial]))
    summary = (exp_dir / "summary.md").read_text()
    mean, std = hand[best_width]
    assert f"**{mean:.4f} ± {std:.4f}** over 2 seeds" in summary
    assert f"train.seed {int(df.loc[best_trial, SEED])}" in summary
    assert "best configuration:" in output
    assert sorted(df[CONFIG_ID].value_counts().tolist()) == [2, 2]


def test_optuna_repeats_train_each_suggestion_with_two_seeds_and_tell_the_mean(optuna_sweep):
    exp_dir, _, _ = optuna_sweep
    params = {tid: json.loads((p / "params.json").read_text()) for tid, p in trial_dirs(exp_dir).items()}
    configs = trained_configs(exp_dir)
    assert len(params) == 4
    groups: dict[float, list[str]] = {}
    for trial_id, sampled in params.items():
        groups.setdefault(sampled["optimizer.lr"], []).append(trial_id)
    assert sorted(len(g) for g in groups.values()) == [2, 2], params
    finals = {tid: result_log(p)[-1]["val_loss"] for tid, p in trial_dirs(exp_dir).items()}
    for lr, members in groups.items():
        assert sorted(params[t][TRIAL_INDEX] for t in members) == [0, 1]
        assert sorted(configs[t]["train"]["seed"] for t in members) == [0, 1]
        assert configs[members[0]]["optimizer"]["lr"] == configs[members[1]]["optimizer"]["lr"] == lr
        assert finals[members[0]] != finals[members[1]]
    sweep = load_sweep(exp_dir)
    assert sweep.has_repeats and sorted(sweep.by_config["n"]) == [2, 2]
    # The study (sweeps/study.py, optuna.db): one Optuna trial per group, told the mean of its last val losses.
    import optuna

    study = optuna.load_study(study_name=None, storage=f"sqlite:///{exp_dir / 'optuna.db'}")
    assert len(study.trials) == 2
    told = sorted(t.value for t in study.trials)
    assert told == pytest.approx(sorted(sum(finals[t] for t in members) / 2 for members in groups.values()), rel=1e-9)
    # Intermediate values: the group's first trial (the one the searcher knows) reports its curve.
    assert all(len(t.intermediate_values) == 3 for t in study.trials)
