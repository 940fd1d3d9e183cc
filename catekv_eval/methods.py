"""The KV-cache methods the evaluation compares: the runtime's selection policies, by name.

Each method is a :mod:`catekv_runtime.policies` policy (``full``, ``catekv``, ``duo``, ``snapkv``,
``streaming``), so the same selection and storage code runs them all and the KV they keep is measured the
same way (bytes held after prefill, ``CateKVCache.memory``). ``snapkv`` and ``streaming`` get the per-head
budget that makes them keep CateKV's total KV at the context length (``policies.equal_kv_budget``).
"""

from __future__ import annotations

from typing import Any

from catekv_runtime.policies import POLICIES, Policy, get_policy
from catekv_runtime.profile import Profile

# name -> policy, in the order of the table's columns; ``catekv-eval --methods`` takes these names.
METHODS: dict[str, Policy] = POLICIES


def method_overrides(method: str, profile: Profile, context_length: int) -> dict[str, Any]:
    """Runtime overrides (for ``catekv_runtime.apply``) of ``method``'s policy at ``context_length`` tokens."""
    return get_policy(method).overrides(profile, context_length)
