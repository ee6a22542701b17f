"""Derived parameters (fast): the safe expression evaluator, derived fields in trial configs, and every bad input
as a one-line error naming the file and the key (in-process, and a few through the CLI process: exit 2)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from sweeps.derived import DerivedError, compute, evaluate, order, parse
from sweeps.space import SpaceError, load_space, parse_space

REPO = Path(__file__).resolve().parents[1]
FIELDS = {"model.d_model", "model.d_ff", "model.num_heads", "data.batch_size", "optimizer.lr"}


def expr(text: str, free: set[str] = frozenset({"base_lr"}), key: str = "model.d_ff"):
    return parse(key, text, FIELDS.__contains__, set(free))


# ---------------------------------------------------------------------------------------------------
# The evaluator
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, values, expected",
    [
        ("round(8 / 3 * model.d_model / 64) * 64", {"model.d_model": 384}, 1024),
        ("round(8 / 3 * model.d_model / 64) * 64", {"model.d_model": 128}, 320),  # 5.33 -> 5
        ("model.d_model // 64", {"model.d_model": 320}, 5),
        ("base_lr * (data.batch_size / 32) ** 0.5", {"base_lr": 1e-3, "data.batch_size": 128}, 2e-3),
        ("-model.d_model % 7 + abs(-2)", {"model.d_model": 10}, (-10 % 7) + 2),
        ("max(1, min(model.d_model, 8), 3) + int(2.9) + float(1)", {"model.d_model": 5}, 5 + 2 + 1.0),
        ("sqrt(model.d_model) + log(exp(2)) + log(8, 2)", {"model.d_model": 16}, 4.0 + 2 + 3),
        ("4 if model.d_model >= 256 else 2", {"model.d_model": 256}, 4),
        ("4 if 64 < model.d_model < 128 else 2", {"model.d_model": 128}, 2),
        ("2 ** 10", {}, 1024),
    ],
)
def test_expressions_compute_what_python_computes(text, values, expected):
    result = evaluate(expr(text), values.__getitem__)
    assert result == pytest.approx(expected, rel=1e-12)
    assert type(result) is type(expected)  # round() and // give ints, as in Python


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("__import__('os').system('true')", "call of '__import__('os').system' not allowed"),
        ("__import__('os')", "call of '__import__' not allowed"),
        ("open('/etc/passwd')", "call of 'open' not allowed"),
        ("eval('1')", "call of 'eval' not allowed"),
        ("model.d_model.__class__", "unknown config field 'model.d_model.__class__'"),
        ("base_lr.real", "unknown config field 'base_lr.real'"),
        ("(1).real", "attribute access is allowed only as a dotted config field"),
        ("model.__dict__", "unknown config field 'model.__dict__'"),
        ("[1, 2][0]", "subscripts not allowed"),
        ("model.d_model[0]", "subscripts not allowed"),
        ("lambda: 1", "lambda not allowed"),
        ("'abc'", "strings not allowed"),
        ("f'{model.d_model}'", "strings not allowed"),
        ("[x for x in (1, 2)]", "comprehensions not allowed"),
        ("(y := 3)", "assignment (:=) not allowed"),
        ("model.d_model and 1", "and/or not allowed"),
        ("not model.d_model", "unary operator Not not allowed"),
        ("~model.d_model", "unary operator Invert not allowed"),
        ("model.d_model << 2", "operator LShift not allowed"),
        ("model.d_model is 2", "comparison not allowed"),
        ("True", "the constant True not allowed"),
        ("None", "the constant None not allowed"),
        ("round(model.d_model, ndigits=2)", "round(): positional arguments only"),
        ("max(*[1, 2])", "max(): positional arguments only"),
        ("sqrt()", "sqrt() takes 1 arguments, got 0"),
        ("round", "'round' is a function"),
        ("x + 1", "unknown name 'x'"),
        ("model.dmodel", "unknown config field 'model.dmodel'"),
        ("model.d_model +", "expected an arithmetic expression"),
        ("import os", "expected an arithmetic expression"),
        ("1; 2", "expected an arithmetic expression"),
        ("1 + " * 400 + "1", "at most 500 characters"),
        ("", "expected an expression"),
    ],
)
def test_evaluator_refuses_every_unsafe_construct_when_parsing(text, fragment):
    with pytest.raises(DerivedError) as info:
        expr(text)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_evaluator_refuses_a_non_string():
    with pytest.raises(DerivedError, match="expected an expression"):
        parse("model.d_ff", 256, FIELDS.__contains__, set())


@pytest.mark.parametrize(
    "text, values, fragment",
    [
        ("10 ** 10 ** 10", {}, "exponent 10000000000 out of range"),
        ("2 ** model.d_model", {"model.d_model": 65}, "exponent 65 out of range"),
        ("(2 ** 64) * (2 ** 64)", {}, "integer result out of range"),
        ("10.0 ** 64 * 10.0 ** 64 * 10.0 ** 64 * 10.0 ** 64 * 10.0 ** 64", {}, "result is inf"),
        ("exp(1000)", {}, "result out of range"),
        ("1 / (model.d_model - 64)", {"model.d_model": 64}, "division by zero"),
        ("log(model.d_model - 64)", {"model.d_model": 64}, "math domain error"),
        ("(-8) ** 0.5", {}, "complex"),
        ("model.d_model * 2", {"model.d_model": "abc"}, "model.d_model is 'abc', not a number"),
    ],
)
def test_evaluation_errors_are_caught(text, values, fragment):
    with pytest.raises(DerivedError) as info:
        evaluate(expr(text), values.__getitem__)
    assert fragment in str(info.value)


def test_order_puts_each_key_after_the_derived_keys_it_reads_and_names_a_cycle():
    exprs = {
        "model.d_ff": expr("model.num_heads * 64", key="model.d_ff"),
        "model.num_heads": expr("model.d_model // 64", key="model.num_heads"),
        "model.d_model": expr("256", key="model.d_model"),
    }
    keys = order(exprs)
    assert keys == ["model.d_model", "model.num_heads", "model.d_ff"]
    assert compute(exprs, keys, {}.__getitem__) == {"model.d_model": 256, "model.num_heads": 4, "model.d_ff": 256}
    cyclic = {
        "model.d_ff": expr("model.num_heads * 64", key="model.d_ff"),
        "model.num_heads": expr("model.d_ff // 64", key="model.num_heads"),
    }
    with pytest.raises(DerivedError, match=r"^model.d_ff: cycle model.d_ff -> model.num_heads -> model.d_ff$"):
        order(cyclic)


# ---------------------------------------------------------------------------------------------------
# In the space: trial configs and validation before Ray starts
# ---------------------------------------------------------------------------------------------------

DERIVED = {
    "model.d_ff": "round(8 / 3 * model.d_model / 64) * 64",
    "model.num_heads": "model.d_model // 64",
    "optimizer.lr": "base_lr * (data.batch_size / 32) ** 0.5",
}


def space(**overrides):
    raw = {
        "name": "sizes",
        "parameters": {
            "model.d_model": {"values": [128, 256]},
            "data.batch_size": {"values": [16, 64]},
            "base_lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2},
        },
        "derived": DERIVED,
    }
    raw.update(overrides)
    return parse_space(raw, "sizes.yaml")


def test_derived_fields_land_in_the_trial_config():
    spec = space()
    config = spec.trial_config({"model.d_model": 256, "data.batch_size": 64, "base_lr": 1e-3})
    assert (config.model.d_ff, config.model.num_heads) == (round(8 / 3 * 256 / 64) * 64, 4)
    assert config.optimizer.lr == pytest.approx(1e-3 * math.sqrt(2))
    assert isinstance(config.model.d_ff, int)
    # A free name missing from the sample takes its low end (the data check before Ray, the metadata).
    base = spec.trial_base()
    assert spec.trial_config({}).optimizer.lr == pytest.approx(1e-4 * math.sqrt(base.data.batch_size / 32))


def test_derived_read_fixed_fields_and_other_derived_fields():
    spec = space(
        parameters={"model.d_model": {"value": 192}, "train.seed": {"values": [1, 2]}},
        derived={"model.num_heads": "model.d_model // 64", "model.d_ff": "model.num_heads * 128 + model.vocab_size"},
    )
    config = spec.trial_config({"train.seed": 2})
    assert (config.model.num_heads, config.model.d_ff) == (3, 3 * 128 + config.model.vocab_size)


def test_space_round_trips_with_derived_and_free_names():
    spec = space()
    again = parse_space(spec.to_dict(), "saved.yaml")
    sample = {"model.d_model": 128, "data.batch_size": 16, "base_lr": 3e-3}
    assert again.trial_config(sample) == spec.trial_config(sample)
    assert again.derived == DERIVED


def test_free_name_is_a_tune_domain_and_in_results_meta():
    from sweeps.space import param_space

    derived = {**DERIVED, "model.d_ff": "width * 128"}
    spec = space(parameters={**space().to_dict()["parameters"], "width": {"value": 2}}, derived=derived)
    assert "base_lr" in param_space(spec) and "width" not in param_space(spec)  # a constant: trial_config applies it
    assert spec.results_meta()["free_names"] == {"base_lr": 1e-4, "width": 2}
    assert spec.trial_config({"base_lr": 1e-3}).model.d_ff == 256


BAD = [
    ("unknown name", {"derived": {"model.d_ff": "width * 64"}}, "derived.model.d_ff: unknown name 'width'"),
    ("unknown field", {"derived": {"model.d_ff": "model.dmodel * 4"}}, "derived.model.d_ff: unknown config field"),
    ("bad syntax", {"derived": {"model.d_ff": "model.d_model *"}}, "derived.model.d_ff: expected an arithmetic"),
    ("unsafe call", {"derived": {"model.d_ff": "__import__('os')"}}, "derived.model.d_ff: call of '__import__'"),
    ("list not text", {"derived": {"model.d_ff": [256]}}, "derived.model.d_ff: expected a string"),
    (
        "cycle",
        {"derived": {"model.d_ff": "model.num_heads * 64", "model.num_heads": "model.d_ff // 64"}},
        "derived.model.d_ff: cycle model.d_ff -> model.num_heads -> model.d_ff",
    ),
    ("key not a field", {"derived": {"model.width": "64"}}, "derived.model.width: expected a dotted config field"),
    (
        "key also swept",
        {"derived": {"model.d_model": "64"}},
        "derived.model.d_model: also under parameters",
    ),
    (
        "non-integer for an int field",
        {"derived": {"model.d_ff": "8 / 3 * model.d_model"}},
        "derived.model.d_ff: at model.d_model=128: expected an integer, got 341.3",
    ),
    (
        "invalid config at a range end",  # 256 // 64 + 1 = 5 heads divide 256? no; 128 -> 3 heads: no either
        {"derived": {"model.num_heads": "model.d_model // 64 + 1"}},
        "derived.model.num_heads: at model.d_model=128: gives an invalid config: model.d_model: expected a "
        "multiple of model.num_heads (3)",
    ),
    (
        "only the max end fails",
        {
            "parameters": {"frac": {"distribution": "uniform", "min": 0.5, "max": 20}},
            "derived": {"optimizer.warmup_fraction": "frac / 10"},
        },
        "derived.optimizer.warmup_fraction: at frac=20: gives an invalid config: optimizer.warmup_fraction: "
        "expected a number in [0, 1)",
    ),
    (
        "only a combination of ends fails",
        {
            "parameters": {
                "a": {"distribution": "uniform", "min": 0.5, "max": 1.5},
                "b": {"distribution": "uniform", "min": 0.5, "max": 1.5},
            },
            "derived": {"optimizer.warmup_fraction": "a * b"},
        },
        "derived.optimizer.warmup_fraction: at a=1.5, b=1.5: gives an invalid config",
    ),
    (
        "division by zero at an end",
        {"derived": {"model.d_ff": "round(1000 / (model.d_model - 128))", **{}}},
        "derived.model.d_ff: at model.d_model=128: division by zero",
    ),
    ("huge exponent", {"derived": {"model.d_ff": "10 ** 10 ** 10"}}, "derived.model.d_ff: at "),
    (
        "unused free name",
        {"parameters": {"model.d_model": {"values": [128]}, "base_lr": {"value": 1e-3}}, "derived": {}},
        "parameters.base_lr: a free name (no dot) that no derived expression reads",
    ),
    ("free name not a name", {"parameters": {"base-lr": {"value": 1}}, "derived": {}}, "parameters.base-lr: not a"),
]


@pytest.mark.parametrize("overrides, fragment", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_every_bad_derived_input_is_one_line_naming_file_and_key(overrides, fragment):
    raw = {"parameters": {"model.d_model": {"values": [128, 256]}}, **overrides}
    with pytest.raises(SpaceError) as info:
        parse_space({"name": "sizes", **raw}, "sizes.yaml")
    message = str(info.value)
    assert message.startswith("sizes.yaml: ") and "\n" not in message
    assert fragment in message, message


def test_set_overrides_a_derived_expression():
    path = REPO / "sweeps" / "search_spaces" / "model_size_sweep.yaml"
    spec = load_space(path, sets=["derived.model.d_ff=model.d_model * 4", "repeats=2"])
    assert spec.derived["model.d_ff"] == "model.d_model * 4" and spec.repeat_count == 2
    assert spec.trial_config({"model.d_model": 128}).model.d_ff == 512


def test_shipped_model_size_sweep_reads_and_derives():
    spec = load_space(REPO / "sweeps" / "search_spaces" / "model_size_sweep.yaml")
    config = spec.trial_config({"model.d_model": 192, "data.batch_size": 64, "base_lr": 2e-3})
    assert (config.model.d_ff, config.model.num_heads) == (512, 6)
    assert config.optimizer.lr == pytest.approx(2e-3 * math.sqrt(2))


@pytest.mark.parametrize(
    "derived, fragment",
    [
        ({"model.d_ff": "model.d_model ** 2 ** 99"}, "derived.model.d_ff: at model.d_model=128: exponent"),
        ({"model.d_ff": "model.d_ff + 1"}, "derived.model.d_ff: cycle model.d_ff -> model.d_ff"),
        ({"model.d_ff": "os.system(1)"}, "derived.model.d_ff: call of 'os.system' not allowed"),
    ],
)
def test_cli_refuses_bad_derived_in_one_line_with_exit_2(tmp_path, derived, fragment):
    path = tmp_path / "bad.yaml"
    raw = {"name": "bad", "parameters": {"model.d_model": {"values": [128, 256]}}, "derived": derived}
    path.write_text(yaml.safe_dump(raw))
    proc = subprocess.run(
        [sys.executable, str(REPO / "sweeps" / "run_sweep.py"), "--space", str(path), "--storage-path", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines == [lines[0]] and lines[0].startswith(f"error: {path}: ") and fragment in lines[0], proc.stderr
    assert not (tmp_path / "bad").exists()  # nothing created: refused before Ray


def test_results_recompute_derived_columns_from_the_sweep_meta():
    from sweeps.ray_compat import TrialRecord
    from sweeps.sweep import build_sweep

    spec = space()
    meta = {
        "name": "sizes",
        "metric": "val_loss",
        "mode": "min",
        "swept": spec.swept_params,
        "base_config": spec.trial_config({}).to_dict(),
        **spec.results_meta(),
    }
    sampled = {"model.d_model": 256, "data.batch_size": 64, "base_lr": 2e-3}
    record = TrialRecord("t1", 1, "PENDING", sampled, {}, None, None, None, "/x/t1")
    row = build_sweep("/x", meta, [record]).dataframe.iloc[0]
    trained = spec.trial_config(sampled)  # what the trial trains with
    assert (row["model.d_ff"], row["model.num_heads"]) == (trained.model.d_ff, trained.model.num_heads)
    assert row["optimizer.lr"] == pytest.approx(trained.optimizer.lr, rel=1e-15)
    assert isinstance(row["model.d_ff"], (int, np.integer))
