"""Sweeps submitted as Ray Jobs to an existing cluster, as a user with a cluster does (issue 18, item 4).

One local cluster for the module: `ray start --head` as a subprocess, with Ray 2.60's token authentication on
(RAY_AUTH_MODE=token, the token in a temporary file named by RAY_AUTH_TOKEN_PATH, HOME a temporary directory:
nothing touches the real ~/.ray), free ports, 2 CPUs, its own --temp-dir. Every command is the `ray job` command
line a user types: `ray job submit --working-dir <repo> -- python sweeps/run_sweep.py ...`, `ray job status`,
`ray job logs`, `ray job stop`. Results land in a storage directory every node sees (here: this machine's disk).

The cluster is stopped by process id at the end, never with `ray stop`, which ends every Ray process of the
machine (other tests' and other users' too). Slow (a real Ray cluster and real sweeps).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from support.experiment import MAX_TOKENS, make_space, result_log, trial_dirs
from support.processes import session_pids

from sweeps.ray_compat import RAY_ENV_DEFAULTS
from sweeps.sweep import load_sweep

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
RAY = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
EXCLUDES = [".git", "tests", "benchmarks", "docs", ".benchmarks", "tmp_notes"]
"""Left out of the uploaded working directory: the job needs sweeps/ and lm/ only (and the rest is small)."""
JOB_TIMEOUT = 420  # seconds; generous, the machine is shared: the tests assert behaviour, never time


@dataclass
class Cluster:
    """A running local cluster: its job server's address and the environment (token) its clients need."""

    address: str  # http://127.0.0.1:PORT, the dashboard's job server
    env: dict[str, str]
    temp_dir: Path
    sid: int  # the session of `ray start`, which Ray's daemons keep

    def ray(self, *args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [RAY, *args], env=env or self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout
        )

    def job(self, command: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """`ray job COMMAND --address ADDRESS ARGS...`."""
        return self.ray("job", command, "--address", self.address, *args, timeout=timeout)

    def submit(self, job_id: str, *entrypoint: str, wait: bool, env_vars: dict[str, str] | None = None):
        runtime_env = {"excludes": EXCLUDES, **({"env_vars": env_vars} if env_vars else {})}
        return self.job(
            "submit", "--submission-id", job_id, "--working-dir", str(REPO), "--runtime-env-json",
            json.dumps(runtime_env), *([] if wait else ["--no-wait"]), "--", *entrypoint,
            timeout=JOB_TIMEOUT,
        )  # fmt: skip

    def status(self, job_id: str) -> str:
        """PENDING, RUNNING, STOPPED, SUCCEEDED or FAILED, as `ray job status` says it."""
        out = self.job("status", job_id)
        text = out.stdout + out.stderr
        for status, said in (("SUCCEEDED", "succeeded"), ("STOPPED", "was stopped"), ("FAILED", "failed")):
            if f"Job '{job_id}' {said}" in text:  # a job that has ended
                return status
        found = re.search(rf"Status for job '{job_id}': (\w+)", text)
        assert found, text
        return found.group(1)

    def logs(self, job_id: str) -> str:
        return self.job("logs", job_id).stdout

    def wait(self, job_id: str, timeout: float = JOB_TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while (status := self.status(job_id)) in ("PENDING", "RUNNING") and time.monotonic() < deadline:
            time.sleep(2)
        return status


def free_ports(n: int) -> list[int]:
    """`n` distinct ports free on 127.0.0.1 now."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def cluster_pids(sid: int, temp_dir: Path) -> list[int]:
    """This cluster's live processes: those of its session, and those working in or naming its temp dir (a job's
    driver runs in a session of its own, in the job's working directory under the temp dir)."""
    pids = set(session_pids(sid))
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and (cwd.startswith(str(temp_dir)) or str(temp_dir) in cmdline):
            pids.add(int(entry.name))
    return sorted(pids)


def stop_cluster(sid: int, temp_dir: Path) -> list[int]:
    """SIGTERM every process of the cluster, SIGKILL those left after 5 s; returns those that survived."""
    for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 15)):
        for pid in cluster_pids(sid, temp_dir):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while cluster_pids(sid, temp_dir) and time.monotonic() < deadline:
            time.sleep(0.2)
    return cluster_pids(sid, temp_dir)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A head node with token authentication, 2 CPUs, a dashboard (job server) on a free port."""
    # Short: Ray's unix socket paths under the temp dir must stay under ~107 characters.
    temp_dir = Path(tempfile.mkdtemp(prefix="rj", dir="/tmp"))
    token = temp_dir / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    (temp_dir / "home").mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(RAY_ENV_DEFAULTS, PYTHONUNBUFFERED="1")
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), HOME=str(temp_dir / "home"))
    gcs, dashboard, client, agent_http, agent_grpc, runtime_env_agent, metrics = free_ports(7)
    start = subprocess.Popen(
        [RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs), "--num-cpus", "2",
         "--num-gpus", "0", "--temp-dir", str(temp_dir / "ray"), "--include-dashboard", "true",
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--ray-client-server-port",
         str(client), "--dashboard-agent-listen-port", str(agent_http), "--dashboard-agent-grpc-port",
         str(agent_grpc), "--runtime-env-agent-port", str(runtime_env_agent), "--metrics-export-port",
         str(metrics), "--disable-usage-stats"],
        env=env, cwd=temp_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    sid = start.pid  # start_new_session: `ray start` leads a session, which the daemons it starts stay in
    head = Cluster(f"http://127.0.0.1:{dashboard}", env, temp_dir, sid)
    try:
        output, _ = start.communicate(timeout=180)
        assert start.returncode == 0, output[-4000:]
        deadline = time.monotonic() + 120  # the job server comes up a little after `ray start` returns
        while (listed := head.job("list")).returncode != 0 and time.monotonic() < deadline:
            time.sleep(1)
        assert listed.returncode == 0, listed.stdout[-3000:] + listed.stderr[-3000:]
        yield head
    finally:
        if start.poll() is None:
            start.kill()
        left = stop_cluster(sid, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"cluster processes still alive: {left}"


def sweep_command(space: Path | None, storage: Path, name: str, *extra: str) -> list[str]:
    """The job's entrypoint, relative to the working directory: what a user puts after `ray job submit ... --`."""
    return ["python", "sweeps/run_sweep.py", *(["--space", str(space)] if space else []), "--storage-path",
            str(storage), "--name", name, *extra]  # fmt: skip


