"""Trial scheduling: the space file's `scheduler:` section, and the Ray Tune scheduler built from it.

Every scheduler runs on one clock, `time_attr` (tokens_seen by default: fair across batch sizes), whose budget is
the sweep's token budget (stop.max_tokens):

- asha: asynchronous successive halving; at each rung (grace_period x reduction_factor^k) a trial continues only
  if it is in the best 1/reduction_factor of the trials that reached that rung.
- hyperband: synchronous successive halving in brackets (Li et al.); its smallest rung is grace_period and its
  largest the budget. Trials wait (paused, from their checkpoint) at each rung until their bracket has reached it.
- median: the median stopping rule (Golovin et al.); after grace_period a trial stops when its best result is worse
  than the median of the other trials' running averages at the same time.
- pbt: population based training (Jaderberg et al.); every perturbation_interval the bottom quantile_fraction of
  the running trials continue from a checkpoint of a top trial, with perturbed parameters.
- pb2: PBT whose new parameters come from a Gaussian-process bandit over the population's results (Parker-Holder
  et al.); needs scikit-learn (`pip install -e ".[search]"`).
- fifo: every trial runs to the end.

What PBT/PB2 may perturb: the swept `optimizer.*` parameters (`perturb` narrows the list). These change neither
the model's shapes nor the tokens <-> steps mapping, so a trial can continue from any other trial's checkpoint. Any
other swept parameter (model.d_model, data.batch_size, ...) is drawn once for each trial of the first population
and travels with the checkpoint: a trial that exploits another takes its weights *and* those values (Ray copies the
donor's config, then perturbs). A perturbed value stays inside its parameter's range (or its list of values).

A perturbed learning rate under the cosine schedule: `optimizer.lr` is the schedule's peak, and the schedule is
fixed to the token budget. A trial that continues from a checkpoint at step s with a new lr trains from step s on at
`lr_at(s)` of its new config: the whole schedule (warmup, cosine, min_lr = lr x min_lr_ratio) is scaled by
new_lr / old_lr, and it keeps its place in the schedule (the step, the tokens seen). The same holds for the other
schedule fields (min_lr_ratio, warmup): the new config's schedule, at the exploited step. AdamW's betas, eps and
weight decay take the new config's values too (lm.train.setup applies them over the restored optimizer state).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NoReturn

from lm.fields import ConfigError
from lm.record import Key
from sweeps.ray_compat import TRAINING_ITERATION

if TYPE_CHECKING:
    from sweeps.space import Param, SweepSpec

SchedulerType = Literal["asha", "hyperband", "median", "pbt", "pb2", "fifo"]
TimeAttr = Literal[Key.tokens_seen, Key.step, "training_iteration"]  # the last: Ray's count of reports
Fail = Callable[[str, str, Any], NoReturn]  # fail(key, expected, got): raises the space file's one-line error

POPULATION = ("pbt", "pb2")
"""The schedulers that move checkpoints between trials."""
STOPPING = ("asha", "hyperband", "median")
"""The schedulers that stop trials early (from grace_period on)."""
GRACE_DIVISOR = 16
"""grace_period: null is the budget / GRACE_DIVISOR (benchmarks/bench_search.py: 1/16 stopped no eventual winner at
reduction factor 3, for the fewest tokens of 1/16, 1/8 and 1/4)."""
PERTURBABLE_SECTION = "optimizer."
"""PBT/PB2 perturb only fields of this config section (see the module docstring)."""
RANGES = ("log_uniform_values", "uniform", "q_uniform", "int_uniform")
PBT_NUM_TO_KEEP = 3
"""Checkpoints kept per trial under pbt/pb2 at least: with fewer, Ray may delete the checkpoint a trial is about to
exploit when its owner reports again (Ray warns at <= 2)."""


@dataclass
class Scheduler:
    """How trials are stopped early (asha, hyperband, median) or evolved (pbt, pb2); fifo runs them all to the end."""

    type: SchedulerType = "asha"
    """asha, hyperband, median, pbt, pb2 or fifo (see sweeps/schedulers.py)."""
    time_attr: TimeAttr = Key.tokens_seen.value
    """The schedulers' clock: tokens_seen (fair across batch sizes), step, or training_iteration (reports)."""
    grace_period: int | None = None
    """asha, median: time every trial runs before it may be stopped; hyperband: its smallest rung. null: 1/16 of the
    budget (what benchmarks/bench_search.py found best with reduction_factor 3; needs a clock with a fixed budget)."""
    reduction_factor: float = 3.0
    """asha, hyperband: a trial continues past a rung when it is in the best 1/reduction_factor there (> 1)."""
    min_samples_required: int = 3
    """median: trials that must have reported at a time before a trial is compared to their median."""
    perturbation_interval: int | None = None
    """pbt, pb2: time between two exploit/explore steps of a trial (tokens under tokens_seen); null: a quarter of
    the budget."""
    burn_in: int = 0
    """pbt: time before a trial's first exploit/explore step."""
    quantile_fraction: float = 0.25
    """pbt, pb2: the bottom fraction of the running trials continues from checkpoints of the top fraction (0-0.5]."""
    resample_probability: float = 0.25
    """pbt: chance that a perturbed parameter is drawn anew from its distribution, instead of multiplied by 0.8 or
    1.2 (a range) or moved to a neighbouring value (a list of values)."""
    perturb: Any = None
    """pbt, pb2: the swept parameters to perturb, a list of optimizer.* paths; null: every swept optimizer.* one."""


