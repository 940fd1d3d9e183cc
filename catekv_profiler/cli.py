"""``catekv-profile``: profile a model (``catekv-profile MODEL -o OUT``), ``show`` a profile, ``retarget`` it to
another r and budget, ``push`` it.

``--calibrate`` scores candidate head maps with a :class:`Calibrator` handed to the command line as click's context
object. The one catekv has scores on the evaluation's tasks, and the evaluation builds on the profiler, so the
profiler does not import it: the ``catekv-profile`` command is this CLI started by ``catekv_eval.calibrate.main``
with that calibrator.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import click

from catekv_models.options import DEVICE_OPTION, DTYPE_OPTION
from catekv_runtime.profile import Profile, ProfileError, ProfileParams, ReferenceSpec, load_profile, retarget

from catekv_models.checks import check_context_length_option, check_output_option

DEFAULTS = ProfileParams()
# The (k, alpha) settings --calibrate measures by default: around the paper's k = 0.99 and its two alphas.
GRID_K = (0.9, 0.95, 0.98, 0.99, 0.995, 0.998)
GRID_ALPHA = (0.8, 1.0)
# How --calibrate picks among the settings it scored (the first is the default; catekv_eval.calibrate.choose_setting).
CALIBRATION_RULES = ("best", "one-se")


@dataclasses.dataclass(frozen=True)
class Calibrator:
    """How ``--calibrate`` picks k and alpha among candidate profiles that differ only in them.

    ``choose(model, tokenizer, candidates, *, context_length, tasks, num_samples, ratios, seed, rule, kv_fraction)``
    returns the candidate that ``rule`` (one of :data:`CALIBRATION_RULES`) picks, with its ``calibration`` metadata
    (the table), retargeted to the chosen r and the budget for ``kv_fraction`` when that is given; or raises
    ``ValueError`` saying why the tasks cannot be run (e.g. a length too short for one), ``ProfileError`` when a
    fraction is below what the adaptive heads alone keep.
    ``tasks`` are the names it can score on, ``default_tasks`` and ``default_seed`` what it uses when
    ``--calibration-tasks`` / ``--calibration-seed`` are not given.
    """

    choose: Callable[..., Profile]
    tasks: Sequence[str]
    default_tasks: Sequence[str]
    default_seed: int


class _DefaultToProfile(click.Group):
    """``catekv-profile MODEL ...`` means ``catekv-profile profile MODEL ...`` unless MODEL is a subcommand."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["profile", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_DefaultToProfile, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="catekv")
def main() -> None:
    """Find the consistent and adaptive KV heads of a model (CateKV, ICML 2025) and write a profile.

    \b
    catekv-profile MODEL -o profile.safetensors   profile a model (Hub id, folder, .gguf, or an embedded one)
    catekv-profile show profile.safetensors       summarise a profile
    catekv-profile push profile.safetensors org/name   upload it with a model card to the Hub
    """


@main.command("profile")
@click.argument("model")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Profile file to write (.safetensors).")
@click.option("--percentile", "-k", type=float, default=DEFAULTS.percentile, show_default=True,
              help="Percentile threshold k.")
@click.option("--alpha", type=float, default=DEFAULTS.alpha, show_default=True, help="Threshold scaling factor.")
@click.option("--adaptive-ratio", "-r", type=float, default=DEFAULTS.adaptive_ratio, show_default=True,
              help="Fraction r of KV heads kept adaptive.")
@click.option("--eta", type=float, default=DEFAULTS.eta, show_default=True,
              help="Retention ratio of adaptive heads (1 = full cache).")
@click.option("--budget", "-B", type=int, default=DEFAULTS.budget, show_default=True,
              help="Tokens kept by a consistent head.")
@click.option("--chunk-size", type=int, default=DEFAULTS.chunk_size, show_default=True)
@click.option("--obs-window", type=int, default=DEFAULTS.obs_window, show_default=True,
              help="Observation window L_obs (last prompt queries).")
