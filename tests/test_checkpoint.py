"""Tests for ``lm.checkpoint``: the CS336 save/load pair, training states, bad files and atomic writes."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from lm.checkpoint import (
    CheckpointError,
    is_training_state,
    load_checkpoint,
    load_model_state,
    read_checkpoint,
    save_checkpoint,
    save_training_state,
    strip_compile_prefix,
)
from lm.model import TransformerLM
from lm.optim import AdamW

REPO = Path(__file__).resolve().parent.parent


def _model(seed: int) -> TransformerLM:
    torch.manual_seed(seed)
    return TransformerLM(vocab_size=50, context_length=8, d_model=16, num_layers=1, num_heads=2, d_ff=32)


def _trained(seed: int = 0, steps: int = 2) -> tuple[TransformerLM, AdamW]:
    """A model and optimizer with non-trivial optimizer state (a few AdamW steps)."""
    model = _model(seed)
    optimizer = AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randint(0, 50, (2, 8), generator=g)
        loss = model(x, torch.roll(x, -1, dims=1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model, optimizer


def _assert_same_model(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def _assert_same_optimizer(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys() and sa["state"]
    for index, state in sa["state"].items():
        assert state.keys() == sb["state"][index].keys()
        for key, value in state.items():
            other = sb["state"][index][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other


# ---------------------------------------------------------------------------------------------------------
# CS336 save_checkpoint / load_checkpoint
# ---------------------------------------------------------------------------------------------------------


def test_round_trip_through_a_path(tmp_path):
    model, optimizer = _trained(seed=0)
    path = tmp_path / "sub" / "ckpt.pt"  # the parent directory is created
    save_checkpoint(model, optimizer, 123, path)
    assert path.is_file()

    fresh, fresh_opt = _trained(seed=1, steps=1)
    with pytest.raises(AssertionError):
        _assert_same_model(model, fresh)  # the test can tell them apart
    assert load_checkpoint(path, fresh, fresh_opt) == 123
    _assert_same_model(model, fresh)
    _assert_same_optimizer(optimizer, fresh_opt)


def test_round_trip_through_a_file_object():
    model, optimizer = _trained(seed=0)
    buffer = io.BytesIO()
    save_checkpoint(model, optimizer, 7, buffer)
    buffer.seek(0)
    fresh, fresh_opt = _trained(seed=1, steps=1)
    assert load_checkpoint(buffer, fresh, fresh_opt) == 7
    _assert_same_model(model, fresh)
    _assert_same_optimizer(optimizer, fresh_opt)


def test_restored_optimizer_continues_identically(tmp_path):
    model, optimizer = _trained(seed=0)
    save_checkpoint(model, optimizer, 2, tmp_path / "c.pt")
    fresh = _model(5)
    fresh_opt = AdamW(fresh.parameters(), lr=1e-2, weight_decay=0.1)
    load_checkpoint(tmp_path / "c.pt", fresh, fresh_opt)
    x = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(9))
    for m, o in ((model, optimizer), (fresh, fresh_opt)):
        loss = m(x, torch.roll(x, -1, dims=1))
        o.zero_grad()
        loss.backward()
        o.step()
    _assert_same_model(model, fresh)


def test_load_without_optimizer(tmp_path):
    model, optimizer = _trained(seed=0)
    save_checkpoint(model, optimizer, 3, tmp_path / "c.pt")
    fresh = _model(1)
    assert load_checkpoint(tmp_path / "c.pt", fresh) == 3
    _assert_same_model(model, fresh)


class _Wrapper(nn.Module):
    """Stands in for torch.compile's OptimizedModule: the model under `_orig_mod` (same state-dict keys)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self._orig_mod = model


def test_compile_prefix_is_stripped_on_load(tmp_path):
    model, optimizer = _trained(seed=0)
    wrapped = _Wrapper(model)
    assert all(k.startswith("_orig_mod.") for k in wrapped.state_dict())
    save_checkpoint(wrapped, optimizer, 4, tmp_path / "compiled.pt")

    assert all(not k.startswith("_orig_mod.") for k in read_checkpoint(tmp_path / "compiled.pt")["model"])
    plain = _model(1)
    assert load_checkpoint(tmp_path / "compiled.pt", plain) == 4
    _assert_same_model(model, plain)

    # And the other way: a plain checkpoint into a compiled (wrapped) model.
    save_checkpoint(model, optimizer, 5, tmp_path / "plain.pt")
    target = _Wrapper(_model(2))
    assert load_checkpoint(tmp_path / "plain.pt", target) == 5
    _assert_same_model(model, target._orig_mod)


