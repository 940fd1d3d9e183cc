"""Split-K ("flash-decoding") attention of one new query token over a preallocated KV cache.

Every KV head keeps a dense cache ``[batch, kv_heads, capacity, head_dim]``; sequence ``b`` uses the
slots ``[starts[b], lengths[b])``. Lengths and starts are read from device memory inside the kernel,
so no host sync happens and nothing about the launch depends on the current length: the call can be
captured once in a CUDA graph and replayed while the cache fills.

How it works (two kernels):

1. ``_split_kernel``, grid ``(batch * kv_heads, num_splits)``. A program loads the G query rows of
   its KV head as one ``[G_PAD, D]`` tile (G_PAD >= 16 so ``tl.dot`` can use tensor cores: decode is
   memory-bound, the padding rows cost nothing that matters), takes its share of the *valid* range
   ``[start, length)`` in whole ``BLOCK_N`` blocks, and runs an online softmax in fp32 (exp2 with a
   log2(e)-prescaled scale). It writes the normalised partial output and its log-sum-exp (log2
   units) to a fp32 workspace indexed by *model* query head. Splitting the valid range rather than
   the capacity keeps every split busy whatever the fill, and work scales with the real length.
   A split that gets no key writes ``lse = -inf`` and is ignored by the combine.
2. ``_combine_kernel``, grid ``(batch * q_heads,)``: log-sum-exp merge of the splits of one query
   head, written straight into ``out`` (any strides).

The split kernel also does the per-token work around the attention: ``rope=(cos, sin)`` rotates q and the new key
(they arrive unrotated), and split 0 appends ``new_k``/``new_v`` to the cache, so neither needs a launch of its own.
``DecodeConfig(concurrent_groups=True)`` runs a layer's second head group on a side stream, beside the first.

Optionally (``DecodeConfig(fused_combine=True)``) the last split program of each KV head to finish
does the merge itself (a per-head arrival counter, reset by that program), which saves the second
launch. Launch counts: ``decode_attention`` 2 (1 fused); ``decode_attention_two_groups`` with n
groups n + 1 (n fused).

Triton is imported by this module only; ``catekv_runtime`` itself never imports it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634
_H200_SMS = 132  # used when no CUDA device is visible (interpreter runs, planning on CPU)
_MAX_SPLITS = 128  # bounds the combine's unrolled loop and the workspace
_S_CHUNK = 32  # splits merged per step of the combine


@dataclass(frozen=True)
class DecodeConfig:
    """Launch parameters of the split kernel (``num_splits`` is passed separately).

    ``block_n`` keys per loop step (K and V tiles are ``block_n x head_dim`` each); ``num_stages``
    is the software-pipelining depth of those loads; ``fused_combine`` merges the splits in the
    split kernel (one launch) instead of a separate combine kernel; ``programs_per_sm`` sets the
    default split count of a cache (:func:`default_num_splits`).
    """

    # Chosen by benchmarks/kernel_decode.py --sweep at 128K, batch 1 and 8 (docs/results/kernel_sweep_128k.json).
    block_n: int = 32
    num_warps: int = 4
    num_stages: int = 3
    fused_combine: bool = False
    # Target programs per SM when choosing a group's split count (default_num_splits).
    programs_per_sm: float = 4
    # decode_attention_two_groups on CUDA: every group after the first runs its split kernel on a side
    # stream, concurrently with the first (a CUDA graph records the two as parallel branches), so that a
    # short group fills the SMs that the long group's tail leaves idle instead of running after it.
    concurrent_groups: bool = False


DEFAULT_CONFIG = DecodeConfig()


@dataclass
class DecodeWorkspace:
    """Scratch memory of one decode call; allocate once per shape and reuse (CUDA graphs).

    ``partial_out`` ``[batch, q_heads, num_splits, head_dim]`` and ``partial_lse``
    ``[batch, q_heads, num_splits]`` are fp32 and fully rewritten by every call. ``counters``
    ``[batch, q_heads]`` int32 is used by the fused combine only and must be zero between calls
    (the kernel resets what it uses).
    """

    partial_out: torch.Tensor
    partial_lse: torch.Tensor
    counters: torch.Tensor

    @property
    def num_splits(self) -> int:
        return self.partial_lse.shape[2]


class KVGroup(NamedTuple):
    """One head group of a layer for :func:`decode_attention_two_groups`.

    ``q_head_index`` (int, on the device) lists the model query heads of the group in cache order:
    entries ``[h * G, (h + 1) * G)`` are the query heads of the group's KV head ``h``. ``kv_head_index``
    (int, on the device) gives the model KV head of each cache head; it is needed only to append new
    K/V (``new_k``/``new_v`` are indexed by model KV head), and None means cache head h is model head h.
    """

    k_cache: torch.Tensor
    v_cache: torch.Tensor
    lengths: torch.Tensor
    starts: torch.Tensor | None
    q_head_index: torch.Tensor
    kv_head_index: torch.Tensor | None = None


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``tl.dot`` in fp32 accumulation; ``UPCAST`` works around Triton's interpreter, which
    multiplies bf16 operands as their raw uint16 bit patterns (only set when interpreting)."""
    if UPCAST:
        res = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        res = tl.dot(a, b, input_precision=PRECISION)
    return res


