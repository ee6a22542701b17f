"""Early stopping: the space file's `scheduler:` section, and the Ray Tune scheduler built from it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NoReturn

from lm.record import Key

if TYPE_CHECKING:
    from sweeps.space import SweepSpec

SchedulerType = Literal["asha", "fifo"]
TimeAttr = Literal[Key.tokens_seen, Key.step, "training_iteration"]  # the last: Ray's count of reports
Fail = Callable[[str, str, Any], NoReturn]  # fail(key, expected, got): raises the space file's one-line error


@dataclass
class Scheduler:
    """Early stopping of trials."""

    type: SchedulerType = "asha"
    """asha (stops the worse trials at each rung) or fifo (every trial runs to the end)."""
    time_attr: TimeAttr = Key.tokens_seen.value
    """ASHA's clock: tokens_seen (fair across batch sizes), step, or training_iteration (reports)."""
    grace_period: int = 200_000
    """Time, in time_attr units, every trial runs before ASHA may stop it."""
    reduction_factor: float = 3.0
    """ASHA keeps the best 1/reduction_factor of the trials at each rung (> 1)."""


def check_scheduler(spec: SweepSpec, fail: Fail) -> None:
    """What the `scheduler` section's keys cannot check alone (called by `sweeps.space.parse_space`)."""
    if not spec.scheduler.grace_period > 0:
        fail("scheduler.grace_period", "a positive number", spec.scheduler.grace_period)
    if not spec.scheduler.reduction_factor > 1:
        fail("scheduler.reduction_factor", "a number > 1", spec.scheduler.reduction_factor)


def scheduler(spec: SweepSpec):
    """ASHA on `time_attr` up to the token budget (or FIFO: no early stopping)."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    s = spec.scheduler
    if s.type == "fifo":
        return FIFOScheduler()
    max_t = spec.total_tokens if s.time_attr == Key.tokens_seen else spec.trial_base().total_steps
    return ASHAScheduler(
        time_attr=s.time_attr,
        max_t=max_t,
        grace_period=min(s.grace_period, max_t),
        reduction_factor=s.reduction_factor,
    )