def test_crafted_prefixed_keys(tmp_path):
    model, optimizer = _trained(seed=0)
    prefixed = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}
    torch.save({"model": prefixed, "optimizer": optimizer.state_dict(), "iteration": 9}, tmp_path / "c.pt")
    fresh = _model(1)
    assert load_checkpoint(tmp_path / "c.pt", fresh) == 9
    _assert_same_model(model, fresh)
    assert strip_compile_prefix({"_orig_mod.a": 1, "b": 2, "x._orig_mod.c": 3}) == {
        "a": 1,
        "b": 2,
        "x._orig_mod.c": 3,
    }


def test_load_into_a_mismatched_model_fails(tmp_path):
    model, optimizer = _trained(seed=0)
    save_checkpoint(model, optimizer, 1, tmp_path / "c.pt")
    other = TransformerLM(vocab_size=50, context_length=8, d_model=32, num_layers=1, num_heads=2, d_ff=32)
    with pytest.raises(RuntimeError):
        load_model_state(other, read_checkpoint(tmp_path / "c.pt")["model"])


# ---------------------------------------------------------------------------------------------------------
# Training states
# ---------------------------------------------------------------------------------------------------------


def test_training_state_round_trip(tmp_path):
    model, optimizer = _trained(seed=0)
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "iteration": 11,
        "tokens_seen": 11 * 64,
        "config": {"model": {"d_model": 16}},
        "rng": {"torch": torch.get_rng_state()},
        "best_val_loss": 2.5,
    }
    path = save_training_state(state, tmp_path / "state.pt")
    assert path == tmp_path / "state.pt"
    loaded = read_checkpoint(path)
    assert is_training_state(loaded)
    assert loaded["iteration"] == 11 and loaded["tokens_seen"] == 704
    assert loaded["config"] == {"model": {"d_model": 16}} and loaded["best_val_loss"] == 2.5
    assert torch.equal(loaded["rng"]["torch"], state["rng"]["torch"])
    # A training state is also a CS336 checkpoint.
    fresh, fresh_opt = _trained(seed=1, steps=1)
    assert load_checkpoint(path, fresh, fresh_opt) == 11
    _assert_same_model(model, fresh)

    save_checkpoint(model, optimizer, 3, tmp_path / "cs336.pt")
    assert not is_training_state(read_checkpoint(tmp_path / "cs336.pt"))


# ---------------------------------------------------------------------------------------------------------
# Bad files
# ---------------------------------------------------------------------------------------------------------


def _good(tmp_path: Path) -> Path:
    model, optimizer = _trained(seed=0, steps=1)
    save_checkpoint(model, optimizer, 1, tmp_path / "good.pt")
    return tmp_path / "good.pt"


