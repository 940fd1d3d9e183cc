"""Independent check of the offline statistics and the runtime selection against docs/method.md.

The first section is a deliberately naive reference implementation written straight from the method
description (steps 1-6, "Across samples", "Runtime"). It imports nothing from catekv: loops over heads and
queries, an explicit softmax, ``torch.quantile`` for the percentiles, and float64 arithmetic on the inputs
upcast to float32 first (so a bfloat16 input is compared against the very same values).
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from catekv_profiler.stats import (
    LayerStats,
    chunk_hits,
    coefficient_of_variation,
    head_thresholds,
    layer_statistics,
    sorted_quantile,
)
from catekv_runtime.profile import ProfileParams, adaptive_keep_chunks, vote_adaptive_heads
from catekv_runtime.selection import Regions, chunk_scores, observation_probs, retained_indices, top_chunks

# ============================================================================ naive reference (no catekv)


def ref_observation_probs(queries, keys_mid, scale, query_start, key_start):
    """Step 3: A[h] = mean over the query heads of KV head h of softmax over the middle keys a query can see.

    queries [num_q, L_obs, d] (first at absolute position query_start), keys_mid [num_kv, n_mid, d]
    (first at key_start). Query head i belongs to KV head i // group. A query that sees no middle key
    gets an all-zero row. Returns float64 [num_kv, L_obs, n_mid].
    """
    q = queries.to(torch.float32).double()
    k = keys_mid.to(torch.float32).double()
    num_q, obs, _ = q.shape
    num_kv, n_mid, _ = k.shape
    group = num_q // num_kv
    out = torch.zeros(num_kv, obs, n_mid, dtype=torch.float64)
    key_pos = torch.arange(key_start, key_start + n_mid)
    for kv in range(num_kv):
        for j in range(group):
            qh = kv * group + j
            for i in range(obs):
                q_pos = query_start + i
                visible = key_pos <= q_pos  # causality: a query never sees a later key
                if not visible.any():
                    continue
                logits = (k[kv] @ q[qh, i]) * scale
                peak = logits[visible].max()
                e = torch.where(visible, torch.exp(logits - peak), torch.zeros((), dtype=torch.float64))
                out[kv, i] += e / e.sum() / group
    return out


def ref_threshold(values, k, alpha):
    """Step 4 with torch.quantile (float64): tau = P_{1-k} + alpha (P_k - P_{1-k}), at least 1e-9."""
    flat = values.double().reshape(-1)
    low = torch.quantile(flat, 1.0 - k).item()
    high = torch.quantile(flat, k).item()
    return max(low + alpha * (high - low), 1e-9)


def ref_hits(a_h, tau, c):
    """Step 5: hits[j] = number of queries with at least one token of chunk j strictly above tau."""
    rows = a_h.double().tolist()
    num_chunks = len(rows[0]) // c
    hits = []
    for j in range(num_chunks):
        hits.append(sum(1 for row in rows if any(row[j * c + t] > tau for t in range(c))))
    return hits


def ref_cv(hits):
    """Step 6: unbiased std / mean over chunks; 0 for a head with no hits (undefined for a single chunk)."""
    n = len(hits)
    mean = sum(hits) / n
    if mean == 0:
        return 0.0
    if n < 2:
        return float("nan")
    var = sum((x - mean) ** 2 for x in hits) / (n - 1)
    return math.sqrt(var) / mean


def ref_regions(n, init, recent, c, reserve):
    """Step 2 as the authors' code cuts it (models/kv_cache.py, prefill_kv_cache, with their 32 as ``reserve``):
    ``chunks = n // c - reserve // c``, ``chunk_end = chunks * c``, middle ``[init, chunk_end - recent)`` of
    ``chunks - init // c - recent // c`` chunks. Their code needs init and recent in whole chunks.
    Returns (mid_start, mid_end, num_chunks)."""
    assert init % c == 0 and recent % c == 0
    chunks = n // c - reserve // c  # chunk_end = chunks * c; the middle ends at chunk_end - recent
    num_chunks = max(0, chunks - init // c - recent // c)
    return init, init + num_chunks * c, num_chunks


def ref_layer(queries, keys, scale, k, alpha, c, init, recent, reserve, band=0.0):
    """Steps 1-6 for one layer. Returns per KV head dicts: tau, hits, cv, and hits at tau*(1 +- band)."""
    n = keys.shape[1]
    obs = queries.shape[1]
    mid_start, mid_end, _ = ref_regions(n, init, recent, c, reserve)
    a = ref_observation_probs(queries, keys[:, mid_start:mid_end], scale, n - obs, mid_start)
    heads = []
    for h in range(a.shape[0]):
        tau = ref_threshold(a[h], k, alpha)
        hits = ref_hits(a[h], tau, c)
        heads.append(
            {
                "tau": tau,
                "hits": hits,
                "cv": ref_cv(hits),
                "hits_strict": ref_hits(a[h], tau * (1 + band), c),  # fewest hits a small error can give
                "hits_loose": ref_hits(a[h], tau * (1 - band), c),  # most hits a small error can give
            }
        )
    return a, heads


def ref_exact_ceil(r, n):
    """ceil(r * n) for the decimal number r as written (0.1 * 30 is 3, not 4)."""
    return math.ceil(Fraction(repr(r)) * n)


def ref_votes(cv, r):
    """"Across samples": votes and the final adaptive set, by the rule in docs/method.md (tie_rule "exact").

    A head votes in a sample if its CV is at or below the r-quantile (linear interpolation) of the sample's
    L*H CVs. With exact arithmetic that is CV <= sorted[floor(r * (N - 1))]: every larger CV is at least
    sorted[floor + 1] >= the quantile, and equal to it only when it equals sorted[floor].
    Then the ceil(r*N) heads with most votes; ties: lower mean CV, then lower flat (layer-major) index.
    """
    samples, layers, heads = cv.shape
    n = layers * heads
    votes = [0] * n
    for s in range(samples):
        values = cv[s].double().reshape(-1).tolist()
        pos = Fraction(repr(r)) * (n - 1)
        cutoff = sorted(values)[math.floor(pos)]
        for i in range(n):
            if values[i] <= cutoff:
                votes[i] += 1
    mean_cv = [sum(cv[s].double().reshape(-1)[i].item() for s in range(samples)) / samples for i in range(n)]
    order = sorted(range(n), key=lambda i: (-votes[i], mean_cv[i], i))
    chosen = set(order[: ref_exact_ceil(r, n)])
    head_map = torch.tensor([i in chosen for i in range(n)]).reshape(layers, heads)
    return head_map, torch.tensor(votes, dtype=torch.int64).reshape(layers, heads)


def ref_scores(a_h, c):
    """Runtime: score[chunk] = sum over the observation queries of the max probability inside the chunk."""
    rows = a_h.double().tolist()
    num_chunks = len(rows[0]) // c
    return [sum(max(row[j * c : (j + 1) * c]) for row in rows) for j in range(num_chunks)]


def ref_kept_tokens(n, init, c, num_chunks, scores, keep):
    """Runtime: first init tokens, the `keep` best chunks, every token from the end of the chunk region on."""
    best = sorted(range(num_chunks), key=lambda j: -scores[j])[:keep]
    kept = set(range(init))
    for j in best:
        kept.update(range(init + j * c, init + (j + 1) * c))
    kept.update(range(init + num_chunks * c, n))
    return kept


def quantile(values, q):
    """catekv's quantile of any tensor: one sort, then the order statistics (what the profiler reads)."""
    return sorted_quantile(values.reshape(-1).sort().values, q)


