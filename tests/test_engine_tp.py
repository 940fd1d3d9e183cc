"""The engine under tensor parallelism, on CPU: 2 processes (gloo) against the single-process engine.

Both run the same request loop (requests of different lengths added at different steps, one aborted, two slots
for five requests, prefill spread over steps) on the same tiny Llama (8 query, 4 KV heads), with a CateKV profile
that evicts and with full attention. Rank 0 takes the requests, rank 1 follows; the reference is the same loop on
one process. Each run keeps a copy of its slots at the first step with every slot decoding.

This file is also the worker: ``torchrun --nproc-per-node 2 tests/test_engine_tp.py --worker OUT_DIR``.
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
CONFIG = dict(num_attention_heads=8, num_key_value_heads=4, hidden_size=128, head_dim=16, intermediate_size=128)
ENGINE = dict(max_batch_size=2, max_model_len=256, prefill_chunk=32)
ARMS = ("catekv", "full")
# step -> what rank 0 does before it: ("add", name, prompt length, sampling) or ("abort", name).
SCHEDULE = {
    0: [("add", "a", 150, "greedy"), ("add", "b", 70, "greedy")],
    2: [("add", "c", 200, "sampled")],
    3: [("add", "d", 40, "greedy"), ("add", "e", 90, "greedy")],
    4: [("abort", "e")],
    9: [("add", "f", 120, "greedy")],
}


def make_model(**overrides):
    from conftest import make_tiny_model

    return make_tiny_model("llama", **{**CONFIG, **overrides})


def make_engine(model, arm: str, **kwargs):
    from test_runtime import make_profile

    from catekv_runtime.engine import Engine

    profile = make_profile(model, 0.5) if arm == "catekv" else None
    return Engine(model, profile, **ENGINE, **kwargs)


def drive(engine) -> dict[str, list[int]]:
    """The request loop of :data:`SCHEDULE`, stepping until every request has finished; each one's tokens."""
    from catekv_runtime.engine import SamplingParams

    kinds = {"greedy": SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
             "sampled": SamplingParams(max_tokens=8, temperature=0.8, top_p=0.9, seed=5, ignore_eos=True)}
    generator = torch.Generator().manual_seed(0)
    ids: dict[str, int] = {}
    names: dict[int, str] = {}
    outputs: dict[str, list[int]] = {}
    step = 0
    while step <= max(SCHEDULE) or engine.has_unfinished():
        for kind, name, *args in SCHEDULE.get(step, []):
            if kind == "add":
                prompt = torch.randint(3, 256, (args[0],), generator=generator).tolist()
                ids[name] = engine.add_request(prompt, kinds[args[1]])
                names[ids[name]] = name
            else:
                assert engine.abort(ids[name])
        outputs.update({names[c.request_id]: c.token_ids for c in engine.step()})
        step += 1
    return outputs


def watch_slots(engine, offset: int) -> dict:
    """Wrap the engine's step so as to keep a copy of its slots at the first step with every slot decoding: per
    layer and group, the model's KV heads (``offset`` + this rank's), the buffer and the lengths."""
    seen: dict = {}
    advance = engine._advance

    def advance_and_copy() -> None:
        advance()
        if not seen and len(engine._running) == engine.slots:
            seen["running"] = sorted(engine._running)
            seen["layers"] = [[dict(heads=(g.kv_heads + offset).tolist(), adaptive=g.adaptive, kv=g.kv.clone(),
                                    lengths=engine.kv.lengths[g.row].clone()) for g in layer]
                              for layer in engine.kv.layers]

    engine._advance = advance_and_copy
    return seen


def save_result(path: Path, result: dict) -> None:
    """Tokens, errors and head lists as JSON metadata, the slot buffers as tensors: nothing is pickled."""
    from safetensors.torch import save_file

    tensors, layout = {}, {}
    for arm, slots in result["slots"].items():
        layout[arm] = dict(running=slots["running"], layers=[])
        for i, layer in enumerate(slots["layers"]):
            layout[arm]["layers"].append([dict(heads=g["heads"], adaptive=g["adaptive"]) for g in layer])
            for j, group in enumerate(layer):
                tensors[f"{arm}.{i}.{j}.kv"] = group["kv"].contiguous()
                tensors[f"{arm}.{i}.{j}.lengths"] = group["lengths"].contiguous()
    meta = dict(tokens=result["tokens"], errors=result["errors"], layout=layout)
    save_file(tensors, str(path), metadata={"meta": json.dumps(meta)})


