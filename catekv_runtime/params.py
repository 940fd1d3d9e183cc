"""The method's parameters (docs/method.md, "Parameters"), checked when they are made, and what follows from
them alone: the paper's windows for a budget, the chunks a head keeps, which parameters the profiler's
statistics depend on and which the runtime may override.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import ProfileError
from .selection import Regions

UNLIMITED_BUDGET = -1  # budget of an adaptive head: all of its middle chunks scaled by eta, no token cap
TIE_RULES = ("exact", "inclusive")


def _param(default: Any, *, statistics: bool, runtime: bool = True) -> Any:
    """A parameter with what it acts on: ``statistics``, the profiler's per-sample statistics (changing it means
    profiling again); ``runtime``, what the runtime does with a profile (it may be overridden when applying one)."""
    return field(default=default, metadata={"statistics": statistics, "runtime": runtime})


@dataclass(frozen=True)
class ProfileParams:
    """The method's parameters (docs/method.md, "Parameters"); making one out of range raises :class:`ProfileError`."""

    percentile: float = _param(0.99, statistics=True, runtime=False)  # k
    alpha: float = _param(1.0, statistics=True, runtime=False)
    adaptive_ratio: float = _param(0.4, statistics=False)  # r
    eta: float = _param(1.0, statistics=False)
    budget: int = _param(2048, statistics=False)  # B, tokens kept by a consistent head
    chunk_size: int = _param(8, statistics=True)  # c
    obs_window: int = _param(64, statistics=True)  # L_obs
    init_tokens: int = _param(64, statistics=True)  # L_init
    recent_tokens: int = _param(256, statistics=True)  # L_rec
    # Left out of the middle before L_rec, kept as tail (the authors' 32 // c chunks).
    reserve_tokens: int = _param(32, statistics=True)
    # "exact": ceil(rN) adaptive heads; "inclusive": every head tied with the last one.
    tie_rule: str = _param("exact", statistics=False)

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def for_budget(cls, budget: int, **kwargs: Any) -> ProfileParams:
        """Parameters with the paper's defaults L_init = B/32 and L_rec = B/8 for a given budget B."""
        return cls(budget=budget, **{**budget_windows(budget), **kwargs})

    def validate(self) -> None:
        """Raise :class:`ProfileError` naming the first parameter that is out of range (done on construction)."""
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

    def min_prompt_terms(self) -> str:
        """:meth:`min_prompt_tokens` spelled out for error messages, e.g. "observation window (64) + init (64) +
        recent (256) + reserve (32) + one chunk (8)"."""
        reserve = self.reserve_tokens // self.chunk_size * self.chunk_size
        return (f"observation window ({self.obs_window}) + init ({self.init_tokens}) + recent ({self.recent_tokens}) "
                f"+ reserve ({reserve}) + one chunk ({self.chunk_size})")


def _fields(role: str) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(ProfileParams) if f.metadata[role])


# What the profiler's per-sample statistics depend on; the others act on the vote or on retention only.
STATISTICS_FIELDS = _fields("statistics")
# What may be changed when a profile is applied: all but what shapes only the statistics (k, alpha).
RUNTIME_OVERRIDES = frozenset(_fields("runtime"))


def budget_windows(budget: int) -> dict[str, int]:
    """The paper's windows for a budget of B tokens: ``init_tokens`` B/32 and ``recent_tokens`` B/8 (at least 1)."""
    return {"init_tokens": max(1, budget // 32), "recent_tokens": max(1, budget // 8)}


def adaptive_keep_chunks(num_chunks: int, eta: float) -> int:
    """Middle chunks kept by an adaptive head: floor(eta * n) as the authors' ``int(middle_chunks * eta)``,
    all of them at eta = 1 (the epsilon keeps 0.3 * 10 at 3 despite binary rounding)."""
    return min(num_chunks, math.floor(eta * num_chunks + 1e-9))


__all__ = [
    "RUNTIME_OVERRIDES",
    "STATISTICS_FIELDS",
    "TIE_RULES",
    "UNLIMITED_BUDGET",
    "ProfileParams",
    "adaptive_keep_chunks",
    "budget_windows",
]
