"""Search-space YAML files: parse, validate (before Ray starts), and turn into Ray Tune / Optuna objects.

```yaml
name: lr_sweep
base_config: configs/tiny.yaml          # anything not under `parameters` comes from here
metric: {name: val_loss, goal: minimize}
search: {algorithm: optuna, sampler: tpe, seed: 0, max_concurrent_trials: 2}   # optuna | random | grid
scheduler: {type: asha, time_attr: tokens_seen, grace_period: 200_000, reduction_factor: 3}  # or fifo
num_samples: 8
resources_per_trial: {cpu: auto, gpu: 0}  # cpu: threads per trial or "auto" (measured)
                                        # gpu: fraction, whole number or "auto"
stop: {max_tokens: 2_000_000, divergence_loss: 10.0}
checkpoint: {num_to_keep: 2}
max_failures: 2
stall: {warn_after_s: 60, timeout_s: null}   # silent trials: warn; fail and retry after timeout_s
parameters:                             # keys are dotted config paths (lm/config.py), or free names
  optimizer.lr: {distribution: log_uniform_values, min: 1.0e-4, max: 3.0e-2}
  data.batch_size: {values: [16, 32, 64]}
  model.d_model: {values: [128, 256]}
derived:                                # config fields computed from others (sweeps/derived.py)
  model.d_ff: "round(8 / 3 * model.d_model / 64) * 64"
repeats: 1                              # trials per configuration, each with its own train.seed
```
`SweepSpec` mirrors this layout, one dataclass per section with a docstring per key. It is read by the same
machinery as the training config (`lm.fields.build`: unknown keys, types, choices), then `parse_space` checks
what depends on several keys. Every error is a `SpaceError` whose one-line message names the file, the key and
what was expected.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import math
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from lm.cli import InputError, find_config
from lm.config import Config, field_paths, field_type
from lm.fields import UNSET, ConfigError, build, coerce, dump
from lm.record import Key
from sweeps import derived as derived_exprs
from sweeps import repeats as seeds
from sweeps.layout import NAME_RULE, valid_name
from sweeps.schedulers import Scheduler, check_scheduler
from sweeps.search import Search, check_points, check_search
from sweeps.tracking import Tracking, check_tracking

Goal = Literal["minimize", "maximize", "min", "max"]
MetricName = Literal[Key.val_loss, Key.best_val_loss, Key.train_loss]
DISTRIBUTIONS = ("log_uniform_values", "uniform", "q_uniform", "int_uniform", "values", "value")


class SpaceError(InputError):
    """A search-space file is malformed (one-line message: file, key, what was expected)."""


@dataclass
class Metric:
    """What the search optimizes, ASHA compares and checkpoints are ranked by."""

    name: MetricName = Key.val_loss.value
    """val_loss (at each evaluation), best_val_loss (the lowest so far) or train_loss."""
    goal: Goal = "minimize"
    """minimize or maximize (min and max also work)."""

    @property
    def mode(self) -> str:
        """Ray Tune's spelling of the goal: "min" or "max"."""
        return "min" if self.goal in ("minimize", "min") else "max"


@dataclass
class Resources:
    """What each trial gets from Ray."""

    cpu: float | Literal["auto"] = 1.0
    """CPU threads per trial, or "auto": sweeps.placement measures the best split of the machine at run time."""
    gpu: float | Literal["auto"] = 0.0
    """GPUs per trial: 0, a fraction in (0, 1] (trials share a GPU), a whole number, or "auto"."""
    pending_timeout_s: float | None = 600.0
    """On a Ray cluster (--address): when trials have waited this many seconds for a node with the CPUs and GPUs
    above and no node of the cluster has them, the sweep ends (exit 1, results written) with one line naming what a
    trial asks and what the cluster has; null: wait for such a node (an autoscaler) forever. A local Ray refuses
    such resources before it starts."""


@dataclass
class Stop:
    """Sweep-wide training settings: each, when set, replaces the base config's train field of the same name."""

    max_tokens: int | None = None
    """Token budget of every trial (ASHA's max_t); null: the base config's train.max_tokens."""
    divergence_loss: float | None = None
    """A trial whose loss exceeds this stops as diverged; null: the base config's train.divergence_loss."""