def load_result(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as file:
        meta = json.loads(file.metadata()["meta"])
        slots = {arm: dict(running=layout["running"], layers=[
            [dict(group, kv=file.get_tensor(f"{arm}.{i}.{j}.kv"), lengths=file.get_tensor(f"{arm}.{i}.{j}.lengths"))
             for j, group in enumerate(layer)] for i, layer in enumerate(layout["layers"])])
            for arm, layout in meta["layout"].items()}
    return dict(tokens=meta["tokens"], errors=meta["errors"], slots=slots)


def refusal(make) -> str:
    """The message of the ValueError ``make()`` raises ("" if none)."""
    try:
        make()
    except ValueError as error:
        return str(error)
    return ""


def worker(out_dir: str) -> None:
    """One rank: both arms (rank 0 drives, rank 1 follows), then the refusals; saves what the test compares."""
    import torch.distributed as dist

    from test_runtime import make_profile

    from catekv_runtime.engine import Engine

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = make_model()
    result = dict(tokens={}, slots={}, errors={})
    for arm in ARMS:
        engine = make_engine(model, arm, tensor_parallel=True)
        result["slots"][arm] = watch_slots(engine, rank * CONFIG["num_key_value_heads"] // WORLD)
        if rank == 0:
            result["tokens"][arm] = drive(engine)
            engine.shutdown()
        else:
            engine.follow()
    three_kv_heads = make_model(num_attention_heads=6, num_key_value_heads=3, hidden_size=96)
    result["errors"]["indivisible"] = refusal(lambda: Engine(three_kv_heads, None, max_model_len=64,
                                                             tensor_parallel=True))
    other = make_profile(make_model(num_hidden_layers=2), 0.5)
    result["errors"]["other_profile"] = refusal(lambda: Engine(model, other, max_model_len=64, tensor_parallel=True))
    save_result(Path(out_dir) / f"rank{rank}.safetensors", result)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def tp_run(tmp_path_factory):
    """The 2-rank run (torchrun, gloo) and the single-process reference of the same loop."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    root = tmp_path_factory.mktemp("engine-tp")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
               __file__, "--worker", str(root)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
    ranks = [load_result(root / f"rank{r}.safetensors") for r in range(WORLD)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = make_model()
        reference = dict(tokens={}, slots={})
        for arm in ARMS:
            engine = make_engine(model, arm)
            reference["slots"][arm] = watch_slots(engine, 0)
            reference["tokens"][arm] = drive(engine)
    finally:
        torch.set_num_threads(threads)
    return SimpleNamespace(ranks=ranks, reference=reference)


@pytest.mark.parametrize("arm", ARMS)
def test_tp_tokens_equal_one_process(tp_run, arm):
    """Rank 0's completions (greedy and seeded sampling, one request aborted) are the single-process engine's."""
    expected = tp_run.reference["tokens"][arm]
    assert sorted(expected) == ["a", "b", "c", "d", "f"]  # "e" was aborted
    assert all(len(tokens) == 8 for tokens in expected.values())
    assert tp_run.ranks[0]["tokens"][arm] == expected


def test_catekv_tokens_differ_from_full_attention(tp_run):
    """The profile changes the output, so the catekv arm tests selection under TP, not just full attention."""
    assert tp_run.reference["tokens"]["catekv"] != tp_run.reference["tokens"]["full"]


@pytest.mark.parametrize("arm", ARMS)
def test_each_rank_holds_exactly_its_heads_slots(tp_run, arm):
    """At the first step with both slots decoding, every rank holds its block of KV heads, no other, and for each
    of them the lengths and kept K/V of the single-process engine's slots."""
    reference = tp_run.reference["slots"][arm]
    per_rank = CONFIG["num_key_value_heads"] // WORLD
    for rank, result in enumerate(tp_run.ranks):
        slots = result["slots"][arm]
        assert slots["running"] == reference["running"] == [0, 1]
        for layer, ref_layer in zip(slots["layers"], reference["layers"], strict=True):
            assert sorted(h for g in layer for h in g["heads"]) == list(range(rank * per_rank, (rank + 1) * per_rank))
            for group in layer:
                assert group["kv"].shape[2] == len(group["heads"])
                for i, head in enumerate(group["heads"]):
                    ref = next(g for g in ref_layer if head in g["heads"])
                    j = ref["heads"].index(head)
                    assert group["adaptive"] == ref["adaptive"]
                    assert group["kv"].shape[3:] == ref["kv"].shape[3:]
                    assert torch.equal(group["lengths"], ref["lengths"])
                    for slot in slots["running"]:
                        valid = int(ref["lengths"][slot]) - 1  # the last position is the next step's
                        torch.testing.assert_close(group["kv"][:, slot, i, 1:valid], ref["kv"][:, slot, j, 1:valid],
                                                   rtol=1e-4, atol=1e-5)
    # CateKV's consistent heads hold fewer tokens than the adaptive ones (they dropped prompt tokens); full: none.
    groups = [g for layer in reference["layers"] for g in layer]
    consistent = [int(g["lengths"][0]) for g in groups if not g["adaptive"]]
    adaptive = [int(g["lengths"][0]) for g in groups if g["adaptive"]]
    assert (bool(consistent) and max(consistent) < min(adaptive)) == (arm == "catekv")


def test_tp_refusals(tp_run):
    """Under TP: KV heads that do not divide by the ranks, and a profile of another model, are refused clearly."""
    for result in tp_run.ranks:
        assert result["errors"]["indivisible"] == (
            "tensor parallelism over 2 ranks: the model has 3 KV heads, which do not divide by 2 (each rank must "
            "hold whole KV heads); run with a tensor-parallel size that divides 3")
        assert "layers" in result["errors"]["other_profile"]


# ------------------------------------------------------------------------------------ without processes


def test_shard_refuses_heads_that_do_not_divide():
    from catekv_runtime.engine import DecoderModel

    decoder = DecoderModel.from_transformers(make_model())
    with pytest.raises(ValueError, match="4 KV heads, which do not divide by 3"):
        decoder.shard(0, 3)
    part = decoder.shard(1, 2)
    assert (part.q_heads, part.kv_heads, part.tp_size) == (4, 2, 2)
    assert part.layers[0].qkv.shape == (8 * 16, 128) and part.layers[0].o.shape == (128, 4 * 16)
    assert not part.fusable()


def test_tensor_parallel_needs_a_process_group_and_follow_needs_tp():
    import torch.distributed as dist

    from catekv_runtime.engine import Engine

    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="initialized torch.distributed process group"):
        Engine(make_model(), None, max_model_len=64, tensor_parallel=True)
    engine = Engine(make_model(), None, max_model_len=64)
    with pytest.raises(RuntimeError, match="follow\\(\\) is for ranks 1"):
        engine.follow()
    engine.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        engine.add_request([5, 6])


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, if catekv is not installed
    worker(sys.argv[2])
