"""lm.record: one definition of every metric name, used by the loop's reports and files."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from lm.record import KINDS, Key, Record
from lm.train import train

ROOT = Path(__file__).resolve().parent.parent


def test_keys_are_the_record_fields_as_plain_strings():
    assert [k.value for k in Key] == [f.name for f in dataclasses.fields(Record)]
    assert Key.tokens_seen == "tokens_seen" and {"tokens_seen": 1}[Key.tokens_seen] == 1
    assert json.dumps({Key.val_loss: 1.5}) == '{"val_loss": 1.5}'


def test_to_dict_leaves_out_what_was_not_measured():
    row = Record(step=3, tokens_seen=768, train_loss=2.5, final_eval=False).to_dict()
    assert row == {"step": 3, "tokens_seen": 768, "train_loss": 2.5, "final_eval": False}
    assert all(type(k) is str for k in row)  # plain str keys: Ray, JSON and torch's weights_only loader take them


def test_every_reported_and_logged_name_is_a_record_field(make_config):
    config = make_config({"train.num_threads": 1})
    reported: list[dict] = []
    train(config, reporter=lambda metrics, ckpt: reported.append(metrics))
    rows = [json.loads(line) for line in (Path(config.train.out_dir) / "metrics.jsonl").read_text().splitlines()]
    assert reported and rows
    assert all(set(m) <= set(Key) for m in reported)
    assert {r["kind"] for r in rows} == set(KINDS)
    assert all(set(r) - {"kind"} <= set(Key) for r in rows)


def test_the_clock_is_spelled_once_in_the_code():
    """`tokens_seen` as a quoted string appears in no module but lm/record.py (tests spell the file format)."""
    hits = [
        f"{path.relative_to(ROOT)}:{n}"
        for folder in ("lm", "sweeps", "benchmarks")
        for path in sorted((ROOT / folder).rglob("*.py"))
        if path.name != "record.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if '"tokens_seen"' in line or "'tokens_seen'" in line
    ]
    assert hits == []
