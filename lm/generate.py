"""Sample text from a trained model: temperature and nucleus (top-p) sampling from a training checkpoint.

    python -m lm.generate --checkpoint runs/default/checkpoints/final.pt --prompt "Once upon a time" \\
        --max-new-tokens 256 --temperature 0.8 --top-p 0.9 --seed 0

The checkpoint's saved config rebuilds the model; the tokenizer comes from the `meta.json` beside the
training data (`data.train_path`), or the built-in corpus's byte tokenizer when the run used it. The
prompt is placed after an end-of-text token when the tokenizer has one, as every story in the training
data is; sampling stops at the next end-of-text token or after `--max-new-tokens` tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

from lm import cli
from lm.checkpoint import CheckpointError, load_model_state, read_checkpoint
from lm.cli import InputError
from lm.config import Config
from lm.model import TransformerLM
from lm.stories import EOT_TOKEN, builtin_data_path
from lm.tokenizer import ByteTokenizer, load_tokenizer

SEED_LIMIT = 2**64
"""torch.Generator seeds are 64-bit."""


class GenerateError(InputError):
    """Bad generation input: a sampling setting out of range, or no usable tokenizer (one-line message)."""


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    eot_token: int | None = None,
    generator: torch.Generator | None = None,
    context_length: int | None = None,
) -> list[int]:
    """Sample up to `max_new_tokens` ids after `prompt_ids`; return only the new ids.

    Each step feeds the last `context_length` ids (default: `model.context_length`) and samples from the
    last position's logits divided by `temperature`, restricted to the nucleus: the most probable ids
    whose cumulative probability first reaches `top_p` (the top id always stays in). `temperature == 0`
    or `top_p == 0` is greedy (argmax) decoding. Sampling stops after `eot_token` (which is then the last
    id returned) or after `max_new_tokens` ids. `generator` seeds the draws (it may live on any device).
    Raises ValueError for an empty prompt or settings out of range.
    """
    if not prompt_ids:
        raise ValueError("prompt_ids must hold at least one token id")
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if not 0 <= top_p <= 1:  # also rejects NaN
        raise ValueError(f"top_p must be in [0, 1], got {top_p}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if context_length is None:
        context_length = getattr(model, "context_length", None) or len(prompt_ids) + max_new_tokens
    first_param = next(model.parameters(), None)
    device = first_param.device if first_param is not None else torch.device("cpu")
    greedy = temperature == 0 or top_p == 0

    ids = list(prompt_ids)
    new: list[int] = []
    for _ in range(max_new_tokens):
        context = torch.tensor([ids[-context_length:]], dtype=torch.long, device=device)
        logits = model(context)[0, -1].float()
        if greedy:
            next_id = int(torch.argmax(logits))
        else:
            # Shifted so that the top logit is 0, and divided by a temperature no smaller than the dtype's
            # smallest normal number (a smaller one rounds to 0): a tiny temperature then sends the other logits
            # to -inf (probability 0), never a logit to inf or NaN.
            scale = max(temperature, torch.finfo(logits.dtype).tiny)
            probs = _nucleus(torch.softmax((logits - logits.max()) / scale, dim=-1), top_p)
            if generator is not None and probs.device != generator.device:
                probs = probs.to(generator.device)
            next_id = int(torch.multinomial(probs, 1, generator=generator))
        ids.append(next_id)
        new.append(next_id)
        if eot_token is not None and next_id == eot_token:
            break
    return new


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero all but the smallest set of most probable ids whose total probability reaches top_p."""
    if top_p >= 1:
        return probs
    sorted_probs, order = torch.sort(probs, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # probability of the ids ranked above
    sorted_probs[mass_before >= top_p] = 0.0  # the top id has mass_before 0 < top_p: it always stays
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


# ---------------------------------------------------------------------------------------------------------
# Loading a model and its tokenizer
# ---------------------------------------------------------------------------------------------------------


def find_tokenizer(config: Config, meta_path: str | Path | None = None) -> Any:
    """The tokenizer of the run's data: `meta_path`, else meta.json beside data.train_path, else built-in.

    The built-in corpus is byte-level; its meta.json is used when the cache holds it, and it is never
    generated just to find the tokenizer.
    """
    if meta_path is None and config.data.train_path is None:
        cached = builtin_data_path() / "meta.json"
        if not cached.is_file():
            return ByteTokenizer(EOT_TOKEN)
        meta_path = cached
    if meta_path is None:
        meta_path = Path(config.data.train_path).with_name("meta.json")
    meta_path = Path(meta_path)
    if not meta_path.is_file():
        raise GenerateError(f"{meta_path}: no meta.json describing the tokenizer (pass --meta PATH)")
    try:
        json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise GenerateError(f"{meta_path}: not valid JSON ({' '.join(str(e).split())})") from None
    try:
        return load_tokenizer(meta_path)
    except (OSError, ValueError, KeyError) as e:
        raise GenerateError(f"{meta_path}: cannot load the tokenizer ({' '.join(str(e).split())})") from None


def load_model(checkpoint: str | Path, device: torch.device | str = "cpu") -> tuple[TransformerLM, Config]:
    """Rebuild a training-state checkpoint's model from its saved config and load its weights (eval mode).

    Raises CheckpointError for a missing or foreign file or one without a saved config (a bare CS336
    checkpoint), and ConfigError if the saved config does not validate.
    """
    state = read_checkpoint(checkpoint)
    saved = state.get("config")
    if not isinstance(saved, dict) or not isinstance(saved.get("model"), dict):
        raise CheckpointError(
            f"{checkpoint}: no saved config in this checkpoint (a bare CS336 checkpoint?); "
            "use a training-state checkpoint from lm.train"
        )
    config = Config.from_dict(saved, source=str(checkpoint))
    model = TransformerLM.from_config(config.model, device=device)
    try:
        load_model_state(model, state["model"])
    except (RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"{checkpoint}: weights do not fit the saved model config ({first})") from None
    model.eval()
    return model, config


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m lm.generate", description="Sample text from a training checkpoint.")
    p.add_argument("--checkpoint", required=True, help="training-state checkpoint (.pt) written by lm.train")
    p.add_argument("--prompt", default="", help="text to continue (default: empty, a fresh story)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="most tokens to sample (default 256)")
    p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 = greedy (default 0.8)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus mass in [0, 1]; 0 = greedy (default 0.9)")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampler (default: a fresh random seed)")
    p.add_argument("--device", default="auto", help='"auto" (cuda, mps, cpu) or a torch device (default auto)')
    p.add_argument("--meta", default=None, help="meta.json describing the tokenizer (default: the data's)")
    return p


def run(args: argparse.Namespace) -> str:
    """Load, sample and return the prompt followed by the decoded continuation."""
    from lm.train import resolve_device

    if not (args.temperature >= 0 and math.isfinite(args.temperature)):
        raise GenerateError(f"--temperature: expected a finite number >= 0, got {args.temperature}")
    if not 0 <= args.top_p <= 1:
        raise GenerateError(f"--top-p: expected a number in [0, 1], got {args.top_p}")
    if args.max_new_tokens < 0:
        raise GenerateError(f"--max-new-tokens: expected an integer >= 0, got {args.max_new_tokens}")
    if args.seed is not None and not 0 <= args.seed < SEED_LIMIT:
        raise GenerateError(f"--seed: expected an integer in [0, 2**64), got {args.seed}")
    device = resolve_device(args.device, "--device")  # one line for a device this machine lacks
    model, config = load_model(args.checkpoint, device)
    tokenizer = find_tokenizer(config, args.meta)
    eot = getattr(tokenizer, "eot_token", None)
    prompt_ids = tokenizer.encode(args.prompt)
    context = ([eot] if eot is not None else []) + prompt_ids
    if not context:
        raise GenerateError("--prompt: empty, and the tokenizer has no end-of-text token to start from")
    too_big = [i for i in context if not 0 <= i < config.model.vocab_size]
    if too_big:
        raise GenerateError(
            f"--prompt: token id {max(too_big)} is outside the model's vocabulary "
            f"({config.model.vocab_size}); "
            "wrong tokenizer for this checkpoint?"
        )
    generator = torch.Generator(device=device)
    if args.seed is not None:
        generator.manual_seed(args.seed)
    else:
        generator.seed()
    new = generate(model, context, args.max_new_tokens, args.temperature, args.top_p, eot, generator)
    if new and eot is not None and new[-1] == eot:
        new = new[:-1]
    return args.prompt + tokenizer.decode(new)


def _command(args: argparse.Namespace) -> int:
    print(run(args))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`lm-generate`: print the prompt and its continuation; exit 2 with one `error:` line on bad input."""
    return cli.run(_command, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