def check_scheduler(spec: SweepSpec, fail: Fail) -> None:
    """What the `scheduler` section's keys cannot check alone (called by `sweeps.space.parse_space` once the
    parameters are in canonical form). Refuses, in one line, what Ray would refuse later."""
    s = spec.scheduler
    if s.grace_period is not None and not s.grace_period > 0:
        fail("scheduler.grace_period", "a positive number (or null: 1/16 of the budget)", s.grace_period)
    if s.grace_period is None and s.type in STOPPING and s.time_attr == TRAINING_ITERATION:
        fail("scheduler.grace_period", "a number under time_attr training_iteration (no budget to take 1/16 of)", None)
    if not s.reduction_factor > 1:
        fail("scheduler.reduction_factor", "a number > 1", s.reduction_factor)
    if not s.min_samples_required >= 1:
        fail("scheduler.min_samples_required", "an integer >= 1", s.min_samples_required)
    if not 0 < s.quantile_fraction <= 0.5:
        fail("scheduler.quantile_fraction", "a number in (0, 0.5]", s.quantile_fraction)
    if not 0 <= s.resample_probability <= 1:
        fail("scheduler.resample_probability", "a probability in [0, 1]", s.resample_probability)
    if not s.burn_in >= 0:
        fail("scheduler.burn_in", "a number >= 0", s.burn_in)
    if s.perturbation_interval is not None and not s.perturbation_interval > 0:
        fail("scheduler.perturbation_interval", "a positive number (or null)", s.perturbation_interval)
    if s.type in POPULATION:
        _check_population(spec, fail)


def _check_population(spec: SweepSpec, fail: Fail) -> None:
    s = spec.scheduler
    if s.type == "pb2" and importlib.util.find_spec("sklearn") is None:
        fail("scheduler.type", 'scikit-learn for pb2: pip install -e ".[search]"', s.type)
    if spec.search.algorithm == "optuna":
        fail(
            "search.algorithm",
            f"random or grid with scheduler.type {s.type} ({s.type} explores on its own; Ray refuses a searcher "
            f"beside it): use search.algorithm: random",
            spec.search.algorithm,
        )
    perturbed = perturbed_params(spec, fail)
    if s.type == "pb2":
        for path in perturbed:
            p = spec.parameters[path]
            if p.distribution not in RANGES:
                fail(
                    f"parameters.{path}",
                    "a range (min/max) for pb2 to perturb (pb2 models continuous values)",
                    p.distribution,
                )
    if spec.expected_trials < 2:
        fail("num_samples", f"at least 2 trials for {s.type} (a population)", spec.num_samples)
    budget = _budget(spec)
    if budget is not None:
        interval = perturbation_interval(spec, budget)
        if (s.burn_in if s.type == "pbt" else 0) + interval >= budget:
            fail(
                "scheduler.perturbation_interval",
                f"burn_in + perturbation_interval below the budget ({budget:,} {s.time_attr}), or no trial is "
                f"ever perturbed",
                interval,
            )


