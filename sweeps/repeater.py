"""`SeedRepeater`: Ray's Repeater (each suggestion trained `repeats` times, the searcher told the group's mean)
that also forwards intermediate results. A module of its own because it imports Ray (sweeps/repeats.py must not:
validation runs without Ray), and at module level because Ray pickles the searcher by reference (tuner.pkl).

Ray's Repeater forwards no `on_trial_result`, so the Optuna study (sweeps/study_search.py) would get no curves:
here the first trial of each group, the one the searcher knows, reports its own. (Resuming needs nothing more:
Tune's SearchGenerator saves the Repeater's groups itself, as the state of a wrapper, beside the searcher's.)
"""

from __future__ import annotations

from ray.tune.search import Repeater


class SeedRepeater(Repeater):
    """Ray's Repeater whose group leaders report their intermediate results to the searcher."""

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        group = self._trial_id_to_group.get(trial_id)
        if group is not None and group.primary_trial_id == trial_id:
            self.searcher.on_trial_result(trial_id, result)