@dataclass
class Checkpoint:
    """Ray's checkpoints of each trial's training state."""

    num_to_keep: int = 2
    """Checkpoints kept per trial, the best by the metric (Ray also keeps the latest, for resume)."""


@dataclass
class Stall:
    """Trials that stop reporting (a hung or stopped worker, a stuck filesystem): the driver watches each running
    trial's silence against its own interval between reports."""

    warn_after_s: float | None = 60.0
    """One warning line when a running trial has reported nothing for 5x its longest interval between reports, and
    at least this many seconds; null: no warnings."""
    timeout_s: float | None = None
    """A running trial silent for this many seconds (since its last report, or its start) is failed and retried
    from its last checkpoint (max_failures); null: never. Set it well above the slowest evaluation interval and
    the time to the first report (data, compile)."""


@dataclass
class Param:
    """One entry under `parameters`: how each trial sets one config field. Its keys' types depend on the field,
    so `parse_space` converts them and puts the entry in canonical form (distribution always set)."""

    EXAMPLE: ClassVar[str] = "{distribution: uniform, min: 0, max: 1} or {values: [...]} or {value: x}"
    distribution: Any = UNSET
    """One of DISTRIBUTIONS ("value" goes with `value`; "grid" is "values" under search.algorithm grid).
    Default: "values" when values are given."""
    min: Any = UNSET
    """Lower end of a range (log_uniform_values: > 0)."""
    max: Any = UNSET
    """Upper end of a range (included for int_uniform)."""
    q: Any = UNSET
    """Step between the values of q_uniform."""
    values: Any = UNSET
    """The choices of "values": a categorical, or an axis of the grid (a single choice is a constant)."""
    value: Any = UNSET
    """A constant: every trial gets it."""

    @property
    def swept(self) -> bool:
        return self.distribution != "value" and not (self.distribution == "values" and len(self.values) == 1)

    @property
    def ends(self) -> list[Any]:
        """The values validation tries: the constant, every listed value, or both ends of the range."""
        return {"value": [self.value], "values": self.values}.get(self.distribution, [self.min, self.max])


