"""Helpers for the tests that run real processes: the sweep driver and its Ray workers, their files.

- `processes`: start `sweeps/run_sweep.py` in its own session, watch its output, signal and kill it;
- `experiment`: the tiny sweep's input files, and reading an experiment directory back;
- `fixtures`: fixtures shared by several test modules (registered in tests/conftest.py).

The tests directory is on sys.path (pytest's default "prepend" import mode, as for `from conftest import`),
so test modules import these as `from support.processes import driver`.
"""
