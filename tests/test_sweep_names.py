"""What the sweep driver accepts before Ray starts: the sweep's name, the storage path, the CPUs of a local Ray,
the resources a trial asks for; and the resume command it prints after Ctrl-C.

Bad input is one line `error: ...`, exit 2, with nothing created. `run_sweep.main` runs in-process with
`start_ray` replaced by a function that fails the test; a few cases also run as real processes.
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from support.experiment import base_config_dict, seq_space, write_yaml
from support.processes import RUN_SWEEP, child_env

from sweeps import run_sweep
from sweeps.cluster import ResourceError, check_local_resources, unschedulable_warning
from sweeps.layout import NAME_MAX, SPEC_FILE, numbered_name, valid_name
from sweeps.space import SpaceError, load_space


class RayStarted(Exception):
    """Raised by the fake start_ray: the driver got past every check (what the cluster tests want)."""


@pytest.fixture
def no_ray(monkeypatch):
    """run_sweep.main must return before Ray starts: starting it fails the test."""

    def fail(*args, **kwargs):
        raise AssertionError("Ray must not start on bad input")

    monkeypatch.setattr(run_sweep, "start_ray", fail)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


@pytest.fixture
def space(tmp_path, small_corpus) -> Path:
    """A valid one-trial space on the small corpus, named 'names'."""
    base = write_yaml(tmp_path / "inputs" / "base.yaml", base_config_dict(small_corpus))
    return write_yaml(tmp_path / "inputs" / "space.yaml", seq_space(base, name="names", num_samples=1))


def _space_with(space: Path, **overrides) -> Path:
    import yaml

    data = yaml.safe_load(space.read_text())
    data.update(overrides)
    return write_yaml(space.parent / "edited.yaml", data)


def _one_error_line(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# ---------------------------------------------------------------------------------------------------
# The name rule (sweeps/layout.py)
# ---------------------------------------------------------------------------------------------------

GOOD_NAMES = ["lr_sweep", "lr_sweep-2", "a", "A.b-c_d", "9lives", "x" * NAME_MAX]
BAD_NAMES = {
    "escape": "../../escaped",
    "absolute": "/tmp/elsewhere",
    "slash": "a/b",
    "space": "a b",
    "dotdot": "..",
    "dotdot-inside": "a..b",
    "dot": ".",
    "hidden": ".hidden",
    "dash-first": "-x",
    "too-long": "x" * 300,
    "just-too-long": "x" * (NAME_MAX + 1),
    "empty": "",
    "non-ascii": "sw\u00e9ep",
    "newline": "a\nb",
    "backslash": "a\\b",
    "quote": "a'b",
}


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_valid_names(name):
    assert valid_name(name)


@pytest.mark.parametrize("name", list(BAD_NAMES.values()), ids=list(BAD_NAMES))
def test_invalid_names(name):
    assert not valid_name(name)


@pytest.mark.parametrize("name", ["lr_sweep", "x" * NAME_MAX, "x" * (NAME_MAX - 1)])
@pytest.mark.parametrize("n", [2, 10, 1000])
def test_numbered_names_stay_valid(name, n):
    numbered = numbered_name(name, n)
    assert valid_name(numbered) and numbered.endswith(f"-{n}")
    assert numbered_name("lr_sweep", 2) == "lr_sweep-2"


# ---------------------------------------------------------------------------------------------------
# --name and the space's name: one line, exit 2, nothing created
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("resume", [False, True], ids=["start", "resume"])
@pytest.mark.parametrize("name", list(BAD_NAMES.values()), ids=list(BAD_NAMES))
def test_bad_name_is_refused_before_anything_is_created(tmp_path, space, no_ray, capsys, monkeypatch, name, resume):
    work = tmp_path / "work" / "deeper"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    storage = tmp_path / "work" / "storage"
    before = _tree(tmp_path)
    argv = ["--space", str(space), "--storage-path", str(storage), f"--name={name}"] + (["--resume"] * resume)
    assert run_sweep.main(argv) == 2
    _one_error_line(capsys, "--name: expected", "letters, digits", repr(name))
    assert _tree(tmp_path) == before  # the storage directory included: not even created


@pytest.mark.parametrize("name", ["../x", "a b", "x" * 300, ".hidden"], ids=["escape", "space", "too-long", "hidden"])
def test_bad_name_in_the_space_file_names_the_file_and_key(tmp_path, space, no_ray, capsys, name):
    bad = _space_with(space, name=name)
    storage = tmp_path / "storage"
    assert run_sweep.main(["--space", str(bad), "--storage-path", str(storage)]) == 2
    _one_error_line(capsys, f"{bad}: name: expected", "letters, digits")
    assert not storage.exists()
    with pytest.raises(SpaceError, match="name: expected"):
        load_space(bad)


def test_bad_name_as_a_real_process(tmp_path, space):
    """The CLI a user runs: `--storage-path DIR --name ../../escaped` writes nothing, outside DIR or in it."""
    storage = tmp_path / "a" / "b" / "storage"
    before = _tree(tmp_path)
    proc = subprocess.run(
        [sys.executable, str(RUN_SWEEP), "--space", str(space), "--storage-path", str(storage), "--name",
         "../../escaped"],
        cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert [ln for ln in proc.stderr.splitlines() if ln.strip()] == [
        "error: --name: expected a name of letters, digits, '-', '_' or '.' (no '..'), starting with a letter or "
        f"digit, at most {NAME_MAX} characters, got '../../escaped'"
    ]
    assert _tree(tmp_path) == before


def test_the_name_rule_is_the_same_at_start_and_at_resume(tmp_path, space, capsys):
    """A name accepted at start is saved with the sweep, and the saved space reads back at resume; a rerun of
    the same space gets a numbered name that obeys the rule too, also for a name of the maximum length."""
    long_space = _space_with(space, name="n" * NAME_MAX)
    storage = tmp_path / "storage"
    for path, expected in ((space, "names"), (long_space, "n" * NAME_MAX)):
        args = run_sweep.parse_args(["--space", str(path), "--storage-path", str(storage)])
        spec, _, exp_dir, name = run_sweep.prepare(args)
        assert name == expected
        run_sweep.save_spec(spec, exp_dir, name, ["test"])
        again = run_sweep.prepare(args)  # the same space again, without --name: a new sweep beside it
        assert valid_name(again[3]) and again[3].endswith("-2") and again[2] == storage / again[3]
        run_sweep.save_spec(again[0], again[2], again[3], ["test"])
        for saved_name in (name, again[3]):
            resume = run_sweep.parse_args(["--name", saved_name, "--storage-path", str(storage), "--resume"])
            assert run_sweep.prepare(resume)[3] == saved_name
            assert load_space(storage / saved_name / SPEC_FILE).name == saved_name


# ---------------------------------------------------------------------------------------------------
# --storage-path: a scheme pyarrow does not know is one line, and nothing is left behind
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("uri", ["foo://bar/x", "mock://x", "S3://bucket/x", "http://host/x"])
def test_unknown_storage_scheme_is_refused_before_anything_is_created(tmp_path, space, no_ray, capsys, monkeypatch,
                                                                      uri):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    before = _tree(tmp_path)
    assert run_sweep.main(["--space", str(space), "--storage-path", uri]) == 2
    _one_error_line(capsys, f"{uri}: --storage-path: expected a local directory or a URI", "s3://", "gs://")
    assert _tree(tmp_path) == before  # no ./sweep_results/


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("checking a storage URI must not contact any server")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.mark.parametrize(
    "uri", ["s3://bucket/sweeps", "gs://bucket/sweeps", "gcs://b/s", "hdfs://namenode:8020/s", "abfs://c@acct/s"]
)
def test_remote_storage_uris_are_accepted_without_contacting_anything(uri, no_network):
    assert run_sweep.storage_root(uri) == (uri, None)


def test_file_uris_are_local_directories(tmp_path, no_network):
    where = tmp_path / "my results"
    assert run_sweep.storage_root(f"file://{tmp_path}/my%20results") == (str(where), where)
    assert run_sweep.storage_root(f"file://localhost{where}") == (str(where), where)
    assert run_sweep.storage_root(f"local://{where}")[1] == where
    assert not where.exists()  # resolving a storage path creates nothing
    with pytest.raises(run_sweep.SweepInputError, match="file:// URI of this machine"):
        run_sweep.storage_root("file://otherhost/x")


def test_a_pyarrow_without_the_filesystem_is_one_line(monkeypatch, no_network):
    import pyarrow.fs

    monkeypatch.delattr(pyarrow.fs, "S3FileSystem")  # as a pyarrow built without S3 support
    with pytest.raises(run_sweep.SweepInputError, match=r"s3://b/x: --storage-path: this pyarrow is built without"):
        run_sweep.storage_root("s3://b/x")


# ---------------------------------------------------------------------------------------------------
# --num-cpus and resources_per_trial on a local Ray
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["-1", "0", "two", "1.5"])
def test_num_cpus_below_one_is_refused_before_anything_is_created(tmp_path, space, no_ray, capsys, value):
    before = _tree(tmp_path)
    argv = ["--space", str(space), "--storage-path", str(tmp_path / "storage"), f"--num-cpus={value}"]
    assert run_sweep.main(argv) == 2
    _one_error_line(capsys, "--num-cpus", "expected a positive integer", repr(value))
    assert _tree(tmp_path) == before


def _no_gpu(monkeypatch, count: int = 0) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


IMPOSSIBLE = {
    "cpu-over-num-cpus": ({"cpu": 3, "gpu": 0}, ["--num-cpus", "2"], 0, ["resources_per_trial.cpu", "at most 2", "3"]),
    "cpu-100": ({"cpu": 100, "gpu": 0}, ["--num-cpus", "2"], 0, ["resources_per_trial.cpu", "at most 2", "100"]),
    "cpu-over-machine": ({"cpu": (os.cpu_count() or 1) + 1, "gpu": 0}, [], 0, ["resources_per_trial.cpu",
                         f"at most {os.cpu_count()}", "CPU count"]),
    "gpu-fraction-no-gpu": ({"cpu": 1, "gpu": 0.25}, [], 0, ["resources_per_trial.gpu", "is_available() is False",
                            "0.25"]),
    "gpu-whole-no-gpu": ({"cpu": "auto", "gpu": 1}, [], 0, ["resources_per_trial.gpu", "expected 0"]),
    "two-gpus-on-one": ({"cpu": 1, "gpu": 2}, [], 1, ["resources_per_trial.gpu", "at most 1"]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(IMPOSSIBLE))
def test_impossible_resources_are_refused_before_a_local_ray_starts(tmp_path, space, no_ray, capsys, monkeypatch,
                                                                    case):  # fmt: skip
    resources, extra, gpus, fragments = IMPOSSIBLE[case]
    _no_gpu(monkeypatch, gpus)
    bad = _space_with(space, resources_per_trial=resources)
    storage = tmp_path / "storage"
    assert run_sweep.main(["--space", str(bad), "--storage-path", str(storage), *extra]) == 2
    _one_error_line(capsys, f"{bad}: ", *fragments)
    assert not storage.exists()


def test_impossible_resources_on_resume_name_the_saved_space(tmp_path, space, no_ray, capsys, monkeypatch):
    """A sweep resumed on a machine that lacks what it asks (here: fewer CPUs) is refused the same way."""
    storage = tmp_path / "storage"
    args = run_sweep.parse_args(["--space", str(_space_with(space, resources_per_trial={"cpu": 2, "gpu": 0})),
                                 "--storage-path", str(storage), "--num-cpus", "2"])  # fmt: skip
    spec, _, exp_dir, name = run_sweep.prepare(args)
    run_sweep.save_spec(spec, exp_dir, name, ["test"])
    assert run_sweep.main(["--name", name, "--storage-path", str(storage), "--resume", "--num-cpus", "1"]) == 2
    _one_error_line(capsys, f"{exp_dir / SPEC_FILE}: resources_per_trial.cpu", "at most 1")


@pytest.mark.parametrize("resources", [{"cpu": "auto", "gpu": "auto"}, {"cpu": 2, "gpu": 0}, {"cpu": 0.5, "gpu": 0}])
def test_possible_resources_pass(space, monkeypatch, resources):
    _no_gpu(monkeypatch)
    check_local_resources(load_space(_space_with(space, resources_per_trial=resources)), num_cpus=2)


def test_a_gpu_trial_fits_a_machine_with_a_gpu(space, monkeypatch):
    _no_gpu(monkeypatch, count=1)
    check_local_resources(load_space(_space_with(space, resources_per_trial={"cpu": 1, "gpu": 0.25})), num_cpus=2)
    with pytest.raises(ResourceError, match="at most 1"):
        check_local_resources(load_space(_space_with(space, resources_per_trial={"cpu": 1, "gpu": 2})), num_cpus=2)


@pytest.mark.parametrize("how", ["--address", "RAY_ADDRESS"])
def test_on_a_cluster_large_resources_are_not_refused(tmp_path, space, monkeypatch, how):
    """A cluster may autoscale: what this machine lacks is no reason to refuse (make_tuner warns instead)."""

    def started(address, *args, **kwargs):
        raise RayStarted(address)

    monkeypatch.setattr(run_sweep, "start_ray", started)
    _no_gpu(monkeypatch)
    big = _space_with(space, resources_per_trial={"cpu": 100, "gpu": 0.25})
    argv = ["--space", str(big), "--storage-path", str(tmp_path / "storage")]
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if how == "--address":
        argv += ["--address", "10.0.0.1:6379"]
    else:
        monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    with pytest.raises(RayStarted, match="10.0.0.1:6379"):
        run_sweep.main(argv)


def _node(cpu: float, gpu: float = 0, alive: bool = True) -> dict:
    return {"Alive": alive, "Resources": {"CPU": cpu, **({"GPU": gpu} if gpu else {}), "memory": 1e9}}


@pytest.mark.parametrize(
    "cpu, gpu, nodes, warns",
    [
        (4, 0, [_node(4), _node(4)], False),
        (0.5, 0, [_node(1)], False),
        (8, 0, [_node(4), _node(4)], True),  # 8 CPUs in all, but one trial runs on one node
        (8, 0, [_node(4), _node(16, alive=False)], True),  # a dead node does not count
        (1, 0.25, [_node(8)], True),
        (1, 0.25, [_node(8), _node(2, gpu=1)], False),
        (4, 1, [_node(8), _node(2, gpu=1)], True),  # CPUs and GPU must be on the same node
    ],
)
def test_cluster_warning_when_no_node_fits_a_trial(space, cpu, gpu, nodes, warns):
    spec = load_space(space)
    warning = unschedulable_warning(spec, cpu, gpu, nodes)
    if not warns:
        assert warning is None
        return
    assert warning.startswith(f"warning: {space}: resources_per_trial:") and "\n" not in warning
    assert f"{cpu:g} CPU + {gpu:g} GPU" in warning and "autoscaling" in warning


# ---------------------------------------------------------------------------------------------------
# The resume command after Ctrl-C
# ---------------------------------------------------------------------------------------------------


def _interrupted(statuses: list[str]) -> SimpleNamespace:
    return SimpleNamespace(dataframe=pd.DataFrame({"status": statuses}))


@pytest.mark.parametrize(
    "argv0, command",
    [
        ("/venv/bin/lm-sweep", ["lm-sweep"]),
        ("sweeps/run_sweep.py", ["python", "sweeps/run_sweep.py"]),
        ("/home/me/my repo/sweeps/run_sweep.py", ["python", "/home/me/my repo/sweeps/run_sweep.py"]),
    ],
)
def test_resume_command_is_shell_quoted_and_names_the_command_as_invoked(tmp_path, monkeypatch, capsys, argv0,
                                                                          command):  # fmt: skip
    storage = tmp_path / "my results; rm -rf ~"
    monkeypatch.setattr(sys, "argv", [argv0])
    monkeypatch.chdir(tmp_path)
    args = run_sweep.parse_args(["--storage-path", str(storage), "--num-cpus", "2", "--allocator", "system"])
    spec = SimpleNamespace(expected_trials=4)
    code = run_sweep.exit_code(_interrupted(["completed", "running", "pending"]), spec, args, "lr_sweep",
                               storage / "lr_sweep")  # fmt: skip
    assert code == 130
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "interrupted with 3 trials unfinished: resume with"
    words = shlex.split(out[1])
    assert words[: len(command)] == command
    resumed = run_sweep.parse_args(words[len(command) :])
    assert resumed.resume and resumed.name == "lr_sweep"
    assert resumed.storage_path == str(storage)  # the space and the ';' came back whole
    assert (resumed.num_cpus, resumed.allocator) == (2, "system")


def test_resume_command_makes_a_relative_storage_path_absolute(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lm-sweep"])
    args = run_sweep.parse_args(["--storage-path", "rel dir", "--address", "auto"])
    run_sweep.exit_code(
        _interrupted(["paused"]), SimpleNamespace(expected_trials=1), args, "s", tmp_path / "rel dir" / "s"
    )
    words = shlex.split(capsys.readouterr().out.splitlines()[1])
    resumed = run_sweep.parse_args(words[1:])
    assert resumed.storage_path == str(tmp_path / "rel dir") and resumed.address == "auto"


def test_resume_command_keeps_a_uri(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["lm-sweep"])
    args = argparse.Namespace(storage_path="s3://bucket/my sweeps", address=None, num_cpus=None, allocator="auto")
    run_sweep.exit_code(_interrupted(["running"]), SimpleNamespace(expected_trials=1), args, "s", tmp_path / "s")
    words = shlex.split(capsys.readouterr().out.splitlines()[1])
    assert words == ["lm-sweep", "--name", "s", "--storage-path", "s3://bucket/my sweeps", "--resume"]


def test_resume_command_when_no_trial_has_reported(tmp_path, monkeypatch, capsys):
    """Ctrl-C before any trial reported: the results table is empty (no status column)."""
    monkeypatch.setattr(sys, "argv", ["lm-sweep"])
    args = run_sweep.parse_args(["--storage-path", str(tmp_path)])
    empty = SimpleNamespace(dataframe=pd.DataFrame())
    assert run_sweep.exit_code(empty, SimpleNamespace(expected_trials=2), args, "s", tmp_path / "s") == 130
    assert capsys.readouterr().out.startswith("interrupted with 2 trials unfinished")


def test_finished_sweep_prints_no_resume_command(tmp_path, capsys):
    args = run_sweep.parse_args(["--storage-path", str(tmp_path)])
    spec = SimpleNamespace(expected_trials=2)
    assert run_sweep.exit_code(_interrupted(["completed", "error"]), spec, args, "s", tmp_path / "s") == 1
    assert "resume" not in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------
# The same refusals from the real CLI process
# ---------------------------------------------------------------------------------------------------


def test_cli_refusals_as_real_processes(tmp_path, space):
    """--storage-path foo://, --num-cpus -1 and cpu: 100: one line each, exit 2, nothing left in the directory."""
    cases = {
        "scheme": (["--storage-path", "foo://bar/x"], ["foo://bar/x: --storage-path: expected"]),
        "num-cpus": (["--storage-path", "st", "--num-cpus", "-1"], ["--num-cpus", "positive integer"]),
        "cpu-100": (["--space", str(_space_with(space, resources_per_trial={"cpu": 100, "gpu": 0})),
                     "--storage-path", "st", "--num-cpus", "2"], ["resources_per_trial.cpu", "at most 2"]),
    }  # fmt: skip
    work = tmp_path / "work"
    work.mkdir()
    procs = {
        case: subprocess.Popen(
            [sys.executable, str(RUN_SWEEP), "--space", str(space), *args],
            cwd=work,
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for case, (args, _) in cases.items()
    }
    for case, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, (case, out, err)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), (case, err)
        assert all(fragment in lines[0] for fragment in cases[case][1]), (case, lines[0])
    assert list(work.iterdir()) == []  # no ./sweep_results/, no ./st/
