"""Repeats (fast): each configuration trained with several seeds, in the space (seed axis, Ray's repeat index,
refused combinations) and in the results (config groups, mean ± std against a hand computation, best on the mean).
The real sweeps are in test_repeat_sweeps.py."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import pandas as pd
import pytest
import yaml

from lm.record import Key
from sweeps.ray_compat import TrialRecord
from sweeps.repeats import CONFIG_ID, SEED, TRIAL_INDEX, seed_axis
from sweeps.results import summary_markdown
from sweeps.space import SpaceError, load_space, param_space, parse_space
from sweeps.sweep import build_sweep


def space(**overrides):
    raw = {"name": "rep", "parameters": {"optimizer.lr": {"values": [1e-3, 3e-3]}}}
    raw.update(overrides)
    return parse_space(raw, "rep.yaml")


# ---------------------------------------------------------------------------------------------------
# The space
# ---------------------------------------------------------------------------------------------------


def test_grid_repeats_are_a_seed_axis_of_the_grid():
    spec = space(search={"algorithm": "grid"}, repeats=3)
    assert seed_axis(spec) == [0, 1, 2]
    assert param_space(spec)[SEED] == {"grid_search": [0, 1, 2]}
    assert (spec.expected_trials, spec.tune_num_samples) == (2 * 3, 1)


def test_grid_num_samples_above_one_means_repeats_with_other_seeds():
    spec = space(search={"algorithm": "grid"}, num_samples=2)
    assert (spec.repeats, spec.num_samples, spec.expected_trials) == (2, 1, 4)
    assert seed_axis(spec) == [0, 1]
    # Saved and read back (--resume reads the saved space): the same sweep.
    again = parse_space(spec.to_dict(), "saved.yaml")
    assert (again.repeats, again.num_samples, again.expected_trials) == (2, 1, 4)


def test_grid_runs_times_repeats_are_the_seeds_per_point():
    spec = space(search={"algorithm": "grid"}, num_samples=2, repeats=3)
    assert (spec.repeats, spec.num_samples, spec.expected_trials, seed_axis(spec)) == (6, 1, 12, list(range(6)))


def test_random_repeats_multiply_each_sample_and_start_at_a_constant_seed():
    spec = space(search={"algorithm": "random"}, num_samples=4, repeats=2)
    spec_params = {**spec.to_dict()["parameters"], SEED: {"value": 10}}
    spec = space(search={"algorithm": "random"}, num_samples=4, repeats=2, parameters=spec_params)
    assert seed_axis(spec) == [10, 11]
    assert (spec.expected_trials, spec.tune_num_samples) == (8, 4)  # Tune multiplies by the grid axis


def test_random_search_gives_each_sample_k_seeds_with_one_draw():
    """Tune's own variant generator as the sweep builds it: without constant_grid_search each seed of the axis
    would get its own random draw (no repeats at all)."""
    from sweeps.search import search_algorithm

    lr = {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2}
    spec = space(search={"algorithm": "random", "seed": 3}, num_samples=3, repeats=2, parameters={"optimizer.lr": lr})
    generator = search_algorithm(spec)
    generator.add_configurations(
        {"exp": {"run": lambda config: None, "config": param_space(spec), "num_samples": spec.tune_num_samples}}
    )
    configs = []
    while (trial := generator.next_trial()) is not None:
        configs.append(trial.config)
    assert len(configs) == spec.expected_trials == 6
    groups: dict[float, list[int]] = {}
    for config in configs:
        groups.setdefault(config["optimizer.lr"], []).append(config[SEED])
    assert sorted(groups.values()) == [[0, 1]] * 3


def test_optuna_repeats_go_through_rays_repeater_index():
    from ray.tune.search.repeater import TRIAL_INDEX as RAY_TRIAL_INDEX

    assert TRIAL_INDEX == RAY_TRIAL_INDEX
    spec = space(num_samples=3, repeats=2)
    assert seed_axis(spec) is None and SEED not in param_space(spec)
    assert (spec.expected_trials, spec.tune_num_samples) == (6, 6)
    seeds = [spec.trial_config({"optimizer.lr": 1e-3, TRIAL_INDEX: i}).train.seed for i in range(2)]
    assert seeds == [0, 1]


def test_repeat_index_counts_from_the_constant_seed():
    spec = space(repeats=2, parameters={"optimizer.lr": {"values": [1e-3]}, SEED: {"value": 7}})
    assert spec.trial_config({TRIAL_INDEX: 1}).train.seed == 8
    assert spec.trial_config({}).train.seed == 7


def test_seed_can_be_swept_as_a_parameter():
    spec = space(search={"algorithm": "grid"}, parameters={SEED: {"values": [3, 4]}})
    assert spec.swept_params == [SEED] and spec.expected_trials == 2
    assert [spec.trial_config({SEED: s}).train.seed for s in (3, 4)] == [3, 4]


def test_searcher_is_wrapped_in_a_repeater_only_under_optuna_with_repeats():
    from ray.tune.search import BasicVariantGenerator, Repeater

    from sweeps.search import search_algorithm

    assert isinstance(search_algorithm(space(repeats=2)), Repeater)
    assert search_algorithm(space(repeats=2)).repeat == 2
    assert not isinstance(search_algorithm(space()), Repeater)
    assert isinstance(search_algorithm(space(search={"algorithm": "random"}, repeats=2)), BasicVariantGenerator)


def test_repeater_groups_suggestions_forwards_the_leaders_curve_and_tells_the_mean():
    from sweeps.search import search_algorithm

    spec = space(num_samples=2, repeats=2)
    searcher = search_algorithm(spec)
    searcher.set_search_properties("val_loss", "min", param_space(spec))
    first, second = searcher.suggest("a"), searcher.suggest("b")
    assert first["optimizer.lr"] == second["optimizer.lr"] and (first[TRIAL_INDEX], second[TRIAL_INDEX]) == (0, 1)
    assert pickle.loads(pickle.dumps(searcher)).repeat == 2  # Ray pickles the searcher into tuner.pkl
    searcher.on_trial_result("a", {"val_loss": 3.5, Key.tokens_seen: 100})
    searcher.on_trial_result("b", {"val_loss": 9.0, Key.tokens_seen: 100})  # not the leader: the study skips it
    searcher.on_trial_complete("a", {"val_loss": 3.0})
    (trial,) = searcher.searcher._ot_study.trials
    assert trial.value is None and trial.intermediate_values == {100: 3.5}
    searcher.on_trial_complete("b", {"val_loss": 5.0})  # the group is complete: the searcher hears the mean
    (trial,) = searcher.searcher._ot_study.trials
    assert trial.value == 4.0


@pytest.mark.parametrize(
    "overrides, fragments",
    [
        ({"repeats": 0}, ["rep.yaml: repeats: expected a positive number, got 0"]),
        (
            {"repeats": 2, "parameters": {SEED: {"values": [0, 5]}}},
            ["rep.yaml: parameters.train.seed: expected a constant", "got [0, 5]"],
        ),
        ({"repeats": 2, "derived": {SEED: "1 + 2"}}, ["rep.yaml: derived.train.seed:", "repeats set train.seed"]),
    ],
)
def test_bad_repeats_are_one_line_errors(overrides, fragments):
    with pytest.raises(SpaceError) as info:
        space(**overrides)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_shipped_seeds_sweep_space_reads():
    spec = load_space(Path(__file__).resolve().parents[1] / "sweeps" / "search_spaces" / "seeds_sweep.yaml")
    assert spec.repeat_count >= 2 and spec.expected_trials == 3 * spec.repeat_count  # 3 learning rates


# ---------------------------------------------------------------------------------------------------
# Results: groups, mean ± std, best on the mean
# ---------------------------------------------------------------------------------------------------

# lr -> best val_loss of each seed's trial. Config 1e-3 holds the best single trial (3.0, a lucky seed) but config
# 3e-3 has the best mean; in config 1e-2 one trial errored (None).
LOSSES = {1e-3: [3.0, 4.0, 4.2], 3e-3: [3.2, 3.3, 3.4], 1e-2: [3.9, None, 4.1]}


def record(number: int, config: dict, best: float | None) -> TrialRecord:
    trial_id = f"t{number}"
    if best is None:
        return TrialRecord(trial_id, number, "ERROR", config, {}, None, "RuntimeError: boom", None, f"/x/{trial_id}")
    history = pd.DataFrame(
        {
            Key.val_loss: [best + 0.5, best],
            Key.tokens_seen: [100, 200],
            Key.final_eval: [False, True],
            Key.diverged: [False, False],
        }
    )
    last = history.iloc[-1].to_dict()
    return TrialRecord(trial_id, number, "TERMINATED", config, last, history, None, f"/x/{trial_id}/state.pt", "")


def grid_records() -> list[TrialRecord]:
    """As a grid sweep with repeats records them: the seed axis value in each trial's config."""
    records = []
    for lr, losses in LOSSES.items():
        for seed, best in enumerate(losses):
            records.append(record(len(records) + 1, {"optimizer.lr": lr, SEED: seed}, best))
    return records


