"""The sweep's console: one line per evaluation and per trial end, instead of Ray's tables."""

from __future__ import annotations

import time
from typing import Any

from lm.record import Key
from sweeps.space import SweepSpec


def make_callback(spec: SweepSpec, quiet: bool):
    from ray import tune

    swept = spec.swept_params

    def describe(config: dict[str, Any]) -> str:
        parts = []
        for key in swept:
            value = config.get(key)
            short = key.split(".")[-1]
            parts.append(f"{short}={value:.3g}" if isinstance(value, float) else f"{short}={value}")
        return " ".join(parts)

    class ConsoleLines(tune.Callback):
        """One line per evaluation and per trial end, instead of Ray's tables."""

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if quiet:
                return
            mark = " DIVERGED" if result.get(Key.diverged) else ""
            val = result.get(Key.val_loss)
            val_text = f"{val:.4f}" if isinstance(val, float) else str(val)
            print(
                f"{time.strftime('%H:%M:%S')} {trial.trial_id} | tokens {result.get(Key.tokens_seen, 0):>11,} | "
                f"val_loss {val_text}{mark} | {describe(trial.config)}",
                flush=True,
            )

        def on_trial_complete(self, iteration, trials, trial, **info):
            last = trial.last_result or {}
            print(
                f"{time.strftime('%H:%M:%S')} {trial.trial_id} finished at {last.get(Key.tokens_seen, 0):,} tokens "
                f"(best val_loss {last.get(Key.best_val_loss)})",
                flush=True,
            )

        def on_trial_error(self, iteration, trials, trial, **info):
            print(
                f"{time.strftime('%H:%M:%S')} {trial.trial_id} ERROR (see results for the message)",
                flush=True,
            )

    return ConsoleLines()
