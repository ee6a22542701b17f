"""Every scheduler runs a real small sweep (real Ray, tiny model, the real CLI as a process).

asha, hyperband and median face two good learning rates and two clearly bad ones (1e-5, 2e-5: the loss barely
moves) and must stop trials early. pbt and pb2 run a population of four, two at a time: a trial continues from
another trial's checkpoint, which three independent references confirm: Ray's own PBT policy log (who cloned whom,
with which new config), Ray's per-trial result log (where the trial's clock resumed, at which learning rate), and
lm.train run directly (the donor's run to the exploited step, continued under the new config, gives bit for bit the
loss the trial reported). The lineage is in load_sweep's `lineage`, lineage.csv and summary.md.

The five sweeps run at once (one module fixture, five drivers, each its own Ray), since their assertions are about
behaviour, not time.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from support.experiment import (
    EVAL_TOKENS,
    MAX_TOKENS,
    base_config_dict,
    result_log,
    seq_space,
    trial_number,
    write_yaml,
)
from support.processes import driver, sweep_args

from lm.train import train
from sweeps.results import load_sweep
from sweeps.space import load_space

pytestmark = pytest.mark.slow

GOOD, BAD = [3.0e-3, 5.0e-3], [1.0e-5, 2.0e-5]
LR_RANGE = {"distribution": "log_uniform_values", "min": 1.0e-4, "max": 1.0e-2}


def _stopping(scheduler: dict[str, Any], max_concurrent: int = 2) -> dict[str, Any]:
    """A grid of the four learning rates, good ones first (the first trials at a rung always continue)."""
    return {
        "search": {"algorithm": "grid", "seed": 0, "max_concurrent_trials": max_concurrent},
        "scheduler": scheduler,
        "num_samples": 1,
        "parameters": {"optimizer.lr": {"values": GOOD + BAD}},
    }


def _population(kind: str, weight_decay: dict[str, Any]) -> dict[str, Any]:
    return {
        "search": {"algorithm": "random", "seed": 0, "max_concurrent_trials": 2},
        "scheduler": {
            "type": kind,
            "perturbation_interval": 2 * EVAL_TOKENS,
            "quantile_fraction": 0.5,
            **({"resample_probability": 0.0} if kind == "pbt" else {}),
        },
        "num_samples": 4,
        "parameters": {"optimizer.lr": LR_RANGE, "optimizer.weight_decay": weight_decay},
    }


SWEEPS = {
    "asha": _stopping({"type": "asha", "grace_period": 2 * EVAL_TOKENS, "reduction_factor": 2}),
    "median": _stopping({"type": "median", "grace_period": 2 * EVAL_TOKENS, "min_samples_required": 2}),
    # Brackets: the full-budget one (2 trials: the good lrs), then one of 3 whose first rung is 25,600 / 3 tokens.
    "hyperband": _stopping({"type": "hyperband", "grace_period": 2 * EVAL_TOKENS, "reduction_factor": 3}, 4),
    "pbt": _population("pbt", {"values": [0.0, 0.1]}),
    "pb2": _population("pb2", {"distribution": "uniform", "min": 0.0, "max": 0.2}),
}


def _selected(request: pytest.FixtureRequest) -> set[str]:
    """The sweeps the selected tests of this module read (all five in a full run)."""
    names = set()
    for item in request.session.items:
        if item.module.__name__ == __name__:
            callspec = getattr(item, "callspec", None)
            names.add(callspec.params["name"] if callspec else "pbt")
    return names


@pytest.fixture(scope="module")
def sweeps(request, small_corpus, tmp_path_factory) -> dict[str, dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("schedulers")
    selected = {name: s for name, s in SWEEPS.items() if name in _selected(request)}
    base = write_yaml(tmp / "base.yaml", base_config_dict(small_corpus, out_dir=str(tmp / "unused")))
    store = tmp / "store"
    ray_tmps = {name: Path(tempfile.mkdtemp(prefix="rt", dir="/tmp")) for name in selected}
    spaces = {name: write_yaml(tmp / f"{name}.yaml", seq_space(base, name=name, **s)) for name, s in selected.items()}
    runs = {}
    try:
        drivers = {name: driver(sweep_args(spaces[name], name, store), ray_tmps[name], tmp) for name in selected}
        entered = {name: d.__enter__() for name, d in drivers.items()}
        try:
            for name, d in entered.items():
                runs[name] = {"rc": d.wait(), "output": d.output, "space": spaces[name], "exp": store / name}
        finally:
            for d in drivers.values():
                d.__exit__(None, None, None)
    finally:
        for path in ray_tmps.values():
            shutil.rmtree(path, ignore_errors=True)
    return runs


def _finished(sweeps: dict[str, dict[str, Any]], name: str) -> tuple[dict[str, Any], pd.DataFrame]:
    run = sweeps[name]
    assert run["rc"] == 0, run["output"][-4000:]
    assert "Traceback" not in run["output"] and "Error handling checkpoint" not in run["output"], run["output"][-4000:]
    return run, load_sweep(run["exp"]).dataframe


# ---------------------------------------------------------------------------------------------------
# Early stopping
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["asha", "median", "hyperband"])
def test_stopping_schedulers_stop_a_clearly_bad_trial_early(sweeps, name):
    run, df = _finished(sweeps, name)
    assert len(df) == 4 and set(df["status"]) <= {"completed", "stopped_early"}, df
    by_lr = df.set_index("optimizer.lr")
    assert by_lr.loc[BAD[0], "status"] == "stopped_early", df[["optimizer.lr", "status", "tokens_seen"]]
    assert by_lr.loc[BAD[0], "tokens_seen"] < MAX_TOKENS
    best = df.sort_values("best_val_loss").iloc[0]
    assert best["optimizer.lr"] in GOOD and best["status"] == "completed"
    # Ray's record of the stopped trial ends before the budget, on our clock.
    stopped = Path(by_lr.loc[BAD[0], "trial_path"])
    assert max(r["tokens_seen"] for r in result_log(stopped)) == by_lr.loc[BAD[0], "tokens_seen"]
    if name == "asha":  # rungs at 5,120 x 2^k: the bad trial is below the good ones' value at the first
        assert by_lr.loc[BAD[0], "tokens_seen"] == 2 * EVAL_TOKENS
    if name == "median":  # never before the grace period
        assert by_lr.loc[BAD[0], "tokens_seen"] >= 2 * EVAL_TOKENS
    if name == "hyperband":  # its first rung (25,600 / 3 tokens): the first report at or past it
        assert by_lr.loc[BAD[0], "tokens_seen"] == 4 * EVAL_TOKENS
    assert load_sweep(run["exp"]).lineage.empty


# ---------------------------------------------------------------------------------------------------
# PBT and PB2
# ---------------------------------------------------------------------------------------------------


def _policy_log(exp: Path, df: pd.DataFrame) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """Ray's PBT policy log (pbt_global.txt: [tag, donor tag, iteration, donor iteration, donor config, new config]
    per exploit, in order), as trial id -> [(donor id, new config)]."""
    by_number = {trial_number(Path(r.trial_path)): r.trial_id for r in df.itertuples()}  # the tag's number
    policies: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for line in (exp / "pbt_global.txt").read_text().splitlines():
        tag, donor_tag, _, _, _, new = json.loads(line)
        trial, donor = (by_number[int(t.split("_")[0])] for t in (tag, donor_tag))
        policies.setdefault(trial, []).append((donor, new))
    return policies


def _events(exp: Path) -> pd.DataFrame:
    """The lineage files themselves (changes and params as data), beside load_sweep's table."""
    rows = []
    for path in sorted(exp.glob("*/run/lineage.jsonl")):
        rows += [json.loads(line) for line in path.read_text().splitlines()]
    return pd.DataFrame(rows)


