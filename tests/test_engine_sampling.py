"""Sampling: parameter checks, the draws' distribution against a plain reference of the filters, seeds."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_tiny_model
from test_engine import one_thread  # noqa: F401 (autouse)

from catekv_runtime.engine import Engine, SamplingParams
from catekv_runtime.engine.sampling import Filters, sample


@pytest.mark.parametrize("field, value", [
    ("max_tokens", 0), ("max_tokens", 1.5), ("temperature", -0.1), ("temperature", float("nan")),
    ("top_p", 0.0), ("top_p", 1.01), ("top_k", -2), ("min_p", 1.5), ("stop", 3), ("stop", ["ok", 4]),
    ("stop", [""]), ("stop_token_ids", [-1]), ("stop_token_ids", "2"), ("seed", 1.0), ("ignore_eos", 1),
])
def test_bad_sampling_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_sampling_params_defaults_and_stop_forms():
    p = SamplingParams()
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p) == (16, 1.0, 1.0, 0, 0.0)
    assert SamplingParams(stop="x").stop_strings == ("x",)
    assert SamplingParams(stop=["a", "b"]).stop_strings == ("a", "b")
    assert SamplingParams(top_k=-1).top_k == -1 and SamplingParams(temperature=0).greedy


def reference_distribution(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
                           min_p: float = 0.0) -> torch.Tensor:
    """vLLM's filters written plainly in float64, one token at a time: temperature, min-p, top-k, top-p."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    kept = [i for i in range(len(probs)) if probs[i] >= min_p * probs.max()]
    kept.sort(key=lambda i: -probs[i].item())
    if top_k > 0:
        kept = kept[:top_k]
    total = sum(probs[i].item() for i in kept)
    chosen, mass = [], 0.0
    for i in kept:
        if mass >= top_p * total and chosen:
            break
        chosen.append(i)
        mass += probs[i].item()
    out = torch.zeros_like(probs)
    out[chosen] = probs[chosen]
    return out / out.sum()


def draw(logits, n, *, temperature, top_k=0, top_p=1.0, min_p=0.0, vary="seed"):
    """``n`` draws from one row of logits: one per seed (counter 0), or one request's first ``n`` counters."""
    index = torch.arange(n)
    seeds = index if vary == "seed" else torch.full((n,), 12345)
    counters = torch.zeros(n, dtype=torch.long) if vary == "seed" else index
    tokens = sample(logits.expand(n, -1), torch.full((n,), temperature), torch.full((n,), top_k),
                    torch.full((n,), top_p), torch.full((n,), min_p), seeds, counters)
    return torch.bincount(tokens, minlength=logits.shape[-1]).double() / n


CASES = [dict(temperature=0.7), dict(temperature=1.0, top_k=10), dict(temperature=1.3, top_p=0.8),
         dict(temperature=1.0, min_p=0.1), dict(temperature=0.9, top_k=20, top_p=0.9, min_p=0.05)]


