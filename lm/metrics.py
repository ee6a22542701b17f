"""Where a run's numbers go: console (progress bar or plain lines), train.log, metrics.jsonl/.csv, TensorBoard.

Each row is a `lm.record.Record` of a kind ("train" or "eval"); every one carries `step` and `tokens_seen`, the
x-axis of TensorBoard. Rows are flushed as they are written, because a sweep trial that the scheduler stops
ends inside its report call and never reaches any cleanup code.
"""

from __future__ import annotations

import csv
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from lm.record import Key, Record

CSV_FIELDS = ["kind", *Key]


class RunLogger:
    """Writes log and eval records of one run into `out_dir` and to the console."""

    def __init__(
        self,
        out_dir: Path,
        total_steps: int,
        progress: str = "auto",
        tensorboard: bool = True,
        wandb_run: Any = None,
    ):
        self.out_dir = out_dir
        self._wandb = wandb_run  # from open_wandb: rows go to it too, stepped by tokens_seen
        out_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(out_dir / "train.log", "a")  # noqa: SIM115 - closed in close()
        self._jsonl = open(out_dir / "metrics.jsonl", "a")  # noqa: SIM115
        csv_path = out_dir / "metrics.csv"
        new_csv = not csv_path.exists() or csv_path.stat().st_size == 0
        self._csv_file = open(csv_path, "a", newline="")  # noqa: SIM115
        self._csv = csv.DictWriter(self._csv_file, fieldnames=CSV_FIELDS, extrasaction="ignore")
        if new_csv:
            self._csv.writeheader()
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(out_dir / "tb"))
            except ImportError:  # tensorboard is optional at run time
                self.info("tensorboard is not installed: no TensorBoard events written")
        if progress == "auto":
            progress = "bar" if sys.stderr.isatty() else "lines"
        self.progress = progress
        self._bar = None
        if progress == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True, file=sys.stderr)

    def info(self, message: str) -> None:
        """A free-text line for the console and train.log."""
        stamped = f"{time.strftime('%H:%M:%S')} {message}"
        self._log.write(stamped + "\n")
        self._log.flush()
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        elif self.progress != "off":
            print(message, flush=True)

    def record(self, kind: str, record: Record) -> None:
        """A metrics row of `kind` ("train" every log interval, "eval" at each evaluation)."""
        metrics = record.to_dict()
        row = {"kind": kind, **metrics}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        self._csv.writerow(row)
        self._csv_file.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                if key not in (Key.step, Key.tokens_seen) and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(f"{kind}/{key}", value, global_step=record.tokens_seen)
            self._tb.flush()
        if self._wandb is not None:
            self._log_wandb(kind, metrics)
        if self._bar is not None:
            self._bar.n = record.step
            self._bar.set_postfix_str(_short(metrics), refresh=True)
            if kind == "eval":
                self._bar.write(_line(kind, metrics), file=sys.stderr)
        else:
            self._log_line(kind, metrics)

    def _log_wandb(self, kind: str, metrics: dict[str, Any]) -> None:
        row = {f"{kind}/{k}": v for k, v in metrics.items() if k not in (Key.step, Key.tokens_seen)}
        row = {k: v for k, v in row.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        try:
            self._wandb.log({Key.tokens_seen.value: metrics[Key.tokens_seen], Key.step.value: metrics[Key.step], **row})
        except Exception as e:  # a tracking failure never stops training: say so once, go on without it
            self._wandb = None
            self.info(f"warning: W&B logging failed ({e}): W&B is off for the rest of this run")

    def _log_line(self, kind: str, metrics: dict[str, Any]) -> None:
        line = _line(kind, metrics)
        self._log.write(f"{time.strftime('%H:%M:%S')} {line}\n")
        self._log.flush()
        if self.progress != "off":
            print(line, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            try:
                self._wandb.finish()
            except Exception:  # the files are written; an upload that fails here is retried by `wandb sync`
                pass
        for f in (self._log, self._jsonl, self._csv_file):
            f.close()


def open_wandb(project: str, mode: str, out_dir: Path, config: dict[str, Any]) -> Any:
    """A W&B run for one training run, its charts stepped by tokens_seen; its files go under out_dir/wandb.

    Raises ConfigError naming the extra when wandb is not installed.
    """
    try:
        import wandb
    except ImportError:
        from lm.fields import ConfigError

        raise ConfigError(
            f'train.wandb_project: expected the wandb package (pip install -e ".[wandb]"), got {project!r} '
            f"with wandb not installed"
        ) from None
    out_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=project, mode=mode, dir=str(out_dir), config=config, settings=wandb.Settings(silent=True))
    run.define_metric(Key.tokens_seen.value)
    run.define_metric("*", step_metric=Key.tokens_seen.value)
    return run


def _fmt(key: str, value: Any) -> str:
    if isinstance(value, float):
        if key == Key.lr:
            return f"{key} {value:.2e}"
        if key == Key.tokens_per_s:
            return f"{value:,.0f} tok/s"
        return f"{key} {value:.4f}"
    return f"{key} {value}"


def _line(kind: str, metrics: dict[str, Any]) -> str:
    keys = [Key.train_loss, Key.lr, Key.grad_norm, Key.tokens_per_s]
    if kind != "train":
        keys = [Key.val_loss, Key.val_perplexity]
    body = " | ".join(_fmt(k, metrics[k]) for k in keys if metrics.get(k) is not None)
    return f"[{kind:5s}] step {metrics[Key.step]:>6} | tokens {metrics[Key.tokens_seen]:>11,} | {body}"


def _short(metrics: dict[str, Any]) -> str:
    keys = (Key.train_loss, Key.val_loss, Key.tokens_per_s)
    return ", ".join(_fmt(k, metrics[k]) for k in keys if isinstance(metrics.get(k), float))
