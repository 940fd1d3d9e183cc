"""The hybrid KV cache: per layer, adaptive and consistent heads in separate, right-sized tensors.

Prefill runs full attention. At the end of the prompt each layer selects what every head keeps
(docs/method.md, "Runtime"): consistent heads keep init + the top chunks their budget allows + the tail,
adaptive heads keep ``eta`` of their chunks (everything at eta = 1). Heads that share a budget share one
tensor. The full KV of the layer is then dropped. Decode appends every new token to every head in place,
into preallocated capacity that grows geometrically.
"""

from __future__ import annotations

import copy
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .profile import ProfileParams, check_budgets, uniform_budgets
from .selection import chunk_scores, observation_probs, retained_indices, top_chunks

DEFAULT_RESERVE = 256  # decode slots preallocated when the number of new tokens is not known
SCORE_BYTES = 256 * 2**20  # bound on the temporary attention probabilities of chunk scoring

# (cache, layer index) of the last CateKVCache.update; the attention call that follows consumes it.
_pending: ContextVar[tuple[CateKVCache, int] | None] = ContextVar("catekv_pending_layer", default=None)


def take_pending_layer(layer_idx: int) -> CateKVLayer | None:
    """The CateKV layer that the cache update just before this attention call touched, if any."""
    pending = _pending.get()
    _pending.set(None)
    if pending is None or pending[1] != layer_idx:
        return None
    return pending[0].catekv_layer(layer_idx)


@dataclass
class HeadGroup:
    """The KV of a set of KV heads of one layer that share a retention rule.

    ``kv`` is ``[2, batch, heads, capacity, head_dim]`` (keys, then values, in one buffer so that a
    decode step appends both with one copy); slots ``[0, length)`` are filled. Sequences of a batch may
    keep different numbers of prompt tokens: each is right-aligned, and the ``pad[b]`` slots before its
    first token are masked out.
    """

    kv_heads: torch.Tensor  # [heads] int64, KV head indices in the model
    q_heads: torch.Tensor  # [heads * group] int64, their query heads in the model's order
    kv: torch.Tensor
    length: int
    pad: torch.Tensor | None  # [batch] int64, or None when no sequence has padding slots

    @property
    def keys(self) -> torch.Tensor:
        return self.kv[0]

    @property
    def values(self) -> torch.Tensor:
        return self.kv[1]

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write new tokens' ``[batch, heads, new, d]`` K/V after the filled slots, growing if needed."""
        new = keys.shape[2]
        if self.length + new > self.kv.shape[3]:
            self._grow(self.length + new)
        self.kv[0, :, :, self.length : self.length + new].copy_(keys)
        self.kv[1, :, :, self.length : self.length + new].copy_(values)
        self.length += new

    def _grow(self, needed: int) -> None:
        old = self.kv
        grown = old.new_empty(*old.shape[:3], max(needed, 2 * old.shape[3]), old.shape[4])
        grown[:, :, :, : self.length].copy_(old[:, :, :, : self.length])
        self.kv = grown

    def mask(self, query_length: int) -> torch.Tensor | None:
        """Boolean attention mask ``[batch, 1, q, length]`` or None when every filled slot is visible."""
        if self.pad is None and query_length == 1:
            return None
        slots = torch.arange(self.length, device=self.keys.device)
        visible = torch.ones(1, 1, query_length, self.length, dtype=torch.bool, device=self.keys.device)
        if self.pad is not None:
            visible = visible & (slots >= self.pad[:, None])[:, None, None, :]
        if query_length > 1:  # new tokens see the ones before them, not after
            first_new = self.length - query_length
            q = torch.arange(query_length, device=self.keys.device)
            visible = visible & (slots[None, :] <= first_new + q[:, None])
        return visible

    @property
    def allocated_bytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    @property
    def used_bytes(self) -> int:
        _, b, h, _, d = self.kv.shape
        return 2 * b * h * self.length * d * self.kv.element_size()


