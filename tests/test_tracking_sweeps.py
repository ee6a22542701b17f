"""Tracking a real sweep: TensorBoard event files stepped by tokens with an HParams entry per trial, W&B offline
run files, an MLflow SQLite store, each read back through its own reader; and a tracking server that is down
never fails the sweep. Slow (real Ray)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
from support.experiment import MAX_TOKENS, make_space, result_log, trial_dirs
from support.processes import driver, sweep_args
from support.wandb_files import read_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tracked(small_corpus, tmp_path_factory, ray_tmp_module):
    """Two trials at once, FIFO, with TensorBoard, W&B (offline) and MLflow (SQLite) on."""
    tmp = tmp_path_factory.mktemp("tracked")
    mlflow_uri = f"sqlite:///{tmp / 'mlflow.db'}"
    space = make_space(
        tmp,
        small_corpus,
        num_samples=2,
        search={"algorithm": "random", "seed": 0, "max_concurrent_trials": 2},
        tracking={"wandb": {"project": "lm-sweeps-test", "mode": "offline"}, "mlflow": {"tracking_uri": mlflow_uri}},
    )
    store = tmp / "store"
    os.environ["LM_SWEEPS_STATUS_EVERY_S"] = "1"  # the driver inherits it: a plain status line every second
    try:
        with driver(sweep_args(space, "tracked", store), ray_tmp_module, tmp) as d:
            rc = d.wait()
    finally:
        os.environ.pop("LM_SWEEPS_STATUS_EVERY_S")
    assert rc == 0, d.output[-3000:]
    return {"exp": store / "tracked", "mlflow": mlflow_uri, "output": d.output}


@pytest.fixture(scope="module")
def ray_tmp_module():
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def reported(trial_dir: Path) -> list[dict]:
    return [r for r in result_log(trial_dir) if "val_loss" in r]


def test_tensorboard_scalars_are_stepped_by_tokens_with_an_hparams_entry(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    trials = trial_dirs(tracked["exp"])
    assert len(trials) == 2
    for trial_dir in trials.values():
        events = EventAccumulator(str(trial_dir), size_guidance={"scalars": 0})
        events.Reload()
        val = events.Scalars("ray/tune/val_loss")
        expected = [(r["tokens_seen"], r["val_loss"]) for r in reported(trial_dir)]
        assert [(e.step, pytest.approx(e.value)) for e in val] == expected
        assert {"ray/tune/train_loss", "ray/tune/lr", "ray/tune/tokens_per_s"} <= set(events.Tags()["scalars"])
        content = events.PluginTagToContent("hparams")
        start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
        hparams = start.session_start_info.hparams
        params = json.loads((trial_dir / "params.json").read_text())
        assert hparams["optimizer.lr"].number_value == pytest.approx(params["optimizer.lr"])
        assert hparams["status"].string_value == "completed"
        best = events.Scalars("hparams/best_val_loss")[-1].value
        assert best == pytest.approx(min(v for _, v in expected))


def test_wandb_offline_runs_hold_config_metrics_on_tokens_and_summary(tracked):
    runs = sorted((tracked["exp"] / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 2
    trials = trial_dirs(tracked["exp"])
    for path in runs:
        run = read_run(path)
        trial_id = run["run"].display_name
        assert run["run"].run_group == "tracked" and run["run"].project == "lm-sweeps-test"
        trial_dir = trials[trial_id]
        params = json.loads((trial_dir / "params.json").read_text())
        assert run["config"]["swept"] == {"optimizer.lr": pytest.approx(params["optimizer.lr"])}
        assert run["config"]["optimizer"]["lr"] == pytest.approx(params["optimizer.lr"])
        assert run["config"]["model"]["d_model"] == 32
        logged = [(h["tokens_seen"], h["val_loss"]) for h in run["history"] if "val_loss" in h]
        assert logged == [(r["tokens_seen"], pytest.approx(r["val_loss"])) for r in reported(trial_dir)]
        assert run["summary"]["status"] == "completed"
        assert run["summary"]["best_val_loss"] == pytest.approx(min(v for _, v in logged))


def test_mlflow_runs_hold_params_history_on_tokens_and_the_best_checkpoint(tracked):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracked["mlflow"])
    experiment = client.get_experiment_by_name("tracked")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2
    trials = trial_dirs(tracked["exp"])
    for run in runs:
        trial_dir = trials[run.data.tags["trial_id"]]
        params = json.loads((trial_dir / "params.json").read_text())
        assert float(run.data.params["optimizer.lr"]) == pytest.approx(params["optimizer.lr"])
        assert run.data.tags["swept"] == "optimizer.lr" and run.data.tags["status"] == "completed"
        history = client.get_metric_history(run.info.run_id, "val_loss")
        assert sorted((m.step, m.value) for m in history) == [
            (r["tokens_seen"], pytest.approx(r["val_loss"])) for r in reported(trial_dir)
        ]
        best = Path(run.data.tags["best_checkpoint"])
        assert best.parent == trial_dir and (best / "state.pt").is_file()
        assert run.info.status == "FINISHED"


def test_tracking_backends_that_fail_warn_once_each_and_the_sweep_goes_on(small_corpus, tmp_path, ray_tmp):
    space = make_space(
        tmp_path,
        small_corpus,
        num_samples=2,
        search={"algorithm": "random", "seed": 0, "max_concurrent_trials": 2},
        tracking={
            "mlflow": {"tracking_uri": "http://127.0.0.1:9"},  # the discard port: nothing listens
            "wandb": {"project": "p", "mode": "online"},  # no credentials (WANDB_API_KEY unset, no netrc entry)
        },
    )
    env_keys = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "3"}
    old = {k: os.environ.get(k) for k in [*env_keys, "WANDB_API_KEY"]}
    os.environ.pop("WANDB_API_KEY", None)
    os.environ.update(env_keys)
    try:
        with driver(sweep_args(space, "down", tmp_path / "store"), ray_tmp, tmp_path) as d:
            rc = d.wait()
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    assert rc == 0, d.output[-3000:]
    for backend in ("MLflow", "W&B"):
        warnings = [line for line in d.lines if f"warning: {backend} failed" in line]
        assert len(warnings) == 1, (backend, d.output[-3000:])
        assert "the sweep goes on" in warnings[0]
    assert "Traceback" not in d.output
    assert len(d.finished()) == 2


def test_a_plain_status_line_is_printed_while_the_sweep_runs(tracked):
    import re

    lines = [line for line in tracked["output"].splitlines() if " running, " in line and " of 2 | tokens " in line]
    assert lines, tracked["output"][-3000:]
    m = re.search(r"tokens ([\d,]+)/([\d,]+)", lines[-1])
    assert int(m.group(2).replace(",", "")) == 2 * MAX_TOKENS
    assert "ETA" in lines[-1] and "best val_loss" in lines[-1]


def test_compute_accounting_in_the_results_and_the_final_lines(tracked):
    record = json.loads((tracked["exp"] / "compute.json").read_text())
    results = json.loads(pd.read_csv(tracked["exp"] / "results.csv").to_json(orient="records"))
    assert record["tokens_trained"] == sum(r["tokens_seen"] for r in results) == 2 * MAX_TOKENS  # FIFO: no stops
    assert record["saved_fraction"] == 0
    assert record["device_seconds"]["cpu_core_s"] == pytest.approx(sum(r["time_s"] for r in results))  # 1 CPU each
    assert f"tokens trained {2 * MAX_TOKENS:,} of {2 * MAX_TOKENS:,}" in tracked["output"]
    assert "## Compute" in (tracked["exp"] / "summary.md").read_text()
