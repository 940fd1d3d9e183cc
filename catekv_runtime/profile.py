"""The CateKV profile: which KV heads are adaptive, their budgets, the statistics behind that, and provenance.

One safetensors file (docs/profile-format.md). The runtime owns the format: it reads profiles, and the
profiler writes them through :meth:`Profile.save`.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .files import replacing
from .selection import Regions
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

FORMAT_NAME = "catekv-profile"
# Version 2 added param.reserve_tokens and param.tie_rule; a version-1 file reads with the values its
# statistics were made with (reserve 0, exact vote), so nothing silently changes meaning.
FORMAT_VERSION = 2
_LEGACY_PARAMS = {1: {"param.reserve_tokens": "0", "param.tie_rule": "exact"}}
UNLIMITED_BUDGET = -1  # budget of an adaptive head: all of its middle chunks scaled by eta, no token cap
TIE_RULES = ("exact", "inclusive")


PROFILE_FILENAME = "profile.safetensors"  # docs/profile-format.md: the name looked up in a Hub repo
# A Hub repo id with its namespace, "org/name" (huggingface_hub's naming rules, less "--" and "..").
_HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def is_hub_repo_id(text: str) -> bool:
    """True if ``text`` has the form of a Hugging Face Hub repo id with its namespace ("org/name")."""
    return bool(_HUB_REPO_ID.match(text)) and "--" not in text and ".." not in text


def is_hub_id(text: str) -> bool:
    """True if ``text`` reads as a Hugging Face Hub repo id ("org/name"), not as a local path or file."""
    return (
        is_hub_repo_id(text)
        and not text.lower().endswith((".gguf", ".safetensors"))
        and not os.path.exists(text)
    )


class ProfileError(ValueError):
    """A profile is missing, corrupted, inconsistent, or does not fit the model it is applied to."""


@dataclass(frozen=True)
class ProfileParams:
    """The method's parameters (docs/method.md, "Parameters")."""

    percentile: float = 0.99  # k
    alpha: float = 1.0
    adaptive_ratio: float = 0.4  # r
    eta: float = 1.0
    budget: int = 2048  # B, tokens kept by a consistent head
    chunk_size: int = 8  # c
    obs_window: int = 64  # L_obs
    init_tokens: int = 64  # L_init
    recent_tokens: int = 256  # L_rec
    reserve_tokens: int = 32  # left out of the middle before L_rec, kept as tail (the authors' 32 // c chunks)
    tie_rule: str = "exact"  # "exact": ceil(rN) adaptive heads; "inclusive": every head tied with the last one

    # What the profiler's per-sample statistics depend on; the others act on the vote or on retention only.
    STATISTICS_FIELDS = (
        "percentile", "alpha", "chunk_size", "obs_window", "init_tokens", "recent_tokens", "reserve_tokens",
    )

    @classmethod
    def for_budget(cls, budget: int, **kwargs: Any) -> ProfileParams:
        """Parameters with the paper's defaults L_init = B/32 and L_rec = B/8 for a given budget B."""
        return cls(budget=budget, **{**budget_windows(budget), **kwargs})

    def validate(self) -> None:
        """Raise :class:`ProfileError` naming the first parameter that is out of range."""
        checks = [
            (0.5 < self.percentile < 1.0, "percentile k must be in (0.5, 1), e.g. 0.99"),
            (0.0 <= self.alpha <= 1.0, "alpha must be in [0, 1] (1 = plain k-th percentile)"),
            (0.0 <= self.adaptive_ratio <= 1.0, "adaptive ratio r must be in [0, 1]"),
            (0.0 < self.eta <= 1.0, "eta must be in (0, 1] (1 = adaptive heads keep their full cache)"),
            (self.chunk_size >= 1, "chunk size must be >= 1"),
            (self.obs_window >= 1, "observation window must be >= 1"),
            (self.init_tokens >= 0, "init tokens must be >= 0"),
            (self.recent_tokens >= 0, "recent tokens must be >= 0"),
            (self.reserve_tokens >= 0, "reserve tokens must be >= 0 (0 = no reserve, 32 = the authors' code)"),
            (self.tie_rule in TIE_RULES, f"tie rule must be one of {TIE_RULES}"),
            (
                self.budget >= self.init_tokens + self.recent_tokens,
                f"budget ({self.budget}) must be at least init + recent tokens "
                f"({self.init_tokens} + {self.recent_tokens})",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ProfileError(f"invalid parameter: {message}; got {self}")

    def regions(self, length: int) -> Regions:
        """Init, middle chunks and tail of a ``length``-token prompt under these parameters."""
        return Regions.of(length, self.init_tokens, self.recent_tokens, self.chunk_size, self.reserve_tokens)

    def budget_chunks(self, budget: int | None = None) -> int:
        """Middle chunks a consistent head of ``budget`` tokens (default B) keeps: (B - L_init - L_rec) / c."""
        budget = self.budget if budget is None else budget
        return (budget - self.init_tokens - self.recent_tokens) // self.chunk_size

    def kept_chunks(self, num_chunks: int, budget: int) -> int:
        """Middle chunks a head keeps out of ``num_chunks``: eta of them for an adaptive head
        (``budget`` = :data:`UNLIMITED_BUDGET`), else what its budget allows."""
        if budget == UNLIMITED_BUDGET:
            return adaptive_keep_chunks(num_chunks, self.eta)
        return min(self.budget_chunks(budget), num_chunks)

    def kept_tokens(self, length: int, budget: int) -> int:
        """Tokens of a ``length``-token prompt a head with ``budget`` keeps: init + kept chunks + tail."""
        regions = self.regions(length)
        return length - (regions.num_chunks - self.kept_chunks(regions.num_chunks, budget)) * self.chunk_size

    def min_prompt_tokens(self) -> int:
        """Shortest text the profiler accepts: L_obs + L_init + L_rec + the reserve + one chunk."""
        reserve = self.reserve_tokens // self.chunk_size * self.chunk_size
        return self.obs_window + self.init_tokens + self.recent_tokens + reserve + self.chunk_size


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
        params.validate()
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
        params.validate()
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
        """Write the profile to ``path`` atomically (a temporary file renamed into place)."""
        tensors = {
            "head_map": self.head_map.to(torch.int8).contiguous(),
            "budgets": self.budgets.to(torch.int64).contiguous(),
            "cv": self.cv.float().contiguous(),
            "threshold": self.threshold.float().contiguous(),
            "hit_mean": self.hit_mean.float().contiguous(),
            "votes": self.votes.to(torch.int64).contiguous(),
        }
        metadata = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION)}
        for prefix, section in (("param.", self.params), ("model.", self.model), ("reference.", self.reference)):
            for key, value in dataclasses.asdict(section).items():
                metadata[prefix + key] = str(value)
        for prefix, extra in (("provenance.", self.provenance), ("calibration.", self.calibration)):
            for key, value in extra.items():
                metadata[prefix + key] = str(value)
        return atomic_save(tensors, metadata, path)


