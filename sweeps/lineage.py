"""PBT/PB2 lineage: which trial continued from whose checkpoint, when, and with what changed.

Every checkpoint a trial reports carries an owner record (OWNER_FILE: the trial's id, its swept values, the tokens
and step of the state). A trial (re)started from a checkpoint that another trial owns has exploited it: the
trainable appends an `Exploit` event, one JSON line, to LINEAGE_FILE in its run directory (beside train.log), and
hands a one-line note to the driver with its first report (LINEAGE_NOTE), which the console prints. A restart
from the trial's own checkpoint (a failure, a resume, a paused HyperBand trial) is no event.

`read_lineage` gathers the events of a local sweep into a DataFrame from these plain files (nothing of Ray's):
one row per exploit, in time order: trial, from_trial, at_tokens, at_step, changes ("path: old -> new; ...",
old being the donor's value the checkpoint was trained with), params (the trial's swept values from then on, as
JSON) and time.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from lm.record import Key
from sweeps.layout import TRIAL_RUN_DIR

OWNER_FILE = "owner.json"
"""In each reported checkpoint directory: the trial that wrote it (see `Owner`)."""
LINEAGE_FILE = "lineage.jsonl"
"""In a trial's run directory: its exploit events, one JSON object a line, appended."""
LINEAGE_NOTE = "lineage_note"
"""Result key: on the first report after an exploit, the event as one line for the console."""
LINEAGE_CSV = "lineage.csv"
"""In the experiment directory (written with the results when a sweep has exploit events)."""
COLUMNS = ["trial", "from_trial", "at_tokens", "at_step", "changes", "params", "time"]


@dataclass
class Owner:
    """Who wrote a checkpoint: the trial's id and swept values, and where in training the state is."""

    trial_id: str
    params: dict[str, Any]
    tokens_seen: int
    step: int

    def write(self, checkpoint_dir: Path) -> None:
        (checkpoint_dir / OWNER_FILE).write_text(json.dumps(asdict(self), default=_plain))

    @staticmethod
    def parse(text: str) -> Owner | None:
        """The record in `text`, or None when it is not one (a checkpoint from before lineage, a damaged file)."""
        try:
            data = json.loads(text)
            return Owner(str(data["trial_id"]), dict(data["params"]), int(data[Key.tokens_seen]), int(data["step"]))
        except (ValueError, KeyError, TypeError):
            return None


@dataclass
class Exploit:
    """Trial `trial` continued from `from_trial`'s checkpoint at `at_tokens`/`at_step`; `changes` maps each swept
    parameter whose value differs to [the donor's value, the trial's new value]; `params` are all of the trial's
    swept values from then on."""

    trial: str
    from_trial: str
    at_tokens: int
    at_step: int
    changes: dict[str, list[Any]]
    params: dict[str, Any] = field(default_factory=dict)
    time: str = field(default_factory=lambda: time.strftime("%Y-%m-%d %H:%M:%S"))

    @staticmethod
    def of(trial_id: str, params: dict[str, Any], owner: Owner) -> Exploit | None:
        """The event of `trial_id` (now with `params`) restarting from a checkpoint `owner` wrote; None when the
        checkpoint is the trial's own."""
        if owner.trial_id == trial_id:
            return None
        keys = list(dict.fromkeys([*owner.params, *params]))
        changes = {k: [owner.params.get(k), params.get(k)] for k in keys if owner.params.get(k) != params.get(k)}
        return Exploit(trial_id, owner.trial_id, owner.tokens_seen, owner.step, changes, dict(params))

    def line(self) -> str:
        """The console's line (after the trial id)."""
        return f"continues from {self.from_trial}'s checkpoint at {self.at_tokens:,} tokens: {format_changes(self)}"

    def append_to(self, run_dir: Path) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / LINEAGE_FILE, "a") as f:
            f.write(json.dumps(asdict(self), default=_plain) + "\n")


def _plain(value: Any) -> Any:
    """JSON for what Ray's samplers return besides Python numbers: numpy scalars (tune.randint's int64)."""
    return value.item() if hasattr(value, "item") else str(value)


def format_changes(event: Exploit) -> str:
    """'optimizer.lr: 0.003 -> 0.0036; ...', or 'no change' (a perturbation that left every value as it was)."""
    parts = [f"{k}: {_fmt(old)} -> {_fmt(new)}" for k, (old, new) in event.changes.items()]
    return "; ".join(parts) or "no change"


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def read_lineage(exp_dir: str | Path) -> pd.DataFrame:
    """Every exploit event of the sweep in `exp_dir` (a local directory; a URI has none here), oldest first.

    A line cut short by a crash is left out; an event recorded twice (a trial that failed before its first report
    after the exploit restarts from the same checkpoint) counts once."""
    if "://" in str(exp_dir) or not Path(exp_dir).is_dir():
        return pd.DataFrame(columns=COLUMNS)
    rows, seen = [], set()
    for path in sorted(Path(exp_dir).glob(f"*/{TRIAL_RUN_DIR}/{LINEAGE_FILE}")):
        for text in path.read_text(errors="replace").splitlines():
            try:
                event = Exploit(**json.loads(text))
            except (ValueError, TypeError):
                continue
            key = (event.trial, event.from_trial, event.at_tokens, json.dumps(event.changes, sort_keys=True))
            if key in seen:
                continue
            seen.add(key)
            rows.append({**asdict(event), "changes": format_changes(event), "params": json.dumps(event.params)})
    df = pd.DataFrame(rows, columns=COLUMNS)
    return df.sort_values(["time", "at_tokens"], kind="stable").reset_index(drop=True)


def lineage_markdown(lineage: pd.DataFrame) -> list[str]:
    """summary.md's "PBT lineage" section (no lines when there are no events)."""
    if lineage.empty:
        return []
    lines = ["", "## PBT lineage", "", "| trial | continued from | at tokens | changes |", "|---|---|---|---|"]
    for r in lineage.itertuples():
        lines.append(f"| `{r.trial}` | `{r.from_trial}` | {int(r.at_tokens):,} | {r.changes} |")
    return lines
