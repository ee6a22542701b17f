"""Tests for ``lm.generate``: greedy, temperature and nucleus sampling, stopping, cropping, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from torch import nn

from lm.checkpoint import save_checkpoint
from lm.generate import _nucleus, find_tokenizer, generate, load_model, main
from lm.model import TransformerLM
from lm.optim import AdamW
from lm.train import train

REPO = Path(__file__).resolve().parent.parent
CONTEXT = 16


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: the test machines are small and shared, and tiny models gain nothing from more."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _env() -> dict[str, str]:
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def model() -> TransformerLM:
    torch.manual_seed(0)
    m = TransformerLM(vocab_size=64, context_length=CONTEXT, d_model=32, num_layers=2, num_heads=2, d_ff=64)
    return m.eval()


def _greedy_reference(model: nn.Module, prompt: list[int], n: int) -> list[int]:
    """Argmax decoding written out directly: full forward on the last CONTEXT ids, argmax of the last row."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids[-CONTEXT:]]))
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt) :]


class FixedLM(nn.Module):
    """A stand-in model whose next-token distribution is always `probs`; records the inputs it sees."""

    def __init__(self, probs: list[float], context_length: int = 8) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(probs).log())
        self.context_length = context_length
        self.seen: list[tuple[int, ...]] = []

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        self.seen.append(tuple(idx.shape))
        return self.logits.expand(idx.shape[0], idx.shape[1], -1)


class CountdownLM(nn.Module):
    """Emits token 1 until the sequence is `stop_at` long, then token 0 (say, end-of-text), then 1 again."""

    def __init__(self, stop_at: int, vocab: int = 4) -> None:
        super().__init__()
        self.stop_at, self.vocab, self.context_length = stop_at, vocab, 1000
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        logits = torch.full((idx.shape[0], idx.shape[1], self.vocab), -10.0)
        logits[:, -1, 0 if idx.shape[1] == self.stop_at else 1] = 10.0
        return logits


# ---------------------------------------------------------------------------------------------------------
# generate()
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("settings", [{"top_p": 0.0}, {"temperature": 0.0}, {"temperature": 0.0, "top_p": 0.5}])
def test_greedy_equals_argmax_decoding(model, settings):
    prompt = [3, 14, 15, 9, 2, 6]
    expected = _greedy_reference(model, prompt, 20)
    g = torch.Generator().manual_seed(0)
    assert generate(model, prompt, 20, generator=g, **settings) == expected
    # Greedy decoding ignores the generator.
    assert generate(model, prompt, 20, generator=torch.Generator().manual_seed(1), **settings) == expected


def test_tiny_top_p_keeps_only_the_top_token(model):
    prompt = [1, 2, 3]
    expected = _greedy_reference(model, prompt, 12)
    g = torch.Generator().manual_seed(0)
    assert generate(model, prompt, 12, temperature=1.0, top_p=1e-6, generator=g) == expected


def test_same_seed_same_output_different_seed_different(model):
    prompt = [5, 6, 7]

    def sample(seed):
        return generate(model, prompt, 30, temperature=1.0, top_p=0.95, generator=torch.Generator().manual_seed(seed))

    a, b, c = sample(0), sample(0), sample(1)
    assert len(a) == 30 and all(0 <= i < 64 for i in a)
    assert a == b
    assert a != c  # a near-uniform random model over 64 ids: equal 30-token samples are (1/64)^30-unlikely
    assert a != _greedy_reference(model, prompt, 30)


def test_only_new_ids_are_returned_and_the_prompt_is_untouched(model):
    prompt = [1, 2, 3]
    out = generate(model, prompt, 5, top_p=0.0)
    assert prompt == [1, 2, 3] and len(out) == 5
    assert generate(model, prompt, 0) == []


def test_stops_at_end_of_text():
    lm = CountdownLM(stop_at=5)
    # Prompt of 2 ids: the model gives 1, 1, 1 (length 3, 4, 5), then 0 at length 5.
    assert generate(lm, [2, 2], 10, top_p=0.0, eot_token=0) == [1, 1, 1, 0]
    # Without an end-of-text token it goes on to the limit.
    assert generate(lm, [2, 2], 6, top_p=0.0) == [1, 1, 1, 0, 1, 1]
    # Sampling stops there too (the distributions are nearly one-hot).
    g = torch.Generator().manual_seed(0)
    assert generate(lm, [2, 2], 10, temperature=1.0, top_p=1.0, eot_token=0, generator=g) == [1, 1, 1, 0]


