"""The tracking section of a space, its one-line errors, and W&B for a single `lm.train` run (offline, read back
from the run file). The sweeps themselves: tests/test_tracking_sweeps.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import tiny_config
from support.wandb_files import read_run

from sweeps.space import SpaceError, parse_space
from sweeps.tracking import flat, numeric_metrics

REPO = Path(__file__).resolve().parents[1]


def space(tmp_path: Path, **extra) -> Path:
    data = {
        "name": "t",
        "parameters": {"optimizer.lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2}},
    }
    data.update(extra)
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def without(module: str, code: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter where importing `module` fails, as when it is not installed."""
    prelude = f"import sys; sys.modules[{module!r}] = None\n"
    return subprocess.run([sys.executable, "-c", prelude + code], cwd=cwd, capture_output=True, text=True, timeout=120)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_tracking_defaults_tensorboard_on_and_no_external_backend():
    spec = parse_space({"name": "t"})
    assert spec.tracking.tensorboard is True
    assert spec.tracking.wandb.project is None and spec.tracking.mlflow.tracking_uri is None


def test_tracking_keys_are_checked():
    with pytest.raises(SpaceError, match=r"tracking.wandb.mode: expected one of"):
        parse_space({"name": "t", "tracking": {"wandb": {"project": "p", "mode": "loud"}}}, "s.yaml")
    with pytest.raises(SpaceError, match=r"tracking.mlflow.uri: unknown key"):
        parse_space({"name": "t", "tracking": {"mlflow": {"uri": "x"}}}, "s.yaml")


@pytest.mark.parametrize(
    "module, args, key, extra",
    [
        ("wandb", ["--wandb", "my-project"], "tracking.wandb", "wandb"),
        ("mlflow", ["--set", "tracking.mlflow.tracking_uri=sqlite:///m.db"], "tracking.mlflow", "mlflow"),
    ],
)
def test_a_backend_that_is_not_installed_is_one_line_naming_the_extra(tmp_path, module, args, key, extra):
    code = f"from sweeps.run_sweep import main; sys.exit(main({['--space', str(space(tmp_path)), *args]!r}))"
    line = one_error_line(without(module, code, tmp_path))
    assert key in line and f'pip install -e ".[{extra}]"' in line
    assert not (tmp_path / "sweep_results").exists()  # refused before anything is created


def test_lm_train_wandb_without_the_package_is_one_line(tmp_path, small_corpus):
    config = tiny_config(small_corpus, tmp_path / "run", {"train.wandb_project": "p"})
    (tmp_path / "c.yaml").write_text(config.to_yaml())
    line = one_error_line(
        without("wandb", "from lm.train import main; sys.exit(main(['--config', 'c.yaml']))", tmp_path)
    )
    assert "train.wandb_project" in line and 'pip install -e ".[wandb]"' in line


def test_lm_train_logs_to_wandb_offline_stepped_by_tokens(tmp_path, small_corpus):
    # As a user runs it: the CLI process (W&B's service writes the run file by the time the process has exited).
    config = tiny_config(
        small_corpus, tmp_path / "run", {"train.wandb_project": "single", "train.wandb_mode": "offline"}
    )
    (tmp_path / "c.yaml").write_text(config.to_yaml())
    proc = subprocess.run(
        [sys.executable, "-m", "lm.train", "--config", "c.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    run = read_run(runs[0])
    assert run["run"].project == "single"
    assert run["config"]["model"]["d_model"] == 32 and run["config"]["optimizer"]["lr"] == config.optimizer.lr
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["tokens_seen"], r["val_loss"]) for r in rows if r["kind"] == "eval"]
    logged = [(h["tokens_seen"], h["eval/val_loss"]) for h in run["history"] if "eval/val_loss" in h]
    assert logged == [(t, pytest.approx(v)) for t, v in evals]
    trains = [(r["tokens_seen"], r["train_loss"]) for r in rows if r["kind"] == "train"]
    assert [(h["tokens_seen"], h["train/train_loss"]) for h in run["history"] if "train/train_loss" in h] == [
        (t, pytest.approx(v)) for t, v in trains
    ]


def test_numeric_metrics_keeps_the_records_finite_numbers_only():
    result = {"val_loss": 1.5, "tokens_seen": 10, "diverged": False, "train_loss": float("nan"), "trial_id": "x"}
    assert numeric_metrics(result) == {"val_loss": 1.5, "tokens_seen": 10.0}


def test_flat_gives_dotted_paths():
    assert flat({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}