@triton.jit
def _combine_row(PartO, PartLse, Out, row, out_offset, num_splits, stride_od,
                 S_PAD: tl.constexpr, S_CHUNK: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr):
    """Merge the ``num_splits`` partials of workspace row ``row`` (= b * q_heads + head) into Out."""
    offs_d = tl.arange(0, D_PAD)
    base = row * num_splits
    # .cg: read from L2, never from a possibly stale L1 line (the fused path reads partials that
    # other programs wrote during this launch).
    offs_s = tl.arange(0, S_PAD)
    lse = tl.load(PartLse + base + offs_s, mask=offs_s < num_splits, other=float("-inf"),
                  cache_modifier=".cg")
    top = tl.max(lse, 0)
    top = tl.where(top > float("-inf"), top, 0.0)  # every split empty: weights all 0, output 0
    total = tl.sum(tl.where(lse > float("-inf"), tl.exp2(lse - top), 0.0), 0)
    # The [splits, D] fp32 partials go in chunks of S_CHUNK rows to bound register use (the fused
    # path shares registers with the main loop); the chunks are unrolled so their loads overlap.
    acc = tl.zeros([D_PAD], tl.float32)
    for s0 in tl.static_range(0, S_PAD, S_CHUNK):
        offs_c = s0 + tl.arange(0, S_CHUNK)
        lse_c = tl.load(PartLse + base + offs_c, mask=offs_c < num_splits, other=float("-inf"),
                        cache_modifier=".cg")
        valid = lse_c > float("-inf")
        weight = tl.where(valid, tl.exp2(lse_c - top), 0.0)
        # Rows of empty splits are not even read: they were never written.
        part = tl.load(PartO + (base + offs_c)[:, None] * D + offs_d[None, :],
                       mask=valid[:, None] & (offs_d < D)[None, :], other=0.0, cache_modifier=".cg")
        acc += tl.sum(part * weight[:, None], 0)
    res = acc / tl.where(total > 0, total, 1.0)
    tl.store(Out + out_offset + offs_d * stride_od, res.to(Out.dtype.element_ty), mask=offs_d < D)


@triton.jit
def _rotate(x, X, offs_rot, sign, cos, sin):
    """RoPE of ``x`` (loaded from ``X`` at the usual offsets) in the order of transformers' ``apply_rotary_pos_emb``:
    ``x * cos + rotate_half(x) * sin``, each product and the sum cast to the model dtype. The compiled kernel may
    still round differently in the last bit (tests/test_triton_decode.py). ``X + offs_rot`` loads ``x`` with its
    halves swapped; ``sign`` is -1 on the first half."""
    dtype = x.dtype
    rot = tl.load(X + offs_rot).to(tl.float32) * sign
    a = (x.to(tl.float32) * cos).to(dtype).to(tl.float32)
    b = (rot.to(dtype).to(tl.float32) * sin).to(dtype).to(tl.float32)
    return (a + b).to(dtype)


