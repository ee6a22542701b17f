"""One typed configuration for a training run: model, optimizer, data and training settings.

The training CLI, YAML/JSON files and every sweep trial build these same objects: a file gives a base,
dotted overrides (`optimizer.lr=3e-4`, `--model.d_model 256`) change single fields, and `validate()`
checks the whole before any expensive work starts. Errors are `ConfigError`s whose one-line message
names the source (file) and the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lm.model import ATTENTIONS, FFNS, NORMS, POS_EMBS


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range (one-line message)."""


@dataclass
class ModelConfig:
    """Architecture of the CS336 Transformer LM."""

    vocab_size: int = 257
    """Number of token ids; must cover every id in the data (built-in data: 256 bytes + end-of-text)."""
    context_length: int = 128
    """Tokens per training window; also the maximum RoPE position."""
    d_model: int = 128
    """Width of the residual stream."""
    num_layers: int = 2
    """Number of Transformer blocks."""
    num_heads: int = 4
    """Attention heads; d_model must be divisible by it (and d_model / num_heads even for RoPE)."""
    d_ff: int = 344
    """Hidden width of the feed-forward network (about 8/3 d_model for SwiGLU, 4 d_model for SiLU)."""
    rope_theta: float = 10000.0
    """RoPE base theta."""
    norm: str = "pre"
    """Ablation: "pre" (default), "post" (norm after each residual add) or "none"."""
    pos_emb: str = "rope"
    """Ablation: "rope" or "nope" (no positional encoding; causal attention alone)."""
    ffn: str = "swiglu"
    """Ablation: "swiglu" or "silu" (w2(silu(w1 x)), no gate)."""
    tie_embeddings: bool = False
    """Ablation: share the token embedding with the output layer."""
    attention: str = "sdpa"
    """"sdpa" (PyTorch's fused causal kernel) or "reference" (from-scratch math; slower, same result)."""


@dataclass
class OptimizerConfig:
    """AdamW and the learning-rate schedule (linear warmup, cosine decay ending at the last step)."""

    lr: float = 3e-3
    """Peak learning rate (reached at the end of warmup)."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of `lr` (CS336's min_learning_rate = lr * min_lr_ratio)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay (applied as lr * weight_decay * theta)."""
    warmup_iters: int | None = None
    """Warmup length in steps; when set it wins over warmup_fraction."""
    warmup_fraction: float = 0.05
    """Warmup length as a fraction of the total steps (used when warmup_iters is not set)."""
    grad_clip: float | None = 1.0
    """Maximum global L2 norm of the gradients; null disables clipping."""


@dataclass
class DataConfig:
    """Token data: `.npy` files (memory-mapped) or raw `.bin` files with a dtype; null = built-in corpus."""

    train_path: str | None = None
    """Training tokens (.npy or .bin). Null: the built-in story corpus, generated once and cached."""
    val_path: str | None = None
    """Validation tokens. Null with train_path set: an error; with the built-in corpus: its val split."""
    dtype: str | None = None
    """Token dtype of .bin files (uint16 or uint32); .npy files carry their own; meta.json may give it."""
    batch_size: int = 32
    """Training windows per step."""
    val_windows: int = 128
    """Number of fixed validation windows (the same ones at every eval, in every trial)."""
    val_batch_size: int = 64
    """Windows per forward pass when evaluating (memory only: the loss does not depend on it)."""


@dataclass
class TrainConfig:
    """Length, intervals, device and output of a run. Intervals given in tokens win over those in steps."""

    max_tokens: int = 3_000_000
    """Token budget; steps = max_tokens // (batch_size * context_length)."""
    eval_interval: int | None = None
    """Evaluate every N steps."""
    eval_interval_tokens: int | None = 250_000
    """Evaluate every N tokens (first step at or past each multiple), so batch sizes compare."""
    log_interval: int = 20
    """Log train loss, lr, grad norm and tokens/s every N steps."""
    checkpoint_interval_tokens: int | None = None
    """Write a training-state checkpoint every N tokens; null: at every eval."""
    keep_checkpoints: int = 2
    """Periodic checkpoints kept on disk (best and final are kept besides)."""
    save_best_and_final: bool = True
    """Also write checkpoints/best.pt and final.pt (sweep trials turn this off: Ray keeps theirs)."""
    checkpoint_dir: str | None = None
    """Where checkpoints go; null: out_dir/checkpoints (sweep trials use a private temporary directory)."""
    seed: int = 0
    """Seeds model init, batch sampling and dropout-free training: same seed, same losses (CPU)."""
    device: str = "auto"
    """"auto" (cuda, then mps, then cpu), or a torch device string."""
    precision: str = "auto"
    """"auto" (bf16 autocast on CUDA, fp32 elsewhere), "fp32" or "bf16"."""
    tf32: bool = True
    """Allow TF32 matmuls on CUDA."""
    compile: bool = False
    """torch.compile the model."""
    num_threads: int | None = None
    """torch intra-op threads on CPU; null keeps torch's default (or Ray's per-trial setting)."""
    divergence_loss: float | None = 10.0
    """Stop and mark the run diverged when a train or val loss exceeds this (NaN/inf always do)."""
    out_dir: str = "runs/default"
    """Run directory: logs, metrics, TensorBoard events and checkpoints."""
    progress: str = "auto"
    """Console output: "auto" (a progress bar in a terminal, plain lines otherwise), "bar", "lines", "off"."""
    tensorboard: bool = True
    """Write TensorBoard event files into out_dir/tb."""


