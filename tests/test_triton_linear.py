"""The fused one-token linear kernel against transformers' modules, op by op.

Without CUDA the kernel runs in Triton's interpreter on CPU (conftest.py sets TRITON_INTERPRET=1), in
float32; the GPU test adds bf16 at Llama-3-8B sizes.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from catekv_runtime.kernels import triton_linear as tl_  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _rand(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g)).to(dtype=dtype, device=DEVICE)


def _modules(hidden: int, inter: int, dtype: torch.dtype):
    """A Llama RMSNorm and MLP from transformers, with random weights: the independent reference."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, rms_norm_eps=1e-5)
    torch.manual_seed(3)
    norm, mlp = LlamaRMSNorm(hidden, eps=1e-5), LlamaMLP(config)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.2)
    return norm.to(DEVICE, dtype), mlp.to(DEVICE, dtype)


# Shapes that are not multiples of the tiles: a partial last row block and a masked K tail.
CONFIGS = [tl_.LinearConfig(block_n=4, block_k=32), tl_.LinearConfig(block_n=8, block_k=64, num_warps=2)]


@pytest.mark.parametrize("config", CONFIGS, ids=["bn4-bk32", "bn8-bk64"])
def test_norm_glu_and_residual_equal_the_llama_mlp(config: tl_.LinearConfig) -> None:
    hidden, inter = 96, 150
    norm, mlp = _modules(hidden, inter, torch.float32)
    x = _rand(1, 1, hidden, seed=1)
    residual = _rand(1, 1, hidden, seed=2)
    gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
    with torch.no_grad():
        normed = norm(x)
        expected_act = mlp.act_fn(mlp.gate_proj(normed)) * mlp.up_proj(normed)
        expected = residual + mlp.down_proj(expected_act)
    act = tl_.fused_linear(x, gate_up, norm_weight=norm.weight, eps=norm.variance_epsilon, glu=True, config=config)
    assert act.shape == (1, 1, inter)
    torch.testing.assert_close(act, expected_act, rtol=1e-5, atol=1e-5)
    out = tl_.fused_linear(act, mlp.down_proj.weight, residual=residual, config=config)
    assert out.shape == residual.shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", CONFIGS + [None], ids=["bn4-bk32", "bn8-bk64", "default"])
def test_plain_and_biased_projection(config: tl_.LinearConfig | None) -> None:
    x = _rand(200, seed=4)
    weight, bias = _rand(77, 200, seed=5), _rand(77, seed=6)
    torch.testing.assert_close(tl_.fused_linear(x, weight, config=config), x @ weight.T, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(tl_.fused_linear(x, weight, bias, config=config), x @ weight.T + bias,
                               rtol=1e-5, atol=1e-4)
    gate_up_bias = _rand(154, seed=7)
    gate_up = _rand(154, 200, seed=8)
    expected = tl_.fused_linear_reference(x, gate_up, gate_up_bias, glu=True)
    got = tl_.fused_linear(x, gate_up, gate_up_bias, glu=True, config=config)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


def test_out_buffer_and_strided_weight_rows() -> None:
    x = _rand(64, seed=9)
    storage = _rand(40, 80, seed=10)
    weight = storage[:, :64]  # rows 80 apart: only the last dim has to be contiguous
    out = torch.full((40,), float("nan"), device=DEVICE)
    assert tl_.fused_linear(x, weight, out=out, config=CONFIGS[0]) is out
    torch.testing.assert_close(out, x @ weight.T, rtol=1e-5, atol=1e-4)


def test_bad_input_is_refused() -> None:
    x, weight = _rand(2, 64), _rand(8, 64)
    with pytest.raises(ValueError, match="batch 1"):
        tl_.fused_linear(x, weight)
    with pytest.raises(ValueError, match=r"weight must be \[N, 64\]"):
        tl_.fused_linear(x[0], weight[:, :32])
    with pytest.raises(ValueError, match="glu"):
        tl_.fused_linear(x[0], weight[:7], glu=True)
    with pytest.raises(ValueError, match="residual"):
        tl_.fused_linear(x[0], weight, residual=_rand(4))
    with pytest.raises(ValueError, match="weight is"):
        tl_.fused_linear(x[0], weight.double())


def test_default_config_fills_the_gpu() -> None:
    sms = 132
    for n_out, glu in ((4096, False), (6144, False), (14336, True), (128256, False), (64, False)):
        config = tl_.default_linear_config(n_out, 4096, sms, glu)
        assert -(-n_out // config.block_n) >= sms or config.block_n == 1
    assert tl_.default_linear_config(128256, 4096, sms) == tl_.LinearConfig(16, 256, 4)
    assert tl_.default_linear_config(14336, 4096, sms, glu=True) == tl_.LinearConfig(4, 256, 2)
    assert tl_.default_linear_config(4096, 14336, sms) == tl_.LinearConfig(16, 1024, 8)
    assert tl_.default_linear_config(6144, 4096, sms) == tl_.LinearConfig(16, 512, 8)  # Llama-3-8B q/k/v
    assert tl_.default_linear_config(4096, 100, sms).block_k == 128


@requires_cuda
def test_gpu_llama_8b_sizes_bf16() -> None:
    """bf16 at Llama-3-8B sizes on the GPU against the transformers modules (cuBLAS) in bf16."""
    norm, mlp = _modules(4096, 14336, torch.bfloat16)
    x = _rand(1, 1, 4096, dtype=torch.bfloat16, seed=11)
    residual = _rand(1, 1, 4096, dtype=torch.bfloat16, seed=12)
    gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
    with torch.no_grad():
        normed = norm(x)
        expected_act = mlp.act_fn(mlp.gate_proj(normed)) * mlp.up_proj(normed)
        expected = residual + mlp.down_proj(expected_act)
    act = tl_.fused_linear(x, gate_up, norm_weight=norm.weight, eps=norm.variance_epsilon, glu=True)
    out = tl_.fused_linear(act, mlp.down_proj.weight, residual=residual)
    for got, want in ((act, expected_act), (out, expected)):
        err = ((got.float() - want.float()).norm() / want.float().norm()).item()
        assert err < 1e-2, err
