"""The decode step's row-wise ops for several rows, one Triton launch each: RMSNorm (with the residual add before
it) and SiLU-gating.

With more than one row decoding, the projections stay cuBLAS GEMMs (each weight tile serves every row); what is
left around them are small ops that PyTorch runs as several kernels each (RMSNorm alone is a cast, a square, a
mean, an add, a reciprocal square root, two products and a cast back), and inside the step's CUDA graph every
launch costs its fixed latency. Here each of them is one program per row:

    h = x + residual                     (optional, rounded to the dtype as PyTorch's add is)
    y = (h * rsqrt(mean(h^2) + eps)).to(dtype) * weight          (Llama's RMSNorm, float32 inside)
    a = silu(gate).to(dtype) * up        (gate_up = [gate | up] along the last dimension)

Rounding follows the PyTorch code it replaces (:meth:`catekv_runtime.engine.model.DecoderModel.rms_norm`,
``F.silu(gate) * up``); only the order of the float32 sum of squares differs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, summed_ptr, n_cols, stride_x, stride_r, stride_o,
                     stride_s, eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(summed_ptr + row * stride_s + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    variance = tl.sum(x32 * x32, axis=0) / n_cols
    normed = (x32 * tl.rsqrt(variance + eps)).to(x.dtype)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_o + cols, (normed.to(tl.float32) * weight.to(tl.float32)).to(x.dtype), mask=mask)


@triton.jit
def _silu_mul_kernel(gate_up_ptr, out_ptr, n_cols, stride_in, stride_out, BLOCK: tl.constexpr):
    row, block = tl.program_id(0), tl.program_id(1)
    cols = block * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(gate_up_ptr + row * stride_in + cols, mask=mask, other=0.0)
    up = tl.load(gate_up_ptr + row * stride_in + n_cols + cols, mask=mask, other=0.0)
    g32 = gate.to(tl.float32)
    silu = (g32 / (1.0 + tl.exp(-g32))).to(gate.dtype)
    tl.store(out_ptr + row * stride_out + cols, (silu.to(tl.float32) * up.to(tl.float32)).to(gate.dtype), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of the rows of ``x`` ``[rows, hidden]`` (of ``x + residual`` when ``residual`` is given): returns the
    normalised rows and the rows normalised (``x`` itself, or the new sum)."""
    if x.dim() != 2 or x.stride(-1) != 1 or (residual is not None and residual.stride(-1) != 1):
        raise ValueError("rms_norm takes [rows, hidden] tensors whose rows are contiguous")
    rows, n_cols = x.shape
    out = torch.empty_like(x)
    summed = torch.empty_like(x) if residual is not None else x
    other = residual if residual is not None else x
    _rms_norm_kernel[(rows,)](x, other, weight, out, summed, n_cols, x.stride(0), other.stride(0), out.stride(0),
                              summed.stride(0), eps, HAS_RESIDUAL=residual is not None,
                              BLOCK=triton.next_power_of_2(n_cols), num_warps=8 if n_cols >= 4096 else 4)
    return out, summed


def silu_mul(gate_up: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """``silu(gate) * up`` of rows ``gate_up`` ``[rows, 2 * inter]`` (gate first): ``[rows, inter]``."""
    if gate_up.dim() != 2 or gate_up.stride(-1) != 1 or gate_up.shape[1] % 2:
        raise ValueError("silu_mul takes [rows, 2 * inter] tensors whose rows are contiguous")
    rows, n_cols = gate_up.shape[0], gate_up.shape[1] // 2
    out = gate_up.new_empty(rows, n_cols)
    _silu_mul_kernel[(rows, triton.cdiv(n_cols, block))](gate_up, out, n_cols, gate_up.stride(0), out.stride(0),
                                                         BLOCK=block)
    return out
