"""RULER's synthetic tasks, generated offline, for evaluating a model with and without CateKV.

RULER (Hsieh et al., 2024, "RULER: What's the Real Context Size of Your Long-Context
Language Models?") hides facts in long filler text and asks for them back. This module
re-implements its synthetic task generators in our own code, with RULER's templates,
question wording, answer prefixes and task parameters (``scripts/synthetic.yaml``):

========================  ==========================================================
task                      what is hidden, what is asked
========================  ==========================================================
``niah_single_1``         one 7-digit number under a word key, repeated-noise haystack
``niah_single_2``         the same in a prose haystack
``niah_single_3``         a UUID value, prose haystack
``niah_multikey_1``       4 keys hidden, 1 asked, prose haystack
``niah_multikey_2``       1 key, the haystack is made of distractor needles
``niah_multikey_3``       as multikey_2 with UUID keys and UUID values
``niah_multivalue``       1 key with 4 values, all asked
``niah_multiquery``       4 keys, all asked
``vt``                    a chain of 5 variable assignments (one-shot example first)
``cwe``                   10 words that are frequent in a numbered list of words
``fwe``                   the 3 most frequent coded words of a Zipf-distributed text
========================  ==========================================================

RULER's QA tasks (SQuAD, HotpotQA) need their data sets, which are not available offline:
they are not implemented.

Deviations from RULER (the first three because nothing may be downloaded):

* RULER's "essay" haystack is Paul Graham's essays. We use a fixed, deterministic stream of
  generated neutral prose sentences instead (the same stream for every sample, as RULER's
  essay is the same text for every sample); the haystack unit is a sentence, not a word.
* Word keys are ``adjective-noun`` pairs from our own 104 x 104 word lists (RULER: the
  ``wonderwords`` lists); distractor keys never equal a hidden key and hidden keys and
  values are distinct, so every question has exactly one correct answer.
* CWE draws words from our 301 embedded English words, then from generated pronounceable
  pseudo-words once those run out (RULER: ``wonderwords``, then a larger English word list).
* VT's one-shot example has a fixed number of noise lines (489 tokens with SmolLM2's
  tokenizer); RULER fits it to 500 tokens of the model's tokenizer.
* Length: ``len(input_ids)`` is fitted to ``[context_length - 128, context_length]``. RULER
  fills ``max_seq_length`` minus the tokens to generate.
* Every random choice comes from the sample's own RNG (RULER shuffles some lists with one
  fixed seed shared by all samples).
"""

from __future__ import annotations

import math
import random
import string
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = [
    "EvalSample",
    "EvalTaskError",
    "LENGTH_SLACK",
    "NiahConfig",
    "TASKS",
    "TaskSpec",
    "Tokenizer",
    "make_samples",
]

# A sample's token count lands in [context_length - LENGTH_SLACK, context_length].
LENGTH_SLACK = 128
# The fit stops as soon as it is _FIT_ACCEPT tokens or less below context_length, aiming at
# _FIT_MARGIN below it. One haystack unit takes 5-25 tokens, except niah_multikey_3's lines of
# two UUIDs (up to ~85 tokens with digit-by-digit tokenizers): then only LENGTH_SLACK holds.
_FIT_ACCEPT = 64
_FIT_MARGIN = 32
# Units added for the first length measurement, whose slope seeds the Newton steps.
_PROBE_UNITS = 32
_MAX_FIT_STEPS = 40


