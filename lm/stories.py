"""Built-in corpus: short English stories from a seeded probabilistic grammar, tokenized as bytes.

`python -m lm.train` must work on a machine with no data, so this module can write a small corpus in
the TinyStories spirit (named characters, pets, places, simple events) into a cache directory once and
reuse it afterwards (`builtin_data_dir`).

Because we own the source distribution we also know its entropy exactly. Every random decision goes
through `Source.pick` with explicit probabilities, and the sampler adds up -ln p of each option it takes.
The grammar is unambiguous (the text determines the choices), so the sum for a story is exactly
-ln p(story), and the per-token average over a split is the loss that the true distribution itself
would get on that split: the floor that validation loss can approach (`meta.json: entropy_floor_nats`).

Why the grammar is unambiguous, by construction:
  * every choice appends the text of the option it takes, immediately (no hidden choices);
  * the option texts of each `Choice` are non-empty and prefix-free (checked when the table is built);
  * everything else appended is a deterministic function of the earlier choices.
Reading the text from the left, at each choice point at most one option text can be a prefix of the
rest, so the sequence of choices is recovered uniquely. `parse_story` does exactly that replay and
raises `ParseError` if zero or several options fit, and tests run it on generated stories.

Two caveats on the floor. It is -ln p of the particular sampled split divided by its length, not the
expected entropy rate (train and val agree to about 1e-3 nats). And a model scored on windows that
start mid-story lacks the context that the source conditions on (the hero's name, say), so its
best achievable loss sits slightly above the floor.

The v1 default corpus comes to about 0.22 nats per byte, against 3.06 for its byte frequencies
(unigram): English-like template text spends most bytes on spelling out words chosen from a few
dozen options, which is also where TinyStories-like text sits, so a floor much higher than that would
take near-random word salad.

Token ids 0..255 are UTF-8 bytes (the text is ASCII), 256 is an end-of-text token after every story.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import json
import math
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

try:  # Serializes generation between processes; without it the atomic rename alone stays correct.
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None  # type: ignore[assignment]

# Bump when the grammar, the probabilities or the default sizes change: the cache directory is named
# after it, so a stale corpus (and its entropy figures) is never reused.
VERSION = "v1"
EOT_TOKEN = 256
VOCAB_SIZE = 257
DEFAULT_SEED = 1337
DEFAULT_TRAIN_TOKENS = 3_000_000
DEFAULT_VAL_TOKENS = 150_000
CACHE_ENV = "LM_SWEEPS_CACHE"

__all__ = [
    "CACHE_ENV",
    "DEFAULT_SEED",
    "DEFAULT_TRAIN_TOKENS",
    "DEFAULT_VAL_TOKENS",
    "EOT_TOKEN",
    "VERSION",
    "VOCAB_SIZE",
    "Choice",
    "ParseError",
    "Source",
    "builtin_data_dir",
    "default_cache_root",
    "generate_corpus",
    "parse_story",
    "sample_story",
    "story_grammar",
]


class ParseError(ValueError):
    """The text is not a derivation of the grammar, or not a unique one."""


# --------------------------------------------------------------------------------------------------
# Choice tables and the two ways of running a grammar (sampling and replaying)
# --------------------------------------------------------------------------------------------------


class Choice:
    """One choice point: options ``(text, weight[, payload])`` with probability weight / sum(weights).

    Taking an option appends its text and returns its payload (the text itself if none is given).
    The texts must be non-empty and prefix-free, which is what makes the grammar unambiguous;
    ``check=False`` skips that and exists only to let tests build a deliberately ambiguous grammar.
    """

    __slots__ = ("texts", "payloads", "cum", "nll")

    def __init__(self, options: Sequence[tuple[Any, ...]], *, check: bool = True) -> None:
        if not options:
            raise ValueError("a choice needs at least one option")
        self.texts: tuple[str, ...] = tuple(o[0] for o in options)
        self.payloads: tuple[Any, ...] = tuple(o[2] if len(o) > 2 else o[0] for o in options)
        weights = [float(o[1]) for o in options]
        if min(weights) <= 0:
            raise ValueError(f"weights must be positive: {options}")
        total = math.fsum(weights)
        self.nll: tuple[float, ...] = tuple(-math.log(w / total) for w in weights)
        cum = [c / total for c in itertools.accumulate(weights)]
        cum[-1] = 1.0  # random() < 1, so bisect never runs off the end despite rounding
        self.cum: list[float] = cum
        if check:
            _check_prefix_free(self.texts)


def _check_prefix_free(texts: Sequence[str]) -> None:
    # After sorting, a string that is a prefix of another one is a prefix of its successor.
    if not all(texts):
        raise ValueError(f"empty option text in {texts}")
    ordered = sorted(texts)
    for a, b in zip(ordered, ordered[1:], strict=False):
        if b.startswith(a):
            raise ValueError(f"option texts are not prefix-free: {a!r} / {b!r}")


class Source(Protocol):
    """What a grammar sees: `say` appends fixed text, `pick` makes a random choice and appends it."""

    def say(self, text: str) -> None: ...

    def pick(self, choice: Choice) -> Any: ...


Grammar = Callable[[Source], None]


class _Sampler:
    """Runs a grammar forward with an RNG, collecting the text, the choices and their -ln p."""

    __slots__ = ("rng", "parts", "nll", "choices")

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.parts: list[str] = []
        self.nll = 0.0
        self.choices: list[int] = []

    def say(self, text: str) -> None:
        self.parts.append(text)

    def pick(self, choice: Choice) -> Any:
        i = bisect.bisect_right(choice.cum, self.rng.random())
        self.parts.append(choice.texts[i])
        self.nll += choice.nll[i]
        self.choices.append(i)
        return choice.payloads[i]


class _Replayer:
    """Runs a grammar against a given text: each choice takes the one option the text continues with."""

    __slots__ = ("text", "pos", "nll", "choices")

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.nll = 0.0
        self.choices: list[int] = []

    def say(self, text: str) -> None:
        if not self.text.startswith(text, self.pos):
            raise ParseError(f"expected {text!r} at {self.pos}: {self.text[self.pos : self.pos + 40]!r}")
        self.pos += len(text)

    def pick(self, choice: Choice) -> Any:
        fits = [i for i, t in enumerate(choice.texts) if self.text.startswith(t, self.pos)]
        if len(fits) != 1:
            what = "no option" if not fits else f"{len(fits)} options {[choice.texts[i] for i in fits]}"
            raise ParseError(f"{what} fit at {self.pos}: {self.text[self.pos : self.pos + 40]!r}")
        i = fits[0]
        self.pos += len(choice.texts[i])
        self.nll += choice.nll[i]
        self.choices.append(i)
        return choice.payloads[i]


def sample_story(rng: random.Random, grammar: Grammar | None = None) -> tuple[str, float, list[int]]:
    """Sample one story: returns (text, -ln p of the choices made, indices of the options taken)."""
    src = _Sampler(rng)
    (grammar or story_grammar)(src)
    return "".join(src.parts), src.nll, src.choices


def parse_story(text: str, grammar: Grammar | None = None) -> tuple[float, list[int]]:
    """Recover the choices from the text alone: returns (-ln p(text), indices of the options taken).

    Raises `ParseError` unless exactly one option fits at every choice point and the whole text is
    consumed. Success proves the text has a unique derivation, so the -ln p of that derivation is
    -ln p(text). (The check is conservative: options that fit as a prefix but would fail later still
    count as ambiguous; our grammar is built so that this never happens.)
    """
    src = _Replayer(text)
    (grammar or story_grammar)(src)
    if src.pos != len(text):
        raise ParseError(f"trailing text at {src.pos}: {text[src.pos : src.pos + 40]!r}")
    return src.nll, src.choices


# --------------------------------------------------------------------------------------------------
# Vocabulary. Word lists are '|'-separated; earlier words are more frequent (Zipf-like weights),
# as in real text, which also gives a small model something easy to learn first.
# --------------------------------------------------------------------------------------------------


def _zipf(words: str, *, lead: str = " ", s: float = 0.5, end: str = "") -> Choice:
    """A table over '|'-separated words, weight 1/(rank+1)**s, option texts lead + word + end."""
    items = words.split("|")
    return Choice([(lead + w + end, 1.0 / (r + 1) ** s, w) for r, w in enumerate(items)])


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


@dataclass(frozen=True, slots=True)
class _Phrase:
    """A noun with an optional adjective, as two choices: `head` takes an adjective (payload True,
    then `noun` follows) or the bare noun (payload False). With an article, the article goes with
    whichever word comes first ("an old box", "a box")."""

    head: Choice
    noun: Choice


def _phrase(nouns: str, adjs: str, *, p_adj: float, article: bool, s: float = 0.5) -> _Phrase:
    lead = _a if article else (lambda w: w)
    n_words, a_words = nouns.split("|"), adjs.split("|")
    n_w = [1.0 / (r + 1) ** s for r in range(len(n_words))]
    a_w = [1.0 / (r + 1) ** s for r in range(len(a_words))]
    head = [(" " + lead(a), p_adj * w / sum(a_w), True) for a, w in zip(a_words, a_w, strict=True)]
    head += [(" " + lead(n), (1 - p_adj) * w / sum(n_w), False) for n, w in zip(n_words, n_w, strict=True)]
    return _Phrase(Choice(head), Choice([(" " + n, w) for n, w in zip(n_words, n_w, strict=True)]))


GIRL_NAMES = (
    "Lily|Mia|Emma|Sara|Anna|Lucy|Zoe|Amy|Ella|Ruby|Kate|Grace|Chloe|Daisy|Rose|Molly|Nora|Ivy|Julia|"
    "Sophie|Alice|Clara|Maya|Eva|Nina|Jane|Olivia|Lena|Fiona|Wendy|Penny|Beth|Dora|Gina|Iris|Kira|"
    "Mary|Polly|Tess|Vera"
)
BOY_NAMES = (
    "Tom|Ben|Sam|Jack|Leo|Tim|Finn|Jake|Luke|Noah|Oliver|Adam|Ryan|Peter|Mark|Paul|David|Eli|Owen|Liam|"
    "Kevin|Joe|Dan|Bob|Alex|Oscar|Hugo|Carl|Ivan|Kai|Milo|Nick|Ray|Seth|Toby|Victor|Walter|Zack|Gus|Yusuf"
)
PET_NAMES = "Spot|Buddy|Fluffy|Coco|Max|Bella|Rex|Sunny|Pip|Whiskers|Patch|Biscuit|Pepper|Snowy|Rocky|Fuzz"

NAMES = {"f": _zipf(GIRL_NAMES), "m": _zipf(BOY_NAMES)}
PETS = _zipf(PET_NAMES)
PRONOUNS = {"f": ("She", "she", "her"), "m": ("He", "he", "his")}

# --- intro --------------------------------------------------------------------------------------
OPENINGS = Choice(
    [
        ("Once upon a time, there was", 6),
        ("One day, there was", 2),
        ("Long ago, there was", 1),
        ("There once was", 1),
        ("In a small town, there was", 1),
    ]
)
_KIND_ADJS = "little|happy|kind|brave|shy|clever|funny|curious|young|small|smart|sweet".split("|")
HERO_KINDS = Choice(
    [
        (f" {_a(adj)} {noun}", 1.0 / (r + 1) ** 0.7, g)
        for r, adj in enumerate(_KIND_ADJS)
        for g, noun in (("f", "girl"), ("m", "boy"))
    ]
    + [(" a girl", 1, "f"), (" a boy", 1, "m"), (" an old woman", 0.3, "f"), (" an old man", 0.3, "m")]
    + [(" a queen", 0.2, "f"), (" a king", 0.2, "m")]
)
HOME_CLAUSE = Choice([(".", 1, False), (" who lived in", 1, True)])
HOMES = _zipf(
    "a small house|a big house|a little village|a busy city|a cozy cottage|a tall tower|the woods|"
    "a farmhouse|a house by the sea|a blue house|a tiny hut|an old castle|a green valley|a quiet street",
    end=".",
)
COMPANIONS = Choice(
    [
        (" friend named", 4, "friend"),
        (" best friend named", 2, "friend"),
        (" dog named", 2, "pet"),
        (" cat named", 2, "pet"),
        (" puppy named", 1, "pet"),
        (" kitten named", 1, "pet"),
        (" bunny named", 1, "pet"),
        (" bird named", 0.5, "pet"),
        (" fish named", 0.5, "pet"),
        (" frog named", 0.5, "pet"),
    ]
)
ITEM_VERBS = _zipf("loved|liked|played with|always carried|took care of|was proud of")
ITEM_ADJS = _zipf("red|blue|green|yellow|big|little|shiny|new|old|soft|favorite|pink|purple|tiny|funny")
ITEM_NOUNS = _zipf(
    "ball|kite|hat|doll|book|teddy bear|toy car|toy boat|drum|bike|blanket|box of crayons|robot|"
    "scarf|truck|puzzle|wand|umbrella|train|shell"
)

# --- events ---------------------------------------------------------------------------------------
PLACE = _phrase(
    "park|beach|forest|garden|river|lake|farm|zoo|market|school|library|playground|hill|pond|castle|"
    "cave|meadow|bakery|toy store|tree house|barn|village|mountain|field|sea|shop|yard|bridge|city|island",
    "big|little|old|sunny|quiet|busy|green|dark|pretty|small|new|windy|shady|secret|muddy",
    p_adj=0.3,
    article=False,
)
THING = _phrase(
    "shell|stick|coin|feather|flower|apple|key|map|rock|nest|box|leaf|ring|button|egg|bone|star|pencil|"
    "sock|cookie|bell|marble|cup|hat|note",
    "shiny|little|big|red|blue|old|tiny|strange|pretty|golden|round|soft|broken|magic|wet",
    p_adj=0.4,
    article=True,
)
NEAR = _zipf("in the|near the|behind the|next to the|under the|by the")
ANIMAL = _phrase(
    "bird|dog|frog|owl|butterfly|squirrel|duck|fox|rabbit|bee|cat|turtle|deer|mouse|snail|horse|cow|"
    "bear|fish|ladybug|goat|pig|lion|monkey|puppy",
    "big|little|friendly|tiny|funny|sleepy|brown|white|baby|fluffy|spotted|hungry|lost|noisy",
    p_adj=0.4,
    article=True,
)
FEELING = _phrase(
    "happy|sad|scared|excited|tired|hungry|surprised|proud|angry|sleepy|curious|lonely|brave|worried|"
    "calm|silly|cold|shy|glad|bored",
    "very|so|a little|really",
    p_adj=0.35,
    article=False,
)
WHY = Choice(
    [
        (".", 8),
        (" all day.", 2),
        (" because it was a sunny day.", 1),
        (" and smiled.", 2),
        (" that morning.", 1),
        (" again.", 1),
        (" for a while.", 1),
        (" and laughed.", 1),
    ]
)
GAMES = _zipf(
    "tag|hide and seek|with a ball|in the sand|in the rain|a game|with blocks|catch|house|ball|"
    "in the mud|with a kite|a song|on the swings|with toy cars"
)
WANTS = _zipf(
    "fly a kite|swim|climb a tree|eat a cookie|go home|find a friend|see the stars|jump in puddles|"
    "paint a picture|sing a song|dance|read a book|ride a bike|build a fort|bake a cake|catch a fish|"
    "make a card|grow a flower|count the stars|fly like a bird"
)
WANT_TAIL = Choice([(".", 4), (" very much.", 1), (", but it started to rain.", 1), (" one more time.", 1)])
TASKS = Choice(
    [
        (" find the", 3, "find"),  # continues with the story's item: a free long-range copy
        (" clean the house.", 1, None),
        (" build a sandcastle.", 1, None),
        (" bake a cake.", 1, None),
        (" carry a heavy box.", 1, None),
        (" plant flowers.", 1, None),
        (" climb a tree.", 1, None),
        (" fix a toy.", 1, None),
        (" draw a picture.", 1, None),
        (" wash the dishes.", 1, None),
        (" feed the ducks.", 1, None),
    ]
)
FOOD = _phrase(
    "cookie|apple|cake|pie|sandwich|banana|carrot|muffin|orange|cupcake|pear|plum|bowl of soup",
    "big|warm|sweet|red|little|yummy|fresh|green",
    p_adj=0.4,
    article=True,
)
GIFT = _phrase(
    "hug|flower|cookie|present|kiss|toy|high five|card|drawing|balloon|sticker|candy",
    "big|little|pretty|red|new|special",
    p_adj=0.3,
    article=True,
)
MOVE_TAIL = {
    "single": Choice([(".", 4, None), (" to play.", 2, None), (" with", 2, "with"), (" to look for the", 1, "item")]),
    "they": Choice([(".", 4, None), (" to play.", 2, None), (" together.", 2, None), (" to look for the", 1, "item")]),
}
PLAY_TAIL = {
    "single": Choice([(".", 3, None), (" all day.", 1, None), (" with", 2, "with"), (" after lunch.", 1, None)]),
    "they": Choice([(".", 3, None), (" all day.", 1, None), (" together.", 2, None), (" after lunch.", 1, None)]),
}
SAW_TAIL = Choice([(".", 3, None), (" in", 1, "place"), (" and smiled.", 1, None), (" and said hello.", 1, None)])
LOST_TAIL = Choice([(".", 2, None), (" in", 1, "place"), (" and cried.", 1, None)])
LOOK_TAIL = Choice([(".", 2, None), (" everywhere.", 1, None), (" in", 1, "place")])
ATE_TAIL = {
    "single": Choice([(".", 3, None), (" for lunch.", 1, None), (" with", 1, "with")]),
    "they": Choice([(".", 3, None), (" for lunch.", 1, None), (" together.", 1, None)]),
}
UTTERANCES = _zipf(
    "Let's play!|I am hungry,|Look at that!|I love you,|Can you help me?|This is fun!|Thank you!|"
    "Where are we going?|I am sorry,|What a nice day!|Let's go to the park!|I can do it!|Wow!|"
    "Do you want to be my friend?|Come with me!|I am so happy!|Be careful!|Good night,|"
    "Is it time to eat?|I found it!|Don't be sad,|We did it!|Let's share,|Who is there?",
    lead="",
)
END_FEELINGS = _zipf("happy.|very happy.|proud.|tired but happy.|glad.|safe and warm.|full of joy.")
GOODNIGHT = Choice([(" went to sleep with a big smile.", 1), (" dreamed of the next day.", 1)])

# Event tables per kind of subject: a person (hero or friend), a pet, or "they" (hero and friend).
# Several verbs lead into the same kind of event; the payload names the kind.
_EV_SINGLE = [
    (" went to", 3, "move"),
    (" walked to", 1, "move"),
    (" ran to", 1, "move"),
    (" hopped to", 0.5, "move"),
    (" skipped to", 0.5, "move"),
    (" raced to", 0.5, "move"),
    (" found", 2, "found"),
    (" spotted", 0.5, "found"),
    (" picked up", 0.5, "found"),
    (" lost", 2, "lost"),
    (" looked for", 1, "look"),
    (" saw", 2, "saw"),
    (" met", 1, "saw"),
    (" heard", 0.5, "saw"),
    (" watched", 0.5, "saw"),
    (" was", 3, "feel"),
    (" felt", 1, "feel"),
    (" played", 3, "played"),
    (" wanted to", 1.5, "wanted"),
    (" tried to", 1, "wanted"),
    (" learned to", 0.5, "wanted"),
    (" ate", 1, "ate"),
    (" shared", 0.5, "ate"),
    (" helped", 2, "helped"),
    (" gave", 1.5, "gave"),
]
EVENTS = {
    "person": Choice(_EV_SINGLE),
    "pet": Choice([e for e in _EV_SINGLE if e[2] != "gave"]),
    "they": Choice(
        [(" were", 3, "feel")] + [e for e in _EV_SINGLE if e[0] != " was" and e[2] not in ("helped", "gave")]
    ),
}

# The sentence after the intro continues (connective, bare subject or dialogue) or ends the story.
CONNECTIVES = [
    (" Then", 4),
    (" After that,", 2),
    (" Later,", 2),
    (" The next day,", 2),
    (" One morning,", 1),
    (" Soon", 1),
    (" Suddenly,", 2),
    (" That day,", 1),
    (" After lunch,", 1),
    (" In the afternoon,", 1),
    (" Every day,", 0.5),
]
P_BARE, P_QUOTE = 0.3, 0.12  # the rest of the continuation mass goes to the connectives
P_END = 0.25  # chance to end after each body sentence once the minimum is reached
MIN_BODY, MAX_BODY = 1, 4  # plus three intro sentences and one ending: 5-8 sentences in all
ENDINGS = [
    (" In the end,", 3, "feel"),
    (" From that day on,", 2, "friends"),
    (" The end.", 1, "end"),
    (" That night,", 2, "night"),
    (" At last,", 1, "home"),
]

# The per-story tables below draw their options from these sets. Checking the whole sets once here
# means no combination of characters can make a per-story table ambiguous (say, one name a prefix of
# another), instead of finding out in the middle of generating a corpus.
_ALL_NAMES = [*GIRL_NAMES.split("|"), *BOY_NAMES.split("|"), *PET_NAMES.split("|")]
_check_prefix_free([" " + n for n in [*_ALL_NAMES, "he", "she", "they"]])
_check_prefix_free(
    [t for t, _ in CONNECTIVES]
    + [t for t, _, _ in ENDINGS]
    + [' "']
    + [" " + n for n in [*_ALL_NAMES, "He", "She", "They"]]
)


@dataclass(frozen=True, slots=True)
class _Cast:
    hero: str
    gender: str
    other: str  # the friend's or the pet's name
    other_kind: str  # "friend" or "pet"
    item: str  # e.g. "red ball"


def _options(choice: Choice) -> list[tuple[str, float, Any]]:
    return list(zip(choice.texts, [math.exp(-n) for n in choice.nll], choice.payloads, strict=True))


@functools.cache
def _friend_names(hero: str) -> Choice:
    # Any name but the hero's, with the same relative weights; payload is the name.
    return Choice([o for g in "fm" for o in _options(NAMES[g]) if o[2] != hero])


@dataclass(slots=True)
class _Tables:
    """Choice tables that depend on the story's characters, built once per story."""

    subject: Choice  # lower case, after a connective: " Lily" / " she" / " Max" / " they"
    first: Choice  # start of the first body sentence: must continue
    middle: Choice  # start of a later body sentence: continue or end
    last: Choice  # after the last allowed body sentence: must end
    speaker: Choice


