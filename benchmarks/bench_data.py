"""Data-path costs as fractions of one training step, in one process.

    python benchmarks/bench_data.py [--tokens 100_000_000] [--config lm/configs/tiny.yaml] [--threads N]

Writes a uint16 token file of `--tokens` random ids to a temp dir (memory-mapped, not loaded), then times
the check of every token id (`lm.data.token_range`, in ms per GB of token file: from disk, from the page cache,
and from its cache of checked files), `get_batch` (batches/s, tokens/s), one training step of the config's
model, and one evaluation on the fixed validation windows (`torch.no_grad`), and prints each as a fraction of
a step and of a trial.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lm import data
from lm.config import Config
from lm.data import BatchSampler, open_tokens, validation_starts
from lm.model import TransformerLM
from lm.optim import AdamW
from lm.train import evaluate, train_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=lambda s: int(float(s.replace("_", ""))), default=100_000_000)
    ap.add_argument("--config", default=str(Path(__file__).resolve().parent.parent / "lm" / "configs" / "tiny.yaml"))
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = Config.from_file(args.config)
    m, d = config.model, config.data
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["LM_SWEEPS_CACHE"] = str(Path(tmp) / "cache")  # the checked-range cache: a fresh one
        path = Path(tmp) / "tokens.npy"
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint16, shape=(args.tokens,))
        rng = np.random.default_rng(0)
        for i in range(0, args.tokens, 1 << 24):  # written in slices: never the whole array in RAM
            out[i : i + (1 << 24)] = rng.integers(0, m.vocab_size, size=min(1 << 24, args.tokens - i))
        out.flush()
        del out
        gb = path.stat().st_size / 1e9
        past = time.time() - 60  # older than the cache's "just written" window, as prepared data is
        os.utime(path, (past, past))
        disk = _drop_from_page_cache(path)
        t0 = time.perf_counter()
        tokens = open_tokens(path, m.vocab_size, m.context_length)  # the first time: every id, streamed
        open_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        data._scan_range(tokens)  # the same pass, the file now in the page cache
        scan_cached_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        open_tokens(path, m.vocab_size, m.context_length)  # later runs and sweep trials: the cache's answer
        reopen_s = time.perf_counter() - t0

        sampler = BatchSampler(tokens, d.batch_size, m.context_length, seed=0)
        for _ in range(10):
            sampler.next("cpu")
        n = 300
        t0 = time.perf_counter()
        for _ in range(n):
            sampler.next("cpu")
        batch_s = (time.perf_counter() - t0) / n

        model = TransformerLM.from_config(m)
        opt = AdamW(model.parameters(), lr=1e-3)
        x, y = sampler.next("cpu")
        for _ in range(3):
            train_step(model, opt, x, y, 1e-3, grad_clip=1.0)
        steps = 5
        t0 = time.perf_counter()
        for _ in range(steps):
            train_step(model, opt, x, y, 1e-3, grad_clip=1.0)
        step_s = (time.perf_counter() - t0) / steps

        starts = validation_starts(len(tokens), d.val_windows, m.context_length)
        evaluate(model, tokens, starts, config, torch.device("cpu"), contextlib.nullcontext)  # warm up
        t0 = time.perf_counter()
        evaluate(model, tokens, starts, config, torch.device("cpu"), contextlib.nullcontext)
        eval_s = time.perf_counter() - t0

    tokens_per_batch = d.batch_size * m.context_length
    t = config.train  # the loop's schedule: tokens win over steps; this is the mean spacing
    steps_per_eval = t.eval_interval if t.eval_interval_tokens is None else t.eval_interval_tokens / tokens_per_batch
    print(
        f"\n{args.tokens:,}-token uint16 memmap; model {Path(args.config).name} "
        f"(batch {d.batch_size} x {m.context_length}); threads {torch.get_num_threads()}; "
        f"{time.strftime('%Y-%m-%d')}\n"
    )
    print("| measure | value | fraction |")
    print("|---|---|---|")
    first = "from disk" if disk else "page cache not dropped"
    print(f"| open + check of every id, first time ({first}) | {1e3 * open_s / gb:,.0f} ms/GB | once per file |")
    print(f"| the same id pass, file in the page cache | {1e3 * scan_cached_s / gb:,.0f} ms/GB | - |")
    print(f"| open + check again (cached range) | {1e3 * reopen_s:,.1f} ms, any size | every later run or trial |")
    print(
        f"| get_batch | {1 / batch_s:,.0f} batches/s, {tokens_per_batch / batch_s / 1e6:.1f} M tokens/s | "
        f"{batch_s / step_s:.3%} of a step |"
    )
    print(f"| training step | {1e3 * step_s:.1f} ms | 1 step |")
    print(
        f"| evaluation ({len(starts)} windows) | {1e3 * eval_s:.1f} ms | {eval_s / step_s:.2f} steps; "
        f"{eval_s / (eval_s + steps_per_eval * step_s):.2%} of trial time at one eval every "
        f"{steps_per_eval:.3g} steps |"
    )


def _drop_from_page_cache(path: Path) -> bool:
    """Ask the kernel to forget the file's cached pages (they are clean after the fsync): the next read is from
    disk. False where posix_fadvise is missing."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


if __name__ == "__main__":
    main()
