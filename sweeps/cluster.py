"""Where trials run: starting or joining Ray, what its worker processes preload, CPUs and GPUs per trial, and
whether a storage path is shared by every node of a cluster.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from lm.cli import InputError
from sweeps import ray_compat
from sweeps.space import SweepSpec


class ResourceError(InputError):
    """A cluster address, allocator or storage path that cannot work (one-line message)."""


def cluster_address(address: str | None) -> str | None:
    """The Ray cluster a sweep joins: `--address`, else RAY_ADDRESS; None when it starts a local Ray."""
    return address or os.environ.get("RAY_ADDRESS") or None


def allocator_env(allocator: str, local: bool) -> dict[str, str]:
    """Environment for Ray's worker processes that preloads `allocator`: {} for glibc malloc.

    "auto" picks tcmalloc on Linux when the machine has it (Debian/Ubuntu: libtcmalloc-minimal4) and Ray is local
    (a cluster's nodes may lack it), unless LD_PRELOAD is already set. Freed tensor memory is reused hot
    instead of being returned to the OS (the gain is measured in the README's Performance section).
    Raises ResourceError for a path that does not exist.
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
            raise ResourceError(f"{library}: --allocator: expected 'auto', 'system' or a shared library file")
    # tcmalloc reports every allocation over 1 GiB on stderr; a 17M model's batches are not news.
    return {"LD_PRELOAD": library, "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}


def start_ray(address: str | None, num_cpus: int | None, worker_env: dict[str, str] | None = None) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS), else start a local Ray of `num_cpus` CPUs; Ray's
    worker processes get the variables in `worker_env` (for example `allocator_env`'s). A local Ray listens on
    127.0.0.1 only (nothing on the network can reach it); joining a cluster keeps Ray's own settings (token
    authentication on)."""
    from sweeps import disk

    address = address or os.environ.get("RAY_ADDRESS")
    common = dict(include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    # Every worker writes its checkpoints into local storage whole or not at all (sweeps/disk.py); so does the
    # driver, for the experiment state and result files.
    common["runtime_env"] = {"worker_process_setup_hook": f"{disk.__name__}.{disk.atomic_storage_writes.__name__}"}
    if worker_env:
        common["runtime_env"]["env_vars"] = worker_env
    if not address:
        with ray_compat.loopback_only():
            import ray

            ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), **common)
        disk.atomic_storage_writes()
        return
    import ray

    try:
        ray.init(address=address, **common)
        disk.atomic_storage_writes()
    except Exception as e:  # Ray raises ConnectionError, AuthenticationError, RuntimeError...
        hint = ""
        if "auth" in type(e).__name__.lower() or "token" in str(e).lower():
            hint = (
                " (Ray 2.60 clusters use token authentication: set RAY_AUTH_MODE=token and the token, "
                "RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, as on the head node)"
            )
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ResourceError(f"--address {address}: cannot connect to the Ray cluster: {first}{hint}") from None


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
        raise ResourceError(
            f"{storage}: --storage-path is local to this machine: {len(blind)} of {len(nodes)} cluster nodes "
            f"cannot see it (e.g. node {blind[0][:12]}); use a shared filesystem path or a URI such as "
            "s3://bucket/sweeps"
        )


def gpus_per_trial(spec: SweepSpec) -> float:
    import ray

    if spec.resources_per_trial.gpu != "auto":
        return float(spec.resources_per_trial.gpu)
    visible = ray.cluster_resources().get("GPU", 0)
    if visible < 1:
        print("resources_per_trial.gpu: auto -> 0 (no GPU visible to Ray): trials run on CPU", flush=True)
        return 0.0
    return 1.0


def cpus_per_trial(spec: SweepSpec, gpu: float, num_cpus: int | None) -> float:
    """resources_per_trial.cpu, with "auto" resolved by measuring this machine (sweeps/placement.py)."""
    if spec.resources_per_trial.cpu != "auto":
        return float(spec.resources_per_trial.cpu)
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


def check_local_resources(spec: SweepSpec, num_cpus: int | None) -> None:
    """Before a local Ray starts: refuse a `resources_per_trial` that it could never give a trial (more CPUs
    than `num_cpus`, default this machine's, or a GPU this machine lacks): Ray would wait forever.

    "auto" always fits. Raises ResourceError naming the space file and the key.
    """
    cpu, gpu = spec.resources_per_trial.cpu, spec.resources_per_trial.gpu
    available = num_cpus or os.cpu_count() or 1
    if cpu != "auto" and cpu > available:
        whose = "--num-cpus" if num_cpus else "this machine's CPU count"
        raise ResourceError(
            f"{spec.source}: resources_per_trial.cpu: expected at most {available} (the local Ray's CPUs: {whose}) "
            f'or "auto", got {cpu:g}'
        )
    if gpu != "auto" and gpu > 0:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpu > gpus:
            expected = "0 (torch.cuda.is_available() is False here)" if gpus == 0 else f"at most {gpus} (GPUs here)"
            raise ResourceError(f'{spec.source}: resources_per_trial.gpu: expected {expected} or "auto", got {gpu:g}')


def largest_node(nodes: list[dict]) -> dict[str, float]:
    """The resources of the alive node with the most GPUs, then CPUs ({} when none is alive)."""
    alive = [node.get("Resources", {}) for node in nodes if node.get("Alive")]
    return max(alive, key=lambda r: (r.get("GPU", 0), r.get("CPU", 0)), default={})


def fits_a_node(asked: dict[str, float], nodes: list[dict]) -> bool:
    """Whether some alive node in `nodes` (as `ray.nodes()` lists them) has every resource in `asked`."""
    return any(
        all(node.get("Resources", {}).get(key, 0) >= amount for key, amount in asked.items() if amount > 0)
        for node in nodes
        if node.get("Alive")
    )


def unschedulable_warning(spec: SweepSpec, cpu: float, gpu: float, nodes: list[dict]) -> str | None:
    """A warning line when no alive node in `nodes` (as `ray.nodes()` lists them) has `cpu` CPUs and `gpu` GPUs
    for one trial; None when one has. A cluster's autoscaler may still add such a node, so this never refuses."""
    if fits_a_node({"CPU": cpu, "GPU": gpu}, nodes):
        return None
    largest = largest_node(nodes)
    return (
        f"warning: {spec.source}: resources_per_trial: a trial asks {cpu:g} CPU + {gpu:g} GPU, and no node of the "
        f"Ray cluster has that now (largest: {largest.get('CPU', 0):g} CPU + {largest.get('GPU', 0):g} GPU): "
        f"trials wait until such a node joins (autoscaling), {_give_up(spec.resources_per_trial.pending_timeout_s)}"
    )


def _give_up(timeout_s: float | None) -> str:
    if timeout_s is None:
        return "else forever (resources_per_trial.pending_timeout_s: null)"
    return f"for at most resources_per_trial.pending_timeout_s ({timeout_s:g} s)"


def warn_if_unschedulable(spec: SweepSpec, cpu: float, gpu: float) -> None:
    """Print `unschedulable_warning` for the running Ray, if any."""
    import ray

    warning = unschedulable_warning(spec, cpu, gpu, ray.nodes())
    if warning:
        print(warning, flush=True)


PENDING_CHECK_S = 2.0
"""How often the driver asks Ray for its nodes while trials wait for resources."""


def make_pending_watch(spec: SweepSpec):
    """A Tune callback that ends the sweep when trials have waited `resources_per_trial.pending_timeout_s` for
    resources no node of the cluster has (checked every PENDING_CHECK_S; a node that joins in time resets the
    clock). Its `stop` is then a sweeps.disk.Stop: one line naming what a trial asks and what the cluster has,
    exit 1, results written; Ray's state keeps the waiting trials, so --resume on a larger cluster runs them."""
    import ray
    from ray import tune

    from sweeps.disk import Stop

    timeout = spec.resources_per_trial.pending_timeout_s

    class PendingWatch(tune.Callback):
        def __init__(self) -> None:
            self.stop: Stop | None = None
            self.since: float | None = None  # when the waiting trials were first seen unschedulable
            self.last = 0.0

        def on_step_begin(self, iteration, trials, **info):
            now = time.monotonic()
            if timeout is None or self.stop is not None or now - self.last < PENDING_CHECK_S:
                return
            self.last = now
            waiting = [t for t in trials if t.status == "PENDING"]
            asked = _trial_resources(waiting[0]) if waiting else {}
            nodes = ray.nodes() if waiting else []
            if not waiting or fits_a_node(asked, nodes):
                self.since = None
                return
            self.since = self.since if self.since is not None else now
            if now - self.since < timeout:
                return
            largest = largest_node(nodes)
            started = sum(1 for t in trials if t.status != "PENDING")
            alive = sum(1 for n in nodes if n.get("Alive"))
            has = " + ".join(f"{largest.get(k, 0):g} {k}" for k in asked)
            self.stop = Stop(
                f"error: {spec.source}: resources_per_trial: a trial asks "
                f"{' + '.join(f'{v:g} {k}' for k, v in asked.items())}, and for {now - self.since:.0f} s "
                f"(resources_per_trial.pending_timeout_s: {timeout:g}) no node of the Ray cluster had that "
                f"(largest of {alive} node(s): {has}): {spec.expected_trials - started} of {spec.expected_trials} "
                "trials never started; the sweep ended "
                "(--resume runs them on a cluster that has such a node)",
                exit_code=1,
                write_results=True,
                resumable=False,
            )
            ray_compat.interrupt_tune_run()

    return PendingWatch()


def _trial_resources(trial) -> dict[str, float]:
    """What one bundle of `trial` asks Ray for ({"CPU": 1.0, "GPU": 0.0}), from its public placement group factory."""
    factory = getattr(trial, "placement_group_factory", None)
    resources = getattr(factory, "required_resources", None) or {}
    return {"CPU": 0.0, "GPU": 0.0, **{key: float(value) for key, value in resources.items() if value}}