def _tables(cast: _Cast) -> _Tables:
    he = PRONOUNS[cast.gender][1]
    other_role = "person" if cast.other_kind == "friend" else "pet"
    subjects = [
        (cast.hero, 4, "person", "hero"),
        (he, 4, "person", "hero"),
        (cast.other, 3, other_role, "other"),
    ]
    subjects.append(("they", 1, "they", "they"))
    subject_total = sum(s[1] for s in subjects)
    low = Choice([(" " + name, w, (role, who)) for name, w, role, who in subjects])
    # A sentence may also start with its subject; the start choice then makes the subject choice too.
    bare = [
        (" " + name[0].upper() + name[1:], P_BARE * w / subject_total, ("bare", (role, who)))
        for name, w, role, who in subjects
    ]
    conn_total = sum(w for _, w in CONNECTIVES)
    p_conn = 1.0 - P_BARE - P_QUOTE
    cont = [(t, p_conn * w / conn_total, ("conn", None)) for t, w in CONNECTIVES]
    cont += bare + [(' "', P_QUOTE, ("quote", None))]
    end_total = sum(w for _, w, _ in ENDINGS)
    ends = [(t, w / end_total, ("end", kind)) for t, w, kind in ENDINGS]
    middle = [(t, (1 - P_END) * p, k) for t, p, k in cont] + [(t, P_END * p, k) for t, p, k in ends]
    speaker = Choice([(" " + cast.hero, 2, "hero"), (" " + cast.other, 1, "other")])
    return _Tables(low, Choice(cont), Choice(middle), Choice(ends), speaker)


