"""The training loop: every sweep trial and every CLI run goes through `train()`.

    python -m lm.train                                   # tiny model on the built-in story corpus
    python -m lm.train --config configs/tiny.yaml --optimizer.lr 1e-3 --train.out_dir runs/lr1e-3
    python -m lm.train --resume-from runs/default/checkpoints/final.pt --train.max_tokens 6_000_000

Each step: get_batch, forward, cross-entropy, backward, clip_gradients, lr from the schedule, AdamW step.
Evaluations run on fixed validation windows at token multiples; each writes a training-state checkpoint
and then calls the caller's `reporter(metrics, checkpoint_path)` (the sweep reports to Ray Tune there).
Nothing here imports Ray.
"""

from __future__ import annotations

import contextlib
import math
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lm.checkpoint import (
    CheckpointError,
    is_training_state,
    load_model_state,
    read_checkpoint,
    save_training_state,
)
from lm.config import Config, ConfigError, parse_override_args
from lm.data import BatchSampler, DataError, open_tokens, read_meta, validation_batches, validation_starts
from lm.metrics import RunLogger
from lm.model import TransformerLM, compile_layers, count_parameters
from lm.optim import AdamW, clip_gradients

Reporter = Callable[[dict[str, Any], Path | None], None]
"""Called after each evaluation with its metrics and the training-state checkpoint written for it."""


