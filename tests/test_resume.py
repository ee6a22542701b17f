"""The sweep driver SIGKILLed or interrupted (SIGINT) mid-sweep, then `--resume`d (real processes, signals).

Finished trials are not rerun, the running one continues from a checkpoint with the losses of a run that was
never interrupted; and a resume repairs a latest checkpoint that Ray pruned before it saved its state.
The harness (the driver in its own session, reading its output and files back) is in tests/support/.
"""

from __future__ import annotations

import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from support.experiment import (
    FIRST_EVAL_STEP,
    MAX_TOKENS,
    assert_same_losses_as_uninterrupted,
    make_space,
    read_results,
    restores,
    result_log,
    resumed_steps,
    train_logs,
    trial_dirs,
)
from support.processes import Driver, driver, sweep_args, wait_session_empty


def _finished_and_running(d: Driver, min_reports: int) -> tuple[set[str], str] | None:
    """(finished trial ids, a running trial with at least min_reports evaluations), or None yet."""
    done = set(d.finished())
    if not done:
        return None
    counts: dict[str, int] = {}
    for trial_id, _ in d.reports():
        if trial_id not in done:
            counts[trial_id] = counts.get(trial_id, 0) + 1
    running = [t for t, n in counts.items() if n >= min_reports]
    return (done, running[0]) if running else None


def _assert_resumed_sweep(
    exp_dir: Path,
    resumed: Driver,
    finished_before: set[str],
    running: str,
    space: Path,
    tmp: Path,
    ray_tmp: Path,
) -> None:
    # Finished trials are not run again: the resumed driver prints nothing for them.
    again = {t for t, _ in resumed.reports()} | set(resumed.finished()) | set(resumed.errored())
    assert again & finished_before == set(), resumed.output[-4000:]
    # Exactly num_samples trials, all completed to the token budget, all in the results files.
    df = read_results(exp_dir)
    assert len(df) == 3 and len(trial_dirs(exp_dir)) == 3
    assert set(df["status"]) == {"completed"}, df[["trial_id", "status", "error"]]
    assert (df["tokens_seen"] == MAX_TOKENS).all()
    assert finished_before | {running} <= set(df["trial_id"])
    history = pd.read_parquet(exp_dir / "history.parquet")
    assert set(history["trial_id"]) == set(df["trial_id"])
    summary = (exp_dir / "summary.md").read_text()
    assert all(f"| {t} | completed |" in summary for t in df["trial_id"])  # the top-10 table
    # The trial that was running continued from a checkpoint, not from step 0.
    records = result_log(trial_dirs(exp_dir)[running])
    first_after = restores(records)
    assert first_after, f"{running} shows no restore in its result.json"
    assert records[first_after[-1]]["step"] > FIRST_EVAL_STEP
    assert [r["step"] for r in records].count(FIRST_EVAL_STEP) == 1
    steps = resumed_steps(train_logs(trial_dirs(exp_dir)[running].name, exp_dir, ray_tmp))
    assert steps and all(s > 0 for s in steps), "no 'resumed at step N' (N > 0) in the trial's train.log"
    # ... and its losses are those of a run that was never interrupted.
    assert_same_losses_as_uninterrupted(trial_dirs(exp_dir)[running], space, tmp)


# ---------------------------------------------------------------------------------------------------
# SIGKILL
# ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_driver_sigkill_mid_sweep_then_resume_finishes_it(small_corpus, tmp_path, ray_tmp):
    space = make_space(tmp_path, small_corpus)
    store = tmp_path / "store"
    with driver(sweep_args(space, "killed", store), ray_tmp, tmp_path) as d:
        finished_before, running = d.wait_until(lambda: _finished_and_running(d, 3), "a trial done, one running")
        d.signal_group(signal.SIGKILL)
        assert d.wait() == -signal.SIGKILL
    with driver(sweep_args(None, "killed", store, "--resume"), ray_tmp, tmp_path) as resumed:
        assert resumed.wait() == 0, resumed.output[-6000:]
    assert "resuming sweep 'killed'" in resumed.output
    _assert_resumed_sweep(store / "killed", resumed, finished_before, running, space, tmp_path, ray_tmp)


