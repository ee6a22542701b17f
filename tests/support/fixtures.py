"""Fixtures for the process tests, shared by several modules (tests/conftest.py registers this plugin)."""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support.experiment import make_space, trial_dirs
from support.processes import driver, sweep_args


@pytest.fixture
def ray_tmp() -> Iterator[Path]:
    """A short private RAY_TMPDIR (Ray's unix socket paths must stay under ~107 characters)."""
    path = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


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


# Session scope: the same two sweeps serve test_determinism (same seed, same suggestions) and test_faults
# (checkpoints kept on disk), run once however many of those tests are selected.
@pytest.fixture(scope="session")
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
