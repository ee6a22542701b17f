"""A sweep read back from its experiment directory: one row per trial, every reported metric, the best trial.

    from sweeps.results import load_sweep      # (also importable from here)
    s = load_sweep("sweep_results/lr_sweep")
    s.dataframe        # one row per trial: status, swept parameters, best/final metric, checkpoint, ...
    s.history          # every reported metric of every trial (long format)
    s.best_config      # the best trial's full lm Config (a dict)
    s.best_checkpoint  # path of the best trial's best training-state checkpoint (state.pt)

The metric columns are named after the sweep's metric: `best_val_loss` and `final_val_loss` for a val_loss
sweep, `best_train_loss` for a train_loss one. `load_sweep` reads a local sweep from plain files only (Ray's
per-trial params.json/result.json/error.txt and the driver's trial_status.jsonl, through `sweeps.ray_compat`):
nothing in the directory is unpickled, and a lost or damaged Ray experiment state loses no results.
`build_sweep` works from the `TrialRecord`s alone.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from lm.cli import InputError
from lm.record import Key
from sweeps import layout
from sweeps.ray_compat import NODE_ID, TIME_TOTAL_S, TRAINING_ITERATION, TrialRecord, read_trial_files, read_trials
from sweeps.trial_status import read_status


class NotASweepError(InputError):
    """The path given as a sweep's experiment directory holds no sweep (one-line message)."""


STATUSES = ("completed", "stopped_early", "diverged", "error", "running", "pending", "paused")
HISTORY_COLUMNS = (*Key, TRAINING_ITERATION, TIME_TOTAL_S, NODE_ID)


@dataclass
class Sweep:
    """A finished (or interrupted) sweep, read back from its experiment directory."""

    path: Path | str
    meta: dict[str, Any]
    dataframe: pd.DataFrame
    history: pd.DataFrame

    @property
    def metric(self) -> str:
        return self.meta.get("metric", Key.val_loss)

    @property
    def mode(self) -> str:
        return self.meta.get("mode", "min")

    @property
    def best_column(self) -> str:
        """The results column of each trial's best metric value, e.g. "best_val_loss"."""
        return f"best_{self.metric}"

    @property
    def final_column(self) -> str:
        """The results column of each trial's last metric value, e.g. "final_val_loss"."""
        return f"final_{self.metric}"

    @property
    def swept(self) -> list[str]:
        return list(self.meta.get("swept", []))

    @property
    def entropy_floor(self) -> float | None:
        """nats/token: the exact source entropy of the built-in corpus when the sweep trained on it."""
        return self.meta.get("entropy_floor")

    @property
    def result_grid(self) -> Any:
        """Ray's own ResultGrid of this experiment (read on demand)."""
        from sweeps.ray_compat import result_grid

        return result_grid(str(self.path), self.metric, self.mode)

    @property
    def best_row(self) -> pd.Series | None:
        df = self.dataframe
        ok = df[df[self.best_column].notna() & (df["status"] != "error")] if not df.empty else df
        if ok.empty:
            return None
        return ok.sort_values(self.best_column, ascending=self.mode == "min").iloc[0]

    @property
    def best_trial_id(self) -> str | None:
        row = self.best_row
        return None if row is None else row["trial_id"]

    @property
    def best_config(self) -> dict[str, Any] | None:
        """The best trial's full lm config (nested dict), as its checkpoint recorded it."""
        checkpoint = self.best_checkpoint
        if checkpoint is None:
            return None
        from lm.checkpoint import read_checkpoint

        return read_checkpoint(checkpoint)["config"]

    @property
    def best_checkpoint(self) -> Path | None:
        row = self.best_row
        return None if row is None or not isinstance(row["best_checkpoint"], str) else Path(row["best_checkpoint"])


