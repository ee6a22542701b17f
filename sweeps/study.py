"""The sweep's Optuna study, its storage, and the two ways a sweep builds on earlier trials: extending it
(`--resume --num-samples N`) and warm-starting a new one (`--warm-start SWEEP_DIR`).

The study lives in an Optuna storage: `search.storage` (any Optuna RDB URL), else
sqlite:///<experiment dir>/optuna.db (with a URI --storage-path, the local experiment directory that also holds
the driver's lock and trial_status.jsonl). It is named after the sweep. Ray's searcher (sweeps.study_search.
StudySearch) asks it for every trial and tells it every evaluation (intermediate values keyed by tokens seen)
and every final value, so `optuna.load_study` and `optuna-dashboard` read the sweep while it runs.

Extending. Ray's Tuner.restore keeps the saved sweep's num_samples, so an extension restores the sweep as
--resume does and hands Tune, in place of the restored Tuner's searcher, the same searcher in an
`ExtendedSearchGenerator` that raises the restored trial count to N. Chosen over a second Tune run in the same
directory because everything else stays one Ray experiment: unfinished trials are resumed by Ray as by any
--resume (no refusal, no mixing of two runs' states), finished ones are not rerun, the restored searcher (with
the study in its storage) continues from what it saw, new trials are numbered on from the saved count (their
directories and trial_status.jsonl too, so `load_sweep` lists every trial in order), and the saved state then
says N, so a later plain --resume restores the extended sweep from the newest experiment_state-*.json. It costs
one Ray internal (the restored Tuner's TuneConfig, sweeps.ray_compat.restored_tune_config). Only optuna sweeps
extend: Tune's random/grid generator keeps no memory of results. N smaller than the saved count is refused.

Warm start. A new sweep's study starts with the old sweep's trials (read with `load_sweep`, from plain files):
each old trial with a metric (not errored or diverged) becomes a COMPLETE trial (its parameters, its best metric
value, its evaluations as intermediate values) under the new space's distributions; an old trial outside the new
ranges or choices is skipped, with one note line. TPE and GP then model them at once (they count towards
n_startup_trials). Refused in one line before Ray starts: an old sweep over other parameters or another
metric/goal, a directory that is not a sweep or has no trial with a metric, and a search that ignores results
(algorithm random/grid, samplers random, qmc and cmaes: Optuna's CMA-ES ignores trials it did not sample itself).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lm.cli import InputError
from sweeps.layout import SPEC_FILE, STUDY_DB
from sweeps.space import SweepSpec, load_space, param_space

WARM_SAMPLERS = ("tpe", "gp")
"""Samplers that model the study's trials, whatever sampled them: a warm start helps only these."""


class StudyInputError(InputError):
    """A sweep cannot be extended or warm-started as asked, or its study's storage is unusable (one line)."""


@dataclass
class StudyPlan:
    """What the driver does with the Optuna study, decided before Ray starts."""

    name: str
    """The study's name: the sweep's."""
    storage: str | None
    """The study's RDB URL; None: no study (algorithm random or grid)."""
    direction: str = "minimize"
    """The study's direction (the metric's goal)."""
    extend_to: int | None = None
    """On a resume of an optuna sweep: the trials it runs in all (the saved num_samples, or a larger N)."""
    grows: tuple[int, int] | None = None
    """--resume --num-samples N above the saved num_samples: (saved, N)."""
    warm_trials: list[Any] = field(default_factory=list)
    """Optuna FrozenTrials of the --warm-start sweep, to add to the new study before it starts."""
    notes: list[str] = field(default_factory=list)
    """Lines to print when the sweep starts."""


def study_storage(spec: SweepSpec, exp_dir: Path) -> str | None:
    """The study's RDB URL: search.storage, else the SQLite file in the experiment directory (None for random and
    grid sweeps, which have no study)."""
    if spec.search.algorithm != "optuna":
        return None
    return spec.search.storage or f"sqlite:///{Path(exp_dir).resolve() / STUDY_DB}"


