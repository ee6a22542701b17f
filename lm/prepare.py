"""Turn raw text into the memory-mapped token files that training, sweeps and generation read.

    python -m lm.prepare --input corpus.txt [--val-input val.txt | --val-fraction 0.01] \\
        --vocab-size 10000 --special-token "<|endoftext|>" --out data/mycorpus/

trains a byte-level BPE tokenizer on the training text (or reuses one with ``--tokenizer DIR``), encodes the
training and validation text, and writes into ``--out``:

* ``train.npy``, ``val.npy``: 1-D token arrays (``uint16`` when every id fits, else ``uint32``), for
  ``np.load(path, mmap_mode="r")``;
* ``vocab.json``, ``merges.txt``: the tokenizer (format in :mod:`lm.tokenizer`);
* ``meta.json``: vocabulary size, dtype, token counts, largest token id, tokenizer description (what
  :func:`lm.tokenizer.load_tokenizer` reads), the inputs' SHA-256 hashes and the arguments.

Every file is written atomically and ``meta.json`` last, so an interrupted run never looks finished.
Running again with the same inputs and arguments does nothing. Bad input is reported on one line and exits
with status 2.
"""

from __future__ import annotations

import argparse
import codecs
import hashlib
import json
import os
import struct
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from lm import cli
from lm.cli import InputError
from lm.files import check_output_dir, write_atomic
from lm.tokenizer import (
    Tokenizer,
    find_chunk_boundaries,
    mp_context,
    next_safe_cut,
    num_workers,
    train_bpe,
)

META_FORMAT_VERSION = 1
DEFAULT_VAL_FRACTION = 0.01
# Text per encoding task: large enough to amortise task overhead, small enough that a worker's Python id
# list (about 40 bytes per token) stays around 50 MB.
ENCODE_CHUNK_BYTES = 4 << 20
_READ_BLOCK = 1 << 20


class PrepareError(InputError):
    """Bad input to :func:`prepare`; the message is one line naming the file (or option) and the problem."""


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------


def inspect_text_file(path: str | os.PathLike) -> dict[str, Any]:
    """Check that ``path`` is a non-empty UTF-8 file and describe it: ``{"path", "bytes", "sha256"}``.

    Reads the file once, hashing and validating it as it goes. Raises :class:`PrepareError` if the file is
    missing, not a regular file, empty, or not valid UTF-8.
    """
    path = Path(path)
    if not path.exists():
        raise PrepareError(f"{path}: no such file")
    if not path.is_file():
        raise PrepareError(f"{path}: not a regular file")
    size = path.stat().st_size
    if size == 0:
        raise PrepareError(f"{path}: file is empty")
    digest = hashlib.sha256()
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset = 0
    with open(path, "rb") as f:
        while block := f.read(_READ_BLOCK):
            digest.update(block)
            pending = len(decoder.getstate()[0])  # bytes of a split character carried from the last block
            try:
                decoder.decode(block)
            except UnicodeDecodeError as e:
                bad = offset - pending + e.start
                raise PrepareError(f"{path}: not valid UTF-8 (byte offset {bad})") from None
            offset += len(block)
    pending = len(decoder.getstate()[0])
    if pending:
        raise PrepareError(f"{path}: not valid UTF-8 (byte offset {size - pending}: incomplete character)")
    return {"path": str(path.resolve()), "bytes": size, "sha256": digest.hexdigest()}


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_READ_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _load_reused_tokenizer(tokenizer_dir: Path, specials: list[str]) -> tuple[Tokenizer, dict[str, Any]]:
    """Load ``vocab.json``/``merges.txt`` from ``tokenizer_dir``; specials default to its meta.json's."""
    files = {name: tokenizer_dir / name for name in ("vocab.json", "merges.txt")}
    for file in files.values():
        if not file.is_file():
            raise PrepareError(f"{file}: no such file (--tokenizer needs vocab.json and merges.txt)")
    meta_file = tokenizer_dir / "meta.json"
    if not specials and meta_file.is_file():
        try:
            specials = list(json.loads(meta_file.read_text("utf-8"))["tokenizer"]["special_tokens"])
        except (ValueError, KeyError, TypeError):
            pass  # not one of ours: use no special tokens
    try:
        tok = Tokenizer.from_files(files["vocab.json"], files["merges.txt"], specials)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        detail = " ".join(f"{type(e).__name__}: {e}".split())  # keep the message on one line
        raise PrepareError(f"{tokenizer_dir}: cannot load the tokenizer ({detail})") from None
    sources = {
        f"tokenizer_{name.split('.')[0]}": {"path": str(p.resolve()), "sha256": _hash_file(p)}
        for name, p in files.items()
    }
    return tok, sources


