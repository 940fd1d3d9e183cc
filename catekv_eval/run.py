"""Score KV-cache methods on RULER-style tasks with any model and profile.

    python -m catekv_eval.run MODEL PROFILE --lengths 4096 8192 --samples 20 --out results.json

MODEL is anything ``catekv-profile`` accepts (Hub id, folder, .gguf, ``smollm2-135m``). Every method
(see ``catekv_eval.methods``) runs through the CateKV runtime's plain transformers path, and the KV it
keeps is measured from the cache's bytes. Results: JSON records and a markdown table.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
import torch

import catekv_runtime as ck
from catekv_models.options import DEVICE_OPTION, DTYPE_OPTION
from catekv_runtime.cache import CateKVCache
from catekv_runtime.files import markdown_table, write_atomically
from catekv_runtime.policies import Full, Policy, get_policy
from catekv_runtime.profile import Profile, ProfileError, resolve_profile, retarget

from .methods import METHODS
from .tasks import TASKS, EvalTaskError, make_samples
from .scoring import score


def evaluate(model: torch.nn.Module, tokenizer: Any, profile: Profile, *, tasks: Sequence[str],
             context_length: int, num_samples: int, methods: Sequence[str | Policy] = tuple(METHODS),
             ratios: Sequence[float] | None = None, seed: int = 1000, max_new_tokens: int | None = None,
             batch_size: int = 8, kv_fraction: float | None = None) -> list[dict[str, Any]]:
    """One record per (task, method, adaptive ratio): score, KV kept (% of full attention's bytes), seconds.

    ``methods``: selection policies (:mod:`catekv_runtime.policies`), or their names in ``METHODS``; a record
    names its policy. Every method prefills with full attention and differs only in what it keeps afterwards,
    so each batch of samples is prefilled once and the methods fork its cache (:meth:`CateKVCache.fork`),
    then decode greedily with ``generate``. ``full`` does not depend on r: it runs once and is reported under
    every r. ``ratios``: adaptive ratios to evaluate (default: the profile's); at the profile's own r its per-head
    budgets are kept, at another r the head map is voted again with uniform budgets. ``max_new_tokens`` caps RULER's
    per-task generation length (for quick runs; answers are short). ``batch_size`` samples are prefilled
    and decoded together, left-padded. ``kv_fraction``: at each r, the budget B that keeps at most this fraction of
    the KV at ``context_length`` (:func:`~catekv_runtime.profile.retarget`), so that several r are
    compared at one memory budget; each record names its budget.
    """
    ratios = list(ratios or [profile.params.adaptive_ratio])
    policies = {p.name: p for p in (m if isinstance(m, Policy) else get_policy(m) for m in methods)}
    configs = ([(m, None) for m in policies if m == Full.name]
               + [(m, r) for r in ratios for m in policies if m != Full.name])

    def resolve(method: str, ratio: float | None) -> Profile:
        # The profile's own r keeps its per-head budgets; another r re-votes the head map (uniform budgets).
        own = ratio is None or ratio == profile.params.adaptive_ratio
        base = profile if own else profile.with_adaptive_ratio(ratio)
        if kv_fraction is not None and method != Full.name:
            base = retarget(base, kv_fraction=kv_fraction, context_length=context_length)
        return policies[method].resolve(base, context_length)

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
                    "budget": None if method == Full.name else resolved[method, ratio].params.budget,
                    "kv_fraction": None if method == Full.name else kv_fraction,
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
            body = [[task, *(f"{cell[task, m]['score']:.1f}" for m in methods)] for task in tasks]
            avg = [sum(cell[t, m]["score"] for t in tasks) / len(tasks) for m in methods]
            kv = [sum(cell[t, m]["kv_kept_pct"] for t in tasks) / len(tasks) for m in methods]
            body.append([f"**average** ({len(tasks)} tasks)", *(f"**{a:.1f}**" for a in avg)])
            body.append(["KV kept (% of full, measured)", *(f"{k:.1f}%" for k in kv)])
            out += [f"### {length} tokens, r = {ratio}", "", *markdown_table(["task", *methods], body), ""]
    return "\n".join(out)


class _OneOrMore(click.Command):
    """Options that take one or more values, as ``--lengths 4096 8192`` (click's own form repeats the option).

    Every argument after such an option, up to the next one that starts with "-" and is not a number, is
    passed to click as a repetition of it. The arguments as given are kept in ``ctx.meta`` for the record.
    """

    MANY = ("--lengths", "--tasks", "--methods", "--ratios")

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["catekv_eval.argv"] = list(args)
        rewritten: list[str] = []
        option, values = None, 0
        for arg in args:
            if option is not None and not _is_option(arg):
                rewritten += [option, arg] if values else [arg]
                values += 1
                continue
            option, values = (arg, 0) if arg in self.MANY else (None, 0)
            rewritten.append(arg)
        return super().parse_args(ctx, rewritten)


def _is_option(arg: str) -> bool:
    if not arg.startswith("-"):
        return False
    try:
        float(arg)
    except ValueError:
        return True
    return False  # a negative number: a value, for the option's range check to refuse


@click.command(cls=_OneOrMore, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model")
@click.argument("profile")
@click.option("--lengths", type=click.IntRange(min=1), multiple=True, default=(4096,), show_default=True,
              help="Context lengths to evaluate at, one or more (--lengths 4096 8192); at most the model's maximum.")
@click.option("--tasks", type=click.Choice(list(TASKS)), multiple=True, default=list(TASKS), show_default="all",
              help="RULER tasks, one or more.")
@click.option("--methods", type=click.Choice(list(METHODS)), multiple=True, default=list(METHODS),
              show_default="all", help="KV-cache methods, one or more (see catekv_eval.methods).")
@click.option("--ratios", type=click.FloatRange(0, 1), multiple=True,
              help="Adaptive ratios r, one or more  [default: the profile's]")
@click.option("--budget", type=click.IntRange(min=1), default=None,
              help="Tokens kept by a consistent head; init and recent tokens become B/32 and B/8  "
                   "[default: the profile's]")
@click.option("--kv-fraction", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Instead of --budget: at each length and r, the largest B that keeps at most this fraction of "
                   "the KV (by the formula; the measured KV also holds generated tokens), to compare r at one "
                   "memory budget  [default: the profile's budget]")
@click.option("--obs-window", type=click.IntRange(min=1), default=None,
              help="Observation window L_obs of the runtime selection  [default: the profile's]")
@click.option("--samples", type=click.IntRange(min=1), default=20, show_default=True,
              help="Samples per task and length.")
@click.option("--seed", type=int, default=1000, show_default=True, help="Seed of the generated samples.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=None,
              help="Cap on RULER's generation lengths  [default: each task's own]")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Samples prefilled and decoded together (a batch that runs out of GPU memory runs in halves).")
@DEVICE_OPTION
@DTYPE_OPTION
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="JSON results; the markdown table is written beside it (.md).")
@click.pass_context
def main(ctx: click.Context, model: str, profile: str, lengths: tuple[int, ...], tasks: tuple[str, ...],
         methods: tuple[str, ...], ratios: tuple[float, ...], budget: int | None, kv_fraction: float | None,
         obs_window: int | None, samples: int, seed: int, max_new_tokens: int | None, batch_size: int, device: str,
         dtype: str, out: Path | None) -> None:
    """Score KV-cache methods on RULER-style tasks: MODEL with PROFILE, at each length, ratio and method.

    MODEL is anything catekv-profile accepts (Hub id, folder, .gguf file, or an embedded model: smollm2-135m,
    qwen2.5-coder-0.5b). PROFILE is a profile file, the short name of a shipped one or a Hub repo id. Every
    method runs through the CateKV runtime at the same total KV, measured from the cache's bytes; the
    results are printed as JSON lines and a markdown table.

    \b
    catekv-eval smollm2-135m smollm2-135m-instruct-8k --lengths 4096 8192 --ratios 0.2 0.4 --out r.json
    catekv-eval smollm2-135m smollm2-135m-instruct-4k --ratios 0.1 0.2 0.3 0.4 --kv-fraction 0.44
    """
    from catekv_models.checks import check_context_length_option, check_output_option
    from catekv_models import ModelError, ModelInfo, load_model, resolve_device

    # Everything that can be checked is checked before the model loads (its shape and maximum: from its config).
    if out is not None:
        if out.suffix == ".md":
            raise click.BadParameter(f"{out} ends in .md, the name of the table written beside the JSON; "
                                     "name a .json file", param_hint="'--out'")
        check_output_option(out, "'--out'")
    try:
        base = ck.load_profile(profile)
    except ProfileError as e:
        raise click.ClickException(str(e)) from None
    overrides = {name: value for name, value in (("budget", budget), ("obs_window", obs_window)) if value is not None}
    try:
        base = resolve_profile(base, overrides)
    except ProfileError as e:
        raise click.UsageError(f"--budget / --obs-window: {e}") from None
    for length in lengths:
        check_context_length_option(length, base.params, "'--lengths'")
    if kv_fraction is not None:
        if budget is not None:
            raise click.UsageError("--budget and --kv-fraction both set the budget: give one of them")
        try:
            for length in lengths:
                for ratio in ratios or [base.params.adaptive_ratio]:
                    retarget(base, adaptive_ratio=ratio, kv_fraction=kv_fraction, context_length=length)
        except ProfileError as e:
            raise click.UsageError(f"--kv-fraction: {e}") from None

    def check_config(info: ModelInfo) -> None:
        try:
            base.check_model(dataclasses.replace(info.spec(), model_id=""))  # shapes; apply checks the id too
        except ProfileError as e:
            raise click.ClickException(str(e)) from None
        for length in lengths:
            check_context_length_option(length, base.params, "'--lengths'", info.max_context)

    device = resolve_device(device)
    try:
        model_obj, tokenizer, info = load_model(model, device=device, dtype=dtype, on_config=check_config)
    except ModelError as e:
        raise click.ClickException(str(e)) from None
    if tokenizer is None:
        raise click.ClickException(f"{model} has no tokenizer files; the tasks are tokenized with the model's own")
    records = []
    try:
        for length in lengths:
            records += evaluate(model_obj, tokenizer, base, tasks=tasks, context_length=length, num_samples=samples,
                                methods=methods, ratios=ratios, seed=seed, max_new_tokens=max_new_tokens,
                                batch_size=batch_size, kv_fraction=kv_fraction)
    except (EvalTaskError, ProfileError) as e:
        raise click.ClickException(str(e)) from None
    table = markdown(records)
    click.echo(table)
    if out:
        run = {
            "model": model, "profile": profile, "model_id": info.model_id, "date": time.strftime("%Y-%m-%d"),
            "command": "catekv-eval " + shlex.join(ctx.meta["catekv_eval.argv"]),
            "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
            "dtype": str(next(model_obj.parameters()).dtype).replace("torch.", ""), "records": records,
        }
        write_atomically(out, json.dumps(run, indent=1))
        write_atomically(out.with_suffix(".md"), table + "\n")


if __name__ == "__main__":
    main()
