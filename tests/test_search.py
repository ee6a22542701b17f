"""Tests for the search section, the Optuna study and its searcher (sweeps/search.py, sweeps/study.py,
sweeps/study_search.py) without running a sweep: samplers and their options, the start-up rule, named starting
points, intermediate values on the tokens clock, restores, warm-start trials read from a sweep's plain files,
and every refusal as one line before Ray starts. Real sweeps: tests/test_search_sweeps.py."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest
import yaml
from support.experiment import make_space

from lm.record import Key
from sweeps import search as search_module
from sweeps.search import START_ATTR, make_sampler, search_algorithm, start_name, startup_trials
from sweeps.space import SpaceError, load_space, param_space
from sweeps.study import StudyInputError, warm_trials

REPO = Path(__file__).resolve().parent.parent
LR_SWEEP = REPO / "sweeps" / "search_spaces" / "lr_sweep.yaml"
TWO_PARAMS = """
parameters:
  optimizer.lr: {distribution: log_uniform_values, min: 1.0e-4, max: 1.0e-1}
  optimizer.warmup_iters: {distribution: int_uniform, min: 1, max: 20}
  data.batch_size: {values: [8, 16]}
"""


def _space(tmp_path: Path, search: str, params: str = TWO_PARAMS, extra: str = "", name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(f"search: {search}\n{extra}" + textwrap.dedent(params))
    return path


# ---------------------------------------------------------------------------------------------------------
# Samplers and their options
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "search, cls, attrs",
    [
        ("{sampler: tpe, n_startup_trials: 4, multivariate: false}", "TPESampler", {"_n_startup_trials": 4}),
        ("{sampler: gp, n_startup_trials: 3}", "GPSampler", {"_n_startup_trials": 3}),
        ("{sampler: cmaes}", "CmaEsSampler", {"_n_startup_trials": 1}),
        ("{sampler: qmc, qmc_type: halton}", "QMCSampler", {"_qmc_type": "halton", "_scramble": True}),
        ("{sampler: random}", "RandomSampler", {}),
    ],
)
def test_each_sampler_is_built_with_its_options(tmp_path, search, cls, attrs):
    spec = load_space(_space(tmp_path, search))
    sampler = make_sampler(spec)
    assert type(sampler).__name__ == cls
    for attr, value in attrs.items():
        assert getattr(sampler, attr) == value, attr
    if cls == "TPESampler":
        assert sampler._multivariate is False


@pytest.mark.parametrize("num_samples, expected", [(3, 2), (8, 2), (9, 3), (12, 4), (30, 10), (100, 10)])
def test_default_startup_rule_leaves_trials_for_the_model(tmp_path, num_samples, expected):
    spec = load_space(_space(tmp_path, "{sampler: tpe}", extra=f"num_samples: {num_samples}\n"))
    assert startup_trials(spec.search, spec.num_samples) == expected == min(10, max(2, num_samples // 3))
    assert make_sampler(spec)._n_startup_trials == expected


def test_the_demo_space_leaves_most_trials_to_tpe():
    """The shipped demo: Optuna's own default (10 random trials) would make all 8 trials random draws."""
    spec = load_space(LR_SWEEP)
    assert spec.search.sampler == "tpe"
    assert startup_trials(spec.search, spec.num_samples) <= spec.num_samples // 3


# ---------------------------------------------------------------------------------------------------------
# Bad search sections: one line naming the file and the key
# ---------------------------------------------------------------------------------------------------------

ONE_NUMERIC = """
parameters:
  optimizer.lr: {distribution: uniform, min: 0.001, max: 0.01}
  data.batch_size: {values: [8, 16]}
"""

