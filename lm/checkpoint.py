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
import tempfile
from pathlib import Path
from typing import IO, Any, BinaryIO

import torch

from lm.cli import InputError

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

    Raises CheckpointError naming the file if it is missing, truncated, not a torch file, or lacks the
    "model"/"iteration" entries.
    """
    name = str(src) if isinstance(src, (str, os.PathLike)) else getattr(src, "name", "<file object>")
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
    state["model"] = strip_compile_prefix(state["model"])
    return state


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
