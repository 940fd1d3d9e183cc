"""One layer's chunked-prefill attention: ways to compute a chunk's bottom-right causal attention with GQA.

The layer-by-layer prefill (``Engine(prefill_chunk=)``) attends each chunk of queries to every key up to
its own last one: a causal mask aligned bottom-right. At Llama-3-8B shapes (32 query / 8 KV heads, head_dim 128,
bf16) this times, for every chunk after the first, in one process:

    lower_right   F.scaled_dot_product_attention(attn_mask=causal_lower_right(...), enable_gqa=True): what the
                  prefill called up to now
    flash_op      torch.ops.aten._scaled_dot_product_flash_attention(is_causal=True), which aligns the mask
                  bottom-right, on the 8 KV heads as they are (flash-attention handles GQA itself)
    runtime       catekv_runtime.attention.chunk_attention on its sdpa backend: on CUDA two cuDNN calls
                  (earlier keys unmasked, own keys square-causal) merged by their log-sum-exp
    whole         one is_causal SDPA call over the whole prompt: the same arithmetic in one piece, for scale
    whole_flash   the same call restricted to SDPA's flash backend
    whole_cudnn   the same call restricted to SDPA's cuDNN backend (``whole`` against these two: which one SDPA picks)

and compares each chunk's output of ``flash_op`` and ``runtime`` with ``lower_right``. It also prints which fused
kernels PyTorch says it can use for the bottom-right case (``can_use_flash_attention`` /
``can_use_efficient_attention``) and whether the runtime's two-call form runs on cuDNN.

    python benchmarks/chunk_attention.py --context 65536 --chunk 8192
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from catekv_runtime.attention import _cudnn_can_split, chunk_attention  # noqa: E402


def timed(fn, repeats: int = 3) -> float:
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=65536)
    parser.add_argument("--chunk", type=int, default=8192)
    args = parser.parse_args()
    from torch.backends.cuda import SDPAParams, can_use_efficient_attention, can_use_flash_attention
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    torch.manual_seed(0)
    n, c, scale = args.context, args.chunk, 128 ** -0.5
    q = torch.randn(1, 32, n, 128, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(1, 8, n, 128, dtype=torch.bfloat16, device="cuda")
    v = torch.randn_like(k)
    spans = [(s, min(s + c, n)) for s in range(c, n, c)]  # the chunks that need the bottom-right mask

    def lower_right():
        return [F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, :e], v[:, :, :e], scale=scale, enable_gqa=True,
                                               attn_mask=causal_lower_right(e - s, e)) for s, e in spans]

    def flash_op():
        return [torch.ops.aten._scaled_dot_product_flash_attention(q[:, :, s:e], k[:, :, :e], v[:, :, :e], 0.0,
                                                                   is_causal=True, scale=scale)[0] for s, e in spans]

    def runtime():
        return [chunk_attention(q[:, :, s:e], k, v, s, scale, backend="sdpa") for s, e in spans]

    def whole():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)

    def whole_on(backend):
        def run():
            with sdpa_kernel([backend]):
                return whole()
        return run

    s, e = spans[-1]
    params = SDPAParams(q[:, :, s:e], k[:, :, :e], v[:, :, :e], None, 0.0, False, True)
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "can_use_flash": can_use_flash_attention(params, debug=True),
                      "can_use_efficient": can_use_efficient_attention(params, debug=True),
                      "runtime_on_cudnn": _cudnn_can_split(q[:, :, s:e], k[:, :, :e])}), flush=True)
    record = {"context": n, "chunk": c, "chunks_timed": len(spans)}
    arms = (("lower_right", lower_right), ("flash_op", flash_op), ("runtime", runtime), ("whole", whole),
            ("whole_flash", whole_on(SDPBackend.FLASH_ATTENTION)), ("whole_cudnn", whole_on(SDPBackend.CUDNN_ATTENTION)))
    for name, fn in arms:
        try:
            record[f"{name}_s"] = round(timed(fn), 4)
        except Exception as exc:  # an op this build cannot run: say so and go on
            record[f"{name}_error"] = f"{type(exc).__name__}: {exc}"[:300]
    reference = lower_right()
    for name, fn in (("flash_op", flash_op), ("runtime", runtime)):
        try:
            record[f"{name}_max_abs_diff"] = max((a.float() - b.float()).abs().max().item()
                                                 for a, b in zip(reference, fn()))
        except Exception as exc:
            record[f"{name}_compare_error"] = f"{type(exc).__name__}: {exc}"[:300]
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
