"""Profiling a model: one prefill per reference sample, per-layer statistics, votes, a :class:`Profile`.

Per-sample statistics are checkpointed beside the output, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import safe_open

from catekv_runtime.files import save_safetensors
from catekv_runtime.params import STATISTICS_FIELDS
from catekv_runtime.profile import ModelSpec, Profile, ProfileParams, ReferenceSpec

from .capture import capture_attention
from .reference import ReferenceSample, reference_hash
from .stats import LayerStats, ThresholdSetting, layer_statistics

# "cv", "threshold", "hit_mean": float32 [settings, num_layers, num_kv_heads] (one row per (k, alpha) setting)
SampleStats = dict[str, torch.Tensor]
STATISTICS = ("cv", "threshold", "hit_mean")


class ProfilingError(RuntimeError):
    """Profiling cannot go on; the message says what is wrong and how to fix it."""


def sample_statistics(model: torch.nn.Module, input_ids: Sequence[int], params: ProfileParams,
                      settings: Sequence[ThresholdSetting] | None = None) -> SampleStats:
    """Statistics of every (k, alpha) setting (default: the one of ``params``), layer and KV head for one
    reference sample (one prefill, no logits)."""
    config = model.config.get_text_config(decoder=True)
    num_layers = config.num_hidden_layers
    per_layer: dict[int, LayerStats] = {}

    def on_layer(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor) -> None:
        obs = query[0, :, -params.obs_window :]
        per_layer[module.layer_idx] = layer_statistics(obs, key[0], module.scaling, params, settings)

    # Where the token ids are looked up; a model split by a device map moves activations between its layers.
    device = model.get_input_embeddings().weight.device
    ids = torch.tensor([list(input_ids)], dtype=torch.long, device=device)
    # The decoder alone: the logits of a long prompt (tokens x vocabulary) are large and not needed.
    with torch.inference_mode(), capture_attention(model, on_layer):
        model.get_decoder()(input_ids=ids, use_cache=False)
    if sorted(per_layer) != list(range(num_layers)):
        raise ProfilingError(
            f"saw attention in layers {sorted(per_layer)} but the model has {num_layers}; the model does not "
            "dispatch attention through transformers' AttentionInterface and cannot be profiled"
        )
    # Each layer's statistics stayed on that layer's device; one gather to the CPU at the end.
    return {name: torch.stack([getattr(per_layer[i], name).cpu() for i in range(num_layers)], dim=1)
            for name in STATISTICS}


class Checkpoint:
    """Per-sample statistics in ``<output>.ckpt/``, each file tagged with everything that determines it."""

    def __init__(self, output: str | Path, run_key: dict[str, str]):
        self.dir = Path(str(output) + ".ckpt")
        self.run_key = run_key

    def _path(self, index: int) -> Path:
        return self.dir / f"sample_{index:05d}.safetensors"

    def _key(self, sample_hash: str) -> str:
        text = json.dumps({**self.run_key, "sample": sample_hash}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def load(self, index: int, sample_hash: str) -> SampleStats | None:
        path = self._path(index)
        if not path.exists():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                key = (f.metadata() or {}).get("run_key")
                stats = {name: f.get_tensor(name) for name in STATISTICS}
        except Exception:  # a checkpoint cut short by a kill: recompute that sample
            return None
        if key != self._key(sample_hash):
            raise ProfilingError(
                f"checkpoint {path} was made by a run with other settings (model, dtype, parameters or "
                f"reference text); delete {self.dir} or pass --restart to start over"
            )
        return stats

    def save(self, index: int, sample_hash: str, stats: SampleStats) -> None:
        save_safetensors(stats, {"run_key": self._key(sample_hash)}, self._path(index))

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def measure_samples(
    model: torch.nn.Module,
    samples: Sequence[ReferenceSample],
    params: ProfileParams,
    settings: Sequence[ThresholdSetting],
    *,
    checkpoint: Checkpoint | None = None,
    on_sample: Callable[[int, bool], None] | None = None,
) -> SampleStats:
    """Statistics of every sample and setting: float32 ``[samples, settings, layers, kv_heads]`` each.

    ``on_sample(index, resumed)`` is called after each sample (for progress bars). With a ``checkpoint``,
    samples already measured by an interrupted run with the same settings are read back, not recomputed.
    """
    min_tokens = params.min_prompt_tokens()
    for i, sample in enumerate(samples):
        if len(sample.input_ids) < min_tokens:
            raise ProfilingError(
                f"reference sample {i} has {len(sample.input_ids)} tokens, fewer than the {min_tokens} that "
                f"{params.min_prompt_terms()} need; use longer texts or a smaller --budget / --obs-window / --init-tokens / --recent-tokens / "
                "--reserve-tokens"
            )
    per_sample: list[SampleStats] = []
    for i, sample in enumerate(samples):
        sample_hash = reference_hash([sample])
        stats = checkpoint.load(i, sample_hash) if checkpoint else None
        resumed = stats is not None
        if stats is None:
            stats = sample_statistics(model, sample.input_ids, params, settings)
            if checkpoint:
                checkpoint.save(i, sample_hash, stats)
        per_sample.append(stats)
        if on_sample:
            on_sample(i, resumed)
    return {name: torch.stack([s[name] for s in per_sample]) for name in STATISTICS}


def profile_candidates(
    stats: SampleStats,
    params: ProfileParams,
    settings: Sequence[ThresholdSetting],
    model_spec: ModelSpec,
    reference: ReferenceSpec,
    provenance: dict[str, str] | None = None,
) -> list[Profile]:
    """One :class:`Profile` per (k, alpha) setting from :func:`measure_samples`' statistics."""
    return [
        Profile.from_statistics(
            *(stats[name][:, i] for name in STATISTICS),
            dataclasses.replace(params, percentile=k, alpha=alpha), model_spec, reference, provenance,
        )
        for i, (k, alpha) in enumerate(settings)
    ]


