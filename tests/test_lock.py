"""sweeps.lock: one driver per sweep; the lock of a killed driver is gone with it."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.experiment import make_space, read_results
from support.processes import driver, sweep_args

from sweeps import run_sweep
from sweeps.lock import SweepRunningError, driver_lock
from sweeps.space import load_space

ROOT = Path(__file__).resolve().parent.parent
HOLDER = """
import sys, time
from pathlib import Path
from sweeps.lock import driver_lock
with driver_lock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(600)
"""


def _hold(exp_dir: Path) -> subprocess.Popen:
    """Another process that takes the lock (as a running driver does) and keeps it."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(exp_dir)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_holder_is_refused_naming_the_first(tmp_path):
    holder = _hold(tmp_path / "exp")
    try:
        with pytest.raises(SweepRunningError, match=rf"this sweep is running \(driver pid {holder.pid} holds"):
            with driver_lock(tmp_path / "exp"):
                pass
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_of_a_sigkilled_driver_is_free_at_once(tmp_path):
    holder = _hold(tmp_path / "exp")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    start = time.monotonic()
    with driver_lock(tmp_path / "exp"):
        assert (tmp_path / "exp" / ".driver.lock").read_text().startswith("pid ")
    assert time.monotonic() - start < 5  # no stale-lock timeout to wait out


def test_resume_while_the_driver_runs_is_one_line_before_ray(small_corpus, tmp_path, monkeypatch, capsys):
    space = make_space(tmp_path, small_corpus)
    store = tmp_path / "store"
    run_sweep.save_spec(load_space(space), store / "busy", "busy", ["test"])
    monkeypatch.setattr(run_sweep, "start_ray", lambda *a, **k: pytest.fail("Ray must not start"))
    holder = _hold(store / "busy")
    try:
        code = run_sweep.main(["--name", "busy", "--storage-path", str(store), "--resume"])
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "this sweep is running" in err[0], err


@pytest.mark.slow
def test_resume_of_a_running_sweep_leaves_it_intact(small_corpus, tmp_path, ray_tmp):
    """The original driver keeps running and finishes every trial; the second one exits 2 at once."""
    space = make_space(tmp_path, small_corpus, num_samples=2)
    store = tmp_path / "store"
    with driver(sweep_args(space, "twice", store), ray_tmp, tmp_path) as first:
        first.wait_until(first.reports, "a first report")
        second = subprocess.run(
            [sys.executable, str(ROOT / "sweeps" / "run_sweep.py"), "--name", "twice", "--storage-path", str(store),
             "--resume"],
            capture_output=True, text=True, timeout=120, cwd=tmp_path,
        )  # fmt: skip
        assert first.wait() == 0, first.output[-4000:]
    assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
    assert "this sweep is running" in second.stderr
    df = read_results(store / "twice")
    assert len(df) == 2 and set(df["status"]) == {"completed"}, df[["trial_id", "status"]].to_string()
