"""The vote (docs/method.md, "Votes"): which KV heads are adaptive, from the per-sample CVs of a profile."""

from __future__ import annotations

import math

import torch

from .params import TIE_RULES


def adaptive_head_count(ratio: float, heads: int) -> int:
    """Adaptive heads of ``heads`` at ratio r: ceil(r * heads) (the epsilon keeps 0.2 * 10 at 2 despite binary
    rounding)."""
    return math.ceil(ratio * heads - 1e-9)


def vote_adaptive_heads(cv: torch.Tensor, ratio: float, tie_rule: str = "exact") -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the adaptive heads from per-sample CVs ``[S, L, H]`` (docs/method.md, "Votes").

    In each sample the heads whose CV is at or below the ``ratio``-quantile of that sample's CVs get a
    vote. ``tie_rule="exact"``: the ``ceil(ratio * L * H)`` heads with most votes are adaptive; ties go to
    the lower mean CV, then to the lower flat index, so the result is deterministic and has exactly that
    many heads. ``"inclusive"`` (the authors' code): every head with at least as many votes as the
    ``ceil(ratio * L * H)``-th most voted one, which can be more heads.
    Returns ``(head_map bool [L, H], votes int64 [L, H])``.
    """
    samples, layers, heads = cv.shape
    flat = cv.reshape(samples, layers * heads).double()
    cutoff = torch.quantile(flat, ratio, dim=1, keepdim=True)
    votes = (flat <= cutoff).sum(dim=0)
    count = adaptive_head_count(ratio, layers * heads)
    # Lexicographic sort: most votes first, then lowest mean CV; a stable sort keeps index order on full ties.
    by_cv = torch.sort(flat.mean(dim=0), stable=True).indices
    by_votes = torch.sort(votes[by_cv], descending=True, stable=True).indices
    order = by_cv[by_votes]
    head_map = torch.zeros(layers * heads, dtype=torch.bool)
    head_map[order[:count]] = True
    if tie_rule == "inclusive" and count > 0:
        head_map |= votes >= votes[order[count - 1]]
    elif tie_rule not in TIE_RULES:
        raise ValueError(f"tie_rule must be one of {TIE_RULES}, got {tie_rule!r}")
    return head_map.reshape(layers, heads), votes.reshape(layers, heads).to(torch.int64)


__all__ = ["adaptive_head_count", "vote_adaptive_heads"]