def _truncated(tmp_path: Path) -> Path:
    data = _good(tmp_path).read_bytes()
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[: len(data) // 2])
    return path


def _text(tmp_path: Path) -> Path:
    path = tmp_path / "notes.pt"
    path.write_text("these are my notes, not a checkpoint\n")
    return path


def _empty(tmp_path: Path) -> Path:
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    return path


def _list(tmp_path: Path) -> Path:
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    return path


def _dict_without_model(tmp_path: Path) -> Path:
    path = tmp_path / "weights.pt"
    torch.save(_model(0).state_dict(), path)  # a bare state dict: no "model"/"iteration"
    return path


class _Opaque:
    """Not loadable with weights_only=True (a foreign, code-carrying pickle)."""


def _code_pickle(tmp_path: Path) -> Path:
    path = tmp_path / "code.pt"
    torch.save({"model": _Opaque(), "iteration": 1}, path)
    return path


def _missing(tmp_path: Path) -> Path:
    return tmp_path / "missing.pt"


BAD = [_truncated, _text, _empty, _list, _dict_without_model, _code_pickle, _missing]


@pytest.mark.parametrize("make", BAD, ids=[f.__name__.lstrip("_") for f in BAD])
def test_bad_files_raise_checkpoint_error_naming_the_file(tmp_path, make):
    path = make(tmp_path)
    model = _model(0)
    for call in (lambda: read_checkpoint(path), lambda: load_checkpoint(path, model)):
        with pytest.raises(CheckpointError) as info:
            call()
        message = str(info.value)
        assert str(path) in message
        assert "\n" not in message


def test_bad_file_object_raises_checkpoint_error():
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        read_checkpoint(io.BytesIO(b"garbage"))


# ---------------------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------------------


def _temp_files(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if p.name.endswith(".tmp")]


def test_failed_write_keeps_the_previous_checkpoint(tmp_path):
    model, optimizer = _trained(seed=0)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(model, optimizer, 1, path)
    before = path.read_bytes()

    other, _ = _trained(seed=1)
    state = {"model": other.state_dict(), "iteration": 2, "callback": lambda: None}  # cannot be pickled
    with pytest.raises(Exception):  # noqa: B017 - pickling raises AttributeError or PicklingError
        save_training_state(state, path)
    assert path.read_bytes() == before
    assert _temp_files(tmp_path) == []
    fresh = _model(2)
    assert load_checkpoint(path, fresh) == 1
    _assert_same_model(model, fresh)


def test_failed_disk_write_removes_the_temp_file(tmp_path, monkeypatch):
    model, optimizer = _trained(seed=0)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(model, optimizer, 1, path)
    before = path.read_bytes()

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(model, optimizer, 2, path)
    assert path.read_bytes() == before
    assert _temp_files(tmp_path) == []


# The child writes a good checkpoint, then starts overwriting it and stops at a chosen point of the write,
# telling the parent, which kills it with SIGKILL (a real process and a real signal: no cleanup runs).
_CHILD = textwrap.dedent(
    """
    import os, sys, time
    import torch
    from lm.checkpoint import save_checkpoint
    from lm.model import TransformerLM
    from lm.optim import AdamW

    path, mode = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model = TransformerLM(vocab_size=50, context_length=8, d_model=16, num_layers=1, num_heads=2, d_ff=32)
    optimizer = AdamW(model.parameters())
    save_checkpoint(model, optimizer, 1, path)

    def stop_here(*args, **kwargs):
        print("STOPPED", flush=True)
        time.sleep(120)

    if mode == "partial-write":
        real_fdopen = os.fdopen

        class HalfWriter:
            def __init__(self, f):
                self.f = f
            def __enter__(self):
                return self
            def __exit__(self, *exc):
                return self.f.__exit__(*exc)
            def write(self, data):
                data = memoryview(data)
                self.f.write(data[: len(data) // 2])
                self.f.flush()
                stop_here()
            def __getattr__(self, name):
                return getattr(self.f, name)

        os.fdopen = lambda *a, **k: HalfWriter(real_fdopen(*a, **k))
    else:  # "before-rename": everything is written and synced, only the rename is missing
        os.replace = stop_here
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    save_checkpoint(model, optimizer, 2, path)
    print("NOT STOPPED", flush=True)
    """
)


@pytest.mark.parametrize(
    "mode",
    ["partial-write", pytest.param("before-rename", marks=pytest.mark.slow)],  # a child costs ~5 s
)
def test_sigkill_during_write_keeps_the_previous_checkpoint(tmp_path, mode):
    path = tmp_path / "ckpt.pt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = child.stdout.readline()
        assert line.strip() == "STOPPED", child.stderr.read()
        temps = _temp_files(tmp_path)
        assert len(temps) == 1 and temps[0].stat().st_size > 0  # the new checkpoint is on its way
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL

    # The real name still holds the complete first checkpoint (iteration 1, the original weights).
    state = read_checkpoint(path)
    assert state["iteration"] == 1
    torch.manual_seed(0)
    reference = TransformerLM(vocab_size=50, context_length=8, d_model=16, num_layers=1, num_heads=2, d_ff=32)
    model = _model(3)
    load_model_state(model, state["model"])
    _assert_same_model(reference, model)
    # Only the hidden temp file is left behind, never a partial file under the real name; a later save works.
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert len(leftovers) == 2 and "ckpt.pt" in leftovers
    assert all(name == "ckpt.pt" or (name.startswith(".ckpt.pt.") and name.endswith(".tmp")) for name in leftovers)
    save_checkpoint(model, AdamW(model.parameters()), 3, path)
    assert read_checkpoint(path)["iteration"] == 3