@triton.jit
def _split_kernel(
    Q, K, V, Lens, Starts, QIdx, PartO, PartLse, Out, Counters, NewK, NewV, KVIdx, Cos, Sin,
    stride_qb, stride_qh, stride_qd, stride_cb, stride_sb,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_od,
    stride_nkb, stride_nkh, stride_nvb, stride_nvh,
    kv_heads, q_heads, capacity, num_splits, ws_splits, qk_scale,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, S_PAD: tl.constexpr, S_CHUNK: tl.constexpr,
    HAS_STARTS: tl.constexpr, HAS_QIDX: tl.constexpr, FUSED_COMBINE: tl.constexpr,
    HAS_NEW: tl.constexpr, HAS_KVIDX: tl.constexpr, HAS_ROPE: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // kv_heads
    h = pid_bh % kv_heads
    b64 = b.to(tl.int64)

    # This program's share of the valid range, in whole blocks; depends on the device-side length
    # only, so the grid is fixed and the split sizes follow the fill.
    length = tl.minimum(tl.load(Lens + b).to(tl.int32), capacity)
    if HAS_NEW:  # the last slot is this step's token: split 0 writes it and attends to it from registers
        cached = length - 1
    else:
        cached = length
    if HAS_STARTS:
        start = tl.maximum(tl.load(Starts + b).to(tl.int32), 0)
    else:
        start = 0
    # Plain integer arithmetic, not tl.cdiv: a jit'd library function breaks the interpreter when
    # triton was imported before TRITON_INTERPRET was set.
    n_blocks = (tl.maximum(cached - start, 0) + BLOCK_N - 1) // BLOCK_N
    per_split = (n_blocks + num_splits - 1) // num_splits * BLOCK_N
    lo = start + split * per_split
    hi = tl.minimum(lo + per_split, cached)

    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    g_mask = offs_g < G
    if HAS_QIDX:
        qh = tl.load(QIdx + h * G + offs_g, mask=g_mask, other=0).to(tl.int64)
    else:
        qh = (h * G + offs_g).to(tl.int64)
    if D == D_PAD:
        q_mask = g_mask[:, None]
    else:
        q_mask = g_mask[:, None] & (offs_d < D)[None, :]
    q_rows = Q + b64 * stride_qb + qh[:, None] * stride_qh
    q = tl.load(q_rows + offs_d[None, :] * stride_qd, mask=q_mask, other=0.0)
    if HAS_ROPE:  # this step's q arrives unrotated: RoPE it here (one launch fewer per layer)
        d_rot = tl.where(offs_d < D // 2, offs_d + D // 2, offs_d - D // 2)
        d_rot = tl.where(offs_d < D, d_rot, 0)
        sign = tl.where(offs_d < D // 2, -1.0, 1.0)
        cos = tl.load(Cos + b64 * stride_cb + offs_d, mask=offs_d < D, other=0.0).to(tl.float32)
        sin = tl.load(Sin + b64 * stride_sb + offs_d, mask=offs_d < D, other=0.0).to(tl.float32)
        q = _rotate(q, q_rows, d_rot[None, :] * stride_qd, sign[None, :], cos[None, :], sin[None, :])
    q = q.to(K.dtype.element_ty)

    k_base = K + b64 * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + h.to(tl.int64) * stride_vh
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    if HAS_NEW:
        if split == 0:
            # Append in place (no other program of this launch reads slot `cached`), then start the
            # online softmax from the new key: m = its score, l = 1, acc = its value.
            if HAS_KVIDX:
                kv_head = tl.load(KVIdx + h).to(tl.int64)
            else:
                kv_head = h.to(tl.int64)
            d_mask = offs_d < D
            new_k_row = NewK + b64 * stride_nkb + kv_head * stride_nkh
            new_k = tl.load(new_k_row + offs_d, mask=d_mask, other=0.0)
            if HAS_ROPE:
                new_k = _rotate(new_k, new_k_row, d_rot, sign, cos, sin)
            new_v = tl.load(NewV + b64 * stride_nvb + kv_head * stride_nvh + offs_d, mask=d_mask, other=0.0)
            tl.store(k_base + cached.to(tl.int64) * stride_kn + offs_d, new_k.to(K.dtype.element_ty), mask=d_mask)
            tl.store(v_base + cached.to(tl.int64) * stride_vn + offs_d, new_v.to(V.dtype.element_ty), mask=d_mask)
            new_k = new_k.to(K.dtype.element_ty).to(tl.float32)
            m_i = tl.sum(q.to(tl.float32) * new_k[None, :], 1) * qk_scale
            l_i = tl.full([G_PAD], 1.0, tl.float32)
            acc = tl.zeros([G_PAD, D_PAD], tl.float32) + new_v.to(V.dtype.element_ty).to(tl.float32)[None, :]
    for n0 in range(lo, hi, BLOCK_N):
        offs = n0 + offs_n
        n_mask = offs < hi
        if D == D_PAD:  # keep the mask constant along D so loads stay 16-byte vectors
            kv_mask = n_mask[:, None]
        else:
            kv_mask = n_mask[:, None] & (offs_d < D)[None, :]
        k = tl.load(k_base + offs[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        qk = _dot(q, tl.trans(k), PRECISION, UPCAST) * qk_scale
        qk = tl.where(n_mask[None, :], qk, float("-inf"))
        # Every block holds at least one valid key, so m_new is finite and nothing becomes NaN.
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION, UPCAST)
        m_i = m_new

    seen = l_i > 0
    l_safe = tl.where(seen, l_i, 1.0)
    lse = tl.where(seen, m_i + tl.log2(l_safe), float("-inf"))
    rows = (b64 * q_heads + qh) * ws_splits + split
    tl.store(PartLse + rows, lse, mask=g_mask)
    if num_splits < ws_splits:
        # This group runs fewer splits than the workspace holds (another group of the layer runs more):
        # mark the rest empty so the combine skips them (an earlier layer may have left values there).
        if split == 0:
            offs_s = tl.arange(0, S_PAD)
            spare = (offs_s >= num_splits) & (offs_s < ws_splits)
            tl.store(PartLse + (b64 * q_heads + qh)[:, None] * ws_splits + offs_s[None, :], float("-inf"),
                     mask=g_mask[:, None] & spare[None, :])
    o_mask = (g_mask & seen)[:, None] & (offs_d < D)[None, :]
    tl.store(PartO + rows[:, None] * D + offs_d[None, :], acc / l_safe[:, None], mask=o_mask)

    if FUSED_COMBINE:
        # Last-arriving program merges. The barrier makes all threads' stores precede the
        # (acq_rel, gpu-scope) arrival, the usual split-K semaphore pattern.
        tl.debug_barrier()
        if HAS_QIDX:
            head0 = tl.load(QIdx + h * G).to(tl.int64)
        else:
            head0 = (h * G).to(tl.int64)
        counter = Counters + b64 * q_heads + head0
        arrived = tl.atomic_add(counter, 1)
        if arrived == num_splits - 1:
            tl.debug_barrier()
            for g in tl.static_range(G):
                if HAS_QIDX:
                    head = tl.load(QIdx + h * G + g).to(tl.int64)
                else:
                    head = (h * G + g).to(tl.int64)
                _combine_row(PartO, PartLse, Out, b64 * q_heads + head,
                             b64 * stride_ob + head * stride_oh, ws_splits, stride_od,
                             S_PAD, S_CHUNK, D, D_PAD)
            tl.atomic_xchg(counter, 0)  # ready for the next launch (graph replay)


@triton.jit
def _combine_kernel(PartO, PartLse, Out, q_heads, num_splits, stride_ob, stride_oh, stride_od,
                    S_PAD: tl.constexpr, S_CHUNK: tl.constexpr, D: tl.constexpr,
                    D_PAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b = row // q_heads
    head = row % q_heads
    _combine_row(PartO, PartLse, Out, row, b * stride_ob + head * stride_oh, num_splits, stride_od,
                 S_PAD, S_CHUNK, D, D_PAD)


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------

# True when TRITON_INTERPRET=1 was set before this module was imported (CPU tests).
_INTERPRETED = type(_split_kernel).__name__ == "InterpretedFunction"


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _side_stream(device_index: int) -> torch.cuda.Stream:
    """One side stream per device for :attr:`DecodeConfig.concurrent_groups`, created once (and so before
    any CUDA-graph capture that uses it)."""
    return torch.cuda.Stream(device_index)


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; the H200's 132 for non-CUDA devices."""
    if device.type != "cuda":
        return _H200_SMS
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def default_num_splits(batch: int, kv_heads: int, capacity: int, *, block_n: int = 64,
                       sms: int = _H200_SMS, programs_per_sm: float = 4,
                       min_blocks_per_split: int = 4) -> int:
    """Splits per KV head: about ``programs_per_sm`` programs per SM over the whole grid.

    Depends on shapes only (never on the current lengths), so a captured graph stays valid. Capped
    so that a full cache gives each split at least ``min_blocks_per_split`` blocks (the merge and the
    loop prologue are overhead) and by ``_MAX_SPLITS``.
    """
    splits = math.ceil(programs_per_sm * sms / max(batch * kv_heads, 1))
    splits = min(splits, math.ceil(capacity / (block_n * min_blocks_per_split)), _MAX_SPLITS)
    return max(splits, 1)


def make_workspace(batch: int, q_heads: int, head_dim: int, num_splits: int,
                   device: torch.device | str) -> DecodeWorkspace:
    """Allocate the scratch memory for ``num_splits`` splits (see :class:`DecodeWorkspace`)."""
    return DecodeWorkspace(
        partial_out=torch.empty(batch, q_heads, num_splits, head_dim, dtype=torch.float32, device=device),
        partial_lse=torch.empty(batch, q_heads, num_splits, dtype=torch.float32, device=device),
        counters=torch.zeros(batch, q_heads, dtype=torch.int32, device=device),
    )


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _check_cache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 lengths: torch.Tensor, starts: torch.Tensor | None) -> None:
    batch, _, dim = q.shape
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must be [B, H_kv, CAP, D] alike, got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if k_cache.shape[0] != batch or k_cache.shape[3] != dim:
        raise ValueError(f"cache {tuple(k_cache.shape)} does not match q {tuple(q.shape)}")
    if k_cache.dtype != v_cache.dtype:
        raise ValueError("k_cache and v_cache must have the same dtype")
    if k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("k_cache and v_cache need a contiguous head_dim (stride 1)")
    for name, t in (("lengths", lengths), ("starts", starts)):
        if t is None:
            continue
        if t.shape != (batch,) or t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be [B] int32/int64, got {tuple(t.shape)} {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on {q.device} (read by the kernel), not {t.device}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")


def _check_new(q: torch.Tensor, new_k: torch.Tensor | None, new_v: torch.Tensor | None, kv_heads: int) -> None:
    if (new_k is None) != (new_v is None):
        raise ValueError("give both new_k and new_v, or neither")
    if new_k is None:
        return
    expected = (q.shape[0], kv_heads, q.shape[2])
    for name, t in (("new_k", new_k), ("new_v", new_v)):
        if tuple(t.shape) != expected or t.stride(2) != 1 or t.device != q.device:
            raise ValueError(f"{name} must be {expected} on {q.device} with a contiguous last dim, got "
                             f"{tuple(t.shape)} with strides {t.stride()} on {t.device}")


def _check_rope(q: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    if rope is None:
        return
    if len(rope) != 2:
        raise ValueError("rope must be a (cos, sin) pair")
    expected = (q.shape[0], q.shape[2])
    if q.shape[2] % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {q.shape[2]}")
    for name, t in zip(("cos", "sin"), rope):
        if tuple(t.shape) != expected or t.stride(1) != 1 or t.device != q.device:
            raise ValueError(f"rope {name} must be {expected} on {q.device} with a contiguous last dim, got "
                             f"{tuple(t.shape)} with strides {t.stride()} on {t.device}")


def _prepare(q: torch.Tensor, num_splits: int, out: torch.Tensor | None,
             workspace: DecodeWorkspace | None) -> tuple[torch.Tensor, DecodeWorkspace]:
    """Check ``q``, and ``out`` and the workspace against it and ``num_splits`` (allocating either if missing)."""
    if q.dim() != 3:
        raise ValueError(f"q must be [B, H_q, D], got {tuple(q.shape)}")
    batch, q_heads, dim = q.shape
    if not 1 <= num_splits <= _MAX_SPLITS:
        raise ValueError(f"num_splits must be in [1, {_MAX_SPLITS}], got {num_splits}")
    if workspace is None:
        workspace = make_workspace(batch, q_heads, dim, num_splits, q.device)
    elif workspace.partial_out.shape != (batch, q_heads, num_splits, dim):
        raise ValueError(f"workspace is {tuple(workspace.partial_out.shape)}, needs "
                         f"{(batch, q_heads, num_splits, dim)}")
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape:
        raise ValueError(f"out must be {tuple(q.shape)}, got {tuple(out.shape)}")
    return out, workspace


def _fit_shared_memory(config: DecodeConfig, head_dim: int, element_size: int) -> tuple[int, int]:
    """``(block_n, num_stages)`` whose K/V pipeline buffers fit Hopper's 227 KB of shared memory:
    fewer stages first, then smaller blocks (only large head_dim with fp32 caches get here)."""
    block_n, stages = config.block_n, config.num_stages

    def need(bn: int, st: int) -> int:
        return 2 * bn * max(16, _next_pow2(head_dim)) * element_size * max(st - 1, 1) + (16 << 10)

    while need(block_n, stages) > (227 << 10) and stages > 2:
        stages -= 1
    while need(block_n, stages) > (227 << 10) and block_n > 16:
        block_n //= 2
    return block_n, stages


def _launch_split(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  lengths: torch.Tensor, starts: torch.Tensor | None,
                  q_head_index: torch.Tensor | None, group_size: int, out: torch.Tensor,
                  ws: DecodeWorkspace, num_splits: int, scale: float, config: DecodeConfig,
                  new_k: torch.Tensor | None = None, new_v: torch.Tensor | None = None,
                  kv_head_index: torch.Tensor | None = None, rope: tuple[torch.Tensor, torch.Tensor] | None = None
                  ) -> None:
    batch, kv_heads, capacity, dim = k_cache.shape
    q_heads = q.shape[1]
    block_n, num_stages = _fit_shared_memory(config, dim, k_cache.element_size())
    grid = (batch * kv_heads, num_splits)
    has_new = new_k is not None
    _split_kernel[grid](
        q, k_cache, v_cache, lengths, starts if starts is not None else lengths,
        q_head_index if q_head_index is not None else lengths,
        ws.partial_out, ws.partial_lse, out, ws.counters,
        new_k if has_new else q, new_v if has_new else q,
        kv_head_index if kv_head_index is not None else lengths,
        *(rope if rope is not None else (q, q)),
        q.stride(0), q.stride(1), q.stride(2), *(t.stride(0) for t in rope or (q, q)),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        *(new_k.stride()[:2] if has_new else (0, 0)), *(new_v.stride()[:2] if has_new else (0, 0)),
        kv_heads, q_heads, capacity, num_splits, ws.num_splits, scale * _LOG2E,
        G=group_size, G_PAD=max(16, _next_pow2(group_size)), D=dim, D_PAD=max(16, _next_pow2(dim)),
        BLOCK_N=block_n, S_PAD=_next_pow2(ws.num_splits),
        S_CHUNK=min(_next_pow2(ws.num_splits), _S_CHUNK),
        HAS_STARTS=starts is not None, HAS_QIDX=q_head_index is not None,
        FUSED_COMBINE=config.fused_combine, HAS_NEW=has_new, HAS_KVIDX=kv_head_index is not None,
        HAS_ROPE=rope is not None,
        PRECISION="ieee" if k_cache.dtype == torch.float32 else "tf32",
        UPCAST=_INTERPRETED and k_cache.dtype == torch.bfloat16,
        num_warps=config.num_warps, num_stages=num_stages,
    )


def _launch_combine(out: torch.Tensor, ws: DecodeWorkspace) -> None:
    batch, q_heads, dim = out.shape
    num_splits = ws.num_splits
    s_pad = _next_pow2(num_splits)
    _combine_kernel[(batch * q_heads,)](
        ws.partial_out, ws.partial_lse, out, q_heads, num_splits,
        out.stride(0), out.stride(1), out.stride(2),
        S_PAD=s_pad, S_CHUNK=min(s_pad, _S_CHUNK), D=dim, D_PAD=max(16, _next_pow2(dim)),
        num_warps=4,
    )


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     lengths: torch.Tensor, starts: torch.Tensor | None = None,
                     scale: float | None = None, num_splits: int | None = None,
                     out: torch.Tensor | None = None, *, config: DecodeConfig | None = None,
                     workspace: DecodeWorkspace | None = None, new_k: torch.Tensor | None = None,
                     new_v: torch.Tensor | None = None,
                     rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Attention of one new query per sequence over a dense KV cache; returns ``[B, H_q, D]``.

    ``q`` ``[B, H_q, D]`` (query heads ``h*G .. h*G+G-1`` belong to KV head ``h``);
    ``k_cache``/``v_cache`` ``[B, H_kv, CAP, D]`` (head_dim contiguous); ``lengths`` ``[B]`` int32 on
    the device: slots ``[starts[b], lengths[b])`` are attended (``starts`` None means 0). A sequence
    with no valid slot gets a zero output. ``num_splits`` None picks :func:`default_num_splits`
    from shapes (or the workspace's). No host sync and no allocation when ``out`` and ``workspace``
    are given: safe to capture in a CUDA graph. Launches 2 kernels (1 with ``fused_combine``).

    With ``new_k``/``new_v`` ``[B, H_kv, D]`` (this step's token, any strides with a contiguous last
    dim), the kernel also appends: it writes them into slot ``lengths[b] - 1`` and attends to them from
    registers, so that slot's old content is never read (no separate copy kernel before the call).

    With ``rope = (cos, sin)``, each ``[B, D]`` (this step's position), ``q`` and ``new_k`` arrive without RoPE and
    the kernel applies it as transformers' ``apply_rotary_pos_emb`` does (``x * cos + rotate_half(x) * sin`` in the
    model dtype, equal to it up to the last bit) before use; the cache receives the rotated key.
    """
    config = config or DEFAULT_CONFIG
    _check_cache(q, k_cache, v_cache, lengths, starts)
    _check_new(q, new_k, new_v, k_cache.shape[1])
    _check_rope(q, rope)
    batch, kv_heads, capacity, dim = k_cache.shape
    if q.shape[1] % kv_heads:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {kv_heads} KV heads")
    if num_splits is None:
        num_splits = workspace.num_splits if workspace is not None else default_num_splits(
            batch, kv_heads, capacity, block_n=config.block_n, sms=sm_count(q.device),
            programs_per_sm=config.programs_per_sm)
    out, ws = _prepare(q, num_splits, out, workspace)
    scale = dim ** -0.5 if scale is None else scale
    _launch_split(q, k_cache, v_cache, lengths, starts, None, q.shape[1] // kv_heads, out, ws,
                  num_splits, scale, config, new_k, new_v, rope=rope)
    if not config.fused_combine:
        _launch_combine(out, ws)
    return out


def group_num_splits(k_caches: Sequence[torch.Tensor], config: DecodeConfig = DEFAULT_CONFIG,
                     sms: int = _H200_SMS) -> list[int]:
    """:func:`default_num_splits` of each head group's cache on its own, with ``config``'s tile and
    programs per SM: a narrow group (CateKV's adaptive heads of a layer) gets more splits, so that its
    launch still spreads over every SM, and a short one (the consistent heads' budget) fewer, so that its
    splits are not mostly empty."""
    return [default_num_splits(k.shape[0], k.shape[1], k.shape[2], block_n=config.block_n, sms=sms,
                               programs_per_sm=config.programs_per_sm) for k in k_caches]


def decode_attention_two_groups(q: torch.Tensor, groups: Sequence[KVGroup | tuple],
                                scale: float | None = None, out: torch.Tensor | None = None, *,
                                num_splits: int | Sequence[int] | None = None, config: DecodeConfig | None = None,
                                workspace: DecodeWorkspace | None = None, new_k: torch.Tensor | None = None,
                                new_v: torch.Tensor | None = None,
                                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Decode attention of a layer whose KV heads live in several caches (CateKV's head groups).

    ``groups`` are ``(k_cache, v_cache, lengths, starts, q_head_index)`` (see :class:`KVGroup`);
    their ``q_head_index`` must together cover every query head of ``q`` exactly once (not checked
    on the device values: that would need a host sync). Each group runs the split kernel into one
    shared workspace indexed by model query head, then one combine writes every head of ``out`` in
    place, so nothing is scattered afterwards. ``num_splits``: one count for every group, one per group,
    or None for :func:`group_num_splits` (each capped by the workspace's, when one is given); the
    workspace holds the largest. Launches ``len(groups) + 1`` kernels
    (``len(groups)`` with ``fused_combine``). ``new_k``/``new_v`` ``[B, H_kv_model, D]`` append this step's
    token to every group as in :func:`decode_attention` (each group picks its heads by ``kv_head_index``);
    ``rope`` as there.
    """
    config = config or DEFAULT_CONFIG
    groups = [KVGroup(*g) for g in groups]
    if not groups:
        raise ValueError("need at least one group")
    total = 0
    for g in groups:
        _check_cache(q, g.k_cache, g.v_cache, g.lengths, g.starts)
        kv_heads = g.k_cache.shape[1]
        if g.q_head_index.dim() != 1 or g.q_head_index.numel() % kv_heads:
            raise ValueError(f"q_head_index of {g.q_head_index.numel()} entries does not fit "
                             f"{kv_heads} KV heads")
        if g.q_head_index.device != q.device:
            raise ValueError("q_head_index must be on the device of q")
        total += g.q_head_index.numel()
    if total != q.shape[1]:
        raise ValueError(f"groups cover {total} query heads, q has {q.shape[1]}")
    if new_k is not None and len(groups) > 1 and any(g.kv_head_index is None for g in groups):
        raise ValueError("appending new K/V to several groups needs each group's kv_head_index")
    _check_new(q, new_k, new_v, sum(g.k_cache.shape[1] for g in groups))
    _check_rope(q, rope)
    if num_splits is None:
        splits = group_num_splits([g.k_cache for g in groups], config, sm_count(q.device))
        if workspace is not None:
            splits = [min(s, workspace.num_splits) for s in splits]
    elif isinstance(num_splits, int):
        splits = [num_splits] * len(groups)
    else:
        splits = list(num_splits)
        if len(splits) != len(groups):
            raise ValueError(f"num_splits has {len(splits)} entries for {len(groups)} groups")
    out, ws = _prepare(q, workspace.num_splits if workspace is not None else max(splits), out, workspace)
    if any(not 1 <= s <= ws.num_splits for s in splits):
        raise ValueError(f"num_splits {splits} must each be in [1, {ws.num_splits}] (the workspace's)")
    scale = q.shape[2] ** -0.5 if scale is None else scale

    def launch(g: KVGroup, group_splits: int) -> None:
        group_size = g.q_head_index.numel() // g.k_cache.shape[1]
        _launch_split(q, g.k_cache, g.v_cache, g.lengths, g.starts, g.q_head_index, group_size,
                      out, ws, group_splits, scale, config, new_k, new_v, g.kv_head_index, rope)

    if config.concurrent_groups and q.is_cuda and len(groups) > 1:
        main = torch.cuda.current_stream(q.device)
        side = _side_stream(q.device.index if q.device.index is not None else torch.cuda.current_device())
        side.wait_stream(main)  # the side branch starts after this layer's q and K/V exist
        with torch.cuda.stream(side):
            for g, group_splits in zip(groups[1:], splits[1:]):
                launch(g, group_splits)
        launch(groups[0], splits[0])
        main.wait_stream(side)  # the combine (and the caller) see every group's partials
    else:
        for g, group_splits in zip(groups, splits):
            launch(g, group_splits)
    if not config.fused_combine:
        _launch_combine(out, ws)
    return out


def decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               lengths: torch.Tensor, starts: torch.Tensor | None = None,
                               scale: float | None = None) -> torch.Tensor:
    """Plain-PyTorch float32 reference of :func:`decode_attention` (slow; for tests)."""
    batch, q_heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    group = q_heads // kv_heads
    scale = dim ** -0.5 if scale is None else scale
    out = torch.zeros(batch, q_heads, dim, dtype=torch.float32, device=q.device)
    for b in range(batch):
        lo = 0 if starts is None else max(int(starts[b]), 0)
        hi = min(int(lengths[b]), k_cache.shape[2])
        if hi <= lo:
            continue
        k = k_cache[b, :, lo:hi].float()  # [H_kv, n, D]
        v = v_cache[b, :, lo:hi].float()
        qb = q[b].float().view(kv_heads, group, dim)
        probs = torch.softmax(qb @ k.transpose(1, 2) * scale, dim=-1)  # [H_kv, G, n]
        out[b] = (probs @ v).reshape(q_heads, dim)
    return out.to(q.dtype)
