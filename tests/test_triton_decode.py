"""Split-K Triton decode attention against a float32 PyTorch reference.

Without CUDA the kernels run in Triton's interpreter on CPU: conftest.py sets TRITON_INTERPRET=1
before anything imports Triton. Shapes are kept small for the interpreter; tests that need a GPU add
large shapes and CUDA graphs.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

from catekv_runtime.kernels import triton_decode as td  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
SMALL = td.DecodeConfig(block_n=32)  # several blocks per sequence even at CAP <= 300
FUSED = td.DecodeConfig(block_n=32, fused_combine=True)


def _rand(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype=dtype, device=DEVICE)


def _ints(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


def _case(batch: int, kv_heads: int, group: int, cap: int, dim: int, dtype: torch.dtype, seed: int = 0):
    q = _rand(batch, kv_heads * group, dim, dtype=dtype, seed=seed)
    k = _rand(batch, kv_heads, cap, dim, dtype=dtype, seed=seed + 1)
    v = _rand(batch, kv_heads, cap, dim, dtype=dtype, seed=seed + 2)
    return q, k, v


def _poisoned(like: torch.Tensor) -> torch.Tensor:
    return torch.full_like(like, float("nan"))


def _check(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert not out.isnan().any(), "some output element was not written"
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert err < TOL[dtype], f"relative error {err:.3g}"


# Ragged: length 1, length == CAP, lengths that are not multiples of the block, padding starts.
RAGGED = {"lengths": [1, 300, 203], "starts": [0, 37, 150]}


@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 7])
def test_matches_reference_fp32(group: int, dim: int) -> None:
    q, k, v = _case(3, 2, group, 300, dim, torch.float32, seed=group * dim)
    lengths, starts = _ints(RAGGED["lengths"]), _ints(RAGGED["starts"])
    ref = td.decode_attention_reference(q, k, v, lengths, starts)
    # 1 split, 3 splits, and more splits than any sequence has blocks (300 / 32 -> at most 10).
    for splits in (1, 3, 16):
        out = _poisoned(q)
        res = td.decode_attention(q, k, v, lengths, starts, num_splits=splits, out=out, config=SMALL)
        assert res is out
        _check(out, ref, torch.float32)


def test_no_starts_and_default_splits() -> None:
    q, k, v = _case(2, 2, 4, 130, 64, torch.float32, seed=3)
    lengths = _ints([130, 65])
    out = td.decode_attention(q, k, v, lengths)  # default config (block 64), heuristic splits
    _check(out, td.decode_attention_reference(q, k, v, lengths), torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype: torch.dtype) -> None:
    q, k, v = _case(3, 2, 4, 300, 128, dtype, seed=5)
    lengths, starts = _ints(RAGGED["lengths"]), _ints(RAGGED["starts"])
    out = _poisoned(q)
    td.decode_attention(q, k, v, lengths, starts, num_splits=3, out=out, config=SMALL)
    assert out.dtype == dtype
    _check(out, td.decode_attention_reference(q.float(), k.float(), v.float(), lengths, starts), dtype)


def test_one_split_holds_the_whole_sequence() -> None:
    q, k, v = _case(2, 1, 4, 256, 64, torch.float32, seed=7)
    lengths, starts = _ints([200, 256]), _ints([180, 0])  # sequence 0: 20 keys, one block
    ws = td.make_workspace(2, 4, 64, 4, DEVICE)
    out = _poisoned(q)
    td.decode_attention(q, k, v, lengths, starts, out=out, config=SMALL, workspace=ws)
    _check(out, td.decode_attention_reference(q, k, v, lengths, starts), torch.float32)
    finite = torch.isfinite(ws.partial_lse).sum(-1)  # [B, H_q] splits that saw keys
    assert finite[0].tolist() == [1] * 4 and finite[1].tolist() == [4] * 4


def test_empty_sequence_gives_zeros() -> None:
    q, k, v = _case(2, 2, 2, 64, 64, torch.float32, seed=9)
    lengths, starts = _ints([0, 64]), _ints([0, 64])  # nothing valid in either sequence
    out = _poisoned(q)
    td.decode_attention(q, k, v, lengths, starts, num_splits=3, out=out, config=SMALL)
    assert torch.equal(out, torch.zeros_like(out))


def test_strided_q_and_out() -> None:
    """q and out may be views (e.g. a [B, 1, H, D] projection, a slice of a larger buffer)."""
    q_full = _rand(3, 1, 8, 64, seed=11)
    q = q_full[:, 0]
    _, k, v = _case(3, 2, 4, 300, 64, torch.float32, seed=11)
    big = torch.full((3, 10, 64 * 2), float("nan"), device=DEVICE)
    out = big[:, 1:9, ::2]  # non-unit strides everywhere
    lengths, starts = _ints(RAGGED["lengths"]), _ints(RAGGED["starts"])
    td.decode_attention(q, k, v, lengths, starts, num_splits=3, out=out, config=SMALL)
    _check(out, td.decode_attention_reference(q, k, v, lengths, starts), torch.float32)
    assert big[:, 0].isnan().all() and big[:, 9].isnan().all() and big[:, 1:9, 1::2].isnan().all()


@pytest.mark.parametrize("splits", [1, 3, 16])
def test_fused_combine(splits: int) -> None:
    q, k, v = _case(3, 2, 4, 300, 64, torch.float32, seed=13)
    lengths, starts = _ints(RAGGED["lengths"]), _ints(RAGGED["starts"])
    ws = td.make_workspace(3, 8, 64, splits, DEVICE)
    ref = td.decode_attention_reference(q, k, v, lengths, starts)
    for _ in range(2):  # the counters must be reset for the next call
        out = _poisoned(q)
        td.decode_attention(q, k, v, lengths, starts, out=out, config=FUSED, workspace=ws)
        _check(out, ref, torch.float32)
        assert not ws.counters.any()


@pytest.mark.parametrize("config", [SMALL, FUSED], ids=["combine-kernel", "fused"])
def test_combine_in_several_chunks(config: td.DecodeConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    """The merge walks the splits in chunks (32 on the GPU); use chunks of 4 to cover that path."""
    monkeypatch.setattr(td, "_S_CHUNK", 4)
    q, k, v = _case(3, 2, 2, 300, 64, torch.float32, seed=19)
    lengths, starts = _ints(RAGGED["lengths"]), _ints(RAGGED["starts"])
    ref = td.decode_attention_reference(q, k, v, lengths, starts)
    for splits in (3, 13):  # one chunk; four chunks, the last one partly beyond num_splits
        out = _poisoned(q)
        td.decode_attention(q, k, v, lengths, starts, num_splits=splits, out=out, config=config)
        _check(out, ref, torch.float32)


def _two_groups(dtype: torch.dtype, seed: int = 17):
    """Llama-like layer: 4 KV heads x 2 query heads; KV heads 1 and 3 adaptive (long cache)."""
    batch, group, dim = 3, 2, 64
    q = _rand(batch, 8, dim, dtype=dtype, seed=seed)
    layout = [  # kv heads, capacity, lengths, starts
        ([1, 3], 300, [1, 300, 203], [0, 37, 150]),
        ([0, 2], 80, [70, 80, 33], [0, 5, 0]),
    ]
    groups = []
    for i, (heads, cap, lengths, starts) in enumerate(layout):
        k = _rand(batch, len(heads), cap, dim, dtype=dtype, seed=seed + 10 * i + 1)
        v = _rand(batch, len(heads), cap, dim, dtype=dtype, seed=seed + 10 * i + 2)
        q_index = torch.tensor([h * group + j for h in heads for j in range(group)], device=DEVICE)
        groups.append(td.KVGroup(k, v, _ints(lengths), _ints(starts), q_index))
    ref = torch.empty(batch, 8, dim, dtype=torch.float32, device=DEVICE)
    for g in groups:
        ref[:, g.q_head_index] = td.decode_attention_reference(
            q[:, g.q_head_index].float(), g.k_cache.float(), g.v_cache.float(), g.lengths, g.starts).float()
    return q, groups, ref


@pytest.mark.parametrize("config", [SMALL, FUSED], ids=["combine-kernel", "fused"])
@pytest.mark.parametrize("splits", [3, 16])
def test_two_groups(config: td.DecodeConfig, splits: int) -> None:
    q, groups, ref = _two_groups(torch.float32)
    out = _poisoned(q)
    res = td.decode_attention_two_groups(q, [tuple(g) for g in groups], out=out, num_splits=splits,
                                         config=config)
    assert res is out
    _check(out, ref, torch.float32)


@pytest.mark.parametrize("config", [SMALL, FUSED], ids=["combine-kernel", "fused"])
def test_two_groups_with_their_own_split_counts(config: td.DecodeConfig) -> None:
    """Each group runs its own number of splits into a workspace that holds more: the spare split rows,
    filled with garbage as an earlier layer with other groups would leave them, must be ignored."""
    q, groups, ref = _two_groups(torch.float32, seed=31)
    ws = td.make_workspace(q.shape[0], q.shape[1], q.shape[2], 9, DEVICE)
    for splits in ([7, 2], [1, 9], None):
        ws.partial_out.fill_(1e4)
        ws.partial_lse.fill_(50.0)  # would dominate the merge if read
        out = _poisoned(q)
        td.decode_attention_two_groups(q, groups, out=out, num_splits=splits, workspace=ws, config=config)
        _check(out, ref, torch.float32)
    assert td.group_num_splits([g.k_cache for g in groups], SMALL) == [
        td.default_num_splits(3, 2, 300, block_n=32), td.default_num_splits(3, 2, 80, block_n=32)]
    # Llama-3-8B at 128K, 3 adaptive heads and 5 consistent ones with a 2048-token budget, 2 programs per
    # SM: 88 splits for the long group (264 programs), 8 for the short one (its capacity caps it).
    caches = [torch.empty(1, 3, 131072, 0), torch.empty(1, 5, 2048, 0)]
    assert td.group_num_splits(caches, td.DecodeConfig(block_n=64, programs_per_sm=2)) == [88, 8]
    with pytest.raises(ValueError, match="workspace"):
        td.decode_attention_two_groups(q, groups, num_splits=[3, 10], workspace=ws)
    with pytest.raises(ValueError, match="entries"):
        td.decode_attention_two_groups(q, groups, num_splits=[3])


def test_two_groups_bf16() -> None:
    q, groups, ref = _two_groups(torch.bfloat16, seed=23)
    out = _poisoned(q)
    td.decode_attention_two_groups(q, groups, out=out, config=SMALL)
    _check(out, ref, torch.bfloat16)


@pytest.mark.parametrize("config", [SMALL, FUSED], ids=["combine-kernel", "fused"])
@pytest.mark.parametrize("splits", [1, 5])
def test_new_token_appended_in_the_kernel(config: td.DecodeConfig, splits: int) -> None:
    """new_k/new_v: the slot lengths-1 ends up holding them, and the output equals attention over the cache
    with them written there first (the slot's old content, poisoned here, must never be read)."""
    batch, kv_heads, group, cap, dim = 3, 2, 3, 120, 64
    q, k, v = _case(batch, kv_heads, group, cap, dim, torch.float32, seed=41)
    lengths, starts = _ints([1, 120, 77]), _ints([0, 30, 76])
    fresh = _rand(2, batch, kv_heads, dim, seed=43)  # [k|v, B, H, D]
    expected_k, expected_v = k.clone(), v.clone()
    for b, n in enumerate(lengths.tolist()):
        expected_k[b, :, n - 1], expected_v[b, :, n - 1] = fresh[0, b], fresh[1, b]
        k[b, :, n - 1] = v[b, :, n - 1] = float("nan")
    ref = td.decode_attention_reference(q, expected_k, expected_v, lengths, starts)
    out = _poisoned(q)
    td.decode_attention(q, k, v, lengths, starts, num_splits=splits, out=out, config=config,
                        new_k=fresh[0], new_v=fresh[1])
    _check(out, ref, torch.float32)
    assert torch.equal(k, expected_k) and torch.equal(v, expected_v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_applied_in_the_kernel(dtype: torch.dtype) -> None:
    """rope=(cos, sin): q and the new key arrive unrotated; the kernel must rotate them as transformers'
    apply_rotary_pos_emb does: to the bit in float32 through the interpreter, otherwise within a last-bit rounding
    of the model dtype (the GPU compiler may fuse a multiply-add; the interpreter rounds float32 to bfloat16 its
    own way)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    batch, kv_heads, group, cap, dim = 2, 2, 2, 96, 64
    q, k, v = _case(batch, kv_heads, group, cap, dim, dtype, seed=61)
    lengths = _ints([96, 40])
    fresh = _rand(2, batch, kv_heads, dim, dtype=dtype, seed=67)
    angles = _rand(batch, dim // 2, seed=71) * 3
    cos, sin = (torch.cat([f(angles)] * 2, dim=-1).to(dtype) for f in (torch.cos, torch.sin))
    q_rot, k_rot = apply_rotary_pos_emb(q[:, :, None], fresh[0][:, :, None], cos[:, None], sin[:, None])
    expected_k, expected_v = k.clone(), v.clone()
    for b, n in enumerate(lengths.tolist()):
        expected_k[b, :, n - 1], expected_v[b, :, n - 1] = k_rot[b, :, 0], fresh[1, b]
    ref = td.decode_attention_reference(q_rot[:, :, 0], expected_k, expected_v, lengths)
    out = _poisoned(q)
    td.decode_attention(q, k, v, lengths, num_splits=3, out=out, config=SMALL, new_k=fresh[0], new_v=fresh[1],
                        rope=(cos, sin))
    _check(out, ref, dtype)
    assert torch.equal(v, expected_v)
    if dtype == torch.float32 and DEVICE == "cpu":
        assert torch.equal(k, expected_k)
    elif dtype == torch.float32:
        torch.testing.assert_close(k, expected_k, atol=1e-6, rtol=1e-6)
    else:  # an ulp of either product (|values| < 4) may move the sum by up to 2 ** -5
        torch.testing.assert_close(k, expected_k, atol=0.05, rtol=0)
    with pytest.raises(ValueError, match="rope cos"):
        td.decode_attention(q, k, v, lengths, rope=(cos[:, :-2], sin))


def test_new_token_appended_to_each_group() -> None:
    """Two head groups: each appends the model KV heads its kv_head_index names, from one [B, H_kv, D] tensor."""
    q, groups, _ = _two_groups(torch.float32, seed=47)
    batch, dim = q.shape[0], q.shape[2]
    fresh = _rand(2, batch, 4, dim, seed=53)
    heads = ([1, 3], [0, 2])
    with_index, expected = [], []
    for g, kv_index in zip(groups, heads):
        k, v = g.k_cache.clone(), g.v_cache.clone()
        for b, n in enumerate(g.lengths.tolist()):
            k[b, :, n - 1], v[b, :, n - 1] = fresh[0, b, kv_index], fresh[1, b, kv_index]
        expected.append((k, v))
        with_index.append(g._replace(kv_head_index=torch.tensor(kv_index, device=DEVICE)))
    ref = torch.empty_like(q)
    for g, (k, v) in zip(groups, expected):
        ref[:, g.q_head_index] = td.decode_attention_reference(q[:, g.q_head_index], k, v, g.lengths, g.starts)
    out = _poisoned(q)
    td.decode_attention_two_groups(q, with_index, out=out, num_splits=4, config=SMALL,
                                   new_k=fresh[0], new_v=fresh[1])
    _check(out, ref, torch.float32)
    for g, (k, v) in zip(with_index, expected):
        assert torch.equal(g.k_cache, k) and torch.equal(g.v_cache, v)
    with pytest.raises(ValueError, match="kv_head_index"):
        td.decode_attention_two_groups(q, groups, new_k=fresh[0], new_v=fresh[1])
    with pytest.raises(ValueError, match="new_k must be"):
        td.decode_attention_two_groups(q, with_index, new_k=fresh[0, :, :3], new_v=fresh[1, :, :3])
    with pytest.raises(ValueError, match="both"):
        td.decode_attention_two_groups(q, with_index, new_k=fresh[0])


def test_workspace_is_reused_and_validated() -> None:
    q, k, v = _case(2, 2, 2, 128, 64, torch.float32, seed=29)
    ws = td.make_workspace(2, 4, 64, 5, DEVICE)
    out = _poisoned(q)
    for lengths in ([128, 7], [9, 100]):  # same buffers, new fill: what a graph replay does
        out.fill_(float("nan"))
        td.decode_attention(q, k, v, _ints(lengths), out=out, config=SMALL, workspace=ws)
        _check(out, td.decode_attention_reference(q, k, v, _ints(lengths)), torch.float32)
    with pytest.raises(ValueError, match="workspace"):
        td.decode_attention(q, k, v, _ints([1, 1]), num_splits=4, workspace=ws)
    with pytest.raises(ValueError, match="multiple"):
        td.decode_attention(q[:, :3], k, v, _ints([1, 1]))
    with pytest.raises(ValueError, match="cover"):
        td.decode_attention_two_groups(q, [(k, v, _ints([1, 1]), None, torch.arange(2, device=DEVICE))])


def test_default_num_splits_depends_on_shapes_only() -> None:
    # Llama-3-8B decode at batch 1: ~4 programs per SM of an H200.
    assert td.default_num_splits(1, 8, 131072) == math.ceil(4 * 132 / 8)
    assert td.default_num_splits(8, 8, 131072) == math.ceil(4 * 132 / 64)
    assert td.default_num_splits(1, 8, 300) == 2  # tiny cache: at least 4 blocks per split
    assert td.default_num_splits(1, 1, 10**7) == 128  # capped
    assert td.default_num_splits(64, 32, 10**6) == 1


def test_runtime_import_does_not_need_triton() -> None:
    code = "import sys, catekv_runtime, catekv_runtime.kernels; assert 'triton' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------
# GPU only: realistic shapes, CUDA graphs, repeated fused launches (races would show up here).
# ---------------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("config", [td.DEFAULT_CONFIG, td.DecodeConfig(fused_combine=True)],
                         ids=["combine-kernel", "fused"])
def test_gpu_llama_shapes_bf16(config: td.DecodeConfig) -> None:
    q, k, v = _case(3, 8, 4, 20000, 128, torch.bfloat16, seed=31)
    lengths, starts = _ints([20000, 12345, 1]), _ints([0, 100, 0])
    ref = td.decode_attention_reference(q, k, v, lengths, starts)
    for _ in range(20):
        out = td.decode_attention(q, k, v, lengths, starts, out=_poisoned(q), config=config)
        _check(out, ref, torch.bfloat16)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("config", [td.DEFAULT_CONFIG, td.DecodeConfig(fused_combine=True)],
                         ids=["combine-kernel", "fused"])
def test_gpu_cuda_graph_replay_follows_device_lengths(config: td.DecodeConfig) -> None:
    q, k, v = _case(2, 8, 4, 8192, 128, torch.bfloat16, seed=37)
    lengths = _ints([100, 5000])
    out = torch.empty_like(q)
    ws = td.make_workspace(2, 32, 128, td.default_num_splits(2, 8, 8192), DEVICE)
    td.decode_attention(q, k, v, lengths, out=out, config=config, workspace=ws)  # compile first
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        td.decode_attention(q, k, v, lengths, out=out, config=config, workspace=ws)
    for new in ([100, 5000], [8192, 1], [4097, 63]):
        lengths.copy_(_ints(new))
        out.fill_(float("nan"))
        graph.replay()
        _check(out, td.decode_attention_reference(q, k, v, lengths), torch.bfloat16)


@requires_cuda
@pytest.mark.gpu
def test_gpu_two_groups_fused_bf16() -> None:
    q, groups, ref = _two_groups(torch.bfloat16, seed=41)
    for config in (td.DEFAULT_CONFIG, td.DecodeConfig(fused_combine=True)):
        out = td.decode_attention_two_groups(q, groups, out=_poisoned(q), config=config)
        _check(out, ref, torch.bfloat16)


@requires_cuda
@pytest.mark.gpu
def test_gpu_concurrent_groups_eager_and_in_a_cuda_graph() -> None:
    """concurrent_groups runs the second group on a side stream: the combine must still see both groups'
    partials, eagerly and when the fork and join are captured in a graph and replayed."""
    q, groups, ref = _two_groups(torch.bfloat16, seed=43)
    config = td.DecodeConfig(block_n=32, concurrent_groups=True)
    ws = td.make_workspace(q.shape[0], q.shape[1], q.shape[2], 16, DEVICE)
    out = _poisoned(q)
    td.decode_attention_two_groups(q, groups, out=out, workspace=ws, config=config)
    _check(out, ref, torch.bfloat16)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        td.decode_attention_two_groups(q, groups, out=out, workspace=ws, config=config)
    for _ in range(3):
        out.fill_(float("nan"))
        ws.partial_lse.fill_(50.0)  # stale partials would dominate the merge
        graph.replay()
        _check(out, ref, torch.bfloat16)
