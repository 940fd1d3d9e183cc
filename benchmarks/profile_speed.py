"""Profiler speed and peak GPU memory on a random-weight Llama-3-8B-shaped model (bf16), one sample per length.

    python benchmarks/profile_speed.py --contexts 32768 131072 --out docs/results/profile_speed.json

Three runs per length, side by side in one process after a warm-up: a plain prefill (the decoder alone, no
logits), the profiler's statistics for one (k, alpha) setting, and for the whole calibration grid
(``catekv-profile --calibrate``'s default 6 x 2 settings, from one softmax and one sort per head). Statistics
are computed one KV head at a time from the captured post-RoPE queries and keys, so memory stays near a plain
prefill's; the JSON records both, and each run's time over the prefill's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.decode import build_model, write_records  # noqa: E402
from catekv_profiler.profiler import sample_statistics  # noqa: E402
from catekv_runtime.profile import ProfileParams  # noqa: E402

GiB = 1024**3
GRID = [(k, alpha) for k in (0.9, 0.95, 0.98, 0.99, 0.995, 0.998) for alpha in (0.8, 1.0)]


def run(model: torch.nn.Module, ids: list[int], settings: list[tuple[float, float]] | None) -> None:
    """A plain prefill (``settings`` None) or the statistics of ``settings``."""
    if settings is None:
        with torch.inference_mode():
            model.get_decoder()(input_ids=torch.tensor([ids], device="cuda"), use_cache=False)
    else:
        stats = sample_statistics(model, ids, ProfileParams(), settings)
        assert all(torch.isfinite(t).all() for t in stats.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    model = build_model(32)
    arms = {"prefill": None, "profile": [(0.99, 1.0)], "profile_grid": GRID}
    warm = torch.randint(0, 100000, (4096,)).tolist()
    for settings in arms.values():  # kernels compiled and memory pools grown outside the timed runs
        run(model, warm, settings)
    results = []
    for context in args.contexts:
        ids = torch.randint(0, 100000, (context,)).tolist()
        prefill_s = None
        for name, settings in arms.items():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
            start = time.perf_counter()
            run(model, ids, settings)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            prefill_s = prefill_s or seconds
            record = {"context": context, "run": name, "settings": len(settings or []), "seconds": round(seconds, 2),
                      "over_prefill": round(seconds / prefill_s, 3),
                      "peak_gib": round(torch.cuda.max_memory_allocated() / GiB, 2)}
            results.append(record)
            print(json.dumps(record), flush=True)
    if args.out:
        write_records(args.out, results)


if __name__ == "__main__":
    main()
