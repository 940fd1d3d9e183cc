"""Attention in plain PyTorch (SDPA), CPU and GPU: decode over a layer's head groups, and the prefill's chunks.

Decode: each group holds a different number of tokens, so attention runs once per group and the outputs are
scattered back to the model's query-head order. K/V are never repeated per query head: for one new
token, the query heads of a KV head are folded into the query-length axis (their keys are the same),
which keeps SDPA on its fused kernels; for several new tokens SDPA's own GQA support is used.

Prefill: :func:`chunk_attention` is the causal attention of one chunk of a prompt over every key up to its own, on
one of the :data:`PREFILL_BACKENDS` (:func:`resolve_prefill_backend`): FlashAttention-4 (``fa4``), flash-attn 2
(``flash2``) or SDPA (``sdpa``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from .cache import HeadGroup

# Not cuDNN: on Hopper SDPA picks it for these shapes, builds a new plan for every new cache length and decodes
# far slower than flash even with the plan cached (benchmarks/sdpa_decode_backends.py; docs/benchmarks.md).
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


# The prefill attention backends; "auto" picks one with resolve_prefill_backend.
PREFILL_BACKENDS = ("auto", "fa4", "flash2", "sdpa")
# Per FlashAttention backend: the package to import, the least compute capability major, the catekv extra.
_FLASH = {"fa4": ("flash_attn.cute", 9, "flash4"), "flash2": ("flash_attn", 8, "flash")}


def resolve_prefill_backend(backend: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """The prefill attention backend ``backend`` names for queries of ``dtype`` and ``head_dim`` on ``device``:
    ``"fa4"``, ``"flash2"`` or ``"sdpa"``.

    ``"auto"`` is the fastest that can run: FlashAttention-4 on compute capability 9.0 and newer when it is
    importable (``pip install "catekv[flash4]"``), flash-attn 2 on 8.x (Ampere, Ada) when importable, else SDPA.
    Not flash-attn 2 on Hopper: it is the kernel of SDPA's flash backend, slower there than the cuDNN
    attention the ``sdpa`` backend runs there (``benchmarks/chunk_attention.py``). FlashAttention needs float16 or
    bfloat16 and a head_dim that is a multiple of 8 up to 256. Naming ``"fa4"`` or ``"flash2"`` where it cannot
    run raises ``ValueError`` saying why (and what to install).
    """
    if backend not in PREFILL_BACKENDS:
        raise ValueError(f"prefill_backend must be one of {PREFILL_BACKENDS}, got {backend!r}")
    return _resolve(backend, torch.device(device), dtype, head_dim)


@functools.lru_cache(maxsize=None)
def _resolve(backend: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    if backend == "auto":
        major = torch.cuda.get_device_capability(device)[0] if device.type == "cuda" else 0
        preferred = "fa4" if major >= 9 else "flash2"
        return preferred if _flash_problem(preferred, device, dtype, head_dim) is None else "sdpa"
    if backend in _FLASH:
        problem = _flash_problem(backend, device, dtype, head_dim)
        if problem is not None:
            raise ValueError(f"prefill_backend={backend!r}: {problem}")
    return backend


def _flash_problem(backend: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why FlashAttention backend ``backend`` cannot run here, or None when it can."""
    package, least_major, extra = _FLASH[backend]
    if device.type != "cuda":
        return f"needs a CUDA GPU, the model is on {device}"
    major, minor = torch.cuda.get_device_capability(device)
    if major < least_major:
        return f"needs a GPU of compute capability {least_major}.0 or newer, this one is {major}.{minor}"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"needs float16 or bfloat16, the model is {dtype}"
    if head_dim % 8 or head_dim > 256:
        return f"needs a head_dim that is a multiple of 8 up to 256, the model's is {head_dim}"
    try:
        _flash_function(backend)
    except Exception as exc:  # ImportError, or a broken install (a CUDA library missing) failing another way
        return f"{package} is not importable ({exc}); install it with pip install \"catekv[{extra}]\""
    return None


@functools.lru_cache(maxsize=None)
def _flash_function(backend: str) -> Callable:
    """The package's ``flash_attn_func``; both take ``[B, n, H, D]`` tensors, K/V with fewer heads (GQA), and
    align ``causal=True`` bottom-right when ``n_q < n_k``."""
    if backend == "fa4":
        from flash_attn.cute import flash_attn_func
    else:
        from flash_attn import flash_attn_func
    return flash_attn_func


