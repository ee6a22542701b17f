"""The search: how each trial's parameters are chosen (the space file's `search:` section, and the Ray Tune
searcher built from it).

Under `algorithm: optuna` the searcher is `StudySearch`, Ray's OptunaSearch on an Optuna study kept in a
storage (sweeps/study.py picks it: a SQLite file in the experiment directory by default). The study holds every
trial Ray asked for, its value and its evaluations as intermediate values keyed by tokens seen, so that
`optuna-dashboard` and `optuna.load_study` can read the sweep while it runs, and so that an extended or
warm-started sweep's sampler starts from what the study already holds.

Samplers (`search.sampler`), and what each does with the space:
- tpe: Optuna's TPE (multivariate, with a constant liar for the trials still running). Every distribution.
- gp: Gaussian-process Bayesian optimization (needs scipy, in the `search` extra). Every distribution.
- cmaes: CMA-ES (needs the `cmaes` package, in the `search` extra) on the numeric parameters, at least two of
  them; categorical ('values') parameters are drawn at random by Optuna, independently of the results.
- qmc: a scrambled Sobol or Halton sequence (covers the space evenly, ignores results); categoricals at random.
- random: independent uniform draws (log-uniform for log ranges).
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NoReturn

from lm.fields import ConfigError, coerce

if TYPE_CHECKING:
    from sweeps.space import SweepSpec

Algorithm = Literal["optuna", "random", "grid"]
Sampler = Literal["tpe", "gp", "cmaes", "qmc", "random"]
QmcType = Literal["sobol", "halton"]
Fail = Callable[[str, str, Any], NoReturn]  # fail(key, expected, got): raises the space file's one-line error

MAX_STARTUP = 10
"""Optuna's own default start-up count: the most the rule below gives."""
SAMPLER_PACKAGES = {"cmaes": "cmaes", "gp": "scipy"}
"""Samplers that need a package beyond Optuna (all in the `search` extra: pip install -e ".[search]")."""
SAMPLER_OPTIONS = {
    "n_startup_trials": ("tpe", "gp", "cmaes"),
    "multivariate": ("tpe",),
    "qmc_type": ("qmc",),
}
"""Which samplers take each sampler option (another sampler given one: a one-line error)."""
START_ATTR = "start"
"""The user attribute naming a `points_to_evaluate` entry on its trial in the Optuna study, and the results
column naming it."""
START_META = "starts"
"""The sweep_meta.json key holding search.points_to_evaluate."""


