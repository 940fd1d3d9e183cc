"""Where a lean decode step's time goes: each stage of one step timed alone, batch 1.

Same set-up as ``benchmarks/decode.py --suite synthetic`` (random-weight Llama-3-8B shapes in bf16, CateKV
r = 0.4, eta = 1, budget 2048, caches filled with random K/V of the sizes a prefill leaves), for CateKV and
for full attention on the lean path. For each context and arm it times:

    step            the whole decode step, one CUDA graph (``decode.time_graph_steps``, as decode.py does)
    pre_attention   every layer's input norm, q/k/v projection (fused), RoPE   (LeanGenerator._pre; with
                    the Triton projections the decode kernel applies RoPE, in the attention stage)
    attention       every layer's Triton split-K kernels over its head groups, which also append this
                    step's K/V, + combine                                       (_DecodeState._attention)
    post_attention  every layer's o_proj, residual, norm, MLP, residual        (LeanGenerator._post)
    embed_and_head  embedding, RoPE cos/sin, final norm, lm_head, argmax, position/step/length update
                    (_DecodeState._embed + _DecodeState._next_token)

These are exactly the calls ``_DecodeState.step`` makes. Each stage is captured in its own CUDA graph over
the step's static buffers (its inputs are the outputs of one eager run of the stages before it) and
replayed ``--steps`` times per round between CUDA events; the median of ``--rounds`` rounds is reported.
Per stage: ms, the bytes it must move (weights it reads; KV it reads; K/V it writes), the implied GB/s
and its share of the device-to-device copy bandwidth, and that bandwidth's floor for those bytes. The
``summary`` record gives the sum of the stages against the whole step (the difference is what running
the stages back to back in one graph adds or saves) and the step's floor, (weight bytes + KV bytes) /
copy bandwidth, as in decode.py.

    python benchmarks/decode_stages.py                                   # 128K and 512K, CateKV and full
    python benchmarks/decode_stages.py --contexts 131072 --arms catekv --trace --out /tmp/trace.json
    python benchmarks/decode_stages.py --projections triton torch     # fused Triton GEMVs vs cuBLAS, side by side
    python benchmarks/decode_stages.py --programs-per-sm 1.5 2 3 4    # split counts of the decode kernel, side by side
    python benchmarks/decode_stages.py --concurrent-groups off on      # CateKV's two head groups on one / two streams
    python benchmarks/decode_stages.py --smoke                           # CPU: tests the script, times nothing

``--trace`` also runs each stage's graph once under torch.profiler (CUDA activity only) and adds the number
of kernels, their summed time and the span from first start to last end (span - busy = gaps between
kernels). It comes after the timings of each arm, but the profiler may leave overhead behind for later
arms: take timings from a run without it. ``--smoke`` runs the same code on CPU with a 2-layer tiny model,
a tiny context, the Triton kernels through their interpreter (TRITON_INTERPRET=1) and no CUDA graphs
(time.perf_counter around plain calls); its figures mean nothing.
"""

from __future__ import annotations

import argparse
import collections
import gc
import itertools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

# Triton chooses between compiling and interpreting when it is imported (the lean path imports it).
if __name__ == "__main__" and "--smoke" in sys.argv[1:]:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.decode import (  # noqa: E402
    GiB,
    TINY,
    build_model,
    copy_bandwidth,
    decode_floor_ms,
    emit,
    kernel_config,
    kv_bytes_of,
    random_profile,
    synthetic_state,
    time_graph_steps,
    weight_bytes,
    write_records,
)
from catekv_runtime.lean import LeanGenerator, _DecodeState  # noqa: E402

STAGES = ("pre_attention", "attention", "post_attention", "embed_and_head")
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "results" / "decode_stages.json"
SMOKE_OUT = Path(tempfile.gettempdir()) / "decode_stages_smoke.json"  # never into docs/results
# ------------------------------------------------------------------------------------ bytes per stage


def _param_bytes(modules) -> tuple[int, set[int]]:
    seen: dict[int, torch.Tensor] = {}
    for module in modules:
        for p in module.parameters():
            seen[id(p)] = p
    return sum(p.numel() * p.element_size() for p in seen.values()), set(seen)