def perturbed_params(spec: SweepSpec, fail: Fail | None = None) -> list[str]:
    """The swept parameters PBT/PB2 perturb: scheduler.perturb, or every swept optimizer.* parameter.

    With `fail`, a bad list (not a list, a parameter that is not swept or not optimizer.*, none at all) is refused."""
    swept = spec.swept_params
    chosen = spec.scheduler.perturb
    if chosen is None:
        chosen = [path for path in swept if path.startswith(PERTURBABLE_SECTION)]
    elif not (isinstance(chosen, list) and all(isinstance(path, str) for path in chosen)) and fail is not None:
        fail("scheduler.perturb", "a list of swept optimizer.* parameters (or null)", chosen)
    if fail is not None:
        for path in chosen:
            if not path.startswith(PERTURBABLE_SECTION):
                fail(
                    "scheduler.perturb",
                    f"optimizer.* parameters only ({path} would change the model's shapes or the tokens <-> steps "
                    f"mapping; a swept {path} is drawn once per trial and travels with its checkpoint)",
                    chosen,
                )
            if path not in swept:
                fail("scheduler.perturb", f"swept parameters only ({path} is not swept under parameters)", chosen)
        if not chosen:
            fail(
                "parameters",
                f"a swept optimizer.* parameter for {spec.scheduler.type} to perturb (e.g. optimizer.lr as a range)",
                swept,
            )
    return list(chosen)


def _budget(spec: SweepSpec) -> int | None:
    """The budget on the scheduler's clock, or None when unknown (no fixed one, or an invalid base config that
    the space's next check reports)."""
    s = spec.scheduler
    try:
        base = spec.trial_base()
    except ConfigError:
        return None
    if s.time_attr == Key.tokens_seen:
        return base.train.max_tokens
    if s.time_attr == Key.step:
        return base.total_steps
    return None  # training_iteration: reports, which depend on the eval interval


