"""One typed configuration for a training run: model, optimizer, data and training settings.

The training CLI, YAML/JSON files and every sweep trial build these same objects: a file gives a base,
dotted overrides (`optimizer.lr=3e-4`, `--model.d_model 256`) change single fields, and `validate()`
checks the whole before any expensive work starts. Errors are `ConfigError`s whose one-line message
names the source (file) and the field.

The dataclass machinery that reads these configs (and the sweep spaces) is lm/fields.py.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lm.data import TOKEN_DTYPES
from lm.fields import ConfigError, build, field_docs, type_hints, type_name, value_text
from lm.model import ATTENTIONS, FFNS, NORMS, POS_EMBS

# String choices are Literal types: `build` checks them and `config_help` lists them. Each list of choices is
# defined once, by the code that implements the choices (Literal[("a", "b")] is Literal["a", "b"]).
Norm = Literal[NORMS]
PosEmb = Literal[POS_EMBS]
Ffn = Literal[FFNS]
Attention = Literal[ATTENTIONS]
TokenDtype = Literal[TOKEN_DTYPES]
Precision = Literal["auto", "fp32", "bf16"]
WandbMode = Literal["online", "offline", "disabled"]
Progress = Literal["auto", "bar", "lines", "off"]


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
    norm: Norm = "pre"
    """Ablation: "pre" (default), "post" (norm after each residual add) or "none"."""
    pos_emb: PosEmb = "rope"
    """Ablation: "rope" or "nope" (no positional encoding; causal attention alone)."""
    ffn: Ffn = "swiglu"
    """Ablation: "swiglu" or "silu" (w2(silu(w1 x)), no gate)."""
    tie_embeddings: bool = False
    """Ablation: share the token embedding with the output layer."""
    attention: Attention = "sdpa"
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
    dtype: TokenDtype | None = None
    """Token dtype of .bin files; .npy files carry their own; meta.json may give it."""
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
    precision: Precision = "auto"
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
    progress: Progress = "auto"
    """Console output: "auto" (a progress bar in a terminal, plain lines otherwise), "bar", "lines", "off"."""
    tensorboard: bool = True
    """Write TensorBoard event files into out_dir/tb."""
    wandb_project: str | None = None
    """Log the run to this Weights & Biases project (needs the wandb extra: pip install -e ".[wandb]"); null: no W&B.
    Sweeps set their W&B runs in the space file's tracking section instead."""
    wandb_mode: WandbMode = "online"
    """W&B mode: online, offline (local run files under out_dir/wandb; `wandb sync` uploads them) or disabled."""


@dataclass
class Config:
    """A whole training run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The architecture."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """AdamW and the learning-rate schedule."""
    data: DataConfig = field(default_factory=DataConfig)
    """Token files and batch sizes."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Length, intervals, device and output."""

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

    # ---- construction and output ----
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """Every field as YAML, by section (what `--print-config` prints; `from_dict` reads it back)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

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
        config = build(Config, data, source)
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

    # ---- validation: each field's type and choices are checked by `build`; here, ranges and combinations ----
    def validate(self, source: str = "config") -> None:
        """Raise ConfigError naming the first field whose value cannot work."""
        for key, expected, holds in self._checks():
            if not holds:
                section, name = key.split(".")
                got = getattr(getattr(self, section), name)
                raise ConfigError(f"{source}: {key}: expected {expected}, got {got!r}")

    def _checks(self) -> Iterator[tuple[str, str, bool]]:
        """(field, what it must be, whether it is), in order: a check may rely on those before it."""
        m, o, d, t = self.model, self.optimizer, self.data, self.train
        for key in (
            "model.vocab_size", "model.context_length", "model.d_model", "model.num_layers", "model.num_heads",
            "model.d_ff", "data.batch_size", "data.val_windows", "data.val_batch_size", "train.max_tokens",
            "train.log_interval", "train.keep_checkpoints",
        ):  # fmt: skip
            section, name = key.split(".")
            yield key, "a positive integer", getattr(getattr(self, section), name) >= 1
        for key in ("eval_interval", "eval_interval_tokens", "checkpoint_interval_tokens", "num_threads"):
            value = getattr(t, key)
            yield f"train.{key}", "a positive integer or null", value is None or value >= 1
        yield "model.d_model", f"a multiple of model.num_heads ({m.num_heads})", m.d_model % m.num_heads == 0
        rope_pairs = m.pos_emb != "rope" or (m.d_model // m.num_heads) % 2 == 0
        yield "model.d_model", "d_model / num_heads even (RoPE rotates pairs)", rope_pairs
        yield "model.rope_theta", "a positive number", m.rope_theta > 0
        yield "optimizer.lr", "a positive number", o.lr > 0 and math.isfinite(o.lr)
        yield "optimizer.min_lr_ratio", "a number in [0, 1]", 0 <= o.min_lr_ratio <= 1
        yield "optimizer.beta1", "a number in [0, 1)", 0 <= o.beta1 < 1
        yield "optimizer.beta2", "a number in [0, 1)", 0 <= o.beta2 < 1
        yield "optimizer.eps", "a non-negative number", o.eps >= 0
        yield "optimizer.weight_decay", "a non-negative number", o.weight_decay >= 0
        yield "optimizer.grad_clip", "a positive number or null", o.grad_clip is None or o.grad_clip > 0
        yield "optimizer.warmup_fraction", "a number in [0, 1)", 0 <= o.warmup_fraction < 1
        one_step = f"at least one step of batch_size * context_length = {self.tokens_per_step} tokens"
        yield "train.max_tokens", one_step, self.total_steps >= 1
        warmup_ok = o.warmup_iters is None or 0 <= o.warmup_iters < self.total_steps
        yield "optimizer.warmup_iters", f"an integer in [0, total steps = {self.total_steps})", warmup_ok
        divergence_ok = t.divergence_loss is None or t.divergence_loss > 0
        yield "train.divergence_loss", "a positive number or null", divergence_ok
        yield "train.seed", "an integer in [0, 2**64) (torch and numpy seeds)", 0 <= t.seed < 2**64
        yield (
            "data.val_path",
            "a validation file when data.train_path is set",
            d.train_path is None or d.val_path is not None,
        )


SECTIONS: dict[str, type] = typing.get_type_hints(Config)
"""Config's sections by name: {"model": ModelConfig, ...}."""


def field_paths() -> list[str]:
    """Every dotted config path, e.g. "optimizer.lr" (the keys sweeps and overrides may use)."""
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def field_type(path: str) -> Any:
    """The annotated type of a dotted config path (raises ConfigError for unknown paths)."""
    section, _, name = path.partition(".")
    if section not in SECTIONS or name not in type_hints(SECTIONS[section]):
        raise ConfigError(f"unknown config field '{path}'")
    return type_hints(SECTIONS[section])[name]


def config_help() -> str:
    """Every config field by section: `--section.field TYPE = DEFAULT`, then its one-line doc (for --help)."""
    lines = []
    for section, cls in SECTIONS.items():
        lines += [""] if lines else []
        lines.append(f"{section}: {inspect.cleandoc(cls.__doc__ or '').splitlines()[0]}")
        docs, hints = field_docs(cls), type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
            lines.append(f"  --{section}.{f.name} {type_name(hints[f.name])} = {value_text(default)}")
            lines.append(f"        {docs.get(f.name, '')}")
    return "\n".join(lines)


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