@dataclass
class SweepSpec:
    """A search space, laid out as its YAML file; after `parse_space`, defaults are filled in, values are checked
    and paths are absolute."""

    name: str | None = None
    """The sweep's name: its directory under the storage path. Null: the file name without extension."""
    description: str | None = None
    """Free text for people."""
    base_config: str | None = None
    """The training config every trial starts from (relative to the working directory, the space file's
    directory or its parent, or a shipped config); null: the defaults."""
    metric: Metric = field(default_factory=Metric)
    """What is optimized."""
    search: Search = field(default_factory=Search)
    """How trials are chosen."""
    scheduler: Scheduler = field(default_factory=Scheduler)
    """Early stopping."""
    num_samples: int | None = None
    """Trials to run (under search.algorithm grid: runs of the whole grid). Null: 8, or 1 under grid."""
    resources_per_trial: Resources = field(default_factory=Resources)
    """CPUs and GPUs per trial."""
    stop: Stop = field(default_factory=Stop)
    """Sweep-wide training settings."""
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    """Ray's checkpoints."""
    max_failures: int = 2
    """Restarts of a failed trial from its last checkpoint; -1: unlimited."""
    stall: Stall = field(default_factory=Stall)
    """Warning about, and failing, trials that stop reporting."""
    tracking: Tracking = field(default_factory=Tracking)
    """TensorBoard, Weights & Biases and MLflow runs of the trials."""
    parameters: dict[str, Param] = field(default_factory=dict)
    """Dotted config paths (lm/config.py) and how each trial sets them; the rest comes from base_config. A name
    without a dot (base_lr) is a free name: swept like the others, it sets no config field, only `derived`
    expressions read it (at least one must)."""
    derived: dict[str, str] = field(default_factory=dict)
    """Config fields computed for each trial from other fields and free names: dotted path -> expression, e.g.
    model.d_ff: "round(8 / 3 * model.d_model / 64) * 64" (sweeps/derived.py: numbers, dotted fields, free names,
    + - * / // % **, comparisons, x if c else y, round min max abs int float log exp sqrt)."""
    repeats: int | None = None
    """Trials per configuration, each with its own train.seed (the base seed + 0, 1, ..., repeats - 1): results
    show the metric's mean and std per configuration, and the best configuration is the best mean. Null: 1. Under
    search.algorithm grid, num_samples K > 1 runs of the grid are repeats too: K x repeats seeds per point."""
    source: str = field(default="<space>", init=False)
    """The file the space came from, for messages."""
    base: Config = field(default_factory=Config, init=False, repr=False)
    """base_config as loaded, with its data paths made absolute (trials run in their own working directory)."""

    @property
    def swept_params(self) -> list[str]:
        return [path for path, p in self.parameters.items() if p.swept]

    @property
    def repeat_count(self) -> int:
        """Trials per configuration (1: no repeats)."""
        return self.repeats or 1

    @property
    def tune_num_samples(self) -> int:
        """Tune's num_samples: configurations times repeats under optuna (Ray's Repeater counts every trial);
        under random and grid the repeats are a grid axis of train.seed, which Tune multiplies by itself."""
        return self.num_samples * self.repeat_count if self.search.algorithm == "optuna" else self.num_samples

    def trial_base(self) -> Config:
        """The base config with the sweep-wide settings (stop.*) applied: every trial starts from it."""
        overrides = {f"train.{k}": v for k, v in dataclasses.asdict(self.stop).items() if v is not None}
        return self.base.replace(overrides, self.source) if overrides else self.base

    def trial_config(self, sampled: dict[str, Any]) -> Config:
        """Base + constants + sampled overrides + the derived fields (a trial's config).

        `sampled` is the searcher's config: dotted config paths, free names (a free name missing from it takes
        its low end: min, or the first of values) and, under optuna with repeats, Ray's repeat index, which sets
        train.seed to the base seed + index. Raises ConfigError for an invalid combination, and
        "trial: derived.KEY: why" for an expression that cannot be evaluated."""
        sampled = dict(sampled)
        index = sampled.pop(seeds.TRIAL_INDEX, None)
        constants = {path: p.value for path, p in self.parameters.items() if p.distribution == "value"}
        # A continuous draw for an integer field (e.g. log-uniform warmup steps) is rounded.
        overrides = {
            k: int(round(v)) if isinstance(v, float) and _base_type(field_type(k)) is int else v
            for k, v in {**constants, **sampled}.items()
            if "." in k
        }
        if index is not None:
            overrides[seeds.SEED] = overrides.get(seeds.SEED, self.trial_base().train.seed) + int(index)
        if self.derived:
            free = {k: v for k, v in {**self.free_defaults, **constants, **sampled}.items() if "." not in k}
            overrides.update(self._derived_values(overrides, free))
        return self.trial_base().replace(overrides, source="trial")

    @property
    def free_defaults(self) -> dict[str, Any]:
        """Each free name (a parameter without a dot) at its low end: the value a trial config built without it
        (the data check, the metadata's base config) uses."""
        return {path: p.ends[0] for path, p in self.parameters.items() if "." not in path}

    def _derived_values(self, overrides: dict[str, Any], free: dict[str, Any]) -> dict[str, Any]:
        """The derived fields, typed to their config fields, for a trial with these overrides and free names."""
        base = self.trial_base().to_dict()

        def lookup(name: str) -> Any:
            if "." not in name:
                return free[name]
            if name in overrides:
                return overrides[name]
            section, _, key = name.partition(".")
            return base[section][key]

        expressions = {key: self._parsed_derived(key) for key in self.derived}
        try:
            values = derived_exprs.compute(expressions, derived_exprs.order(expressions), lookup)
        except derived_exprs.DerivedError as e:
            raise ConfigError(f"trial: derived.{e}") from None
        typed = {}
        for key, value in values.items():
            try:
                typed[key] = coerce(value, field_type(key), f"trial: derived.{key}")
            except ConfigError as e:
                raise ConfigError(f"{e} (the expression gives {value!r}; round() it for an integer field)") from None
        return typed

    def _parsed_derived(self, key: str) -> derived_exprs.Expression:
        return derived_exprs.parse(key, self.derived[key], _is_field, {p for p in self.parameters if "." not in p})

    @property
    def expected_trials(self) -> int:
        """Trials a complete sweep runs: num_samples, times the grid's size under algorithm grid, times repeats."""
        if self.search.algorithm != "grid":
            return self.num_samples * self.repeat_count
        return (
            self.num_samples
            * self.repeat_count
            * math.prod(len(p.values) for p in self.parameters.values() if p.distribution == "values")
        )

    def results_meta(self) -> dict[str, Any]:
        """What reading the results back needs to know of repeats and derived fields (stored in sweep_meta.json):
        the repeat count, the derived expressions and the free names' constants and defaults."""
        free = {**self.free_defaults, **{k: p.value for k, p in self.parameters.items() if p.distribution == "value"}}
        return {
            "repeats": self.repeat_count,
            "derived": dict(self.derived),
            "free_names": {k: v for k, v in free.items() if "." not in k},
        }

    @property
    def total_tokens(self) -> int:
        return self.trial_base().train.max_tokens

    def to_dict(self) -> dict[str, Any]:
        """The space as plain YAML data, defaults filled in and base_config absolute: `parse_space` reads it back
        to an equal spec (the experiment directory keeps it, so that --resume runs the same space)."""
        return dump(self)


