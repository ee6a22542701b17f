"""sweeps.sweep and sweeps.results against a recorded experiment directory (real lm.train runs, no Ray).

The slow end-to-end sweep (test_sweep.py) checks the same code on a real sweep's files; these run in seconds.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil

import pandas as pd
import pytest
from support.recorded import ENTROPY_FLOOR, ERROR, record_experiment, reports

from lm.checkpoint import read_checkpoint
from lm.record import Key
from sweeps.results import print_table, ranked_trials, summary_markdown, write_results
from sweeps.sweep import load_sweep


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, small_corpus):
    return record_experiment(tmp_path_factory.mktemp("recorded") / "exp", small_corpus)


def _sweep(exp_dir, metric="val_loss", mode="min"):
    """The recorded sweep, read back as a sweep whose metric is `metric` (goal `mode`)."""
    meta_path = exp_dir / "sweep_meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "metric": metric, "mode": mode}))
    try:
        return load_sweep(exp_dir)
    finally:
        meta_path.write_text(json.dumps(meta))


def test_each_trial_gets_its_status_and_metric_columns(recorded):
    sweep = _sweep(recorded)
    df = sweep.dataframe.set_index("trial_id")
    assert df["status"].to_dict() == {"t1": "completed", "t2": "stopped_early", "t3": "diverged", "t4": "error"}
    assert list(sweep.dataframe["trial_number"]) == [1, 2, 3, 4]
    for trial_id in ("t1", "t2"):
        reported = reports(recorded, trial_id)
        losses = [r["val_loss"] for r in reported]
        assert df.loc[trial_id, "best_val_loss"] == min(losses)
        assert df.loc[trial_id, "final_val_loss"] == losses[-1]
        assert df.loc[trial_id, "tokens_seen"] == reported[-1]["tokens_seen"]
    assert df.loc["t2", "tokens_seen"] < df.loc["t1", "tokens_seen"] == 8 * 32 * 40
    # The diverged trial reported its ceiling as val_loss: never counted as its best.
    diverged = reports(recorded, "t3")[-1]
    assert diverged["diverged"] is True and diverged["val_loss"] == 10.0  # the ceiling, so schedulers rank it last
    assert math.isnan(df.loc["t3", "best_val_loss"]) and df.loc["t3", "diverged_step"] == diverged["diverged_step"]
    assert df.loc["t4", "error"] == "RuntimeError: CUDA out of memory (recorded)" != ERROR
    assert pd.isna(df.loc["t4", "best_checkpoint"])


def test_best_trial_and_its_checkpoint(recorded):
    sweep = _sweep(recorded)
    best = sweep.best_row
    completed = sweep.dataframe[sweep.dataframe["status"].isin(["completed", "stopped_early"])]
    assert best["trial_id"] == completed.sort_values("best_val_loss").iloc[0]["trial_id"]
    state = read_checkpoint(sweep.best_checkpoint)
    assert state["val_loss"] == pytest.approx(best["best_val_loss"])
    assert sweep.best_config == state["config"] and sweep.best_config["optimizer"]["lr"] == best["optimizer.lr"]
    assert list(ranked_trials(sweep)["trial_id"])[-2:] in (["t3", "t4"], ["t4", "t3"])  # no metric: last


def test_columns_are_named_after_the_metric(recorded):
    sweep = _sweep(recorded, metric="train_loss")
    assert {"best_train_loss", "final_train_loss"} <= set(sweep.dataframe.columns)
    assert not any(c.endswith("val_loss") for c in sweep.dataframe.columns)
    t1 = sweep.dataframe.set_index("trial_id").loc["t1"]
    assert t1["best_train_loss"] == min(r["train_loss"] for r in reports(recorded, "t1"))
    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        print_table(sweep)
    assert "best_train_loss" in table.getvalue() and "best_val_loss" not in table.getvalue()
    assert f"\nbest: {sweep.best_trial_id} train_loss " in table.getvalue()


def test_maximize_picks_the_largest(recorded):
    sweep = _sweep(recorded, mode="max")
    df = sweep.dataframe
    ok = df[df["status"] != "error"].dropna(subset=["best_val_loss"])
    assert sweep.best_row["best_val_loss"] == ok["best_val_loss"].max()


def test_history_holds_every_report_with_the_swept_values(recorded):
    sweep = _sweep(recorded)
    hist = sweep.history
    assert set(hist["trial_id"]) == {"t1", "t2", "t3"}  # t4 never reported
    assert (hist.groupby("trial_id").size() == pd.Series({"t1": 4, "t2": 2, "t3": 1})).all()
    assert set(hist.columns) >= {"trial_id", Key.tokens_seen, Key.val_loss, "training_iteration", "optimizer.lr"}
    assert (hist.loc[hist["trial_id"] == "t1", "optimizer.lr"] == 3e-3).all()


def test_write_results_files_and_summary(recorded, tmp_path):
    sweep = _sweep(recorded)
    out = write_results(sweep, tmp_path / "out")
    csv = pd.read_csv(out / "results.csv")
    assert list(csv["trial_id"]) == ["t1", "t2", "t3", "t4"]
    assert pd.read_parquet(out / "results.parquet")["best_val_loss"].equals(sweep.dataframe["best_val_loss"])
    assert len(pd.read_parquet(out / "history.parquet")) == len(sweep.history)
    assert (out / "best" / "checkpoint.txt").read_text().strip() == str(sweep.best_checkpoint)
    summary = (out / "summary.md").read_text()
    assert summary == summary_markdown(sweep, out)
    assert "4 trials: 1 completed, 1 stopped early, 1 diverged, 1 error" in summary
    assert f"`{sweep.best_trial_id}`: best val_loss **{sweep.best_row['best_val_loss']:.4f}**" in summary
    assert f"entropy floor of the built-in data {ENTROPY_FLOOR:.4f}" in summary  # from sweep_meta.json
    assert "- `t4`: RuntimeError: CUDA out of memory (recorded)" in summary
    assert f"- `t3` at step {int(sweep.dataframe['diverged_step'][2])}" in summary


def test_a_truncated_best_checkpoint_is_reported_and_the_rest_written(recorded, tmp_path, capsys):
    from sweeps import continue_best, inspect_sweep

    exp = shutil.copytree(recorded, tmp_path / "exp")
    best = load_sweep(exp).best_checkpoint
    best.write_bytes(best.read_bytes()[:100])
    assert inspect_sweep.main([str(exp)]) == 0  # no traceback
    summary = (exp / "summary.md").read_text()
    assert f"**This checkpoint cannot be read**: {best}: " in summary and "continue_best.py" not in summary
    assert (exp / "results.csv").is_file() and not (exp / "best" / "config.yaml").exists()
    capsys.readouterr()
    assert continue_best.main([str(exp), "--train.max_tokens", "20000"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(best) in err[0], err


def test_a_missing_checkpoint_is_passed_over_like_a_pruned_one(recorded, tmp_path):
    from sweeps import inspect_sweep

    exp = shutil.copytree(recorded, tmp_path / "exp")
    before = load_sweep(exp)
    before.best_checkpoint.unlink()
    after = load_sweep(exp)
    assert after.best_trial_id == before.best_trial_id  # the trial's best value is its history's, as before
    assert after.best_checkpoint.is_file() and after.best_checkpoint != before.best_checkpoint
    assert inspect_sweep.main([str(exp)]) == 0
    assert "continue_best.py" in (exp / "summary.md").read_text()
