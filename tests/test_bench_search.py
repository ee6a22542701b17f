"""benchmarks/bench_search.py's bookkeeping: rank correlation, the recommendation after each report, regret at a
token budget, on small hand-made grids whose answers are worked out here (no Ray)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_search", ROOT / "benchmarks" / "bench_search.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_search"] = module
    spec.loader.exec_module(module)
    return module


def grid_of(bench, finals: dict[tuple[int, int, float], tuple[float, float]]) -> pd.DataFrame:
    """A grid of two evaluations per configuration x seed: 100 tokens (loss + 1) and 200 (the final loss)."""
    rows = []
    for key, losses in finals.items():
        for seed, loss in enumerate(losses):
            for tokens, value in ((100, loss + 1.0), (200, loss)):
                rows.append(dict(zip(bench.KEY, key, strict=True), seed=seed, tokens_seen=tokens, val_loss=value,
                                 elapsed_s=tokens / 100))  # fmt: skip
    return pd.DataFrame(rows)


def test_spearman_matches_scipy(bench):
    stats = pytest.importorskip("scipy.stats")
    a = pd.Series([3.0, 1.0, 2.0, 2.0, 5.0, 4.0])
    b = pd.Series([2.5, 0.5, 2.0, 3.0, 4.0, 4.5])
    assert bench.spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic)
    assert math.isnan(bench.spearman(a[:2], b[:2]))  # too few points to rank


def test_finals_mean_and_spread_over_seeds(bench):
    grid = grid_of(bench, {(0, 16, 0.1): (2.0, 2.2), (1, 16, 0.1): (1.5, 1.9)})
    fin = bench.finals(grid)
    assert list(fin.index) == [(1, 16, 0.1), (0, 16, 0.1)]  # best mean first
    assert fin["mean"].tolist() == pytest.approx([1.7, 2.1])
    assert fin["spread"].tolist() == pytest.approx([0.4, 0.2])


def test_progress_recommends_only_full_budget_trials(bench):
    """A trial stopped early is never recommended however low its loss; the recommendation's loss is the grid's
    mean over seeds, not the replayed seed-0 value; tokens add up per trial."""
    grid = grid_of(bench, {(0, 16, 0.1): (2.0, 2.2), (1, 16, 0.1): (1.5, 1.9), (2, 16, 0.1): (1.0, 1.0)})
    problem = bench.Problem("t", max_tokens=200, eval_interval_tokens=100, lr_steps=3, batch_sizes=(16,),
                            warmup_fractions=(0.1,))  # fmt: skip
    reports = pd.DataFrame(
        [
            ("a", 1, 100, 3.0, 0),
            ("b", 2, 100, 2.5, 1),
            ("a", 3, 200, 2.0, 0),  # a finished: recommended
            ("c", 4, 100, 2.0, 2),  # c is the grid's best but stopped here
            ("b", 5, 200, 1.5, 1),  # b finished, better: recommended
        ],
        columns=["trial", "wall", "tokens_seen", "val_loss", "lr_step"],
    ).assign(batch_size=16, warmup_fraction=0.1)
    prog = bench.progress(reports, problem, grid)
    assert prog["tokens"].tolist() == [100, 200, 300, 400, 500]
    assert prog["recommended"].tolist()[2:] == [(0, 16, 0.1), (0, 16, 0.1), (1, 16, 0.1)]
    assert prog["loss"].tolist()[2:] == pytest.approx([2.1, 2.1, 1.7])
    best = bench.finals(grid)["mean"].min()  # 1.0
    assert bench.regret_at(prog, 150, best) == math.inf  # nothing had trained the full budget
    assert bench.regret_at(prog, 400, best) == pytest.approx(110.0)
    assert bench.regret_at(prog, math.inf, best) == pytest.approx(70.0)


def test_lr_steps_are_log_spaced_between_the_ends(bench):
    p = bench.FULL
    lrs = [p.lr(i) for i in range(p.lr_steps)]
    assert lrs[0] == pytest.approx(p.lr_min) and lrs[-1] == pytest.approx(p.lr_max)
    ratios = [b / a for a, b in zip(lrs, lrs[1:], strict=False)]
    assert max(ratios) == pytest.approx(min(ratios))
    # The derived expression the sweeps use gives the same numbers (sweeps/derived.py, not Python's eval).
    from sweeps.space import parse_space

    spec = parse_space(p.space({"algorithm": "random"}, {"type": "fifo"}, 1), "bench", ROOT)
    for step in (0, 3, p.lr_steps - 1):
        assert spec.trial_config({"lr_step": step}).optimizer.lr == pytest.approx(p.lr(step))


def test_every_strategy_is_a_valid_sweep_and_the_default_is_the_shipped_asha(bench):
    """Each strategy's space passes the sweep's own validation and builds its Ray scheduler; the default's ASHA has
    the shipped rungs (budget / 16 x 3^k), so the benchmark measures what ships."""
    from sweeps.schedulers import scheduler
    from sweeps.space import parse_space

    p = bench.FULL
    plan = bench.strategies(p, 16, quick=False)
    assert {s.label for s in plan} >= {bench.DEFAULT, "random + FIFO", "random + ASHA", "TPE + HyperBand", "PBT"}
    for s in plan:
        spec = parse_space(p.space(s.search, s.scheduler, s.num_samples, live=s.live), s.label, ROOT)
        assert scheduler(spec) is not None, s.label
    default = next(s for s in plan if s.label == bench.DEFAULT)
    asha = scheduler(parse_space(p.space(default.search, default.scheduler, 16), "d", ROOT))
    assert [r for r, _ in asha._brackets[0]._rungs] == [225_000, 75_000, 25_000]
