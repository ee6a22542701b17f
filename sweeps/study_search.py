"""The Ray side of the Optuna study (imported once Ray is wanted): `StudySearch`, the searcher of every optuna
sweep, and `ExtendedSearchGenerator`, which lets a restored sweep run more trials than it was started with.

Pickled by reference into Ray's saved experiment (tuner.pkl, searcher-state-*.pkl): the class names and
module are part of every saved sweep, so keep them. Like sweeps/ray_compat.py, this module leans on Ray 2.60's
internals (OptunaSearch's _ot_study, _ot_trials, _completed_trials and _setup_study; a restored Tuner's
TuneConfig); tests/test_search.py and tests/test_search_sweeps.py exercise each against the installed Ray.
"""

from __future__ import annotations

from typing import Any

import optuna
from ray.tune.search import ConcurrencyLimiter, Searcher, SearchGenerator
from ray.tune.search.optuna import OptunaSearch

from lm.record import Key
from sweeps.search import START_ATTR


class StudySearch(OptunaSearch):
    """Ray's OptunaSearch (2.60) with three changes:

    - on_trial_result reports the metric at step `tokens_seen` (Ray's uses training_iteration, a count of
      reports), so the study's curves share one clock across batch sizes and restarts;
    - points_to_evaluate are enqueued once per study, named (user attribute "start"), not at every setup
      (Ray enqueues them whenever it sets the study up, which a restore does again on a stored study);
    - a restore marks FAIL the study's RUNNING trials that Ray's saved state does not know (asked after Ray's
      last snapshot, before a crash), so that the sampler's constant liar does not count them as running forever.
    """

    def __init__(self, *args: Any, named_points: dict[str, dict[str, Any]] | None = None, **kwargs: Any):
        self._named_points = named_points or {}
        super().__init__(*args, **kwargs)

    def _setup_study(self, mode: Any) -> None:
        super()._setup_study(mode)
        study = self._ot_study
        named = {t.user_attrs.get(START_ATTR) for t in study.get_trials(deepcopy=False)}
        for name, point in self._named_points.items():
            if name not in named:
                study.enqueue_trial(point, user_attrs={START_ATTR: name})

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        value, step = result.get(self.metric), result.get(Key.tokens_seen)
        if not isinstance(value, (int, float)) or not isinstance(step, (int, float)):
            return
        try:
            self._ot_trials[trial_id].report(float(value), int(step))
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # told before a crash that Ray's saved state did not see: the study keeps its value

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        known = {t._trial_id for t in self._ot_trials.values()}
        storage = self._ot_study._storage
        for trial in self._ot_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            if trial._trial_id not in known:
                storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)


class ExtendedSearchGenerator(SearchGenerator):
    """Tune's SearchGenerator whose restored trial count is raised to `num_samples`.

    A restore sets the generator's state (trials created so far, total to create) from the saved experiment,
    after the Tuner's own num_samples was applied; this keeps the larger of the two, so a restored sweep goes on
    creating trials, numbered on from the saved count. The state it saves holds the new total, which is what a
    later plain restore reads back.
    """

    def __init__(self, searcher: Searcher, num_samples: int):
        super().__init__(searcher)
        self._extended_to = num_samples

    def set_state(self, state: dict[str, Any]) -> None:
        super().set_state(state)
        self._total_samples = max(self._total_samples, self._extended_to)


def extended_search(searcher: Searcher, max_concurrent: int | None, num_samples: int) -> ExtendedSearchGenerator:
    """The search algorithm of an extended sweep: `searcher` (restored from the saved experiment) behind the same
    concurrency limit Tune put it behind, in a generator that creates trials up to `num_samples`."""
    if max_concurrent:
        searcher = ConcurrencyLimiter(searcher, max_concurrent=max_concurrent)
    return ExtendedSearchGenerator(searcher, num_samples)
