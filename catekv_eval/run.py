"""Score KV-cache methods on RULER-style tasks with any model and profile.

    python -m catekv_eval.run MODEL PROFILE --lengths 4096 8192 --samples 20 --out results.json

MODEL is anything ``catekv-profile`` accepts (Hub id, folder, .gguf, ``smollm2-135m``). Every method
(see ``catekv_eval.methods``) runs through the CateKV runtime's plain transformers path, and the KV it
keeps is measured from the cache's bytes. Results: JSON records and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import catekv_runtime as ck
from catekv_runtime.profile import Profile

from .methods import METHODS, method_overrides
from .tasks import TASKS, make_samples
from .scoring import score


def evaluate(model: torch.nn.Module, tokenizer: Any, profile: Profile, *, tasks: Sequence[str],
             context_length: int, num_samples: int, methods: Sequence[str] = METHODS,
             seed: int = 1000, max_new_tokens: int | None = None) -> list[dict[str, Any]]:
    """One record per (task, method): score, KV kept (% of full attention's bytes), seconds.

    ``max_new_tokens`` caps RULER's per-task generation length (for quick runs; answers are short).
    """
    device = next(model.parameters()).device
    records = []
    for task in tasks:
        samples = make_samples(task, tokenizer, context_length, num_samples, seed=seed)
        for method in methods:
            ck.apply(model, profile, **method_overrides(method, profile, context_length))
            predictions, held, full = [], 0, 0
            started = time.perf_counter()
            try:
                for sample in samples:
                    ids = torch.tensor([sample.input_ids], device=device)
                    new = min(sample.max_new_tokens, max_new_tokens or sample.max_new_tokens)
                    cache = ck.make_cache(model, model._catekv.profile, reserve=new + 1)
                    with torch.inference_mode():
                        out = model.generate(ids, max_new_tokens=new, do_sample=False,
                                             pad_token_id=tokenizer.eos_token_id, **{ck.cache_argument(model): cache})
                    predictions.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
                    memory = cache.memory()
                    held += memory["used_bytes"]
                    full += memory["full_attention_bytes"]
            finally:
                ck.remove(model)
            records.append({
                "task": task, "method": method, "context_length": context_length, "samples": len(samples),
                "score": round(score(task, predictions, samples), 2), "kv_kept_pct": round(100 * held / full, 2),
                "adaptive_ratio": profile.params.adaptive_ratio, "seconds": round(time.perf_counter() - started, 1),
            })
            print(json.dumps(records[-1]), flush=True)
    return records


def markdown(records: Sequence[dict[str, Any]]) -> str:
    """Per-task scores with a method per column, then the average and the KV kept."""
    out = []
    for length in sorted({r["context_length"] for r in records}):
        for ratio in sorted({r["adaptive_ratio"] for r in records}):
            rows = [r for r in records if r["context_length"] == length and r["adaptive_ratio"] == ratio]
            methods = list(dict.fromkeys(r["method"] for r in rows))
            tasks = list(dict.fromkeys(r["task"] for r in rows))
            cell = {(r["task"], r["method"]): r for r in rows}
            out += [f"### {length} tokens, r = {ratio}", "", "| task | " + " | ".join(methods) + " |",
                    "|---|" + "---|" * len(methods)]
            for task in tasks:
                out.append(f"| {task} | " + " | ".join(f"{cell[task, m]['score']:.1f}" for m in methods) + " |")
            avg = [sum(cell[t, m]["score"] for t in tasks) / len(tasks) for m in methods]
            kv = [sum(cell[t, m]["kv_kept_pct"] for t in tasks) / len(tasks) for m in methods]
            out.append("| **average** | " + " | ".join(f"**{a:.1f}**" for a in avg) + " |")
            out.append("| KV kept (% of full, measured) | " + " | ".join(f"{k:.1f}%" for k in kv) + " |")
            out.append("")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("profile", help="profile file or Hub id")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--ratios", type=float, nargs="+", default=None, help="adaptive ratios r (default: the profile's)")
    parser.add_argument("--budget", type=int, default=None, help="consistent-head budget (default: the profile's)")
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="cap on RULER's generation lengths")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--out", type=Path, default=None, help="JSON results (a .md table is written beside it)")
    args = parser.parse_args(argv)

    from catekv_profiler.models import load_model

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model, tokenizer, _ = load_model(args.model, device=device, dtype=args.dtype)
    base = ck.load_profile(args.profile)
    if args.budget is not None:
        from catekv_runtime.integration import resolve_profile

        base = resolve_profile(base, {"budget": args.budget})
    records = []
    for ratio in args.ratios or [base.params.adaptive_ratio]:
        profile = base.with_adaptive_ratio(ratio)
        for length in args.lengths:
            records += evaluate(model, tokenizer, profile, tasks=args.tasks, context_length=length,
                                num_samples=args.samples, methods=args.methods, seed=args.seed,
                                max_new_tokens=args.max_new_tokens)
    table = markdown(records)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(records, indent=1))
        args.out.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