def plan_study(args: argparse.Namespace, spec: SweepSpec, exp_dir: Path, name: str) -> StudyPlan:
    """Check --warm-start and an extension (--resume --num-samples N) against the sweep; read the old sweep's
    trials. Creates nothing but the tables of an empty storage it opens to check the study's name (search.storage,
    or a leftover optuna.db). Raises StudyInputError."""
    warm_dir = getattr(args, "warm_start", None)
    plan = StudyPlan(
        name=name,
        storage=study_storage(spec, exp_dir),
        direction="minimize" if spec.metric.mode == "min" else "maximize",
    )
    if args.resume:
        if warm_dir is not None:
            raise StudyInputError("--warm-start starts a new sweep: it does not go with --resume")
        _extension(args, spec, exp_dir, plan)
        return plan
    if spec.search.storage is not None or (Path(exp_dir) / STUDY_DB).exists():  # a leftover of a failed start
        _check_new_study(plan.storage, name)
    if warm_dir is not None:
        if "://" in warm_dir:  # load_sweep reads a remote sweep only through Ray's pickled state
            raise StudyInputError(f"--warm-start {warm_dir}: expected a local sweep directory (copy it here first)")
        plan.warm_trials, plan.notes = warm_trials(Path(warm_dir), spec)
    return plan


def _extension(args: argparse.Namespace, spec: SweepSpec, exp_dir: Path, plan: StudyPlan) -> None:
    """Check `--num-samples N` against the saved sweep: N below its count is refused, above it extends (optuna
    sweeps only). An optuna sweep's resume always restores its searcher into a generator of the spec's trial count
    (from the saved num_samples, or N): the same as Ray's own restore when they agree, and an extension whose
    driver died before Ray saved the new total is still completed by a plain --resume."""
    saved_file = Path(exp_dir) / SPEC_FILE
    saved = load_space(saved_file).num_samples if saved_file.is_file() else None
    if args.num_samples is not None and saved is not None and args.num_samples != saved:
        if args.num_samples < saved:
            raise StudyInputError(
                f"--num-samples {args.num_samples}: expected at least the sweep's {saved} trials "
                f"(with --resume, a larger --num-samples adds trials)"
            )
        if spec.search.algorithm != "optuna":
            raise StudyInputError(
                f"--num-samples {args.num_samples} with --resume: a search.algorithm {spec.search.algorithm} "
                f"sweep cannot be extended (it keeps no searcher memory); only optuna sweeps can"
            )
        plan.grows = (saved, args.num_samples)
    if spec.search.algorithm == "optuna":
        plan.extend_to = spec.expected_trials  # Tune's trial count (with repeats: every trial of every group)


def _check_new_study(storage: str, name: str) -> None:
    """A new sweep's study must not exist in a user's storage already (it would mix two sweeps' trials)."""
    import optuna

    try:
        names = optuna.study.get_all_study_names(storage=storage)
    except Exception as e:  # noqa: BLE001 - a driver missing, a server down, credentials: all one line
        raise StudyInputError(f"search.storage: cannot open {storage}: {type(e).__name__}: {_first_line(e)}") from None
    if name in names:
        raise StudyInputError(
            f"search.storage: a study named '{name}' exists in {storage}: choose another --name (or delete it "
            f"with optuna delete-study --study-name {name} --storage {storage})"
        )


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