def job_id(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:6]}"


def test_a_sweep_submitted_as_a_ray_job_writes_its_results_to_shared_storage(cluster, small_corpus, tmp_path):
    # Token authentication is on: a client without the token is refused.
    no_token = {k: v for k, v in cluster.env.items() if not k.startswith("RAY_AUTH")}
    refused = cluster.ray("job", "list", "--address", cluster.address, env=no_token)
    assert refused.returncode != 0 and "auth" in (refused.stdout + refused.stderr).lower(), refused.stdout

    space = make_space(tmp_path, small_corpus, num_samples=2, search={"algorithm": "random", "seed": 0,
                       "max_concurrent_trials": 2})  # fmt: skip
    storage = tmp_path / "shared"
    job = job_id("sweep")
    submitted = cluster.submit(job, *sweep_command(space, storage, "jobsweep"), wait=True)
    logs = cluster.logs(job)
    assert submitted.returncode == 0, submitted.stdout[-4000:] + submitted.stderr[-4000:]
    assert cluster.status(job) == "SUCCEEDED", logs[-4000:]
    assert "sweep 'jobsweep': 2 trials" in logs and f"results: {storage / 'jobsweep'}" in logs, logs[-4000:]

    exp = storage / "jobsweep"
    for name in ("results.csv", "summary.md", "sweep_meta.json", "results.parquet"):
        assert (exp / name).is_file(), name
    assert len(trial_dirs(exp)) == 2
    sweep = load_sweep(exp)
    assert len(sweep.dataframe) == 2 and set(sweep.dataframe["status"]) == {"completed"}
    assert (sweep.dataframe["tokens_seen"] == MAX_TOKENS).all()
    assert pd.read_csv(exp / "results.csv")["trial_id"].tolist() == sweep.dataframe["trial_id"].tolist()

    # What Ray unpacked on the head for the job: the package, small, without the excluded directories.
    unpacked = (cluster.temp_dir / "ray").glob("session_*/runtime_resources/working_dir_files/_ray_pkg_*")
    [package] = {path.resolve() for path in unpacked if path.is_dir()}  # (session_latest links to the session)
    assert (package / "sweeps" / "run_sweep.py").is_file() and (package / "lm").is_dir()
    assert not (package / ".git").exists() and not (package / "tests").exists()
    size = sum(f.stat().st_size for f in package.rglob("*") if f.is_file())
    assert size < 5_000_000, size


