"""Bad input of every kind to the sweep driver: exit 2 before Ray starts, one line naming file and field.

One table of cases, one `python sweeps/run_sweep.py` subprocess per case (four at a time); `--debug` shows
the traceback instead.
"""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from support.experiment import base_config_dict, seq_space, write_yaml
from support.processes import RUN_SWEEP, child_env


def _bad_input_cases(tmp: Path, corpus: Path) -> list[tuple[str, list[str], list[str]]]:
    """(case, run_sweep arguments, strings its one-line error must contain: the file, then the field)."""

    def lr(**spec: Any) -> dict[str, Any]:
        return {"parameters": {"optimizer.lr": spec}}

    def base(section: str, **fields: Any) -> dict[str, Any]:
        config = base_config_dict(corpus, out_dir=str(tmp / "unused"))
        config[section].update(fields)
        return config

    npy = "train.npy"
    # case: (space overrides, base config or None, (train file name, writer) or None, expected strings)
    table: dict[str, tuple[dict, dict | None, tuple | None, list[str]]] = {
        "unknown_top_key": ({"epochs": 3}, None, None, ["unknown top-level key 'epochs'"]),
        "unknown_param_key": (
            lr(distribution="uniform", min=1e-3, max=1e-2, step=1),
            None,
            None,
            ["parameters.optimizer.lr.step", "unknown key"],
        ),
        "unknown_config_field": (
            {"parameters": {"optimizer.learning_rate": {"value": 0.01}}},
            None,
            None,
            ["parameters.optimizer.learning_rate", "not a config field"],
        ),
        "wrong_type_setting": ({"num_samples": "many"}, None, None, ["num_samples", "integer", "'many'"]),
        "wrong_type_value": (
            {"parameters": {"data.batch_size": {"values": [8, "big"]}}},
            None,
            None,
            ["parameters.data.batch_size.values", "integer", "'big'"],
        ),
        "bad_distribution": (
            lr(distribution="gaussian", min=1e-3, max=1e-2),
            None,
            None,
            ["parameters.optimizer.lr.distribution", "gaussian"],
        ),
        "min_above_max": (
            lr(distribution="log_uniform_values", min=0.1, max=0.01),
            None,
            None,
            ["parameters.optimizer.lr", "min < max"],
        ),
        "value_gives_invalid_config": (
            {"parameters": {"optimizer.warmup_iters": {"values": [5, 500]}}},
            None,
            None,
            ["parameters.optimizer.warmup_iters", "500"],
        ),
        "base_config_missing": (
            {"base_config": str(tmp / "nope.yaml")},
            None,
            None,
            ["base_config", "nope.yaml", "not found"],
        ),
        "base_config_wrong_type": ({}, base("model", d_model="wide"), None, ["model.d_model", "'wide'"]),
        "train_file_missing": ({}, None, ("nothing.npy", None), ["data.train_path", "not found"]),
        "float_tokens": (
            {},
            None,
            (npy, lambda p: np.save(p, np.ones(1000, np.float32))),
            ["data.train_path", "float32"],
        ),
        "bin_without_dtype": (
            {},
            None,
            ("train.bin", lambda p: np.ones(1000, np.uint16).tofile(p)),
            ["data.train_path", "data.dtype"],
        ),
        "token_id_too_large": (
            {},
            None,
            (npy, lambda p: np.save(p, np.full(1000, 300, np.uint16))),
            ["data.train_path", "token id 300 >= model.vocab_size 257"],
        ),
        "shorter_than_context": (
            {},
            None,
            (npy, lambda p: np.save(p, np.ones(20, np.uint16))),
            ["data.train_path", "20 tokens", "context_length"],
        ),
        "meta_json_disagrees": (
            {},
            None,
            (
                npy,
                lambda p: (
                    np.save(p, np.ones(1000, np.uint16)),
                    (p.parent / "meta.json").write_text('{"vocab_size": 1000}'),
                ),
            ),
            ["vocab_size 1000", "model.vocab_size 257"],
        ),
    }
    cases = []
    for case, (overrides, base_dict, data, expect) in table.items():
        d = tmp / case
        config = base_dict or base_config_dict(corpus, out_dir=str(tmp / "unused"))
        names = None
        if data is not None:
            file, writer = data
            (d / "data").mkdir(parents=True)
            if writer is not None:
                writer(d / "data" / file)
            config["data"]["train_path"] = str(d / "data" / file)
            names = str(d / "data" / ("meta.json" if case == "meta_json_disagrees" else file))
        space = seq_space(write_yaml(d / "base.yaml", config))
        space["parameters"].update(overrides.get("parameters", {}))
        space.update({k: v for k, v in overrides.items() if k != "parameters"})
        path = write_yaml(d / "space.yaml", space)
        cases.append((case, ["--space", str(path), "--storage-path", str(d / "store")], [names or str(path), *expect]))

    malformed = tmp / "malformed_yaml" / "space.yaml"
    malformed.parent.mkdir(parents=True)
    malformed.write_text("name: x\nparameters: {optimizer.lr: [1, 2\n")
    cases.append(
        (
            "malformed_yaml",
            ["--space", str(malformed), "--storage-path", str(tmp / "store")],
            [str(malformed), "malformed YAML", "line"],
        )
    )
    blocker = tmp / "a_file"
    blocker.write_text("a file where the storage directory should be")
    good_space = write_yaml(
        tmp / "good" / "space.yaml",
        seq_space(write_yaml(tmp / "good" / "base.yaml", base_config_dict(corpus))),
    )
    cases.append(
        (
            "storage_not_writable",
            ["--space", str(good_space), "--storage-path", str(blocker / "store")],
            [str(blocker / "store"), "--storage-path", "not writable"],
        )
    )
    cases.append(
        (
            "resume_unknown_sweep",
            ["--resume", "--name", "ghost", "--storage-path", str(tmp / "store")],
            [str(tmp / "store" / "ghost"), "--resume", "ghost"],
        )
    )
    return cases