META = {"name": "rep", "metric": "val_loss", "mode": "min", "swept": ["optimizer.lr"], "repeats": 3}


def hand_mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def test_results_group_trials_by_configuration_with_mean_std_and_n():
    sweep = build_sweep("/x", META, grid_records())
    df = sweep.dataframe
    assert df[CONFIG_ID].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert df[SEED].tolist() == [0, 1, 2] * 3
    table = sweep.by_config.set_index("optimizer.lr")
    for lr, losses in LOSSES.items():
        values = [v for v in losses if v is not None]
        mean, std = hand_mean_std(values)
        assert table.loc[lr, "n"] == len(values)
        assert table.loc[lr, "best_val_loss_mean"] == pytest.approx(mean, abs=1e-12)
        assert table.loc[lr, "best_val_loss_std"] == pytest.approx(std, abs=1e-12)
    assert sweep.by_config["optimizer.lr"].tolist() == [3e-3, 1e-3, 1e-2]  # best mean first


def test_best_is_the_best_seed_of_the_best_mean_not_the_best_single_trial():
    sweep = build_sweep("/x", META, grid_records())
    best_single = sweep.dataframe.sort_values("best_val_loss").iloc[0]
    assert best_single["optimizer.lr"] == 1e-3  # the lucky seed
    best = sweep.best_row
    assert best["optimizer.lr"] == 3e-3 and best[SEED] == 0 and best["best_val_loss"] == 3.2
    assert sweep.best_trial_id == best["trial_id"] == "t4"
    assert str(sweep.best_checkpoint) == "/x/t4/state.pt"  # best/, best_config and continue_best follow it


