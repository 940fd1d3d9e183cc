"""CateKV runtime: load a head profile and run inference with a hybrid KV cache.

The core (profiles, selection) needs only torch and safetensors; the transformers integration
(``apply``, ``remove``, ``CateKVCache``) and the engine (``Engine``, ``SamplingParams``, ``Completion``) are imported
on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import ProfileError
from .locate import list_profiles
from .params import ProfileParams
from .profile import ModelSpec, Profile, ReferenceSpec
from .profile_file import FORMAT_VERSION, load_profile

__version__ = "0.1.0"

_LAZY = {
    "apply": "integration",
    "remove": "integration",
    "make_cache": "integration",
    "model_spec": "integration",
    "cache_argument": "integration",
    "local_head_map": "integration",
    "tensor_parallel_rank": "integration",
    "CateKVCache": "cache",
    "Engine": "engine",
    "SamplingParams": "engine",
    "Completion": "engine",
}

if TYPE_CHECKING:
    from .cache import CateKVCache
    from .engine import Completion, Engine, SamplingParams
    from .integration import (
        apply,
        cache_argument,
        local_head_map,
        make_cache,
        model_spec,
        remove,
        tensor_parallel_rank,
    )


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from importlib import import_module

        try:
            module = import_module(f".{_LAZY[name]}", __name__)
        except ModuleNotFoundError as e:
            if e.name not in ("transformers", "accelerate"):
                raise
            raise ModuleNotFoundError(
                f"catekv_runtime.{name} needs {e.name}, which is not installed: pip install 'catekv[transformers]'",
                name=e.name,
            ) from None
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FORMAT_VERSION",
    "CateKVCache",
    "Completion",
    "Engine",
    "ModelSpec",
    "Profile",
    "ProfileError",
    "ProfileParams",
    "ReferenceSpec",
    "SamplingParams",
    "apply",
    "cache_argument",
    "list_profiles",
    "load_profile",
    "local_head_map",
    "make_cache",
    "model_spec",
    "remove",
    "tensor_parallel_rank",
]