def _run_case(args: list[str], cwd: Path, ray_tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(RUN_SWEEP), *args],
        cwd=cwd,
        env=child_env(ray_tmp),
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_bad_input_fails_fast_with_one_line_and_exit_2(small_corpus, tmp_path):
    cases = _bad_input_cases(tmp_path / "cases", small_corpus)
    ray_tmp = tmp_path / "raytmp"  # must stay empty: no case may start Ray
    with ThreadPoolExecutor(4) as pool:
        runs = [(case, expect, pool.submit(_run_case, args, tmp_path, ray_tmp)) for case, args, expect in cases]
        failures = []
        for case, expect, future in runs:
            proc = future.result()
            err = proc.stderr
            problems = []
            if proc.returncode != 2:
                problems.append(f"exit {proc.returncode}")
            if err.count("\n") != 1 or not err.startswith("error: "):
                problems.append("not exactly one 'error: ' line")
            if "Traceback" in err:
                problems.append("traceback")
            problems += [f"missing {s!r}" for s in expect if s not in err]
            if problems:
                failures.append(f"{case}: {', '.join(problems)}\n  stderr: {err.strip()[-800:]}")
    assert not (ray_tmp / "ray").exists(), "a bad-input case started Ray"
    assert failures == [], "\n".join(failures)


def test_bad_input_with_debug_shows_the_traceback(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("name: x\nbogus: 1\n")
    proc = _run_case(
        ["--space", str(space), "--storage-path", str(tmp_path / "store"), "--debug"],
        tmp_path,
        tmp_path / "raytmp",
    )
    assert proc.returncode != 0
    assert "Traceback (most recent call last)" in proc.stderr
    assert "SpaceError" in proc.stderr and "unknown top-level key 'bogus'" in proc.stderr
