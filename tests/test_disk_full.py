"""A sweep's storage runs out of space (issue 14, item 7), on a real tmpfs.

Before start: the estimate of what a sweep writes (sweeps/disk.py) is checked against real checkpoints, and a
sweep that cannot fit is refused in one line before Ray starts. While it runs: Ray's copies into local storage
write whole files or none (a full tmpfs cannot cut a file short), and a sweep whose disk fills up (another writer
takes the space mid-sweep) stops with one line, exit 75, every file whole, and resumes once the tmpfs is grown.

Mounting a tmpfs needs root (or CAP_SYS_ADMIN): the tests that need one are skipped with the reason otherwise.
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

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
from support.processes import RUN_SWEEP, child_env, driver, sweep_args

from lm.checkpoint import CheckpointError, read_checkpoint
from lm.train import train
from sweeps import disk
from sweeps.space import load_space

MB = 1_000_000


def _mount(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {out.stderr.decode().strip()}")


def _umount(path: Path) -> None:
    subprocess.run(["umount", str(path)], capture_output=True)
    subprocess.run(["umount", "-l", str(path)], capture_output=True)  # still busy: detach it


@pytest.fixture
def small_tmpfs(tmp_path) -> Iterator[Path]:
    path = tmp_path / "disk"
    _mount(path, "1m")
    yield path
    _umount(path)


# ---------------------------------------------------------------------------------------------------
# The estimate, against real checkpoints
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d_model, layers", [(32, 2), (96, 3)])
def test_the_checkpoint_estimate_bounds_a_real_training_state_closely(make_config, d_model, layers):
    config = make_config(
        {"model.d_model": d_model, "model.d_ff": 2 * d_model, "model.num_layers": layers, "train.max_tokens": 2560}
    )
    train(config)
    sizes = [p.stat().st_size for p in (Path(config.train.out_dir) / "checkpoints").glob("*.pt")]
    assert sizes
    estimated = disk.checkpoint_bytes(config)
    assert max(sizes) <= estimated <= 1.1 * max(sizes) + 16_384, (estimated, sizes)


def test_the_estimate_takes_the_largest_model_the_space_samples(small_corpus, tmp_path):
    plain = disk.estimate(load_space(make_space(tmp_path / "plain", small_corpus)))
    wide_space = make_space(tmp_path / "wide", small_corpus, parameters={"model.d_model": {"values": [128, 32]}})
    wide = disk.estimate(load_space(wide_space))
    assert wide.checkpoint_bytes == disk.checkpoint_bytes(load_space(wide_space).trial_config({"model.d_model": 128}))
    assert wide.checkpoint_bytes > 5 * plain.checkpoint_bytes
    assert (plain.trials, plain.checkpoints_per_trial) == (3, 3)  # num_samples x (num_to_keep + the latest)


# ---------------------------------------------------------------------------------------------------
# Before start: refused in one line, before Ray
# ---------------------------------------------------------------------------------------------------


def test_a_sweep_that_cannot_fit_is_refused_in_one_line_before_ray(small_corpus, tmp_path, small_tmpfs, ray_tmp):
    space = make_space(tmp_path, small_corpus)
    proc = subprocess.run(
        [sys.executable, str(RUN_SWEEP), *sweep_args(space, "big", small_tmpfs)],
        capture_output=True,
        text=True,
        env=child_env(ray_tmp),
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert re.fullmatch(
        rf"error: {re.escape(str(small_tmpfs))}: --storage-path: about 1\.0 MB free, the sweep writes about "
        r"[\d.]+ MB \(3 trials x 3 checkpoints x 0\.\d MB \+ [\d.]+ MB of logs and results\): .*",
        lines[0],
    ), lines[0]
    assert not (small_tmpfs / "big").exists()
    assert not list(ray_tmp.iterdir()), "Ray started"


def test_a_model_no_disk_holds_is_refused_without_a_mount(small_corpus, tmp_path):
    space = make_space(tmp_path, small_corpus)
    spec = load_space(space, ["model.d_model=16384", "model.num_layers=96", "model.d_ff=65536", "model.num_heads=128"])
    with pytest.raises(disk.DiskSpaceError, match=r": --storage-path: about [\d,.]+ MB free, the sweep writes about"):
        disk.check_free_space(spec, str(tmp_path), tmp_path / "huge")
    assert disk.check_free_space(spec, "s3://bucket/sweeps", tmp_path / "huge") is None  # remote: not checked


def test_a_resumed_sweep_counts_what_it_has_written(small_corpus, tmp_path, capsys):
    spec = load_space(make_space(tmp_path, small_corpus))
    exp = tmp_path / "store" / "s"
    exp.mkdir(parents=True)
    (exp / "written.bin").write_bytes(b"x" * 2 * MB)
    disk.check_free_space(spec, str(tmp_path / "store"), exp, resume=True)
    assert "2.0 MB of it written" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------
# Whole files: Ray's copies into local storage, on a full tmpfs
# ---------------------------------------------------------------------------------------------------


def test_rays_copies_into_storage_are_whole_or_absent_on_a_full_disk(tmp_path, small_tmpfs):
    import pyarrow.fs
    from ray.train._internal import storage

    src = tmp_path / "staging"
    src.mkdir()
    (src / "experiment_state.json").write_bytes(b"n" * (2 * MB))  # twice the tmpfs
    dest = small_tmpfs / "exp"
    dest.mkdir()
    (dest / "experiment_state.json").write_text('{"old": "whole"}')
    fs = pyarrow.fs.LocalFileSystem()

    original = storage._pyarrow_fs_copy_files
    disk.atomic_storage_writes()
    try:
        with pytest.raises(OSError) as raised:
            storage._upload_to_fs_path(str(src), fs, str(dest))
        assert raised.value.errno == errno.ENOSPC
        assert json.loads((dest / "experiment_state.json").read_text()) == {"old": "whole"}
        assert sorted(p.name for p in dest.iterdir()) == ["experiment_state.json"]  # no temporary file left
        disk.atomic_storage_writes()  # idempotent: one replacement, not a chain
        assert storage._pyarrow_fs_copy_files.__name__ == "copy_files"
    finally:
        storage._pyarrow_fs_copy_files = original
        disk._disk_full.clear()
    # Ray's own copy cuts the old file short: what the replacement is for.
    with pytest.raises(OSError):
        storage._upload_to_fs_path(str(src), fs, str(dest))
    assert (dest / "experiment_state.json").stat().st_size < 2 * MB


def test_a_full_disk_is_recognised_through_the_errors_raised_from_it():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise RuntimeError("The Ray Tune run failed") from e
    except RuntimeError as e:
        assert disk.is_no_space(e)
    assert disk.is_no_space(OSError("[Errno 28] Error writing bytes to file. Detail: No space left on device"))
    assert not disk.is_no_space(OSError(errno.EACCES, "Permission denied"))
    assert not disk.is_no_space(None)


# ---------------------------------------------------------------------------------------------------
# A real sweep whose disk fills up mid-sweep, then resumed on the grown tmpfs
# ---------------------------------------------------------------------------------------------------


def _damage(path: Path) -> str | None:
    try:
        read_checkpoint(path)
    except CheckpointError as e:
        return str(e)
    return None


@pytest.fixture(scope="module")
def filled_sweep(small_corpus, tmp_path_factory) -> Iterator[dict]:
    """A three-trial sweep on a 12 MB tmpfs (its estimate: about 5 MB); after two reports another writer takes all
    but 200 KB of it (less than one checkpoint). Then a copy of the stopped sweep is resumed on a larger disk, and
    the original resumed in place once the tmpfs is grown to 64 MB."""
    import shutil
    import tempfile

    tmp = tmp_path_factory.mktemp("full")
    mount = tmp / "disk"
    _mount(mount, "12m")
    ray_tmps = [Path(tempfile.mkdtemp(prefix="rt", dir="/tmp")) for _ in range(3)]
    try:
        space = make_space(tmp, small_corpus)
        with driver(sweep_args(space, "full", mount), ray_tmps[0], tmp) as d:
            d.wait_until(lambda: len(d.reports()) >= 2, "two reports")
            filler = mount / f"other-writer-{uuid.uuid4().hex}"
            fd = os.open(filler, os.O_CREAT | os.O_WRONLY)
            try:
                os.posix_fallocate(fd, 0, shutil.disk_usage(mount).free - 200_000)
            finally:
                os.close(fd)
            first_rc = d.wait()
            first = d.output
        exp = mount / "full"
        states = {p.name: p.read_text() for p in exp.glob("experiment_state-*.json")}
        checkpoints = sorted(exp.glob("*/checkpoint_*/state.pt"))
        damaged = [problem for path in checkpoints if (problem := _damage(path))]
        leftovers = [p for p in exp.rglob(".*.tmp")]
        results_written = (exp / "results.csv").exists()
        # Moved to a larger disk (a copy: the original is resumed in place below), resumed from there.
        moved = tmp / "larger" / "full"
        shutil.copytree(exp, moved, symlinks=True, ignore=shutil.ignore_patterns(filler.name))
        with driver(sweep_args(None, "full", moved.parent, "--resume"), ray_tmps[1], tmp) as d:
            moved_rc = d.wait()
            moved_out = d.output
        subprocess.run(["mount", "-o", "remount,size=64m", str(mount)], check=True)
        with driver(sweep_args(None, "full", mount, "--resume"), ray_tmps[2], tmp) as d:
            resumed_rc = d.wait()
            resumed = d.output
        yield dict(
            space=space,
            tmp=tmp,
            exp=exp,
            first_rc=first_rc,
            first=first,
            states=states,
            checkpoints=checkpoints,
            damaged=damaged,
            leftovers=leftovers,
            results_written=results_written,
            resumed_rc=resumed_rc,
            moved=moved,
            moved_rc=moved_rc,
            moved_out=moved_out,
            resumed=resumed,
        )
    finally:
        _umount(mount)
        for path in ray_tmps:
            shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slow
def test_a_full_disk_stops_the_sweep_with_one_line_and_the_resume_command(filled_sweep):
    out = filled_sweep["first"]
    assert filled_sweep["first_rc"] == disk.DISK_FULL_EXIT, out[-4000:]
    assert "Traceback" not in out, out[-4000:]
    lines = out.splitlines()
    full = [i for i, line in enumerate(lines) if line.startswith("disk full:")]
    assert len(full) == 1, out[-4000:]
    assert f"{filled_sweep['exp'].parent}: " in lines[full[0]]
    assert lines[full[0] + 1].strip().endswith("--resume") and "--name full" in lines[full[0] + 1]
    assert not filled_sweep["results_written"]  # no room for results: written when the sweep completes


@pytest.mark.slow
def test_a_full_disk_leaves_every_file_in_storage_whole(filled_sweep):
    assert filled_sweep["states"], "no experiment state saved"
    for name, text in filled_sweep["states"].items():
        assert isinstance(json.loads(text)["trial_data"], list), name
    assert filled_sweep["checkpoints"]
    assert filled_sweep["damaged"] == []
    assert filled_sweep["leftovers"] == []


@pytest.mark.slow
def test_once_there_is_space_the_sweep_resumes_and_completes_as_if_never_stopped(filled_sweep):
    assert filled_sweep["resumed_rc"] == 0, filled_sweep["resumed"][-4000:]
    results = read_results(filled_sweep["exp"])
    assert len(results) == 3 and set(results["status"]) == {"completed"}
    assert set(results["tokens_seen"]) == {MAX_TOKENS}
    # The trial that was running when the disk filled continued from its checkpoint: every loss it reported,
    # before and after, equals an uninterrupted run's.
    continued = [p for p in trial_dirs(filled_sweep["exp"]).values() if restores(result_log(p))]
    assert continued, "no trial was resumed from a checkpoint"
    for trial_dir in continued:
        assert_same_losses_as_uninterrupted(trial_dir, filled_sweep["space"], filled_sweep["tmp"])


@pytest.mark.slow
def test_a_sweep_stopped_by_a_full_disk_resumes_after_moving_it_to_a_larger_disk(filled_sweep):
    assert filled_sweep["moved_rc"] == 0, filled_sweep["moved_out"][-4000:]
    results = read_results(filled_sweep["moved"])
    assert len(results) == 3 and set(results["status"]) == {"completed"}
    assert set(results["tokens_seen"]) == {MAX_TOKENS}
