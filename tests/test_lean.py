"""The lean path (static caches, in-place appends) against the plain transformers path."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import make_tiny_model, requires_cuda
from test_runtime import make_profile

import catekv_runtime as ck
from catekv_runtime.lean import LeanGenerator


def plain_greedy(model, ids, steps, mask=None):
    model.generation_config.eos_token_id = None  # the lean path does not stop at EOS
    out = model.generate(ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1]:]


def left_padded(model, lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, width - n:] = torch.randint(3, model.config.vocab_size, (n,), generator=gen)
        mask[b, width - n:] = 1
    return ids, mask


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("ratio", [0.5, None])  # None: full attention on the lean engine
def test_lean_sdpa_equals_plain_generate(family, ratio):
    model = make_tiny_model(family)
    ids, mask = left_padded(model, [230, 170, 96])
    if ratio is None:
        expected = plain_greedy(model, ids, 16, mask)
        lean = LeanGenerator(model, None, backend="sdpa")
    else:
        profile = make_profile(model, ratio)
        ck.apply(model, profile)
        expected = plain_greedy(model, ids, 16, mask)
        ck.remove(model)
        lean = LeanGenerator(model, profile, backend="sdpa")
    tokens = lean.generate(ids, mask, max_new_tokens=16)
    assert torch.equal(tokens, expected)
    assert lean.stats.new_tokens == 16 and lean.stats.kv_bytes > 0
    assert model.config._attn_implementation == "sdpa"
    # Separate q/k/v projections (fuse=False) take their own path through the step: the same tokens.
    unfused = LeanGenerator(model, lean.profile, backend="sdpa", fuse=False)
    assert unfused._fused[model.model.layers[0]].qkv_weight is None
    assert torch.equal(unfused.generate(ids, mask, max_new_tokens=16), expected)


@pytest.mark.skipif(torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
                    reason="runs the Triton kernel through its interpreter, on CPU")
def test_lean_triton_kernel_path_equals_sdpa_path_on_cpu():
    """The Triton decode step (without a CUDA graph) through Triton's interpreter: same tokens as SDPA."""
    model = make_tiny_model("qwen2")
    ids, mask = left_padded(model, [150, 97])
    profile = make_profile(model, 0.5)
    expected = LeanGenerator(model, profile, backend="sdpa").generate(ids, mask, max_new_tokens=5)
    tokens = LeanGenerator(model, profile, backend="triton", cuda_graph=False).generate(ids, mask, max_new_tokens=5)
    assert torch.equal(tokens, expected)


@pytest.mark.skipif(torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
                    reason="runs the Triton kernels through their interpreter, on CPU")
@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: q/k/v biases
def test_lean_fused_linear_kernels_equal_the_sdpa_path_on_cpu(family):
    """Batch 1 on the triton backend runs every projection through kernels.triton_linear (norms, SiLU and
    residuals fused in); the tokens are those of the SDPA path, which runs the model's own modules."""
    model = make_tiny_model(family)
    ids, _ = left_padded(model, [120])
    profile = make_profile(model, 0.5)
    expected = LeanGenerator(model, profile, backend="sdpa").generate(ids, max_new_tokens=6)
    lean = LeanGenerator(model, profile, backend="triton", cuda_graph=False)
    assert lean.projections == "triton" and lean._head_eps is not None
    assert all(f.input_eps is not None for f in lean._fused.values())
    assert lean._kernel_rope  # the decode kernel applies RoPE to q and the new key
    assert torch.equal(lean.generate(ids, max_new_tokens=6), expected)
    torch_path = LeanGenerator(model, profile, backend="triton", cuda_graph=False, projections="torch")
    assert all(f.input_eps is None for f in torch_path._fused.values()) and not torch_path._kernel_rope
    assert torch.equal(torch_path.generate(ids, max_new_tokens=6), expected)