def chunk_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int, scale: float, *,
                    backend: str = "auto", split: bool | None = None) -> torch.Tensor:
    """Causal attention of a chunk of a prompt: ``query`` ``[B, Hq, n, D]`` holds positions ``[start, start + n)``
    and attends to ``keys``/``values`` ``[B, Hkv, >= start + n, D]`` up to its own position (Hq a multiple of Hkv).

    ``backend``: one of :data:`PREFILL_BACKENDS` (:func:`resolve_prefill_backend`). FlashAttention aligns its
    causal mask bottom-right, as a later chunk needs: one call over the keys up to the chunk's end.

    SDPA: a later chunk's bottom-right mask runs on flash-attention only, which is slower than cuDNN's attention
    (``benchmarks/chunk_attention.py``; docs/benchmarks.md); cuDNN has only the top-left mask. So where cuDNN
    attention can run, the chunk is two cuDNN calls merged by their log-sum-exp: its queries over the earlier keys
    with no mask, and over its own keys with the square causal mask. Elsewhere it is one SDPA call with the
    bottom-right mask. ``split`` forces (True) or forbids (False) the two-call form; True off CUDA computes the two
    parts in plain float32 PyTorch (for tests).
    """
    length = query.shape[2]
    end = start + length
    keys, values = keys[:, :, :end], values[:, :, :end]
    if backend != "sdpa":
        backend = resolve_prefill_backend(backend, query.device, query.dtype, query.shape[-1])
    if backend != "sdpa":
        out = _flash_function(backend)(query.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                       softmax_scale=scale, causal=True)
        # FlashAttention-4 returns (out, lse), lse None unless asked for; flash-attn 2 the output alone.
        return (out[0] if backend == "fa4" else out).transpose(1, 2)
    if start == 0:
        return F.scaled_dot_product_attention(query, keys, values, is_causal=True, scale=scale, enable_gqa=True)
    if split is None:
        split = _cudnn_can_split(query, keys)
    if not split:
        return F.scaled_dot_product_attention(query, keys, values, attn_mask=causal_lower_right(length, end),
                                              scale=scale, enable_gqa=True)
    earlier, earlier_lse = _attention_with_lse(query, keys[:, :, :start], values[:, :, :start], False, scale)
    own, own_lse = _attention_with_lse(query, keys[:, :, start:], values[:, :, start:], True, scale)
    total = torch.logaddexp(earlier_lse, own_lse)
    heads = 8  # the merge's float32 temporaries, a few heads at a time: a 512K prefill's peak has no room
    for h in range(0, query.shape[1], heads):
        part = slice(h, h + heads)
        own[:, part] = (earlier[:, part] * torch.exp(earlier_lse[:, part] - total[:, part]).unsqueeze(-1)
                        + own[:, part] * torch.exp(own_lse[:, part] - total[:, part]).unsqueeze(-1))
    return own


def _cudnn_can_split(query: torch.Tensor, keys: torch.Tensor) -> bool:
    """Whether both calls of :func:`chunk_attention`'s two-call form can run on cuDNN attention."""
    if not query.is_cuda or not torch.backends.cuda.cudnn_sdp_enabled():
        return False
    from torch.backends.cuda import SDPAParams, can_use_cudnn_attention

    params = SDPAParams(query, keys, keys, None, 0.0, True, query.shape[1] != keys.shape[1])
    return can_use_cudnn_attention(params)


def _attention_with_lse(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, causal: bool,
                        scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output ``[B, Hq, n, D]`` and its log-sum-exp ``[B, Hq, n]`` (float32); ``causal`` aligns the mask
    top-left. cuDNN's attention on CUDA, float32 PyTorch elsewhere."""
    if query.is_cuda:
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
            query, keys, values, None, True, 0.0, causal, False, scale=scale)[:2]
        return out, lse.reshape(out.shape[:3])
    group = query.shape[1] // keys.shape[1]
    scores = query.float() @ keys.repeat_interleave(group, 1).float().transpose(-1, -2) * scale
    if causal:
        scores.masked_fill_(torch.ones_like(scores, dtype=torch.bool).triu_(1), float("-inf"))
    lse = torch.logsumexp(scores, -1)
    out = torch.exp(scores - lse.unsqueeze(-1)) @ values.repeat_interleave(group, 1).float()
    return out.to(query.dtype), lse
