"""The one command-line style of every entry point (lm-train, lm-generate, lm-prepare, lm-sweep, ...).

Each entry point builds an `ArgumentParser` and hands it with its command to `run`:

    def main(argv=None) -> int:
        return cli.run(command, build_parser(), argv)

`run` is the one error contract: bad input (any `InputError`: a config, data file, checkpoint, search space
or option the user got wrong, argparse's usage errors included) prints one line `error: ...` on stderr and
returns 2, with the traceback only under `--debug`; otherwise the command's own exit code. The project's
input errors (ConfigError, DataError, CheckpointError, SpaceError, ...) subclass `InputError`, so a new
one is caught without touching any CLI.

This module imports only the standard library at the top, so that every module can import `InputError`.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
"""The shipped training configs (package data): `--config tiny.yaml` finds them from any directory."""


class InputError(ValueError):
    """Bad input from the user: a file, a field or an option. Its message is one line naming what is wrong.

    `run` turns it into `error: MESSAGE` and exit code 2.
    """


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's conventions.

    * A usage error raises `InputError` ("command line: ...") instead of printing the usage and exiting,
      so `run` reports it like any other bad input: one line, exit 2.
    * `--debug` (show tracebacks) is always there; option names are never abbreviated.
    * With `overrides=True`, arguments the parser does not define must be dotted config overrides
      (`--optimizer.lr 3e-4`, `--model.d_model=256`); they land in `args.overrides` as a
      {"optimizer.lr": "3e-4"} mapping for `Config.replace`.
    * `prog` is the installed script's name (`lm-train`) when run as one, else the given default
      (`python -m lm.train`).
    """

    def __init__(self, *args: Any, overrides: bool = False, **kwargs: Any) -> None:
        invoked = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
        if invoked.startswith("lm-"):
            kwargs["prog"] = invoked
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.overrides = overrides

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> tuple[Any, list[str]]:
        if "--debug" not in self._option_string_actions:  # added last: it ends the usage line and the options
            self.add_argument("--debug", action="store_true", help="show the traceback of an error")
        return super().parse_known_args(args, namespace)

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> argparse.Namespace:
        if not self.overrides:
            return super().parse_args(args, namespace)
        parsed, rest = self.parse_known_args(args, namespace)
        from lm.config import parse_override_args  # here: lm.config imports InputError from this module (via lm.fields)

        parsed.overrides = parse_override_args(rest)
        return parsed

    def error(self, message: str) -> NoReturn:
        # argparse says "argument --config: expected one argument"; the override parser says "--x needs a value".
        message = re.sub(r"^argument (\S+): expected one argument$", r"\1 needs a value", message)
        raise InputError(f"command line: {message} (see --help)")


def run(command: Callable[[argparse.Namespace], int], parser: ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse `argv` (default: sys.argv[1:]) with `parser` and return `command(args)`, the exit code.

    An `InputError` from parsing or from the command prints one line `error: MESSAGE` on stderr and
    returns 2 (raised instead, with its traceback, when `--debug` is given). `--help` prints and returns 0.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help (usage errors raise InputError instead)
            return e.code if isinstance(e.code, int) else 0
        return command(args)
    except InputError as e:
        if debug:
            raise
        print(f"error: {' '.join(str(e).splitlines())}", file=sys.stderr)
        return 2


def find_config(name: str | Path, *dirs: str | Path) -> Path:
    """The config file `name` names: a path (relative to the working directory, then to each of `dirs`),
    else a shipped config (`tiny.yaml` or `configs/tiny.yaml` -> lm/configs/tiny.yaml).

    Returns `name` unchanged when nothing matches, so that the loader's error names what the user wrote.
    """
    path = Path(name).expanduser()
    if path.is_absolute():
        return path
    candidates = [Path.cwd() / path, *(Path(d) / path for d in dirs)]
    if path.parent in (Path("."), Path("configs")):
        candidates.append(CONFIG_DIR / path.name)
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    return path
