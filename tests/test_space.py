"""Tests for ``sweeps.space``: loading search-space YAML files, validation messages, `--set` overrides and
conversion to Ray Tune domains. Nothing here starts Ray (the CLI cases fail before it would)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from lm.fields import field_docs
from lm.record import Key
from sweeps import space
from sweeps.repeats import seed_axis
from sweeps.schedulers import Scheduler
from sweeps.search import Search
from sweeps.space import SpaceError, SweepSpec, load_space, param_space

REPO = Path(__file__).resolve().parent.parent
SPACE_DIR = REPO / "sweeps" / "search_spaces"
SPACES = sorted(SPACE_DIR.glob("*.yaml")) + sorted(SPACE_DIR.glob("*.yml"))
LR_SWEEP = SPACE_DIR / "lr_sweep.yaml"


def _write(tmp_path: Path, text: str, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


# ---------------------------------------------------------------------------------------------------------
# The shipped search spaces
# ---------------------------------------------------------------------------------------------------------


def test_search_spaces_directory_is_not_empty():
    assert len(SPACES) >= 4, SPACES


@pytest.mark.parametrize("path", SPACES, ids=[p.stem for p in SPACES])
def test_every_shipped_space_loads(path):
    spec = load_space(path)
    assert isinstance(spec, SweepSpec)
    assert spec.name == path.stem
    assert spec.source == str(path)
    assert spec.swept_params, "a shipped sweep should sweep something"
    assert spec.base_config is not None and Path(spec.base_config).is_absolute()
    assert Path(spec.base_config).is_file()
    # Every trial starts from a valid config that has the sweep's token budget.
    base = spec.trial_config({})
    if spec.stop.max_tokens is not None:
        assert base.train.max_tokens == spec.stop.max_tokens == spec.total_tokens
    # The conversion to Tune domains covers exactly the swept parameters (and repeats' seed axis, sweeps/repeats.py).
    assert set(param_space(spec)) == set(spec.swept_params) | ({"train.seed"} if seed_axis(spec) else set())


def test_lr_sweep_fields():
    spec = load_space(LR_SWEEP)
    assert spec.name == "lr_sweep"
    assert spec.base_config == str((REPO / "lm" / "configs" / "tiny.yaml").resolve())
    assert (spec.metric.name, spec.metric.mode) == ("val_loss", "min")
    s = spec.search
    assert (s.algorithm, s.sampler, s.seed, s.max_concurrent_trials) == ("optuna", "tpe", 0, None)
    assert (spec.scheduler.type, spec.scheduler.time_attr) == ("asha", "tokens_seen")
    # grace_period null: 1/16 of the budget (benchmarks/bench_search.py's pick), rungs 25k, 75k, 225k tokens
    assert spec.scheduler.grace_period is None and spec.scheduler.reduction_factor == 3.0
    assert spec.num_samples == 16
    assert (
        spec.resources_per_trial.cpu == "auto" and spec.resources_per_trial.gpu == 0
    )  # threads per trial measured at run time
    assert spec.stop.max_tokens == 400_000 and spec.total_tokens == 400_000
    assert spec.stop.divergence_loss == 10.0
    assert spec.checkpoint.num_to_keep == 2 and spec.max_failures == 2
    assert spec.swept_params == ["optimizer.lr", "optimizer.warmup_fraction", "data.batch_size"]
    lr = spec.parameters["optimizer.lr"]
    assert (lr.distribution, lr.min, lr.max) == ("log_uniform_values", 1.0e-4, 3.0e-2)
    warmup = spec.parameters["optimizer.warmup_fraction"]
    assert (warmup.distribution, warmup.values) == ("values", [0.02, 0.1])
    assert spec.parameters["data.batch_size"].distribution == "values"
    assert spec.parameters["data.batch_size"].values == [16, 32, 64]
    assert spec.parameters["model.d_model"].distribution == "value"
    assert spec.parameters["model.d_model"].value == 128
    assert not spec.parameters["model.d_model"].swept
    assert spec.parameters["train.eval_interval_tokens"].value == 25_000


# ---------------------------------------------------------------------------------------------------------
# Tune domains
# ---------------------------------------------------------------------------------------------------------


def _with_warmup_iters(tmp: Path) -> Path:
    """The demo space with warmup swept as an integer range (optimizer.warmup_iters 5..50)."""
    text = LR_SWEEP.read_text().replace("configs/tiny.yaml", str(REPO / "lm" / "configs" / "tiny.yaml"))
    old = "  optimizer.warmup_fraction: {values: [0.02, 0.1]}"
    assert old in text
    path = tmp / "iters.yaml"
    path.write_text(text.replace(old, "  optimizer.warmup_iters: {distribution: int_uniform, min: 5, max: 50}"))
    return path


def test_param_space_domains_and_bounds(tmp_path):
    from ray.tune.search import sample

    space = param_space(load_space(LR_SWEEP))
    assert set(space) == {"optimizer.lr", "optimizer.warmup_fraction", "data.batch_size"}

    lr = space["optimizer.lr"]
    assert isinstance(lr, sample.Float)
    assert isinstance(lr.get_sampler(), sample.Float._LogUniform)
    assert (lr.lower, lr.upper) == (1.0e-4, 3.0e-2)

    warmup = space["optimizer.warmup_fraction"]
    assert isinstance(warmup, sample.Categorical) and warmup.categories == [0.02, 0.1]
    # int_uniform is inclusive of max; Tune's randint excludes its upper bound.
    iters = param_space(load_space(_with_warmup_iters(tmp_path)))["optimizer.warmup_iters"]
    assert isinstance(iters, sample.Integer) and (iters.lower, iters.upper) == (5, 51)

    batch = space["data.batch_size"]
    assert isinstance(batch, sample.Categorical)
    assert batch.categories == [16, 32, 64]


def test_param_space_uniform_quniform_and_grid(tmp_path):
    from ray.tune.search import sample

    path = _write(
        tmp_path,
        """
        parameters:
          optimizer.min_lr_ratio: {distribution: uniform, min: 0.0, max: 0.5}
          optimizer.warmup_fraction: {distribution: q_uniform, min: 0.0, max: 0.2, q: 0.05}
          optimizer.warmup_iters: {distribution: int_uniform, min: 0, max: 3}
          model.d_model: {value: 64}
        """,
    )
    space = param_space(load_space(path))
    assert "model.d_model" not in space  # constants are applied by trial_config, not sampled
    ratio = space["optimizer.min_lr_ratio"]
    assert isinstance(ratio, sample.Float) and isinstance(ratio.get_sampler(), sample.Float._Uniform)
    assert (ratio.lower, ratio.upper) == (0.0, 0.5)
    frac = space["optimizer.warmup_fraction"]
    assert isinstance(frac.get_sampler(), sample.Quantized)
    assert frac.get_sampler().q == 0.05 and (frac.lower, frac.upper) == (0.0, 0.2)
    iters = space["optimizer.warmup_iters"]
    assert isinstance(iters, sample.Integer) and (iters.lower, iters.upper) == (0, 4)

    grid = _write(
        tmp_path,
        """
        search: {algorithm: grid}
        parameters:
          optimizer.warmup_fraction: {values: [0.0, 0.1]}
          optimizer.lr: {distribution: grid, values: [1.0e-3, 1.0e-2]}
        """,
        "grid.yaml",
    )
    spec = load_space(grid)
    assert spec.num_samples == 1  # a grid runs each point once by default
    space = param_space(spec)
    assert space == {
        "optimizer.warmup_fraction": {"grid_search": [0.0, 0.1]},
        "optimizer.lr": {"grid_search": [1.0e-3, 1.0e-2]},
    }


# ---------------------------------------------------------------------------------------------------------
# Trial configs: constants, sampled values, stop settings
# ---------------------------------------------------------------------------------------------------------


def test_trial_config_applies_constants_and_stop_settings():
    spec = load_space(LR_SWEEP)
    assert spec.base.model.d_model == 128 and spec.base.train.eval_interval_tokens == 250_000
    config = spec.trial_config({})
    assert config.model.d_model == 128  # constant from the space
    assert config.train.eval_interval_tokens == 25_000  # constant from the space (base says 250k)
    assert config.train.max_tokens == 400_000  # stop.max_tokens (base says 3M)
    assert config.train.divergence_loss == 10.0
    assert config.optimizer.lr == spec.base.optimizer.lr  # not sampled: the base value


def test_trial_config_applies_sampled_values_and_rounds_integer_fields(tmp_path):
    spec = load_space(_with_warmup_iters(tmp_path))
    config = spec.trial_config({"optimizer.lr": 1.5e-3, "optimizer.warmup_iters": 7.6, "data.batch_size": 64})
    assert config.optimizer.lr == 1.5e-3
    assert config.optimizer.warmup_iters == 8 and isinstance(config.optimizer.warmup_iters, int)
    assert config.data.batch_size == 64
    assert config.model.d_model == 128  # constants still applied


def test_trial_config_rejects_an_invalid_combination():
    from lm.config import ConfigError

    spec = load_space(LR_SWEEP)
    with pytest.raises(ConfigError, match="optimizer.lr"):
        spec.trial_config({"optimizer.lr": -1.0})


# ---------------------------------------------------------------------------------------------------------
# --set overrides
# ---------------------------------------------------------------------------------------------------------


def test_set_top_level_and_nested():
    spec = load_space(LR_SWEEP, sets=["num_samples=3", "search.seed=7", "stop.max_tokens=1e6"])
    assert spec.num_samples == 3
    assert spec.search.seed == 7
    assert spec.stop.max_tokens == 1_000_000 and spec.trial_config({}).train.max_tokens == 1_000_000
    assert spec.search.algorithm == "optuna" and spec.search.sampler == "tpe"  # untouched siblings stay
    # New nested mappings are created on the way.
    spec = load_space(LR_SWEEP, sets=["scheduler.type=fifo"])
    assert spec.scheduler.type == "fifo" and spec.scheduler.grace_period is None


def test_set_parameter_attribute():
    sets = ["parameters.optimizer.lr.max=1e-2", "parameters.data.batch_size.values=[8]"]
    spec = load_space(LR_SWEEP, sets=sets)
    assert spec.parameters["optimizer.lr"].max == 1e-2
    assert spec.parameters["optimizer.lr"].min == 1e-4
    assert spec.parameters["data.batch_size"].values == [8]
    assert "data.batch_size" not in spec.swept_params  # a single choice is not swept


def test_set_config_field_becomes_a_constant():
    spec = load_space(LR_SWEEP, sets=["train.compile=true", "model.num_layers=3"])
    assert spec.parameters["train.compile"].distribution == "value"
    assert spec.parameters["train.compile"].value is True
    config = spec.trial_config({})
    assert config.train.compile is True and config.model.num_layers == 3
    assert "train.compile" not in spec.swept_params


def test_set_does_not_modify_the_file(tmp_path):
    path = tmp_path / "lr.yaml"
    text = LR_SWEEP.read_text().replace("configs/tiny.yaml", str(REPO / "lm" / "configs" / "tiny.yaml"))
    path.write_text(text)
    load_space(path, sets=["num_samples=2"])
    assert path.read_text() == text
    assert load_space(path).num_samples == 16


@pytest.mark.parametrize(
    "item, fragments",
    [
        ("nonsense.key=1", ["nonsense.key", "unknown key"]),
        ("optimizer.learning_rate=1e-3", ["optimizer.learning_rate", "unknown key"]),
        ("num_samples", ["num_samples", "key=value"]),
        ("parameters.optimizer.beta1.max=0.9", ["optimizer.beta1", "no parameter", "--set optimizer.beta1"]),
        ("metric.name.x=1", ["'name' is not a mapping"]),
    ],
)
def test_set_errors(item, fragments):
    with pytest.raises(SpaceError) as info:
        load_space(LR_SWEEP, sets=[item])
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_set_value_is_validated():
    with pytest.raises(SpaceError, match=r"num_samples.*expected an integer"):
        load_space(LR_SWEEP, sets=["num_samples=many"])
    with pytest.raises(SpaceError, match=r"parameters\.optimizer\.lr.*min < max"):
        load_space(LR_SWEEP, sets=["parameters.optimizer.lr.max=1e-5"])


# ---------------------------------------------------------------------------------------------------------
# Bad spaces: every one is a SpaceError naming the file, the key and what was expected
# ---------------------------------------------------------------------------------------------------------

BAD_SPACES = [
    # (id, YAML text, fragments the one-line message must contain besides the file path)
    ("malformed-yaml", "name: x\nparameters: {optimizer.lr: {min: 1\n", ["malformed YAML", "line"]),
    ("top-level-not-mapping", "- a\n- b\n", ["expected a mapping"]),
    ("unknown-top-level-key", "nme: x\n", ["'nme'", "unknown top-level key", "num_samples"]),
    (
        "unknown-param-key",
        "parameters:\n  optimizer.lr: {distribution: uniform, min: 0.1, max: 1, step: 2}\n",
        ["parameters.optimizer.lr.step", "unknown key", "'distribution'"],
    ),
    (
        "not-a-config-field",
        "parameters:\n  optimizer.learning_rate: {values: [1, 2]}\n",
        ["parameters.optimizer.learning_rate", "not a config field", "optimizer.lr"],
    ),
    (
        "param-not-a-mapping",
        "parameters:\n  optimizer.lr: 0.01\n",
        ["parameters.optimizer.lr", "expected a mapping"],
    ),
    (
        "unknown-distribution",
        "parameters:\n  optimizer.lr: {distribution: normal, min: 0.1, max: 1}\n",
        ["parameters.optimizer.lr.distribution", "'normal'", "log_uniform_values"],
    ),
    (
        "min-not-below-max",
        "parameters:\n  optimizer.lr: {distribution: uniform, min: 0.1, max: 0.1}\n",
        ["parameters.optimizer.lr", "min < max"],
    ),
    (
        "missing-max",
        "parameters:\n  optimizer.lr: {distribution: uniform, min: 0.1}\n",
        ["parameters.optimizer.lr.max", "required"],
    ),
    (
        "log-range-min-zero",
        "parameters:\n  optimizer.lr: {distribution: log_uniform_values, min: 0, max: 0.1}\n",
        ["parameters.optimizer.lr.min", "min > 0"],
    ),
    (
        "wandb-log-uniform",
        "parameters:\n  optimizer.lr: {distribution: log_uniform, min: -9, max: -3}\n",
        ["parameters.optimizer.lr.distribution", "log_uniform", "log_uniform_values"],
    ),
    (
        "grid-axis-with-optuna",
        "search: {algorithm: optuna}\nparameters:\n  data.batch_size: {distribution: grid, values: [8]}\n",
        ["parameters.data.batch_size.distribution", "search.algorithm: grid", "values"],
    ),
    (
        "continuous-under-grid",
        "search: {algorithm: grid}\nparameters:\n  data.batch_size: {values: [8, 16]}\n"
        "  optimizer.lr: {distribution: uniform, min: 0.001, max: 0.01}\n",
        ["parameters.optimizer.lr", "grid takes only 'values'", "uniform"],
    ),
    ("grid-without-values", "search: {algorithm: grid}\n", ["parameters", "at least one 'values' axis"]),
    ("num-samples-not-int", "num_samples: many\n", ["num_samples", "expected an integer", "'many'"]),
    ("num-samples-zero", "num_samples: 0\n", ["num_samples", "positive"]),
    ("cpu-negative", "resources_per_trial: {cpu: -1}\n", ["resources_per_trial.cpu", "positive", '"auto"', "-1"]),
    ("cpu-word", "resources_per_trial: {cpu: many}\n", ["resources_per_trial.cpu", '"auto"', "'many'"]),
    (
        "gpu-fractional-above-one",
        "resources_per_trial: {gpu: 1.5}\n",
        ["resources_per_trial.gpu", "fraction", "1.5"],
    ),
    ("gpu-word", "resources_per_trial: {gpu: some}\n", ["resources_per_trial.gpu", "a number", "'some'"]),
    (
        "q-uniform-without-q",
        "parameters:\n  optimizer.lr: {distribution: q_uniform, min: 0.001, max: 0.01}\n",
        ["parameters.optimizer.lr.q", "required for q_uniform"],
    ),
    (
        "values-empty",
        "parameters:\n  data.batch_size: {values: []}\n",
        ["parameters.data.batch_size.values", "non-empty list"],
    ),
    (
        "value-with-other-keys",
        "parameters:\n  optimizer.lr: {value: 0.001, min: 0.0001}\n",
        ["parameters.optimizer.lr", "'value'", "cannot be combined", "min"],
    ),
    (
        "int-uniform-float-bound",
        "parameters:\n  optimizer.warmup_iters: {distribution: int_uniform, min: 1.5, max: 5}\n",
        ["parameters.optimizer.warmup_iters.min", "expected an integer"],
    ),
    (
        "range-on-string-field",
        "parameters:\n  model.norm: {distribution: uniform, min: 0, max: 1}\n",
        ["parameters.model.norm", "not numeric", "values"],
    ),
    (
        "base-config-missing",
        "base_config: no_such_config.yaml\n",
        ["base_config", "no_such_config.yaml", "not found"],
    ),
    ("scheduler-rf-one", "scheduler: {reduction_factor: 1}\n", ["scheduler.reduction_factor", "> 1"]),
    ("scheduler-rf-below-one", "scheduler: {reduction_factor: 0.5}\n", ["scheduler.reduction_factor", "> 1"]),
    ("scheduler-unknown-key", "scheduler: {grace: 10}\n", ["scheduler.grace", "unknown key", "grace_period"]),
    ("scheduler-type", "scheduler: {type: bohb}\n", ["scheduler.type", "'bohb'", "asha"]),
    ("metric-name", "metric: {name: accuracy}\n", ["metric.name", "'accuracy'", "val_loss"]),
    ("metric-goal", "metric: {name: val_loss, goal: lowest}\n", ["metric.goal", "'lowest'", "minimize"]),
    ("search-algorithm", "search: {algorithm: bayes}\n", ["search.algorithm", "'bayes'", "optuna"]),
    ("max-failures", "max_failures: -2\n", ["max_failures", ">= 0"]),
    (
        "values-choice-invalid-config",
        "stop: {max_tokens: 5000}\nparameters:\n  data.batch_size: {values: [8, 64]}\n",
        ["parameters.data.batch_size", "value 64", "invalid config", "at least one step"],
    ),
    (
        "constant-invalid-config",
        "parameters:\n  optimizer.lr: {value: -0.001}\n",
        ["parameters.optimizer.lr", "invalid config", "positive number"],
    ),
]


@pytest.mark.parametrize("text, fragments", [c[1:] for c in BAD_SPACES], ids=[c[0] for c in BAD_SPACES])
def test_bad_space_is_one_line_error_naming_file_and_key(tmp_path, text, fragments):
    path = tmp_path / "bad_space.yaml"
    path.write_text(text)
    with pytest.raises(SpaceError) as info:
        load_space(path)
    message = str(info.value)
    assert "\n" not in message, message
    assert str(path) in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_missing_space_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(SpaceError, match="not found") as info:
        load_space(path)
    assert str(path) in str(info.value)


# ---------------------------------------------------------------------------------------------------------
# The spec as data: saved as run, read back; documented keys
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", SPACES, ids=[p.stem for p in SPACES])
def test_saved_space_reads_back_equal(tmp_path, path):
    """The experiment directory keeps the space as run (after --set); --resume reads it from there."""
    spec = load_space(path, sets=["num_samples=3", "optimizer.grad_clip=null", "search.seed=5"])
    saved = tmp_path / "exp" / "sweep_space.yaml"  # another directory: base_config must be absolute
    saved.parent.mkdir()
    saved.write_text(yaml.safe_dump({**spec.to_dict(), "name": "renamed"}, sort_keys=False))
    again = load_space(saved)
    assert again.name == "renamed" and again.base_config == spec.base_config
    again.name, again.source = spec.name, spec.source
    assert again == spec


def test_grid_space_reads_back_equal(tmp_path):
    path = _write(
        tmp_path,
        """
        search: {algorithm: grid}
        parameters:
          optimizer.lr: {distribution: grid, values: [1.0e-3, 1.0e-2]}
          optimizer.grad_clip: {value: null}
        """,
    )
    spec = load_space(path)
    data = spec.to_dict()
    assert data["num_samples"] == 1 and data["parameters"]["optimizer.lr"]["distribution"] == "values"
    assert space.parse_space(yaml.safe_load(yaml.safe_dump(data)), spec.source) == spec


def test_constants_null_and_explicit(tmp_path):
    path = _write(
        tmp_path,
        """
        parameters:
          optimizer.grad_clip: {value: null}
          model.d_model: {distribution: value, value: 64}
          model.num_heads: {values: [2]}
          optimizer.lr: {distribution: uniform, min: 0.001, max: 0.01}
        """,
    )
    spec = load_space(path)
    config = spec.trial_config({})
    assert config.optimizer.grad_clip is None and config.model.d_model == 64
    assert spec.swept_params == ["optimizer.lr"]
    bad = _write(tmp_path, "parameters:\n  model.d_model: {distribution: value}\n", "bad.yaml")
    with pytest.raises(SpaceError, match=r"parameters\.model\.d_model\.value: required"):
        load_space(bad)


@pytest.mark.parametrize("metric", [Key.val_loss, Key.best_val_loss, Key.train_loss])
def test_metric_names_are_record_keys(tmp_path, metric):
    spec = load_space(_write(tmp_path, f"metric: {{name: {metric}, goal: min}}\n"))
    assert spec.metric.name == metric and type(spec.metric.name) is str and spec.metric.mode == "min"


def test_every_key_of_a_space_is_documented():
    classes = [SweepSpec, space.Metric, Search, Scheduler, space.Resources, space.Stop]
    for cls in [*classes, space.Checkpoint, space.Param]:
        docs = field_docs(cls)
        assert set(docs) == {f.name for f in dataclasses.fields(cls)}, cls


def test_base_config_resolves_next_to_the_space_file(tmp_path, small_corpus):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "base.yaml").write_text(
        "model: {context_length: 32}\ndata: {train_path: train.npy, val_path: val.npy, batch_size: 8}\n"
    )
    for name in ("train.npy", "val.npy"):
        (tmp_path / "configs" / name).write_bytes((small_corpus / name).read_bytes())
    spaces = tmp_path / "spaces"
    spaces.mkdir()
    text = "base_config: configs/base.yaml\nparameters:\n  optimizer.lr: {values: [0.001, 0.01]}\n"
    path = _write(spaces, text)
    spec = load_space(path)
    assert spec.base_config == str((tmp_path / "configs" / "base.yaml").resolve())
    # Relative data paths become absolute (trials run in their own working directory).
    assert spec.base.data.train_path == str((tmp_path / "configs" / "train.npy").resolve())
    assert spec.base.data.val_path == str((tmp_path / "configs" / "val.npy").resolve())


# ---------------------------------------------------------------------------------------------------------
# The driver's CLI on bad input: exit 2, one "error:" line, no traceback, before Ray starts
# ---------------------------------------------------------------------------------------------------------


def _run_driver(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "sweeps" / "run_sweep.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,  # these fail before Ray starts: seconds, not minutes
    )


def _assert_one_error_line(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:"), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


CLI_BAD_SPACES = {
    "malformed-yaml": ("name: x\nparameters: {optimizer.lr: {min: 1\n", ["malformed YAML"]),
    "unknown-key": ("nme: x\n", ["'nme'", "unknown top-level key"]),
    "missing-base-config": ("base_config: no_such_config.yaml\n", ["base_config", "no_such_config.yaml"]),
}


@pytest.mark.parametrize("case", list(CLI_BAD_SPACES))
def test_cli_bad_space_exits_2(tmp_path, case):
    text, fragments = CLI_BAD_SPACES[case]
    space = tmp_path / "bad.yaml"
    space.write_text(text)
    proc = _run_driver(["--space", str(space), "--storage-path", str(tmp_path / "results")], tmp_path)
    _assert_one_error_line(proc, str(space), *fragments)


def test_cli_unwritable_storage_path_exits_2(tmp_path):
    proc = _run_driver(["--space", str(LR_SWEEP), "--storage-path", "/proc/forbidden"], tmp_path)
    _assert_one_error_line(proc, "/proc/forbidden", "--storage-path", "not writable")


def test_cli_resume_unknown_sweep_exits_2(tmp_path):
    storage = tmp_path / "results"
    proc = _run_driver(["--resume", "--name", "nonexistent", "--storage-path", str(storage)], tmp_path)
    _assert_one_error_line(proc, str(storage / "nonexistent"), "--resume", "nonexistent")


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--space", "{bad}"], ["unknown top-level key"]),
        (["--space", "{bad}", "--set", "num_samples=many"], ["unknown top-level key"]),
        (["--space", str(LR_SWEEP), "--set", "stop.max_tokens=-5"], ["stop.max_tokens", "positive"]),
        (["--space", str(LR_SWEEP), "--num-samples", "0"], ["num_samples", "positive"]),
        (
            ["--space", str(LR_SWEEP), "--set", "optimizer.lr=-1"],
            ["parameters.optimizer.lr", "invalid config"],
        ),
        (["--resume"], ["--resume needs --name"]),
        (["--space", "{missing}"], ["{missing}", "not found"]),
        (["--allocator", "{missing}"], ["{missing}", "--allocator", "shared library"]),
    ],
    ids=[
        "bad-space",
        "bad-space-and-set",
        "set-stop",
        "num-samples",
        "set-config-field",
        "resume-without-name",
        "missing-space-file",
        "missing-allocator-library",
    ],
)
def test_driver_main_rejects_bad_input_before_starting_ray(tmp_path, monkeypatch, capsys, args, fragments):
    from sweeps import run_sweep

    def no_ray(*a, **k):
        raise AssertionError("Ray must not start on bad input")

    monkeypatch.setattr(run_sweep, "start_ray", no_ray)
    bad = tmp_path / "bad.yaml"
    bad.write_text("nme: x\n")
    missing = tmp_path / "missing.yaml"
    argv = [a.replace("{bad}", str(bad)).replace("{missing}", str(missing)) for a in args]
    argv += ["--storage-path", str(tmp_path / "results")]
    assert run_sweep.main(argv) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    for fragment in fragments:
        fragment = fragment.replace("{missing}", str(missing))
        assert fragment in lines[0], (fragment, lines[0])
    assert not (tmp_path / "results" / "lr_sweep").exists()  # nothing written for a rejected sweep


def test_allocator_env_choices(tmp_path, monkeypatch):
    import ctypes.util

    from sweeps.run_sweep import allocator_env

    monkeypatch.delenv("LD_PRELOAD", raising=False)
    assert allocator_env("system", local=True) == {}
    library = tmp_path / "libmy_malloc.so"
    library.write_bytes(b"\x7fELF")
    assert allocator_env(str(library), local=False)["LD_PRELOAD"] == str(library)  # explicit: also on a cluster
    installed = ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")
    installed = installed if sys.platform.startswith("linux") else None  # LD_PRELOAD is Linux's
    auto = allocator_env("auto", local=True)
    assert auto.get("LD_PRELOAD") == installed  # tcmalloc where the machine has it, else glibc malloc
    assert allocator_env("auto", local=False) == {}  # a cluster's nodes may not have this machine's library
    monkeypatch.setenv("LD_PRELOAD", str(library))
    assert allocator_env("auto", local=True) == {}  # the user's own preload is inherited, not replaced


def test_search_algorithm_carries_the_concurrency_limit_for_every_algorithm(tmp_path):
    """Tune applies max_concurrent_trials to Searchers only: the variant generator must get it itself."""
    from ray.tune.search import BasicVariantGenerator
    from ray.tune.search.optuna import OptunaSearch

    from sweeps.search import search_algorithm

    for algorithm, params in (
        ("random", "optimizer.lr: {distribution: uniform, min: 0.001, max: 0.01}"),
        ("grid", "optimizer.lr: {values: [0.001, 0.01]}"),
        ("optuna", "optimizer.lr: {distribution: uniform, min: 0.001, max: 0.01}"),
    ):
        path = tmp_path / f"{algorithm}.yaml"
        path.write_text(f"search: {{algorithm: {algorithm}, seed: 3}}\nparameters:\n  {params}\n")
        searcher = search_algorithm(load_space(path), 1)
        if algorithm == "optuna":
            assert isinstance(searcher, OptunaSearch)  # limited by TuneConfig(max_concurrent_trials)
        else:
            assert isinstance(searcher, BasicVariantGenerator)
            assert searcher.max_concurrent == 1