def grace_period(spec: SweepSpec, budget: int | None = None) -> int:
    """scheduler.grace_period, or 1/GRACE_DIVISOR of the budget; never past the budget."""
    budget = budget if budget is not None else _budget(spec)
    g = spec.scheduler.grace_period
    if g is None:
        g = max(1, (budget or GRACE_DIVISOR) // GRACE_DIVISOR)
    return min(g, budget) if budget else g


def perturbation_interval(spec: SweepSpec, budget: int | None = None) -> int:
    """scheduler.perturbation_interval, or a quarter of the budget."""
    s = spec.scheduler
    if s.perturbation_interval is not None:
        return s.perturbation_interval
    budget = budget if budget is not None else _budget(spec)
    return max(1, (budget or 4) // 4)


def checkpoints_to_keep(spec: SweepSpec) -> int:
    """Ray's CheckpointConfig.num_to_keep: checkpoint.num_to_keep, at least PBT_NUM_TO_KEEP under pbt/pb2."""
    keep = spec.checkpoint.num_to_keep
    return max(keep, PBT_NUM_TO_KEEP) if spec.scheduler.type in POPULATION else keep


def describe(spec: SweepSpec) -> str | None:
    """One line for the console at the start of a pbt/pb2 sweep: what is perturbed, when, and what travels."""
    s = spec.scheduler
    if s.type not in POPULATION:
        return None
    perturbed = perturbed_params(spec)
    carried = [path for path in spec.swept_params if path not in perturbed]
    line = (
        f"{s.type}: every {perturbation_interval(spec):,} {s.time_attr} the bottom {s.quantile_fraction:g} of the "
        f"running trials continue from a top trial's checkpoint, perturbing {', '.join(perturbed)}"
    )
    if carried:
        line += f"; {', '.join(carried)} travel{'s' if len(carried) == 1 else ''} with the checkpoint"
    return line


class _KeepInRange:
    """PBT's and PB2's explore step, after Ray's: a perturbed value (PBT: x 0.8 or 1.2) is put back inside its
    range, which the space validated at both ends. (A class, not a closure: Ray pickles the scheduler with the
    sweep.)"""

    def __init__(self, bounds: dict[str, tuple[float, float]]):
        self.bounds = bounds

    def __call__(self, config: dict[str, Any]) -> dict[str, Any]:
        for path, (lo, hi) in self.bounds.items():
            if path in config:
                value = min(max(config[path], lo), hi)
                config[path] = type(config[path])(value) if isinstance(config[path], int) else value
        return config


def _mutation(p: Param, domain: Any) -> Any:
    """What PBT draws a perturbed value from: the list of values, or the range's Tune domain."""
    return list(p.values) if p.distribution == "values" else domain


def scheduler(spec: SweepSpec):
    """The Ray Tune scheduler of `spec` on its clock (metric and mode come from TuneConfig)."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule

    from sweeps.ray_compat import hyperband_scheduler, population_based_training
    from sweeps.space import param_space

    s = spec.scheduler
    if s.type == "fifo":
        return FIFOScheduler()
    max_t = _budget(spec) or 10**12  # training_iteration has no fixed budget: the trials' own end stops them
    grace = grace_period(spec, max_t)
    if s.type == "asha":
        return ASHAScheduler(
            time_attr=s.time_attr,
            max_t=max_t,
            grace_period=grace,
            reduction_factor=s.reduction_factor,
        )
    if s.type == "hyperband":
        return hyperband_scheduler(s.time_attr, max_t, grace, s.reduction_factor)
    if s.type == "median":
        return MedianStoppingRule(
            time_attr=s.time_attr,
            grace_period=grace,
            min_samples_required=s.min_samples_required,
        )
    perturbed = perturbed_params(spec)
    params = {path: spec.parameters[path] for path in perturbed}
    bounds = {path: (p.min, p.max) for path, p in params.items() if p.distribution in RANGES}
    interval = perturbation_interval(spec)
    if s.type == "pb2":
        return population_based_training(
            pb2=True,
            time_attr=s.time_attr,
            perturbation_interval=interval,
            hyperparam_bounds={path: [lo, hi] for path, (lo, hi) in bounds.items()},
            quantile_fraction=s.quantile_fraction,
            custom_explore_fn=_KeepInRange(bounds),  # PB2's GP works in float32: 0.2 comes back as 0.20000000298
        )
    domains = param_space(spec)
    return population_based_training(
        time_attr=s.time_attr,
        perturbation_interval=interval,
        burn_in_period=s.burn_in,
        hyperparam_mutations={path: _mutation(p, domains[path]) for path, p in params.items()},
        quantile_fraction=s.quantile_fraction,
        resample_probability=s.resample_probability,
        custom_explore_fn=_KeepInRange(bounds),
    )


def concurrency_warning(spec: SweepSpec, max_concurrent: int) -> str | None:
    """One warning line when hyperband's largest bracket holds more trials than run at once, else None.

    Ray's HyperBand halves a bracket when every *live* trial of it has reached the rung, keeping the best
    ceil(n / reduction_factor) of the bracket's size n: with fewer trials running than that, it keeps them all
    and stops nothing (benchmarks/bench_search.py: TPE + HyperBand at 2 at once trained what FIFO did)."""
    if spec.scheduler.type != "hyperband":
        return None
    hb = scheduler(spec)
    sizes = [hb._get_n0(s) for s in range(hb._s_max_1)]
    if max_concurrent >= max(sizes):
        return None
    return (
        f"warning: hyperband's brackets hold {', '.join(map(str, sizes))} trials but {max_concurrent} run at once: "
        f"Ray's HyperBand halves only the trials of a bracket running together, so it will stop few or none; "
        f"asha does not need them together"
    )