def resolve_device(name: str) -> torch.device:
    """ "auto" -> cuda if available, else mps, else cpu; anything else is passed to torch.device."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None = plain fp32). "auto" is bf16 on CUDA cards that support it."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


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


@torch.inference_mode()
def evaluate(model: torch.nn.Module, val: np.ndarray, starts: np.ndarray, config: Config, device, autocast) -> float:
    """Mean cross-entropy (nats/token) over the fixed validation windows."""
    model.eval()
    total, count = 0.0, 0
    for x, y in validation_batches(val, starts, config.model.context_length, config.data.val_batch_size, device):
        # Eager even after compile_layers: a no-grad graph would be a second compile (about 7 s cold on
        # CPU) for a pass that is a few percent of a run.
        with autocast(), torch.compiler.set_stance("force_eager"):
            loss = model(x, y)
        total += loss.item() * y.numel()
        count += y.numel()
    model.train()
    return total / count


def _every(step: int, tokens: int, tokens_per_step: int, steps_interval: int | None, tokens_interval: int | None):
    """True at the first step at or past each multiple of the interval (tokens win over steps)."""
    if tokens_interval is not None:
        return tokens // tokens_interval > (tokens - tokens_per_step) // tokens_interval
    return steps_interval is not None and step % steps_interval == 0


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


def train(config: Config, reporter: Reporter | None = None, resume_from: str | Path | None = None) -> dict[str, Any]:
    """Train `config` to its token budget and return a summary dict.

    `resume_from`: a training-state checkpoint (continues bit for bit: model, optimizer, step, batch
    sampler and RNG states) or a CS336 checkpoint (weights and optimizer only). With a larger
    `train.max_tokens` than the checkpoint's run, the schedule is recomputed for the new budget.
    Divergence (NaN/inf loss, or above `train.divergence_loss`) ends the run without an exception:
    the summary says `diverged` and the last good checkpoint stays. Raises DataError/ConfigError/
    CheckpointError for bad inputs before the first step.
    """
    t = config.train
    out_dir = Path(t.out_dir)
    ckpt_dir = Path(t.checkpoint_dir) if t.checkpoint_dir is not None else out_dir / "checkpoints"
    device = resolve_device(t.device)
    amp_dtype = resolve_precision(t.precision, device)
    train_tokens, val_tokens, meta = open_data(config)
    resume_state = read_checkpoint(resume_from) if resume_from is not None else None

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
    step, tokens_seen, best_val, last_val = 0, 0, math.inf, None
    if resume_state is not None:
        try:
            load_model_state(model, resume_state["model"])
            optimizer.load_state_dict(resume_state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[0]
            raise CheckpointError(f"{resume_from}: does not fit this model/optimizer config ({first})") from None
        step = int(resume_state["iteration"])
        if is_training_state(resume_state):
            tokens_seen = int(resume_state["tokens_seen"])
            best_val = float(resume_state.get("best_val_loss", math.inf))
            last_val = resume_state.get("val_loss")
            sampler.load_state_dict(resume_state["sampler"])
            _set_rng_states(resume_state["rng"])
        else:
            tokens_seen = step * config.tokens_per_step

    if t.compile:
        compile_layers(model)  # compiles on the first step; timed below as compile_time_s
    autocast = (
        (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype is not None else contextlib.nullcontext
    )
    val_starts = validation_starts(len(val_tokens), config.data.val_windows, config.model.context_length)
    total_steps, tps = config.total_steps, config.tokens_per_step
    eval_every_steps = t.eval_interval if t.eval_interval_tokens is None else None
    floor = meta.get("entropy_floor_nats")  # the built-in corpus knows its exact source entropy

    logger = RunLogger(out_dir, total_steps, t.progress, t.tensorboard)
    logger.info(
        f"model {count_parameters(model):,} parameters ({count_parameters(model, False):,} non-embedding) | "
        f"device {device.type}{' bf16 autocast' if amp_dtype else ' fp32'} | {total_steps} steps of {tps:,} "
        f"tokens | data {len(train_tokens):,} train / {len(val_tokens):,} val tokens"
        + (f" | resumed at step {step}" if resume_state is not None else "")
    )
    if device.type == "cpu" and amp_dtype == torch.bfloat16:
        logger.info("warning: bf16 on a CPU without bf16 units is many times slower than fp32")

    params = [p for p in model.parameters() if p.requires_grad]
    diverged_at: int | None = None
    train_loss: float | None = None
    train_time = 0.0  # seconds inside training steps (the sweep benchmark's utilization numerator)
    eval_time = ckpt_time = report_time = 0.0  # where the rest goes (cumulative, reported with each eval)
    compile_time = 0.0  # with train.compile: the first step here, which compiles (not counted as train_time)
    window_start, window_tokens = time.perf_counter(), 0
    started = time.perf_counter()
    ceiling = t.divergence_loss if t.divergence_loss is not None else math.inf

    def state(kind: str) -> dict[str, Any]:
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "iteration": step,
            "tokens_seen": tokens_seen,
            "config": config.to_dict(),
            "sampler": sampler.state_dict(),
            "rng": _rng_states(),
            "best_val_loss": best_val,
            "val_loss": last_val,
            "train_loss": train_loss,
            "kind": kind,
        }

    def write_periodic() -> Path:
        path = save_training_state(state("periodic"), ckpt_dir / f"step_{step:07d}.pt")
        for old in sorted(ckpt_dir.glob("step_*.pt"))[: -t.keep_checkpoints]:
            old.unlink(missing_ok=True)
        return path

    def checkpoint_due() -> bool:
        return t.checkpoint_interval_tokens is not None and _every(
            step, tokens_seen, tps, None, t.checkpoint_interval_tokens
        )

    def evaluate_and_report(train_loss: float | None, lr: float) -> bool:
        """Evaluate on the fixed windows, log, checkpoint, hand both to the reporter. True if diverged."""
        nonlocal last_val, best_val, eval_time, ckpt_time, report_time, diverged_at
        eval_start = time.perf_counter()
        val_loss = evaluate(model, val_tokens, val_starts, config, device, autocast)
        eval_time += time.perf_counter() - eval_start
        if not math.isfinite(val_loss) or val_loss > ceiling:
            diverged_at = step
            logger.info(f"diverged at step {step}: val loss {val_loss}")
            return True
        last_val = val_loss
        improved = val_loss < best_val
        best_val = min(best_val, val_loss)
        metrics = {
            "step": step,
            "tokens_seen": tokens_seen,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "val_perplexity": math.exp(min(val_loss, 700.0)),
            "best_val_loss": best_val,
            "lr": lr,
            "elapsed_s": time.perf_counter() - started,
            "train_time_s": train_time,
            "compile_time_s": compile_time,
            "eval_time_s": eval_time,
            "checkpoint_time_s": ckpt_time,
            "report_time_s": report_time,  # up to the previous report
            "final_eval": step == total_steps,  # lets a sweep tell "ran to the end" from "stopped"
        }
        logger.record("eval", metrics)  # files first: a trial stopped by its scheduler ends in the reporter
        ckpt_start = time.perf_counter()
        if improved and t.save_best_and_final:
            save_training_state(state("best"), ckpt_dir / "best.pt")
        ckpt = write_periodic() if t.checkpoint_interval_tokens is None or checkpoint_due() else None
        report_start = time.perf_counter()
        ckpt_time += report_start - ckpt_start
        if reporter is not None:
            reporter(metrics, ckpt)
        report_time += time.perf_counter() - report_start
        return False

    try:
        if resume_state is not None and step >= total_steps:
            # Resumed at the very end (e.g. a sweep restored a trial whose completion it had not recorded):
            # evaluate and report again, so the caller sees the final result instead of nothing.
            evaluate_and_report(resume_state.get("train_loss"), config.lr_at(max(step - 1, 0)))
        while step < total_steps:
            step_start = time.perf_counter()
            x, y = sampler.next(device)
            lr = config.lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast():
                loss = model(x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = clip_gradients(params, o.grad_clip) if o.grad_clip is not None else None
            optimizer.step()
            step += 1
            tokens_seen += tps
            window_tokens += tps
            if t.compile and compile_time == 0.0:
                compile_time = time.perf_counter() - step_start
                logger.info(f"compiled in {compile_time:.1f} s (first step)")
                window_start, window_tokens = time.perf_counter(), 0
            else:
                train_time += time.perf_counter() - step_start

            do_log = step % t.log_interval == 0 or step == total_steps
            do_eval = step == total_steps or _every(step, tokens_seen, tps, eval_every_steps, t.eval_interval_tokens)
            if do_log or do_eval:
                # .item() syncs with the device: only at log/eval steps, never every step.
                train_loss = loss.item()
                if not math.isfinite(train_loss) or train_loss > ceiling:
                    diverged_at = step
                    logger.info(f"diverged at step {step}: train loss {train_loss}")
                    break
            if do_log:
                now = time.perf_counter()
                logger.record(
                    "train",
                    {
                        "step": step,
                        "tokens_seen": tokens_seen,
                        "train_loss": train_loss,
                        "lr": lr,
                        "grad_norm": grad_norm.item() if grad_norm is not None else None,
                        "tokens_per_s": window_tokens / max(now - window_start, 1e-9),
                        "elapsed_s": now - started,
                    },
                )
                window_start, window_tokens = now, 0
            if do_eval:
                if evaluate_and_report(train_loss, lr):
                    break
                window_start = time.perf_counter()  # eval and checkpoint time is not training throughput
            elif checkpoint_due():
                write_periodic()

        elapsed = time.perf_counter() - started
        if diverged_at is None and step == total_steps and t.save_best_and_final:
            save_training_state(state("final"), ckpt_dir / "final.pt")
        summary = {
            "status": "diverged" if diverged_at is not None else "completed",
            "diverged": diverged_at is not None,
            "diverged_step": diverged_at,
            "steps": step,
            "tokens_seen": tokens_seen,
            "final_val_loss": last_val,
            "best_val_loss": best_val if math.isfinite(best_val) else None,
            "entropy_floor": floor,
            "elapsed_s": elapsed,
            "train_time_s": train_time,
            "compile_time_s": compile_time,
            "eval_time_s": eval_time,
            "checkpoint_time_s": ckpt_time,
            "report_time_s": report_time,
            "tokens_per_s": (tokens_seen - (resume_state or {}).get("tokens_seen", 0) - (tps if compile_time else 0))
            / max(train_time, 1e-9),
            "out_dir": str(out_dir),
        }
        if diverged_at is not None and reporter is not None:
            penalty = t.divergence_loss if t.divergence_loss is not None else 1e4
            # Reported as the ceiling (>= every loss a healthy run can report), so schedulers rank it last.
            reporter(
                {
                    "step": step,
                    "tokens_seen": tokens_seen,
                    "val_loss": float(penalty),
                    "diverged": True,
                    "diverged_step": diverged_at,
                    "best_val_loss": summary["best_val_loss"],
                },
                None,
            )
        logger.info(_summary_line(summary))
        return summary
    finally:
        logger.close()


def _summary_line(summary: dict[str, Any]) -> str:
    if summary["diverged"]:
        return f"DIVERGED at step {summary['diverged_step']}; last good checkpoint kept in {summary['out_dir']}"
    line = f"done: {summary['steps']} steps, {summary['tokens_seen']:,} tokens"
    if summary["final_val_loss"] is not None:
        line += f" | val loss {summary['final_val_loss']:.4f} (best {summary['best_val_loss']:.4f})"
    if summary["entropy_floor"] is not None and summary["final_val_loss"] is not None:
        gap = summary["final_val_loss"] - summary["entropy_floor"]
        line += f" | entropy floor {summary['entropy_floor']:.4f} nats/token (gap {gap:.4f})"
    return line + f" | {summary['tokens_per_s']:,.0f} tokens/s | {summary['elapsed_s']:.1f} s"


def config_from_cli(args: list[str]) -> tuple[Config, str | None]:
    """Parse `--config FILE`, `--resume-from CKPT` and dotted overrides into a validated Config.

    Without --config, a resumed run takes the config saved in its checkpoint; otherwise the defaults.
    """
    config_path, resume_from, rest = None, None, []
    i = 0
    while i < len(args):
        key, eq, value = args[i].partition("=")
        if key in ("--config", "--resume-from"):
            if not eq:
                if i + 1 >= len(args):
                    raise ConfigError(f"command line: {key} needs a value")
                value, i = args[i + 1], i + 1
            if key == "--config":
                config_path = value
            else:
                resume_from = value
        else:
            rest.append(args[i])
        i += 1
    overrides = parse_override_args(rest)
    if config_path is not None:
        return Config.from_file(config_path, overrides), resume_from
    if resume_from is not None:
        saved = read_checkpoint(resume_from).get("config")
        if saved is not None:
            return Config.from_dict(saved, source=str(resume_from)).replace(overrides, "command line"), resume_from
    return Config().replace(overrides, "command line"), resume_from


USAGE = """usage: python -m lm.train [--config FILE.yaml|.json] [--resume-from CKPT] [--section.field VALUE ...]
  sections: model, optimizer, data, train (see lm/config.py); e.g. --optimizer.lr 3e-4 --train.max_tokens 2e6"""


def run_cli(body: Callable[[], dict[str, Any]], debug: bool = False) -> int:
    """The training CLIs' exit-code contract around `body` (which returns a `train` summary).

    Bad input (ConfigError, DataError, CheckpointError) -> one line `error: ...` on stderr and 2, with the
    traceback only when `debug`; a diverged run -> 1; otherwise 0.
    """
    try:
        summary = body()
    except (ConfigError, DataError, CheckpointError) as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1 if summary["diverged"] else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(USAGE)
        return 0

    def body() -> dict[str, Any]:
        config, resume_from = config_from_cli([a for a in argv if a != "--debug"])
        return train(config, resume_from=resume_from)

    return run_cli(body, debug="--debug" in argv)


if __name__ == "__main__":
    sys.exit(main())
