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
    address = address or os.environ.get("RAY_ADDRESS")
    common = dict(include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    if worker_env:
        common["runtime_env"] = {"env_vars": worker_env}
    if not address:
        with ray_compat.loopback_only():
            import ray

            ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), **common)
        return
    import ray

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


def unschedulable_warning(spec: SweepSpec, cpu: float, gpu: float, nodes: list[dict]) -> str | None:
    """A warning line when no alive node in `nodes` (as `ray.nodes()` lists them) has `cpu` CPUs and `gpu` GPUs
    for one trial; None when one has. A cluster's autoscaler may still add such a node, so this never refuses."""
    alive = [node.get("Resources", {}) for node in nodes if node.get("Alive")]
    if any(r.get("CPU", 0) >= cpu and r.get("GPU", 0) >= gpu for r in alive):
        return None
    largest = max(alive, key=lambda r: (r.get("GPU", 0), r.get("CPU", 0)), default={})
    return (
        f"warning: {spec.source}: resources_per_trial: a trial asks {cpu:g} CPU + {gpu:g} GPU, and no node of the "
        f"Ray cluster has that now (largest: {largest.get('CPU', 0):g} CPU + {largest.get('GPU', 0):g} GPU): "
        "trials wait until such a node joins (autoscaling), else forever"
    )


def warn_if_unschedulable(spec: SweepSpec, cpu: float, gpu: float) -> None:
    """Print `unschedulable_warning` for the running Ray, if any."""
    import ray

    warning = unschedulable_warning(spec, cpu, gpu, ray.nodes())
    if warning:
        print(warning, flush=True)
