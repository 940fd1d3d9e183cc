"""The CateKV inference engine: continuous batching, sampling, stops and streaming over a hybrid KV cache.

``Engine(model, profile, tokenizer=...)`` with ``generate``, ``stream`` and ``chat``; ``SamplingParams`` follows
vLLM's names. ``profile=None`` runs full attention on the same engine. See :mod:`.engine`.
"""

from __future__ import annotations

from .engine import Completion, Engine
from .model import DecoderModel, UnsupportedModelError
from .sampling import SamplingParams

__all__ = ["Completion", "DecoderModel", "Engine", "SamplingParams", "UnsupportedModelError"]