@pytest.mark.slow
def test_driver_sigkill_right_after_a_trial_finished_then_resume(small_corpus, tmp_path, ray_tmp):
    # max_failures 0: with the default (2) the restored trial fails the same way twice more, only slower.
    space = make_space(tmp_path, small_corpus, num_samples=2, max_failures=0)
    store = tmp_path / "store"
    with driver(sweep_args(space, "edge", store), ray_tmp, tmp_path) as d:
        finished_before = set(d.wait_until(d.finished, "a trial finished"))
        d.signal_group(signal.SIGKILL)  # at once: before Ray's next experiment snapshot
        state_at_kill = sorted(p.name for p in (store / "edge").glob("experiment_state*"))
        assert d.wait() == -signal.SIGKILL
    with driver(sweep_args(None, "edge", store, "--resume"), ray_tmp, tmp_path) as resumed:
        rc = resumed.wait()
    assert (store / "edge" / "results.csv").is_file(), (rc, state_at_kill, resumed.output[-6000:])
    df = read_results(store / "edge")
    assert len(df) == 2
    assert set(resumed.errored()) == set(), resumed.output[-6000:]
    assert set(df["status"]) == {"completed"}, df[["trial_id", "status", "error"]].to_string()
    assert rc == 0
    # Ray had not recorded the completion, so it restores the trial from its final checkpoint: the trial
    # trains no further step and only reports its final evaluation again (at the full budget).
    budget = int(df["tokens_seen"].max())
    again = [(t, tokens) for t, tokens in resumed.reports() if t in finished_before]
    assert all(tokens == budget for _, tokens in again), again


@pytest.mark.slow
def test_resume_repairs_a_latest_checkpoint_pruned_before_the_state_was_saved(small_corpus, tmp_path, ray_tmp):
    # The race behind the SIGKILL test above, made deterministic: Ray's saved state names a latest
    # checkpoint that is gone from disk while newer ones exist.
    from ray import tune

    from sweeps.run_sweep import repair_pruned_checkpoints

    space = make_space(tmp_path, small_corpus, num_samples=1)
    store = tmp_path / "store"
    with driver(sweep_args(space, "pruned", store), ray_tmp, tmp_path) as d:
        assert d.wait() == 0, d.output[-3000:]
    exp = store / "pruned"
    recorded = Path(tune.ResultGrid(tune.ExperimentAnalysis(str(exp)))[0].checkpoint.path)  # Ray's own view
    assert repair_pruned_checkpoints(str(exp)) == []  # nothing missing, nothing touched
    older = sorted(p for p in recorded.parent.glob("checkpoint_*") if p != recorded)
    assert older, "num_to_keep 2 leaves an older checkpoint beside the latest"
    shutil.rmtree(recorded)
    lines = repair_pruned_checkpoints(str(exp))
    assert len(lines) == 1 and recorded.name in lines[0] and older[-1].name in lines[0]
    assert (recorded / "state.pt").read_bytes() == (older[-1] / "state.pt").read_bytes()


# ---------------------------------------------------------------------------------------------------
# SIGINT (Ctrl-C)
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sigint_sweep(small_corpus, tmp_path_factory) -> Iterator[dict[str, Any]]:
    """A sweep interrupted with SIGINT (Ctrl-C: to the whole process group) mid-sweep, then resumed."""
    tmp = tmp_path_factory.mktemp("sigint")
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    space = make_space(tmp, small_corpus)
    store = tmp / "store"
    try:
        with driver(sweep_args(space, "interrupted", store), ray_tmp, tmp) as d:
            finished_before, running = d.wait_until(lambda: _finished_and_running(d, 3), "a trial done, one running")
            d.signal_group(signal.SIGINT)
            rc_interrupted = d.wait()  # it must end by itself
            left_running = wait_session_empty(d.sid)  # Ray shut down with the driver
        after_interrupt = read_results(store / "interrupted") if (store / "interrupted/results.csv").exists() else None
        with driver(sweep_args(None, "interrupted", store, "--resume"), ray_tmp, tmp) as resumed:
            rc_resumed = resumed.wait()
        yield dict(
            tmp=tmp,
            ray_tmp=ray_tmp,
            space=space,
            exp_dir=store / "interrupted",
            first=d,
            resumed=resumed,
            rc_interrupted=rc_interrupted,
            rc_resumed=rc_resumed,
            finished_before=finished_before,
            running=running,
            after_interrupt=after_interrupt,
            left_running=left_running,
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.slow
def test_driver_sigint_mid_sweep_then_resume_finishes_it(sigint_sweep):
    s = sigint_sweep
    assert s["rc_interrupted"] in (0, 130), s["first"].output[-4000:]  # ended by itself, no traceback
    assert "Traceback" not in s["first"].output
    assert s["left_running"] == [], "processes of the interrupted driver's Ray instance still running"
    assert s["rc_resumed"] == 0, s["resumed"].output[-6000:]
    _assert_resumed_sweep(
        s["exp_dir"], s["resumed"], s["finished_before"], s["running"], s["space"], s["tmp"], s["ray_tmp"]
    )


@pytest.mark.slow
def test_driver_sigint_exits_130_and_marks_the_running_trial_unfinished(sigint_sweep):
    s = sigint_sweep
    df = s["after_interrupt"]
    assert df is not None
    row = df[df["trial_id"] == s["running"]]
    assert len(row) == 0 or row["status"].iloc[0] in ("running", "paused", "pending")
    assert "--resume" in s["first"].output
    assert s["rc_interrupted"] == 130
