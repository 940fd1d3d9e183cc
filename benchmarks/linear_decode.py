"""One token's projections on the GPU: the fused Triton GEMV (kernels.triton_linear) against cuBLAS.

Llama-3-8B's five batch-1 projections, bf16, each with what the engine's batch-1 decode step fuses into it:

    qkv      [6144, 4096]    RMSNorm before            o_proj   [4096, 4096]    residual after
    gate_up  [28672, 4096]   RMSNorm before, SiLU x up  down     [4096, 14336]   residual after
    lm_head  [128256, 4096]  RMSNorm before

Arms, in one run: ``cublas``, ``F.linear`` alone (the GEMV of the torch path, without its norm and epilogue
kernels, so a lower bound of that path); ``triton``, ``fused_linear`` with its default tile; with ``--sweep``,
``fused_linear`` over a grid of tiles. Each timed unit is a CUDA graph calling the projection once per
"layer" over distinct weights (at least 1 GiB in all, so L2 never holds them), replayed; time per call =
replay time / layers (``kernel_decode.time_graph``). GB/s counts the weight bytes; ``of_copy`` divides by the
device-to-device copy bandwidth.

    python benchmarks/linear_decode.py --out /tmp/linear_decode.json
    python benchmarks/linear_decode.py --sweep --out /tmp/linear_sweep.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.decode import copy_bandwidth, emit, write_records  # noqa: E402
from benchmarks.kernel_decode import time_graph  # noqa: E402
from catekv_runtime.kernels.triton_linear import LinearConfig, default_linear_config, fused_linear  # noqa: E402

HIDDEN, INTER, VOCAB, Q_ROWS, KV_ROWS = 4096, 14336, 128256, 4096, 1024
SHAPES = {  # name: (rows, input dim, fused_linear options)
    "qkv": (Q_ROWS + 2 * KV_ROWS, HIDDEN, dict(norm=True)),
    "o_proj": (HIDDEN, HIDDEN, dict(residual=True)),
    "gate_up": (2 * INTER, HIDDEN, dict(norm=True, glu=True)),
    "down": (HIDDEN, INTER, dict(residual=True)),
    "lm_head": (VOCAB, HIDDEN, dict(norm=True)),
}
ROTATE_BYTES = 1 << 30


def run_shape(name: str, sweep: bool, bandwidth: float, results: list) -> None:
    rows, k_dim, opts = SHAPES[name]
    glu = opts.get("glu", False)
    weight_bytes = rows * k_dim * 2
    layers = max(2, -(-ROTATE_BYTES // weight_bytes))
    weights = [torch.randn(rows, k_dim, dtype=torch.bfloat16, device="cuda") * 0.02 for _ in range(layers)]
    x = torch.randn(1, 1, k_dim, dtype=torch.bfloat16, device="cuda")
    norm = torch.ones(k_dim, dtype=torch.bfloat16, device="cuda") if opts.get("norm") else None
    n_out = rows // 2 if glu else rows
    residual = torch.randn(1, 1, n_out, dtype=torch.bfloat16, device="cuda") if opts.get("residual") else None

    def cublas() -> None:
        for w in weights:
            F.linear(x, w)

    def triton_fn(config: LinearConfig) -> Callable[[], None]:
        def run() -> None:
            for w in weights:
                fused_linear(x, w, residual=residual, norm_weight=norm, glu=glu, config=config)
        return run

    def record(arm: str, seconds: float, **extra) -> None:
        ms = seconds * 1e3
        gbps = weight_bytes / (ms * 1e-3) / 1e9
        emit(results, shape=name, rows=rows, k=k_dim, arm=arm, us=round(ms * 1e3, 2), gbps=round(gbps, 1),
             of_copy=round(gbps * 1e9 / bandwidth, 3), layers_rotated=layers, **extra)

    record("cublas", time_graph(cublas, layers))
    default = default_linear_config(n_out, k_dim, torch.cuda.get_device_properties(0).multi_processor_count, glu)
    record("triton", time_graph(triton_fn(default), layers), **vars(default))
    if sweep:
        best = None
        for block_n in (2, 4, 8, 16, 32):
            for block_k in (128, 256, 512, 1024):
                for warps in (2, 4, 8):
                    config = LinearConfig(block_n=block_n, block_k=block_k, num_warps=warps)
                    if block_n * block_k > 16384 or block_n * block_k < 32 * warps:
                        continue
                    try:
                        seconds = time_graph(triton_fn(config), layers)
                    except Exception as exc:  # e.g. out of registers: record and go on
                        print(json.dumps({"shape": name, "skipped": vars(config), "error": str(exc)[:200]}))
                        continue
                    record("triton_sweep", seconds, **vars(config))
                    if best is None or seconds < best[0]:
                        best = (seconds, config)
        record("triton_sweep_best", best[0], **vars(best[1]))
    del weights
    torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--sweep", action="store_true", help="also time a grid of tiles per shape")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    torch.manual_seed(0)
    results: list = []
    bandwidth = copy_bandwidth()
    emit(results, suite="setup", device=torch.cuda.get_device_name(), torch=torch.__version__,
         copy_bandwidth_gbs=round(bandwidth / 1e9, 1), date=time.strftime("%Y-%m-%d"))
    for name in args.shapes:
        run_shape(name, args.sweep, bandwidth, results)
        write_records(args.out, results)


if __name__ == "__main__":
    main()