def test_stops_at_end_of_text_with_a_real_model(model):
    prompt = [10, 20, 30]
    greedy = _greedy_reference(model, prompt, 15)
    eot = greedy[2]
    out = generate(model, prompt, 15, top_p=0.0, eot_token=eot)
    assert out == greedy[: greedy.index(eot) + 1] and out[-1] == eot


def test_long_prompts_are_cropped_to_the_context(model):
    prompt = [(7 * i) % 64 for i in range(50)]  # far longer than CONTEXT
    out = generate(model, prompt, 10, top_p=0.0)
    assert out == _greedy_reference(model, prompt, 10)
    # Only the last CONTEXT ids matter.
    assert out == generate(model, prompt[-CONTEXT:], 10, top_p=0.0)

    lm = FixedLM([0.25] * 4, context_length=8)
    generate(lm, [1] * 20, 5, generator=torch.Generator().manual_seed(0))
    assert lm.seen == [(1, 8)] * 5
    lm = FixedLM([0.25] * 4, context_length=8)
    generate(lm, [1, 2], 10, top_p=0.0)
    assert [s[1] for s in lm.seen] == [2, 3, 4, 5, 6, 7, 8, 8, 8, 8]


@pytest.mark.parametrize(
    "top_p, kept",
    [
        (0.3, [0]),
        (0.5, [0]),
        (0.7, [0, 1]),
        (0.8, [0, 1]),
        (0.9, [0, 1, 2]),
        (0.99, [0, 1, 2, 3]),
        (1.0, [0, 1, 2, 3]),
    ],
)
def test_nucleus_is_the_smallest_top_set_reaching_top_p(top_p, kept):
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])  # ranked: 1 (0.5), 3 (0.3), 0 (0.15), 2 (0.05)
    rank = [1, 3, 0, 2]
    filtered = _nucleus(probs.clone(), top_p)
    expected = torch.zeros(4)
    for r in kept:
        expected[rank[r]] = probs[rank[r]]
    assert torch.allclose(filtered, expected)


def test_sampling_follows_the_renormalized_nucleus():
    probs = [0.5, 0.3, 0.15, 0.05]
    n = 1500

    def frequencies(top_p, temperature=1.0):
        lm = FixedLM(probs)
        ids = generate(lm, [0], n, temperature=temperature, top_p=top_p, generator=torch.Generator().manual_seed(3))
        return torch.bincount(torch.tensor(ids), minlength=4).double() / n

    f = frequencies(0.7)  # 0.5 < 0.7 <= 0.5 + 0.3: the nucleus is {0, 1}, renormalized to 5/8, 3/8
    assert f[2] == f[3] == 0
    assert f[0] == pytest.approx(0.5 / 0.8, abs=0.05) and f[1] == pytest.approx(0.3 / 0.8, abs=0.05)
    f = frequencies(1.0)  # everything, at the model's probabilities
    assert torch.allclose(f, torch.tensor(probs, dtype=torch.double), atol=0.04)
    assert frequencies(1.0, temperature=0.01)[0] == 1.0  # a low temperature sharpens to the top id
    f = frequencies(1.0, temperature=100.0)  # a high one flattens toward uniform
    assert torch.allclose(f, torch.full((4,), 0.25, dtype=torch.double), atol=0.05)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"top_p": 1.5},
        {"top_p": -0.1},
        {"top_p": float("nan")},
        {"temperature": -1.0},
        {"temperature": float("nan")},
        {"temperature": float("inf")},
        {"max_new_tokens": -1},
    ],
)
def test_bad_settings_raise(model, kwargs):
    kwargs = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(ValueError):
        generate(model, [1, 2], **kwargs)


def test_empty_prompt_raises(model):
    with pytest.raises(ValueError, match="prompt"):
        generate(model, [], 3)


