"""Memory-mapped token data: opening and checking files, random training batches, fixed validation windows.

Token files are `.npy` (opened with mmap_mode="r") or raw `.bin` with a dtype. A `meta.json` beside a file
may give `vocab_size`, `dtype` and `max_token_id`. Nothing is read into RAM whole: batches gather their
windows straight from the memmap. All checks happen in `open_tokens`, where files enter; the loop trusts it.

Every token id of a file is checked once: a streaming min/max pass (bounded memory) whose result is cached
in `$LM_SWEEPS_CACHE/token-ranges.json`, keyed by the file's path, dtype, size, mtime and inode, so later
runs and every sweep trial read the cache instead of the file.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lm.cli import InputError
from lm.files import write_atomic

# Token ids are stored unsigned; signed types are accepted for files written by other tools.
TOKEN_DTYPES = ("uint16", "uint32", "int32", "int64")
# Tokens per slice of the streaming min/max pass: small enough that the second reduction reads the slice from
# the CPU cache (1M tokens measured fastest: benchmarks/bench_data.py), and memory stays bounded.
_SCAN_CHUNK = 1 << 20
RANGE_CACHE_NAME = "token-ranges.json"
_RANGE_CACHE_ENTRIES = 1000  # the oldest entries go first: a cache, not a record
# A file modified this recently may change again within its filesystem's timestamp granularity without its
# mtime moving: its range is not cached (git's "racy clean" rule).
_RACY_SECONDS = 2.0
# meta.json fields the checks and the loop read, and what each must be.
_META_FIELDS: dict[str, tuple[str, Any]] = {
    "vocab_size": ("a positive integer", lambda v: _is_int(v) and v >= 1),
    "max_token_id": ("an integer >= 0", lambda v: _is_int(v) and v >= 0),
    "entropy_floor_nats": ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
}


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
    for key, (expected, holds) in _META_FIELDS.items():
        if key in meta and not holds(meta[key]):
            raise DataError(f"{meta_path}: {key}: expected {expected}, got {meta[key]!r}")
    return meta


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def open_tokens(
    path: str | Path,
    vocab_size: int,
    context_length: int,
    dtype: str | None = None,
    field: str = "data.train_path",
) -> np.ndarray:
    """Open a token file as a read-only 1-D memmap after checking it can feed training.

    Raises DataError, naming the file and `field`, when: the file is missing; meta.json is malformed or a
    field of it has the wrong type; its dtype is not an integer type (or a `.bin` has no dtype from the config
    or meta.json, or one that does not divide its size); it holds fewer than context_length + 2 tokens;
    meta.json's vocab_size differs from `vocab_size`; or any token id is negative or >= vocab_size (every id
    is checked: see `token_range`), or meta.json's max_token_id is.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {field}: token file not found")
    meta = read_meta(path)
    if "vocab_size" in meta and meta["vocab_size"] != vocab_size:
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
    lo, hi = token_range(path, tokens)
    if lo < 0:
        raise DataError(f"{path}: {field}: negative token id {lo} (expected ids in [0, model.vocab_size {vocab_size}))")
    if hi >= vocab_size:
        raise DataError(f"{path}: {field}: token id {hi} >= model.vocab_size {vocab_size}")
    if meta.get("max_token_id", -1) >= vocab_size:  # the file is fine, but meta.json describes another one
        raise DataError(
            f"{path.with_name('meta.json')}: max_token_id: token id {meta['max_token_id']} >= model.vocab_size "
            f"{vocab_size}"
        )


def token_range(path: str | Path, tokens: np.ndarray) -> tuple[int, int]:
    """(smallest, largest) id in `tokens`, the memmap of the file `path`: every id, read once per file.

    A streaming pass over the memmap (bounded memory) the first time; its result is cached under the file's
    resolved path and dtype with its size, mtime and inode, so it is reused until the file changes.
    """
    path = Path(path)
    if len(tokens) == 0:
        return 0, -1
    key = f"{path.resolve()}|{tokens.dtype.name}|{tokens.offset if isinstance(tokens, np.memmap) else 0}"
    before = path.stat()
    stamp = [before.st_size, before.st_mtime_ns, before.st_ino]
    entry = _read_range_cache().get(key)
    if isinstance(entry, dict) and entry.get("stamp") == stamp:
        return int(entry["min"]), int(entry["max"])
    lo, hi = _scan_range(tokens)
    after = path.stat()
    unchanged = [after.st_size, after.st_mtime_ns, after.st_ino] == stamp
    if unchanged and time.time() - after.st_mtime > _RACY_SECONDS:
        _write_range_cache(key, {"stamp": stamp, "min": lo, "max": hi})
    return lo, hi


def _scan_range(tokens: np.ndarray) -> tuple[int, int]:
    """Streaming min and max of every id, one slice of `_SCAN_CHUNK` tokens at a time."""
    lo, hi = None, None
    for i in range(0, len(tokens), _SCAN_CHUNK):
        chunk = tokens[i : i + _SCAN_CHUNK]
        c_lo, c_hi = int(chunk.min()), int(chunk.max())
        lo = c_lo if lo is None else min(lo, c_lo)
        hi = c_hi if hi is None else max(hi, c_hi)
    return lo, hi


def range_cache_path() -> Path:
    """Where checked token ranges are cached: $LM_SWEEPS_CACHE/token-ranges.json (or ~/.cache/lm-sweeps/...)."""
    from lm.stories import default_cache_root  # here: lm.stories is large and only this needs it

    return default_cache_root() / RANGE_CACHE_NAME


def _read_range_cache() -> dict[str, Any]:
    try:
        known = json.loads(range_cache_path().read_text())
    except (OSError, ValueError):
        return {}  # none yet, unreadable or damaged: scan again
    return known if isinstance(known, dict) else {}


def _write_range_cache(key: str, entry: dict[str, Any]) -> None:
    """Add `entry` and replace the cache file atomically. Concurrent writers (sweep trials) may lose each
    other's entries: that costs a rescan, never a wrong answer. A cache that cannot be written is skipped."""
    path = range_cache_path()
    known = _read_range_cache()
    known.pop(key, None)
    known[key] = entry  # last: dicts keep insertion order, so the oldest entries are first
    known = dict(list(known.items())[-_RANGE_CACHE_ENTRIES:])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(known))
    except OSError:
        pass


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
