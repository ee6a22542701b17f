"""End-to-end sweeps with a real (local) Ray: the driver, the trainable, ASHA/Optuna, the results files,
continuing the best trial and inspecting a finished sweep.

One small sweep (tiny model, a few dozen steps per trial) is shared by the whole module; the tests read
what it left on disk. Slow: deselect with `-m "not slow"`.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import shlex
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import tiny_config

from lm.checkpoint import is_training_state, read_checkpoint
from lm.config import Config
from lm.model import TransformerLM
from sweeps import run_sweep

pytestmark = pytest.mark.slow

NAME = "tiny_sweep"
NUM_SAMPLES = 8
TOKENS_PER_STEP = 8 * 32  # batch 8 x context 32 (the base); the sweep also tries batch 16
EVAL_TOKENS = 10 * TOKENS_PER_STEP  # 2,560: every 10 steps at batch 8, every 5 at batch 16
MAX_TOKENS = 6 * EVAL_TOKENS  # 15,360: 60 steps at batch 8, 6 evaluations
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module", autouse=True)
def _ray_down_at_module_end():
    yield
    import ray

    ray.shutdown()  # the driver shuts Ray down itself; this guards against a failure half-way


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory, small_corpus):
    """Run one Optuna + ASHA sweep through the driver's `main()`; returns what the tests need."""
    root = tmp_path_factory.mktemp("sweep")
    base = tiny_config(
        small_corpus,
        root / "unused_run",
        {"train.max_tokens": MAX_TOKENS, "train.eval_interval_tokens": EVAL_TOKENS, "train.log_interval": 5},
    )
    base_path = root / "base.yaml"
    base_path.write_text(yaml.safe_dump(base.to_dict(), sort_keys=False))
    space = {
        "name": NAME,
        "base_config": str(base_path),
        "metric": {"name": "val_loss", "goal": "minimize"},
        "search": {"algorithm": "optuna", "sampler": "tpe", "seed": 0, "max_concurrent_trials": 2},
        # Rungs at 2,560, 5,120 and 10,240 tokens; with lr down to 1e-6 some trial is hopeless at a rung.
        "scheduler": {
            "type": "asha",
            "time_attr": "tokens_seen",
            "grace_period": EVAL_TOKENS,
            "reduction_factor": 2,
        },
        "num_samples": NUM_SAMPLES,
        "resources_per_trial": {"cpu": 1, "gpu": "auto"},
        "stop": {"max_tokens": MAX_TOKENS, "divergence_loss": 10.0},
        "checkpoint": {"num_to_keep": 2},
        "max_failures": 0,
        "parameters": {
            "optimizer.lr": {"distribution": "log_uniform_values", "min": 1.0e-6, "max": 3.0e-2},
            "optimizer.warmup_iters": {"distribution": "int_uniform", "min": 0, "max": 4},
            "data.batch_size": {"values": [8, 16]},
        },
    }
    space_path = root / "space.yaml"
    space_path.write_text(yaml.safe_dump(space, sort_keys=False))
    storage = root / "results"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run_sweep.main(
            ["--space", str(space_path), "--storage-path", str(storage), "--num-cpus", "2", "--quiet"]
        )
    (root / "driver_stdout.txt").write_text(out.getvalue())  # kept for debugging a failed run
    (root / "driver_stderr.txt").write_text(err.getvalue())
    return {
        "code": code,
        "stdout": out.getvalue(),
        "stderr": err.getvalue(),
        "exp_dir": storage / NAME,
        "storage": storage,
        "base": base,
    }


@pytest.fixture(scope="module")
def sweep(sweep_run):
    from sweeps.results import load_sweep

    assert sweep_run["code"] == 0, (sweep_run["stdout"][-3000:], sweep_run["stderr"][-3000:])
    return load_sweep(sweep_run["exp_dir"])


def _result_grid(exp_dir: Path):
    """Ray's own view of the finished experiment (independent of sweeps.results)."""
    from ray import tune

    analysis = tune.ExperimentAnalysis(str(exp_dir), default_metric="val_loss", default_mode="min")
    return tune.ResultGrid(analysis)


