"""What people do after a sweep: a table per trial, every metric, plots, a summary, the best checkpoint.

    from sweeps.results import load_sweep
    s = load_sweep("sweep_results/lr_sweep")
    s.dataframe        # one row per trial: status, swept parameters, best/final val loss, checkpoint, ...
    s.history          # every reported metric of every trial (long format)
    s.best_config      # the best trial's full lm Config (a dict)
    s.best_checkpoint  # path of the best trial's best training-state checkpoint (state.pt)

Built on Ray's `ResultGrid` (`s.result_grid`). `write_results(s, dir)` writes results.csv/.parquet,
history.parquet, plots/*.png, summary.md and best/ into the experiment directory.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

STATE_FILE = "state.pt"
META_FILE = "sweep_meta.json"
STATUSES = ("completed", "stopped_early", "diverged", "error", "running", "pending", "paused")


@dataclass
class Sweep:
    """A finished (or interrupted) sweep, read back from its experiment directory."""

    path: Path | str
    result_grid: Any  # ray.tune.ResultGrid
    meta: dict[str, Any]
    dataframe: pd.DataFrame
    history: pd.DataFrame

    @property
    def metric(self) -> str:
        return self.meta.get("metric", "val_loss")

    @property
    def mode(self) -> str:
        return self.meta.get("mode", "min")

    @property
    def swept(self) -> list[str]:
        return list(self.meta.get("swept", []))

    @property
    def best_row(self) -> pd.Series | None:
        ok = self.dataframe[self.dataframe["best_val_loss"].notna() & (self.dataframe["status"] != "error")]
        if ok.empty:
            return None
        return ok.sort_values("best_val_loss", ascending=self.mode == "min").iloc[0]

    @property
    def best_trial_id(self) -> str | None:
        row = self.best_row
        return None if row is None else row["trial_id"]

    @property
    def best_config(self) -> dict[str, Any] | None:
        """The best trial's full lm config (nested dict), as its checkpoint recorded it."""
        row = self.best_row
        if row is None or not isinstance(row["best_checkpoint"], str):
            return None
        from lm.checkpoint import read_checkpoint

        return read_checkpoint(row["best_checkpoint"])["config"]

    @property
    def best_checkpoint(self) -> Path | None:
        row = self.best_row
        return None if row is None or not isinstance(row["best_checkpoint"], str) else Path(row["best_checkpoint"])


def load_sweep(path: str | Path, result_grid: Any = None) -> Sweep:
    """Read a sweep's experiment directory (local path or URI) into a `Sweep`."""
    from ray import tune

    local = Path(path).expanduser().resolve() if "://" not in str(path) else None  # pyarrow needs absolute
    path_str = str(local) if local is not None else str(path)
    if local is not None and not (local / META_FILE).is_file():
        raise FileNotFoundError(f"{path_str}: not a sweep directory (no {META_FILE})")
    meta = json.loads((local / META_FILE).read_text()) if local is not None else {}
    if result_grid is None:
        analysis = tune.ExperimentAnalysis(
            path_str, default_metric=meta.get("metric", "val_loss"), default_mode=meta.get("mode", "min")
        )
        result_grid = tune.ResultGrid(analysis)
    trials = result_grid._experiment_analysis.trials  # same order as the results
    rows, histories = [], []
    for trial, result in zip(trials, result_grid, strict=True):
        row, history = _trial_row(trial, result, meta)
        rows.append(row)
        if history is not None:
            histories.append(history)
    df = pd.DataFrame(rows)
    if not df.empty:
        df = df.sort_values("trial_number").reset_index(drop=True)
    history = pd.concat(histories, ignore_index=True) if histories else pd.DataFrame()
    return Sweep(path=local or path_str, result_grid=result_grid, meta=meta, dataframe=df, history=history)


