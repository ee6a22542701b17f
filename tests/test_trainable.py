"""The sweep trainable's config assembly and device selection, checked on CPU (no Ray started)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

from lm.train import resolve_device, resolve_precision
from sweeps.space import load_space
from sweeps.trainable import trial_config


@pytest.fixture
def spec(tmp_path, small_corpus):
    base = {
        "model": {"context_length": 32, "d_model": 32, "num_layers": 1, "num_heads": 2, "d_ff": 64},
        "data": {"train_path": str(small_corpus / "train.npy"), "val_path": str(small_corpus / "val.npy"),
                 "batch_size": 8},
        "train": {"max_tokens": 10_000},
    }  # fmt: skip
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    space = {
        "base_config": "base.yaml",
        "stop": {"max_tokens": 20_000, "divergence_loss": 7.5},
        "parameters": {
            "optimizer.lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2},
            "optimizer.warmup_iters": {"distribution": "uniform", "min": 1, "max": 10},
            "model.d_ff": {"value": 96},
        },
    }
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    return load_space(tmp_path / "space.yaml")


def test_trial_config_is_base_plus_overrides_with_trial_settings(spec, tmp_path):
    cfg = trial_config(spec, {"optimizer.lr": 3e-3, "optimizer.warmup_iters": 4.6}, tmp_path / "trial" / "run", 0, 1)
    assert cfg.optimizer.lr == 3e-3
    assert cfg.optimizer.warmup_iters == 5  # a continuous draw for an int field is rounded
    assert cfg.model.d_ff == 96  # constant parameter
    assert cfg.model.d_model == 32  # from the base config
    assert (cfg.train.max_tokens, cfg.train.divergence_loss) == (20_000, 7.5)  # stop.* settings
    assert cfg.train.device == "cpu" and cfg.train.num_threads == 1
    assert cfg.train.out_dir == str(tmp_path / "trial" / "run")
    assert cfg.train.keep_checkpoints == 1 and not cfg.train.save_best_and_final  # Ray keeps trial checkpoints
    assert Path(cfg.data.train_path).is_absolute()


def test_trial_on_a_gpu_share_trains_on_cuda_with_its_cpu_threads(spec, tmp_path):
    cfg = trial_config(spec, {"optimizer.lr": 1e-3}, tmp_path, 0.25, 4)
    assert cfg.train.device == "cuda"  # Ray's CUDA_VISIBLE_DEVICES makes cuda:0 the trial's share
    assert cfg.train.num_threads == 4


def test_device_and_precision_resolution_on_this_machine():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    if expected == "cpu" and getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        expected = "mps"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu").type == "cpu"
    assert resolve_precision("auto", torch.device("cpu")) is None  # never bf16 autocast on a CPU by default
    assert resolve_precision("fp32", torch.device("cuda")) is None
    assert resolve_precision("bf16", torch.device("cpu")) is torch.bfloat16  # explicit request is honoured


def test_orphaned_checkpoint_dirs_of_dead_processes_are_removed(tmp_path):
    import subprocess
    import sys

    from sweeps.trainable import CKPT_PREFIX, remove_orphaned_checkpoint_dirs

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a real process that has exited: its pid names no live process (until reused)
    dead = tmp_path / f"{CKPT_PREFIX}{gone.pid}-abc"
    alive = tmp_path / f"{CKPT_PREFIX}{os.getpid()}-def"
    init = tmp_path / f"{CKPT_PREFIX}1-ghi"  # pid 1 lives (and may not be ours to signal)
    other = tmp_path / f"{CKPT_PREFIX}old_style"
    for d in (dead, alive, init, other):
        d.mkdir()
        (d / "state.pt").write_bytes(b"x")
    assert remove_orphaned_checkpoint_dirs(tmp_path) == [dead]
    assert not dead.exists() and alive.exists() and init.exists() and other.exists()