def test_kernel_rope_only_for_the_rotate_half_form():
    """The decode kernel's RoPE is transformers' rotate-half form; an interleaved RoPE (GPT-J's pairs) is refused."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from catekv_runtime.lean import _rope_is_rotate_half

    model = make_tiny_model("llama")
    rotary, dim = model.model.rotary_emb, model.model.layers[0].self_attn.head_dim
    cpu = torch.device("cpu")
    assert _rope_is_rotate_half(apply_rotary_pos_emb, rotary, dim, torch.float32, cpu)

    def interleaved(q, k, cos, sin):
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)

        def rotate_pairs(x):
            return torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).flatten(-2)

        return q * cos + rotate_pairs(q) * sin, k * cos + rotate_pairs(k) * sin

    assert not _rope_is_rotate_half(interleaved, rotary, dim, torch.float32, cpu)


def test_fused_linear_kernels_only_for_what_they_compute():
    """Layers whose norm or activation is not Llama's keep the torch projections; bad options are refused."""
    from catekv_runtime.lean import _rms_norm_eps

    model = make_tiny_model("llama")
    norm = model.model.layers[0].input_layernorm
    assert _rms_norm_eps(norm) == norm.variance_epsilon

    class OnePlusWeight(torch.nn.Module):  # Gemma's RMSNorm scales by 1 + weight
        def __init__(self, inner):
            super().__init__()
            self.weight, self.variance_epsilon = inner.weight, inner.variance_epsilon

        def forward(self, x):
            return norm(x) / self.weight * (1 + self.weight)

    assert _rms_norm_eps(OnePlusWeight(norm)) is None
    model.model.layers[1].mlp.act_fn = torch.nn.GELU()
    if importlib.util.find_spec("triton") is not None:
        model.to("cuda" if torch.cuda.is_available() else "cpu")
        lean = LeanGenerator(model, None, backend="triton", cuda_graph=False)
        assert lean._fused[model.model.layers[0]].input_eps is not None
        assert lean._fused[model.model.layers[1]].input_eps is None
    with pytest.raises(ValueError, match="projections"):
        LeanGenerator(model, None, backend="sdpa", projections="triton")
    with pytest.raises(ValueError, match="unknown projections"):
        LeanGenerator(model, None, backend="sdpa", projections="cublas")


def test_lean_refuses_sliding_window_models():
    model = make_tiny_model("mistral", sliding_window=64)
    lean = LeanGenerator(model, None, backend="sdpa")
    with pytest.raises(NotImplementedError, match="sliding-window"):
        lean.generate(torch.ones(1, 100, dtype=torch.long), max_new_tokens=2)


def test_lean_graphs_need_triton():
    with pytest.raises(ValueError, match="CUDA graphs need the triton backend"):
        LeanGenerator(make_tiny_model("llama"), None, backend="sdpa", cuda_graph=True)


@requires_cuda
@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("ratio", [0.5, None])
@pytest.mark.parametrize("lengths", [[900, 700, 333], [611]], ids=["batch3", "batch1"])  # batch 1: fused linears
def test_lean_triton_graph_equals_plain_generate_on_gpu(family, ratio, lengths):
    """Same tokens as the plain path (up to near ties, see assert_same_up_to_ties)."""
    model = make_tiny_model(family).cuda()
    model.generation_config.eos_token_id = None
    ids, mask = left_padded(model, lengths)
    ids, mask = ids.cuda(), mask.cuda()
    profile = make_profile(model, ratio if ratio is not None else 1.0)
    if ratio is not None:
        ck.apply(model, profile)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True)
    ck.remove(model)
    expected, logits = out.sequences[:, ids.shape[1]:], torch.stack(out.logits, dim=1)
    lean = LeanGenerator(model, profile if ratio is not None else None)
    assert lean.backend == "triton" and lean.cuda_graph
    assert_same_up_to_ties(lean.generate(ids, mask, max_new_tokens=24), expected, logits)