# ---------------------------------------------------------------------------------------------------------
# The sweep ran
# ---------------------------------------------------------------------------------------------------------


def test_sweep_completes_all_trials(sweep_run, sweep):
    assert sweep_run["code"] == 0
    df = sweep.dataframe
    assert len(df) == NUM_SAMPLES
    assert df["trial_id"].is_unique
    statuses = df[["trial_id", "status", "error"]]
    assert set(df["status"]) <= {"completed", "stopped_early", "diverged"}, statuses
    assert (df["status"] == "completed").any()
    assert df["error"].isna().all()
    # The sampled values lie in the space (int_uniform's max is inclusive, batch sizes from the list).
    assert df["optimizer.lr"].between(1.0e-6, 3.0e-2).all()
    assert df["optimizer.warmup_iters"].between(0, 4).all()
    assert set(df["optimizer.warmup_iters"]) <= set(range(5))
    assert set(df["data.batch_size"]) <= {8, 16}
    for row in df[df["status"] == "completed"].itertuples():
        assert row.tokens_seen == MAX_TOKENS
    assert "results:" in sweep_run["stdout"]
    assert not any(ln.startswith("error:") for ln in sweep_run["stderr"].splitlines())


def test_gpu_auto_becomes_zero_on_cpu(sweep_run, sweep):
    assert "resources_per_trial.gpu: auto -> 0" in sweep_run["stdout"]
    assert "0 GPU each" in sweep_run["stdout"]
    for path in sweep.dataframe["best_checkpoint"].dropna():
        assert read_checkpoint(path)["config"]["train"]["device"] == "cpu"


def test_asha_stops_some_trial_early(sweep):
    df = sweep.dataframe
    early = df[df["status"] == "stopped_early"]
    assert len(early) >= 1, df[["trial_id", "optimizer.lr", "status", "tokens_seen", "best_val_loss"]]
    assert (early["tokens_seen"] < MAX_TOKENS).all()
    assert early["stopped_early"].all()
    # ASHA decides at rungs: grace period times powers of the reduction factor.
    rungs = {EVAL_TOKENS * 2**k for k in range(3)}
    assert set(early["tokens_seen"]) <= rungs, early[["trial_id", "tokens_seen"]]


def test_saved_space_and_meta(sweep_run):
    exp_dir = sweep_run["exp_dir"]
    meta = json.loads((exp_dir / run_sweep.META_FILE).read_text())
    assert meta["name"] == NAME and meta["metric"] == "val_loss" and meta["mode"] == "min"
    assert meta["swept"] == ["optimizer.lr", "optimizer.warmup_iters", "data.batch_size"]
    assert meta["max_tokens"] == MAX_TOKENS
    saved = yaml.safe_load((exp_dir / run_sweep.SPEC_FILE).read_text())
    assert saved["name"] == NAME and saved["num_samples"] == NUM_SAMPLES


# ---------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------


def test_every_trial_has_ray_checkpoints_that_load_into_lm(sweep):
    for row in sweep.dataframe.itertuples():
        ckpts = sorted(Path(row.trial_path).glob("checkpoint_*/state.pt"))
        assert ckpts, f"{row.trial_id}: no checkpoint_*/state.pt in {row.trial_path}"
        assert len(ckpts) <= 3  # num_to_keep 2 best + the latest
        for path in ckpts:
            state = read_checkpoint(path)
            assert is_training_state(state)
            config = Config.from_dict(state["config"])
            model = TransformerLM.from_config(config.model)
            model.load_state_dict(state["model"], strict=True)
            assert 0 < state["tokens_seen"] <= row.tokens_seen
            assert state["tokens_seen"] == state["iteration"] * config.tokens_per_step
        assert row.best_checkpoint is not None and Path(row.best_checkpoint).is_file()
        assert Path(row.best_checkpoint).parent.parent == Path(row.trial_path)


