"""Where a sweep's curves go besides its own files: TensorBoard (on by default), Weights & Biases, MLflow.

```yaml
tracking:
  tensorboard: true                                   # tensorboard --logdir <experiment dir>
  wandb: {project: lm-sweeps, entity: null, mode: online}      # or --wandb PROJECT; mode offline: local files
  mlflow: {tracking_uri: sqlite:///mlflow.db, experiment: null}  # null experiment: the sweep's name
```

Every backend gets one run per trial, its metrics stepped by tokens seen (fair across batch sizes, and the clock
of the scheduler), the trial's full config with the swept parameters marked, and at the end its status and best
metric. The callbacks run in the driver: a trial's worker never talks to a tracking server, so a backend that
fails (network down, bad credentials) is warned about once and switched off, and never fails a trial. W&B and
MLflow are optional extras (`pip install -e ".[wandb]"`, `".[mlflow]"` or `".[tracking]"`): asking for one that is
not installed is one line naming the extra, before Ray starts (`check_tracking`).
"""

from __future__ import annotations

import importlib.util
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NoReturn

from lm.record import Key
from sweeps.trial_status import end_status

if TYPE_CHECKING:
    from sweeps.space import SweepSpec

Fail = Callable[[str, str, Any], NoReturn]  # fail(key, expected, got): raises the space file's one-line error
STATUS_KEY = "status"
"""Summary/tag key of a trial's status at its end (completed, stopped_early, diverged, error)."""


@dataclass
class Wandb:
    """Weights & Biases: one run per trial, grouped by the sweep's name."""

    project: str | None = None
    """W&B project; null: no W&B (`--wandb PROJECT` sets it)."""
    entity: str | None = None
    """W&B team or user; null: your default entity."""
    mode: Literal["online", "offline", "disabled"] = "online"
    """online (needs `wandb login` or WANDB_API_KEY), offline (run files under <experiment>/wandb: `wandb sync`
    uploads them later) or disabled. The environment's WANDB_MODE wins."""


@dataclass
class Mlflow:
    """MLflow: one run per trial in an experiment named after the sweep."""

    tracking_uri: str | None = None
    """MLflow tracking URI (http://host:5000, sqlite:///mlflow.db, a directory); null: no MLflow."""
    experiment: str | None = None
    """MLflow experiment; null: the sweep's name."""


@dataclass
class Tracking:
    """Where trial curves are logged besides the experiment directory's own files."""

    tensorboard: bool = True
    """Event files per trial in the experiment directory, stepped by tokens seen, with the HParams tab."""
    wandb: Wandb = field(default_factory=Wandb)
    """Weights & Biases (off unless a project is given)."""
    mlflow: Mlflow = field(default_factory=Mlflow)
    """MLflow (off unless a tracking URI is given)."""