def test_summary_shows_mean_std_per_configuration_and_which_seed_is_best(tmp_path):
    sweep = build_sweep("/x", META, grid_records())
    text = summary_markdown(sweep, tmp_path)
    mean, std = hand_mean_std(LOSSES[3e-3])
    assert f"**{mean:.4f} ± {std:.4f}** over 3 seeds" in text
    assert "train.seed 0" in text and "`t4`" in text
    assert "## Configurations: val_loss mean ± std over seeds" in text
    assert f"{hand_mean_std([3.9, 4.1])[0]:.4f} ± {hand_mean_std([3.9, 4.1])[1]:.4f}" in text


def test_optuna_repeats_read_their_seed_from_rays_repeat_index():
    meta = {**META, "base_config": {"train": {"seed": 5}}}
    records = [
        record(i + 1, {"optimizer.lr": lr, TRIAL_INDEX: i % 3}, best)
        for i, (lr, best) in enumerate((lr, b) for lr, bs in LOSSES.items() for b in bs)
    ]
    sweep = build_sweep("/x", meta, records)
    assert sweep.dataframe[SEED].tolist() == [5, 6, 7] * 3
    assert sweep.best_row["optimizer.lr"] == 3e-3


def test_without_repeats_best_is_the_best_trial_as_before():
    records = [record(i + 1, {"optimizer.lr": lr}, b) for i, (lr, b) in enumerate([(1e-3, 3.5), (3e-3, 3.1)])]
    sweep = build_sweep("/x", {**META, "repeats": 1}, records)
    assert not sweep.has_repeats and SEED not in sweep.dataframe.columns
    assert sweep.best_trial_id == "t2"
    assert "mean ± std" not in summary_markdown(sweep, Path("/x"))


def test_seeds_sweep_yaml_is_valid_yaml_with_repeats():
    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "sweeps/search_spaces/seeds_sweep.yaml").read_text())
    assert raw["repeats"] >= 2


def test_a_swept_seed_groups_trials_as_repeats_do():
    meta = {**META, "swept": ["optimizer.lr", SEED], "repeats": 1}
    sweep = build_sweep("/x", meta, grid_records())
    assert sweep.has_repeats and sweep.dataframe[CONFIG_ID].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert SEED not in sweep.by_config.columns and sweep.best_trial_id == "t4"


def test_cli_refuses_a_swept_seed_with_repeats_in_one_line_with_exit_2(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "bad.yaml"
    raw = {"name": "bad", "repeats": 2, "parameters": {SEED: {"values": [0, 1]}, "optimizer.lr": {"value": 1e-3}}}
    path.write_text(yaml.safe_dump(raw))
    run_sweep = Path(__file__).resolve().parents[1] / "sweeps" / "run_sweep.py"
    proc = subprocess.run(
        [sys.executable, str(run_sweep), "--space", str(path), "--storage-path", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: parameters.train.seed: expected a constant")
    assert not (tmp_path / "bad").exists()


def test_a_resumed_sweep_keeps_its_groups(tmp_path):
    """Tune saves the wrappers' state (the Repeater's groups) beside the searcher's and restores both into the
    searcher the restored Tuner was built with: trials of a group started before the interruption still count."""
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.search_generator import SearchGenerator

    from sweeps.search import search_algorithm

    spec = space(num_samples=2, repeats=2)

    def generator() -> SearchGenerator:  # as make_tuner builds it (max_concurrent_trials: Tune's limiter)
        g = SearchGenerator(ConcurrencyLimiter(search_algorithm(spec), max_concurrent=2))
        g.set_search_properties("val_loss", "min", param_space(spec))
        return g

    before = generator()
    first, second = before.searcher.suggest("a"), before.searcher.suggest("b")
    before.save_to_dir(str(tmp_path), session_str="s")
    after = generator()
    after.restore_from_dir(str(tmp_path))
    after.searcher.on_trial_complete("a", {"val_loss": 3.0})
    after.searcher.on_trial_complete("b", {"val_loss": 5.0})
    assert [t.value for t in after.searcher.searcher.searcher._ot_study.trials] == [4.0]
    third = after.searcher.suggest("c")  # a new group: a new suggestion
    assert third[TRIAL_INDEX] == 0 and third["optimizer.lr"] != first["optimizer.lr"] == second["optimizer.lr"]
