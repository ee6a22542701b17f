"""Opening a sweep directory runs no code from it, and losing Ray's experiment state loses no results.

Reading results (load_sweep, inspect_sweep, continue_best) uses plain files only: Ray's per-trial JSON, the
driver's trial_status.jsonl and weights-only checkpoints. Every pickle Ray leaves in the directory is replaced
here by one that, if unpickled, writes a marker file; the marker must never appear.
"""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
from support.recorded import record_experiment

from sweeps import continue_best, inspect_sweep, run_sweep
from sweeps.results import write_results
from sweeps.space import load_space
from sweeps.sweep import load_sweep


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling it creates the marker file


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, small_corpus):
    return record_experiment(tmp_path_factory.mktemp("safety") / "exp", small_corpus)


def _tamper(exp_dir, marker):
    """Put a code-running pickle everywhere Ray keeps one: experiment state, searcher, tuner, each params.pkl."""
    blob = pickle.dumps(_Payload(marker))
    state = {"trial_data": [[json.dumps({"x": blob.hex()}), {"checkpoint_manager": {"value": blob.hex()}}]]}
    (exp_dir / "experiment_state-2026-01-01_00-00-00.json").write_text(json.dumps(state))
    for name in ("tuner.pkl", "searcher-state-2026-01-01_00-00-00.pkl"):
        (exp_dir / name).write_bytes(blob)
    for trial_dir in exp_dir.glob("train_trial_*"):
        (trial_dir / "params.pkl").write_bytes(blob)


def test_reading_a_tampered_sweep_runs_none_of_its_pickles(recorded, tmp_path, capsys):
    exp = shutil.copytree(recorded, tmp_path / "exp")
    marker = tmp_path / "PWNED"
    _tamper(exp, marker)
    sweep = load_sweep(exp)
    assert len(sweep.dataframe) == 4 and sweep.best_trial_id is not None
    assert inspect_sweep.main([str(exp)]) == 0
    assert continue_best.main([str(exp), "--train.max_tokens", str(8 * 32 * 44), "--train.progress", "off"]) == 0
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_lost_experiment_state_keeps_every_result(recorded, tmp_path, damage):
    exp = shutil.copytree(recorded, tmp_path / "exp")
    reference = write_results(load_sweep(recorded), tmp_path / "reference")
    if damage == "truncated":
        (exp / "experiment_state-2026-01-01_00-00-00.json").write_text('{"trial_data": [["abc", {"checkp')
    assert inspect_sweep.main([str(exp)]) == 0
    for name in ("results.csv", "summary.md"):
        got = (exp / name).read_text().replace(str(exp), "EXP")
        want = (reference / name).read_text().replace(str(recorded), "EXP").replace(str(reference), "EXP")
        assert got == want, name


@pytest.mark.parametrize("damage", ["missing", "truncated", "not a trial list"])
def test_resume_without_a_whole_experiment_state_is_one_line_before_ray(
    damage, small_corpus, tmp_path, monkeypatch, capsys
):
    from support.experiment import make_space

    store = tmp_path / "store"
    exp = store / "lost"
    run_sweep.save_spec(load_space(make_space(tmp_path, small_corpus)), exp, "lost", ["test"])
    state = exp / "experiment_state-2026-01-01_00-00-00.json"
    if damage == "truncated":
        state.write_text('{"trial_data": [["abc", {"checkp')
    elif damage == "not a trial list":
        state.write_text('{"trial_data": 3}')
    monkeypatch.setattr(run_sweep, "start_ray", lambda *a, **k: pytest.fail("Ray must not start"))
    code = run_sweep.main(["--name", "lost", "--storage-path", str(store), "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "Ray's experiment state" in err[0] and ("missing" if damage == "missing" else "damaged") in err[0]
    assert "inspect_sweep.py" in err[0]
