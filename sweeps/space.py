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
parameters:                             # keys are dotted config paths (lm/config.py)
  optimizer.lr: {distribution: log_uniform_values, min: 1.0e-4, max: 3.0e-2}
  data.batch_size: {values: [16, 32, 64]}
  model.d_model: {value: 128}
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
from sweeps.layout import NAME_RULE, valid_name
from sweeps.schedulers import Scheduler, check_scheduler
from sweeps.search import Search, check_search

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
    parameters: dict[str, Param] = field(default_factory=dict)
    """Dotted config paths (lm/config.py) and how each trial sets them; the rest comes from base_config."""
    source: str = field(default="<space>", init=False)
    """The file the space came from, for messages."""
    base: Config = field(default_factory=Config, init=False, repr=False)
    """base_config as loaded, with its data paths made absolute (trials run in their own working directory)."""

    @property
    def swept_params(self) -> list[str]:
        return [path for path, p in self.parameters.items() if p.swept]

    def trial_base(self) -> Config:
        """The base config with the sweep-wide settings (stop.*) applied: every trial starts from it."""
        overrides = {f"train.{k}": v for k, v in dataclasses.asdict(self.stop).items() if v is not None}
        return self.base.replace(overrides, self.source) if overrides else self.base

    def trial_config(self, sampled: dict[str, Any]) -> Config:
        """Base + sampled overrides (a trial's config); raises ConfigError for an invalid combination."""
        constants = {path: p.value for path, p in self.parameters.items() if p.distribution == "value"}
        # A continuous draw for an integer field (e.g. log-uniform warmup steps) is rounded.
        sampled = {
            k: int(round(v)) if isinstance(v, float) and _base_type(field_type(k)) is int else v
            for k, v in sampled.items()
        }
        return self.trial_base().replace({**constants, **sampled}, source="trial")

    @property
    def expected_trials(self) -> int:
        """Trials a complete sweep runs: num_samples, times the grid's size under algorithm grid."""
        if self.search.algorithm != "grid":
            return self.num_samples
        return self.num_samples * math.prod(
            len(p.values) for p in self.parameters.values() if p.distribution == "values"
        )

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
    """`num_samples=4`, `search.seed=1`, `parameters.optimizer.lr.max=1e-2`, or a config field
    (`train.compile=true`), which becomes a constant parameter. Raises SpaceError for a value that is not YAML,
    an unknown key, or a section of the file on the way that is not a mapping."""
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
        ("stall.warn_after_s", spec.stall.warn_after_s),
        ("stall.timeout_s", spec.stall.timeout_s),
    ):
        if value is not None and not value > 0:
            fail(key, "a positive number", value)
    check_search(spec, fail)
    check_scheduler(spec, fail)
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
    _check_params_build(spec)


def _check_param(path: str, p: Param, algorithm: str, where: str) -> Param:
    """A `parameters` entry checked against its config field and the algorithm, in canonical form: distribution
    set ("grid" becomes "values"), every value converted to the field's type."""
    if path not in field_paths():
        raise SpaceError(f"{where}: not a config field (known: {', '.join(field_paths())})")
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
        if p.distribution == "value":
            constants[path] = p.value
            try:
                base.replace(constants, spec.source)
            except ConfigError as e:
                fail(f"parameters.{path}", p.value, e)
    for path, p in spec.parameters.items():
        for v in {"value": [], "values": p.values}.get(p.distribution, [p.min, p.max]):
            try:
                spec.trial_config({path: v})
            except ConfigError as e:
                fail(f"parameters.{path}", v, e)


# ---------------------------------------------------------------------------------------------------
# To Ray Tune objects (imported lazily: validation must not pay for importing Ray)
# ---------------------------------------------------------------------------------------------------


def param_space(spec: SweepSpec) -> dict[str, Any]:
    """Tune's param_space: swept paths as Tune domains (constants are applied by `trial_config`)."""
    from ray import tune

    space: dict[str, Any] = {}
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
