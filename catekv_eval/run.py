"""Score KV-cache methods on RULER-style tasks with any model and profile.

    python -m catekv_eval.run MODEL PROFILE --lengths 4096 8192 --samples 20 --out results.json

MODEL is anything ``catekv-profile`` accepts (Hub id, folder, .gguf, ``smollm2-135m``). Every method
(see ``catekv_eval.methods``) runs through the CateKV runtime's plain transformers path, and the KV it
keeps is measured from the cache's bytes. Results: JSON records and a markdown table.
"""

from __future__ import annotations

import argparse
import gc
import json
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import catekv_runtime as ck
from catekv_runtime.cache import CateKVCache
from catekv_runtime.integration import resolve_profile
from catekv_runtime.profile import Profile

from .methods import METHODS, method_overrides
from .tasks import TASKS, make_samples
from .scoring import score


def evaluate(model: torch.nn.Module, tokenizer: Any, profile: Profile, *, tasks: Sequence[str],
             context_length: int, num_samples: int, methods: Sequence[str] = METHODS,
             ratios: Sequence[float] | None = None, seed: int = 1000, max_new_tokens: int | None = None,
             batch_size: int = 8) -> list[dict[str, Any]]:
    """One record per (task, method, adaptive ratio): score, KV kept (% of full attention's bytes), seconds.

    Every method prefills with full attention and differs only in what it keeps afterwards, so each batch
    of samples is prefilled once and the methods fork its cache (:meth:`CateKVCache.fork`), then decode
    greedily with ``generate``. ``full`` does not depend on r: it runs once and is reported under every r.
    ``ratios``: adaptive ratios to evaluate (default: the profile's). ``max_new_tokens`` caps RULER's
    per-task generation length (for quick runs; answers are short). ``batch_size`` samples are prefilled
    and decoded together, left-padded.
    """
    ratios = list(ratios or [profile.params.adaptive_ratio])
    configs = [(m, None) for m in methods if m == "full"] + [(m, r) for r in ratios for m in methods if m != "full"]

    def resolve(method: str, ratio: float | None) -> Profile:
        base = profile.with_adaptive_ratio(ratio) if ratio is not None else profile
        return resolve_profile(base, method_overrides(method, base, context_length))

    resolved = {config: resolve(*config) for config in configs}
    records = []
    for task in tasks:
        samples = make_samples(task, tokenizer, context_length, num_samples, seed=seed)
        new = min(samples[0].max_new_tokens, max_new_tokens or samples[0].max_new_tokens)
        ck.apply(model, profile)  # the attention function; every cache below is made explicitly
        try:
            results = run_batches(model, tokenizer, profile, samples, resolved, new, batch_size)
        finally:
            ck.remove(model)
        predictions = {c: results[c][0] for c in configs}
        held, full, seconds = ({c: results[c][i] for c in configs} for i in (1, 2, 3))
        for method, ratio in configs:
            scored = round(score(task, predictions[method, ratio], samples), 2)
            kept = round(100 * held[method, ratio] / full[method, ratio], 2)
            for r in [ratio] if ratio is not None else ratios:
                records.append({
                    "task": task, "method": method, "context_length": context_length, "samples": len(samples),
                    "score": scored, "kv_kept_pct": kept, "adaptive_ratio": r,
                    "max_new_tokens": new, "seconds": round(seconds[method, ratio], 1),
                    "predictions": predictions[method, ratio],
                })
                print(json.dumps({k: v for k, v in records[-1].items() if k != "predictions"}), flush=True)
    return records


def run_batches(model: torch.nn.Module, tokenizer: Any, profile: Profile, samples: Sequence[Any],
                resolved: dict[Any, Profile], new: int, batch_size: int) -> dict[Any, tuple]:
    """Every retention setting of ``resolved`` on ``samples``, ``batch_size`` at a time, each batch prefilled
    once: ``{config: (answers, KV bytes used, full-attention bytes, seconds)}`` summed over the batches.
    The model must have CateKV applied (the attention function); ``profile`` makes the prefill's cache."""
    totals = {config: ([], 0, 0, 0.0) for config in resolved}
    for first in range(0, len(samples), batch_size):
        batch = _run_batch(model, tokenizer, profile, samples[first : first + batch_size], resolved, new)
        totals = {config: tuple(a + b for a, b in zip(totals[config], batch[config])) for config in resolved}
    return totals