class EvalTaskError(ValueError):
    """An evaluation set cannot be built; the message says what is wrong and how to fix it."""


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer this module uses.

    ``make_samples(..., chat_template=True)`` also calls its ``apply_chat_template``.
    """

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]:
        """Token ids of ``text``."""
        ...


@dataclass(frozen=True)
class EvalSample:
    """One evaluation prompt and its reference answers.

    Attributes:
        task: the task name (a key of ``TASKS``).
        index: the sample's index in its set.
        prompt: the full prompt text; it ends with ``answer_prefix``, so the model continues
            the answer (RULER appends the answer prefix after the model's prompt template).
        input_ids: the prompt's tokens, what the model is fed (see ``make_samples``).
        answers: every string that a correct prediction contains (RULER's ``outputs``).
        answer_prefix: RULER's answer prefix for this sample, also the end of ``prompt``.
        max_new_tokens: RULER's ``tokens_to_generate`` for the task.
    """

    task: str
    index: int
    prompt: str
    input_ids: list[int]
    answers: list[str]
    answer_prefix: str
    max_new_tokens: int


@dataclass(frozen=True)
class NiahConfig:
    """Parameters of a needle-in-a-haystack task (RULER's ``niah.py`` arguments).

    ``haystack``: "noise" (repeated filler lines), "essay" (prose) or "needle" (distractor
    needles); ``key_type``: "words" or "uuids"; ``value_type``: "numbers" or "uuids".
    """

    haystack: str
    key_type: str
    value_type: str
    num_keys: int = 1
    num_values: int = 1
    num_queries: int = 1


@dataclass(frozen=True)
class TaskSpec:
    """A RULER task: its generator family, RULER's metric ("all": ``string_match_all``,
    "part": ``string_match_part``), RULER's tokens to generate and, for NIAH, its parameters."""

    name: str
    family: str
    metric: str
    max_new_tokens: int
    niah: NiahConfig | None = None


def _niah(name: str, config: NiahConfig) -> TaskSpec:
    return TaskSpec(name, "niah", "all", 128, config)


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        _niah("niah_single_1", NiahConfig("noise", "words", "numbers")),
        _niah("niah_single_2", NiahConfig("essay", "words", "numbers")),
        _niah("niah_single_3", NiahConfig("essay", "words", "uuids")),
        _niah("niah_multikey_1", NiahConfig("essay", "words", "numbers", num_keys=4)),
        _niah("niah_multikey_2", NiahConfig("needle", "words", "numbers")),
        _niah("niah_multikey_3", NiahConfig("needle", "uuids", "uuids")),
        _niah("niah_multivalue", NiahConfig("essay", "words", "numbers", num_values=4)),
        _niah("niah_multiquery", NiahConfig("essay", "words", "numbers", num_keys=4, num_queries=4)),
        TaskSpec("vt", "vt", "all", 30),
        TaskSpec("cwe", "cwe", "all", 120),
        TaskSpec("fwe", "fwe", "all", 50),
    )
}

# --- word lists and filler ---------------------------------------------------

_ADJECTIVES = (
    "able active amber ancient autumn basic bold brave breezy bright brisk calm candid careful "
    "cheerful civic classic clean clever coastal cozy crisp curious daily dapper eager early easy "
    "elegant even fair famous fancy festive fluffy formal fresh friendly frosty gentle giant glad "
    "golden graceful grand happy hardy hearty helpful honest humble icy ideal jolly kind large "
    "lively loyal lucky mellow merry mighty modern modest narrow neat nimble noble orange patient "
    "plain pleasant polite proud quick quiet rapid rare ready regular robust rosy royal rural "
    "rustic shiny silent simple sleek smooth snowy solid spare steady sturdy sunny swift tidy tiny "
    "vivid warm wise young zesty"
).split()
_NOUNS = (
    "anchor apple arch badge bakery balloon banjo barn basket beacon bicycle blanket boat bottle "
    "bridge bucket cabin camera candle canyon carpet castle cellar chair cherry chimney clock "
    "cloud compass cookie cottage crayon desk dolphin drum eagle engine falcon feather fence "
    "fiddle forest fountain garden gate glacier guitar hammer harbor helmet island jacket kettle "
    "kite ladder lantern lemon library lighthouse magnet maple meadow mirror mountain museum "
    "napkin notebook oasis orchard otter paddle parrot pebble pencil piano pillow planet pocket "
    "pond quilt rabbit radio river rocket saddle sailboat scarf shovel spoon squirrel statue "
    "teapot tiger tractor trumpet tunnel umbrella valley violin wagon walnut whistle window zebra"
).split()
_VERBS = (
    "accept admire arrive bake balance borrow bounce breathe build carry celebrate chase climb "
    "collect cook count cover dance deliver design discover drift enjoy explain explore fetch "
    "fill finish float fold gather glow greet guide hike hum imagine invent juggle jump knit "
    "laugh learn listen mend mix notice offer open organize paint pause plant polish pour "
    "practice prepare question reach read relax remember repair rest ride roll sail search share "
    "sing sketch skip smile sort splash stack stir stretch study swim travel trust tumble visit "
    "wander wash watch whisper wiggle wonder write yawn zoom"
).split()
_REAL_WORDS = tuple(sorted(set(_ADJECTIVES + _NOUNS + _VERBS)))
_SYLLABLES = tuple(c + v for c in "bdfgklmnprstvz" for v in "aeiou")

