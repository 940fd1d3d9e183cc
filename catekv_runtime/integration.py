"""CateKV in transformers models: an attention function, a cache, and ``apply`` / ``remove``.

``apply(model, profile)`` registers the ``"catekv"`` attention implementation on the model and wraps
``model.generate`` so that every call gets a fresh :class:`CateKVCache`. The attention function finds
the cache layer that ``Cache.update`` just touched (``take_pending_layer``), which keeps it independent
of how each transformers version names the cache argument.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .attention import decode_attention
from .cache import DEFAULT_RESERVE, CateKVCache, take_pending_layer
from .profile import ModelSpec, Profile, ProfileError, ProfileParams, is_hub_id

IMPLEMENTATION = "catekv"
# Every parameter can be changed at run time except those that only shape the profiler's statistics.
_OVERRIDES = frozenset(f.name for f in dataclasses.fields(ProfileParams)) - {"percentile", "alpha"}


def _catekv_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    layer = take_pending_layer(module.layer_idx)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if layer is not None and layer.compressed:
        return decode_attention(query, layer.groups, scale), None
    out = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    if layer is not None:  # a prefill call: full attention above, then selection for this layer
        layer.record_prefill(query, attention_mask, scale)
    return out


AttentionInterface.register(IMPLEMENTATION, _catekv_attention)
AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


def model_spec(model: torch.nn.Module) -> ModelSpec:
    """The shape (and id, when it names a Hub model) of a transformers model, to check a profile against."""
    name = getattr(model.config, "_name_or_path", "") or ""
    architecture = (getattr(model.config, "architectures", None) or [type(model).__name__])[0]
    return ModelSpec.from_config(model.config, model_id=name if is_hub_id(name) else "", architecture=architecture)


@dataclasses.dataclass(frozen=True)
class _Applied:
    profile: Profile
    previous_implementation: str


def resolve_profile(profile: Profile, overrides: dict[str, Any]) -> Profile:
    """The profile with runtime overrides applied (budget, eta, adaptive_ratio, windows, chunk size).

    Overriding ``budget`` alone rescales ``init_tokens`` and ``recent_tokens`` to B/32 and B/8, as in the
    paper, unless they are given too.
    """
    unknown = set(overrides) - set(_OVERRIDES)
    if unknown:
        raise TypeError(f"unknown CateKV overrides {sorted(unknown)}; known: {sorted(_OVERRIDES)}")
    if not overrides:
        return profile
    values = dataclasses.asdict(profile.params)
    if "budget" in overrides:
        values["init_tokens"] = max(1, overrides["budget"] // 32)
        values["recent_tokens"] = max(1, overrides["budget"] // 8)
    values.update(overrides)
    return profile.replace_params(ProfileParams(**values))


def make_cache(model: torch.nn.Module, profile: Profile, *, reserve: int = DEFAULT_RESERVE,
               eager: bool = True) -> CateKVCache:
    """A fresh :class:`CateKVCache` for ``model`` (checks the profile fits the model's shape)."""
    spec = model_spec(model)
    profile.check_model(dataclasses.replace(spec, model_id=""))
    if model.config._attn_implementation != IMPLEMENTATION:
        raise ProfileError("the model is not set up for CateKV: call catekv_runtime.apply(model, profile) first")
    return CateKVCache(model.config, profile.head_map, profile.params, reserve=reserve, eager=eager)


def apply(model: torch.nn.Module, profile: Profile, *, allow_model_mismatch: bool = False,
          **overrides: Any) -> torch.nn.Module:
    """Make ``model`` use CateKV: afterwards ``model.generate(...)`` runs with a fresh hybrid cache per call.

    ``overrides``: ``budget``, ``eta``, ``adaptive_ratio``, ``obs_window``, ``init_tokens``,
    ``recent_tokens``, ``chunk_size``. A profile made for a model of another shape (layers, KV heads,
    head_dim), or for another Hub model id, is refused before any compute. Returns ``model``.
    """
    profile = resolve_profile(profile, overrides)
    spec = model_spec(model)
    if allow_model_mismatch:
        spec = dataclasses.replace(spec, model_id="")
    profile.check_model(spec)
    if hasattr(model, "_catekv"):
        remove(model)
    model._catekv = _Applied(profile, model.config._attn_implementation)
    model.set_attn_implementation(IMPLEMENTATION)
    cache_arg = cache_argument(model)
    original = type(model).generate

    @functools.wraps(original)
    def generate(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get(cache_arg) is None and kwargs.get("past_key_values") is None:
            config = kwargs.get("generation_config") or model.generation_config
            chunked = kwargs.get("prefill_chunk_size", getattr(config, "prefill_chunk_size", None)) is not None
            new = kwargs.get("max_new_tokens", getattr(config, "max_new_tokens", None)) or DEFAULT_RESERVE
            # The profile was checked against the model above; no per-call check.
            kwargs[cache_arg] = CateKVCache(model.config, profile.head_map, profile.params, reserve=new + 1,
                                            eager=not chunked)
        return original(model, *args, **kwargs)

    model.generate = generate
    return model


def cache_argument(model: torch.nn.Module) -> str:
    """Name of the cache keyword of ``model.forward``/``generate``: ``cache`` (transformers >= 5.2x) or
    ``past_key_values`` (earlier 5.x)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def remove(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`apply`: plain attention and ``generate`` again. Returns ``model``."""
    applied: _Applied | None = getattr(model, "_catekv", None)
    if applied is None:
        return model
    model.set_attn_implementation(applied.previous_implementation)
    del model._catekv
    model.__dict__.pop("generate", None)
    return model