# --------------------------------------------------------------------------------------------------
# Encoding to .npy
# --------------------------------------------------------------------------------------------------

_worker_tokenizer: Tokenizer | None = None


def _init_encode_worker(vocab: dict[int, bytes], merges: list[tuple[bytes, bytes]], special_tokens: list[str]) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer(vocab, merges, special_tokens)


def _encode_range(tok: Tokenizer, path: str, start: int, end: int, dtype: str) -> np.ndarray:
    with open(path, "rb") as f:
        f.seek(start)
        text = f.read(end - start).decode("utf-8")
    return np.asarray(tok.encode(text), dtype=dtype)


def _encode_task_in_worker(task: tuple[str, int, int, str]) -> np.ndarray:
    assert _worker_tokenizer is not None, "worker not initialised"
    return _encode_range(_worker_tokenizer, *task)


# A version-1.0 .npy header of fixed size: the shape is only known once all tokens are written, and a
# fixed-size header can be filled in afterwards without copying the data.
_NPY_HEADER_BYTES = 128


def _npy_header(dtype: np.dtype, n: int) -> bytes:
    descr = np.lib.format.dtype_to_descr(dtype)
    fields = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': ({n},), }}"
    prefix = np.lib.format.magic(1, 0) + struct.pack("<H", _NPY_HEADER_BYTES - 10)
    return prefix + (fields.ljust(_NPY_HEADER_BYTES - 10 - 1) + "\n").encode("latin1")