# --------------------------------------------------------------------------------------------------
# The grammar
# --------------------------------------------------------------------------------------------------


def story_grammar(src: Source) -> None:
    """One story (without the end-of-text token): three intro sentences, 1-4 events, an ending."""
    # Intro: the hero, a friend or pet, and a favourite thing that later sentences refer back to.
    src.pick(OPENINGS)
    gender = src.pick(HERO_KINDS)
    src.say(" named")
    hero = src.pick(NAMES[gender])
    if src.pick(HOME_CLAUSE):
        src.pick(HOMES)
    He, _, his = PRONOUNS[gender]
    src.say(f" {He} had a")
    other_kind = src.pick(COMPANIONS)
    other = src.pick(_friend_names(hero) if other_kind == "friend" else PETS)
    src.say(f". {He}")
    src.pick(ITEM_VERBS)
    src.say(f" {his}")
    item = f"{src.pick(ITEM_ADJS)} {src.pick(ITEM_NOUNS)}"
    src.say(".")
    cast = _Cast(hero, gender, other, other_kind, item)
    tables = _tables(cast)

    # Body: each sentence start decides between another event and the ending, so the length of the
    # story (and with it the end-of-text token) is paid for by these choices.
    n_body = 0
    while True:
        table = tables.first if n_body < MIN_BODY else tables.last if n_body == MAX_BODY else tables.middle
        kind, arg = src.pick(table)
        if kind == "end":
            _ending(src, cast, tables, arg)
            return
        if kind == "quote":
            _dialogue(src, tables)
        else:
            role, who = src.pick(tables.subject) if kind == "conn" else arg
            _event(src, cast, role, who)
        n_body += 1