@click.option("--init-tokens", type=int, default=None, help="Initial tokens L_init  [default: budget/32]")
@click.option("--recent-tokens", type=int, default=None, help="Recent tokens L_rec  [default: budget/8]")
@click.option("--reserve-tokens", type=int, default=DEFAULTS.reserve_tokens, show_default=True,
              help="Tokens before L_rec left out of the statistics and kept as tail, in whole chunks (the "
                   "authors' code: 32; 0 for none).")
@click.option("--tie-rule", type=click.Choice(["exact", "inclusive"]), default=DEFAULTS.tie_rule, show_default=True,
              help="exact: ceil(r x heads) adaptive heads, ties by mean CV; inclusive: also every head tied "
                   "with the last one (the authors' code).")
@click.option("--calibrate", is_flag=True,
              help="Choose k and alpha for this model: measure every (k, alpha) of --grid-k x --grid-alpha in the "
                   "same pass, score each head map on RULER-style tasks drawn with --calibration-seed at the target "
                   "length and r, keep the best; the table goes into the profile. Instead of -k/--alpha.")
@click.option("--grid-k", default=",".join(map(str, GRID_K)), show_default=True,
              help="Comma-separated percentiles k to calibrate over.")
@click.option("--grid-alpha", default=",".join(map(str, GRID_ALPHA)), show_default=True,
              help="Comma-separated alphas to calibrate over.")
@click.option("--calibration-tasks", default=None,
              help="Comma-separated catekv-eval tasks  [default: six retrieval and tracking tasks, "
                   "catekv_eval.calibrate.DEFAULT_TASKS]")
@click.option("--calibration-samples", type=int, default=10, show_default=True, help="Samples per calibration task.")
@click.option("--calibration-seed", type=int, default=None,
              help="Seed of the calibration tasks; keep it apart from any evaluation's  [default: "
                   "catekv_eval.calibrate.CALIBRATION_SEED, 4242; catekv-eval uses 1000]")
@click.option("--calibration-length", type=int, default=None,
              help="Tokens per calibration task sample  [default: --context-length]")
@click.option("--calibration-ratios", default=None,
              help="Comma-separated adaptive ratios r at which each setting's head map is scored, its score the mean "
                   "over them; name the r you will run the profile at, e.g. 0.2,0.4  [default: -r]")
@click.option("--calibration-rule", type=click.Choice(CALIBRATION_RULES), default=CALIBRATION_RULES[0],
              show_default=True,
              help="best: the best mean score; one-se: keep the paper's k 0.99 / alpha 1 unless a setting beats it "
                   "by more than one standard error of their paired per-sample differences.")
@click.option("--kv-fraction", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Give the profile the largest budget that keeps at most this fraction of the KV at -L, once its "
                   "head map is voted (the statistics are measured with -B's windows). With --calibrate, each r of "
                   "--calibration-ratios is scored with its budget for this fraction, and r is chosen too.")
@click.option("--num-samples", "-n", type=int, default=50, show_default=True, help="Reference samples.")
@click.option("--context-length", "-L", type=int, default=None,
              help="Tokens per reference sample  [default: the model's maximum, at most 131072]")
@click.option("--reference", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="JSON Lines file of your own reference texts ({'text': ...} per line) instead of the "
                   "built-in variable-tracking samples.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the built-in reference samples.")
@DEVICE_OPTION
@click.option("--device-map", default=None,
              help="Split the model over several devices (a model too large for one GPU): auto, balanced, "
                   "balanced_low_0, sequential, or a JSON object from module names to devices, e.g. "
                   "'{\"model.embed_tokens\": 0, \"model.layers.0\": 0, ..., \"lm_head\": 1}'. "
                   "Instead of --device.")
