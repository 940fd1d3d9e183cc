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

from .attention import chunk_attention, decode_attention, resolve_prefill_backend
from .cache import DEFAULT_RESERVE, CateKVCache, take_pending_layer
from .errors import ProfileError
from .hub import is_hub_id
from .profile import ModelSpec, Profile, resolve_profile

IMPLEMENTATION = "catekv"


def _catekv_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    layer = take_pending_layer(module.layer_idx)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if layer is not None and layer.compressed:
        return decode_attention(query, layer.groups, scale), None
    backend = "sdpa" if layer is None else _prefill_backend(layer.prefill_backend, module, query, key,
                                                           attention_mask, kwargs)
    if backend == "sdpa":
        out = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    else:
        out = chunk_attention(query, key, value, 0, scale, backend=backend).transpose(1, 2), None
    if layer is not None:  # a prefill call: full attention above, then selection for this layer
        layer.record_prefill(query, attention_mask, scale)
    return out


def _prefill_backend(choice: str, module, query, key, attention_mask, kwargs) -> str:
    """The backend of a prefill call: ``choice`` resolved for the call when it is plain causal attention over its
    own keys (no mask, so no padding; as many keys as queries, so the first call), else ``"sdpa"``: transformers'
    own SDPA call, which handles masks, chunked prefill and the options of other models."""
    plain = (attention_mask is None and query.shape[2] == key.shape[2] > 1 and getattr(module, "is_causal", True)
             and not kwargs.get("dropout") and not kwargs.get("softcap") and kwargs.get("position_bias") is None)
    return resolve_prefill_backend(choice, query.device, query.dtype, query.shape[-1]) if plain else "sdpa"


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


# Names of the projections whose output holds the keys (separate, or fused with queries and values), and the
# transformers TP styles that split that output by head across ranks, or leave every head on every rank.
_KEY_PROJECTIONS = ("k_proj", "qkv_proj", "query_key_value")
_HEAD_SHARDING_STYLES = frozenset({"colwise"})
_REPLICATING_STYLES = frozenset({"colwise_gather_output", "colwise_rep"})


def tensor_parallel_rank(model: torch.nn.Module) -> tuple[int, int]:
    """``(rank, size)`` of the tensor-parallel group transformers sharded ``model`` over; ``(0, 1)`` without TP.

    ``from_pretrained(..., tp_plan="auto")`` (or ``distributed_config=DistributedConfig(tp_plan="auto")``) sets
    ``model._tp_size`` and ``model._device_mesh``: in transformers 5.17 the 1-D TP mesh, in 5.2x a
    ``(pp, fsdp, tp)`` mesh whose ``"tp"`` dimension is the TP group.
    """
    size = getattr(model, "_tp_size", None) or 1
    mesh = getattr(model, "_device_mesh", None)
    if size <= 1 or mesh is None:
        return 0, 1
    if "tp" in (getattr(mesh, "mesh_dim_names", None) or ()):
        mesh = mesh["tp"]
    elif mesh.ndim != 1:
        raise ProfileError(f"cannot find the tensor-parallel dimension of the model's device mesh {mesh}")
    return mesh.get_local_rank(), mesh.size()


def local_head_map(model: torch.nn.Module, head_map: torch.Tensor) -> torch.Tensor:
    """The columns of ``head_map`` ``[layers, kv_heads]`` (or of any per-head tensor of that shape, such as
    ``Profile.budgets``) for the KV heads this process computes.

    Without tensor parallelism, all of them. Under transformers' TP, ``k_proj``/``v_proj`` are ``colwise``:
    their weight is split by output rows in equal contiguous blocks (DTensor ``Shard(0)``), so rank ``r`` of
    ``t`` computes KV heads ``[r * H / t, (r + 1) * H / t)`` and its cache holds only those. A plan that
    gathers the key projection's output (Phi-3's fused ``qkv_proj``) leaves every head on every rank.
    Raises :class:`ProfileError` when the KV heads do not divide by the TP size, or the plan splits the keys
    in a way CateKV does not know.
    """
    rank, size = tensor_parallel_rank(model)
    if size == 1:
        return head_map
    plan = getattr(model, "tp_plan", None) or {}
    styles = {style for name, style in plan.items() if name.rsplit(".", 1)[-1] in _KEY_PROJECTIONS}
    if not styles or styles <= _REPLICATING_STYLES:
        return head_map
    if not styles <= _HEAD_SHARDING_STYLES:
        raise ProfileError(
            f"the model's tensor-parallel plan splits the key projection with {sorted(styles)}; CateKV knows "
            f"only {sorted(_HEAD_SHARDING_STYLES)} (heads split in contiguous blocks) and replicated keys"
        )
    return rank_heads(head_map, rank, size)


