"""Seeing each layer's post-RoPE queries and keys during a prefill, through transformers' attention interface.

Any decoder-only model whose attention modules dispatch through ``ALL_ATTENTION_FUNCTIONS`` (the Llama,
Qwen2, Mistral, Phi-3 families and most others in transformers 5) is supported with no model-specific
code: we register an attention function that hands (query, key) to a callback and then runs SDPA.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

IMPLEMENTATION = "catekv_profile"
LayerCallback = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], None]

_callback: ContextVar[LayerCallback | None] = ContextVar("catekv_profile_callback", default=None)


def _profiling_attention(module, query, key, value, attention_mask, **kwargs):
    callback = _callback.get()
    if callback is not None:
        callback(module, query, key)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(IMPLEMENTATION, _profiling_attention)
AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


@contextmanager
def capture_attention(model: torch.nn.Module, callback: LayerCallback) -> Iterator[None]:
    """Within the block, every attention call of ``model`` first calls ``callback(module, query, key)``.

    ``query`` is ``[batch, num_q_heads, q_len, d]`` and ``key`` ``[batch, num_kv_heads, kv_len, d]``, both
    after RoPE. The model's attention implementation is restored on exit.
    """
    previous = model.config._attn_implementation
    model.set_attn_implementation(IMPLEMENTATION)
    token = _callback.set(callback)
    try:
        yield
    finally:
        _callback.reset(token)
        model.set_attn_implementation(previous)
