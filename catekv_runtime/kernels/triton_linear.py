"""One token's linear layers as single Triton kernels, with the decode step's small ops fused in.

At batch 1 a decode step's projections are GEMVs: each reads its weight once and does almost no
arithmetic, so their time is the weight bytes over the memory bandwidth plus, per layer, the launches
of the small kernels around them (RMSNorm before q/k/v and before the MLP, SiLU x up, the residual
adds). :func:`fused_linear` does one projection in one launch and takes those neighbours with it:

    y = residual + (rmsnorm(x) * norm_weight) @ W.T + bias            (each part optional)
    y = silu(x' @ W_gate.T) * (x' @ W_up.T)       with glu=True and W = [W_gate; W_up]

Each program owns ``block_n`` output rows and walks the whole input dimension in ``block_k`` columns,
keeping a ``[block_n, block_k]`` fp32 partial product in registers and reducing it once at the end; the
RMSNorm statistic of the (8-32 KB) input vector is recomputed by every program, which costs a read from
L2, not a second launch. Rounding follows the transformers modules it replaces: the normalised input is
cast to the model dtype before the norm weight multiplies it, each projection's output is rounded before
SiLU, the product and the residual add.

Batch 1 only (one input row): that is the latency-bound case of the engine's decode step of a single request;
larger batches keep cuBLAS, which reuses each weight tile across rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .triton_decode import sm_count


@dataclass(frozen=True)
class LinearConfig:
    """Tile of one program: ``block_n`` output rows x ``block_k`` input columns per loop step."""

    block_n: int = 8
    block_k: int = 512
    num_warps: int = 4


def default_linear_config(n_out: int, k_dim: int, sms: int, glu: bool = False) -> LinearConfig:
    """Tiles chosen by ``benchmarks/linear_decode.py --sweep`` at Llama-3-8B's shapes (results in
    docs/results/linear_sweep.json and docs/benchmarks.md): 16 rows x 1024 columns with 8 warps in general
    (o_proj, down); 16 x 512 for outputs of more than two 16-row programs per SM (q/k/v); 4 x 256 with 2 warps
    for SiLU-gating, which reads two tiles per step; 16 x 256 for very wide outputs (lm_head). Narrow outputs
    get fewer rows per program, so that every SM still gets one."""
    if glu:
        block_n, block_k, warps = 4, 256, 2
    elif n_out >= 16 * sms * 32:
        block_n, block_k, warps = 16, 256, 4
    elif n_out > 16 * sms * 2:
        block_n, block_k, warps = 16, 512, 8
    else:
        block_n, block_k, warps = 16, 1024, 8
    while block_n > 1 and -(-n_out // block_n) < sms:
        block_n //= 2
    return LinearConfig(block_n=block_n, block_k=min(block_k, triton.next_power_of_2(k_dim)), num_warps=warps)


@triton.jit
def _scale(norm_weight, x, rstd):
    """``norm_weight * (x * rstd).to(dtype)``, rounded once like that product in the model dtype (the product of
    two bf16 values is exact in fp32; Triton's interpreter cannot multiply bf16 directly)."""
    dtype = x.dtype
    return (norm_weight.to(tl.float32) * (x.to(tl.float32) * rstd).to(dtype).to(tl.float32)).to(dtype)


@triton.jit
def _linear_kernel(X, W, Bias, Residual, NormWeight, Out, n_out, k_dim, up_offset, stride_w, eps,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                   HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_NORM: tl.constexpr,
                   GLU: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_out
    rows = tl.where(row_mask, rows, 0)  # the last program's spare rows read row 0 and are not stored
    offs_k = tl.arange(0, BLOCK_K)
    dtype = X.dtype.element_ty

    rstd = 1.0
    if HAS_NORM:  # RMSNorm statistic of the whole input row, in fp32 like transformers' RMSNorm
        squares = tl.zeros([BLOCK_K], tl.float32)
        for k0 in range(0, k_dim, BLOCK_K):
            if EVEN_K:
                xk = tl.load(X + k0 + offs_k).to(tl.float32)
            else:
                xk = tl.load(X + k0 + offs_k, mask=k0 + offs_k < k_dim, other=0.0).to(tl.float32)
            squares += xk * xk
        rstd = 1.0 / tl.sqrt(tl.sum(squares, 0) / k_dim + eps)

    w_rows = W + rows.to(tl.int64)[:, None] * stride_w
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    acc_up = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, k_dim, BLOCK_K):
        offs = k0 + offs_k
        if EVEN_K:
            x = tl.load(X + offs)
            if HAS_NORM:
                x = _scale(tl.load(NormWeight + offs), x, rstd)
            w = tl.load(w_rows + offs[None, :])
            if GLU:
                w_up = tl.load(w_rows + up_offset * stride_w + offs[None, :])
        else:
            k_mask = offs < k_dim
            x = tl.load(X + offs, mask=k_mask, other=0.0)
            if HAS_NORM:
                x = _scale(tl.load(NormWeight + offs, mask=k_mask, other=0.0), x, rstd)
            w = tl.load(w_rows + offs[None, :], mask=k_mask[None, :], other=0.0)
            if GLU:
                w_up = tl.load(w_rows + up_offset * stride_w + offs[None, :], mask=k_mask[None, :], other=0.0)
        x = x.to(tl.float32)[None, :]
        acc += w.to(tl.float32) * x
        if GLU:
            acc_up += w_up.to(tl.float32) * x

    y = tl.sum(acc, 1)
    if HAS_BIAS:
        y += tl.load(Bias + rows).to(tl.float32)
    if GLU:
        gate = y.to(dtype).to(tl.float32)
        up = tl.sum(acc_up, 1)
        if HAS_BIAS:
            up += tl.load(Bias + up_offset + rows).to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
        y = act * up.to(dtype).to(tl.float32)
    if HAS_RESIDUAL:
        y = tl.load(Residual + rows).to(tl.float32) + y.to(dtype).to(tl.float32)
    tl.store(Out + rows, y.to(Out.dtype.element_ty), mask=row_mask)


def _vector(t: torch.Tensor, size: int, name: str) -> torch.Tensor:
    if t.numel() != size or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous tensor of {size} elements (batch 1), got "
                         f"{tuple(t.shape)} with strides {t.stride()}")
    return t