BAD_SEARCH = {
    "option-of-another-sampler": ("{sampler: cmaes, multivariate: true}", TWO_PARAMS, ["search.multivariate", "tpe"]),
    "multivariate-with-gp": ("{sampler: gp, multivariate: true}", TWO_PARAMS, ["search.multivariate", "tpe"]),
    "qmc-type-with-random": ("{sampler: random, qmc_type: sobol}", TWO_PARAMS, ["search.qmc_type", "qmc"]),
    "negative-startup": ("{sampler: tpe, n_startup_trials: -1}", TWO_PARAMS, ["search.n_startup_trials", ">= 0"]),
    "unknown-qmc-type": ("{sampler: qmc, qmc_type: lattice}", TWO_PARAMS, ["search.qmc_type", "sobol"]),
    "unknown-sampler": ("{sampler: bohb}", TWO_PARAMS, ["search.sampler", "tpe"]),
    "cmaes-one-numeric": ("{sampler: cmaes}", ONE_NUMERIC, ["search.sampler", "two numeric", "cmaes with 1"]),
    "option-under-random": ("{algorithm: random, n_startup_trials: 3}", TWO_PARAMS, ["search.n_startup_trials"]),
    "points-under-grid": (
        "{algorithm: grid, points_to_evaluate: {a: {data.batch_size: 8}}}",
        TWO_PARAMS.replace("distribution: log_uniform_values, min: 1.0e-4, max: 1.0e-1", "value: 0.001").replace(
            "distribution: int_uniform, min: 1, max: 20", "value: 5"
        ),
        ["search.points_to_evaluate", "algorithm grid"],
    ),
    "point-unknown-path": (
        "{points_to_evaluate: {cs336: {optimizer.beta1: 0.9}}}",
        TWO_PARAMS,
        ["search.points_to_evaluate.cs336.optimizer.beta1", "a swept parameter"],
    ),
    "point-outside-range": (
        "{points_to_evaluate: {cs336: {optimizer.lr: 0.5}}}",
        TWO_PARAMS,
        ["search.points_to_evaluate.cs336.optimizer.lr", "[0.0001, 0.1]", "0.5"],
    ),
    "point-not-a-choice": (
        "{points_to_evaluate: {big: {data.batch_size: 32}}}",
        TWO_PARAMS,
        ["search.points_to_evaluate.big.data.batch_size", "one of [8, 16]", "32"],
    ),
    "point-not-a-number": (
        "{points_to_evaluate: {x: {optimizer.warmup_iters: many}}}",
        TWO_PARAMS,
        ["search.points_to_evaluate.x.optimizer.warmup_iters", "a number"],
    ),
    "point-empty": ("{points_to_evaluate: {x: {}}}", TWO_PARAMS, ["search.points_to_evaluate.x", "a mapping"]),
    "storage-not-a-url": ("{storage: my_db}", TWO_PARAMS, ["search.storage", "RDB URL"]),
    "storage-in-memory": ("{storage: 'sqlite://'}", TWO_PARAMS, ["search.storage", "not an in-memory"]),
    "storage-missing-dir": ("{storage: 'sqlite:////no/such/dir/o.db'}", TWO_PARAMS, ["search.storage", "/no/such"]),
}


@pytest.mark.parametrize("case", list(BAD_SEARCH))
def test_bad_search_section_is_one_line_naming_file_and_key(tmp_path, case):
    search, params, fragments = BAD_SEARCH[case]
    path = _space(tmp_path, search, params)
    with pytest.raises(SpaceError) as e:
        load_space(path)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{path}: "), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_a_missing_sampler_package_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(search_module.SAMPLER_PACKAGES, "cmaes", "cmaes_is_not_installed_here")
    with pytest.raises(SpaceError) as e:
        load_space(_space(tmp_path, "{sampler: cmaes}"))
    assert "cmaes_is_not_installed_here" in str(e.value) and 'pip install -e ".[search]"' in str(e.value)


def test_points_are_converted_and_a_sqlite_path_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = load_space(
        _space(
            tmp_path,
            "{storage: 'sqlite:///o.db', points_to_evaluate: "
            "{cs336: {optimizer.lr: 1e-3, data.batch_size: '16'}, short: {optimizer.warmup_iters: 2.0}}}",
        )
    )
    assert spec.search.points_to_evaluate == {
        "cs336": {"optimizer.lr": 1.0e-3, "data.batch_size": 16},
        "short": {"optimizer.warmup_iters": 2},
    }
    assert spec.search.storage == f"sqlite:///{tmp_path / 'o.db'}"
    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump(spec.to_dict()))
    assert load_space(again).search == spec.search  # what --resume reads back


