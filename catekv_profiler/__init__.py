"""CateKV profiler: find each KV head's sequential consistency once, offline, and write a profile.

``catekv-profile`` is :mod:`catekv_profiler.cli`; models load through :func:`catekv_models.load_model`.
"""

__version__ = "0.1.0"
