"""A trial that stops reporting (issue 14, item 8): the driver warns once per stall when a running trial has been
silent for much longer than its own interval between reports, and with `stall.timeout_s` fails it so that Ray
retries it from its checkpoint.

Fast tests: the `stall` settings (file, `--set`, bad values: one line, exit 2) and `sweeps.console.StallClock` on
a clock the test drives. Slow tests: a real sweep whose trial worker is SIGSTOPped (and SIGCONTed in cleanup).
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from support.experiment import (
    MAX_TOKENS,
    assert_same_losses_as_uninterrupted,
    make_space,
    read_results,
    restores,
    result_log,
    trial_dirs,
)
from support.processes import driver, sweep_args, trial_worker_pids

from sweeps.console import DRIVER_PAUSE_S, STALL_FACTOR, StallClock
from sweeps.ray_compat import trial_actor
from sweeps.space import SpaceError, load_space

# ---------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------


def test_stall_settings_default_to_warnings_only_and_take_set(small_corpus, tmp_path):
    space = make_space(tmp_path, small_corpus)
    spec = load_space(space)
    assert (spec.stall.warn_after_s, spec.stall.timeout_s) == (60.0, None)  # off by default: no trial is failed
    spec = load_space(space, ["stall.timeout_s=120", "stall.warn_after_s=null"])
    assert (spec.stall.warn_after_s, spec.stall.timeout_s) == (None, 120.0)
    assert load_space(make_space(tmp_path, small_corpus, stall={"timeout_s": 30})).stall.timeout_s == 30.0


@pytest.mark.parametrize(
    "setting, fragments",
    [
        ("stall.timeout_s=0", ["stall.timeout_s", "positive"]),
        ("stall.warn_after_s=-1", ["stall.warn_after_s", "positive"]),
        ("stall.timeout_s=soon", ["stall.timeout_s", "soon"]),
        ("stall.timeout=5", ["stall", "timeout"]),
    ],
    ids=["zero-timeout", "negative-warning", "not-a-number", "unknown-key"],
)
def test_bad_stall_settings_are_one_line_before_ray(small_corpus, tmp_path, capsys, setting, fragments):
    with pytest.raises(SpaceError):
        load_space(make_space(tmp_path, small_corpus), [setting])
    from sweeps import run_sweep

    rc = run_sweep.main(["--space", str(tmp_path / "space.yaml"), "--set", setting, "--storage-path", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    assert all(f in err for f in fragments), err


# ---------------------------------------------------------------------------------------------------
# StallClock, on a clock the test drives
# ---------------------------------------------------------------------------------------------------


def reports(clock: StallClock, trial: str, times: list[float]) -> None:
    for t in times:
        clock.reported(trial, t)


def run_until(clock: StallClock, running: list[str], until: float) -> list[tuple[str, float, bool]]:
    """The driver's loop up to `until`: a check every 0.5 s (Ray's loop checks every ~0.1 s); what it found, as
    (trial, the time found, fail)."""
    now, found = clock.last_check or 0.0, []
    while now < until:
        now = min(now + 0.5, until)
        found += [(s.trial_id, now, s.fail) for s in clock.check(running, now)]
    return found


def test_warns_once_per_stall_measured_against_the_trials_own_interval():
    clock = StallClock(warn_after_s=10, timeout_s=None)
    clock.started("a", 0.0)
    clock.started("b", 0.0)
    run_until(clock, ["a", "b"], 4.0)
    reports(clock, "a", [5, 7, 9, 13])  # a: startup 5 s, longest interval 4 s -> stalled after 5 x 4 = 20 s
    reports(clock, "b", [5, 6, 7])  # b: interval 1 s -> after max(warn_after_s 10 s, 5 x 1 s) = 10 s
    # b's warning when it has been silent 10 s (at 17), a's at 20 s (at 33); each once.
    assert run_until(clock, ["a", "b"], 60.0) == [("b", 17.5, False), ("a", 33.5, False)]
    assert clock.reported("b", 60.0) == pytest.approx(53.0)  # the end of a warned stall is reported
    assert clock.reported("b", 61.0) is None
    assert run_until(clock, ["b"], 80.0) == [("b", 71.5, False)]  # a new stall of b, a new warning


def test_before_its_first_report_a_run_is_measured_against_the_slowest_start_seen():
    clock = StallClock(warn_after_s=1, timeout_s=None)
    clock.started("a", 0.0)
    assert run_until(clock, ["a"], 100.0) == []  # nothing to compare with yet: no warning (only timeout_s applies)
    clock.reported("a", 100.0)  # a took 100 s to its first report (data, compile)
    clock.started("b", 100.0)
    assert run_until(clock, ["b"], 100.0 + STALL_FACTOR * 100 + 1) == [("b", 600.5, False)]


def test_a_restarted_run_keeps_the_trials_interval_and_the_timeout_fails_once():
    clock = StallClock(warn_after_s=None, timeout_s=30)
    clock.started("a", 0.0)
    reports(clock, "a", [2, 3, 4])
    assert run_until(clock, ["a"], 40.0) == [("a", 34.5, True)]  # failed once; Ray restarts it
    clock.ended("a")
    clock.started("a", 40.0)
    assert run_until(clock, ["a"], 80.0) == [("a", 70.5, True)]  # the new run's own silence


def test_time_the_driver_itself_was_not_running_is_nobodys_silence():
    clock = StallClock(warn_after_s=5, timeout_s=20)
    clock.started("a", 0.0)
    reports(clock, "a", [1, 2])
    assert run_until(clock, ["a"], 3.0) == []  # silent 1 s
    # The driver's loop did not run for 100 s (suspended machine, blocked driver): nothing is failed for it.
    assert DRIVER_PAUSE_S < 100 and clock.check(["a"], 103.0) == []
    assert run_until(clock, ["a"], 110.0) == [("a", 107.5, False)]  # silent 1 s before + 4.5 s after: warned


def test_the_stall_watch_finds_a_trials_actor_where_ray_keeps_it():
    from ray.tune.experiment import Trial

    class Handle:  # what set_ray_actor calls on a real actor handle
        class get_auto_filled_metrics:
            @staticmethod
            def remote(**kwargs):
                return None

    trial = Trial("__fake", stub=True)
    assert trial_actor(trial) is None
    handle = Handle()
    trial.set_ray_actor(handle)
    assert trial_actor(trial) is handle


# ---------------------------------------------------------------------------------------------------
# A real sweep: the trial's worker SIGSTOPped
# ---------------------------------------------------------------------------------------------------

TRIAL_TOKENS = 3 * MAX_TOKENS  # one trial of 300 steps (30 evaluations, a few seconds): time to stop it mid-run
STALL_RE = re.compile(r"^\d\d:\d\d:\d\d (\w+) has reported nothing for (\d+) s")


def stall_lines(d) -> list[str]:
    return [line for line in list(d.lines) if STALL_RE.match(line)]


@contextmanager
def stopped_worker(d) -> Iterator[int]:
    """SIGSTOP the trial's worker after its third evaluation; SIGCONT it at the end, whatever happened."""
    d.wait_until(lambda: len(d.reports()) >= 3, "three evaluations")
    (pid,) = d.wait_until(lambda: trial_worker_pids(d.sid), "the trial's worker process")
    os.kill(pid, signal.SIGSTOP)
    try:
        yield pid
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_a_stopped_worker_is_warned_about_once_and_the_trial_goes_on_when_it_continues(small_corpus, tmp_path, ray_tmp):
    space = make_space(
        tmp_path, small_corpus, num_samples=1, stop={"max_tokens": TRIAL_TOKENS}, stall={"warn_after_s": 3}
    )
    store = tmp_path / "store"
    with driver(sweep_args(space, "warned", store), ray_tmp, tmp_path) as d:
        with stopped_worker(d):
            assert not d.finished(), "the trial ended before its worker was stopped"
            d.wait_until(lambda: stall_lines(d), "a stall warning", timeout=60)
            time.sleep(3)  # still stopped: no second warning for the same stall
        assert d.wait() == 0, d.output[-6000:]
    (warning,) = stall_lines(d)
    assert "stalled?" in warning and "set stall.timeout_s to fail and retry stalled trials" in warning, warning
    assert int(STALL_RE.match(warning).group(2)) >= 3
    assert any(re.search(r" reports again after \d+ s of silence$", line) for line in d.lines), d.output
    df = read_results(store / "warned")
    assert df["status"][0] == "completed" and df["tokens_seen"][0] == TRIAL_TOKENS
    assert restores(result_log(next(iter(trial_dirs(store / "warned").values())))) == []  # only warned


