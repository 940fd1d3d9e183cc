"""CateKV under transformers' tensor parallelism, on CPU: 2 processes (gloo) against 1 process.

The model is sharded by transformers itself (``from_pretrained(distributed_config=DistributedConfig(
tp_plan="auto"))`` under ``torchrun``), exactly as on GPUs; only the backend differs (gloo, not NCCL).
The reference is the same saved model loaded in this (single) process, with the same profile.

This file is also the worker: ``torchrun --nproc-per-node 2 tests/test_tp.py --worker MODEL_DIR OUT_DIR``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

WORLD = 2
NEW_TOKENS = 6
# 4 KV heads (2 per rank), 2 query heads per KV head; widths divisible by 2 for transformers' plan.
CONFIG = dict(num_attention_heads=8, num_key_value_heads=4, hidden_size=128, head_dim=16, intermediate_size=128)


def make_profile(model):
    """A random profile (half the heads adaptive) whose budgets evict tokens from a 160-token prompt."""
    import catekv_runtime as ck
    from catekv_runtime.profile import Profile, ProfileParams, ReferenceSpec

    spec = ck.model_spec(model)
    cv = torch.rand(3, spec.num_layers, spec.num_kv_heads, generator=torch.Generator().manual_seed(1))
    params = ProfileParams(budget=64, init_tokens=4, recent_tokens=16, chunk_size=4, obs_window=8,
                           adaptive_ratio=0.5, eta=0.5)
    return Profile.from_statistics(cv, cv, cv, params, spec, ReferenceSpec("random", 160, 3, 0, "-"))


def make_prompt() -> tuple[torch.Tensor, torch.Tensor]:
    """Two left-padded prompts of 160 and 150 tokens."""
    ids = torch.randint(3, 256, (2, 160), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :10] = 0
    ids[1, :10] = 0
    return ids, mask


def run_catekv(model) -> dict:
    """Greedy generation with CateKV through ``apply``'s own cache and through ``make_cache``."""
    import catekv_runtime as ck

    profile = make_profile(model)
    ck.apply(model, profile)
    ids, mask = make_prompt()
    greedy = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    out = model.generate(ids, attention_mask=mask, return_dict_in_generate=True, output_logits=True, **greedy)
    cache = ck.make_cache(model, profile, reserve=NEW_TOKENS + 1)
    tokens = model.generate(ids, attention_mask=mask, **{ck.cache_argument(model): cache}, **greedy)
    layers = []
    for layer in cache.layers:
        layers.append([
            dict(heads=g.kv_heads.tolist(), kv=g.kv[:, :, :, : g.length].clone(),
                 pad=None if g.pad is None else g.pad.tolist())
            for g in layer.groups
        ])
    return dict(tokens=out.sequences, logits=torch.stack(out.logits, dim=1), cache_tokens=tokens, layers=layers)


def save_result(result: dict, path: Path) -> None:
    """A rank's result as safetensors (tensors) plus JSON metadata (head lists, pads): nothing is pickled."""
    from safetensors.torch import save_file

    tensors = {name: result[name].contiguous() for name in ("tokens", "logits", "cache_tokens", "k_proj")}
    layout = []
    for i, layer in enumerate(result["layers"]):
        layout.append([dict(heads=g["heads"], pad=g["pad"]) for g in layer])
        for j, group in enumerate(layer):
            tensors[f"layer{i}.group{j}"] = group["kv"].contiguous()
    save_file(tensors, str(path), metadata={"rank": str(result["rank"]), "layers": json.dumps(layout)})


