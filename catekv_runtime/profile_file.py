"""The profile file (docs/profile-format.md): one safetensors file, written and read here, and checked on load
against everything a profiling run can produce, so a damaged or edited file is refused with a reason.

The runtime owns the format: :func:`load_profile` reads profiles, and the profiler writes them through
:meth:`Profile.save <catekv_runtime.profile.Profile.save>` (:func:`write_profile`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from .errors import ProfileError
from .files import save_safetensors
from .locate import locate_profile
from .params import ProfileParams
from .profile import ModelSpec, Profile, ReferenceSpec

FORMAT_NAME = "catekv-profile"
# Version 2 added param.reserve_tokens and param.tie_rule; a version-1 file reads with the values its
# statistics were made with (reserve 0, exact vote), so nothing silently changes meaning.
FORMAT_VERSION = 2
_LEGACY_PARAMS = {1: {"param.reserve_tokens": "0", "param.tie_rule": "exact"}}

_TENSORS = {  # name: (dtype, shape key); "LH" = [layers, kv heads], "SLH" = [samples, layers, kv heads]
    "head_map": (torch.int8, "LH"),
    "budgets": (torch.int64, "LH"),
    "cv": (torch.float32, "SLH"),
    "threshold": (torch.float32, "SLH"),
    "hit_mean": (torch.float32, "SLH"),
    "votes": (torch.int64, "LH"),
}
_SHAPE_NAMES = {"LH": "num_layers x num_kv_heads", "SLH": "num_samples x num_layers x num_kv_heads"}
# The metadata sections written from dataclasses, by key prefix.
_SECTIONS = {"param.": ProfileParams, "model.": ModelSpec, "reference.": ReferenceSpec}


def write_profile(profile: Profile, path: str | os.PathLike[str]) -> Path:
    """Write ``profile`` to ``path`` atomically (a temporary file renamed into place)."""
    # Copies: safetensors refuses tensors that share memory (e.g. one tensor passed as cv and threshold).
    tensors = {name: getattr(profile, name).to(dtype).contiguous().clone() for name, (dtype, _) in _TENSORS.items()}
    metadata = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION)}
    for prefix, section in (("param.", profile.params), ("model.", profile.model), ("reference.", profile.reference)):
        for key, value in dataclasses.asdict(section).items():
            metadata[prefix + key] = str(value)
    for prefix, extra in (("provenance.", profile.provenance), ("calibration.", profile.calibration)):
        for key, value in extra.items():
            metadata[prefix + key] = str(value)
    return save_safetensors(tensors, metadata, path)


def load_profile(path: str | os.PathLike[str], *, revision: str | None = None) -> Profile:
    """Load and validate a profile.

    ``path`` is a local ``.safetensors`` file, the short name of a shipped profile (:func:`list_profiles`),
    or a Hugging Face Hub repo id (``"org/name"`` or
    ``"org/name@revision"``) holding ``profile.safetensors``; Hub downloads go through huggingface_hub's
    cache and work offline from it. Raises :class:`ProfileError` naming what is wrong.
    """
    local = locate_profile(path, revision)
    if not _has_safetensors_header(local):
        raise ProfileError(
            f"{local}: not a safetensors file; a profile is the .safetensors file that `catekv-profile` writes"
        )
    try:
        tensors = load_file(str(local))
        with safe_open(str(local), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise ProfileError(
            f"{local}: not a readable safetensors file ({e}); the file is truncated or corrupted, "
            "download or re-create it with `catekv-profile`"
        ) from None
    return profile_from_tensors(tensors, metadata, source=str(local))


def _has_safetensors_header(path: Path) -> bool:
    """True if ``path`` starts as a safetensors file does: an 8-byte header length, then a JSON object.

    Tells a file of another kind (JSON, random bytes, empty) from a safetensors file cut short or damaged.
    """
    try:
        with open(path, "rb") as f:
            start = f.read(9)
    except OSError:
        return True  # let the safetensors reader report why the file cannot be read
    return len(start) == 9 and int.from_bytes(start[:8], "little") >= 2 and start[8:] == b"{"


def profile_from_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: str = "") -> Profile:
    """Validate raw tensors and metadata (as stored in the file) and build a :class:`Profile`."""
    where = f"{source}: " if source else ""

    def fail(message: str) -> ProfileError:
        return ProfileError(f"{where}{message}")

    if metadata.get("format") != FORMAT_NAME:
        raise fail(f"not a CateKV profile (format is {metadata.get('format')!r}, expected {FORMAT_NAME!r})")
    version = metadata.get("format_version", "")
    if not version.isdigit() or not 1 <= int(version) <= FORMAT_VERSION:
        raise fail(
            f"unsupported profile format version {version!r}; this catekv reads versions 1 to {FORMAT_VERSION}: "
            "upgrade catekv or re-create the profile"
        )
    metadata = {**_LEGACY_PARAMS.get(int(version), {}), **metadata}
    params, model, reference = (_section(cls, metadata, prefix, fail) for prefix, cls in _SECTIONS.items())
    _check_sizes(model, reference, params, fail)

    missing = sorted(set(_TENSORS) - set(tensors))
    if missing:
        raise fail(f"missing tensors {missing}")
    shapes = {"LH": (model.num_layers, model.num_kv_heads)}
    shapes["SLH"] = (reference.num_samples, *shapes["LH"])
    for name, (dtype, shape_key) in _TENSORS.items():
        t = tensors[name]
        if t.dtype != dtype or tuple(t.shape) != shapes[shape_key]:
            raise fail(
                f"tensor {name!r} is {t.dtype} {tuple(t.shape)}, expected {dtype} {shapes[shape_key]} "
                f"({_SHAPE_NAMES[shape_key]} from the metadata)"
            )
    for name in ("cv", "threshold", "hit_mean"):
        t = tensors[name]
        if not torch.isfinite(t).all() or (t < 0).any():
            raise fail(f"tensor {name!r} holds negative or non-finite values")
    head_map = tensors["head_map"]
    if not ((head_map == 0) | (head_map == 1)).all():
        raise fail("tensor 'head_map' must hold only 0 (consistent) and 1 (adaptive)")
    profile = Profile.from_statistics(
        tensors["cv"],
        tensors["threshold"],
        tensors["hit_mean"],
        params,
        model,
        reference,
        provenance=_prefixed(metadata, "provenance."),
        calibration=_prefixed(metadata, "calibration."),
    )
    if not torch.equal(profile.head_map, head_map.bool()) or not torch.equal(profile.votes, tensors["votes"]):
        raise fail(
            "the stored head map or votes do not follow from the stored statistics, adaptive ratio and tie rule; "
            "the file was edited or corrupted: re-create it with `catekv-profile`"
        )
    try:
        return profile.with_budgets(tensors["budgets"])
    except ProfileError as e:
        raise fail(f"invalid stored budgets: {e}") from None


def _prefixed(metadata: dict[str, str], prefix: str) -> dict[str, str]:
    return {k.removeprefix(prefix): v for k, v in metadata.items() if k.startswith(prefix)}


def _check_sizes(model: ModelSpec, reference: ReferenceSpec, params: ProfileParams,
                 fail: Callable[[str], ProfileError]) -> None:
    """Refuse sizes no model or profiling run has: non-positive counts, a window longer than the reference text."""
    for key, value in (
        *((f"model.{n}", getattr(model, n)) for n in ("num_layers", "num_kv_heads", "num_attention_heads", "head_dim")),
        *((f"reference.{n}", getattr(reference, n)) for n in ("context_length", "num_samples")),
    ):
        if value < 1:
            raise fail(f"metadata {key!r}={value} must be >= 1; the file was edited or corrupted")
    if model.num_attention_heads % model.num_kv_heads:
        raise fail(
            f"metadata 'model.num_attention_heads'={model.num_attention_heads} is not a multiple of "
            f"'model.num_kv_heads'={model.num_kv_heads}; the file was edited or corrupted"
        )
    if params.min_prompt_tokens() > reference.context_length:
        raise fail(
            f"invalid parameter: {params.min_prompt_terms()} exceed the {reference.context_length}-token "
            "reference samples the statistics come from; the file was edited or corrupted: re-create it with "
            "`catekv-profile`"
        )


def _section(cls: type, metadata: dict[str, str], prefix: str, fail: Callable[[str], ProfileError]) -> Any:
    """The dataclass ``cls`` from the metadata keys ``prefix + field``; a parameter out of range is refused here
    (:class:`ProfileParams` checks itself when made)."""
    values = {}
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        if key not in metadata:
            raise fail(f"metadata key {key!r} is missing")
        raw = metadata[key]
        try:
            values[f.name] = _parse(raw, f.type)
        except ValueError:
            raise fail(f"metadata {key!r}={raw!r} is not a valid {f.type}") from None
    try:
        return cls(**values)
    except ProfileError as e:
        raise fail(str(e)) from None


def _parse(raw: str, type_name: Any) -> Any:
    name = type_name if isinstance(type_name, str) else type_name.__name__
    if name == "int":
        return int(raw)
    if name == "float":
        value = float(raw)
        if not math.isfinite(value):
            raise ValueError(raw)
        return value
    return raw


__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "load_profile", "profile_from_tensors", "write_profile"]
