"""Tests for ``lm.train``: a tiny run's outputs, eval timing, bit-exact resume, divergence and the CLI."""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from lm import stories
from lm.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from lm.config import Config
from lm.data import DataError
from lm.model import TransformerLM
from lm.optim import AdamW
from lm.train import main, train

REPO = Path(__file__).resolve().parent.parent
FAST = {"train.num_threads": 1}  # the test machines are small and shared: one thread is fastest
STEPS = 40  # tiny_config: 8 x 32 tokens per step, 40 steps, an eval every 10 steps


class Stop(Exception):
    """Raised from a reporter to end a run early (as a Ray Tune scheduler stopping a trial does)."""


def _run(config: Config, resume_from: Path | None = None) -> tuple[dict, list[tuple[dict, Path | None]]]:
    """Train and return (summary, [(metrics, checkpoint path)] of every reporter call)."""
    calls: list[tuple[dict, Path | None]] = []
    summary = train(config, reporter=lambda metrics, ckpt: calls.append((dict(metrics), ckpt)), resume_from=resume_from)
    return summary, calls


def _records(out_dir: Path, kind: str | None = None) -> list[dict]:
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return [r for r in records if kind is None or r["kind"] == kind]


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _assert_same_optimizer_state(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for index in a["state"]:
        for key, value in a["state"][index].items():
            other = b["state"][index][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, (
                index,
                key,
            )


# ---------------------------------------------------------------------------------------------------------
# Runs shared by several tests (module scope: each is trained once)
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def straight_run(small_corpus, tmp_path_factory):
    """Run A: the tiny config straight through its 40 steps."""
    out = tmp_path_factory.mktemp("straight")
    config = tiny_config(small_corpus, out, FAST)
    summary, calls = _run(config)
    return config, summary, calls


@pytest.fixture(scope="module")
def interrupted_run(small_corpus, tmp_path_factory):
    """Run B: the same config, stopped by its reporter right after the 2nd eval (step 20)."""
    out = tmp_path_factory.mktemp("interrupted")
    config = tiny_config(small_corpus, out, FAST)
    calls = []

    def reporter(metrics, ckpt):
        calls.append((dict(metrics), ckpt))
        if len(calls) == 2:
            raise Stop

    with pytest.raises(Stop):
        train(config, reporter=reporter)
    # Keep a copy of the step-20 checkpoint: runs resumed into this out_dir rotate the original away.
    saved = tmp_path_factory.mktemp("interrupted-ckpt") / calls[-1][1].name
    saved.write_bytes(calls[-1][1].read_bytes())
    return config, calls, saved


# ---------------------------------------------------------------------------------------------------------
# A tiny run and its outputs
# ---------------------------------------------------------------------------------------------------------


def test_tiny_run_writes_metrics_and_checkpoints(make_config):
    config = make_config({**FAST, "train.keep_checkpoints": 2})
    out = Path(config.train.out_dir)
    seen = []

    def reporter(metrics, ckpt):
        # At the time of the call the checkpoint exists and holds exactly this step.
        assert ckpt is not None and Path(ckpt).is_file()
        state = read_checkpoint(ckpt)
        assert state["iteration"] == metrics["step"] and state["tokens_seen"] == metrics["tokens_seen"]
        assert state["val_loss"] == metrics["val_loss"]
        seen.append(dict(metrics))

    summary = train(config, reporter=reporter)
    assert summary["status"] == "completed" and summary["diverged"] is False
    assert summary["steps"] == STEPS and summary["tokens_seen"] == STEPS * config.tokens_per_step
    assert summary["final_val_loss"] == seen[-1]["val_loss"]
    assert summary["best_val_loss"] == min(m["val_loss"] for m in seen)
    assert summary["entropy_floor"] is not None  # the generated corpus's meta.json knows it

    # metrics.jsonl: every record has step and tokens_seen; the evals are exactly what the reporter got.
    records = _records(out)
    assert records and all(isinstance(r["step"], int) and r["tokens_seen"] == r["step"] * 256 for r in records)
    evals = [r for r in records if r["kind"] == "eval"]
    assert [{k: v for k, v in r.items() if k != "kind"} for r in evals] == seen
    assert [r["step"] for r in evals] == [10, 20, 30, 40]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(5, STEPS + 1, 5))
    assert all(math.isfinite(r["train_loss"]) and r["lr"] >= 0 for r in records)
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]  # it learns something even in 40 steps

    # metrics.csv: the same records, each row with step and tokens_seen.
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(records)
    assert all(row["step"] and row["tokens_seen"] and int(row["tokens_seen"]) == 256 * int(row["step"]) for row in rows)
    assert [row["kind"] for row in rows] == [r["kind"] for r in records]

    ckpts = out / "checkpoints"
    periodic = sorted(p.name for p in ckpts.glob("step_*.pt"))
    assert periodic == ["step_0000030.pt", "step_0000040.pt"]  # at most keep_checkpoints, the newest
    assert (ckpts / "best.pt").is_file() and (ckpts / "final.pt").is_file()
    final = read_checkpoint(ckpts / "final.pt")
    assert final["iteration"] == STEPS and final["kind"] == "final"
    assert Config.from_dict(final["config"]) == config
    best = read_checkpoint(ckpts / "best.pt")
    assert best["val_loss"] == summary["best_val_loss"]
    assert (out / "train.log").read_text().count("[eval ]") == 4


