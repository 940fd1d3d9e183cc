"""Per-head budgets from measured attention coverage, against uniform budgets at the same total (issue #14, item 3).

    python benchmarks/budget_allocation.py smollm2-135m docs/results/r2/smollm2-4k-calibrated-r0.4-B256.safetensors \
        --ratios 0.2 0.4 --out-dir docs/results/r2/allocation-4k

then each profile it writes through ``catekv-eval`` (the commands and scores are in docs/accuracy.md).

The coverage curve of a KV head: on the profile's own reference samples (same generator, seed and length), the
share of the observation window's attention on the middle (``A[h]``, docs/method.md) that the runtime's best m
chunks hold (best by its chunk score), for every m, averaged over the samples. For each r, two rules spend the
middle chunks the uniform profile gives its consistent heads, ``heads x (B - L_init - L_rec) // c``, differently:

- ``cover``: every consistent head the same coverage, the largest level whose chunks fit; chunks left over go, one
  at a time, where they add the most coverage;
- ``greedy``: every chunk, one at a time, to the head whose next chunk adds the most coverage (the largest total).

A head keeps ``L_init + L_rec + chunks x c`` tokens. Written: ``{uniform,cover,greedy}_r{R}.safetensors`` (the
profile at r with its budgets) and ``summary.json`` (each rule's mean and least coverage, and the KV kept).
The finding is in docs/method.md, "Per-head budgets": neither rule beat uniform budgets, so the runtime has no
allocation mode.
"""

from __future__ import annotations

import argparse
import heapq
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import catekv_runtime as ck  # noqa: E402
from catekv_profiler.capture import capture_attention  # noqa: E402
from catekv_runtime.files import write_atomically  # noqa: E402
from catekv_runtime.params import ProfileParams  # noqa: E402
from catekv_runtime.selection import chunk_scores, observation_probs  # noqa: E402

RULES = ("cover", "greedy")


def coverage_curves(model: torch.nn.Module, samples: list[list[int]], params: ProfileParams) -> torch.Tensor:
    """float32 ``[layers, kv_heads, M + 1]``: the share of each head's middle attention held by its best m chunks,
    m = 0..M (M: the fewest middle chunks of any sample), averaged over the samples."""
    per_sample = []
    for ids in samples:
        rows: dict[int, list[torch.Tensor]] = {}

        def on_layer(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor) -> None:
            n, num_kv = key.shape[2], key.shape[1]
            regions = params.regions(n)
            obs = query[0, :, -params.obs_window:]
            mid = key[0, :, regions.mid_start:regions.tail_start]
            group = obs.shape[0] // num_kv
            curves = []
            for h in range(num_kv):
                probs = observation_probs(obs[h * group:(h + 1) * group], mid[h:h + 1], module.scaling,
                                          n - obs.shape[1], regions.mid_start)[0]
                mass = probs.view(probs.shape[0], -1, params.chunk_size).sum(dim=(0, 2))
                held = mass[chunk_scores(probs, params.chunk_size).argsort(descending=True)].cumsum(0) / mass.sum()
                curves.append(torch.cat([held.new_zeros(1), held]).float().cpu())
            rows[module.layer_idx] = curves

        device = model.get_input_embeddings().weight.device
        with torch.inference_mode(), capture_attention(model, on_layer):
            model.get_decoder()(input_ids=torch.tensor([ids], device=device), use_cache=False)
        per_sample.append([rows[i] for i in range(len(rows))])
    size = min(curve.numel() for sample in per_sample for layer in sample for curve in layer)
    return torch.stack([torch.stack([torch.stack([c[:size] for c in layer]) for layer in sample])
                        for sample in per_sample]).mean(dim=0)


def most_coverage(curves: torch.Tensor, consistent: torch.Tensor, total: int,
                  start: torch.Tensor | None = None) -> torch.Tensor:
    """int64 ``[layers, kv_heads]`` chunks: ``start`` (default none), then each of the chunks left of ``total`` to the
    consistent head whose next chunk adds the most coverage; 0 on the other heads."""
    chunks = torch.zeros(consistent.shape, dtype=torch.int64) if start is None else start.clone()
    top = curves.shape[-1] - 1

    def gain(layer: int, head: int) -> float:
        m = int(chunks[layer, head])
        return float(curves[layer, head, m + 1] - curves[layer, head, m])

    heap = [(-gain(l, h), l, h) for l, h in consistent.nonzero().tolist() if chunks[l, h] < top]
    heapq.heapify(heap)
    left = total - int(chunks.sum())
    while left > 0 and heap:
        _, layer, head = heapq.heappop(heap)
        chunks[layer, head] += 1
        left -= 1
        if chunks[layer, head] < top:
            heapq.heappush(heap, (-gain(layer, head), layer, head))
    return chunks