@pytest.mark.parametrize("vary", ["seed", "counter"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_draws_follow_the_filtered_softmax(case, vary):
    """N = 20000 draws (fixed seeds, so the test is deterministic). Tolerances: no draw outside the reference's
    support; total variation at most twice 0.5 * sqrt(2 K / (pi N)), a bound on its expectation with K tokens kept
    (observed: 0.5-1.1 times that bound); every token within 5 standard errors + 1e-3. The same draws are far
    (TV > 0.05) from the distribution without the filters at another temperature, so the test can tell them apart."""
    n = 20000
    logits = torch.randn(256, generator=torch.Generator().manual_seed(7)) * 2
    expected = reference_distribution(logits, **case)
    empirical = draw(logits, n, vary=vary, **case)
    assert empirical[expected == 0].sum() == 0
    tv = 0.5 * (empirical - expected).abs().sum().item()
    kept = int((expected > 0).sum())
    assert tv <= 2 * 0.5 * math.sqrt(2 * kept / (math.pi * n)), (tv, kept)
    sigma = (expected * (1 - expected) / n).sqrt()
    assert bool(((empirical - expected).abs() <= 5 * sigma + 1e-3).all())
    unfiltered = reference_distribution(logits, case["temperature"] * 1.5)
    assert 0.5 * (empirical - unfiltered).abs().sum().item() > 0.05


def test_greedy_rows_take_the_argmax_beside_sampled_rows():
    logits = torch.randn(4, 256, generator=torch.Generator().manual_seed(1))
    temperature = torch.tensor([0.0, 1.0, 0.0, 1.0])
    tokens = sample(logits, temperature, torch.zeros(4, dtype=torch.long), torch.ones(4), torch.zeros(4),
                    torch.arange(4), torch.zeros(4, dtype=torch.long))
    assert tokens[0] == logits[0].argmax() and tokens[2] == logits[2].argmax()
    assert sample(logits, torch.zeros(4), torch.zeros(4, dtype=torch.long), torch.ones(4), torch.zeros(4),
                  torch.arange(4), torch.zeros(4, dtype=torch.long), Filters()).equal(logits.argmax(-1))


def test_a_rows_draw_depends_only_on_its_seed_and_counter():
    logits = torch.randn(6, 256, generator=torch.Generator().manual_seed(2))
    args = (torch.ones(6), torch.zeros(6, dtype=torch.long), torch.ones(6), torch.zeros(6))
    seeds, counters = torch.tensor([5, 6, 7, 8, 9, 10]), torch.tensor([0, 3, 1, 4, 1, 5])
    together = sample(logits, *args, seeds, counters)
    for i in range(6):
        alone = sample(logits[i : i + 1], *(a[i : i + 1] for a in args), seeds[i : i + 1], counters[i : i + 1])
        assert alone.item() == together[i].item()


def test_engine_first_token_distribution_and_seeds():
    """The engine's first token over 1500 requests (seeds 0..1499) follows the filtered softmax of the model's own
    last-position logits (TV <= 0.06; expected ~0.03 for the 8 tokens top-k keeps), and each draw is the sampler's
    for that seed: the engine passes the right logits, seed and counter."""
    model = make_tiny_model("llama")
    prompt = torch.randint(3, 256, (12,), generator=torch.Generator().manual_seed(3)).tolist()
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1]
    temperature = 0.02  # the random tiny model's logits are close together
    engine = Engine(model, None, max_batch_size=64, max_model_len=32)
    n = 1500
    params = [SamplingParams(max_tokens=1, temperature=temperature, top_k=8, seed=s) for s in range(n)]
    tokens = torch.tensor([o.token_ids[0] for o in engine.generate([prompt] * n, params)])
    expected = reference_distribution(logits, temperature, top_k=8)
    empirical = torch.bincount(tokens, minlength=256).double() / n
    assert empirical[expected == 0].sum() == 0
    assert 0.5 * (empirical - expected).abs().sum().item() <= 0.06
    direct = sample(logits.expand(n, -1), torch.full((n,), temperature), torch.full((n,), 8), torch.ones(n),
                    torch.zeros(n), torch.arange(n), torch.zeros(n, dtype=torch.long))
    agree = (direct == tokens).double().mean().item()
    assert agree > 0.99, agree  # float32 logits of two code paths: a near tie may flip a rare draw


def test_same_seed_same_tokens_whatever_the_batch():
    """A seeded request gives the same tokens alone, twice, and among other requests (which differ from it)."""
    model = make_tiny_model("qwen2")
    batch = [torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (40, 70, 55)]
    seeded = SamplingParams(max_tokens=10, temperature=0.05, top_p=0.95, seed=42, ignore_eos=True)
    engine = Engine(model, None, max_batch_size=3, max_model_len=128)
    alone = engine.generate(batch[0], seeded)[0].token_ids
    assert engine.generate(batch[0], seeded)[0].token_ids == alone
    others = [SamplingParams(max_tokens=14, temperature=0.05, seed=s, ignore_eos=True) for s in (1, 2)]
    mixed = engine.generate([batch[1], batch[0], batch[2]], [others[0], seeded, others[1]])
    assert mixed[1].token_ids == alone
    reseeded = engine.generate(batch[0], SamplingParams(max_tokens=10, temperature=0.05, top_p=0.95, seed=43,
                                                        ignore_eos=True))[0].token_ids
    assert reseeded != alone
    assert not math.isnan(sum(alone))
