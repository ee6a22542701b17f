"""Shared fixtures: a small generated story corpus, a tiny fast config, and an isolated data cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lm.config import Config
from sweeps.ray_compat import set_env_defaults

set_env_defaults()  # as the driver does, before any test imports Ray

# The process-test harness (tests/support/): its plain asserts report values as a test's do, and its shared
# fixtures (ray_tmp, twin_sweeps) are available to every test module.
pytest.register_assert_rewrite("support")
pytest_plugins = ["support.fixtures", "support.s3"]


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory) -> Path:
    """Point the built-in corpus cache at a session temp dir: tests never touch ~/.cache."""
    cache = tmp_path_factory.mktemp("lm-cache")
    old = os.environ.get("LM_SWEEPS_CACHE")
    os.environ["LM_SWEEPS_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("LM_SWEEPS_CACHE", None)
    else:
        os.environ["LM_SWEEPS_CACHE"] = old


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """A directory with train.npy (~200k tokens), val.npy (~20k) and meta.json from the story grammar."""
    from lm.stories import generate_corpus

    out = tmp_path_factory.mktemp("corpus")
    generate_corpus(out, train_tokens=200_000, val_tokens=20_000, seed=7)
    return out


def tiny_config(corpus: Path, out_dir: Path, overrides: dict | None = None) -> Config:
    """A model small enough for a training step in milliseconds, on `corpus`, writing into `out_dir`."""
    base = {
        "model.vocab_size": 257,
        "model.context_length": 32,
        "model.d_model": 32,
        "model.num_layers": 2,
        "model.num_heads": 2,
        "model.d_ff": 64,
        "data.train_path": str(corpus / "train.npy"),
        "data.val_path": str(corpus / "val.npy"),
        "data.batch_size": 8,
        "data.val_windows": 16,
        "train.max_tokens": 8 * 32 * 40,
        "train.eval_interval_tokens": 8 * 32 * 10,
        "train.log_interval": 5,
        "train.progress": "off",
        "train.tensorboard": False,
        "train.out_dir": str(out_dir),
    }
    base.update(overrides or {})
    return Config().replace(base)


@pytest.fixture
def make_config(small_corpus, tmp_path):
    """`make_config({"optimizer.lr": 1e-2})` -> a tiny validated Config on the small corpus (out_dir in tmp_path)."""

    def make(overrides: dict | None = None) -> Config:
        return tiny_config(small_corpus, tmp_path / "run", overrides)

    return make
