"""GPU figures (run on a CUDA machine): 17M training throughput, and trials sharing one GPU.

    python benchmarks/bench_gpu.py throughput [--steps 30] [--batch 128]
    python benchmarks/bench_gpu.py sharing [--tokens 8_000_000] [--share 0.25]
    python benchmarks/bench_gpu.py throughput|sharing --smoke   # on CPU, tiny: checks the script itself

`throughput`: the CS336 TinyStories 17M config (vocab 10000, context 256, d_model 512, 4 layers, 16 heads,
d_ff 1344) training on random tokens, tokens/s for fp32, bf16 autocast, and bf16 compiled two ways (the
training path's `lm.compile_layers` and whole-model `torch.compile`), each with the compile time.
`sharing`: the same model in a real sweep (`sweeps/run_sweep.py`, FIFO, fixed config) once as ONE trial
alone on the GPU, then as 1/share trials sharing it (`resources_per_trial.gpu: share`); prints per-trial
tokens/s (tokens seen / time inside training steps), total tokens/s and mean GPU utilization (sampled
from nvidia-smi every 0.5 s) for both, and the ratio of totals.
`--smoke` runs either part on the CPU with a tiny model, fp32, and CPU trials instead of GPU shares, in
under two minutes: a GPU machine's time is scarce, so the script's own bugs are found before.
"""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lm  # noqa: E402
from lm.config import ModelConfig  # noqa: E402
from lm.record import Key  # noqa: E402
from lm.train import autocast_for, train_step  # noqa: E402

MODEL = ModelConfig(10000, 256, 512, 4, 16, 1344)
SMOKE_MODEL = ModelConfig(257, 32, 32, 2, 2, 88)  # --smoke: seconds on a CPU


def throughput(steps: int, batch: int, smoke: bool = False) -> None:
    device = torch.device("cpu" if smoke else "cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    x = torch.randint(0, MODEL.vocab_size, (batch, MODEL.context_length), device=device)
    y = torch.randint(0, MODEL.vocab_size, (batch, MODEL.context_length), device=device)
    rows = []
    no_compile = lambda m: m  # noqa: E731
    low = None if smoke else torch.bfloat16  # no bf16 on a CPU without bf16 units: many times slower than fp32
    for name, dtype, compile_fn in (
        ("fp32 (tf32)", None, no_compile),
        ("bf16", low, no_compile),
        ("bf16 + compile_layers (train.compile)", low, lm.compile_layers),
        ("bf16 + torch.compile(model)", low, torch.compile),
    ):
        torch.manual_seed(0)
        model = lm.TransformerLM.from_config(MODEL, device=device)
        opt = lm.AdamW(model.parameters(), lr=1e-3)
        step_model = compile_fn(model)

        step = functools.partial(
            train_step, step_model, opt, x, y, 1e-3, grad_clip=1.0, autocast=autocast_for(device, dtype)
        )

        sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
        t0 = time.perf_counter()
        step()
        sync()
        first = time.perf_counter() - t0
        for _ in range(5):
            step()
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        dt = (time.perf_counter() - t0) / steps
        tps = batch * MODEL.context_length / dt
        rows.append((name, tps, 1e3 * dt, first, tps * lm.flops_per_token(MODEL) / 1e12))
    print(
        f"\n{'SMOKE (CPU, tiny, fp32 only)' if smoke else '17M config'}, batch {batch} x {MODEL.context_length}, "
        f"{_device_name()}, "
        f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}\n"
    )
    print("| precision | tokens/s | ms/step | first step (incl. compile) s | model TFLOP/s |\n|---|---|---|---|---|")
    for name, tps, ms, first, tflops in rows:
        print(f"| {name} | {tps:,.0f} | {ms:.1f} | {first:.1f} | {tflops:.1f} |")


def _device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"


def _gpu_utilization(samples: list[float], stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
            )
        except FileNotFoundError:  # no NVIDIA driver (--smoke on a CPU machine)
            return
        if out.returncode == 0 and out.stdout.strip():
            samples.append(float(out.stdout.split()[0]))
        stop.wait(0.5)


