"""CateKV profiler: find each KV head's sequential consistency once, offline, and write a profile.

``load_model`` is the public loader of every kind of model the profiler takes (Hub id, folder, ``.gguf``
file, or an embedded GGUF model such as ``"smollm2-135m"``), for use with the runtime too.
"""

from .models import EMBEDDED_MODELS, ModelError, ModelInfo, load_model

__version__ = "0.1.0"

__all__ = ["EMBEDDED_MODELS", "ModelError", "ModelInfo", "__version__", "load_model"]
