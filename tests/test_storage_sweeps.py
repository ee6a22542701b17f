"""Real sweeps with remote storage: an s3:// bucket on a local S3 server (moto, AWS_ENDPOINT_URL), the driver
SIGKILLed mid-sweep and resumed from another directory (no local copy), then inspected and continued from the
bucket; and a file:// URI. Slow (real Ray)."""

from __future__ import annotations

import io
import signal
from pathlib import Path

import pandas as pd
import pytest
from support.experiment import make_space
from support.processes import driver

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def finished_and_running(d) -> tuple[set[str], str] | None:
    done = set(d.finished())
    running = [t for t, _ in d.reports() if t not in done]
    return (done, running[0]) if done and running else None


def test_s3_sweep_killed_resumed_elsewhere_then_inspected_and_continued(small_corpus, tmp_path, ray_tmp, s3_server):
    import subprocess
    import sys

    space = make_space(tmp_path, small_corpus)  # 3 trials, one at a time, FIFO
    storage = s3_server.uri("sweeps")
    first, second = tmp_path / "machine_a", tmp_path / "machine_b"
    first.mkdir(), second.mkdir()
    args = ["--name", "s3sweep", "--storage-path", storage, "--num-cpus", "2"]
    with driver(["--space", str(space), *args], ray_tmp, first) as d:
        finished_before, running = d.wait_until(lambda: finished_and_running(d), "a trial done, one running")
        d.signal_group(signal.SIGKILL)
        assert d.wait() == -signal.SIGKILL
    # Another working directory: no local copy; the saved space comes from the bucket.
    with driver([*args, "--resume"], ray_tmp, second) as resumed:
        assert resumed.wait() == 0, resumed.output[-6000:]
    assert f"resuming sweep 's3sweep' from {storage}/s3sweep" in resumed.output
    assert f"results copied to {storage}/s3sweep" in resumed.output
    keys = s3_server.keys("sweeps/s3sweep/")
    for name in ("results.csv", "summary.md", "sweep_meta.json", "trial_status.jsonl", "best/config.yaml"):
        assert f"sweeps/s3sweep/{name}" in keys
    body = Path(second / "sweep_results" / "s3sweep" / "results.csv").read_text()
    df = pd.read_csv(io.StringIO(body))
    assert len(df) == 3 and set(df["status"]) == {"completed"}
    # Finished trials are not rerun: at most one whose completion Ray had not saved reports its final evaluation
    # again from its final checkpoint (as with local storage, tests/test_resume.py).
    budget = int(df["tokens_seen"].max())
    assert all(tokens == budget for t, tokens in resumed.reports() if t in finished_before)
    assert df["best_checkpoint"].str.startswith(f"{storage}/s3sweep/").all()

    inspect = subprocess.run(
        [sys.executable, str(REPO / "sweeps" / "inspect_sweep.py"), f"{storage}/s3sweep"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert inspect.returncode == 0 and "completed" in inspect.stdout, inspect.stderr
    cont = subprocess.run(
        [
            sys.executable,
            str(REPO / "sweeps" / "continue_best.py"),
            f"{storage}/s3sweep",
            "--train.max_tokens",
            str(int(df["tokens_seen"].max()) * 2),
            "--train.progress",
            "off",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cont.returncode == 0, cont.stderr[-3000:]
    assert "downloaded to" in cont.stdout


def test_file_uri_sweep_writes_into_the_directory(small_corpus, tmp_path, ray_tmp):
    space = make_space(tmp_path, small_corpus, num_samples=2)
    store = tmp_path / "store"
    args = ["--space", str(space), "--name", "fileuri", "--storage-path", f"file://{store}", "--num-cpus", "2"]
    with driver(args, ray_tmp, tmp_path) as d:
        assert d.wait() == 0, d.output[-3000:]
    df = pd.read_csv(store / "fileuri" / "results.csv")
    assert len(df) == 2 and set(df["status"]) == {"completed"}
    assert not (tmp_path / "sweep_results").exists()  # no stray local copy for a local URI
