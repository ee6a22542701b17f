"""Tests for ``lm.config``: loading, overrides and their coercion, validation messages, derived quantities."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import yaml

from lm.config import (
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    OptimizerConfig,
    TrainConfig,
    config_help,
    field_paths,
    field_type,
    parse_override_args,
)
from lm.data import TOKEN_DTYPES
from lm.fields import field_docs

CONFIG_DIR = Path(__file__).resolve().parent.parent / "lm" / "configs"
CONFIG_FILES = sorted(CONFIG_DIR.glob("*.yaml")) + sorted(CONFIG_DIR.glob("*.yml"))

# ---------------------------------------------------------------------------------------------------------
# Defaults and loading
# ---------------------------------------------------------------------------------------------------------


def test_defaults_validate_and_round_trip():
    config = Config()
    config.validate()
    assert Config.from_dict({}) == config
    assert Config.from_dict(config.to_dict()) == config
    assert isinstance(config.model, ModelConfig) and isinstance(config.optimizer, OptimizerConfig)
    assert isinstance(config.data, DataConfig) and isinstance(config.train, TrainConfig)


def test_from_file_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "model:\n  d_model: 64\n  num_heads: 2\noptimizer:\n  lr: 3e-4\n  grad_clip: null\n"
        "train:\n  max_tokens: 2_000_000\n  tensorboard: false\n"
    )
    config = Config.from_file(path)
    assert config.model.d_model == 64 and config.model.num_heads == 2
    # YAML 1.1 reads "3e-4" (no dot) as a string: it must still become the float 3e-4.
    assert config.optimizer.lr == 3e-4 and isinstance(config.optimizer.lr, float)
    assert config.optimizer.grad_clip is None
    assert config.train.max_tokens == 2_000_000 and config.train.tensorboard is False
    # Everything not in the file keeps its default.
    assert config.model.num_layers == ModelConfig().num_layers
    assert config.data == DataConfig()


def test_from_file_json_with_overrides(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"model": {"d_model": 64, "num_heads": 2}, "data": {"batch_size": 4}}))
    config = Config.from_file(path, {"optimizer.lr": "1e-3", "data.batch_size": "16"})
    assert config.model.d_model == 64
    assert config.optimizer.lr == 1e-3
    assert config.data.batch_size == 16


def test_empty_yaml_file_is_the_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing here\n")
    assert Config.from_file(path) == Config()


@pytest.mark.parametrize(
    "name, text, expected",
    [
        ("missing.yaml", None, "config file not found"),
        ("bad.yaml", "model: [unclosed\n", "not valid YAML"),
        ("bad.json", "{not json", "not valid JSON"),
        ("list.yaml", "- 1\n- 2\n", "expected a mapping"),
        ("section.yaml", "model: 3\n", "section 'model' must be a mapping"),
    ],
)
def test_from_file_bad_files_name_the_file(tmp_path, name, text, expected):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError) as info:
        Config.from_file(path)
    message = str(info.value)
    assert str(path) in message and expected in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "body, field",
    [
        ("modle:\n  d_model: 64\n", "modle"),
        ("model:\n  d_modle: 64\n", "model.d_modle"),
        ("model:\n  d_model: sixty\n", "model.d_model"),
        ("model:\n  d_model: 30\n", "model.d_model"),
        ("optimizer:\n  lr: 0\n", "optimizer.lr"),
        ("optimizer:\n  warmup_iters: 100000\n", "optimizer.warmup_iters"),
        ("train:\n  max_tokens: 100\n", "train.max_tokens"),
    ],
)
def test_from_file_errors_name_file_and_field(tmp_path, body, field):
    path = tmp_path / "run.yaml"
    path.write_text(body)
    with pytest.raises(ConfigError) as info:
        Config.from_file(path)
    assert str(path) in str(info.value)
    assert field in str(info.value)


def test_from_file_override_errors_name_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  d_model: 64\n")
    with pytest.raises(ConfigError, match="optimizer.bogus") as info:
        Config.from_file(path, {"optimizer.bogus": "1"})
    assert str(path) in str(info.value)


@pytest.mark.skipif(not CONFIG_FILES, reason="no lm/configs/*.yaml yet")
@pytest.mark.parametrize("path", CONFIG_FILES, ids=[p.name for p in CONFIG_FILES])
def test_ready_config_files_load(path):
    config = Config.from_file(path)
    config.validate(str(path))
    assert config.total_steps >= 1
    # A sweep or the CLI overrides single fields of these files; that must keep working.
    assert config.replace({"train.seed": "1"}).train.seed == 1


# ---------------------------------------------------------------------------------------------------------
# Overrides and coercion
# ---------------------------------------------------------------------------------------------------------


def test_replace_coerces_strings():
    config = Config().replace(
        {
            "optimizer.lr": "3e-4",
            "train.max_tokens": "2_000_000",
            "train.tensorboard": "false",
            "train.compile": "true",
            "optimizer.grad_clip": "null",
            "optimizer.warmup_iters": "10",
            "train.eval_interval_tokens": "None",
            "model.d_model": "64",
            "model.num_heads": "2",
            "data.dtype": "uint16",
        }
    )
    assert config.optimizer.lr == 3e-4 and isinstance(config.optimizer.lr, float)
    assert config.train.max_tokens == 2_000_000 and isinstance(config.train.max_tokens, int)
    assert config.train.tensorboard is False and config.train.compile is True
    assert config.optimizer.grad_clip is None
    assert config.optimizer.warmup_iters == 10
    assert config.train.eval_interval_tokens is None
    assert config.model.d_model == 64
    assert config.data.dtype == "uint16"


def test_replace_returns_a_copy():
    base = Config()
    changed = base.replace({"optimizer.lr": 1e-4})
    assert changed.optimizer.lr == 1e-4
    assert base.optimizer.lr == OptimizerConfig().lr


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"modle.d_model": 64}, "modle.d_model"),
        ({"model.d_modle": 64}, "model.d_modle"),
        ({"model": 64}, "model"),
        ({"model.d_model": "sixty-four"}, "model.d_model"),
        ({"model.d_model": 64.5}, "model.d_model"),
        ({"model.num_layers": True}, "model.num_layers"),
        ({"train.tensorboard": "maybe"}, "train.tensorboard"),
        ({"optimizer.lr": "fast"}, "optimizer.lr"),
        ({"model.vocab_size": None}, "model.vocab_size"),
        ({"model.d_model": 30, "model.num_heads": 4}, "model.d_model"),  # not a multiple
        ({"model.d_model": 12, "model.num_heads": 4}, "model.d_model"),  # head dim 3: RoPE needs even
        ({"optimizer.lr": 0}, "optimizer.lr"),
        ({"optimizer.lr": -1e-3}, "optimizer.lr"),
        ({"optimizer.lr": math.inf}, "optimizer.lr"),
        ({"optimizer.min_lr_ratio": 1.5}, "optimizer.min_lr_ratio"),
        ({"optimizer.beta2": 1.0}, "optimizer.beta2"),
        ({"optimizer.weight_decay": -0.1}, "optimizer.weight_decay"),
        ({"optimizer.grad_clip": 0}, "optimizer.grad_clip"),
        ({"optimizer.warmup_fraction": 1.0}, "optimizer.warmup_fraction"),
        ({"optimizer.warmup_iters": 732}, "optimizer.warmup_iters"),  # == total steps of the defaults
        ({"optimizer.warmup_iters": -1}, "optimizer.warmup_iters"),
        ({"train.max_tokens": 32 * 128 - 1}, "train.max_tokens"),  # below one step
        ({"train.max_tokens": 0}, "train.max_tokens"),
        ({"model.norm": "layer"}, "model.norm"),
        ({"train.precision": "fp16"}, "train.precision"),
        ({"data.dtype": "float32"}, "data.dtype"),
        ({"data.batch_size": 0}, "data.batch_size"),
        ({"train.eval_interval_tokens": 0}, "train.eval_interval_tokens"),
        ({"train.divergence_loss": 0}, "train.divergence_loss"),
        ({"data.train_path": "train.npy"}, "data.val_path"),
    ],
)
def test_invalid_values_raise_naming_the_field(overrides, field):
    with pytest.raises(ConfigError) as info:
        Config().replace(overrides, source="test-source")
    message = str(info.value)
    assert field in message
    assert message.startswith("test-source")
    assert "\n" not in message


def test_odd_head_dim_is_fine_without_rope():
    config = Config().replace({"model.d_model": 12, "model.num_heads": 4, "model.pos_emb": "nope"})
    assert config.model.d_model // config.model.num_heads == 3


def test_from_dict_unknown_section_and_field():
    with pytest.raises(ConfigError, match="unknown section 'optimiser'"):
        Config.from_dict({"optimiser": {"lr": 1e-3}})
    with pytest.raises(ConfigError, match=r"optimizer\.learning_rate: unknown field"):
        Config.from_dict({"optimizer": {"learning_rate": 1e-3}})
    with pytest.raises(ConfigError, match="expected a mapping"):
        Config.from_dict([1, 2])  # type: ignore[arg-type]


def test_field_paths_and_types():
    paths = field_paths()
    assert "optimizer.lr" in paths and "train.max_tokens" in paths and "model.d_model" in paths
    assert len(paths) == len(set(paths))
    assert field_type("optimizer.lr") is float
    assert field_type("model.d_model") is int
    with pytest.raises(ConfigError, match="optimizer.nope"):
        field_type("optimizer.nope")
    # Every listed path is accepted by replace (with its current value).
    base = Config().to_dict()
    for path in paths:
        section, name = path.split(".")
        Config().replace({path: base[section][name]})


# ---------------------------------------------------------------------------------------------------------
# parse_override_args
# ---------------------------------------------------------------------------------------------------------


def test_parse_override_args():
    args = [
        "--optimizer.lr",
        "3e-4",
        "--model.d_model=256",
        "--train.seed",
        "-1",
        "--data.dtype=",
        "--x.y=a=b",
    ]
    assert parse_override_args(args) == {
        "optimizer.lr": "3e-4",
        "model.d_model": "256",
        "train.seed": "-1",
        "data.dtype": "",
        "x.y": "a=b",
    }
    assert parse_override_args([]) == {}
    # Values stay strings; Config.replace coerces them.
    config = Config().replace(parse_override_args(["--optimizer.lr", "3e-4", "--train.max_tokens=2e6"]))
    assert config.optimizer.lr == 3e-4 and config.train.max_tokens == 2_000_000


@pytest.mark.parametrize(
    "args, expected",
    [
        (["optimizer.lr", "3e-4"], "unexpected argument"),
        (["--lr", "3e-4"], "unexpected argument"),
        (["-optimizer.lr", "3e-4"], "unexpected argument"),
        (["--optimizer.lr"], "needs a value"),
        (["--model.d_model", "64", "--optimizer.lr"], "needs a value"),
    ],
)
def test_parse_override_args_errors(args, expected):
    with pytest.raises(ConfigError, match=expected):
        parse_override_args(args)


# ---------------------------------------------------------------------------------------------------------
# Derived quantities
# ---------------------------------------------------------------------------------------------------------


def _sized(**overrides) -> Config:
    base = {"model.context_length": 16, "data.batch_size": 4, "train.max_tokens": 64 * 100 + 63}
    return Config().replace({**base, **overrides})


def test_total_steps_and_tokens_per_step():
    config = _sized()
    assert config.tokens_per_step == 64
    assert config.total_steps == 100  # the remainder of 63 tokens is not a step


def test_warmup_from_fraction_and_from_iters():
    assert _sized(**{"optimizer.warmup_fraction": 0.05}).warmup_steps == 5
    assert _sized(**{"optimizer.warmup_fraction": 0.123}).warmup_steps == 12
    assert _sized(**{"optimizer.warmup_fraction": 0.0}).warmup_steps == 0
    # warmup_iters wins over the fraction.
    assert _sized(**{"optimizer.warmup_fraction": 0.5, "optimizer.warmup_iters": 7}).warmup_steps == 7


@pytest.mark.parametrize("warmup", [{"optimizer.warmup_iters": 10}, {"optimizer.warmup_fraction": 0.1}])
def test_lr_schedule_endpoints(warmup):
    config = _sized(**{"optimizer.lr": 1e-3, "optimizer.min_lr_ratio": 0.1, **warmup})
    last = config.total_steps - 1
    assert config.warmup_steps == 10
    assert config.lr_at(0) == 0.0
    assert config.lr_at(5) == pytest.approx(0.5e-3)
    assert config.lr_at(10) == 1e-3  # the peak, exactly at the end of warmup
    assert config.lr_at(last) == config.min_lr == pytest.approx(1e-4)  # exactly min at the last step
    lrs = [config.lr_at(s) for s in range(config.total_steps)]
    assert max(lrs) == 1e-3
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11], strict=True))  # warmup increases
    assert all(a > b for a, b in zip(lrs[10:last], lrs[11:], strict=True))  # cosine decreases to the end
    assert min(lrs[10:]) == config.min_lr


def test_lr_schedule_without_warmup_starts_at_peak():
    config = _sized(**{"optimizer.warmup_iters": 0, "optimizer.min_lr_ratio": 0.0})
    assert config.lr_at(0) == config.optimizer.lr
    assert config.lr_at(config.total_steps - 1) == 0.0


# ---------------------------------------------------------------------------------------------------------
# Choices, YAML booleans, field docs, help and YAML output
# ---------------------------------------------------------------------------------------------------------


def test_choices_come_from_the_code_that_implements_them():
    for dtype in TOKEN_DTYPES:
        assert Config().replace({"data.dtype": dtype}).data.dtype == dtype
    with pytest.raises(ConfigError, match=r"data\.dtype: expected one of \['uint16'.*or null, got 'float32'"):
        Config().replace({"data.dtype": "float32"})


def test_yaml_booleans_where_a_choice_is_expected(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  progress: off\n")  # YAML 1.1 reads an unquoted off as false
    assert Config.from_file(path).train.progress == "off"
    # No choice is spelled like true: say why the value is a boolean.
    with pytest.raises(ConfigError, match=r"train\.progress: expected one of .*got True \(YAML reads unquoted"):
        Config.from_dict({"train": {"progress": True}})


def test_every_field_has_a_one_line_doc():
    for cls in (Config, ModelConfig, OptimizerConfig, DataConfig, TrainConfig):
        docs = field_docs(cls)
        assert set(docs) == {f.name for f in dataclasses.fields(cls)}, cls
        assert all(doc and "\n" not in doc for doc in docs.values()), cls


def test_config_help_lists_every_field_with_type_default_and_doc():
    text = config_help()
    for section in ("model", "optimizer", "data", "train"):
        assert f"{section}: " in text
    for path in field_paths():
        section, name = path.split(".")
        cls = type(getattr(Config(), section))
        assert f"--{path} " in text, path
        assert field_docs(cls)[name] in text, path
    assert "--optimizer.lr float = 0.003" in text
    assert "--optimizer.warmup_iters int | null = null" in text
    assert "--model.norm {pre, post, none} = pre" in text
    assert "--data.dtype {uint16, uint32, int32, int64} | null = null" in text
    assert "--train.tensorboard bool = true" in text


def test_to_yaml_round_trips():
    config = Config().replace(
        {"optimizer.lr": 3e-4, "optimizer.eps": 1e-10, "train.progress": "off", "data.dtype": "uint16"}
    )
    text = config.to_yaml()
    assert text.startswith("model:\n") and "  lr: 0.0003\n" in text
    assert Config.from_dict(yaml.safe_load(text)) == config
    assert Config.from_dict(yaml.safe_load(Config().to_yaml())) == Config()
