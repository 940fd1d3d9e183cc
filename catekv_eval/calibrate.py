"""Calibration of k and alpha for one model: candidate head maps scored on tasks no evaluation uses.

The paper tunes the percentile k and the scale alpha per model by hand (Llama-3 0.996, Llama-3.1 0.984 with
alpha 0.8). ``catekv-profile MODEL -o OUT --calibrate`` measures the statistics of a whole grid of (k, alpha)
in one pass over the reference samples (one softmax and one sort per head, ``catekv_profiler.stats``); each
setting votes its own head map at the profile's r. This module scores those head maps: RULER-style tasks
generated with :data:`CALIBRATION_SEED` (``catekv-eval`` draws its samples with seed 1000 by default, so the
tasks differ from any reported evaluation), at the target context length, every batch prefilled once and
forked per head map (:meth:`CateKVCache.fork`), full attention alongside as the ceiling.

Which setting wins (:func:`choose_setting`): by default the best mean score, ties to the setting nearest the
paper's default (k = 0.99, alpha = 1), then to the larger k. ``rule="one-se"`` (the one-standard-error rule)
keeps the paper's default unless the best setting beats it by more than the standard error of their paired
per-sample differences. Neither rule has shown itself the better in the evaluation (docs/method.md,
"Calibration of k and alpha"), so the table records each setting's standard error against the chosen one.

The ``catekv-profile`` command is put together here (:func:`main`): the profiler's command line with this
scoring behind ``--calibrate`` (:data:`CALIBRATOR`), since the profiler does not import the evaluation.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import torch

import catekv_runtime as ck
from catekv_runtime.policies import Full
from catekv_runtime.profile import Profile, retarget

from catekv_profiler import cli as profiler_cli

from .run import run_batches
from .scoring import score
from .tasks import TASKS, make_samples

CALIBRATION_SEED = 4242
# Retrieval and tracking tasks with short answers: where the choice of heads shows, at little decode cost.
DEFAULT_TASKS = ("niah_single_3", "niah_multikey_1", "niah_multikey_3", "niah_multivalue", "vt", "fwe")
_PAPER_DEFAULT = (0.99, 1.0)
# Cap on each task's generation length: the answers are a few short items; a runaway answer scores 0 anyway.
MAX_NEW_TOKENS = 48


def calibrate(model: torch.nn.Module, tokenizer: Any, candidates: Sequence[Profile], *, context_length: int,
              tasks: Sequence[str] = DEFAULT_TASKS, num_samples: int = 10, seed: int = CALIBRATION_SEED,
              ratios: Sequence[float] | None = None, max_new_tokens: int | None = MAX_NEW_TOKENS,
              batch_size: int = 8, rule: str = "best", kv_fraction: float | None = None) -> Profile:
    """The candidate that ``rule`` picks (:func:`choose_setting`), its ``calibration`` metadata holding the table.

    ``candidates``: profiles of one model that differ in k and alpha (``catekv_profiler.profiler.
    profile_candidates``). ``ratios``: the adaptive ratios r each candidate's head map is scored at (default: the
    candidates' own r); a candidate's score is its mean over them, since a profile is used at other r than the one
    it was made with (``Profile.with_adaptive_ratio``) and a setting that wins at one r can lose at another. Head
    maps that coincide are scored once. The table (one row per candidate: k, alpha, adaptive heads, per-task and
    mean score, the mean at each r, and the standard error of its paired per-sample difference to the chosen one,
    which says whether the choice stands out of the sampling noise; and full attention's) goes into ``Profile.calibration`` with the seed, tasks,
    samples, ratios and context length, so the profile says how its k and alpha were chosen.

    ``kv_fraction``: each r is scored with the largest budget that keeps at most this fraction of the KV at the
    candidates' reference length (``catekv_runtime.profile.retarget``), so the ratios are alternatives at one memory
    budget rather than the places the profile will run. k and alpha are chosen as above, then r: the chosen
    setting's best r (ties to the candidates' own r, then the lower). The profile returned is at that r and budget.
    """
    if not candidates:
        raise ValueError("no candidate profiles to calibrate")
    if rule not in profiler_cli.CALIBRATION_RULES:
        raise ValueError(f"unknown calibration rule {rule!r}; use one of {', '.join(profiler_cli.CALIBRATION_RULES)}")
    ratios = tuple(float(r) for r in ratios) if ratios else (candidates[0].params.adaptive_ratio,)

    def at(candidate: Profile, ratio: float) -> Profile:
        if kv_fraction is None:
            return candidate.with_adaptive_ratio(ratio)
        return retarget(candidate, adaptive_ratio=ratio, kv_fraction=kv_fraction)

    scored = {(i, r): at(candidate, r) for i, candidate in enumerate(candidates) for r in ratios}
    distinct: dict[bytes, Profile] = {}
    for profile in scored.values():
        distinct.setdefault(_head_map_key(profile), profile)
    # Full attention: the same runtime with nothing evicted (the context length does not matter to Full).
    full = Full().resolve(candidates[0], context_length)
    configs = {("full", None): full, **{("map", key): profile for key, profile in distinct.items()}}
    per_task: dict[tuple[str, Any], dict[str, float]] = {config: {} for config in configs}
    per_sample: dict[tuple[str, Any], list[float]] = {config: [] for config in configs}  # in (task, sample) order
    ck.apply(model, candidates[0])  # the attention function; every cache is made explicitly
    try:
        for task in tasks:
            samples = make_samples(task, tokenizer, context_length, num_samples, seed=seed)
            new = min(samples[0].max_new_tokens, max_new_tokens or samples[0].max_new_tokens)
            results = run_batches(model, tokenizer, candidates[0], samples, configs, new, batch_size)
            for config, (answers, *_) in results.items():
                per_task[config][task] = round(score(task, answers, samples), 2)
                per_sample[config] += [score(task, [a], [s]) for a, s in zip(answers, samples)]
    finally:
        ck.remove(model)

    def mean(values: Sequence[float]) -> float:
        return round(sum(values) / len(values), 2)

    rows = []
    for i, candidate in enumerate(candidates):
        at = [per_task["map", _head_map_key(scored[i, r])] for r in ratios]
        row = {"k": candidate.params.percentile, "alpha": candidate.params.alpha,
               "adaptive_heads": int(candidate.head_map.sum()),
               "score": mean([mean(list(scores.values())) for scores in at]),
               "tasks": {task: mean([scores[task] for scores in at]) for task in tasks}}
        if len(ratios) > 1:
            row["by_ratio"] = {f"{r:g}": mean(list(scores.values())) for r, scores in zip(ratios, at)}
        rows.append(row)
    # Each setting's score per sample, its mean over the ratios (the score is their mean): paired across settings,
    # for the noise of a difference. The sample is the unit: its scores at several r are not independent draws.
    samples_of = [[sum(at) / len(at) for at in zip(*(per_sample["map", _head_map_key(scored[i, r])] for r in ratios))]
                  for i in range(len(candidates))]
    best = choose_setting(rows, samples_of, rule)
    # How far each setting is from the chosen one beyond the sampling noise: the standard error of their paired
    # per-sample differences, next to the difference of their scores.
    for i, row in enumerate(rows):
        row["se_vs_chosen"] = round(paired_standard_error(samples_of[best], samples_of[i]), 2)
    chosen = {"k": rows[best]["k"], "alpha": rows[best]["alpha"]}
    result = candidates[best]
    if kv_fraction is not None:
        own = candidates[0].params.adaptive_ratio
        score_at = {r: mean(list(per_task["map", _head_map_key(scored[best, r])].values())) for r in ratios}
        ratio = max(ratios, key=lambda r: (score_at[r], r == own, -r))
        result = scored[best, ratio]
        chosen |= {"r": ratio, "budget": result.params.budget}
    calibration = {
        "seed": str(seed),
        "tasks": ",".join(tasks),
        "samples_per_task": str(num_samples),
        "context_length": str(context_length),
        "adaptive_ratio": str(candidates[0].params.adaptive_ratio),
        "ratios": ",".join(f"{r:g}" for r in ratios),
        "full_attention_score": str(mean(list(per_task["full", None].values()))),
        "full_attention_tasks": json.dumps(per_task["full", None]),
        "chosen": json.dumps(chosen),
        "rule": rule,
        "table": json.dumps(rows),
        **({"kv_fraction": repr(float(kv_fraction))} if kv_fraction is not None else {}),
    }
    return dataclasses.replace(result, calibration=calibration)


def choose_setting(rows: Sequence[dict[str, Any]], samples_of: Sequence[Sequence[float]], rule: str = "best") -> int:
    """Index of the winning row. ``rows[i]["score"]``, ``["k"]``, ``["alpha"]``: a setting's mean score and values;
    ``samples_of[i]``: its per-sample scores, paired across settings.

    ``"best"``: the highest score; ties to the setting nearest the paper's default, then to the larger k.
    ``"one-se"``: that setting only if it beats the paper's default (k 0.99, alpha 1) by more than the standard
    error of their paired differences, else the default; the best when the default was not among the settings.
    """
    best = min(range(len(rows)), key=lambda i: (
        -rows[i]["score"],
        abs(rows[i]["k"] - _PAPER_DEFAULT[0]) + abs(rows[i]["alpha"] - _PAPER_DEFAULT[1]),
        -rows[i]["k"],
    ))
    default = next((i for i, row in enumerate(rows) if (row["k"], row["alpha"]) == _PAPER_DEFAULT), None)
    if rule == "best" or default is None or default == best:
        return best
    margin = rows[best]["score"] - rows[default]["score"]
    return best if margin > paired_standard_error(samples_of[best], samples_of[default]) else default


def paired_standard_error(a: Sequence[float], b: Sequence[float]) -> float:
    """Standard error of the mean of the paired differences ``a - b`` (0 for fewer than two pairs)."""
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    n = len(diffs)
    if n < 2:
        return 0.0
    mean = sum(diffs) / n
    return (sum((d - mean) ** 2 for d in diffs) / (n - 1) / n) ** 0.5


def _head_map_key(profile: Profile) -> bytes:
    """What a head map runs with: the map and its budgets (one map at two budgets is scored twice)."""
    return profile.head_map.numpy().tobytes() + profile.budgets.numpy().tobytes()


# What ``catekv-profile --calibrate`` scores with; the profiler cannot import it (this package builds on the profiler).
CALIBRATOR = profiler_cli.Calibrator(choose=calibrate, tasks=tuple(TASKS), default_tasks=DEFAULT_TASKS,
                                     default_seed=CALIBRATION_SEED)


def main() -> None:
    """The ``catekv-profile`` command: the profiler's command line with :data:`CALIBRATOR` behind ``--calibrate``."""
    profiler_cli.main(obj=CALIBRATOR, prog_name="catekv-profile")


if __name__ == "__main__":
    main()
