"""Run a hyperparameter sweep: `python sweeps/run_sweep.py --space lr_sweep.yaml`.

Validates the search space and the data before Ray starts (bad input: one line, exit 2), starts or joins
a Ray cluster, runs the trials with Optuna/ASHA through `tune.Tuner`, prints one line per evaluation and a
final table, and writes the results files (see sweeps/results.py). `--resume` continues an interrupted
sweep of the same `--name`. Exit codes: 0 all trials ran, 1 some trials errored, 2 bad input,
130 interrupted (resume it with --resume).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

# Set before Ray is imported anywhere: quiet, no usage stats, no warnings about frequent checkpoints.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the legacy reporter honours verbose=0: no tables

import yaml  # noqa: E402

from lm.config import ConfigError  # noqa: E402
from lm.data import DataError  # noqa: E402
from sweeps.space import SpaceError, SweepSpec, load_space  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SPACE = "lr_sweep.yaml"
SPEC_FILE = "sweep_space.yaml"  # the space as run (after --set), saved in the experiment directory
META_FILE = "sweep_meta.json"


class SweepInputError(ValueError):
    """Bad command-line input detected before Ray starts (one-line message)."""


def find_space(name: str) -> Path:
    """A path as given, or a bare file name looked up in the project's search_spaces/."""
    p = Path(name).expanduser()
    if p.is_file():
        return p.resolve()
    for candidate in (Path.cwd() / "search_spaces" / name, PROJECT_ROOT / "search_spaces" / name):
        if candidate.is_file():
            return candidate.resolve()
    return p  # load_space reports it missing, naming the path


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--space", default=DEFAULT_SPACE, help="search-space YAML (path, or a name in search_spaces/)")
    ap.add_argument("--name", help="experiment name (default: the space's name)")
    ap.add_argument(
        "--storage-path",
        default="sweep_results",
        help="local directory or pyarrow URI (s3://bucket/sweeps) for trial results and checkpoints",
    )
    ap.add_argument(
        "--address",
        default=None,
        help="existing Ray cluster: 'auto', host:port or ray://host:10001 (also RAY_ADDRESS)",
    )
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    ap.add_argument("--resume", action="store_true", help="continue the interrupted sweep --name")
    ap.add_argument("--num-samples", type=int, help="override num_samples")
    ap.add_argument("--max-concurrent", type=int, help="override search.max_concurrent_trials")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override the space (search.seed=1, stop.max_tokens=1e6) or fix a config field (train.compile=true)",
    )
    ap.add_argument(
        "--allocator",
        default="auto",
        help="memory allocator trial workers preload: 'auto' (tcmalloc where installed, local Ray only),\n"
        "'system' (glibc malloc), or a shared-library path",
    )
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    ap.add_argument("--quiet", action="store_true", help="no per-result lines")
    return ap.parse_args(argv)


def storage_root(text: str) -> tuple[str, Path | None]:
    """(storage path for Ray, local directory or None for a URI); local paths are made absolute and must
    be writable."""
    if "://" in text:
        return text, None
    path = Path(text).expanduser().resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise SweepInputError(f"{path}: --storage-path is not writable ({e.strerror})") from None
    return str(path), path


def prepare(args: argparse.Namespace) -> tuple[SweepSpec, str, Path, str]:
    """Everything that can fail on bad input, before Ray: (spec, storage, local experiment dir, name)."""
    sets = list(args.set)
    if args.num_samples is not None:
        sets.append(f"num_samples={args.num_samples}")
    if args.max_concurrent is not None:
        sets.append(f"search.max_concurrent_trials={args.max_concurrent}")
    storage, local_root = storage_root(args.storage_path)
    results_root = local_root or (Path.cwd() / "sweep_results").resolve()
    if args.resume:
        if not args.name:
            raise SweepInputError("--resume needs --name (the sweep to continue)")
        exp_dir = results_root / args.name
        saved = exp_dir / SPEC_FILE
        if local_root is not None and not (exp_dir.is_dir() and saved.is_file()):
            raise SweepInputError(f"{exp_dir}: --resume: no sweep named '{args.name}' there")
        spec = load_space(saved if saved.is_file() else find_space(args.space), sets)
        return spec, storage, exp_dir, args.name
    spec = load_space(find_space(args.space), sets)
    name = args.name or spec.name
    exp_dir = results_root / name
    if local_root is not None and (exp_dir / META_FILE).exists():
        if args.name:
            raise SweepInputError(f"{exp_dir}: a sweep named '{name}' exists: --resume it or choose another --name")
        # Running the same space again without --name starts a new sweep beside the old one.
        n = 2
        while (results_root / f"{spec.name}-{n}" / META_FILE).exists():
            n += 1
        name = f"{spec.name}-{n}"
        exp_dir = results_root / name
        print(f"a sweep named '{spec.name}' exists in {results_root}: this one is '{name}'", flush=True)
    # The data every trial reads: open and check it now (and build the built-in corpus once, here).
    from lm.train import open_data

    open_data(spec.trial_config({}))
    return spec, storage, exp_dir, name


