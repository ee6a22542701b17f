"""What a sweep spent: tokens trained, what every trial to its full budget would have cost, the share early
stopping saved, training FLOPs, and device-seconds by kind; and the best-so-far curve against cumulative tokens.

Computed from a `Sweep` (its results and history, plain files) and the resources each trial had, which the driver
records in sweep_meta.json (`record_resources`) when it starts Ray.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from lm.config import Config, field_paths
from lm.files import write_atomic
from lm.model import flops_per_token
from lm.record import Key
from sweeps import layout

if TYPE_CHECKING:
    from sweeps.sweep import Sweep

RESOURCES = "resources_per_trial"
"""sweep_meta.json key: {"cpu": CPUs per trial, "gpu": GPUs per trial} as the driver resolved them."""
COMPUTE_FILE = "compute.json"
"""The sweep's `Compute` as JSON, beside results.csv."""
TIMESTAMP = "timestamp"  # Ray's wall-clock second of each report (result.json)


@dataclass
class Compute:
    """A sweep's compute, all trials together."""

    trials: int
    """Trials that trained (a trial failing before its first step trained nothing and is left out)."""
    tokens_trained: int
    """Training tokens of every trial, up to where it ended (or is now)."""
    tokens_full_budget: int
    """What the same trials would have trained, each to the full budget (trials x max_tokens)."""
    saved_fraction: float
    """Share of the full budget early stopping (and divergence) saved: 1 - trained / full budget."""
    train_flops: float
    """Training FLOPs of the tokens trained (6 x matmul weights per token, lm.model.flops_per_token)."""
    device_seconds: dict[str, float]
    """Seconds each trial ran, times the devices it held: {"cpu_core_s": ..., "gpu_s": ...}."""

    def lines(self) -> list[str]:
        """Plain lines for the console and summary.md."""
        names = {"cpu_core_s": "CPU core-seconds", "gpu_s": "GPU-seconds"}
        devices = ", ".join(f"{v:,.0f} {names[k]}" for k, v in self.device_seconds.items())
        flops = f"{self.train_flops:.3g} FLOPs" if math.isfinite(self.train_flops) else "FLOPs unknown (no base config)"
        return [
            f"tokens trained {self.tokens_trained:,} of {self.tokens_full_budget:,} for {self.trials} trials at their "
            f"full budget: early stopping saved {self.saved_fraction:.0%}",
            f"training compute {flops}; {devices or 'no device time recorded'}",
        ]


def record_resources(exp_dir: Path, cpu: float, gpu: float) -> None:
    """Add the resources each trial holds to the sweep's sweep_meta.json (atomically; local sweeps only)."""
    path = Path(exp_dir) / layout.META_FILE
    if not path.is_file():
        return
    meta = json.loads(path.read_text())
    meta[RESOURCES] = {"cpu": cpu, "gpu": gpu}
    write_atomic(path, json.dumps(meta, indent=2))


def compute(sweep: Sweep) -> Compute:
    """The sweep's compute from its results (see `Compute`)."""
    df = sweep.dataframe
    reported = df[df[Key.tokens_seen].fillna(0) > 0] if Key.tokens_seen in df else df.iloc[0:0]
    tokens = reported[Key.tokens_seen].astype(int) if not reported.empty else pd.Series(dtype=int)
    max_tokens = int(sweep.meta.get("max_tokens") or (tokens.max() if not tokens.empty else 0))
    full = max_tokens * len(reported)
    flops = sum(t * _flops_per_token(sweep, row) for t, (_, row) in zip(tokens, reported.iterrows(), strict=True))
    resources = sweep.meta.get(RESOURCES, {})
    seconds = float(reported["time_s"].fillna(0).sum()) if "time_s" in reported else 0.0
    devices = {}
    if resources.get("gpu"):
        devices["gpu_s"] = seconds * float(resources["gpu"])
    if resources.get("cpu"):
        devices["cpu_core_s"] = seconds * float(resources["cpu"])
    trained = int(tokens.sum())
    return Compute(
        trials=len(reported),
        tokens_trained=trained,
        tokens_full_budget=full,
        saved_fraction=1 - trained / full if full else 0.0,
        train_flops=float(flops),
        device_seconds=devices,
    )


def _flops_per_token(sweep: Sweep, row: pd.Series) -> float:
    """The trial's model: the sweep's base config with the trial's model.* values (swept or derived) applied."""
    base = sweep.meta.get("base_config")
    if not base:
        return math.nan
    model_keys = [k for k in row.index if k.startswith("model.") and k in field_paths() and pd.notna(row[k])]
    config = Config.from_dict(base)
    if model_keys:
        config = config.replace({k: _plain(row[k]) for k in model_keys})
    return flops_per_token(config.model)


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def best_so_far_by_tokens(sweep: Sweep) -> pd.DataFrame:
    """Every evaluation of every trial in the order they happened, with the sweep's cumulative training tokens
    and the best metric value so far: columns cumulative_tokens, best (one row per report)."""
    h = sweep.history
    if h.empty or sweep.metric not in h or Key.tokens_seen not in h:
        return pd.DataFrame(columns=["cumulative_tokens", "best"])
    order = [c for c in (TIMESTAMP, "time_total_s") if c in h]
    h = h.sort_values(order + [Key.tokens_seen], kind="stable") if TIMESTAMP in h else h
    # Tokens each report added: its trial's tokens since that trial's previous report.
    added = h.groupby("trial_id")[Key.tokens_seen].diff().fillna(h[Key.tokens_seen]).clip(lower=0)
    values = h[sweep.metric].astype(float).to_numpy()
    filled = np.where(np.isnan(values), np.inf if sweep.mode == "min" else -np.inf, values)
    best = np.minimum.accumulate(filled) if sweep.mode == "min" else np.maximum.accumulate(filled)
    return pd.DataFrame({"cumulative_tokens": added.cumsum().to_numpy(), "best": best})


def compute_record(sweep: Sweep) -> dict[str, Any]:
    """The compute as plain JSON data (compute.json beside the results)."""
    return asdict(compute(sweep))