def _phrase_of(src: Source, phrase: _Phrase) -> None:
    if src.pick(phrase.head):  # an adjective came first; the noun follows
        src.pick(phrase.noun)


def _place(src: Source) -> None:
    # " the [adjective] place.", after a tail such as " in" has chosen the preposition.
    src.say(" the")
    _phrase_of(src, PLACE)
    src.say(".")


def _event(src: Source, cast: _Cast, role: str, who: str) -> None:
    kind = src.pick(EVENTS[role])
    number = "they" if role == "they" else "single"
    other = cast.other if who == "hero" else cast.hero  # unused by "they" sentences
    owner = PRONOUNS[cast.gender][2] if who == "hero" else "the"
    if kind == "move":
        src.say(" the")
        _phrase_of(src, PLACE)
        tail = src.pick(MOVE_TAIL[number])
        if tail == "with":
            src.say(f" {other}.")
        elif tail == "item":
            src.say(f" {cast.item}.")
    elif kind == "found":
        _phrase_of(src, THING)
        src.pick(NEAR)
        _phrase_of(src, PLACE)
        src.say(".")
    elif kind == "lost":
        src.say(f" {owner} {cast.item}")
        if src.pick(LOST_TAIL) == "place":
            _place(src)
    elif kind == "look":
        src.say(f" {owner} {cast.item}")
        if src.pick(LOOK_TAIL) == "place":
            _place(src)
    elif kind == "saw":
        _phrase_of(src, ANIMAL)
        if src.pick(SAW_TAIL) == "place":
            _place(src)
    elif kind == "feel":
        _phrase_of(src, FEELING)
        src.pick(WHY)
    elif kind == "played":
        src.pick(GAMES)
        if src.pick(PLAY_TAIL[number]) == "with":
            src.say(f" {other}.")
    elif kind == "wanted":
        src.pick(WANTS)
        src.pick(WANT_TAIL)
    elif kind == "ate":
        _phrase_of(src, FOOD)
        if src.pick(ATE_TAIL[number]) == "with":
            src.say(f" {other}.")
    elif kind == "helped":
        src.say(f" {other}")
        if src.pick(TASKS) == "find":
            src.say(f" {cast.item}.")
    elif kind == "gave":
        src.say(f" {other}")
        _phrase_of(src, GIFT)
        src.say(".")
    else:  # pragma: no cover - a table entry without a branch is a bug
        raise AssertionError(kind)