def test_checkpoint_interval_tokens(make_config):
    config = make_config({**FAST, "train.checkpoint_interval_tokens": 20 * 256, "train.keep_checkpoints": 10})
    summary, calls = _run(config)
    assert summary["status"] == "completed"
    assert [(m["step"], c is not None) for m, c in calls] == [
        (10, False),
        (20, True),
        (30, False),
        (40, True),
    ]
    names = sorted(p.name for p in (Path(config.train.out_dir) / "checkpoints").glob("step_*.pt"))
    assert names == ["step_0000020.pt", "step_0000040.pt"]


def _expected_eval_steps(interval_tokens: int, tokens_per_step: int, total_steps: int) -> list[int]:
    """First step at or past each multiple of the interval, and the last step."""
    steps = set()
    k = 1
    while (step := math.ceil(k * interval_tokens / tokens_per_step)) <= total_steps:
        steps.add(step)
        k += 1
    return sorted(steps | {total_steps})


@pytest.mark.parametrize("batch_size", [8, 3])
def test_evals_at_token_multiples(make_config, batch_size):
    interval = 1000  # not a multiple of either batch's tokens per step (256 and 96)
    config = make_config(
        {
            **FAST,
            "data.batch_size": batch_size,
            "train.max_tokens": 5120,
            "train.eval_interval_tokens": interval,
        }
    )
    tps = batch_size * 32
    summary, calls = _run(config)
    steps = [m["step"] for m, _ in calls]
    expected = _expected_eval_steps(interval, tps, 5120 // tps)
    assert steps == expected
    assert steps == ([4, 8, 12, 16, 20] if batch_size == 8 else [11, 21, 32, 42, 53])
    for k, (metrics, _) in enumerate(calls[:-1], start=1):
        assert metrics["tokens_seen"] >= k * interval > metrics["tokens_seen"] - tps


# ---------------------------------------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------------------------------------


def test_interrupted_run_left_its_checkpoint(interrupted_run):
    config, calls, saved = interrupted_run
    assert [m["step"] for m, _ in calls] == [10, 20]
    ckpt = calls[-1][1]
    assert ckpt is not None and ckpt.name == "step_0000020.pt" and saved.read_bytes() == ckpt.read_bytes()
    assert not (Path(config.train.out_dir) / "checkpoints" / "final.pt").exists()


def test_resume_is_bitwise_equal_to_a_straight_run(straight_run, interrupted_run):
    config_a, summary_a, calls_a = straight_run
    config_b, calls_b, saved = interrupted_run
    # Before the interruption both runs agree, of course.
    assert [m["val_loss"] for m, _ in calls_b] == [m["val_loss"] for m, _ in calls_a[:2]]

    summary_c, calls_c = _run(config_b, resume_from=saved)
    assert summary_c["steps"] == STEPS and summary_c["tokens_seen"] == summary_a["tokens_seen"]
    assert [m["step"] for m, _ in calls_c] == [30, 40]
    for (ma, _), (mc, _) in zip(calls_a[2:], calls_c, strict=True):
        for key in ("step", "tokens_seen", "train_loss", "val_loss", "best_val_loss", "lr"):
            assert ma[key] == mc[key], key  # exactly equal, not approximately
    assert summary_c["final_val_loss"] == summary_a["final_val_loss"]
    assert summary_c["best_val_loss"] == summary_a["best_val_loss"]

    # The logged train losses after the resume point agree too.
    out_a, out_b = Path(config_a.train.out_dir), Path(config_b.train.out_dir)
    train_a = {r["step"]: r["train_loss"] for r in _records(out_a, "train")}
    train_b = {r["step"]: r["train_loss"] for r in _records(out_b, "train")}
    assert train_a == train_b and set(train_a) == set(range(5, STEPS + 1, 5))

    final_a = read_checkpoint(out_a / "checkpoints" / "final.pt")
    final_c = read_checkpoint(out_b / "checkpoints" / "final.pt")
    _assert_same_tensors(final_a["model"], final_c["model"])
    _assert_same_optimizer_state(final_a["optimizer"], final_c["optimizer"])
    assert final_a["sampler"] == final_c["sampler"]


def test_continue_past_the_budget(straight_run, tmp_path):
    config_a, summary_a, _ = straight_run
    final = Path(config_a.train.out_dir) / "checkpoints" / "final.pt"
    longer = config_a.replace({"train.max_tokens": 2 * config_a.train.max_tokens, "train.out_dir": str(tmp_path)})
    summary, calls = _run(longer, resume_from=final)
    assert summary["status"] == "completed"
    assert summary["steps"] == 2 * STEPS and summary["tokens_seen"] == 2 * summary_a["tokens_seen"]
    assert [m["step"] for m, _ in calls] == [50, 60, 70, 80]
    train_steps = [r["step"] for r in _records(tmp_path, "train")]
    assert train_steps == list(range(45, 2 * STEPS + 1, 5))  # nothing before the resume point
    # The schedule is the new budget's: the lr of the last step is the minimum.
    assert _records(tmp_path, "train")[-1]["lr"] == pytest.approx(longer.lr_at(2 * STEPS - 1))
    assert read_checkpoint(tmp_path / "checkpoints" / "final.pt")["iteration"] == 2 * STEPS


def test_resume_from_a_cs336_checkpoint(straight_run, interrupted_run, tmp_path):
    config_b, calls_b, saved = interrupted_run
    state = read_checkpoint(saved)
    model = TransformerLM.from_config(config_b.model)
    model.load_state_dict(state["model"])
    optimizer = AdamW(model.parameters())
    optimizer.load_state_dict(state["optimizer"])
    cs336 = tmp_path / "cs336.pt"
    save_checkpoint(model, optimizer, 20, cs336)

    # With a budget that ends right there, the final checkpoint holds exactly the loaded weights.
    at_budget = config_b.replace({"train.max_tokens": 20 * 256, "train.out_dir": str(tmp_path / "same")})
    summary, calls = _run(at_budget, resume_from=cs336)
    # Resumed at its very end, the run trains no step and reports one evaluation of the loaded weights.
    assert summary["steps"] == 20 and [m["step"] for m, _ in calls] == [20]
    final = read_checkpoint(tmp_path / "same" / "checkpoints" / "final.pt")
    _assert_same_tensors(final["model"], state["model"])

    # Resumed to the full budget: the iteration and the optimizer's step counts continue from 20.
    full = config_b.replace({"train.out_dir": str(tmp_path / "full")})
    summary, calls = _run(full, resume_from=cs336)
    assert summary["status"] == "completed"
    assert summary["steps"] == STEPS and summary["tokens_seen"] == STEPS * 256
    assert [m["step"] for m, _ in calls] == [30, 40]
    final = read_checkpoint(tmp_path / "full" / "checkpoints" / "final.pt")
    assert {s["step"] for s in final["optimizer"]["state"].values()} == {STEPS}
    # The weights continued from the checkpoint's: far better than a fresh model after 20 steps.
    fresh_20 = straight_run[2][1][0]["val_loss"]
    assert calls[-1][0]["val_loss"] < fresh_20


def test_resume_with_a_mismatched_model_fails(interrupted_run, tmp_path):
    config_b, calls_b, saved = interrupted_run
    other = config_b.replace({"model.d_model": 64, "train.out_dir": str(tmp_path)})
    with pytest.raises(CheckpointError, match="does not fit"):
        train(other, resume_from=saved)
    with pytest.raises(CheckpointError, match="not found"):
        train(other, resume_from=tmp_path / "missing.pt")


# ---------------------------------------------------------------------------------------------------------
# Divergence and determinism
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [{"optimizer.lr": 50.0, "optimizer.grad_clip": None}, {"train.divergence_loss": 0.01}],
    ids=["huge-lr", "tiny-ceiling"],
)
def test_divergence_stops_cleanly(make_config, overrides):
    config = make_config({**FAST, **overrides})
    summary, calls = _run(config)
    assert summary["diverged"] is True and summary["status"] == "diverged"
    assert summary["diverged_step"] == summary["steps"] < STEPS
    assert summary["diverged_step"] == 5  # the first step whose loss is looked at (log interval 5)
    ckpts = Path(config.train.out_dir) / "checkpoints"
    assert not (ckpts / "final.pt").exists()
    last, ckpt = calls[-1]
    assert last["diverged"] is True and last["diverged_step"] == 5 and ckpt is None
    # Reported at the ceiling, so schedulers rank it below every healthy trial.
    assert last["val_loss"] == (config.train.divergence_loss or 1e4)


