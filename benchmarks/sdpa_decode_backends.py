"""Time SDPA's backends on the plain path's decode call: the query heads of a KV head folded into the query axis.

A decode step calls SDPA once per head group with a cache one token longer than the step before. This
script makes exactly those calls at lengths 131072, 131073, ... and prints ms per call for each backend
choice, then the default backend at one repeated length. On an H200 (torch 2.11) the default is cuDNN,
which builds a new plan for every new length; that is why ``catekv_runtime.attention`` leaves it out.

    python benchmarks/sdpa_decode_backends.py > docs/results/sdpa_decode_backends.log   # CUDA only
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

CHOICES = {
    "default": None,
    "no-cudnn": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
    "cudnn": [SDPBackend.CUDNN_ATTENTION],
    "flash": [SDPBackend.FLASH_ATTENTION],
}


def timed_call(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, backends) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    if backends is None:
        F.scaled_dot_product_attention(query, keys, values, scale=0.088)
    else:
        with sdpa_kernel(backends):
            F.scaled_dot_product_attention(query, keys, values, scale=0.088)
    torch.cuda.synchronize()
    return round(1e3 * (time.perf_counter() - start), 3)


def main(base: int = 131072, calls: int = 6, dim: int = 128, group: int = 4) -> None:
    torch.manual_seed(0)
    for heads in (3, 5, 8):
        kv = torch.randn(2, 1, heads, base + calls, dim, device="cuda", dtype=torch.bfloat16)
        for label, backends in CHOICES.items():
            times = []
            for i in range(calls):
                query = torch.randn(1, heads, group, dim, device="cuda", dtype=torch.bfloat16)
                try:
                    times.append(timed_call(query, kv[0, :, :, : base + i], kv[1, :, :, : base + i], backends))
                except RuntimeError as error:
                    times.append(f"error: {str(error)[:60]}")
                    break
            print(f"heads {heads} group {group} {label}: ms per call at lengths {base}..+{calls - 1}: {times}", flush=True)
        query = torch.randn(1, heads, group, dim, device="cuda", dtype=torch.bfloat16)
        same = [timed_call(query, kv[0, :, :, :base], kv[1, :, :, :base], None) for _ in range(4)]
        print(f"heads {heads}: default, same length repeated: {same}", flush=True)


if __name__ == "__main__":
    main()
