"""Faults during a run, done for real (processes, signals, files); what lm-sweeps does about each.

- a trial's worker process SIGKILLed mid-training (retried from its last checkpoint, same losses);
- a trial that diverges and trials that raise (recorded, the sweep goes on, exit code 1);
- a process killed in the middle of a checkpoint write; truncated and foreign checkpoints;
- disk: how many checkpoints a trial keeps in storage (checkpoint.num_to_keep).

The harness (the driver in its own session, reading its output and files back) is in tests/support/.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from support.experiment import (
    EVAL_TOKENS,
    FIRST_EVAL_STEP,
    MAX_TOKENS,
    NUM_TO_KEEP,
    TOKENS_PER_STEP,
    assert_same_losses_as_uninterrupted,
    make_space,
    read_results,
    restores,
    result_log,
    resumed_steps,
    train_logs,
    trial_dirs,
    trial_number,
    write_yaml,
)
from support.processes import KILL_DURING_CHECKPOINT, REPO, child_env, cmdline, driver, sweep_args, trial_worker_pids

from lm.checkpoint import read_checkpoint, save_training_state
from lm.config import Config
from lm.train import main as train_main
from lm.train import train

# ---------------------------------------------------------------------------------------------------
# A trial's worker process SIGKILLed mid-training
# ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_worker_sigkill_retries_trial_from_checkpoint_with_identical_losses(small_corpus, tmp_path, ray_tmp):
    # One trial of 200 steps (20 evaluations); max_failures is the default (2).
    space = make_space(tmp_path, small_corpus, num_samples=1, stop={"max_tokens": 2 * MAX_TOKENS})
    store = tmp_path / "store"
    with driver(sweep_args(space, "worker", store), ray_tmp, tmp_path) as d:
        d.wait_until(lambda: len(d.reports()) >= 3, "three evaluations")
        workers = d.wait_until(lambda: trial_worker_pids(d.sid), "the trial's worker process")
        assert len(workers) == 1, [cmdline(p) for p in workers]
        killed_after = len(d.reports())
        os.kill(workers[0], signal.SIGKILL)
        assert d.wait() == 0, d.output[-6000:]
    exp_dir = store / "worker"
    df = read_results(exp_dir)
    assert len(df) == 1 and df["status"][0] == "completed" and df["tokens_seen"][0] == 2 * MAX_TOKENS
    trial_dir = next(iter(trial_dirs(exp_dir).values()))
    records = result_log(trial_dir)
    after = restores(records)
    assert len(after) == 1, "the trial was not restarted exactly once"
    restart_step = records[after[0]]["step"]
    assert FIRST_EVAL_STEP < restart_step <= (killed_after + 2) * FIRST_EVAL_STEP  # from a checkpoint, not 0
    steps = resumed_steps(train_logs(trial_dir.name, exp_dir, ray_tmp))
    assert steps and steps[-1] == restart_step - FIRST_EVAL_STEP
    assert_same_losses_as_uninterrupted(trial_dir, space, tmp_path)


# ---------------------------------------------------------------------------------------------------
# A trial that diverges and trials that raise, in one grid sweep under ASHA
# ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_diverging_and_raising_trials_are_recorded_and_the_sweep_goes_on(small_corpus, tmp_path, ray_tmp):
    # Grid (one trial at a time, in this order): lr 50 / vocab 257 diverges; lr 50 / vocab 128 and
    # lr 3e-3 / vocab 128 raise at trial time (the data's token ids do not fit a 128-token vocabulary: the
    # values are valid configs, so the pre-flight check passes); lr 3e-3 / vocab 257 is healthy.
    space = make_space(
        tmp_path,
        small_corpus,
        search={"algorithm": "grid", "seed": 0, "max_concurrent_trials": 1},
        scheduler={
            "type": "asha",
            "time_attr": "tokens_seen",
            "grace_period": EVAL_TOKENS,
            "reduction_factor": 2,
        },
        num_samples=1,
        max_failures=0,  # with the default (2) each raising trial is retried twice more, to the same error
        parameters={
            "optimizer.lr": {"values": [50.0, 3.0e-3]},
            "model.vocab_size": {"values": [257, 128]},
            "optimizer.grad_clip": {"value": None},
        },
    )
    store = tmp_path / "store"
    with driver(sweep_args(space, "faults", store), ray_tmp, tmp_path) as d:
        rc = d.wait()
    exp_dir = store / "faults"
    assert rc == 1, d.output[-6000:]  # some trials errored
    df = read_results(exp_dir)
    assert len(df) == 4
    by_config = {(row["optimizer.lr"], row["model.vocab_size"]): row for _, row in df.iterrows()}
    diverged, healthy = by_config[(50.0, 257)], by_config[(3.0e-3, 257)]
    errors = [by_config[(50.0, 128)], by_config[(3.0e-3, 128)]]

    # The diverged trial stopped itself, with its step, and is not an error.
    assert diverged["status"] == "diverged" and diverged["diverged"]
    assert 0 < diverged["diverged_step"] < MAX_TOKENS // TOKENS_PER_STEP
    assert pd.isna(diverged["error"])
    # It reported the ceiling (stop.divergence_loss) as its loss, worse than anything a healthy trial reports,
    # so ASHA ranks it last: the healthy trial that came after it at the same rungs ran to the end.
    history = pd.read_parquet(exp_dir / "history.parquet")
    div_hist = history[history["trial_id"] == diverged["trial_id"]]
    assert div_hist["val_loss"].iloc[-1] == 10.0
    assert (history[history["trial_id"] != diverged["trial_id"]]["val_loss"] < 10.0).all()
    assert healthy["status"] == "completed" and healthy["tokens_seen"] == MAX_TOKENS
    assert healthy["trial_number"] > diverged["trial_number"]
    # The raising trials are recorded with their message; the others finished.
    for row in errors:
        assert row["status"] == "error"
        assert "vocab_size" in row["error"] and "128" in row["error"], row["error"]
    assert set(d.errored()) == {row["trial_id"] for row in errors}
    assert errors[0]["trial_number"] < healthy["trial_number"]  # the sweep went on after an error
    summary = (exp_dir / "summary.md").read_text()
    assert "## Errors" in summary and "## Diverged" in summary
    for row in errors:
        assert f"`{row['trial_id']}`: {row['error']}" in summary
    assert f"`{diverged['trial_id']}` at step {int(diverged['diverged_step'])}" in summary
    # The best trial is the healthy one.
    best = yaml.safe_load((exp_dir / "best" / "config.yaml").read_text())
    assert best["optimizer"]["lr"] == 3.0e-3 and best["model"]["vocab_size"] == 257


# ---------------------------------------------------------------------------------------------------
# A checkpoint write interrupted; truncated and foreign checkpoints
# ---------------------------------------------------------------------------------------------------


def eval_losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["val_loss"] for r in rows if r["kind"] == "eval"}


def test_checkpoint_write_killed_midway_keeps_previous_which_resumes(make_config, tmp_path):
    # 40 steps, an evaluation and a periodic checkpoint every 10; the process dies writing step 30's.
    config = make_config({"train.device": "cpu", "train.num_threads": 1, "train.keep_checkpoints": 2})
    cfg_file = write_yaml(tmp_path / "run.yaml", config.to_dict())
    run_dir = Path(config.train.out_dir)
    proc = subprocess.run(
        [sys.executable, str(KILL_DURING_CHECKPOINT), str(cfg_file), "step_0000030.pt"],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    ckpt_dir = run_dir / "checkpoints"
    assert not (ckpt_dir / "step_0000030.pt").exists()  # never a truncated file under the real name
    leftovers = list(ckpt_dir.glob(".step_0000030.pt.*.tmp"))
    assert len(leftovers) == 1  # the half-written temporary file stays behind (harmless, not cleaned up)
    previous = read_checkpoint(ckpt_dir / "step_0000020.pt")  # intact
    assert previous["iteration"] == 20 and previous["tokens_seen"] == 20 * TOKENS_PER_STEP

    resumed = subprocess.run(
        [
            sys.executable,
            "-m",
            "lm.train",
            "--config",
            str(cfg_file),
            "--resume-from",
            str(ckpt_dir / "step_0000020.pt"),
            "--train.out_dir",
            str(tmp_path / "resumed"),
        ],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed at step 20" in (tmp_path / "resumed" / "train.log").read_text()
    reference = tmp_path / "reference"
    threads = torch.get_num_threads()
    try:
        train(config.replace({"train.out_dir": str(reference)}))
    finally:
        torch.set_num_threads(threads)
    expected = eval_losses(reference)
    assert eval_losses(tmp_path / "resumed") == {30: expected[30], 40: expected[40]}  # bitwise


def _checkpoint_file(make_config, tmp_path: Path) -> tuple[Config, Path]:
    config = make_config({"train.max_tokens": 10 * TOKENS_PER_STEP, "train.device": "cpu"})
    train(config)
    return config, Path(config.train.out_dir) / "checkpoints" / "final.pt"


def test_truncated_or_foreign_checkpoint_fails_with_one_line_exit_2(make_config, tmp_path, capsys):
    config, good = _checkpoint_file(make_config, tmp_path)
    cfg_file = write_yaml(tmp_path / "run.yaml", config.to_dict())
    data = good.read_bytes()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "truncated.pt").write_bytes(data[: len(data) // 2])
    (bad / "text.pt").write_text("not a checkpoint\n")
    (bad / "empty.pt").write_bytes(b"")
    torch.save(torch.zeros(3), bad / "tensor.pt")
    torch.save({"weights": torch.zeros(3)}, bad / "dict.pt")
    other = read_checkpoint(good)
    other["model"] = {k: torch.cat([v, v]) for k, v in other["model"].items()}  # another model's shapes
    save_training_state(other, bad / "other_model.pt")

    # The real command line, for a truncated file (config from the checkpoint) and a foreign one (--config).
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "lm.train", *args],
            cwd=REPO,
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=600,
        )

    with ThreadPoolExecutor(2) as pool:
        runs = {
            "truncated.pt": pool.submit(cli, "--resume-from", str(bad / "truncated.pt")),
            "text.pt": pool.submit(cli, "--config", str(cfg_file), "--resume-from", str(bad / "text.pt")),
        }
        for name, future in runs.items():
            proc = future.result()
            assert proc.returncode == 2, (name, proc.stderr)
            assert proc.stderr.count("\n") == 1 and str(bad / name) in proc.stderr, proc.stderr
            assert "Traceback" not in proc.stderr
    # The other cases through the same entry point, in-process.
    for name in ("empty.pt", "tensor.pt", "dict.pt", "other_model.pt", "missing.pt"):
        for args in (
            ["--resume-from", str(bad / name)],
            ["--config", str(cfg_file), "--resume-from", str(bad / name)],
        ):
            rc = train_main(args)
            err = capsys.readouterr().err
            assert rc == 2, (name, args, err)
            assert err.count("\n") == 1 and err.startswith("error: ") and str(bad / name) in err, err


# ---------------------------------------------------------------------------------------------------
# Disk: checkpoint.num_to_keep (on the twin sweeps of tests/support/fixtures.py)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_num_to_keep_bounds_ray_checkpoints_per_trial(twin_sweeps):
    # Ray 2.60 keeps the num_to_keep best checkpoints plus the latest one (for resume): num_to_keep + 1.
    sampler, exp_dir = twin_sweeps["sampler"], twin_sweeps["a"]
    assert sampler.samples > 10 and len(sampler.max_seen) == 3  # sampled while the trials ran
    assert max(sampler.max_seen.values()) <= NUM_TO_KEEP + 1, sampler.max_seen
    for path in trial_dirs(exp_dir).values():
        kept = sorted(p for p in path.iterdir() if p.name.startswith("checkpoint_"))
        assert 1 <= len(kept) <= NUM_TO_KEEP + 1
        records = result_log(path)
        assert len(records) == 10  # ten evaluations, ten Ray checkpoints reported
        by_dir = {r["checkpoint_dir_name"]: r["val_loss"] for r in records}
        best = sorted(by_dir, key=by_dir.get)[:NUM_TO_KEEP]
        assert set(best) | {records[-1]["checkpoint_dir_name"]} == {p.name for p in kept}


@pytest.mark.slow
def test_trial_dirs_in_storage_hold_their_logs_and_bounded_checkpoints(twin_sweeps):
    problems = []
    for trial_id, path in sorted(trial_dirs(twin_sweeps["a"]).items(), key=lambda item: trial_number(item[1])):
        periodic = list(path.rglob("step_*.pt"))  # lm.train's own periodic checkpoints (keep_checkpoints: 2)
        if len(periodic) > 2:
            problems.append(f"{trial_id}: {len(periodic)} step_*.pt files in storage")
        if not (path / "run" / "train.log").is_file():
            problems.append(f"{trial_id}: no run/train.log in storage")
    assert problems == []
