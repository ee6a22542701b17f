"""Hyperparameter sweeps of `lm` models on Ray Tune. From Python (a notebook):

    from sweeps import run_sweep, load_sweep
    s = run_sweep("lr_sweep.yaml", num_samples=4, overrides={"stop.max_tokens": 1e6})   # a Sweep
    s = load_sweep("sweep_results/lr_sweep")
    model = s.load_best_model(device="cpu")

`run_sweep` is the module of the CLI script (sweeps/run_sweep.py), callable as `sweeps.run_sweep.sweep`.
"""

from typing import Any

__all__ = ["load_sweep", "run_sweep"]


def __getattr__(name: str) -> Any:
    # Lazy: importing `sweeps` must not import Ray, torch or pandas.
    if name == "load_sweep":
        from sweeps.sweep import load_sweep

        return load_sweep
    if name == "run_sweep":
        import importlib

        return importlib.import_module("sweeps.run_sweep")
    raise AttributeError(f"module 'sweeps' has no attribute {name!r}")
