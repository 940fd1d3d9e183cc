"""The engine (catekv_runtime.engine) against independent references: transformers' ``generate`` with ``apply``'s
CateKV cache, full attention, and each request run alone."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import make_tiny_model
from test_runtime import make_profile

import catekv_runtime as ck
from catekv_runtime.engine import Engine, SamplingParams, UnsupportedModelError

ENGINE_FAMILIES = ("llama", "qwen2", "mistral", "phi3", "qwen3")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared CPU their spinning costs several times the
    work; the engine test modules import this fixture (autouse) to run on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def tiny(family: str, **overrides):
    """A tiny model of ``family``; Qwen3 (q/k head norms) is built here, conftest does not know it."""
    if family != "qwen3":
        return make_tiny_model(family, **overrides)
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    model.eval().requires_grad_(False)
    # Random norms: Qwen3's q/k norms at their initial 1.0 would not test that they are applied.
    for layer in model.model.layers:
        for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
            norm.weight.copy_(torch.rand(norm.weight.shape, generator=torch.Generator().manual_seed(3)) + 0.5)
    return model


def prompts(lengths, seed=0, vocab=256) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


def reference(model, prompt: list[int], steps: int, profile=None) -> list[int]:
    """Greedy tokens of transformers' generate, alone, with apply's CateKV cache when ``profile`` is given."""
    model.generation_config.eos_token_id = None
    if profile is not None:
        ck.apply(model, profile)
    try:
        out = model.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False, pad_token_id=0)
    finally:
        if profile is not None:
            ck.remove(model)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("family", ENGINE_FAMILIES)
def test_greedy_equals_apply_and_generate(family):
    """A batch of prompts of different lengths, greedy: each equals apply + generate of that prompt alone with the
    same profile; and at this budget CateKV's tokens differ from full attention's somewhere (so the comparison
    would notice an engine that ignored the profile)."""
    model = tiny(family)
    profile = make_profile(model, 0.5)
    batch = prompts([230, 97, 150, 180])
    expected = [reference(model, p, 12, profile) for p in batch]
    engine = Engine(model, profile, max_batch_size=4, max_model_len=512, prefill_chunk=64)
    outputs = engine.generate(batch, GREEDY)
    assert [o.token_ids for o in outputs] == expected
    assert all(o.finish_reason == "length" and o.completion_tokens == 12 for o in outputs)
    assert [o.prompt_tokens for o in outputs] == [230, 97, 150, 180]
    full = [reference(model, p, 12) for p in batch]
    assert full != expected


@pytest.mark.parametrize("family", ENGINE_FAMILIES)
def test_full_attention_equals_generate(family):
    """profile=None, and a profile that evicts nothing (r = 1, eta = 1), equal transformers' full attention."""
    model = tiny(family)
    batch = prompts([200, 61, 130], seed=1)
    expected = [reference(model, p, 12) for p in batch]
    full = Engine(model, None, max_batch_size=3, max_model_len=400, prefill_chunk=48)
    assert [o.token_ids for o in full.generate(batch, GREEDY)] == expected
    keep_all = Engine(model, make_profile(model, 1.0), max_batch_size=2, max_model_len=400)
    assert [o.token_ids for o in keep_all.generate(batch, GREEDY)] == expected


@pytest.mark.parametrize("rope", [
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64, "rope_theta": 10000.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0},
], ids=["llama3", "yarn"])
def test_scaled_rope_equals_generate(rope):
    """RoPE scaling comes from the model's own rotary module (inv_freq, attention_scaling): llama3 and yarn."""
    model = tiny("llama", rope_parameters=rope)
    assert model.model.rotary_emb.rope_type == rope["rope_type"]
    batch = prompts([150, 90], seed=2)
    profile = make_profile(model, 0.5)
    engine = Engine(model, profile, max_batch_size=2, max_model_len=256)
    assert [o.token_ids for o in engine.generate(batch, GREEDY)] == [reference(model, p, 12, profile) for p in batch]


def test_engine_shares_the_models_weights():
    """The fused q/k/v and gate/up weights are the model's own storage (viewed), and the model is unchanged."""
    model = tiny("qwen2")
    ids = torch.tensor([prompts([40])[0]])
    before = model(ids).logits
    engine = Engine(model, None, max_batch_size=1, max_model_len=64)
    layer, weights = model.model.layers[0], engine.model.layers[0]
    assert layer.self_attn.q_proj.weight.untyped_storage().data_ptr() == weights.qkv.untyped_storage().data_ptr()
    assert layer.mlp.up_proj.weight.untyped_storage().data_ptr() == weights.gate_up.untyped_storage().data_ptr()
    assert weights.qkv_bias is not None
    assert torch.equal(model(ids).logits, before)


