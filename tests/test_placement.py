"""Tests for ``sweeps.placement``: the measured trials x threads split and its cache, and `cpu: auto` in a sweep."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
import yaml
from conftest import tiny_config

from lm.checkpoint import read_checkpoint
from sweeps import run_sweep
from sweeps.placement import measure


@pytest.fixture(scope="module", autouse=True)
def _ray_down_at_module_end():
    yield
    import ray

    ray.shutdown()


def test_measures_every_split_and_picks_the_fastest(small_corpus, tmp_path):
    config = tiny_config(small_corpus, tmp_path / "run")
    threads_before = torch.get_num_threads()
    placement = measure(config, cpus=4, cache=tmp_path / "placement.json")
    assert torch.get_num_threads() == threads_before  # the driver's own setting is restored
    assert not placement.cached
    assert set(placement.tokens_per_s) == {"4 x 1", "2 x 2", "1 x 4"}  # every equal split of 4 CPUs
    assert all(rate > 0 for rate in placement.tokens_per_s.values())
    assert placement.threads * placement.trials == 4
    best = max(placement.tokens_per_s, key=placement.tokens_per_s.get)
    assert best == f"{placement.trials} x {placement.threads}"


def test_measurement_is_cached_per_model(small_corpus, tmp_path):
    cache = tmp_path / "placement.json"
    config = tiny_config(small_corpus, tmp_path / "run")
    first = measure(config, cpus=2, cache=cache)
    again = measure(config, cpus=2, cache=cache)
    assert again.cached and (again.threads, again.trials, again.tokens_per_s) == (
        first.threads,
        first.trials,
        first.tokens_per_s,
    )
    assert len(json.loads(cache.read_text())) == 1
    # Another model (or CPU count) is another measurement.
    other = measure(config.replace({"model.d_ff": 96}), cpus=2, cache=cache)
    assert not other.cached and len(json.loads(cache.read_text())) == 2
    assert not measure(config, cpus=1, cache=cache).cached
    # A damaged cache is measured again and rewritten, not an error.
    cache.write_text("{not json")
    assert not measure(config, cpus=2, cache=cache).cached
    assert len(json.loads(cache.read_text())) == 1


@pytest.mark.slow
def test_sweep_with_cpu_auto_uses_the_measured_split(small_corpus, tmp_path):
    overrides = {"train.max_tokens": 2560, "train.eval_interval_tokens": 1280}
    base = tiny_config(small_corpus, tmp_path / "unused", overrides)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base.to_dict()))
    space = {
        "name": "auto",
        "base_config": str(tmp_path / "base.yaml"),
        "search": {"algorithm": "random", "seed": 0},
        "scheduler": {"type": "fifo"},
        "num_samples": 2,
        "resources_per_trial": {"cpu": "auto", "gpu": 0},
        "parameters": {"optimizer.lr": {"values": [1e-3, 3e-3]}},
    }
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = run_sweep.main(
            ["--space", str(tmp_path / "space.yaml"), "--storage-path", str(tmp_path / "results"), "--num-cpus", "2"]
        )
    assert code == 0, out.getvalue()[-3000:]
    expected = measure(base, cpus=2)  # the sweep's measurement, now from the (session) cache
    assert expected.cached
    line = next(ln for ln in out.getvalue().splitlines() if ln.startswith("resources_per_trial.cpu: auto"))
    assert f"-> {expected.threads} thread(s) per trial, {expected.trials} trial(s)" in line
    assert f"up to {expected.trials} at once, {expected.threads} CPU" in out.getvalue()
    checkpoints = sorted((tmp_path / "results" / "auto").glob("*/checkpoint_*/state.pt"))
    assert checkpoints
    for path in checkpoints:  # every trial trained with the measured thread count
        assert read_checkpoint(path)["config"]["train"]["num_threads"] == expected.threads
