"""The training loop: every sweep trial, every CLI run and the benchmarks go through these pieces.

    python -m lm.train                                   # tiny model on the built-in story corpus
    python -m lm.train --config configs/tiny.yaml --optimizer.lr 1e-3 --train.out_dir runs/lr1e-3
    python -m lm.train --resume-from runs/default/checkpoints/final.pt --train.max_tokens 6_000_000

`train(config)` is `setup` (device, data, model, optimizer, batch sampler, resume), then `run_loop`: until the
token budget is spent, `train_step` (forward, cross-entropy, backward, clip_gradients, AdamW at the schedule's
learning rate) and, at each evaluation, `evaluate_and_report` (fixed validation windows, a training-state
checkpoint, then the caller's `reporter(metrics, checkpoint_path)`: the sweep reports to Ray Tune there), then
`finish` (final checkpoint, `TrainSummary`). Nothing here imports Ray.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import math
import random
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lm import cli
from lm.checkpoint import (
    CheckpointError,
    check_resumable,
    is_training_state,
    load_model_state,
    read_checkpoint,
    save_training_state,
)
from lm.config import Config
from lm.data import BatchSampler, open_tokens, read_meta, validation_batches, validation_starts
from lm.fields import ConfigError
from lm.files import check_output_dir
from lm.metrics import RunLogger, open_wandb
from lm.model import TransformerLM, compile_layers, count_parameters
from lm.optim import AdamW, clip_gradients
from lm.record import Key, Record

Reporter = Callable[[dict[str, Any], Path | None], None]
"""Called after each evaluation with its metrics (`Record.to_dict()`) and the training-state checkpoint written
for it (None when no checkpoint was due, and on the report of a diverged run)."""

Autocast = Callable[[], AbstractContextManager]
"""A factory of the context that runs forward passes (autocast to bf16, or nothing for fp32)."""


# ---- device, precision and data ----


def resolve_device(name: str, field: str = "train.device") -> torch.device:
    """ "auto" -> cuda if available, else mps, else cpu; anything else must be a torch device this machine has.

    Raises ConfigError "FIELD: expected ..., got NAME (why)" for a string torch does not parse ("banana"), a
    device this torch build or machine lacks ("cuda" on a CPU-only build), or an index past the last device.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        why = "not a torch device"
    else:
        why = _missing_device(device)
        if why is None:
            return device
    raise ConfigError(
        f'{field}: expected "auto", "cpu", "cuda", "cuda:N" or "mps" (one this machine has), got {name!r} ({why})'
    )


def _missing_device(device: torch.device) -> str | None:
    """Why this machine cannot run on `device`, or None when it can."""
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            return "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        if (device.index or 0) >= count:
            return f"this machine has {count} CUDA device{'s' if count > 1 else ''}: cuda:0 to cuda:{count - 1}"
        return None
    if device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        return None if mps is not None and mps.is_available() else "MPS is not available here"
    backend = getattr(torch, device.type, None)  # xpu and the like: torch.xpu.is_available()
    available = backend is not None and getattr(backend, "is_available", lambda: False)()
    return None if available else f"no {device.type} device here"


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None = plain fp32). "auto" is bf16 on CUDA cards that support it."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def autocast_for(device: torch.device, dtype: torch.dtype | None) -> Autocast:
    """The forward-pass context for `dtype` on `device` (None: plain fp32, no autocast)."""
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


def data_paths(config: Config) -> tuple[Path, Path, dict[str, Any]]:
    """(train file, val file, meta.json of the train file); the built-in corpus when no path is set."""
    if config.data.train_path is None:
        from lm.stories import builtin_data_dir

        root = builtin_data_dir()
        return root / "train.npy", root / "val.npy", read_meta(root / "train.npy")
    train_path, val_path = Path(config.data.train_path), Path(config.data.val_path)
    return train_path, val_path, read_meta(train_path)


