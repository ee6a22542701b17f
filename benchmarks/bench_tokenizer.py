"""Benchmark the BPE tokenizer: training time, encoding throughput, and a naive baseline.

Generates ~5 MB of English-like text (seeded, no downloads), trains a 10,000-token vocabulary on it, and
prints a markdown table. Run with ``python benchmarks/bench_tokenizer.py [--mb 5] [--vocab-size 10000]``.

The baseline is :func:`lm.tokenizer.reference_merges`, which recounts every pair after every merge; it runs
on a 200 KB slice against the incremental algorithm on the same slice (both must learn the same merges).
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import tempfile
import time
from pathlib import Path

from lm.tokenizer import (
    Tokenizer,
    count_pretokens,
    merges_from_counts,
    reference_merges,
    train_bpe,
)

SPECIAL = "<|endoftext|>"

_COMMON = (
    "the a and to of was he she it they in on with for his her that but said one day little big "
    "very then there when so had were all not at is up out what you i we my could would from"
).split()
_NAMES = ["Tom", "Lily", "Ben", "Mia", "Sam", "Anna", "Max", "Sue", "Tim", "Zoe"]
_ONSETS = "b c d f g h l m n p r s t w br ch sh st tr pl".split()
_VOWELS = ["a", "e", "i", "o", "u", "ea", "oo", "ai", "ou", "ie"]
_CODAS = ["", "", "n", "t", "s", "r", "ll", "ng", "ck", "nd", "st", "m"]


def make_corpus(num_bytes: int, seed: int = 0, num_words: int = 4000) -> str:
    """Seeded English-like stories: Zipf-distributed pseudo-words, names, numbers, punctuation, quotes."""
    rng = random.Random(seed)
    lexicon: list[str] = []
    seen: set[str] = set(_COMMON)
    while len(lexicon) < num_words:
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(rng.randint(1, 3)))
        if word not in seen:
            seen.add(word)
            lexicon.append(word)
    vocab = _COMMON + lexicon
    cum_weights = list(itertools.accumulate(1.0 / (rank + 1) for rank in range(len(vocab))))

    stories: list[str] = []
    size = 0
    while size < num_bytes:
        sentences = []
        for _ in range(rng.randint(3, 10)):
            words = rng.choices(vocab, cum_weights=cum_weights, k=rng.randint(4, 14))
            if rng.random() < 0.3:
                words[rng.randrange(len(words))] = rng.choice(_NAMES)
            if rng.random() < 0.1:
                words.insert(rng.randrange(len(words)), str(rng.randint(2, 1999)))
            if rng.random() < 0.15:
                words[-1] += "'s"
            sentence = " ".join(words)
            sentence = sentence[0].upper() + sentence[1:] + rng.choice([".", ".", ".", "!", "?"])
            if rng.random() < 0.2:
                sentence = f'"{sentence}" said {rng.choice(_NAMES)}.'
            sentences.append(sentence)
        story = " ".join(sentences) + ("\n" if rng.random() < 0.5 else "\n\n")
        stories.append(story)
        size += len(story) + len(SPECIAL)
    return SPECIAL.join(stories)


def _timed(fn):
    t0 = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=5.0, help="corpus size in megabytes")
    parser.add_argument("--vocab-size", type=int, default=10_000)
    parser.add_argument("--num-processes", type=int, default=None, help="default: one per CPU")
    parser.add_argument("--baseline-kb", type=int, default=200, help="slice size for the naive baseline")
    parser.add_argument("--baseline-vocab-size", type=int, default=500)
    args = parser.parse_args()

    text = make_corpus(int(args.mb * 1e6))
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text(text, encoding="utf-8")
        mb = corpus.stat().st_size / 1e6

        (vocab, merges), train_s = _timed(
            lambda: train_bpe(corpus, args.vocab_size, [SPECIAL], num_processes=args.num_processes)
        )
        tok = Tokenizer(vocab, merges, [SPECIAL])
        ids, encode_s = _timed(lambda: tok.encode(text))
        tok._cache.clear()  # measure streaming from a cold cache too

        def stream() -> int:
            with open(corpus, encoding="utf-8") as f:
                return sum(1 for _ in tok.encode_iterable(f))

        n_stream, stream_s = _timed(stream)
        assert n_stream == len(ids)
        assert tok.decode(ids) == text

        # Naive baseline vs. the incremental algorithm on the same slice and the same number of merges.
        small = Path(tmp) / "small.txt"
        small.write_text(text[: args.baseline_kb * 1000], encoding="utf-8")
        counts = count_pretokens(small, [SPECIAL], num_processes=1)
        n_merges = args.baseline_vocab_size - 257
        fast, fast_s = _timed(lambda: merges_from_counts(counts, n_merges))
        naive, naive_s = _timed(lambda: reference_merges(counts, n_merges))
        assert fast == naive, "incremental and naive BPE disagree"

    print(f"corpus: {mb:.2f} MB English-like text, {os.cpu_count()} CPUs, vocab {len(vocab):,}\n")
    print("| measurement | result |")
    print("| --- | --- |")
    print(f"| train_bpe, {len(vocab):,} vocab on {mb:.1f} MB | {train_s:.1f} s |")
    print(f"| encode (single process) | {mb / encode_s:.2f} MB/s ({len(ids) / encode_s / 1e6:.2f} M tok/s) |")
    print(f"| encode_iterable (file, line by line) | {mb / stream_s:.2f} MB/s |")
    print(f"| compression | {len(text.encode()) / len(ids):.2f} bytes/token |")
    print(
        f"| {n_merges} merges on {args.baseline_kb} KB: naive full recount vs incremental | "
        f"{naive_s:.2f} s vs {fast_s:.3f} s ({naive_s / fast_s:.0f}x) |"
    )


if __name__ == "__main__":
    main()
