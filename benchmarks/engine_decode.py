"""The engine's decode step (``catekv_runtime.engine.Engine``) against the bandwidth floor, at batch 1 and more.

Llama-3-8B shapes with random bf16 weights (``benchmarks/decode.py``'s model builder), ``batch`` requests' slots
filled as a prefill of ``context`` tokens would leave them (the K/V values do not change the step's time), then the
engine's own decode step (at batch 1 the fused projections; the Triton split-K kernel, sampling) captured as a CUDA
graph and replayed.
Arms: ``catekv`` (a random profile at r = 0.4, budget ``--budget``) and ``full`` (profile None, the same engine).
The floor is the bytes a step must read (weights less the embedding table, plus every kept K/V) over the measured
device-to-device copy bandwidth, as ``benchmarks/decode.py`` computes it. With ``--memory-cap-gib`` the batch is
instead as many requests as the engine has slots under that cap (``gpu_memory_utilization``, which also sets aside
the prefill's working memory), and each record adds the tokens per second and the peak memory. One JSON object per
line; all of them to ``--out``.

    python benchmarks/engine_decode.py --contexts 131072 524288 --out docs/results/engine_decode.json
    python benchmarks/engine_decode.py --contexts 24576 --batches 1 8 16 32 --out docs/results/engine_decode_batch.json
    python benchmarks/engine_decode.py --contexts 40960 --budget 256 --memory-cap-gib 80 \
        --out docs/results/engine_decode_capacity.json      # the paper's throughput setting (budget 256: init 8, recent 32)
    python benchmarks/engine_decode.py --model qwen2.5-coder-0.5b --profile qwen2.5-coder-0.5b-instruct-32k \
        --contexts 32000 --out docs/results/engine_decode_qwen.json    # a real model (any MODEL catekv-profile takes)
    python benchmarks/engine_decode.py --smoke      # CPU, Triton's interpreter, a tiny model: checks the script

With ``--model`` the arms run that model's weights (bfloat16 on the GPU) and the ``catekv`` arm its ``--profile``
(a shipped name, file or Hub id) as it is: ``--budget``, ``--ratio`` and ``--layers`` then do not apply.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():  # before anything imports triton: the smoke run interprets the kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import decode as bench  # noqa: E402
import catekv_runtime as ck  # noqa: E402
from catekv_runtime.engine import Engine  # noqa: E402
from catekv_runtime.engine.engine import _Request  # noqa: E402
from catekv_runtime.engine.sampling import Filters, SamplingParams  # noqa: E402


MAX_SLOTS = 256  # the most slots of an engine sized by a memory cap (filled_engine with batch=None)


def filled_engine(model, profile, context: int, steps: int, batch: int | None = 1, **engine_args) -> Engine:
    """An engine whose slots ``0 .. batch - 1`` each decode a request of ``context`` prompt tokens (K/V left as
    zeros); ``batch=None``: every slot that the memory arguments in ``engine_args`` allow, up to :data:`MAX_SLOTS`."""
    engine = Engine(model, profile, max_batch_size=batch or MAX_SLOTS, max_model_len=context + steps + 16,
                    max_decode_len=steps + 16, **engine_args)
    batch = batch or engine.slots
    if engine.slots < batch:
        raise SystemExit(f"{batch} requests of {context} tokens do not fit in the device's memory "
                         f"({engine.slots} slots); lower --batches or --contexts")
    counts = [engine.params.kept_tokens(context, g.budget) for g in engine.kv.groups]
    for slot in range(batch):
        request = _Request(-1 - slot, [0] * context, SamplingParams(max_tokens=steps, temperature=0, ignore_eos=True),
                           0)
        request.slot = slot
        engine.kv.activate(slot, counts)
        engine._positions[slot] = context
        engine._active[slot] = 1
        engine._running[slot] = request
    return engine


def kv_bytes_read(engine: Engine) -> int:
    """K/V bytes the next step reads: every group's ``length - 1`` tokens (less the sink) of every running row, K
    and V."""
    element = engine.model.embed.element_size()
    return sum(2 * g.kv_heads.numel() * (int(engine.kv.lengths[g.row, slot]) - 1) * engine.model.head_dim * element
               for g in engine.kv.groups for slot in engine._running)


def time_step_ms(engine: Engine, steps: int) -> float:
    """Milliseconds per decode step of the running rows (the engine's own window): graph replays on CUDA, eager
    steps elsewhere."""
    lo, rows = engine._window()
    if engine.cuda_graphs:
        return bench.time_replays(engine._capture(lo, rows, Filters()), steps)
    with torch.inference_mode():
        engine._decode_step(lo, rows, Filters())
        start = time.perf_counter()
        for _ in range(steps):
            engine._decode_step(lo, rows, Filters())
        return 1e3 * (time.perf_counter() - start) / steps


def capacity(cap_gib: float | None, batch: int, ms: float) -> dict:
    """What a record of a memory-capped run adds: the cap, tokens per second and the peak memory; {} without a cap."""
    if cap_gib is None:
        return {}
    return dict(memory_cap_gib=cap_gib, tokens_per_s=round(batch * 1e3 / ms, 1), peak_gib=bench.peak_gib())


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_step_arguments(parser, smoke="CPU, Triton's interpreter, a tiny model, context 200, 2 steps "
                                           "(figures mean nothing)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1],
                        help="requests decoding together, each of the whole context")
    parser.add_argument("--memory-cap-gib", type=float, default=None,
                        help="instead of --batches: as many requests as fit this much memory in all (GiB)")
    parser.add_argument("--model", default=None,
                        help="a real model instead of random Llama-3-8B shapes: an embedded name, .gguf, folder or "
                             "Hub id (needs --profile)")
    parser.add_argument("--profile", default=None, help="with --model: the catekv arm's profile (name, file, Hub id)")
    parser.add_argument("--out", type=Path, default=None, help="write every record to this JSON file")
    args = parser.parse_args(argv)
    if (args.model is None) != (args.profile is None):
        parser.error("--model and --profile go together")
    if args.model is not None:
        from catekv_models import load_model

        device = "cpu" if args.smoke else "cuda"
        if device == "cuda" and not torch.cuda.is_available():
            parser.error("needs a CUDA GPU (or --smoke)")
        model = load_model(args.model, device=device, dtype="float32" if args.smoke else "bfloat16", progress=False)[0]
        loaded = ck.load_profile(args.profile)
        contexts, steps = ([200], 2) if args.smoke else (args.contexts, args.steps)
        budget = loaded.params.budget
        bandwidth = bench.host_copy_bandwidth() if args.smoke else bench.copy_bandwidth()
        engine_args = {}  # the engine's own choice: plain PyTorch on the CPU (a smoke run checks the script only)
    elif args.smoke:
        model = bench.build_model(2, device="cpu", **bench.TINY)
        contexts, steps, budget, bandwidth = [200], 2, 64, bench.host_copy_bandwidth()
        engine_args = dict(attention="triton", projections="triton")
    else:
        if not torch.cuda.is_available():
            parser.error("needs a CUDA GPU (or --smoke)")
        model = bench.build_model(args.layers)
        contexts, steps, budget, bandwidth = args.contexts, args.steps, args.budget, bench.copy_bandwidth()
        engine_args = {}
    batches = args.batches
    if args.memory_cap_gib is not None:
        batches = [None]
        engine_args.update(bench.engine_memory(model, args.memory_cap_gib))
    results: list[dict] = []
    ratio = loaded.params.adaptive_ratio if args.model else args.ratio
    bench.emit(results, suite="setup", smoke=args.smoke, device=str(model.device), model=args.model or "random",
               profile=args.profile or "random", layers=model.config.num_hidden_layers,
               copy_gbps=round(bandwidth / 1e9, 1), budget=budget, ratio=ratio)
    catekv = loaded if args.model else bench.random_profile(model, budget, args.ratio)
    for context, batch, arm in itertools.product(contexts, batches, args.arms):
        profile = catekv if arm == "catekv" else None
        bench.reset_peak()
        engine = filled_engine(model, profile, context, steps + 2, batch, **engine_args)
        batch = engine.num_running
        kv_start = kv_bytes_read(engine)
        ms = time_step_ms(engine, steps)
        kv = (kv_start + kv_bytes_read(engine)) // 2  # the step's K/V reads grow by a token a step: the mean
        floor = bench.decode_floor_ms(model, kv, bandwidth)
        bench.emit(results, suite="engine-step", arm=f"engine-{arm}", context=context, batch=batch, steps=steps,
                   projections=engine.projections, attention=engine.attention, cuda_graphs=engine.cuda_graphs,
                   decode_ms_per_step=round(ms, 3), floor_ms=float(f"{floor:.4g}"),
                   ratio_to_floor=round(ms / floor, 3), kv_gib=round(kv / bench.GiB, 3),
                   **capacity(args.memory_cap_gib, batch, ms))
        del engine
    if args.out is not None:
        bench.write_records(args.out, results)
    return results


if __name__ == "__main__":
    main()
