"""The driver against a real Ray cluster whose nodes are too small for a trial: it warns and waits (a cluster may
autoscale) instead of refusing, and Ctrl-C then prints a resume command that a shell reads back whole.
"""

from __future__ import annotations

import shlex
import signal
import time

import pytest
from support.experiment import base_config_dict, seq_space, write_yaml
from support.processes import Driver, child_env

from sweeps import run_sweep

pytestmark = pytest.mark.slow


def test_cluster_too_small_for_a_trial_warns_and_ctrl_c_prints_a_quoted_resume_command(tmp_path, small_corpus):
    from ray.cluster_utils import Cluster

    base = write_yaml(tmp_path / "base.yaml", base_config_dict(small_corpus))
    space = seq_space(base, name="toobig", num_samples=1, resources_per_trial={"cpu": 2, "gpu": 0})
    space_file = write_yaml(tmp_path / "space.yaml", space)
    storage = tmp_path / "my results"  # a space: the printed resume command must quote it
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    driver = None
    try:
        cluster.wait_for_nodes()
        address = cluster.address
        args = ["--space", str(space_file), "--storage-path", str(storage), "--address", address]
        driver = Driver(args, child_env(), tmp_path)
        warning = driver.wait_until(
            lambda: next((ln for ln in driver.lines if ln.startswith("warning:")), None), "the resources warning"
        )
        assert f"{space_file}: resources_per_trial: a trial asks 2 CPU + 0 GPU" in warning, warning
        assert "largest: 1 CPU + 0 GPU" in warning and "autoscaling" in warning
        # Warned, not refused: Tune runs, its trial pending until a node fits (Ctrl-C once Tune handles it).
        driver.wait_until(lambda: list((storage / "toobig").glob("experiment_state-*.json")), "Tune's sweep state")
        time.sleep(2)
        assert driver.proc.poll() is None
        driver.signal_group(signal.SIGINT)
        code = driver.wait()
        output = driver.lines
    finally:
        if driver is not None:
            driver.kill_all()
        cluster.shutdown()
    assert code == 130, "\n".join(output[-60:])
    assert "Traceback" not in "\n".join(output)
    at = next(i for i, ln in enumerate(output) if ln.endswith("resume with"))
    words = shlex.split(output[at + 1])
    assert words[:2] == ["python", str(run_sweep.__file__)] or words[0] == "lm-sweep", words
    resumed = run_sweep.parse_args(words[words.index("--name") :])
    assert resumed.resume and resumed.name == "toobig" and resumed.address == address
    assert resumed.storage_path == str(storage)