def _dialogue(src: Source, tables: _Tables) -> None:
    said = src.pick(UTTERANCES)
    src.say('" asked' if said.endswith("?") else '" said')
    src.pick(tables.speaker)
    src.say(".")


def _ending(src: Source, cast: _Cast, tables: _Tables, kind: str) -> None:
    if kind == "feel":
        role, _ = src.pick(tables.subject)
        src.say(" were" if role == "they" else " was")
        src.pick(END_FEELINGS)
    elif kind == "friends":
        src.say(f" {cast.hero} and {cast.other} were best friends.")
    elif kind == "night":
        src.say(f" {cast.hero}")
        src.pick(GOODNIGHT)
    elif kind == "home":
        src.say(f" {cast.hero} and {cast.other} went home.")
    # "end": " The end." says it all.


# --------------------------------------------------------------------------------------------------
# Corpus generation and the cache
# --------------------------------------------------------------------------------------------------


def _split_seed(seed: int, split: str) -> int:
    return 2 * seed + (0 if split == "train" else 1)  # distinct for every (seed, split)


def _generate_split(num_tokens: int, seed: int) -> tuple[np.ndarray, float, int]:
    """Stories until at least `num_tokens` tokens: (uint16 tokens, total -ln p in nats, story count)."""
    rng = random.Random(seed)
    texts: list[str] = []
    nlls: list[float] = []
    count = 0
    while count < num_tokens:
        src = _Sampler(rng)
        story_grammar(src)
        text = "".join(src.parts)
        texts.append(text)
        nlls.append(src.nll)
        count += len(text) + 1
    # NUL never occurs in the text, so it can stand in for the end-of-text token while we are in bytes.
    raw = ("\0".join(texts) + "\0").encode("ascii")
    tokens = np.frombuffer(raw, dtype=np.uint8).astype(np.uint16)
    tokens[tokens == 0] = EOT_TOKEN
    return tokens, math.fsum(nlls), len(texts)


