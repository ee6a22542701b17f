"""The scheduler section (asha, hyperband, median, pbt, pb2, fifo) without a sweep: the Ray objects it builds, the
one-line refusals of what Ray would refuse (through the real CLI: exit 2, before Ray starts), PBT's perturbations
kept in range, the lineage records, and a training state continued under another config (what a PBT exploit does).

The real sweeps of every scheduler: tests/test_scheduler_sweeps.py (slow).
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow.fs
import pytest
from support.experiment import EVAL_TOKENS, MAX_TOKENS, TOKENS_PER_STEP, base_config_dict, seq_space, write_yaml
from support.processes import RUN_SWEEP, child_env

from lm.train import train
from sweeps.lineage import LINEAGE_FILE, Exploit, Owner, lineage_markdown, read_lineage
from sweeps.schedulers import (
    PBT_NUM_TO_KEEP,
    _KeepInRange,
    checkpoints_to_keep,
    concurrency_warning,
    describe,
    perturbed_params,
    scheduler,
)
from sweeps.space import load_space
from sweeps.trainable import read_owner

LR_RANGE = {"distribution": "log_uniform_values", "min": 1.0e-3, "max": 1.0e-2}


def _space(tmp: Path, corpus: Path, name: str = "space", **overrides: Any) -> Path:
    base = write_yaml(tmp / "base.yaml", base_config_dict(corpus, out_dir=str(tmp / "unused")))
    return write_yaml(tmp / f"{name}.yaml", seq_space(base, **overrides))


def _pbt(**scheduler: Any) -> dict[str, Any]:
    return {
        "search": {"algorithm": "random", "seed": 0, "max_concurrent_trials": 2},
        "scheduler": {"type": "pbt", "perturbation_interval": 2 * EVAL_TOKENS, **scheduler},
        "num_samples": 4,
        "parameters": {
            "optimizer.lr": LR_RANGE,
            "optimizer.weight_decay": {"values": [0.0, 0.1]},
            "data.batch_size": {"values": [8, 16]},
        },
    }


# ---------------------------------------------------------------------------------------------------
# The Ray objects
# ---------------------------------------------------------------------------------------------------


def test_each_type_builds_its_ray_scheduler_on_the_token_clock(tmp_path, small_corpus):
    from ray.tune.schedulers import (
        ASHAScheduler,
        FIFOScheduler,
        HyperBandScheduler,
        MedianStoppingRule,
        PopulationBasedTraining,
    )
    from ray.tune.schedulers.pb2 import PB2

    space = _space(tmp_path, small_corpus, **_pbt())
    expected = {
        "asha": ASHAScheduler,
        "hyperband": HyperBandScheduler,
        "median": MedianStoppingRule,
        "pbt": PopulationBasedTraining,
        "pb2": PB2,
        "fifo": FIFOScheduler,
    }
    for kind, cls in expected.items():
        sets = [f"scheduler.type={kind}", "scheduler.grace_period=5120"]
        if kind == "pb2":
            sets.append("parameters.optimizer.weight_decay.values=[0.1]")  # pb2: ranges only; a constant is fine
        built = scheduler(load_space(space, sets))
        assert isinstance(built, cls), (kind, type(built))
        if kind != "fifo":
            assert built._time_attr == "tokens_seen", kind
    asha = scheduler(load_space(space, ["scheduler.type=asha", "scheduler.grace_period=5120"]))
    assert (asha._max_t, asha._reduction_factor) == (MAX_TOKENS, 3.0)
    median = scheduler(load_space(space, ["scheduler.type=median", "scheduler.grace_period=5120"]))
    assert (median._grace_period, median._min_samples_required) == (5120, 3)


def test_grace_period_defaults_to_a_sixteenth_of_the_budget(tmp_path, small_corpus):
    """grace_period: null (the default) is budget // 16 on the token and step clocks, for every stopping scheduler."""
    space = _space(tmp_path, small_corpus, **_pbt())
    asha = scheduler(load_space(space, ["scheduler.type=asha"]))
    assert asha._brackets[0]._rungs[-1][0] == MAX_TOKENS // 16  # the first rung (Ray lists them last first)
    median = scheduler(load_space(space, ["scheduler.type=median"]))
    assert median._grace_period == MAX_TOKENS // 16
    steps = scheduler(load_space(space, ["scheduler.type=asha", "scheduler.time_attr=step"]))
    assert steps._brackets[0]._rungs[-1][0] == (MAX_TOKENS // TOKENS_PER_STEP) // 16
    given = scheduler(load_space(space, ["scheduler.type=asha", "scheduler.grace_period=5120"]))
    assert given._brackets[0]._rungs[-1][0] == 5120


def test_hyperband_brackets_span_grace_period_to_the_budget(tmp_path, small_corpus):
    """Ray's own geometry on a token clock would start at a rung of one token with a bracket of 3^9 trials."""
    space = _space(tmp_path, small_corpus, **_pbt())
    hb = scheduler(load_space(space, ["scheduler.type=hyperband", "scheduler.grace_period=2560"]))
    # R = 25,600 / 2,560 = 10, eta 3: brackets s = 0, 1, 2 (floor(log3 10) = 2)
    brackets = [(hb._get_n0(s), hb._get_r0(s)) for s in range(hb._s_max_1)]
    assert brackets == [(3, 25_600), (5, 8_533), (9, 2_844)]
    assert min(r for _, r in brackets) >= 2560 and max(r for _, r in brackets) == MAX_TOKENS


def test_hyperband_warns_when_its_brackets_do_not_run_together(tmp_path, small_corpus):
    """Brackets of 3, 5, 9 trials (R = 10, eta 3): fewer than 9 at once and Ray's HyperBand halves too few."""
    spec = load_space(
        _space(tmp_path, small_corpus, **_pbt()), ["scheduler.type=hyperband", "scheduler.grace_period=2560"]
    )
    line = concurrency_warning(spec, 2)
    assert line is not None and line.startswith("warning: hyperband's brackets hold 3, 5, 9 trials but 2 run at once")
    assert concurrency_warning(spec, 9) is None
    assert concurrency_warning(load_space(_space(tmp_path, small_corpus, **_pbt()), ["scheduler.type=asha"]), 1) is None


def test_pbt_perturbs_the_swept_optimizer_fields_and_carries_the_rest(tmp_path, small_corpus):
    spec = load_space(_space(tmp_path, small_corpus, **_pbt()))
    assert perturbed_params(spec) == ["optimizer.lr", "optimizer.weight_decay"]
    pbt = scheduler(spec)
    assert set(pbt._hyperparam_mutations) == {"optimizer.lr", "optimizer.weight_decay"}
    assert pbt._hyperparam_mutations["optimizer.weight_decay"] == [0.0, 0.1]
    assert pbt._perturbation_interval == 2 * EVAL_TOKENS and pbt._time_attr == "tokens_seen"
    line = describe(spec)
    assert "optimizer.lr, optimizer.weight_decay" in line and "data.batch_size travels with the checkpoint" in line
    assert checkpoints_to_keep(spec) == PBT_NUM_TO_KEEP  # the space keeps 2: Ray may delete an exploited one
    narrowed = load_space(_space(tmp_path, small_corpus, "narrow", **_pbt(perturb=["optimizer.lr"])))
    assert set(scheduler(narrowed)._hyperparam_mutations) == {"optimizer.lr"}
    default_interval = load_space(_space(tmp_path, small_corpus, "dflt", **_pbt(perturbation_interval=None)))
    assert scheduler(default_interval)._perturbation_interval == MAX_TOKENS // 4


def test_the_shipped_pbt_space_perturbs_the_optimizer_and_carries_the_batch_size():
    from sweeps.run_sweep import find_space

    spec = load_space(find_space("pbt_sweep.yaml"))
    assert (spec.scheduler.type, spec.search.algorithm) == ("pbt", "random")
    assert perturbed_params(spec) == ["optimizer.lr", "optimizer.weight_decay"]
    assert "data.batch_size travels with the checkpoint" in describe(spec)
    pb2 = load_space(find_space("pbt_sweep.yaml"), ["scheduler.type=pb2"])  # the same space under pb2: ranges
    assert set(scheduler(pb2)._hyperparam_bounds) == {"optimizer.lr", "optimizer.weight_decay"}


def test_the_adapted_ray_schedulers_survive_pickling(tmp_path, small_corpus):
    """Ray pickles the scheduler into the sweep's tuner.pkl, which --resume loads back."""
    import ray.cloudpickle

    space = _space(tmp_path, small_corpus, **_pbt())
    for kind, sets in (("pbt", []), ("hyperband", ["scheduler.grace_period=2560"])):
        built = scheduler(load_space(space, [f"scheduler.type={kind}", *sets]))
        back = ray.cloudpickle.loads(ray.cloudpickle.dumps(built))
        assert type(back).__mro__[1] is type(built).__mro__[1]
        if kind == "hyperband":
            assert [back._get_r0(s) for s in range(back._s_max_1)] == [25_600, 8_533, 2_844]
        else:
            assert back._custom_explore_fn({"optimizer.lr": 1.0}) == {"optimizer.lr": 1.0e-2}


def test_pb2_gets_the_ranges_as_bounds(tmp_path, small_corpus):
    space = _pbt()
    space["scheduler"]["type"] = "pb2"
    space["parameters"]["optimizer.weight_decay"] = {"distribution": "uniform", "min": 0.0, "max": 0.2}
    pb2 = scheduler(load_space(_space(tmp_path, small_corpus, **space)))
    assert pb2._hyperparam_bounds == {"optimizer.lr": [1.0e-3, 1.0e-2], "optimizer.weight_decay": [0.0, 0.2]}


def test_a_perturbed_value_stays_in_its_range():
    keep = _KeepInRange({"optimizer.lr": (1e-3, 1e-2), "optimizer.warmup_iters": (5, 50)})
    assert keep({"optimizer.lr": 1.2e-2, "optimizer.warmup_iters": 60, "data.batch_size": 8}) == {
        "optimizer.lr": 1e-2,
        "optimizer.warmup_iters": 50,
        "data.batch_size": 8,
    }
    assert keep({"optimizer.lr": 0.8e-3, "optimizer.warmup_iters": 4}) == {
        "optimizer.lr": 1e-3,
        "optimizer.warmup_iters": 5,
    }
    assert keep({"optimizer.lr": 5e-3}) == {"optimizer.lr": 5e-3}


# ---------------------------------------------------------------------------------------------------
# Bad input: the real CLI, one line, exit 2, before Ray starts
# ---------------------------------------------------------------------------------------------------


def _bad_cases(tmp: Path, corpus: Path) -> list[tuple[str, dict[str, Any], list[str]]]:
    """(case, space overrides, strings the one-line error must contain)."""

    def pbt(**changes: Any) -> dict[str, Any]:
        space = _pbt()
        for key, value in changes.items():
            section, _, name = key.partition("__")
            if name:
                space[section] = {**space[section], name: value}
            else:
                space[section] = value
        return space

    return [
        ("pbt_with_optuna", pbt(search={"algorithm": "optuna"}), ["search.algorithm", "use search.algorithm: random"]),
        (
            "pb2_with_optuna",
            pbt(search={"algorithm": "optuna"}, scheduler__type="pb2"),
            ["search.algorithm", "pb2 explores on its own"],
        ),
        ("perturb_model_shape", pbt(scheduler__perturb=["model.d_model"]), ["scheduler.perturb", "model.d_model"]),
        ("perturb_batch_size", pbt(scheduler__perturb=["data.batch_size"]), ["scheduler.perturb", "tokens <-> steps"]),
        ("perturb_not_swept", pbt(scheduler__perturb=["optimizer.beta1"]), ["scheduler.perturb", "not swept"]),
        ("perturb_not_a_list", pbt(scheduler__perturb="optimizer.lr"), ["scheduler.perturb", "a list"]),
        (
            "nothing_to_perturb",
            pbt(parameters={"data.batch_size": {"values": [8, 16]}}),
            ["parameters", "swept optimizer.* parameter for pbt"],
        ),
        (
            "pb2_categorical",
            pbt(scheduler__type="pb2"),
            ["parameters.optimizer.weight_decay", "a range (min/max) for pb2"],
        ),
        ("population_of_one", pbt(num_samples=1), ["num_samples", "at least 2 trials for pbt"]),
        (
            "interval_past_budget",
            pbt(scheduler__perturbation_interval=MAX_TOKENS),
            ["scheduler.perturbation_interval", "below the budget"],
        ),
        (
            "burn_in_past_budget",
            pbt(scheduler__burn_in=MAX_TOKENS - EVAL_TOKENS),
            ["scheduler.perturbation_interval", "burn_in + perturbation_interval"],
        ),
        ("quantile_too_big", pbt(scheduler__quantile_fraction=0.75), ["scheduler.quantile_fraction", "(0, 0.5]"]),
        ("resample_above_one", pbt(scheduler__resample_probability=1.5), ["scheduler.resample_probability"]),
        ("interval_zero", pbt(scheduler__perturbation_interval=0), ["scheduler.perturbation_interval", "positive"]),
        ("burn_in_negative", pbt(scheduler__burn_in=-1), ["scheduler.burn_in", ">= 0"]),
        ("median_min_samples", {"scheduler": {"type": "median", "min_samples_required": 0}}, ["min_samples_required"]),
        ("unknown_type", {"scheduler": {"type": "bohb"}}, ["scheduler.type", "'bohb'", "hyperband", "pb2"]),
        ("hyperband_rf_one", {"scheduler": {"type": "hyperband", "reduction_factor": 1}}, ["reduction_factor", "> 1"]),
        (
            "grace_null_on_reports",
            {"scheduler": {"type": "asha", "time_attr": "training_iteration"}},
            ["scheduler.grace_period", "a number under time_attr training_iteration"],
        ),
    ]


def test_bad_scheduler_input_is_one_line_and_exit_2_before_ray(tmp_path, small_corpus):
    cases = _bad_cases(tmp_path, small_corpus)
    ray_tmp = tmp_path / "raytmp"  # must stay empty: no case may start Ray

    def run(case: str, overrides: dict[str, Any]) -> subprocess.CompletedProcess:
        space = _space(tmp_path, small_corpus, case, **overrides)
        args = [sys.executable, str(RUN_SWEEP), "--space", str(space), "--storage-path", str(tmp_path / "store")]
        return subprocess.run(args, cwd=tmp_path, env=child_env(ray_tmp), capture_output=True, text=True, timeout=600)

    with ThreadPoolExecutor(4) as pool:
        futures = [(case, expect, pool.submit(run, case, overrides)) for case, overrides, expect in cases]
        failures = []
        for case, expect, future in futures:
            proc = future.result()
            err = proc.stderr
            problems = [f"exit {proc.returncode}"] if proc.returncode != 2 else []
            if err.count("\n") != 1 or not err.startswith(f"error: {tmp_path / case}.yaml: "):
                problems.append("not exactly one 'error: FILE: ' line")
            problems += [f"missing {s!r}" for s in expect if s not in err]
            if problems:
                failures.append(f"{case}: {', '.join(problems)}\n  stderr: {err.strip()[-600:]}")
    assert not (ray_tmp / "ray").exists(), "a bad-input case started Ray"
    assert failures == [], "\n".join(failures)


def test_pb2_without_scikit_learn_names_the_extra(tmp_path, small_corpus):
    space = _pbt()
    space["scheduler"]["type"] = "pb2"
    space["parameters"]["optimizer.weight_decay"] = {"value": 0.1}
    path = _space(tmp_path, small_corpus, **space)
    hide = (  # None in sys.modules: `import sklearn` fails, find_spec answers None, as when it is not installed
        "import sys, runpy; sys.modules['sklearn'] = None\n"
        f"sys.argv = ['run_sweep.py', '--space', {str(path)!r}, '--storage-path', {str(tmp_path / 'store')!r}]\n"
        f"runpy.run_path({str(RUN_SWEEP)!r}, run_name='__main__')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", hide], cwd=tmp_path, env=child_env(tmp_path / "rt"), capture_output=True, text=True
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "scheduler.type" in proc.stderr and 'pip install -e ".[search]"' in proc.stderr


# ---------------------------------------------------------------------------------------------------
# Lineage records, and a state continued under a perturbed config
# ---------------------------------------------------------------------------------------------------


def test_an_owner_record_makes_an_exploit_only_for_another_trial(tmp_path):
    owner = Owner("a_00001", {"optimizer.lr": 3e-3, "data.batch_size": 8}, tokens_seen=5120, step=20)
    ckpt = tmp_path / "checkpoint_000001"
    ckpt.mkdir()
    owner.write(ckpt)
    read = read_owner(pyarrow.fs.LocalFileSystem(), str(ckpt))
    assert read == owner
    assert read_owner(pyarrow.fs.LocalFileSystem(), str(tmp_path)) is None  # a checkpoint from before lineage
    assert Exploit.of("a_00001", {"optimizer.lr": 9e-3, "data.batch_size": 8}, owner) is None  # its own
    event = Exploit.of("a_00002", {"optimizer.lr": 3.6e-3, "data.batch_size": 8}, owner)
    assert (event.trial, event.from_trial, event.at_tokens, event.at_step) == ("a_00002", "a_00001", 5120, 20)
    assert event.changes == {"optimizer.lr": [3e-3, 3.6e-3]}  # the donor's value -> the new one; batch size alike
    assert event.line() == "continues from a_00001's checkpoint at 5,120 tokens: optimizer.lr: 0.003 -> 0.0036"


def test_read_lineage_gathers_the_trials_events_once_each(tmp_path):
    owner = Owner("t_00000", {"optimizer.lr": 1e-3}, 5120, 20)
    first = Exploit.of("t_00001", {"optimizer.lr": 1.2e-3}, owner)
    later = Exploit.of("t_00002", {"optimizer.lr": 0.8e-3}, Owner("t_00001", {"optimizer.lr": 1.2e-3}, 10240, 40))
    first.time, later.time = "2026-01-01 10:00:00", "2026-01-01 10:00:05"
    run1, run2 = tmp_path / "train_trial_t_00001_1_x" / "run", tmp_path / "train_trial_t_00002_2_x" / "run"
    first.append_to(run1)
    first.append_to(run1)  # the trial failed before its next report and restarted from the same checkpoint
    later.append_to(run2)
    with open(run2 / LINEAGE_FILE, "a") as f:
        f.write('{"trial": "t_00002", "from_tr')  # cut short by a crash
    df = read_lineage(tmp_path)
    assert df[["trial", "from_trial", "at_tokens"]].values.tolist() == [
        ["t_00001", "t_00000", 5120],
        ["t_00002", "t_00001", 10240],
    ]
    assert df["changes"].tolist() == ["optimizer.lr: 0.001 -> 0.0012", "optimizer.lr: 0.0012 -> 0.0008"]
    section = "\n".join(lineage_markdown(df))
    assert (
        "## PBT lineage" in section and "| `t_00002` | `t_00001` | 10,240 | optimizer.lr: 0.0012 -> 0.0008 |" in section
    )
    assert lineage_markdown(read_lineage(tmp_path / "none")) == []


def test_a_state_continues_under_a_perturbed_config_at_the_new_schedule(make_config, tmp_path):
    """What a PBT exploit runs: the donor's state at step 20, continued with a new peak lr and weight decay. The
    loop's lr is the new config's lr_at(step) from the exploited step on (the schedule scaled, its place kept), AdamW
    uses the new weight decay, and tokens continue from the donor's."""
    donor = make_config({"optimizer.lr": 3e-3, "optimizer.weight_decay": 0.1, "train.keep_checkpoints": 10})
    saved: dict[int, Path] = {}

    def keep(metrics: dict[str, Any], ckpt: Path | None) -> None:
        if ckpt is not None:
            copy = tmp_path / f"donor_{metrics['step']}.pt"
            copy.write_bytes(ckpt.read_bytes())
            saved[metrics["step"]] = copy

    train(donor, reporter=keep)
    perturbed = donor.replace(
        {"optimizer.lr": 3.6e-3, "optimizer.weight_decay": 0.0, "train.out_dir": str(tmp_path / "exploiter")}
    )
    from lm.train import run_loop, setup

    run = setup(perturbed, resume_from=saved[20])
    assert (run.state.step, run.state.tokens_seen) == (20, 20 * perturbed.tokens_per_step)
    assert [g["weight_decay"] for g in run.state.optimizer.param_groups] == [0.0]
    reports: list[dict[str, Any]] = []
    run.reporter = lambda metrics, _ckpt: reports.append(metrics)
    try:
        run_loop(run)
    finally:
        run.logger.close()
    rows = [json.loads(line) for line in (tmp_path / "exploiter" / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if r["kind"] == "train"]
    assert trained[0]["step"] == 25 and trained[0]["tokens_seen"] == 25 * perturbed.tokens_per_step
    for r in trained:  # the lr logged at step k is the one of the step taken from k - 1
        assert r["lr"] == pytest.approx(perturbed.lr_at(r["step"] - 1), rel=1e-12)
        assert r["lr"] == pytest.approx(donor.lr_at(r["step"] - 1) * 1.2, rel=1e-12)  # the schedule, scaled
    assert reports[0]["step"] == 30 and reports[0]["lr"] == pytest.approx(perturbed.lr_at(29), rel=1e-12)