# RULER's noise haystack: one line of it per haystack unit.
_NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

# Building blocks of the prose haystack that replaces RULER's essays: neutral, no digits.
_SUBJECTS = (
    "The committee", "A small team", "The old librarian", "Most visitors", "The city council",
    "A careful reader", "The new manager", "Our neighbors", "The gardener", "A group of students",
    "The museum staff", "The village baker", "Several travelers", "The project lead",
    "A local artist", "The night watchman", "The research group", "Two old friends",
    "The harbor master", "A young teacher",
)
_PREDICATES = (
    "reviewed the plans for the spring fair", "walked slowly along the river path",
    "talked about the weather for a while", "repainted the fence near the station",
    "sorted the letters that had arrived", "planted a row of young trees",
    "cleaned the windows of the town hall", "wrote a short note about the trip",
    "listened to the band in the square", "rearranged the shelves in the reading room",
    "prepared a simple lunch for everyone", "checked the lanterns along the pier",
    "made a list of things to repair", "visited the market on the hill",
    "read a chapter of an old novel", "carried the boxes up the stairs",
    "watched the boats leave the harbor", "discussed the schedule for the coming season",
    "practiced a tune on the piano", "tidied the tools in the garden shed",
)
_TAILS = (
    "before the rain started", "early in the morning", "after a long and quiet day",
    "without much fuss", "while the bells were ringing", "as the sun went down",
    "during the short winter break", "with great patience", "on a calm afternoon",
    "before anyone else arrived", "in the usual careful way", "while the kettle was warming",
    "as they had promised", "after the meeting ended", "under a clear blue sky",
    "at the end of the week", "with a little help from friends", "as the fog lifted",
    "before the shops closed", "in a cheerful mood",
)


class _ProseStream:
    """A fixed, endless sequence of prose sentences; ``sentences(n)`` is always its first n."""

    def __init__(self, seed: str) -> None:
        self._rng = random.Random(seed)
        self._sentences: list[str] = []

    def sentences(self, count: int) -> list[str]:
        while len(self._sentences) < count:
            subject, predicate, tail = (
                self._rng.choice(_SUBJECTS), self._rng.choice(_PREDICATES), self._rng.choice(_TAILS)
            )
            # Two word orders keep the text from looking like one repeated template.
            if self._rng.random() < 0.5:
                sentence = f"{subject} {predicate} {tail}."
            else:
                sentence = f"{tail[0].upper()}{tail[1:]}, {subject[0].lower()}{subject[1:]} {predicate}."
            self._sentences.append(sentence)
        return self._sentences[:count]


_ESSAY = _ProseStream("catekv-eval-essay")

# --- shared helpers ------------------------------------------------------------


@dataclass(frozen=True)
class _Draft:
    """A sample's random content, drawn once; ``render(n)`` is its task text with n haystack units.

    The task text excludes the answer prefix. ``render`` is deterministic and the length of its
    text grows with n, which is what the length fit relies on.
    """

    render: Callable[[int], str]
    answers: list[str]
    answer_prefix: str
    min_units: int = 0


def _insert(units: Sequence[str], items: Sequence[str], positions: Sequence[int]) -> list[str]:
    """``units`` with ``items[k]`` placed before ``units[positions[k]]`` (at the end for len(units)).

    Items sharing a position keep their order in ``items``.
    """
    placed = sorted(zip(positions, range(len(items))))
    out: list[str] = []
    k = 0
    for j, unit in enumerate(units):
        while k < len(placed) and placed[k][0] <= j:
            out.append(items[placed[k][1]])
            k += 1
        out.append(unit)
    out.extend(items[index] for _, index in placed[k:])
    return out


