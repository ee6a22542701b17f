"""Where a CPU sweep's time goes: an 8-trial sweep of ~60 s trials, end to end.

    python benchmarks/bench_sweep.py [--trials 8] [--trial-tokens 1_400_000] [--cpus-per-trial 1] [--compile]
                                     [--live] [--set tracking.wandb.project=bench ...]

Runs the real driver (`sweeps/run_sweep.py`: local Ray, reused actors, FIFO so every trial runs its whole
budget) on the built-in corpus with the tiny model, then prints: Ray start-up (init + shutdown, timed on
their own first), sweep wall time, the sum of time inside training steps, utilization =
sum / (wall x concurrent slots), and per trial: start overhead (Ray's trial time minus the loop's own
time), evaluation, checkpoint and report time; with --compile also each trial's compile time (inductor's
on-disk cache and the reused worker processes are what make later trials cheap).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

from lm.record import Key

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=8)
    # Default trial length: the one the README's sweep figures use (about a minute per trial at 1 thread).
    ap.add_argument("--trial-tokens", type=lambda s: int(float(s.replace("_", ""))), default=1_400_000)
    ap.add_argument("--cpus-per-trial", type=int, default=1)
    ap.add_argument("--compile", action="store_true", help="trials run with train.compile")
    ap.add_argument("--allocator", default="auto", help="run_sweep --allocator: auto (tcmalloc if installed), system")
    ap.add_argument("--eval-tokens", type=lambda s: int(float(s.replace("_", ""))), default=100_000)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="run_sweep --set, e.g. tracking")
    ap.add_argument("--live", action="store_true", help="without --quiet: per-result lines and the status line")
    args = ap.parse_args()
    import ray

    from sweeps.cluster import start_ray
    from sweeps.run_sweep import main as run_sweep  # sets Ray's environment defaults

    t0 = time.perf_counter()
    start_ray(None, os.cpu_count())  # Ray's own start-up, without the allocator's runtime env
    t1 = time.perf_counter()
    ray.shutdown()
    ray_init_s, ray_shutdown_s = t1 - t0, time.perf_counter() - t1

    slots = max(1, (os.cpu_count() or 1) // args.cpus_per_trial)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        space = {
            "name": "bench",
            "base_config": str(ROOT / "lm" / "configs" / "tiny.yaml"),
            "search": {"algorithm": "random", "seed": 0, "max_concurrent_trials": slots},
            "scheduler": {"type": "fifo"},
            "num_samples": args.trials,
            "resources_per_trial": {"cpu": args.cpus_per_trial, "gpu": 0},
            "stop": {"max_tokens": args.trial_tokens},
            "parameters": {
                "optimizer.lr": {"distribution": "log_uniform_values", "min": 1e-3, "max": 5e-3},
                "train.eval_interval_tokens": {"value": args.eval_tokens},
                **({"train.compile": {"value": True}} if args.compile else {}),
            },
        }
        (tmp / "space.yaml").write_text(yaml.safe_dump(space))
        t0 = time.perf_counter()
        wall_start = time.time()
        code = run_sweep(
            [
                "--space",
                str(tmp / "space.yaml"),
                "--storage-path",
                str(tmp / "out"),
                *([] if args.live else ["--quiet"]),
                "--allocator",
                args.allocator,
                *[arg for item in args.set for arg in ("--set", item)],
            ]
        )
        driver_s = time.perf_counter() - t0
        wall = (tmp / "out" / "bench" / "summary.md").stat().st_mtime - wall_start  # results written
        if code != 0:
            raise SystemExit(f"sweep failed with exit code {code}")
        hist = pd.read_parquet(tmp / "out" / "bench" / "history.parquet")

    last = hist.sort_values(Key.tokens_seen).groupby("trial_id").tail(1).sort_values("trial_id")  # trial order
    n = len(last)
    train_s = last[Key.train_time_s].sum()
    loop_s = last[Key.elapsed_s].sum()
    ray_trial_s = last["time_total_s"].sum()
    reports = hist.groupby("trial_id").size().mean()
    per_report = last[Key.report_time_s].mean() / max(reports - 1, 1)  # report_time_s counts earlier reports
    compile_s = last[Key.compile_time_s]
    print(
        f"\n{n} trials x {args.trial_tokens:,} tokens, {slots} concurrent x {args.cpus_per_trial} CPU, "
        f"{'train.compile, ' if args.compile else ''}allocator {args.allocator}, "
        f"{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}\n"
    )
    rows = [
        ("Ray start-up (init + shutdown, alone)", f"{ray_init_s:.1f} s + {ray_shutdown_s:.1f} s"),
        ("sweep wall time (driver start to results written)", f"{wall:.1f} s"),
        ("driver time (to exit, after Ray's shutdown)", f"{driver_s:.1f} s"),
        ("sum of time inside training steps", f"{train_s:.1f} s"),
        ("training tokens/s per trial (tokens / time in steps)", f"{last[Key.tokens_seen].sum() / train_s:,.0f}"),
        ("utilization = train / (wall x slots)", f"{train_s / (wall * slots):.2f}"),
        ("utilization of the trial phase = train / sum of Ray trial time", f"{train_s / ray_trial_s:.2f}"),
        ("per-trial start overhead (Ray trial time - loop time)", f"{(ray_trial_s - loop_s) / n:.2f} s"),
        (
            "per-trial gap between trials (wall x slots - Ray trial time) / trials",
            f"{(wall * slots - ray_trial_s) / n:.2f} s",
        ),
        ("evaluation per trial", f"{last[Key.eval_time_s].mean():.2f} s ({reports:.0f} evals)"),
        (
            "compile per trial (first step): mean, share of trial time; each trial in order",
            f"{compile_s.mean():.1f} s = {compile_s.sum() / ray_trial_s:.1%} of trial time; "
            f"{' '.join(f'{v:.1f}' for v in compile_s)} s",
        ),
        ("checkpoint writes per trial", f"{last[Key.checkpoint_time_s].mean():.2f} s"),
        (
            "tune.report per report (with checkpoint)",
            f"{1e3 * per_report:.0f} ms",
        ),
    ]
    print("| measure | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")


if __name__ == "__main__":
    main()
