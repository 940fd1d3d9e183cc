"""catekv_runtime.attention.chunk_attention: a prompt chunk's causal attention, against one SDPA call with the
bottom-right causal mask (the independent reference) and against full causal attention over the whole prompt."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

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
    got = attention.chunk_attention(chunk, k, v, start, 128 ** -0.5, backend="sdpa")
    ref = attention.chunk_attention(chunk, k, v, start, 128 ** -0.5, backend="sdpa", split=False)
    torch.testing.assert_close(got.float(), ref.float(), atol=2e-2, rtol=2e-2)
    assert (got.float() - ref.float()).abs().mean() < 1e-3


# ---------------------------------------------------------------------------------------- prefill backends


def _fake_flash(returns_lse: bool):
    """A stand-in for a FlashAttention package's ``flash_attn_func`` in plain PyTorch, with the semantics its docs
    give: ``[B, n, H, D]`` tensors, K/V with fewer heads, ``causal=True`` aligned bottom-right; FlashAttention-4
    returns ``(out, lse)``, flash-attn 2 the output alone."""

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False):
        assert causal and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
        mask = causal_lower_right(q.shape[1], k.shape[1])
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                             scale=softmax_scale, enable_gqa=True).transpose(1, 2)
        return (out, None) if returns_lse else out

    return flash_attn_func


@pytest.fixture
def uncached(monkeypatch):
    """Resolution without its cache, so that a test may change what the machine looks like."""
    monkeypatch.setattr(attention, "_resolve", attention._resolve.__wrapped__)
    return monkeypatch


def _pretend_installed(monkeypatch, *installed: str) -> None:
    def flash_function(backend):
        if backend not in installed:
            raise ImportError(f"No module named {attention._FLASH[backend][0]!r}")
        return _fake_flash(backend == "fa4")

    monkeypatch.setattr(attention, "_flash_function", flash_function)


def test_auto_is_sdpa_on_cpu_and_flash_backends_are_refused_there() -> None:
    cpu = torch.device("cpu")
    for dtype in (torch.float32, torch.bfloat16):
        assert attention.resolve_prefill_backend("auto", cpu, dtype, 128) == "sdpa"
        assert attention.resolve_prefill_backend("sdpa", cpu, dtype, 128) == "sdpa"
    for backend in ("fa4", "flash2"):
        with pytest.raises(ValueError, match=f"prefill_backend='{backend}': needs a CUDA GPU"):
            attention.resolve_prefill_backend(backend, cpu, torch.bfloat16, 128)
    with pytest.raises(ValueError, match="must be one of"):
        attention.resolve_prefill_backend("flash", cpu, torch.bfloat16, 128)


@pytest.mark.parametrize(("capability", "installed", "auto"), [
    ((9, 0), ("fa4", "flash2"), "fa4"),
    ((10, 0), ("fa4",), "fa4"),
    ((9, 0), ("flash2",), "sdpa"),  # flash-attn 2 on Hopper: slower than SDPA's cuDNN attention
    ((8, 0), ("fa4", "flash2"), "flash2"),
    ((8, 9), (), "sdpa"),
    ((7, 5), ("fa4", "flash2"), "sdpa"),
])
def test_auto_picks_the_fastest_that_runs(uncached, capability, installed, auto) -> None:
    uncached.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    _pretend_installed(uncached, *installed)
    cuda = torch.device("cuda")
    assert attention.resolve_prefill_backend("auto", cuda, torch.bfloat16, 128) == auto
    assert attention.resolve_prefill_backend("auto", cuda, torch.float32, 128) == "sdpa"  # FA: half precision only
    assert attention.resolve_prefill_backend("auto", cuda, torch.float16, 100) == "sdpa"  # head_dim not a multiple of 8


def test_a_flash_backend_that_cannot_run_says_why(uncached) -> None:
    cuda = torch.device("cuda")
    uncached.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    _pretend_installed(uncached)
    with pytest.raises(ValueError, match=r"flash_attn.cute is not importable .*pip install \"catekv\[flash4\]\""):
        attention.resolve_prefill_backend("fa4", cuda, torch.bfloat16, 128)
    with pytest.raises(ValueError, match=r"pip install \"catekv\[flash\]\""):
        attention.resolve_prefill_backend("flash2", cuda, torch.bfloat16, 128)
    _pretend_installed(uncached, "fa4", "flash2")
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        attention.resolve_prefill_backend("fa4", cuda, torch.float32, 128)
    uncached.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    with pytest.raises(ValueError, match="compute capability 9.0 or newer, this one is 8.6"):
        attention.resolve_prefill_backend("fa4", cuda, torch.bfloat16, 128)
    assert attention.resolve_prefill_backend("flash2", cuda, torch.bfloat16, 128) == "flash2"


@pytest.mark.parametrize("backend", ["fa4", "flash2"])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2)], ids=["mha", "gqa"])
def test_flash_dispatch_makes_up_causal_attention_over_the_prompt(uncached, backend, heads) -> None:
    """A FlashAttention backend's chunks (start 0 and later ones), through a stand-in with the package's interface,
    give the whole prompt's causal attention: the layout, the keys up to the chunk's end and the return value are
    handled as the package needs."""
    uncached.setattr(attention, "_resolve", lambda name, *args: name)
    _pretend_installed(uncached, backend)
    q, k, v = _qkv(150, *heads, 16, torch.float32)
    whole = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=True)
    for start, end in ((0, 40), (40, 41), (41, 100), (100, 150)):
        keys, values = k.clone(), v.clone()
        keys[:, :, end:], values[:, :, end:] = 1e4, float("nan")
        got = attention.chunk_attention(q[:, :, start:end], keys, values, start, 0.3, backend=backend)
        torch.testing.assert_close(got, whole[:, :, start:end], atol=1e-5, rtol=1e-5)


def test_engine_and_apply_prefill_on_the_chosen_backend(uncached) -> None:
    """``Engine(prefill_backend=)`` and ``apply(prefill_backend=)`` run their prefill's attention on that backend (a
    stand-in FlashAttention-4 here), every chunk of every layer; the greedy tokens are SDPA's."""
    import catekv_runtime as ck
    from catekv_runtime.engine import Engine, SamplingParams
    from conftest import make_tiny_model
    from test_runtime import make_profile

    calls = []
    fake = _fake_flash(True)
    uncached.setattr(attention, "_resolve", lambda name, *args: name)
    uncached.setattr(attention, "_flash_function", lambda backend: lambda *a, **kw: calls.append(1) or fake(*a, **kw))
    model = make_tiny_model("llama")
    profile = make_profile(model, 0.5)
    prompt = torch.randint(3, 256, (300,), generator=torch.Generator().manual_seed(5)).tolist()
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    tokens = {}
    for backend in ("sdpa", "fa4"):
        engine = Engine(model, profile, max_batch_size=1, max_model_len=512, prefill_chunk=64, prefill_backend=backend)
        assert engine.prefill_backend == backend
        tokens[backend] = engine.generate(prompt, greedy)[0].token_ids
    assert tokens["fa4"] == tokens["sdpa"] and len(calls) == 3 * 5  # layers x chunks of 64
    calls.clear()
    model.generation_config.eos_token_id = None
    generated = {}
    for backend in ("sdpa", "fa4"):
        ck.apply(model, profile, prefill_backend=backend)
        generated[backend] = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, pad_token_id=0)
        ck.remove(model)
    assert torch.equal(generated["fa4"], generated["sdpa"]) and len(calls) == 3  # one whole-prompt call per layer
    assert generated["fa4"][0, 300:].tolist() == tokens["sdpa"]


