"""Read a W&B offline run file (run-<id>.wandb) back, as W&B's own `wandb sync` would: an independent reader of
what the sweep handed W&B, for the tracking tests.

The file is a LevelDB-style log: a 7-byte header (":W&B", magic, version), then 32 KiB blocks of records, each a
7-byte header (crc32, little-endian length, type: 1 full, 2 first, 3 middle, 4 last) and its data; a block's tail
shorter than a header is padding. Each assembled record is a serialized `wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
HEADER = 7


def records(path: Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B run file"
    out, pos, parts = [], HEADER, b""
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0 and length == 0:
            break
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            out.append(record)
    return out


def read_run(path: Path) -> dict[str, Any]:
    """{"history": [{key: value}, ...], "config": {key: value}, "summary": {key: value}, "run": Record.run}."""
    run: dict[str, Any] = {"history": [], "config": {}, "summary": {}, "run": None}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            run["history"].append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            )
        elif kind == "config":
            for item in record.config.update:
                run["config"][item.key] = json.loads(item.value_json)
        elif kind == "summary":
            for item in record.summary.update:
                run["summary"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "run":
            run["run"] = record.run
            for item in record.run.config.update:
                run["config"][item.key] = json.loads(item.value_json)
    return run