def _sweep(
    tmp: Path, trials: int, share: float, tokens: int, data: Path, smoke: bool = False
) -> tuple[pd.DataFrame, float, float]:
    from sweeps.run_sweep import main as run_sweep

    base = {
        "model": {
            k: getattr(MODEL, k) for k in ("vocab_size", "context_length", "d_model", "num_layers", "num_heads", "d_ff")
        },
        "data": {"train_path": str(data / "train.npy"), "val_path": str(data / "val.npy"), "batch_size": 64},
        "train": {"max_tokens": tokens, "eval_interval_tokens": tokens // 4, "compile": not smoke},
    }
    (tmp / "base.yaml").write_text(yaml.safe_dump(base))
    space = {
        "name": f"share{trials}",
        "base_config": str(tmp / "base.yaml"),
        "search": {"algorithm": "grid", "max_concurrent_trials": trials},
        "scheduler": {"type": "fifo"},
        "resources_per_trial": {"cpu": max(1, (os.cpu_count() or 2) // trials // 2), "gpu": 0 if smoke else share},
        "parameters": {"train.seed": {"values": list(range(trials))}},
    }
    (tmp / f"space{trials}.yaml").write_text(yaml.safe_dump(space))
    samples: list[float] = []
    stop = threading.Event()
    sampler = threading.Thread(target=_gpu_utilization, args=(samples, stop), daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    code = run_sweep(["--space", str(tmp / f"space{trials}.yaml"), "--storage-path", str(tmp / "out"), "--quiet"])
    wall = time.perf_counter() - t0
    stop.set()
    if code != 0:
        raise SystemExit(f"sweep exited {code}")
    hist = pd.read_parquet(tmp / "out" / f"share{trials}" / "history.parquet")
    last = hist.sort_values(Key.tokens_seen).groupby("trial_id").tail(1)
    return last, wall, float(np.mean(samples)) if samples else float("nan")


def sharing(tokens: int, share: float, smoke: bool = False) -> None:
    trials = int(round(1 / share))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "data"
        data.mkdir()
        rng = np.random.default_rng(0)
        n_train = 200_000 if smoke else 20_000_000
        np.save(data / "train.npy", rng.integers(0, MODEL.vocab_size, n_train, dtype=np.uint16))
        np.save(data / "val.npy", rng.integers(0, MODEL.vocab_size, 200_000, dtype=np.uint16))
        rows = []
        for n, s in ((1, 1.0), (trials, share)):
            last, wall, util = _sweep(tmp, n, s, tokens, data, smoke)
            per_trial = (last[Key.tokens_seen] / last[Key.train_time_s]).tolist()
            rows.append((n, s, per_trial, sum(per_trial), n * tokens / wall, util))
    print(
        f"\n{_device_name()}, {'SMOKE: tiny model, CPU trials' if smoke else '17M model bf16 + compile'}, "
        f"{tokens:,} tokens per trial, "
        f"{time.strftime('%Y-%m-%d')}\n"
    )
    print(
        "| trials x GPU share | per-trial tokens/s (in steps) | total tokens/s (in steps) | total tokens/s (wall) "
        "| mean GPU util |\n|---|---|---|---|---|"
    )
    for n, s, per, total, wall_tps, util in rows:
        print(f"| {n} x {s:g} | {', '.join(f'{p:,.0f}' for p in per)} | {total:,.0f} | {wall_tps:,.0f} | {util:.0f}% |")
    print(f"\nshared / alone, total tokens/s in steps: {rows[1][3] / rows[0][3]:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("part", choices=("throughput", "sharing"))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=128)
    # 8M tokens per trial: long enough to measure sharing, short enough for a 15-minute GPU budget.
    ap.add_argument("--tokens", type=lambda s: int(float(s.replace("_", ""))), default=8_000_000)
    ap.add_argument("--share", type=float, default=0.25)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model, fp32: check the script without a GPU")
    args = ap.parse_args()
    global MODEL
    if args.smoke:
        MODEL = SMOKE_MODEL
        args.steps, args.batch, args.tokens = min(args.steps, 5), min(args.batch, 8), min(args.tokens, 20_000)
    elif not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA GPU (or --smoke to check the script on a CPU)")
    if args.part == "throughput":
        throughput(args.steps, args.batch, args.smoke)
    else:
        sharing(args.tokens, args.share, args.smoke)


if __name__ == "__main__":
    main()
