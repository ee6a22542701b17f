"""What a sweep's experiment directory (STORAGE/NAME) holds: every file name, defined once.

sweep_space.yaml     the search space as run (after --set); --resume reads it back
sweep_meta.json      name, metric, mode, swept parameters, budget, base config, entropy floor, command
.driver.lock         held by the running driver (sweeps/lock.py): a second driver of the sweep is refused
trial_status.jsonl   each trial's id, number and state, as the driver saw them (plain JSON, sweeps/trial_status.py)
optuna.db            the Optuna study of an optuna sweep (SQLite; unless search.storage names another, sweeps/study.py)
experiment_state-*   Ray Tune's own state (what --resume restores; cloudpickled: only --resume reads it)
<trial>/            Ray's plain per-trial files: params.json, result.json (every report), error.txt
<trial>/run/         each trial's train.log, metrics.jsonl, metrics.csv (written by lm.train)
<trial>/checkpoint_*/state.pt   Ray's checkpoints of the trial's training state
results.csv, results.parquet, history.parquet, plots/, summary.md, best/   written when the sweep ends

The sweep's NAME is one path component under the storage path: `valid_name` is the one rule for it (`--name`,
the space file's `name:`, at start and at resume), so that no name escapes the storage path or cannot be
resumed.
"""

from __future__ import annotations

import re

SPEC_FILE = "sweep_space.yaml"
STATUS_FILE = "trial_status.jsonl"  # the driver's own record of each trial's state (sweeps/trial_status.py)
META_FILE = "sweep_meta.json"
STATE_FILE = "state.pt"  # the training state inside each Ray checkpoint directory
STUDY_DB = "optuna.db"  # the sweep's Optuna study (sweeps/study.py)
LOCK_FILE = ".driver.lock"  # held by the running driver (sweeps/lock.py)
TRIAL_RUN_DIR = "run"  # the loop's logs inside a trial directory
RESULTS_CSV = "results.csv"
RESULTS_PARQUET = "results.parquet"
HISTORY_PARQUET = "history.parquet"
SUMMARY_FILE = "summary.md"
PLOTS_DIR = "plots"
BEST_DIR = "best"
DEFAULT_STORAGE = "sweep_results"

NAME_MAX = 100
"""Longest sweep name: far below a file name's 255 bytes, with room for a `-N` suffix."""
NAME_RULE = (
    f"a name of letters, digits, '-', '_' or '.' (no '..'), starting with a letter or digit, at most {NAME_MAX} "
    "characters"
)
"""What a valid sweep name is, in words (for error messages)."""
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def valid_name(name: object) -> bool:
    """Whether `name` can be a sweep's directory name: one path component (no '/', no '..', not absolute),
    safe unquoted in a shell and in Ray's paths (no space), no leading '-' (it would read as an option)."""
    return isinstance(name, str) and len(name) <= NAME_MAX and _NAME.fullmatch(name) is not None and ".." not in name


def numbered_name(name: str, n: int) -> str:
    """`name-n`, the name of the n-th sweep of the same space: shortened so that it stays a valid name."""
    suffix = f"-{n}"
    return name[: NAME_MAX - len(suffix)] + suffix
