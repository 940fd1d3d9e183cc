"""Reference sets for the profiler: the texts whose prefills decide which heads are consistent.

The default reference set is our own generator of RULER-style "variable tracking"
(VT) samples: a long haystack of neutral filler sentences in which one or more
chains of variable assignments (``VAR QPWKX = 12345.``, ``VAR ZLMRT = VAR QPWKX.``,
...) are hidden, followed by a question asking for every variable that carries
the first chain's value. Nothing is downloaded; every sample is a pure function
of ``(seed, index)`` and the tokenizer.

A user-supplied reference set can be read from a JSON Lines file instead
(:func:`load_reference_jsonl`).

Tokenization convention: texts are always encoded with
``tokenizer.encode(text, add_special_tokens=False)``, so ``input_ids`` holds the
text's tokens only (no BOS/EOS). Whoever feeds them to a model adds the special
tokens that the model expects.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import string
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "ReferenceSetError",
    "ReferenceSample",
    "TextEncoder",
    "load_reference_jsonl",
    "reference_hash",
    "variable_tracking_samples",
]

# RULER's noise, split into sentences so that the haystack length can be tuned
# one sentence (a handful of tokens) at a time.
FILLER_SENTENCES = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
_HEADER = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
)
_QUESTION = (
    "\nQuestion: Find all variables that are assigned the value {value} in the text above."
    " Answer: According to the chain(s) of variable assignment in the text above,"
    " {count} variables are assigned the value {value}, they are: "
)
# Accepted shortfall of a generated sample below context_length, in tokens.
LENGTH_SLACK = 64
# The fit aims below context_length so that one filler sentence more or less
# still lands inside [context_length - LENGTH_SLACK, context_length].
_FIT_MARGIN = 16
_MAX_FIT_STEPS = 30


class ReferenceSetError(ValueError):
    """A reference set cannot be built or used; the message says what is wrong and how to fix it."""


class TextEncoder(Protocol):
    """The part of a (Hugging Face) tokenizer that this module uses."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]:
        """Token ids of ``text``."""
        ...


@dataclass(frozen=True)
class ReferenceSample:
    """One reference text and its tokens.

    Attributes:
        text: the full prompt text (for VT: haystack with the hidden chains and the question).
        input_ids: ``tokenizer.encode(text, add_special_tokens=False)``, at most
            ``context_length`` tokens (for JSONL samples: the first ``context_length``
            tokens of the text, which may be longer).
        answer: the variable names that carry the queried value, in chain order
            (empty for samples read from JSONL).
    """

    text: str
    input_ids: list[int]
    answer: list[str]