def save_spec(spec: SweepSpec, exp_dir: Path, name: str, command: list[str]) -> None:
    exp_dir.mkdir(parents=True, exist_ok=True)
    raw = dict(spec.raw)
    if spec.base_config_path is not None:
        raw["base_config"] = str(spec.base_config_path)
    raw["name"] = name
    (exp_dir / SPEC_FILE).write_text(yaml.safe_dump(raw, sort_keys=False))
    meta = {
        "name": name,
        "metric": spec.metric,
        "mode": spec.mode,
        "swept": spec.swept_params,
        "max_tokens": spec.total_tokens,
        "base_config": spec.trial_config({}).to_dict(),
        "command": command,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    (exp_dir / META_FILE).write_text(json.dumps(meta, indent=2))


def allocator_env(allocator: str, local: bool) -> dict[str, str]:
    """Environment for Ray's worker processes that preloads `allocator`: {} for glibc malloc.

    "auto" picks tcmalloc on Linux when the machine has it (Debian/Ubuntu: libtcmalloc-minimal4) and Ray is local
    (a cluster's nodes may lack it), unless LD_PRELOAD is already set. Freed tensor memory is reused hot
    instead of being returned to the OS: 1.08x tokens/s at the tiny config, 1 thread (README, Performance).
    Raises SweepInputError for a path that does not exist.
    """
    if allocator == "system":
        return {}
    if allocator == "auto":
        import ctypes.util

        if not local or os.environ.get("LD_PRELOAD") or not sys.platform.startswith("linux"):
            return {}  # (LD_PRELOAD is the Linux loader's; macOS would need DYLD_INSERT_LIBRARIES)
        library = ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")
        if library is None:
            return {}
    else:
        library = allocator
        if not Path(library).is_file():
            raise SweepInputError(f"{library}: --allocator: expected 'auto', 'system' or a shared library file")
    # tcmalloc reports every allocation over 1 GiB on stderr; a 17M model's batches are not news.
    return {"LD_PRELOAD": library, "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}


def start_ray(address: str | None, num_cpus: int | None, worker_env: dict[str, str] | None = None) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS), else start a local Ray of `num_cpus` CPUs; Ray's
    worker processes get the variables in `worker_env` (for example `allocator_env`'s)."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    common = dict(include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    if worker_env:
        common["runtime_env"] = {"env_vars": worker_env}
    if address:
        try:
            ray.init(address=address, **common)
        except Exception as e:  # Ray raises ConnectionError, AuthenticationError, RuntimeError...
            hint = ""
            if "auth" in type(e).__name__.lower() or "token" in str(e).lower():
                hint = (
                    " (Ray 2.60 clusters use token authentication: set RAY_AUTH_MODE=token and the token, "
                    "RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, as on the head node)"
                )
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SweepInputError(f"--address {address}: cannot connect to the Ray cluster: {first}{hint}") from None
    else:
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), **common)


