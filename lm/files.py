"""Files the project writes: replaced whole or not at all, into directories checked before work starts."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from lm.cli import InputError


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Replace `path` with `data` (str: UTF-8) in one step: written to a temporary file in the same directory,
    then `os.replace`d, so a reader or a crash never sees half a file. The file is readable by all (0o644)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(tmp, 0o644)  # mkstemp creates files readable by the owner only
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_output_dir(path: str | Path, field: str) -> Path:
    """Check, without creating anything, that `path` is or can be created as a directory this process may write.

    Raises InputError "PATH: FIELD: expected a directory that can be created and written (WHY)" when `path`
    or one of its existing ancestors is not a directory, or the directory (or, when it does not exist yet,
    its nearest existing ancestor) is not writable. Returns `path` as a Path.
    """
    path = Path(path).expanduser()
    probe = path.absolute()
    while not probe.exists() and probe != probe.parent:
        if probe.is_symlink():  # a dangling link: mkdir would fail on it
            break
        probe = probe.parent
    why = None
    if not probe.is_dir():
        why = f"{probe} is not a directory" if probe.exists() or probe.is_symlink() else f"{probe} does not exist"
    elif not os.access(probe, os.W_OK | os.X_OK):
        why = f"{probe} is not writable"
    if why is not None:
        raise InputError(f"{path}: {field}: expected a directory that can be created and written ({why})")
    return path