# ---------------------------------------------------------------------------------------------------------
# The searcher on its study: suggestions, intermediate values, named starts, restores
# ---------------------------------------------------------------------------------------------------------


def _searcher(spec, storage: str | None = None, name: str = "s"):
    searcher = search_algorithm(spec, None, storage, name)
    searcher.set_search_properties(spec.metric.name, spec.metric.mode, param_space(spec))
    return searcher


def _distance(lr: float, best: float = 3e-4) -> float:
    """The fake objective: decades between lr and the best learning rate."""
    return abs(math.log10(lr) - math.log10(best))


def _run_fake(searcher, n: int) -> list[dict]:
    """n trials one after another, each told its fake objective at once."""
    suggestions = []
    for i in range(n):
        config = searcher.suggest(f"t{i}")
        suggestions.append(config)
        searcher.on_trial_complete(f"t{i}", {Key.val_loss: _distance(config["optimizer.lr"])})
    return suggestions


def test_tpe_after_startup_differs_from_random_and_moves_towards_the_optimum(tmp_path):
    """Same seed, same objective, told the same way. TPE's start-up trials are Optuna's RandomSampler draws with
    the seed, so both searches begin alike; after them TPE's suggestions are its own, and over six seeds they are
    nearer the optimum than random search's (the objective: decades from lr = 3e-4)."""
    params = "parameters:\n  optimizer.lr: {distribution: log_uniform_values, min: 1.0e-5, max: 1.0e-1}\n"
    startup = startup_trials(load_space(_space(tmp_path, "{sampler: tpe}", params, "num_samples: 16\n")).search, 16)
    assert startup == 5
    after = {"tpe": [], "random": []}
    for seed in range(6):
        lrs = {}
        for sampler in after:
            spec = load_space(_space(tmp_path, f"{{sampler: {sampler}, seed: {seed}}}", params, "num_samples: 16\n"))
            lrs[sampler] = [c["optimizer.lr"] for c in _run_fake(_searcher(spec), 16)]
            after[sampler] += lrs[sampler][startup:]
        assert lrs["tpe"][:startup] == lrs["random"][:startup]
        assert all(t != r for t, r in zip(lrs["tpe"][startup:], lrs["random"][startup:], strict=True))
    # Random search puts a quarter of its draws within half a decade of the optimum (1 of the range's 4 decades).
    near = {k: sum(_distance(lr) < 0.5 for lr in v) / len(v) for k, v in after.items()}
    assert near["tpe"] > 1.5 * near["random"], near


@pytest.mark.parametrize("sampler", ["gp", "cmaes", "qmc"])
def test_other_samplers_suggest_inside_the_space_from_a_stored_study(tmp_path, sampler):
    spec = load_space(_space(tmp_path, f"{{sampler: {sampler}}}", extra="num_samples: 6\n"))
    storage = f"sqlite:///{tmp_path / 'o.db'}"
    suggestions = _run_fake(_searcher(spec, storage), 6)
    for config in suggestions:
        assert 1e-4 <= config["optimizer.lr"] <= 1e-1 and 1 <= config["optimizer.warmup_iters"] <= 20
        assert config["data.batch_size"] in (8, 16)
    assert len({c["optimizer.lr"] for c in suggestions}) >= 3
    trials = optuna.load_study(study_name="s", storage=storage).trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 6


