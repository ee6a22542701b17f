"""The search: how each trial's parameters are chosen (the space file's `search:` section, and the Ray Tune
searcher built from it)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NoReturn

if TYPE_CHECKING:
    from sweeps.space import SweepSpec

Algorithm = Literal["optuna", "random", "grid"]
Sampler = Literal["tpe", "random"]
Fail = Callable[[str, str, Any], NoReturn]  # fail(key, expected, got): raises the space file's one-line error


@dataclass
class Search:
    """How each trial's parameters are chosen."""

    algorithm: Algorithm = "optuna"
    """optuna (Bayesian, seeded), random (Tune's random search) or grid (every combination of 'values' axes)."""
    sampler: Sampler = "tpe"
    """Optuna's sampler: tpe or random."""
    seed: int | None = 0
    """Seed of the search: the same seed suggests the same trials in the same order; null: unseeded."""
    max_concurrent_trials: int | None = None
    """Trials running at once; null: as many as fit the CPUs (resources_per_trial)."""


def check_search(spec: SweepSpec, fail: Fail) -> None:
    """What the `search` section's keys cannot check alone (called by `sweeps.space.parse_space`)."""
    if spec.search.max_concurrent_trials is not None and not spec.search.max_concurrent_trials > 0:
        fail("search.max_concurrent_trials", "a positive number", spec.search.max_concurrent_trials)


def search_algorithm(spec: SweepSpec, max_concurrent: int | None = None):
    """OptunaSearch (seeded TPE or random sampler) or Tune's seeded random/grid variant generator.

    Tune applies `TuneConfig(max_concurrent_trials)` to Searchers only; the variant generator takes its
    own `max_concurrent`, so the limit is given here for it.
    """
    search = spec.search
    if search.algorithm == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        sampler = (
            optuna.samplers.TPESampler(seed=search.seed)
            if search.sampler == "tpe"
            else optuna.samplers.RandomSampler(seed=search.seed)
        )
        return OptunaSearch(sampler=sampler)
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=search.seed, max_concurrent=max_concurrent or 0)
