"""sweeps.plots against a recorded experiment directory (real lm.train runs, no Ray)."""

from __future__ import annotations

import pytest
from support.recorded import record_experiment

from sweeps.plots import make_plots
from sweeps.ray_compat import read_trial_files
from sweeps.sweep import build_sweep, load_sweep
from sweeps.trial_status import read_status

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, small_corpus):
    return record_experiment(tmp_path_factory.mktemp("recorded") / "exp", small_corpus)


@pytest.mark.parametrize("metric", ["val_loss", "train_loss"])
def test_every_plot_is_a_png_named_for_what_it_holds(recorded, tmp_path, metric):
    sweep = load_sweep(recorded)
    sweep.meta["metric"] = metric  # the plots follow the sweep's metric (its best checkpoint does not matter here)
    sweep = build_sweep(recorded, sweep.meta, read_trial_files(recorded, metric, "min", read_status(recorded)))
    written = make_plots(sweep, tmp_path)
    assert sorted(p.name for p in written) == sorted(
        ["val_loss_vs_tokens.png", f"best_{metric}_vs_lr.png", "best_so_far.png", "best_so_far_vs_tokens.png"]
    )  # one swept parameter: no parallel coordinates
    for path in written:
        assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5_000


def test_two_swept_parameters_add_parallel_coordinates(recorded, tmp_path):
    sweep = load_sweep(recorded)
    sweep.meta["swept"] = ["optimizer.lr", "train.seed"]
    sweep.dataframe["train.seed"] = [0, 1, 2, 3]
    assert "parallel_coordinates.png" in {p.name for p in make_plots(sweep, tmp_path)}


def test_an_empty_sweep_writes_no_plot(recorded, tmp_path):
    assert make_plots(build_sweep(recorded, load_sweep(recorded).meta, []), tmp_path) == []
