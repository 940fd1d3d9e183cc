"""The batched decode step's row kernels (RMSNorm with its residual add, SiLU-gating) against transformers' Llama
modules and PyTorch's ops.

Without CUDA the kernels run in Triton's interpreter on CPU (conftest.py sets TRITON_INTERPRET=1), in float32; on a
GPU the tests add bfloat16, where only the order of the float32 sum of squares may move a value by one unit in the
last place.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from catekv_runtime.kernels import triton_norm  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def _rand(*shape: int, dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g)).to(dtype=dtype, device=DEVICE)


def _close(got: torch.Tensor, expected: torch.Tensor) -> None:
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    else:  # one bf16 ulp at most, from the order of the sum of squares
        torch.testing.assert_close(got.float(), expected.float(), rtol=2 ** -7, atol=1e-3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [96, 4096])  # not a power of two (a masked tail); Llama-3-8B's
def test_rms_norm_with_and_without_the_residual_add_equals_llama_rmsnorm(dtype: torch.dtype, hidden: int) -> None:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(hidden, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.2)
    norm = norm.to(DEVICE, dtype)
    x, residual = _rand(5, hidden, dtype=dtype, seed=1), _rand(5, hidden, dtype=dtype, seed=2, scale=3.0)
    with torch.no_grad():
        normed, same = triton_norm.rms_norm(x, norm.weight, 1e-5)
        _close(normed, norm(x))
        assert same is x
        normed, summed = triton_norm.rms_norm(x, norm.weight, 1e-5, residual=residual)
        assert torch.equal(summed, x + residual)  # rounded to the dtype as PyTorch's add
        _close(normed, norm(x + residual))
    assert torch.equal(x, _rand(5, hidden, dtype=dtype, seed=1))  # the inputs are left as they were


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_equals_the_llama_mlp_activation(dtype: torch.dtype) -> None:
    inter = 1500  # two blocks of 1024, the second masked
    gate_up = _rand(3, 2 * inter, dtype=dtype, seed=3, scale=4.0)
    gate, up = gate_up.chunk(2, dim=-1)
    _close(triton_norm.silu_mul(gate_up), F.silu(gate) * up)


def test_rows_must_be_contiguous() -> None:
    x = _rand(4, 8, dtype=torch.float32, seed=0)
    with pytest.raises(ValueError, match="rows are contiguous"):
        triton_norm.rms_norm(x.t(), torch.ones(4, device=DEVICE), 1e-5)
    with pytest.raises(ValueError, match=r"\[rows, 2 \* inter\]"):
        triton_norm.silu_mul(x[:, :7])