EXTRAS = {"wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}
"""backend -> (module it needs, the pyproject extra that installs it)."""


def check_tracking(spec: SweepSpec, fail: Fail) -> None:
    """Each backend asked for is installed (else one line naming the extra); called by `parse_space`."""
    t = spec.tracking
    for backend, wanted in (("wandb", t.wandb.project), ("mlflow", t.mlflow.tracking_uri)):
        module, extra = EXTRAS[backend]
        if wanted is not None and importlib.util.find_spec(module) is None:
            fail(
                f"tracking.{backend}",
                f'the \'{module}\' package: pip install -e ".[{extra}]" (or ".[tracking]")',
                f"{backend} not installed",
            )


def tracking_callbacks(spec: SweepSpec, name: str, exp_dir: Path) -> list[Any]:
    """The Ray Tune callbacks of the backends `spec.tracking` turns on (Ray must be importable)."""
    t = spec.tracking
    callbacks: list[Any] = [_tensorboard_callback(spec) if t.tensorboard else _no_tensorboard()]
    if t.wandb.project is not None:
        callbacks.append(_tracker_callback(WandbRuns(spec, name, exp_dir)))
    if t.mlflow.tracking_uri is not None:
        callbacks.append(_tracker_callback(MlflowRuns(spec, name)))
    return callbacks


# ---------------------------------------------------------------------------------------------------
# What every backend is given
# ---------------------------------------------------------------------------------------------------


def numeric_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The record's numeric, finite fields of a Ray result (booleans as 0/1 left out)."""
    out = {}
    for key in Key:
        value = result.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[str(key)] = float(value)
    return out


def trial_config(spec: SweepSpec, sampled: dict[str, Any]) -> dict[str, Any]:
    """The trial's full config (nested sections) plus `swept`: {dotted path: value} of what the search chose."""
    try:
        config = spec.trial_config(sampled).to_dict()
    except Exception:  # a config the trainable also rejects: the trial errors; log what was sampled
        config = {}
    return {**config, "swept": {k: sampled[k] for k in spec.swept_params if k in sampled}}


def flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optimizer": {"lr": 1}} -> {"optimizer.lr": 1}."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class BestByTrial:
    """Each trial's best value of the sweep's metric so far (`mode` "min" or "max"); non-numbers are passed over."""

    def __init__(self, mode: str):
        self.better = min if mode == "min" else max
        self.values: dict[str, float] = {}

    def update(self, trial_id: str, value: Any) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            old = self.values.get(trial_id)
            self.values[trial_id] = value if old is None else self.better(old, value)

    def get(self, trial_id: str) -> float | None:
        return self.values.get(trial_id)


class Tracker:
    """A backend's runs, one per trial. Subclasses open, log to and close runs; `_tracker_callback` calls them and
    switches the backend off, with one warning line, at its first failure."""

    label = "tracking"

    def start(self, trial_id: str, config: dict[str, Any]) -> None: ...

    def log(self, trial_id: str, metrics: dict[str, float], step: int) -> None: ...

    def end(self, trial_id: str, summary: dict[str, Any], failed: bool) -> None: ...


def _tracker_callback(tracker: Tracker) -> Any:
    from ray import tune

    from sweeps import ray_compat

    spec = tracker.spec  # type: ignore[attr-defined]
    best_key = spec.metric.name

    class TrackerCallback(tune.Callback):
        def __init__(self) -> None:
            self.off = False
            self.best = BestByTrial(spec.metric.mode)

        def _guard(self, action: Callable[[], None]) -> None:
            if self.off:
                return
            try:
                action()
            except Exception as e:  # any failure of the backend: a sweep never dies of its tracking
                self.off = True
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                print(
                    f"{time.strftime('%H:%M:%S')} warning: {tracker.label} failed ({first}): "
                    f"{tracker.label} is off for the rest of this sweep; the sweep goes on",
                    flush=True,
                )

        def on_trial_start(self, iteration, trials, trial, **info):
            self._guard(lambda: tracker.start(trial.trial_id, trial_config(spec, trial.config)))

        def on_trial_result(self, iteration, trials, trial, result, **info):
            metrics = numeric_metrics(result)
            self.best.update(trial.trial_id, metrics.get(best_key))
            self._guard(lambda: tracker.log(trial.trial_id, metrics, int(result.get(Key.tokens_seen, 0))))

        def _end(self, trial: Any, failed: bool) -> None:
            summary: dict[str, Any] = {STATUS_KEY: end_status(trial.last_result, failed)}
            if (best := self.best.get(trial.trial_id)) is not None:
                summary[f"best_{best_key}"] = best
            best = ray_compat.best_checkpoint_path(trial)
            if best is not None:
                summary["best_checkpoint"] = best
            self._guard(lambda: tracker.end(trial.trial_id, summary, failed))

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._end(trial, failed=False)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._end(trial, failed=True)

    return TrackerCallback()


# ---------------------------------------------------------------------------------------------------
# Weights & Biases
# ---------------------------------------------------------------------------------------------------


class WandbRuns(Tracker):
    """One W&B run per trial (id `<sweep>-<trial id>`: a resumed trial continues its run), group = the sweep,
    every metric charted against tokens_seen."""

    label = "W&B"

    def __init__(self, spec: SweepSpec, name: str, exp_dir: Path):
        self.spec, self.name, self.dir = spec, name, Path(exp_dir)
        self.runs: dict[str, Any] = {}

    def start(self, trial_id: str, config: dict[str, Any]) -> None:
        import wandb

        settings = self.spec.tracking.wandb
        self.dir.mkdir(parents=True, exist_ok=True)
        run = wandb.init(
            project=settings.project,
            entity=settings.entity,
            mode=settings.mode,
            group=self.name,
            name=trial_id,
            id=f"{self.name}-{trial_id}",
            resume="allow",
            config=config,
            dir=str(self.dir),
            reinit="create_new",  # several trials' runs open at once in this one process
            settings=wandb.Settings(silent=True, console="off"),
        )
        run.define_metric(Key.tokens_seen)
        run.define_metric("*", step_metric=Key.tokens_seen)
        self.runs[trial_id] = run

    def log(self, trial_id: str, metrics: dict[str, float], step: int) -> None:
        if trial_id in self.runs:
            self.runs[trial_id].log(metrics)

    def end(self, trial_id: str, summary: dict[str, Any], failed: bool) -> None:
        run = self.runs.pop(trial_id, None)
        if run is not None:
            run.summary.update(summary)
            run.finish(exit_code=1 if failed else 0)


# ---------------------------------------------------------------------------------------------------
# MLflow
# ---------------------------------------------------------------------------------------------------


class MlflowRuns(Tracker):
    """One MLflow run per trial (tagged with the sweep and trial id: a resumed trial continues its run), params =
    the trial's config as dotted paths, metric history on the tokens_seen step, the best checkpoint as a tag."""

    label = "MLflow"

    def __init__(self, spec: SweepSpec, name: str):
        self.spec, self.name = spec, name
        self.client: Any = None
        self.experiment_id: str | None = None
        self.runs: dict[str, str] = {}

    def _connect(self) -> None:
        if self.client is not None:
            return
        from mlflow.tracking import MlflowClient

        settings = self.spec.tracking.mlflow
        self.client = MlflowClient(tracking_uri=settings.tracking_uri)
        experiment_name = settings.experiment or self.name
        found = self.client.get_experiment_by_name(experiment_name)
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(experiment_name)

    def start(self, trial_id: str, config: dict[str, Any]) -> None:
        self._connect()
        existing = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.sweep = '{self.name}' and tags.trial_id = '{trial_id}'"
        )
        if existing:  # --resume, or a retried trial: same run
            self.runs[trial_id] = existing[0].info.run_id
            self.client.update_run(existing[0].info.run_id, status="RUNNING")
            return
        swept = config.get("swept", {})
        run = self.client.create_run(
            self.experiment_id,
            run_name=trial_id,
            tags={"sweep": self.name, "trial_id": trial_id, "swept": ",".join(swept)},
        )
        from mlflow.entities import Param

        params = {k: v for k, v in flat({k: v for k, v in config.items() if k != "swept"}).items()}
        batch = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(batch), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run.info.run_id, params=batch[i : i + 100])
        self.runs[trial_id] = run.info.run_id

    def log(self, trial_id: str, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        run_id = self.runs.get(trial_id)
        if run_id is None:
            return
        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def end(self, trial_id: str, summary: dict[str, Any], failed: bool) -> None:
        run_id = self.runs.pop(trial_id, None)
        if run_id is None:
            return
        for key, value in summary.items():
            self.client.set_tag(run_id, key, str(value))
        self.client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")


# ---------------------------------------------------------------------------------------------------
# TensorBoard
# ---------------------------------------------------------------------------------------------------


def _tensorboard_callback(spec: SweepSpec) -> Any:
    """Ray's TensorBoard logger with tokens seen as every scalar's step, and an HParams entry per trial: the swept
    parameters against the best and last metric and the status."""
    from ray.tune.logger import TBXLoggerCallback
    from ray.tune.result import TIMESTEPS_TOTAL

    metric = spec.metric.name

    class TokensTensorBoard(TBXLoggerCallback):
        def __init__(self) -> None:
            super().__init__()
            self._best = BestByTrial(spec.metric.mode)
            self._failed = False

        def log_trial_result(self, iteration, trial, result):
            # Ray steps scalars by timesteps_total when a result has it, else by its report count.
            result = {**result, TIMESTEPS_TOTAL: result.get(Key.tokens_seen) or result.get(TIMESTEPS_TOTAL)}
            self._best.update(trial.trial_id, result.get(metric))
            super().log_trial_result(iteration, trial, result)

        def log_trial_end(self, trial, failed=False):
            self._failed = failed
            super().log_trial_end(trial, failed)

        def _try_log_hparams(self, trial, result):
            from tensorboardX.summary import hparams

            params = {k: v for k, v in trial.evaluated_params.items() if isinstance(v, (int, float, str, bool))}
            params[STATUS_KEY] = end_status(trial.last_result, self._failed)
            metrics = {}
            best = self._best.get(trial.trial_id)
            if best is not None:
                metrics[f"hparams/best_{metric}"] = best
            if isinstance(result.get(metric), (int, float)):
                metrics[f"hparams/final_{metric}"] = result[metric]
            if isinstance(result.get(Key.tokens_seen), (int, float)):
                metrics[f"hparams/{Key.tokens_seen}"] = result[Key.tokens_seen]
            writer = self._trial_writer[trial]
            for tag in hparams(hparam_dict=params, metric_dict=metrics):
                writer.file_writer.add_summary(tag)
            # The HParams tab reads each metric's value from a scalar of the same tag.
            step = int(result.get(Key.tokens_seen) or 0)
            for tag, value in metrics.items():
                writer.add_scalar(tag, value, global_step=step)

    return TokensTensorBoard()


def _no_tensorboard() -> Any:
    """A do-nothing TensorBoard logger: Ray adds its own unless one is given (and the env switch is global)."""
    from ray.tune.logger import TBXLoggerCallback

    class NoTensorBoard(TBXLoggerCallback):
        def setup(self, *args, **kwargs):
            pass

        def log_trial_start(self, trial):
            pass

        def log_trial_result(self, iteration, trial, result):
            pass

        def log_trial_end(self, trial, failed=False):
            pass

    return NoTensorBoard()
