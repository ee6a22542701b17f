"""Reliability (issue 5): what happens when things go wrong, done for real (processes, signals, files).

- the sweep driver SIGKILLed or interrupted (SIGINT) mid-sweep, then `--resume`d;
- a trial's worker process SIGKILLed mid-training (retried from its last checkpoint, same losses);
- a trial that diverges and trials that raise (recorded, the sweep goes on, exit code 1);
- a process killed in the middle of a checkpoint write; truncated and foreign checkpoints;
- how many checkpoints a trial keeps in storage (checkpoint.num_to_keep);
- bad input of every kind (exit 2 before Ray starts, one line naming file and field);
- determinism (same config and seed: same losses; same sweep seed: same Optuna suggestions).

Sweeps run `python sweeps/run_sweep.py` in its own session (process group) with its own RAY_TMPDIR, so a
test kills only the processes it started (os.killpg / the session's pids), never other Ray instances.
Everything runs on CPU with a tiny model (context 32, d_model 32, 2 layers, batch 8).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from lm.checkpoint import read_checkpoint, save_training_state
from lm.config import Config
from lm.train import main as train_main
from lm.train import train

REPO = Path(__file__).resolve().parent.parent
RUN_SWEEP = REPO / "sweeps" / "run_sweep.py"
KILL_DURING_CHECKPOINT = REPO / "tests" / "scripts" / "kill_during_checkpoint.py"

slow = pytest.mark.slow

# One trial: 100 steps of 8 x 32 = 256 tokens, an evaluation (and a Ray checkpoint) every 10 steps.
TOKENS_PER_STEP = 8 * 32
MAX_TOKENS = 100 * TOKENS_PER_STEP
EVAL_TOKENS = 10 * TOKENS_PER_STEP
FIRST_EVAL_STEP = 10
NUM_TO_KEEP = 2
DRIVER_TIMEOUT = 420  # seconds; generous, the machine is shared: tests assert behaviour, never time

REPORT_RE = re.compile(r"^\d\d:\d\d:\d\d (\w+) \| tokens\s+([\d,]+) \| val_loss (\S+)")
FINISHED_RE = re.compile(r"^\d\d:\d\d:\d\d (\w+) finished at ")
ERROR_RE = re.compile(r"^\d\d:\d\d:\d\d (\w+) ERROR ")


# ---------------------------------------------------------------------------------------------------
# Files: base config and search spaces
# ---------------------------------------------------------------------------------------------------


def base_config_dict(corpus: Path, **train: Any) -> dict[str, Any]:
    return {
        "model": {
            "vocab_size": 257,
            "context_length": 32,
            "d_model": 32,
            "num_layers": 2,
            "num_heads": 2,
            "d_ff": 64,
        },
        "optimizer": {"lr": 3.0e-3},
        "data": {
            "train_path": str(corpus / "train.npy"),
            "val_path": str(corpus / "val.npy"),
            "batch_size": 8,
            "val_windows": 16,
        },
        "train": {
            "max_tokens": MAX_TOKENS,
            "eval_interval_tokens": EVAL_TOKENS,
            "log_interval": 10,
            "device": "cpu",
            "num_threads": 1,
            "progress": "off",
            "tensorboard": False,
            **train,
        },
    }


def write_yaml(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def seq_space(base: Path, **overrides: Any) -> dict[str, Any]:
    """Optuna (seeded TPE), FIFO, three trials one at a time, ten evaluations each."""
    space = {
        "name": "rel",
        "base_config": str(base),
        "metric": {"name": "val_loss", "goal": "minimize"},
        "search": {"algorithm": "optuna", "sampler": "tpe", "seed": 0, "max_concurrent_trials": 1},
        "scheduler": {"type": "fifo"},
        "num_samples": 3,
        "resources_per_trial": {"cpu": 1, "gpu": 0},
        "stop": {"max_tokens": MAX_TOKENS, "divergence_loss": 10.0},
        "checkpoint": {"num_to_keep": NUM_TO_KEEP},
        "parameters": {"optimizer.lr": {"distribution": "log_uniform_values", "min": 1.0e-3, "max": 1.0e-2}},
    }
    space.update(overrides)
    return space


def make_space(tmp: Path, corpus: Path, **overrides: Any) -> Path:
    base = write_yaml(tmp / "base.yaml", base_config_dict(corpus, out_dir=str(tmp / "unused_run")))
    return write_yaml(tmp / "space.yaml", seq_space(base, **overrides))


# ---------------------------------------------------------------------------------------------------
# Processes: the sweep driver in its own session
# ---------------------------------------------------------------------------------------------------


def child_env(ray_tmp: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update(
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONUNBUFFERED="1",
        TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S="0",
    )
    if ray_tmp is not None:
        env["RAY_TMPDIR"] = str(ray_tmp)  # this driver's Ray session files (and nobody else's)
    return env


@pytest.fixture
def ray_tmp() -> Iterator[Path]:
    """A short private RAY_TMPDIR (Ray's unix socket paths must stay under ~107 characters)."""
    path = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def session_pids(sid: int) -> list[int]:
    """Live (non-zombie) processes of session `sid`: the driver and everything Ray started under it."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state ppid pgrp session ...
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


def wait_session_empty(sid: int, timeout: float = 30) -> list[int]:
    """Wait for the processes of session `sid` to end; return those still alive after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while (left := session_pids(sid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


class Driver:
    """`python sweeps/run_sweep.py ...` in a new session, its output collected line by line."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path):
        self.args = args
        self.proc = subprocess.Popen(
            [sys.executable, str(RUN_SWEEP), *args],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        self.sid = self.proc.pid  # start_new_session: the driver leads its own session and process group
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def reports(self) -> list[tuple[str, int]]:
        """(trial id, tokens) of every per-evaluation line so far."""
        out = []
        for line in list(self.lines):
            m = REPORT_RE.match(line)
            if m:
                out.append((m.group(1), int(m.group(2).replace(",", ""))))
        return out

    def finished(self) -> list[str]:
        return [m.group(1) for line in list(self.lines) if (m := FINISHED_RE.match(line))]

    def errored(self) -> list[str]:
        return [m.group(1) for line in list(self.lines) if (m := ERROR_RE.match(line))]

    def wait_until(self, condition: Callable[[], Any], what: str, timeout: float = DRIVER_TIMEOUT) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            if self.proc.poll() is not None:
                self._reader.join(5)
                value = condition()
                if value:
                    return value
                pytest.fail(f"driver exited ({self.proc.returncode}) before: {what}\n{self.output[-6000:]}")
            time.sleep(0.02)
        pytest.fail(f"timed out waiting for: {what}\n{self.output[-6000:]}")

    def signal_group(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)

    def wait(self, timeout: float = DRIVER_TIMEOUT) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_all()
            pytest.fail(f"driver did not finish in {timeout} s\n{self.output[-6000:]}")
        self._reader.join(10)
        return rc

    def kill_all(self) -> None:
        """SIGKILL the driver's process group and any process left in its session; wait until none lives."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            left = session_pids(self.sid)
            if not left:
                break
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self._reader.join(5)


@contextmanager
def driver(args: list[str], ray_tmp: Path, cwd: Path) -> Iterator[Driver]:
    d = Driver(args, child_env(ray_tmp), cwd)
    try:
        yield d
    finally:
        d.kill_all()  # always: whatever happened, nothing of this driver's Ray instance survives the test


def sweep_args(space: Path | None, name: str, store: Path, *extra: str) -> list[str]:
    args = ["--name", name, "--storage-path", str(store), "--num-cpus", "2", *extra]
    return (["--space", str(space)] if space is not None else []) + args


# ---------------------------------------------------------------------------------------------------
# Reading a sweep back: trial directories, Ray's per-trial result log, results.csv, train.log
# ---------------------------------------------------------------------------------------------------


TRIAL_DIR_RE = re.compile(r"^train_trial_([0-9a-f]+(?:_\d{5})?)_(\d+)_")  # Optuna: 1a2b3c4d; grid: 1a2b3_00000


def trial_dirs(exp_dir: Path) -> dict[str, Path]:
    """trial id -> trial directory in storage (train_trial_<id>_<number>_<params>_<date>)."""
    return {m.group(1): p for p in exp_dir.glob("train_trial_*") if (m := TRIAL_DIR_RE.match(p.name)) and p.is_dir()}


def trial_number(trial_dir: Path) -> int:
    m = TRIAL_DIR_RE.match(trial_dir.name)
    assert m, trial_dir
    return int(m.group(2))


def result_log(trial_dir: Path) -> list[dict[str, Any]]:
    """Every result Ray recorded for the trial (result.json: one JSON object per report, across restores)."""
    path = trial_dir / "result.json"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def restores(records: list[dict[str, Any]]) -> list[int]:
    """Indices of the first report after each restore (Ray resets iterations_since_restore to 1 there)."""
    return [i for i, r in enumerate(records) if i > 0 and r.get("iterations_since_restore") == 1]


def train_logs(trial_dir_name: str, exp_dir: Path, ray_tmp: Path) -> list[Path]:
    """The trial's run/train.log wherever Ray put the trial's working directory (storage or session dir)."""
    found = list((exp_dir / trial_dir_name / "run").glob("train.log"))
    found += ray_tmp.glob(f"ray/session_*/artifacts/*/*/*/{glob_escape(trial_dir_name)}/run/train.log")
    return found


def glob_escape(name: str) -> str:
    return re.sub(r"([\[\]*?])", r"[\1]", name)


def resumed_steps(logs: list[Path]) -> list[int]:
    steps = []
    for log in logs:
        steps += [int(s) for s in re.findall(r"resumed at step (\d+)", log.read_text())]
    return steps


def read_results(exp_dir: Path) -> pd.DataFrame:
    return pd.read_csv(exp_dir / "results.csv").sort_values("trial_number").reset_index(drop=True)


def reference_evals(space: Path, sampled: dict[str, Any], out_dir: Path) -> dict[int, float]:
    """val loss by step of the trial's config trained directly by lm.train (never killed, CPU, 1 thread)."""
    from sweeps.space import load_space

    config = (
        load_space(space)
        .trial_config(sampled)
        .replace(
            {
                "train.device": "cpu",
                "train.num_threads": 1,
                "train.out_dir": str(out_dir),
                "train.progress": "off",
                "train.tensorboard": False,
            }
        )
    )
    evals: dict[int, float] = {}
    threads = torch.get_num_threads()
    try:
        train(config, reporter=lambda metrics, _ckpt: evals.__setitem__(metrics["step"], metrics["val_loss"]))
    finally:
        torch.set_num_threads(threads)
    return evals


def assert_same_losses_as_uninterrupted(trial_dir: Path, space: Path, tmp: Path) -> None:
    """Every val loss the trial reported (before and after its restart) equals a clean run's, bitwise."""
    sampled = json.loads((trial_dir / "params.json").read_text())
    expected = reference_evals(space, sampled, tmp / f"reference_{trial_dir.name[:40]}")
    reported = [(r["step"], r["val_loss"]) for r in result_log(trial_dir)]
    assert [step for step, _ in reported if step not in expected] == []
    mismatched = [(step, loss, expected[step]) for step, loss in reported if loss != expected[step]]
    assert mismatched == [], "val losses differ from the uninterrupted run (step, reported, expected)"
    assert max(step for step, _ in reported) == max(expected)


# ---------------------------------------------------------------------------------------------------
# 1. The driver killed (SIGKILL) or interrupted (SIGINT) mid-sweep, then --resume
# ---------------------------------------------------------------------------------------------------


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


@slow
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


@slow
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


@slow
def test_driver_sigint_mid_sweep_then_resume_finishes_it(sigint_sweep):
    s = sigint_sweep
    assert s["rc_interrupted"] in (0, 130), s["first"].output[-4000:]  # ended by itself, no traceback
    assert "Traceback" not in s["first"].output
    assert s["left_running"] == [], "processes of the interrupted driver's Ray instance still running"
    assert s["rc_resumed"] == 0, s["resumed"].output[-6000:]
    _assert_resumed_sweep(
        s["exp_dir"], s["resumed"], s["finished_before"], s["running"], s["space"], s["tmp"], s["ray_tmp"]
    )


@slow
def test_driver_sigint_exits_130_and_marks_the_running_trial_unfinished(sigint_sweep):
    s = sigint_sweep
    df = s["after_interrupt"]
    assert df is not None
    row = df[df["trial_id"] == s["running"]]
    assert len(row) == 0 or row["status"].iloc[0] in ("running", "paused", "pending")
    assert "--resume" in s["first"].output
    assert s["rc_interrupted"] == 130


# ---------------------------------------------------------------------------------------------------
# 2. A trial's worker process SIGKILLed mid-training
# ---------------------------------------------------------------------------------------------------


def trial_worker_pids(sid: int) -> list[int]:
    """Ray actor processes running a trial (process title 'ray::ImplicitFunc...') in the driver's session."""
    return [pid for pid in session_pids(sid) if cmdline(pid).startswith("ray::ImplicitFunc")]


@slow
def test_worker_sigkill_retries_trial_from_checkpoint_with_identical_losses(small_corpus, tmp_path, ray_tmp):
    # One trial of 200 steps (20 evaluations); max_failures is the default (2).
    space = make_space(tmp_path, small_corpus, num_samples=1, stop={"max_tokens": 2 * MAX_TOKENS})
    store = tmp_path / "store"
    with driver(sweep_args(space, "worker", store), ray_tmp, tmp_path) as d:
        d.wait_until(lambda: len(d.reports()) >= 3, "three evaluations")
        workers = d.wait_until(lambda: trial_worker_pids(d.sid), "the trial's worker process")
        assert len(workers) == 1, [cmdline(p) for p in workers]
        killed_after = len(d.reports())
        os.kill(workers[0], signal.SIGKILL)
        assert d.wait() == 0, d.output[-6000:]
    exp_dir = store / "worker"
    df = read_results(exp_dir)
    assert len(df) == 1 and df["status"][0] == "completed" and df["tokens_seen"][0] == 2 * MAX_TOKENS
    trial_dir = next(iter(trial_dirs(exp_dir).values()))
    records = result_log(trial_dir)
    after = restores(records)
    assert len(after) == 1, "the trial was not restarted exactly once"
    restart_step = records[after[0]]["step"]
    assert FIRST_EVAL_STEP < restart_step <= (killed_after + 2) * FIRST_EVAL_STEP  # from a checkpoint, not 0
    steps = resumed_steps(train_logs(trial_dir.name, exp_dir, ray_tmp))
    assert steps and steps[-1] == restart_step - FIRST_EVAL_STEP
    assert_same_losses_as_uninterrupted(trial_dir, space, tmp_path)


# ---------------------------------------------------------------------------------------------------
# 3 + 4. A trial that diverges and trials that raise, in one grid sweep under ASHA
# ---------------------------------------------------------------------------------------------------


@slow
def test_diverging_and_raising_trials_are_recorded_and_the_sweep_goes_on(small_corpus, tmp_path, ray_tmp):
    # Grid (one trial at a time, in this order): lr 50 / vocab 257 diverges; lr 50 / vocab 128 and
    # lr 3e-3 / vocab 128 raise at trial time (the data's token ids do not fit a 128-token vocabulary: the
    # values are valid configs, so the pre-flight check passes); lr 3e-3 / vocab 257 is healthy.
    space = make_space(
        tmp_path,
        small_corpus,
        search={"algorithm": "grid", "seed": 0, "max_concurrent_trials": 1},
        scheduler={
            "type": "asha",
            "time_attr": "tokens_seen",
            "grace_period": EVAL_TOKENS,
            "reduction_factor": 2,
        },
        num_samples=1,
        max_failures=0,  # with the default (2) each raising trial is retried twice more, to the same error
        parameters={
            "optimizer.lr": {"values": [50.0, 3.0e-3]},
            "model.vocab_size": {"values": [257, 128]},
            "optimizer.grad_clip": {"value": None},
        },
    )
    store = tmp_path / "store"
    with driver(sweep_args(space, "faults", store), ray_tmp, tmp_path) as d:
        rc = d.wait()
    exp_dir = store / "faults"
    assert rc == 1, d.output[-6000:]  # some trials errored
    df = read_results(exp_dir)
    assert len(df) == 4
    by_config = {(row["optimizer.lr"], row["model.vocab_size"]): row for _, row in df.iterrows()}
    diverged, healthy = by_config[(50.0, 257)], by_config[(3.0e-3, 257)]
    errors = [by_config[(50.0, 128)], by_config[(3.0e-3, 128)]]

    # The diverged trial stopped itself, with its step, and is not an error.
    assert diverged["status"] == "diverged" and diverged["diverged"]
    assert 0 < diverged["diverged_step"] < MAX_TOKENS // TOKENS_PER_STEP
    assert pd.isna(diverged["error"])
    # It reported the ceiling (stop.divergence_loss) as its loss, worse than anything a healthy trial reports,
    # so ASHA ranks it last: the healthy trial that came after it at the same rungs ran to the end.
    history = pd.read_parquet(exp_dir / "history.parquet")
    div_hist = history[history["trial_id"] == diverged["trial_id"]]
    assert div_hist["val_loss"].iloc[-1] == 10.0
    assert (history[history["trial_id"] != diverged["trial_id"]]["val_loss"] < 10.0).all()
    assert healthy["status"] == "completed" and healthy["tokens_seen"] == MAX_TOKENS
    assert healthy["trial_number"] > diverged["trial_number"]
    # The raising trials are recorded with their message; the others finished.
    for row in errors:
        assert row["status"] == "error"
        assert "vocab_size" in row["error"] and "128" in row["error"], row["error"]
    assert set(d.errored()) == {row["trial_id"] for row in errors}
    assert errors[0]["trial_number"] < healthy["trial_number"]  # the sweep went on after an error
    summary = (exp_dir / "summary.md").read_text()
    assert "## Errors" in summary and "## Diverged" in summary
    for row in errors:
        assert f"`{row['trial_id']}`: {row['error']}" in summary
    assert f"`{diverged['trial_id']}` at step {int(diverged['diverged_step'])}" in summary
    # The best trial is the healthy one.
    best = yaml.safe_load((exp_dir / "best" / "config.yaml").read_text())
    assert best["optimizer"]["lr"] == 3.0e-3 and best["model"]["vocab_size"] == 257


# ---------------------------------------------------------------------------------------------------
# 5. A checkpoint write interrupted; truncated and foreign checkpoints
# ---------------------------------------------------------------------------------------------------


def eval_losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["val_loss"] for r in rows if r["kind"] == "eval"}


def test_checkpoint_write_killed_midway_keeps_previous_which_resumes(make_config, tmp_path):
    # 40 steps, an evaluation and a periodic checkpoint every 10; the process dies writing step 30's.
    config = make_config({"train.device": "cpu", "train.num_threads": 1, "train.keep_checkpoints": 2})
    cfg_file = write_yaml(tmp_path / "run.yaml", config.to_dict())
    run_dir = Path(config.train.out_dir)
    proc = subprocess.run(
        [sys.executable, str(KILL_DURING_CHECKPOINT), str(cfg_file), "step_0000030.pt"],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    ckpt_dir = run_dir / "checkpoints"
    assert not (ckpt_dir / "step_0000030.pt").exists()  # never a truncated file under the real name
    leftovers = list(ckpt_dir.glob(".step_0000030.pt.*.tmp"))
    assert len(leftovers) == 1  # the half-written temporary file stays behind (harmless, not cleaned up)
    previous = read_checkpoint(ckpt_dir / "step_0000020.pt")  # intact
    assert previous["iteration"] == 20 and previous["tokens_seen"] == 20 * TOKENS_PER_STEP

    resumed = subprocess.run(
        [
            sys.executable,
            "-m",
            "lm.train",
            "--config",
            str(cfg_file),
            "--resume-from",
            str(ckpt_dir / "step_0000020.pt"),
            "--train.out_dir",
            str(tmp_path / "resumed"),
        ],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed at step 20" in (tmp_path / "resumed" / "train.log").read_text()
    reference = tmp_path / "reference"
    threads = torch.get_num_threads()
    try:
        train(config.replace({"train.out_dir": str(reference)}))
    finally:
        torch.set_num_threads(threads)
    expected = eval_losses(reference)
    assert eval_losses(tmp_path / "resumed") == {30: expected[30], 40: expected[40]}  # bitwise


def _checkpoint_file(make_config, tmp_path: Path) -> tuple[Config, Path]:
    config = make_config({"train.max_tokens": 10 * TOKENS_PER_STEP, "train.device": "cpu"})
    train(config)
    return config, Path(config.train.out_dir) / "checkpoints" / "final.pt"


def test_truncated_or_foreign_checkpoint_fails_with_one_line_exit_2(make_config, tmp_path, capsys):
    config, good = _checkpoint_file(make_config, tmp_path)
    cfg_file = write_yaml(tmp_path / "run.yaml", config.to_dict())
    data = good.read_bytes()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "truncated.pt").write_bytes(data[: len(data) // 2])
    (bad / "text.pt").write_text("not a checkpoint\n")
    (bad / "empty.pt").write_bytes(b"")
    torch.save(torch.zeros(3), bad / "tensor.pt")
    torch.save({"weights": torch.zeros(3)}, bad / "dict.pt")
    other = read_checkpoint(good)
    other["model"] = {k: torch.cat([v, v]) for k, v in other["model"].items()}  # another model's shapes
    save_training_state(other, bad / "other_model.pt")

    # The real command line, for a truncated file (config from the checkpoint) and a foreign one (--config).
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "lm.train", *args],
            cwd=REPO,
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=600,
        )

    with ThreadPoolExecutor(2) as pool:
        runs = {
            "truncated.pt": pool.submit(cli, "--resume-from", str(bad / "truncated.pt")),
            "text.pt": pool.submit(cli, "--config", str(cfg_file), "--resume-from", str(bad / "text.pt")),
        }
        for name, future in runs.items():
            proc = future.result()
            assert proc.returncode == 2, (name, proc.stderr)
            assert proc.stderr.count("\n") == 1 and str(bad / name) in proc.stderr, proc.stderr
            assert "Traceback" not in proc.stderr
    # The other cases through the same entry point, in-process.
    for name in ("empty.pt", "tensor.pt", "dict.pt", "other_model.pt", "missing.pt"):
        for args in (
            ["--resume-from", str(bad / name)],
            ["--config", str(cfg_file), "--resume-from", str(bad / name)],
        ):
            rc = train_main(args)
            err = capsys.readouterr().err
            assert rc == 2, (name, args, err)
            assert err.count("\n") == 1 and err.startswith("error: ") and str(bad / name) in err, err


# ---------------------------------------------------------------------------------------------------
# 6. Disk: checkpoint.num_to_keep; and determinism of a sweep (the same two sweeps serve both)
# ---------------------------------------------------------------------------------------------------


class CheckpointSampler(threading.Thread):
    """Counts the checkpoint_* directories of every trial directory under exp_dir while a sweep runs."""

    def __init__(self, exp_dir: Path):
        super().__init__(daemon=True)
        self.exp_dir, self.stop, self.max_seen, self.samples = exp_dir, threading.Event(), {}, 0

    def run(self) -> None:
        while not self.stop.is_set():
            for trial_id, path in trial_dirs(self.exp_dir).items() if self.exp_dir.exists() else []:
                try:
                    n = sum(1 for p in path.iterdir() if p.name.startswith("checkpoint_"))
                except OSError:
                    continue
                self.max_seen[trial_id] = max(n, self.max_seen.get(trial_id, 0))
            self.samples += 1
            time.sleep(0.005)


@pytest.fixture(scope="module")
def twin_sweeps(small_corpus, tmp_path_factory) -> Iterator[dict[str, Any]]:
    """The same sweep (same seed; FIFO; one trial at a time) run twice, concurrently, under two names."""
    tmp = tmp_path_factory.mktemp("twins")
    space = make_space(tmp, small_corpus)
    store = tmp / "store"
    ray_tmps = [Path(tempfile.mkdtemp(prefix="rt", dir="/tmp")) for _ in range(2)]
    sampler = CheckpointSampler(store / "a")
    try:
        with (
            driver(sweep_args(space, "a", store), ray_tmps[0], tmp) as a,
            driver(sweep_args(space, "b", store), ray_tmps[1], tmp) as b,
        ):
            sampler.start()
            rcs = (a.wait(), b.wait())
            sampler.stop.set()
            sampler.join()
        assert rcs == (0, 0), a.output[-3000:] + b.output[-3000:]
        yield dict(space=space, a=store / "a", b=store / "b", sampler=sampler)
    finally:
        sampler.stop.set()
        for path in ray_tmps:
            shutil.rmtree(path, ignore_errors=True)


@slow
def test_same_sweep_seed_gives_same_suggestions_in_order(twin_sweeps):
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


@slow
def test_num_to_keep_bounds_ray_checkpoints_per_trial(twin_sweeps):
    # Ray 2.60 keeps the num_to_keep best checkpoints plus the latest one (for resume): num_to_keep + 1.
    sampler, exp_dir = twin_sweeps["sampler"], twin_sweeps["a"]
    assert sampler.samples > 10 and len(sampler.max_seen) == 3  # sampled while the trials ran
    assert max(sampler.max_seen.values()) <= NUM_TO_KEEP + 1, sampler.max_seen
    for path in trial_dirs(exp_dir).values():
        kept = sorted(p for p in path.iterdir() if p.name.startswith("checkpoint_"))
        assert 1 <= len(kept) <= NUM_TO_KEEP + 1
        records = result_log(path)
        assert len(records) == 10  # ten evaluations, ten Ray checkpoints reported
        by_dir = {r["checkpoint_dir_name"]: r["val_loss"] for r in records}
        best = sorted(by_dir, key=by_dir.get)[:NUM_TO_KEEP]
        assert set(best) | {records[-1]["checkpoint_dir_name"]} == {p.name for p in kept}


@slow
def test_trial_dirs_in_storage_hold_their_logs_and_bounded_checkpoints(twin_sweeps):
    problems = []
    for trial_id, path in sorted(trial_dirs(twin_sweeps["a"]).items(), key=lambda item: trial_number(item[1])):
        periodic = list(path.rglob("step_*.pt"))  # lm.train's own periodic checkpoints (keep_checkpoints: 2)
        if len(periodic) > 2:
            problems.append(f"{trial_id}: {len(periodic)} step_*.pt files in storage")
        if not (path / "run" / "train.log").is_file():
            problems.append(f"{trial_id}: no run/train.log in storage")
    assert problems == []


# ---------------------------------------------------------------------------------------------------
# Bad input: one table, one subprocess per case
# ---------------------------------------------------------------------------------------------------


def _bad_input_cases(tmp: Path, corpus: Path) -> list[tuple[str, list[str], list[str]]]:
    """(case, run_sweep arguments, strings its one-line error must contain: the file, then the field)."""

    def lr(**spec: Any) -> dict[str, Any]:
        return {"parameters": {"optimizer.lr": spec}}

    def base(section: str, **fields: Any) -> dict[str, Any]:
        config = base_config_dict(corpus, out_dir=str(tmp / "unused"))
        config[section].update(fields)
        return config

    npy = "train.npy"
    # case: (space overrides, base config or None, (train file name, writer) or None, expected strings)
    table: dict[str, tuple[dict, dict | None, tuple | None, list[str]]] = {
        "unknown_top_key": ({"epochs": 3}, None, None, ["unknown top-level key 'epochs'"]),
        "unknown_param_key": (
            lr(distribution="uniform", min=1e-3, max=1e-2, step=1),
            None,
            None,
            ["parameters.optimizer.lr.step", "unknown key"],
        ),
        "unknown_config_field": (
            {"parameters": {"optimizer.learning_rate": {"value": 0.01}}},
            None,
            None,
            ["parameters.optimizer.learning_rate", "not a config field"],
        ),
        "wrong_type_setting": ({"num_samples": "many"}, None, None, ["num_samples", "integer", "'many'"]),
        "wrong_type_value": (
            {"parameters": {"data.batch_size": {"values": [8, "big"]}}},
            None,
            None,
            ["parameters.data.batch_size.values", "integer", "'big'"],
        ),
        "bad_distribution": (
            lr(distribution="gaussian", min=1e-3, max=1e-2),
            None,
            None,
            ["parameters.optimizer.lr.distribution", "gaussian"],
        ),
        "min_above_max": (
            lr(distribution="log_uniform_values", min=0.1, max=0.01),
            None,
            None,
            ["parameters.optimizer.lr", "min < max"],
        ),
        "value_gives_invalid_config": (
            {"parameters": {"optimizer.warmup_iters": {"values": [5, 500]}}},
            None,
            None,
            ["parameters.optimizer.warmup_iters", "500"],
        ),
        "base_config_missing": (
            {"base_config": str(tmp / "nope.yaml")},
            None,
            None,
            ["base_config", "nope.yaml", "not found"],
        ),
        "base_config_wrong_type": ({}, base("model", d_model="wide"), None, ["model.d_model", "'wide'"]),
        "train_file_missing": ({}, None, ("nothing.npy", None), ["data.train_path", "not found"]),
        "float_tokens": (
            {},
            None,
            (npy, lambda p: np.save(p, np.ones(1000, np.float32))),
            ["data.train_path", "float32"],
        ),
        "bin_without_dtype": (
            {},
            None,
            ("train.bin", lambda p: np.ones(1000, np.uint16).tofile(p)),
            ["data.train_path", "data.dtype"],
        ),
        "token_id_too_large": (
            {},
            None,
            (npy, lambda p: np.save(p, np.full(1000, 300, np.uint16))),
            ["data.train_path", "token id 300 >= model.vocab_size 257"],
        ),
        "shorter_than_context": (
            {},
            None,
            (npy, lambda p: np.save(p, np.ones(20, np.uint16))),
            ["data.train_path", "20 tokens", "context_length"],
        ),
        "meta_json_disagrees": (
            {},
            None,
            (
                npy,
                lambda p: (
                    np.save(p, np.ones(1000, np.uint16)),
                    (p.parent / "meta.json").write_text('{"vocab_size": 1000}'),
                ),
            ),
            ["vocab_size 1000", "model.vocab_size 257"],
        ),
    }
    cases = []
    for case, (overrides, base_dict, data, expect) in table.items():
        d = tmp / case
        config = base_dict or base_config_dict(corpus, out_dir=str(tmp / "unused"))
        names = None
        if data is not None:
            file, writer = data
            (d / "data").mkdir(parents=True)
            if writer is not None:
                writer(d / "data" / file)
            config["data"]["train_path"] = str(d / "data" / file)
            names = str(d / "data" / ("meta.json" if case == "meta_json_disagrees" else file))
        space = seq_space(write_yaml(d / "base.yaml", config))
        space["parameters"].update(overrides.get("parameters", {}))
        space.update({k: v for k, v in overrides.items() if k != "parameters"})
        path = write_yaml(d / "space.yaml", space)
        cases.append((case, ["--space", str(path), "--storage-path", str(d / "store")], [names or str(path), *expect]))

    malformed = tmp / "malformed_yaml" / "space.yaml"
    malformed.parent.mkdir(parents=True)
    malformed.write_text("name: x\nparameters: {optimizer.lr: [1, 2\n")
    cases.append(
        (
            "malformed_yaml",
            ["--space", str(malformed), "--storage-path", str(tmp / "store")],
            [str(malformed), "malformed YAML", "line"],
        )
    )
    blocker = tmp / "a_file"
    blocker.write_text("a file where the storage directory should be")
    good_space = write_yaml(
        tmp / "good" / "space.yaml",
        seq_space(write_yaml(tmp / "good" / "base.yaml", base_config_dict(corpus))),
    )
    cases.append(
        (
            "storage_not_writable",
            ["--space", str(good_space), "--storage-path", str(blocker / "store")],
            [str(blocker / "store"), "--storage-path", "not writable"],
        )
    )
    cases.append(
        (
            "resume_unknown_sweep",
            ["--resume", "--name", "ghost", "--storage-path", str(tmp / "store")],
            [str(tmp / "store" / "ghost"), "--resume", "ghost"],
        )
    )
    return cases


def _run_case(args: list[str], cwd: Path, ray_tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(RUN_SWEEP), *args],
        cwd=cwd,
        env=child_env(ray_tmp),
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_bad_input_fails_fast_with_one_line_and_exit_2(small_corpus, tmp_path):
    cases = _bad_input_cases(tmp_path / "cases", small_corpus)
    ray_tmp = tmp_path / "raytmp"  # must stay empty: no case may start Ray
    with ThreadPoolExecutor(4) as pool:
        runs = [(case, expect, pool.submit(_run_case, args, tmp_path, ray_tmp)) for case, args, expect in cases]
        failures = []
        for case, expect, future in runs:
            proc = future.result()
            err = proc.stderr
            problems = []
            if proc.returncode != 2:
                problems.append(f"exit {proc.returncode}")
            if err.count("\n") != 1 or not err.startswith("error: "):
                problems.append("not exactly one 'error: ' line")
            if "Traceback" in err:
                problems.append("traceback")
            problems += [f"missing {s!r}" for s in expect if s not in err]
            if problems:
                failures.append(f"{case}: {', '.join(problems)}\n  stderr: {err.strip()[-800:]}")
    assert not (ray_tmp / "ray").exists(), "a bad-input case started Ray"
    assert failures == [], "\n".join(failures)


def test_bad_input_with_debug_shows_the_traceback(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("name: x\nbogus: 1\n")
    proc = _run_case(
        ["--space", str(space), "--storage-path", str(tmp_path / "store"), "--debug"],
        tmp_path,
        tmp_path / "raytmp",
    )
    assert proc.returncode != 0
    assert "Traceback (most recent call last)" in proc.stderr
    assert "SpaceError" in proc.stderr and "unknown top-level key 'bogus'" in proc.stderr


# ---------------------------------------------------------------------------------------------------
# Determinism of training
# ---------------------------------------------------------------------------------------------------


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


@slow
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
