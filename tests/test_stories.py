"""The built-in story corpus: tokens and meta.json, exact source entropy, unambiguity, the cache."""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import random
import re
from pathlib import Path

import numpy as np
import pytest

from lm import stories
from lm.stories import (
    EOT_TOKEN,
    VERSION,
    Choice,
    ParseError,
    builtin_data_dir,
    generate_corpus,
    parse_story,
    sample_story,
)

SMALL = {"train_tokens": 60_000, "val_tokens": 20_000, "seed": 11}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stories")
    generate_corpus(out, **SMALL)
    return out


def load(path: Path) -> np.ndarray:
    return np.load(path, mmap_mode="r")


def split_stories(tokens: np.ndarray) -> list[str]:
    """The story texts of a token array (every story ends with EOT)."""
    ends = np.flatnonzero(np.asarray(tokens) == EOT_TOKEN)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [
        np.asarray(tokens[s:e], dtype=np.uint8).tobytes().decode("ascii") for s, e in zip(starts, ends, strict=True)
    ]


# --- files and meta.json --------------------------------------------------------------------------


def test_files_open_with_mmap_and_hold_byte_tokens_with_eot_separators(corpus):
    for split in ("train", "val"):
        tokens = load(corpus / f"{split}.npy")
        assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16 and tokens.ndim == 1
        assert int(tokens.max()) == EOT_TOKEN < 257
        assert tokens[-1] == EOT_TOKEN  # every story, the last one included, is closed
        text = tokens[tokens != EOT_TOKEN]
        assert int(text.max()) < 128 and int(text.min()) >= 32  # printable ASCII, no NUL left over
        eot = np.flatnonzero(tokens == EOT_TOKEN)
        assert tokens[0] != EOT_TOKEN and np.all(np.diff(eot) > 1)  # no empty stories
        first = split_stories(tokens)[0]
        assert first[0].isupper() and first.endswith(".")


def test_stories_read_like_sentences(corpus):
    texts = split_stories(load(corpus / "train.npy"))
    for text in texts:
        for bad in ("  ", " .", " ,", "the the ", " a a ", " a an ", "..", " and and "):
            assert bad not in text, (bad, text)
        assert 5 <= text.count(".") <= 8, text  # every sentence, and nothing else, ends with "."
        assert re.search(r"\b(an) [^aeiou]", text) is None and re.search(r"\b(a) [aeiou]", text) is None, text
    # The hero's name, chosen once, comes back later in most stories: long-range copying to learn.
    repeats = [text.count(re.search(r"named (\w+)", text).group(1)) > 1 for text in texts]
    assert np.mean(repeats) > 0.7


def test_meta_json_fields(corpus):
    meta = json.loads((corpus / "meta.json").read_text())
    assert meta["vocab_size"] == 257 and meta["max_token_id"] == 256 and meta["dtype"] == "uint16"
    assert meta["tokenizer"] == {"type": "byte", "eot_token": 256}
    assert meta["generator"] == f"lm.stories {VERSION}" and meta["seed"] == SMALL["seed"]
    for split, requested in (("train", SMALL["train_tokens"]), ("val", SMALL["val_tokens"])):
        tokens = load(corpus / f"{split}.npy")
        assert meta["num_tokens"][split] == len(tokens)
        assert requested <= len(tokens) < requested + 1000  # whole stories, just past the request
        assert meta["num_stories"][split] == int((tokens == EOT_TOKEN).sum())
        assert 0 < meta["entropy_per_token"][split] < math.log(257)
    assert meta["entropy_floor_nats"] == meta["entropy_per_token"]["val"]
    assert meta["split_seeds"]["train"] != meta["split_seeds"]["val"]


def test_same_seed_same_bytes_and_entropy(tmp_path, corpus):
    generate_corpus(tmp_path, **SMALL)
    for name in ("train.npy", "val.npy", "meta.json"):
        assert (tmp_path / name).read_bytes() == (corpus / name).read_bytes()
    other = tmp_path / "other"
    other.mkdir()
    generate_corpus(other, **{**SMALL, "seed": SMALL["seed"] + 1})
    assert (other / "val.npy").read_bytes() != (corpus / "val.npy").read_bytes()
    # Train and val come from different streams, not one the prefix of the other.
    train, val = split_stories(load(corpus / "train.npy")), split_stories(load(corpus / "val.npy"))
    assert train[:5] != val[:5]


# --- the entropy figure -----------------------------------------------------------------------------


def test_entropy_equals_replay_of_the_text_alone(corpus):
    """Recompute -ln p of every split from its bytes only: parse each story back into its choices."""
    meta = json.loads((corpus / "meta.json").read_text())
    for split in ("train", "val"):
        tokens = load(corpus / f"{split}.npy")
        nll = math.fsum(parse_story(text)[0] for text in split_stories(tokens))
        assert nll / len(tokens) == pytest.approx(meta["entropy_per_token"][split], rel=1e-12)


def test_entropy_is_below_the_unigram_entropy_and_not_trivial(corpus):
    # A true source entropy can never exceed the entropy of the byte frequencies of its own text.
    meta = json.loads((corpus / "meta.json").read_text())
    for split in ("train", "val"):
        tokens = np.asarray(load(corpus / f"{split}.npy"))
        p = np.bincount(tokens, minlength=257) / len(tokens)
        unigram = float(-(p[p > 0] * np.log(p[p > 0])).sum())
        assert meta["unigram_entropy_per_token"][split] == pytest.approx(unigram)
        assert 0.1 < meta["entropy_per_token"][split] < unigram / 3


