"""Decode-attention bandwidth on the GPU: the Triton split-K kernel against torch SDPA.

Llama-3-8B shapes (32 query heads, 8 KV heads, head_dim 128, bf16), one new token per sequence.
Each timed unit is a CUDA graph that runs the kernel once per "layer" over ``layers`` distinct
KV buffers (so L2 never holds the cache), replayed many times; time per call = replay time /
layers. Bandwidth counts the K and V bytes that must be read (``2 * B * H_kv * length * D * 2``).
A device-to-device copy in the same process gives the reference bandwidth (read + write bytes).

    python benchmarks/kernel_decode.py --out kernel_decode.json            # 8K..512K x batch 1, 8
    python benchmarks/kernel_decode.py --sweep --out kernel_sweep.json     # config sweep at 128K
    python benchmarks/kernel_decode.py --block-n 64 --num-warps 4 --num-stages 3 --num-splits 66 \
        --combine fused --contexts 32768 --batches 1 --out one.json        # one explicit config

Results are printed as JSON lines and written together to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict
from typing import Any, Callable

import torch
import torch.nn.functional as F
import triton.testing

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from catekv_runtime.files import write_atomically  # noqa: E402
from catekv_runtime.kernels import triton_decode as td  # noqa: E402

Q_HEADS, KV_HEADS, HEAD_DIM, DTYPE = 32, 8, 128, torch.bfloat16
DEVICE = "cuda"
ROTATE_BYTES = 1 << 30  # rotate over at least this much KV per graph (L2 is ~50-60 MB)
MEMORY_BUDGET = 64 << 30  # never allocate more KV than this for one size


def emit(record: dict[str, Any], sink: list[dict[str, Any]]) -> None:
    sink.append(record)
    print(json.dumps(record), flush=True)


def time_graph(fn: Callable[[], None], calls_per_replay: int, min_seconds: float = 0.2) -> float:
    """Median seconds per call of ``fn`` (which makes ``calls_per_replay`` calls) replayed in a graph."""
    fn()  # compile / warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    once = start.elapsed_time(end) / 1e3
    reps = int(min(100, max(5, math.ceil(min_seconds / max(once, 1e-6)))))
    times = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del graph
    return statistics.median(times) / calls_per_replay


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth in GB/s, counting read + write bytes."""
    src = torch.randn(nbytes // 4, dtype=torch.float32, device=DEVICE)
    dst = torch.empty_like(src)
    # Not through a CUDA graph: captured, a copy becomes a memcpy node run by the copy engines, which
    # moved 2.77 TB/s on the H200 against 4.27 TB/s for the copy kernel that eager mode launches.
    seconds = triton.testing.do_bench(lambda: dst.copy_(src), warmup=200, rep=500, return_mode="median") / 1e3
    del src, dst
    return 2 * nbytes / seconds / 1e9


class Layers:
    """``count`` layers' worth of q / K / V / lengths buffers of one size."""

    def __init__(self, batch: int, context: int, capacity: int, count: int, seed: int = 0):
        torch.manual_seed(seed)
        shape = (batch, KV_HEADS, capacity, HEAD_DIM)
        self.q = [torch.randn(batch, Q_HEADS, HEAD_DIM, dtype=DTYPE, device=DEVICE) for _ in range(count)]
        self.k = [torch.randn(shape, dtype=DTYPE, device=DEVICE) for _ in range(count)]
        self.v = [torch.randn(shape, dtype=DTYPE, device=DEVICE) for _ in range(count)]
        self.out = [torch.empty_like(q) for q in self.q]
        self.lengths = torch.full((batch,), context, dtype=torch.int32, device=DEVICE)
        self.batch, self.context, self.count = batch, context, count

    @property
    def kv_bytes(self) -> int:
        """K and V bytes one call must read."""
        return 2 * self.batch * KV_HEADS * self.context * HEAD_DIM * torch.finfo(DTYPE).bits // 8

    def triton_fn(self, config: td.DecodeConfig, num_splits: int) -> Callable[[], None]:
        ws = [td.make_workspace(self.batch, Q_HEADS, HEAD_DIM, num_splits, DEVICE) for _ in range(self.count)]

        def run() -> None:
            for i in range(self.count):
                td.decode_attention(self.q[i], self.k[i], self.v[i], self.lengths, out=self.out[i],
                                    config=config, workspace=ws[i])
        return run

    def sdpa_fn(self) -> Callable[[], None]:
        n = self.context

        def run() -> None:
            for i in range(self.count):
                F.scaled_dot_product_attention(self.q[i][:, :, None], self.k[i][:, :, :n],
                                               self.v[i][:, :, :n], enable_gqa=True)
        return run

    def errors(self, config: td.DecodeConfig, num_splits: int) -> dict[str, float]:
        """Relative errors of ours vs SDPA (whole batch) and of both vs fp32 (sequence 0)."""
        n = self.context
        q, k, v = self.q[0], self.k[0][:, :, :n], self.v[0][:, :, :n]
        ours = td.decode_attention(q, self.k[0], self.v[0], self.lengths, num_splits=num_splits,
                                   config=config).float()
        sdpa = F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)[:, :, 0].float()
        exact = td.decode_attention_reference(q[:1].float(), k[:1].float(), v[:1].float(), self.lengths[:1])

        def rel(a: torch.Tensor, b: torch.Tensor) -> float:
            return round(((a - b).norm() / b.norm()).item(), 6)

        return {"rel_err_vs_sdpa": rel(ours, sdpa), "rel_err_vs_fp32": rel(ours[:1], exact),
                "sdpa_rel_err_vs_fp32": rel(sdpa[:1], exact)}


