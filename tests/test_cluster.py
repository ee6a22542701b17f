"""A sweep on a real two-node Ray cluster started on this machine (issue: scale out).

The test process owns the cluster (`ray.cluster_utils.Cluster`: a head and a worker node, one CPU each);
the sweep driver runs as a separate process with `--address`, as it would against any existing cluster.
Mid-sweep the worker node is removed (its raylet and workers are killed): its trial must retry on the
head from its last checkpoint. Also checks device selection without GPUs (`gpu: auto` -> CPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from lm.checkpoint import load_model_state, read_checkpoint
from lm.config import Config
from lm.model import TransformerLM

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def _write_space(tmp_path: Path, corpus: Path, **extra) -> Path:
    base = {
        "model": {"vocab_size": 257, "context_length": 32, "d_model": 32, "num_layers": 2, "num_heads": 2,
                  "d_ff": 64},
        "data": {"train_path": str(corpus / "train.npy"), "val_path": str(corpus / "val.npy"), "batch_size": 8,
                 "val_windows": 16},
        "train": {"max_tokens": 8 * 32 * 600, "eval_interval_tokens": 8 * 32 * 60, "log_interval": 50,
                  "progress": "off", "tensorboard": False},
    }  # fmt: skip
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    space = {
        "name": "cluster",
        "base_config": str(tmp_path / "base.yaml"),
        "search": {"algorithm": "random", "seed": 0, "max_concurrent_trials": 2},
        "scheduler": {"type": "fifo"},
        "num_samples": 3,
        "resources_per_trial": {"cpu": 1, "gpu": "auto"},
        "checkpoint": {"num_to_keep": 2},
        "max_failures": 2,
        "parameters": {"optimizer.lr": {"values": [1e-3, 2e-3, 3e-3]}},
        **extra,
    }
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def _reports(storage: Path) -> list[dict]:
    rows = []
    for f in storage.glob("cluster/*/result.json"):
        for line in f.read_text().splitlines():
            if line.strip():
                rows.append(json.loads(line))
    return rows


def test_sweep_on_two_node_cluster_survives_losing_the_worker_node(tmp_path, small_corpus):
    from ray.cluster_utils import Cluster

    space = _write_space(tmp_path, small_corpus)
    storage = tmp_path / "storage"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    driver = None
    try:
        worker = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        head_id, worker_id = cluster.head_node.node_id, worker.node_id
        env = dict(os.environ)  # conftest set Ray's environment defaults
        env.pop("RAY_ADDRESS", None)
        log = open(tmp_path / "driver.log", "w")  # noqa: SIM115 - closed below
        driver = subprocess.Popen(
            [sys.executable, str(ROOT / "sweeps" / "run_sweep.py"), "--space", str(space), "--address",
             cluster.address, "--storage-path", str(storage)],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, start_new_session=True,
        )  # fmt: skip
        # Wait until the worker node's trial has reported (and so checkpointed) at least twice.
        deadline = time.time() + 240
        while time.time() < deadline:
            on_worker = [r for r in _reports(storage) if r.get("node_id") == worker_id]
            if len(on_worker) >= 2 or driver.poll() is not None:
                break
            time.sleep(0.5)
        assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
        assert len(on_worker) >= 2, "no trial reported from the worker node"
        moved_trial = on_worker[-1]["trial_id"]
        cluster.remove_node(worker)  # kills the node's raylet and its trial worker
        code = driver.wait(timeout=400)
        log.close()
        output = (tmp_path / "driver.log").read_text()
        assert code == 0, output[-3000:]
        assert "gpu: auto -> 0" in output
    finally:
        if driver is not None and driver.poll() is None:
            os.killpg(driver.pid, 9)
        cluster.shutdown()

    exp = storage / "cluster"
    results = pd.read_csv(exp / "results.csv")
    assert len(results) == 3 and set(results["status"]) == {"completed"}
    history = pd.read_parquet(exp / "history.parquet")
    assert {head_id, worker_id} <= set(history["node_id"].dropna()), "trials did not run on both nodes"

    # The trial that lost its node went on on the head, from its checkpoint: its evaluations never
    # restart from the beginning (tokens_seen strictly increases) and it reached the full budget.
    moved = history[history["trial_id"] == moved_trial]
    assert set(moved["node_id"]) == {worker_id, head_id}
    tokens = moved["tokens_seen"].tolist()
    assert tokens == sorted(set(tokens)), tokens
    assert tokens[-1] == 8 * 32 * 600

    # Checkpoints written on either node load into lm.
    for trial_dir in exp.glob("train_trial_*"):
        for state_file in trial_dir.glob("checkpoint_*/state.pt"):
            state = read_checkpoint(state_file)
            model = TransformerLM.from_config(Config.from_dict(state["config"]).model)
            load_model_state(model, state["model"])


_LISTENERS_SCRIPT = """
import json, os, sys
from sweeps.cluster import start_ray
import ray

start_ray(None, 1)
ray.get(ray.remote(lambda: 1).remote())  # a worker process is up too

def descendants(root):
    children = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        children.setdefault(ppid, []).append(int(pid))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found

inodes = set()
for pid in descendants(os.getpid()):
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        pass
listening = []
for table in ("/proc/net/tcp", "/proc/net/tcp6"):
    for line in open(table).read().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
            listening.append(fields[1].split(":")[0])
ray.shutdown()
print(json.dumps(listening))
"""
LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}  # /proc/net hex


def test_a_local_ray_listens_on_loopback_only(ray_tmp):
    """Every server a local sweep's Ray starts (GCS, raylet, object manager, workers) binds 127.0.0.1."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = str(ray_tmp)
    out = subprocess.run(
        [sys.executable, "-c", _LISTENERS_SCRIPT], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr[-3000:]
    listening = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(listening) >= 4, listening  # the driver, GCS, raylet and a worker at least
    assert set(listening) <= LOOPBACK, listening  # no 00000000 (every interface), no network address