def head_threshold(probs, k, alpha):
    """catekv's threshold of one setting, from one head's probabilities."""
    return head_thresholds(probs.reshape(-1).sort().values, [(k, alpha)])[0]


# ============================================================================ inputs

HEAD_DIM = 16
NUM_KV = 2
OBS = 16
CHUNK = 4
INIT = 4
SCALE = HEAD_DIM**-0.5
# Relative tolerance of the probabilities computed by catekv, per input dtype. Both sides start from the same
# (bf16-rounded) values, so the remaining differences are float32-vs-float64 arithmetic; the bf16 bound is
# looser to allow a kernel that accumulates in reduced precision (a whole bf16 softmax, ~4e-3, would fail).
PROB_RTOL = {torch.float32: 2e-5, torch.bfloat16: 1e-3}
# Hit counts are compared exactly except for tokens within this relative distance of tau. It is the float32
# bound for both input dtypes: catekv upcasts bf16 inputs, so its probabilities differ from the reference's
# by float32 rounding only; a reduced-precision softmax would move tokens across tau and should be noticed.
HIT_BAND = 1e-4


def make_qk(seed, group, n, dtype):
    """Random post-RoPE-like queries/keys with structure: peaky and flat heads, a few keys all queries like."""
    g = torch.Generator().manual_seed(seed)
    num_q = NUM_KV * group
    keys = torch.randn(NUM_KV, n, HEAD_DIM, generator=g)
    queries = torch.randn(num_q, OBS, HEAD_DIM, generator=g)
    queries *= torch.linspace(0.5, 4.0, num_q)[:, None, None]  # temperature: flat ... peaky
    # KV head 0 is made "consistent": its queries share a direction and a few middle keys point along it.
    u = torch.randn(HEAD_DIM, generator=g)
    u /= u.norm()
    queries[:group] += 3.0 * u
    hot = torch.randint(INIT, max(INIT + 1, n // 2), (3,), generator=g)
    keys[0, hot] += 3.0 * u
    return queries.to(dtype), keys.to(dtype)


def params_for(k, alpha, recent, reserve=0):
    return ProfileParams(
        percentile=k, alpha=alpha, chunk_size=CHUNK, obs_window=OBS, init_tokens=INIT, recent_tokens=recent,
        budget=INIT + recent + 5 * CHUNK, reserve_tokens=reserve,
    )


LENGTHS = [70, 96, 133]  # 70 and 133 leave a partial chunk before the recent tokens
RECENTS = [8, 24]  # 8 < L_obs = 16: some middle keys follow some observation queries (causal mask); 24 >= 16
RESERVES = [0, 10]  # 10 tokens: 2 whole chunks of 4, as the authors' 32 // c rounds
GROUPS = [1, 2, 4]
DTYPES = [torch.float32, torch.bfloat16]
K_ALPHA = [(0.9, 1.0), (0.99, 1.0), (0.9, 0.8), (0.99, 0.8)]
SEEDS = [0, 1, 2]


def test_reference_sanity():
    """The reference itself: rows sum to 1, causality holds, the causal case really occurs."""
    q, k = make_qk(0, 2, 70, torch.float32)
    _, mid_end, _ = ref_regions(70, INIT, 8, CHUNK, 0)
    a = ref_observation_probs(q, k[:, INIT:mid_end], SCALE, 70 - OBS, INIT)
    torch.testing.assert_close(a.sum(-1), torch.ones(NUM_KV, OBS, dtype=torch.float64))
    for i in range(OBS):
        q_pos = 70 - OBS + i
        first_invisible = q_pos + 1 - INIT
        if first_invisible < a.shape[-1]:
            assert (a[:, i, first_invisible:] == 0).all()
    assert (a[:, 0, -1] == 0).all(), "with L_rec < L_obs the first observation query must not see the last middle key"


# ============================================================================ steps 1-6, end to end


@pytest.mark.parametrize("reserve", RESERVES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("k,alpha", K_ALPHA)
@pytest.mark.parametrize("recent", RECENTS)
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("group", GROUPS)
def test_layer_statistics_matches_reference(group, length, recent, k, alpha, dtype, reserve):
    params = params_for(k, alpha, recent, reserve)
    rtol = PROB_RTOL[dtype]
    compared = 0
    total = 0
    for seed in SEEDS:
        q, keys = make_qk(seed, group, length, dtype)
        stats = layer_statistics(q, keys, SCALE, params)
        assert stats.cv.shape == stats.threshold.shape == stats.hit_mean.shape == (1, NUM_KV)
        stats = LayerStats(stats.cv[0], stats.threshold[0], stats.hit_mean[0])  # the one (k, alpha) setting
        _, heads = ref_layer(q, keys, SCALE, k, alpha, CHUNK, INIT, recent, reserve, band=HIT_BAND)
        assert stats.cv.shape == stats.threshold.shape == stats.hit_mean.shape == (NUM_KV,)
        assert stats.cv.dtype == stats.threshold.dtype == stats.hit_mean.dtype == torch.float32
        for h, ref in enumerate(heads):
            total += 1
            ctx = f"seed={seed} head={h}"
            assert stats.threshold[h].item() == pytest.approx(ref["tau"], rel=5 * rtol), f"tau {ctx}"
            n_chunks = len(ref["hits"])
            lo = sum(ref["hits_strict"]) / n_chunks
            hi = sum(ref["hits_loose"]) / n_chunks
            assert lo - 1e-6 <= stats.hit_mean[h].item() <= hi + 1e-6, f"hit_mean {ctx}: {stats.hit_mean[h]} not in [{lo}, {hi}]"
            if ref["hits_strict"] == ref["hits_loose"]:  # no token within rounding distance of tau
                compared += 1
                assert stats.hit_mean[h].item() == pytest.approx(sum(ref["hits"]) / n_chunks, rel=1e-6), ctx
                assert stats.cv[h].item() == pytest.approx(ref["cv"], rel=1e-5, abs=1e-6), f"cv {ctx}"
    assert compared >= total - 2, f"only {compared}/{total} heads were unambiguous; tolerance band too wide?"


# ============================================================================ the pieces, on identical inputs


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("recent", RECENTS)
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("group", GROUPS)
def test_observation_probs_matches_reference(group, length, recent, dtype):
    for seed in SEEDS:
        q, keys = make_qk(seed, group, length, dtype)
        mid_start, mid_end, _ = ref_regions(length, INIT, recent, CHUNK, 0)
        mine = observation_probs(q, keys[:, mid_start:mid_end], SCALE, length - OBS, mid_start)
        ref = ref_observation_probs(q, keys[:, mid_start:mid_end], SCALE, length - OBS, mid_start)
        assert mine.dtype == torch.float32 and mine.shape == ref.shape
        torch.testing.assert_close(mine.double(), ref, rtol=PROB_RTOL[dtype], atol=1e-7)
        # causality is exact: keys after a query's position get exactly zero
        assert (mine[ref == 0] == 0).all()


def test_observation_probs_query_that_sees_no_middle_key():
    """A query before the middle region (prompt barely longer than the window) gets a zero row, not NaN."""
    q, keys = make_qk(0, 2, 40, torch.float32)
    mine = observation_probs(q, keys[:, 20:32], SCALE, 10, 20)  # queries at 10..25, keys at 20..31
    ref = ref_observation_probs(q, keys[:, 20:32], SCALE, 10, 20)
    assert torch.isfinite(mine).all()
    torch.testing.assert_close(mine.double(), ref, rtol=2e-5, atol=1e-7)
    assert (mine[:, :10] == 0).all()


@pytest.mark.parametrize("k,alpha", K_ALPHA)
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("group", GROUPS)
def test_threshold_hits_cv_on_identical_probs(group, length, k, alpha):
    for seed in SEEDS:
        q, keys = make_qk(seed, group, length, torch.float32)
        mid_start, mid_end, _ = ref_regions(length, INIT, 8, CHUNK, 0)
        probs = ref_observation_probs(q, keys[:, mid_start:mid_end], SCALE, length - OBS, mid_start).float()
        for h in range(NUM_KV):
            tau = head_threshold(probs[h], k, alpha)
            assert tau.numel() == 1
            assert tau.item() == pytest.approx(ref_threshold(probs[h], k, alpha), rel=1e-5)
            # same float32 probabilities, same float32 tau: the hit counts must be identical
            hits = chunk_hits(probs[h], tau, CHUNK)
            assert hits.tolist() == ref_hits(probs[h], tau.item(), CHUNK)
            assert coefficient_of_variation(hits).item() == pytest.approx(ref_cv(hits.tolist()), rel=1e-6, abs=1e-7)


def test_threshold_is_clamped():
    assert head_threshold(torch.zeros(16, 32), 0.99, 1.0).item() == pytest.approx(1e-9, rel=1e-6)
    # alpha = 0: tau is P_{1-k}
    v = torch.arange(101, dtype=torch.float64)
    assert head_threshold(v, 0.9, 0.0).item() == pytest.approx(10.0)
    assert head_threshold(v, 0.9, 1.0).item() == pytest.approx(90.0)
    assert head_threshold(v, 0.9, 0.5).item() == pytest.approx(50.0)


def test_chunk_hits_strict_and_any():
    probs = torch.tensor(
        [
            [0.5, 0.0, 0.0, 0.0, 0.0, 0.0],
            [0.0, 0.2, 0.0, 0.0, 0.6, 0.7],
            [0.2, 0.2, 0.2, 0.2, 0.2, 0.2],
        ]
    )
    hits = chunk_hits(probs, torch.tensor(0.2), 2)  # 0.2 itself is not critical (strict >)
    assert hits.tolist() == [1.0, 0.0, 1.0]  # a chunk counts once per query even with two critical tokens
    assert hits.tolist() == ref_hits(probs, torch.tensor(0.2).item(), 2)


@pytest.mark.parametrize("seed", SEEDS)
def test_cv_random_hits(seed):
    g = torch.Generator().manual_seed(seed)
    for n in (2, 3, 17, 64):
        hits = torch.randint(0, 65, (n,), generator=g).float()
        assert coefficient_of_variation(hits).item() == pytest.approx(ref_cv(hits.tolist()), rel=1e-6, abs=1e-7)


def test_cv_degenerate_heads():
    # the spec: a head with no hits gets CV 0
    assert coefficient_of_variation(torch.zeros(10)).item() == 0.0
    # every chunk hit equally often: std 0, CV 0
    assert coefficient_of_variation(torch.full((10,), 7.0)).item() == 0.0
    # one chunk: the unbiased std is undefined; catekv's choice is 0 (never NaN)
    assert coefficient_of_variation(torch.tensor([5.0])).item() == 0.0


@pytest.mark.parametrize("group", GROUPS)
def test_all_equal_attention_gives_cv_zero(group):
    """Uniform attention: every value equals the threshold, none is above it, so no hits and CV 0 (spec step 6)."""
    params = params_for(0.99, 1.0, 24)  # L_rec >= L_obs: no causal mask, so A is exactly uniform
    n = 96
    q = torch.zeros(NUM_KV * group, OBS, HEAD_DIM)  # all logits 0
    keys = torch.randn(NUM_KV, n, HEAD_DIM, generator=torch.Generator().manual_seed(0))
    stats = layer_statistics(q, keys, SCALE, params)
    _, _, num_chunks = ref_regions(n, INIT, 24, CHUNK, 0)
    assert stats.cv.tolist() == [[0.0] * NUM_KV]
    assert stats.hit_mean.tolist() == [[0.0] * NUM_KV]
    assert stats.threshold[0, 0].item() == pytest.approx(1 / (num_chunks * CHUNK), rel=1e-6)


def test_layer_statistics_refuses_prompt_without_middle_chunk():
    params = params_for(0.99, 1.0, 24)
    q, keys = make_qk(0, 1, INIT + 24 + CHUNK - 1, torch.float32)
    with pytest.raises(ValueError, match="no middle chunk"):
        layer_statistics(q, keys, SCALE, params)


# ============================================================================ quantile


@pytest.mark.parametrize("n", [1, 2, 5, 97, 1000])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_quantile_equals_torch_quantile(n, dtype):
    g = torch.Generator().manual_seed(n)
    for values in (torch.rand(n, generator=g), torch.randint(0, 4, (n,), generator=g).float(), torch.rand(n, 3)):
        values = values.to(dtype)
        for q in (0.0, 0.01, 1 - 0.99, 0.1, 0.37, 0.5, 0.9, 0.99, 0.996, 1.0):
            expected = torch.quantile(values.reshape(-1), q)
            got = quantile(values, q)
            assert got.dtype == dtype
            tol = 1e-12 if dtype == torch.float64 else 1e-6
            assert got.item() == pytest.approx(expected.item(), rel=tol, abs=tol), f"q={q} n={n}"


def test_quantile_beyond_torch_quantile_limit():
    n = 2**24 + 5
    stride = 7919  # prime, and n is not a multiple of it: i * stride mod n is a permutation of 0..n-1
    assert n % stride != 0
    with pytest.raises(RuntimeError, match="too large"):  # an expanded tensor fails the same check, cheaply
        torch.quantile(torch.zeros(1).expand(n), 0.99)
    values = ((torch.arange(n, dtype=torch.int64) * stride) % n).double()
    # the q-quantile of a permutation of 0..n-1 is q * (n - 1)
    assert quantile(values, 0.99).item() == pytest.approx(0.99 * (n - 1), rel=1e-12)


# ============================================================================ votes across samples


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.25, 0.28, 0.4, 0.5, 0.75, 1.0])
@pytest.mark.parametrize("shape", [(1, 4, 3), (4, 4, 3), (5, 5, 6), (3, 5, 5), (7, 3, 8)])
@pytest.mark.parametrize("seed", SEEDS)
def test_votes_match_reference_random(seed, shape, ratio):
    cv = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 3
    head_map, votes = vote_adaptive_heads(cv, ratio)
    ref_map, ref_v = ref_votes(cv, ratio)
    assert votes.dtype == torch.int64 and head_map.dtype == torch.bool
    assert torch.equal(votes, ref_v)
    assert torch.equal(head_map, ref_map)


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.4, 1.0])
@pytest.mark.parametrize("shape", [(3, 5, 6), (6, 4, 2), (2, 1, 7)])
@pytest.mark.parametrize("seed", SEEDS)
def test_votes_with_ties_deterministic_and_exact_count(seed, shape, ratio):
    # CVs from a set of 3 exact values: many equal CVs, equal votes and equal mean CVs
    cv = torch.tensor([0.5, 1.0, 1.5])[torch.randint(0, 3, shape, generator=torch.Generator().manual_seed(seed))]
    head_map, votes = vote_adaptive_heads(cv, ratio)
    count = ref_exact_ceil(ratio, shape[1] * shape[2])
    assert int(head_map.sum()) == count, f"ceil({ratio} * {shape[1] * shape[2]}) = {count} adaptive heads expected"
    again_map, again_votes = vote_adaptive_heads(cv.clone(), ratio)
    assert torch.equal(head_map, again_map) and torch.equal(votes, again_votes)
    ref_map, ref_v = ref_votes(cv, ratio)
    assert torch.equal(votes, ref_v)
    assert torch.equal(head_map, ref_map)


