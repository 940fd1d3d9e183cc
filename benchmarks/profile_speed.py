"""Profiler speed and peak GPU memory on a random-weight Llama-3-8B-shaped model (bf16), one sample per length.

    python benchmarks/profile_speed.py --contexts 32768 131072 --out docs/results/profile_speed.json

Statistics are computed one KV head at a time from the captured post-RoPE queries and keys, so memory
stays near a plain prefill's; the JSON records both.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.decode import build_model  # noqa: E402
from catekv_profiler.profiler import sample_statistics  # noqa: E402
from catekv_runtime.profile import ProfileParams  # noqa: E402

GiB = 1024**3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    model = build_model(32)
    params = ProfileParams()
    results = []
    for context in args.contexts:
        ids = torch.randint(0, 100000, (context,)).tolist()
        for name in ("prefill", "profile"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
            start = time.perf_counter()
            if name == "prefill":
                with torch.inference_mode():
                    model.get_decoder()(input_ids=torch.tensor([ids], device="cuda"), use_cache=False)
            else:
                stats = sample_statistics(model, ids, params)
                assert all(torch.isfinite(t).all() for t in stats.values())
            torch.cuda.synchronize()
            record = {"context": context, "run": name, "seconds": round(time.perf_counter() - start, 2),
                      "peak_gib": round(torch.cuda.max_memory_allocated() / GiB, 2)}
            results.append(record)
            print(json.dumps(record), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
