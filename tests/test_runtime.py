"""The runtime against independent references: full attention, a naive selection, single-sequence runs."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model
from transformers import DynamicCache

import catekv_runtime as ck
from catekv_runtime.cache import CateKVLayer
from catekv_runtime.profile import ProfileError, budget_for_kv_fraction, load_profile, resolve_profile, retarget
from catekv_runtime.profile import Profile, ProfileParams, ReferenceSpec

FAMILIES = ["llama", "qwen2"]


def make_profile(model, ratio: float, seed: int = 0, **params) -> Profile:
    """A profile with random statistics for ``model`` (which heads are adaptive is what matters here)."""
    spec = ck.model_spec(model)
    cv = torch.rand(3, spec.num_layers, spec.num_kv_heads, generator=torch.Generator().manual_seed(seed))
    defaults = dict(budget=64, init_tokens=4, recent_tokens=16, chunk_size=4, obs_window=8)
    p = ProfileParams(adaptive_ratio=ratio, **{**defaults, **params})
    return Profile.from_statistics(cv, cv, cv, p, spec, ReferenceSpec("test", 256, 3, 0, "none"))


def greedy(model, ids, steps, **kwargs):
    out = model.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, output_scores=True,
                         return_dict_in_generate=True, **kwargs)
    return out.sequences, torch.stack(out.scores)


@pytest.mark.parametrize("family", FAMILIES)
def test_nothing_evicted_equals_full_attention(family):
    """r = 1, eta = 1: every head keeps everything, so prefill + 32 decode steps match full attention."""
    model = make_tiny_model(family)
    ids = torch.randint(0, model.config.vocab_size, (1, 300), generator=torch.Generator().manual_seed(1))
    ref_tokens, ref_scores = greedy(model, ids, 32)
    ck.apply(model, make_profile(model, 1.0))
    tokens, scores = greedy(model, ids, 32)
    ck.remove(model)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(scores, ref_scores, rtol=0, atol=1e-4)  # fp32; observed ~1e-7


@pytest.mark.parametrize("family", FAMILIES)
def test_short_prompt_keeps_full_cache_exactly(family):
    """A prompt that fits the budget is not compressed, whatever the head map says."""
    model = make_tiny_model(family)
    ids = torch.randint(0, model.config.vocab_size, (1, 60), generator=torch.Generator().manual_seed(2))
    ref_tokens, ref_scores = greedy(model, ids, 16)
    ck.apply(model, make_profile(model, 0.0, budget=64))
    tokens, scores = greedy(model, ids, 16)
    ck.remove(model)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(scores, ref_scores, rtol=0, atol=1e-4)


def naive_retained(queries, keys, scale, p: ProfileParams, keep_chunks: int) -> list[list[int]]:
    """docs/method.md "Runtime", written plainly: one head, one query, one chunk at a time."""
    num_q, n = queries.shape[0], keys.shape[1]
    group = num_q // keys.shape[0]
    # the middle stops reserve // c whole chunks before the recent window (the authors' 32 // c)
    num_chunks = (n - p.init_tokens - p.recent_tokens) // p.chunk_size - p.reserve_tokens // p.chunk_size
    mid_start, mid_end = p.init_tokens, p.init_tokens + num_chunks * p.chunk_size
    obs = queries.shape[1]
    kept = []
    for h in range(keys.shape[0]):
        probs = torch.zeros(obs, mid_end - mid_start, dtype=torch.float64)
        for qh in range(h * group, (h + 1) * group):
            for i in range(obs):
                pos = n - obs + i
                logits = [
                    (queries[qh, i].double() @ keys[h, t].double()).item() * scale if t <= pos else -math.inf
                    for t in range(mid_start, mid_end)
                ]
                probs[i] += torch.softmax(torch.tensor(logits, dtype=torch.float64), 0) / group
        scores = [
            sum(probs[i, c * p.chunk_size : (c + 1) * p.chunk_size].max().item() for i in range(obs))
            for c in range(num_chunks)
        ]
        best = sorted(sorted(range(num_chunks), key=lambda c: -scores[c])[:keep_chunks])
        tokens = list(range(p.init_tokens))
        for c in best:
            tokens += range(mid_start + c * p.chunk_size, mid_start + (c + 1) * p.chunk_size)
        kept.append(tokens + list(range(mid_end, n)))
    return kept


@pytest.mark.parametrize("recent", [16, 4])  # 4 < obs_window: some middle keys follow observation queries
def test_retained_tokens_equal_naive_selection(recent):
    model = make_tiny_model("llama")
    n = 150
    ids = torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(3))
    profile = make_profile(model, 0.5, recent_tokens=recent)
    p = profile.params

    captured = {}  # layer -> (queries, keys) of full attention, through the same post-RoPE tensors

    def grab(module, query, key):
        captured[module.layer_idx] = (query[0, :, -p.obs_window :].clone(), key[0].clone())

    from catekv_profiler.capture import capture_attention

    with torch.no_grad(), capture_attention(model, grab):
        model(ids, use_cache=False)

    ck.apply(model, profile)
    cache = ck.make_cache(model, profile)
    with torch.no_grad():
        model(ids, **{ck.cache_argument(model): cache}, use_cache=True)
    ck.remove(model)
    for layer_idx, layer in enumerate(cache.layers):
        queries, keys = captured[layer_idx]
        consistent = (~profile.head_map[layer_idx]).nonzero().flatten()
        group = next(g for g in layer.groups if torch.equal(g.kv_heads, consistent)) if consistent.numel() else None
        if group is None:
            continue
        expected = naive_retained(queries, keys, model.model.layers[0].self_attn.scaling, p, p.budget_chunks())
        for i, h in enumerate(consistent.tolist()):
            want = keys[h, expected[h]]
            torch.testing.assert_close(group.keys[0, i, : group.length], want, rtol=0, atol=1e-6)
        tail = recent + p.reserve_tokens // p.chunk_size * p.chunk_size + (n - p.init_tokens - recent) % p.chunk_size
        assert group.length == p.budget - p.recent_tokens + tail


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batch_equals_single_runs(family):
    model = make_tiny_model(family)
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, model.config.vocab_size, (n,), generator=gen) for n in (210, 150, 97)]
    profile = make_profile(model, 0.5)
    ck.apply(model, profile)
    singles = [greedy(model, p[None], 12) for p in prompts]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :] = p
        mask[b, width - len(p) :] = 1
    tokens, scores = greedy(model, ids, 12, attention_mask=mask, pad_token_id=0)
    ck.remove(model)
    for b, (single_tokens, single_scores) in enumerate(singles):
        assert torch.equal(tokens[b, width:], single_tokens[0, len(prompts[b]) :])
        torch.testing.assert_close(scores[:, b], single_scores[:, 0], rtol=0, atol=2e-4)


def test_chunked_prefill_equals_single_prefill():
    model = make_tiny_model("llama")
    ids = torch.randint(0, model.config.vocab_size, (1, 260), generator=torch.Generator().manual_seed(5))
    ck.apply(model, make_profile(model, 0.5))
    ref_tokens, ref_scores = greedy(model, ids, 10)
    tokens, scores = greedy(model, ids, 10, prefill_chunk_size=64)
    ck.remove(model)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(scores, ref_scores, rtol=0, atol=1e-4)


def test_fork_keeps_what_a_fresh_cache_keeps():
    """Forking one uncompressed prefill under other settings keeps exactly what a prefill under them keeps."""
    model = make_tiny_model("llama")
    ids = torch.randint(3, model.config.vocab_size, (2, 230), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[1, :40] = 0  # left padding in the second sequence
    base = make_profile(model, 0.5)
    ck.apply(model, base)
    source = ck.make_cache(model, base, eager=False)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        model(input_ids=ids, attention_mask=mask, position_ids=positions, **{ck.cache_argument(model): source})
    for overrides in ({}, {"adaptive_ratio": 0.0, "budget": 32}, {"adaptive_ratio": 1.0, "eta": 1.0}):
        other = resolve_profile(base, overrides)
        forked = source.fork(other.head_map, other.params)
        fresh = ck.CateKVCache(model.config, other.head_map, other.params)
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=mask, position_ids=positions, **{ck.cache_argument(model): fresh})
        for mine, theirs in zip(forked.layers, fresh.layers):
            assert len(mine.groups) == len(theirs.groups)
            for a, b in zip(mine.groups, theirs.groups):
                assert torch.equal(a.kv_heads, b.kv_heads) and a.length == b.length
                torch.testing.assert_close(a.kv[:, :, :, : a.length], b.kv[:, :, :, : b.length], rtol=0, atol=0)
        assert forked.memory() == fresh.memory()
    assert all(layer.keys is not None and not layer.compressed for layer in source.layers)  # source untouched
    with pytest.raises(ValueError, match="obs_window"):
        source.fork(base.head_map, resolve_profile(base, {"obs_window": 64}).params)
    with pytest.raises(ValueError, match="eager=False"):
        forked.fork(base.head_map, base.params)
    ck.remove(model)


def test_bytes_held_equal_formula():
    model = make_tiny_model("llama")
    n, steps = 300, 5
    ids = torch.randint(0, model.config.vocab_size, (2, n), generator=torch.Generator().manual_seed(6))
    profile = make_profile(model, 0.5)
    p = profile.params
    ck.apply(model, profile)
    cache = ck.make_cache(model, profile, reserve=steps)
    with torch.no_grad():
        out = model(ids, **{ck.cache_argument(model): cache}, use_cache=True)
        for _ in range(steps):
            out = model(out.logits[:, -1:].argmax(-1), **{ck.cache_argument(model): cache}, use_cache=True)
    ck.remove(model)
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    per_token = 2 * 4 * head_dim * 2  # K and V, fp32, batch 2
    num_chunks = p.regions(n).num_chunks
    tail = n - p.init_tokens - num_chunks * p.chunk_size
    consistent_tokens = p.init_tokens + p.budget_chunks() * p.chunk_size + tail + steps
    adaptive = int(profile.head_map.sum())
    consistent = profile.head_map.numel() - adaptive
    used = per_token * (adaptive * (n + steps) + consistent * consistent_tokens)
    memory = cache.memory()
    assert memory["used_bytes"] == used
    assert memory["allocated_bytes"] == used  # reserve == steps: capacity exactly filled
    assert memory["full_attention_bytes"] == per_token * profile.head_map.numel() * (n + steps)
    assert isinstance(cache.layers[0], CateKVLayer)


def test_capacity_grows_past_reserve():
    model = make_tiny_model("llama")
    ids = torch.randint(0, model.config.vocab_size, (1, 200), generator=torch.Generator().manual_seed(7))
    profile = make_profile(model, 0.5)
    ck.apply(model, profile)
    ref_tokens, ref_scores = greedy(model, ids, 20)
    cache = ck.make_cache(model, profile, reserve=2)
    tokens, scores = greedy(model, ids, 20, **{ck.cache_argument(model): cache})
    ck.remove(model)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(scores, ref_scores, rtol=0, atol=1e-5)


def test_profile_for_another_model_is_refused():
    model = make_tiny_model("llama")
    other = make_tiny_model("llama", num_hidden_layers=5)
    with pytest.raises(ck.ProfileError, match="num_layers"):
        ck.apply(model, make_profile(other, 0.5))
    assert model.config._attn_implementation == "sdpa"  # nothing was changed


def test_cache_of_another_head_count_is_refused():
    """A cache made for the whole head map, used by a rank that computes half the heads, says what to do."""
    model = make_tiny_model("llama")
    profile = make_profile(model, 0.5)
    ck.apply(model, profile)
    cache = ck.CateKVCache(model.config, profile.head_map[:, :1], profile.params)
    with pytest.raises(ValueError, match="make_cache"):
        model(torch.ones(1, 8, dtype=torch.long), **{ck.cache_argument(model): cache})
    ck.remove(model)


def test_unknown_override_is_refused():
    model = make_tiny_model("llama")
    with pytest.raises(TypeError, match="unknown CateKV overrides"):
        ck.apply(model, make_profile(model, 0.5), budjet=32)


def test_overrides_change_the_budget_and_ratio():
    model = make_tiny_model("llama")
    ck.apply(model, make_profile(model, 0.5), budget=128, adaptive_ratio=0.25)
    params = model._catekv.profile.params
    ck.remove(model)
    assert (params.budget, params.init_tokens, params.recent_tokens, params.adaptive_ratio) == (128, 4, 16, 0.25)
    assert not hasattr(model, "_catekv") and "generate" not in model.__dict__


@pytest.mark.parametrize("ratio, fraction, length", [(0.25, 0.5, 1000), (0.5, 0.6, 777), (0.0, 0.1, 4096),
                                                      (0.25, 1.0, 300)])
def test_budget_for_kv_fraction_is_the_largest_that_fits(ratio, fraction, length):
    """Against a scan of every budget: the largest B (windows B/32 and B/8) whose KV kept is at most the fraction."""
    profile = make_profile(make_tiny_model("llama"), ratio)

    def kept(budget):
        return resolve_profile(profile, {"budget": budget}).kv_kept_fraction(length)

    fitting = [b for b in range(2, length + 1) if kept(b) <= fraction]
    assert budget_for_kv_fraction(profile, fraction, length) == max(fitting)


def test_budget_for_kv_fraction_below_the_adaptive_heads_is_refused():
    profile = make_profile(make_tiny_model("llama"), 0.5)
    with pytest.raises(ProfileError, match=r"at r = 0.5 the adaptive heads alone keep 5\d\.\d% .* than the 40.0% asked"):
        budget_for_kv_fraction(profile, 0.4, 1000)


def test_retarget_saves_what_the_overrides_run(tmp_path):
    """A retargeted profile, saved and loaded, is the runtime override of the same r and budget (head map, budgets,
    parameters) over the same statistics, and records the windows those were measured with, the first ones when
    retargeted twice."""
    model = make_tiny_model("llama")
    profile = make_profile(model, 0.5, budget=128, init_tokens=4, recent_tokens=16)
    budget = budget_for_kv_fraction(profile.with_adaptive_ratio(0.25), 0.6, 700)
    expected = resolve_profile(profile, {"adaptive_ratio": 0.25, "budget": budget})
    new = retarget(profile, adaptive_ratio=0.25, kv_fraction=0.6, context_length=700)
    new.save(tmp_path / "p.safetensors")
    loaded = load_profile(tmp_path / "p.safetensors")
    assert loaded.params == expected.params and expected.params.budget == budget != 128
    assert torch.equal(loaded.head_map, expected.head_map) and torch.equal(loaded.budgets, expected.budgets)
    assert int(loaded.head_map.sum()) < int(profile.head_map.sum())
    for name in ("cv", "threshold", "hit_mean"):
        assert torch.equal(getattr(loaded, name), getattr(profile, name))
    assert loaded.kv_kept_fraction(700) <= 0.6
    windows = '{"budget": 128, "init_tokens": 4, "recent_tokens": 16}'
    assert loaded.provenance["statistics_windows"] == windows
    assert loaded.provenance["retarget"] == f"r 0.5 -> 0.25, budget 128 -> {budget} (at most 60.0% of the KV of a 700-token prompt)"
    again = retarget(loaded, budget=96)
    assert again.params.budget == 96 and again.params.adaptive_ratio == 0.25
    assert again.provenance["statistics_windows"] == windows  # still what the statistics were measured with
    assert retarget(profile, kv_fraction=0.9).params.budget == budget_for_kv_fraction(profile, 0.9, 256)  # reference length


@pytest.mark.parametrize("kwargs, message", [
    ({"budget": 64, "kv_fraction": 0.5}, "a budget or a KV fraction, not both"),
    ({}, "nothing to retarget"),
    ({"adaptive_ratio": 0.5, "kv_fraction": 0.3}, "the adaptive heads alone keep"),
])
def test_retarget_refuses_what_it_cannot_do(kwargs, message):
    with pytest.raises(ProfileError, match=message):
        retarget(make_profile(make_tiny_model("llama"), 0.25), **kwargs)


@pytest.mark.parametrize("family", ["mistral", "qwen2"])  # all layers slide / layer 0 full, the rest slide
def test_sliding_window_layers_keep_their_cache(family):
    model = make_tiny_model(family, sliding_window=64)
    ids = torch.randint(0, model.config.vocab_size, (1, 200), generator=torch.Generator().manual_seed(8))
    ref_tokens, ref_scores = greedy(model, ids, 8)
    ck.apply(model, make_profile(model, 1.0))
    cache = ck.make_cache(model, model._catekv.profile)
    tokens, scores = greedy(model, ids, 8, **{ck.cache_argument(model): cache})
    ck.remove(model)
    plain = DynamicCache(config=model.config)
    for layer, plain_layer in zip(cache.layers, plain.layers):
        assert isinstance(layer, CateKVLayer) == (not plain_layer.is_sliding)
        if plain_layer.is_sliding:
            assert type(layer) is type(plain_layer)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(scores, ref_scores, rtol=0, atol=1e-4)


def fresh_python(code: str) -> str:
    """What ``code`` prints in a new Python process run from the repository root (which must exit cleanly)."""
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_runtime_imports_no_other_package_of_the_project():
    """Every module of the runtime imports, and a shipped profile loads, without the profiler, the model loader
    (catekv_models), the evaluation or the server: the runtime stands alone on torch and safetensors."""
    code = (
        "import importlib, pkgutil, sys, catekv_runtime\n"
        "for module in pkgutil.walk_packages(catekv_runtime.__path__, 'catekv_runtime.'):\n"
        "    importlib.import_module(module.name)\n"
        "catekv_runtime.load_profile('smollm2-135m-instruct')\n"
        "others = ('catekv_profiler', 'catekv_models', 'catekv_eval', 'catekv_serve')\n"
        "print(sorted(name for name in sys.modules if name.startswith(others)))\n"
    )
    assert fresh_python(code) == "[]\n"


def test_missing_transformers_names_the_extra_to_install():
    """Without transformers, the core still loads profiles; apply and CateKVCache say what to install."""
    code = (
        "import sys; sys.modules['transformers'] = None\n"  # as if it were not installed
        "import catekv_runtime as ck\n"
        "assert ck.load_profile('smollm2-135m-instruct').num_layers == 30\n"
        "for name in ('apply', 'CateKVCache'):\n"
        "    try:\n"
        "        getattr(ck, name)\n"
        "    except ModuleNotFoundError as e:\n"
        "        print(e)\n"
    )
    assert fresh_python(code).splitlines() == [
        f"catekv_runtime.{name} needs transformers, which is not installed: pip install 'catekv[transformers]'"
        for name in ("apply", "CateKVCache")
    ]