def test_divergence_after_resume_keeps_the_last_good_checkpoint(interrupted_run, tmp_path):
    config_b, calls_b, saved = interrupted_run
    ckpt = saved
    out = tmp_path / "diverging"
    out.mkdir()
    (out / "checkpoints").mkdir()
    good = out / "checkpoints" / ckpt.name
    good.write_bytes(ckpt.read_bytes())
    before = good.read_bytes()
    config = config_b.replace({"optimizer.lr": 50.0, "optimizer.grad_clip": None, "train.out_dir": str(out)})
    summary, calls = _run(config, resume_from=good)
    assert summary["diverged"] is True and 20 < summary["diverged_step"] <= 30
    assert summary["best_val_loss"] == calls_b[-1][0]["best_val_loss"]  # restored, never beaten
    assert good.read_bytes() == before and read_checkpoint(good)["iteration"] == 20
    assert not (out / "checkpoints" / "final.pt").exists()
    assert calls[-1][0]["diverged"] is True


def test_same_seed_same_losses(make_config, tmp_path):
    runs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        config = make_config(
            {**FAST, "train.seed": seed, "train.out_dir": str(tmp_path / name), "train.max_tokens": 20 * 256}
        )
        _run(config)
        runs[name] = [(r["kind"], r["step"], r.get("train_loss"), r.get("val_loss")) for r in _records(tmp_path / name)]
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["c"]


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------