def test_a_second_engine_views_the_fused_weights_again_and_the_model_saves_unchanged(tmp_path):
    """Fusing is done once: a second engine views the first one's q/k/v and gate/up storage (no copy), and the
    model, whose parameters are now views of it, saves and reloads to the same logits."""
    from transformers import AutoModelForCausalLM

    model = tiny("llama")
    ids = torch.tensor([prompts([40])[0]])
    before = model(ids).logits
    first = Engine(model, None, max_batch_size=1, max_model_len=64).model.layers[0]
    again = Engine(model, None, max_batch_size=1, max_model_len=64).model.layers[0]
    assert again.qkv.data_ptr() == first.qkv.data_ptr() and again.gate_up.data_ptr() == first.gate_up.data_ptr()
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="sdpa")
    assert torch.equal(reloaded(ids).logits, before)


def test_projections_of_mixed_dtypes_are_copied_not_fused():
    """q/k/v of two dtypes cannot share one storage: the model's parameters stay as they were (the engine's model
    holds a copy), while the MLP of the same layer is still fused in place."""
    model = tiny("llama")
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    attn.k_proj.to(torch.float64)
    q_weight = attn.q_proj.weight
    weights = Engine(model, None, max_batch_size=1, max_model_len=64, attention="torch").model.layers[0]
    assert attn.q_proj.weight is q_weight
    assert weights.qkv.untyped_storage().data_ptr() != q_weight.untyped_storage().data_ptr()
    assert mlp.up_proj.weight.untyped_storage().data_ptr() == weights.gate_up.untyped_storage().data_ptr()


@pytest.mark.parametrize("make, reason", [
    (lambda: make_tiny_model("mistral", sliding_window=64), "sliding-window"),
    (lambda: make_tiny_model("qwen2", sliding_window=64), "sliding-window"),
    (lambda: make_tiny_model("llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}),
     "'dynamic'"),
    (lambda: make_tiny_model("llama", hidden_act="gelu"), "activation"),
], ids=["mistral-window", "qwen2-window", "dynamic-rope", "gelu"])
def test_unsupported_models_are_refused(make, reason):
    with pytest.raises(UnsupportedModelError, match=reason):
        Engine(make(), None, max_model_len=64)


def test_other_architectures_are_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match="Llama family"):
        Engine(model, None)


def test_profile_of_another_model_is_refused():
    other = make_profile(tiny("llama", num_hidden_layers=2), 0.5)
    with pytest.raises(ck.ProfileError):
        Engine(tiny("llama"), other, max_model_len=64)