def stage_weight_bytes(model, batch: int) -> dict[str, int]:
    """Weight bytes each stage reads in one step, and ``unattributed``: parameters no stage claims
    (0 when the stages cover the model; the embedding table counts as one row per sequence)."""
    decoder = model.get_decoder()
    embed = model.get_input_embeddings().weight
    parts = {
        "pre_attention": [m for layer in decoder.layers for m in (layer.input_layernorm, layer.self_attn.q_proj,
                                                                   layer.self_attn.k_proj, layer.self_attn.v_proj)],
        "post_attention": [m for layer in decoder.layers for m in (layer.self_attn.o_proj,
                                                                    layer.post_attention_layernorm, layer.mlp)],
        "embed_and_head": [decoder.norm, model.lm_head],
    }
    out, claimed = {}, {id(embed)}
    for name, modules in parts.items():
        out[name], ids = _param_bytes(modules)
        claimed |= ids
    if id(embed) not in {id(p) for p in model.lm_head.parameters()}:  # tied: lm_head already reads it all
        out["embed_and_head"] += batch * embed.shape[1] * embed.element_size()
    out["unattributed"] = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in claimed)
    return out


def append_bytes(state: _DecodeState) -> int:
    """K/V bytes one step writes into the caches (one slot per KV head, layer and sequence)."""
    return sum(slot.decode_kv[:, :, :, 0].numel() * slot.decode_kv.element_size()
               for layer in state.layers for slot in layer)


# ------------------------------------------------------------------------------------- the stages


def stage_functions(state: _DecodeState) -> dict[str, Callable[[], None]]:
    """One callable per stage, each running that part of ``state.step`` for every layer over static inputs.

    The inputs are the outputs of one eager run of the parts before it: the embedding and RoPE of the
    current token feed every layer's projections, those layers' q and K/V feed the append and the
    attention, and the attention output buffer plus the embedding feed the post-attention chain and the head.
    """
    gen = state.gen
    layers = list(zip(gen.decoder.layers, state.layers))
    hidden, cos, sin = state._embed()
    pre = [gen._pre(layer, hidden, cos, sin) for layer, _ in layers]
    attn_out = state._attention(*pre[0], layers[0][1])  # triton: the step's static output buffer

    def pre_attention():
        for layer, _ in layers:
            gen._pre(layer, hidden, cos, sin)

    def attention():
        for (_, slots), (q, kv, rope) in zip(layers, pre):
            state._attention(q, kv, rope, slots)

    def post_attention():
        h = hidden
        for layer, _ in layers:
            h = gen._post(layer, h, attn_out)

    def embed_and_head():
        state._embed()
        state._next_token(hidden)

    fns = dict(pre_attention=pre_attention, attention=attention, post_attention=post_attention,
               embed_and_head=embed_and_head)
    assert tuple(fns) == STAGES
    return fns


def counters(state: _DecodeState) -> Callable[[], None]:
    """A function that puts back the state's device counters (the step and the head stage advance them)."""
    live = (state.token, state.position, state.step_index, state.lengths)
    saved = [t.clone() for t in live]

    def restore() -> None:
        for t, s in zip(live, saved):
            t.copy_(s)

    return restore


# ------------------------------------------------------------------------------------------ timing


def capture(fn: Callable[[], None], restore: Callable[[], None]) -> torch.cuda.CUDAGraph:
    """Warm ``fn`` up on a side stream (as ``_DecodeState.capture`` does), then capture it."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    restore()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def time_replays(run: Callable[[], None], restore: Callable[[], None], replays: int, rounds: int,
                 cuda: bool) -> float:
    """Median over ``rounds`` of the ms per call of ``run`` called ``replays`` times back to back.

    Counters are restored before each round, so no round writes past the caches' spare slots."""
    times = []
    for _ in range(rounds):
        restore()
        run()  # warm
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for _ in range(replays):
                run()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / replays)
        else:
            t = time.perf_counter()
            for _ in range(replays):
                run()
            times.append(1e3 * (time.perf_counter() - t) / replays)
    restore()
    return statistics.median(times)


