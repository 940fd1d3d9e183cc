"""Prefill time and peak memory of LeanGenerator's layer-by-layer prefill, by chunk size, against the model's forward.

Random-weight Llama-3-8B shapes in bf16, a random CateKV profile (r = 0.4, budget 2048), one prompt of
``--context`` tokens, one new token. ``none`` is the model's own forward (``prefill_chunk=None``); a chunk as
long as the prompt is the layer-by-layer path with no bottom-right-aligned chunk attention. Settings are run
in the order given (repeat one to see warm-up).

    python benchmarks/prefill_chunks.py --context 65536 --chunks 8192 none 65536 8192 none 16384   # CUDA
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.decode import build_model, random_profile  # noqa: E402
from catekv_runtime.lean import LeanGenerator  # noqa: E402


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=65536)
    parser.add_argument("--chunks", nargs="+", default=["8192", "none", "65536", "8192", "none", "16384"])
    args = parser.parse_args(argv)
    model = build_model(32)
    profile = random_profile(model, 2048)
    ids = torch.randint(0, 1000, (1, args.context), device="cuda")
    records = []
    for chunk in args.chunks:
        size = None if chunk == "none" else int(chunk)
        gen = LeanGenerator(model, profile, prefill_chunk=size, cuda_graph=False, compile=False)
        torch.cuda.reset_peak_memory_stats()
        gen.generate(ids, max_new_tokens=1)
        records.append({"context": args.context, "prefill_chunk": size, "prefill_s": round(gen.stats.prefill_s, 2),
                        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)})
        print(json.dumps(records[-1]), flush=True)
    return records


if __name__ == "__main__":
    main()