def warm_trials(old_dir: Path, spec: SweepSpec) -> tuple[list[Any], list[str]]:
    """The trials of the sweep in `old_dir` as Optuna trials of `spec`'s space, and the note lines (what was
    taken, what was skipped). Raises StudyInputError for a combination that cannot work."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    from sweeps.sweep import NotASweepError, load_sweep

    where = f"--warm-start {old_dir}"
    search = spec.search
    if search.algorithm != "optuna" or search.sampler not in WARM_SAMPLERS:
        what = f"search.algorithm {search.algorithm}"
        if search.algorithm == "optuna":
            what = f"search.sampler {search.sampler}"
        raise StudyInputError(
            f"{where}: {what} ignores earlier trials: expected algorithm optuna with sampler "
            f"{' or '.join(WARM_SAMPLERS)}"
        )
    try:
        old = load_sweep(old_dir)
    except NotASweepError as e:
        raise StudyInputError(f"{where}: {str(e).split(': ', 1)[-1]}") from None
    if (old.metric, old.mode) != (spec.metric.name, spec.metric.mode):
        raise StudyInputError(
            f"{where}: it optimized {old.metric} ({old.mode}), this sweep {spec.metric.name} ({spec.metric.mode}): "
            f"expected the same metric and goal"
        )
    if sorted(old.swept) != sorted(spec.swept_params):
        raise StudyInputError(
            f"{where}: it swept {sorted(old.swept)}, this sweep {sorted(spec.swept_params)}: expected the same "
            f"swept parameters"
        )
    distributions = OptunaSearch.convert_search_space(param_space(spec))
    intermediate = _intermediate_values(old)
    trials, skipped, left_out = [], [], 0
    df = old.dataframe
    for _, row in df.iterrows() if not df.empty else []:
        value = row.get(old.best_column)
        if (
            row.get("status") in ("error", "diverged")
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
        ):
            left_out += 1  # its value says nothing reliable about its parameters
            continue
        params, outside = {}, []
        for path, dist in distributions.items():
            params[path] = row[path].item() if hasattr(row[path], "item") else row[path]
            if not _inside(dist, params[path]):
                outside.append(f"{path}={params[path]}")
        if outside:
            skipped.append(f"{int(row['trial_number'])} ({', '.join(outside)})")
            continue
        trials.append(
            optuna.trial.create_trial(
                params=params,
                distributions=distributions,
                value=float(value),
                intermediate_values=intermediate.get(row["trial_id"], {}),
                user_attrs={"warm_start": str(Path(old.path)), "warm_start_trial": int(row["trial_number"])},
            )
        )
    if not trials:
        raise StudyInputError(f"{where}: no trial there has a {old.metric} inside this sweep's space to start from")
    best = min if spec.metric.mode == "min" else max
    notes = [
        f"warm start: {len(trials)} trials of {old.path} (best {old.metric} "
        f"{best(t.value for t in trials):.4g}) are in the study before it starts"
    ]
    if left_out:
        notes.append(f"warm start: left out {left_out} trials that errored, diverged or never evaluated")
    if skipped:
        notes.append(f"warm start: skipped {len(skipped)} trials outside this sweep's space: {'; '.join(skipped)}")
    return trials, notes


def _inside(dist: Any, value: Any) -> bool:
    """Whether `value` is one of `dist`'s values (inside its range, on its step, among its choices)."""
    try:
        return bool(dist._contains(dist.to_internal_repr(value)))
    except (ValueError, TypeError):
        return False


def _intermediate_values(old: Any) -> dict[str, dict[int, float]]:
    """trial id -> {tokens seen: metric} of every evaluation of the old sweep (its history)."""
    from lm.record import Key

    history = old.history
    if history.empty or old.metric not in history or Key.tokens_seen not in history:
        return {}
    values: dict[str, dict[int, float]] = {}
    for row in history[["trial_id", Key.tokens_seen, old.metric]].dropna().itertuples(index=False):
        trial_id, step, value = row
        if math.isfinite(value):
            values.setdefault(str(trial_id), {})[int(step)] = float(value)
    return values


def open_study(plan: StudyPlan) -> None:
    """Create the study with the warm-start trials in it (before the searcher loads it), and say where it is."""
    if plan.storage is None:
        return
    if plan.warm_trials:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(
            storage=plan.storage, study_name=plan.name, direction=plan.direction, load_if_exists=True
        )
        study.add_trials(plan.warm_trials)
    for line in plan.notes:
        print(line, flush=True)
    print(f"Optuna study '{plan.name}' in {plan.storage} (live view: optuna-dashboard {plan.storage})", flush=True)


def record_extension(plan: StudyPlan, exp_dir: Path) -> None:
    """The sweep's saved space says the new num_samples (what exit codes and a later --resume expect)."""
    if plan.grows is None:
        return
    path = Path(exp_dir) / SPEC_FILE
    space = yaml.safe_load(path.read_text())
    print(f"extending sweep '{plan.name}' from {plan.grows[0]} to {plan.grows[1]} trials", flush=True)
    space["num_samples"] = plan.grows[1]
    path.write_text(yaml.safe_dump(space, sort_keys=False))


def extend_tuner(tuner: Any, plan: StudyPlan) -> None:
    """Make the restored `tuner` create trials up to `plan.extend_to` (see the module docstring and `_extension`)."""
    if plan.extend_to is None:
        return
    from sweeps.ray_compat import restored_tune_config
    from sweeps.study_search import extended_search

    config = restored_tune_config(tuner)
    config.search_alg = extended_search(config.search_alg, config.max_concurrent_trials, plan.extend_to)
    config.max_concurrent_trials = None  # applied above: Tune would refuse it with a SearchGenerator
    config.num_samples = plan.extend_to