def equal_coverage(curves: torch.Tensor, consistent: torch.Tensor, total: int) -> torch.Tensor:
    """int64 ``[layers, kv_heads]`` chunks: every consistent head the fewest chunks that reach one coverage level, the
    highest level whose chunks fit in ``total``; the chunks left over by :func:`most_coverage`."""
    top = curves.shape[-1] - 1

    def needed(level: float) -> torch.Tensor:
        chunks = torch.searchsorted(curves, torch.full((*curves.shape[:-1], 1), level)).squeeze(-1).clamp(max=top)
        return torch.where(consistent, chunks, 0)

    low, high = 0.0, 1.0
    for _ in range(50):  # the level to within 2**-50: below the gap between any two coverage values
        level = (low + high) / 2
        low, high = (level, high) if int(needed(level).sum()) <= total else (low, level)
    return most_coverage(curves, consistent, total, start=needed(low))


def allocate(rule: str, curves: torch.Tensor, profile: ck.Profile) -> ck.Profile:
    """``profile`` (uniform budgets) with the consistent heads' middle chunks spent by ``rule`` instead."""
    p = profile.params
    consistent = ~profile.head_map
    top = curves.shape[-1] - 1
    total = int(consistent.sum()) * min(p.budget_chunks(), top)
    chunks = (equal_coverage if rule == "cover" else most_coverage)(curves, consistent, total)
    budgets = torch.where(consistent, p.init_tokens + p.recent_tokens + chunks * p.chunk_size, profile.budgets)
    return profile.with_budgets(budgets)


def held(curves: torch.Tensor, profile: ck.Profile) -> list[float]:
    """Coverage of each consistent head of ``profile`` by its budget (the part of its middle chunks it keeps)."""
    p = profile.params
    top = curves.shape[-1] - 1
    return [float(curves[layer, head, min(p.budget_chunks(int(profile.budgets[layer, head])), top)])
            for layer, head in (~profile.head_map).nonzero().tolist()]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="model to load (catekv_models.load_model), e.g. smollm2-135m")
    parser.add_argument("profile", help="profile (uniform budgets) whose reference samples give the curves")
    parser.add_argument("--ratios", type=float, nargs="+", default=None, help="adaptive ratios (default: the profile's)")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    from catekv_models import load_model
    from catekv_profiler.reference import variable_tracking_samples

    profile = ck.load_profile(args.profile)
    if profile.reference.task != "variable_tracking":
        raise SystemExit(f"{args.profile}: reference task {profile.reference.task!r}; this script regenerates "
                         "variable_tracking reference samples only")
    model, tokenizer, _ = load_model(args.model, device=args.device,
                                     dtype="bfloat16" if args.device == "cuda" else "float32")
    reference = profile.reference
    samples = variable_tracking_samples(tokenizer, reference.num_samples, reference.context_length, seed=reference.seed)
    curves = coverage_curves(model, [s.input_ids for s in samples], profile.params)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict = {"model": args.model, "profile": str(args.profile), "middle_chunks": curves.shape[-1] - 1,
                     "command": "python benchmarks/budget_allocation.py " + " ".join(argv or sys.argv[1:])}
    for ratio in args.ratios or [profile.params.adaptive_ratio]:
        profiles = {"uniform": profile.with_adaptive_ratio(ratio)}
        profiles.update({rule: allocate(rule, curves, profiles["uniform"]) for rule in RULES})
        for name, made in profiles.items():
            made.save(args.out_dir / f"{name}_r{ratio:g}.safetensors")
            coverage = held(curves, made)
            summary[f"{name}_r{ratio:g}"] = {
                "mean_coverage": round(sum(coverage) / len(coverage), 4), "least_coverage": round(min(coverage), 4),
                "kv_kept": round(made.kv_kept_fraction(reference.context_length), 4),
                "budgets": sorted(int(b) for b in made.budgets[~made.head_map]),
            }
    write_atomically(args.out_dir / "summary.json", json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "budgets"} if isinstance(v, dict) else v
                      for k, v in summary.items()}, indent=1))
    return summary


if __name__ == "__main__":
    main()