@dataclass
class Search:
    """How each trial's parameters are chosen."""

    algorithm: Algorithm = "optuna"
    """optuna (a sampler on an Optuna study, seeded), random (Tune's random search) or grid (every combination of
    'values' axes)."""
    sampler: Sampler = "tpe"
    """Optuna's sampler: tpe, gp (Gaussian process), cmaes (CMA-ES, numeric parameters), qmc (quasi-random) or
    random."""
    seed: int | None = 0
    """Seed of the search: the same seed suggests the same trials in the same order; null: unseeded."""
    max_concurrent_trials: int | None = None
    """Trials running at once; null: as many as fit the CPUs (resources_per_trial)."""
    n_startup_trials: int | None = None
    """tpe, gp, cmaes: trials drawn at random before the sampler models the results (points_to_evaluate and
    warm-start trials count). Null: min(10, max(2, num_samples // 3)) for tpe and gp, so that the model is used
    in small sweeps too; 1 for cmaes (CMA-ES starts from the middle of the space)."""
    multivariate: bool | None = None
    """tpe: model the parameters jointly (true) or each alone (false); null: true."""
    qmc_type: QmcType | None = None
    """qmc: sobol or halton sequence (scrambled with the seed); null: sobol."""
    points_to_evaluate: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Named starting configurations tried first, in order: {name: {dotted parameter path: value}}, e.g.
    {cs336_default: {optimizer.lr: 1.0e-3}}. Parameters left out are drawn by the sampler."""
    storage: str | None = None
    """Where the Optuna study lives: an Optuna RDB URL (sqlite:///path.db, postgresql://..., mysql://...); null:
    sqlite:///<experiment dir>/optuna.db. The study is named after the sweep."""


def startup_trials(search: Search, num_samples: int) -> int:
    """The start-up count the sampler gets: `n_startup_trials`, else the default rule (see the field)."""
    if search.n_startup_trials is not None:
        return search.n_startup_trials
    if search.sampler == "cmaes":
        return 1
    return min(MAX_STARTUP, max(2, num_samples // 3))


def check_search(spec: SweepSpec, fail: Fail) -> None:
    """What the `search` section's keys cannot check alone (called by `sweeps.space.parse_space`): limits, options
    that only some samplers take, the sampler's package, and the storage URL's form."""
    search = spec.search
    if search.max_concurrent_trials is not None and not search.max_concurrent_trials > 0:
        fail("search.max_concurrent_trials", "a positive number", search.max_concurrent_trials)
    optuna_only = {"points_to_evaluate": search.points_to_evaluate, "storage": search.storage}
    optuna_only |= {key: getattr(search, key) for key in SAMPLER_OPTIONS}
    for key, value in optuna_only.items():
        if search.algorithm != "optuna" and value not in (None, {}):
            fail(f"search.{key}", f"no value under search.algorithm {search.algorithm} (Optuna's option)", value)
        samplers = SAMPLER_OPTIONS.get(key, ())
        if samplers and value is not None and search.sampler not in samplers:
            fail(
                f"search.{key}",
                f"no value with sampler {search.sampler} (it is an option of {'/'.join(samplers)})",
                value,
            )
    if search.n_startup_trials is not None and search.n_startup_trials < 0:
        fail("search.n_startup_trials", "an integer >= 0", search.n_startup_trials)
    if search.algorithm == "optuna":
        package = SAMPLER_PACKAGES.get(search.sampler)
        if package is not None and importlib.util.find_spec(package) is None:
            fail(
                "search.sampler",
                f"a sampler whose packages are installed ({search.sampler} needs '{package}': "
                f'pip install -e ".[search]")',
                search.sampler,
            )
    if search.storage is not None:
        try:
            search.storage = absolute_storage_url(search.storage)
        except ValueError as e:
            fail("search.storage", str(e), search.storage)


def absolute_storage_url(url: str) -> str:
    """`url` checked as an Optuna RDB URL, a sqlite file's path made absolute (the driver may be resumed from
    another directory). Raises ValueError saying what was expected; nothing is connected to."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ValueError("an Optuna RDB URL such as sqlite:///path/optuna.db or postgresql://user@host/db") from None
    if parsed.get_backend_name() != "sqlite":
        return url
    if not parsed.database or parsed.database == ":memory:":
        raise ValueError("a sqlite file (sqlite:///path/optuna.db), not an in-memory database")
    path = Path(parsed.database).expanduser().resolve()
    if not path.parent.is_dir():
        raise ValueError(f"a sqlite file in an existing directory ({path.parent} does not exist)")
    return parsed.set(database=str(path)).render_as_string(hide_password=False)


def check_points(spec: SweepSpec, fail: Fail) -> None:
    """`points_to_evaluate` against the parameters (in canonical form): each path a swept parameter, each value
    inside its range or among its choices, converted in place as the parameter's own values are. Also cmaes's
    need for two numeric parameters. Called by `sweeps.space` after the parameters are checked."""
    search = spec.search
    if search.algorithm == "optuna" and search.sampler == "cmaes":
        numeric = [path for path, p in spec.parameters.items() if p.swept and p.distribution != "values"]
        if len(numeric) < 2:
            fail(
                "search.sampler",
                "at least two numeric (range) parameters for cmaes (below that Optuna samples at random)",
                f"cmaes with {len(numeric)}",
            )
    for name, point in search.points_to_evaluate.items():
        if not isinstance(point, dict) or not point:
            fail(f"search.points_to_evaluate.{name}", "a mapping of parameter paths to values", point)
        for path, value in point.items():
            key = f"search.points_to_evaluate.{name}.{path}"
            p = spec.parameters.get(path)
            if p is None or not p.swept:
                fail(key, f"a swept parameter (one of {spec.swept_params})", path)
            point[path] = _point_value(p, path, value, key, fail)


def _point_value(p: Any, path: str, value: Any, key: str, fail: Fail) -> Any:
    """`value` for parameter `p`, converted like the parameter's own values (a float for a float range, also over
    an integer field: Optuna's distribution is a float one); fails outside its range or choices."""
    if p.distribution == "values":
        for choice in p.values:
            try:
                if coerce(value, type(choice), key) == choice:
                    return choice
            except ConfigError:
                continue
        fail(key, f"one of {p.values}", value)
    kind = int if p.distribution == "int_uniform" else float
    try:
        number = coerce(value, kind, key)
    except ConfigError:
        fail(key, f"a number in [{p.min}, {p.max}]", value)
    if not p.min <= number <= p.max:
        fail(key, f"a number in [{p.min}, {p.max}] (parameters.{path})", value)
    if p.distribution == "q_uniform" and not math.isclose((number - p.min) / p.q, round((number - p.min) / p.q)):
        fail(key, f"min + a multiple of q = {p.q}", value)
    return number


def start_name(meta: dict[str, Any], number: int, config: dict[str, Any]) -> str | None:
    """The name of the `points_to_evaluate` entry trial `number` (1-based) tried, or None.

    The study hands out its enqueued points before anything else, in order (each to `repeats` trials), so the
    named starts are the first trials; a trial among those whose parameters equal a point's is that point."""
    starts = meta.get(START_META) or {}
    if number > len(starts) * int(meta.get("repeats") or 1):
        return None
    for name, point in starts.items():
        if all(config.get(path) == value for path, value in point.items()):
            return name
    return None


def make_sampler(spec: SweepSpec):
    """The Optuna sampler of `search.sampler` with its options and seed."""
    import warnings

    import optuna

    search = spec.search
    startup = startup_trials(search, spec.num_samples)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # qmc is "experimental" since 3.0
        if search.sampler == "tpe":
            multivariate = True if search.multivariate is None else search.multivariate
            return optuna.samplers.TPESampler(seed=search.seed, n_startup_trials=startup, multivariate=multivariate)
        if search.sampler == "gp":
            return optuna.samplers.GPSampler(seed=search.seed, n_startup_trials=startup)
        if search.sampler == "cmaes":
            return optuna.samplers.CmaEsSampler(
                seed=search.seed, n_startup_trials=startup, warn_independent_sampling=False
            )
        if search.sampler == "qmc":
            return optuna.samplers.QMCSampler(
                qmc_type=search.qmc_type or "sobol", scramble=True, seed=search.seed, warn_independent_sampling=False
            )
        return optuna.samplers.RandomSampler(seed=search.seed)


def search_algorithm(
    spec: SweepSpec, max_concurrent: int | None = None, storage: str | None = None, study_name: str | None = None
):
    """`StudySearch` (Optuna's sampler on a study in `storage`, an RDB URL; None: in memory) or Tune's seeded
    random/grid variant generator.

    Tune applies `TuneConfig(max_concurrent_trials)` to Searchers only; the variant generator takes its
    own `max_concurrent`, so the limit is given here for it.
    """
    search = spec.search
    if search.algorithm == "optuna":
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        from sweeps.repeats import wrap_searcher
        from sweeps.study_search import StudySearch

        searcher = StudySearch(
            sampler=make_sampler(spec),
            storage=optuna.storages.get_storage(storage) if storage else None,
            study_name=study_name,
            named_points=dict(search.points_to_evaluate),
        )
        return wrap_searcher(spec, searcher)  # repeats: Ray's Repeater, each suggestion trained with K seeds
    from ray.tune.search import BasicVariantGenerator

    # constant_grid_search: under random, the only grid axis is the repeats' train.seed, and a group's trials must
    # share one random sample (sweeps/repeats.py).
    return BasicVariantGenerator(
        random_state=search.seed, max_concurrent=max_concurrent or 0, constant_grid_search=True
    )
