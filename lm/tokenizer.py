r"""Byte-level BPE tokenizer, compatible with the CS336 assignment interface.

* :func:`train_bpe` learns a vocabulary and merge list from a UTF-8 text file.
* :class:`Tokenizer` encodes text to ids and decodes ids back to text.
* :func:`load_tokenizer` builds the right tokenizer for a dataset's ``meta.json``
  (a BPE :class:`Tokenizer`, or a :class:`ByteTokenizer` for raw-byte datasets).

File format (the one :meth:`Tokenizer.save` writes and :meth:`Tokenizer.from_files` reads) is GPT-2's:
every token's bytes are mapped to a printable string with GPT-2's ``bytes_to_unicode`` table, so

* ``vocab.json`` is a JSON object ``{mapped token string: id}``,
* ``merges.txt`` starts with ``#version: 0.2`` and then has one merge per line, in merge order, as the two
  mapped token strings separated by a single space (the table never maps a byte to a space).

Pre-tokenization uses the GPT-2 regex. Text is first split on special tokens, which are never split or merged;
when special tokens overlap, the longest one wins.

Where a text may be cut without changing its encoding is central to the parallel and streaming code. A
position is *safe* if no special-token occurrence spans it and it is either the start of a special token or a
pre-token boundary that follows a non-whitespace character, such as any transition from a non-whitespace to a
whitespace character (no alternative continues from non-whitespace into whitespace). The pattern has no
look-behind, so the right side pre-tokenizes as it does inside the whole; on the left side, ending the text
right after a non-whitespace character changes no pre-token, because the only alternative that behaves
differently at the end of the text is the whitespace look-ahead ``\s+(?!\S)``.
"""

from __future__ import annotations

import heapq
import json
import multiprocessing
import os
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from functools import cache
from pathlib import Path
from typing import BinaryIO

import regex

from lm.files import write_atomic

#: GPT-2's pre-tokenization pattern (as used by CS336).
GPT2_PRETOKEN_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_PRETOKEN_RE = regex.compile(GPT2_PRETOKEN_PATTERN)

# Rightmost non-whitespace -> whitespace transition (see the module docstring for why it is a safe cut).
_LAST_WS_TRANSITION_RE = regex.compile(r"(?r)(?<=\S)(?=\s)")
_WS_RE = regex.compile(r"\s")
# The same transition at the byte level, restricted to ASCII so that both bytes are whole characters.
_BYTES_WS_TRANSITION = rb"(?<=[\x21-\x7e])(?=[ \t\n\r])"

# Inputs smaller than this are processed in-process: starting worker processes costs more than it saves.
PARALLEL_MIN_BYTES = 1 << 20
# Upper bound on a worker's chunk, which bounds each worker's memory on very large corpora.
MAX_CHUNK_BYTES = 16 << 20


# --------------------------------------------------------------------------------------------------
# GPT-2 byte <-> printable-string mapping (file format)
# --------------------------------------------------------------------------------------------------


@cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from each byte value to a printable, non-space unicode character."""
    printable = list(range(ord("!"), ord("~") + 1))
    printable += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


@cache
def _unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def _token_to_str(token: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


def _str_to_token(text: str) -> bytes:
    table = _unicode_to_bytes()
    return bytes(table[c] for c in text)


# --------------------------------------------------------------------------------------------------
# Special tokens and safe cut points
# --------------------------------------------------------------------------------------------------


def _special_alternation(special_tokens: Iterable[str]) -> str | None:
    """Regex alternation of the special tokens, longest first so that the longest of overlapping ones wins."""
    specials = sorted(set(special_tokens), key=lambda s: (-len(s), s))
    if not specials:
        return None
    return "|".join(regex.escape(s) for s in specials)


def _spans_special_occurrence(data: bytes, pos: int, specials: list[bytes]) -> bool:
    """True if some occurrence of a special token in ``data`` starts before ``pos`` and ends after it."""
    return any(data.find(s, max(0, pos - len(s) + 1), pos + len(s) - 1) != -1 for s in specials if len(s) > 1)


def _next_safe_cut(f: BinaryIO, pos: int, end: int, specials: list[bytes], cut_re: regex.Pattern) -> int | None:
    """The first safe cut position in ``[pos, end)`` of the open binary file ``f`` (None if there is none)."""
    margin = max((len(s) for s in specials), default=1)
    block = 1 << 16
    while pos < end:
        # Read a little before ``pos`` (for the look-behind and specials spanning it) and after the block.
        win_start = max(0, pos - margin)
        f.seek(win_start)
        data = f.read(min(end, pos + block + margin) - win_start)
        if not data:
            return None
        at_end = win_start + len(data) >= end
        # Candidates near the window's end are checked again in the next window, with their right context.
        limit = len(data) if at_end else len(data) - margin
        for m in cut_re.finditer(data, pos - win_start):
            q = m.start()
            if q >= limit:
                break
            if not _spans_special_occurrence(data, q, specials):
                return win_start + q
        pos = win_start + max(limit, pos - win_start + 1)
    return None


def _cut_regex(specials: list[bytes]) -> regex.Pattern:
    """Candidate cuts: special-token starts (longest first) and ASCII non-space -> space transitions."""
    alternation = b"|".join(regex.escape(s) for s in sorted(specials, key=len, reverse=True))
    return regex.compile(alternation + b"|" + _BYTES_WS_TRANSITION if specials else _BYTES_WS_TRANSITION)


def next_safe_cut(
    path: str | os.PathLike, pos: int, special_tokens: Iterable[str] = (), end: int | None = None
) -> int | None:
    """The first position in ``[pos, end)`` of a UTF-8 file where its text may be cut (None if there is none).

    Cutting there changes neither the special-token matches nor the pre-tokens (see the module docstring).
    """
    specials = [s.encode("utf-8") for s in sorted(set(special_tokens))]
    if end is None:
        end = os.path.getsize(path)
    with open(path, "rb") as f:
        return _next_safe_cut(f, pos, end, specials, _cut_regex(specials))


def find_chunk_boundaries(
    path: str | os.PathLike,
    num_chunks: int,
    special_tokens: Iterable[str] = (),
    start: int = 0,
    end: int | None = None,
) -> list[int]:
    """Cut the byte range ``[start, end)`` of a UTF-8 file into about ``num_chunks`` pieces at safe positions.

    Returns sorted byte offsets ``[start, ..., end]``. Every offset is a character boundary at which the text
    may be cut without changing its tokenization (see the module docstring): encoding or counting each piece
    separately gives the same result as processing the whole range. There may be fewer pieces than asked for
    when the text has few safe positions.
    """
    specials = [s.encode("utf-8") for s in sorted(set(special_tokens))]
    cut_re = _cut_regex(specials)
    if end is None:
        end = os.path.getsize(path)
    step = max(1, (end - start) // max(1, num_chunks))
    boundaries = [start]
    with open(path, "rb") as f:
        while boundaries[-1] + step < end:
            cut = _next_safe_cut(f, boundaries[-1] + step, end, specials, cut_re)
            if cut is None:
                break
            boundaries.append(cut)
    boundaries.append(end)
    return boundaries


def num_workers(num_processes: int | None, num_bytes: int) -> int:
    """How many worker processes to use for ``num_bytes`` of text (1 means in-process)."""
    if num_bytes < PARALLEL_MIN_BYTES:
        return 1
    return max(1, num_processes if num_processes is not None else (os.cpu_count() or 1))


def mp_context(method: str | None = None) -> multiprocessing.context.BaseContext:
    """The multiprocessing context used for worker pools.

    Worker functions are top-level and their arguments picklable, so every start method works. Unless told
    otherwise we fork where that is the platform's default (Linux): spawned workers would re-import ``lm``
    (and with it torch), which takes longer than pre-tokenizing a few megabytes.
    """
    if method is None and sys.platform.startswith("linux"):
        method = "fork"
    return multiprocessing.get_context(method)


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def _count_pretokens_in_text(text: str, split_re: regex.Pattern | None) -> Counter[str]:
    counts: Counter[str] = Counter()
    for piece in split_re.split(text) if split_re is not None else (text,):
        counts.update(_PRETOKEN_RE.findall(piece))
    return counts


def _count_pretokens_in_range(path: str, start: int, end: int, alternation: str | None) -> Counter[str]:
    """Worker: count the pre-tokens of bytes ``[start, end)`` of ``path``, with special tokens removed."""
    with open(path, "rb") as f:
        f.seek(start)
        text = f.read(end - start).decode("utf-8")
    split_re = regex.compile(alternation) if alternation else None
    return _count_pretokens_in_text(text, split_re)


def count_pretokens(
    input_path: str | os.PathLike,
    special_tokens: Iterable[str] = (),
    *,
    num_processes: int | None = None,
    byte_range: tuple[int, int] | None = None,
    mp_start_method: str | None = None,
) -> Counter[str]:
    """Count the GPT-2 pre-tokens of a UTF-8 file, after removing the special tokens.

    Large inputs are cut at safe positions (:func:`find_chunk_boundaries`) and counted in a process pool; the
    counts do not depend on the number of processes.
    """
    path = os.fspath(input_path)
    start, end = byte_range if byte_range is not None else (0, os.path.getsize(path))
    specials = list(special_tokens)
    alternation = _special_alternation(specials)
    workers = num_workers(num_processes, end - start)
    if workers == 1:
        return _count_pretokens_in_range(path, start, end, alternation)
    # A few chunks per worker keeps the pool busy when chunks are uneven; MAX_CHUNK_BYTES bounds memory.
    num_chunks = max(4 * workers, -(-(end - start) // MAX_CHUNK_BYTES))
    bounds = find_chunk_boundaries(path, num_chunks, specials, start, end)
    tasks = [(path, a, b, alternation) for a, b in zip(bounds, bounds[1:], strict=False)]
    counts: Counter[str] = Counter()
    with mp_context(mp_start_method).Pool(min(workers, len(tasks))) as pool:
        for part in pool.starmap(_count_pretokens_in_range, tasks):
            counts.update(part)
    return counts


def _merge_pair(ids: Sequence[int], a: int, b: int, new_id: int) -> list[int]:
    """`ids` with every non-overlapping occurrence of the pair (a, b), left to right, replaced by new_id."""
    out: list[int] = []
    i, n = 0, len(ids)
    while i < n:
        if i + 1 < n and ids[i] == a and ids[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def _inverse_key(token: bytes) -> tuple[int, ...]:
    """A key whose ascending order is the *descending* lexicographic order of byte strings.

    Each byte is inverted and a terminator larger than any inverted byte is appended, so that a proper
    prefix (smaller as bytes) sorts after its extensions.
    """
    return tuple(255 - b for b in token) + (256,)


def merges_from_counts(
    pretoken_counts: dict[str, int] | dict[bytes, int], num_merges: int, progress: bool = False
) -> list[tuple[bytes, bytes]]:
    """Learn up to ``num_merges`` BPE merges from pre-token frequencies.

    Each step merges the most frequent adjacent pair of tokens inside pre-tokens, ties going to the
    lexicographically greater pair ``(bytes_a, bytes_b)``. Pair counts are kept up to date incrementally: a
    merge only revisits the pre-tokens that contain the merged pair (found through an index) and a max-heap
    with lazy deletion finds the next best pair, so a step costs time proportional to what it changes, not to
    the corpus. Stops early when no pair is left.
    """
    tokens: list[bytes] = [bytes([b]) for b in range(256)]
    inv_keys: list[tuple[int, ...]] = [_inverse_key(t) for t in tokens]
    words: list[list[int]] = []
    freqs: list[int] = []
    for word, freq in pretoken_counts.items():
        raw = word.encode("utf-8") if isinstance(word, str) else word
        if len(raw) > 1:  # single bytes have no pairs and can never change
            words.append(list(raw))
            freqs.append(freq)

    pair_counts: dict[tuple[int, int], int] = defaultdict(int)
    # pair -> indices of words that contain (or once contained) it; stale entries are skipped when used.
    pair_words: dict[tuple[int, int], set[int]] = defaultdict(set)
    for wi, (word, freq) in enumerate(zip(words, freqs, strict=True)):
        for pair in zip(word, word[1:], strict=False):
            pair_counts[pair] += freq
            pair_words[pair].add(wi)
    heap = [(-c, inv_keys[a], inv_keys[b], a, b) for (a, b), c in pair_counts.items()]
    heapq.heapify(heap)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=num_merges, desc="BPE merges", unit="merge", file=sys.stderr)
    merges: list[tuple[int, int]] = []
    while len(merges) < num_merges and heap:
        neg_count, _, _, a, b = heapq.heappop(heap)
        if pair_counts.get((a, b), 0) != -neg_count:
            continue  # stale heap entry: the pair's count changed after it was pushed
        new_id = len(tokens)
        tokens.append(tokens[a] + tokens[b])
        inv_keys.append(_inverse_key(tokens[new_id]))
        merges.append((a, b))

        delta: dict[tuple[int, int], int] = defaultdict(int)
        for wi in pair_words.pop((a, b)):
            word = words[wi]
            merged = _merge_pair(word, a, b, new_id)
            if len(merged) == len(word):
                continue  # stale index entry: the pair was already merged away inside this word
            freq = freqs[wi]
            for pair in zip(word, word[1:], strict=False):
                delta[pair] -= freq
            for pair in zip(merged, merged[1:], strict=False):
                delta[pair] += freq
                pair_words[pair].add(wi)
            words[wi] = merged
        for pair, d in delta.items():
            if d == 0:
                continue
            count = pair_counts[pair] + d
            if count > 0:
                pair_counts[pair] = count
                heapq.heappush(heap, (-count, inv_keys[pair[0]], inv_keys[pair[1]], pair[0], pair[1]))
            else:
                del pair_counts[pair]
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return [(tokens[a], tokens[b]) for a, b in merges]


def train_bpe(
    input_path: str | os.PathLike,
    vocab_size: int,
    special_tokens: list[str],
    *,
    num_processes: int | None = None,
    byte_range: tuple[int, int] | None = None,
    progress: bool = False,
    mp_start_method: str | None = None,
) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    """Train a byte-level BPE tokenizer on a UTF-8 text file.

    Returns ``(vocab, merges)``: ``vocab`` maps ids to token bytes, with ids 0-255 the single bytes, then the
    special tokens in the order given, then one token per merge in merge order; ``merges`` lists the merged
    pairs in the order they were learned. ``vocab_size`` counts all three kinds; the vocabulary is smaller
    when the corpus runs out of pairs to merge. Special tokens are cut out of the text before counting, so no
    merge involves them, and merges never cross pre-token boundaries. Ties between equally frequent pairs go
    to the lexicographically greater pair. The result is deterministic and independent of ``num_processes``
    (None: one per CPU; inputs under 1 MB are always processed in-process). ``byte_range`` restricts training
    to part of the file (it must start and end at safe positions, e.g. from :func:`find_chunk_boundaries`).
    """
    specials = list(dict.fromkeys(special_tokens))
    num_merges = vocab_size - 256 - len(specials)
    if num_merges < 0:
        raise ValueError(f"vocab_size {vocab_size} is below 256 bytes + {len(specials)} special tokens")
    counts = count_pretokens(
        input_path,
        specials,
        num_processes=num_processes,
        byte_range=byte_range,
        mp_start_method=mp_start_method,
    )
    merges = merges_from_counts(counts, num_merges, progress=progress)
    vocab = {i: bytes([i]) for i in range(256)}
    for s in specials:
        vocab[len(vocab)] = s.encode("utf-8")
    for a, b in merges:
        vocab[len(vocab)] = a + b
    return vocab, merges


def reference_merges(pretoken_counts: dict[str, int], num_merges: int) -> list[tuple[bytes, bytes]]:
    """Slow, obviously-correct BPE (full recount of every pair at every merge), for tests and benchmarks."""
    words = {tuple(bytes([b]) for b in w.encode("utf-8")): c for w, c in pretoken_counts.items()}
    merges: list[tuple[bytes, bytes]] = []
    for _ in range(num_merges):
        pairs: Counter[tuple[bytes, bytes]] = Counter()
        for word, c in words.items():
            for pair in zip(word, word[1:], strict=False):
                pairs[pair] += c
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        new_words: dict[tuple[bytes, ...], int] = {}
        for word, c in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new_words[tuple(out)] = new_words.get(tuple(out), 0) + c
        words = new_words
    return merges


# --------------------------------------------------------------------------------------------------
# Encoding and decoding
# --------------------------------------------------------------------------------------------------


class Tokenizer:
    """Byte-level BPE tokenizer.

    ``vocab`` maps ids to token bytes (trained ones contain all 256 single bytes, so that any text can be
    encoded; text with a byte missing from ``vocab`` raises ValueError); ``merges`` is the ordered merge
    list. Special tokens missing from ``vocab`` are appended to it. ``eot_token`` is the id of the first
    special token (None without specials).
    """

    #: Pre-token encodings are cached; the cache is cleared when it reaches this size, to bound memory.
    CACHE_SIZE = 1 << 18
    #: ``encode_iterable`` encodes its buffer once it holds at least this many characters.
    STREAM_FLUSH_CHARS = 1 << 15

    def __init__(
        self,
        vocab: dict[int, bytes],
        merges: list[tuple[bytes, bytes]],
        special_tokens: list[str] | None = None,
    ) -> None:
        self.vocab: dict[int, bytes] = dict(vocab)
        self.merges: list[tuple[bytes, bytes]] = list(merges)
        self.special_tokens: list[str] = list(dict.fromkeys(special_tokens or []))
        self._id_of: dict[bytes, int] = {}
        for i, tok in sorted(self.vocab.items()):
            self._id_of.setdefault(tok, i)
        for s in self.special_tokens:
            raw = s.encode("utf-8")
            if raw not in self._id_of:
                new_id = max(self.vocab, default=-1) + 1
                self.vocab[new_id] = raw
                self._id_of[raw] = new_id
        # None marks a byte the vocabulary cannot represent (only hand-made vocabularies lack bytes).
        self._byte_ids: list[int | None] = [self._id_of.get(bytes([b])) for b in range(256)]
        self._special_ids: dict[str, int] = {s: self._id_of[s.encode("utf-8")] for s in self.special_tokens}
        self.eot_token: int | None = self._special_ids[self.special_tokens[0]] if self.special_tokens else None

        # (left id, right id) -> rank, and rank -> (left id, right id, merged id). Merges whose parts or
        # result are not in the vocabulary can never apply and are dropped.
        self._ranks: dict[tuple[int, int], int] = {}
        self._merge_by_rank: list[tuple[int, int, int]] = []
        for a, b in self.merges:
            ia, ib, im = self._id_of.get(a), self._id_of.get(b), self._id_of.get(a + b)
            if ia is None or ib is None or im is None or (ia, ib) in self._ranks:
                continue
            self._ranks[(ia, ib)] = len(self._merge_by_rank)
            self._merge_by_rank.append((ia, ib, im))

        alternation = _special_alternation(self.special_tokens)
        # A capturing group makes split() return [text, special, text, special, ..., text].
        self._special_split_re = regex.compile(f"({alternation})") if alternation else None
        self._special_re = regex.compile(alternation) if alternation else None
        self._cache: dict[str, tuple[int, ...]] = {}

    # -- construction from and saving to files -----------------------------------------------------

    @classmethod
    def from_files(
        cls,
        vocab_filepath: str | os.PathLike,
        merges_filepath: str | os.PathLike,
        special_tokens: list[str] | None = None,
    ) -> Tokenizer:
        """Load a tokenizer from GPT-2-style ``vocab.json`` and ``merges.txt`` (see the module docstring)."""
        with open(vocab_filepath, encoding="utf-8") as f:
            vocab = {int(i): _str_to_token(s) for s, i in json.load(f).items()}
        merges = []
        with open(merges_filepath, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                line = line.rstrip("\n")
                if not line or (lineno == 1 and line.startswith("#version")):
                    continue
                parts = line.split(" ")
                if len(parts) != 2:
                    raise ValueError(f"{merges_filepath}:{lineno}: expected two tokens separated by a space")
                merges.append((_str_to_token(parts[0]), _str_to_token(parts[1])))
        return cls(vocab, merges, special_tokens)

    def save(self, vocab_filepath: str | os.PathLike, merges_filepath: str | os.PathLike) -> None:
        """Write ``vocab.json`` and ``merges.txt`` atomically, in the format :meth:`from_files` reads."""
        vocab = {_token_to_str(tok): i for i, tok in sorted(self.vocab.items())}
        write_atomic(vocab_filepath, json.dumps(vocab, ensure_ascii=False, indent=0).encode("utf-8"))
        lines = ["#version: 0.2"] + [f"{_token_to_str(a)} {_token_to_str(b)}" for a, b in self.merges]
        write_atomic(merges_filepath, ("\n".join(lines) + "\n").encode("utf-8"))

    # -- encoding ----------------------------------------------------------------------------------

    def _bpe(self, token: bytes) -> tuple[int, ...]:
        """Apply the merges to one pre-token, lowest rank first, as BPE training learned them."""
        ids = [self._byte_ids[b] for b in token]
        if None in ids:
            missing = token[ids.index(None)]
            raise ValueError(f"byte {missing:#04x} of {token!r} is not in the vocabulary")
        ranks = self._ranks
        while len(ids) > 1:
            best = None
            for pair in zip(ids, ids[1:], strict=False):
                rank = ranks.get(pair)
                if rank is not None and (best is None or rank < best):
                    best = rank
            if best is None:
                break
            a, b, merged_id = self._merge_by_rank[best]
            ids = _merge_pair(ids, a, b, merged_id)
        return tuple(ids)

    def _encode_ordinary(self, text: str, out: list[int]) -> None:
        """Append the ids of ``text`` (which contains no special tokens) to ``out``."""
        cache = self._cache
        for pretoken in _PRETOKEN_RE.findall(text):
            ids = cache.get(pretoken)
            if ids is None:
                if len(cache) >= self.CACHE_SIZE:
                    cache.clear()
                ids = cache[pretoken] = self._bpe(pretoken.encode("utf-8"))
            out += ids

    def encode(self, text: str) -> list[int]:
        """Encode ``text`` to token ids; special tokens become their own ids and are never split."""
        out: list[int] = []
        if self._special_split_re is None:
            self._encode_ordinary(text, out)
            return out
        parts = self._special_split_re.split(text)
        for i, part in enumerate(parts):
            if i % 2:
                out.append(self._special_ids[part])
            elif part:
                self._encode_ordinary(part, out)
        return out

    def _partial_special_start(self, text: str) -> int:
        """Start of the longest suffix of ``text`` that a longer special token could begin with."""
        start = len(text)
        for s in self.special_tokens:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    start = min(start, len(text) - k)
                    break
        return start

    def _stream_cut(self, buf: str) -> int:
        """A position in ``buf`` before which the encoding cannot change, whatever follows (0 if none)."""
        hold = self._partial_special_start(buf) if self.special_tokens else len(buf)
        seg_start = 0  # end of the last special-token match that no continuation can change
        if self._special_re is not None:
            for m in self._special_re.finditer(buf):
                if m.end() > hold:
                    hold = min(hold, m.start())
                    break
                seg_start = m.end()
        # Between seg_start and hold there is plain text; cut it at a non-space -> space transition.
        m = _LAST_WS_TRANSITION_RE.search(buf, seg_start, hold)
        if m is not None and m.start() > seg_start:
            return m.start()
        # No such transition (so the text is at most one run of whitespace and one of non-whitespace): cut
        # at a pre-token boundary that follows a non-whitespace character. Boundaries are taken from the
        # pre-tokens of buf[seg_start:hold], which agree with the whole text's except for those starting in
        # the last 3 characters (a contraction such as "'ll" is decided by 3 characters).
        cut = seg_start
        for pm in _PRETOKEN_RE.finditer(buf, seg_start, hold):
            if pm.start() > hold - 3:
                break
            if pm.start() > seg_start and not _WS_RE.match(buf, pm.start() - 1):
                cut = pm.start()
        return cut

    def encode_iterable(self, iterable: Iterable[str]) -> Iterator[int]:
        """Lazily encode a stream of strings (e.g. an open text file, line by line).

        Yields exactly the ids of ``encode("".join(iterable))`` while holding only a bounded buffer: text is
        encoded once the buffer is large enough, up to the last position where the encoding cannot depend on
        what follows (memory grows only for runs of text without any whitespace or special token).
        """
        buf = ""
        for piece in iterable:
            buf += piece
            if len(buf) < self.STREAM_FLUSH_CHARS:
                continue
            cut = self._stream_cut(buf)
            if cut > 0:
                yield from self.encode(buf[:cut])
                buf = buf[cut:]
        if buf:
            yield from self.encode(buf)

    # -- decoding ----------------------------------------------------------------------------------

    def decode(self, ids: Iterable[int]) -> str:
        """Decode ids to text; invalid UTF-8 (and ids outside the vocabulary) become U+FFFD."""
        vocab = self.vocab
        data = b"".join(vocab.get(int(i), b"\xef\xbf\xbd") for i in ids)
        return data.decode("utf-8", errors="replace")

    def __len__(self) -> int:
        return len(self.vocab)


class ByteTokenizer:
    """Raw-byte tokenizer: ids 0-255 are bytes, ``eot_token`` (default 256) marks the end of a text.

    ``decode`` drops the end-of-text marker and any other id outside 0-255; invalid UTF-8 becomes U+FFFD.
    """

    def __init__(self, eot_token: int | None = 256) -> None:
        self.eot_token = eot_token
        self.special_tokens: list[str] = []

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of ``text``."""
        return list(text.encode("utf-8"))

    def encode_iterable(self, iterable: Iterable[str]) -> Iterator[int]:
        """Lazily encode a stream of strings."""
        for piece in iterable:
            yield from piece.encode("utf-8")

    def decode(self, ids: Iterable[int]) -> str:
        """Decode byte ids to text."""
        return bytes(i for i in (int(i) for i in ids) if 0 <= i < 256).decode("utf-8", errors="replace")

    def __len__(self) -> int:
        return 256 if self.eot_token is None else max(256, self.eot_token + 1)


