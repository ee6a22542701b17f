"""Tests for ``lm.data``: batches, the batch sampler, validation windows and token-file checks."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lm.data import (
    BatchSampler,
    DataError,
    get_batch,
    open_tokens,
    read_meta,
    validation_batches,
    validation_starts,
)

# ---------------------------------------------------------------------------------------------------------
# get_batch
# ---------------------------------------------------------------------------------------------------------


def test_get_batch_shapes_dtype_and_shift():
    data = np.arange(1000, dtype=np.uint16)  # data[i] == i: each row is start, start + 1, ...
    x, y = get_batch(data, 8, 16, "cpu", np.random.default_rng(0))
    assert x.shape == y.shape == (8, 16)
    assert x.dtype == y.dtype == torch.int64
    assert x.device.type == y.device.type == "cpu"
    assert torch.equal(x[:, 1:], y[:, :-1])
    expected = x[:, :1] + torch.arange(16)
    assert torch.equal(x, expected)
    assert torch.equal(y, expected + 1)


def test_get_batch_windows_are_contiguous_slices_of_the_data():
    rng = np.random.default_rng(1)
    data = rng.integers(0, 60000, size=5000).astype(np.uint16)
    x, y = get_batch(data, 32, 24, "cpu", np.random.default_rng(2))
    # Recover each start from the (distinct, random) values and compare with the slice.
    for row_x, row_y in zip(x.numpy(), y.numpy(), strict=True):
        starts = [s for s in np.flatnonzero(data == row_x[0]) if np.array_equal(data[s : s + 24], row_x)]
        assert starts, "x is not a slice of the data"
        s = starts[0]
        assert np.array_equal(data[s + 1 : s + 25], row_y)


def test_get_batch_starts_cover_the_whole_range_uniformly():
    context, length = 4, 24  # valid starts: 0 .. length - context - 1 = 19 (20 values)
    data = np.arange(length, dtype=np.uint16)  # data[i] == i: x[:, 0] is the start
    x, y = get_batch(data, 20_000, context, "cpu", np.random.default_rng(123))
    starts = x[:, 0].numpy()
    assert starts.min() == 0
    assert starts.max() == length - context - 1  # the last window ends on the last token (y uses it)
    assert y[:, -1].max() == length - 1
    counts = np.bincount(starts, minlength=length - context)
    assert len(counts) == length - context and (counts > 0).all()
    expected = len(starts) / len(counts)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 60, f"starts look non-uniform: chi2 {chi2:.1f} with 19 degrees of freedom"


def test_get_batch_is_reproducible_with_a_seeded_generator():
    data = np.arange(10_000, dtype=np.uint32)
    a = get_batch(data, 16, 32, "cpu", np.random.default_rng(42))
    b = get_batch(data, 16, 32, "cpu", np.random.default_rng(42))
    c = get_batch(data, 16, 32, "cpu", np.random.default_rng(43))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_get_batch_accepts_a_torch_device():
    data = np.arange(100, dtype=np.int64)
    x, _ = get_batch(data, 2, 8, torch.device("cpu"), np.random.default_rng(0))
    assert x.device == torch.device("cpu")


# ---------------------------------------------------------------------------------------------------------
# BatchSampler
# ---------------------------------------------------------------------------------------------------------


def test_batch_sampler_state_round_trip():
    data = np.arange(50_000, dtype=np.uint16)
    sampler = BatchSampler(data, 4, 16, seed=7)
    for _ in range(3):
        sampler.next("cpu")
    state = copy.deepcopy(sampler.state_dict())
    expected = [sampler.next("cpu") for _ in range(3)]

    other = BatchSampler(data, 4, 16, seed=999)
    other.load_state_dict(state)
    got = [other.next("cpu") for _ in range(3)]
    for (ex, ey), (gx, gy) in zip(expected, got, strict=True):
        assert torch.equal(ex, gx) and torch.equal(ey, gy)

    # The saved state survives a torch checkpoint round trip (weights_only, as read_checkpoint loads it).
    buffer = io.BytesIO()
    torch.save({"sampler": state}, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=True)["sampler"]
    third = BatchSampler(data, 4, 16, seed=0)
    third.load_state_dict(restored)
    assert torch.equal(third.next("cpu")[0], expected[0][0])


def test_batch_sampler_same_seed_same_batches_different_seed_different():
    data = np.arange(50_000, dtype=np.uint16)
    a, b, c = (BatchSampler(data, 4, 16, seed=s) for s in (1, 1, 2))
    xa, xb, xc = a.next("cpu")[0], b.next("cpu")[0], c.next("cpu")[0]
    assert torch.equal(xa, xb)
    assert not torch.equal(xa, xc)


# ---------------------------------------------------------------------------------------------------------
# Validation windows
# ---------------------------------------------------------------------------------------------------------


def test_validation_starts_fixed_and_in_range():
    starts = validation_starts(10_000, 64, 128)
    assert np.array_equal(starts, validation_starts(10_000, 64, 128))
    assert len(starts) == 64
    assert starts.dtype == np.int64
    assert starts[0] == 0 and starts[-1] == 10_000 - 128 - 1
    assert (np.diff(starts) > 0).all()
    # Evenly spaced: gaps differ by at most one token.
    assert np.diff(starts).max() - np.diff(starts).min() <= 1


def test_validation_starts_with_more_windows_than_positions():
    starts = validation_starts(20, 100, 8)  # positions 0..11
    assert np.array_equal(starts, np.arange(12))


def test_validation_batches_independent_of_batch_size():
    data = np.random.default_rng(0).integers(0, 257, size=3000).astype(np.uint16)
    starts = validation_starts(len(data), 37, 16)

    def collect(batch_size):
        xs, ys = zip(*validation_batches(data, starts, 16, batch_size, "cpu"), strict=True)
        assert all(len(x) <= batch_size for x in xs)
        return torch.cat(xs), torch.cat(ys)

    x1, y1 = collect(1)
    x5, y5 = collect(5)
    x64, y64 = collect(64)
    assert x1.shape == (37, 16)
    assert torch.equal(x1, x5) and torch.equal(x1, x64)
    assert torch.equal(y1, y5) and torch.equal(y1, y64)
    assert torch.equal(x1[:, 1:], y1[:, :-1])
    assert torch.equal(x1[:, 0], torch.from_numpy(data[starts].astype(np.int64)))


# ---------------------------------------------------------------------------------------------------------
# open_tokens
# ---------------------------------------------------------------------------------------------------------


def _write_meta(directory: Path, **meta) -> None:
    (directory / "meta.json").write_text(json.dumps(meta))


def test_open_npy_is_a_memmap(tmp_path):
    data = np.arange(300, dtype=np.uint16) % 257
    np.save(tmp_path / "train.npy", data)
    tokens = open_tokens(tmp_path / "train.npy", vocab_size=257, context_length=16)
    assert isinstance(tokens, np.memmap)
    assert Path(tokens.filename) == (tmp_path / "train.npy").resolve()
    assert not tokens.flags.writeable
    assert np.array_equal(tokens, data)


@pytest.mark.parametrize("dtype", ["uint16", "uint32", "int32", "int64"])
def test_open_bin_with_config_dtype(tmp_path, dtype):
    data = np.arange(500, dtype=dtype) % 300
    path = tmp_path / "train.bin"
    data.tofile(path)
    tokens = open_tokens(path, vocab_size=300, context_length=16, dtype=dtype)
    assert isinstance(tokens, np.memmap)
    assert tokens.dtype == np.dtype(dtype)
    assert np.array_equal(tokens, data)


def test_open_bin_with_meta_dtype(tmp_path):
    data = np.arange(500, dtype=np.uint32) + 70_000
    path = tmp_path / "train.bin"
    data.tofile(path)
    _write_meta(tmp_path, dtype="uint32", vocab_size=80_000)
    tokens = open_tokens(path, vocab_size=80_000, context_length=16)
    assert isinstance(tokens, np.memmap)
    assert tokens.dtype == np.uint32
    assert np.array_equal(tokens, data)
    # The config's dtype wins over meta.json's.
    as16 = open_tokens(path, vocab_size=80_000, context_length=16, dtype="uint16")
    assert as16.dtype == np.uint16 and len(as16) == 2 * len(data)


def test_open_with_meta_max_token_id(tmp_path):
    np.save(tmp_path / "train.npy", np.arange(300, dtype=np.uint16) % 200)
    _write_meta(tmp_path, vocab_size=257, max_token_id=199)
    assert len(open_tokens(tmp_path / "train.npy", 257, 16)) == 300


def _bad_npy_float(tmp_path):
    np.save(tmp_path / "t.npy", np.zeros(100, dtype=np.float32))
    return tmp_path / "t.npy", {}, "dtype"


def _bad_npy_2d(tmp_path):
    np.save(tmp_path / "t.npy", np.zeros((10, 10), dtype=np.uint16))
    return tmp_path / "t.npy", {}, "1-D"


def _bad_npy_garbage(tmp_path):
    (tmp_path / "t.npy").write_bytes(b"this is not a numpy file at all" * 10)
    return tmp_path / "t.npy", {}, "not a readable .npy"


def _bad_missing(tmp_path):
    return tmp_path / "nope.npy", {}, "not found"


def _bad_bin_no_dtype(tmp_path):
    np.zeros(100, dtype=np.uint16).tofile(tmp_path / "t.bin")
    return tmp_path / "t.bin", {}, "dtype"


def _bad_bin_unknown_dtype(tmp_path):
    np.zeros(100, dtype=np.uint16).tofile(tmp_path / "t.bin")
    return tmp_path / "t.bin", {"dtype": "float32"}, "float32"


def _bad_bin_size(tmp_path):
    (tmp_path / "t.bin").write_bytes(b"\0" * 201)
    return tmp_path / "t.bin", {"dtype": "uint16"}, "multiple"


def _bad_bin_empty(tmp_path):
    (tmp_path / "t.bin").write_bytes(b"")
    return tmp_path / "t.bin", {"dtype": "uint16"}, "need at least"


def _bad_too_short(tmp_path):
    np.save(tmp_path / "t.npy", np.zeros(16 + 1, dtype=np.uint16))  # needs context + 2 = 18
    return tmp_path / "t.npy", {}, "need at least context_length + 2 = 18"


def _bad_token_id(tmp_path):
    data = np.zeros(100, dtype=np.uint16)
    data[57] = 257
    np.save(tmp_path / "t.npy", data)
    return tmp_path / "t.npy", {}, "token id 257 >= model.vocab_size 257"


def _bad_token_id_meta(tmp_path):
    np.save(tmp_path / "t.npy", np.zeros(100, dtype=np.uint16))
    _write_meta(tmp_path, max_token_id=300)
    return tmp_path / "t.npy", {}, "token id 300"


def _bad_token_id_stale_meta(tmp_path):
    data = np.zeros(100, dtype=np.uint16)
    data[-1] = 1000
    np.save(tmp_path / "t.npy", data)
    _write_meta(tmp_path, max_token_id=5)  # meta.json claims a small maximum; the file disagrees
    return tmp_path / "t.npy", {}, "token id 1000"


def _bad_negative_ids(tmp_path):
    data = np.zeros(100, dtype=np.int32)
    data[3] = -1
    np.save(tmp_path / "t.npy", data)
    return tmp_path / "t.npy", {}, "negative"


def _bad_meta_vocab(tmp_path):
    np.save(tmp_path / "t.npy", np.zeros(100, dtype=np.uint16))
    _write_meta(tmp_path, vocab_size=10_000)
    return tmp_path / "t.npy", {}, "vocab_size 10000 disagrees"


def _bad_meta_json(tmp_path):
    np.save(tmp_path / "t.npy", np.zeros(100, dtype=np.uint16))
    (tmp_path / "meta.json").write_text("{broken")
    return tmp_path / "t.npy", {}, "not valid JSON"


BAD_FILES = [
    _bad_missing,
    _bad_npy_float,
    _bad_npy_2d,
    _bad_npy_garbage,
    _bad_bin_no_dtype,
    _bad_bin_unknown_dtype,
    _bad_bin_size,
    _bad_bin_empty,
    _bad_too_short,
    _bad_token_id,
    _bad_token_id_meta,
    _bad_token_id_stale_meta,
    _bad_negative_ids,
    _bad_meta_vocab,
    _bad_meta_json,
]


@pytest.mark.parametrize("make", BAD_FILES, ids=[f.__name__.removeprefix("_bad_") for f in BAD_FILES])
def test_open_tokens_errors_name_the_file(tmp_path, make):
    path, kwargs, expected = make(tmp_path)
    with pytest.raises(DataError) as info:
        open_tokens(path, vocab_size=257, context_length=16, field="data.val_path", **kwargs)
    message = str(info.value)
    assert expected in message
    assert str(tmp_path) in message  # names the token file or its meta.json
    assert "\n" not in message


def test_open_tokens_error_names_the_field(tmp_path):
    with pytest.raises(DataError, match="data.val_path"):
        open_tokens(tmp_path / "missing.bin", 257, 16, "uint16", field="data.val_path")


def test_open_tokens_exactly_minimum_length(tmp_path):
    np.save(tmp_path / "t.npy", np.arange(18, dtype=np.uint16))  # context + 2: two window starts, 0 and 1
    tokens = open_tokens(tmp_path / "t.npy", vocab_size=257, context_length=16)
    x, y = get_batch(tokens, 200, 16, "cpu", np.random.default_rng(0))
    assert set(x[:, 0].tolist()) == {0, 1}
    assert int(y.max()) == 17


def test_open_tokens_does_not_read_the_file_into_memory(tmp_path, monkeypatch):
    """Opening goes through np.load(mmap_mode=...) / np.memmap, never a full read."""
    np.save(tmp_path / "t.npy", np.arange(1000, dtype=np.uint16) % 257)
    calls = []
    real_load = np.load

    def spy_load(*args, **kwargs):
        calls.append(kwargs.get("mmap_mode"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(np, "load", spy_load)
    monkeypatch.setattr(np, "fromfile", lambda *a, **k: pytest.fail("np.fromfile reads the whole file"))
    tokens = open_tokens(tmp_path / "t.npy", 257, 16)
    assert calls == ["r"]
    assert isinstance(tokens, np.memmap)


def test_read_meta(tmp_path):
    assert read_meta(tmp_path / "train.npy") == {}
    _write_meta(tmp_path, vocab_size=257, dtype="uint16")
    assert read_meta(tmp_path / "train.npy") == {"vocab_size": 257, "dtype": "uint16"}
    (tmp_path / "meta.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="JSON object"):
        read_meta(tmp_path / "train.npy")


def test_small_corpus_opens(small_corpus):
    train = open_tokens(small_corpus / "train.npy", 257, 32)
    val = open_tokens(small_corpus / "val.npy", 257, 32, field="data.val_path")
    assert isinstance(train, np.memmap) and isinstance(val, np.memmap)
    assert len(train) >= 200_000 and len(val) >= 20_000
    assert int(train.max()) == 256  # end-of-text tokens between stories