def _distinct(draw: Callable[[], str], count: int, exclude: frozenset[str] = frozenset()) -> list[str]:
    """``count`` distinct draws, none in ``exclude``."""
    out: list[str] = []
    seen = set(exclude)
    while len(out) < count:
        item = draw()
        if item not in seen:
            seen.add(item)
            out.append(item)
    return out


def _random_item(rng: random.Random, kind: str) -> str:
    """A RULER needle key or value: "words" (adjective-noun), "numbers" (7 digits) or "uuids"."""
    if kind == "words":
        return f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"
    if kind == "numbers":
        return str(rng.randint(1_000_000, 9_999_999))
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


# --- needle in a haystack --------------------------------------------------------

_NEEDLE = "One of the special magic {kind} for {key} is: {value}."
# RULER's 40 insertion depths (percent of the essay), sampled without replacement.
_DEPTHS = tuple(round(i * 100 / 39) for i in range(40))


def _niah_wording(kind: str, query: str, singular: bool) -> tuple[str, str, str]:
    """RULER's NIAH header, question and answer prefix.

    RULER turns its plural template into the singular one (Some -> A, are -> is, numbers ->
    number) when exactly one value is asked; both are written out here.
    """
    if singular:
        one = kind[:-1]
        return (
            f"A special magic {one} is hidden within the following text. Make sure to memorize it. "
            f"I will quiz you about the {one} afterwards.\n",
            f"\nWhat is the special magic {one} for {query} mentioned in the provided text?",
            f" The special magic {one} for {query} mentioned in the provided text is",
        )
    return (
        f"Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
        f"I will quiz you about the {kind} afterwards.\n",
        f"\nWhat are all the special magic {kind} for {query} mentioned in the provided text?",
        f" The special magic {kind} for {query} mentioned in the provided text are",
    )


def _niah_draft(config: NiahConfig, rng: random.Random, key: str) -> _Draft:
    keys = _distinct(lambda: _random_item(rng, config.key_type), config.num_keys)
    # All values distinct, so that no value answers two keys.
    values = _distinct(lambda: _random_item(rng, config.value_type), config.num_keys * config.num_values)
    grouped = [values[k * config.num_values:(k + 1) * config.num_values] for k in range(config.num_keys)]
    needles = [
        _NEEDLE.format(kind=config.value_type, key=k, value=v) for k, vs in zip(keys, grouped) for v in vs
    ]
    rng.shuffle(needles)
    asked = rng.sample(range(config.num_keys), config.num_queries)
    answers = [v for q in asked for v in grouped[q]]
    asked_keys = [keys[q] for q in asked]
    query = asked_keys[0] if len(asked_keys) == 1 else ", ".join(asked_keys[:-1]) + ", and " + asked_keys[-1]
    header, question, prefix = _niah_wording(config.value_type, query, len(answers) == 1)
    # Positions are drawn once, as depths (essay, like RULER) or fractions of the haystack, so
    # that the random stream does not depend on the haystack size being fitted.
    if config.haystack == "essay":
        spots: list[float] = [d / 100 for d in rng.sample(_DEPTHS, len(needles))]
    else:
        spots = [rng.random() for _ in needles]
    hidden_keys = frozenset(keys)

    def distractors(n: int) -> list[str]:
        # Own RNG, restarted at every render: the first n lines are the same for every n.
        drng = random.Random(f"{key}/haystack")
        lines = []
        for _ in range(n):
            (k,) = _distinct(lambda: _random_item(drng, config.key_type), 1, exclude=hidden_keys)
            value = _random_item(drng, config.value_type)
            lines.append(_NEEDLE.format(kind=config.value_type, key=k, value=value))
        return lines

    def render(n: int) -> str:
        if config.haystack == "essay":
            # RULER: before sentence int(n * depth / 100).
            context = " ".join(_insert(_ESSAY.sentences(n), needles, [int(n * s) for s in spots]))
        else:
            units = [_NOISE] * n if config.haystack == "noise" else distractors(n)
            context = "\n".join(_insert(units, needles, [int(s * (n + 1)) for s in spots]))
        return header + context + question

    return _Draft(render, answers, prefix)