def _cli_overrides(corpus: Path, out_dir: Path) -> list[str]:
    """The tiny config as command-line overrides, with plain console lines (the summary is printed)."""
    config = tiny_config(corpus, out_dir, {**FAST, "train.progress": "lines"}).to_dict()
    defaults = Config().to_dict()
    args = []
    for section, values in config.items():
        for name, value in values.items():
            if value != defaults[section][name]:
                args += [f"--{section}.{name}", "null" if value is None else str(value)]
    return args


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def test_cli_run(small_corpus, tmp_path):
    out = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, "-m", "lm.train", *_cli_overrides(small_corpus, out), "--optimizer.lr", "3e-3"],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert f"done: {STEPS} steps, {STEPS * 256:,} tokens" in result.stdout
    assert "entropy floor" in result.stdout
    assert (out / "checkpoints" / "final.pt").is_file()
    assert len(_records(out, "eval")) == 4


def test_cli_bad_config_subprocess(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "lm.train", "--model.d_model", "30", "--train.out_dir", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "model.d_model" in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--model.d_model", "30"], "model.d_model"),
        (["--model.bogus", "3"], "model.bogus"),
        (["--optimizer.lr", "-1"], "optimizer.lr"),
        (["--train.max_tokens", "10"], "train.max_tokens"),
        (["stray"], "unexpected argument"),
        (["--config"], "--config needs a value"),
        (["--config", "{tmp}/missing.yaml"], "missing.yaml"),
        (["--config", "{tmp}/bad.yaml"], "bad.yaml"),
        (["--resume-from", "{tmp}/missing.pt"], "missing.pt"),
        (["--resume-from", "{tmp}/bad.yaml"], "not a readable checkpoint"),
        (["--data.train_path", "{tmp}/nope.npy", "--data.val_path", "{tmp}/nope.npy"], "nope.npy"),
        (["--data.train_path", "{corpus}/train.npy", "--data.val_path", "{corpus}/val.npy",
          "--model.vocab_size", "100"], "vocab_size"),
    ],
)  # fmt: skip
def test_cli_bad_inputs_exit_2(capsys, tmp_path, small_corpus, args, expected):
    (tmp_path / "bad.yaml").write_text("model:\n  d_model: [1, 2]\n")
    args = [a.format(tmp=tmp_path, corpus=small_corpus) for a in args]
    code = main(["--train.out_dir", str(tmp_path / "out"), "--train.num_threads", "1", *args])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], captured.err
    assert "Traceback" not in captured.err
    assert not (tmp_path / "out").exists()  # nothing written before the inputs are checked


