"""The one metrics record: what the training loop logs, hands to its reporter (Ray Tune in a sweep), and what
results, plots and the console read back.

`Record` defines every metric name once, with its type and unit. Code that reads metrics out of dicts or
DataFrames (Ray results, metrics.jsonl, history.parquet) names them through `Key` (`Key.tokens_seen`), which is
derived from `Record`'s fields, so a name is spelled in exactly one place.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any


@dataclass
class Record:
    """One row of a run's metrics: a log step, an evaluation, or the divergence that ended the run.

    Which fields are set depends on the row's kind (`KINDS`); the others stay None and are left out of `to_dict`.
    """

    step: int
    """Optimizer steps taken so far."""
    tokens_seen: int
    """Training tokens consumed (steps x batch_size x context_length): the clock of ASHA, plots and TensorBoard."""
    train_loss: float | None = None
    """Training cross-entropy of the latest step (nats/token)."""
    val_loss: float | None = None
    """Mean cross-entropy over the fixed validation windows (nats/token). A diverged run reports its ceiling."""
    val_perplexity: float | None = None
    """exp(val_loss)."""
    best_val_loss: float | None = None
    """Lowest val_loss of the run so far."""
    lr: float | None = None
    """Learning rate of the latest step."""
    grad_norm: float | None = None
    """Global L2 norm of the gradients before clipping."""
    tokens_per_s: float | None = None
    """Training throughput since the previous log line (evaluation and checkpoint time excluded)."""
    elapsed_s: float | None = None
    """Seconds since the run (or its resume) started."""
    train_time_s: float | None = None
    """Seconds inside training steps so far (compile time excluded)."""
    compile_time_s: float | None = None
    """Seconds of the first, compiling step with train.compile; 0 otherwise."""
    eval_time_s: float | None = None
    """Seconds spent evaluating so far."""
    checkpoint_time_s: float | None = None
    """Seconds spent writing checkpoints so far."""
    report_time_s: float | None = None
    """Seconds inside the reporter so far (up to the previous report)."""
    final_eval: bool | None = None
    """True for the evaluation at the last step of the budget: tells "ran to the end" from "stopped early"."""
    diverged: bool | None = None
    """True on the report of a run that diverged (NaN/inf or a loss above train.divergence_loss)."""
    diverged_step: int | None = None
    """The step at which the run diverged."""

    def to_dict(self) -> dict[str, Any]:
        """Plain `str` keys and Python numbers, leaving out fields that are None (not measured in this record)."""
        return {f.name: v for f in dataclasses.fields(self) if (v := getattr(self, f.name)) is not None}


Key = enum.StrEnum("Key", [f.name for f in dataclasses.fields(Record)], module=__name__)
"""Every metric name as a `str` enum member (`Key.tokens_seen == "tokens_seen"`), for dict and DataFrame access."""

KINDS = ("train", "eval")
"""Rows of metrics.jsonl/.csv: "train" every train.log_interval steps, "eval" at each evaluation."""