@DTYPE_OPTION
@click.option("--revision", default=None, help="Hub revision of MODEL.")
@click.option("--trust-remote-code", is_flag=True, help="Allow model code from the Hub (off by default).")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--restart", is_flag=True, help="Ignore checkpoints of an interrupted run and start over.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def profile_command(model: str, output: Path, percentile: float, alpha: float, adaptive_ratio: float, eta: float,
                    budget: int, chunk_size: int, obs_window: int, init_tokens: int | None,
                    recent_tokens: int | None, reserve_tokens: int, tie_rule: str, calibrate: bool, grid_k: str,
                    grid_alpha: str, calibration_tasks: str | None, calibration_samples: int,
                    calibration_seed: int | None, calibration_length: int | None,
                    calibration_ratios: str | None, calibration_rule: str, kv_fraction: float | None,
                    num_samples: int,
                    context_length: int | None,
                    reference: Path | None, seed: int, device: str, device_map: str | None, dtype: str,
                    revision: str | None, trust_remote_code: bool, overwrite: bool, restart: bool,
                    quiet: bool) -> None:
    """Profile MODEL: a Hub id, a local folder, a .gguf file, or an embedded model (smollm2-135m, qwen2.5-coder-0.5b)."""
    import torch
    from tqdm.auto import tqdm

    from catekv_models import DEVICE_MAP_STRATEGIES, ModelError, ModelInfo, load_model, model_devices, resolve_device
    from .profiler import (
        Checkpoint,
        ProfilingError,
        default_provenance,
        measure_samples,
        profile_candidates,
        statistics_key,
    )
    from .reference import ReferenceSetError, load_reference_jsonl, reference_hash, variable_tracking_samples

    if output.exists() and not overwrite:
        raise click.UsageError(f"{output} exists; pass --overwrite to replace it")
    check_output_option(output, "'-o' / '--output'")
    if num_samples < 1:
        raise click.BadParameter("must be >= 1", param_hint="--num-samples")
    try:
        params = ProfileParams.for_budget(
            budget, percentile=percentile, alpha=alpha, adaptive_ratio=adaptive_ratio, eta=eta,
            chunk_size=chunk_size, obs_window=obs_window, reserve_tokens=reserve_tokens, tie_rule=tie_rule,
            **{k: v for k, v in (("init_tokens", init_tokens), ("recent_tokens", recent_tokens)) if v is not None},
        )
    except ProfileError as e:
        raise click.UsageError(str(e)) from None
    settings = _threshold_settings(params, calibrate, grid_k, grid_alpha)
    calibrator = _calibrator() if calibrate else None
    tasks = _calibration_tasks(calibrator, calibration_tasks) if calibrator else ()
    if calibrate and calibration_samples < 1:
        raise click.BadParameter("must be >= 1", param_hint="--calibration-samples")
    ratios = _calibration_ratios(params, calibration_ratios) if calibrate else ()
    if context_length is not None:
        check_context_length_option(context_length, params, "'-L' / '--context-length'")

    device_map_arg = _parse_device_map(device_map)
    if device_map_arg is not None and device != "auto":
        raise click.UsageError("pass either --device or --device-map, not both")
    if device_map_arg in DEVICE_MAP_STRATEGIES and not torch.cuda.is_available():
        click.echo(f"warning: no GPU is visible, so --device-map {device_map_arg} puts the whole model on the CPU "
                   "(as --device cpu does)", err=True)
    device = resolve_device(device)

    def check_config(config_info: ModelInfo) -> None:  # before the weights load
        if context_length is not None:
            check_context_length_option(context_length, params, "'-L' / '--context-length'", config_info.max_context)

    started = time.perf_counter()
    try:
        model_obj, tokenizer, info = load_model(model, device=device, device_map=device_map_arg, dtype=dtype,
                                                revision=revision, trust_remote_code=trust_remote_code,
                                                on_config=check_config, progress=not quiet)
    except ModelError as e:
        raise click.ClickException(str(e)) from None
    if device_map_arg is not None:  # recorded in the profile's provenance: where the model actually ran
        device = ",".join(model_devices(model_obj))
    if tokenizer is None:
        raise click.ClickException(
            f"{model} has no tokenizer files; the reference set is tokenized with the model's own tokenizer"
        )
    if context_length is None:
        context_length = min(info.max_context or 131072, 131072)
    if calibrate and info.max_context and (calibration_length or 0) > info.max_context:
        raise click.UsageError(
            f"--calibration-length {calibration_length} exceeds the model's maximum of {info.max_context} tokens"
        )
    try:
        if reference is not None:
            samples = load_reference_jsonl(reference, tokenizer, context_length)[:num_samples]
            task = f"jsonl:{reference.name}"
        else:
            samples = variable_tracking_samples(tokenizer, num_samples, context_length, seed=seed)
            task = "variable_tracking"
    except ReferenceSetError as e:
        raise click.ClickException(str(e)) from None

    spec = info.spec()
    dtype_name = str(next(model_obj.parameters()).dtype).removeprefix("torch.")
    checkpoint = Checkpoint(output, statistics_key(params, spec, dtype_name, settings if calibrate else None))
    if restart:
        checkpoint.remove()
    ref_spec = ReferenceSpec(task=task, context_length=context_length, num_samples=len(samples), seed=seed,
                             text_hash=reference_hash(samples))
    bar = tqdm(total=len(samples), desc="profiling", unit="sample", disable=quiet, file=sys.stderr)

    def advance(index: int, resumed: bool) -> None:
        bar.set_postfix_str("resumed from checkpoint" if resumed else "")
        bar.update(1)

    try:
        stats = measure_samples(model_obj, samples, params, settings, checkpoint=checkpoint, on_sample=advance)
    except (ProfilingError, ProfileError) as e:
        raise click.ClickException(str(e)) from None
    finally:
        bar.close()
    candidates = profile_candidates(stats, params, settings, spec, ref_spec, default_provenance(device, dtype_name))
    if calibrator:
        try:
            result = calibrator.choose(
                model_obj, tokenizer, candidates, context_length=calibration_length or context_length, tasks=tasks,
                num_samples=calibration_samples, ratios=ratios, rule=calibration_rule, kv_fraction=kv_fraction,
                seed=calibrator.default_seed if calibration_seed is None else calibration_seed,
            )
        except (ValueError, ProfileError) as e:  # the statistics stay checkpointed for a run with other options
            raise click.ClickException(f"calibration: {e}") from None
        from .report import calibration_summary, format_calibration

        click.echo("\n".join(format_calibration(calibration_summary(result))), err=True)
    elif kv_fraction is not None:
        try:
            result = retarget(candidates[0], kv_fraction=kv_fraction)
        except ProfileError as e:  # the statistics stay checkpointed for a run with another fraction or r
            raise click.ClickException(f"--kv-fraction: {e}") from None
    else:
        result = candidates[0]
    result.save(output)
    checkpoint.remove()
    elapsed = time.perf_counter() - started
    click.echo(
        f"wrote {output}: {int(result.head_map.sum())}/{result.head_map.numel()} adaptive heads "
        f"(r={result.params.adaptive_ratio:g}, budget {result.params.budget}), {len(samples)} samples of "
        f"{context_length} tokens, {elapsed:.0f} s",
        err=True,
    )