def test_cli_diverged_run_exits_1(capsys, small_corpus, tmp_path):
    code = main([*_cli_overrides(small_corpus, tmp_path / "d"), "--train.divergence_loss", "0.01"])
    assert code == 1
    assert "DIVERGED at step 5" in capsys.readouterr().out


def test_cli_resume_takes_the_saved_config(capsys, straight_run, tmp_path):
    config_a, summary_a, _ = straight_run
    final = Path(config_a.train.out_dir) / "checkpoints" / "final.pt"
    # No --config: the checkpoint's config, with the overrides on top (a larger budget, a new out_dir).
    code = main(
        [
            "--resume-from",
            str(final),
            "--train.max_tokens",
            str(45 * 256),
            "--train.out_dir",
            str(tmp_path),
            "--train.progress",
            "lines",
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert "done: 45 steps" in capsys.readouterr().out
    assert read_checkpoint(tmp_path / "checkpoints" / "final.pt")["iteration"] == 45


def test_cli_help(capsys):
    assert main(["--help"]) == 0
    assert "usage" in capsys.readouterr().out


def test_train_raises_data_error_before_writing(make_config, tmp_path):
    config = make_config({**FAST, "data.train_path": str(tmp_path / "none.npy")})
    with pytest.raises(DataError, match="none.npy"):
        train(config)
    assert not Path(config.train.out_dir).exists()


# ---------------------------------------------------------------------------------------------------------
# End to end on the built-in corpus (slow)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_end_to_end_on_builtin_data(tmp_path):
    env = {**_env(), "LM_SWEEPS_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(
        [sys.executable, "-m", "lm.train", "--train.max_tokens", "400000",
         "--train.out_dir", str(tmp_path / "run"), "--train.tensorboard", "false"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=1800,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    summary = [line for line in result.stdout.splitlines() if line.startswith("done:")]
    assert len(summary) == 1, result.stdout[-2000:]
    match = re.search(r"val loss (\d+\.\d+).*entropy floor (\d+\.\d+) nats/token", summary[0])
    print(summary[0])  # shown with -s or -rP: the margin below the bound
    assert match, summary[0]
    val_loss, floor = float(match.group(1)), float(match.group(2))
    assert val_loss < 2.5 < math.log(257)
    assert 0 < floor < val_loss
    assert (tmp_path / "cache" / f"builtin-{stories.VERSION}" / "meta.json").is_file()  # generated there


@pytest.mark.slow  # compiles (about 20 s cold on the CI machines)
def test_compiled_run_times_its_compile(make_config):
    config = make_config({**FAST, "train.compile": True})
    summary, calls = _run(config)
    assert summary["status"] == "completed" and summary["compile_time_s"] > 0
    assert all(m["compile_time_s"] == summary["compile_time_s"] for m, _ in calls)
    assert summary["best_val_loss"] < 4.0  # it learns (a byte-level vocabulary starts near ln 257 = 5.5)
    assert "compiled in" in (Path(config.train.out_dir) / "train.log").read_text()
    # The compile is not training time: throughput is over the steps after it.
    assert summary["train_time_s"] < summary["elapsed_s"] - summary["compile_time_s"]


@pytest.mark.slow
def test_evaluation_does_not_compile(make_config):
    from torch._dynamo.utils import counters

    from lm.data import validation_starts
    from lm.model import compile_layers
    from lm.train import evaluate, open_data

    config = make_config(FAST)
    model = compile_layers(TransformerLM.from_config(config.model))
    _, val, _ = open_data(config)
    x = torch.randint(0, config.model.vocab_size, (2, config.model.context_length))
    model(x, x).backward()  # compiles the training graphs
    compiled = counters["stats"]["unique_graphs"]
    starts = validation_starts(len(val), config.data.val_windows, config.model.context_length)
    loss = evaluate(model, val, starts, config, torch.device("cpu"), contextlib.nullcontext)
    assert math.isfinite(loss)
    assert counters["stats"]["unique_graphs"] == compiled  # a no-grad graph would be a second compile


def test_train_step_is_one_clipped_adamw_step_at_the_given_lr():
    """The step the loop, sweeps.placement and the benchmarks share, against the same step written out."""
    from lm.train import train_step

    torch.manual_seed(0)
    model = TransformerLM(vocab_size=50, context_length=8, d_model=16, num_layers=1, num_heads=2, d_ff=32)
    reference = TransformerLM(vocab_size=50, context_length=8, d_model=16, num_layers=1, num_heads=2, d_ff=32)
    reference.load_state_dict(model.state_dict())
    x, y = torch.randint(0, 50, (4, 8)), torch.randint(0, 50, (4, 8))
    opt, ref_opt = AdamW(model.parameters(), lr=0.5), AdamW(reference.parameters(), lr=0.5)

    loss, grad_norm = train_step(model, opt, x, y, lr=1e-2, grad_clip=0.1)

    ref_loss = reference(x, y)
    ref_loss.backward()
    grads = [p.grad for p in reference.parameters()]
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
    for g in grads:
        g.mul_(min(1.0, 0.1 / (float(norm) + 1e-6)))
    for group in ref_opt.param_groups:
        group["lr"] = 1e-2
    ref_opt.step()
    assert loss.item() == ref_loss.item() and float(grad_norm) == pytest.approx(float(norm), rel=1e-5)
    assert all(g["lr"] == 1e-2 for g in opt.param_groups)
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b)