def rank_heads(head_map: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """The columns of ``head_map`` ``[layers, kv_heads]`` for KV heads ``[rank * H / size, (rank + 1) * H / size)``:
    what rank ``rank`` of ``size`` computes when the heads are split in equal contiguous blocks (transformers'
    ``colwise`` plan, ``Engine(tensor_parallel=True)``). Raises :class:`ProfileError` when they do not divide."""
    heads = head_map.shape[1]
    if heads % size:
        raise ProfileError(
            f"the model has {heads} KV heads, which do not divide by the tensor-parallel size {size}: each rank "
            f"must hold whole KV heads for CateKV; run with a TP size that divides {heads}"
        )
    per_rank = heads // size
    return head_map[:, rank * per_rank : (rank + 1) * per_rank]


def make_cache(model: torch.nn.Module, profile: Profile, *, reserve: int = DEFAULT_RESERVE,
               eager: bool = True, prefill_backend: str = "auto") -> CateKVCache:
    """A fresh :class:`CateKVCache` for ``model`` (checks the profile fits the model's shape, and that
    ``prefill_backend`` can run where the model is).

    Under tensor parallelism the cache holds this rank's KV heads only (:func:`local_head_map`).
    """
    spec = model_spec(model)
    profile.check_model(dataclasses.replace(spec, model_id=""))
    if model.config._attn_implementation != IMPLEMENTATION:
        raise ProfileError("the model is not set up for CateKV: call catekv_runtime.apply(model, profile) first")
    _check_prefill_backend(model, prefill_backend)
    return CateKVCache(model.config, local_head_map(model, profile.head_map), profile.params, reserve=reserve,
                       eager=eager, budgets=local_head_map(model, profile.budgets), prefill_backend=prefill_backend)


def _check_prefill_backend(model: torch.nn.Module, prefill_backend: str) -> None:
    """Raise ``ValueError`` when ``prefill_backend`` cannot run on ``model`` where it is now (its device, dtype and
    head_dim), before any compute; each prefill call resolves it again for the tensors it gets."""
    resolve_prefill_backend(prefill_backend, model.device, model.dtype, model_spec(model).head_dim)


def apply(model: torch.nn.Module, profile: Profile, *, allow_model_mismatch: bool = False,
          prefill_backend: str = "auto", **overrides: Any) -> torch.nn.Module:
    """Make ``model`` use CateKV: afterwards ``model.generate(...)`` runs with a fresh hybrid cache per call.

    ``overrides``: ``budget``, ``eta``, ``adaptive_ratio``, ``obs_window``, ``init_tokens``,
    ``recent_tokens``, ``chunk_size``. A profile made for a model of another shape (layers, KV heads,
    head_dim), or for another Hub model id, is refused before any compute. Returns ``model``.

    ``prefill_backend``: the attention of a prefill over a whole unpadded prompt, one of
    ``catekv_runtime.attention.PREFILL_BACKENDS`` (``"auto"``: FlashAttention where installed and able to run,
    else SDPA); one that cannot run where the model is raises ``ValueError`` here. Padded batches and chunked
    prefills (``prefill_chunk_size``) run transformers' SDPA attention.

    A model loaded with transformers' tensor parallelism (``tp_plan="auto"`` under ``torchrun``) works as
    is: call ``apply`` on every rank; each rank's cache keeps its own KV heads (:func:`local_head_map`).
    """
    profile = resolve_profile(profile, overrides)
    spec = model_spec(model)
    if allow_model_mismatch:
        spec = dataclasses.replace(spec, model_id="")
    profile.check_model(spec)
    _check_prefill_backend(model, prefill_backend)
    head_map = local_head_map(model, profile.head_map)  # before the model is changed: it may refuse
    budgets = local_head_map(model, profile.budgets)
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
            kwargs[cache_arg] = CateKVCache(model.config, head_map, profile.params, reserve=new + 1,
                                            eager=not chunked, budgets=budgets, prefill_backend=prefill_backend)
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
