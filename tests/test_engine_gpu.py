"""The engine on a GPU: the Triton decode kernel and CUDA graphs against apply + generate (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch
from conftest import requires_cuda
from test_engine import ENGINE_FAMILIES, prompts, tiny
from test_runtime import make_profile

import catekv_runtime as ck
from catekv_runtime.attention import resolve_prefill_backend
from catekv_runtime.engine import Engine, SamplingParams
from catekv_runtime.engine.engine import decode_windows
from catekv_runtime.engine.sampling import Filters
from catekv_runtime.params import UNLIMITED_BUDGET

pytestmark = [requires_cuda, pytest.mark.gpu]


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


def reference_with_logits(model, prompt, steps, profile):
    """Greedy tokens and their logits from transformers' generate (with apply's cache when profile is given)."""
    model.generation_config.eos_token_id = None
    if profile is not None:
        ck.apply(model, profile)
    try:
        out = model.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=steps, do_sample=False,
                             pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    finally:
        if profile is not None:
            ck.remove(model)
    return out.sequences[:, len(prompt):], torch.stack(out.logits, dim=1)


@pytest.mark.parametrize("family", ENGINE_FAMILIES)
@pytest.mark.parametrize("ratio", [0.5, None])
def test_graphs_and_kernel_equal_apply_and_generate_on_gpu(family, ratio):
    """Staggered arrivals over three slots with CUDA graphs (every window captured at start-up, on free rows): each
    request's greedy tokens equal apply + generate alone, up to near ties of the random tiny model
    (assert_same_up_to_ties)."""
    model = tiny(family).cuda()
    profile = make_profile(model, ratio) if ratio is not None else None
    batch = prompts([900, 333, 611, 120, 700], seed=4)
    steps = [20, 9, 14, 24, 6]
    engine = Engine(model, profile, max_batch_size=3, max_model_len=1024, prefill_chunk=256)
    assert engine.attention == "triton" and engine.cuda_graphs
    # Captured at start-up, while every row was free: greedy's and plain sampling's windows, and greedy needs no more.
    captured = set(engine._graphs)
    assert captured == {(lo, rows, f) for f in (Filters(), Filters(random=True)) for lo, rows in decode_windows(3)}
    params = [SamplingParams(max_tokens=s, temperature=0, ignore_eos=True) for s in steps]
    ids, done, step = {}, {}, 0
    arrivals = {0: [0, 1], 3: [2], 5: [3, 4]}
    while step <= max(arrivals) or engine.has_unfinished():
        for k in arrivals.get(step, []):
            ids[engine.add_request(batch[k], params[k])] = k
        for completion in engine.step():
            done[ids[completion.request_id]] = completion
        step += 1
    assert set(engine._graphs) == captured
    for k, (prompt, count) in enumerate(zip(batch, steps)):
        tokens, logits = reference_with_logits(model, prompt, count, profile)
        assert_same_up_to_ties(torch.tensor([done[k].token_ids], device="cuda"), tokens, logits)


def test_per_head_budgets_on_gpu():
    """A profile with budgets set per head (32 and 96 tokens) through the Triton kernel and CUDA graphs, two requests
    decoding together: each one's greedy tokens are apply + generate's, up to near ties."""
    model = tiny("llama").cuda()
    base = make_profile(model, 0.25)
    budgets = torch.full(base.head_map.shape, -1, dtype=torch.int64)
    for i, (layer, head) in enumerate((~base.head_map).nonzero().tolist()):
        budgets[layer, head] = 32 if i % 2 else 96
    profile = base.with_budgets(budgets)
    batch, steps = prompts([700, 300], seed=5), [16, 12]
    engine = Engine(model, profile, max_batch_size=2, max_model_len=1024, prefill_chunk=256)
    assert engine.cuda_graphs and sorted({g.budget for g in engine.kv.groups}) == [-1, 32, 96]
    outputs = engine.generate(batch, [SamplingParams(max_tokens=s, temperature=0, ignore_eos=True) for s in steps])
    for output, prompt, count in zip(outputs, batch, steps):
        tokens, logits = reference_with_logits(model, prompt, count, profile)
        assert_same_up_to_ties(torch.tensor([output.token_ids], device="cuda"), tokens, logits)


def test_graph_sampling_equals_eager_sampling_on_gpu():
    """Seeded sampling with top-k/top-p/min-p inside the graph gives the same tokens as the eager step."""
    model = tiny("llama").cuda()
    profile = make_profile(model, 0.5)
    batch = prompts([300, 120, 64], seed=6)
    params = [SamplingParams(max_tokens=12, temperature=0.05, top_k=20, top_p=0.9, min_p=0.02, seed=s, ignore_eos=True)
              for s in range(3)]
    graphed = Engine(model, profile, max_batch_size=4, max_model_len=512).generate(batch, params)
    eager = Engine(model, profile, max_batch_size=4, max_model_len=512, cuda_graphs=False).generate(batch, params)
    assert [o.token_ids for o in graphed] == [o.token_ids for o in eager]


def test_bfloat16_engine_runs_on_gpu():
    """bfloat16 end to end (the kernel's bf16 path, cuDNN prefill chunks): finishes and is close to float32 greedy
    for the first tokens."""
    model = tiny("qwen2").to("cuda", torch.bfloat16)
    profile = make_profile(model, 0.5)
    out = Engine(model, profile, max_batch_size=2, max_model_len=2048).generate(
        prompts([1500, 200], seed=2), SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    assert all(o.completion_tokens == 16 and o.finish_reason == "length" for o in out)


def test_memory_budget_sizes_the_slots_on_gpu():
    """gpu_memory_utilization leaves a tiny model all its slots; an explicit budget of 5.5 slots' bytes gives 5."""
    from catekv_runtime.engine.kv import SlotKV

    model = tiny("llama").cuda()
    engine = Engine(model, make_profile(model, 0.5), max_batch_size=64, max_model_len=4096,
                    gpu_memory_utilization=0.9)
    assert engine.slots == 64
    full = torch.full((engine.model.num_layers, engine.model.kv_heads), UNLIMITED_BUDGET)
    per_slot = SlotKV.bytes_per_slot(engine.model, full, {UNLIMITED_BUDGET: 4096})
    small = Engine(model, None, max_batch_size=64, max_model_len=4096, kv_cache_memory=per_slot * 11 // 2)
    assert small.slots == 5


@pytest.mark.parametrize("backend", ["fa4", "flash2"])
def test_flash_prefill_gives_sdpa_tokens_on_gpu(backend):
    """A bf16 tiny model, prompts of several 256-token chunks and an uneven tail: the engine's greedy tokens with a
    FlashAttention prefill equal those with SDPA's, up to bf16 near ties (top-2 logits within 0.05 where they first
    differ; logits from the model's own forward over the SDPA engine's tokens). Skipped without the package."""
    try:
        resolve_prefill_backend(backend, torch.device("cuda"), torch.bfloat16, 16)
    except ValueError as exc:
        pytest.skip(str(exc))
    model = tiny("llama").to("cuda", torch.bfloat16)
    profile = make_profile(model, 0.5)
    batch = prompts([900, 333], seed=4)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    tokens = {}
    for name in (backend, "sdpa"):
        engine = Engine(model, profile, max_batch_size=2, max_model_len=1024, prefill_chunk=256, prefill_backend=name)
        assert engine.prefill_backend == name
        tokens[name] = [o.token_ids for o in engine.generate(batch, params)]
    for prompt, got, expected in zip(batch, tokens[backend], tokens["sdpa"]):
        with torch.inference_mode():
            logits = model(torch.tensor([prompt + expected[:-1]], device="cuda")).logits[0, len(prompt) - 1 :].float()
        differ = [t for t, (a, b) in enumerate(zip(got, expected)) if a != b]
        if differ:
            top2 = logits[differ[0]].topk(2).values
            assert (top2[0] - top2[1]).item() < 0.05, (differ[0], got, expected)
