"""What each tracking backend costs the sweep's driver per report, in ms.

    python benchmarks/bench_tracking.py [--reports 200]

Times what the driver does for one trial's report with each backend (sweeps/tracking.py), on one evaluation
record of the real loop's shape: TensorBoard (Ray's TBX writer with our tokens step: one add_scalar per metric and
a flush), W&B in offline mode (run files only), MLflow on a local SQLite store. The baseline is the same loop
with no backend. The cost is paid in the driver, between results, not inside any trial's training step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lm.record import Record  # noqa: E402
from sweeps.space import parse_space  # noqa: E402
from sweeps.tracking import MlflowRuns, WandbRuns, numeric_metrics  # noqa: E402


def report(i: int) -> dict:
    """An evaluation record as the loop reports it (every timing field set)."""
    return Record(
        step=10 * i,
        tokens_seen=2560 * i,
        train_loss=3.0 - i * 1e-3,
        val_loss=3.1 - i * 1e-3,
        val_perplexity=20.0,
        best_val_loss=3.1 - i * 1e-3,
        lr=1e-3,
        tokens_per_s=25_000.0,
        elapsed_s=float(i),
        train_time_s=float(i),
        compile_time_s=0.0,
        eval_time_s=0.1,
        checkpoint_time_s=0.01,
        report_time_s=0.004,
        final_eval=False,
    ).to_dict()


def timed(log, n: int) -> list[float]:
    times = []
    for i in range(1, n + 1):
        metrics = numeric_metrics(report(i))
        t = time.perf_counter()
        log(metrics, 2560 * i)
        times.append((time.perf_counter() - t) * 1e3)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reports", type=int, default=200)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-tracking-"))
    os.environ.setdefault("WANDB_SILENT", "true")
    spec = parse_space(
        {
            "name": "bench",
            "tracking": {
                "wandb": {"project": "bench", "mode": "offline"},
                "mlflow": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}"},
            },
            "parameters": {"optimizer.lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2}},
        }
    )
    config = {"swept": {"optimizer.lr": 1e-3}}
    results: dict[str, list[float]] = {"none": timed(lambda m, s: None, args.reports)}

    from tensorboardX import SummaryWriter

    writer = SummaryWriter(str(tmp / "tb"))

    def tb(metrics, step):
        for key, value in metrics.items():
            writer.add_scalar(f"ray/tune/{key}", value, global_step=step)
        writer.flush()

    results["tensorboard"] = timed(tb, args.reports)
    writer.close()

    wandb_runs = WandbRuns(spec, "bench", tmp)
    wandb_runs.start("t1", config)
    results["wandb offline"] = timed(lambda m, s: wandb_runs.log("t1", m, s), args.reports)
    wandb_runs.end("t1", {"status": "completed"}, failed=False)

    mlflow_runs = MlflowRuns(spec, "bench")
    mlflow_runs.start("t1", config)
    results["mlflow sqlite"] = timed(lambda m, s: mlflow_runs.log("t1", m, s), args.reports)
    mlflow_runs.end("t1", {"status": "completed"}, failed=False)

    base = statistics.median(results["none"])
    print(f"{args.reports} reports of {len(numeric_metrics(report(1)))} metrics each; ms per report in the driver")
    print(f"{'backend':<16}{'median ms':>10}{'p90 ms':>10}{'vs none':>10}")
    for name, times in results.items():
        med, p90 = statistics.median(times), statistics.quantiles(times, n=10)[-1]
        print(f"{name:<16}{med:>10.3f}{p90:>10.3f}{med - base:>+10.3f}")


if __name__ == "__main__":
    main()
