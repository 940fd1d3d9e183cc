"""The CateKV profile: which KV heads are adaptive, their budgets, the statistics behind that, and provenance.

The data and what can be derived from it. The parameters are :mod:`~catekv_runtime.params`, the vote
:mod:`~catekv_runtime.vote`, the file :mod:`~catekv_runtime.profile_file` (which also loads), where a named
profile is found :mod:`~catekv_runtime.locate` and :mod:`~catekv_runtime.hub`; their public names are importable
from here too, as they were before the module was split.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import ProfileError
from .hub import PROFILE_FILENAME, is_hub_id, is_hub_repo_id
from .locate import list_profiles
from .params import (
    RUNTIME_OVERRIDES,
    STATISTICS_FIELDS,
    TIE_RULES,
    UNLIMITED_BUDGET,
    ProfileParams,
    adaptive_keep_chunks,
    budget_windows,
)
from .vote import adaptive_head_count, vote_adaptive_heads

if TYPE_CHECKING:
    from .profile_file import FORMAT_NAME, FORMAT_VERSION, load_profile, profile_from_tensors

# The file format builds on Profile, so its names are looked up on first use (PEP 562), not imported above.
_FROM_PROFILE_FILE = ("FORMAT_NAME", "FORMAT_VERSION", "load_profile", "profile_from_tensors")


def __getattr__(name: str) -> Any:
    if name in _FROM_PROFILE_FILE:
        from . import profile_file

        return getattr(profile_file, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class ModelSpec:
    """What a profile was made for; checked before it is applied to a model."""

    model_id: str
    revision: str
    architecture: str
    num_layers: int
    num_kv_heads: int
    num_attention_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config: Any, model_id: str = "", revision: str = "",
                    architecture: str = "") -> ModelSpec:
        """The attention shape of a transformers config (the language model's, for multimodal ones)."""
        text = config.get_text_config(decoder=True)
        heads = int(text.num_attention_heads)
        return cls(
            model_id=model_id,
            revision=revision,
            architecture=architecture or (getattr(config, "architectures", None) or [""])[0],
            num_layers=int(text.num_hidden_layers),
            num_kv_heads=int(getattr(text, "num_key_value_heads", None) or heads),
            num_attention_heads=heads,
            # As the attention modules of Llama/Mistral/Qwen2/Phi-3 do; a config may hold head_dim=None.
            head_dim=int(getattr(text, "head_dim", None) or text.hidden_size // heads),
        )


@dataclass(frozen=True)
class ReferenceSpec:
    """The reference set the statistics come from."""

    task: str
    context_length: int
    num_samples: int
    seed: int
    text_hash: str


@dataclass(frozen=True)
class Profile:
    """A CateKV head profile.

    Attributes:
        head_map: bool ``[num_layers, num_kv_heads]``, True for adaptive heads.
        budgets: int64 ``[num_layers, num_kv_heads]``: tokens kept by each consistent head (``params.budget``
            unless set per head with :meth:`with_budgets`), :data:`UNLIMITED_BUDGET` (-1) for adaptive heads
            (they keep ``eta`` of their middle chunks). The runtime keeps what these say.
        cv: float32 ``[num_samples, num_layers, num_kv_heads]``: coefficient of variation of chunk hits.
        threshold: float32, same shape: the attention threshold tau of each sample and head.
        hit_mean: float32, same shape: mean number of observation queries hitting a chunk.
        votes: int64 ``[num_layers, num_kv_heads]``: samples in which the head was voted adaptive.
    """

    head_map: torch.Tensor
    budgets: torch.Tensor
    cv: torch.Tensor
    threshold: torch.Tensor
    hit_mean: torch.Tensor
    votes: torch.Tensor
    params: ProfileParams
    model: ModelSpec
    reference: ReferenceSpec
    provenance: dict[str, str] = field(default_factory=dict)
    calibration: dict[str, str] = field(default_factory=dict)  # how k/alpha were chosen, when calibrated

    @classmethod
    def from_statistics(
        cls,
        cv: torch.Tensor,
        threshold: torch.Tensor,
        hit_mean: torch.Tensor,
        params: ProfileParams,
        model: ModelSpec,
        reference: ReferenceSpec,
        provenance: dict[str, str] | None = None,
        calibration: dict[str, str] | None = None,
    ) -> Profile:
        """Build a profile (head map, votes, uniform budgets) from per-sample statistics."""
        # Stored as float32, so vote on float32 too: loading re-derives the head map from the file.
        cv, threshold, hit_mean = (t.detach().float().cpu().contiguous() for t in (cv, threshold, hit_mean))
        if cv.ndim != 3 or threshold.shape != cv.shape or hit_mean.shape != cv.shape:
            raise ProfileError(
                f"statistics must all be [samples, layers, kv_heads]; got cv {tuple(cv.shape)}, "
                f"threshold {tuple(threshold.shape)}, hit_mean {tuple(hit_mean.shape)}"
            )
        head_map, votes = vote_adaptive_heads(cv, params.adaptive_ratio, params.tie_rule)
        return cls(
            head_map=head_map,
            budgets=uniform_budgets(head_map, params.budget),
            cv=cv,
            threshold=threshold,
            hit_mean=hit_mean,
            votes=votes,
            params=params,
            model=model,
            reference=reference,
            provenance=dict(provenance or {}),
            calibration=dict(calibration or {}),
        )

    @property
    def num_layers(self) -> int:
        return self.head_map.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.head_map.shape[1]

    @property
    def adaptive_fraction(self) -> float:
        return self.head_map.float().mean().item()

    def with_adaptive_ratio(self, ratio: float) -> Profile:
        """The same profile re-derived for another adaptive ratio r from the stored statistics."""
        params = dataclasses.replace(self.params, adaptive_ratio=float(ratio))
        return self.replace_params(params)

    def replace_params(self, params: ProfileParams) -> Profile:
        """The same statistics under other runtime parameters (budget, eta, r, tie rule, windows).

        The head map is voted again and every consistent head gets ``params.budget``: an override wins over
        per-head budgets."""
        head_map, votes = vote_adaptive_heads(self.cv, params.adaptive_ratio, params.tie_rule)
        return dataclasses.replace(
            self, params=params, head_map=head_map, votes=votes, budgets=uniform_budgets(head_map, params.budget)
        )

    def with_budgets(self, budgets: torch.Tensor) -> Profile:
        """The same head map with per-head budgets ``[layers, kv_heads]`` (tokens; -1 on adaptive heads)."""
        budgets = torch.as_tensor(budgets).to(torch.int64).cpu()
        check_budgets(budgets, self.head_map, self.params)
        return dataclasses.replace(self, budgets=budgets)

    def kv_kept_fraction(self, context_length: int) -> float:
        """Fraction of the full KV cache kept after prefill of a prompt of ``context_length`` tokens."""
        n = int(context_length)
        if n < 1:
            raise ValueError(f"context length must be >= 1 token, got {n}")
        values, counts = torch.unique(self.budgets, return_counts=True)
        kept = sum(int(c) * self.params.kept_tokens(n, int(b)) for b, c in zip(values.tolist(), counts.tolist()))
        return kept / (n * self.budgets.numel())

    def check_model(self, spec: ModelSpec) -> None:
        """Raise :class:`ProfileError` if this profile was made for a model of another shape (or id, when known)."""
        mine = self.model
        for name in ("num_layers", "num_kv_heads", "head_dim"):
            if getattr(mine, name) != getattr(spec, name):
                raise ProfileError(
                    f"profile was made for {mine.model_id!r} with {name}={getattr(mine, name)}, but the model "
                    f"has {name}={getattr(spec, name)}; profile this model with `catekv-profile MODEL -o FILE`"
                )
        if mine.model_id and spec.model_id and _norm_id(mine.model_id) != _norm_id(spec.model_id):
            raise ProfileError(
                f"profile was made for {mine.model_id!r} but is applied to {spec.model_id!r} (same shapes); "
                "pass allow_model_mismatch=True if this is intended, e.g. a fine-tune of the same base"
            )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the profile to ``path`` atomically (a temporary file renamed into place; docs/profile-format.md)."""
        from .profile_file import write_profile  # the file format builds on this module

        return write_profile(self, path)


def uniform_budgets(head_map: torch.Tensor, budget: int) -> torch.Tensor:
    """``budget`` tokens for every consistent head of ``head_map`` (bool ``[...]``), -1 for adaptive ones."""
    return torch.where(head_map.bool(), UNLIMITED_BUDGET, budget).to(torch.int64)


def check_budgets(budgets: torch.Tensor, head_map: torch.Tensor, params: ProfileParams) -> None:
    """Raise :class:`ProfileError` unless ``budgets`` is -1 exactly on adaptive heads and every other budget
    covers at least L_init + L_rec tokens."""
    if budgets.shape != head_map.shape:
        raise ProfileError(f"budgets are {tuple(budgets.shape)}, the head map {tuple(head_map.shape)}")
    if not torch.equal(budgets == UNLIMITED_BUDGET, head_map):
        raise ProfileError(f"budgets must be {UNLIMITED_BUDGET} exactly on the adaptive heads of the head map")
    floor = params.init_tokens + params.recent_tokens
    consistent = budgets[~head_map]
    if consistent.numel() and int(consistent.min()) < floor:
        raise ProfileError(f"a consistent head's budget of {int(consistent.min())} tokens is below L_init + L_rec "
                           f"({params.init_tokens} + {params.recent_tokens})")


def _norm_id(model_id: str) -> str:
    return model_id.rstrip("/").lower()


def resolve_profile(profile: Profile, overrides: dict[str, Any]) -> Profile:
    """The profile with runtime overrides applied (budget, eta, adaptive_ratio, tie rule, windows, chunk size).

    Any override re-votes the head map and gives every consistent head ``budget`` tokens (overrides win
    over the profile's per-head budgets).

    Overriding ``budget`` alone rescales ``init_tokens`` and ``recent_tokens`` to B/32 and B/8
    (:func:`budget_windows`), as in the paper, unless they are given too.
    """
    unknown = set(overrides) - RUNTIME_OVERRIDES
    if unknown:
        raise TypeError(f"unknown CateKV overrides {sorted(unknown)}; known: {sorted(RUNTIME_OVERRIDES)}")
    if not overrides:
        return profile
    values = dataclasses.asdict(profile.params)
    if "budget" in overrides:
        values.update(budget_windows(overrides["budget"]))
    values.update(overrides)
    return profile.replace_params(ProfileParams(**values))


def budget_for_kv_fraction(profile: Profile, fraction: float, context_length: int) -> int:
    """The largest budget B whose profile (``resolve_profile(profile, {"budget": B})``: windows B/32 and B/8, every
    consistent head B) keeps at most ``fraction`` of the KV of a ``context_length``-token prompt, by
    :meth:`Profile.kv_kept_fraction`; for comparing adaptive ratios r at one memory budget. Raises
    :class:`ProfileError` when the adaptive heads alone keep more than ``fraction``."""
    n = int(context_length)

    def kept(budget: int) -> float:  # never falls as B grows: more chunks kept, fewer left in the middle
        return resolve_profile(profile, {"budget": budget}).kv_kept_fraction(n)

    low, high = 2, max(2, n)  # B = 2: one init and one recent token, the smallest budget_windows allows
    if kept(low) > fraction:
        raise ProfileError(
            f"at r = {profile.params.adaptive_ratio:g} the adaptive heads alone keep {kept(low):.1%} of the KV of a "
            f"{n}-token prompt, more than the {fraction:.1%} asked for: lower r or allow a larger fraction"
        )
    if kept(high) <= fraction:
        return high
    while high - low > 1:  # kept(low) <= fraction < kept(high)
        middle = (low + high) // 2
        low, high = (middle, high) if kept(middle) <= fraction else (low, middle)
    return low


def retarget(profile: Profile, *, adaptive_ratio: float | None = None, budget: int | None = None,
             kv_fraction: float | None = None, context_length: int | None = None) -> Profile:
    """The profile's statistics under another adaptive ratio r and budget B, to be saved as a profile of its own.

    ``budget`` sets B (windows B/32 and B/8, as :func:`resolve_profile`); ``kv_fraction`` instead takes the largest
    B that keeps at most that fraction of the KV of a ``context_length``-token prompt (default: the reference
    length) at the new r (:func:`budget_for_kv_fraction`). The head map is voted again from the stored statistics
    and every consistent head gets B (per-head budgets are not carried over); the statistics stay as measured: ``provenance["statistics_windows"]`` keeps the budget and windows they were measured with
    (the first ones, when retargeted again) and ``provenance["retarget"]`` says what changed. At a fixed share of
    the KV a lower r with a larger B scored better in docs/accuracy.md ("At one memory budget")."""
    if budget is not None and kv_fraction is not None:
        raise ProfileError("give a budget or a KV fraction, not both: a KV fraction chooses the budget")
    if adaptive_ratio is None and budget is None and kv_fraction is None:
        raise ProfileError("nothing to retarget: give an adaptive ratio, a budget or a KV fraction")
    old = profile.params
    ratio = old.adaptive_ratio if adaptive_ratio is None else float(adaptive_ratio)
    at_ratio = resolve_profile(profile, {"adaptive_ratio": ratio})
    length = profile.reference.context_length if context_length is None else int(context_length)
    if kv_fraction is not None:
        budget = budget_for_kv_fraction(at_ratio, kv_fraction, length)
    new = resolve_profile(at_ratio, {} if budget is None else {"budget": int(budget)})
    change = f"r {old.adaptive_ratio:g} -> {ratio:g}, budget {old.budget} -> {new.params.budget}"
    if kv_fraction is not None:
        change += f" (at most {kv_fraction:.1%} of the KV of a {length}-token prompt)"
    windows = {"budget": old.budget, "init_tokens": old.init_tokens, "recent_tokens": old.recent_tokens}
    provenance = {"statistics_windows": json.dumps(windows), **profile.provenance, "retarget": change}
    return dataclasses.replace(new, provenance=provenance)


__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "PROFILE_FILENAME",
    "RUNTIME_OVERRIDES",
    "STATISTICS_FIELDS",
    "TIE_RULES",
    "UNLIMITED_BUDGET",
    "ModelSpec",
    "Profile",
    "ProfileError",
    "ProfileParams",
    "ReferenceSpec",
    "adaptive_head_count",
    "adaptive_keep_chunks",
    "budget_for_kv_fraction",
    "budget_windows",
    "check_budgets",
    "is_hub_id",
    "is_hub_repo_id",
    "list_profiles",
    "load_profile",
    "profile_from_tensors",
    "resolve_profile",
    "retarget",
    "uniform_budgets",
    "vote_adaptive_heads",
]
