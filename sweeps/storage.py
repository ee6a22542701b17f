"""An experiment directory wherever it lives: a local directory or a pyarrow filesystem URI (s3://, gs://, ...).

Reading results (sweeps.sweep.load_sweep, inspect, continue_best) and the driver's own files go through one
`Storage`, so the same code reads a sweep on this disk or in a bucket. S3-compatible servers are reached the way
pyarrow and the AWS tools are: `AWS_ENDPOINT_URL` (or `AWS_ENDPOINT_URL_S3`) in the environment, or
`?endpoint_override=host:port&scheme=http` in the URI; credentials from the environment or the usual AWS files.
Credentials given in a URI (`s3://KEY:SECRET@bucket/...`) are never printed or written into results: `scrub`
removes them from any URI shown or stored.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import time
import urllib.parse
from collections.abc import Iterable
from pathlib import Path

import pyarrow.fs

from lm.cli import InputError
from lm.files import write_atomic

SECRET_PARAMS = ("access_key", "secret_key", "session_token")
RESULT_NAMES = (
    "results.csv",
    "results.parquet",
    "history.parquet",
    "plots",
    "summary.md",
    "best",
    "compute.json",
    "lineage.csv",
)
"""What `sweeps.results.write_results` writes, by name (copied to remote storage after a rebuild)."""


def is_uri(location: str | Path) -> bool:
    """A remote URI (s3://...), as opposed to a local path or a file:// URI."""
    text = str(location)
    return "://" in text and not text.startswith(("file://", "local://"))


def scrub(location: str | Path) -> str:
    """`location` without the credentials a URI may carry: `s3://KEY:SECRET@bucket/p` -> `s3://bucket/p`, and
    access_key/secret_key/session_token query parameters left out."""
    text = str(location)
    if not is_uri(text):
        return text
    parts = urllib.parse.urlsplit(text)
    netloc = parts.netloc.rpartition("@")[2]
    query = [(k, v) for k, v in urllib.parse.parse_qsl(parts.query) if k not in SECRET_PARAMS]
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=urllib.parse.urlencode(query)))


def join(location: str, name: str) -> str:
    """`location`/`name`, keeping a URI's query last (s3://b/p?endpoint_override=h -> s3://b/p/NAME?endpoint_...)."""
    base, sep, query = str(location).partition("?") if is_uri(location) else (str(location), "", "")
    return f"{base.rstrip('/')}/{name}{sep}{query}"