def test_gradients_are_off(model):
    calls = []

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.context_length = model, CONTEXT

        def forward(self, idx):
            calls.append(torch.is_grad_enabled())
            return self.inner(idx)

    generate(Probe(), [1], 3, top_p=0.0)
    assert calls == [False] * 3


# ---------------------------------------------------------------------------------------------------------
# Loading and the command line
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(small_corpus, tmp_path_factory) -> Path:
    """The final training-state checkpoint of a tiny run on the small corpus."""
    out = tmp_path_factory.mktemp("gen-run")
    config = tiny_config(small_corpus, out, {"train.num_threads": 1, "train.max_tokens": 8 * 32 * 20})
    assert train(config)["status"] == "completed"
    return out / "checkpoints" / "final.pt"


def test_load_model_and_tokenizer(trained, small_corpus):
    model, config = load_model(trained)
    assert not model.training
    assert config.model.context_length == 32 and model.context_length == 32
    tokenizer = find_tokenizer(config)
    assert tokenizer.eot_token == 256
    assert tokenizer.encode("Hi") == [72, 105] and tokenizer.decode([72, 105, 256]) == "Hi"


def test_builtin_tokenizer_without_generating_the_corpus(trained, isolated_cache):
    _, config = load_model(trained)
    builtin = config.replace({"data.train_path": None, "data.val_path": None})
    before = sorted(p.name for p in isolated_cache.iterdir())
    tokenizer = find_tokenizer(builtin)
    assert tokenizer.eot_token == 256 and tokenizer.encode("a") == [97]
    assert sorted(p.name for p in isolated_cache.iterdir()) == before  # nothing generated


def _run_main(capsys, args):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_in_process_is_seeded(capsys, trained):
    args = ["--checkpoint", str(trained), "--prompt", "Once upon a time", *"--max-new-tokens 40 --device cpu".split()]
    code, first, err = _run_main(capsys, [*args, "--seed", "0"])
    assert code == 0, err
    assert first.startswith("Once upon a time") and len(first) > len("Once upon a time\n")
    assert _run_main(capsys, [*args, "--seed", "0"])[1] == first
    assert _run_main(capsys, [*args, "--seed", "1"])[1] != first
    # Greedy output is the model's argmax continuation of EOT + prompt.
    code, greedy, _ = _run_main(capsys, [*args, "--temperature", "0"])
    model, _ = load_model(trained)
    prompt = [256, *b"Once upon a time"]
    ids = []
    with torch.no_grad():
        for _ in range(40):
            nxt = int(model(torch.tensor([(prompt + ids)[-32:]]))[0, -1].argmax())
            if nxt == 256:
                break
            ids.append(nxt)
    assert greedy == "Once upon a time" + bytes(ids).decode("utf-8", errors="replace") + "\n"


