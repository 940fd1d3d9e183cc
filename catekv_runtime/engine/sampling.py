"""Sampling parameters (vLLM's names and meanings) and batched sampling with per-request seeds.

Each row of a batch samples with its own temperature, top-k, top-p and min-p, all held in device tensors so that a
step needs no host work per request. Filters apply in vLLM's order: temperature, min-p, then top-k and top-p.
Temperature 0 is greedy.

Randomness comes from a counter-based hash of (the request's seed, the index of the token in its output, the
vocabulary index), not from a shared generator: a request draws the same tokens whatever other requests share its
batch, and the draw is a pure function of device tensors (nothing to advance on the host, so it can live inside a
CUDA graph). The uniforms become Gumbel noise and the token is ``argmax(logits / T + noise)`` over the tokens the
filters keep: an exact sample of ``softmax(logits / T)`` restricted to them (the Gumbel-max trick).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

_M32 = 0xFFFFFFFF
_INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class SamplingParams:
    """How one request is sampled and when it stops (vLLM's ``SamplingParams`` subset).

    Args:
        max_tokens: the most tokens to generate (>= 1).
        temperature: 0 for greedy decoding, else the softmax temperature (>= 0).
        top_p: keep the smallest set of most likely tokens whose probability reaches ``top_p``; in (0, 1].
        top_k: keep the ``top_k`` most likely tokens; 0 or -1 keeps all.
        min_p: keep tokens at least ``min_p`` times as likely as the most likely one; in [0, 1].
        stop: strings that end the output when generated; they are not included in the text (needs a tokenizer).
        stop_token_ids: token ids that end the output; they are included in ``token_ids``.
        seed: the request's random seed (None: drawn from torch's global generator when the request is added).
        ignore_eos: keep generating after the model's end-of-sequence token.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    stop: str | list[str] | tuple[str, ...] | None = None
    stop_token_ids: list[int] | tuple[int, ...] | None = None
    seed: int | None = None
    ignore_eos: bool = False
    stop_strings: tuple[str, ...] = field(init=False, repr=False, compare=False, default=())

    def __post_init__(self) -> None:
        _check_int("max_tokens", self.max_tokens, 1)
        _check_number("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        _check_number("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        _check_int("top_k", self.top_k, -1)
        _check_number("min_p", self.min_p)
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"SamplingParams.min_p must be in [0, 1], got {self.min_p}")
        object.__setattr__(self, "stop_strings", _stop_strings(self.stop))
        if self.stop_token_ids is not None:
            if isinstance(self.stop_token_ids, (str, bytes)) or not isinstance(self.stop_token_ids, (list, tuple)):
                raise ValueError(f"SamplingParams.stop_token_ids must be a list of token ids, got "
                                 f"{type(self.stop_token_ids).__name__}")
            for token in self.stop_token_ids:
                _check_int("stop_token_ids", token, 0)
        if self.seed is not None:
            _check_int("seed", self.seed, -(2**63))
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"SamplingParams.ignore_eos must be a bool, got {type(self.ignore_eos).__name__}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _check_int(name: str, value: Any, minimum: int) -> None:
    """An int from ``minimum`` up to int64's largest: the engine holds these values in int64 tensors."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"SamplingParams.{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"SamplingParams.{name} must be >= {minimum}, got {value}")
    if value > _INT64_MAX:
        raise ValueError(f"SamplingParams.{name} must be <= {_INT64_MAX} (int64), got {value}")


def _check_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"SamplingParams.{name} must be a finite number, got {value!r}")


def _stop_strings(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise ValueError(f"SamplingParams.stop must be a string or a list of strings, got {stop!r}")
    if any(s == "" for s in stop):
        raise ValueError("SamplingParams.stop must not contain an empty string")
    return tuple(stop)


@dataclass(frozen=True)
class Filters:
    """Which filters any row of a batch uses (the others are skipped: top-k and top-p sort the vocabulary)."""

    min_p: bool = False
    top_k_or_p: bool = False
    random: bool = False  # any row with temperature > 0

    @classmethod
    def of(cls, params: list[SamplingParams]) -> Filters:
        sampled = [p for p in params if not p.greedy]
        return cls(min_p=any(p.min_p > 0 for p in sampled),
                   top_k_or_p=any(p.top_k > 0 or p.top_p < 1 for p in sampled), random=bool(sampled))


def filter_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  min_p: torch.Tensor, filters: Filters = Filters(True, True, True)) -> torch.Tensor:
    """``logits`` ``[n, vocab]`` (float32) divided by each row's temperature (rows at 0: left as they are), with the
    tokens that min-p, top-k (0 = off) and top-p remove set to -inf; every row keeps at least its top token."""
    safe = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    scaled = logits / safe[:, None]
    if filters.min_p:
        probs = torch.softmax(scaled, dim=-1)
        floor = probs.amax(dim=-1, keepdim=True) * min_p[:, None]
        scaled = scaled.masked_fill(probs < floor, float("-inf"))
    if filters.top_k_or_p:
        ordered, _ = scaled.sort(dim=-1, descending=True)
        vocab = scaled.shape[-1]
        k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
        kth = ordered.gather(1, (k - 1)[:, None])
        ordered = ordered.masked_fill(ordered < kth, float("-inf"))
        probs = torch.softmax(ordered, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability mass of the tokens ranked above each one
        keep = (before < top_p[:, None]) & (ordered > float("-inf"))
        keep[:, 0] = True
        # The smallest kept logit of each row is its threshold (ties with it are kept too, as in vLLM).
        threshold = ordered.masked_fill(~keep, float("inf")).amin(dim=-1, keepdim=True)
        scaled = scaled.masked_fill(scaled < threshold, float("-inf"))
    return scaled


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           min_p: torch.Tensor, seeds: torch.Tensor, counters: torch.Tensor,
           filters: Filters = Filters(True, True, True)) -> torch.Tensor:
    """One token per row of ``logits`` ``[n, vocab]``: greedy where ``temperature`` is 0, else a draw from the
    filtered softmax with the noise of (``seeds[i]``, ``counters[i]``) (int64; the counter is the index of the
    token in the request's output). Returns int64 ``[n]``. ``filters`` may skip filters no row uses."""
    greedy = logits.argmax(dim=-1)
    if not filters.random:
        return greedy
    scaled = filter_logits(logits, temperature, top_k, top_p, min_p, filters)
    drawn = (scaled + gumbel_noise(seeds, counters, logits.shape[-1])).argmax(dim=-1)
    return torch.where(temperature > 0, drawn, greedy)


def gumbel_noise(seeds: torch.Tensor, counters: torch.Tensor, vocab: int) -> torch.Tensor:
    """Standard Gumbel noise ``[n, vocab]`` float32, a pure function of each row's (seed, counter) and the column."""
    row = _fmix32((seeds & _M32) ^ 0x9E3779B9)
    row = _fmix32(row ^ ((seeds >> 32) & _M32))
    row = _fmix32(row ^ _mul32(counters & _M32, 0x85EBCA77))
    column = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    bits = _fmix32(_fmix32(_mul32(column, 0x27D4EB2F)[None, :] ^ row[:, None]) ^ (row[:, None] >> 7))
    # 23 bits: (k + 0.5) / 2**23 is exact in float32 and strictly inside (0, 1); with 24 bits the top value rounds
    # to 1.0, whose noise is +inf, and a filtered token's -inf + inf = NaN would win the argmax.
    uniform = ((bits >> 9).float() + 0.5) * (1.0 / (1 << 23))
    return -torch.log(-torch.log(uniform))


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2**32`` for int64 ``x`` in [0, 2**32) with no intermediate over 2**49 (no int64 overflow)."""
    return ((x & 0xFFFF) * c + ((((x >> 16) * c) & 0xFFFF) << 16)) & _M32


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser on int64 values in [0, 2**32): a bijection that mixes every bit."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)
