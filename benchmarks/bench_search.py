"""How well the search finds good configurations for its compute, against an exhaustive grid with a known answer.

    python benchmarks/bench_search.py            # 2 cores: 45 min; 17 min once the grid (28 min) is saved
    python benchmarks/bench_search.py --quick    # a smaller problem, one search seed: about 5 minutes
    python benchmarks/bench_search.py --rerun-grid          # train the grid again instead of reusing it
    python benchmarks/bench_search.py --only "start-up" --seeds 10 --skip-live   # some strategies, more seeds

The problem: the tiny model on the built-in corpus, a fixed token budget per trial, the demo's parameters
(learning rate log-spaced over 1e-4..3e-2, batch size 16/32/64, warmup as a fraction of the steps). The
learning rate is searched as `lr_step`, an integer index into that log-spaced grid (a derived `optimizer.lr`),
so every configuration a strategy can pick is one the grid trained.

1. The grid: every configuration at 2 training seeds, trained to the full budget by the real driver
   (`sweeps.run_sweep.sweep`, grid search, FIFO), every evaluation kept. Saved to benchmarks/results/ and reused.
2. Facts about the problem from the grid: the best configuration (mean over seeds), the seed-to-seed spread
   (the noise floor for "within X %"), and the Spearman rank correlation between the loss at each ASHA rung
   and the final loss, pooled (what ASHA compares: equal tokens) and within each batch size.
3. Strategies x search seeds. The searcher and scheduler are the shipped ones (`search_algorithm(spec)`,
   `scheduler(spec)`, on Ray Tune, 2 trials at once as on 2 cores); their trials replay the grid's measured
   validation curves for seed 0 (what a sweep's trials, all at `train.seed` 0, would train) instead of training
   again, each evaluation after its measured time x `--time-scale`, so trials interleave as they would live.
   PBT changes a trial's learning rate mid-run, which no grid curve holds: it trains live (`--skip-live` drops it).
   A strategy recommends its best trial that trained the full budget; its regret is that configuration's
   grid mean loss over seeds against the grid's best, in %; tokens are counted as trained (stopped trials
   count what they trained); the wall time of a replayed strategy is estimated from the grid's measured loop
   and per-trial overhead times with 2 slots.
4. Defaults: the shipped default (TPE + ASHA) is varied one setting at a time (grace period, reduction factor,
   TPE start-up trials, number of trials) to show which values the defaults should take.

Prints markdown tables; writes benchmarks/results/search_{grid,runs}[_quick].csv and the plot
docs/search_regret_vs_tokens.png (--quick: benchmarks/results/ only).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from lm.record import Key

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
TOKENS = Key.tokens_seen.value  # the column, the schedulers' clock and the replayed metric
KEY = ["lr_step", "batch_size", "warmup_fraction"]  # a configuration; the grid adds "seed"
DEFAULT = "TPE + ASHA (default)"


@dataclass(frozen=True)
class Problem:
    """The benchmark's fixed problem: the demo's parameters on a grid, at a fixed token budget per trial."""

    name: str
    max_tokens: int
    eval_interval_tokens: int
    lr_steps: int = 8
    lr_min: float = 1e-4
    lr_max: float = 3e-2
    batch_sizes: tuple[int, ...] = (16, 32, 64)
    warmup_fractions: tuple[float, ...] = (0.02, 0.1)
    seeds: tuple[int, ...] = (0, 1)
    slots: int = 2

    @property
    def lr_expr(self) -> str:
        """The derived optimizer.lr: lr_step 0 .. lr_steps-1 spaced evenly in log between lr_min and lr_max."""
        return f"{self.lr_min!r} * {self.lr_max / self.lr_min!r} ** (lr_step / {self.lr_steps - 1})"

    def lr(self, step: int) -> float:
        return self.lr_min * (self.lr_max / self.lr_min) ** (step / (self.lr_steps - 1))

    @property
    def configs(self) -> int:
        return self.lr_steps * len(self.batch_sizes) * len(self.warmup_fractions)

    def space(
        self,
        search: dict[str, Any],
        scheduler: dict[str, Any],
        num_samples: int,
        grid: bool = False,
        live: bool = False,
    ) -> dict:
        """A sweep space over this problem (the grid's own with grid=True: every configuration x seed; live=True:
        the learning rate a log-uniform range, for PBT to perturb)."""
        params: dict[str, Any] = {
            "lr_step": {"values": list(range(self.lr_steps))}
            if grid
            else {"distribution": "int_uniform", "min": 0, "max": self.lr_steps - 1},
            "data.batch_size": {"values": list(self.batch_sizes)},
            "optimizer.warmup_fraction": {"values": list(self.warmup_fractions)},
            "train.eval_interval_tokens": {"value": self.eval_interval_tokens},
        }
        if grid:
            params["train.seed"] = {"values": list(self.seeds)}
        if live:
            del params["lr_step"]
            params["optimizer.lr"] = {"distribution": "log_uniform_values", "min": self.lr_min, "max": self.lr_max}
        return {
            "name": self.name,
            "base_config": str(ROOT / "lm" / "configs" / "tiny.yaml"),
            "metric": {"name": "val_loss", "goal": "minimize"},
            "search": search,
            "scheduler": scheduler,
            "num_samples": num_samples,
            "resources_per_trial": {"cpu": 1, "gpu": 0},
            "stop": {"max_tokens": self.max_tokens, "divergence_loss": 10.0},
            "checkpoint": {"num_to_keep": 1},
            "parameters": params,
            **({} if live else {"derived": {"optimizer.lr": self.lr_expr}}),
        }


FULL = Problem("search_grid", max_tokens=400_000, eval_interval_tokens=25_000)
QUICK = Problem(
    "search_grid_quick",
    max_tokens=100_000,
    eval_interval_tokens=12_500,
    lr_steps=4,
    batch_sizes=(16, 64),
    warmup_fractions=(0.05,),
)


# ---------------------------------------------------------------------------------------------------- the grid
def run_grid(problem: Problem) -> pd.DataFrame:
    """Train every configuration x seed to the full budget with the real driver; one row per evaluation."""
    from sweeps.run_sweep import sweep

    space = problem.space({"algorithm": "grid"}, {"type": "fifo"}, num_samples=1, grid=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "space.yaml"
        path.write_text(yaml.safe_dump(space))
        t0 = time.perf_counter()
        result = sweep(path, storage_path=Path(tmp) / "out", max_concurrent=problem.slots, num_cpus=problem.slots)
        wall = time.perf_counter() - t0
        hist = result.history
    hist = hist[hist["val_loss"].notna()]

    def column(path: str, values: tuple) -> pd.Series:  # a parameter with one value is no column of the history
        return hist[path] if path in hist else pd.Series(values[0], index=hist.index)

    grid = pd.DataFrame(
        {
            "lr_step": hist["lr_step"].astype(int),
            "lr": hist["lr_step"].astype(int).map(problem.lr),
            "batch_size": column("data.batch_size", problem.batch_sizes).astype(int),
            "warmup_fraction": column("optimizer.warmup_fraction", problem.warmup_fractions).astype(float),
            "seed": column("train.seed", problem.seeds).astype(int),
            TOKENS: hist[TOKENS].astype(int),
            "val_loss": hist["val_loss"].astype(float),
            "elapsed_s": hist["elapsed_s"].astype(float),
        }
    ).sort_values([*KEY, "seed", TOKENS])
    grid.attrs["wall_s"] = wall
    print(f"grid: {grid.groupby([*KEY, 'seed']).ngroups} trials in {wall:.0f} s", flush=True)
    return grid


def load_grid(problem: Problem, rerun: bool) -> pd.DataFrame:
    """The saved grid of this problem (benchmarks/results/<name>.csv), trained first when missing or `rerun`."""
    path = RESULTS / f"{problem.name}.csv"
    meta_path = path.with_suffix(".json")
    if path.exists() and meta_path.exists() and not rerun:
        if json.loads(meta_path.read_text()).get("problem") == problem_dict(problem):
            print(f"grid: reusing {path.relative_to(ROOT)} (--rerun-grid trains it again)", flush=True)
            return with_overhead(pd.read_csv(path), json.loads(meta_path.read_text())["wall_s"], problem)
        print(f"grid: {path.relative_to(ROOT)} is of another problem definition: training it again", flush=True)
    grid = run_grid(problem)
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    grid.to_csv(tmp, index=False, float_format="%.6g")
    os.replace(tmp, path)
    meta = {
        "problem": problem_dict(problem),
        "wall_s": round(grid.attrs["wall_s"], 1),
        "date": time.strftime("%Y-%m-%d"),
        "cpus": os.cpu_count(),
    }
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    return with_overhead(grid, meta["wall_s"], problem)


def with_overhead(grid: pd.DataFrame, wall_s: float, problem: Problem) -> pd.DataFrame:
    """The grid with attrs["trial_overhead_s"]: its wall time x slots not spent in the trials' own loops, per trial
    (Ray's scheduling, worker reuse, result handling)."""
    loops = grid.sort_values(TOKENS).groupby([*KEY, "seed"])["elapsed_s"].last()
    grid.attrs["trial_overhead_s"] = max(0.0, (wall_s * problem.slots - loops.sum()) / len(loops))
    return grid


def problem_dict(problem: Problem) -> dict[str, Any]:
    return json.loads(json.dumps(problem.__dict__))  # tuples as lists: comparable with the saved JSON


# -------------------------------------------------------------------------------------- facts about the problem
def finals(grid: pd.DataFrame) -> pd.DataFrame:
    """Each configuration's final val loss: mean over seeds, seed-to-seed spread (max - min), one column per seed."""
    last = grid.sort_values(TOKENS).groupby([*KEY, "seed"]).tail(1)
    wide = last.pivot_table(index=KEY, columns="seed", values="val_loss")
    out = pd.DataFrame({"mean": wide.mean(axis=1), "spread": wide.max(axis=1) - wide.min(axis=1)})
    return out.join(wide.add_prefix("seed_")).sort_values("mean")


def at_tokens(grid: pd.DataFrame, tokens: int) -> pd.Series:
    """Each configuration x seed's loss at its first evaluation at or past `tokens` (what ASHA compares there)."""
    seen = grid[grid[TOKENS] >= tokens].sort_values(TOKENS)
    return seen.groupby([*KEY, "seed"])["val_loss"].first()


def spearman(a: pd.Series, b: pd.Series) -> float:
    """Spearman's rank correlation: Pearson's on the ranks (ties averaged)."""
    joined = pd.concat([a, b], axis=1, join="inner").dropna()
    if len(joined) < 3:
        return float("nan")
    r = joined.rank()
    return float(np.corrcoef(r.iloc[:, 0], r.iloc[:, 1])[0, 1])


def rung_table(grid: pd.DataFrame, problem: Problem, rungs: list[int], reduction_factor: float) -> list[str]:
    """Markdown: per rung, Spearman(loss at the rung, final loss) pooled and per batch size, where the grid's best
    configuration ranks there, and how many large-batch configurations survive the 1/reduction_factor cut."""
    end = grid.sort_values(TOKENS).groupby([*KEY, "seed"])["val_loss"].last()  # each trial's final loss
    best = finals(grid).index[0]
    top_end = set(end.groupby(KEY).mean().nsmallest(max(1, int(problem.configs / reduction_factor))).index)
    head = "| rung (tokens) | Spearman, pooled | " + " | ".join(f"batch {b}" for b in problem.batch_sizes)
    lines = [
        head + " | rank of the best config (of " + f"{problem.configs}) | best third at the rung / at the end: "
        f"batch {max(problem.batch_sizes)} |",
        "|" + "---|" * (len(problem.batch_sizes) + 4),
    ]
    big = max(problem.batch_sizes)
    for rung in rungs:
        at = at_tokens(grid, rung)
        cells = [f"{spearman(at, end):.2f}"]
        for b in problem.batch_sizes:
            sel = at.index.get_level_values("batch_size") == b
            cells.append(f"{spearman(at[sel], end[end.index.get_level_values('batch_size') == b]):.2f}")
        mean_at = at.groupby(KEY).mean().sort_values()
        rank = list(mean_at.index).index(best) + 1 if best in mean_at.index else float("nan")
        top_at = list(mean_at.index[: len(top_end)])
        big_at = sum(1 for k in top_at if k[1] == big)
        big_end = sum(1 for k in top_end if k[1] == big)
        cells += [f"{rank}", f"{big_at} / {big_end} of {len(top_end)}"]
        lines.append(f"| {rung:,} | " + " | ".join(cells) + " |")
    return lines


# ------------------------------------------------------------------------------------------------- strategies
@dataclass(frozen=True)
class Strategy:
    """A search (the space's `search:` section) with a scheduler (`scheduler:`), for num_samples trials."""

    label: str
    search: dict[str, Any]
    scheduler: dict[str, Any]
    num_samples: int
    live: bool = False
    """Trains (PBT); else the trials replay the grid's curves."""
    group: str = "strategy"
    """strategy (the comparison) or default (a variation of the shipped default's settings)."""

    def seeded(self, seed: int) -> Strategy:
        return replace(self, search={**self.search, "seed": seed})


def strategies(problem: Problem, num_samples: int, quick: bool) -> list[Strategy]:
    """The comparison (same number of trials) and the one-at-a-time variations of the default's settings."""
    budget = problem.max_tokens
    asha = {"type": "asha"}  # the shipped defaults: tokens_seen clock, grace budget / 16, reduction factor 3
    tpe = {"algorithm": "optuna", "sampler": "tpe"}
    rand = {"algorithm": "random"}
    out = [
        Strategy("random + FIFO", rand, {"type": "fifo"}, num_samples),
        Strategy("random + ASHA", rand, asha, num_samples),
        Strategy(DEFAULT, tpe, asha, num_samples),
        Strategy("TPE + HyperBand", tpe, {"type": "hyperband"}, num_samples),
        Strategy(
            "PBT",
            rand,
            {
                "type": "pbt",
                "time_attr": TOKENS,
                "perturbation_interval": budget // 4,
                "perturb": ["optimizer.lr"],
            },
            num_samples // 2,  # each trial trains the whole budget: half the trials, about the others' tokens
            live=True,
        ),
    ]
    if quick:
        return out
    d = "TPE + ASHA"
    return out + [
        Strategy(f"{d}, grace 1/8", tpe, {**asha, "grace_period": budget // 8}, num_samples, group="default"),
        Strategy(f"{d}, grace 1/4", tpe, {**asha, "grace_period": budget // 4}, num_samples, group="default"),
        Strategy(f"{d}, reduction 2", tpe, {**asha, "reduction_factor": 2}, num_samples, group="default"),
        Strategy(f"{d}, reduction 4", tpe, {**asha, "reduction_factor": 4}, num_samples, group="default"),
        Strategy(f"{d}, start-up 2", {**tpe, "n_startup_trials": 2}, asha, num_samples, group="default"),
        Strategy(f"{d}, start-up 10", {**tpe, "n_startup_trials": 10}, asha, num_samples, group="default"),
        Strategy(f"{d}, {num_samples // 2} trials", tpe, asha, num_samples // 2, group="default"),
        Strategy(f"{d}, {num_samples * 2} trials", tpe, asha, num_samples * 2, group="default"),
    ]


def curve_key(lr_step: int, batch_size: int, warmup_fraction: float) -> str:
    return f"{int(lr_step)}|{int(batch_size)}|{float(warmup_fraction):g}"


def replay_trial(
    config: dict[str, Any], curves: dict[str, list[list[float]]], time_scale: float, checkpoints: bool
) -> None:
    """Ray Tune function trainable: report the grid's measured curve of this configuration (seed 0), each
    evaluation after its measured loop time x time_scale; with `checkpoints`, a checkpoint per report to resume
    from (HyperBand pauses and resumes trials)."""
    from ray import tune

    points = curves[curve_key(config["lr_step"], config["data.batch_size"], config["optimizer.warmup_fraction"])]
    start = 0
    if (checkpoint := tune.get_checkpoint()) is not None:
        with checkpoint.as_directory() as d:
            start = int((Path(d) / "next").read_text())
    before = points[start - 1][2] if start else 0.0
    for i in range(start, len(points)):
        tokens, loss, elapsed = points[i]
        time.sleep(max(0.0, elapsed - before) * time_scale)
        before = elapsed
        metrics = {"val_loss": loss, TOKENS: int(tokens), "wall": time.time()}
        if not checkpoints:
            tune.report(metrics)
            continue
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "next").write_text(str(i + 1))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))


def replay(strategy: Strategy, problem: Problem, grid: pd.DataFrame, time_scale: float, storage: Path) -> pd.DataFrame:
    """Run a strategy with the shipped searcher and scheduler on Ray Tune, its trials replaying the grid (seed 0);
    one row per report: trial, wall, tokens_seen, val_loss and the configuration (KEY)."""
    from ray import tune

    from sweeps.schedulers import scheduler
    from sweeps.search import search_algorithm
    from sweeps.space import param_space, parse_space

    spec = parse_space(problem.space(strategy.search, strategy.scheduler, strategy.num_samples), "bench", ROOT)
    seed0 = grid[grid["seed"] == problem.seeds[0]].sort_values(TOKENS)
    curves = {curve_key(*k): g[[TOKENS, "val_loss", "elapsed_s"]].to_numpy().tolist() for k, g in seed0.groupby(KEY)}
    optuna = spec.search.algorithm == "optuna"
    if __name__ != "__main__":  # imported (tests, a notebook): workers cannot import benchmarks/ by name
        import ray.cloudpickle

        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    tuner = tune.Tuner(
        tune.with_resources(
            tune.with_parameters(
                replay_trial, curves=curves, time_scale=time_scale, checkpoints=spec.scheduler.type == "hyperband"
            ),
            {"cpu": 1},
        ),
        param_space=param_space(spec),
        tune_config=tune.TuneConfig(
            metric="val_loss",
            mode="min",
            search_alg=search_algorithm(spec, problem.slots),
            scheduler=scheduler(spec),
            num_samples=spec.num_samples,
            max_concurrent_trials=problem.slots if optuna else None,
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=f"replay-{abs(hash((strategy.label, json.dumps(strategy.search))))}",
            storage_path=str(storage),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            verbose=0,
        ),
    )
    rows = []
    for result in tuner.fit():
        df = result.metrics_dataframe
        if df is None or df.empty:
            continue
        c = result.config
        rows.append(
            pd.DataFrame(
                {
                    "trial": str(result.path).rsplit("/", 1)[-1],
                    "wall": df["wall"],
                    TOKENS: df[TOKENS].astype(int),
                    "val_loss": df["val_loss"],
                    "lr_step": int(c["lr_step"]),
                    "batch_size": int(c["data.batch_size"]),
                    "warmup_fraction": float(c["optimizer.warmup_fraction"]),
                }
            )
        )
    return pd.concat(rows, ignore_index=True).sort_values("wall", kind="stable")


def progress(reports: pd.DataFrame, problem: Problem, grid: pd.DataFrame) -> pd.DataFrame:
    """The strategy's state after each report, in time order: cumulative tokens trained, the recommended
    configuration (the best final loss among trials that trained the full budget) and its grid mean loss."""
    fin = finals(grid)
    full = grid[grid["seed"] == problem.seeds[0]].groupby(KEY)[TOKENS].max()
    trained: dict[str, int] = {}
    best: tuple[float, tuple] | None = None
    rows = []
    for r in reports.itertuples(index=False):
        key = (r.lr_step, r.batch_size, r.warmup_fraction)
        trained[r.trial] = max(trained.get(r.trial, 0), r.tokens_seen)
        if r.tokens_seen >= full[key] and (best is None or r.val_loss < best[0]):
            best = (r.val_loss, key)
        rows.append(
            {
                "tokens": sum(trained.values()),
                "recommended": None if best is None else best[1],
                "loss": float("nan") if best is None else fin.loc[best[1], "mean"],
            }
        )
    return pd.DataFrame(rows)


def estimated_wall(reports: pd.DataFrame, problem: Problem, grid: pd.DataFrame) -> float:
    """Seconds on `problem.slots` slots: each trial's measured loop time to where it stopped, plus the grid's
    per-trial overhead, shared evenly over the slots."""
    seed0 = grid[grid["seed"] == problem.seeds[0]].set_index([*KEY, TOKENS])
    total = 0.0
    for _, t in reports.groupby("trial"):
        last = t.loc[t[TOKENS].idxmax()]
        key = (last.lr_step, last.batch_size, last.warmup_fraction)
        total += seed0.loc[(*key, last.tokens_seen), "elapsed_s"] + grid.attrs["trial_overhead_s"]
    return total / problem.slots


def run_live(strategy: Strategy, problem: Problem, storage: Path, best_mean: float) -> dict[str, Any]:
    """Train a strategy for real with the driver (PBT: its exploits change a trial's learning rate mid-run). Its
    result from the sweep's own results table: the best final val loss of the trials that completed the budget
    (measured, one seed: no grid mean), its regret, the tokens trained, the trials and the measured wall time."""
    from sweeps.run_sweep import sweep

    space = problem.space(strategy.search, strategy.scheduler, strategy.num_samples, live=True)
    space["name"] = f"live-{strategy.search.get('seed', 0)}"
    path = storage / f"{space['name']}.yaml"
    path.write_text(yaml.safe_dump(space))
    t0 = time.perf_counter()
    result = sweep(path, storage_path=storage, max_concurrent=problem.slots, num_cpus=problem.slots)
    wall = time.perf_counter() - t0
    df = result.dataframe
    loss = float(df[df["status"] == "completed"][result.final_column].min())  # NaN when none completed
    return {
        "trials": len(df),
        "loss": loss,
        "regret_pct": 100 * (loss / best_mean - 1),
        "tokens": int(df[TOKENS].sum()),
        "wall_s": wall,
        "replay_s": wall,
    }


def regret_at(prog: pd.DataFrame, tokens: float, best_mean: float) -> float:
    """Regret in % of the recommendation when `tokens` had been trained (inf: nothing trained the full budget)."""
    seen = prog[prog["tokens"] <= tokens]["loss"].dropna()
    return 100 * (seen.iloc[-1] / best_mean - 1) if not seen.empty else float("inf")


def plot(
    curves: dict[str, list[pd.DataFrame]],
    points: dict[str, list[tuple[float, float]]],
    grid_tokens: float,
    best_mean: float,
    path: Path,
    title: str,
) -> None:
    """Best-so-far regret vs cumulative tokens (as a share of the grid's), median over search seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, progs in curves.items():
        xs = np.linspace(0, max(p["tokens"].max() for p in progs), 400)
        ys = np.median([[regret_at(p, x, best_mean) for x in xs] for p in progs], axis=0)
        ok = np.isfinite(ys)
        ax.step(100 * xs[ok] / grid_tokens, ys[ok], where="post", label=label)
    for label, pts in points.items():
        x, y = np.median([p[0] for p in pts]), np.median([p[1] for p in pts])
        ax.plot(100 * x / grid_tokens, y, "o", label=f"{label} (end of run)")
    ax.set_xlabel("tokens trained, % of the exhaustive grid's")
    ax.set_ylabel("regret of the recommended config, %")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.axhline(2.0, color="grey", lw=0.8, ls="--")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smaller problem and one search seed: a few minutes")
    ap.add_argument("--rerun-grid", action="store_true", help="train the grid again instead of reusing the saved one")
    ap.add_argument("--seeds", type=int, default=None, help="search seeds per strategy (default 3; --quick: 1)")
    ap.add_argument("--num-samples", type=int, default=None, help="trials per strategy (default 16; --quick: 8)")
    ap.add_argument("--time-scale", type=float, default=0.02, help="replayed evaluation delay / measured time")
    ap.add_argument("--skip-live", action="store_true", help="leave out PBT (the one strategy that trains)")
    ap.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="TEXT",
        help="run only the strategies whose label contains TEXT (repeatable; the default is always run); results "
        "go to *_selected files",
    )
    args = ap.parse_args()
    problem = QUICK if args.quick else FULL
    seeds = args.seeds or (1 if args.quick else 3)
    num_samples = args.num_samples or (8 if args.quick else 16)
    t_start = time.perf_counter()

    grid = load_grid(problem, args.rerun_grid)
    fin = finals(grid)
    best_key, best_mean = fin.index[0], float(fin["mean"].iloc[0])
    grid_tokens = float(grid.groupby([*KEY, "seed"])[TOKENS].max().sum())
    rel_spread = 100 * fin["spread"] / fin["mean"]
    b = problem.max_tokens
    print(f"\n## The problem ({problem.configs} configurations x {len(problem.seeds)} seeds, {b:,} tokens each)\n")
    print("| fact | value |\n|---|---|")
    print(
        f"| best configuration (lr, batch, warmup fraction) | {problem.lr(best_key[0]):.3g}, {best_key[1]}, "
        f"{best_key[2]:g} |"
    )
    print(
        f"| its val loss: mean over seeds (seeds) | {best_mean:.4f} "
        f"({', '.join(f'{v:.4f}' for v in fin.filter(like='seed_').iloc[0])}) |"
    )
    print(
        f"| seed-to-seed spread (max - min), % of the mean: the best / median of the best 10 / of all | "
        f"{rel_spread.iloc[0]:.2f} / {rel_spread.iloc[:10].median():.2f} / {rel_spread.median():.2f} |"
    )
    print(f"| configurations within 2% of the best (mean) | {int((fin['mean'] <= 1.02 * best_mean).sum())} |")
    one_seed = fin[f"seed_{problem.seeds[0]}"].idxmin()  # what every trial at train.seed 0 can tell at best
    print(
        f"| the whole grid at seed {problem.seeds[0]} only (what a sweep sees) recommends | lr "
        f"{problem.lr(one_seed[0]):.3g}, batch {one_seed[1]}, warmup {one_seed[2]:g}: regret "
        f"{100 * (fin.loc[one_seed, 'mean'] / best_mean - 1):.2f}% |"
    )
    second = float(fin["mean"].iloc[1]) if len(fin) > 1 else float("nan")
    print(f"| the second-best configuration's regret (the least above 0) | {100 * (second / best_mean - 1):.2f}% |")
    print(f"| grid tokens (every trial, both seeds) | {grid_tokens / 1e6:.1f} M |")
    print("\nBest configurations (val loss, mean over seeds):\n")
    print("| lr | batch | warmup | mean | spread |\n|---|---|---|---|---|")
    for k, row in fin.head(6).iterrows():
        print(f"| {problem.lr(k[0]):.3g} | {k[1]} | {k[2]:g} | {row['mean']:.4f} | {row['spread']:.4f} |")
    rungs = sorted({b // 16, b // 8, 3 * b // 16, b // 4, b // 2, 9 * b // 16})
    print("\n## Does an early rung predict the final loss? (Spearman; ASHA compares trials at equal tokens)\n")
    print("\n".join(rung_table(grid, problem, rungs, 3)))

    from sweeps.ray_compat import set_env_defaults

    set_env_defaults()  # as the driver: no tables from Ray, no warning per checkpoint
    import ray

    runs: list[dict[str, Any]] = []
    curves: dict[str, list[pd.DataFrame]] = {}
    points: dict[str, list[tuple[float, float]]] = {}
    plan = strategies(problem, num_samples, args.quick)
    if args.only:
        plan = [s for s in plan if s.label == DEFAULT or any(text in s.label for text in args.only)]
    with tempfile.TemporaryDirectory() as tmp:
        ray.init(num_cpus=problem.slots, include_dashboard=False, log_to_driver=False)
        try:
            for strategy in [s for s in plan if not s.live]:
                for seed in range(seeds):
                    t0 = time.perf_counter()
                    reports = replay(strategy.seeded(seed), problem, grid, args.time_scale, Path(tmp))
                    prog = progress(reports, problem, grid)
                    curves.setdefault(strategy.label, []).append(prog)
                    runs.append(
                        {
                            "strategy": strategy.label,
                            "group": strategy.group,
                            "seed": seed,
                            "trials": reports["trial"].nunique(),
                            "tokens": int(prog["tokens"].iloc[-1]),
                            "loss": float(prog["loss"].iloc[-1]),
                            "regret_pct": regret_at(prog, math.inf, best_mean),
                            "wall_s": estimated_wall(reports, problem, grid),
                            "replay_s": time.perf_counter() - t0,
                        }
                    )
                    print(
                        f"{strategy.label} seed {seed}: regret {runs[-1]['regret_pct']:.2f}%, "
                        f"{runs[-1]['tokens'] / 1e6:.2f} M tokens",
                        flush=True,
                    )
        finally:
            ray.shutdown()
        for strategy in [s for s in plan if s.live and not args.skip_live]:
            for seed in range(seeds):
                summary = run_live(strategy.seeded(seed), problem, Path(tmp), best_mean)
                points.setdefault(strategy.label, []).append((summary["tokens"], summary["regret_pct"]))
                runs.append({"strategy": strategy.label, "group": strategy.group, "seed": seed, **summary})
                print(
                    f"{strategy.label} seed {seed}: regret {summary['regret_pct']:.2f}%, "
                    f"{summary['tokens'] / 1e6:.2f} M tokens, {summary['wall_s']:.0f} s",
                    flush=True,
                )

    df = pd.DataFrame(runs)
    equal_tokens = float(df[df["strategy"] == DEFAULT]["tokens"].median())
    for i, row in df.iterrows():
        progs = curves.get(row["strategy"])
        if progs is not None:
            df.loc[i, "regret_at_default_tokens_pct"] = regret_at(progs[int(row["seed"])], equal_tokens, best_mean)
    suffix = ("_quick" if args.quick else "") + ("_selected" if args.only else "")
    df.to_csv(RESULTS / f"search_runs{suffix}.csv", index=False, float_format="%.6g")
    print(
        f"\n## Strategies: {num_samples} trials each (PBT: a population of {num_samples // 2}), median over "
        f"{seeds} search seed(s) [min - max]\n"
    )
    print(
        "| strategy | regret % | tokens, % of the grid's | est. wall (2 slots) | regret % at the default's tokens "
        f"({equal_tokens / 1e6:.2f} M) |\n|---|---|---|---|---|"
    )
    for group in ("strategy", "default"):
        for label, g in df[df["group"] == group].groupby("strategy", sort=False):
            at = g.get("regret_at_default_tokens_pct")
            at_cell = "(trains live)" if at is None or at.isna().all() else _mid(at)
            print(
                f"| {label} | {_mid(g['regret_pct'])} | {_mid(100 * g['tokens'] / grid_tokens, '.1f')} | "
                f"{_mid(g['wall_s'], '.0f')} s | {at_cell} |"
            )
    title = (
        f"{problem.configs} configs x {b:,} tokens, tiny LM, {time.strftime('%Y-%m-%d')}, "
        f"{os.cpu_count()} CPUs; median of {seeds} search seed(s)"
    )
    main_curves = {k: v for k, v in curves.items() if k in set(df[df["group"] == "strategy"]["strategy"])}
    out = ROOT / "docs" / "search_regret_vs_tokens.png"
    if suffix:
        out = RESULTS / f"search_regret_vs_tokens{suffix}.png"
    plot(main_curves, points, grid_tokens, best_mean, out, title)
    print(
        f"\nplot: {out.relative_to(ROOT)}; runs: benchmarks/results/search_runs{suffix}.csv; "
        f"benchmark time {time.perf_counter() - t_start:.0f} s",
        flush=True,
    )


def _mid(values: pd.Series, fmt: str = ".2f") -> str:
    """median [min - max], or the one value."""
    v = values.astype(float)
    if len(v) == 1:
        return f"{v.iloc[0]:{fmt}}"
    return f"{v.median():{fmt}} [{v.min():{fmt}} - {v.max():{fmt}}]"


if __name__ == "__main__":
    main()