def test_votes_tie_break_by_mean_cv_then_index():
    # votes tie 1-1; head 1 has the lower mean CV
    cv = torch.tensor([[[1.0, 2.0, 3.0, 4.0]], [[2.0, 0.5, 3.5, 4.0]]])
    head_map, votes = vote_adaptive_heads(cv, 0.25)
    assert votes.tolist() == [[1, 1, 0, 0]]
    assert head_map.tolist() == [[False, True, False, False]]
    # full tie (votes and mean CV): the lower flat index wins
    cv = torch.tensor([[[1.0, 1.0, 2.0, 3.0]], [[1.0, 1.0, 2.0, 3.0]]])
    head_map, votes = vote_adaptive_heads(cv, 0.25)
    assert votes.tolist() == [[2, 2, 0, 0]]
    assert head_map.tolist() == [[True, False, False, False]]
    # layer-major flat index: head (0, 1) comes before (1, 0)
    cv = torch.ones(2, 2, 2)
    assert vote_adaptive_heads(cv, 0.5)[0].tolist() == [[True, True], [False, False]]


def test_votes_extremes():
    cv = torch.rand(3, 4, 5, generator=torch.Generator().manual_seed(0))
    head_map, votes = vote_adaptive_heads(cv, 0.0)
    assert not head_map.any()
    assert votes.sum() == 3  # the minimum CV of each sample is "at or below the 0-quantile"
    head_map, votes = vote_adaptive_heads(cv, 1.0)
    assert head_map.all() and (votes == 3).all()
    # 0.28 * 25 is 7.000000000000001 in floating point; ceil(r * N) means 7 heads, not 8
    assert 0.28 * 25 > 7
    assert int(vote_adaptive_heads(torch.rand(2, 5, 5), 0.28)[0].sum()) == 7