def check_storage_shared(storage: str, exp_dir: Path) -> None:
    """On a multi-node cluster a local storage path must be one filesystem seen by every node.

    Writes a marker file and asks a task pinned to each alive node whether it sees it; a node that does
    not means the path is local to this machine: refuse before any trial starts.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if "://" in storage or len(nodes) < 2:
        return
    exp_dir.mkdir(parents=True, exist_ok=True)
    marker = exp_dir / f".shared-check-{os.getpid()}-{time.time_ns()}"
    marker.write_text("lm-sweeps")

    @ray.remote(num_cpus=0)
    def sees(path: str) -> bool:
        return os.path.exists(path)

    try:
        checks = {
            n["NodeID"]: sees.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(str(marker))
            for n in nodes
        }
        blind = [node for node, ref in checks.items() if not ray.get(ref, timeout=120)]
    finally:
        marker.unlink(missing_ok=True)
    if blind:
        raise SweepInputError(
            f"{storage}: --storage-path is local to this machine: {len(blind)} of {len(nodes)} cluster nodes "
            f"cannot see it (e.g. node {blind[0][:12]}); use a shared filesystem path or a URI such as "
            "s3://bucket/sweeps"
        )


def gpus_per_trial(spec: SweepSpec) -> float:
    import ray

    if spec.gpu != "auto":
        return float(spec.gpu)
    visible = ray.cluster_resources().get("GPU", 0)
    if visible < 1:
        print("resources_per_trial.gpu: auto -> 0 (no GPU visible to Ray): trials run on CPU", flush=True)
        return 0.0
    return 1.0


def repair_pruned_checkpoints(exp_path: str) -> list[str]:
    """Before a resume: give back each trial the checkpoint Ray's saved sweep state will restore it from.

    Ray prunes a trial's old checkpoints (num_to_keep) as soon as newer ones arrive, but saves the sweep
    state only every few seconds; a driver killed in between leaves a state whose latest checkpoint for
    a running trial is gone, and restoring that trial fails ("does not exist on storage anymore"). The
    trial's newest checkpoint is still there, so it is copied to the recorded name: the trial resumes
    from its newest state. Local storage only; reads Ray's state file and changes nothing in it.
    Returns one line per repaired trial.
    """
    import shutil

    from ray import cloudpickle

    from sweeps.trainable import STATE_FILE

    if "://" in exp_path:
        return []
    states = sorted(Path(exp_path).glob("experiment_state-*.json"))
    if not states:
        return []
    repaired = []
    try:
        trial_data = json.loads(states[-1].read_text())["trial_data"]
    except (OSError, ValueError, KeyError):
        return []
    for _, runtime in trial_data:
        try:
            meta = json.loads(runtime) if isinstance(runtime, str) else runtime
            manager = cloudpickle.loads(bytes.fromhex(meta["checkpoint_manager"]["value"]))
            latest = manager._latest_checkpoint_result
            recorded = Path(latest.checkpoint.path) if latest is not None else None
        except Exception:  # another Ray version's layout: leave the restore to Ray
            continue
        if recorded is None or recorded.exists() or not recorded.parent.is_dir():
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


def cpus_per_trial(spec: SweepSpec, gpu: float, num_cpus: int | None) -> float:
    """resources_per_trial.cpu, with "auto" resolved by measuring this machine (sweeps/placement.py)."""
    if spec.cpu != "auto":
        return float(spec.cpu)
    if gpu > 0:
        print("resources_per_trial.cpu: auto -> 1 CPU per GPU trial", flush=True)
        return 1.0
    from sweeps.placement import measure

    placement = measure(spec.trial_config({}), num_cpus or os.cpu_count())
    rates = ", ".join(f"{split}: {rate:,.0f}" for split, rate in placement.tokens_per_s.items())
    print(
        f"resources_per_trial.cpu: auto -> {placement.threads} thread(s) per trial, {placement.trials} trial(s) "
        f"per machine ({'cached measurement' if placement.cached else 'measured'}, tokens/s by trials x threads: "
        f"{rates})",
        flush=True,
    )
    return float(placement.threads)


def make_callback(spec: SweepSpec, quiet: bool):
    from ray import tune

    swept = spec.swept_params

    def describe(config: dict[str, Any]) -> str:
        parts = []
        for key in swept:
            value = config.get(key)
            short = key.split(".")[-1]
            parts.append(f"{short}={value:.3g}" if isinstance(value, float) else f"{short}={value}")
        return " ".join(parts)

    class ConsoleLines(tune.Callback):
        """One line per evaluation and per trial end, instead of Ray's tables."""

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if quiet:
                return
            mark = " DIVERGED" if result.get("diverged") else ""
            val = result.get("val_loss")
            val_text = f"{val:.4f}" if isinstance(val, float) else str(val)
            print(
                f"{time.strftime('%H:%M:%S')} {trial.trial_id} | tokens {result.get('tokens_seen', 0):>11,} | "
                f"val_loss {val_text}{mark} | {describe(trial.config)}",
                flush=True,
            )

        def on_trial_complete(self, iteration, trials, trial, **info):
            last = trial.last_result or {}
            print(
                f"{time.strftime('%H:%M:%S')} {trial.trial_id} finished at {last.get('tokens_seen', 0):,} tokens "
                f"(best val_loss {last.get('best_val_loss')})",
                flush=True,
            )

        def on_trial_error(self, iteration, trials, trial, **info):
            print(
                f"{time.strftime('%H:%M:%S')} {trial.trial_id} ERROR (see results for the message)",
                flush=True,
            )

    return ConsoleLines()