def test_checkpoint_config_matches_the_trial(sweep):
    df = sweep.dataframe
    for row in df.itertuples():
        config = Config.from_dict(read_checkpoint(row.best_checkpoint)["config"])
        lr, warmup, batch = (df.loc[row.Index, k] for k in sweep.swept)
        assert config.optimizer.lr == pytest.approx(lr)
        assert config.optimizer.warmup_iters == warmup
        assert config.data.batch_size == batch
        assert config.model.d_model == 32 and config.model.context_length == 32
        assert config.train.max_tokens == MAX_TOKENS


# ---------------------------------------------------------------------------------------------------------
# Results tables
# ---------------------------------------------------------------------------------------------------------


def test_results_csv_agrees_with_ray_and_load_sweep(sweep_run, sweep):
    exp_dir = sweep_run["exp_dir"]
    csv = pd.read_csv(exp_dir / "results.csv")
    ray_df = _result_grid(exp_dir).get_dataframe()  # the LAST report of each trial
    assert sorted(csv["trial_id"]) == sorted(ray_df["trial_id"])
    last_tokens = dict(zip(ray_df["trial_id"], ray_df["tokens_seen"], strict=True))
    for row in csv.itertuples():
        assert row.tokens_seen == last_tokens[row.trial_id]
    # The same rows as load_sweep gives (the row order is checked in test_trials_are_numbered_in_order).
    df = sweep.dataframe.set_index("trial_id")
    by_id = csv.set_index("trial_id").loc[df.index]
    for column in ("status", "tokens_seen", "optimizer.warmup_iters", "data.batch_size"):
        assert by_id[column].tolist() == df[column].tolist(), column
    for column in ("best_val_loss", "final_val_loss", "optimizer.lr"):
        assert by_id[column].tolist() == pytest.approx(df[column].tolist(), rel=1e-9), column
    parquet = pd.read_parquet(exp_dir / "results.parquet")
    assert sorted(parquet["trial_id"]) == sorted(df.index)


def _number_in_dir_name(row) -> int:
    """Tune names trial directories `<trainable>_<trial id>_<trial number>_<params>_<date>`."""
    match = re.search(rf"_{row.trial_id}_(\d+)_", Path(row.trial_path).name)
    assert match, row.trial_path
    return int(match.group(1))


def test_trials_are_numbered_in_order(sweep_run, sweep):
    df = sweep.dataframe
    numbers = [_number_in_dir_name(row) for row in df.itertuples()]
    assert sorted(numbers) == list(range(1, NUM_SAMPLES + 1))
    assert df["trial_number"].tolist() == numbers
    assert numbers == sorted(numbers)  # rows in the order the searcher created the trials
    csv = pd.read_csv(sweep_run["exp_dir"] / "results.csv")
    assert csv["trial_id"].tolist() == df["trial_id"].tolist()


def test_best_val_loss_matches_history(sweep):
    hist = sweep.history
    assert set(hist["trial_id"]) == set(sweep.dataframe["trial_id"])
    evals = hist[hist["val_loss"].notna()]
    if "diverged" in evals:
        evals = evals[evals["diverged"] != True]  # noqa: E712
    per_trial = evals.groupby("trial_id")["val_loss"].min()
    for row in sweep.dataframe.itertuples():
        assert row.best_val_loss == pytest.approx(per_trial[row.trial_id])
    assert sweep.best_trial_id == per_trial.idxmin()
    assert sweep.best_row["best_val_loss"] == pytest.approx(per_trial.min())