class Storage:
    """A directory on a pyarrow filesystem: `Storage.at(location)` for a local path or any pyarrow URI."""

    def __init__(self, fs: pyarrow.fs.FileSystem, root: str, shown: str):
        self.fs, self.root, self.shown = fs, root.rstrip("/"), shown.rstrip("/")

    @classmethod
    def at(cls, location: str | Path) -> Storage:
        """Open `location`; a local path is made absolute. Raises OSError/ValueError from pyarrow for a URI it
        cannot open (unknown scheme, missing credentials provider)."""
        text = str(location)
        if is_uri(text):
            base, _, query = text.partition("?")
            fs, root = pyarrow.fs.FileSystem.from_uri(text)
            return cls(fs, root, scrub(base + ("?" + query if query else "")).partition("?")[0])
        if text.startswith(("file://", "local://")):
            text = urllib.parse.unquote(urllib.parse.urlsplit(text).path)
        path = str(Path(text).expanduser().resolve())
        return cls(pyarrow.fs.LocalFileSystem(), path, path)

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pyarrow.fs.LocalFileSystem)

    @property
    def local_path(self) -> Path | None:
        """The directory on this machine, or None for a remote URI."""
        return Path(self.root) if self.is_local else None

    @property
    def name(self) -> str:
        return posixpath.basename(self.root)

    def path(self, *parts: str) -> str:
        """The filesystem path of `parts` under the root."""
        return posixpath.join(self.root, *parts)

    def show(self, *parts: str) -> str:
        """`parts` as the user knows it: a local path or a URI without credentials."""
        return posixpath.join(self.shown, *parts) if parts else self.shown

    def child(self, *parts: str) -> Storage:  # (credentials stay with the filesystem object)
        return Storage(self.fs, self.path(*parts), self.show(*parts))

    def is_file(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type == pyarrow.fs.FileType.File

    def is_dir(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type == pyarrow.fs.FileType.Directory

    def subdirs(self, *parts: str) -> list[str]:
        """Names of the directories directly under `parts` ([] when it does not exist)."""
        selector = pyarrow.fs.FileSelector(self.path(*parts), allow_not_found=True)
        infos = self.fs.get_file_info(selector)
        return sorted(posixpath.basename(i.path.rstrip("/")) for i in infos if i.type == pyarrow.fs.FileType.Directory)

    def read_bytes(self, *parts: str) -> bytes | None:
        """The file's bytes, or None when it does not exist."""
        try:
            with self.fs.open_input_stream(self.path(*parts)) as stream:
                return stream.read()
        except FileNotFoundError:
            return None
        except OSError as e:  # some filesystems say "not found" with a plain OSError
            if "not found" in str(e).lower() or "no such file" in str(e).lower():
                return None
            raise

    def read_text(self, *parts: str) -> str | None:
        data = self.read_bytes(*parts)
        return None if data is None else data.decode("utf-8", errors="replace")

    def write(self, data: bytes | str, *parts: str) -> None:
        """Write a whole file (locally atomically; an object store's put is atomic by itself)."""
        if self.is_local:
            write_atomic(self.path(*parts), data)
            return
        with self.fs.open_output_stream(self.path(*parts)) as out:
            out.write(data.encode() if isinstance(data, str) else data)

    def upload(self, local_dir: Path, names: Iterable[str]) -> list[str]:
        """Copy the files and directories `names` of `local_dir` to the same names here (nothing to do when this
        is that directory). Returns the names copied."""
        copied = []
        for name in names:
            src = Path(local_dir) / name
            if not src.exists() or (self.is_local and Path(self.path(name)) == src.resolve()):
                continue
            if src.is_dir():
                pyarrow.fs.copy_files(
                    str(src),
                    self.path(name),
                    source_filesystem=pyarrow.fs.LocalFileSystem(),
                    destination_filesystem=self.fs,
                )
            else:
                self.write(src.read_bytes(), name)
            copied.append(name)
        return copied

    def download(self, rel_dir: str, dest: Path) -> Path:
        """Copy the directory `rel_dir` to the local directory `dest` (replaced); returns `dest`."""
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        pyarrow.fs.copy_files(
            self.path(rel_dir),
            str(dest),
            source_filesystem=self.fs,
            destination_filesystem=pyarrow.fs.LocalFileSystem(),
        )
        return dest


# ---------------------------------------------------------------------------------------------------
# Can a new sweep write there? A probe object, and pyarrow's errors in one line each
# ---------------------------------------------------------------------------------------------------


class StorageError(InputError):
    """A storage URI a sweep cannot write into: one line `URI: REASON`, without the credentials."""

    def __init__(self, shown: str, reason: str):
        super().__init__(f"{shown}: {reason}")
        self.shown, self.reason = shown, reason


PROBE_NAME = ".lm-sweeps-write-test"
"""The probe object's name (with the process id and a time), written and deleted under the storage root."""

# pyarrow's S3 and GCS errors carry the service's error code or message ("AWS Error NO_SUCH_BUCKET during ...").
_MISSING_BUCKET = ("NO_SUCH_BUCKET", "NoSuchBucket", "specified bucket does not exist")
_REJECTED = (
    "INVALID_ACCESS_KEY_ID",
    "InvalidAccessKeyId",
    "SIGNATURE_DOES_NOT_MATCH",
    "SignatureDoesNotMatch",
    "EXPIRED_TOKEN",
    "ExpiredToken",
    "InvalidToken",
    "UNAUTHENTICATED",
)
_DENIED = ("ACCESS_DENIED", "AccessDenied", "PERMISSION_DENIED", "HTTP status 403")
_UNREACHABLE = ("NETWORK_CONNECTION", "Could not connect", "Could not resolve host", "UNAVAILABLE")
_AWS_CREDENTIAL_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_PROFILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)


def check_writable_uri(location: str) -> None:
    """Write a small probe object under the storage URI `location` (s3://bucket/prefix, ...) and delete it again,
    through pyarrow as Ray writes. Returns when both worked; otherwise raises StorageError, one line naming the
    cause: a bucket that does not exist, credentials the storage rejected, no credentials found, writing denied,
    an endpoint that cannot be reached (else pyarrow's first line). Credentials never appear in the message."""
    try:
        storage = Storage.at(location)
        probe = storage.path(f"{PROBE_NAME}-{os.getpid()}-{time.time_ns()}")
        with storage.fs.open_output_stream(probe) as out:
            out.write(b"lm-sweeps: can a sweep write here?\n")
        storage.fs.delete_file(probe)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError, its service errors OSErrors
        raise StorageError(scrub(location), storage_problem(location, e)) from None


def storage_problem(location: str, error: BaseException) -> str:
    """What `error` (pyarrow's, from opening or writing the storage URI `location`) means, in a few words and
    one line, with any credential of `location` hidden."""
    text = _hide_secrets(" ".join(str(error).split()) or type(error).__name__, location)
    bucket = urllib.parse.urlsplit(location).netloc.rpartition("@")[2]
    if any(mark in text for mark in _MISSING_BUCKET) or f"Bucket '{bucket}' not found" in text:
        return f"the bucket '{bucket}' does not exist (create it first, or check its name and the endpoint)"
    if any(mark in text for mark in _UNREACHABLE):
        return f"cannot reach the storage ({text})"
    if location.startswith("s3://") and not aws_credentials_visible(location):
        # pyarrow then sends unsigned requests: S3 answers 403, some servers other errors.
        return (
            "no credentials found (in the URI, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE or ~/.aws) "
            "and the storage refused a request without them"
        )
    if any(mark in text for mark in _REJECTED):
        return "the storage rejected the credentials (an unknown access key, a wrong secret or an expired token)"
    if any(mark in text for mark in _DENIED):
        return "not writable with these credentials (access denied writing a test object)"
    return f"cannot write a test object there ({text})"


def aws_credentials_visible(location: str) -> bool:
    """Whether credentials for an s3:// URI are given anywhere this process can see: in the URI, the environment,
    or the AWS configuration files (a cloud machine's instance role cannot be seen without asking its metadata
    server, and does not count)."""
    parts = urllib.parse.urlsplit(location)
    query = dict(urllib.parse.parse_qsl(parts.query))
    if "@" in parts.netloc or query.get("access_key") or any(os.environ.get(name) for name in _AWS_CREDENTIAL_ENV):
        return True
    files = [
        os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or Path.home() / ".aws" / "credentials",
        os.environ.get("AWS_CONFIG_FILE") or Path.home() / ".aws" / "config",
    ]
    return any(Path(f).is_file() for f in files)


def _hide_secrets(text: str, location: str) -> str:
    """`text` with every credential `location` carries (user info, secret query parameters) replaced by ***."""
    parts = urllib.parse.urlsplit(location)
    userinfo = parts.netloc.rpartition("@")[0]
    secrets = [form for s in userinfo.split(":") if s for form in (s, urllib.parse.unquote(s))] if userinfo else []
    secrets += [v for k, v in urllib.parse.parse_qsl(parts.query) if k in SECRET_PARAMS and v]
    text = text.replace(location, scrub(location))
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


# ---------------------------------------------------------------------------------------------------
# The driver's local copy of a sweep in remote storage
# ---------------------------------------------------------------------------------------------------


def mirror(local_dir: Path, remote: Storage, names: Iterable[str] | None = None) -> list[str]:
    """Copy the driver's local files of a sweep in remote storage (`names`, default all but the driver's lock) to
    the experiment directory there; nothing for a local sweep. Returns the names copied."""
    from sweeps.layout import LOCK_FILE

    if remote.is_local or not Path(local_dir).is_dir():
        return []
    names = [p.name for p in Path(local_dir).iterdir() if p.name != LOCK_FILE] if names is None else list(names)
    return remote.upload(Path(local_dir), names)


def mirror_callback(local_dir: Path, remote: Storage, names: tuple[str, ...]) -> object:
    """A Ray Tune callback copying `names` (the driver's trial_status.jsonl) to remote storage at every change of
    a trial's state, after the callback that writes them; a failed copy is retried at the next change."""
    from ray import tune

    class MirrorDriverFiles(tune.Callback):
        def _copy(self) -> None:
            try:
                mirror(local_dir, remote, names)
            except OSError as e:  # the storage is unreachable for a moment: the sweep goes on
                print(f"warning: could not copy {', '.join(names)} to {remote.show()}: {e}", flush=True)

        def on_trial_start(self, iteration, trials, trial, **info):
            self._copy()

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._copy()

        def on_trial_error(self, iteration, trials, trial, **info):
            self._copy()

    return MirrorDriverFiles()


def fetch(remote: Storage, local_dir: Path, names: Iterable[str]) -> list[str]:
    """Copy the files `names` of a sweep in remote storage into the driver's local directory (to --resume it on a
    machine without the local copy); returns the names found."""
    found = []
    for name in names:
        data = remote.read_bytes(name)
        if data is not None:
            Path(local_dir).mkdir(parents=True, exist_ok=True)
            write_atomic(Path(local_dir) / name, data)
            found.append(name)
    return found