# --- variable tracking -------------------------------------------------------------

_VT_HEADER = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
_VT_QUESTION = "\nQuestion: Find all variables that are assigned the value {value} in the text above."
# "assgined" is RULER's spelling; kept so that prompts match RULER's token for token.
_VT_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above,"
    " {count} variables are assgined the value {value}, they are: "
)
_VT_HOPS = 4
# The largest example that fits RULER's 500 tokens with SmolLM2's tokenizer (489 tokens).
_VT_ICL_NOISE_LINES = 14


def _vt_chain(rng: random.Random, name_length: int, exclude_value: str = "") -> tuple[list[str], str, list[str]]:
    """Variable names, the value and the assignment lines of one chain, in RULER's format."""
    names = _distinct(lambda: "".join(rng.choices(string.ascii_uppercase, k=name_length)), _VT_HOPS + 1)
    # RULER: np.random.randint(10000, 99999), which excludes 99999.
    (value,) = _distinct(lambda: str(rng.randrange(10000, 99999)), 1, exclude=frozenset({exclude_value}))
    # RULER's lines: no final period, and a trailing space after each link.
    lines = [f"VAR {names[0]} = {value}"] + [f"VAR {b} = VAR {a} " for a, b in zip(names, names[1:])]
    return names, value, lines


def _vt_text(lines: list[str], fractions: list[float], n: int, value: str) -> str:
    """RULER's VT task text: n noise lines with the chain's lines inserted in order."""
    positions = [int(f * (n + 1)) for f in fractions]
    return _VT_HEADER + "\n".join(_insert([_NOISE] * n, lines, positions)) + _VT_QUESTION.format(value=value)


def _vt_draft(rng: random.Random) -> _Draft:
    names, value, lines = _vt_chain(rng, 5)
    fractions = sorted(rng.random() for _ in lines)
    # RULER prepends a solved example with 3-letter names and a different value; its answer
    # follows the prefix's trailing space after one more space, as in RULER.
    icl_names, icl_value, icl_lines = _vt_chain(rng, 3, exclude_value=value)
    icl_fractions = sorted(rng.random() for _ in icl_lines)
    example = (
        _vt_text(icl_lines, icl_fractions, _VT_ICL_NOISE_LINES, icl_value)
        + _VT_PREFIX.format(count=_VT_HOPS + 1, value=icl_value)
        + " " + " ".join(icl_names) + "\n"
    )
    prefix = _VT_PREFIX.format(count=_VT_HOPS + 1, value=value)
    return _Draft(lambda n: example + "\n" + _vt_text(lines, fractions, n, value), names, prefix)


# --- common words extraction --------------------------------------------------------

_CWE_HEADER = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n"
)
_CWE_QUESTION = "\nQuestion: What are the 10 most common words in the above list?"
_CWE_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
_CWE_COMMON = 10


class _WordStream:
    """Distinct words in a random order: the embedded real words first, then pseudo-words.

    ``take(n)`` is always the stream's first n words, whatever was asked before.
    """

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._words = rng.sample(_REAL_WORDS, len(_REAL_WORDS))
        self._seen = set(self._words)

    def take(self, count: int) -> list[str]:
        while len(self._words) < count:
            word = "".join(self._rng.choices(_SYLLABLES, k=3))
            if word not in self._seen:
                self._seen.add(word)
                self._words.append(word)
        return self._words[:count]


def _numbered(words: Sequence[str]) -> str:
    return " ".join(f"{i + 1}. {word}" for i, word in enumerate(words))


def _cwe_list(common: list[str], uncommon: list[str], repeats: tuple[int, int], rng: random.Random) -> str:
    words = common * repeats[0] + uncommon * repeats[1]
    rng.shuffle(words)
    return _numbered(words)