def _runs_here_or_skip(backend: str, dim: int = 128) -> None:
    """Skip unless ``backend`` is installed and runs on this machine's GPU."""
    try:
        attention.resolve_prefill_backend(backend, torch.device("cuda"), torch.bfloat16, dim)
    except ValueError as exc:
        pytest.skip(str(exc))


@requires_cuda
@pytest.mark.parametrize("backend", ["fa4", "flash2"])
@pytest.mark.parametrize(("heads", "dim"), [((32, 8), 128), ((8, 8), 64), ((12, 2), 128)], ids=["gqa4", "mha", "gqa6"])
def test_gpu_flash_chunks_equal_sdpa(backend: str, heads: tuple[int, int], dim: int) -> None:
    """A prompt of 4096 + 77 tokens in chunks of 1024 (the first at start 0, the last 77 tokens): each chunk's output
    on a FlashAttention backend equals SDPA's bottom-right causal attention to bf16 rounding."""
    _runs_here_or_skip(backend, dim)
    q, k, v = _qkv(4096 + 77, *heads, dim, torch.bfloat16, "cuda", seed=4)
    for start in range(0, q.shape[2], 1024):
        chunk = q[:, :, start : start + 1024]
        got = attention.chunk_attention(chunk, k, v, start, dim ** -0.5, backend=backend)
        ref = attention.chunk_attention(chunk, k, v, start, dim ** -0.5, backend="sdpa", split=False)
        assert got.shape == ref.shape and got.dtype == ref.dtype
        torch.testing.assert_close(got.float(), ref.float(), atol=2e-2, rtol=2e-2)
        assert (got.float() - ref.float()).abs().mean() < 1e-3
