"""One prompt's prefill on the engine against the compute floor, per prefill attention backend.

Llama-3-8B shapes with random bf16 weights (``benchmarks/decode.py``'s model builder). Arms: ``catekv`` (a random
profile at r = ``--ratio``, budget ``--budget``) and ``full`` (profile None, the same engine), on each backend of
``--backends`` that runs here (``catekv_runtime.attention.PREFILL_BACKENDS``; one that cannot run is skipped with a
note, and ``auto`` is measured once under the name it resolves to). A record times ``Engine.generate`` of one prompt
of ``context`` random tokens with ``max_tokens=1`` (the whole prefill and the first token), synchronised wall clock.
Before the first arm of each backend and context, that arm's engine prefills the same prompt once untimed
(``warmup_s``, ``warmed_by``): cuDNN builds an attention plan for every new shape, and each chunk of a prompt has
its own, so without it the first arm would pay for plans that the arms after it reuse (Triton and FlashAttention-4
compile on first use likewise). ``peak_gib``: ``torch.cuda.max_memory_allocated`` over the timed prompt, the
engine's KV slots included.

The floor is the prefill's FLOPs at the rates measured in the same run:

    attention   2 * n^2 * d * Hq * layers   (causal: QK^T and PV over n^2 / 2 query-key pairs, 2 FLOPs a multiply-add)
    linear      2 * n * P                   (P: the layers' projection weights q, k, v, o, gate, up, down; the LM
                                             head runs on the last position only)
    floor_s = attention / attention_rate + linear / gemm_rate

``attention_rate`` is the best of the backends' rates at this context, each from one causal attention call of a
layer's shape over the whole context (``[1, Hq, n, d]`` queries, ``Hkv`` K/V heads; its own rate is the record's
``attention_tflops``); ``gemm_rate`` is that of the MLP's gate/up GEMM over one chunk (``[chunk, hidden] x [hidden,
2 * intermediate]``). Each record ``{"arm", "context", "backend", "prefill_s", "floor_s", "peak_gib", ...}`` replaces
the one of the same arm, context, backend, prefill chunk and smoke flag in ``--out`` (the others are kept), written
atomically.

    python benchmarks/prefill.py --contexts 131072 524288 --backends auto sdpa --out docs/results/prefill.json
    python benchmarks/prefill.py --smoke      # CPU, a tiny model: checks the script (figures mean nothing)
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.decode import (  # noqa: E402
    TINY,
    add_step_arguments,
    build_model,
    emit,
    peak_gib,
    random_profile,
    sync,
    write_records,
)
from catekv_runtime.attention import PREFILL_BACKENDS, chunk_attention, resolve_prefill_backend  # noqa: E402
from catekv_runtime.engine import Engine, SamplingParams  # noqa: E402


def sig(x: float) -> float:
    """``x`` to 4 significant digits (a smoke run's figures are tiny)."""
    return float(f"{x:.4g}")


def seconds(fn: Callable[[], object]) -> float:
    """Wall seconds of one call of ``fn``, the device synchronised before and after."""
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def attention_flops(model, n: int) -> float:
    """FLOPs of one causal attention over ``n`` tokens in one layer (the module docstring's formula)."""
    config = model.config
    return 2.0 * n * n * config.head_dim * config.num_attention_heads


def linear_params(model) -> int:
    """Elements of the layers' projection weights (every matrix of the decoder layers)."""
    return sum(p.numel() for p in model.model.layers.parameters() if p.dim() == 2)


def attention_rate(model, n: int, backend: str) -> float:
    """FLOPs per second of one causal attention call of a layer's shape over ``n`` tokens on ``backend``, timed on
    the second call (the first builds the shape's cuDNN plan or compiles the kernel)."""
    config, device, dtype = model.config, model.device, model.dtype
    d, scale = config.head_dim, config.head_dim ** -0.5
    q = torch.randn(1, config.num_attention_heads, n, d, device=device, dtype=dtype)
    k = torch.randn(1, config.num_key_value_heads, n, d, device=device, dtype=dtype)
    v = torch.randn_like(k)
    chunk_attention(q, k, v, 0, scale, backend=backend)
    elapsed = seconds(lambda: chunk_attention(q, k, v, 0, scale, backend=backend))
    return attention_flops(model, n) / elapsed


def gemm_rate(model, rows: int, repeats: int = 10) -> float:
    """FLOPs per second of the MLP's gate/up GEMM over ``rows`` tokens (the best of ``repeats`` after one)."""
    config, device, dtype = model.config, model.device, model.dtype
    x = torch.randn(rows, config.hidden_size, device=device, dtype=dtype)
    w = torch.randn(2 * config.intermediate_size, config.hidden_size, device=device, dtype=dtype)
    x @ w.T
    best = min(seconds(lambda: x @ w.T) for _ in range(repeats))
    return 2.0 * rows * config.hidden_size * 2 * config.intermediate_size / best


def usable_backends(model, requested: list[str]) -> dict[str, str]:
    """The distinct backends ``requested`` resolve to here (resolved name -> the name asked for); one that cannot
    run is left out, with a note on stderr."""
    found: dict[str, str] = {}
    for name in requested:
        try:
            resolved = resolve_prefill_backend(name, model.device, model.dtype, model.config.head_dim)
        except ValueError as exc:
            print(f"skipped: {exc}", file=sys.stderr, flush=True)
            continue
        found.setdefault(resolved, name)
    return found


def merge_records(path: Path, records: list[dict]) -> None:
    """Write ``records`` into the JSON list at ``path``, replacing those of the same arm, context, backend, prefill
    chunk and smoke flag (atomically)."""
    def key(r: dict) -> tuple:
        return r.get("arm"), r.get("context"), r.get("backend"), r.get("prefill_chunk"), r.get("smoke")

    old = json.loads(path.read_text()) if path.exists() else []
    new = {key(r) for r in records}
    write_records(path, [r for r in old if key(r) not in new] + records)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_arguments(parser, smoke="CPU, a tiny model, context 200 (figures mean nothing)", steps=False)
    parser.add_argument("--backends", nargs="+", choices=PREFILL_BACKENDS, default=["fa4", "flash2", "sdpa"])
    parser.add_argument("--prefill-chunk", type=int, default=8192, help="the engine's prefill_chunk")
    parser.add_argument("--out", type=Path, default=None, help="merge the records into this JSON file, e.g. "
                        "docs/results/prefill.json")
    args = parser.parse_args(argv)
    if args.smoke:
        model = build_model(2, device="cpu", **TINY)
        contexts, budget, chunk = [200], 64, 64
    else:
        if not torch.cuda.is_available():
            parser.error("needs a CUDA GPU (or --smoke)")
        model = build_model(args.layers)
        contexts, budget, chunk = args.contexts, args.budget, args.prefill_chunk
    backends = usable_backends(model, args.backends)
    if not backends:
        parser.error(f"none of the backends {args.backends} runs here")
    device, layers = model.device, model.config.num_hidden_layers
    gemm = gemm_rate(model, chunk)
    results: list[dict] = []
    for context in contexts:
        rates = {b: attention_rate(model, context, b) for b in backends}
        best = max(rates, key=rates.get)
        floor_attention = layers * attention_flops(model, context) / rates[best]
        floor_linear = 2.0 * context * linear_params(model) / gemm
        prompt = torch.randint(3, model.config.vocab_size, (context,), generator=torch.Generator().manual_seed(0))
        warmed: dict[str, tuple[str, float]] = {}  # backend -> (the arm that warmed it up, seconds)
        for backend, arm in itertools.product(backends, args.arms):
            profile = random_profile(model, budget, args.ratio) if arm == "catekv" else None
            engine = Engine(model, profile, max_batch_size=1, max_model_len=context + 16, max_decode_len=16,
                            prefill_chunk=chunk, prefill_backend=backend)
            params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
            if backend not in warmed:
                warmed[backend] = arm, seconds(partial(engine.generate, prompt.tolist(), params))
            # Not decode.reset_peak(): emptying the allocator's cache would add allocations to the timing.
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            prefill = seconds(partial(engine.generate, prompt.tolist(), params))
            peak = peak_gib()
            floor = floor_attention + floor_linear
            emit(results, arm=arm, context=context, backend=engine.prefill_backend, prefill_s=sig(prefill),
                 floor_s=sig(floor), ratio_to_floor=round(prefill / floor, 3),
                 peak_gib=peak, warmup_s=sig(warmed[backend][1]),
                 warmed_by=warmed[backend][0], requested=backends[backend],
                 attention_tflops=sig(rates[backend] / 1e12), best_attention_backend=best,
                 gemm_tflops=sig(gemm / 1e12), floor_attention_s=sig(floor_attention),
                 floor_linear_s=sig(floor_linear), layers=layers, prefill_chunk=chunk,
                 budget=budget if arm == "catekv" else None, ratio=args.ratio if arm == "catekv" else None,
                 device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", smoke=args.smoke)
            del engine
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if args.out is not None:
        merge_records(args.out, results)
    return results


if __name__ == "__main__":
    main()