def _cwe_draft(rng: random.Random, key: str, context_length: int) -> _Draft:
    # RULER's parameters: below 4096 tokens, fewer repeats and a smaller example.
    if context_length >= 4096:
        example_words, example_repeats, repeats = 40, (10, 3), (30, 3)
    else:
        example_words, example_repeats, repeats = 20, (3, 1), (6, 1)
    shown = rng.sample(_REAL_WORDS, example_words)
    example_common = shown[:_CWE_COMMON]
    example = (
        _CWE_HEADER + _cwe_list(example_common, shown[_CWE_COMMON:], example_repeats, rng)
        + _CWE_QUESTION + _CWE_PREFIX + " " + _numbered(example_common)
    )
    stream = _WordStream(random.Random(f"{key}/words"))

    def render(n: int) -> str:
        words = stream.take(_CWE_COMMON + n)
        listing = _cwe_list(words[:_CWE_COMMON], words[_CWE_COMMON:], repeats, random.Random(f"{key}/order"))
        return example + "\n" + _CWE_HEADER + listing + _CWE_QUESTION

    return _Draft(render, stream.take(_CWE_COMMON), _CWE_PREFIX)


# --- frequent words extraction --------------------------------------------------------

_FWE_HEADER = (
    "Read the following coded text and track the frequency of each coded word. "
    "Find the three most frequently appeared coded words. "
)
_FWE_QUESTION = (
    "\nQuestion: Do not provide any explanation. Please ignore the dots '....'. "
    "What are the three most frequently appeared words in the above coded text?"
)
_FWE_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"
_FWE_ALPHA = 2.0
_ZETA_2 = math.pi**2 / 6  # Riemann zeta(2), the Zipf normaliser for alpha = 2
# With fewer words the counts of ranks 4 and 5 can tie, and the top 3 would not be unique.
_FWE_MIN_WORDS = 100