def test_best_files_summary_and_plots(sweep_run, sweep):
    exp_dir = sweep_run["exp_dir"]
    best_config = yaml.safe_load((exp_dir / "best" / "config.yaml").read_text())
    assert best_config == sweep.best_config
    Config.from_dict(best_config)  # a valid lm config
    checkpoint = Path((exp_dir / "best" / "checkpoint.txt").read_text().strip())
    assert checkpoint == sweep.best_checkpoint and checkpoint.is_file()
    best_row = sweep.dataframe.set_index("trial_id").loc[sweep.best_trial_id]
    assert checkpoint.parent.parent == Path(best_row["trial_path"])
    assert read_checkpoint(checkpoint)["val_loss"] == pytest.approx(best_row["best_val_loss"])

    summary = (exp_dir / "summary.md").read_text()
    df = sweep.dataframe
    counts = df["status"].value_counts()
    assert f"{NUM_SAMPLES} trials: " in summary
    for status, n in counts.items():
        assert f"{n} {status.replace('_', ' ')}" in summary
    assert sweep.best_trial_id in summary
    assert "python sweeps/continue_best.py" in summary and "--train.max_tokens" in summary

    plots = sorted((exp_dir / "plots").glob("*.png"))
    names = {p.name for p in plots}
    assert {"val_loss_vs_tokens.png", "best_val_loss_vs_lr.png", "parallel_coordinates.png",
            "best_so_far.png"} <= names  # fmt: skip
    for p in plots:
        data = p.read_bytes()
        assert len(data) > 1000 and data.startswith(PNG_MAGIC), p


# ---------------------------------------------------------------------------------------------------------
# After the sweep: continue the best trial, inspect the sweep
# ---------------------------------------------------------------------------------------------------------


def test_continue_best_trains_further_from_the_checkpoint(sweep_run, sweep, capsys):
    from sweeps import continue_best

    exp_dir = sweep_run["exp_dir"]
    state = read_checkpoint(sweep.best_checkpoint)
    saved_step = int(state["iteration"])
    config = Config.from_dict(state["config"])
    more = 2 * MAX_TOKENS
    out_dir = exp_dir / "best" / "continued"
    code = continue_best.main([str(exp_dir), "--train.max_tokens", str(more), "--train.progress", "off"])
    assert code == 0, capsys.readouterr()
    assert f"continuing trial {sweep.best_trial_id}" in capsys.readouterr().out
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert records
    assert records[0]["step"] > saved_step
    assert f"resumed at step {saved_step}" in (out_dir / "train.log").read_text()
    assert records[-1]["tokens_seen"] == more
    assert records[-1]["step"] == more // config.tokens_per_step
    final = read_checkpoint(out_dir / "checkpoints" / "final.pt")
    assert final["tokens_seen"] == more
    assert final["config"]["train"]["max_tokens"] == more
    assert final["config"]["optimizer"] == state["config"]["optimizer"]  # the best trial's hyperparameters


def test_continue_command_in_summary_parses(sweep_run):
    summary = (sweep_run["exp_dir"] / "summary.md").read_text()
    line = next(ln for ln in summary.splitlines() if ln.startswith("python sweeps/continue_best.py"))
    argv = shlex.split(line)[2:]
    assert Path(argv[0]) == sweep_run["exp_dir"]
    assert argv[1] == "--train.max_tokens" and int(argv[2]) > MAX_TOKENS


def test_inspect_sweep_prints_table_and_rebuilds_files(sweep_run, sweep, capsys):
    from sweeps import inspect_sweep

    exp_dir = sweep_run["exp_dir"]
    before = pd.read_csv(exp_dir / "results.csv")
    rebuilt = ["results.csv", "results.parquet", "history.parquet", "summary.md", "best/config.yaml",
               "best/checkpoint.txt"]  # fmt: skip
    for name in rebuilt:
        (exp_dir / name).unlink()
    for p in (exp_dir / "plots").glob("*.png"):
        p.unlink()
    capsys.readouterr()
    assert inspect_sweep.main([str(exp_dir), "--top", "3"]) == 0
    out = capsys.readouterr().out
    table = [ln for ln in out.splitlines() if ln.strip()]
    header = table[0].split()
    assert header[:2] == ["trial_id", "status"] and "best_val_loss" in header
    ranked = before.sort_values("best_val_loss")
    rows = table[1:4]
    assert [r.split()[0] for r in rows] == list(ranked["trial_id"].head(3))
    assert table[4] == f"best: {sweep.best_trial_id} val_loss {sweep.best_row['best_val_loss']:.4f}"
    assert table[5].startswith("tokens trained") and table[6].startswith("training compute")  # sweeps/compute.py
    assert table[7].startswith("rebuilt")
    for name in rebuilt:
        assert (exp_dir / name).is_file(), name
    after = pd.read_csv(exp_dir / "results.csv")
    assert sorted(after["trial_id"]) == sorted(before["trial_id"])  # row order: see the trial_number bug
    assert after.set_index("trial_id").loc[before["trial_id"], "best_val_loss"].tolist() == pytest.approx(
        before["best_val_loss"].tolist()
    )
    assert len(list((exp_dir / "plots").glob("*.png"))) >= 4
    assert not math.isnan(float(pd.read_csv(exp_dir / "results.csv")["best_val_loss"].min()))