def _unigram_entropy(tokens: np.ndarray) -> float:
    p = np.bincount(tokens, minlength=VOCAB_SIZE) / len(tokens)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def generate_corpus(
    out_dir: str | Path,
    train_tokens: int = DEFAULT_TRAIN_TOKENS,
    val_tokens: int = DEFAULT_VAL_TOKENS,
    seed: int = DEFAULT_SEED,
) -> dict[str, Any]:
    """Write train.npy, val.npy and meta.json into the existing directory `out_dir`; return the meta.

    Each split holds whole stories, each followed by EOT, until it has at least the requested number
    of tokens. Same arguments, same bytes. Not atomic: `builtin_data_dir` takes care of that.
    """
    out = Path(out_dir)
    meta: dict[str, Any] = {
        "vocab_size": VOCAB_SIZE,
        "dtype": "uint16",
        "num_tokens": {},
        "max_token_id": EOT_TOKEN,
        "tokenizer": {"type": "byte", "eot_token": EOT_TOKEN},
        "entropy_per_token": {},
        "entropy_floor_nats": None,
        "unigram_entropy_per_token": {},
        "seed": seed,
        "split_seeds": {},
        "generator": f"lm.stories {VERSION}",
        "num_stories": {},
    }
    for split, n in (("train", train_tokens), ("val", val_tokens)):
        split_seed = _split_seed(seed, split)
        tokens, nll, stories = _generate_split(n, split_seed)
        np.save(out / f"{split}.npy", tokens)
        meta["num_tokens"][split] = int(len(tokens))
        meta["entropy_per_token"][split] = nll / len(tokens)
        meta["unigram_entropy_per_token"][split] = _unigram_entropy(tokens)
        meta["split_seeds"][split] = split_seed
        meta["num_stories"][split] = stories
    meta["entropy_floor_nats"] = meta["entropy_per_token"]["val"]
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def default_cache_root() -> Path:
    """$LM_SWEEPS_CACHE if set, else ~/.cache/lm-sweeps."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "lm-sweeps"


def _corpus_name(train_tokens: int, val_tokens: int, seed: int) -> str:
    name = f"builtin-{VERSION}"
    if (train_tokens, val_tokens, seed) != (DEFAULT_TRAIN_TOKENS, DEFAULT_VAL_TOKENS, DEFAULT_SEED):
        name += f"-{train_tokens}-{val_tokens}-s{seed}"
    return name


def builtin_data_path(cache_dir: str | Path | None = None) -> Path:
    """Where the default built-in corpus lives, whether or not it has been generated yet."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    return root / _corpus_name(DEFAULT_TRAIN_TOKENS, DEFAULT_VAL_TOKENS, DEFAULT_SEED)