def _segments(trial_path: str) -> list[list[dict[str, Any]]]:
    """The trial's own evaluations (run/metrics.jsonl, appended by every run of the trial), one list per run: a run's
    first evaluation is the one whose checkpoint and report times are still 0 (they count this run's checkpoints
    and reports before the evaluation). (Ray's result.json is no record of this: Ray drops a trial's results past
    the iteration of the checkpoint it is restored from.)"""
    rows = [json.loads(line) for line in (Path(trial_path) / "run" / "metrics.jsonl").read_text().splitlines()]
    segments: list[list[dict[str, Any]]] = []
    for row in (r for r in rows if r["kind"] == "eval"):
        if not segments or row["checkpoint_time_s"] == row["report_time_s"] == 0.0:
            segments.append([])
        segments[-1].append(row)
    return segments


@pytest.mark.parametrize("name", ["pbt", "pb2"])
def test_population_trials_continue_from_other_trials_checkpoints(sweeps, name):
    run, df = _finished(sweeps, name)
    assert len(df) == 4 and set(df["status"]) == {"completed"}, df
    exp, spec = run["exp"], load_space(run["space"])
    events = _events(exp)
    assert len(events) >= 1, run["output"][-3000:]
    ids = set(df["trial_id"])
    assert set(events["trial"]) <= ids and set(events["from_trial"]) <= ids
    assert (events["trial"] != events["from_trial"]).all()
    # Ray's own log of the exploits: the same trials cloned the same donors into the same new configs, in order.
    policy = _policy_log(exp, df)
    ours = {
        trial: [(e["from_trial"], e["params"]) for _, e in group.iterrows()]
        for trial, group in events.groupby("trial", sort=False)
    }
    assert set(ours) == set(policy)
    for trial, exploits in ours.items():
        assert len(exploits) == len(policy[trial]), (trial, exploits, policy[trial])
        for (donor, params), (ray_donor, ray_new) in zip(exploits, policy[trial], strict=True):
            assert donor == ray_donor and params == pytest.approx(ray_new)
    # Perturbed values stay inside their ranges (the space's ends, which were validated).
    for _, e in events.iterrows():
        for key, (_old, new) in e["changes"].items():
            p = spec.parameters[key]
            assert (p.min <= new <= p.max) if p.distribution != "values" else new in p.values, (key, new)
    # The clock resumes at the donor's checkpoint: each restart of a trial reports one eval interval past the
    # donor's state (a state the donor reported), at the new config's learning rate for that step.
    trials = df.set_index("trial_id")
    for trial, group in events.groupby("trial", sort=False):
        # Every exploit is a restart; a trial may also restart from its own checkpoint (Ray pausing it under load),
        # which is no exploit and no event.
        restarts = [segment[0] for segment in _segments(trials.loc[trial, "trial_path"])[1:]]
        assert len(restarts) >= len(group), (trial, _segments(trials.loc[trial, "trial_path"]))
        donor_rows = {e: _segments(trials.loc[e, "trial_path"]) for e in group["from_trial"]}
        for _, e in group.iterrows():
            at = (e["at_tokens"] + EVAL_TOKENS, e["at_step"] + 10)
            new_config = spec.trial_config(e["params"])
            expected_lr = pytest.approx(new_config.lr_at(at[1] - 1), rel=1e-12)
            # The exploit's restart: at that position and at the new config's lr (an own-checkpoint restart may
            # sit at the same position with the old lr).
            at_position = [r for r in restarts if (r["tokens_seen"], r["step"]) == at]
            assert any(r["lr"] == expected_lr for r in at_position), (trial, at, expected_lr, at_position)
            assert e["at_tokens"] in {r["tokens_seen"] for seg in donor_rows[e["from_trial"]] for r in seg}