@dataclass
class Config:
    """A whole training run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    # ---- derived quantities (the loop and the sweep use these; nothing else recomputes them) ----
    @property
    def tokens_per_step(self) -> int:
        return self.data.batch_size * self.model.context_length

    @property
    def total_steps(self) -> int:
        return self.train.max_tokens // self.tokens_per_step

    @property
    def warmup_steps(self) -> int:
        if self.optimizer.warmup_iters is not None:
            return self.optimizer.warmup_iters
        return int(round(self.optimizer.warmup_fraction * self.total_steps))

    @property
    def min_lr(self) -> float:
        return self.optimizer.lr * self.optimizer.min_lr_ratio

    def lr_at(self, step: int) -> float:
        """Learning rate for optimizer step `step` (0-based); the cosine ends exactly at the last step."""
        from lm.optim import get_lr_cosine_schedule

        return get_lr_cosine_schedule(step, self.optimizer.lr, self.min_lr, self.warmup_steps, self.total_steps - 1)

    def interval_steps(self, steps: int | None, tokens: int | None) -> int | None:
        """An interval in steps from one given in tokens (wins) or steps; None if neither is set."""
        if tokens is not None:
            return max(1, math.ceil(tokens / self.tokens_per_step))
        return steps

    # ---- construction ----
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, overrides: dict[str, Any], source: str = "overrides") -> Config:
        """A validated copy with dotted-key overrides applied (`{"optimizer.lr": 3e-4}`)."""
        data = self.to_dict()
        for key, value in overrides.items():
            section, _, name = key.partition(".")
            if section not in data or not name or name not in data[section]:
                raise ConfigError(f"{source}: unknown config field '{key}' (known: {', '.join(field_paths())})")
            data[section][name] = value
        return Config.from_dict(data, source=source)

    @staticmethod
    def from_dict(data: dict[str, Any], source: str = "config") -> Config:
        """Build and validate from nested dicts; missing fields take their defaults."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping with sections {list(SECTIONS)}, got {type(data).__name__}")
        sections = {}
        for key, value in data.items():
            if key not in SECTIONS:
                raise ConfigError(f"{source}: unknown section '{key}' (expected one of {list(SECTIONS)})")
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: section '{key}' must be a mapping, got {type(value).__name__}")
            sections[key] = _build_section(SECTIONS[key], value, f"{source}: {key}")
        config = Config(**sections)
        config.validate(source)
        return config

    @staticmethod
    def from_file(path: str | Path, overrides: dict[str, Any] | None = None) -> Config:
        """Load a YAML or JSON file, apply dotted overrides, validate."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            text = path.read_text()
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (yaml.YAMLError, json.JSONDecodeError) as e:
            raise ConfigError(
                f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {' '.join(str(e).split())}"
            ) from None
        config = Config.from_dict(data or {}, source=str(path))
        return config.replace(overrides, source=str(path)) if overrides else config

    def validate(self, source: str = "config") -> None:
        """Raise ConfigError naming the first field whose value cannot work."""
        m, o, d, t = self.model, self.optimizer, self.data, self.train

        def fail(key: str, expected: str, got: Any) -> typing.NoReturn:
            raise ConfigError(f"{source}: {key}: expected {expected}, got {got!r}")

        for key, value in (
            ("model.vocab_size", m.vocab_size),
            ("model.context_length", m.context_length),
            ("model.d_model", m.d_model),
            ("model.num_layers", m.num_layers),
            ("model.num_heads", m.num_heads),
            ("model.d_ff", m.d_ff),
            ("data.batch_size", d.batch_size),
            ("data.val_windows", d.val_windows),
            ("data.val_batch_size", d.val_batch_size),
            ("train.max_tokens", t.max_tokens),
            ("train.log_interval", t.log_interval),
            ("train.keep_checkpoints", t.keep_checkpoints),
        ):
            if value < 1:
                fail(key, "a positive integer", value)
        for key, value in (
            ("train.eval_interval", t.eval_interval),
            ("train.eval_interval_tokens", t.eval_interval_tokens),
            ("train.checkpoint_interval_tokens", t.checkpoint_interval_tokens),
            ("train.num_threads", t.num_threads),
        ):
            if value is not None and value < 1:
                fail(key, "a positive integer or null", value)
        if m.d_model % m.num_heads:
            fail("model.d_model", f"a multiple of model.num_heads ({m.num_heads})", m.d_model)
        if m.pos_emb == "rope" and (m.d_model // m.num_heads) % 2:
            fail("model.d_model", "d_model / num_heads even (RoPE rotates pairs)", m.d_model)
        for key, value, allowed in (
            ("model.norm", m.norm, NORMS),
            ("model.pos_emb", m.pos_emb, POS_EMBS),
            ("model.ffn", m.ffn, FFNS),
            ("model.attention", m.attention, ATTENTIONS),
            ("train.precision", t.precision, ("auto", "fp32", "bf16")),
            ("train.progress", t.progress, ("auto", "bar", "lines", "off")),
            ("data.dtype", d.dtype, (None, "uint16", "uint32", "int32", "int64")),
        ):
            if value not in allowed:
                fail(key, f"one of {list(allowed)}", value)
        if m.rope_theta <= 0:
            fail("model.rope_theta", "a positive number", m.rope_theta)
        if not (o.lr > 0 and math.isfinite(o.lr)):
            fail("optimizer.lr", "a positive number", o.lr)
        if not 0 <= o.min_lr_ratio <= 1:
            fail("optimizer.min_lr_ratio", "a number in [0, 1]", o.min_lr_ratio)
        for key, value in (("optimizer.beta1", o.beta1), ("optimizer.beta2", o.beta2)):
            if not 0 <= value < 1:
                fail(key, "a number in [0, 1)", value)
        if o.eps < 0 or o.weight_decay < 0:
            fail(
                "optimizer.eps" if o.eps < 0 else "optimizer.weight_decay",
                "a non-negative number",
                min(o.eps, o.weight_decay),
            )
        if o.grad_clip is not None and o.grad_clip <= 0:
            fail("optimizer.grad_clip", "a positive number or null", o.grad_clip)
        if not 0 <= o.warmup_fraction < 1:
            fail("optimizer.warmup_fraction", "a number in [0, 1)", o.warmup_fraction)
        if self.total_steps < 1:
            fail(
                "train.max_tokens",
                f"at least one step of batch_size * context_length = {self.tokens_per_step} tokens",
                t.max_tokens,
            )
        if o.warmup_iters is not None and not 0 <= o.warmup_iters < self.total_steps:
            fail(
                "optimizer.warmup_iters",
                f"an integer in [0, total steps = {self.total_steps})",
                o.warmup_iters,
            )
        if t.divergence_loss is not None and t.divergence_loss <= 0:
            fail("train.divergence_loss", "a positive number or null", t.divergence_loss)
        if d.train_path is not None and d.val_path is None:
            fail("data.val_path", "a validation file when data.train_path is set", None)


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "optimizer": OptimizerConfig,
    "data": DataConfig,
    "train": TrainConfig,
}


def field_paths() -> list[str]:
    """Every dotted config path, e.g. "optimizer.lr" (the keys sweeps and overrides may use)."""
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def field_type(path: str) -> Any:
    """The annotated type of a dotted config path (raises ConfigError for unknown paths)."""
    section, _, name = path.partition(".")
    if section not in SECTIONS or name not in _hints(SECTIONS[section]):
        raise ConfigError(f"unknown config field '{path}'")
    return _hints(SECTIONS[section])[name]


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build_section(cls: type, values: dict[str, Any], where: str):
    hints = _hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"{where}.{key}: unknown field (known: {', '.join(hints)})")
        kwargs[key] = coerce(value, hints[key], f"{where}.{key}")
    return cls(**kwargs)


def coerce(value: Any, annotation: Any, where: str) -> Any:
    """Convert `value` (from YAML, JSON or a command line string) to the annotated field type.

    Accepts "3e-4" for floats (YAML reads exponents without a dot as strings), "2_000_000" and integral
    floats like 2e6 for ints, true/false/1/0 for bools, null/none for optional fields.
    """
    optional = False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional, annotation = True, args[0]
    if value is None or (optional and isinstance(value, str) and value.lower() in ("null", "none", "~")):
        if optional:
            return None
        raise ConfigError(f"{where}: expected {annotation.__name__}, got null")
    convert = _CONVERTERS.get(annotation)
    if convert is None:
        raise ConfigError(f"{where}: unsupported field type {annotation}")
    try:
        return convert(value)
    except (ValueError, TypeError):
        kind = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[annotation]
        raise ConfigError(f"{where}: expected {kind}{' or null' if optional else ''}, got {value!r}") from None


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    raise ValueError


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, str):
        text = value.replace("_", "")
        value = int(text) if text.lstrip("-").isdigit() else float(text)
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError
        value = int(value)
    if not isinstance(value, int):
        raise ValueError
    return value


def _to_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError
    return float(value.replace("_", "") if isinstance(value, str) else value)


def _to_str(value: Any) -> str:
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise ValueError
    return str(value)


_CONVERTERS = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}


def parse_override_args(args: list[str]) -> dict[str, str]:
    """Turn `["--optimizer.lr", "3e-4", "--model.d_model=256"]` into {"optimizer.lr": "3e-4", ...}.

    Values stay strings; `Config.replace` coerces them to each field's type. Raises ConfigError for an
    argument that is not `--section.field` or lacks a value.
    """
    overrides: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"command line: unexpected argument {arg!r} (overrides look like --optimizer.lr 3e-4)")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"command line: --{key} needs a value")
            value = args[i + 1]
            i += 1
        overrides[key] = value
        i += 1
    return overrides
