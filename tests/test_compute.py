"""Compute accounting of a sweep (sweeps/compute.py), on the recorded experiment: four trials trained for real by
lm.train, one completed, one stopped early, one diverged, one failed before reporting."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import tiny_config
from support.recorded import record_experiment, reports

from lm.model import flops_per_token
from sweeps.compute import RESOURCES, best_so_far_by_tokens, compute, record_resources
from sweeps.results import write_results
from sweeps.sweep import load_sweep


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, small_corpus):
    exp = record_experiment(tmp_path_factory.mktemp("recorded") / "exp", small_corpus)
    meta = json.loads((exp / "sweep_meta.json").read_text())
    base = tiny_config(small_corpus, exp / "unused")
    meta["base_config"] = base.to_dict()
    (exp / "sweep_meta.json").write_text(json.dumps(meta))
    record_resources(exp, cpu=2.0, gpu=0.0)
    return exp


def test_tokens_flops_and_the_share_early_stopping_saved(recorded):
    sweep = load_sweep(recorded)
    c = compute(sweep)
    last = {t: reports(recorded, t)[-1] for t in ("t1", "t2", "t3")}
    trained = sum(r["tokens_seen"] for r in last.values())
    assert c.trials == 3  # t4 failed before its first report: it trained nothing
    assert c.tokens_trained == trained
    assert c.tokens_full_budget == 3 * 8 * 32 * 40
    assert c.saved_fraction == pytest.approx(1 - trained / (3 * 8 * 32 * 40))
    model = tiny_config(recorded, recorded / "unused").model  # the same model for every trial (only lr swept)
    assert c.train_flops == pytest.approx(trained * flops_per_token(model))
    seconds = sum(r["time_total_s"] for r in last.values() if "time_total_s" in r)
    assert c.device_seconds == {"cpu_core_s": pytest.approx(2.0 * sweep.dataframe["time_s"].fillna(0).sum())}
    assert seconds >= 0


def test_resources_are_recorded_in_the_meta(recorded):
    assert json.loads((recorded / "sweep_meta.json").read_text())[RESOURCES] == {"cpu": 2.0, "gpu": 0.0}


def test_best_so_far_by_tokens_ends_at_the_tokens_trained_and_never_gets_worse(recorded):
    sweep = load_sweep(recorded)
    curve = best_so_far_by_tokens(sweep)
    assert curve["cumulative_tokens"].iloc[-1] == compute(sweep).tokens_trained
    assert curve["cumulative_tokens"].is_monotonic_increasing
    finite = curve["best"][curve["best"] < float("inf")]
    assert finite.is_monotonic_decreasing
    assert finite.iloc[-1] == pytest.approx(sweep.dataframe["best_val_loss"].min())


def test_results_hold_the_compute_in_summary_json_and_a_plot(recorded, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(recorded, out)
    sweep = load_sweep(out)
    write_results(sweep, out)
    record = json.loads((out / "compute.json").read_text())
    assert record["tokens_trained"] == compute(sweep).tokens_trained
    summary = (out / "summary.md").read_text()
    assert "## Compute" in summary and f"tokens trained {record['tokens_trained']:,}" in summary
    assert (out / "plots" / "best_so_far_vs_tokens.png").read_bytes()[:4] == b"\x89PNG"