def first_report(exp: Path) -> bool:
    return any(result_log(d) for d in trial_dirs(exp).values()) if exp.is_dir() else False


def test_ray_job_stop_leaves_a_sweep_that_resumes_to_the_end(cluster, small_corpus, tmp_path):
    # Two trials in a row, each 8 times the usual budget (80 evaluations): the stop comes during the first.
    budget = 8 * MAX_TOKENS
    space = make_space(tmp_path, small_corpus, num_samples=2, stop={"max_tokens": budget, "divergence_loss": 10.0})
    storage = tmp_path / "shared"
    exp = storage / "stopped"
    job = job_id("stop")
    # Ray SIGKILLs a stopped job's driver RAY_JOB_STOP_WAIT_TIME_S after its SIGTERM (3 s by default, often enough
    # here): 60 s, as the README advises, so that the driver's orderly end is what is tested, on any machine.
    wait = {"RAY_JOB_STOP_WAIT_TIME_S": "60"}
    submitted = cluster.submit(job, *sweep_command(space, storage, "stopped"), wait=False, env_vars=wait)
    assert submitted.returncode == 0, submitted.stdout[-4000:] + submitted.stderr[-4000:]
    deadline, checked = time.monotonic() + JOB_TIMEOUT, time.monotonic()
    while not first_report(exp) and time.monotonic() < deadline:
        if time.monotonic() - checked > 10:  # (a `ray job` command takes a second or two)
            assert cluster.status(job) in ("PENDING", "RUNNING"), cluster.logs(job)[-4000:]
            checked = time.monotonic()
        time.sleep(0.1)
    assert first_report(exp), cluster.logs(job)[-4000:]

    stopped = cluster.job("stop", job)  # waits until the job has ended
    assert stopped.returncode == 0, stopped.stdout[-3000:] + stopped.stderr[-3000:]
    assert cluster.status(job) == "STOPPED"
    logs = cluster.logs(job)
    # `ray job stop` sends the driver SIGTERM: it ends the sweep as Ctrl-C does, writes the results, says how to resume.
    assert "SIGTERM: stopping the sweep" in logs, logs[-4000:]
    assert "interrupted with 2 trials unfinished: resume with" in logs and "--resume" in logs, logs[-4000:]
    assert "Traceback" not in logs, logs[-4000:]
    assert sorted(exp.glob("experiment_state-*.json")) and (exp / "summary.md").is_file()
    before = load_sweep(exp).dataframe
    assert len(before) == 1 and set(before["status"]) == {"running"}, before  # stopped during the first trial
    [stopped_trial] = before["trial_id"]

    resumed = job_id("resume")
    submitted = cluster.submit(resumed, *sweep_command(None, storage, "stopped", "--resume"), wait=True)
    logs = cluster.logs(resumed)
    assert submitted.returncode == 0 and cluster.status(resumed) == "SUCCEEDED", logs[-4000:]
    assert "resuming sweep 'stopped'" in logs, logs[-4000:]
    sweep = load_sweep(exp)
    after = sweep.dataframe
    assert len(after) == 2 and set(after["status"]) == {"completed"}, after
    assert (after["tokens_seen"] == budget).all()
    assert len(pd.read_csv(exp / "results.csv")) == 2
    # The stopped trial went on from its checkpoint: it evaluated its first interval once only.
    history = sweep.history[sweep.history["trial_id"] == stopped_trial]
    assert (history["tokens_seen"] == history["tokens_seen"].min()).sum() == 1, history["tokens_seen"].tolist()
