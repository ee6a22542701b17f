"""`run_sweep.py --dry-run`: what a sweep would do, without starting Ray.

After the same validation as a real start, prints the resolved space (after `--set`), the resources per trial and
how many trials run at once, the scheduler's rungs in tokens, the token budget if no trial is stopped, and the
first trial configurations the search would suggest (the searcher itself, seeded, on an in-memory study: nothing
is written).
"""

from __future__ import annotations

import os
from typing import Any

import yaml

from lm.record import Key
from sweeps.space import SweepSpec


def report(spec: SweepSpec, experiment: str, num_cpus: int | None, local: bool, first: int = 5) -> str:
    """The dry run's text. `experiment`: where the sweep would write (credentials already left out)."""
    lines = [f"dry run: nothing started. The sweep '{spec.name}' would write to {experiment}", "", "resolved space:"]
    space = yaml.safe_dump(spec.to_dict(), sort_keys=False).rstrip().splitlines()
    lines += [f"  {line}" for line in space]
    lines += ["", *resources(spec, num_cpus, local), *rungs(spec), *budget(spec), ""]
    first = min(first, spec.expected_trials)
    lines.append(f"first {first} trial configurations the search suggests (swept and derived values):")
    for i, config in enumerate(suggestions(spec, first), 1):
        values = ", ".join(f"{k}={_short(v)}" for k, v in config.items())
        lines.append(f"  {i}. {values}")
    return "\n".join(lines) + "\n"


def resources(spec: SweepSpec, num_cpus: int | None, local: bool) -> list[str]:
    r = spec.resources_per_trial
    cpus = num_cpus or os.cpu_count() or 1
    gpu = "auto (one GPU per trial when Ray sees GPUs, else 0)" if r.gpu == "auto" else f"{float(r.gpu):g}"
    if r.cpu == "auto":
        cpu = "auto (threads per trial and trials at once measured when the sweep starts; cached per machine)"
        at_once = spec.search.max_concurrent_trials or "as measured"
    else:
        cpu = f"{float(r.cpu):g}"
        at_once = spec.search.max_concurrent_trials or max(1, int(cpus // float(r.cpu)))
    where = f"{cpus} CPUs of a local Ray" if local else "the cluster's CPUs"
    return [f"resources per trial: cpu {cpu}, gpu {gpu}", f"trials at once: {at_once} (on {where})"]


def rungs(spec: SweepSpec) -> list[str]:
    """The scheduler's decision points on its clock (tokens, unless time_attr says otherwise)."""
    from sweeps.schedulers import POPULATION, describe, grace_period

    s, clock = spec.scheduler, spec.scheduler.time_attr
    budget = spec.total_tokens if clock == Key.tokens_seen else spec.trial_base().total_steps
    if s.type == "fifo":
        return ["scheduler: fifo: every trial runs its whole budget"]
    if s.type in POPULATION:
        return [f"scheduler: {describe(spec)}"]
    if s.type == "median":
        return [f"scheduler: median: from {grace_period(spec, budget):,} {clock} on, a trial below the median stops"]
    points, t = [], grace_period(spec, budget)
    while t < budget:
        points.append(int(t))
        t *= s.reduction_factor
    kept = f"the best 1/{s.reduction_factor:g} go on"
    return [f"scheduler: {s.type}: rungs at {', '.join(f'{p:,}' for p in points)} {clock} ({kept}); end {budget:,}"]


def budget(spec: SweepSpec) -> list[str]:
    trials, tokens, k = spec.expected_trials, spec.total_tokens, spec.repeat_count
    repeats = f" ({trials // k} configurations x {k} seeds)" if k > 1 else ""
    return [f"budget: {trials} trials{repeats} x {tokens:,} tokens = {trials * tokens:,} tokens if none is stopped"]


def suggestions(spec: SweepSpec, n: int) -> list[dict[str, Any]]:
    """The first `n` configurations: the optuna searcher (in memory, seeded, named starts first), or Tune's
    variant generation for random and grid; each with its derived values."""
    from sweeps.space import param_space

    space = param_space(spec)
    drawn: list[dict[str, Any]] = []
    if spec.search.algorithm == "optuna":
        from sweeps.search import search_algorithm

        searcher = search_algorithm(spec, None, None, f"{spec.name}-dry-run")
        searcher.set_search_properties(spec.metric.name, spec.metric.mode, space)
        for i in range(n):
            config = searcher.suggest(f"dry{i}")
            if not isinstance(config, dict):
                break
            drawn.append({k: v for k, v in config.items() if not k.startswith("__")})
    else:
        import numpy as np
        from ray.tune.search.variant_generator import generate_variants

        rng = np.random.RandomState(spec.search.seed)
        while len(drawn) < n and space:
            before = len(drawn)
            for _, config in generate_variants(space, constant_grid_search=True, random_state=rng):
                drawn.append(config)
                if len(drawn) >= n:
                    break
            if spec.search.algorithm == "grid" or len(drawn) == before:
                break  # a grid's points are all listed once
    derived = list(spec.derived)
    out = []
    for config in drawn:
        full = spec.trial_config(config).to_dict()
        values = {k: v for k, v in config.items() if k in spec.swept_params or k == "train.seed" or "." not in k}
        for path in derived:
            section, name = path.split(".", 1)
            values[path] = full[section][name]
        out.append(values)
    return out


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
