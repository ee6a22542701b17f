"""Run a hyperparameter sweep: `python sweeps/run_sweep.py --space lr_sweep.yaml`.

Validates the search space and the data before Ray starts (bad input: one line, exit 2), starts or joins
a Ray cluster, runs the trials with Optuna/ASHA through `tune.Tuner`, prints one line per evaluation and a
final table, and writes the results files (see sweeps/results.py). `--resume` continues an interrupted
sweep of the same `--name`. Exit codes: 0 all trials ran, 1 some trials errored (or waited longer than
resources_per_trial.pending_timeout_s for resources no node has), 2 bad input (also: the storage lacks room for
the sweep's estimate), 75 stopped because the storage filled up (free space, then --resume), 130 interrupted
(resume it with --resume).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
import types
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sweeps import ray_compat

ray_compat.set_env_defaults()  # before Ray is imported anywhere: quiet, no usage stats

import yaml  # noqa: E402

from lm import cli  # noqa: E402
from lm.cli import InputError  # noqa: E402
from sweeps.cluster import (  # noqa: E402
    allocator_env,
    check_local_resources,
    check_storage_shared,
    cluster_address,
    cpus_per_trial,
    gpus_per_trial,
    start_ray,
    warn_if_unschedulable,
)
from sweeps.console import make_callback  # noqa: E402
from sweeps.disk import RunWatches, check_free_space  # noqa: E402
from sweeps.layout import (  # noqa: E402
    DEFAULT_STORAGE,
    META_FILE,
    NAME_RULE,
    SPEC_FILE,
    STATE_FILE,
    STATUS_FILE,
    numbered_name,
    valid_name,
)
from sweeps.lock import driver_lock  # noqa: E402
from sweeps.space import SweepSpec, load_space  # noqa: E402
from sweeps.storage import (  # noqa: E402
    Storage,
    StorageError,
    check_writable_uri,
    fetch,
    join,
    mirror,
    mirror_callback,
    scrub,
)
from sweeps.study import StudyPlan, extend_tuner, open_study, plan_study, record_extension  # noqa: E402
from sweeps.trial_status import status_callback  # noqa: E402

if TYPE_CHECKING:
    from sweeps.sweep import Sweep

SPACE_DIR = Path(__file__).resolve().parent / "search_spaces"
"""The shipped search spaces (package data): `--space lr_sweep.yaml` finds them from any directory."""
DEFAULT_SPACE = "lr_sweep.yaml"
SET_HELP = "override the space (search.seed=1, stop.max_tokens=1e6) or fix a config field (train.compile=true)"
URI_FILESYSTEMS = {
    "s3": "S3FileSystem",
    "gs": "GcsFileSystem",
    "gcs": "GcsFileSystem",
    "hdfs": "HadoopFileSystem",
    "viewfs": "HadoopFileSystem",
    "abfs": "AzureFileSystem",
    "abfss": "AzureFileSystem",
}
"""The remote storage Ray reaches through pyarrow (`FileSystem.from_uri`): URI scheme -> the pyarrow.fs class
that serves it. (file:// and local:// are local directories.)"""


class SweepInputError(InputError):
    """Bad command-line input detected before Ray starts (one-line message)."""


def find_space(name: str | Path) -> Path:
    """The search-space file `name` names: a path, else a shipped space (`lr_sweep.yaml` or
    `search_spaces/lr_sweep.yaml` -> sweeps/search_spaces/lr_sweep.yaml).

    Returns `name` unchanged when nothing matches, so that load_space's error names what the user wrote.
    """
    path = Path(name).expanduser()
    candidates = [path]
    if not path.is_absolute() and path.parent in (Path("."), Path("search_spaces")):
        candidates += [Path.cwd() / "search_spaces" / path.name, SPACE_DIR / path.name]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    return path


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a local Ray of 0 or -1 CPUs cannot start)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> cli.ArgumentParser:
    ap = cli.ArgumentParser(
        prog="python sweeps/run_sweep.py",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawTextHelpFormatter,
    )
    ap.add_argument(
        "--space", default=DEFAULT_SPACE, help="search-space YAML: a path, or a shipped one (lr_sweep.yaml, ...)"
    )
    ap.add_argument("--name", help="experiment name (default: the space's name)")
    ap.add_argument(
        "--storage-path",
        default=DEFAULT_STORAGE,
        help="local directory or pyarrow URI (s3://bucket/sweeps) for trial results and checkpoints",
    )
    ap.add_argument(
        "--address",
        default=None,
        help="existing Ray cluster: 'auto', host:port or ray://host:10001 (also RAY_ADDRESS)",
    )
    ap.add_argument("--num-cpus", type=positive_int, default=None, help="CPUs of the local Ray instance (default: all)")
    ap.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted sweep --name; with a larger --num-samples, add trials to it",
    )
    ap.add_argument(
        "--warm-start",
        metavar="SWEEP_DIR",
        help="a new sweep whose searcher starts knowing the trials of this earlier sweep (same parameters, metric)",
    )
    ap.add_argument("--num-samples", type=int, help="override num_samples")
    ap.add_argument("--max-concurrent", type=int, help="override search.max_concurrent_trials")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    ap.add_argument("--wandb", metavar="PROJECT", help="log every trial to this W&B project (tracking.wandb.project)")
    ap.add_argument(
        "--allocator",
        default="auto",
        help="memory allocator trial workers preload: 'auto' (tcmalloc where installed, local Ray only),\n"
        "'system' (glibc malloc), or a shared-library path",
    )
    ap.add_argument(
        "--dry-run",
        action="store_true",
        help="validate, print the resolved space, resources, rungs, budget and first trial configs; start nothing",
    )
    ap.add_argument("--quiet", action="store_true", help="no per-result lines and no status line: only the final table")
    return ap


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The parsed command line; raises InputError (one line) for a usage error."""
    return build_parser().parse_args(argv)


def storage_root(text: str) -> tuple[str, Path | None]:
    """(storage path for Ray, local directory or None for a remote URI), creating nothing.

    A local path or a file:// URI becomes an absolute directory; any other URI must name a filesystem that the
    installed pyarrow serves (s3://, gs://, hdfs://, abfs://, ...). Checked without contacting any server
    (`check_storage_writable` does, in `prepare`). Raises SweepInputError.
    """
    scheme, sep, _ = text.partition("://")
    if sep and scheme in ("file", "local"):
        uri = urllib.parse.urlsplit(text)
        if uri.netloc not in ("", "localhost"):
            raise SweepInputError(
                f"{text}: --storage-path: expected a {scheme}:// URI of this machine, got host {uri.netloc!r}"
            )
        text = urllib.parse.unquote(uri.path)
    elif sep:
        if scheme not in URI_FILESYSTEMS:
            known = ", ".join(f"{s}://" for s in URI_FILESYSTEMS)
            raise SweepInputError(
                f"{text}: --storage-path: expected a local directory or a URI pyarrow opens (file://, {known}), "
                f"got the scheme {scheme!r}"
            )
        import pyarrow.fs

        try:
            getattr(pyarrow.fs, URI_FILESYSTEMS[scheme])  # an ImportError when pyarrow was built without it
        except (ImportError, AttributeError):
            raise SweepInputError(
                f"{text}: --storage-path: this pyarrow is built without {URI_FILESYSTEMS[scheme]} ({scheme}://)"
            ) from None
        return text, None
    path = Path(text).expanduser().resolve()
    return str(path), path


def check_writable(path: Path) -> None:
    """Create the storage directory `path` if needed and write a file in it; raises SweepInputError if it cannot."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise SweepInputError(f"{path}: --storage-path is not writable ({e.strerror})") from None


def check_storage_writable(storage: str, local_root: Path | None) -> None:
    """Before Ray starts: a local storage root must be writable (`check_writable`); under a remote URI a probe
    object is written and deleted. Raises SweepInputError, one line naming the cause (missing bucket, rejected or
    missing credentials, access denied, unreachable)."""
    if local_root is not None:
        check_writable(local_root)
        return
    try:
        check_writable_uri(storage)
    except StorageError as e:
        raise SweepInputError(f"{e.shown}: --storage-path: {e.reason}") from None


def prepare(args: argparse.Namespace) -> tuple[SweepSpec, str, Path, str]:
    """Everything that can fail on bad input, before Ray: (spec, storage, local experiment dir, name).

    Checks the command line first (the name, the storage URI), then the space, the resources a trial asks for
    (on a local Ray), and last the storage directory, which is the only thing created here. Raises InputError.
    """
    if args.name is not None and not valid_name(args.name):  # the rule of the space file's name: too
        raise SweepInputError(f"--name: expected {NAME_RULE}, got {args.name!r}")
    if args.resume and not args.name:
        raise SweepInputError("--resume needs --name (the sweep to continue)")
    storage, local_root = storage_root(args.storage_path)
    sets = list(args.set)
    if args.num_samples is not None:
        sets.append(f"num_samples={args.num_samples}")
    if args.max_concurrent is not None:
        sets.append(f"search.max_concurrent_trials={args.max_concurrent}")
    if args.wandb is not None:
        sets.append(f"tracking.wandb.project={json.dumps(args.wandb)}")
    results_root = local_root or (Path.cwd() / DEFAULT_STORAGE).resolve()
    local_ray = cluster_address(args.address) is None
    if args.resume:
        exp_dir = results_root / args.name
        saved = exp_dir / SPEC_FILE
        if local_root is None and not saved.is_file():  # resuming a remote sweep on another machine
            from sweeps.sweep import open_storage

            fetch(open_storage(join(storage, args.name)), exp_dir, [SPEC_FILE, META_FILE, STATUS_FILE])
        if not saved.is_file():
            where = exp_dir if local_root is not None else scrub(join(storage, args.name))
            raise SweepInputError(f"{where}: --resume: no sweep named '{args.name}' there")
        spec = load_space(saved if saved.is_file() else find_space(args.space), sets)
        if local_ray:
            check_local_resources(spec, args.num_cpus)
        check_storage_writable(storage, local_root)
        return spec, storage, exp_dir, args.name
    spec = load_space(find_space(args.space), sets)
    if local_ray:
        check_local_resources(spec, args.num_cpus)
    check_storage_writable(storage, local_root)
    name = args.name or spec.name
    exp_dir = results_root / name
    if local_root is not None and (exp_dir / META_FILE).exists():
        if args.name:
            raise SweepInputError(f"{exp_dir}: a sweep named '{name}' exists: --resume it or choose another --name")
        # Running the same space again without --name starts a new sweep beside the old one.
        n = 2
        while (results_root / numbered_name(spec.name, n) / META_FILE).exists():
            n += 1
        name = numbered_name(spec.name, n)
        exp_dir = results_root / name
        print(f"a sweep named '{spec.name}' exists in {results_root}: this one is '{name}'", flush=True)
    # The data every trial reads: open and check it now (and build the built-in corpus once, here).
    from lm.train import open_data

    open_data(spec.trial_config({}))
    return spec, storage, exp_dir, name


def save_spec(spec: SweepSpec, exp_dir: Path, name: str, command: list[str]) -> None:
    exp_dir.mkdir(parents=True, exist_ok=True)
    space = {**spec.to_dict(), "name": name}  # as run (after --set; base_config absolute): --resume reads it
    (exp_dir / SPEC_FILE).write_text(yaml.safe_dump(space, sort_keys=False))
    from lm.train import data_paths

    base = spec.trial_config({})
    meta = {
        "name": name,
        "metric": spec.metric.name,
        "mode": spec.metric.mode,
        "swept": spec.swept_params,
        "starts": spec.search.points_to_evaluate,  # named starting points: results name their trials
        **spec.results_meta(),  # repeats and derived fields, for reading results back (sweeps/sweep.py)
        "max_tokens": spec.total_tokens,
        "base_config": base.to_dict(),
        # Stored so that reading results never needs (or generates) the built-in corpus.
        "entropy_floor": data_paths(base)[2].get("entropy_floor_nats"),
        "command": [scrub(arg) for arg in command],  # never a credential given in a storage URI
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    (exp_dir / META_FILE).write_text(json.dumps(meta, indent=2))


def repair_pruned_checkpoints(exp_path: str) -> list[str]:
    """Before a resume: give back each trial the checkpoint Ray's saved sweep state will restore it from.

    Ray prunes a trial's old checkpoints (num_to_keep) as soon as newer ones arrive, but saves the sweep
    state only every few seconds; a driver killed in between leaves a state whose latest checkpoint for
    a running trial is gone, and restoring that trial fails ("does not exist on storage anymore"). The
    trial's newest checkpoint is still there, so it is copied to the recorded name: the trial resumes
    from its newest state. Local storage only; reads Ray's state file and changes nothing in it.
    Returns one line per repaired trial (or one saying why nothing could be checked).
    """
    import shutil

    if "://" in exp_path:
        return []
    try:
        recorded_paths = ray_compat.recorded_latest_checkpoints(Path(exp_path))
    except ray_compat.RayLayoutError as e:
        return [f"warning: pruned checkpoints not checked, Ray restores the trials as it can: {e}"]
    repaired = []
    for recorded in recorded_paths.values():
        if recorded.exists() or not recorded.parent.is_dir():
            continue
        present = sorted(p for p in recorded.parent.glob("checkpoint_*") if (p / STATE_FILE).is_file())
        if not present:
            continue
        try:
            shutil.copytree(present[-1], recorded)
        except OSError as e:  # leave this trial's restore to Ray (and its error) rather than stop the resume
            repaired.append(f"{recorded.parent.name}: could not restore its pruned {recorded.name}: {e}")
            continue
        repaired.append(
            f"{recorded.parent.name}: its recorded {recorded.name} was pruned before Ray saved the sweep state; "
            f"resuming it from {present[-1].name}, its newest"
        )
    return repaired


def run(args: argparse.Namespace) -> int:
    """Validate, start Ray, run (or resume) the sweep, write its results; returns the exit code."""
    # One answer to "local Ray or a cluster?" for the allocator, start_ray and the CPU count.
    address = cluster_address(args.address)
    worker_env = allocator_env(args.allocator, local=address is None)
    spec, storage, exp_dir, name = prepare(args)
    args.experiment = join(storage, name)  # where the results are: `sweep()` reads them back
    if args.dry_run:
        from sweeps.dry_run import report

        print(report(spec, scrub(join(storage, name)), args.num_cpus, local=address is None), end="")
        return 0
    plan = plan_study(args, spec, exp_dir, name)  # --warm-start, an extension: checked before Ray starts
    check_free_space(spec, storage, exp_dir, args.resume)  # local storage: room for what the sweep writes
    with driver_lock(exp_dir):  # one driver per sweep, released by the kernel even after a SIGKILL
        if args.resume and "://" not in storage:
            check_experiment_state(exp_dir)
        if not args.resume:
            save_spec(spec, exp_dir, name, [sys.executable, *sys.argv])
            open_study(plan)
        else:
            record_extension(plan, exp_dir)
        return _run_locked(args, spec, storage, exp_dir, name, address, worker_env, plan)


def check_experiment_state(exp_dir: Path) -> None:
    """Before Ray starts: Ray's saved experiment state is there and whole, else one line saying what is lost
    (continuing the sweep) and what is not (its trials' results, which the project's own files keep)."""
    states = sorted(exp_dir.glob("experiment_state-*.json"))
    problem = "missing" if not states else None
    if states:
        try:
            if not isinstance(json.loads(states[-1].read_text()).get("trial_data"), list):
                problem = f"damaged ({states[-1].name} has no trial list)"
        except (OSError, ValueError, AttributeError):
            problem = f"damaged ({states[-1].name} is not whole JSON)"
    if problem is not None:
        raise SweepInputError(
            f"{exp_dir}: --resume: Ray's experiment state (experiment_state-*.json) is {problem}, so the sweep "
            f"cannot be continued; its trials' results are kept: python sweeps/inspect_sweep.py "
            f"{shlex.quote(str(exp_dir))} rebuilds them"
        )


def _run_locked(
    args: argparse.Namespace,
    spec: SweepSpec,
    storage: str,
    exp_dir: Path,
    name: str,
    address: str | None,
    worker_env: dict[str, str],
    plan: StudyPlan | None = None,
) -> int:
    from sweeps.results import load_sweep, print_table, write_results

    start_ray(address, args.num_cpus, worker_env)
    import ray  # after start_ray: a local Ray's settings are read when Ray is first imported

    if worker_env:
        print(f"trial workers preload {worker_env['LD_PRELOAD']} (--allocator system: glibc malloc)", flush=True)
    try:
        check_storage_shared(storage, exp_dir)
        exp_path = join(storage, name)
        watches = RunWatches(spec, exp_dir, storage)  # a full disk, resources no node has: end the run early
        with watches.catching():
            tuner = make_tuner(args, spec, storage, exp_dir, name, local=address is None, plan=plan)
            ray_compat.add_tuner_callbacks(tuner, watches.callbacks)  # live objects, not those in tuner.pkl
            with ray_compat.sigterm_ends_tune_run():  # `ray job stop`: a last snapshot, results, exit 130
                tuner.fit()  # failed trials do not raise
        # Read the saved experiment state, not fit()'s results: after Ctrl-C Ray marks the interrupted trials
        # TERMINATED in memory, while the saved state (what --resume continues) still has them running.
        # Written before Ray shuts down, which Ray no longer needs.
        remote = Storage.at(exp_path)
        mirror(exp_dir, remote, [META_FILE, SPEC_FILE, STATUS_FILE])  # a remote sweep reads its trials from there
        sweep = load_sweep(exp_path)
        if watches.stop is None or watches.stop.write_results:  # not on a full disk
            write_results(sweep, exp_dir)
            if mirror(exp_dir, remote):  # the results and the trials' logs, beside Ray's files
                print(f"results copied to {remote.show()} (local copy: {exp_dir})", flush=True)
    finally:
        ray.shutdown()
    print_table(sweep)
    if watches.stop is not None:
        return watches.report(resume_command(args, name, exp_dir))
    return exit_code(sweep, spec, args, name, exp_dir)


def make_tuner(
    args: argparse.Namespace,
    spec: SweepSpec,
    storage: str,
    exp_dir: Path,
    name: str,
    local: bool,
    plan: StudyPlan | None = None,
):
    """The `tune.Tuner` of a new sweep, or of the interrupted (or extended) one `--resume` continues (Ray is
    running). `plan`: the Optuna study's storage and the extension (sweeps/study.py); None: a study in memory."""
    import ray
    from ray import tune

    from sweeps.compute import record_resources
    from sweeps.console import make_stall_watch
    from sweeps.progress import progress_callback
    from sweeps.schedulers import checkpoints_to_keep, concurrency_warning, describe, scheduler
    from sweeps.search import search_algorithm
    from sweeps.space import param_space
    from sweeps.tracking import tracking_callbacks
    from sweeps.trainable import train_trial

    gpu = gpus_per_trial(spec)
    cpu = cpus_per_trial(spec, gpu, args.num_cpus if local else None)
    warn_if_unschedulable(spec, cpu, gpu)  # a cluster may grow: warn, never refuse
    record_resources(exp_dir, cpu, gpu)  # for the compute accounting (sweeps/compute.py)
    trainable = tune.with_resources(
        tune.with_parameters(train_trial, spec=spec, threads=max(1, int(cpu)), gpu=gpu, exp_dir=str(exp_dir)),
        {"cpu": cpu, "gpu": gpu},
    )
    exp_path = join(storage, name)
    callbacks = [
        make_callback(spec, args.quiet),
        make_stall_watch(spec),
        status_callback(exp_dir),
        *(
            []
            if "://" not in storage
            else [mirror_callback(exp_dir, Storage.at(exp_path), (META_FILE, SPEC_FILE, STATUS_FILE))]
        ),
        *tracking_callbacks(spec, name, exp_dir),
        *([] if args.quiet else [progress_callback(spec)]),
    ]
    if args.resume:
        if not tune.Tuner.can_restore(exp_path):
            raise SweepInputError(f"{scrub(exp_path)}: --resume: no restorable sweep state there")
        print(f"resuming sweep '{name}' from {scrub(exp_path)}", flush=True)
        for line in repair_pruned_checkpoints(exp_path):
            print(line, flush=True)
        ray_compat.new_trials_follow_a_moved_sweep()  # a sweep moved to a larger disk stays there
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_errored=True)
        # This run's callbacks (this directory, even when moved; this --quiet), not those pickled in tuner.pkl.
        ray_compat.add_tuner_callbacks(tuner, callbacks, replace=True)
        if plan is not None:
            extend_tuner(tuner, plan)
        return tuner
    total_cpus = ray.cluster_resources().get("CPU", 1)
    max_conc = spec.search.max_concurrent_trials or max(1, int(total_cpus // cpu))
    print(
        f"sweep '{name}': {spec.expected_trials} trials ({spec.search.algorithm}/{spec.scheduler.type}), "
        f"up to {max_conc} at once, {cpu:g} CPU + {gpu:g} GPU each, {spec.total_tokens:,} tokens per trial; "
        f"results in {scrub(exp_path)}",
        flush=True,
    )
    if (population := describe(spec)) is not None:
        print(population, flush=True)
    if (warning := concurrency_warning(spec, max_conc)) is not None:
        print(warning, flush=True)
    return tune.Tuner(
        trainable,
        param_space=param_space(spec),
        tune_config=tune.TuneConfig(
            metric=spec.metric.name,
            mode=spec.metric.mode,
            search_alg=search_algorithm(spec, max_conc, plan and plan.storage, name),
            scheduler=scheduler(spec),
            num_samples=spec.tune_num_samples,  # with repeats: every trial of every group (sweeps/repeats.py)
            max_concurrent_trials=max_conc if spec.search.algorithm == "optuna" else None,
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage,
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=checkpoints_to_keep(spec),  # pbt/pb2 keep more: other trials exploit them
                checkpoint_score_attribute=spec.metric.name,
                checkpoint_score_order=spec.metric.mode,
            ),
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            callbacks=callbacks,
            verbose=0,
        ),
    )


def resume_command(args: argparse.Namespace, name: str, exp_dir: Path) -> str:
    """The shell command (POSIX quoting) that resumes this sweep: the command as invoked (`lm-sweep`, or
    `python PATH/run_sweep.py`), its name, its storage (absolute when local) and where Ray runs."""
    invoked = sys.argv[0] if sys.argv else ""
    command = ["python", invoked] if Path(invoked).name == "run_sweep.py" else ["lm-sweep"]
    storage = scrub(args.storage_path) if storage_root(args.storage_path)[1] is None else str(exp_dir.parent)
    command += ["--name", name, "--storage-path", storage]
    if args.address:
        command += ["--address", args.address]
    if args.num_cpus:
        command += ["--num-cpus", str(args.num_cpus)]
    if args.allocator != "auto":
        command += ["--allocator", args.allocator]
    return shlex.join([*command, "--resume"])


def exit_code(sweep, spec: SweepSpec, args: argparse.Namespace, name: str, exp_dir: Path) -> int:
    """130 (with the resume command) when trials are unfinished, 1 when some errored, else 0."""
    # No trial has reported yet (interrupted early): an empty table, without a status column.
    status = sweep.dataframe["status"] if "status" in sweep.dataframe else sweep.dataframe.index.to_series()
    unfinished = int(status.isin(["pending", "running", "paused"]).sum())
    unfinished += max(0, spec.expected_trials - len(sweep.dataframe))  # never started
    if unfinished:
        print(
            f"interrupted with {unfinished} trials unfinished: resume with\n  {resume_command(args, name, exp_dir)}",
            flush=True,
        )
        return 130
    errors = int((status == "error").sum())
    print(f"results: {exp_dir} (summary.md, results.csv, plots/)", flush=True)
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    """`lm-sweep`: exit 0 when every trial ran, 1 when some errored, 2 on bad input, 130 when interrupted."""
    return cli.run(run, build_parser(), argv)


def sweep(
    space: str | Path = DEFAULT_SPACE,
    *,
    name: str | None = None,
    storage_path: str | Path = DEFAULT_STORAGE,
    num_samples: int | None = None,
    max_concurrent: int | None = None,
    overrides: dict[str, Any] | None = None,
    resume: bool = False,
    warm_start: str | Path | None = None,
    address: str | None = None,
    num_cpus: int | None = None,
    quiet: bool = True,
) -> Sweep:
    """Run (or, with `resume`, continue) a sweep from Python, e.g. in a notebook, and return it read back as
    `load_sweep` does: `from sweeps import run_sweep; s = run_sweep("lr_sweep.yaml", num_samples=4,
    overrides={"stop.max_tokens": 1e6})` (the module `sweeps.run_sweep` is this function when called).

    `overrides` are `--set` items: sweep settings (`search.seed`) or config fields (`train.compile`). Bad input
    raises the project's InputError subclasses (SpaceError, SweepInputError, ...) with the CLI's one-line
    messages, before Ray starts; an interrupted sweep (Ctrl-C) returns what it has, resumable with resume=True.
    """
    argv = ["--space", str(space), "--storage-path", str(storage_path)]
    for flag, value in (("--name", name), ("--num-samples", num_samples), ("--max-concurrent", max_concurrent),
                        ("--warm-start", warm_start), ("--address", address), ("--num-cpus", num_cpus)):  # fmt: skip
        if value is not None:
            argv += [flag, str(value)]
    for key, value in (overrides or {}).items():
        argv += ["--set", f"{key}={json.dumps(value)}"]  # JSON is YAML: the CLI's parsing and checks apply
    argv += ["--resume"] * resume + ["--quiet"] * quiet
    args = parse_args(argv)
    run(args)
    from sweeps.sweep import load_sweep

    return load_sweep(args.experiment)


class _CallableModule(types.ModuleType):
    """`from sweeps import run_sweep` gives this module (the CLI script's name); calling it runs `sweep()`."""

    def __call__(self, *args: Any, **kwargs: Any) -> Sweep:
        return sweep(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(main())