def kernel_trace(graph: torch.cuda.CUDAGraph, restore: Callable[[], None]) -> dict:
    """Kernels of one replay of ``graph`` under torch.profiler: count, summed time, span, top 5 by time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    try:
        restore()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            graph.replay()
            torch.cuda.synchronize()
        restore()
        kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        if not kernels:
            return dict(kernels=0)
        busy = sum(e.time_range.elapsed_us() for e in kernels)
        span = max(e.time_range.end for e in kernels) - min(e.time_range.start for e in kernels)
        by_name: dict[str, list[float]] = collections.defaultdict(list)
        for e in kernels:
            by_name[e.name].append(e.time_range.elapsed_us())
        top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:5]
        return dict(kernels=len(kernels), kernel_busy_ms=round(busy / 1e3, 4), kernel_span_ms=round(span / 1e3, 4),
                    top_kernels=[[name[:100], len(t), round(sum(t) / 1e3, 4)] for name, t in top])
    except Exception as exc:  # diagnosis only: never lose the timings over it
        return dict(trace_error=f"{type(exc).__name__}: {exc}"[:300])


def measure(state: _DecodeState, args, cuda: bool) -> dict[str, dict]:
    """ms (and, with --trace, kernels) of the whole step and of each stage of ``state``."""
    restore = counters(state)
    out: dict[str, dict] = {}
    if cuda:
        steps = []
        for _ in range(args.rounds):
            restore()
            steps.append(time_graph_steps(state, args.steps))
        restore()
        out["step"] = dict(ms=statistics.median(steps))
        graphs = {"step": state.capture()} if args.trace else {}
    else:
        out["step"] = dict(ms=time_replays(state.step, restore, args.steps, args.rounds, cuda=False))
        graphs = {}
    for name, fn in stage_functions(state).items():
        restore()
        run = fn
        if cuda:
            graph = capture(fn, restore)
            run = graph.replay
            if args.trace:
                graphs[name] = graph
        out[name] = dict(ms=time_replays(run, restore, args.steps, args.rounds, cuda))
    for name, graph in graphs.items():
        out[name].update(kernel_trace(graph, restore))
    return out


# ------------------------------------------------------------------------------------------- driver


def rate(nbytes: int, ms: float, bandwidth: float) -> dict:
    gbps = nbytes / (ms * 1e-3) / 1e9 if ms > 0 else 0.0
    return dict(bytes=nbytes, gbps=round(gbps, 1), of_copy=round(gbps * 1e9 / bandwidth, 3),
                floor_ms=round(1e3 * nbytes / bandwidth, 4))


def cpu_copy_bandwidth() -> float:
    """--smoke's stand-in for ``decode.copy_bandwidth`` (read + write bytes per second of a CPU copy)."""
    src = torch.randn(1 << 22)
    dst = torch.empty_like(src)
    dst.copy_(src)
    t = time.perf_counter()
    for _ in range(5):
        dst.copy_(src)
    return 5 * 2 * src.numel() * src.element_size() / (time.perf_counter() - t)