def _threshold_settings(params: ProfileParams, calibrate: bool, grid_k: str,
                        grid_alpha: str) -> list[tuple[float, float]]:
    """The (k, alpha) settings to measure: the grid with --calibrate, else the one of -k/--alpha."""
    ctx = click.get_current_context()
    given = [f"--{name}" for name in ("percentile", "alpha")
             if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT]
    if not calibrate:
        return [(params.percentile, params.alpha)]
    if given:
        raise click.UsageError(f"{' and '.join(given)} and --calibrate exclude each other: calibration picks k and "
                               "alpha from --grid-k and --grid-alpha")
    grids = []
    for hint, text in (("--grid-k", grid_k), ("--grid-alpha", grid_alpha)):
        try:
            values = sorted({float(v) for v in text.split(",") if v.strip()})
        except ValueError:
            raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers", param_hint=hint) from None
        if not values:
            raise click.BadParameter("needs at least one value", param_hint=hint)
        grids.append(values)
    settings = [(k, alpha) for k in grids[0] for alpha in grids[1]]
    for k, alpha in settings:
        try:
            dataclasses.replace(params, percentile=k, alpha=alpha)  # made only to be checked
        except ProfileError as e:
            raise click.BadParameter(str(e), param_hint="--grid-k/--grid-alpha") from None
    return settings