def open_data(config: Config) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Open and check both token files (raises DataError naming the file and field)."""
    train_path, val_path, meta = data_paths(config)
    m = config.model
    train = open_tokens(train_path, m.vocab_size, m.context_length, config.data.dtype, "data.train_path")
    val = open_tokens(val_path, m.vocab_size, m.context_length, config.data.dtype, "data.val_path")
    return train, val, meta


# ---- the step and the evaluation (also used by sweeps.placement and the benchmarks) ----


def train_step(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    lr: float,
    grad_clip: float | None = None,
    autocast: Autocast = contextlib.nullcontext,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One optimizer step on the batch `x` -> `y` (each (batch, context) token ids) at learning rate `lr`.

    `model(x, y)` returns the mean cross-entropy (a TransformerLM, or its compiled wrapper). Gradients of every
    parameter the optimizer holds are clipped to global L2 norm `grad_clip` (None: no clipping). Returns the loss
    and the pre-clip gradient norm as device tensors: reading them (`.item()`) waits for the device, so the
    caller decides when.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    with autocast():
        loss = model(x, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = None
    if grad_clip is not None:
        grad_norm = clip_gradients([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
    optimizer.step()
    return loss, grad_norm


@torch.inference_mode()
def evaluate(
    model: torch.nn.Module, val: np.ndarray, starts: np.ndarray, config: Config, device, autocast: Autocast
) -> float:
    """Mean cross-entropy (nats/token) over the fixed validation windows."""
    model.eval()
    total, count = 0.0, 0
    for x, y in validation_batches(val, starts, config.model.context_length, config.data.val_batch_size, device):
        # Eager even after compile_layers: a no-grad graph would be a second compile for a pass that is a few
        # percent of a run.
        with autocast(), torch.compiler.set_stance("force_eager"):
            loss = model(x, y)
        total += loss.item() * y.numel()
        count += y.numel()
    model.train()
    return total / count


# ---- the state a run carries, and where its time goes ----


def _rng_states() -> dict[str, Any]:
    states = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


@dataclass
class TrainState:
    """What changes from step to step, and what a training-state checkpoint holds besides the config."""

    model: TransformerLM
    optimizer: AdamW
    sampler: BatchSampler
    step: int = 0
    tokens_seen: int = 0
    best_val: float = math.inf
    last_val: float | None = None
    train_loss: float | None = None

    def snapshot(self, config: Config, kind: str) -> dict[str, Any]:
        """The training-state checkpoint (lm.checkpoint) of this moment; `kind` is periodic, best or final."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "iteration": self.step,
            Key.tokens_seen.value: self.tokens_seen,
            "config": config.to_dict(),
            "sampler": self.sampler.state_dict(),
            "rng": _rng_states(),
            Key.best_val_loss.value: self.best_val,
            Key.val_loss.value: self.last_val,
            Key.train_loss.value: self.train_loss,
            "kind": kind,
        }

    def restore(self, saved: dict[str, Any], source: str | Path, tokens_per_step: int) -> None:
        """Continue from `saved`: a training state (bit for bit) or a CS336 checkpoint (weights, optimizer, step).

        `saved` comes from `read_checkpoint`, which checked the type of every entry, and passed `check_resumable`
        (`setup` checks both before building the model). Raises CheckpointError naming `source` when the weights
        or optimizer do not fit this model.
        """
        try:
            load_model_state(self.model, saved["model"])
            self.optimizer.load_state_dict(saved["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[0]
            raise CheckpointError(f"{source}: does not fit this model/optimizer config ({first})") from None
        self.step = int(saved["iteration"])
        if not is_training_state(saved):
            self.tokens_seen = self.step * tokens_per_step
            return
        self.tokens_seen = int(saved[Key.tokens_seen])
        self.best_val = float(saved.get(Key.best_val_loss, math.inf))
        self.last_val = saved.get(Key.val_loss)
        self.train_loss = saved.get(Key.train_loss)
        self.sampler.load_state_dict(saved["sampler"])
        _set_rng_states(saved["rng"])


@dataclass
class Timers:
    """Cumulative seconds per phase of a run; `train` (inside steps) is the sweep benchmark's utilization numerator."""

    started: float = field(default_factory=time.perf_counter)
    train: float = 0.0
    compile: float = 0.0  # with train.compile: the first step, which compiles (not counted as train)
    eval: float = 0.0
    checkpoint: float = 0.0
    report: float = 0.0

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Add the time spent inside the block to phase `name` (also when the block raises)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            setattr(self, name, getattr(self, name) + time.perf_counter() - start)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


@dataclass
class TrainSummary:
    """What `train` returns (fields also readable as `summary["status"]`)."""

    status: str  # "completed" or "diverged"
    diverged: bool
    diverged_step: int | None
    steps: int
    tokens_seen: int
    final_val_loss: float | None
    best_val_loss: float | None
    entropy_floor: float | None  # nats/token: the exact source entropy of the built-in corpus, else None
    elapsed_s: float
    train_time_s: float
    compile_time_s: float
    eval_time_s: float
    checkpoint_time_s: float
    report_time_s: float
    tokens_per_s: float  # training tokens of this run (or resume) per second inside steps
    out_dir: str

    def __getitem__(self, name: str) -> Any:
        return getattr(self, name)


@dataclass
class Run:
    """One run, as `setup` prepared it: the pieces of the loop take this."""

    config: Config
    state: TrainState
    device: torch.device
    autocast: Autocast
    train_tokens: np.ndarray
    val_tokens: np.ndarray
    val_starts: np.ndarray
    entropy_floor: float | None
    logger: RunLogger
    ckpt_dir: Path
    reporter: Reporter | None
    resumed_at_tokens: int | None  # tokens_seen of the checkpoint this run resumed from
    timers: Timers = field(default_factory=Timers)

    @property
    def ceiling(self) -> float:
        """A loss above this (or NaN/inf) means the run diverged."""
        return self.config.train.divergence_loss if self.config.train.divergence_loss is not None else math.inf


# ---- the run: setup, loop, finish ----


def setup(config: Config, reporter: Reporter | None = None, resume_from: str | Path | None = None) -> Run:
    """Check the inputs, then build model, optimizer and sampler (restored from `resume_from` if given).

    Raises an InputError for bad inputs before any model is built: DataError (token files, meta.json),
    ConfigError (a device this machine lacks), CheckpointError (`resume_from`), or an output or checkpoint
    directory that cannot be created and written.
    """
    t = config.train
    device = resolve_device(t.device)
    amp_dtype = resolve_precision(t.precision, device)
    out_dir = check_output_dir(t.out_dir, "train.out_dir")
    if t.checkpoint_dir is not None:
        ckpt_dir = check_output_dir(t.checkpoint_dir, "train.checkpoint_dir")
    else:
        ckpt_dir = check_output_dir(out_dir / "checkpoints", "train.out_dir")
    train_tokens, val_tokens, meta = open_data(config)
    if t.wandb_project is not None and importlib.util.find_spec("wandb") is None:
        open_wandb(t.wandb_project, t.wandb_mode, out_dir, {})  # raises the one-line ConfigError naming the extra
    saved = read_checkpoint(resume_from) if resume_from is not None else None
    if saved is not None:
        check_resumable(saved, resume_from)  # here: a missing field fails before the model is built

    if t.num_threads is not None:
        torch.set_num_threads(t.num_threads)
    if device.type == "cuda" and t.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(t.seed)
    random.seed(t.seed)
    model = TransformerLM.from_config(config.model, device=device)
    o = config.optimizer
    optimizer = AdamW(model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)
    sampler = BatchSampler(train_tokens, config.data.batch_size, config.model.context_length, seed=t.seed)
    state = TrainState(model, optimizer, sampler)
    if saved is not None:
        state.restore(saved, resume_from, config.tokens_per_step)
        # The config's AdamW settings win over the saved ones (a resume with changed settings, a PBT trial that
        # continues from another's checkpoint with a perturbed weight decay); the lr is set at every step.
        for group in optimizer.param_groups:
            group.update(betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)
    if t.compile:
        compile_layers(model)  # compiles on the first step, timed as compile_time_s

    wandb_run = open_wandb(t.wandb_project, t.wandb_mode, out_dir, config.to_dict()) if t.wandb_project else None
    logger = RunLogger(out_dir, config.total_steps, t.progress, t.tensorboard, wandb_run)
    logger.info(
        f"model {count_parameters(model):,} parameters ({count_parameters(model, False):,} non-embedding) | "
        f"device {device.type}{' bf16 autocast' if amp_dtype else ' fp32'} | {config.total_steps} steps of "
        f"{config.tokens_per_step:,} tokens | data {len(train_tokens):,} train / {len(val_tokens):,} val tokens"
        + (f" | resumed at step {state.step}" if saved is not None else "")
    )
    if device.type == "cpu" and amp_dtype == torch.bfloat16:
        logger.info("warning: bf16 on a CPU without bf16 units is many times slower than fp32")
    return Run(
        config=config,
        state=state,
        device=device,
        autocast=autocast_for(device, amp_dtype),
        train_tokens=train_tokens,
        val_tokens=val_tokens,
        val_starts=validation_starts(len(val_tokens), config.data.val_windows, config.model.context_length),
        entropy_floor=meta.get("entropy_floor_nats"),  # the built-in corpus knows its exact source entropy
        logger=logger,
        ckpt_dir=ckpt_dir,
        reporter=reporter,
        resumed_at_tokens=state.tokens_seen if saved is not None else None,
    )


def train(config: Config, reporter: Reporter | None = None, resume_from: str | Path | None = None) -> TrainSummary:
    """Train `config` to its token budget and return a summary.

    `resume_from`: a training-state checkpoint (continues bit for bit: model, optimizer, step, batch
    sampler and RNG states) or a CS336 checkpoint (weights and optimizer only). With a larger
    `train.max_tokens` than the checkpoint's run, the schedule is recomputed for the new budget.
    Divergence (NaN/inf loss, or above `train.divergence_loss`) ends the run without an exception:
    the summary says `diverged` and the last good checkpoint stays. Raises DataError/ConfigError/
    CheckpointError for bad inputs before the first step.
    """
    run = setup(config, reporter, resume_from)
    try:
        return finish(run, run_loop(run))
    finally:
        run.logger.close()


def run_loop(run: Run) -> int | None:
    """Train until the budget is spent or the run diverges; returns the step it diverged at, or None."""
    s, config, t = run.state, run.config, run.config.train
    total, tps = config.total_steps, config.tokens_per_step
    if run.resumed_at_tokens is not None and s.step >= total:
        # Resumed at the very end (e.g. a sweep restored a trial whose completion it had not recorded):
        # evaluate and report again, so the caller sees the final result instead of nothing.
        if evaluate_and_report(run, config.lr_at(max(s.step - 1, 0))):
            return s.step
    window_start, window_tokens = time.perf_counter(), 0  # tokens/s between log lines
    while s.step < total:
        step_start = time.perf_counter()
        lr = config.lr_at(s.step)
        x, y = s.sampler.next(run.device)
        loss, grad_norm = train_step(s.model, s.optimizer, x, y, lr, config.optimizer.grad_clip, run.autocast)
        s.step += 1
        s.tokens_seen += tps
        window_tokens += tps
        if t.compile and run.timers.compile == 0.0:
            run.timers.compile = time.perf_counter() - step_start
            run.logger.info(f"compiled in {run.timers.compile:.1f} s (first step)")
            window_start, window_tokens = time.perf_counter(), 0
        else:
            run.timers.train += time.perf_counter() - step_start

        do_log = s.step % t.log_interval == 0 or s.step == total
        do_eval = s.step == total or _due(s, tps, t.eval_interval, t.eval_interval_tokens)
        if do_log or do_eval:
            s.train_loss = loss.item()  # syncs with the device: only at log/eval steps, never every step
            if _diverged(run, s.train_loss, "train"):
                return s.step
        if do_log:
            now = time.perf_counter()
            run.logger.record(
                "train",
                Record(
                    step=s.step,
                    tokens_seen=s.tokens_seen,
                    train_loss=s.train_loss,
                    lr=lr,
                    grad_norm=grad_norm.item() if grad_norm is not None else None,
                    tokens_per_s=window_tokens / max(now - window_start, 1e-9),
                    elapsed_s=run.timers.elapsed(),
                ),
            )
            window_start, window_tokens = now, 0
        if do_eval:
            if evaluate_and_report(run, lr):
                return s.step
            window_start = time.perf_counter()  # eval and checkpoint time is not training throughput
        elif _checkpoint_due(run):
            _write_periodic(run)
    return None


def _due(s: TrainState, tokens_per_step: int, steps_interval: int | None, tokens_interval: int | None) -> bool:
    """True at the first step at or past each multiple of the interval (tokens win over steps)."""
    if tokens_interval is not None:
        return s.tokens_seen // tokens_interval > (s.tokens_seen - tokens_per_step) // tokens_interval
    return steps_interval is not None and s.step % steps_interval == 0


def _checkpoint_due(run: Run) -> bool:
    every = run.config.train.checkpoint_interval_tokens
    return every is not None and _due(run.state, run.config.tokens_per_step, None, every)


def _diverged(run: Run, loss: float, what: str) -> bool:
    """True (and logged) when `loss` is NaN/inf or above the divergence ceiling."""
    if math.isfinite(loss) and loss <= run.ceiling:
        return False
    run.logger.info(f"diverged at step {run.state.step}: {what} loss {loss}")
    return True


def _write_periodic(run: Run) -> Path:
    """A step_*.pt training state; keeps the newest train.keep_checkpoints of them."""
    path = save_training_state(
        run.state.snapshot(run.config, "periodic"), run.ckpt_dir / f"step_{run.state.step:07d}.pt"
    )
    for old in sorted(run.ckpt_dir.glob("step_*.pt"))[: -run.config.train.keep_checkpoints]:
        old.unlink(missing_ok=True)
    return path


def evaluate_and_report(run: Run, lr: float) -> bool:
    """Evaluate on the fixed windows, log, checkpoint, hand both to the reporter. True if the run diverged."""
    s, t, timers = run.state, run.config.train, run.timers
    with timers.phase("eval"):
        val_loss = evaluate(s.model, run.val_tokens, run.val_starts, run.config, run.device, run.autocast)
    if _diverged(run, val_loss, "val"):
        return True
    improved = val_loss < s.best_val
    s.last_val, s.best_val = val_loss, min(s.best_val, val_loss)
    record = Record(
        step=s.step,
        tokens_seen=s.tokens_seen,
        train_loss=s.train_loss,
        val_loss=val_loss,
        val_perplexity=math.exp(min(val_loss, 700.0)),
        best_val_loss=s.best_val,
        lr=lr,
        tokens_per_s=train_tokens_per_s(run),
        elapsed_s=timers.elapsed(),
        train_time_s=timers.train,
        compile_time_s=timers.compile,
        eval_time_s=timers.eval,
        checkpoint_time_s=timers.checkpoint,
        report_time_s=timers.report,  # up to the previous report
        final_eval=s.step == run.config.total_steps,
    )
    run.logger.record("eval", record)  # files first: a trial stopped by its scheduler ends in the reporter
    with timers.phase("checkpoint"):
        if improved and t.save_best_and_final:
            save_training_state(s.snapshot(run.config, "best"), run.ckpt_dir / "best.pt")
        due = t.checkpoint_interval_tokens is None or _checkpoint_due(run)
        ckpt = _write_periodic(run) if due else None
    with timers.phase("report"):
        if run.reporter is not None:
            run.reporter(record.to_dict(), ckpt)
    return False


def train_tokens_per_s(run: Run) -> float:
    """Training tokens per second inside steps, over this run (or since its resume); the compiling step is not
    timed, so its tokens are left out."""
    compiled_tokens = run.config.tokens_per_step if run.timers.compile else 0
    trained = run.state.tokens_seen - (run.resumed_at_tokens or 0) - compiled_tokens
    return trained / max(run.timers.train, 1e-9)


def finish(run: Run, diverged_at: int | None) -> TrainSummary:
    """Write final.pt (a completed run), report a divergence, log and return the summary."""
    s, t, timers = run.state, run.config.train, run.timers
    if diverged_at is None and s.step == run.config.total_steps and t.save_best_and_final:
        save_training_state(s.snapshot(run.config, "final"), run.ckpt_dir / "final.pt")
    summary = TrainSummary(
        status="diverged" if diverged_at is not None else "completed",
        diverged=diverged_at is not None,
        diverged_step=diverged_at,
        steps=s.step,
        tokens_seen=s.tokens_seen,
        final_val_loss=s.last_val,
        best_val_loss=s.best_val if math.isfinite(s.best_val) else None,
        entropy_floor=run.entropy_floor,
        elapsed_s=timers.elapsed(),
        train_time_s=timers.train,
        compile_time_s=timers.compile,
        eval_time_s=timers.eval,
        checkpoint_time_s=timers.checkpoint,
        report_time_s=timers.report,
        tokens_per_s=train_tokens_per_s(run),
        out_dir=str(t.out_dir),
    )
    if diverged_at is not None and run.reporter is not None:
        # Reported as the ceiling (>= every loss a healthy run can report), so schedulers rank it last.
        penalty = t.divergence_loss if t.divergence_loss is not None else 1e4
        record = Record(
            step=s.step,
            tokens_seen=s.tokens_seen,
            val_loss=float(penalty),
            diverged=True,
            diverged_step=diverged_at,
            best_val_loss=summary.best_val_loss,
        )
        run.reporter(record.to_dict(), None)
    run.logger.info(_summary_line(summary))
    return summary


def _summary_line(summary: TrainSummary) -> str:
    if summary.diverged:
        return f"DIVERGED at step {summary.diverged_step}; last good checkpoint kept in {summary.out_dir}"
    line = f"done: {summary.steps} steps, {summary.tokens_seen:,} tokens"
    if summary.final_val_loss is not None:
        line += f" | val loss {summary.final_val_loss:.4f} (best {summary.best_val_loss:.4f})"
    if summary.entropy_floor is not None and summary.final_val_loss is not None:
        gap = summary.final_val_loss - summary.entropy_floor
        line += f" | entropy floor {summary.entropy_floor:.4f} nats/token (gap {gap:.4f})"
    return line + f" | {summary.tokens_per_s:,.0f} tokens/s | {summary.elapsed_s:.1f} s"


def build_parser() -> cli.ArgumentParser:
    """`python -m lm.train` / `lm-train`: options, then every config field (`--section.field VALUE`)."""
    from lm.config import config_help

    p = cli.ArgumentParser(
        prog="python -m lm.train",
        description="Train one model. Any config field can be set with --section.field VALUE (listed below).",
        epilog=config_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        overrides=True,
    )
    p.add_argument("--config", metavar="FILE", help="YAML/JSON config: a path, or a shipped one (tiny.yaml, ...)")
    p.add_argument("--resume-from", metavar="CKPT", help="training-state checkpoint to continue from")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    return p


def config_from_cli(args: argparse.Namespace) -> Config:
    """The validated Config that parsed `lm.train` arguments describe: `--config` (else, when resuming, the
    checkpoint's saved config, else the defaults) with the dotted overrides on top."""
    if args.config is not None:
        return Config.from_file(cli.find_config(args.config), args.overrides)
    if args.resume_from is not None:
        saved = read_checkpoint(args.resume_from).get("config")
        if saved is not None:
            return Config.from_dict(saved, source=str(args.resume_from)).replace(args.overrides, "command line")
    return Config().replace(args.overrides, "command line")


def train_exit_code(config: Config, resume_from: str | Path | None = None) -> int:
    """Train, and return the training CLIs' exit code: 1 if the run diverged, else 0."""
    return 1 if train(config, resume_from=resume_from)["diverged"] else 0


def _command(args: argparse.Namespace) -> int:
    config = config_from_cli(args)
    if args.print_config:
        print(config.to_yaml(), end="")
        return 0
    return train_exit_code(config, args.resume_from)


def main(argv: list[str] | None = None) -> int:
    """`lm-train`: exit 0 when trained, 1 when the run diverged, 2 on bad input (one `error:` line)."""
    return cli.run(_command, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