def encode_to_npy(
    tok: Tokenizer,
    path: str | os.PathLike,
    byte_range: tuple[int, int],
    out_path: Path,
    dtype: str,
    *,
    num_processes: int | None = None,
    progress: bool = True,
    desc: str = "encode",
) -> tuple[int, int]:
    """Encode bytes ``byte_range`` of a UTF-8 file into the 1-D ``.npy`` array ``out_path`` (atomically).

    The range is cut at safe positions and encoded in order, in a process pool for inputs of 1 MB or more; the
    tokens equal ``tok.encode`` of the whole range. Memory stays bounded: tokens go straight to disk. Returns
    ``(number of tokens, largest token id)``.
    """
    path = os.fspath(path)
    start, end = byte_range
    np_dtype = np.dtype(dtype)
    workers = num_workers(num_processes, end - start)
    num_chunks = max(4 * workers, -(-(end - start) // ENCODE_CHUNK_BYTES))
    bounds = find_chunk_boundaries(path, num_chunks, tok.special_tokens, start, end)
    tasks = [(path, a, b, dtype) for a, b in zip(bounds, bounds[1:], strict=False)]

    count, max_id = 0, -1
    fd, tmp = tempfile.mkstemp(dir=out_path.parent, prefix=f".{out_path.name}.", suffix=".tmp")
    try:
        with (
            os.fdopen(fd, "wb") as f,
            tqdm(total=end - start, unit="B", unit_scale=True, desc=desc, disable=not progress, file=sys.stderr) as bar,
        ):
            f.write(b"\0" * _NPY_HEADER_BYTES)
            pool = None
            if workers > 1:
                pool = mp_context().Pool(
                    min(workers, len(tasks)),
                    initializer=_init_encode_worker,
                    initargs=(tok.vocab, tok.merges, tok.special_tokens),
                )
                results = pool.imap(_encode_task_in_worker, tasks)
            else:
                results = (_encode_range(tok, *task) for task in tasks)
            try:
                for (_, a, b, _), ids in zip(tasks, results, strict=True):
                    f.write(ids.tobytes())
                    count += len(ids)
                    if len(ids):
                        max_id = max(max_id, int(ids.max()))
                    bar.update(b - a)
            finally:
                if pool is not None:
                    pool.terminate()
            f.seek(0)
            f.write(_npy_header(np_dtype, count))
        os.chmod(tmp, 0o644)  # mkstemp creates files readable by the owner only
        os.replace(tmp, out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return count, max_id


# --------------------------------------------------------------------------------------------------
# The whole preparation
# --------------------------------------------------------------------------------------------------


def _fingerprint(meta: dict[str, Any]) -> Any:
    """What decides the outputs: the arguments and the inputs' hashes (not their paths)."""
    sources = meta.get("sources", {})
    return (meta.get("format_version"), meta.get("args"), {k: v.get("sha256") for k, v in sources.items()})


def _up_to_date(out_dir: Path, meta: dict[str, Any]) -> dict[str, Any] | None:
    """The existing meta.json if ``out_dir`` already holds the outputs ``meta`` describes, else None."""
    try:
        old = json.loads((out_dir / "meta.json").read_text("utf-8"))
    except (OSError, ValueError):
        return None
    try:
        if _fingerprint(old) != _fingerprint(meta):
            return None
        files = ["train.npy", "val.npy", old["tokenizer"]["vocab"], old["tokenizer"]["merges"]]
    except (AttributeError, KeyError, TypeError):
        return None  # not a meta.json we wrote
    return old if all((out_dir / name).is_file() for name in files) else None


def _log(message: str, progress: bool) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


def prepare(
    input_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    vocab_size: int | None = None,
    special_tokens: Sequence[str] = (),
    val_input: str | os.PathLike | None = None,
    val_fraction: float | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
    num_processes: int | None = None,
    progress: bool = True,
    force: bool = False,
) -> dict[str, Any]:
    """Prepare ``input_path`` for training into ``out_dir`` and return the contents of its ``meta.json``.

    The validation text is ``val_input`` if given, else the last ``val_fraction`` (default 1%) of the input,
    cut at a safe position; the tokenizer is trained on the training text only (``vocab_size`` tokens,
    ``special_tokens`` included) unless ``tokenizer_dir`` provides one. If ``out_dir`` already holds the
    outputs of the same inputs and arguments, nothing is written (unless ``force``). Raises
    :class:`PrepareError` for bad input (an empty special token, an output directory that cannot be created
    or written, ...) before any work; an OSError later is the machine's (a full disk).
    """
    out_dir = Path(out_dir)
    specials = list(dict.fromkeys(special_tokens))
    if val_input is not None and val_fraction is not None:
        raise PrepareError("give either --val-input or --val-fraction, not both")
    if val_input is None:
        val_fraction = DEFAULT_VAL_FRACTION if val_fraction is None else float(val_fraction)
        if not 0.0 < val_fraction < 1.0:
            raise PrepareError(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if "" in specials:
        raise PrepareError("--special-token: expected a non-empty string, got ''")
    try:  # before any work: an output directory that cannot be made is bad input, not a failure mid-run
        check_output_dir(out_dir, "--out")
    except InputError as e:
        raise PrepareError(str(e)) from None

    sources = {"train": inspect_text_file(input_path)}
    if val_input is not None:
        sources["val"] = inspect_text_file(val_input)
    if tokenizer_dir is not None:
        tok, tok_sources = _load_reused_tokenizer(Path(tokenizer_dir), specials)
        specials = tok.special_tokens
        sources.update(tok_sources)
        if vocab_size is not None and vocab_size != max(tok.vocab) + 1:
            raise PrepareError(
                f"--vocab-size {vocab_size} disagrees with the {max(tok.vocab) + 1} tokens of {tokenizer_dir}"
            )
    else:
        tok = None
        if vocab_size is None:
            raise PrepareError("--vocab-size is required unless --tokenizer is given")
        if vocab_size < 256 + len(specials):
            raise PrepareError(
                f"--vocab-size {vocab_size} is below 256 bytes + {len(specials)} special tokens = {256 + len(specials)}"
            )
    args = {
        "vocab_size": None if tokenizer_dir is not None else vocab_size,
        "special_tokens": specials,
        "val_fraction": val_fraction,
        "tokenizer": "reused" if tokenizer_dir is not None else "trained",
    }
    meta: dict[str, Any] = {"format_version": META_FORMAT_VERSION, "args": args, "sources": sources}
    if not force and (existing := _up_to_date(out_dir, meta)) is not None:
        _log(f"{out_dir}: up to date (same inputs and arguments); nothing to do", progress)
        return existing

    train_path = sources["train"]["path"]
    train_range = (0, sources["train"]["bytes"])
    if val_input is not None:
        val_path, val_range = sources["val"]["path"], (0, sources["val"]["bytes"])
    else:
        size = sources["train"]["bytes"]
        cut = next_safe_cut(train_path, min(size - 1, int(size * (1.0 - val_fraction))), specials)
        if cut is None or cut <= 0:
            raise PrepareError(
                f"{input_path}: cannot split off a validation set (no whitespace or special token "
                f"near the last {val_fraction:.2%}); pass --val-input"
            )
        train_range, val_path, val_range = (0, cut), train_path, (cut, size)
        meta["split"] = {"train_bytes": list(train_range), "val_bytes": list(val_range)}

    out_dir.mkdir(parents=True, exist_ok=True)
    if tok is None:
        _log(f"training a {vocab_size}-token BPE tokenizer on {train_range[1]:,} bytes", progress)
        vocab, merges = train_bpe(
            train_path,
            vocab_size,
            specials,
            num_processes=num_processes,
            byte_range=train_range,
            progress=progress,
        )
        tok = Tokenizer(vocab, merges, specials)
        if len(vocab) < vocab_size:
            _log(f"the text ran out of pairs to merge: the vocabulary has {len(vocab)} tokens", progress)
    tok.save(out_dir / "vocab.json", out_dir / "merges.txt")

    vocab_len = max(tok.vocab) + 1
    dtype = "uint16" if vocab_len <= 1 << 16 else "uint32"
    encode_opts = {"num_processes": num_processes, "progress": progress}
    n_train, max_train = encode_to_npy(
        tok, train_path, train_range, out_dir / "train.npy", dtype, desc="encode train", **encode_opts
    )
    n_val, max_val = encode_to_npy(
        tok, val_path, val_range, out_dir / "val.npy", dtype, desc="encode val", **encode_opts
    )
    meta.update(
        {
            "vocab_size": vocab_len,
            "dtype": dtype,
            "num_tokens": {"train": n_train, "val": n_val},
            "max_token_id": max(max_train, max_val),
            "tokenizer": {
                "type": "bpe",
                "vocab": "vocab.json",
                "merges": "merges.txt",
                "special_tokens": tok.special_tokens,
                "eot_token": tok.eot_token,
            },
            "files": {"train": "train.npy", "val": "val.npy"},
        }
    )
    # Last: its presence marks a finished run.
    write_atomic(out_dir / "meta.json", json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    return meta


def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="python -m lm.prepare",
        description="Train (or reuse) a BPE tokenizer and encode raw UTF-8 text into train.npy / val.npy.",
    )
    parser.add_argument("--input", required=True, help="training text (UTF-8)")
    val = parser.add_mutually_exclusive_group()
    val.add_argument("--val-input", help="validation text (UTF-8)")
    val.add_argument(
        "--val-fraction",
        type=float,
        help=f"hold out this fraction of the end of --input for validation (default {DEFAULT_VAL_FRACTION})",
    )
    parser.add_argument("--vocab-size", type=int, help="vocabulary size: 256 bytes + special tokens + merges")
    parser.add_argument(
        "--special-token",
        action="append",
        default=[],
        dest="special_tokens",
        help='special token, e.g. "<|endoftext|>" (repeatable; the first is the end-of-text token)',
    )
    parser.add_argument("--tokenizer", help="reuse vocab.json and merges.txt from this directory")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--num-processes", type=int, help="worker processes (default: one per CPU)")
    parser.add_argument("--force", action="store_true", help="redo the work even if up to date")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or messages")
    return parser


def _command(args: argparse.Namespace) -> int:
    try:
        meta = prepare(
            args.input,
            args.out,
            vocab_size=args.vocab_size,
            special_tokens=args.special_tokens,
            val_input=args.val_input,
            val_fraction=args.val_fraction,
            tokenizer_dir=args.tokenizer,
            num_processes=args.num_processes,
            progress=not args.quiet,
            force=args.force,
        )
    except OSError as e:  # not bad input but the machine: an unwritable output directory, a full disk
        print(f"error: {e}", file=sys.stderr)
        return 1
    n = meta["num_tokens"]
    print(
        f"{args.out}: vocab {meta['vocab_size']} ({meta['dtype']}), "
        f"{n['train']:,} train tokens, {n['val']:,} val tokens"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`lm-prepare`: exit 0 when written (or up to date), 2 on bad input (one `error:` line), 1 on an OS error."""
    return cli.run(_command, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
