"""CateKV profiler: find each KV head's sequential consistency once, offline, and write a profile."""

__version__ = "0.1.0"