def load_sweep(path: str | Path) -> Sweep:
    """Read a sweep's experiment directory (local path or URI) into a `Sweep`.

    Raises NotASweepError (an InputError) when a local `path` has no sweep_meta.json.
    """
    local = Path(path).expanduser().resolve() if "://" not in str(path) else None  # pyarrow needs absolute
    path_str = str(local) if local is not None else str(path)
    if local is not None and not (local / layout.META_FILE).is_file():
        raise NotASweepError(f"{path}: not a sweep directory (no {layout.META_FILE})")
    metric, mode = Key.val_loss, "min"
    if local is None:  # URI storage: through Ray's experiment state
        return build_sweep(path_str, {}, read_trials(path_str, metric, mode))
    meta = json.loads((local / layout.META_FILE).read_text())
    metric, mode = meta.get("metric", metric), meta.get("mode", mode)
    return build_sweep(local, meta, read_trial_files(local, metric, mode, read_status(local)))


def build_sweep(path: Path | str, meta: dict[str, Any], records: list[TrialRecord]) -> Sweep:
    """A `Sweep` from its metadata (sweep_meta.json) and its trials; no Ray needed."""
    sweep = Sweep(path=path, meta=meta, dataframe=pd.DataFrame(), history=pd.DataFrame())
    rows, histories = [], []
    for record in records:
        rows.append(_trial_row(sweep, record))
        if record.history is not None:
            h = record.history[[c for c in record.history.columns if c in HISTORY_COLUMNS]].copy()
            h.insert(0, "trial_id", record.trial_id)
            for key in sweep.swept:
                h[key] = record.config.get(key)
            histories.append(h)
    df = pd.DataFrame(rows).rename(columns=str)  # plain str labels (Key members are str enums) for parquet
    sweep.dataframe = df.sort_values("trial_number").reset_index(drop=True) if not df.empty else df
    sweep.history = pd.concat(histories, ignore_index=True) if histories else pd.DataFrame()
    return sweep


def _trial_row(sweep: Sweep, record: TrialRecord) -> dict[str, Any]:
    last, hist, metric = record.last, record.history, sweep.metric
    row: dict[str, Any] = {"trial_id": record.trial_id, "trial_number": record.number}
    for key in sweep.swept:
        row[key] = record.config.get(key)
    healthy = hist[hist[Key.diverged] != True] if hist is not None and Key.diverged in hist else hist  # noqa: E712
    vals = healthy[metric].dropna() if healthy is not None and metric in healthy else pd.Series(dtype=float)
    row[sweep.best_column] = float(vals.min() if sweep.mode == "min" else vals.max()) if len(vals) else math.nan
    row[sweep.final_column] = float(vals.iloc[-1]) if len(vals) else math.nan
    row[Key.tokens_seen] = int(last.get(Key.tokens_seen, 0) or 0)
    row[Key.diverged] = bool(last.get(Key.diverged, False))
    row[Key.diverged_step] = last.get(Key.diverged_step) if row[Key.diverged] else None
    row["error"] = _error_message(record.error) if record.error is not None else None
    # A trial that ended cleanly before its last step's evaluation was stopped by the scheduler.
    finished = record.ray_status == "TERMINATED" and not row[Key.diverged]
    row["stopped_early"] = bool(finished and not last.get(Key.final_eval))
    row["status"] = _status(record.ray_status, row)
    row["time_s"] = float(last.get(TIME_TOTAL_S, math.nan) or math.nan)
    row[NODE_ID] = last.get(NODE_ID)
    row["best_checkpoint"] = record.best_checkpoint
    row["trial_path"] = record.path
    return row


def _status(ray_status: str, row: dict[str, Any]) -> str:
    if row["error"] is not None or ray_status == "ERROR":
        return "error"
    if row[Key.diverged]:
        return "diverged"
    if ray_status == "TERMINATED":
        return "stopped_early" if row["stopped_early"] else "completed"
    return {"RUNNING": "running", "PAUSED": "paused"}.get(ray_status, "pending")


def _error_message(text: str) -> str:
    """The exception's own line (e.g. 'ValueError: ...'), not Ray's wrapper and traceback."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for line in reversed(lines):
        if re.match(r"^[\w.]+(Error|Exception|Exit|Interrupt)\b", line):
            return line[:500]
    return (lines[-1] if lines else text)[:500]