def layers_for(batch: int, context: int, capacity: int, max_layers: int) -> int:
    per_layer = 2 * batch * KV_HEADS * capacity * HEAD_DIM * 2
    wanted = max(2, math.ceil(ROTATE_BYTES / per_layer))
    return max(1, min(wanted, max_layers, MEMORY_BUDGET // per_layer))


def measure(layers: Layers, impl: str, fn: Callable[[], None], copy_gbps: float, **extra: Any) -> dict[str, Any]:
    seconds = time_graph(fn, layers.count)
    gbps = layers.kv_bytes / seconds / 1e9
    return {"impl": impl, "context": layers.context, "batch": layers.batch, "us": round(seconds * 1e6, 2),
            "kv_bytes": layers.kv_bytes, "gbps": round(gbps, 1), "frac_copy": round(gbps / copy_gbps, 4),
            "layers_rotated": layers.count, **extra}


def run_sizes(args: argparse.Namespace, config: td.DecodeConfig, copy_gbps: float,
              sink: list[dict[str, Any]]) -> None:
    sms = td.sm_count(torch.device(DEVICE))
    for context in args.contexts:
        for batch in args.batches:
            capacity = int(math.ceil(context * args.cap_factor))
            count = layers_for(batch, context, capacity, args.layers)
            layers = Layers(batch, context, capacity, count)
            splits = args.num_splits or td.default_num_splits(batch, KV_HEADS, capacity,
                                                              block_n=config.block_n, sms=sms)
            fused = {"kernel": [False], "fused": [True], "both": [False, True]}[args.combine]
            for cfg in (td.DecodeConfig(**{**asdict(config), "fused_combine": f}) for f in fused):
                label = "triton_fused" if cfg.fused_combine else "triton"
                errs = layers.errors(cfg, splits)
                emit(measure(layers, label, layers.triton_fn(cfg, splits), copy_gbps, capacity=capacity,
                             num_splits=splits, **errs, **asdict(cfg)), sink)
            if not args.no_sdpa:
                emit(measure(layers, "sdpa", layers.sdpa_fn(), copy_gbps), sink)
            del layers
            torch.cuda.empty_cache()


def run_sweep(args: argparse.Namespace, copy_gbps: float, sink: list[dict[str, Any]]) -> None:
    """Staged sweep at one context: (block_n, warps, stages) at the default split count, then
    num_splits and the combine mode for the best of those. Prints the best per batch."""
    sms = td.sm_count(torch.device(DEVICE))
    context = args.sweep_context
    for batch in args.batches:
        count = layers_for(batch, context, context, args.layers)
        layers = Layers(batch, context, context, count)

        def trial(cfg: td.DecodeConfig, splits: int) -> dict[str, Any] | None:
            try:
                errs = layers.errors(cfg, splits)
                rec = measure(layers, "triton_sweep", layers.triton_fn(cfg, splits), copy_gbps,
                              num_splits=splits, **errs, **asdict(cfg))
            except Exception as exc:  # e.g. out of shared memory for large tiles x many stages
                print(json.dumps({"skipped": asdict(cfg), "num_splits": splits, "error": str(exc)[:200]}))
                return None
            emit(rec, sink)
            return rec

        results = []
        for block_n in (32, 64, 128):
            for warps in (4, 8):
                for stages in (2, 3, 4):
                    cfg = td.DecodeConfig(block_n=block_n, num_warps=warps, num_stages=stages)
                    splits = td.default_num_splits(batch, KV_HEADS, context, block_n=block_n, sms=sms)
                    results.append(trial(cfg, splits))
        best = max((r for r in results if r), key=lambda r: r["gbps"])
        base = td.DecodeConfig(block_n=best["block_n"], num_warps=best["num_warps"], num_stages=best["num_stages"])
        split_options = sorted({min(128, math.ceil(p * sms / (batch * KV_HEADS))) for p in (1, 2, 3, 4, 6, 8, 12)})
        for fused in (False, True):
            for splits in split_options:
                results.append(trial(td.DecodeConfig(**{**asdict(base), "fused_combine": fused}), splits))
        best = max((r for r in results if r), key=lambda r: r["gbps"])
        emit({**best, "impl": "triton_sweep_best"}, sink)
        if not args.no_sdpa:
            emit(measure(layers, "sdpa", layers.sdpa_fn(), copy_gbps), sink)
        del layers
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="write all records here as one JSON document")
    parser.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")],
                        default=[8192, 32768, 131072, 524288])
    parser.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    parser.add_argument("--layers", type=int, default=32, help="most KV buffers rotated per graph")
    parser.add_argument("--cap-factor", type=float, default=1.0,
                        help="cache capacity / context (>1: the kernel must skip the empty tail)")
    parser.add_argument("--block-n", type=int, default=td.DEFAULT_CONFIG.block_n)
    parser.add_argument("--num-warps", type=int, default=td.DEFAULT_CONFIG.num_warps)
    parser.add_argument("--num-stages", type=int, default=td.DEFAULT_CONFIG.num_stages)
    parser.add_argument("--num-splits", type=int, default=None, help="default: the shape heuristic")
    parser.add_argument("--combine", choices=["kernel", "fused", "both"], default="both",
                        help="merge the splits in a second kernel, in the split kernel, or time both")
    parser.add_argument("--no-sdpa", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="sweep launch configs instead of sizes")
    parser.add_argument("--sweep-context", type=int, default=131072)
    args = parser.parse_args()

    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    import triton

    props = torch.cuda.get_device_properties(0)
    records: list[dict[str, Any]] = []
    t0 = time.time()
    copy_gbps = copy_bandwidth()
    emit({"impl": "copy", "gbps": round(copy_gbps, 1), "device": props.name, "sms": props.multi_processor_count,
          "torch": torch.__version__, "triton": triton.__version__}, records)
    if args.sweep:
        run_sweep(args, copy_gbps, records)
    else:
        config = td.DecodeConfig(block_n=args.block_n, num_warps=args.num_warps, num_stages=args.num_stages)
        run_sizes(args, config, copy_gbps, records)
    emit({"impl": "done", "seconds": round(time.time() - t0, 1)}, records)
    write_atomically(args.out, json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