class CateKVLayer(DynamicLayer):
    """One full-attention layer: a full KV buffer during prefill, then one :class:`HeadGroup` per budget."""

    def __init__(self, budgets: torch.Tensor, params: ProfileParams, reserve: int, eager: bool,
                 prefill_backend: str = "auto"):
        super().__init__()
        self.prefill_backend = prefill_backend  # the prefill's attention (catekv_runtime.attention.PREFILL_BACKENDS)
        self.budgets = budgets.to(torch.int64).cpu()  # [num_kv_heads], UNLIMITED_BUDGET for adaptive heads
        self.params = params
        self.reserve = reserve
        self.eager = eager  # compress at the end of the (single) prefill call, not at the first decode
        self.groups: list[HeadGroup] = []
        self.seen = 0  # tokens of the sequence so far, prompt padding included
        self.token_bytes = 0  # K + V bytes of one token of every head of the batch (full attention's rate)
        self.valid_start: torch.Tensor | None = None  # [batch] first non-padding position
        self.obs_queries: torch.Tensor | None = None  # last L_obs queries of the prompt
        self.scale = 1.0
        self._device_heads: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def compressed(self) -> bool:
        return bool(self.groups)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        b, h, _, d = key_states.shape
        self._check_head_count(h)
        self.seen += key_states.shape[2]
        self.token_bytes = 2 * b * h * d * key_states.element_size()
        if not self.compressed and key_states.shape[2] == 1 and self.keys is not None and self.keys.numel():
            self.compress()  # first decode step after a chunked prefill
        if self.compressed:
            for group in self.groups:
                group.append(key_states[:, group.kv_heads], value_states[:, group.kv_heads])
            return key_states, value_states
        return super().update(key_states, value_states)

    def _check_head_count(self, heads: int) -> None:
        if heads != self.budgets.numel():
            raise ValueError(f"the head map has {self.budgets.numel()} KV heads per layer but the model computes "
                             f"{heads}; under tensor parallelism make the cache with catekv_runtime.make_cache(model, "
                             "profile)")

    def record_prefill(self, query: torch.Tensor, attention_mask: torch.Tensor | None, scale: float) -> None:
        """Remember what selection needs from a prefill call: the last queries and where padding ends."""
        window = self.params.obs_window
        obs = query[:, :, -window:]
        if self.obs_queries is not None and obs.shape[2] < window:
            obs = torch.cat([self.obs_queries, obs], dim=2)[:, :, -window:]
        self.obs_queries = obs
        self.scale = scale
        self.valid_start = _valid_start(attention_mask, query.shape[0], self.keys.shape[2], query.device)
        if self.eager:
            self.compress()

    def compress(self) -> None:
        """Select each head's tokens from the full prompt KV and release the full KV."""
        keys, values, queries = self.keys, self.values, self.obs_queries
        batch, num_kv, total, _ = keys.shape
        group_size = queries.shape[1] // num_kv
        starts = self.valid_start.tolist() if self.valid_start is not None else [0] * batch
        # Adaptive heads (budget -1) first, then one group per consistent budget, smallest first.
        for budget in torch.unique(self.budgets).tolist():
            heads, q_heads = self._heads_on(budget, group_size, keys.device)
            per_seq = [
                self._select(keys[b, :, start:], queries[b, :, max(0, queries.shape[2] - (total - start)) :],
                             heads, q_heads, budget, self.scale)
                for b, start in enumerate(starts)
            ]
            self.groups.append(self._build_group(per_seq, keys, values, starts, heads, q_heads))
        self.keys = self.values = self.obs_queries = None

    def select_heads(self, keys: torch.Tensor, last_queries: torch.Tensor,
                     scale: float) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """What each head group keeps of one unpadded prompt, without copying anything (the engine's prefill
        copies it straight into its slots): ``keys`` ``[kv_heads, n, d]``, ``last_queries`` ``[q_heads, >= 1, d]``.
        Returns per group, in :meth:`compress`'s order, its KV heads (on the device) and the token indices each
        keeps, ``[heads, kept]`` sorted, or None when it keeps every token."""
        group_size = last_queries.shape[0] // keys.shape[0]
        queries = last_queries[:, -self.params.obs_window :]
        selections = []
        for budget in torch.unique(self.budgets).tolist():
            heads, q_heads = self._heads_on(budget, group_size, keys.device)
            selections.append((heads, self._select(keys, queries, heads, q_heads, budget, scale)))
        return selections

    def _heads_on(self, budget: int, group_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The KV heads with ``budget`` and their query heads, on ``device``; copied there once per layer, since a
        copy from host memory waits for the device (the engine reuses its layers for every prompt)."""
        key = (budget, group_size, device)
        if key not in self._device_heads:
            heads = (self.budgets == budget).nonzero().flatten()
            q_heads = (heads[:, None] * group_size + torch.arange(group_size)).flatten()
            self._device_heads[key] = heads.to(device), q_heads.to(device)
        return self._device_heads[key]

    def _select(self, keys, queries, heads, q_heads, budget, scale) -> torch.Tensor | None:
        """Token indices (relative to the sequence start) kept by ``heads`` for one sequence, ``[heads, kept]``, or
        None when they keep every token."""
        p = self.params
        n = keys.shape[1]
        regions = p.regions(n)
        keep = p.kept_chunks(regions.num_chunks, budget)
        if keep >= regions.num_chunks:  # prompt too short to compress (or eta = 1): keep it all, exactly
            return None
        group_size = q_heads.numel() // heads.numel()
        obs, n_mid = queries.shape[1], regions.num_chunks * p.chunk_size
        mid = keys[:, regions.mid_start : regions.tail_start]
        # Score as many heads at once as fit in SCORE_BYTES of float32 attention probabilities.
        per_block = max(1, SCORE_BYTES // (4 * group_size * obs * n_mid))
        scores = []
        for first in range(0, heads.numel(), per_block):
            block = heads[first : first + per_block]
            block_q = q_heads[first * group_size : (first + per_block) * group_size]
            probs = observation_probs(queries[block_q], mid[block], scale, n - obs, regions.mid_start)
            scores.append(chunk_scores(probs, p.chunk_size))
        return retained_indices(regions, top_chunks(torch.cat(scores) if len(scores) > 1 else scores[0], keep))

    def _build_group(self, per_seq, keys, values, starts, heads, q_heads) -> HeadGroup:
        batch, total, dim = keys.shape[0], keys.shape[2], keys.shape[3]
        lengths = [total - start if idx is None else idx.shape[1] for idx, start in zip(per_seq, starts)]
        kept = max(lengths)
        kv = keys.new_empty(2, batch, heads.numel(), kept + self.reserve, dim)
        offsets = [kept - n for n in lengths]  # known on the host: no wait for the device
        for b, (idx, start, offset) in enumerate(zip(per_seq, starts, offsets)):
            if idx is None:
                kv[0, b, :, offset:kept] = keys[b, heads, start:]
                kv[1, b, :, offset:kept] = values[b, heads, start:]
            else:
                gather = (idx + start)[..., None].expand(-1, -1, dim)
                kv[0, b, :, offset:kept] = keys[b, heads].gather(1, gather)
                kv[1, b, :, offset:kept] = values[b, heads].gather(1, gather)
            # Padding slots are masked, but must hold finite values: a masked weight of 0 times NaN is NaN.
            kv[:, b, :, :offset] = 0
        pad = torch.tensor(offsets, dtype=torch.int64).to(keys.device) if any(offsets) else None
        return HeadGroup(kv_heads=heads, q_heads=q_heads, kv=kv, length=kept, pad=pad)

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def reset(self) -> None:
        super().reset()
        self.groups, self.seen, self.valid_start, self.obs_queries = [], 0, None, None

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("CateKVCache cannot be cropped (assisted generation is not supported)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("CateKVCache does not support beam search")

    @property
    def allocated_bytes(self) -> int:
        held = sum(g.allocated_bytes for g in self.groups)
        if self.keys is not None and self.keys.numel():
            held += self.keys.numel() * self.keys.element_size() * 2
        return held

    @property
    def used_bytes(self) -> int:
        """Filled bytes: the groups' slots, or the whole prefill buffer before selection."""
        return sum(g.used_bytes for g in self.groups) if self.compressed else self.allocated_bytes


def _layer_budgets(head_map: torch.Tensor, params: ProfileParams, budgets: torch.Tensor | None) -> torch.Tensor:
    """``budgets`` checked against ``head_map``, or ``params.budget`` for every consistent head."""
    if budgets is None:
        return uniform_budgets(head_map, params.budget)
    budgets = budgets.to(torch.int64).cpu()
    check_budgets(budgets, head_map.bool().cpu(), params)
    return budgets


def _valid_start(mask: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor | None:
    """First non-padding position of each sequence, from the boolean 4D mask of the last query."""
    if mask is None:
        return None
    if mask.dtype != torch.bool:
        mask = mask == 0  # an additive float mask: 0 where visible
    visible = mask[:, 0, -1, :length].expand(batch, -1)
    start = length - visible.sum(dim=-1)
    positions = torch.arange(length, device=device)
    if not torch.equal(visible, positions[None, :] >= start[:, None]):
        raise ValueError("CateKV needs left padding (padding_side='left') with no holes in the attention mask")
    return start if bool(start.any()) else None


class CateKVCache(DynamicCache):
    """A transformers ``Cache`` holding CateKV's hybrid KV; pass it as the model's cache.

    Args:
        config: the model's config (sliding-window layers keep transformers' own sliding layers).
        head_map: bool ``[num_layers, num_kv_heads]``, True for adaptive heads (``Profile.head_map``).
        params: retention parameters (``Profile.params``, possibly overridden).
        budgets: int64 ``[num_layers, num_kv_heads]`` tokens per consistent head, -1 on adaptive heads
            (``Profile.budgets``); default: ``params.budget`` for every consistent head.
        reserve: decode slots to preallocate per head (capacity grows by doubling past it).
        eager: select at the end of the prefill call, releasing each layer's full KV right away (peak
            memory: retained KV + one layer's full KV). Set False to prefill in several calls; selection
            then happens at the first decode step, with the same result.
        prefill_backend: the attention of a prefill call over a whole unpadded prompt
            (``catekv_runtime.attention.PREFILL_BACKENDS``); other prefill calls run transformers' SDPA attention.
    """

    def __init__(self, config, head_map: torch.Tensor, params: ProfileParams, *, reserve: int = DEFAULT_RESERVE,
                 eager: bool = True, budgets: torch.Tensor | None = None, prefill_backend: str = "auto"):
        super().__init__(config=config)
        if len(self.layers) != head_map.shape[0]:
            raise ValueError(f"head map has {head_map.shape[0]} layers, the model {len(self.layers)}")
        budgets = _layer_budgets(head_map, params, budgets)
        for i, layer in enumerate(self.layers):
            if type(layer) is DynamicLayer:  # sliding-window (and other special) layers stay as they are
                self.layers[i] = CateKVLayer(budgets[i], params, reserve, eager, prefill_backend)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        _pending.set((self, layer_idx))
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def fork(self, head_map: torch.Tensor, params: ProfileParams, *, reserve: int = DEFAULT_RESERVE,
             budgets: torch.Tensor | None = None) -> CateKVCache:
        """A new cache holding what ``head_map``/``params``/``budgets`` keep of this cache's prefill; this one is
        unchanged.

        One prefill then serves several retention settings (the evaluation harness compares methods this
        way): this cache must have been made with ``eager=False`` and not have decoded yet, so that every
        layer still holds its full prompt KV and the last ``obs_window`` queries. The full KV is shared,
        not copied; only the selected tokens are.
        """
        if head_map.shape[0] != len(self.layers):
            raise ValueError(f"head map has {head_map.shape[0]} layers, the cache {len(self.layers)}")
        budgets = _layer_budgets(head_map, params, budgets)
        forked = copy.copy(self)
        forked.layers = []
        for i, layer in enumerate(self.layers):
            # A plain transformers layer replaces its tensors on update (torch.cat), so sharing them is safe.
            new = copy.copy(layer)
            if isinstance(layer, CateKVLayer):
                if layer.compressed or layer.obs_queries is None:
                    raise ValueError("fork() needs a finished prefill that is not yet compressed: make the "
                                     "cache with eager=False and fork it before the first decode step")
                if params.obs_window > layer.params.obs_window and layer.obs_queries.shape[2] < layer.seen:
                    raise ValueError(f"the prefill kept the last {layer.params.obs_window} queries; "
                                     f"cannot select with obs_window={params.obs_window}")
                new.budgets, new.params, new.reserve, new.groups = budgets[i].cpu(), params, reserve, []
                new._device_heads = {}  # they follow the budgets
                new.obs_queries = layer.obs_queries[:, :, -params.obs_window :]
                new.compress()
            forked.layers.append(new)
        return forked

    def catekv_layer(self, layer_idx: int) -> CateKVLayer | None:
        layer = self.layers[layer_idx]
        return layer if isinstance(layer, CateKVLayer) else None

    def memory(self) -> dict[str, int]:
        """Bytes of KV held (allocated) now, bytes filled, and what full attention would hold for the same tokens."""
        held = used = full = 0
        for layer in self.layers:
            if isinstance(layer, CateKVLayer):
                held += layer.allocated_bytes
                used += layer.used_bytes
                full += layer.token_bytes * layer.seen
            elif getattr(layer, "keys", None) is not None and layer.keys.numel():
                size = layer.keys.numel() * layer.keys.element_size() * 2
                held += size
                used += size
                full += size
        return {"allocated_bytes": held, "used_bytes": used, "full_attention_bytes": full}