def profile_model(
    model: torch.nn.Module,
    model_spec: ModelSpec,
    samples: Sequence[ReferenceSample],
    params: ProfileParams,
    reference: ReferenceSpec,
    *,
    checkpoint: Checkpoint | None = None,
    on_sample: Callable[[int, bool], None] | None = None,
    provenance: dict[str, str] | None = None,
) -> Profile:
    """Profile ``model`` on ``samples`` with the k and alpha of ``params`` and return the :class:`Profile`."""
    settings = [(params.percentile, params.alpha)]
    stats = measure_samples(model, samples, params, settings, checkpoint=checkpoint, on_sample=on_sample)
    return profile_candidates(stats, params, settings, model_spec, reference, provenance)[0]


def statistics_key(params: ProfileParams, model_spec: ModelSpec, dtype: str,
                   settings: Sequence[ThresholdSetting] | None = None) -> dict[str, str]:
    """What a sample's statistics depend on, apart from its text (the other parameters act on votes only)."""
    p = {name: getattr(params, name) for name in STATISTICS_FIELDS}
    if settings is not None:  # a calibration grid replaces the single (k, alpha)
        p.update(percentile=None, alpha=None, settings=[list(s) for s in settings])
    return {"params": json.dumps(p, sort_keys=True), "model": json.dumps(asdict(model_spec)), "dtype": dtype}


def default_provenance(device: str, dtype: str) -> dict[str, str]:
    """Tool and library versions, device, dtype and creation time, recorded in every profile."""
    import transformers

    from . import __version__

    return {
        "tool": f"catekv_profiler {__version__}",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": device,
        "dtype": dtype,
    }


__all__ = [
    "Checkpoint",
    "ProfilingError",
    "measure_samples",
    "profile_candidates",
    "profile_model",
    "sample_statistics",
    "statistics_key",
]