def test_intermediate_values_are_keyed_by_tokens_seen(tmp_path):
    spec = load_space(_space(tmp_path, "{sampler: tpe}"))
    storage = f"sqlite:///{tmp_path / 'o.db'}"
    searcher = _searcher(spec, storage)
    searcher.suggest("a")
    for i, tokens in enumerate((2560, 5120, 7680), start=1):
        searcher.on_trial_result("a", {Key.val_loss: 5.0 - i, Key.tokens_seen: tokens, "training_iteration": i})
    searcher.on_trial_complete("a", {Key.val_loss: 2.0, Key.tokens_seen: 7680})
    searcher.on_trial_result("a", {Key.val_loss: 1.0, Key.tokens_seen: 9000})  # after the end: ignored
    (trial,) = optuna.load_study(study_name="s", storage=storage).trials  # as another process would read it
    assert trial.intermediate_values == {2560: 4.0, 5120: 3.0, 7680: 2.0}
    assert trial.value == 2.0


def test_named_points_come_first_once_per_study(tmp_path):
    spec = load_space(
        _space(
            tmp_path,
            "{points_to_evaluate: {cs336: {optimizer.lr: 1.0e-3}, small_batch: {data.batch_size: 8, "
            "optimizer.lr: 3.0e-4, optimizer.warmup_iters: 4}}}",
        )
    )
    storage = f"sqlite:///{tmp_path / 'o.db'}"
    first, second = _run_fake(_searcher(spec, storage), 2)
    assert first["optimizer.lr"] == 1.0e-3
    assert second == {"optimizer.lr": 3.0e-4, "data.batch_size": 8, "optimizer.warmup_iters": 4}
    _searcher(spec, storage)  # set up again on the same study (a resume does this): nothing enqueued again
    trials = optuna.load_study(study_name="s", storage=storage).trials
    assert [t.user_attrs.get(START_ATTR) for t in trials] == ["cs336", "small_batch"]
    assert len(trials) == 2 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)


def test_restore_fails_trials_the_saved_state_does_not_know(tmp_path):
    spec = load_space(_space(tmp_path, "{sampler: tpe}"))
    storage = f"sqlite:///{tmp_path / 'o.db'}"
    searcher = _searcher(spec, storage)
    searcher.suggest("known")
    searcher.save(str(tmp_path / "searcher.pkl"))  # Ray's snapshot
    searcher.suggest("asked-after-the-snapshot")  # then the driver dies
    restored = _searcher(spec, storage)
    restored.restore(str(tmp_path / "searcher.pkl"))
    states = [t.state for t in optuna.load_study(study_name="s", storage=storage).trials]
    assert states == [optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.FAIL]
    restored.on_trial_complete("known", {Key.val_loss: 1.5})
    assert optuna.load_study(study_name="s", storage=storage).trials[0].value == 1.5


def test_start_names_in_results():
    meta = {"starts": {"a": {"optimizer.lr": 1e-3}, "b": {"optimizer.lr": 3e-4}}, "repeats": 1}
    assert start_name(meta, 1, {"optimizer.lr": 1e-3, "data.batch_size": 8}) == "a"
    assert start_name(meta, 2, {"optimizer.lr": 3e-4}) == "b"
    assert start_name(meta, 3, {"optimizer.lr": 3e-4}) is None  # a later trial that happens to match
    assert start_name(meta, 2, {"optimizer.lr": 5e-4}) is None


# ---------------------------------------------------------------------------------------------------------
# Warm start from a sweep's plain files
# ---------------------------------------------------------------------------------------------------------

WARM_PARAMS = "parameters:\n  optimizer.lr: {distribution: log_uniform_values, min: 1.0e-5, max: 1.0e-1}\n"


