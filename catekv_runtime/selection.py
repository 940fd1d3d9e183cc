"""Which tokens each KV head keeps after prefill (docs/method.md, "Runtime").

Plain PyTorch, shared by the runtime (chunk scores, retained indices) and the profiler (observation
attention). Every function works on one sequence; callers loop over the batch and over KV heads so that
no full attention matrix is ever materialised: the largest temporary is
``[query heads of one KV head, L_obs, n_mid]`` in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Regions:
    """Token regions of a prompt of ``length`` tokens: [0, init) | middle chunks | [tail_start, length).

    The middle is cut to whole chunks from its start and stops ``reserve_tokens // chunk_size`` chunks
    before the last ``recent_tokens`` (rounded down to whole chunks too). With the default reserve of 32
    this is the authors' ``chunk_end = (n // c - 32 // c) * c``, middle ``[init, chunk_end - recent)``
    (docs/method.md, "Regions"): the tail then holds ``recent + 32 + n mod c`` tokens, which carry heavy
    local attention and would otherwise dominate the statistics of the middle. ``reserve_tokens=0`` gives
    ``(n - init - recent) // c`` chunks.
    """

    length: int
    init: int
    chunk_size: int
    num_chunks: int

    @classmethod
    def of(cls, length: int, init_tokens: int, recent_tokens: int, chunk_size: int,
           reserve_tokens: int) -> Regions:
        whole = (length - init_tokens - recent_tokens) // chunk_size
        num_chunks = max(0, whole - reserve_tokens // chunk_size)
        init = min(init_tokens, length)
        return cls(length=length, init=init, chunk_size=chunk_size, num_chunks=num_chunks)

    @property
    def mid_start(self) -> int:
        return self.init

    @property
    def tail_start(self) -> int:
        return self.init + self.num_chunks * self.chunk_size


def observation_probs(
    queries: torch.Tensor, keys: torch.Tensor, scale: float, query_start: int, key_start: int
) -> torch.Tensor:
    """Attention probabilities of observation queries over middle keys, averaged over each GQA group.

    Args:
        queries: ``[num_q_heads, L_obs, d]`` post-RoPE queries, the first at absolute position ``query_start``.
        keys: ``[num_kv_heads, n_mid, d]`` post-RoPE keys of the middle region, the first at ``key_start``.
        scale: the model's softmax scale.

    Returns ``[num_kv_heads, L_obs, n_mid]`` float32; softmax over the middle region only, keys after a
    query's own position masked out (causality), then the mean over the query heads of each KV head.
    """
    num_q, obs, dim = queries.shape
    num_kv, n_mid, _ = keys.shape
    group = num_q // num_kv
    q = queries.float().reshape(num_kv, group * obs, dim)
    logits = torch.bmm(q, keys.float().transpose(1, 2)).mul_(scale).view(num_kv, group, obs, n_mid)
    if key_start + n_mid - 1 > query_start:  # only when L_rec < L_obs: some middle keys follow a query
        q_pos = torch.arange(query_start, query_start + obs, device=keys.device)
        k_pos = torch.arange(key_start, key_start + n_mid, device=keys.device)
        logits.masked_fill_(k_pos[None, :] > q_pos[:, None], float("-inf"))
    # A query that sees no middle key at all (prompt barely longer than the window) contributes zeros.
    probs = torch.softmax(logits, dim=-1).nan_to_num_(0.0)
    return probs.mean(dim=1)


def chunk_scores(probs: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Score of each middle chunk: the sum over observation queries of the max probability inside it.

    ``probs`` is ``[..., L_obs, num_chunks * chunk_size]``; returns ``[..., num_chunks]``.
    """
    *lead, obs, n_mid = probs.shape
    return probs.view(*lead, obs, n_mid // chunk_size, chunk_size).amax(dim=-1).sum(dim=-2)


def retained_indices(regions: Regions, chunks: torch.Tensor) -> torch.Tensor:
    """Token indices kept by heads that keep the middle ``chunks`` (``[heads, k]``): init + chunks + tail.

    Returns ``[heads, init + k * chunk_size + tail]`` int64, sorted within each head.
    """
    device = chunks.device
    heads = chunks.shape[0]
    c = regions.chunk_size
    chunk_tokens = (regions.mid_start + chunks.sort(dim=-1).values[..., None] * c + torch.arange(c, device=device))
    init = torch.arange(regions.init, device=device).expand(heads, -1)
    tail = torch.arange(regions.tail_start, regions.length, device=device).expand(heads, -1)
    return torch.cat([init, chunk_tokens.reshape(heads, -1), tail], dim=-1)


def top_chunks(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` highest-scoring chunks of each head (``scores`` is ``[heads, num_chunks]``)."""
    return torch.topk(scores, min(count, scores.shape[-1]), dim=-1, sorted=False).indices