def fused_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                 residual: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None,
                 eps: float = 1e-6, glu: bool = False, out: torch.Tensor | None = None,
                 config: LinearConfig | None = None) -> torch.Tensor:
    """One input row through a linear layer, with optional RMSNorm before and SiLU-gating / residual after.

    ``x`` holds one row of ``K`` elements (any shape ``[..., K]`` with ``K`` elements in all);
    ``weight`` is ``[N, K]`` with a contiguous last dim (``[2N, K]``, gate rows then up rows, with
    ``glu=True``); ``bias`` ``[N]`` (``[2N]``). ``norm_weight`` ``[K]`` applies transformers' RMSNorm with
    ``eps`` to ``x`` first; ``residual`` (``N`` elements) is added last. Returns ``[..., N]`` (``x``'s
    leading dims), in ``x``'s dtype. One kernel launch, no host sync: safe inside a CUDA graph.
    """
    k_dim = x.shape[-1]
    _vector(x, k_dim, "x")
    if weight.dim() != 2 or weight.shape[1] != k_dim or weight.stride(1) != 1:
        raise ValueError(f"weight must be [N, {k_dim}] with a contiguous last dim, got {tuple(weight.shape)}")
    rows = weight.shape[0]
    if glu and rows % 2:
        raise ValueError(f"glu needs the gate and up rows stacked ([2N, K]), got {rows} rows")
    n_out = rows // 2 if glu else rows
    for name, t, size in (("bias", bias, rows), ("norm_weight", norm_weight, k_dim), ("residual", residual, n_out)):
        if t is not None:
            _vector(t, size, name)
            if t.device != x.device:
                raise ValueError(f"{name} is on {t.device}, x on {x.device}")
    if weight.device != x.device or weight.dtype != x.dtype:
        raise ValueError(f"weight is {weight.dtype} on {weight.device}, x {x.dtype} on {x.device}")
    if out is None:
        out = x.new_empty(*x.shape[:-1], n_out)
    else:
        _vector(out, n_out, "out")
    if config is None:  # the interpreter (CPU) runs programs one at a time: there, few large ones
        config = default_linear_config(n_out, k_dim, sm_count(x.device), glu) if x.is_cuda else LinearConfig(
            block_n=16, block_k=min(512, triton.next_power_of_2(k_dim)))
    grid = (triton.cdiv(n_out, config.block_n),)
    _linear_kernel[grid](
        x, weight, bias if bias is not None else x, residual if residual is not None else x,
        norm_weight if norm_weight is not None else x, out, n_out, k_dim, n_out, weight.stride(0), eps,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, EVEN_K=k_dim % config.block_k == 0,
        HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, HAS_NORM=norm_weight is not None,
        GLU=glu, num_warps=config.num_warps,
    )
    return out


def fused_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                           residual: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None,
                           eps: float = 1e-6, glu: bool = False) -> torch.Tensor:
    """Plain-PyTorch :func:`fused_linear`, op by op as transformers' Llama modules do it (for tests)."""
    if norm_weight is not None:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = norm_weight * (x.float() * torch.rsqrt(variance + eps)).to(x.dtype)
    y = torch.nn.functional.linear(x, weight, bias)
    if glu:
        gate, up = y.chunk(2, dim=-1)
        y = torch.nn.functional.silu(gate) * up
    return y if residual is None else residual + y