def budget_windows(budget: int) -> dict[str, int]:
    """The paper's windows for a budget of B tokens: ``init_tokens`` B/32 and ``recent_tokens`` B/8 (at least 1)."""
    return {"init_tokens": max(1, budget // 32), "recent_tokens": max(1, budget // 8)}


# Every parameter can be changed at run time except those that only shape the profiler's statistics.
RUNTIME_OVERRIDES = frozenset(f.name for f in dataclasses.fields(ProfileParams)) - {"percentile", "alpha"}


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


def adaptive_keep_chunks(num_chunks: int, eta: float) -> int:
    """Middle chunks kept by an adaptive head: floor(eta * n) as the authors' ``int(middle_chunks * eta)``,
    all of them at eta = 1 (the epsilon keeps 0.3 * 10 at 3 despite binary rounding)."""
    return min(num_chunks, math.floor(eta * num_chunks + 1e-9))


def adaptive_head_count(ratio: float, heads: int) -> int:
    """Adaptive heads of ``heads`` at ratio r: ceil(r * heads) (the epsilon keeps 0.2 * 10 at 2 despite binary
    rounding)."""
    return math.ceil(ratio * heads - 1e-9)


def vote_adaptive_heads(cv: torch.Tensor, ratio: float, tie_rule: str = "exact") -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the adaptive heads from per-sample CVs ``[S, L, H]`` (docs/method.md, "Votes").

    In each sample the heads whose CV is at or below the ``ratio``-quantile of that sample's CVs get a
    vote. ``tie_rule="exact"``: the ``ceil(ratio * L * H)`` heads with most votes are adaptive; ties go to
    the lower mean CV, then to the lower flat index, so the result is deterministic and has exactly that
    many heads. ``"inclusive"`` (the authors' code): every head with at least as many votes as the
    ``ceil(ratio * L * H)``-th most voted one, which can be more heads.
    Returns ``(head_map bool [L, H], votes int64 [L, H])``.
    """
    samples, layers, heads = cv.shape
    flat = cv.reshape(samples, layers * heads).double()
    cutoff = torch.quantile(flat, ratio, dim=1, keepdim=True)
    votes = (flat <= cutoff).sum(dim=0)
    count = adaptive_head_count(ratio, layers * heads)
    # Lexicographic sort: most votes first, then lowest mean CV; a stable sort keeps index order on full ties.
    by_cv = torch.sort(flat.mean(dim=0), stable=True).indices
    by_votes = torch.sort(votes[by_cv], descending=True, stable=True).indices
    order = by_cv[by_votes]
    head_map = torch.zeros(layers * heads, dtype=torch.bool)
    head_map[order[:count]] = True
    if tie_rule == "inclusive" and count > 0:
        head_map |= votes >= votes[order[count - 1]]
    elif tie_rule not in TIE_RULES:
        raise ValueError(f"tie_rule must be one of {TIE_RULES}, got {tie_rule!r}")
    return head_map.reshape(layers, heads), votes.reshape(layers, heads).to(torch.int64)


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


def atomic_save(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: str | os.PathLike[str]) -> Path:
    """Save a safetensors file so that ``path`` holds either the old file or the complete new one."""
    with replacing(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    return Path(path)


# ---------------------------------------------------------------------------------------------- loading

_TENSORS = {  # name: (dtype, shape key); "LH" = [layers, kv heads], "SLH" = [samples, layers, kv heads]
    "head_map": (torch.int8, "LH"),
    "budgets": (torch.int64, "LH"),
    "cv": (torch.float32, "SLH"),
    "threshold": (torch.float32, "SLH"),
    "hit_mean": (torch.float32, "SLH"),
    "votes": (torch.int64, "LH"),
}
_SHAPE_NAMES = {"LH": "num_layers x num_kv_heads", "SLH": "num_samples x num_layers x num_kv_heads"}


def load_profile(path: str | os.PathLike[str], *, revision: str | None = None) -> Profile:
    """Load and validate a profile.

    ``path`` is a local ``.safetensors`` file, the short name of a shipped profile (:func:`list_profiles`),
    or a Hugging Face Hub repo id (``"org/name"`` or
    ``"org/name@revision"``) holding ``profile.safetensors``; Hub downloads go through huggingface_hub's
    cache and work offline from it. Raises :class:`ProfileError` naming what is wrong.
    """
    local = _resolve(path, revision)
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


def _shipped_profiles_folder() -> Path:
    """The folder of the profiles shipped with catekv, the data package ``catekv_profiles``: found the same way in a
    source checkout, an editable install and an installed wheel."""
    # A regular package on disk (pip installs wheels unpacked), so its Traversable is a pathlib.Path.
    return Path(str(importlib.resources.files("catekv_profiles")))


def list_profiles() -> list[str]:
    """Short names of the profiles shipped with catekv (``catekv_profiles/``), for ``load_profile(name)``."""
    return sorted(p.stem for p in _shipped_profiles_folder().glob("*.safetensors"))


def _resolve(path: str | os.PathLike[str], revision: str | None) -> Path:
    local = Path(path)
    if local.is_file():
        return local
    text = str(path)
    if local.is_dir():
        raise ProfileError(f"{text!r} is a directory, not a profile file; pass the .safetensors file")
    shipped = _shipped_profiles_folder() / f"{text}.safetensors"
    if "/" not in text and shipped.is_file():
        return shipped
    repo_id, at, at_revision = text.partition("@")  # "org/name@rev"; the revision may hold "/" (refs/pr/1)
    # "profiles/llama" with a profiles/ folder here is a missing local file, not a repo id.
    looks_like_repo = is_hub_id(repo_id) and not Path(repo_id).parent.is_dir()
    if not looks_like_repo:
        names = ", ".join(list_profiles()) or "none"
        raise ProfileError(f"profile file {text!r} not found (shipped profiles by short name: {names})")
    if at and not at_revision:
        raise ProfileError(f"{text!r}: empty revision after '@'; write 'org/name@branch-tag-or-commit'")
    if at_revision and revision and at_revision != revision:
        raise ProfileError(f"{text!r} names revision {at_revision!r} but revision={revision!r} was also passed")
    rev = revision or at_revision or None
    try:
        from huggingface_hub import constants as hub_constants
        from huggingface_hub import errors as hub_errors
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise ProfileError("loading a profile from the Hub needs huggingface_hub: pip install huggingface_hub") from None
    where = f"Hub repo {repo_id!r}" + (f" at revision {rev!r}" if rev else "")
    try:
        return Path(hf_hub_download(repo_id, PROFILE_FILENAME, revision=rev))
    except hub_errors.LocalEntryNotFoundError:  # no answer from the Hub, and not in the cache
        if hub_constants.HF_HUB_OFFLINE:
            message = (
                f"offline (HF_HUB_OFFLINE is set) and {PROFILE_FILENAME} of {where} is not in the huggingface_hub cache "
                f"({hub_constants.HF_HUB_CACHE}); load it once while online, or unset HF_HUB_OFFLINE"
            )
        else:
            message = (
                f"could not reach the Hub ({hub_constants.ENDPOINT}) and {PROFILE_FILENAME} of {where} is not in the "
                "huggingface_hub cache; check the connection (or HF_ENDPOINT)"
            )
        raise ProfileError(message) from None
    except hub_errors.RevisionNotFoundError:
        raise ProfileError(f"revision {rev!r} not found in the Hub repo {repo_id!r}") from None
    except hub_errors.RepositoryNotFoundError:  # also a gated repo (GatedRepoError is a subclass)
        raise ProfileError(
            f"Hub repo {repo_id!r} not found, or it is private or gated and this token has no access "
            "(log in with `hf auth login` or set HF_TOKEN)"
        ) from None
    except hub_errors.EntryNotFoundError:
        raise ProfileError(
            f"{where} has no {PROFILE_FILENAME}; a CateKV profile repo holds it at the top level "
            "(`catekv-profile push PROFILE REPO_ID` puts it there)"
        ) from None
    except Exception as e:  # huggingface_hub raises many types; all mean "could not get the file"
        raise ProfileError(f"could not get {PROFILE_FILENAME} from the {where}: {e}") from None


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
    params = _section(ProfileParams, metadata, "param.", fail)
    model = _section(ModelSpec, metadata, "model.", fail)
    reference = _section(ReferenceSpec, metadata, "reference.", fail)
    try:
        params.validate()
    except ProfileError as e:
        raise fail(str(e)) from None
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
    cv = tensors["cv"]
    head_map = tensors["head_map"]
    if not ((head_map == 0) | (head_map == 1)).all():
        raise fail("tensor 'head_map' must hold only 0 (consistent) and 1 (adaptive)")
    profile = Profile.from_statistics(
        cv,
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


def _check_sizes(model: ModelSpec, reference: ReferenceSpec, params: ProfileParams, fail: Any) -> None:
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
            f"invalid parameter: observation window ({params.obs_window}) + init ({params.init_tokens}) + recent "
            f"({params.recent_tokens}) + one chunk ({params.chunk_size}) exceed the {reference.context_length}-token "
            "reference samples the statistics come from; the file was edited or corrupted: re-create it with "
            "`catekv-profile`"
        )


def _section(cls: type, metadata: dict[str, str], prefix: str, fail: Any) -> Any:
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
    return cls(**values)


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


__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "PROFILE_FILENAME",
    "RUNTIME_OVERRIDES",
    "UNLIMITED_BUDGET",
    "ModelSpec",
    "Profile",
    "ProfileError",
    "ProfileParams",
    "ReferenceSpec",
    "adaptive_head_count",
    "adaptive_keep_chunks",
    "atomic_save",
    "budget_windows",
    "check_budgets",
    "is_hub_id",
    "is_hub_repo_id",
    "uniform_budgets",
    "list_profiles",
    "load_profile",
    "profile_from_tensors",
    "resolve_profile",
    "vote_adaptive_heads",
]
