"""Checkpoints: the CS336 pair `save_checkpoint`/`load_checkpoint`, and full training states.

A training state holds everything a run needs to continue bit for bit: model, optimizer, step, tokens
seen, config, RNG states (torch, numpy batch sampler, python) and the best validation loss. It is a
superset of the CS336 checkpoint (keys "model", "optimizer", "iteration"), so either loader reads both.
Every write goes to a temporary file in the target directory, is fsynced, then `os.replace`d into place:
a crash mid-write leaves the previous checkpoint intact and never a truncated file under the real name.
"""

from __future__ import annotations

import io
import os
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, BinaryIO

import numpy as np
import torch

from lm.cli import InputError
from lm.record import Key

FORMAT = "lm-sweeps/train-state"
VERSION = 1
_COMPILE_PREFIX = "_orig_mod."


class CheckpointError(InputError):
    """A checkpoint file is missing, truncated or not one of ours (one-line message naming the file)."""


def save_checkpoint(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    iteration: int,
    out: str | os.PathLike | BinaryIO,
) -> None:
    """CS336: write model and optimizer state and the iteration to a path (atomically) or a file object."""
    _save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iteration": iteration}, out)


def load_checkpoint(src: str | os.PathLike | BinaryIO, model: torch.nn.Module, optimizer=None) -> int:
    """CS336: restore model (and optimizer, if given) from `src`; return the saved iteration."""
    state = read_checkpoint(src)
    if optimizer is not None and "optimizer" not in state:
        raise CheckpointError(f"{state_name(src)}: optimizer: expected an optimizer state to load, missing")
    load_model_state(model, state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    return int(state["iteration"])


def save_training_state(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Atomically write a full training state (see module docstring) to `path`."""
    _save({"format": FORMAT, "version": VERSION, **state}, path)
    return Path(path)


def read_checkpoint(src: str | os.PathLike | BinaryIO) -> dict[str, Any]:
    """Load and check a checkpoint (CS336 or training state) without touching any model.

    Raises CheckpointError "FILE: FIELD: expected ..." if the file is missing, truncated or not a torch file,
    lacks "model" or "iteration", or holds an entry of the wrong type: parameter tensors, the step, the
    optimizer state, the config, tokens seen, the batch sampler's and RNGs' states (each checked by loading
    it into a throwaway generator), the losses. What resuming needs besides: `check_resumable`.
    """
    name = state_name(src)
    if isinstance(src, (str, os.PathLike)) and not Path(src).is_file():
        raise CheckpointError(f"{name}: checkpoint file not found")
    try:
        # weights_only: a checkpoint is data, never code to run (our states hold only tensors and plain types).
        state = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types (pickle, zip, EOF) for bad files
        raise CheckpointError(
            f"{name}: not a readable checkpoint (truncated or foreign file: {type(e).__name__})"
        ) from None
    if not isinstance(state, dict) or "model" not in state or "iteration" not in state:
        raise CheckpointError(f"{name}: not an lm-sweeps/CS336 checkpoint (no 'model' and 'iteration' entries)")
    for key, expected, holds in _FIELDS:
        value = _lookup(state, key)
        if value is not _MISSING and not holds(value):
            raise CheckpointError(f"{name}: {key}: expected {expected}, got {_describe(value)}")
    state["model"] = strip_compile_prefix(state["model"])
    return state


def state_name(src: str | os.PathLike | BinaryIO) -> str:
    """How messages name a checkpoint: its path, or a file object's name."""
    return str(src) if isinstance(src, (str, os.PathLike)) else getattr(src, "name", "<file object>")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_loss(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _restores(apply: Callable[[Any], Any]) -> Callable[[Any], bool]:
    """A check that a nested state (an RNG's) loads: applied to a throwaway object, as restore will."""

    def holds(value: Any) -> bool:
        try:
            apply(value)
        except Exception:  # numpy, torch and random raise TypeError, ValueError, RuntimeError, KeyError...
            return False
        return True

    return holds


def _set_sampler(state: Any) -> None:
    np.random.default_rng().bit_generator.state = state  # lm.data.BatchSampler's generator


# Every entry a checkpoint may hold, in the order they are checked: (key, what it must be, check). Nested
# entries are dotted ("rng.torch").
_FIELDS: list[tuple[str, str, Callable[[Any], bool]]] = [
    (
        "model",
        "a mapping of parameter names to tensors",
        lambda v: isinstance(v, dict) and all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in v.items()),
    ),
    ("iteration", "an integer >= 0 (the step)", lambda v: _is_int(v) and v >= 0),
    ("optimizer", "an optimizer state (a mapping with 'state' and 'param_groups')", lambda v: isinstance(v, dict)),
    ("config", "the run's config (a mapping of sections)", lambda v: isinstance(v, dict)),
    (Key.tokens_seen.value, "an integer >= 0", lambda v: _is_int(v) and v >= 0),
    ("sampler", "the batch sampler's numpy PCG64 state", _restores(_set_sampler)),
    ("rng", "a mapping of RNG states (torch, python, cuda)", lambda v: isinstance(v, dict)),
    ("rng.torch", "a torch RNG state (a uint8 tensor)", _restores(lambda v: torch.Generator().set_state(v))),
    ("rng.python", "a python random state", _restores(lambda v: random.Random().setstate(v))),
    # Set only where CUDA is: its type is checked here, its content there.
    (
        "rng.cuda",
        "a list of CUDA RNG states (tensors)",
        lambda v: isinstance(v, list) and all(isinstance(t, torch.Tensor) for t in v),
    ),
    (Key.best_val_loss.value, "a number", _is_loss),
    (Key.val_loss.value, "a number or null", _is_loss),
    (Key.train_loss.value, "a number or null", _is_loss),
]
_MISSING = object()


def _lookup(state: dict[str, Any], key: str) -> Any:
    """The entry at a dotted `key` of `state`, or _MISSING."""
    value: Any = state
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def check_resumable(state: dict[str, Any], name: str | os.PathLike) -> None:
    """Raise CheckpointError "FILE: FIELD: expected ..., missing" unless `state` (from `read_checkpoint`) holds
    what continuing a run needs: the optimizer state, and in a training state also tokens seen, the batch
    sampler's state and the torch and python RNG states."""
    needed = ["optimizer"]
    if is_training_state(state):
        needed += [Key.tokens_seen.value, "sampler", "rng", "rng.torch", "rng.python"]
    expected = {key: what for key, what, _ in _FIELDS}
    for key in needed:
        if _lookup(state, key) is _MISSING:
            raise CheckpointError(f"{name}: {key}: expected {expected[key]} to resume from, missing")


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"a {type(value).__name__}"


def is_training_state(state: dict[str, Any]) -> bool:
    return state.get("format") == FORMAT


def load_model_state(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Strictly load weights into `model` (or its compiled wrapper), ignoring a `_orig_mod.` prefix."""
    target = getattr(model, "_orig_mod", model)
    target.load_state_dict(strip_compile_prefix(state_dict), strict=True)


def strip_compile_prefix(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Remove the `_orig_mod.` prefix torch.compile puts on state-dict keys."""
    return {k.removeprefix(_COMPILE_PREFIX): v for k, v in state_dict.items()}


def _save(obj: dict[str, Any], out: str | os.PathLike | IO[bytes]) -> None:
    if not isinstance(out, (str, os.PathLike)):
        torch.save(obj, out)
        return
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Serialize to memory first so the file exists under its temp name only for the write itself.
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
