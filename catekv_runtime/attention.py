"""Decode attention over a layer's head groups, plain PyTorch (SDPA): runs on CPU and GPU.

Each group holds a different number of tokens, so attention runs once per group and the outputs are
scattered back to the model's query-head order. K/V are never repeated per query head: for one new
token, the query heads of a KV head are folded into the query-length axis (their keys are the same),
which keeps SDPA on its fused kernels; for several new tokens SDPA's own GQA support is used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .cache import HeadGroup

# Not cuDNN: on an H200 SDPA picks it for these shapes, and it builds a new plan for every new cache
# length (~40 ms per call at 128K) and runs 10x slower than flash even with the plan cached
# (0.11 vs 1.5 ms at 128K: benchmarks/sdpa_decode_backends.py).
_DECODE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def group_attention(query: torch.Tensor, group: HeadGroup, scale: float) -> torch.Tensor:
    """Attention of ``query`` ``[batch, group_q_heads, q_len, d]`` over a group's filled slots."""
    batch, q_heads, q_len, dim = query.shape
    kv_heads = group.kv_heads.numel()
    keys = group.keys[:, :, : group.length]
    values = group.values[:, :, : group.length]
    mask = group.mask(q_len)
    with sdpa_kernel(_DECODE_BACKENDS):
        if q_len == 1:
            folded = query.reshape(batch, kv_heads, q_heads // kv_heads, dim)
            out = F.scaled_dot_product_attention(folded, keys, values, attn_mask=mask, scale=scale)
            return out.reshape(batch, q_heads, 1, dim)
        return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)


def decode_attention(query: torch.Tensor, groups: list[HeadGroup], scale: float) -> torch.Tensor:
    """Attention of new tokens over a compressed layer; returns ``[batch, q_len, num_q_heads, d]``."""
    if len(groups) == 1:
        return group_attention(query[:, groups[0].q_heads], groups[0], scale).transpose(1, 2)
    out = torch.empty_like(query)
    for group in groups:
        out[:, group.q_heads] = group_attention(query[:, group.q_heads], group, scale)
    return out.transpose(1, 2)
