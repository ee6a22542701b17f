"""The files and tables a sweep leaves: results.csv/.parquet, history.parquet, plots/, summary.md, best/, and
the console table.

`write_results(sweep, dir)` writes them all (the driver calls it when a sweep ends; inspect_sweep.py rebuilds
them); `load_sweep` (from sweeps.sweep) reads a sweep back.
"""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from lm.checkpoint import CheckpointError
from lm.files import write_atomic
from lm.record import Key
from sweeps import layout
from sweeps.compute import COMPUTE_FILE, compute, compute_record
from sweeps.lineage import LINEAGE_CSV, lineage_markdown
from sweeps.plots import make_plots
from sweeps.repeats import CONFIG_ID, SEED
from sweeps.sweep import STATUSES, Sweep, load_sweep

__all__ = ["load_sweep", "print_table", "ranked_trials", "summary_markdown", "write_results"]


# ---------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------


def write_results(sweep: Sweep, out_dir: str | Path) -> Path:
    """Write results.csv/.parquet, history.parquet, plots/, summary.md and best/ into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    df = sweep.dataframe
    df.to_csv(out / layout.RESULTS_CSV, index=False)
    df.to_parquet(out / layout.RESULTS_PARQUET, index=False)
    sweep.history.to_parquet(out / layout.HISTORY_PARQUET, index=False)
    make_plots(sweep, out / layout.PLOTS_DIR)
    lineage = sweep.lineage
    if not lineage.empty:
        lineage.to_csv(out / LINEAGE_CSV, index=False)
    write_atomic(out / COMPUTE_FILE, json.dumps(compute_record(sweep), indent=2))
    best_dir = out / layout.BEST_DIR
    config, problem = _best_config(sweep)  # reads the best checkpoint: once, for best/ and the summary
    if config is not None:
        best_dir.mkdir(exist_ok=True)
        (best_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        (best_dir / "checkpoint.txt").write_text(str(sweep.best_checkpoint) + "\n")
    (out / layout.SUMMARY_FILE).write_text(_summary(sweep, out, problem))
    return out


def _best_config(sweep: Sweep) -> tuple[dict[str, Any] | None, str | None]:
    """(the best trial's config, None), or (None, why its checkpoint cannot be read): a damaged or missing best
    checkpoint is reported, never a reason to lose the rest of the results."""
    if sweep.best_checkpoint is None:
        return None, None
    try:
        return sweep.best_config, None
    except CheckpointError as e:
        return None, str(e)


def continue_command(sweep: Sweep, out: Path) -> str:
    tokens = int(sweep.meta.get("max_tokens", 1_000_000)) * 4
    return f"python sweeps/continue_best.py {shlex.quote(str(out))} --train.max_tokens {tokens}"


def summary_markdown(sweep: Sweep, out: Path, top: int = 10) -> str:
    """summary.md: counts, the best trial (and whether its checkpoint reads), the top `top` trials, errors."""
    return _summary(sweep, out, _best_config(sweep)[1], top)


def _summary(sweep: Sweep, out: Path, best_problem: str | None, top: int = 10) -> str:
    df = sweep.dataframe
    name = sweep.meta.get("name", Path(str(sweep.path)).name)
    lines = [f"# Sweep `{name}`", ""]
    counts = {s: int((df["status"] == s).sum()) for s in STATUSES if len(df) and (df["status"] == s).any()}
    lines.append(f"{len(df)} trials: " + ", ".join(f"{n} {s.replace('_', ' ')}" for s, n in counts.items()))
    floor = sweep.entropy_floor
    best = sweep.best_row
    if best is not None:
        lines += ["", "## Best configuration (best mean over seeds)" if sweep.has_repeats else "## Best trial", ""]
        if sweep.has_repeats:
            lines += [_best_config_line(sweep), ""]
        lines.append(
            f"`{best['trial_id']}`: best {sweep.metric} **{best[sweep.best_column]:.4f}**"
            + (f" (entropy floor of the built-in data {floor:.4f} nats/token)" if floor else "")
        )
        for key in [*sweep.swept, *_derived_columns(sweep)]:
            lines.append(f"- `{key}` = {_fmt(best[key])}")
        lines += ["", f"Checkpoint: `{sweep.best_checkpoint}`", ""]
        if best_problem is not None:
            lines.append(f"**This checkpoint cannot be read**: {best_problem}. The trial cannot be continued from it.")
        elif sweep.best_checkpoint is not None:
            lines += ["Continue training it:", "", "```", continue_command(sweep, out), "```"]
    if sweep.has_repeats:
        lines += ["", f"## Configurations: {sweep.metric} mean ± std over seeds", "", _configs_table(sweep, top)]
    lines += ["", f"## Top {min(top, len(df))}", ""]
    cols = ["trial_id", "status", *_repeat_columns(sweep), *sweep.swept, *_derived_columns(sweep)]
    cols += [sweep.best_column, sweep.final_column, Key.tokens_seen]
    lines.append(_markdown_table(ranked_trials(sweep).head(top), cols))
    errors = df[df["status"] == "error"] if len(df) else df
    if len(errors):
        lines += ["", "## Errors", ""]
        lines += [f"- `{r.trial_id}`: {r.error}" for r in errors.itertuples()]
    diverged = df[df["status"] == "diverged"] if len(df) else df
    if len(diverged):
        lines += ["", "## Diverged", ""]
        lines += [f"- `{r.trial_id}` at step {int(r.diverged_step)}" for r in diverged.itertuples()]
    lines += lineage_markdown(sweep.lineage)
    if len(df):
        lines += ["", "## Compute", ""] + [f"- {line}" for line in compute(sweep).lines()]
    lines += ["", "Plots: `plots/`. Tables: `results.csv`, `results.parquet`, `history.parquet`.", ""]
    return "\n".join(lines)


def _repeat_columns(sweep: Sweep) -> list[str]:
    """config_id and train.seed where configurations ran with several seeds."""
    return [CONFIG_ID, SEED] if sweep.has_repeats else []


def _derived_columns(sweep: Sweep) -> list[str]:
    return [k for k in sweep.meta.get("derived") or {} if k in sweep.dataframe.columns]


def _best_config_line(sweep: Sweep) -> str:
    """The best configuration's mean ± std and which of its trials gives the checkpoint."""
    row = sweep.by_config.iloc[0]
    best = sweep.best_row
    return (
        f"Configuration {int(row[CONFIG_ID])}: mean best {sweep.metric} "
        f"**{_mean_std(row, sweep.best_column)}** over {int(row['n'])} seeds. "
        f"Its best seed (train.seed {_fmt(best.get(SEED))}) is the trial below; `best/` and continue_best use its "
        f"checkpoint."
    )


def _mean_std(row: pd.Series, column: str) -> str:
    mean, std = row[f"{column}_mean"], row[f"{column}_std"]
    return f"{mean:.4f} ± {std:.4f}" if not math.isnan(std) else f"{mean:.4f}"


def _configs_table(sweep: Sweep, top: int) -> str:
    table = sweep.by_config.head(top).copy()
    table[f"{sweep.best_column} mean ± std"] = [_mean_std(r, sweep.best_column) for _, r in table.iterrows()]
    keys = [k for k in sweep.swept if k != SEED]
    return _markdown_table(table, [CONFIG_ID, *keys, f"{sweep.best_column} mean ± std", "n", "best_trial_id"])


def ranked_trials(sweep: Sweep) -> pd.DataFrame:
    """Trials ordered best first by their best metric; trials without one last."""
    if sweep.dataframe.empty:
        return sweep.dataframe
    return sweep.dataframe.sort_values(sweep.best_column, ascending=sweep.mode == "min", na_position="last")


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
    cols = ["trial_id", "status", *_repeat_columns(sweep), *sweep.swept, *_derived_columns(sweep)]
    cols += [sweep.best_column, Key.tokens_seen]
    ranked = ranked_trials(sweep).head(top)
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.4g}".format):
        print(ranked[cols].to_string(index=False))
    best = sweep.best_row
    if best is not None and sweep.has_repeats:
        row = sweep.by_config.iloc[0]
        print(
            f"best configuration: {int(row[CONFIG_ID])}, mean {sweep.metric} {_mean_std(row, sweep.best_column)} over "
            f"{int(row['n'])} seeds; its best seed: {best['trial_id']} (train.seed {_fmt(best.get(SEED))}) "
            f"{best[sweep.best_column]:.4f}"
        )
    elif best is not None:
        print(f"best: {best['trial_id']} {sweep.metric} {best[sweep.best_column]:.4f}")
    for line in compute(sweep).lines():
        print(line)
