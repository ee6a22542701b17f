"""Sweeps in remote storage, against a real S3-compatible server on localhost (moto's server mode, reached through
AWS_ENDPOINT_URL): the Storage layer, load_sweep/inspect/continue_best from an s3:// URI, credentials never
shown, one-line errors. The recorded experiment (real lm.train runs in Ray's plain file layout) is uploaded as a
sweep would leave it; tests/test_storage_sweeps.py runs real sweeps there."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.fs
import pytest
from support.recorded import record_experiment

from sweeps.storage import Storage, join, scrub
from sweeps.sweep import NotASweepError, load_sweep

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, small_corpus):
    return record_experiment(tmp_path_factory.mktemp("recorded") / "exp", small_corpus)


@pytest.fixture(scope="module")
def uploaded(recorded, s3_server):
    """The recorded experiment copied to s3://BUCKET/sweeps/recorded."""
    fs, root = pyarrow.fs.FileSystem.from_uri(s3_server.uri("sweeps"))
    pyarrow.fs.copy_files(str(recorded), f"{root}/recorded", destination_filesystem=fs)
    return s3_server.uri("sweeps", "recorded")


def cli(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "sweeps" / script), *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_scrub_leaves_credentials_out_of_a_uri():
    assert scrub("s3://AKIA123:s3cr3t@b/p?endpoint_override=h:9000") == "s3://b/p?endpoint_override=h%3A9000"
    assert scrub("gs://b/p?access_key=AKIA123&secret_key=s3cr3t&session_token=tok") == "gs://b/p"
    assert scrub("/local/path?x") == "/local/path?x" and scrub("s3://b/p") == "s3://b/p"


def test_join_keeps_the_query_last():
    assert join("s3://b/p?endpoint_override=h", "name") == "s3://b/p/name?endpoint_override=h"
    assert join("/a/b/", "name") == "/a/b/name"


def test_storage_reads_writes_and_lists_in_the_bucket(s3_server):
    storage = Storage.at(s3_server.uri("unit"))
    storage.write("hello", "dir", "file.txt")
    assert storage.read_text("dir", "file.txt") == "hello"
    assert storage.read_text("dir", "missing.txt") is None
    assert storage.subdirs() == ["dir"] and storage.is_file("dir", "file.txt") and storage.is_dir("dir")
    assert storage.show("dir") == s3_server.uri("unit", "dir")
    assert "unit/dir/file.txt" in s3_server.keys("unit/")


def test_a_sweep_in_the_bucket_reads_as_the_same_sweep_on_disk(recorded, uploaded):
    local, remote = load_sweep(recorded), load_sweep(uploaded)
    same = [c for c in local.dataframe.columns if c not in ("best_checkpoint", "trial_path")]
    assert remote.dataframe[same].equals(local.dataframe[same])
    assert remote.history.equals(local.history)
    assert remote.best_trial_id == local.best_trial_id
    assert remote.best_checkpoint == uploaded + str(local.best_checkpoint)[len(str(recorded)) :]
    assert remote.dataframe["trial_path"].str.startswith(uploaded + "/").all()


def test_the_best_checkpoint_is_downloaded_whole_once(recorded, uploaded, tmp_path):
    remote = load_sweep(uploaded)
    copy = remote.local_best_checkpoint(tmp_path / "cache")
    assert copy.read_bytes() == Path(load_sweep(recorded).best_checkpoint).read_bytes()
    assert remote.best_config == load_sweep(recorded).best_config
    mtime = copy.stat().st_mtime_ns
    assert remote.local_best_checkpoint(tmp_path / "cache").stat().st_mtime_ns == mtime  # not downloaded again


def test_inspect_a_sweep_in_the_bucket_rebuilds_its_results_there(uploaded, s3_server, tmp_path):
    proc = cli("inspect_sweep.py", uploaded, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "best: t1 val_loss" in proc.stdout and f"in {uploaded} (local copy: " in proc.stdout
    keys = s3_server.keys("sweeps/recorded/")
    for name in ("results.csv", "results.parquet", "history.parquet", "summary.md", "best/config.yaml"):
        assert f"sweeps/recorded/{name}" in keys
    assert (tmp_path / "sweep_results" / "recorded" / "summary.md").is_file()


def test_continue_best_from_the_bucket_trains_on_from_the_downloaded_checkpoint(uploaded, tmp_path):
    proc = cli(
        "continue_best.py", uploaded, "--train.max_tokens", str(8 * 32 * 50), "--train.progress", "off", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"from {uploaded}/" in proc.stdout and "(downloaded to " in proc.stdout
    log = (tmp_path / "sweep_results" / "recorded" / "best" / "continued" / "train.log").read_text()
    assert "resumed at step 40" in log


def test_credentials_in_the_uri_are_never_printed(uploaded, tmp_path):
    with_keys = uploaded.replace("s3://", "s3://testing:testing-secret@")
    proc = cli("inspect_sweep.py", with_keys, "--no-write", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "testing-secret" not in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "uri_part, fragment",
    [("missing-bucket/x", "not a sweep directory"), ("BUCKET/no-such-sweep", "not a sweep directory")],
)
def test_a_uri_without_a_sweep_is_one_line(s3_server, tmp_path, uri_part, fragment):
    uri = "s3://" + uri_part.replace("BUCKET", s3_server.bucket)
    with pytest.raises(NotASweepError, match=fragment):
        load_sweep(uri)
    proc = cli("inspect_sweep.py", uri, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error:")


def test_an_unreachable_endpoint_is_one_line(uploaded, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    proc = cli("inspect_sweep.py", uploaded, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert (
        proc.stderr.startswith(f"error: {uploaded}: cannot open this sweep's storage")
        and "Traceback" not in proc.stderr
    )


def test_a_file_uri_reads_as_the_local_directory(recorded):
    assert load_sweep(f"file://{recorded}").dataframe.equals(load_sweep(recorded).dataframe)


def test_meta_of_a_recorded_sweep_is_plain_json(uploaded):
    assert json.loads(Storage.at(uploaded).read_text("sweep_meta.json"))["name"] == "recorded"
