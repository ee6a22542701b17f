"""Byte-level BPE: hand-checked merges, encoding/decoding, streaming, safe cut points and file formats."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lm.tokenizer import (
    ByteTokenizer,
    Tokenizer,
    count_pretokens,
    find_chunk_boundaries,
    load_tokenizer,
    merges_from_counts,
    reference_merges,
    train_bpe,
)

EOT = "<|endoftext|>"


def write(tmp_path: Path, text: str, name: str = "corpus.txt") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8"))
    return path


def random_text(rng: random.Random, pieces: list[str], n: int) -> str:
    return "".join(rng.choice(pieces) for _ in range(n))


# Pieces chosen to hit every pre-tokenizer alternative and its edge cases: contractions ("'ll" cut after
# "'l"), runs of spaces and newlines before words, digits, punctuation, multi-byte letters and emoji.
TRICKY = [
    "a",
    "b",
    "ll",
    "s",
    "'",
    "'ll",
    "'s",
    " ",
    "  ",
    "\n",
    "\n\n",
    "\t",
    "1",
    "23",
    "!",
    "?!",
    "é",
    "日本",
]
TRICKY += ["😀", "👩‍👩‍👧", " the", " cat", "ate"]


def story_corpus(rng: random.Random, n_stories: int) -> str:
    words = "the a cat dog sat ran on mat big small happy it was and then they said".split()
    stories = []
    for _ in range(n_stories):
        sentences = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) for _ in range(3)]
        stories.append(". ".join(s.capitalize() for s in sentences) + ".\n")
    return EOT.join(stories)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """A small tokenizer trained on stories plus tricky text, with an end-of-text token."""
    rng = random.Random(0)
    text = story_corpus(rng, 200) + EOT + random_text(rng, TRICKY, 3000)
    path = write(tmp_path_factory.mktemp("trained"), text)
    vocab, merges = train_bpe(path, 600, [EOT])
    return Tokenizer(vocab, merges, [EOT])


# ----------------------------------------------------------------------------------------------------------
# Training: hand-checked merges
# ----------------------------------------------------------------------------------------------------------


def test_train_bpe_hand_checked_merges_with_ties(tmp_path: Path) -> None:
    # Pre-tokens: "low" x1, " low" x4, " lower" x2, " widest" x3, " newest" x6. Hand count:
    #  1. (e,s)=9 and (s,t)=9 tie -> the greater pair (s,t).        2. (e,st)=9.
    #  3. (l,o)=7 and (o,w)=7 tie -> (o,w).                          4. (l,ow)=7.
    #  5. six pairs at 6: (" ",low) (" ",n) (n,e) (e,w) (w,est) -> greatest first element "w": (w,est).
    #  6. (" ",n) (n,e) (e,west) (" ",low) at 6 -> (n,e).            7. (ne,west) beats (" ",ne), (" ",low).
    #  8. (" ",newest) beats (" ",low): b"newest" > b"low".           9. (" ",low)=6.
    # 10. (" ",w) (w,i) (i,d) (d,est) at 3 -> (w,i).
    text = "low low low low low lower lower widest widest widest newest newest newest newest newest newest"
    vocab, merges = train_bpe(write(tmp_path, text), 256 + 1 + 10, [EOT])
    assert merges == [
        (b"s", b"t"),
        (b"e", b"st"),
        (b"o", b"w"),
        (b"l", b"ow"),
        (b"w", b"est"),
        (b"n", b"e"),
        (b"ne", b"west"),
        (b" ", b"newest"),
        (b" ", b"low"),
        (b"w", b"i"),
    ]
    assert len(vocab) == 267
    assert vocab[256] == EOT.encode()
    assert [vocab[257 + i] for i in range(3)] == [b"st", b"est", b"ow"]
    assert all(vocab[b] == bytes([b]) for b in range(256))


def test_tie_prefers_lexicographically_greater_bytes_not_ids(tmp_path: Path) -> None:
    # "ab" and "ba" both occur twice; (b,a) > (a,b) as bytes. Then the tie between (b"a", b"b") and the
    # multi-byte (b"ba", ...) is decided on bytes too: b"ba" > b"a".
    vocab, merges = train_bpe(write(tmp_path, "ab ab ba ba"), 256 + 2, [])
    assert merges == [(b"b", b"a"), (b"a", b"b")]
    # A prefix is smaller than its extensions: (b"a", b"bc") < (b"ab", b"c") because b"a" < b"ab".
    counts = {"abc": 1}
    assert merges_from_counts(counts, 1) == [(b"b", b"c")]  # (b,c) > (a,b)
    assert merges_from_counts({"xab": 1, "ab": 0, "abx": 0}, 2) == [(b"x", b"a"), (b"xa", b"b")]


def test_special_tokens_are_removed_before_counting_and_added_to_vocab(tmp_path: Path) -> None:
    # Without removal, the five copies of the special token would dominate the pair counts.
    text = EOT * 5 + "ab" + EOT + "ab"
    vocab, merges = train_bpe(write(tmp_path, text), 300, [EOT])
    assert merges == [(b"a", b"b")]  # then no pairs are left: training stops early
    assert len(vocab) == 256 + 1 + 1
    assert list(vocab.values()).count(EOT.encode()) == 1


def test_merges_never_cross_pretoken_boundaries(tmp_path: Path) -> None:
    # Pre-tokens "a", " b", " a", " b", " a", " b": pairs (" ",b)=3 and (" ",a)=2, never (a," ") or (b," ").
    vocab, merges = train_bpe(write(tmp_path, "a b a b a b"), 300, [])
    assert merges == [(b" ", b"b"), (b" ", b"a")]


def test_vocab_size_must_cover_bytes_and_specials(tmp_path: Path) -> None:
    path = write(tmp_path, "hello")
    with pytest.raises(ValueError, match="below 256"):
        train_bpe(path, 256, [EOT])
    vocab, merges = train_bpe(path, 257, [EOT])
    assert merges == [] and len(vocab) == 257


@pytest.mark.parametrize("seed", range(4))
def test_incremental_merges_match_naive_full_recount(seed: int) -> None:
    # Small alphabets make many ties, which is where an incremental implementation goes wrong.
    rng = random.Random(seed)
    alphabet = ["a", "b", "c", "ab", "é", " "] if seed % 2 else ["x", "y", "xy", "yx", "z"]
    counts = {}
    for _ in range(300):
        word = random_text(rng, alphabet, rng.randint(1, 12))
        counts[word] = counts.get(word, 0) + rng.randint(1, 5)
    assert merges_from_counts(counts, 150) == reference_merges(counts, 150)


def test_training_is_deterministic_and_independent_of_processes(tmp_path: Path) -> None:
    rng = random.Random(1)
    text = story_corpus(rng, 500) + EOT + random_text(rng, TRICKY, 2000)
    text = text * (1_200_000 // len(text) + 1)  # over the 1 MB threshold, so workers are really used
    path = write(tmp_path, text)
    serial = train_bpe(path, 400, [EOT], num_processes=1)
    assert train_bpe(path, 400, [EOT], num_processes=1) == serial
    assert train_bpe(path, 400, [EOT], num_processes=2) == serial
    assert count_pretokens(path, [EOT], num_processes=2) == count_pretokens(path, [EOT], num_processes=1)


# ----------------------------------------------------------------------------------------------------------
# Encoding and decoding
# ----------------------------------------------------------------------------------------------------------


def test_encode_hand_checked_example() -> None:
    # The CS336 handout example: "the cat ate" -> pre-tokens "the", " cat", " ate".
    vocab = {0: b" ", 1: b"a", 2: b"c", 3: b"e", 4: b"h", 5: b"t", 6: b"th", 7: b" c", 8: b" a", 9: b"the"}
    vocab[10] = b" at"
    merges = [(b"t", b"h"), (b" ", b"c"), (b" ", b"a"), (b"th", b"e"), (b" a", b"t")]
    tok = Tokenizer(vocab, merges)
    assert tok.encode("the cat ate") == [9, 7, 1, 5, 10, 3]
    assert tok.decode([9, 7, 1, 5, 10, 3]) == "the cat ate"
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tok.encode("dog")


def test_encode_applies_merges_in_rank_order_not_left_to_right() -> None:
    vocab = {b: bytes([b]) for b in range(256)} | {256: b"bc", 257: b"ab"}
    # (b,c) has the lower rank, so "abc" -> [a, bc] even though (a,b) comes first in the text.
    tok = Tokenizer(vocab, [(b"b", b"c"), (b"a", b"b")])
    assert tok.encode("abc") == [ord("a"), 256]
    assert tok.encode("abd") == [257, ord("d")]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Hello, world! It's 2024 and they'll say: 'hi'.\n\n  indented\ttab  \n",
        "Ünïcödé naïve café — 日本語のテキスト, العربية, Ελληνικά, e\u0301 combining",
        "emoji 😀🙂 family 👩‍👩‍👧‍👦 flags 🇫🇷🇯🇵 skin 👍🏽",
        "x" * 1000 + " " * 50 + "\n" * 7,
    ],
)
def test_round_trip(trained: Tokenizer, text: str) -> None:
    ids = trained.encode(text)
    assert trained.decode(ids) == text
    assert all(0 <= i < len(trained.vocab) for i in ids)


def test_merges_compress_and_stay_inside_pretokens(trained: Tokenizer) -> None:
    ids = trained.encode("the cat sat on the mat")
    assert len(ids) < len("the cat sat on the mat") / 2
    pieces = [trained.vocab[i] for i in ids]
    assert b"".join(pieces) == b"the cat sat on the mat"
    # No token spans a word and the following space: every space is at the start of a token.
    assert all(b" " not in piece[1:] for piece in pieces)


def test_special_tokens_are_never_split(trained: Tokenizer) -> None:
    eot = trained.eot_token
    assert eot == 256
    ids = trained.encode(f"the cat{EOT}{EOT}the dog{EOT}")
    assert ids.count(eot) == 3
    assert ids[-1] == eot
    assert trained.decode(ids) == f"the cat{EOT}{EOT}the dog{EOT}"
    # Text that merely looks like part of a special token is ordinary text.
    assert eot not in trained.encode("<|endoftext| <|endoftext")


def test_overlapping_special_tokens_match_longest_first() -> None:
    vocab = {b: bytes([b]) for b in range(256)}
    double = EOT + EOT
    tok = Tokenizer(vocab, [], [EOT, double])
    eot, dbl = tok.eot_token, tok.encode(double)[0]
    assert (eot, dbl) == (256, 257)
    assert tok.encode(f"a{EOT}{EOT}{EOT}b") == [ord("a"), dbl, eot, ord("b")]
    assert tok.decode(tok.encode(f"a{EOT}{EOT}{EOT}b")) == f"a{EOT}{EOT}{EOT}b"


def test_decode_invalid_utf8_becomes_replacement_character(trained: Tokenizer) -> None:
    e_acute = "é".encode()
    assert trained.decode([e_acute[0]]) == "\ufffd"  # half of a two-byte character
    assert trained.decode([0xFF, ord("a")]) == "\ufffda"
    assert trained.decode([10**9]) == "\ufffd"  # not in the vocabulary


# ----------------------------------------------------------------------------------------------------------
# Streaming and safe cut points
# ----------------------------------------------------------------------------------------------------------


def random_chunks(rng: random.Random, text: str) -> list[str]:
    cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 40))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


def test_encode_iterable_equals_encode_across_line_boundaries(trained: Tokenizer) -> None:
    text = "Once upon a time  \n\n  there was a cat.\nIt's     here\n\n\n" + EOT + "\nThey'll go!\n  \n"
    lines = text.splitlines(keepends=True)
    assert list(trained.encode_iterable(lines)) == trained.encode(text)
    assert list(trained.encode_iterable(iter(lines))) == trained.encode(text)


@pytest.mark.parametrize(
    "pieces",
    [
        TRICKY + [EOT, EOT[:5], EOT[5:]],  # special tokens, also assembled from two pieces
        ["a", "'", "l", "ll", "1", "!", "é", "😀", EOT],  # no whitespace at all: the fallback cut
    ],
    ids=["with-whitespace", "no-whitespace"],
)
def test_encode_iterable_equals_encode_on_random_chunkings(trained: Tokenizer, pieces: list[str]) -> None:
    rng = random.Random(0)
    trained.STREAM_FLUSH_CHARS = 4  # cut the buffer as often as possible (instance attribute)
    try:
        for _ in range(200):
            text = random_text(rng, pieces, rng.randint(0, 80))
            assert list(trained.encode_iterable(random_chunks(rng, text))) == trained.encode(text), text
    finally:
        del trained.STREAM_FLUSH_CHARS


def test_encode_iterable_with_overlapping_specials() -> None:
    vocab = {b: bytes([b]) for b in range(256)}
    tok = Tokenizer(vocab, [], ["<|a|>", "<|a|><|a|>", "x y"])
    tok.STREAM_FLUSH_CHARS = 1
    rng = random.Random(1)
    for _ in range(300):
        text = random_text(rng, ["<|a|>", "<|", "a|>", "x", " ", "y", "z"], rng.randint(0, 30))
        assert list(tok.encode_iterable(random_chunks(rng, text))) == tok.encode(text), text


@pytest.mark.parametrize("specials", [[EOT], [EOT, "<|end of text|>"], []])
def test_chunk_boundaries_do_not_change_the_encoding(tmp_path: Path, specials: list[str]) -> None:
    rng = random.Random(2)
    pieces = TRICKY + specials + ["<|end", " of", " text|>"]
    text = random_text(rng, pieces, 4000)
    path = write(tmp_path, text)
    tok = Tokenizer({b: bytes([b]) for b in range(256)}, [], specials)
    whole = tok.encode(text)
    data = path.read_bytes()
    for num_chunks in (2, 7, 50, 400):
        bounds = find_chunk_boundaries(path, num_chunks, specials)
        assert bounds[0] == 0 and bounds[-1] == len(data) and bounds == sorted(set(bounds))
        assert len(bounds) > min(num_chunks, 20) // 2  # the text has plenty of safe positions
        pieces_ids = [tok.encode(data[a:b].decode("utf-8")) for a, b in zip(bounds, bounds[1:], strict=False)]
        assert [i for ids in pieces_ids for i in ids] == whole


def test_chunk_boundaries_never_cut_inside_a_special_token(tmp_path: Path) -> None:
    # A special token that contains spaces, right at the start of the file and repeated.
    text = "x y z x y\nx y x y x yy z"
    path = write(tmp_path, text)
    bounds = find_chunk_boundaries(path, len(text), ["x y"])
    inside = {start + k for start in range(len(text)) if text.startswith("x y", start) for k in (1, 2)}
    assert len(bounds) > 3 and not inside & set(bounds)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc for the peak RSS")
def test_encode_iterable_streams_a_large_file_in_bounded_memory(trained: Tokenizer, tmp_path: Path) -> None:
    # Measured in a fresh interpreter that loads only lm/tokenizer.py (not torch), from the growth of its
    # peak RSS (VmHWM; ru_maxrss would include this pytest process's peak, inherited across fork/exec).
    # Encoding the whole 6 MB text at once afterwards is the control that the measurement works.
    trained.save(tmp_path / "vocab.json", tmp_path / "merges.txt")
    rng = random.Random(3)
    chunk = story_corpus(rng, 300) + EOT
    big = tmp_path / "big.txt"
    with open(big, "w", encoding="utf-8") as f:
        for _ in range(6_000_000 // len(chunk) + 1):
            f.write(chunk)
    module_path = Path(__file__).parents[1] / "lm" / "tokenizer.py"
    script = textwrap.dedent(
        """
        import importlib.util, re, sys
        module_path, vocab, merges, special, big = sys.argv[1:]

        def peak_rss() -> int:
            with open("/proc/self/status") as f:
                return int(re.search(r"VmHWM:\\s+(\\d+) kB", f.read()).group(1)) * 1024

        spec = importlib.util.spec_from_file_location("tokenizer", module_path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        tok = mod.Tokenizer.from_files(vocab, merges, [special])
        with open(big, encoding="utf-8") as f:
            tok.encode(f.read(1 << 16))  # warm the pre-token cache and the allocator
        before = peak_rss()
        with open(big, encoding="utf-8") as f:
            n = sum(1 for _ in tok.encode_iterable(f))
        streamed = peak_rss()
        with open(big, encoding="utf-8") as f:
            assert len(tok.encode(f.read())) == n
        print(n, streamed - before, peak_rss() - before)
        """
    )
    args = [module_path, tmp_path / "vocab.json", tmp_path / "merges.txt", EOT, big]
    out = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True, check=True)
    n_tokens, streamed, whole = map(int, out.stdout.split())
    assert n_tokens > 1_000_000
    assert whole > 20_000_000, "the control did not register"
    assert streamed < 4_000_000, f"peak memory grew by {streamed / 1e6:.1f} MB while streaming"


# ----------------------------------------------------------------------------------------------------------
# Files and loading
# ----------------------------------------------------------------------------------------------------------


def test_save_and_from_files_round_trip(trained: Tokenizer, tmp_path: Path) -> None:
    trained.save(tmp_path / "vocab.json", tmp_path / "merges.txt")
    loaded = Tokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt", [EOT])
    assert loaded.vocab == trained.vocab
    assert loaded.merges == trained.merges
    text = f"The cat's 😀 here.{EOT}Ünïcödé\n"
    assert loaded.encode(text) == trained.encode(text)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_from_files_reads_gpt2_byte_mapping(tmp_path: Path) -> None:
    # GPT-2 files spell a space as "Ġ" and a newline as "Ċ".
    from lm.tokenizer import bytes_to_unicode

    table = bytes_to_unicode()
    vocab = {table[b]: b for b in range(256)} | {"Ġt": 256, "Ġth": 257, "ĊĊ": 258, EOT: 259}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\nĠ t\nĠt h\nĊ Ċ\n", encoding="utf-8")
    tok = Tokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt", [EOT])
    assert tok.vocab[257] == b" th" and tok.vocab[258] == b"\n\n"
    assert tok.merges == [(b" ", b"t"), (b" t", b"h"), (b"\n", b"\n")]
    assert tok.eot_token == 259
    assert tok.encode(f"a th\n\n{EOT}") == [ord("a"), 257, 258, 259]


def test_load_tokenizer_bpe_and_byte(trained: Tokenizer, tmp_path: Path) -> None:
    trained.save(tmp_path / "vocab.json", tmp_path / "merges.txt")
    meta = {
        "tokenizer": {
            "type": "bpe",
            "vocab": "vocab.json",
            "merges": "merges.txt",
            "special_tokens": [EOT],
            "eot_token": 256,
        }
    }
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    tok = load_tokenizer(tmp_path / "meta.json")
    assert isinstance(tok, Tokenizer) and tok.eot_token == 256
    assert tok.decode(tok.encode("Once upon a time")) == "Once upon a time"

    byte_meta = tmp_path / "byte" / "meta.json"
    byte_meta.parent.mkdir()
    byte_meta.write_text(json.dumps({"tokenizer": {"type": "byte", "eot_token": 256}}))
    btok = load_tokenizer(byte_meta)
    assert isinstance(btok, ByteTokenizer) and btok.eot_token == 256
    assert btok.encode("Hé") == [72, 0xC3, 0xA9]
    assert btok.decode([72, 0xC3, 0xA9, 256, 33]) == "Hé!"  # the end-of-text marker decodes to ""
    assert btok.decode([0xC3]) == "\ufffd"

    (tmp_path / "bad.json").write_text(json.dumps({"tokenizer": {"type": "sentencepiece"}}))
    with pytest.raises(ValueError, match="unknown tokenizer type"):
        load_tokenizer(tmp_path / "bad.json")