def _calibration_ratios(params: ProfileParams, text: str | None) -> tuple[float, ...]:
    """The r of --calibration-ratios (default: the profile's own), each checked as -r is."""
    if text is None:
        return (params.adaptive_ratio,)
    try:
        ratios = tuple(sorted({float(v) for v in text.split(",") if v.strip()}))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers",
                                 param_hint="--calibration-ratios") from None
    if not ratios:
        raise click.BadParameter("needs at least one value", param_hint="--calibration-ratios")
    for ratio in ratios:
        try:
            dataclasses.replace(params, adaptive_ratio=ratio)  # made only to be checked
        except ProfileError as e:
            raise click.BadParameter(str(e), param_hint="--calibration-ratios") from None
    return ratios


def _calibrator() -> Calibrator:
    """The :class:`Calibrator` this command line was started with (``catekv-profile`` has catekv_eval's)."""
    calibrator = click.get_current_context().find_object(Calibrator)
    if calibrator is None:
        raise click.UsageError("--calibrate scores head maps with catekv_eval's tasks, which this command line was "
                               "started without; run the installed `catekv-profile` or `python -m catekv_eval.calibrate`")
    return calibrator


def _calibration_tasks(calibrator: Calibrator, text: str | None) -> tuple[str, ...]:
    if text is None:
        return tuple(calibrator.default_tasks)
    tasks = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = sorted(set(tasks) - set(calibrator.tasks))
    if unknown or not tasks:
        raise click.BadParameter(f"unknown tasks {unknown or [text]}; choose from {', '.join(calibrator.tasks)}",
                                 param_hint="--calibration-tasks")
    return tasks


def _parse_device_map(text: str | None) -> str | dict | None:
    """--device-map: a strategy name as is, or a JSON object (module name -> GPU index or device string)."""
    if text is None or not text.strip().startswith("{"):
        return text
    try:
        value = json.loads(text)
    except ValueError as e:
        raise click.BadParameter(f"not valid JSON: {e}", param_hint="--device-map") from None
    return value


@main.command("show")
@click.argument("profile", type=str)
@click.option("--png", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also draw the CV heatmap and head map to this PNG file.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--context-length", "-L", "context_lengths", type=click.IntRange(min=1), multiple=True,
              help="Context lengths at which to report the KV cache kept (repeatable).")
def show_command(profile: str, png: Path | None, as_json: bool, context_lengths: tuple[int, ...]) -> None:
    """Summarise PROFILE (a file or a Hub repo id): head map, budgets, memory kept, sample agreement."""
    from .report import format_summary, plot_profile, summarize

    if png is not None:
        check_output_option(png, "'--png'")
    try:
        loaded = load_profile(profile)
    except ProfileError as e:
        raise click.ClickException(str(e)) from None
    summary = summarize(loaded, context_lengths) if context_lengths else summarize(loaded)
    click.echo(json.dumps(summary, indent=2) if as_json else format_summary(summary))
    if png is not None:
        plot_profile(loaded, png)
        click.echo(f"wrote {png}", err=True)


@main.command("retarget")
@click.argument("profile", type=str)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Where to write the retargeted profile (.safetensors).")
@click.option("--adaptive-ratio", "-r", type=click.FloatRange(0, 1), default=None,
              help="New adaptive head ratio r  [default: the profile's]")