def run_arm(model, gen: LeanGenerator, arm: str, context: int, args, bandwidth: float, cuda: bool,
            results: list) -> None:
    """Build the synthetic state of ``context`` tokens for ``gen``, time it, emit one record per stage."""
    head_map, params = (gen.profile.head_map, gen.profile.params) if gen.profile is not None \
        else gen._head_map_and_params()
    # steps + 8 spare slots, as decode.py: no timing round writes past them (counters restored per round).
    state = synthetic_state(gen, head_map, params, args.batch, context, args.steps + 8)
    kv = kv_bytes_of(state)
    appended = append_bytes(state)
    nbytes = dict(stage_weight_bytes(model, args.batch), attention=kv + appended)
    floor = decode_floor_ms(model, kv, bandwidth)
    embed = model.get_input_embeddings().weight
    step_bytes = weight_bytes(model) - embed.numel() * embed.element_size() + kv  # the bytes of that floor
    times = measure(state, args, cuda)
    config = gen.kernel_config  # never None on the triton backend
    common = dict(suite="stages", arm=f"lean-{arm}", projections=gen.projections,
                  programs_per_sm=config.programs_per_sm, concurrent_groups=config.concurrent_groups,
                  context=context,
                  batch=args.batch, block_n=config.block_n,
                  num_splits=state.workspace.num_splits, head_groups=sum(len(slots) for slots in state.layers),
                  kv_gib=round(kv / GiB, 3), append_bytes=appended)
    del state
    for name in ("step", *STAGES):
        t = dict(times[name])
        ms = t.pop("ms")
        emit(results, **common, stage=name, ms=round(ms, 4),
             **rate(step_bytes if name == "step" else nbytes[name], ms, bandwidth), **t)
    step, total = times["step"]["ms"], sum(times[name]["ms"] for name in STAGES)
    emit(results, **common, stage="summary", step_ms=round(step, 4), sum_of_stages_ms=round(total, 4),
         inter_stage_ms=round(step - total, 4), floor_ms=round(floor, 4), ratio_to_floor=round(step / floor, 3),
         over_floor_ms=round(step - floor, 4))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=None,
                        help="context lengths (default 131072 524288; --smoke: 200)")
    parser.add_argument("--arms", nargs="+", choices=["catekv", "full"], default=["catekv", "full"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--budget", type=int, default=None, help="CateKV budget (default 2048; --smoke: 64)")
    parser.add_argument("--steps", type=int, default=None, help="replays per timing round (default 64; --smoke: 2)")
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds, median taken (default 3; --smoke: 1)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 32; --smoke: 2)")
    parser.add_argument("--block-n", type=int, nargs="+", default=[None],
                        help="Triton decode tile, each value an arm (default: LeanGenerator's, 64 for CateKV and "
                             "32 for full)")
    parser.add_argument("--projections", nargs="+", choices=["triton", "torch"], default=["triton"],
                        help="LeanGenerator(projections=...): fused Triton kernels and/or cuBLAS (each a separate arm)")
    parser.add_argument("--programs-per-sm", type=float, nargs="+", default=[None],
                        help="DecodeConfig.programs_per_sm of the decode kernel, each value an arm (default: "
                             "LeanGenerator's)")
    parser.add_argument("--concurrent-groups", nargs="+", choices=["on", "off"], default=[None],
                        help="DecodeConfig.concurrent_groups (CateKV's head groups of a layer on two streams), each "
                             "value an arm (default: LeanGenerator's)")
    parser.add_argument("--trace", action="store_true", help="also count each stage's kernels with torch.profiler")
    parser.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny model, no CUDA graphs")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"JSON file (default {DEFAULT_OUT.relative_to(DEFAULT_OUT.parents[2])}; --smoke: "
                             f"{SMOKE_OUT})")
    args = parser.parse_args(argv)
    smoke = args.smoke
    if args.out is None:
        args.out = SMOKE_OUT if smoke else DEFAULT_OUT
    for name, full, tiny in (("contexts", [131072, 524288], [200]), ("budget", 2048, 64), ("steps", 64, 2),
                             ("rounds", 3, 1), ("layers", 32, 2)):
        if getattr(args, name) is None:
            setattr(args, name, tiny if smoke else full)
    if smoke and args.trace:
        parser.error("--trace needs CUDA (no --smoke)")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark; returns the records it printed and wrote to ``--out``."""
    args = parse_args(argv)
    cuda = not args.smoke
    if cuda and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (or --smoke)")
    if args.smoke and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--smoke needs TRITON_INTERPRET=1 set before triton is imported")
    torch.manual_seed(0)
    if cuda:
        model = build_model(args.layers)
        bandwidth = copy_bandwidth()
    else:
        model = build_model(args.layers, device="cpu", **TINY)
        bandwidth = cpu_copy_bandwidth()
    weights = stage_weight_bytes(model, args.batch)
    results: list = []
    emit(results, suite="setup", smoke=args.smoke,
         device=torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter)",
         torch=torch.__version__, copy_bandwidth_gbs=round(bandwidth / 1e9, 1),
         weight_gib=round(weight_bytes(model) / GiB, 2), unattributed_weight_bytes=weights["unattributed"],
         layers=args.layers, steps=args.steps, rounds=args.rounds, budget=args.budget, trace=args.trace,
         date=time.strftime("%Y-%m-%d"))
    gens = {}
    for arm in args.arms:  # one generator per arm: torch.compile runs once per arm, not per context
        profile = random_profile(model, args.budget) if arm == "catekv" else None
        for projections in args.projections:
            for block_n, per_sm, concurrent in itertools.product(args.block_n, args.programs_per_sm,
                                                                 args.concurrent_groups):
                config = kernel_config(profile, block_n, per_sm, None if concurrent is None else concurrent == "on")
                gens[arm, projections, block_n, per_sm, concurrent] = LeanGenerator(
                    model, profile, backend="triton", cuda_graph=cuda, kernel_config=config, projections=projections)
    for context in args.contexts:
        for (arm, *_), gen in gens.items():
            gc.collect()  # the previous arm's caches and graphs go before this arm's are allocated
            if cuda:
                torch.cuda.empty_cache()
            run_arm(model, gen, arm, context, args, bandwidth, cuda, results)
            write_records(args.out, results)  # after every arm: a later failure keeps what was measured
    write_records(args.out, results)
    return results



if __name__ == "__main__":
    main()