def _run_batch(model: torch.nn.Module, tokenizer: Any, profile: Profile, batch: Sequence[Any],
               resolved: dict[Any, Profile], new: int) -> dict[Any, tuple]:
    """Every method on one batch: ``{config: (answers, KV bytes used, full-attention bytes, seconds)}``.

    A batch that runs out of GPU memory is retried in two halves (down to single samples), so one
    ``--batch-size`` serves every context length.
    """
    try:
        return _run_batch_once(model, tokenizer, profile, batch, resolved, new)
    except torch.OutOfMemoryError:
        if len(batch) == 1:
            raise
    # Outside the except block, so that the failed attempt's tensors are no longer referenced.
    gc.collect()
    torch.cuda.empty_cache()
    print(f"out of memory with {len(batch)} samples in a batch: running them in two halves", file=sys.stderr)
    halves = [_run_batch(model, tokenizer, profile, part, resolved, new)
              for part in (batch[: len(batch) // 2], batch[len(batch) // 2 :])]
    return {config: tuple(a + b for a, b in zip(halves[0][config], halves[1][config])) for config in resolved}


def _run_batch_once(model: torch.nn.Module, tokenizer: Any, profile: Profile, batch: Sequence[Any],
                    resolved: dict[Any, Profile], new: int) -> dict[Any, tuple]:
    started = time.perf_counter()
    source, ids, mask, first_token = _prefill(model, tokenizer, profile, batch, new)
    prefill_s = (time.perf_counter() - started) / len(resolved)  # shared by the methods
    results = {}
    for config, chosen in resolved.items():
        started = time.perf_counter()
        cache = source.fork(chosen.head_map, chosen.params, reserve=new + 1, budgets=chosen.budgets)
        answers = _decode(model, tokenizer, cache, ids, mask, first_token, new)
        memory = cache.memory()
        del cache
        results[config] = (answers, memory["used_bytes"], memory["full_attention_bytes"],
                           prefill_s + time.perf_counter() - started)
    return results


def _prefill(model: torch.nn.Module, tokenizer: Any, profile: Profile, batch: Sequence[Any], new: int):
    """Prefill a left-padded batch once into an uncompressed cache; returns it, the inputs and the first tokens."""
    device = next(model.parameters()).device
    longest = max(len(s.input_ids) for s in batch)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(batch), longest), pad, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for row, sample in enumerate(batch):
        ids[row, longest - len(sample.input_ids) :] = torch.tensor(sample.input_ids, device=device)
        mask[row, longest - len(sample.input_ids) :] = 1
    source = ck.make_cache(model, profile, reserve=new + 1, eager=False)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1,
                    **{ck.cache_argument(model): source})
    return source, ids, mask, out.logits[:, -1].argmax(-1)


def _decode(model: torch.nn.Module, tokenizer: Any, cache: CateKVCache, ids: torch.Tensor, mask: torch.Tensor,
            first_token: torch.Tensor, new: int) -> list[str]:
    """Greedy continuation of a prefilled batch; the decoded answers, each cut at its first end token."""
    tokens = first_token[:, None]
    if new > 1:
        with torch.inference_mode():
            out = model.generate(torch.cat([ids, tokens], 1), attention_mask=torch.cat([mask, torch.ones_like(tokens)], 1),
                                 max_new_tokens=new - 1, do_sample=False, pad_token_id=tokenizer.eos_token_id,
                                 **{ck.cache_argument(model): cache})
        tokens = out[:, ids.shape[1] :]
    eos = model.generation_config.eos_token_id
    stops = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
    answers = []
    for row in tokens.tolist():
        cut = next((i for i, t in enumerate(row) if t in stops), len(row))
        answers.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
    return answers


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
            out.append(f"| **average** ({len(tasks)} tasks) | " + " | ".join(f"**{a:.1f}**" for a in avg) + " |")
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
    parser.add_argument("--obs-window", type=int, default=None,
                        help="observation window L_obs of the runtime selection (default: the profile's)")
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="cap on RULER's generation lengths")
    parser.add_argument("--batch-size", type=int, default=8, help="samples prefilled and decoded together")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--out", type=Path, default=None, help="JSON results (a .md table is written beside it)")
    args = parser.parse_args(argv)

    from catekv_profiler.models import load_model

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model, tokenizer, info = load_model(args.model, device=device, dtype=args.dtype)
    base = ck.load_profile(args.profile)
    overrides = {name: value for name, value in (("budget", args.budget), ("obs_window", args.obs_window))
                 if value is not None}
    base = resolve_profile(base, overrides)
    records = []
    for length in args.lengths:
        records += evaluate(model, tokenizer, base, tasks=args.tasks, context_length=length, num_samples=args.samples,
                            methods=args.methods, ratios=args.ratios, seed=args.seed,
                            max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    table = markdown(records)
    print(table)
    if args.out:
        run = {
            "model": args.model, "profile": args.profile, "model_id": info.model_id,
            "date": time.strftime("%Y-%m-%d"), "command": "catekv-eval " + " ".join(map(shlex.quote, argv or sys.argv[1:])),
            "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""), "records": records,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        partial = args.out.with_name(args.out.name + ".partial")
        partial.write_text(json.dumps(run, indent=1))
        partial.replace(args.out)
        args.out.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