def assert_same_up_to_ties(tokens, expected, logits):
    """Where a random tiny model has a near tie (top-2 logits within 1e-4), summation order may pick the
    other token: the first difference of each sequence must be such a tie."""
    for b in range(tokens.shape[0]):
        differ = (tokens[b] != expected[b]).nonzero()
        if differ.numel():
            t = differ[0].item()
            top2 = logits[b, t].topk(2).values
            assert (top2[0] - top2[1]).item() < 1e-4, (b, t, tokens[b], expected[b])
            assert (top2[0] - logits[b, t, tokens[b, t]]).item() < 1e-4


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16: SDPA's flash kernel, bottom-right causal
def test_layer_by_layer_prefill_on_gpu(dtype):
    """The chunked prefill on CUDA (uneven chunks, every chunk after the first bottom-right aligned) against
    the model's own forward: the full-attention cache holds the same K/V, and greedy tokens agree."""
    model = make_tiny_model("llama").to("cuda", dtype)
    ids = torch.randint(3, model.config.vocab_size, (2, 900), generator=torch.Generator().manual_seed(7)).cuda()
    chunked, token, _ = LeanGenerator(model, None, prefill_chunk=128)._prefill(ids, None, 4)
    whole, whole_token, _ = LeanGenerator(model, None, prefill_chunk=None)._prefill(ids, None, 4)
    tolerance = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.05, rtol=0.05)
    for a, b in zip(chunked.layers, whole.layers):
        torch.testing.assert_close(a.groups[0].kv[..., :900, :], b.groups[0].kv[..., :900, :], **tolerance)
    if dtype == torch.float32:
        model.generation_config.eos_token_id = None
        out = model.generate(ids, max_new_tokens=16, do_sample=False, output_logits=True, return_dict_in_generate=True)
        tokens = LeanGenerator(model, None, prefill_chunk=128).generate(ids, max_new_tokens=16)
        assert_same_up_to_ties(tokens, out.sequences[:, 900:], torch.stack(out.logits, dim=1))


class _Mesh1D:
    """A 1-D tensor-parallel device mesh as transformers sets it (``model._device_mesh``), rank 0 of 2."""

    ndim, mesh_dim_names = 1, ("tp",)

    def __getitem__(self, name):
        return self

    def get_local_rank(self):
        return 0

    def size(self):
        return 2


def test_lean_refuses_tensor_parallel_models():
    model = make_tiny_model("llama")
    model._tp_size, model._device_mesh = 2, _Mesh1D()
    with pytest.raises(ValueError, match="tensor parallelism"):
        LeanGenerator(model, make_profile(model, 0.5))


def test_cache_of_another_head_count_is_refused():
    """A cache made for the whole head map, used by a rank that computes half the heads, says what to do."""
    model = make_tiny_model("llama")
    profile = make_profile(model, 0.5)
    ck.apply(model, profile)
    cache = ck.CateKVCache(model.config, profile.head_map[:, :1], profile.params)
    with pytest.raises(ValueError, match="make_cache"):
        model(torch.ones(1, 8, dtype=torch.long), **{ck.cache_argument(model): cache})
    ck.remove(model)


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: q/k/v biases
def test_fused_projections_share_the_models_storage_and_change_nothing(family, tmp_path):
    """The lean step's fused q/k/v and gate/up weights are the model's own parameters, viewed, not copied."""
    from transformers import AutoModelForCausalLM

    model = make_tiny_model(family)
    ids = torch.randint(3, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    before = model(ids).logits
    lean = LeanGenerator(model, None, backend="sdpa")
    layer = model.model.layers[0]
    fused = lean._fused[layer]
    attn, mlp = layer.self_attn, layer.mlp
    assert fused.qkv_weight is not None and fused.gate_up_weight is not None
    assert (fused.qkv_bias is not None) == (family == "qwen2")
    for part, rows in ((attn.q_proj.weight, 0), (attn.v_proj.weight, fused.qkv_weight.shape[0] - attn.v_proj.weight.shape[0])):
        assert part.untyped_storage().data_ptr() == fused.qkv_weight.untyped_storage().data_ptr()
        assert torch.equal(part, fused.qkv_weight[rows : rows + part.shape[0]])
    assert torch.equal(mlp.up_proj.weight, fused.gate_up_weight[mlp.gate_proj.weight.shape[0] :])
    assert torch.equal(model(ids).logits, before)
    # A second generator views the same storage again instead of copying.
    again = LeanGenerator(model, None, backend="sdpa")._fused[layer]
    assert again.qkv_weight.data_ptr() == fused.qkv_weight.data_ptr()
    assert again.gate_up_weight.data_ptr() == fused.gate_up_weight.data_ptr()
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="sdpa")
    assert torch.equal(reloaded(ids).logits, before)


