"""A new sweep to storage it cannot write: one line `error: ...`, exit 2, before Ray starts (issue 18, bad input).

The S3 cases run against the real moto server of tests/support/s3.py: a bucket that does not exist; and, with
moto's IAM authentication switched on over its HTTP API (`POST /moto-api/reset-auth`, the server's own switch),
credentials it does not know, a user allowed only to read, and no credentials at all. Also a file:// URI to a
directory that cannot be created and an unknown scheme, which need no server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.experiment import make_space

from sweeps import run_sweep
from sweeps.run_sweep import SweepInputError
from sweeps.storage import PROBE_NAME, check_writable_uri

REPO = Path(__file__).resolve().parents[1]
CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


@pytest.fixture
def space(tmp_path, small_corpus) -> Path:
    return make_space(tmp_path, small_corpus, num_samples=2)


def run_cli(space: Path, storage: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python sweeps/run_sweep.py` for a new sweep named 'probe' into `storage`, as a user runs it."""
    return subprocess.run(
        [sys.executable, str(REPO / "sweeps" / "run_sweep.py"), "--space", str(space), "--name", "probe",
         "--storage-path", storage, "--num-cpus", "2"],
        cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Assert exit 2, exactly one line on stderr `error: ...` holding every fragment, nothing on stdout (no Ray)."""
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and proc.stdout == "", proc.stdout[-3000:]
    for fragment in fragments:
        assert fragment in proc.stderr, (fragment, proc.stderr)
    return proc.stderr.strip()


@pytest.fixture
def moto_auth(s3_server) -> Iterator[dict[str, str]]:
    """moto's IAM authentication on (every request must be signed by a key its IAM knows) for one test; yields
    the environment of a user allowed only to read the bucket. Switched off again afterwards, whatever happens."""
    import boto3

    iam = boto3.client("iam", endpoint_url=s3_server.endpoint)
    user = f"reader-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    read_only = {"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"], "Resource": "*"}
    iam.put_user_policy(
        UserName=user,
        PolicyName="read-only",
        PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [read_only]}),
    )
    key = iam.create_access_key(UserName=user)["AccessKey"]

    def no_auth_actions(count: str) -> None:
        request = urllib.request.Request(
            f"{s3_server.endpoint}/moto-api/reset-auth", data=count.encode(), method="POST",
            headers={"Content-Type": "text/plain"},
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=30) as answer:
            assert answer.status == 200

    no_auth_actions("0")
    try:
        yield {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
    finally:
        no_auth_actions("inf")


def test_a_missing_bucket_is_one_line(space, tmp_path, s3_server):
    err = one_line_error(
        run_cli(space, "s3://no-such-bucket-lm/sweeps", tmp_path),
        "error: s3://no-such-bucket-lm/sweeps: --storage-path: the bucket 'no-such-bucket-lm' does not exist",
    )
    assert "create it first" in err
    assert not (tmp_path / "sweep_results").exists()  # nothing written anywhere


def test_credentials_in_the_uri_are_not_shown_in_the_error(space, tmp_path, s3_server):
    err = one_line_error(run_cli(space, "s3://AKIAEXAMPLE:s3cr3t-key@no-such-bucket-lm/sweeps", tmp_path))
    assert "s3://no-such-bucket-lm/sweeps: --storage-path: the bucket" in err
    assert "s3cr3t-key" not in err and "AKIAEXAMPLE" not in err


def test_credentials_the_server_does_not_know_are_one_line(space, tmp_path, s3_server, moto_auth):
    # The session's dummy credentials (tests/support/s3.py) are in no IAM user of the server.
    one_line_error(
        run_cli(space, s3_server.uri("denied"), tmp_path),
        f"error: {s3_server.uri('denied')}: --storage-path: the storage rejected the credentials",
    )


def test_a_bucket_the_credentials_may_only_read_is_one_line(space, tmp_path, s3_server, moto_auth):
    one_line_error(
        run_cli(space, s3_server.uri("readonly"), tmp_path, env=moto_auth),
        f"error: {s3_server.uri('readonly')}: --storage-path: not writable with these credentials",
    )


def test_no_credentials_at_all_is_one_line(space, tmp_path, s3_server, moto_auth):
    # No key anywhere: pyarrow sends unsigned requests. (AWS answers those 403; moto, its IAM on, fails them with
    # a 500, and pyarrow retries for a few seconds: the message comes from finding no credentials.)
    env = {k: v for k, v in os.environ.items() if k not in CREDENTIAL_ENV}
    env.update(HOME=str(tmp_path / "home"), AWS_EC2_METADATA_DISABLED="true")  # no ~/.aws; no metadata server
    proc = subprocess.run(
        [sys.executable, str(REPO / "sweeps" / "run_sweep.py"), "--space", str(space), "--storage-path",
         s3_server.uri("anonymous"), "--num-cpus", "2"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    one_line_error(proc, f"error: {s3_server.uri('anonymous')}: --storage-path: no credentials found")


def test_a_file_uri_that_cannot_be_created_is_one_line(space, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the storage directory should be")
    one_line_error(
        run_cli(space, f"file://{blocker}/store", tmp_path),
        f"error: {blocker}/store: --storage-path is not writable",
    )


def test_an_unknown_scheme_is_one_line(space, tmp_path):
    one_line_error(
        run_cli(space, "foo://x", tmp_path),
        "error: foo://x: --storage-path: expected a local directory or a URI pyarrow opens",
        "got the scheme 'foo'",
    )


def test_the_python_api_raises_what_the_cli_prints(space, tmp_path, s3_server):
    printed = one_line_error(run_cli(space, "s3://no-such-bucket-lm/sweeps", tmp_path))
    with pytest.raises(SweepInputError) as raised:
        run_sweep(space, name="probe", storage_path="s3://no-such-bucket-lm/sweeps", num_cpus=2)
    assert f"error: {raised.value}" == printed
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


def test_a_writable_bucket_passes_and_keeps_no_probe(s3_server):
    check_writable_uri(s3_server.uri("probed", "sweeps"))
    assert not [key for key in s3_server.keys("probed/") if PROBE_NAME in key]
