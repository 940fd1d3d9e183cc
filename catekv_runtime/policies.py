"""Selection policies: which tokens each KV head keeps after prefill, one small object per rule.

A policy decides *what* each head keeps; the cache (:mod:`catekv_runtime.cache`) only stores it. Every
policy answers in the one vocabulary the cache reads, a :class:`~catekv_runtime.profile.Profile` whose
``head_map`` (adaptive heads), ``budgets`` (tokens per consistent head) and ``params`` (windows, chunk
size, eta, observation window) say what each head keeps, so a single selection path serves them all:

- :class:`Full`: every head keeps everything (all heads adaptive, eta = 1).
- :class:`CateKV`: the profile's head map and budgets (docs/method.md).
- :class:`DuoAttention`: DuoAttention-style static split: the profile's head map, but consistent heads keep
  only init + recent tokens (B of them), no selected chunks.
- :class:`SnapKV`: every head selects chunks with the observation window (no adaptive heads), with the per-head
  budget that gives CateKV's total KV at the context length.
- :class:`StreamingLLM`: every head keeps init (sink) + recent tokens, at the same total KV.

``policy.resolve(profile, context_length)`` gives that profile; ``POLICIES`` maps the names the evaluation
uses (``catekv-eval --methods``) to the policies.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

from .profile import Profile, resolve_profile


@dataclasses.dataclass(frozen=True)
class Policy:
    """A selection rule: :meth:`resolve` says what each head keeps of a ``context_length``-token prompt."""

    name: ClassVar[str]

    def overrides(self, profile: Profile, context_length: int) -> dict[str, Any]:
        """The runtime overrides of ``profile`` (``catekv_runtime.apply(model, profile, **overrides)``) that
        keep what this policy keeps."""
        raise NotImplementedError

    def resolve(self, profile: Profile, context_length: int) -> Profile:
        """``profile`` with the head map, budgets and parameters the cache keeps under this policy."""
        return resolve_profile(profile, self.overrides(profile, context_length))


@dataclasses.dataclass(frozen=True)
class Full(Policy):
    """Full attention through the same cache: every head adaptive (r = 1) and keeping all its chunks (eta = 1)."""

    name: ClassVar[str] = "full"

    def overrides(self, profile: Profile, context_length: int) -> dict[str, Any]:
        return {"adaptive_ratio": 1.0, "eta": 1.0}


@dataclasses.dataclass(frozen=True)
class CateKV(Policy):
    """The profile as it is: adaptive heads keep eta of their chunks, consistent heads init + top chunks + tail."""

    name: ClassVar[str] = "catekv"

    def overrides(self, profile: Profile, context_length: int) -> dict[str, Any]:
        return {}


@dataclasses.dataclass(frozen=True)
class DuoAttention(Policy):
    """DuoAttention-style static split: the profile's adaptive heads, consistent heads keep init + recent only
    (recent = B - init, so no middle chunk fits their budget)."""

    name: ClassVar[str] = "duo"

    def overrides(self, profile: Profile, context_length: int) -> dict[str, Any]:
        p = profile.params
        return {"budget": p.budget, "init_tokens": p.init_tokens, "recent_tokens": p.budget - p.init_tokens}


def equal_kv_budget(profile: Profile, context_length: int) -> int:
    """Per-head budget at which every head keeps CateKV's average tokens per head at ``context_length``
    (up to a chunk of rounding), so methods without adaptive heads keep the same total KV.

    Every head also keeps the reserve (and the prompt's remainder of a chunk) as tail, beyond its budget, so
    the reserve's whole chunks are taken off; never below init + recent tokens."""
    p = profile.params
    reserve = p.reserve_tokens // p.chunk_size * p.chunk_size
    return max(p.init_tokens + p.recent_tokens,
               math.floor(profile.kv_kept_fraction(context_length) * context_length) - reserve)


@dataclasses.dataclass(frozen=True)
class SnapKV(Policy):
    """SnapKV-style: no adaptive heads (r = 0); every head keeps init + the chunks the observation window scores
    highest + tail, at the budget of :func:`equal_kv_budget`."""

    name: ClassVar[str] = "snapkv"

    def overrides(self, profile: Profile, context_length: int) -> dict[str, Any]:
        p = profile.params
        return {"adaptive_ratio": 0.0, "budget": equal_kv_budget(profile, context_length),
                "init_tokens": p.init_tokens, "recent_tokens": p.recent_tokens}


@dataclasses.dataclass(frozen=True)
class StreamingLLM(Policy):
    """StreamingLLM: no adaptive heads; every head keeps the init (attention-sink) tokens and the most recent
    ones, as many as :func:`equal_kv_budget` allows."""

    name: ClassVar[str] = "streaming"

    def overrides(self, profile: Profile, context_length: int) -> dict[str, Any]:
        p = profile.params
        per_head = equal_kv_budget(profile, context_length)
        return {"adaptive_ratio": 0.0, "budget": per_head, "init_tokens": p.init_tokens,
                "recent_tokens": per_head - p.init_tokens}


# The evaluation's methods, by the names ``catekv-eval --methods`` takes, in its column order.
POLICIES: dict[str, Policy] = {policy.name: policy for policy in (Full(), CateKV(), DuoAttention(), SnapKV(),
                                                                   StreamingLLM())}


def get_policy(name: str) -> Policy:
    """The policy of ``POLICIES`` called ``name``; ValueError naming the choices otherwise."""
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose from {tuple(POLICIES)}") from None
