"""One driver per sweep: the driver holds an exclusive lock on its experiment directory while it runs.

A second driver of the same sweep (`--resume` while the first still runs) would restore Ray's state beside the
running one and corrupt it; it is refused in one line instead. The lock is `fcntl.flock` on a file in the
experiment directory: the kernel releases it when its process dies, SIGKILL included, so a crashed driver never
leaves a stale lock behind and `--resume` after a crash just works.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from lm.cli import InputError
from sweeps.layout import LOCK_FILE


class SweepRunningError(InputError):
    """Another live driver holds the sweep's lock (one-line message naming it)."""


@contextlib.contextmanager
def driver_lock(exp_dir: Path) -> Iterator[None]:
    """Hold the experiment directory's lock for the block (the directory is created if need be).

    Raises SweepRunningError when another process holds it.
    """
    exp_dir.mkdir(parents=True, exist_ok=True)
    with open(exp_dir / LOCK_FILE, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise SweepRunningError(
                f"{exp_dir}: this sweep is running (driver {holder} holds {LOCK_FILE}): "
                "wait for it to finish, or stop it (Ctrl-C) and then --resume"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
