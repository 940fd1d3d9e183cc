"""catekv_runtime.attention.chunk_attention: a prompt chunk's causal attention, against one SDPA call with the
bottom-right causal mask (the independent reference) and against full causal attention over the whole prompt."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from catekv_runtime import attention
from conftest import requires_cuda


def _qkv(length: int, q_heads: int, kv_heads: int, dim: int, dtype: torch.dtype, device: str = "cpu", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, q_heads, length, dim, generator=g).to(device, dtype)
    k = torch.randn(2, kv_heads, length, dim, generator=g).to(device, dtype)
    v = torch.randn(2, kv_heads, length, dim, generator=g).to(device, dtype)
    return q, k, v


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2)], ids=["mha", "gqa"])
def test_chunks_make_up_causal_attention_over_the_prompt(split: bool, heads: tuple[int, int]) -> None:
    """Chunks of uneven sizes, each over the keys up to its own, give the whole prompt's causal attention; the
    two-call form (earlier keys unmasked + own keys causal, merged by log-sum-exp) included."""
    q, k, v = _qkv(150, *heads, 16, torch.float32)
    scale = 0.3
    whole = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    for start, end in ((0, 40), (40, 41), (41, 100), (100, 150)):
        # Keys past the chunk are garbage that must never be read.
        keys, values = k.clone(), v.clone()
        keys[:, :, end:], values[:, :, end:] = 1e4, float("nan")
        got = attention.chunk_attention(q[:, :, start:end], keys, values, start, scale, split=split)
        torch.testing.assert_close(got, whole[:, :, start:end], atol=1e-5, rtol=1e-5)


def test_cpu_never_splits() -> None:
    q, k, _ = _qkv(8, 4, 2, 16, torch.float32)
    assert not attention._cudnn_can_split(q, k)


@requires_cuda
@pytest.mark.parametrize("length", [8192 + 77])
def test_gpu_chunk_attention_runs_on_cudnn_at_llama_shapes(length: int) -> None:
    """On CUDA at Llama-3-8B head shapes in bf16 the two cuDNN calls are taken, and they agree with SDPA's
    bottom-right causal attention (flash) to bf16 rounding."""
    q, k, v = _qkv(length, 32, 8, 128, torch.bfloat16, "cuda", seed=3)
    start = 4096
    chunk = q[:, :, start:]
    assert attention._cudnn_can_split(chunk, k)
    got = attention.chunk_attention(chunk, k, v, start, 128 ** -0.5)
    ref = attention.chunk_attention(chunk, k, v, start, 128 ** -0.5, split=False)
    torch.testing.assert_close(got.float(), ref.float(), atol=2e-2, rtol=2e-2)
    assert (got.float() - ref.float()).abs().mean() < 1e-3
