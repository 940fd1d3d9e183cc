"""The server's Prometheus metrics (``/metrics``), in a registry of their own.

vLLM's metric names with the ``catekv_`` prefix where one exists, plus the KV accounting that CateKV is about: the
bytes of KV the running requests hold against what full attention would hold for the same requests, and the bytes
of KV buffers allocated. The engine thread updates everything; a scrape only reads (prometheus_client's values are
thread-safe).
"""

from __future__ import annotations

from typing import Any

import torch
from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE  # noqa: F401 (re-exported for the app)
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

# Seconds. Time to first token spans a short prompt on a GPU (ms) to a long prompt queued behind others (minutes);
# inter-token latency a GPU decode step (ms) to a CPU one (tenths of a second).
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0, 160.0, 640.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
               0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0)


class Metrics:
    """Gauges, counters and histograms of one server. ``engine`` gives the static figures (slots, KV buffers) and
    the device (GPU memory gauges, on CUDA only)."""

    def __init__(self, engine: Any):
        self.registry = CollectorRegistry()
        r = self.registry
        self.running = Gauge("catekv_num_requests_running", "Requests in a slot (prefilling or decoding).",
                             registry=r)
        self.waiting = Gauge("catekv_num_requests_waiting", "Requests queued for a free slot.", registry=r)
        self.kv_held = Gauge("catekv_kv_cache_bytes",
                             "Bytes of KV the running requests hold (every head's positions in use).", registry=r)
        self.kv_full = Gauge("catekv_kv_cache_full_attention_bytes",
                             "Bytes of KV full attention would hold for the same running requests.", registry=r)
        allocated = Gauge("catekv_kv_cache_allocated_bytes", "Bytes of the engine's static KV buffers.", registry=r)
        allocated.set(sum(g.kv.nbytes for g in engine.kv.groups))
        slots = Gauge("catekv_kv_cache_slots", "Slots: the most requests running at once.", registry=r)
        slots.set(engine.slots)
        # What a load test needs to tell runs apart, in the exposition (vLLM exposes its config the same way).
        Info("catekv_engine", "The engine's settings.", registry=r).info({
            "prefill_chunk": str(engine.prefill_chunk), "prefill_backend": engine.prefill_backend,
            "max_model_len": str(engine.max_model_len), "cuda_graphs": str(engine.cuda_graphs).lower(),
            "compressed": str(engine.profile is not None).lower()})
        self.prompt_tokens = Counter("catekv_prompt_tokens", "Prompt tokens prefilled.", registry=r)
        self.generation_tokens = Counter("catekv_generation_tokens", "Tokens generated.", registry=r)
        self.finished = Counter("catekv_request_finished", "Requests that ended, by finish reason (stop, length, "
                                "abort: the client went away).", ["finished_reason"], registry=r)
        self.rejected = Counter("catekv_request_rejected", "Requests refused because the queue was full.",
                                registry=r)
        self.ttft = Histogram("catekv_time_to_first_token_seconds", "From a request's arrival to its first token.",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("catekv_inter_token_latency_seconds", "Between two consecutive tokens of a request.",
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("catekv_e2e_request_latency_seconds", "From a request's arrival to its end.",
                             buckets=E2E_BUCKETS, registry=r)
        device = engine.model.device
        if device.type == "cuda":
            Gauge("catekv_gpu_memory_allocated_bytes", "torch.cuda.memory_allocated of the engine's device.",
                  registry=r).set_function(lambda: torch.cuda.memory_allocated(device))
            Gauge("catekv_gpu_memory_peak_bytes", "torch.cuda.max_memory_allocated of the engine's device since "
                  "the server started.", registry=r).set_function(lambda: torch.cuda.max_memory_allocated(device))

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format."""
        return generate_latest(self.registry)