def _fwe_draft(rng: random.Random, key: str, context_length: int) -> _Draft:
    # RULER: a vocabulary of context_length // 50 coded words; its top-ranked word becomes
    # the "..." noise, the next three are the answer.
    vocab_size = max(context_length // 50, 10)
    vocab = ["..."] + _distinct(lambda: "".join(rng.choices(string.ascii_lowercase, k=6)), vocab_size - 1)

    def render(n: int) -> str:
        counts = [int(n * rank**-_FWE_ALPHA / _ZETA_2) for rank in range(1, vocab_size + 1)]
        words = [w for w, c in zip(vocab, counts) for _ in range(c)]
        random.Random(f"{key}/order").shuffle(words)
        return _FWE_HEADER + " ".join(words) + _FWE_QUESTION

    return _Draft(render, vocab[1:4], _FWE_PREFIX, min_units=_FWE_MIN_WORDS)


# --- assembling and sizing -----------------------------------------------------------


def _draft(spec: TaskSpec, rng: random.Random, key: str, context_length: int) -> _Draft:
    if spec.family == "niah":
        assert spec.niah is not None
        return _niah_draft(spec.niah, rng, key)
    if spec.family == "vt":
        return _vt_draft(rng)
    if spec.family == "cwe":
        return _cwe_draft(rng, key, context_length)
    return _fwe_draft(rng, key, context_length)


def _assemble(tokenizer: Any, text: str, answer_prefix: str, chat_template: bool) -> tuple[str, list[int]]:
    """The prompt (task text, optionally as a chat user turn, then the answer prefix) and its ids."""
    if chat_template:
        messages = [{"role": "user", "content": text}]
        head = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt = head + answer_prefix
        # The template already wrote the special tokens as text.
        return prompt, list(tokenizer.encode(prompt, add_special_tokens=False))
    prompt = text + answer_prefix
    return prompt, list(tokenizer.encode(prompt))


def _builder(tokenizer: Any, draft: _Draft, chat_template: bool) -> Callable[[int], tuple[str, list[int]]]:
    return lambda n: _assemble(tokenizer, draft.render(n), draft.answer_prefix, chat_template)


def _next_units(n: int, length: int, slope: float, target: int, lo: int, hi: int | None) -> int:
    """A Newton step towards ``target`` tokens, or bisection if it leaves the bracket (lo, hi)."""
    guess = n + round((target - length) / slope) if slope > 0 else 2 * n + 1
    if lo < guess and (hi is None or guess < hi):
        return guess
    return (lo + hi) // 2 if hi is not None else 2 * lo + 1


def _fit(
    build: Callable[[int], tuple[str, list[int]]], min_units: int, context_length: int, task: str
) -> tuple[str, list[int]]:
    """The prompt and ids whose length is in [context_length - LENGTH_SLACK, context_length]
    (usually within _FIT_ACCEPT tokens of context_length).

    Token count is close to linear in the number of haystack units, so after one short
    probe a Newton step (slope measured from the smallest text) usually lands in the window;
    steps that leave the bracket of counts known too short / too long are replaced by
    bisection, which always terminates. A handful of tokenizations per sample.
    """
    prompt, ids = build(min_units)
    base_len = len(ids)
    if base_len > context_length:
        raise EvalTaskError(
            f"context_length={context_length} is too small for task {task!r}: its question, answer "
            f"prefix and hidden content alone take {base_len} tokens. Use a larger context_length."
        )
    low, target = context_length - LENGTH_SLACK, context_length - _FIT_MARGIN
    lo, lo_fit, hi = min_units, (prompt, ids), None
    n = min_units + _PROBE_UNITS
    for _ in range(_MAX_FIT_STEPS):
        if len(lo_fit[1]) >= context_length - _FIT_ACCEPT:
            return lo_fit
        prompt, ids = build(n)
        if len(ids) > context_length:
            hi = n
        else:
            lo, lo_fit = n, (prompt, ids)
        if hi is not None and hi - lo <= 1:
            break
        n = _next_units(n, len(ids), (len(ids) - base_len) / (n - min_units), target, lo, hi)
    if len(lo_fit[1]) >= low:
        return lo_fit
    raise EvalTaskError(
        f"could not fit a {task!r} sample to {low}..{context_length} tokens with this tokenizer "
        f"(longest fit found: {len(lo_fit[1])} tokens): one haystack unit takes more tokens than the slack."
    )


def make_samples(
    task: str,
    tokenizer: Tokenizer,
    context_length: int,
    num_samples: int,
    seed: int = 1000,
    chat_template: bool = False,
) -> list[EvalSample]:
    """Generate ``num_samples`` RULER samples of ``task``, deterministically from ``seed``.

    The prompt is RULER's task text followed by its answer prefix. With ``chat_template=True``
    the task text is the user message of ``tokenizer.apply_chat_template(...,
    add_generation_prompt=True)`` and the answer prefix follows the generation prompt (as in
    RULER's model templates); ``input_ids`` then encode the prompt without adding special
    tokens. Without it, ``input_ids = tokenizer.encode(prompt)``, with the special tokens
    (BOS) the tokenizer adds by default, ready to be fed to the model.

    Length: ``len(input_ids)`` is in ``[context_length - 128, context_length]`` (for
    ``context_length >= 1024``; smaller lengths too when the task's fixed parts fit).

    Determinism: sample ``i`` comes from its own RNG seeded with ``(task, seed, i)`` in a
    namespace of its own (``catekv-eval-...``, distinct from the profiler's reference set),
    so it does not depend on ``num_samples``. ``context_length`` and the tokenizer also
    shape the sample.

    Raises:
        EvalTaskError: unknown task, invalid arguments, or a ``context_length`` too small.
    """
    if task not in TASKS:
        raise EvalTaskError(f"unknown task {task!r}; choose one of {sorted(TASKS)}.")
    if num_samples < 1 or context_length < 1:
        raise EvalTaskError(
            f"num_samples and context_length must be >= 1 (got {num_samples} and {context_length})."
        )
    spec = TASKS[task]
    samples = []
    for i in range(num_samples):
        key = f"catekv-eval-{task}-{seed}-{i}"
        draft = _draft(spec, random.Random(key), key, context_length)
        prompt, ids = _fit(_builder(tokenizer, draft, chat_template), draft.min_units, context_length, task)
        samples.append(
            EvalSample(task, i, prompt, ids, list(draft.answers), draft.answer_prefix, spec.max_new_tokens)
        )
    return samples