@click.option("--budget", "-B", type=click.IntRange(min=2), default=None, help="New budget B, tokens per consistent head.")
@click.option("--kv-fraction", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Instead of --budget: the largest B that keeps at most this fraction of the KV.")
@click.option("--context-length", "-L", type=click.IntRange(min=1), default=None,
              help="Prompt length --kv-fraction is measured at  [default: the profile's reference length]")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
def retarget_command(profile: str, output: Path, adaptive_ratio: float | None, budget: int | None,
                     kv_fraction: float | None, context_length: int | None, overwrite: bool) -> None:
    """Write PROFILE (a file, short name or Hub repo id) with another r and budget, without profiling again.

    The head map is voted again from the stored statistics; the statistics and their provenance stay, and the file
    records the windows they were measured with. E.g. the shipped 2K profile at r 0.2 in 43% of the KV:
    catekv-profile retarget smollm2-135m-instruct -o p.safetensors -r 0.2 --kv-fraction 0.43
    """
    if output.exists() and not overwrite:
        raise click.UsageError(f"{output} exists; pass --overwrite to replace it")
    check_output_option(output, "'-o' / '--output'")
    if context_length is not None and kv_fraction is None:
        raise click.UsageError("--context-length is the length --kv-fraction is measured at; give --kv-fraction too")
    try:
        new = retarget(load_profile(profile), adaptive_ratio=adaptive_ratio, budget=budget, kv_fraction=kv_fraction,
                       context_length=context_length)
    except ProfileError as e:
        raise click.ClickException(str(e)) from None
    new.save(output)
    length = context_length or new.reference.context_length
    click.echo(f"wrote {output}: {new.provenance['retarget']}; {int(new.head_map.sum())} of {new.head_map.numel()} "
               f"KV heads adaptive, {new.kv_kept_fraction(length):.1%} of the KV kept at {length} tokens")


@main.command("push")
@click.argument("profile", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("repo_id")
@click.option("--revision", default=None, help="Branch to push to, created from main if missing  [default: main]")
@click.option("--private", is_flag=True, help="Create the repo as private (when it does not exist yet).")
@click.option("--create-pr", is_flag=True, help="Open a pull request (against --revision) instead of committing.")
@click.option("--commit-message", default=None, help="Commit message  [default: model, adaptive heads, r, budget]")
@click.option("--accuracy-json", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help='Measured accuracy for the model card: {"task": score}, {"task": {"column": value}} or a '
                   "list of row objects.  [default: the card says not measured]")
@click.option("--token", default=None,
              help="Hub token with write access  [default: HF_TOKEN, or the token of `hf auth login`]")
def push_command(profile: Path, repo_id: str, revision: str | None, private: bool, create_pr: bool,
                 commit_message: str | None, accuracy_json: Path | None, token: str | None) -> None:
    """Upload PROFILE to the Hub model repo REPO_ID (org/name) in one commit.

    The commit holds profile.safetensors, a generated model card (README.md) and the head map (headmap.png).
    Load it back with catekv_runtime.load_profile("REPO_ID") or `catekv-profile show REPO_ID`.
    """
    import warnings

    from .hub import HubError, UnchangedWarning, accuracy_table, push_profile

    accuracy = None
    if accuracy_json is not None:
        try:
            accuracy = json.loads(accuracy_json.read_text())
            accuracy_table(accuracy)
        except (OSError, ValueError) as e:
            raise click.BadParameter(f"{accuracy_json}: {e}", param_hint="--accuracy-json") from None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            url = push_profile(profile, repo_id, revision=revision, private=private, create_pr=create_pr,
                               commit_message=commit_message, token=token, accuracy=accuracy)
        except ProfileError as e:
            raise click.ClickException(f"not pushed, the profile is invalid: {e}") from None
        except (HubError, ValueError) as e:
            raise click.ClickException(str(e)) from None
        finally:
            for warning in caught:
                click.echo(f"warning: {warning.message}", err=True)
    pr_url = getattr(url, "pr_url", None)
    if any(issubclass(w.category, UnchangedWarning) for w in caught):
        click.echo(str(url))
        return
    branch = f" (branch {revision})" if revision else ""
    click.echo(f"pushed {profile} to {repo_id}{branch}: {url}", err=True)
    if pr_url:
        click.echo(f"opened a pull request: {pr_url}", err=True)
    else:
        oid = getattr(url, "oid", None)
        click.echo(f'load it with catekv_runtime.load_profile("{repo_id}@{oid}") to pin this commit', err=True)
    click.echo(pr_url or str(url))
