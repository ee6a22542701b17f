"""Memory-mapped token data: opening and checking files, random training batches, fixed validation windows.

Token files are `.npy` (opened with mmap_mode="r") or raw `.bin` with a dtype. A `meta.json` beside a file
may give `vocab_size`, `dtype` and `max_token_id`. Nothing is read into RAM whole: batches gather their
windows straight from the memmap. All checks happen in `open_tokens`, where files enter; the loop trusts it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lm.cli import InputError

# Token ids are stored unsigned; signed types are accepted for files written by other tools.
TOKEN_DTYPES = ("uint16", "uint32", "int32", "int64")
_SCAN_CHUNK = 1 << 24  # tokens per slice of the streaming max-id pass (bounded memory)


class DataError(InputError):
    """A token file is missing, malformed or disagrees with the config (one-line message naming it)."""


def read_meta(path: str | Path) -> dict[str, Any]:
    """The `meta.json` beside a token file, or {} if there is none."""
    meta_path = Path(path).with_name("meta.json")
    if not meta_path.is_file():
        return {}
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{meta_path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{meta_path}: expected a JSON object")
    return meta


def open_tokens(
    path: str | Path,
    vocab_size: int,
    context_length: int,
    dtype: str | None = None,
    field: str = "data.train_path",
) -> np.ndarray:
    """Open a token file as a read-only 1-D memmap after checking it can feed training.

    Raises DataError, naming the file and `field`, when: the file is missing; its dtype is not an integer
    type (or a `.bin` has no dtype from the config or meta.json, or one that does not divide its size);
    it holds fewer than context_length + 2 tokens; meta.json's vocab_size differs from `vocab_size`; or a
    token id is >= vocab_size (meta.json's max_token_id plus a sample when given, else a streaming pass).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {field}: token file not found")
    meta = read_meta(path)
    if "vocab_size" in meta and int(meta["vocab_size"]) != vocab_size:
        raise DataError(
            f"{path.with_name('meta.json')}: vocab_size {meta['vocab_size']} disagrees with "
            f"model.vocab_size {vocab_size}"
        )
    if path.suffix == ".npy":
        try:
            tokens = np.load(path, mmap_mode="r")
        except (ValueError, OSError) as e:
            raise DataError(f"{path}: {field}: not a readable .npy file ({e})") from None
        if tokens.dtype.name not in TOKEN_DTYPES:
            raise DataError(f"{path}: {field}: expected token dtype {'/'.join(TOKEN_DTYPES)}, got {tokens.dtype}")
        if tokens.ndim != 1:
            raise DataError(f"{path}: {field}: expected a 1-D token array, got shape {tokens.shape}")
    else:
        dtype = dtype or meta.get("dtype")
        if dtype is None:
            raise DataError(f"{path}: {field}: a raw token file needs data.dtype or a meta.json with 'dtype'")
        if dtype not in TOKEN_DTYPES:
            raise DataError(f"{path}: {field}: expected dtype {'/'.join(TOKEN_DTYPES)}, got {dtype!r}")
        itemsize = np.dtype(dtype).itemsize
        size = path.stat().st_size
        if size % itemsize:
            raise DataError(f"{path}: {field}: size {size} bytes is not a multiple of {dtype}'s {itemsize} bytes")
        tokens = np.memmap(path, dtype=dtype, mode="r") if size else np.zeros(0, dtype=dtype)
    if len(tokens) < context_length + 2:
        raise DataError(
            f"{path}: {field}: {len(tokens)} tokens, need at least context_length + 2 = {context_length + 2}"
        )
    _check_token_range(path, tokens, vocab_size, meta, field)
    return tokens


def _check_token_range(path: Path, tokens: np.ndarray, vocab_size: int, meta: dict, field: str) -> None:
    if "max_token_id" in meta:
        # Trust meta.json's maximum, but check a sample of the file against it, so a stale meta shows.
        sample = tokens[:: max(1, len(tokens) // 65536)]
        max_id = max(int(meta["max_token_id"]), int(sample.max()))
    else:
        max_id = max(int(tokens[i : i + _SCAN_CHUNK].max()) for i in range(0, len(tokens), _SCAN_CHUNK))
    if tokens.dtype.kind == "i" and int(tokens[: 1 << 20].min()) < 0:
        raise DataError(f"{path}: {field}: negative token ids")
    if max_id >= vocab_size:
        raise DataError(f"{path}: {field}: token id {max_id} >= model.vocab_size {vocab_size}")


class BatchSampler:
    """Uniform random training windows from a token memmap, reproducible from a seed.

    Its state (the numpy generator's) goes into checkpoints, so a resumed run draws the same batches.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, context_length: int, seed: int):
        self.tokens, self.batch_size, self.context_length = tokens, batch_size, context_length
        self.rng = np.random.default_rng(seed)

    def next(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        return get_batch(self.tokens, self.batch_size, self.context_length, device, self.rng)

    def state_dict(self) -> dict[str, Any]:
        return self.rng.bit_generator.state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state


def get_batch(
    dataset: np.ndarray,
    batch_size: int,
    context_length: int,
    device: torch.device | str,
    rng: np.random.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample `batch_size` windows with starts uniform in [0, len - context_length - 1].

    Returns (x, y), each (batch_size, context_length) int64 on `device`, with y = x shifted left by one.
    One vectorized gather from the memmap; no Python loop over the batch.
    """
    rng = rng if rng is not None else np.random.default_rng()
    starts = rng.integers(0, len(dataset) - context_length, size=batch_size)  # high is exclusive
    return _windows(dataset, starts, context_length, device)


def _windows(dataset: np.ndarray, starts: np.ndarray, context_length: int, device) -> tuple:
    offsets = np.arange(context_length + 1)
    window = torch.from_numpy(dataset[starts[:, None] + offsets].astype(np.int64))  # (b, ctx + 1)
    if torch.device(device).type == "cuda":
        window = window.pin_memory().to(device, non_blocking=True)
    else:
        window = window.to(device)
    return window[:, :-1], window[:, 1:]


def validation_starts(num_tokens: int, num_windows: int, context_length: int) -> np.ndarray:
    """Fixed, evenly spaced window starts over the validation split.

    They depend only on the file length, the window count and the context, never on a seed or the batch
    size, so every eval of every trial of every sweep scores exactly the same tokens.
    """
    last = num_tokens - context_length - 1
    return np.unique(np.linspace(0, last, num=min(num_windows, last + 1)).round().astype(np.int64))


def validation_batches(tokens: np.ndarray, starts: np.ndarray, context_length: int, batch_size: int, device):
    """Yield (x, y) batches of the fixed validation windows, at most `batch_size` windows each."""
    for i in range(0, len(starts), batch_size):
        yield _windows(tokens, starts[i : i + batch_size], context_length, device)
