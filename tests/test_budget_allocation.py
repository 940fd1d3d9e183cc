"""benchmarks/budget_allocation.py: its two rules against an exhaustive search, and its coverage curves on a tiny model."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.budget_allocation import coverage_curves, equal_coverage, most_coverage  # noqa: E402
from catekv_runtime.params import ProfileParams  # noqa: E402


def random_curves(seed: int, heads: int, chunks: int, concave: bool) -> torch.Tensor:
    """``[1, heads, chunks + 1]`` curves from 0 to 1: cumulative shares of random chunk masses, sorted descending
    (concave, as the best chunks first give) or not."""
    g = torch.Generator().manual_seed(seed)
    mass = torch.rand(heads, chunks, generator=g) ** 3
    if concave:
        mass = mass.sort(dim=-1, descending=True).values
    held = mass.cumsum(-1) / mass.sum(-1, keepdim=True)
    return torch.cat([torch.zeros(heads, 1), held], dim=-1)[None]


def allocations(consistent: torch.Tensor, chunks: int, total: int):
    """Every way to give ``total`` chunks (at most ``chunks`` each) to the consistent heads."""
    heads = consistent.nonzero().tolist()
    for counts in itertools.product(range(chunks + 1), repeat=len(heads)):
        if sum(counts) == total:
            out = torch.zeros(consistent.shape, dtype=torch.int64)
            for (layer, head), count in zip(heads, counts):
                out[layer, head] = count
            yield out


def coverage(curves: torch.Tensor, chunks: torch.Tensor, consistent: torch.Tensor) -> torch.Tensor:
    return curves.gather(-1, chunks[..., None]).squeeze(-1)[consistent]


@pytest.mark.parametrize("seed", range(6))
def test_most_coverage_is_the_largest_total_on_concave_curves(seed):
    curves = random_curves(seed, heads=4, chunks=5, concave=True)
    consistent = torch.tensor([[True, False, True, True]])
    for total in (0, 4, 9, 15):
        chunks = most_coverage(curves, consistent, total)
        assert int(chunks.sum()) == total and not chunks[~consistent].any()
        best = max(coverage(curves, a, consistent).sum().item() for a in allocations(consistent, 5, total))
        assert coverage(curves, chunks, consistent).sum().item() == pytest.approx(best, abs=1e-6)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("concave", [True, False])
def test_equal_coverage_has_the_largest_least_coverage(seed, concave):
    curves = random_curves(seed, heads=4, chunks=5, concave=concave)
    consistent = torch.tensor([[True, True, False, True]])
    for total in (3, 7, 12):
        chunks = equal_coverage(curves, consistent, total)
        assert int(chunks.sum()) == total and not chunks[~consistent].any()
        best = max(coverage(curves, a, consistent).min().item() for a in allocations(consistent, 5, total))
        assert coverage(curves, chunks, consistent).min().item() == pytest.approx(best, abs=1e-6)


def test_more_chunks_than_the_heads_hold_stop_at_all_of_them():
    curves = random_curves(0, heads=3, chunks=4, concave=True)
    consistent = torch.ones(1, 3, dtype=torch.bool)
    for rule in (most_coverage, equal_coverage):
        assert rule(curves, consistent, 20).tolist() == [[4, 4, 4]]


def test_coverage_curves_on_a_tiny_model():
    """Curves run from 0 to 1, never fall, and hold one point per middle chunk of the shortest sample."""
    model = make_tiny_model("llama")
    params = ProfileParams(budget=64, init_tokens=8, recent_tokens=16, obs_window=8)
    g = torch.Generator().manual_seed(0)
    samples = [torch.randint(0, 100, (n,), generator=g).tolist() for n in (200, 196)]
    curves = coverage_curves(model, samples, params)
    config = model.config
    assert curves.shape == (config.num_hidden_layers, config.num_key_value_heads, params.regions(196).num_chunks + 1)
    assert (curves[..., 0] == 0).all() and (curves.diff(dim=-1) >= -1e-6).all()
    assert curves[..., -1].min().item() > 0.9  # every chunk of the shorter sample, all but one of the longer's