def test_projections_that_cannot_be_fused_are_left_alone():
    model = make_tiny_model("llama")
    attn = model.model.layers[0].self_attn
    attn.k_proj.to(torch.float64)  # one dtype is the condition for one GEMV
    weight = attn.q_proj.weight
    fused = LeanGenerator(model, None, backend="sdpa")._fused[model.model.layers[0]]
    assert fused.qkv_weight is None and attn.q_proj.weight is weight
    assert fused.gate_up_weight is not None  # the MLP of the same layer still is
    other = make_tiny_model("llama")
    q_weight = other.model.layers[0].self_attn.q_proj.weight
    unfused = LeanGenerator(other, None, backend="sdpa", fuse=False)._fused[other.model.layers[0]]
    assert unfused.qkv_weight is None and other.model.layers[0].self_attn.q_proj.weight is q_weight


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("ratio", [0.5, None])
def test_layer_by_layer_prefill_equals_the_models_forward(family, ratio):
    """Chunked, layer-by-layer prefill: the same tokens as the plain path, and every head group keeps the same
    token K/V as after the model's own forward (chunks of 64 over 230 tokens: uneven last chunk)."""
    model = make_tiny_model(family)
    ids = torch.randint(3, model.config.vocab_size, (2, 230), generator=torch.Generator().manual_seed(5))
    profile = make_profile(model, ratio) if ratio is not None else None
    if profile is not None:
        ck.apply(model, profile)
    expected = plain_greedy(model, ids, 12)
    if profile is not None:
        ck.remove(model)
    by_layer = LeanGenerator(model, profile, backend="sdpa", prefill_chunk=64)
    whole = LeanGenerator(model, profile, backend="sdpa", prefill_chunk=None)
    assert torch.equal(by_layer.generate(ids, max_new_tokens=12), expected)
    assert torch.equal(whole.generate(ids, max_new_tokens=12), expected)
    chunked_cache, token, _ = by_layer._prefill(ids, None, 4)
    model_cache, model_token, _ = whole._prefill(ids, None, 4)
    assert torch.equal(token, model_token)
    for a, b in zip(chunked_cache.layers, model_cache.layers):
        assert len(a.groups) == len(b.groups) and a.seen == b.seen == 230
        for ga, gb in zip(a.groups, b.groups):
            assert ga.length == gb.length and torch.equal(ga.kv_heads, gb.kv_heads)
            torch.testing.assert_close(ga.kv[..., : ga.length, :], gb.kv[..., : gb.length, :], atol=1e-5, rtol=1e-4)


def test_padded_batches_prefill_through_the_model():
    model = make_tiny_model("llama")
    ids, mask = left_padded(model, [120, 80])
    lean = LeanGenerator(model, None, backend="sdpa", prefill_chunk=32)
    lean._prefill_by_layer = None  # would raise if called
    assert lean.generate(ids, mask, max_new_tokens=3).shape == (2, 3)
    with pytest.raises(ValueError, match="prefill_chunk"):
        LeanGenerator(model, None, backend="sdpa", prefill_chunk=0)