def _trial_row(trial: Any, result: Any, meta: dict[str, Any]) -> tuple[dict[str, Any], pd.DataFrame | None]:
    metric, mode = meta.get("metric", "val_loss"), meta.get("mode", "min")
    config = trial.config or result.config or {}  # a trial that failed before reporting has no result config
    last = result.metrics or {}
    hist = result.metrics_dataframe
    row: dict[str, Any] = {"trial_id": trial.trial_id, "trial_number": _trial_number(trial)}
    for key in meta.get("swept", []):
        row[key] = config.get(key)
    healthy = hist[hist["diverged"] != True] if hist is not None and "diverged" in hist else hist  # noqa: E712
    vals = healthy[metric].dropna() if healthy is not None and metric in healthy else pd.Series(dtype=float)
    row["best_val_loss"] = float(vals.min() if mode == "min" else vals.max()) if len(vals) else math.nan
    row["final_val_loss"] = float(vals.iloc[-1]) if len(vals) else math.nan
    row["tokens_seen"] = int(last.get("tokens_seen", 0) or 0)
    row["diverged"] = bool(last.get("diverged", False))
    row["diverged_step"] = last.get("diverged_step") if row["diverged"] else None
    row["error"] = _error_message(result.error) if result.error is not None else None
    # A trial that ended cleanly before its last step's evaluation was stopped by the scheduler.
    row["stopped_early"] = bool(trial.status == "TERMINATED" and not row["diverged"] and not last.get("final_eval"))
    row["status"] = _status(trial.status, row)
    row["time_s"] = float(last.get("time_total_s", math.nan) or math.nan)
    row["node_id"] = last.get("node_id")
    best = None
    if result.best_checkpoints:
        best_ckpt = result.get_best_checkpoint(metric, mode)
        if best_ckpt is not None:
            best = str(Path(best_ckpt.path) / STATE_FILE)
    row["best_checkpoint"] = best
    row["trial_path"] = str(result.path)
    if hist is not None and not hist.empty:
        keep = [c for c in hist.columns if c in _HISTORY_COLUMNS]
        h = hist[keep].copy()
        h.insert(0, "trial_id", trial.trial_id)
        for key in meta.get("swept", []):
            h[key] = config.get(key)
        return row, h
    return row, None


_HISTORY_COLUMNS = (
    "step",
    "tokens_seen",
    "train_loss",
    "val_loss",
    "val_perplexity",
    "best_val_loss",
    "lr",
    "elapsed_s",
    "train_time_s",
    "compile_time_s",
    "eval_time_s",
    "checkpoint_time_s",
    "report_time_s",
    "final_eval",
    "diverged",
    "training_iteration",
    "time_total_s",
    "node_id",
)


def _trial_number(trial: Any) -> int:
    """Tune's 1-based creation order: the head of the experiment tag ("3_optimizer.lr=..."). Optuna trial ids
    are random hex, so the id itself carries no order."""
    head = str(getattr(trial, "experiment_tag", "") or "").split("_", 1)[0]
    return int(head) if head.isdigit() else 0


def _status(ray_status: str, row: dict[str, Any]) -> str:
    if row["error"] is not None or ray_status == "ERROR":
        return "error"
    if row["diverged"]:
        return "diverged"
    if ray_status == "TERMINATED":
        return "stopped_early" if row["stopped_early"] else "completed"
    return {"RUNNING": "running", "PAUSED": "paused"}.get(ray_status, "pending")


def _error_message(error: Any) -> str:
    """The exception's own line (e.g. 'ValueError: ...'), not Ray's wrapper and traceback."""
    text = str(error)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for line in reversed(lines):
        if re.match(r"^[\w.]+(Error|Exception|Exit|Interrupt)\b", line):
            return line[:500]
    return (lines[-1] if lines else repr(error))[:500]


# ---------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------