@pytest.mark.skipif(torch.cuda.is_available(), reason="runs the Triton kernel through its interpreter, on CPU")
def test_triton_decode_kernel_path_on_cpu():
    """The decode step through the Triton split-K kernel (Triton's interpreter; it rotates q and the new key, appends
    in place and attends from the sink-skipping start), a free row in the batch: the tokens of apply + generate."""
    model = tiny("qwen3")
    profile = make_profile(model, 0.5)
    batch = prompts([120, 40], seed=1)
    steps = [4, 3]
    engine = Engine(model, profile, max_batch_size=3, max_model_len=160, attention="triton")
    params = [SamplingParams(max_tokens=s, temperature=0, ignore_eos=True) for s in steps]
    outputs = engine.generate(batch, params)
    assert [o.token_ids for o in outputs] == [reference(model, p, s, profile) for p, s in zip(batch, steps)]


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the calls of kernels.triton_linear.fused_linear (the engine looks it up at each call)."""
    from catekv_runtime.kernels import triton_linear

    calls = []
    real = triton_linear.fused_linear

    def counting(*args, **kwargs):
        calls.append(kwargs.get("glu", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(triton_linear, "fused_linear", counting)
    return calls


@pytest.fixture
def row_kernel_calls(monkeypatch):
    """Counts the calls of kernels.triton_norm's rms_norm and silu_mul (the engine looks them up at each call)."""
    from catekv_runtime.kernels import triton_norm

    calls = []
    for name in ("rms_norm", "silu_mul"):
        real = getattr(triton_norm, name)

        def counting(*args, _name=name, _real=real, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(triton_norm, name, counting)
    return calls


@pytest.mark.skipif(torch.cuda.is_available(), reason="runs the Triton kernels through their interpreter, on CPU")
@pytest.mark.parametrize("family", ENGINE_FAMILIES)
def test_fused_projections_equal_torch_and_apply_generate(family, fused_calls):
    """A batch-1 decode step through the fused Triton projections (the interpreter): q/k/v, o, gate/up, down and
    lm_head are four kernels per layer and one (3 layers x 4 + 1 per step), and the tokens are apply + generate's
    and the torch projections'."""
    model = tiny(family)
    profile = make_profile(model, 0.5)
    prompt = prompts([90], seed=5)[0]
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    torch_path = Engine(model, profile, max_batch_size=1, max_model_len=128, projections="torch")
    assert torch_path.projections == "torch"
    expected = torch_path.generate(prompt, params)[0].token_ids
    assert not fused_calls
    assert expected == reference(model, prompt, 4, profile)
    fused = Engine(model, profile, max_batch_size=1, max_model_len=128, projections="triton")
    assert fused.projections == "triton" and fused.attention == "torch"
    assert fused.generate(prompt, params)[0].token_ids == expected
    layers = model.config.num_hidden_layers
    assert len(fused_calls) == 3 * (4 * layers + 1) and fused_calls.count(True) == 3 * layers  # 3 decode steps


@pytest.mark.skipif(torch.cuda.is_available(), reason="runs the Triton kernels through their interpreter, on CPU")
def test_fused_projections_only_for_a_lone_row(fused_calls, row_kernel_calls):
    """Two requests decode together through cuBLAS projections with the Triton row kernels around them (per layer
    two RMSNorms, the second with the residual add, and SiLU x up; the final norm); once the one in row 0 has
    finished, the one in row 1 decodes alone (a batch-1 step at row 1, with the Triton attention kernel) through
    the fused projections; the prefills use the row kernels too. Both get apply + generate's tokens."""
    model = tiny("llama")
    profile = make_profile(model, 0.5)
    batch = prompts([70, 50], seed=8)
    steps = [2, 5]
    engine = Engine(model, profile, max_batch_size=2, max_model_len=128, attention="triton")
    assert engine.projections == "triton"
    params = [SamplingParams(max_tokens=s, temperature=0, ignore_eos=True) for s in steps]
    outputs = engine.generate(batch, params)
    assert [o.token_ids for o in outputs] == [reference(model, p, s, profile) for p, s in zip(batch, steps)]
    # Steps of both rows: 1 (the first request's last); then row 1 alone: 3 steps of 4 kernels per layer + 1.
    layers = model.config.num_hidden_layers
    assert len(fused_calls) == 3 * (4 * layers + 1)
    # The row kernels: that step's (two RMSNorms per layer and the final one, SiLU x up per layer), and each prompt's
    # prefill in one chunk per layer (its two RMSNorms and SiLU x up).
    assert row_kernel_calls.count("rms_norm") == 2 * layers + 1 + 2 * 2 * layers
    assert row_kernel_calls.count("silu_mul") == layers + 2 * layers


@pytest.mark.parametrize("slots", [1, 2, 3, 5, 8, 13, 33])
def test_the_start_up_capture_covers_every_window_a_step_can_run(slots):
    """With CUDA graphs the engine captures decode_windows(slots) at start-up: whichever rows are running,
    Engine._window (what a step runs) must be one of them, or serving would stall to capture it."""
    from types import SimpleNamespace

    from catekv_runtime.engine.engine import decode_windows

    windows = decode_windows(slots)
    assert len(set(windows)) == len(windows) and (0, slots) in windows
    gen = torch.Generator().manual_seed(slots)
    running_sets = [{s} for s in range(slots)] + [set(range(slots))]
    running_sets += [set(torch.randperm(slots, generator=gen)[:int(torch.randint(2, slots + 1, (1,), generator=gen))]
                         .tolist()) for _ in range(50)] if slots > 1 else []
    for running in running_sets:
        engine = SimpleNamespace(_running=dict.fromkeys(running), cuda_graphs=True, slots=slots)
        assert Engine._window(engine) in windows, running


@pytest.mark.parametrize("attention", ["torch", "triton"])
def test_per_head_budgets_equal_apply_and_generate(attention):
    """A profile with budgets set per head (consistent heads of 32 and 96 tokens, some layers holding both): the
    engine keeps one head group per budget and gives each request apply + generate's tokens with that profile,
    which differ from those of one budget for every head (so an engine that ignored the budgets would fail)."""
    model = tiny("llama")
    base = make_profile(model, 0.25)
    consistent = (~base.head_map).nonzero()
    budgets = torch.full(base.head_map.shape, -1, dtype=torch.int64)
    for i, (layer, head) in enumerate(consistent.tolist()):
        budgets[layer, head] = 32 if i % 2 else 96
    profile = base.with_budgets(budgets)
    batch, steps = prompts([230, 150], seed=5), [10, 7]
    params = [SamplingParams(max_tokens=s, temperature=0, ignore_eos=True) for s in steps]
    engine = Engine(model, profile, max_batch_size=2, max_model_len=512, prefill_chunk=64, attention=attention)
    assert sorted({g.budget for g in engine.kv.groups}) == [-1, 32, 96]
    assert any(len({g.budget for g in layer} - {-1}) == 2 for layer in engine.kv.layers)
    for layer, groups in enumerate(engine.kv.layers):  # each group holds its budget's heads, and room for them
        for g in groups:
            assert g.kv_heads.tolist() == (budgets[layer] == g.budget).nonzero().flatten().tolist()
            assert g.kv.shape[3] == 1 + engine.capacities[g.budget]
    expected = [reference(model, p, s, profile) for p, s in zip(batch, steps)]
    assert [o.token_ids for o in engine.generate(batch, params)] == expected
    uniform = base.replace_params(dataclasses.replace(base.params, budget=64))
    assert expected != [reference(model, p, s, uniform) for p, s in zip(batch, steps)]