def test_an_exploit_continues_the_donors_weights_bit_for_bit(sweeps, tmp_path):
    """lm.train as the reference: the donor's config run to the exploited step, then continued under the trial's new
    config, reports exactly the loss the trial reported at its first evaluation after the exploit."""
    run, df = _finished(sweeps, "pbt")
    exp, space = run["exp"], run["space"]
    events = _events(exp)

    # A donor that had not exploited anyone up to the exploited step: its state there is its own config's run from
    # scratch (it may exploit others later). The first exploit of the sweep always qualifies.
    def donor_untouched(e: pd.Series) -> bool:
        return not ((events["trial"] == e["from_trial"]) & (events["at_step"] <= e["at_step"])).any()

    candidates = events[events.apply(donor_untouched, axis=1)]
    assert len(candidates), events[["trial", "from_trial", "at_step"]]
    event = candidates.iloc[0]
    trials = df.set_index("trial_id")
    donor_params = json.loads((Path(trials.loc[event["from_trial"], "trial_path"]) / "params.json").read_text())
    nth = list(events[events["trial"] == event["trial"]].index).index(event.name)
    first = _segments(trials.loc[event["trial"], "trial_path"])[1 + nth][0]
    assert first["step"] == event["at_step"] + 10

    spec = load_space(space)
    local = {"train.device": "cpu", "train.num_threads": 1, "train.progress": "off", "train.tensorboard": False}
    donor = spec.trial_config(donor_params).replace({**local, "train.out_dir": str(tmp_path / "donor")})
    state = tmp_path / "donor_state.pt"

    class Reached(Exception):
        pass

    def keep(metrics: dict[str, Any], ckpt: Path | None) -> None:
        if metrics["step"] == event["at_step"]:
            shutil.copyfile(ckpt, state)
            raise Reached

    threads = torch.get_num_threads()
    evals: dict[int, float] = {}
    try:
        with pytest.raises(Reached):
            train(donor, reporter=keep)
        continued = spec.trial_config(event["params"]).replace({**local, "train.out_dir": str(tmp_path / "continued")})
        train(continued, reporter=lambda m, _c: evals.__setitem__(m["step"], m["val_loss"]), resume_from=state)
    finally:
        torch.set_num_threads(threads)
    assert evals[first["step"]] == first["val_loss"]


@pytest.mark.parametrize("name", ["pbt", "pb2"])
def test_the_lineage_is_in_the_results(sweeps, name):
    run, df = _finished(sweeps, name)
    exp = run["exp"]
    events = _events(exp)
    lineage = load_sweep(exp).lineage
    assert list(lineage.columns[:5]) == ["trial", "from_trial", "at_tokens", "at_step", "changes"]
    assert sorted(map(tuple, lineage[["trial", "from_trial", "at_tokens"]].values.tolist())) == sorted(
        map(tuple, events[["trial", "from_trial", "at_tokens"]].values.tolist())
    )
    csv = pd.read_csv(exp / "lineage.csv")
    assert len(csv) == len(lineage)
    summary = (exp / "summary.md").read_text()
    assert "## PBT lineage" in summary
    for r in lineage.itertuples():
        assert f"| `{r.trial}` | `{r.from_trial}` | {r.at_tokens:,} | {r.changes} |" in summary
        assert f"{r.trial} continues from {r.from_trial}'s checkpoint at {r.at_tokens:,} tokens" in run["output"]
    # The results table shows each trial's last values: after its last exploit, those it continued with.
    trials = df.set_index("trial_id")
    for trial, group in events.groupby("trial", sort=False):
        last = group.iloc[-1]["params"]
        assert {k: trials.loc[trial, k] for k in last} == pytest.approx(last)