# --- unambiguity --------------------------------------------------------------------------------------


def test_text_alone_recovers_every_choice():
    rng = random.Random(2024)
    for _ in range(400):
        text, nll, choices = sample_story(rng)
        parsed_nll, parsed_choices = parse_story(text)  # raises if 0 or 2+ options fit anywhere
        assert parsed_choices == choices
        assert parsed_nll == nll


def test_parse_rejects_text_the_grammar_cannot_make():
    text, _, _ = sample_story(random.Random(3))
    with pytest.raises(ParseError):
        parse_story(text + " The end.")  # trailing text
    with pytest.raises(ParseError):
        parse_story(text.replace(" named ", " called ", 1))  # a fixed word changed
    with pytest.raises(ParseError):
        parse_story("Once upon a time, there was a little girl named Zelda. She had a dog named Rex.")


def _ambiguous_grammar(src: stories.Source) -> None:
    # "a" + "bc" and "ab" + "c" both spell "abc": the true p("abc") is 1/2, not the 1/4 of either path.
    src.pick(Choice([("a", 1), ("ab", 1)], check=False))
    src.pick(Choice([("bc", 1), ("c", 1)]))


def test_an_ambiguous_grammar_is_detected():
    texts = {sample_story(random.Random(i), _ambiguous_grammar)[0] for i in range(40)}
    assert texts == {"abc", "ac", "abbc"}
    with pytest.raises(ParseError, match="2 options"):
        parse_story("abc", _ambiguous_grammar)
    assert parse_story("ac", _ambiguous_grammar)[0] == pytest.approx(2 * math.log(2))  # this text is fine
    # And the table check would not have let such a choice into a grammar in the first place.
    with pytest.raises(ValueError, match="prefix-free"):
        Choice([("a", 1), ("ab", 1)])
    with pytest.raises(ValueError, match="prefix-free"):
        Choice([(" Lily", 1), (" Lily", 2)])
    with pytest.raises(ValueError, match="empty"):
        Choice([("", 1), ("x", 1)])


# --- the cache ----------------------------------------------------------------------------------------


def _cached_digest(args: tuple[str, mp.synchronize.Barrier, mp.Queue]) -> None:
    cache, barrier, results = args
    barrier.wait()  # start together, so the callers really race
    path = builtin_data_dir(cache, **SMALL)
    results.put((str(path), {name: (path / name).read_bytes() for name in ("train.npy", "val.npy", "meta.json")}))


def test_concurrent_callers_all_get_the_same_complete_data(tmp_path, corpus):
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    barrier, results = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_cached_digest, args=((str(tmp_path), barrier, results),)) for _ in range(3)]
    for p in procs:
        p.start()
    got = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    expected = {name: (corpus / name).read_bytes() for name in ("train.npy", "val.npy", "meta.json")}
    target = tmp_path / f"builtin-{VERSION}-60000-20000-s11"
    assert all(path == str(target) and files == expected for path, files in got)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [target.name]  # no temp dirs left


def test_second_call_reuses_the_cache(tmp_path, monkeypatch):
    first = builtin_data_dir(tmp_path, **SMALL)

    def fail(*args, **kwargs):
        raise AssertionError("regenerated a cached corpus")

    monkeypatch.setattr(stories, "generate_corpus", fail)
    assert builtin_data_dir(tmp_path, **SMALL) == first


def test_without_a_lock_the_loser_of_a_race_discards_its_copy(tmp_path, monkeypatch, corpus):
    """Without flock two processes may both generate; the second rename fails and the first copy wins."""
    monkeypatch.setattr(stories, "fcntl", None)
    real = stories.generate_corpus
    target = tmp_path / f"builtin-{VERSION}-60000-20000-s11"

    def slower_than_the_other_process(out_dir, *args):
        target.mkdir()  # the other process renames its complete copy into place meanwhile
        for name in ("train.npy", "val.npy", "meta.json"):
            (target / name).write_bytes((corpus / name).read_bytes())
        return real(out_dir, *args)

    monkeypatch.setattr(stories, "generate_corpus", slower_than_the_other_process)
    assert builtin_data_dir(tmp_path, **SMALL) == target
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == [target.name]


def test_default_location(tmp_path, monkeypatch):
    made = []

    def fake(out_dir, *args):  # the default corpus takes seconds; only the location matters here
        made.append(args)
        (Path(out_dir) / "meta.json").write_text("{}")

    monkeypatch.setattr(stories, "generate_corpus", fake)
    monkeypatch.setenv("LM_SWEEPS_CACHE", str(tmp_path / "env-cache"))
    assert builtin_data_dir() == tmp_path / "env-cache" / f"builtin-{VERSION}"
    assert made == [(stories.DEFAULT_TRAIN_TOKENS, stories.DEFAULT_VAL_TOKENS, stories.DEFAULT_SEED)]
    monkeypatch.delenv("LM_SWEEPS_CACHE")
    assert stories.default_cache_root() == Path.home() / ".cache" / "lm-sweeps"