def load_tokenizer(meta_path: str | os.PathLike) -> Tokenizer | ByteTokenizer:
    """Build the tokenizer a dataset was prepared with, from its ``meta.json`` (written by ``lm.prepare``).

    ``meta["tokenizer"]`` is either ``{"type": "bpe", "vocab": ..., "merges": ..., "special_tokens": [...]}``
    (file names relative to the meta.json directory) or ``{"type": "byte", "eot_token": 256}``.
    """
    meta_path = Path(meta_path)
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    spec = meta.get("tokenizer") if isinstance(meta, dict) else None
    if not isinstance(spec, dict):
        raise ValueError(f"{meta_path}: no 'tokenizer' entry")
    kind = spec.get("type")
    if kind == "byte":
        return ByteTokenizer(spec.get("eot_token", 256))
    if kind == "bpe":
        base = meta_path.parent
        tok = Tokenizer.from_files(
            base / spec.get("vocab", "vocab.json"),
            base / spec.get("merges", "merges.txt"),
            spec.get("special_tokens") or [],
        )
        if spec.get("eot_token") is not None and tok.eot_token != spec["eot_token"]:
            raise ValueError(f"{meta_path}: eot_token {spec['eot_token']} disagrees with the tokenizer files")
        return tok
    raise ValueError(f"{meta_path}: unknown tokenizer type {kind!r}")