def load_result(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as file:
        meta = file.metadata()
        result = {name: file.get_tensor(name) for name in ("tokens", "logits", "cache_tokens", "k_proj")}
        result["layers"] = [[dict(group, kv=file.get_tensor(f"layer{i}.group{j}")) for j, group in enumerate(layer)]
                            for i, layer in enumerate(json.loads(meta["layers"]))]
    result["rank"] = int(meta["rank"])
    return result


def worker(model_dir: str, out_dir: str) -> None:
    """One rank: load the model sharded by transformers, run CateKV, save what the test compares."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, DistributedConfig

    import catekv_runtime as ck

    model = AutoModelForCausalLM.from_pretrained(model_dir, distributed_config=DistributedConfig(tp_plan="auto"),
                                                 dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    rank, size = ck.tensor_parallel_rank(model)
    assert (rank, size) == (dist.get_rank(), WORLD), (rank, size)
    with torch.no_grad():
        result = run_catekv(model)
    k_proj = model.model.layers[0].self_attn.k_proj.weight
    result["k_proj"] = k_proj.to_local().clone() if hasattr(k_proj, "to_local") else k_proj.detach().clone()
    result["rank"] = rank
    save_result(result, Path(out_dir) / f"rank{rank}.safetensors")
    dist.barrier()
    dist.destroy_process_group()


def _distributed_unavailable() -> str:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        return "torch.distributed with the gloo backend is not available in this torch build"
    try:
        from transformers import DistributedConfig  # noqa: F401
    except ImportError:
        return "this transformers has no DistributedConfig (tensor parallelism)"
    return ""


@pytest.fixture(scope="module")
def tp_run(tmp_path_factory):
    """The tiny model saved once, the 2-rank TP run, and the 1-process reference."""
    reason = _distributed_unavailable()
    if reason:
        pytest.skip(reason)
    from conftest import make_tiny_model

    root = tmp_path_factory.mktemp("tp")
    model = make_tiny_model("llama", **CONFIG)
    model.save_pretrained(root / "model")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
               __file__, "--worker", str(root / "model"), str(root)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
    ranks = [load_result(root / f"rank{r}.safetensors") for r in range(WORLD)]
    with torch.no_grad():
        reference = run_catekv(model)
    return SimpleNamespace(model=model, ranks=ranks, reference=reference)


def test_transformers_shards_kv_heads_in_contiguous_blocks(tp_run):
    """What local_head_map assumes: rank r's k_proj rows are KV heads [r*H/t, (r+1)*H/t)."""
    full = tp_run.model.model.layers[0].self_attn.k_proj.weight
    rows = full.shape[0] // WORLD
    for rank in tp_run.ranks:
        torch.testing.assert_close(rank["k_proj"], full[rank["rank"] * rows : (rank["rank"] + 1) * rows])


def test_tp_generation_equals_one_process(tp_run):
    ref = tp_run.reference
    for rank in tp_run.ranks:
        assert torch.equal(rank["tokens"], ref["tokens"])
        assert torch.equal(rank["cache_tokens"], ref["cache_tokens"])
        torch.testing.assert_close(rank["logits"], ref["logits"], rtol=1e-4, atol=1e-4)


def test_each_rank_caches_exactly_its_heads_kept_tokens(tp_run):
    heads = CONFIG["num_key_value_heads"]
    per_rank = heads // WORLD
    evicted = False
    for rank in tp_run.ranks:
        first = rank["rank"] * per_rank
        for layer, ref_layer in zip(rank["layers"], tp_run.reference["layers"]):
            assert sorted(h for g in layer for h in g["heads"]) == list(range(per_rank))
            for group in layer:
                for i, local in enumerate(group["heads"]):
                    # The same head in the single-process cache: same slots, same K/V (up to all-reduce rounding).
                    ref_group = next(g for g in ref_layer if first + local in g["heads"])
                    j = ref_group["heads"].index(first + local)
                    assert group["pad"] == ref_group["pad"]
                    assert group["kv"].shape[3] == ref_group["kv"].shape[3]
                    torch.testing.assert_close(group["kv"][:, :, i], ref_group["kv"][:, :, j], rtol=1e-4, atol=1e-5)
                    evicted |= group["kv"].shape[3] < 160 + NEW_TOKENS
    assert evicted  # the budgets did drop tokens, so selection was compared, not just copying


# ----------------------------------------------------------------- local_head_map without processes


class _Mesh:
    ndim = 1
    mesh_dim_names = None

    def __init__(self, rank: int, size: int):
        self.rank, self._size = rank, size

    def get_local_rank(self) -> int:
        return self.rank

    def size(self) -> int:
        return self._size


def _tp_model(rank: int, size: int, style: str = "colwise"):
    # What transformers sets on a model it sharded (5.17 and 5.2x): _tp_size, _device_mesh, tp_plan.
    return SimpleNamespace(_tp_size=size, _device_mesh=_Mesh(rank, size),
                           tp_plan={"model.layers.*.self_attn.k_proj": style, "model.layers.*.self_attn.o_proj":
                                    "rowwise"})


def test_local_head_map_slices_contiguous_blocks():
    from catekv_runtime import local_head_map

    head_map = torch.rand(3, 8, generator=torch.Generator().manual_seed(0)) > 0.5
    assert local_head_map(SimpleNamespace(), head_map) is head_map  # no TP
    for size in (2, 4, 8):
        parts = [local_head_map(_tp_model(r, size), head_map) for r in range(size)]
        assert all(p.shape == (3, 8 // size) for p in parts)
        assert torch.equal(torch.cat(parts, dim=1), head_map)
    assert torch.equal(local_head_map(_tp_model(1, 2, "colwise_gather_output"), head_map), head_map)


def test_local_head_map_refuses_heads_that_do_not_divide():
    from catekv_runtime import ProfileError, local_head_map

    with pytest.raises(ProfileError, match="8 KV heads, which do not divide by the tensor-parallel size 3"):
        local_head_map(_tp_model(0, 3), torch.zeros(2, 8, dtype=torch.bool))
    with pytest.raises(ProfileError, match="packed_colwise"):
        local_head_map(_tp_model(0, 2, "packed_colwise"), torch.zeros(2, 8, dtype=torch.bool))


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--worker":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, if catekv is not installed
    worker(sys.argv[2], sys.argv[3])