# ============================================================================ runtime selection


@pytest.mark.parametrize("reserve", [*RESERVES, 32])
@pytest.mark.parametrize("recent", RECENTS)
@pytest.mark.parametrize("length", LENGTHS)
def test_regions_match_spec(length, recent, reserve):
    regions = params_for(0.99, 1.0, recent, reserve).regions(length)
    mid_start, mid_end, num_chunks = ref_regions(length, INIT, recent, CHUNK, reserve)
    assert (regions.mid_start, regions.tail_start, regions.num_chunks) == (mid_start, mid_end, num_chunks)
    whole_reserve = reserve // CHUNK * CHUNK
    assert recent + whole_reserve <= length - regions.tail_start < recent + whole_reserve + CHUNK


def test_regions_reserve_zero_is_whole_chunks_before_recent():
    """reserve 0 cuts (n - init - recent) // c chunks even when init and recent are not whole chunks."""
    for n, init, recent, c in [(70, 3, 9, 4), (133, 5, 7, 8), (10, 1, 1, 4)]:
        assert Regions.of(n, init, recent, c, 0).num_chunks == (n - init - recent) // c


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("recent", RECENTS)
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("group", GROUPS)
def test_runtime_selection_matches_reference(group, length, recent, dtype):
    params = params_for(0.99, 1.0, recent)
    regions = params.regions(length)
    mid_start, mid_end, num_chunks = ref_regions(length, INIT, recent, CHUNK, 0)
    keep = (params.budget - INIT - recent) // CHUNK
    assert params.budget_chunks() == keep < num_chunks
    for seed in SEEDS:
        q, keys = make_qk(seed, group, length, dtype)
        probs = observation_probs(q, keys[:, mid_start:mid_end], SCALE, length - OBS, mid_start)
        scores = chunk_scores(probs, CHUNK)
        a = ref_observation_probs(q, keys[:, mid_start:mid_end], SCALE, length - OBS, mid_start)
        ref = [ref_scores(a[h], CHUNK) for h in range(NUM_KV)]
        torch.testing.assert_close(scores.double(), torch.tensor(ref, dtype=torch.float64), rtol=PROB_RTOL[dtype], atol=1e-6)
        # the same scores on identical float32 probabilities
        exact = chunk_scores(a.float(), CHUNK)
        torch.testing.assert_close(exact.double(), torch.tensor(ref, dtype=torch.float64), rtol=1e-6, atol=1e-7)

        # consistent heads
        kept = retained_indices(regions, top_chunks(scores, keep))
        assert kept.dtype == torch.int64
        assert kept.shape == (NUM_KV, INIT + keep * CHUNK + (length - mid_end))
        for h in range(NUM_KV):
            row = kept[h].tolist()
            assert row == sorted(row)
            s = sorted(ref[h], reverse=True)
            if s[keep - 1] - s[keep] < 1e-4 * s[0]:
                continue  # the keep-th and next chunk are too close to call
            assert set(row) == ref_kept_tokens(length, INIT, CHUNK, num_chunks, ref[h], keep), f"seed={seed} head={h}"

        # adaptive heads: eta = 1 keeps everything, eta = 0.5 the best floor(n/2) chunks (the authors' int())
        full = retained_indices(regions, top_chunks(scores, adaptive_keep_chunks(num_chunks, 1.0)))
        assert torch.equal(full, torch.arange(length).expand(NUM_KV, -1))
        half = adaptive_keep_chunks(num_chunks, 0.5)
        assert half == num_chunks // 2
        kept = retained_indices(regions, top_chunks(scores, half))
        for h in range(NUM_KV):
            s = sorted(ref[h], reverse=True)
            if s[half - 1] - s[half] < 1e-4 * s[0]:
                continue
            assert set(kept[h].tolist()) == ref_kept_tokens(length, INIT, CHUNK, num_chunks, ref[h], half)
