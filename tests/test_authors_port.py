"""Our statistics, vote and kept tokens against a port of the authors' code (jhy-123/CateKV).

The port below restates, in the authors' own vectorised form, ``prefill_kv_cache`` of their profiling cache
(models/kv_cache.py: regions, threshold, chunk hits, CV), the same function of their runtime cache (chunk
scores and the tokens each head keeps) and ``generate_final_matrices`` (select_headmask/static.py: the vote).
It imports nothing from catekv. Their code runs one sequence, with no causal mask over the middle keys, so
the inputs keep L_rec >= L_obs (no middle key follows an observation query) and init / recent in whole
chunks, as their asserts require.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from catekv_profiler.stats import LayerStats, layer_statistics
from catekv_runtime.cache import CateKVLayer
from catekv_runtime.profile import UNLIMITED_BUDGET, ProfileParams, vote_adaptive_heads

# ============================================================================ the authors' formulas


def authors_regions(incoming, chunk_size, init_tokens, recent_tokens, reserve):
    """``chunks``, ``chunk_end``, ``middle_chunks`` as their prefill computes them (their reserve is 32)."""
    chunks = incoming // chunk_size - reserve // chunk_size
    chunk_end = chunks * chunk_size
    middle_chunks = chunks - init_tokens // chunk_size - recent_tokens // chunk_size
    return chunks, chunk_end, middle_chunks


def authors_middle_attention(query, key, init_tokens, recent_tokens, chunk_end, last_q):
    """attn_last: softmax of the last queries over the middle keys, mean over each GQA group: [Hkv, last_q, n_mid]."""
    num_kv, head_dim = key.shape[0], key.shape[-1]
    groups = query.shape[0] // num_kv
    q_last = query[:, -last_q:, :]
    k_mid = key[:, init_tokens : chunk_end - recent_tokens, :].repeat_interleave(groups, dim=0)
    attn = torch.matmul(q_last, k_mid.transpose(1, 2)) / math.sqrt(head_dim)
    attn = torch.softmax(attn, dim=-1)
    return attn.view(num_kv, groups, -1, attn.shape[-1]).mean(dim=1)


def authors_profile_layer(query, key, *, chunk_size, init_tokens, recent_tokens, last_q, top_fraction,
                          top_threshold, reserve):
    """Threshold and CV per KV head (their ``top_fraction`` is k, ``top_threshold`` is alpha)."""
    _, chunk_end, _ = authors_regions(key.shape[1], chunk_size, init_tokens, recent_tokens, reserve)
    attn_last = authors_middle_attention(query, key, init_tokens, recent_tokens, chunk_end, last_q)
    q_last_num = attn_last.shape[1]
    flat = attn_last.reshape(attn_last.shape[0], -1).to(torch.float)
    vmin = torch.quantile(flat, 1 - top_fraction, dim=1, keepdim=True).unsqueeze(2).repeat(1, q_last_num, 1)
    vmax = torch.quantile(flat, top_fraction, dim=1, keepdim=True).unsqueeze(2).repeat(1, q_last_num, 1)
    threshold = torch.clamp(vmin + (vmax - vmin) * top_threshold, min=1e-9)
    data_gt_threshold = attn_last > threshold
    chunks = data_gt_threshold.view(data_gt_threshold.size(0), data_gt_threshold.size(1), -1, chunk_size)
    chunk_top_num = chunks.max(dim=3).values.sum(dim=1).float()
    top_mean_num = torch.mean(chunk_top_num, dim=1)
    top_std_num = torch.std(chunk_top_num, dim=1)
    top_mean_num[top_mean_num == 0] = 1e-10
    return threshold[:, 0, 0], top_std_num / top_mean_num


def authors_kept_positions(query, key, *, chunk_size, init_tokens, recent_tokens, last_q, sparse_budget,
                           full_fraction, sparse_heads, full_heads, reserve):
    """Token positions each head keeps after their runtime prefill, as sets, by KV head."""
    incoming = key.shape[1]
    _, chunk_end, middle_chunks = authors_regions(incoming, chunk_size, init_tokens, recent_tokens, reserve)
    attn_last = authors_middle_attention(query, key, init_tokens, recent_tokens, chunk_end, last_q)
    chunk_top_num = attn_last.view(attn_last.size(0), attn_last.size(1), -1, chunk_size).max(dim=-1).values
    chunk_top_num = chunk_top_num.sum(dim=1).float()  # [heads, chunks]
    select_sets = sparse_budget // chunk_size - recent_tokens // chunk_size - init_tokens // chunk_size
    kept = {}
    for heads, count in ((sparse_heads, select_sets), (full_heads, int(middle_chunks * full_fraction))):
        if not heads:
            continue
        top = chunk_top_num[heads].topk(k=count, dim=-1).indices
        positions = (top.unsqueeze(-1) * chunk_size + torch.arange(chunk_size)).view(len(heads), -1) + init_tokens
        for row, head in enumerate(heads):
            kept[head] = (set(range(init_tokens)) | set(positions[row].tolist())
                          | set(range(chunk_end - recent_tokens, incoming)))
    sizes = {"full": init_tokens + int(middle_chunks * full_fraction) * chunk_size + incoming - chunk_end
             + recent_tokens, "sparse": sparse_budget + incoming - chunk_end}
    return kept, sizes


def authors_final_head_map(cv_per_sample, alpha):
    """generate_final_matrices for one alpha (their alpha is our r): the tie-inclusive vote."""
    selected = [(m <= np.quantile(m, alpha)).astype(int) for m in cv_per_sample]
    sum_matrix = np.sum(selected, axis=0)
    flat_sum = sum_matrix.flatten()
    num_top = int(np.ceil(alpha * flat_sum.size))
    threshold = np.partition(flat_sum, -num_top)[-num_top]
    return sum_matrix >= threshold, sum_matrix


# ============================================================================ fixed inputs

NUM_KV, GROUP, HEAD_DIM = 4, 3, 32
CHUNK, INIT, RECENT, OBS = 8, 16, 32, 16  # L_rec >= L_obs, init and recent in whole chunks


def make_inputs(seed, n):
    """Post-RoPE-like q/k with a few keys every observation query likes (a consistent head) and flat heads."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(NUM_KV, n, HEAD_DIM, generator=g)
    queries = torch.randn(NUM_KV * GROUP, n, HEAD_DIM, generator=g)
    queries *= torch.linspace(0.5, 3.0, NUM_KV * GROUP)[:, None, None]
    u = torch.randn(HEAD_DIM, generator=g)
    u /= u.norm()
    queries[:GROUP, -OBS:] += 3.0 * u
    keys[0, torch.randint(INIT, n // 2, (4,), generator=g)] += 3.0 * u
    # local attention just before the recent window: what the reserve keeps out of the statistics
    keys[1, n - RECENT - 32 : n - RECENT] += 4.0 * queries[GROUP : 2 * GROUP, -OBS:].mean(dim=(0, 1))
    return queries, keys


def params(k=0.99, alpha=1.0, reserve=32, budget=INIT + RECENT + 6 * CHUNK, eta=1.0):
    return ProfileParams(percentile=k, alpha=alpha, budget=budget, chunk_size=CHUNK, obs_window=OBS,
                         init_tokens=INIT, recent_tokens=RECENT, reserve_tokens=reserve, eta=eta)


LENGTHS = [301, 517, 640]  # n mod c = 5, 5, 0


# ============================================================================ tests


@pytest.mark.parametrize("reserve", [32, 0])
@pytest.mark.parametrize("k,alpha", [(0.99, 1.0), (0.95, 1.0), (0.998, 1.0), (0.99, 0.8)])
@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("seed", [0, 1])
def test_statistics_equal_the_authors(seed, n, k, alpha, reserve):
    queries, keys = make_inputs(seed, n)
    mine = layer_statistics(queries[:, -OBS:], keys, HEAD_DIM**-0.5, params(k, alpha, reserve))
    mine = LayerStats(mine.cv[0], mine.threshold[0], mine.hit_mean[0])
    tau, cv = authors_profile_layer(queries, keys, chunk_size=CHUNK, init_tokens=INIT, recent_tokens=RECENT,
                                    last_q=OBS, top_fraction=k, top_threshold=alpha, reserve=reserve)
    # torch.quantile interpolates in float32; ours between the same two order statistics in float64
    torch.testing.assert_close(mine.threshold, tau, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(mine.cv, cv, rtol=1e-5, atol=1e-6)


def test_the_reserve_changes_the_statistics():
    """The inputs put local attention in the reserve: without it head 1's CV differs (the fix is not vacuous)."""
    for n in LENGTHS:
        queries, keys = make_inputs(0, n)
        with_reserve = layer_statistics(queries[:, -OBS:], keys, HEAD_DIM**-0.5, params(reserve=32)).cv[0]
        without = layer_statistics(queries[:, -OBS:], keys, HEAD_DIM**-0.5, params(reserve=0)).cv[0]
        assert without[1] > with_reserve[1] + 0.25, n


@pytest.mark.parametrize("reserve", [32, 0])
@pytest.mark.parametrize("eta", [1.0, 0.5])
@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("seed", [0, 1])
def test_kept_tokens_equal_the_authors(seed, n, eta, reserve):
    queries, keys = make_inputs(seed, n)
    p = params(reserve=reserve, eta=eta)
    adaptive = torch.tensor([False, True, False, True])
    budgets = torch.where(adaptive, UNLIMITED_BUDGET, p.budget)
    layer = CateKVLayer(budgets, p, reserve=0, eager=True)
    # What the engine's prefill copies into its slots: per head group, its heads and the positions each keeps.
    selections = layer.select_heads(keys, queries[:, -OBS:], HEAD_DIM**-0.5)
    kept, sizes = authors_kept_positions(
        queries, keys, chunk_size=CHUNK, init_tokens=INIT, recent_tokens=RECENT, last_q=OBS, sparse_budget=p.budget,
        full_fraction=eta, sparse_heads=[0, 2], full_heads=[1, 3], reserve=reserve)
    assert len(selections) == 2
    for heads, positions in selections:
        if positions is None:  # every token, in order
            positions = torch.arange(n).expand(heads.numel(), n)
        assert positions.shape[1] == sizes["full" if heads[0] in (1, 3) else "sparse"]
        for row, head in enumerate(heads.tolist()):
            assert positions[row].tolist() == sorted(kept[head]), f"head {head}"
    if reserve == 32:  # a consistent head holds B + 32 + n mod c tokens
        assert sizes["sparse"] == p.budget + 32 + n % CHUNK


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.4, 0.5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_inclusive_vote_equals_the_authors(seed, ratio):
    g = torch.Generator().manual_seed(seed)
    # few distinct CVs: many ties in the votes
    cv = torch.randint(0, 6, (7, 8, 4), generator=g).float() / 2
    head_map, votes = vote_adaptive_heads(cv, ratio, "inclusive")
    ref_map, ref_votes = authors_final_head_map([m.numpy() for m in cv.double()], ratio)
    assert votes.tolist() == ref_votes.tolist()
    assert head_map.tolist() == ref_map.tolist()
    exact, _ = vote_adaptive_heads(cv, ratio, "exact")
    assert not (exact & ~head_map).any(), "the exact vote keeps a subset of the inclusive one"
    assert int(exact.sum()) == math.ceil(ratio * 32 - 1e-9) <= int(head_map.sum())


def test_inclusive_vote_takes_more_heads_on_a_tie():
    cv = torch.tensor([[[1.0, 2.0, 2.0, 3.0]]])  # r = 0.5: three heads at or below the median, two places
    assert vote_adaptive_heads(cv, 0.5, "inclusive")[0].tolist() == [[True, True, True, False]]
    assert vote_adaptive_heads(cv, 0.5, "exact")[0].tolist() == [[True, True, False, False]]


def test_a_calibration_grid_equals_one_setting_at_a_time():
    """Every (k, alpha) of a grid, from one softmax and one sort per head, equals its own single run."""
    queries, keys = make_inputs(1, 517)
    grid = [(0.9, 0.8), (0.95, 1.0), (0.98, 0.8), (0.99, 1.0), (0.995, 1.0), (0.998, 0.8)]
    together = layer_statistics(queries[:, -OBS:], keys, HEAD_DIM**-0.5, params(), grid)
    assert together.cv.shape == (len(grid), NUM_KV)
    for i, (k, alpha) in enumerate(grid):
        alone = layer_statistics(queries[:, -OBS:], keys, HEAD_DIM**-0.5, params(k, alpha))
        for name in ("cv", "threshold", "hit_mean"):
            assert torch.equal(getattr(together, name)[i], getattr(alone, name)[0]), (k, alpha, name)
        _, cv = authors_profile_layer(queries, keys, chunk_size=CHUNK, init_tokens=INIT, recent_tokens=RECENT,
                                      last_q=OBS, top_fraction=k, top_threshold=alpha, reserve=32)
        torch.testing.assert_close(together.cv[i], cv, rtol=1e-5, atol=1e-6)