def _encode(tokenizer: TextEncoder, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _make_chains(rng: random.Random, num_chains: int, num_hops: int) -> tuple[list[list[str]], list[str]]:
    """Variable names (distinct over all chains) and one value per chain (all values distinct)."""
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < num_chains * (num_hops + 1):
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        if name not in seen:
            seen.add(name)
            names.append(name)
    # Distinct values keep the question about chain 0 unambiguous.
    values = [str(v) for v in rng.sample(range(10000, 100000), num_chains)]
    chains = [names[c * (num_hops + 1):(c + 1) * (num_hops + 1)] for c in range(num_chains)]
    return chains, values


def _chain_statements(names: list[str], value: str) -> list[str]:
    return [f"VAR {names[0]} = {value}."] + [
        f"VAR {cur} = VAR {prev}." for prev, cur in zip(names, names[1:])
    ]


class _VTSample:
    """The random content of one VT sample; renders its text for any number of filler sentences."""

    def __init__(self, rng: random.Random, num_chains: int, num_hops: int) -> None:
        chains, values = _make_chains(rng, num_chains, num_hops)
        self.answer = chains[0]
        # Insertion points are drawn as fractions of the haystack, once, so that
        # the random stream does not depend on the haystack size being fitted.
        self.inserts: list[tuple[float, int, int, str]] = []
        for c, (names, value) in enumerate(zip(chains, values)):
            fractions = sorted(rng.random() for _ in range(num_hops + 1))
            for hop, (frac, stmt) in enumerate(zip(fractions, _chain_statements(names, value))):
                self.inserts.append((frac, c, hop, stmt))
        self.question = _QUESTION.format(value=values[0], count=num_hops + 1)

    def text(self, num_filler: int) -> str:
        # Statement with fraction f goes before filler sentence floor(f * (num_filler + 1));
        # sorting by (position, chain, hop) keeps every chain in order.
        placed = sorted((int(f * (num_filler + 1)), c, hop, s) for f, c, hop, s in self.inserts)
        parts: list[str] = []
        k = 0
        for i in range(num_filler + 1):
            while k < len(placed) and placed[k][0] == i:
                parts.append(placed[k][3])
                k += 1
            if i < num_filler:
                parts.append(FILLER_SENTENCES[i % len(FILLER_SENTENCES)])
        return _HEADER + " ".join(parts) + self.question


def _fit_haystack(
    sample: _VTSample, tokenizer: TextEncoder, context_length: int, tokens_per_filler: float
) -> tuple[str, list[int]]:
    """Text and ids whose length is in [context_length - LENGTH_SLACK, context_length].

    Tokenization is close to additive in the number of filler sentences, so a
    Newton step on that count usually lands inside the window at once; a step
    that leaves the bracket (lo, hi) of counts known too short / too long is
    replaced by bisection, which always terminates.
    """
    text = sample.text(0)
    ids = _encode(tokenizer, text)
    if len(ids) > context_length:
        raise ReferenceSetError(
            f"context_length={context_length} is too small: the variable chains and the question "
            f"alone take {len(ids)} tokens; use a larger context length (catekv-profile -L)."
        )
    target = context_length - _FIT_MARGIN
    lo, lo_len = 0, len(ids)  # largest filler count known to fit (but too short so far)
    hi: int | None = None  # smallest filler count known not to fit
    n = 0
    for _ in range(_MAX_FIT_STEPS):
        if len(ids) > context_length:
            hi = n
        elif len(ids) >= context_length - LENGTH_SLACK:
            return text, ids
        else:
            lo, lo_len = n, len(ids)
        if hi is not None and hi - lo <= 1:
            break
        n += round((target - len(ids)) / tokens_per_filler)
        if not (lo < n and (hi is None or n < hi)):
            n = (lo + hi) // 2 if hi is not None else 2 * lo + 1
        text = sample.text(n)
        ids = _encode(tokenizer, text)
    raise ReferenceSetError(
        f"could not fit a variable-tracking sample to {context_length - LENGTH_SLACK}..{context_length} "
        f"tokens with this tokenizer (longest fit found: {lo_len} tokens). One filler sentence seems to "
        "take more tokens than the slack; use load_reference_jsonl with your own texts instead."
    )


def variable_tracking_samples(
    tokenizer: TextEncoder,
    num_samples: int,
    context_length: int,
    seed: int = 0,
    num_chains: int = 1,
    num_hops: int = 4,
) -> list[ReferenceSample]:
    """Generate RULER-style variable-tracking samples, deterministically from ``seed``.

    Each sample has ``num_chains`` chains of ``num_hops + 1`` assignments
    (``VAR A = 12345.``, ``VAR B = VAR A.``, ...), with 5-letter uppercase names
    and 5-digit values, inserted in order at random positions of a filler
    haystack. The question asks for the variables holding chain 0's value;
    ``answer`` lists them.

    Length: ``len(input_ids)`` is in ``[context_length - 64, context_length]``
    whenever the chains and the question fit (always for ``context_length >= 512``
    with usual tokenizers); ``input_ids`` is exactly
    ``tokenizer.encode(text, add_special_tokens=False)``.

    Determinism: sample ``i`` depends only on ``(seed, i)``, the other arguments
    and the tokenizer, not on ``num_samples``; asking for more samples extends the set.

    Raises:
        ReferenceSetError: on invalid arguments, or if ``context_length`` cannot hold
            the chains and the question.
    """
    if num_samples < 1 or num_chains < 1 or num_hops < 1 or context_length < 1:
        raise ReferenceSetError(
            f"num_samples, context_length, num_chains and num_hops must be >= 1 (got num_samples={num_samples}, "
            f"context_length={context_length}, num_chains={num_chains}, num_hops={num_hops})."
        )
    # Tokens per filler sentence, measured once on a long stretch so that
    # sentence-boundary merges are averaged in.
    block = " ".join(FILLER_SENTENCES * 20)
    tokens_per_filler = len(_encode(tokenizer, block)) / (len(FILLER_SENTENCES) * 20)

    samples = []
    for i in range(num_samples):
        vt = _VTSample(random.Random(f"catekv-vt-{seed}-{i}"), num_chains, num_hops)
        text, ids = _fit_haystack(vt, tokenizer, context_length, tokens_per_filler)
        samples.append(ReferenceSample(text=text, input_ids=ids, answer=list(vt.answer)))
    return samples


def load_reference_jsonl(
    path: str | os.PathLike[str],
    tokenizer: TextEncoder,
    context_length: int,
    text_field: str = "text",
) -> list[ReferenceSample]:
    """Read a reference set from a JSON Lines file: one JSON object per line.

    Each object's ``text_field`` must be a non-empty string. Blank lines are
    skipped. ``input_ids`` keeps the FIRST ``context_length`` tokens of
    ``tokenizer.encode(text, add_special_tokens=False)``; ``text`` is kept whole
    and ``answer`` is empty. Only JSON is parsed (no pickle, no eval).

    Raises:
        ReferenceSetError: file missing or unreadable, invalid JSON, a line that is
            not an object, a missing/non-string/empty field (with the line
            number), or no samples at all.
    """
    if context_length < 1:
        raise ReferenceSetError(f"context_length must be >= 1, got {context_length}.")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ReferenceSetError(
            f"cannot read reference file {os.fspath(path)!r}: {e}. Pass an existing UTF-8 JSON Lines file."
        ) from e

    samples = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{os.fspath(path)}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ReferenceSetError(
                f"{where}: invalid JSON ({e.msg} at column {e.colno}). Each line must be one JSON object."
            ) from e
        if not isinstance(obj, dict):
            raise ReferenceSetError(
                f"{where}: expected a JSON object, got {type(obj).__name__}. "
                f'Write each line as {{"{text_field}": "..."}}.'
            )
        if text_field not in obj:
            raise ReferenceSetError(
                f"{where}: missing field {text_field!r} (fields present: {sorted(obj)}). "
                "Add it, or choose the field with text_field."
            )
        text = obj[text_field]
        if not isinstance(text, str) or not text:
            raise ReferenceSetError(
                f"{where}: field {text_field!r} must be a non-empty string, got {type(text).__name__} "
                f"{text!r:.40}."
            )
        ids = _encode(tokenizer, text)[:context_length]
        samples.append(ReferenceSample(text=text, input_ids=ids, answer=[]))
    if not samples:
        raise ReferenceSetError(
            f"reference file {os.fspath(path)!r} has no samples. Add at least one JSON object per line."
        )
    return samples


def reference_hash(samples: Sequence[ReferenceSample]) -> str:
    """SHA-256 hex digest identifying a reference set by its tokens.

    For each sample in order, the digest covers its token count followed by its
    token ids, every number as an unsigned 64-bit little-endian integer. The
    count prefix keeps ``[[1, 2], [3]]`` and ``[[1], [2, 3]]`` apart. Text and
    answers are not hashed: the profile depends only on the tokens.
    """
    h = hashlib.sha256()
    for sample in samples:
        ids = sample.input_ids
        h.update(struct.pack(f"<Q{len(ids)}Q", len(ids), *ids))
    return h.hexdigest()
