"""A sweep read back from its experiment directory: one row per trial, every reported metric, the best trial.

    from sweeps.results import load_sweep      # (also importable from here)
    s = load_sweep("sweep_results/lr_sweep")
    s.dataframe        # one row per trial: status, swept parameters, best/final metric, checkpoint, ...
    s.history          # every reported metric of every trial (long format)
    s.best_config      # the best trial's full lm Config (a dict)
    s.by_config        # one row per configuration (trials equal but for train.seed): n, mean, std of the metric
    s.best_checkpoint  # path of the best trial's best training-state checkpoint (state.pt)
    s.lineage          # PBT/PB2: which trial continued from whose checkpoint, when, what changed

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
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from lm.cli import InputError
from lm.record import Key
from sweeps import derived as derived_exprs
from sweeps import layout
from sweeps import repeats as seeds
from sweeps.ray_compat import NODE_ID, TIME_TOTAL_S, TRAINING_ITERATION, TrialRecord, read_trial_files
from sweeps.search import START_ATTR, START_META, start_name
from sweeps.storage import Storage, is_uri, scrub
from sweeps.trial_status import parse_status


class NotASweepError(InputError):
    """The path given as a sweep's experiment directory holds no sweep (one-line message)."""


STATUSES = ("completed", "stopped_early", "diverged", "error", "running", "pending", "paused")
HISTORY_COLUMNS = (*Key, TRAINING_ITERATION, TIME_TOTAL_S, "timestamp", NODE_ID)  # timestamp: Ray's wall-clock second


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
    def lineage(self) -> pd.DataFrame:
        """PBT/PB2 exploits, one row each, oldest first: trial, from_trial, at_tokens, at_step, changes ("path: old ->
        new; ..."), params (JSON), time (sweeps/lineage.py; read from the trials' run directories; empty for other
        schedulers)."""
        from sweeps.lineage import read_lineage

        return read_lineage(self.path)

    @property
    def result_grid(self) -> Any:
        """Ray's own ResultGrid of this experiment (read on demand)."""
        from sweeps.ray_compat import result_grid

        return result_grid(str(self.path), self.metric, self.mode)

    @property
    def best_row(self) -> pd.Series | None:
        """The best trial: the best by its best metric, or, where configurations ran with several seeds, the best
        seed of the configuration with the best mean (`by_config`)."""
        df = self.dataframe
        ok = df[df[self.best_column].notna() & (df["status"] != "error")] if not df.empty else df
        if ok.empty:
            return None
        if self.has_repeats:
            ok = ok[ok[seeds.CONFIG_ID] == self.by_config[seeds.CONFIG_ID].iloc[0]]
        return ok.sort_values(self.best_column, ascending=self.mode == "min").iloc[0]

    @property
    def has_repeats(self) -> bool:
        """Some configuration ran with more than one seed (repeats, or a swept train.seed)."""
        df = self.dataframe
        # Seeds vary only with repeats or a swept train.seed (the seed column); trials that merely drew equal values
        # (or a sweep with nothing swept) are no repeats.
        return seeds.SEED in df.columns and bool(df[seeds.CONFIG_ID].duplicated().any())

    @property
    def by_config(self) -> pd.DataFrame:
        """One row per configuration (trials whose swept values are equal but for train.seed), best mean first:
        config_id, its swept values, n (trials with a metric value), `best_<metric>_mean`, `best_<metric>_std`
        (sample std, NaN for n < 2), best_trial_id (its best seed) and trials (errored ones included)."""
        return seeds.by_config(self.dataframe, self.swept, self.best_column, self.mode)

    @property
    def best_trial_id(self) -> str | None:
        row = self.best_row
        return None if row is None else row["trial_id"]

    @property
    def best_config(self) -> dict[str, Any] | None:
        """The best trial's full lm config (nested dict), as its checkpoint recorded it."""
        checkpoint = self.local_best_checkpoint()
        if checkpoint is None:
            return None
        from lm.checkpoint import read_checkpoint

        return read_checkpoint(checkpoint)["config"]

    @property
    def best_checkpoint(self) -> Path | str | None:
        """The best trial's best state.pt: a local Path, or a URI string for a sweep in remote storage
        (`local_best_checkpoint` downloads it)."""
        row = self.best_row
        if row is None or not isinstance(row["best_checkpoint"], str):
            return None
        return row["best_checkpoint"] if is_uri(row["best_checkpoint"]) else Path(row["best_checkpoint"])

    def load_best_model(self, device: str = "cpu") -> Any:
        """The best trial's `TransformerLM` with its best checkpoint's weights, on `device`, in eval mode.
        Raises CheckpointError when no trial left a checkpoint or it cannot be read."""
        from lm.checkpoint import CheckpointError
        from lm.generate import load_model

        checkpoint = self.local_best_checkpoint()
        if checkpoint is None:
            raise CheckpointError(f"{scrub(self.path)}: no trial of this sweep left a checkpoint")
        return load_model(checkpoint, device)[0]

    def continue_best(self, max_tokens: int | None = None, overrides: dict[str, Any] | None = None) -> Any:
        """Train the best trial on from its best checkpoint, as continue_best.py does, to `max_tokens` (and any
        dotted `overrides`); returns lm.train's TrainSummary. Output: SWEEP/best/continued unless
        `overrides["train.out_dir"]` says otherwise."""
        from lm.train import train
        from sweeps.continue_best import continued_config

        wanted = {**({"train.max_tokens": max_tokens} if max_tokens is not None else {}), **(overrides or {})}
        config, checkpoint = continued_config(self, wanted)
        return train(config, resume_from=checkpoint)

    def local_best_checkpoint(self, cache: Path | None = None) -> Path | None:
        """The best checkpoint's state.pt on this machine: the file itself for a local sweep; for a sweep in remote
        storage, a copy downloaded through Ray's Checkpoint API into `cache` (default:
        $LM_SWEEPS_CACHE/checkpoints/<sweep name>/<trial dir>/<checkpoint>), downloaded once."""
        checkpoint = self.best_checkpoint
        if checkpoint is None or isinstance(checkpoint, Path):
            return checkpoint
        from ray import tune

        from lm.stories import default_cache_root

        ckpt_uri = checkpoint.rsplit("/", 1)[0]
        trial_dir, ckpt_name = ckpt_uri.rsplit("/", 2)[-2:]
        root = cache or default_cache_root() / "checkpoints" / str(self.meta.get("name", "sweep"))
        dest = root / trial_dir / ckpt_name
        if not (dest / layout.STATE_FILE).is_file():
            storage = Storage.at(str(self.path))
            remote = tune.Checkpoint(storage.path(trial_dir, ckpt_name), filesystem=storage.fs)
            partial = dest.with_name(dest.name + ".partial")  # a download cut short is never taken for whole
            shutil.rmtree(partial, ignore_errors=True)
            remote.to_directory(str(partial))
            shutil.rmtree(dest, ignore_errors=True)
            partial.replace(dest)
        return dest / layout.STATE_FILE


