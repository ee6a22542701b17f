"""A restarted trial whose checkpoint is damaged (issue 14, item 4): it resumes from the trial's newest checkpoint
that loads, says which file was damaged (in storage, not a private copy), or starts from scratch when none loads.

Fast tests: `sweeps.trainable.resume_state` on real checkpoint files in a trial directory laid out as Ray lays it
out in storage, through a local filesystem and through non-local pyarrow filesystems (a download, a store that
refuses listing). Slow tests: a real sweep whose trial worker is SIGKILLed after its latest checkpoint in storage
was truncated.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
from pathlib import Path

import pyarrow.fs
import pytest
import torch
from conftest import tiny_config
from ray import tune
from support.experiment import (
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
from support.processes import driver, sweep_args, trial_worker_pids

from lm.checkpoint import CheckpointError, read_checkpoint
from lm.train import train
from sweeps.layout import STATE_FILE
from sweeps.trainable import resume_state

# ---------------------------------------------------------------------------------------------------
# resume_state on real files
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def states(small_corpus, tmp_path_factory) -> list[Path]:
    """The training states of one tiny run at steps 10, 20 and 30 (trained once for the module)."""
    out = tmp_path_factory.mktemp("states")
    config = tiny_config(
        small_corpus,
        out / "run",
        {"train.max_tokens": 8 * 32 * 30, "train.keep_checkpoints": 3, "train.device": "cpu", "train.num_threads": 1},
    )
    threads = torch.get_num_threads()
    try:
        train(config)
    finally:
        torch.set_num_threads(threads)
    found = sorted((out / "run" / "checkpoints").glob("step_*.pt"))
    assert len(found) == 3
    return found


@pytest.fixture
def trial_dir(states, tmp_path) -> Path:
    """A trial directory in storage: checkpoint_000000..2/state.pt, the training states at steps 10, 20, 30."""
    trial = tmp_path / "store" / "sweep" / "train_trial_abc_00000"
    for i, state in enumerate(states):
        (trial / f"checkpoint_{i:06d}").mkdir(parents=True)
        shutil.copyfile(state, trial / f"checkpoint_{i:06d}" / STATE_FILE)
    (trial / "run").mkdir()  # not a checkpoint: never tried
    return trial


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def step_of(path: Path) -> int:
    return read_checkpoint(path)["iteration"]


def local(path: Path) -> tune.Checkpoint:
    return tune.Checkpoint(str(path), filesystem=pyarrow.fs.LocalFileSystem())


def test_a_checkpoint_that_loads_is_used_as_ray_named_it(trial_dir, tmp_path):
    dest = tmp_path / "copy.pt"
    assert resume_state(local(trial_dir / "checkpoint_000001"), dest) == (dest, None)
    assert step_of(dest) == 20  # Ray's choice, even with a newer one beside it


def test_damaged_named_checkpoint_falls_back_to_the_newest_that_loads(trial_dir, tmp_path):
    # Ray names checkpoint 1 (say, the state its last snapshot recorded) and it is truncated: 2 is newer and fine.
    damaged = trial_dir / "checkpoint_000001" / STATE_FILE
    truncate(damaged)
    dest = tmp_path / "copy.pt"
    path, note = resume_state(local(trial_dir / "checkpoint_000001"), dest)
    assert path == dest and step_of(dest) == 30
    assert note.startswith(f"{damaged}: not a readable checkpoint (truncated")
    assert note.endswith(f"resuming from {trial_dir / 'checkpoint_000002' / STATE_FILE} instead")
    assert str(dest) not in note and "\n" not in note


def test_damaged_newest_falls_back_to_an_older_one_skipping_other_damage(trial_dir, tmp_path):
    truncate(trial_dir / "checkpoint_000002" / STATE_FILE)
    (trial_dir / "checkpoint_000001" / STATE_FILE).write_bytes(b"")  # empty: also damaged
    dest = tmp_path / "copy.pt"
    path, note = resume_state(local(trial_dir / "checkpoint_000002"), dest)
    assert step_of(path) == 10
    assert f"{trial_dir / 'checkpoint_000002' / STATE_FILE}: not a readable checkpoint" in note
    assert f"resuming from {trial_dir / 'checkpoint_000000' / STATE_FILE} instead" in note
    assert "(also damaged: checkpoint_000001)" in note


def test_missing_state_file_counts_as_damage(trial_dir, tmp_path):
    (trial_dir / "checkpoint_000002" / STATE_FILE).unlink()  # a copy into storage that never got its file
    path, note = resume_state(local(trial_dir / "checkpoint_000002"), tmp_path / "copy.pt")
    assert step_of(path) == 20
    assert note.startswith(f"{trial_dir / 'checkpoint_000002' / STATE_FILE}: missing: resuming from ")


def test_no_checkpoint_left_that_loads_starts_from_scratch_with_one_line(trial_dir, tmp_path):
    for i in range(3):
        truncate(trial_dir / f"checkpoint_{i:06d}" / STATE_FILE)
    dest = tmp_path / "copy.pt"
    path, note = resume_state(local(trial_dir / "checkpoint_000002"), dest)
    assert path is None and not dest.exists()
    assert note.startswith(f"{trial_dir / 'checkpoint_000002' / STATE_FILE}: not a readable checkpoint")
    assert note.endswith(
        "and no other checkpoint of this trial loads (also damaged: checkpoint_000001, checkpoint_000000): "
        "starting the trial from scratch"
    )


def test_non_local_storage_is_read_through_its_filesystem_and_named_as_a_uri(trial_dir, tmp_path):
    # SubTreeFileSystem is not a LocalFileSystem: the states are downloaded as from s3://, and named by URI.
    store = trial_dir.parent.parent
    fs = pyarrow.fs.SubTreeFileSystem(str(store), pyarrow.fs.LocalFileSystem())
    truncate(trial_dir / "checkpoint_000002" / STATE_FILE)
    dest = tmp_path / "copy.pt"
    path, note = resume_state(tune.Checkpoint("sweep/train_trial_abc_00000/checkpoint_000002", filesystem=fs), dest)
    assert step_of(path) == 20
    assert note.startswith("subtree://sweep/train_trial_abc_00000/checkpoint_000002/state.pt: not a readable")
    assert note.endswith("resuming from subtree://sweep/train_trial_abc_00000/checkpoint_000001/state.pt instead")
    assert str(dest) not in note and str(store) not in note


class NoListing(pyarrow.fs.FSSpecHandler):
    """A store that serves files but refuses to list a directory (an S3 key with GetObject and no ListBucket)."""

    def get_file_info_selector(self, selector):
        raise PermissionError(f"listing {selector.base_dir} is not allowed")


def test_storage_that_cannot_be_listed_fails_as_before_naming_the_damaged_file(trial_dir, tmp_path):
    import fsspec

    fs = pyarrow.fs.PyFileSystem(NoListing(fsspec.filesystem("file")))
    truncate(trial_dir / "checkpoint_000002" / STATE_FILE)
    with pytest.raises(CheckpointError) as err:
        resume_state(tune.Checkpoint(str(trial_dir / "checkpoint_000002"), filesystem=fs), tmp_path / "copy.pt")
    message = str(err.value)
    assert f"{trial_dir / 'checkpoint_000002' / STATE_FILE}: not a readable checkpoint" in message
    assert "the trial's other checkpoints could not be listed" in message and "not allowed" in message
    assert str(tmp_path / "copy.pt") not in message and "\n" not in message


# ---------------------------------------------------------------------------------------------------
# A real sweep: the worker SIGKILLed after the checkpoint Ray names was truncated in storage
# ---------------------------------------------------------------------------------------------------

NOTE_RE = re.compile(r"^\d\d:\d\d:\d\d (\w+) damaged checkpoint: (.*)$")


def freeze_and_damage(d, exp_dir: Path, keep_oldest: bool) -> tuple[Path, list[Path], int | None]:
    """SIGSTOP the trial's worker, wait until the driver has taken every result it sent, truncate the state of
    every checkpoint of the trial in storage but the oldest (keep_oldest) or all of them, then SIGKILL the worker.

    Which checkpoint Ray names for the restart is not visible from outside (Ray registers a checkpoint in a second
    round trip to the worker, after the result): damaging all but the oldest makes sure it is a damaged one.
    Returns (trial directory, the damaged state files, the step of the state kept or None).
    """
    workers = d.wait_until(lambda: trial_worker_pids(d.sid), "the trial's worker process")
    assert len(workers) == 1
    os.kill(workers[0], signal.SIGSTOP)
    try:
        seen, settled = -1, time.monotonic()
        while time.monotonic() - settled < 2.0:  # no new result for 2 s: the driver has them all
            if len(d.reports()) != seen:
                seen, settled = len(d.reports()), time.monotonic()
            time.sleep(0.1)
        assert not d.finished(), "the trial ended before its worker was frozen"
        trial_dir = next(iter(trial_dirs(exp_dir).values()))
        states = sorted(trial_dir.glob(f"checkpoint_*/{STATE_FILE}"))
        assert len(states) >= 2, states
        kept_step = read_checkpoint(states[0])["iteration"] if keep_oldest else None
        damaged = states[1:] if keep_oldest else states
        for path in damaged:
            truncate(path)
    finally:
        os.kill(workers[0], signal.SIGKILL)
    return trial_dir, damaged, kept_step


TRIAL_TOKENS = 3 * MAX_TOKENS  # one trial of 300 steps (30 evaluations, a few seconds): time to freeze it mid-run


def long_space(tmp_path: Path, corpus: Path) -> Path:
    return make_space(tmp_path, corpus, num_samples=1, stop={"max_tokens": TRIAL_TOKENS})  # max_failures: 2


@pytest.mark.slow
def test_trial_whose_named_checkpoint_is_truncated_resumes_from_another_with_identical_losses(
    small_corpus, tmp_path, ray_tmp
):
    space, store = long_space(tmp_path, small_corpus), tmp_path / "store"
    with driver(sweep_args(space, "damaged", store), ray_tmp, tmp_path) as d:
        d.wait_until(lambda: len(d.reports()) >= 3, "three evaluations")
        trial_dir, damaged, kept_step = freeze_and_damage(d, store / "damaged", keep_oldest=True)
        assert d.wait() == 0, d.output[-6000:]
    df = read_results(store / "damaged")
    assert len(df) == 1 and df["status"][0] == "completed" and df["tokens_seen"][0] == TRIAL_TOKENS
    records = result_log(trial_dir)
    after = restores(records)
    assert len(after) == 1  # one retry was enough (it no longer loads the damaged state three times)

    # One line, on the console and in train.log, names the damaged file in storage and the one used instead.
    notes = [m.group(2) for line in d.lines if (m := NOTE_RE.match(line))]
    assert len(notes) == 1, d.output
    named = Path(notes[0].split(": ", 1)[0])
    assert named in damaged and notes[0].startswith(f"{named}: not a readable checkpoint (truncated")
    used = Path(re.search(r"resuming from (\S+) instead", notes[0]).group(1))
    assert used.parent.parent == trial_dir and used not in damaged
    logs = "".join(p.read_text() for p in train_logs(trial_dir.name, store / "damaged", ray_tmp))
    assert notes[0] in logs
    # It continued from the state kept, and trained on bit for bit.
    assert resumed_steps(train_logs(trial_dir.name, store / "damaged", ray_tmp))[-1] == kept_step
    assert records[after[0]]["step"] == kept_step + 10
    assert_same_losses_as_uninterrupted(trial_dir, space, tmp_path)


@pytest.mark.slow
def test_trial_with_every_checkpoint_truncated_starts_over_and_completes(small_corpus, tmp_path, ray_tmp):
    space, store = long_space(tmp_path, small_corpus), tmp_path / "store"
    with driver(sweep_args(space, "all", store), ray_tmp, tmp_path) as d:
        d.wait_until(lambda: len(d.reports()) >= 3, "three evaluations")
        trial_dir, damaged, _ = freeze_and_damage(d, store / "all", keep_oldest=False)
        assert d.wait() == 0, d.output[-6000:]
    df = read_results(store / "all")
    assert len(df) == 1 and df["status"][0] == "completed" and df["tokens_seen"][0] == TRIAL_TOKENS
    records = result_log(trial_dir)
    after = restores(records)
    assert len(after) == 1 and records[after[0]]["step"] == 10  # from the first step again
    notes = [m.group(2) for line in d.lines if (m := NOTE_RE.match(line))]
    assert len(notes) == 1 and notes[0].endswith("starting the trial from scratch"), d.output
    assert any(notes[0].startswith(f"{path}: not a readable checkpoint") for path in damaged)
    assert_same_losses_as_uninterrupted(trial_dir, space, tmp_path)  # the same config and seed: the same run