def builtin_data_dir(
    cache_dir: str | Path | None = None,
    *,
    train_tokens: int = DEFAULT_TRAIN_TOKENS,
    val_tokens: int = DEFAULT_VAL_TOKENS,
    seed: int = DEFAULT_SEED,
) -> Path:
    """Return a directory holding train.npy, val.npy and meta.json of the built-in corpus.

    The directory is ``<cache root>/builtin-<VERSION>`` (with a suffix naming the sizes and seed when
    they are not the defaults); the cache root is `cache_dir`, else `default_cache_root()`. The corpus
    is generated on the first call and reused afterwards.

    Safe to call from many processes at once: the corpus is written into a temporary directory beside
    the target and renamed into place in one step, so the target either does not exist or is complete,
    and a crash leaves no half-written target. A file lock makes concurrent callers wait for one
    generator instead of all generating the same data.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    name = _corpus_name(train_tokens, val_tokens, seed)
    target = root / name
    if (target / "meta.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "a") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        if (target / "meta.json").is_file():  # another process finished it while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-tmp-", dir=root))
        try:
            generate_corpus(tmp, train_tokens, val_tokens, seed)
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
            try:
                os.rename(tmp, target)
            except OSError:
                # The target appeared meanwhile (only possible without flock): it is complete, since
                # targets only ever appear by rename, so discard ours and use it.
                if not (target / "meta.json").is_file():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target
