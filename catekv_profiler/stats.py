"""Sequential-consistency statistics of one layer (catekv-method.md, "Offline identification", steps 1-6).

Plain PyTorch on whatever device the model runs on. One KV head at a time, so the largest temporary is
``[query heads per KV head, L_obs, n_mid]`` float32 (33 MB per KV head of a GQA-4 model at 128K).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from catekv_runtime.profile import ProfileParams
from catekv_runtime.selection import Regions, observation_probs


@dataclass
class LayerStats:
    """Per KV head of one layer: CV of chunk hits, threshold tau, mean hits per chunk (float32 ``[H]``)."""

    cv: torch.Tensor
    threshold: torch.Tensor
    hit_mean: torch.Tensor


def quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(values, q)`` (linear interpolation) for any number of elements.

    torch.quantile refuses inputs over 2^24 elements (reached beyond ~256K tokens); ``kthvalue`` has no
    such limit and needs no full sort.
    """
    flat = values.reshape(-1)
    pos = q * (flat.numel() - 1)
    lo = int(pos)
    hi = min(lo + 1, flat.numel() - 1)
    v_lo = flat.kthvalue(lo + 1).values
    v_hi = flat.kthvalue(hi + 1).values if hi != lo else v_lo
    return v_lo + (v_hi - v_lo) * (pos - lo)


def head_threshold(probs: torch.Tensor, percentile: float, alpha: float) -> torch.Tensor:
    """tau = P_{1-k} + alpha * (P_k - P_{1-k}), at least 1e-9 (step 4)."""
    low = quantile(probs, 1.0 - percentile)
    high = quantile(probs, percentile)
    return torch.clamp(low + alpha * (high - low), min=1e-9)


def chunk_hits(probs: torch.Tensor, threshold: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Number of observation queries with at least one critical token in each chunk (step 5).

    ``probs`` is ``[L_obs, num_chunks * chunk_size]``; returns ``[num_chunks]`` float32.
    """
    obs, n_mid = probs.shape
    critical = (probs > threshold).view(obs, n_mid // chunk_size, chunk_size).any(dim=-1)
    return critical.sum(dim=0, dtype=torch.float32)


def coefficient_of_variation(hits: torch.Tensor) -> torch.Tensor:
    """std / mean over chunks, unbiased std; 0 for a head with no hits (step 6)."""
    if hits.numel() < 2:
        return torch.zeros((), dtype=torch.float32, device=hits.device)
    mean = hits.mean()
    # No host sync (on a GPU): a head without hits has mean 0 and gets 0 instead of 0 / 0.
    return torch.where(mean > 0, hits.std(unbiased=True) / mean.clamp_min(1e-30), 0.0)


def layer_statistics(
    queries: torch.Tensor, keys: torch.Tensor, scale: float, params: ProfileParams
) -> LayerStats:
    """Statistics of every KV head of a layer for one sequence, on the device of ``queries`` and ``keys``.

    Args:
        queries: ``[num_q_heads, L_obs, d]``: the last ``L_obs`` post-RoPE queries of the prompt.
        keys: ``[num_kv_heads, n, d]``: all post-RoPE keys of the prompt (n tokens).
    """
    n = keys.shape[1]
    regions = Regions.of(n, params.init_tokens, params.recent_tokens, params.chunk_size)
    if regions.num_chunks == 0:
        raise ValueError(
            f"a prompt of {n} tokens has no middle chunk with init={params.init_tokens}, "
            f"recent={params.recent_tokens}, chunk={params.chunk_size}"
        )
    num_kv = keys.shape[0]
    group = queries.shape[0] // num_kv
    mid = keys[:, regions.mid_start : regions.tail_start]
    per_head = []  # (cv, tau, hit mean) of each head, kept on the layer's device (no host sync)
    for h in range(num_kv):
        probs = observation_probs(
            queries[h * group : (h + 1) * group], mid[h : h + 1], scale, n - queries.shape[1], regions.mid_start
        )[0]
        threshold = head_threshold(probs, params.percentile, params.alpha)
        hits = chunk_hits(probs, threshold, params.chunk_size)
        per_head.append(torch.stack([coefficient_of_variation(hits), threshold.float(), hits.mean()]))
    cv, tau, hit_mean = torch.stack(per_head).float().unbind(dim=1)
    return LayerStats(cv=cv, threshold=tau, hit_mean=hit_mean)
