"""Optional GPU kernels (Triton).

Importing this package does not import Triton, which the runtime core must not need: the names
below load :mod:`catekv_runtime.kernels.triton_decode` on first access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

_TRITON_DECODE = (
    "DecodeConfig",
    "DecodeWorkspace",
    "KVGroup",
    "decode_attention",
    "decode_attention_reference",
    "decode_attention_two_groups",
    "default_num_splits",
    "make_workspace",
)

if TYPE_CHECKING:
    from .triton_decode import (
        DecodeConfig,
        DecodeWorkspace,
        KVGroup,
        decode_attention,
        decode_attention_reference,
        decode_attention_two_groups,
        default_num_splits,
        make_workspace,
    )


def __getattr__(name: str) -> Any:
    if name in _TRITON_DECODE:
        from . import triton_decode

        return getattr(triton_decode, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_TRITON_DECODE)
