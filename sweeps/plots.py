"""PNG plots of a sweep (matplotlib, no display needed): loss curves, loss vs lr, parallel coordinates,
best-so-far."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: sweeps run on headless machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lm.record import Key  # noqa: E402
from sweeps.sweep import Sweep  # noqa: E402

LR = "optimizer.lr"


def make_plots(sweep: Sweep, out_dir: Path) -> list[Path]:
    """Write the plots that apply to this sweep into out_dir; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    df, hist = sweep.dataframe, sweep.history
    if df.empty:
        return []
    colour_key = LR if LR in sweep.swept else (sweep.swept[0] if sweep.swept else None)
    written = [_curves(sweep, colour_key, out_dir / "val_loss_vs_tokens.png")] if not hist.empty else []
    x_key = colour_key
    if x_key is not None and df[x_key].notna().any() and _numeric(df[x_key]):
        written.append(_best_vs_param(sweep, x_key, out_dir / f"{sweep.best_column}_vs_{x_key.split('.')[-1]}.png"))
    if len([k for k in sweep.swept if _numeric(df[k])]) > 1:
        written.append(_parallel(sweep, out_dir / "parallel_coordinates.png"))
    written.append(_best_so_far(sweep, out_dir / "best_so_far.png"))
    if not hist.empty:
        written.append(_best_so_far_by_tokens(sweep, out_dir / "best_so_far_vs_tokens.png"))
    return written


def _numeric(series) -> bool:
    return bool(series.dropna().map(lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)).all())


def _log_scale(values) -> bool:
    v = np.asarray([x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))], float)
    return len(v) > 0 and (v > 0).all() and v.max() / v.min() > 20


def _colour_map(df, key):
    if key is None or not _numeric(df[key]):
        return lambda value: None, None
    values = df[key].dropna().astype(float)
    log = _log_scale(values)
    norm = (matplotlib.colors.LogNorm if log else matplotlib.colors.Normalize)(values.min(), values.max())
    cmap = plt.get_cmap("viridis")
    return (lambda value: cmap(norm(value))), matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap)


def _curves(sweep: Sweep, key, path: Path) -> Path:
    df, hist = sweep.dataframe, sweep.history
    colour, mappable = _colour_map(df, key)
    fig, ax = plt.subplots(figsize=(8, 5))
    evals = hist[hist[Key.val_loss].notna()] if Key.val_loss in hist else hist.iloc[0:0]
    for row in df.itertuples():
        h = evals[(evals["trial_id"] == row.trial_id) & (evals.get(Key.diverged, False) != True)]  # noqa: E712
        if h.empty:
            continue
        c = colour(df.loc[df["trial_id"] == row.trial_id, key].iloc[0]) if key else None
        tokens, loss = h[Key.tokens_seen], h[Key.val_loss]
        ax.plot(tokens, loss, color=c, alpha=0.85, lw=1.4)
        if row.status == "diverged":
            ax.plot(tokens.iloc[-1], loss.iloc[-1], "x", color="red", ms=9, mew=2)
        elif row.status == "stopped_early":
            ax.plot(tokens.iloc[-1], loss.iloc[-1], "o", color=c, ms=4)
    floor = sweep.entropy_floor
    if floor:
        ax.axhline(floor, ls="--", color="gray", lw=1)
        ax.annotate(
            f"entropy floor {floor:.3f}",
            (0.99, floor),
            xycoords=("axes fraction", "data"),
            ha="right",
            va="bottom",
            fontsize=8,
            color="gray",
        )
    ax.set_yscale("log")  # late differences between good trials are small next to early losses
    if mappable is not None:
        fig.colorbar(mappable, ax=ax, label=key)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Validation loss per trial (x = diverged, o = stopped early)")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _best_vs_param(sweep: Sweep, key: str, path: Path) -> Path:
    df = sweep.dataframe
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for status, marker, colour in (
        ("completed", "o", "tab:blue"),
        ("stopped_early", "s", "tab:gray"),
        ("diverged", "x", "red"),
    ):
        part = df[(df["status"] == status) & df[sweep.best_column].notna()]
        if not part.empty:
            label = status.replace("_", " ")
            ax.scatter(part[key], part[sweep.best_column], marker=marker, color=colour, label=label)
    if _log_scale(df[key]):
        ax.set_xscale("log")
    ax.set_xlabel(key)
    ax.set_ylabel(f"best {sweep.metric}")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _parallel(sweep: Sweep, path: Path) -> Path:
    df = sweep.dataframe[sweep.dataframe[sweep.best_column].notna()]
    keys = [k for k in sweep.swept if _numeric(sweep.dataframe[k])] + [sweep.best_column]
    fig, ax = plt.subplots(figsize=(2 + 1.8 * len(keys), 4.5))
    scaled = {}
    for k in keys:
        v = df[k].astype(float).to_numpy()
        if _log_scale(v):
            v = np.log10(v)
        lo, hi = np.nanmin(v), np.nanmax(v)
        scaled[k] = (v - lo) / (hi - lo) if hi > lo else np.full_like(v, 0.5)
    loss = df[sweep.best_column].to_numpy(float)
    norm = matplotlib.colors.Normalize(np.nanmin(loss), np.nanmax(loss))
    cmap = plt.get_cmap("viridis_r")
    for i in range(len(df)):
        ax.plot(range(len(keys)), [scaled[k][i] for k in keys], color=cmap(norm(loss[i])), alpha=0.8)
    ax.set_xticks(range(len(keys)), keys, rotation=15)
    ax.set_yticks([])
    for i, k in enumerate(keys):
        ax.annotate(f"{df[k].min():.3g}", (i, 0), textcoords="offset points", xytext=(3, -12), fontsize=8)
        ax.annotate(f"{df[k].max():.3g}", (i, 1), textcoords="offset points", xytext=(3, 4), fontsize=8)
    fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=f"best {sweep.metric}")
    ax.set_title("Parallel coordinates (log axes where a range spans > 20x)")
    return _save(fig, path)


def _best_so_far(sweep: Sweep, path: Path) -> Path:
    df = sweep.dataframe.sort_values("trial_number")
    loss = df[sweep.best_column].to_numpy(float)
    filled = np.where(np.isnan(loss), np.inf, loss)
    best = np.minimum.accumulate(filled) if sweep.mode == "min" else np.maximum.accumulate(-filled) * -1
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(df) + 1), loss, "o", alpha=0.5, label="trial")
    ax.step(range(1, len(df) + 1), np.where(np.isinf(best), np.nan, best), where="post", label="best so far")
    ax.set_xlabel("trial number")
    ax.set_ylabel(f"best {sweep.metric}")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _best_so_far_by_tokens(sweep: Sweep, path: Path) -> Path:
    """Best metric so far against the sweep's cumulative training tokens: what the compute bought."""
    from sweeps.compute import best_so_far_by_tokens

    curve = best_so_far_by_tokens(sweep)
    best = curve["best"].to_numpy(float)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.step(curve["cumulative_tokens"], np.where(np.isinf(best), np.nan, best), where="post")
    ax.set_xlabel("training tokens, all trials")
    ax.set_ylabel(f"best {sweep.metric} so far")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