def run(args: argparse.Namespace) -> int:
    # One answer to "local Ray or a cluster?" for the allocator, start_ray and the CPU count.
    address = args.address or os.environ.get("RAY_ADDRESS") or None
    worker_env = allocator_env(args.allocator, local=address is None)
    spec, storage, exp_dir, name = prepare(args)
    if not args.resume:
        save_spec(spec, exp_dir, name, [sys.executable, *sys.argv])
    from ray import tune

    from sweeps.results import load_sweep, print_table, write_results
    from sweeps.space import param_space, scheduler, search_algorithm
    from sweeps.trainable import train_trial

    start_ray(address, args.num_cpus, worker_env)
    if worker_env:
        print(f"trial workers preload {worker_env['LD_PRELOAD']} (--allocator system: glibc malloc)", flush=True)
    try:
        import ray

        check_storage_shared(storage, exp_dir)
        gpu = gpus_per_trial(spec)
        cpu = cpus_per_trial(spec, gpu, args.num_cpus if address is None else None)
        threads = max(1, int(cpu))
        trainable = tune.with_resources(
            tune.with_parameters(train_trial, spec=spec, threads=threads, gpu=gpu, exp_dir=str(exp_dir)),
            {"cpu": cpu, "gpu": gpu},
        )
        total_cpus = ray.cluster_resources().get("CPU", 1)
        max_conc = spec.max_concurrent_trials or max(1, int(total_cpus // cpu))
        run_config = tune.RunConfig(
            name=name,
            storage_path=storage,
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=spec.num_to_keep,
                checkpoint_score_attribute=spec.metric,
                checkpoint_score_order=spec.mode,
            ),
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            callbacks=[make_callback(spec, args.quiet)],
            verbose=0,
        )
        exp_path = f"{storage.rstrip('/')}/{name}"
        if args.resume:
            if not tune.Tuner.can_restore(exp_path):
                raise SweepInputError(f"{exp_path}: --resume: no restorable sweep state there")
            print(f"resuming sweep '{name}' from {exp_path}", flush=True)
            for line in repair_pruned_checkpoints(exp_path):
                print(line, flush=True)
            tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_errored=True)
        else:
            print(
                f"sweep '{name}': {spec.num_samples} trials ({spec.algorithm}/{spec.scheduler}), up to {max_conc} "
                f"at once, {cpu:g} CPU + {gpu:g} GPU each, {spec.total_tokens:,} tokens per trial; "
                f"results in {exp_path}",
                flush=True,
            )
            tuner = tune.Tuner(
                trainable,
                param_space=param_space(spec),
                tune_config=tune.TuneConfig(
                    metric=spec.metric,
                    mode=spec.mode,
                    search_alg=search_algorithm(spec, max_conc),
                    scheduler=scheduler(spec),
                    num_samples=spec.num_samples,
                    max_concurrent_trials=max_conc if spec.algorithm == "optuna" else None,
                    reuse_actors=True,
                ),
                run_config=run_config,
            )
        tuner.fit()  # does not raise for failed trials: the saved state is read below
        # Read the saved experiment state, not `results`: after Ctrl-C Ray marks the interrupted trials
        # TERMINATED in memory, while the saved state (what --resume continues) still has them running.
        # Written before Ray shuts down (1.4 s here), which Ray no longer needs.
        sweep = load_sweep(exp_dir if (exp_dir / META_FILE).exists() else exp_path)
        write_results(sweep, exp_dir)
    finally:
        import ray

        ray.shutdown()
    print_table(sweep)
    unfinished = int(sweep.dataframe["status"].isin(["pending", "running", "paused"]).sum())
    unfinished += max(0, spec.expected_trials - len(sweep.dataframe))  # never started
    if unfinished:
        print(
            f"interrupted with {unfinished} trials unfinished: resume with\n  python sweeps/run_sweep.py "
            f"--name {name} --storage-path {args.storage_path} --resume",
            flush=True,
        )
        return 130
    errors = int((sweep.dataframe["status"] == "error").sum())
    print(f"results: {exp_dir} (summary.md, results.csv, plots/)", flush=True)
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return run(args)
    except (SpaceError, ConfigError, DataError, SweepInputError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