@pytest.mark.slow
def test_with_a_stall_timeout_the_stopped_trial_is_failed_and_retried_from_its_checkpoint(
    small_corpus, tmp_path, ray_tmp
):
    space = make_space(
        tmp_path,
        small_corpus,
        num_samples=1,
        stop={"max_tokens": TRIAL_TOKENS},
        stall={"warn_after_s": 2, "timeout_s": 6},
    )
    store = tmp_path / "store"
    with driver(sweep_args(space, "timeout", store), ray_tmp, tmp_path) as d:
        with stopped_worker(d):
            d.wait_until(lambda: any("over stall.timeout_s (6 s): failing it" in ln for ln in d.lines), "the fail")
        assert d.wait() == 0, d.output[-6000:]
    lines = stall_lines(d)
    assert len(lines) == 2 and "stalled? stall.timeout_s (6 s) fails and retries it" in lines[0], d.output
    assert "Ray retries it from its last checkpoint (max_failures 2)" in lines[1]
    df = read_results(store / "timeout")
    assert len(df) == 1 and df["status"][0] == "completed" and df["tokens_seen"][0] == TRIAL_TOKENS
    trial_dir = next(iter(trial_dirs(store / "timeout").values()))
    records = result_log(trial_dir)
    after = restores(records)
    assert len(after) == 1 and records[after[0]]["step"] > 10  # from its checkpoint, not from scratch
    assert_same_losses_as_uninterrupted(trial_dir, space, tmp_path)