def test_cli_subprocess(trained):
    result = subprocess.run(
        [sys.executable, "-m", "lm.generate", "--checkpoint", str(trained), "--prompt", "Once upon a time",
         "--max-new-tokens", "30", "--temperature", "0.8", "--top-p", "0.9", "--seed", "0"],
        capture_output=True, text=True, env=_env(), timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Once upon a time")
    assert len(result.stdout.strip()) > len("Once upon a time")
    assert "Traceback" not in result.stderr


def _cs336(tmp_path: Path) -> Path:
    m = TransformerLM(vocab_size=257, context_length=32, d_model=32, num_layers=2, num_heads=2, d_ff=64)
    save_checkpoint(m, AdamW(m.parameters()), 1, tmp_path / "cs336.pt")
    return tmp_path / "cs336.pt"


@pytest.mark.parametrize(
    "make_args, expected",
    [
        (lambda t, c: ["--checkpoint", str(t / "missing.pt")], "missing.pt"),
        (lambda t, c: ["--checkpoint", str(t / "notes.txt")], "notes.txt"),
        (lambda t, c: ["--checkpoint", str(_cs336(t))], "no saved config"),
        (lambda t, c: ["--checkpoint", str(c), "--top-p", "1.5"], "--top-p"),
        (lambda t, c: ["--checkpoint", str(c), "--top-p", "-0.5"], "--top-p"),
        (lambda t, c: ["--checkpoint", str(c), "--temperature", "-1"], "--temperature"),
        (lambda t, c: ["--checkpoint", str(c), "--max-new-tokens", "-3"], "--max-new-tokens"),
        (lambda t, c: ["--checkpoint", str(c), "--temperature", "hot"], "--temperature"),
        (lambda t, c: ["--checkpoint", str(c), "--meta", str(t / "meta.json")], "meta.json"),
        (lambda t, c: ["--checkpoint", str(c), "--meta", str(t / "notes.txt")], "notes.txt"),
        (lambda t, c: ["--checkpoint", str(c), "--meta", str(t / "unknown" / "meta.json")], "tokenizer"),
        (lambda t, c: ["--prompt", "hi"], "--checkpoint"),
        (lambda t, c: ["--checkpoint", str(c), "--bogus", "1"], "--bogus"),
    ],
)
def test_cli_bad_inputs_exit_2(capsys, tmp_path, trained, make_args, expected):
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    (tmp_path / "unknown").mkdir()
    (tmp_path / "unknown" / "meta.json").write_text(json.dumps({"tokenizer": {"type": "sentencepiece"}}))
    code, out, err = _run_main(capsys, make_args(tmp_path, trained))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
    assert "Traceback" not in err and out == ""


@pytest.mark.slow  # another interpreter costs seconds; test_cli_bad_inputs_exit_2 covers these in-process
def test_cli_bad_input_subprocess(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "lm.generate", "--checkpoint", str(tmp_path / "nope.pt"), "--top-p", "0.5"],
        capture_output=True, text=True, env=_env(), timeout=300,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------------------
# Tokenizers: BPE data
# ---------------------------------------------------------------------------------------------------------


def _bpe_checkpoint(tmp_path: Path, vocab_size: int) -> Path:
    """A training-state checkpoint whose data directory holds a small BPE tokenizer ("hi" is one token)."""
    from lm.checkpoint import save_training_state
    from lm.config import Config
    from lm.tokenizer import Tokenizer

    data = tmp_path / "data"
    data.mkdir()
    vocab = {i: bytes([i]) for i in range(256)} | {256: b"hi"}
    Tokenizer(vocab, [(b"h", b"i")], ["<|endoftext|>"]).save(data / "vocab.json", data / "merges.txt")
    meta = {"tokenizer": {"type": "bpe", "vocab": "vocab.json", "merges": "merges.txt",
                          "special_tokens": ["<|endoftext|>"], "eot_token": 257}}  # fmt: skip
    (data / "meta.json").write_text(json.dumps(meta))
    config = Config().replace(
        {"model.vocab_size": vocab_size, "model.context_length": 16, "model.d_model": 16,
         "model.num_heads": 2, "model.num_layers": 1, "model.d_ff": 32,
         "data.train_path": str(data / "train.npy"), "data.val_path": str(data / "val.npy")}
    )  # fmt: skip
    torch.manual_seed(0)
    m = TransformerLM.from_config(config.model)
    path = tmp_path / "bpe.pt"
    save_training_state({"model": m.state_dict(), "iteration": 0, "config": config.to_dict()}, path)
    return path


def test_bpe_tokenizer_from_the_data_meta(capsys, tmp_path):
    ckpt = _bpe_checkpoint(tmp_path, vocab_size=258)
    _, config = load_model(ckpt)
    tokenizer = find_tokenizer(config)
    assert tokenizer.encode("hi") == [256] and tokenizer.eot_token == 257
    code, out, err = _run_main(capsys, ["--checkpoint", str(ckpt), "--prompt", "hi", "--max-new-tokens", "8",
                                        "--seed", "0", "--device", "cpu"])  # fmt: skip
    assert code == 0, err
    assert out.startswith("hi") and "<|endoftext|>" not in out


def test_tokenizer_larger_than_the_model_is_an_error(capsys, tmp_path):
    ckpt = _bpe_checkpoint(tmp_path, vocab_size=257)  # the tokenizer's EOT id 257 does not fit
    code, _, err = _run_main(capsys, ["--checkpoint", str(ckpt), "--prompt", "hi", "--device", "cpu"])
    assert code == 2 and err.startswith("error: ") and "vocabulary" in err
