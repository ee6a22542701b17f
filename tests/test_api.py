"""The Python API (a notebook's): `from sweeps import run_sweep, load_sweep`; `Sweep.load_best_model` and
`Sweep.continue_best` on the recorded experiment (real lm.train runs); one real sweep through `run_sweep`."""

from __future__ import annotations

import shutil

import pytest
import torch
from support.experiment import make_space
from support.recorded import record_experiment

from lm.checkpoint import read_checkpoint
from lm.model import TransformerLM
from sweeps import load_sweep, run_sweep
from sweeps.space import SpaceError


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, small_corpus):
    return record_experiment(tmp_path_factory.mktemp("recorded") / "exp", small_corpus)


def test_bad_input_raises_the_projects_error_with_the_cli_message(tmp_path):
    with pytest.raises(SpaceError, match="search space file not found"):
        run_sweep(tmp_path / "missing.yaml")
    with pytest.raises(SpaceError, match=r"stop: gives an invalid config: train.max_tokens"):
        run_sweep("lr_sweep.yaml", storage_path=tmp_path / "store", overrides={"stop.max_tokens": 10})
    assert not (tmp_path / "store" / "lr_sweep").exists()


def test_load_best_model_has_the_best_checkpoints_weights_in_eval_mode(recorded):
    sweep = load_sweep(recorded)
    model = sweep.load_best_model(device="cpu")
    assert isinstance(model, TransformerLM) and not model.training
    saved = read_checkpoint(sweep.best_checkpoint)["model"]
    state = model.state_dict()
    assert state.keys() == saved.keys()
    assert all(torch.equal(state[k], saved[k]) for k in saved)


def test_continue_best_trains_on_from_the_best_checkpoint(recorded, tmp_path):
    copy = tmp_path / "exp"
    shutil.copytree(recorded, copy)
    sweep = load_sweep(copy)
    summary = sweep.continue_best(max_tokens=8 * 32 * 50, overrides={"train.progress": "off"})
    assert summary.tokens_seen == 8 * 32 * 50 and summary.status == "completed"
    assert "resumed at step" in (copy / "best" / "continued" / "train.log").read_text()


@pytest.mark.slow
def test_run_sweep_runs_and_returns_the_sweep(small_corpus, tmp_path):
    space = make_space(tmp_path, small_corpus, num_samples=3)
    sweep = run_sweep(space, name="api", storage_path=tmp_path / "store", num_samples=2, num_cpus=2,
                      overrides={"search.seed": 1})  # fmt: skip
    assert len(sweep.dataframe) == 2 and set(sweep.dataframe["status"]) == {"completed"}
    again = load_sweep(tmp_path / "store" / "api")
    assert sweep.dataframe.equals(again.dataframe)
    assert again.meta["name"] == "api" and (tmp_path / "store" / "api" / "summary.md").is_file()
