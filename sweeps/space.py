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
parameters:                             # keys are dotted config paths (lm/config.py)
  optimizer.lr: {distribution: log_uniform_values, min: 1.0e-4, max: 3.0e-2}
  data.batch_size: {values: [16, 32, 64]}
  model.d_model: {value: 128}
```
Every error is a `SpaceError` whose one-line message names the file, the key and what was expected.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lm.config import Config, ConfigError, coerce, field_paths, field_type

TOP_LEVEL = {
    "name",
    "base_config",
    "metric",
    "search",
    "scheduler",
    "num_samples",
    "resources_per_trial",
    "stop",
    "checkpoint",
    "max_failures",
    "parameters",
    "description",
}
DISTRIBUTIONS = ("log_uniform_values", "uniform", "q_uniform", "int_uniform", "values", "value")
PARAM_KEYS = {"distribution", "min", "max", "q", "values", "value"}
ALGORITHMS = ("optuna", "random", "grid")
SAMPLERS = ("tpe", "random")
SCHEDULERS = ("asha", "fifo")
METRICS = ("val_loss", "best_val_loss", "train_loss")


class SpaceError(ValueError):
    """A search-space file is malformed (one-line message: file, key, what was expected)."""


@dataclass
class Param:
    """One swept (or fixed) config field."""

    path: str  # dotted config path, e.g. "optimizer.lr"
    distribution: str  # one of DISTRIBUTIONS
    min: float | None = None
    max: float | None = None
    q: float | None = None
    values: list[Any] = field(default_factory=list)  # choices for "values", [constant] for "value"

    @property
    def swept(self) -> bool:
        return self.distribution != "value" and not (self.distribution == "values" and len(self.values) == 1)


@dataclass
class SweepSpec:
    """A validated search space; paths inside are absolute."""

    source: str
    name: str
    base_config_path: Path | None
    base_config: Config
    metric: str = "val_loss"
    mode: str = "min"
    algorithm: str = "optuna"
    sampler: str = "tpe"
    seed: int | None = 0
    max_concurrent_trials: int | None = None
    scheduler: str = "asha"
    time_attr: str = "tokens_seen"
    grace_period: int = 200_000
    reduction_factor: float = 3.0
    num_samples: int = 8
    cpu: float | str = 1.0  # or "auto"
    gpu: float | str = 0
    max_tokens: int | None = None
    divergence_loss: float | None = None
    num_to_keep: int = 2
    max_failures: int = 2
    params: dict[str, Param] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def swept_params(self) -> list[str]:
        return [p.path for p in self.params.values() if p.swept]

    def trial_base(self) -> Config:
        """The base config with the sweep-wide settings (stop.*) applied: every trial starts from it."""
        overrides: dict[str, Any] = {}
        if self.max_tokens is not None:
            overrides["train.max_tokens"] = self.max_tokens
        if self.divergence_loss is not None:
            overrides["train.divergence_loss"] = self.divergence_loss
        return self.base_config.replace(overrides, self.source) if overrides else self.base_config

    def trial_config(self, sampled: dict[str, Any]) -> Config:
        """Base + sampled overrides (a trial's config); raises ConfigError for an invalid combination."""
        constants = {p.path: p.values[0] for p in self.params.values() if p.distribution == "value"}
        # A continuous draw for an integer field (e.g. log-uniform warmup steps) is rounded.
        sampled = {
            k: int(round(v)) if isinstance(v, float) and _base_type(field_type(k)) is int else v
            for k, v in sampled.items()
        }
        return self.trial_base().replace({**constants, **sampled}, source="trial")

    @property
    def expected_trials(self) -> int:
        """Trials a complete sweep runs: num_samples, times the grid's size under algorithm grid."""
        if self.algorithm != "grid":
            return self.num_samples
        return self.num_samples * math.prod(len(p.values) for p in self.params.values() if p.distribution == "values")

    @property
    def total_tokens(self) -> int:
        return self.trial_base().train.max_tokens


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
    (`train.compile=true`), which becomes a constant parameter."""
    key, eq, text = item.partition("=")
    if not eq:
        raise SpaceError(f"--set {item}: expected key=value")
    value = yaml.safe_load(text) if text else None
    head, _, rest = key.partition(".")
    if head == "parameters":
        params = raw.setdefault("parameters", {}) or {}
        raw["parameters"] = params
        param, _, attr = rest.rpartition(".")
        if param not in params:
            raise SpaceError(
                f"--set {item}: no parameter '{param}' in {src} (to fix a config field use --set {rest}=...)"
            )
        params[param][attr] = value
    elif head in TOP_LEVEL:
        target = raw
        parts = key.split(".")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise SpaceError(f"--set {item}: '{part}' is not a mapping in {src}")
        target[parts[-1]] = value
    elif key in field_paths():
        raw.setdefault("parameters", {})
        raw["parameters"] = raw["parameters"] or {}
        raw["parameters"][key] = {"value": value}
    else:
        raise SpaceError(f"--set {item}: unknown key '{key}' (a sweep setting or a config field such as optimizer.lr)")


def _section(raw: dict, key: str, src: str, allowed: set[str]) -> dict[str, Any]:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise SpaceError(f"{src}: {key}: expected a mapping, got {value!r}")
    for k in value:
        if k not in allowed:
            raise SpaceError(f"{src}: {key}.{k}: unknown key (expected one of {sorted(allowed)})")
    return value


def _number(value: Any, where: str, kind: type = float, positive: bool = False, allow_none: bool = False):
    if value is None and allow_none:
        return None
    try:
        number = coerce(value, kind, where)
    except ConfigError as e:
        raise SpaceError(str(e)) from None
    if positive and not number > 0:
        raise SpaceError(f"{where}: expected a positive number, got {value!r}")
    return number


def _resolve_base(text: Any, src: str, spec_dir: Path) -> Path:
    if not isinstance(text, str):
        raise SpaceError(f"{src}: base_config: expected a path to a YAML/JSON config, got {text!r}")
    p = Path(text).expanduser()
    candidates = [p] if p.is_absolute() else [Path.cwd() / p, spec_dir / p, spec_dir.parent / p]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    tried = ", ".join(str(c) for c in candidates)
    raise SpaceError(f"{src}: base_config: file '{text}' not found (looked at {tried})")


def parse_space(raw: dict[str, Any], src: str = "<space>", spec_dir: Path | None = None) -> SweepSpec:
    """Validate a search-space mapping (as loaded from YAML) into a SweepSpec."""
    spec_dir = spec_dir or Path.cwd()
    for key in raw:
        if key not in TOP_LEVEL:
            raise SpaceError(f"{src}: unknown top-level key '{key}' (expected one of {sorted(TOP_LEVEL)})")
    name = raw.get("name") or Path(src).stem
    if not isinstance(name, str) or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise SpaceError(f"{src}: name: expected letters, digits, '-', '_' or '.', got {name!r}")

    base_path = _resolve_base(raw["base_config"], src, spec_dir) if raw.get("base_config") is not None else None
    try:
        base = Config.from_file(base_path) if base_path else Config()
    except ConfigError as e:
        raise SpaceError(f"{src}: base_config: {e}") from None
    base = _absolute_data_paths(base, base_path)

    metric = _section(raw, "metric", src, {"name", "goal"})
    metric_name = metric.get("name", "val_loss")
    if metric_name not in METRICS:
        raise SpaceError(f"{src}: metric.name: expected one of {list(METRICS)}, got {metric_name!r}")
    goal = metric.get("goal", "minimize")
    if goal not in ("minimize", "maximize", "min", "max"):
        raise SpaceError(f"{src}: metric.goal: expected minimize or maximize, got {goal!r}")

    search = _section(raw, "search", src, {"algorithm", "sampler", "seed", "max_concurrent_trials"})
    algorithm = search.get("algorithm", "optuna")
    if algorithm not in ALGORITHMS:
        raise SpaceError(f"{src}: search.algorithm: expected one of {list(ALGORITHMS)}, got {algorithm!r}")
    sampler = search.get("sampler", "tpe")
    if sampler not in SAMPLERS:
        raise SpaceError(f"{src}: search.sampler: expected one of {list(SAMPLERS)}, got {sampler!r}")
    seed = _number(search.get("seed", 0), f"{src}: search.seed", int, allow_none=True)
    max_conc = _number(
        search.get("max_concurrent_trials"),
        f"{src}: search.max_concurrent_trials",
        int,
        positive=True,
        allow_none=True,
    )

    sched = _section(raw, "scheduler", src, {"type", "time_attr", "grace_period", "reduction_factor"})
    sched_type = sched.get("type", "asha")
    if sched_type not in SCHEDULERS:
        raise SpaceError(f"{src}: scheduler.type: expected one of {list(SCHEDULERS)}, got {sched_type!r}")
    time_attr = sched.get("time_attr", "tokens_seen")
    if time_attr not in ("tokens_seen", "step", "training_iteration"):
        raise SpaceError(
            f"{src}: scheduler.time_attr: expected tokens_seen, step or training_iteration, got {time_attr!r}"
        )
    grace = _number(sched.get("grace_period", 200_000), f"{src}: scheduler.grace_period", int, positive=True)
    rf = _number(sched.get("reduction_factor", 3), f"{src}: scheduler.reduction_factor", float, positive=True)
    if rf <= 1:
        raise SpaceError(f"{src}: scheduler.reduction_factor: expected a number > 1, got {rf!r}")

    num_samples = _number(
        raw.get("num_samples", 1 if algorithm == "grid" else 8), f"{src}: num_samples", int, positive=True
    )
    res = _section(raw, "resources_per_trial", src, {"cpu", "gpu"})
    cpu = res.get("cpu", 1)
    if cpu != "auto":  # "auto": sweeps.placement measures the best split of the machine at run time
        try:
            cpu = _number(cpu, f"{src}: resources_per_trial.cpu", float, positive=True)
        except SpaceError:
            raise SpaceError(
                f'{src}: resources_per_trial.cpu: expected a positive number of CPUs or "auto", got {cpu!r}'
            ) from None
    gpu = res.get("gpu", 0)
    if gpu != "auto":
        gpu = _number(gpu, f"{src}: resources_per_trial.gpu", float)
        if gpu < 0 or (gpu > 1 and not float(gpu).is_integer()):
            raise SpaceError(
                f"{src}: resources_per_trial.gpu: expected 0, a fraction in (0, 1], a whole number "
                f'or "auto", got {res["gpu"]!r}'
            )

    stop = _section(raw, "stop", src, {"max_tokens", "divergence_loss"})
    max_tokens = _number(stop.get("max_tokens"), f"{src}: stop.max_tokens", int, positive=True, allow_none=True)
    div = _number(stop.get("divergence_loss"), f"{src}: stop.divergence_loss", float, positive=True, allow_none=True)
    ckpt = _section(raw, "checkpoint", src, {"num_to_keep"})
    num_to_keep = _number(ckpt.get("num_to_keep", 2), f"{src}: checkpoint.num_to_keep", int, positive=True)
    max_failures = _number(raw.get("max_failures", 2), f"{src}: max_failures", int)
    if max_failures < -1:
        raise SpaceError(f"{src}: max_failures: expected an integer >= 0 (or -1 for unlimited), got {max_failures}")

    params_raw = raw.get("parameters") or {}
    if not isinstance(params_raw, dict):
        raise SpaceError(f"{src}: parameters: expected a mapping of config paths to distributions")
    params = {path: _parse_param(path, spec, src, algorithm) for path, spec in params_raw.items()}
    if algorithm == "grid" and not any(p.distribution == "values" for p in params.values()):
        raise SpaceError(f"{src}: parameters: search.algorithm grid needs at least one 'values' axis")

    spec = SweepSpec(
        source=src,
        name=name,
        base_config_path=base_path,
        base_config=base,
        metric=metric_name,
        mode="min" if goal in ("minimize", "min") else "max",
        algorithm=algorithm,
        sampler=sampler,
        seed=seed,
        max_concurrent_trials=max_conc,
        scheduler=sched_type,
        time_attr=time_attr,
        grace_period=grace,
        reduction_factor=rf,
        num_samples=num_samples,
        cpu=cpu,
        gpu=gpu,
        max_tokens=max_tokens,
        divergence_loss=div,
        num_to_keep=num_to_keep,
        max_failures=max_failures,
        params=params,
        raw=raw,
    )
    _check_params_build(spec)
    return spec


def _parse_param(path: str, spec: Any, src: str, algorithm: str) -> Param:
    where = f"{src}: parameters.{path}"
    if path not in field_paths():
        raise SpaceError(f"{where}: not a config field (known: {', '.join(field_paths())})")
    if not isinstance(spec, dict):
        raise SpaceError(
            f"{where}: expected a mapping like {{distribution: uniform, min: 0, max: 1}} or "
            f"{{values: [...]}} or {{value: x}}, got {spec!r}"
        )
    for k in spec:
        if k not in PARAM_KEYS:
            raise SpaceError(f"{where}.{k}: unknown key (expected one of {sorted(PARAM_KEYS)})")
    annotation = field_type(path)

    def typed(value: Any, key: str) -> Any:
        try:
            return coerce(value, annotation, f"{where}.{key}")
        except ConfigError as e:
            raise SpaceError(str(e)) from None

    if "value" in spec:
        if len(spec) > 1:
            raise SpaceError(f"{where}: 'value' (a constant) cannot be combined with {sorted(set(spec) - {'value'})}")
        return Param(path, "value", values=[typed(spec["value"], "value")])
    dist = spec.get("distribution", "values" if "values" in spec else None)
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
    if dist == "values":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise SpaceError(f"{where}.values: expected a non-empty list, got {values!r}")
        return Param(path, "values", values=[typed(v, "values") for v in values])
    if algorithm == "grid":
        raise SpaceError(f"{where}: search.algorithm grid takes only 'values' axes and constants, got {dist}")
    if "values" in spec:
        raise SpaceError(f"{where}: 'values' does not go with distribution {dist}")
    for key in ("min", "max"):
        if key not in spec:
            raise SpaceError(f"{where}.{key}: required for distribution {dist}")
    kind = int if dist == "int_uniform" else float
    if _base_type(annotation) not in (int, float):
        raise SpaceError(f"{where}.distribution: {dist} draws numbers, but {path} is not numeric; use 'values'")
    lo = _number(spec["min"], f"{where}.min", kind)
    hi = _number(spec["max"], f"{where}.max", kind)
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo >= hi:
        raise SpaceError(f"{where}: expected min < max, got min {lo!r} and max {hi!r}")
    if dist == "log_uniform_values" and lo <= 0:
        raise SpaceError(f"{where}.min: log_uniform_values needs min > 0, got {lo!r}")
    q = None
    if dist == "q_uniform":
        if "q" not in spec:
            raise SpaceError(f"{where}.q: required for q_uniform (the step between values)")
        q = _number(spec["q"], f"{where}.q", float, positive=True)
    elif "q" in spec:
        raise SpaceError(f"{where}.q: only q_uniform takes a step")
    return Param(path, dist, min=lo, max=hi, q=q)


def _base_type(annotation: Any) -> Any:
    """int for `int | None`, etc."""
    args = [a for a in getattr(annotation, "__args__", ()) if a is not type(None)]
    return args[0] if args else annotation


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


def _check_params_build(spec: SweepSpec) -> None:
    """Every constant, every listed value and both ends of every range must give a valid config.

    Catches e.g. a batch size choice that makes max_tokens shorter than one step, before Ray starts.
    """
    for p in spec.params.values():
        probes = p.values if p.distribution in ("values", "value") else [p.min, p.max]
        for v in probes:
            if p.distribution == "int_uniform":
                v = int(v)
            try:
                spec.trial_config({p.path: v})
            except ConfigError as e:
                raise SpaceError(
                    f"{spec.source}: parameters.{p.path}: value {v!r} gives an invalid config: "
                    f"{str(e).split(': ', 1)[-1]}"
                ) from None


# ---------------------------------------------------------------------------------------------------
# To Ray Tune objects (imported lazily: validation must not pay for importing Ray)
# ---------------------------------------------------------------------------------------------------


def param_space(spec: SweepSpec) -> dict[str, Any]:
    """Tune's param_space: swept paths as Tune domains (constants are applied by `trial_config`)."""
    from ray import tune

    space: dict[str, Any] = {}
    for p in spec.params.values():
        if p.distribution == "value":
            continue
        if p.distribution == "values":
            space[p.path] = tune.grid_search(p.values) if spec.algorithm == "grid" else tune.choice(p.values)
        elif p.distribution == "log_uniform_values":
            space[p.path] = tune.loguniform(p.min, p.max)
        elif p.distribution == "uniform":
            space[p.path] = tune.uniform(p.min, p.max)
        elif p.distribution == "q_uniform":
            space[p.path] = tune.quniform(p.min, p.max, p.q)
        elif p.distribution == "int_uniform":
            space[p.path] = tune.randint(int(p.min), int(p.max) + 1)  # Tune's upper bound is exclusive
    return space


def search_algorithm(spec: SweepSpec, max_concurrent: int | None = None):
    """OptunaSearch (seeded TPE or random sampler) or Tune's seeded random/grid variant generator.

    Tune applies `TuneConfig(max_concurrent_trials)` to Searchers only; the variant generator takes its
    own `max_concurrent`, so the limit is given here for it.
    """
    if spec.algorithm == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        sampler = (
            optuna.samplers.TPESampler(seed=spec.seed)
            if spec.sampler == "tpe"
            else optuna.samplers.RandomSampler(seed=spec.seed)
        )
        return OptunaSearch(sampler=sampler)
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=spec.seed, max_concurrent=max_concurrent or 0)


def scheduler(spec: SweepSpec):
    """ASHA on `time_attr` up to the token budget (or FIFO: no early stopping)."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if spec.scheduler == "fifo":
        return FIFOScheduler()
    max_t = spec.total_tokens if spec.time_attr == "tokens_seen" else spec.trial_base().total_steps
    return ASHAScheduler(
        time_attr=spec.time_attr,
        max_t=max_t,
        grace_period=min(spec.grace_period, max_t),
        reduction_factor=spec.reduction_factor,
    )
