"""Optional GPU kernels (Triton).

``triton_decode``: split-K decode attention over one layer's head groups. ``triton_linear``: one token's
projections with their RMSNorm, SiLU-gating and residual add fused in. ``triton_norm``: the same small ops for
several rows (RMSNorm with its residual add, SiLU-gating), around cuBLAS projections.

Importing this package does not import Triton, which the runtime core must not need: the names
below load their module on first access.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_MODULE_OF = {
    **dict.fromkeys((
        "DecodeConfig",
        "DecodeWorkspace",
        "KVGroup",
        "decode_attention",
        "decode_attention_reference",
        "decode_attention_two_groups",
        "default_num_splits",
        "group_num_splits",
        "make_workspace",
    ), "triton_decode"),
    **dict.fromkeys(("LinearConfig", "default_linear_config", "fused_linear", "fused_linear_reference"),
                    "triton_linear"),
    **dict.fromkeys(("rms_norm", "silu_mul"), "triton_norm"),
}

if TYPE_CHECKING:
    from .triton_decode import (
        DecodeConfig,
        DecodeWorkspace,
        KVGroup,
        decode_attention,
        decode_attention_reference,
        decode_attention_two_groups,
        default_num_splits,
        group_num_splits,
        make_workspace,
    )
    from .triton_linear import LinearConfig, default_linear_config, fused_linear, fused_linear_reference
    from .triton_norm import rms_norm, silu_mul


def __getattr__(name: str) -> Any:
    if name in _MODULE_OF:
        return getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_MODULE_OF)
