"""sweeps.ray_compat against the installed Ray: fails loudly when a Ray version changes what it relies on."""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from sweeps.layout import STATE_FILE
from sweeps.ray_compat import RayLayoutError, read_trials, recorded_latest_checkpoints

ROOT = Path(__file__).resolve().parent.parent


def test_installed_ray_is_in_the_tested_range():
    import ray

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (ray_req,) = [Requirement(d) for d in deps if re.match(r"ray\b", d)]
    assert ray_req.specifier, "pyproject states the Ray range that is tested"
    assert Version(ray.__version__) in ray_req.specifier, (ray.__version__, str(ray_req.specifier))


def test_a_foreign_experiment_state_is_a_loud_error(tmp_path):
    (tmp_path / "experiment_state-2026-01-01_00-00-00.json").write_text('{"trial_data": [["x", {"other": 1}]]}')
    with pytest.raises(RayLayoutError, match="does not hold trials with relative_logdir and last_result"):
        recorded_latest_checkpoints(tmp_path)
    assert recorded_latest_checkpoints(tmp_path / "missing") == {}


@pytest.mark.slow
def test_trials_and_recorded_checkpoints_of_a_real_tune_run(tmp_path):
    import ray
    from ray import tune

    def trainable(config):  # nested: Ray pickles it by value (workers cannot import a test module)
        import tempfile

        for i in range(3):
            with tempfile.TemporaryDirectory() as d:
                (Path(d) / STATE_FILE).write_text(str(i))
                tune.report({"loss": config["x"] - i, "i": i}, checkpoint=tune.Checkpoint.from_directory(d))

    ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="WARNING")
    try:
        tuner = tune.Tuner(
            trainable,
            param_space={"x": tune.grid_search([10.0, 20.0])},
            tune_config=tune.TuneConfig(metric="loss", mode="min"),
            run_config=tune.RunConfig(
                name="exp",
                storage_path=str(tmp_path),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                verbose=0,
            ),
        )
        tuner.fit()
    finally:
        ray.shutdown()
    exp = tmp_path / "exp"
    records = sorted(read_trials(str(exp), "loss", "min"), key=lambda r: r.number)
    assert [r.number for r in records] == [0, 1]  # the variant generator's creation order (Optuna's counts from 1)
    assert [r.config["x"] for r in records] == [10.0, 20.0]
    for r in records:
        assert r.ray_status == "TERMINATED" and r.error is None
        assert r.last["i"] == 2 and list(r.history["i"]) == [0, 1, 2]
        assert Path(r.best_checkpoint).name == STATE_FILE and Path(r.best_checkpoint).read_text() == "2"
        assert Path(r.path).parent == exp
    latest = recorded_latest_checkpoints(exp)
    assert sorted(latest) == sorted(Path(r.path).name for r in records)
    assert all((path / STATE_FILE).read_text() == "2" for path in latest.values())


def test_loopback_only_sets_ray_for_one_start_and_restores(monkeypatch):
    from ray._private import ray_constants

    from sweeps.ray_compat import LOOPBACK_ENV, loopback_only

    (key,) = LOOPBACK_ENV
    monkeypatch.delenv(key, raising=False)
    before = ray_constants.ENABLE_RAY_CLUSTER
    with loopback_only():
        assert os.environ[key] == "0" and ray_constants.ENABLE_RAY_CLUSTER is False
    assert key not in os.environ and ray_constants.ENABLE_RAY_CLUSTER == before
