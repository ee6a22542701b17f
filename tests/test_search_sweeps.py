"""Real sweeps (Ray, tiny models) for the Optuna study, extending and warm-starting (sweeps/study.py).

One TPE sweep of two trials (the first a named start) is read from a second process while it runs, then extended
to four trials; the extension is interrupted during its last trial and finished by a plain --resume. A GP sweep is
warm-started from it. About three minutes in all."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from support.experiment import make_space, read_results, result_log, trial_dirs, trial_number
from support.processes import driver, sweep_args

from lm.record import Key
from sweeps.sweep import load_sweep

pytestmark = pytest.mark.slow

PARAMETERS = {
    "optimizer.lr": {"distribution": "log_uniform_values", "min": 1.0e-3, "max": 1.0e-2},
    "optimizer.warmup_iters": {"distribution": "int_uniform", "min": 1, "max": 10},
}
READ_STUDY = """
import json, sys, optuna
study = optuna.load_study(study_name=sys.argv[1], storage=sys.argv[2])
print(json.dumps([[t.state.name, len(t.intermediate_values)] for t in study.trials]))
"""


def _read_study_in_another_process(name: str, storage: str) -> list[list[Any]] | None:
    proc = subprocess.run([sys.executable, "-c", READ_STUDY, name, storage], capture_output=True, text=True, timeout=60)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def _study(exp_dir: Path) -> optuna.Study:
    return optuna.load_study(study_name=exp_dir.name, storage=f"sqlite:///{exp_dir / 'optuna.db'}")


@pytest.fixture(scope="module")
def sweeps(small_corpus, tmp_path_factory) -> Iterator[dict[str, Any]]:
    """tpe: 2 trials (read by another process while running), extended to 4 (interrupted during trial 4, finished
    by a plain --resume); gp: 2 trials, warm-started from it."""
    tmp = tmp_path_factory.mktemp("search")
    space = make_space(
        tmp,
        small_corpus,
        num_samples=2,
        parameters=PARAMETERS,
        search={
            "algorithm": "optuna",
            "sampler": "tpe",
            "seed": 0,
            "max_concurrent_trials": 1,
            "points_to_evaluate": {"cs336": {"optimizer.lr": 1.0e-3}},
        },
    )
    store = tmp / "store"
    exp = store / "tpe"
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    out: dict[str, Any] = {"space": space, "store": store, "exp": exp, "wall_s": {}, "output": {}}
    try:
        start = time.monotonic()
        with driver(sweep_args(space, "tpe", store), ray_tmp, tmp) as d:
            # A second process reads the study while the sweep runs, until it sees an evaluation.
            seen = None
            while d.proc.poll() is None and not seen:
                if (exp / "optuna.db").exists():
                    trials = _read_study_in_another_process("tpe", f"sqlite:///{exp / 'optuna.db'}")
                    if trials and any(n > 0 for _, n in trials) and d.proc.poll() is None:
                        seen = trials
                time.sleep(0.5)
            out["seen_while_running"] = seen
            out["rc"] = d.wait()
            out["output"]["tpe"] = d.output
        out["wall_s"]["tpe"] = time.monotonic() - start
        out["before_extension"] = {p.name: (p / "result.json").read_bytes() for p in trial_dirs(exp).values()}
        out["study_before"] = len(_study(exp).trials)

        def fourth_trial_evaluated_twice() -> bool:
            fourth = [p for p in trial_dirs(exp).values() if trial_number(p) == 4]
            return bool(fourth) and len(result_log(fourth[0])) >= 2

        start = time.monotonic()
        with driver(sweep_args(None, "tpe", store, "--resume", "--num-samples", "4"), ray_tmp, tmp) as d:
            d.wait_until(fourth_trial_evaluated_twice, "trial 4's second evaluation")
            d.signal_group(signal.SIGINT)
            out["extend_rc"] = d.wait()
            out["output"]["extend"] = d.output
        out["wall_s"]["extend"] = time.monotonic() - start
        out["interrupted"] = {p.name: p for p in trial_dirs(exp).values()}

        with driver(sweep_args(None, "tpe", store, "--resume"), ray_tmp, tmp) as d:
            out["resume_rc"] = d.wait()
            out["output"]["resume"] = d.output
        out["after_resume"] = {p.name: (p / "result.json").read_bytes() for p in trial_dirs(exp).values()}

        start = time.monotonic()
        args = sweep_args(space, "gp", store, "--warm-start", str(exp), "--set", "search.sampler=gp")
        args += ["--set", "search.points_to_evaluate={}"]
        with driver(args, ray_tmp, tmp) as d:
            out["gp_rc"] = d.wait()
            out["output"]["gp"] = d.output
        out["wall_s"]["gp"] = time.monotonic() - start
        print("wall seconds:", out["wall_s"])
        yield out
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_the_study_holds_every_trial_with_its_evaluations_on_the_tokens_clock(sweeps):
    assert sweeps["rc"] == 0, sweeps["output"]["tpe"][-3000:]
    exp = sweeps["exp"]
    assert f"optuna-dashboard sqlite:///{exp / 'optuna.db'}" in sweeps["output"]["tpe"]
    trials = _study(exp).trials
    assert len(trials) == 4 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    dirs = sorted(trial_dirs(exp).values(), key=trial_number)
    for trial_dir in dirs:  # the study's trial with the same parameters holds the same evaluations
        params = json.loads((trial_dir / "params.json").read_text())
        (trial,) = [t for t in trials if t.params == params]
        rows = result_log(trial_dir)
        assert trial.intermediate_values == {r[Key.tokens_seen]: r[Key.val_loss] for r in rows}
        assert trial.value == rows[-1][Key.val_loss]
    assert trials[0].user_attrs == {"start": "cs336"} and trials[0].params["optimizer.lr"] == 1.0e-3
    results = read_results(exp)
    assert results["start"].tolist()[:1] == ["cs336"] and results["start"].iloc[1:].isna().all()


def test_a_second_process_reads_the_study_while_the_sweep_runs(sweeps):
    seen = sweeps["seen_while_running"]
    assert seen, "no evaluation seen in the study before the sweep ended"
    assert all(state in ("RUNNING", "COMPLETE") for state, _ in seen)


def test_extending_adds_exactly_the_new_trials_and_reruns_none(sweeps):
    """2 finished trials, extended to 4: trials 3 and 4 are new; interrupted during trial 4, a plain --resume
    finishes it from its checkpoint (the saved space says 4) and runs nothing else."""
    assert sweeps["extend_rc"] == 130, sweeps["output"]["extend"][-3000:]
    assert "extending sweep 'tpe' from 2 to 4 trials" in sweeps["output"]["extend"]
    assert sweeps["resume_rc"] == 0, sweeps["output"]["resume"][-3000:]
    before, after = sweeps["before_extension"], sweeps["after_resume"]
    assert sweeps["study_before"] == 2 and len(before) == 2 and len(sweeps["interrupted"]) == 4 and len(after) == 4
    assert {name: after[name] for name in before} == before  # the finished trials' results: untouched
    exp = sweeps["exp"]
    assert sorted(trial_number(p) for p in trial_dirs(exp).values()) == [1, 2, 3, 4]
    sweep = load_sweep(exp)
    assert sweep.dataframe["trial_number"].tolist() == [1, 2, 3, 4]
    assert (sweep.dataframe["status"] == "completed").all()
    assert yaml.safe_load((exp / "sweep_space.yaml").read_text())["num_samples"] == 4
    fourth = result_log(next(p for p in trial_dirs(exp).values() if trial_number(p) == 4))
    restarts = [r[Key.tokens_seen] for r in fourth if r.get("iterations_since_restore") == 1]
    assert len(restarts) == 2 and restarts[1] > restarts[0]  # continued from its checkpoint, not from scratch
    assert fourth[-1][Key.tokens_seen] == max(r[Key.tokens_seen] for r in fourth)


def test_a_warm_started_sweep_starts_with_the_old_trials_in_its_study(sweeps):
    assert sweeps["gp_rc"] == 0, sweeps["output"]["gp"][-3000:]
    exp = sweeps["store"] / "gp"
    old_exp = sweeps["exp"]
    assert f"warm start: 4 trials of {old_exp}" in sweeps["output"]["gp"]
    trials = _study(exp).trials
    warm = [t for t in trials if "warm_start" in t.user_attrs]
    new = [t for t in trials if "warm_start" not in t.user_attrs]
    assert [t.number for t in warm] == [0, 1, 2, 3] and len(new) == 2
    old_study = _study(old_exp).trials
    best_values = {t.user_attrs["warm_start_trial"]: t.value for t in warm}
    old_best = read_results(old_exp).set_index("trial_number")["best_val_loss"].to_dict()
    assert best_values == old_best
    assert sorted(t.params["optimizer.lr"] for t in warm) == sorted(t.params["optimizer.lr"] for t in old_study)
    assert all(t.state == optuna.trial.TrialState.COMPLETE and t.intermediate_values for t in new)
    assert len(read_results(exp)) == 2  # the new sweep's results: its own trials


@pytest.mark.skipif(shutil.which("optuna-dashboard") is None, reason="the dashboard extra is not installed")
def test_optuna_dashboard_serves_the_study_and_its_curves(sweeps):
    """The documented command, on localhost: the study's trials and their curves (steps = tokens seen)."""
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exp = sweeps["exp"]
    command = ["optuna-dashboard", f"sqlite:///{exp / 'optuna.db'}", "--host", "127.0.0.1", "--port", str(port)]
    dashboard = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, study = time.monotonic() + 60, None
        while study is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/1", timeout=5) as response:
                    study = json.loads(response.read())
            except OSError:
                time.sleep(0.3)
    finally:
        dashboard.terminate()
        dashboard.wait(10)
    assert study is not None and study["name"] == "tpe"
    tokens = [r[Key.tokens_seen] for r in result_log(min(trial_dirs(exp).values(), key=trial_number))]
    assert [v["step"] for v in study["trials"][0]["intermediate_values"]] == tokens
    assert {"key": "start", "value": "cs336"} in study["trials"][0]["user_attrs"]