# ---------------------------------------------------------------------------------------------------
# Reading and checking
# ---------------------------------------------------------------------------------------------------


def load_space(path: str | Path, sets: list[str] | None = None) -> SweepSpec:
    """Read, apply `--set key=value` overrides, and validate a search-space YAML file."""
    path = Path(path)
    src = str(path)
    if not path.is_file():
        raise SpaceError(f"{src}: search space file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpaceError(f"{src}: malformed YAML{where}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(raw, dict):
        raise SpaceError(f"{src}: expected a mapping of sweep settings at the top level")
    raw = copy.deepcopy(raw)
    for item in sets or []:
        _apply_set(raw, item, src)
    return parse_space(raw, src, path.parent)


def _apply_set(raw: dict[str, Any], item: str, src: str) -> None:
    """`num_samples=4`, `search.seed=1`, `parameters.optimizer.lr.max=1e-2`, `derived.model.d_ff=EXPR`, or a
    config field (`train.compile=true`), which becomes a constant parameter. Raises SpaceError for a value that is
    not YAML, an unknown key, or a section of the file on the way that is not a mapping."""
    key, eq, text = item.partition("=")
    if not eq:
        raise SpaceError(f"--set {item}: expected key=value")
    try:
        value = yaml.safe_load(text) if text else None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or " ".join(str(e).split())
        raise SpaceError(f"--set {key}: expected a YAML value after '=', got {text!r} ({problem}{where})") from None
    head, _, rest = key.partition(".")
    if head == "parameters":
        param, _, attr = rest.rpartition(".")
        if param not in _mapping_at(raw, ["parameters"], src, item):
            raise SpaceError(
                f"--set {item}: no parameter '{param}' in {src} (to fix a config field use --set {rest}=...)"
            )
        _mapping_at(raw, ["parameters", param], src, item)[attr] = value
    elif head == "derived":  # its keys are dotted paths: derived.model.d_ff="model.d_model * 4"
        _mapping_at(raw, ["derived"], src, item)[rest] = value
    elif head in (f.name for f in dataclasses.fields(SweepSpec) if f.init):
        parts = key.split(".")
        _mapping_at(raw, parts[:-1], src, item)[parts[-1]] = value
    elif key in field_paths():
        _mapping_at(raw, ["parameters"], src, item)[key] = {"value": value}
    else:
        raise SpaceError(f"--set {item}: unknown key '{key}' (a sweep setting or a config field such as optimizer.lr)")


def _mapping_at(raw: dict[str, Any], keys: list[str], src: str, item: str) -> dict[str, Any]:
    """The mapping at `keys` inside `raw` (`["parameters", "optimizer.lr"]`), created where absent or null.

    Raises SpaceError "SRC: KEY: expected a mapping ..." where the file holds something else there."""
    target = raw
    for depth, k in enumerate(keys, 1):
        if target.get(k) is None:
            target[k] = {}
        target = target[k]
        if not isinstance(target, dict):
            where = ".".join(keys[:depth])
            raise SpaceError(
                f"{src}: {where}: expected a mapping for --set {item} to set a key in, got {target!r} "
                f"('{k}' is not a mapping)"
            )
    return target


def parse_space(raw: dict[str, Any], src: str = "<space>", spec_dir: Path | None = None) -> SweepSpec:
    """Validate a search-space mapping (as loaded from YAML) into a SweepSpec.

    `build` checks each key alone (known, typed, one of its choices); then the defaults that depend on the file
    or on other keys are filled in, the base config is loaded, and `_validate` checks the rest.
    """
    with _space_errors():
        spec = build(SweepSpec, raw, src, noun="key")
    spec.source = src
    spec.name = spec.name or Path(src).stem
    if spec.num_samples is None:
        spec.num_samples = 1 if spec.search.algorithm == "grid" else 8  # a grid runs each point once
    if spec.search.algorithm == "grid" and spec.num_samples > 1:
        # More runs of a grid are repeats with other seeds (identical runs would teach nothing): K runs of a grid
        # with repeats R are K * R seeds per point.
        spec.repeats, spec.num_samples = spec.num_samples * (1 if spec.repeats is None else spec.repeats), 1
    if spec.base_config is not None:
        spec.base_config = str(_resolve_base(spec.base_config, src, spec_dir or Path.cwd()))
    try:
        base = Config.from_file(spec.base_config) if spec.base_config else Config()
    except ConfigError as e:
        raise SpaceError(f"{src}: base_config: {e}") from None
    spec.base = _absolute_data_paths(base, Path(spec.base_config) if spec.base_config else None)
    _validate(spec)
    return spec


@contextlib.contextmanager
def _space_errors() -> Iterator[None]:
    """The builder's ConfigErrors, as SpaceErrors (same message)."""
    try:
        yield
    except ConfigError as e:
        raise SpaceError(str(e)) from None


def _resolve_base(text: str, src: str, spec_dir: Path) -> Path:
    path = find_config(text, spec_dir, spec_dir.parent)  # also the shipped configs (configs/tiny.yaml)
    if not path.is_file():
        raise SpaceError(
            f"{src}: base_config: file '{text}' not found (looked in the working directory, {spec_dir}, "
            f"{spec_dir.parent} and the shipped configs)"
        )
    return path.resolve()


def _absolute_data_paths(config: Config, base_path: Path | None) -> Config:
    """Trials run in their own working directory: make data and output paths absolute now."""
    overrides = {}
    for key in ("data.train_path", "data.val_path"):
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value is not None and not Path(value).is_absolute():
            p = Path(value).expanduser()
            candidates = [Path.cwd() / p] + ([base_path.parent / p] if base_path else [])
            found = next((c for c in candidates if c.exists()), candidates[0])
            overrides[key] = str(found.resolve())
    return config.replace(overrides) if overrides else config


def _validate(spec: SweepSpec) -> None:
    """What `build` cannot check key by key: ranges, and keys that depend on others. Puts every parameter in
    canonical form. Raises SpaceError naming the first bad key."""
    src = spec.source

    def fail(key: str, expected: str, got: Any) -> typing.NoReturn:
        raise SpaceError(f"{src}: {key}: expected {expected}, got {got!r}")

    if not valid_name(spec.name):  # the one rule for sweep names (sweeps/layout.py), also --name's
        fail("name", NAME_RULE, spec.name)
    for key, value in (
        ("num_samples", spec.num_samples),
        ("stop.max_tokens", spec.stop.max_tokens),
        ("stop.divergence_loss", spec.stop.divergence_loss),
        ("checkpoint.num_to_keep", spec.checkpoint.num_to_keep),
        ("repeats", spec.repeats),
        ("stall.warn_after_s", spec.stall.warn_after_s),
        ("stall.timeout_s", spec.stall.timeout_s),
        ("resources_per_trial.pending_timeout_s", spec.resources_per_trial.pending_timeout_s),
    ):
        if value is not None and not value > 0:
            fail(key, "a positive number", value)
    check_search(spec, fail)
    cpu, gpu = spec.resources_per_trial.cpu, spec.resources_per_trial.gpu
    if cpu != "auto" and not cpu > 0:
        fail("resources_per_trial.cpu", 'a positive number of CPUs or "auto"', cpu)
    if gpu != "auto" and not (gpu >= 0 and (gpu <= 1 or float(gpu).is_integer())):
        fail("resources_per_trial.gpu", '0, a fraction in (0, 1], a whole number or "auto"', gpu)
    if spec.max_failures < -1:
        fail("max_failures", "an integer >= 0 (or -1 for unlimited)", spec.max_failures)
    algorithm = spec.search.algorithm
    spec.parameters = {
        path: _check_param(path, p, algorithm, f"{src}: parameters.{path}") for path, p in spec.parameters.items()
    }
    if algorithm == "grid" and not any(p.distribution == "values" for p in spec.parameters.values()):
        raise SpaceError(f"{src}: parameters: search.algorithm grid needs at least one 'values' axis")
    check_scheduler(spec, fail)  # after the parameters: pbt/pb2 check what they perturb
    check_tracking(spec, fail)
    seeds.check_repeats(spec, fail)
    _check_derived(spec)
    _check_params_build(spec)
    check_points(spec, fail)  # search.points_to_evaluate, against the parameters in canonical form


def _check_param(path: str, p: Param, algorithm: str, where: str) -> Param:
    """A `parameters` entry checked against its config field and the algorithm, in canonical form: distribution
    set ("grid" becomes "values"), every value converted to the field's type (a free name's: a number)."""
    if "." not in path and path.isidentifier():
        annotation: Any = int | float  # a free name: only derived expressions read it, as a number
    elif path not in field_paths():
        raise SpaceError(
            f"{where}: not a config field (known: {', '.join(field_paths())}; a name without a dot is a free name "
            f"for derived expressions)"
        )
    else:
        annotation = field_type(path)
    if p.value is not UNSET:
        given = [f.name for f in dataclasses.fields(p) if getattr(p, f.name) is not UNSET]
        others = sorted(set(given) - {"value"} - ({"distribution"} if p.distribution == "value" else set()))
        if others:
            raise SpaceError(f"{where}: 'value' (a constant) cannot be combined with {others}")
        return Param("value", value=_typed(p.value, annotation, f"{where}.value"))
    dist = p.distribution if p.distribution is not UNSET else ("values" if p.values is not UNSET else None)
    if dist == "log_uniform":
        raise SpaceError(
            f"{where}.distribution: 'log_uniform' takes log-space bounds in W&B; use "
            f"log_uniform_values with min/max given as values (e.g. min: 1.0e-4, max: 3.0e-2)"
        )
    if dist == "grid":
        if algorithm != "grid":
            raise SpaceError(
                f"{where}.distribution: grid axes need search.algorithm: grid (got {algorithm}); "
                f"with {algorithm} use 'values' for a categorical choice"
            )
        dist = "values"
    if dist not in DISTRIBUTIONS:
        raise SpaceError(f"{where}.distribution: expected one of {list(DISTRIBUTIONS)}, got {dist!r}")
    if dist == "value":
        raise SpaceError(f"{where}.value: required for distribution value")
    if dist == "values":
        values = None if p.values is UNSET else p.values
        if not isinstance(values, list) or not values:
            raise SpaceError(f"{where}.values: expected a non-empty list, got {values!r}")
        return Param("values", values=[_typed(v, annotation, f"{where}.values") for v in values])
    if algorithm == "grid":
        raise SpaceError(f"{where}: search.algorithm grid takes only 'values' axes and constants, got {dist}")
    if p.values is not UNSET:
        raise SpaceError(f"{where}: 'values' does not go with distribution {dist}")
    return _check_range(path, p, dist, annotation, where)


def _check_range(path: str, p: Param, dist: str, annotation: Any, where: str) -> Param:
    """A range distribution (uniform, log_uniform_values, q_uniform, int_uniform) in canonical form."""
    for key in ("min", "max"):
        if getattr(p, key) is UNSET:
            raise SpaceError(f"{where}.{key}: required for distribution {dist}")
    if _base_type(annotation) not in (int, float):
        raise SpaceError(f"{where}.distribution: {dist} draws numbers, but {path} is not numeric; use 'values'")
    kind = int if dist == "int_uniform" else float
    lo, hi = _typed(p.min, kind, f"{where}.min"), _typed(p.max, kind, f"{where}.max")
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo >= hi:
        raise SpaceError(f"{where}: expected min < max, got min {lo!r} and max {hi!r}")
    if dist == "log_uniform_values" and lo <= 0:
        raise SpaceError(f"{where}.min: log_uniform_values needs min > 0, got {lo!r}")
    q = UNSET
    if dist == "q_uniform":
        if p.q is UNSET:
            raise SpaceError(f"{where}.q: required for q_uniform (the step between values)")
        q = _typed(p.q, float, f"{where}.q")
        if not q > 0:
            raise SpaceError(f"{where}.q: expected a positive number, got {p.q!r}")
    elif p.q is not UNSET:
        raise SpaceError(f"{where}.q: only q_uniform takes a step")
    return Param(dist, min=lo, max=hi, q=q)


def _typed(value: Any, annotation: Any, where: str) -> Any:
    with _space_errors():
        return coerce(value, annotation, where)


def _is_field(path: str) -> bool:
    return path in field_paths()


def _base_type(annotation: Any) -> Any:
    """int for `int | None`, etc."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def _check_params_build(spec: SweepSpec) -> None:
    """The sweep-wide settings and the constants must give a valid config, and so must every listed value and
    both ends of every range with the constants applied.

    Each failure names the key that is wrong: `stop` when the base config rejects it, the first constant whose
    value makes the config invalid (alone or with the constants before it), or the swept value. Catches e.g. a
    batch size choice that makes max_tokens shorter than one step, before Ray starts.
    """

    def fail(key: str, value: Any, e: ConfigError) -> typing.NoReturn:
        got = f"value {value!r} gives" if key != "stop" else "gives"
        raise SpaceError(f"{spec.source}: {key}: {got} an invalid config: {str(e).split(': ', 1)[-1]}") from None

    try:
        base = spec.trial_base()
    except ConfigError as e:
        fail("stop", None, e)
    constants: dict[str, Any] = {}
    for path, p in spec.parameters.items():
        if p.distribution == "value" and "." in path and not spec.derived:  # derived fields may be what fixes it
            constants[path] = p.value
            try:
                base.replace(constants, spec.source)
            except ConfigError as e:
                fail(f"parameters.{path}", p.value, e)
    for path, p in spec.parameters.items():
        for v in [] if p.distribution == "value" else p.ends:
            _check_trial(spec, {path: v})
    for combination in _derived_combinations(spec):
        _check_trial(spec, combination)


def _check_trial(spec: SweepSpec, sampled: dict[str, Any]) -> None:
    """`spec.trial_config(sampled)` must work; else a SpaceError naming the derived expression that failed or
    whose value the config refuses, or the parameter (or combination of parameters) that gives the bad config."""
    try:
        spec.trial_config(sampled)
        return
    except ConfigError as e:
        message = str(e).removeprefix("trial: ")
    at = ", ".join(f"{k}={_fmt_value(v)}" for k, v in sampled.items()) or "the base config"
    if message.startswith("derived."):  # the expression failed, or its value is not of its field's type
        key, _, why = message.removeprefix("derived.").partition(": ")
        raise SpaceError(f"{spec.source}: derived.{key}: at {at}: {why}")
    field_name = message.split(": ", 1)[0]
    blamed = [k for k in spec.derived if k == field_name] or [k for k in spec.derived if k in message]
    if blamed:
        raise SpaceError(f"{spec.source}: derived.{blamed[0]}: at {at}: gives an invalid config: {message}")
    if len(sampled) == 1:
        ((path, value),) = sampled.items()
        raise SpaceError(f"{spec.source}: parameters.{path}: value {value!r} gives an invalid config: {message}")
    raise SpaceError(f"{spec.source}: parameters: {at} gives an invalid config: {message}")


def _fmt_value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else repr(value)


MAX_COMBINATIONS = 256
"""Validation tries every combination of the ends of the swept inputs of derived fields up to this many;
beyond it, each input's ends with the others at their low end."""


def _derived_combinations(spec: SweepSpec) -> list[dict[str, Any]]:
    """The sampled values validation tries for the derived fields: the ends of every swept parameter they read
    (directly or through other derived fields), in every combination when there are few."""
    if not spec.derived:
        return []
    read: set[str] = set()
    for key in spec.derived:
        read |= spec._parsed_derived(key).names
    inputs = {path: p.ends for path, p in spec.parameters.items() if p.swept and path in read}
    if not inputs:
        return [{}]
    if math.prod(len(ends) for ends in inputs.values()) <= MAX_COMBINATIONS:
        return [dict(zip(inputs, values, strict=True)) for values in itertools.product(*inputs.values())]
    low = {path: ends[0] for path, ends in inputs.items()}
    return [{**low, path: v} for path, ends in inputs.items() for v in ends]


def _check_derived(spec: SweepSpec) -> None:
    """Each derived key a config field that nothing else sets, its expression parsed (whitelisted nodes, known
    names), no cycle among them, and every free name read by some expression."""
    src = spec.source
    for key in spec.derived:
        if key not in field_paths():
            raise SpaceError(f"{src}: derived.{key}: expected a dotted config field (such as model.d_ff) to set")
        if key in spec.parameters:
            raise SpaceError(f"{src}: derived.{key}: also under parameters; a field is either swept or derived")
        if key == seeds.SEED and spec.repeat_count > 1:
            raise SpaceError(f"{src}: derived.{key}: repeats set train.seed; it cannot also be derived")
        try:
            spec._parsed_derived(key)
        except derived_exprs.DerivedError as e:
            raise SpaceError(f"{src}: derived.{key}: {e}") from None
    try:
        derived_exprs.order({key: spec._parsed_derived(key) for key in spec.derived})
    except derived_exprs.DerivedError as e:
        raise SpaceError(f"{src}: derived.{e}") from None
    read: set[str] = set()
    for key in spec.derived:
        read |= spec._parsed_derived(key).names
    for path in spec.parameters:
        if "." not in path and path not in read:
            raise SpaceError(
                f"{src}: parameters.{path}: a free name (no dot) that no derived expression reads; config fields "
                f"are dotted (optimizer.lr)"
            )


# ---------------------------------------------------------------------------------------------------
# To Ray Tune objects (imported lazily: validation must not pay for importing Ray)
# ---------------------------------------------------------------------------------------------------


def param_space(spec: SweepSpec) -> dict[str, Any]:
    """Tune's param_space: swept paths (and free names) as Tune domains (constants and derived fields are applied
    by `trial_config`); under grid and random, repeats add a grid axis of train.seed."""
    from ray import tune

    space: dict[str, Any] = {}
    seed_axis = seeds.seed_axis(spec)
    if seed_axis is not None:
        space[seeds.SEED] = tune.grid_search(seed_axis)
    for path, p in spec.parameters.items():
        if p.distribution == "value":
            continue
        if p.distribution == "values":
            space[path] = tune.grid_search(p.values) if spec.search.algorithm == "grid" else tune.choice(p.values)
        elif p.distribution == "log_uniform_values":
            space[path] = tune.loguniform(p.min, p.max)
        elif p.distribution == "uniform":
            space[path] = tune.uniform(p.min, p.max)
        elif p.distribution == "q_uniform":
            space[path] = tune.quniform(p.min, p.max, p.q)
        elif p.distribution == "int_uniform":
            space[path] = tune.randint(p.min, p.max + 1)  # Tune's upper bound is exclusive
    return space