def _old_sweep(root: Path, lrs: list[float], metric: str = Key.val_loss, swept=("optimizer.lr",)) -> Path:
    """A finished sweep's directory as the driver and Ray leave it (sweep_meta.json, and per trial params.json and
    result.json), with val_loss = the fake objective at each of three evaluations (falling to it)."""
    root.mkdir(parents=True)
    (root / "sweep_meta.json").write_text(json.dumps({"name": "old", "metric": metric, "mode": "min", "swept": swept}))
    for number, lr in enumerate(lrs, start=1):
        trial = root / f"train_trial_{number:08x}_{number}_optimizer_lr={lr:.4g}_2026-12-03_10-00-00"
        trial.mkdir()
        (trial / "params.json").write_text(json.dumps({"optimizer.lr": lr}))
        rows = [
            {
                metric: _distance(lr) + 1.0 / i,
                Key.tokens_seen: 2560 * i,
                "training_iteration": i,
                "trial_id": trial.name,
            }
            for i in (1, 2, 3)
        ]
        rows[-1][Key.final_eval] = True
        (trial / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


OLD_LRS = [10 ** (-5 + 4 * k / 11) for k in range(12)]  # 1e-5 .. 1e-1, evenly in log space


def test_warm_started_searcher_starts_near_the_old_best(tmp_path):
    old = _old_sweep(tmp_path / "old", OLD_LRS)
    for seed in (0, 1, 2):
        spec = load_space(_space(tmp_path, f"{{sampler: tpe, seed: {seed}}}", WARM_PARAMS, "num_samples: 6\n"))
        trials, notes = warm_trials(old, spec)
        assert len(trials) == 12 and notes[0].startswith("warm start: 12 trials of")
        assert sorted(trials[0].intermediate_values) == [2560, 5120, 7680]
        warm_store, cold_store = (f"sqlite:///{tmp_path / f'{k}{seed}.db'}" for k in ("warm", "cold"))
        optuna.create_study(storage=warm_store, study_name="s").add_trials(trials)
        warm = _searcher(spec, warm_store).suggest("first")["optimizer.lr"]
        cold = _searcher(spec, cold_store).suggest("first")["optimizer.lr"]
        assert _distance(warm) < 0.75, (seed, warm)  # the old trials' best is 3e-4
        assert _distance(warm) < _distance(cold), (seed, warm, cold)


def test_warm_start_skips_old_trials_outside_a_narrowed_range(tmp_path):
    old = _old_sweep(tmp_path / "old", OLD_LRS)
    narrow = WARM_PARAMS.replace("min: 1.0e-5, max: 1.0e-1", "min: 1.0e-4, max: 1.0e-2")
    spec = load_space(_space(tmp_path, "{sampler: gp}", narrow))
    trials, notes = warm_trials(old, spec)
    inside = [lr for lr in OLD_LRS if 1e-4 <= lr <= 1e-2]
    assert sorted(t.params["optimizer.lr"] for t in trials) == pytest.approx(sorted(inside))
    assert len(notes) == 2 and notes[1].startswith(f"warm start: skipped {12 - len(inside)} trials outside")
    assert "1 (optimizer.lr=1e-05)" in notes[1]


@pytest.mark.parametrize(
    "search, old_kwargs, fragment",
    [
        ("{sampler: random}", {}, "search.sampler random ignores earlier trials"),
        ("{sampler: qmc}", {}, "search.sampler qmc ignores earlier trials"),
        ("{algorithm: random}", {}, "search.algorithm random ignores earlier trials"),
        ("{sampler: tpe}", {"metric": Key.train_loss}, "expected the same metric and goal"),
        ("{sampler: tpe}", {"swept": ("optimizer.lr", "data.batch_size")}, "expected the same swept parameters"),
        ("{sampler: tpe}", {"lrs": [0.5]}, "no trial there has a val_loss inside this sweep's space"),
    ],
)
def test_warm_start_refusals(tmp_path, search, old_kwargs, fragment):
    old = _old_sweep(tmp_path / "old", old_kwargs.pop("lrs", OLD_LRS[:3]), **old_kwargs)
    spec = load_space(_space(tmp_path, search, WARM_PARAMS.replace("1.0e-1", "0.2")))
    with pytest.raises(StudyInputError) as e:
        warm_trials(old, spec)
    assert str(e.value).startswith(f"--warm-start {old}: ") and fragment in str(e.value), str(e.value)


# ---------------------------------------------------------------------------------------------------------
# The driver refuses before Ray starts (in-process main, and the CLI as a process)
# ---------------------------------------------------------------------------------------------------------


def _saved_sweep(root: Path, space: Path, name: str, **sets) -> Path:
    """An experiment directory with the saved space of a sweep (all --resume reads before Ray starts)."""
    spec = load_space(space, [f"{k}={v}" for k, v in sets.items()])
    exp = root / name
    exp.mkdir(parents=True)
    (exp / "sweep_space.yaml").write_text(yaml.safe_dump({**spec.to_dict(), "name": name}, sort_keys=False))
    return exp


@pytest.fixture
def driver_cases(tmp_path, small_corpus):
    """A space on the small corpus, a storage with saved sweeps to resume, an old sweep, a used Optuna storage."""
    space = make_space(tmp_path, small_corpus)
    store = tmp_path / "store"
    _saved_sweep(store, space, "three")
    _saved_sweep(store, space, "rand", **{"search.algorithm": "random"})
    _old_sweep(tmp_path / "old", OLD_LRS[:4])
    (tmp_path / "not_a_sweep").mkdir()
    used = f"sqlite:///{tmp_path / 'used.db'}"
    optuna.create_study(storage=used, study_name="taken")
    return {"space": space, "store": store, "tmp": tmp_path, "used": used}


DRIVER_REFUSALS = {
    "extend-with-fewer": (["--resume", "--name", "three", "--num-samples", "2"], ["--num-samples 2", "at least", "3"]),
    "extend-random": (["--resume", "--name", "rand", "--num-samples", "5"], ["search.algorithm random", "extended"]),
    "warm-start-with-resume": (["--resume", "--name", "three", "--warm-start", "{old}"], ["--warm-start", "--resume"]),
    "warm-start-not-a-sweep": (["--warm-start", "{tmp}/not_a_sweep"], ["not_a_sweep", "not a sweep directory"]),
    "warm-start-missing": (["--warm-start", "{tmp}/missing"], ["missing", "not a sweep directory"]),
    "warm-start-uri": (["--warm-start", "s3://bucket/old"], ["s3://bucket/old", "a local sweep directory"]),
    "warm-start-random": (
        ["--warm-start", "{old}", "--set", "search.algorithm=random"],
        ["ignores earlier trials"],
    ),
    "study-name-taken": (["--name", "taken", "--set", "search.storage={used}"], ["a study named 'taken' exists"]),
    "storage-unreachable": (
        ["--name", "x", "--set", "search.storage=mysql://u@127.0.0.1:1/db"],
        ["search.storage: cannot open mysql://"],
    ),
}


@pytest.mark.parametrize("case", list(DRIVER_REFUSALS))
def test_driver_refuses_in_one_line_before_ray_starts(driver_cases, monkeypatch, capsys, case):
    from sweeps import run_sweep

    def no_ray(*a, **k):
        raise AssertionError("Ray must not start on bad input")

    monkeypatch.setattr(run_sweep, "start_ray", no_ray)
    args, fragments = DRIVER_REFUSALS[case]
    fill = {
        "{old}": str(driver_cases["tmp"] / "old"),
        "{tmp}": str(driver_cases["tmp"]),
        "{used}": driver_cases["used"],
    }
    argv = ["--space", str(driver_cases["space"]), "--storage-path", str(driver_cases["store"])]
    for arg in args:
        for key, value in fill.items():
            arg = arg.replace(key, value)
        argv.append(arg)
    assert run_sweep.main(argv) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    for fragment in fragments:
        assert fragment.replace("{tmp}", str(driver_cases["tmp"])) in lines[0], (fragment, lines[0])


@pytest.mark.parametrize("case", ["extend-with-fewer", "warm-start-not-a-sweep"])
def test_cli_process_refusals_exit_2(driver_cases, case):
    args, fragments = DRIVER_REFUSALS[case]
    args = [a.replace("{tmp}", str(driver_cases["tmp"])) for a in args]
    proc = subprocess.run(
        [sys.executable, str(REPO / "sweeps" / "run_sweep.py"), "--space", str(driver_cases["space"])]
        + ["--storage-path", str(driver_cases["store"]), *args],
        cwd=driver_cases["tmp"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and fragments[-1] in lines[0], proc.stderr
