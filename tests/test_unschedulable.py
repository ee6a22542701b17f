"""Trials asking for resources that no node of a Ray cluster has (issue 14, item 9, the cluster half).

A local Ray refuses them before it starts (tests/test_sweep_names.py). A cluster may still grow (an autoscaler),
so the driver warns and waits, for at most `resources_per_trial.pending_timeout_s`: then the sweep ends with one
line naming what a trial asks and what the cluster has, exit 1, results written. Here a real one-node cluster
(`ray.cluster_utils.Cluster`, one CPU) gets a sweep whose trials ask for two.
"""

from __future__ import annotations

import re

import pytest
from support.experiment import make_space
from support.processes import driver, sweep_args

from sweeps import cluster
from sweeps.space import SpaceError, load_space

NODES = [
    {"Alive": True, "Resources": {"CPU": 4.0, "memory": 1e9}},
    {"Alive": True, "Resources": {"CPU": 2.0, "GPU": 1.0}},
    {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}},  # a dead node schedules nothing
]


def test_a_trial_fits_only_a_live_node_with_every_resource_it_asks():
    assert cluster.fits_a_node({"CPU": 4.0, "GPU": 0.0}, NODES)
    assert cluster.fits_a_node({"CPU": 2.0, "GPU": 1.0}, NODES)
    assert not cluster.fits_a_node({"CPU": 4.0, "GPU": 1.0}, NODES)  # the CPUs on one node, the GPU on another
    assert not cluster.fits_a_node({"CPU": 8.0}, NODES)
    assert cluster.largest_node(NODES) == {"CPU": 2.0, "GPU": 1.0}
    assert cluster.largest_node([]) == {}


def test_the_pending_timeout_defaults_to_ten_minutes_and_takes_null_or_a_positive_number(small_corpus, tmp_path):
    space = make_space(tmp_path, small_corpus)
    assert load_space(space).resources_per_trial.pending_timeout_s == 600
    assert (
        load_space(space, ["resources_per_trial.pending_timeout_s=null"]).resources_per_trial.pending_timeout_s is None
    )
    with pytest.raises(SpaceError, match=r"resources_per_trial\.pending_timeout_s: expected a positive number, got 0"):
        load_space(space, ["resources_per_trial.pending_timeout_s=0"])


def test_the_unschedulable_warning_says_how_long_trials_wait(small_corpus, tmp_path):
    spec = load_space(make_space(tmp_path, small_corpus), ["resources_per_trial.cpu=8"])
    warning = cluster.unschedulable_warning(spec, 8, 0, NODES)
    assert warning is not None and warning.endswith("for at most resources_per_trial.pending_timeout_s (600 s)")
    spec.resources_per_trial.pending_timeout_s = None
    assert cluster.unschedulable_warning(spec, 8, 0, NODES).endswith(
        "else forever (resources_per_trial.pending_timeout_s: null)"
    )


@pytest.mark.slow
def test_trials_no_node_can_run_end_the_sweep_after_the_timeout_with_one_line(small_corpus, tmp_path, ray_tmp):
    from ray.cluster_utils import Cluster

    space = make_space(tmp_path, small_corpus, resources_per_trial={"cpu": 2, "gpu": 0, "pending_timeout_s": 4})
    store = tmp_path / "store"
    head = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        head.wait_for_nodes()
        args = [a for a in sweep_args(space, "wide", store) if a not in ("--num-cpus", "2")]
        with driver([*args, "--address", head.address], ray_tmp, tmp_path) as d:
            rc = d.wait(timeout=240)
            out = d.output
    finally:
        head.shutdown()
    assert rc == 1, out[-4000:]
    assert "Traceback" not in out, out[-4000:]
    assert re.search(
        r"^warning: .*: a trial asks 2 CPU \+ 0 GPU, and no node .* \(largest: 1 CPU \+ 0 GPU\)", out, re.M
    )
    ended = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(ended) == 1, out[-4000:]
    assert re.fullmatch(
        rf"error: {re.escape(str(space))}: resources_per_trial: a trial asks 2 CPU \+ 0 GPU, and for \d+ s "
        r"\(resources_per_trial\.pending_timeout_s: 4\) no node of the Ray cluster had that \(largest of 1 node\(s\): "
        r"1 CPU \+ 0 GPU\): 3 of 3 trials never started; the sweep ended \(--resume runs them on a cluster that has "
        r"such a node\)",
        ended[0],
    ), ended[0]
    assert "resume with" not in out  # exit 1 with its reason, not the interrupted sweep's 130
    assert (store / "wide" / "summary.md").is_file()  # results written (of no trial)
