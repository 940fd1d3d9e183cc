"""The Triton decode kernel's configuration for the engine's decode step."""

from __future__ import annotations

from typing import Any

# Target programs per SM of each CateKV head group's decode launch (see default_kernel_config).
CATEKV_PROGRAMS_PER_SM = 2.0


def default_kernel_config(profile: Any) -> Any:
    """The Triton decode kernel's ``DecodeConfig`` for a CateKV ``profile`` (None: full attention).

    CateKV's head groups are narrower than the full cache (fewer KV heads per launch), so they take 64-key tiles
    rather than 32 and split each group for :data:`CATEKV_PROGRAMS_PER_SM` programs per SM rather than the full
    cache's 4 (more splits of a narrow group are more partials to merge over shorter runs); the two groups of a
    layer run concurrently (``concurrent_groups``), the small one filling SMs the long one's tail leaves idle. The
    measurements behind these choices are in docs/benchmarks.md (section f, "Split counts of the decode kernel"
    and "The head groups of a layer on two streams").
    """
    from ..kernels.triton_decode import DEFAULT_CONFIG, DecodeConfig

    if profile is None:
        return DEFAULT_CONFIG
    return DecodeConfig(block_n=64, programs_per_sm=CATEKV_PROGRAMS_PER_SM, concurrent_groups=True)
