"""KV-cache methods compared at one budget accounting, all run by the same CateKV runtime.

Every method is a set of runtime overrides of a profile, so the same selection and storage code runs
them and the KV they keep is measured the same way (bytes held after prefill, ``CateKVCache.memory``):

- ``full``: every head keeps everything (r = 1, eta = 1).
- ``catekv``: the profile's head map; consistent heads keep init + top chunks + tail (budget B).
- ``duo``: DuoAttention-style static split: the profile's head map, but consistent heads keep only
  init + recent tokens (B of them), no selected chunks.
- ``snapkv``: SnapKV-style: every head selects chunks with the observation window (r = 0), with the
  per-head budget that gives CateKV's total KV.
- ``streaming``: StreamingLLM: every head keeps init (sink) + recent tokens, same total KV.
"""

from __future__ import annotations

import math
from typing import Any

from catekv_runtime.profile import Profile

METHODS = ("full", "catekv", "duo", "snapkv", "streaming")


def method_overrides(method: str, profile: Profile, context_length: int) -> dict[str, Any]:
    """Runtime overrides (for ``catekv_runtime.apply``) of ``method`` at ``context_length`` tokens.

    ``snapkv`` and ``streaming`` get a per-head budget that makes them keep CateKV's average tokens per head at
    this length, so all compressed methods keep the same total KV (up to a chunk of rounding).
    """
    p = profile.params
    if method == "full":
        return {"adaptive_ratio": 1.0, "eta": 1.0}
    if method == "catekv":
        return {}
    if method == "duo":
        return {"budget": p.budget, "init_tokens": p.init_tokens, "recent_tokens": p.budget - p.init_tokens}
    # Every head also keeps the reserve (and the prompt's remainder of a chunk) as tail, beyond its budget.
    reserve = p.reserve_tokens // p.chunk_size * p.chunk_size
    per_head = max(p.init_tokens + p.recent_tokens,
                   math.floor(profile.kv_kept_fraction(context_length) * context_length) - reserve)
    if method == "snapkv":
        return {"adaptive_ratio": 0.0, "budget": per_head, "init_tokens": p.init_tokens,
                "recent_tokens": p.recent_tokens}
    if method == "streaming":
        return {"adaptive_ratio": 0.0, "budget": per_head, "init_tokens": p.init_tokens,
                "recent_tokens": per_head - p.init_tokens}
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