def load_sweep(path: str | Path) -> Sweep:
    """Read a sweep's experiment directory (a local path, or a URI such as s3://bucket/sweeps/NAME) into a `Sweep`,
    from plain files only (sweep_meta.json, trial_status.jsonl, Ray's per-trial params.json/result.json/error.txt).

    Raises NotASweepError (an InputError, one line) when `path` holds no sweep or its storage cannot be opened.
    """
    storage = open_storage(path)
    text = storage.read_text(layout.META_FILE)
    if text is None:
        raise NotASweepError(f"{storage.show()}: not a sweep directory (no {layout.META_FILE})")
    meta = json.loads(text)
    metric, mode = meta.get("metric", Key.val_loss), meta.get("mode", "min")
    status = parse_status(storage.read_text(layout.STATUS_FILE) or "")
    records = read_trial_files(storage, metric, mode, status)
    return build_sweep(storage.local_path or storage.show(), meta, records)


def open_storage(path: str | Path) -> Storage:
    """The storage of a sweep directory; NotASweepError (one line) when pyarrow cannot open or list it."""
    try:
        storage = Storage.at(path)
        storage.is_dir()  # the first request: a missing bucket or bad credentials show here
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise NotASweepError(f"{scrub(path)}: cannot open this sweep's storage ({first})") from None
    return storage


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
    if not df.empty:
        sweep.dataframe.insert(2, seeds.CONFIG_ID, seeds.config_ids(sweep.dataframe, sweep.swept))
    sweep.history = pd.concat(histories, ignore_index=True) if histories else pd.DataFrame()
    return sweep


def _trial_row(sweep: Sweep, record: TrialRecord) -> dict[str, Any]:
    last, hist, metric = record.last, record.history, sweep.metric
    row: dict[str, Any] = {"trial_id": record.trial_id, "trial_number": record.number}
    for key in sweep.swept:
        row[key] = record.config.get(key)
    if sweep.meta.get("repeats", 1) > 1 or seeds.SEED in sweep.swept:
        first_seed = sweep.meta.get("base_config", {}).get("train", {}).get("seed", 0)
        row[seeds.SEED] = seeds.trial_seed(record.config, first_seed)
    row.update(_derived_row(sweep.meta, record.config))
    if sweep.meta.get(START_META):  # which trials were search.points_to_evaluate's named starts
        row[START_ATTR] = start_name(sweep.meta, record.number, record.config)
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


def _derived_row(meta: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """The trial's derived fields (sweeps/derived.py), computed again from its searcher config, the free names'
    constants and the base config in sweep_meta.json; None where they cannot be (a sweep's meta from before)."""
    texts: dict[str, str] = meta.get("derived") or {}
    if not texts:
        return {}
    free = {**meta.get("free_names", {}), **{k: v for k, v in config.items() if "." not in k and k in meta["swept"]}}
    base = meta.get("base_config", {})

    def lookup(name: str) -> Any:
        if name in config:  # as trial_config: a continuous draw for an integer field is rounded
            value = config[name]
            return int(round(value)) if isinstance(value, float) and isinstance(_base_value(base, name), int) else value
        if "." not in name:
            return free[name]
        section, _, key = name.partition(".")
        return base[section][key]

    try:
        parsed = {k: derived_exprs.parse(k, t, lambda _: True, set(free)) for k, t in texts.items()}
        values = derived_exprs.compute(parsed, derived_exprs.order(parsed), lookup)
    except (derived_exprs.DerivedError, KeyError):
        return {key: None for key in texts}
    return {key: _like(value, _base_value(base, key)) for key, value in values.items()}


def _base_value(base: dict[str, Any], path: str) -> Any:
    section, _, key = path.partition(".")
    return base.get(section, {}).get(key)


def _like(value: Any, field_value: Any) -> Any:
    """An integral float as an int where the field holds ints (the trial's config coerced it so)."""
    if isinstance(value, float) and value.is_integer() and isinstance(field_value, int):
        return int(value)
    return value


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