def write_results(sweep: Sweep, out_dir: str | Path) -> Path:
    """Write results.csv/.parquet, history.parquet, plots/, summary.md and best/ into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    df = sweep.dataframe
    df.to_csv(out / "results.csv", index=False)
    df.to_parquet(out / "results.parquet", index=False)
    sweep.history.to_parquet(out / "history.parquet", index=False)
    from sweeps.plots import make_plots

    make_plots(sweep, out / "plots")
    best = sweep.best_row
    best_dir = out / "best"
    if best is not None and sweep.best_checkpoint is not None:
        best_dir.mkdir(exist_ok=True)
        config = sweep.best_config
        (best_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        (best_dir / "checkpoint.txt").write_text(str(sweep.best_checkpoint) + "\n")
    (out / "summary.md").write_text(summary_markdown(sweep, out))
    return out


def continue_command(sweep: Sweep, out: Path) -> str:
    tokens = int(sweep.meta.get("max_tokens", 1_000_000)) * 4
    return f"python sweeps/continue_best.py {shlex.quote(str(out))} --train.max_tokens {tokens}"


def summary_markdown(sweep: Sweep, out: Path, top: int = 10) -> str:
    df = sweep.dataframe
    name = sweep.meta.get("name", Path(str(sweep.path)).name)
    lines = [f"# Sweep `{name}`", ""]
    counts = {s: int((df["status"] == s).sum()) for s in STATUSES if len(df) and (df["status"] == s).any()}
    lines.append(f"{len(df)} trials: " + ", ".join(f"{n} {s.replace('_', ' ')}" for s, n in counts.items()))
    floor = _entropy_floor(sweep)
    best = sweep.best_row
    if best is not None:
        lines += [
            "",
            "## Best trial",
            "",
            f"`{best['trial_id']}`: best {sweep.metric} **{best['best_val_loss']:.4f}**"
            + (f" (entropy floor of the built-in data {floor:.4f} nats/token)" if floor else ""),
        ]
        for key in sweep.swept:
            lines.append(f"- `{key}` = {_fmt(best[key])}")
        lines += [
            "",
            f"Checkpoint: `{sweep.best_checkpoint}`",
            "",
            "Continue training it:",
            "",
            "```",
            continue_command(sweep, out),
            "```",
        ]
    lines += ["", f"## Top {min(top, len(df))}", ""]
    cols = ["trial_id", "status", *sweep.swept, "best_val_loss", "final_val_loss", "tokens_seen"]
    ranked = ranked_trials(sweep).head(top)
    lines.append(_markdown_table(ranked, cols))
    errors = df[df["status"] == "error"]
    if len(errors):
        lines += ["", "## Errors", ""]
        lines += [f"- `{r.trial_id}`: {r.error}" for r in errors.itertuples()]
    diverged = df[df["status"] == "diverged"]
    if len(diverged):
        lines += ["", "## Diverged", ""]
        lines += [f"- `{r.trial_id}` at step {int(r.diverged_step)}" for r in diverged.itertuples()]
    lines += ["", "Plots: `plots/`. Tables: `results.csv`, `results.parquet`, `history.parquet`.", ""]
    return "\n".join(lines)


def ranked_trials(sweep: Sweep) -> pd.DataFrame:
    """Trials ordered best first by their best metric; trials without one last."""
    return sweep.dataframe.sort_values("best_val_loss", ascending=sweep.mode == "min", na_position="last")


def _entropy_floor(sweep: Sweep) -> float | None:
    data = (sweep.meta.get("base_config") or {}).get("data", {})
    if data.get("train_path") is not None:
        return None
    try:
        from lm.stories import builtin_data_dir

        return json.loads((builtin_data_dir() / "meta.json").read_text()).get("entropy_floor_nats")
    except Exception:  # the floor is a nicety in a summary; never fail the results for it
        return None


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return "" if value is None else str(value)


def _markdown_table(df: pd.DataFrame, cols: list[str]) -> str:
    cols = [c for c in cols if c in df.columns]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in df.iterrows():
        out.append("| " + " | ".join(_fmt(row[c]) for c in cols) + " |")
    return "\n".join(out)


def print_table(sweep: Sweep, top: int = 20) -> None:
    """The final console table: trials ranked by their best metric."""
    df = sweep.dataframe
    if df.empty:
        print("no trials")
        return
    cols = ["trial_id", "status", *sweep.swept, "best_val_loss", "tokens_seen"]
    ranked = ranked_trials(sweep).head(top)
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.4g}".format):
        print(ranked[cols].to_string(index=False))
    best = sweep.best_row
    if best is not None:
        print(f"best: {best['trial_id']} {sweep.metric} {best['best_val_loss']:.4f}")
