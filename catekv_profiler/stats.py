"""Sequential-consistency statistics of one layer (docs/method.md, "Offline identification", steps 1-6).

Plain PyTorch on whatever device the model runs on. One KV head at a time, so the largest temporary is
``[query heads per KV head, L_obs, n_mid]`` float32 (134 MB per KV head of a GQA-4 model at 128K). One
softmax and one sort per head give the statistics of any number of (k, alpha) settings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from catekv_runtime.profile import ProfileParams
from catekv_runtime.selection import observation_probs


@dataclass
class LayerStats:
    """Per threshold setting and KV head of one layer (float32 ``[settings, H]``): CV of chunk hits,
    threshold tau, mean hits per chunk."""

    cv: torch.Tensor
    threshold: torch.Tensor
    hit_mean: torch.Tensor


ThresholdSetting = tuple[float, float]  # (percentile k, alpha)


def sorted_quantile(ordered: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(values, q)`` (linear interpolation) read from ``ordered``, the values sorted ascending.

    One sort serves every quantile of a calibration grid; ``torch.quantile`` also refuses inputs over 2^24
    elements (reached beyond ~256K tokens), and ``kthvalue`` is slow on CUDA.
    """
    pos = q * (ordered.numel() - 1)
    lo = int(pos)
    hi = min(lo + 1, ordered.numel() - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def head_thresholds(ordered: torch.Tensor, settings: Sequence[ThresholdSetting]) -> torch.Tensor:
    """tau = P_{1-k} + alpha * (P_k - P_{1-k}), at least 1e-9 (step 4), of each (k, alpha) setting from one head's
    sorted probabilities: float32 ``[settings]``."""
    taus = []
    for percentile, alpha in settings:
        low = sorted_quantile(ordered, 1.0 - percentile)
        high = sorted_quantile(ordered, percentile)
        taus.append(torch.clamp(low + alpha * (high - low), min=1e-9))
    return torch.stack(taus).float()


def chunk_hits(probs: torch.Tensor, threshold: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Number of observation queries with at least one critical token in each chunk (step 5).

    ``probs`` is ``[L_obs, num_chunks * chunk_size]``, ``threshold`` a scalar or ``[settings]``; returns
    float32 ``[num_chunks]`` or ``[settings, num_chunks]``. A chunk has a critical token exactly when its
    largest probability is above tau, so the comparison runs on the chunk maxima.
    """
    obs, n_mid = probs.shape
    peaks = probs.view(obs, n_mid // chunk_size, chunk_size).amax(dim=-1)
    critical = peaks > threshold.reshape(*threshold.shape, 1, 1)
    return critical.sum(dim=-2, dtype=torch.float32)


def coefficient_of_variation(hits: torch.Tensor) -> torch.Tensor:
    """std / mean over chunks (the last dimension), unbiased std; 0 for a head with no hits (step 6)."""
    if hits.shape[-1] < 2:
        return torch.zeros(hits.shape[:-1], dtype=torch.float32, device=hits.device)
    mean = hits.mean(dim=-1)
    # No host sync (on a GPU): a head without hits has mean 0 and gets 0 instead of 0 / 0.
    return torch.where(mean > 0, hits.std(dim=-1, unbiased=True) / mean.clamp_min(1e-30), 0.0)


def layer_statistics(
    queries: torch.Tensor, keys: torch.Tensor, scale: float, params: ProfileParams,
    settings: Sequence[ThresholdSetting] | None = None,
) -> LayerStats:
    """Statistics of every KV head of a layer for one sequence, on the device of ``queries`` and ``keys``.

    Args:
        queries: ``[num_q_heads, L_obs, d]``: the last ``L_obs`` post-RoPE queries of the prompt.
        keys: ``[num_kv_heads, n, d]``: all post-RoPE keys of the prompt (n tokens).
        settings: the (k, alpha) pairs to compute, all from one softmax and one sort per head (a
            calibration grid); default: the one of ``params``. The result has one row per setting.
    """
    settings = list(settings or [(params.percentile, params.alpha)])
    n = keys.shape[1]
    regions = params.regions(n)
    if regions.num_chunks == 0:
        raise ValueError(
            f"a prompt of {n} tokens has no middle chunk with init={params.init_tokens}, "
            f"recent={params.recent_tokens}, reserve={params.reserve_tokens}, chunk={params.chunk_size}"
        )
    num_kv = keys.shape[0]
    group = queries.shape[0] // num_kv
    mid = keys[:, regions.mid_start : regions.tail_start]
    per_head = []  # [3, settings] (cv, tau, hit mean) of each head, kept on the layer's device (no host sync)
    for h in range(num_kv):
        probs = observation_probs(
            queries[h * group : (h + 1) * group], mid[h : h + 1], scale, n - queries.shape[1], regions.mid_start
        )[0]
        thresholds = head_thresholds(probs.reshape(-1).sort().values, settings)
        hits = chunk_hits(probs, thresholds, params.chunk_size)
        per_head.append(torch.stack([coefficient_of_variation(hits), thresholds, hits.mean(dim=-1)]))
    cv, tau, hit_mean = torch.stack(per_head, dim=-1).float().unbind(dim=0)
    return LayerStats(cv=cv, threshold=tau, hit_mean=hit_mean)
