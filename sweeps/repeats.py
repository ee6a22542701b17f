"""Repeats: every configuration trained with several seeds (the space file's `repeats: K`), and reading them back as
groups (mean, std and count of the metric per configuration).

How each search repeats a configuration with seeds base, base + 1, ..., base + K - 1 (base: train.seed of the
base config or of a constant parameter):
- grid and random: a hidden grid axis `train.seed` in Tune's param_space; Tune multiplies each grid point, or
  each random sample, by it (random: `BasicVariantGenerator(constant_grid_search=True)` samples once per group);
- optuna: Ray's `Repeater` asks the searcher once per group, gives each trial of the group the same suggestion
  plus `__trial_index__` (0 .. K-1), from which `SweepSpec.trial_config` sets train.seed, and tells the searcher
  the group's mean of the last reported metric when all K have ended.
A configuration, reading results back, is a trial's swept values other than train.seed: a swept train.seed
(without `repeats`) is grouped the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

import pandas as pd

if TYPE_CHECKING:
    from sweeps.space import SweepSpec

SEED = "train.seed"
TRIAL_INDEX = "__trial_index__"  # ray.tune.search.repeater.TRIAL_INDEX (a test checks they agree)
CONFIG_ID = "config_id"
"""The results column numbering configurations (0, 1, ... in order of their first trial)."""
Fail = Callable[[str, str, Any], NoReturn]


def check_repeats(spec: SweepSpec, fail: Fail) -> None:
    """Repeats own train.seed: it cannot also be swept (called by `sweeps.space.parse_space`)."""
    seed = spec.parameters.get(SEED)
    if spec.repeat_count > 1 and seed is not None and seed.swept:
        fail(
            f"parameters.{SEED}",
            f"a constant (the first seed) when repeats is set: repeats give the trials of each configuration the "
            f"seeds base, base + 1, ..., base + {spec.repeat_count - 1}",
            seed.values if seed.distribution == "values" else f"{seed.distribution} {seed.min}..{seed.max}",
        )


def base_seed(spec: SweepSpec) -> int:
    """The first seed of every configuration: a constant train.seed parameter, else the base config's."""
    seed = spec.parameters.get(SEED)
    return int(seed.value) if seed is not None and seed.distribution == "value" else spec.trial_base().train.seed


def seed_axis(spec: SweepSpec) -> list[int] | None:
    """The train.seed grid axis of Tune's param_space under grid and random with repeats; None otherwise."""
    if spec.repeat_count <= 1 or spec.search.algorithm == "optuna":
        return None
    first = base_seed(spec)
    return list(range(first, first + spec.repeat_count))


def wrap_searcher(spec: SweepSpec, searcher: Any) -> Any:
    """The searcher that repeats each suggestion `repeats` times under optuna (else `searcher` unchanged)."""
    if spec.repeat_count <= 1 or spec.search.algorithm != "optuna":
        return searcher
    from sweeps.repeater import SeedRepeater  # imports Ray: only when a sweep runs

    return SeedRepeater(searcher, repeat=spec.repeat_count)


# ---------------------------------------------------------------------------------------------------
# Reading back: seeds and configurations
# ---------------------------------------------------------------------------------------------------


def trial_seed(config: dict[str, Any], first_seed: int) -> int:
    """The seed a trial trained with, from its searcher config: the seed axis value, or the first seed plus
    Ray's repeat index (optuna), or the first seed."""
    if config.get(SEED) is not None:
        return int(config[SEED])
    return first_seed + int(config.get(TRIAL_INDEX) or 0)


def config_ids(df: pd.DataFrame, swept: list[str]) -> pd.Series:
    """Each trial's configuration number: trials with equal swept values (train.seed aside) share one, numbered
    0, 1, ... in order of their first trial (df ordered by trial_number)."""
    keys = [k for k in swept if k != SEED and k in df.columns]
    ids: dict[tuple[Any, ...], int] = {}
    out = []
    for row in df[keys].itertuples(index=False, name=None) if keys else [()] * len(df):
        key = tuple(_hashable(v) for v in row)
        out.append(ids.setdefault(key, len(ids)))
    return pd.Series(out, index=df.index, dtype="int64")


def _hashable(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return value if isinstance(value, (int, float, str, bool, type(None))) else repr(value)


def by_config(df: pd.DataFrame, swept: list[str], column: str, mode: str) -> pd.DataFrame:
    """One row per configuration, best mean first: its swept values, n (trials with a value of `column`), the
    mean and sample std (ddof 1; NaN for n < 2) of `column`, and its best trial (best `column` within it).
    Errored trials are left out."""
    keys = [k for k in swept if k != SEED and k in df.columns]
    stat_cols = [CONFIG_ID, *keys, "n", f"{column}_mean", f"{column}_std", "best_trial_id", "trials"]
    if df.empty or column not in df.columns:
        return pd.DataFrame(columns=stat_cols)
    rows = []
    ok = df[df["status"] != "error"] if "status" in df.columns else df
    for cid, group in ok.groupby(CONFIG_ID, sort=True):
        values = group[column].dropna()
        best = None
        if len(values):
            best = group.loc[values.idxmin() if mode == "min" else values.idxmax(), "trial_id"]
        rows.append(
            {
                CONFIG_ID: int(cid),
                **{k: group[k].iloc[0] for k in keys},
                "n": len(values),
                f"{column}_mean": float(values.mean()) if len(values) else math.nan,
                f"{column}_std": float(values.std(ddof=1)) if len(values) > 1 else math.nan,
                "best_trial_id": best,
                "trials": len(group),
            }
        )
    table = pd.DataFrame(rows, columns=stat_cols)
    return table.sort_values(f"{column}_mean", ascending=mode == "min", na_position="last", kind="stable").reset_index(
        drop=True
    )
