"""The sweep driver as a real process: started in its own session, its output read line by line, killed.

Sweeps run `python sweeps/run_sweep.py` in its own session (process group) with its own RAY_TMPDIR, so a
test kills only the processes it started (os.killpg / the session's pids), never other Ray instances.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from sweeps.ray_compat import RAY_ENV_DEFAULTS

REPO = Path(__file__).resolve().parents[2]
RUN_SWEEP = REPO / "sweeps" / "run_sweep.py"
KILL_DURING_CHECKPOINT = REPO / "tests" / "scripts" / "kill_during_checkpoint.py"

DRIVER_TIMEOUT = 420  # seconds; generous, the machine is shared: tests assert behaviour, never time

# The driver's console lines: one per evaluation, one when a trial finishes, one when it errors.
REPORT_RE = re.compile(r"^\d\d:\d\d:\d\d (\w+) \| tokens\s+([\d,]+) \| val_loss (\S+)")
FINISHED_RE = re.compile(r"^\d\d:\d\d:\d\d (\w+) finished at ")
ERROR_RE = re.compile(r"^\d\d:\d\d:\d\d (\w+) ERROR ")


def child_env(ray_tmp: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update(RAY_ENV_DEFAULTS, PYTHONUNBUFFERED="1")
    if ray_tmp is not None:
        env["RAY_TMPDIR"] = str(ray_tmp)  # this driver's Ray session files (and nobody else's)
    return env


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


def trial_worker_pids(sid: int) -> list[int]:
    """Ray actor processes running a trial (process title 'ray::ImplicitFunc...') in the driver's session."""
    return [pid for pid in session_pids(sid) if cmdline(pid).startswith("ray::ImplicitFunc")]


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