def test_inspect_sweep_accepts_a_relative_path(sweep_run, sweep, monkeypatch, capsys):
    from sweeps import inspect_sweep

    monkeypatch.chdir(sweep_run["storage"])
    assert inspect_sweep.main([NAME, "--top", "3", "--no-write"]) == 0
    assert f"best: {sweep.best_trial_id}" in capsys.readouterr().out


def test_continue_best_accepts_a_relative_path(sweep_run, monkeypatch, tmp_path):
    from sweeps import continue_best

    monkeypatch.chdir(sweep_run["storage"])
    more = MAX_TOKENS + EVAL_TOKENS
    out_dir = tmp_path / "continued"
    argv = [NAME, "--train.max_tokens", str(more), "--train.out_dir", str(out_dir), "--train.progress", "off"]
    assert continue_best.main(argv) == 0
    assert read_checkpoint(out_dir / "checkpoints" / "final.pt")["tokens_seen"] == more


def test_inspect_and_continue_reject_a_non_sweep_directory(tmp_path, capsys):
    from sweeps import continue_best, inspect_sweep

    assert inspect_sweep.main([str(tmp_path)]) == 2
    assert continue_best.main([str(tmp_path), "--train.max_tokens", "100000"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 2 and all(ln.startswith("error:") and "not a sweep directory" in ln for ln in err), err


def test_driver_refuses_to_overwrite_the_sweep(sweep_run, capsys):
    space = sweep_run["exp_dir"].parent.parent / "space.yaml"
    name = sweep_run["exp_dir"].name
    code = run_sweep.main(["--space", str(space), "--storage-path", str(sweep_run["storage"]), "--name", name])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "exists" in err and "--resume" in err


def test_running_a_space_again_without_a_name_starts_a_new_sweep(sweep_run, capsys):
    space = sweep_run["exp_dir"].parent.parent / "space.yaml"
    args = run_sweep.parse_args(["--space", str(space), "--storage-path", str(sweep_run["storage"])])
    _, _, exp_dir, name = run_sweep.prepare(args)  # everything before Ray starts
    assert name == f"{sweep_run['exp_dir'].name}-2" and exp_dir == sweep_run["exp_dir"].parent / name
    assert f"this one is '{name}'" in capsys.readouterr().out


def test_trial_workers_preload_the_allocator_auto_picks(sweep_run):
    """`--allocator auto` (the default): Ray's worker processes map tcmalloc where the machine has it
    (and the driver says so), and run glibc malloc where it does not."""
    import ray

    env = run_sweep.allocator_env("auto", local=True)
    if env:
        assert f"trial workers preload {env['LD_PRELOAD']}" in sweep_run["stdout"]
    else:
        assert "trial workers preload" not in sweep_run["stdout"]

    @ray.remote(num_cpus=0)
    def mapped_allocators() -> set[str]:
        with open("/proc/self/maps") as maps:
            return {Path(line.split()[-1]).name for line in maps if "tcmalloc" in line}

    run_sweep.start_ray(None, 1, env)
    try:
        mapped = ray.get(mapped_allocators.remote())
    finally:
        ray.shutdown()
    if env:
        assert any(name.startswith(Path(env["LD_PRELOAD"]).name) for name in mapped), mapped
    else:
        assert mapped == set()
