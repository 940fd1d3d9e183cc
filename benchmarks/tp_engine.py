"""The engine's batch-1 decode step under tensor parallelism (``Engine(..., tensor_parallel=True)``), at TP = the
number of ``torchrun`` processes.

Llama-3-8B shapes with random bf16 weights (``benchmarks/decode.py``'s builder, seeded alike on every rank), loaded
whole on every rank and sharded by the engine; one request's slot filled as a prefill of ``context`` tokens would
leave it (``benchmarks/engine_decode.py``'s ``filled_engine``), then the engine's own decode step (the Triton
split-K kernel on each rank's heads, two all-reduces per layer, the token broadcast from rank 0) captured as a CUDA
graph on every rank and replayed together. The fused batch-1 projections are off under TP and on at TP 1 (where
this is ``engine_decode.py``'s step); the records say which. Arms: ``catekv`` (a random profile at r = 0.4, budget
``--budget``) and ``full`` (profile None). A record per arm and context: the slowest rank's ms per step (the ranks
run in lock-step), each rank's, and the KV and weight GiB each rank holds. Rank 0 writes them to ``--out``, keeping
the records of other TP sizes already there, so runs at TP 1, 2, 4 and 8 fill one file:

    torchrun --standalone --nproc-per-node 1 benchmarks/tp_engine.py
    torchrun --standalone --nproc-per-node 2 benchmarks/tp_engine.py
    torchrun --standalone --nproc-per-node 2 benchmarks/tp_engine.py --smoke --out /tmp/tp_engine.json   # CPU, gloo
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# tp_decode's import turns NVLink multicast off for NCCL (the GPU machines have none); before NCCL starts.
from benchmarks import tp_decode  # noqa: E402, I001
from benchmarks import decode as bench  # noqa: E402
from benchmarks.engine_decode import filled_engine, time_step_ms  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "results" / "tp_engine.json"


def start(smoke: bool) -> tuple[int, int, str]:
    """Join torchrun's process group (NCCL on GPUs, gloo on CPU); this rank, the world size and this rank's
    device."""
    rank, world = tp_decode.rank_and_world()
    if smoke or not torch.cuda.is_available():
        dist.init_process_group("gloo")
        return rank, world, "cpu"
    local = rank % torch.cuda.device_count()
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    return rank, world, f"cuda:{local}"


def held_gib(engine) -> tuple[float, float]:
    """GiB of KV buffers and of decoder weights this rank's engine holds."""
    kv = sum(g.kv.numel() * g.kv.element_size() for g in engine.kv.groups)
    model = engine.model
    tensors = [model.embed, model.lm_head, model.final_norm] + [t for layer in model.layers
                                                                for t in vars(layer).values() if t is not None]
    weights = sum(t.numel() * t.element_size() for t in tensors)
    return round(kv / bench.GiB, 3), round(weights / bench.GiB, 3)


def merged(path: Path, tp: int, records: list[dict]) -> list[dict]:
    """The records already in ``path`` of other TP sizes, then ``records``."""
    kept = [r for r in json.loads(path.read_text()) if r.get("tp") != tp] if path.exists() else []
    return kept + records


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_step_arguments(parser, smoke="CPU and gloo, a tiny model, context 200, 2 steps (the figures mean "
                                           "nothing)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    rank, tp, device = start(args.smoke)
    torch.manual_seed(0)  # the same random weights on every rank
    if args.smoke:
        torch.set_num_threads(1)
        model = bench.build_model(2, device=device, **bench.TINY)
        contexts, steps, budget = [200], 2, 64
    else:
        if device == "cpu":
            parser.error("needs CUDA GPUs, one per process (or --smoke)")
        model = bench.build_model(args.layers, device=device)
        contexts, steps, budget = args.contexts, args.steps, args.budget
    results: list[dict] = []

    def emit(**record) -> None:
        if rank == 0:
            bench.emit(results, **record)

    emit(suite="setup", tp=tp, smoke=args.smoke, device=torch.cuda.get_device_name() if device != "cpu" else "cpu",
         layers=model.config.num_hidden_layers, budget=budget, ratio=args.ratio, torch=torch.__version__,
         date=time.strftime("%Y-%m-%d"))
    for context, arm in itertools.product(contexts, args.arms):
        profile = bench.random_profile(model, budget, args.ratio) if arm == "catekv" else None
        engine = filled_engine(model, profile, context, steps + 2, tensor_parallel=True)
        kv_gib, weight_gib = held_gib(engine)
        ms = time_step_ms(engine, steps)
        ranks = tp_decode.gather(dict(rank=rank, decode_ms_per_step=round(ms, 3), kv_gib=kv_gib,
                                      weight_gib=weight_gib))
        emit(suite="tp-engine-step", tp=tp, arm=arm, context=context, steps=steps, attention=engine.attention,
             projections=engine.projections, cuda_graphs=engine.cuda_graphs,
             decode_ms_per_step=max(r["decode_ms_per_step"] for r in ranks),
             ms_per_rank=[r["decode_ms_per_step"] for r in ranks], kv_gib_per_rank=[r["kv_gib"] for r in ranks],
             weight_gib_per_rank=[r["weight_gib"] for r in ranks])
        del engine
        if device != "cpu":
            torch.cuda.empty_cache()
    if rank == 0:
        bench.write_records(args.out, merged(args.out, tp, results))
    dist.barrier()
    dist.destroy_process_group()
    return results


if __name__ == "__main__":
    main()
