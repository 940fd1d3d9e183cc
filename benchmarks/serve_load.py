"""Closed-loop load test of ``catekv-serve`` over HTTP: N concurrent clients, each sending its next request as soon
as its last one has ended, for each N of ``--concurrency``.

    catekv-serve qwen2.5-coder-0.5b --profile qwen2.5-coder-0.5b-instruct-32k --max-model-len 33024 \\
        --max-batch-size 256 --gpu-memory-utilization 0.5 --port 8000 &
    python benchmarks/serve_load.py --port 8000 --label catekv --concurrency 1,4,16,64 --prompt-tokens 16384 \\
        --out docs/results/serve_load.json
    # the same with `--profile none` and --label full

Every request has the same shape: a prompt of exactly ``--prompt-tokens`` tokens (filler text tokenized by the
server's ``/tokenize``, each request starting at another offset of it, sent as token ids), ``--output-tokens``
tokens generated (``ignore_eos``, greedy), streamed. Per concurrency level one record: requests/s and output
tokens/s over the level's wall time, time to first token and inter-chunk latency p50/p99 (the engine streams one
chunk per step and token, fewer where it holds text back: a partial character or a stop string's start), errors,
and from the server's ``/metrics`` the slots, its engine's prefill chunk and backend, the most KV held and what full
attention would have held (sampled every ``--metrics-interval`` s), and peak GPU memory (on CUDA).

``--ramp S`` leaves out of a level's figures the requests started in its first S seconds (the burst of N prompts a
closed loop starts with; they still count towards ``--max-requests``), for steady-state figures.

Loopback only (``127.0.0.1:PORT``), and bounded: a level ends after ``--duration`` s or ``--max-requests`` requests
(those under way finish), each request after ``--timeout`` s. The records are appended to ``--out`` (a JSON list),
so that runs against several servers gather in one file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from catekv_runtime.files import write_atomically

HOST = "127.0.0.1"
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
          "A quiet river runs past the old mill, and the wheel turns slowly in the afternoon light. ")


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) with linear interpolation between the nearest ranks; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def read_metrics(text: str) -> tuple[dict[str, float], dict[str, str]]:
    """Prometheus text as the server's unlabelled samples by name (its gauges and counters), and the labels of its
    ``catekv_engine_info`` sample (its engine's settings; {} if it has none)."""
    from prometheus_client.parser import text_string_to_metric_families

    values: dict[str, float] = {}
    info: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "catekv_engine_info":
                info = dict(sample.labels)
            elif not sample.labels:
                values[sample.name] = sample.value
    return values, info


class Load:
    """One server under test: prompts of the requested length, one request, one level of concurrency."""

    def __init__(self, client: httpx.AsyncClient, args: argparse.Namespace):
        self.client, self.args = client, args
        self.filler: list[int] = []
        self.next_offset = 0

    async def prepare(self) -> dict[str, Any]:
        """The filler's token ids (one text long enough for every offset, so that a tokenizer's start token stays at
        the start) and what the server says about itself."""
        models = (await self.client.get("/v1/models")).raise_for_status().json()["data"][0]
        one = len(await self._tokenize(FILLER))
        self.filler = await self._tokenize(FILLER * ((self.args.prompt_tokens + 1024) // max(one - 2, 1) + 2))
        if len(self.filler) < self.args.prompt_tokens + 1024:
            raise RuntimeError(f"the filler has {len(self.filler)} tokens, fewer than the prompts need")
        return {"model": models["id"], "max_model_len": models.get("max_model_len")}

    async def _tokenize(self, text: str) -> list[int]:
        return (await self.client.post("/tokenize", json={"prompt": text})).raise_for_status().json()["tokens"]

    def prompt(self) -> list[int]:
        """The next prompt: ``--prompt-tokens`` ids of the filler from the next of 1024 offsets."""
        offset = self.next_offset % 1024
        self.next_offset += 1
        return self.filler[offset : offset + self.args.prompt_tokens]

    async def request(self) -> dict[str, Any]:
        """One streamed completion: its time to first token, chunk gaps and output tokens, or its error."""
        body = {"prompt": self.prompt(), "max_tokens": self.args.output_tokens, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        start = time.perf_counter()
        first = last = None
        gaps: list[float] = []
        tokens = 0
        try:
            async with self.client.stream("POST", "/v1/completions", json=body, timeout=self.args.timeout) as r:
                if r.status_code != 200:
                    return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        return {"error": chunk["error"].get("message")}
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
                    if chunk.get("choices") and chunk["choices"][0].get("text"):
                        now = time.perf_counter()
                        if first is None:
                            first = now - start
                        else:
                            gaps.append(now - last)
                        last = now
        except httpx.HTTPError as error:
            return {"error": f"{type(error).__name__}: {error}"}
        return {"ttft": first, "gaps": gaps, "tokens": tokens, "start": start, "end": time.perf_counter()}

    async def level(self, concurrency: int) -> dict[str, Any]:
        """``concurrency`` clients in a closed loop until the level's time or request budget is spent."""
        args = self.args
        results: list[dict[str, Any]] = []
        started = 0
        start = time.perf_counter()
        deadline = start + args.duration
        peaks = {"catekv_kv_cache_bytes": 0.0, "catekv_kv_cache_full_attention_bytes": 0.0,
                 "catekv_num_requests_running": 0.0}

        async def client() -> None:
            nonlocal started
            while time.perf_counter() < deadline and started < args.max_requests:
                started += 1
                results.append(await self.request())

        async def sample() -> None:
            while True:
                values, _ = read_metrics((await self.client.get("/metrics")).text)
                for name in peaks:
                    peaks[name] = max(peaks[name], values.get(name, 0.0))
                await asyncio.sleep(args.metrics_interval)

        sampler = asyncio.create_task(sample())
        try:
            await asyncio.gather(*(client() for _ in range(concurrency)))
        finally:
            sampler.cancel()
        exposition = (await self.client.get("/metrics")).text
        final, engine = read_metrics(exposition)
        return {
            "concurrency": concurrency, "prompt_tokens": args.prompt_tokens, "output_tokens": args.output_tokens,
            **level_stats(results, start, time.perf_counter(), args.ramp),
            "slots": final.get("catekv_kv_cache_slots"),
            "prefill_chunk": int(engine["prefill_chunk"]) if "prefill_chunk" in engine else None,
            "prefill_backend": engine.get("prefill_backend"),
            "kv_allocated_bytes": final.get("catekv_kv_cache_allocated_bytes"),
            "peak_kv_bytes": peaks["catekv_kv_cache_bytes"],
            "peak_kv_full_attention_bytes": peaks["catekv_kv_cache_full_attention_bytes"],
            "peak_running": peaks["catekv_num_requests_running"],
            "peak_gpu_memory_bytes": final.get("catekv_gpu_memory_peak_bytes"),
        }


def level_stats(results: list[dict[str, Any]], start: float, end: float, ramp: float) -> dict[str, Any]:
    """A level's figures from its requests (``request``'s results, in ``time.perf_counter`` seconds), the level
    having run from ``start`` to ``end``. Requests started in its first ``ramp`` seconds are left out, and the rates
    are over ``[start + ramp, end]``: a closed loop of N clients begins with N prompts to prefill at once, which
    says more about a burst than about the steady state that follows. Tokens of the left-out requests that arrive
    after the ramp are not counted, so with a ramp the rates are a lower bound, close when the level is long
    against one request's latency."""
    measured = [r for r in results if r.get("start", start) >= start + ramp]
    done = [r for r in measured if "error" not in r]
    ttft = [r["ttft"] for r in done if r["ttft"] is not None]
    gaps = [g for r in done for g in r["gaps"]]
    wall = end - start - ramp
    ms = 1000.0
    return {
        "ramp_s": ramp, "requests": len(done), "errors": len(measured) - len(done),
        "first_error": next((r["error"] for r in measured if "error" in r), None),
        "wall_s": wall, "requests_per_s": len(done) / wall, "output_tokens_per_s": sum(r["tokens"] for r in done) / wall,
        "ttft_p50_ms": _scaled(percentile(ttft, 50), ms), "ttft_p99_ms": _scaled(percentile(ttft, 99), ms),
        "itl_p50_ms": _scaled(percentile(gaps, 50), ms), "itl_p99_ms": _scaled(percentile(gaps, 99), ms),
    }


def _scaled(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=max(args.concurrency) + 4)
    async with httpx.AsyncClient(base_url=f"http://{HOST}:{args.port}", headers=headers, limits=limits,
                                 timeout=args.timeout) as client:
        load = Load(client, args)
        server = await load.prepare()
        for _ in range(args.warmup):
            warm = await load.request()
            if "error" in warm:
                raise RuntimeError(f"warm-up request failed: {warm['error']}")
        records = []
        for concurrency in args.concurrency:
            record = {"label": args.label, **server, **await load.level(concurrency)}
            print(json.dumps(record), flush=True)
            records.append(record)
    return records


def _concurrency(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("a comma-separated list of positive ints")
    return values


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True, help="catekv-serve's port on 127.0.0.1")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--label", default="", help="names the server's configuration in the records")
    parser.add_argument("--concurrency", type=_concurrency, default=[1, 4, 16], help="clients per level, e.g. 1,4,16")
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--output-tokens", type=int, default=256)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per level at most")
    parser.add_argument("--max-requests", type=int, default=1000, help="requests per level at most")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request at most")
    parser.add_argument("--warmup", type=int, default=1, help="requests before the first level")
    parser.add_argument("--ramp", type=float, default=0.0,
                        help="seconds at the start of each level whose requests run but are not measured")
    parser.add_argument("--metrics-interval", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=None, help="append the records to this JSON list")
    args = parser.parse_args(argv)
    for name in ("prompt_tokens", "output_tokens", "max_requests"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 <= args.ramp < args.duration:
        parser.error("--ramp must be >= 0 and shorter than --duration")
    words, hide = [], False
    for word in sys.argv[1:] if argv is None else argv:  # the API key stays out of the records
        words.append("***" if hide else "--api-key=***" if word.startswith("--api-key=") else word)
        hide = word == "--api-key"
    command = " ".join(["python benchmarks/serve_load.py", *words])
    records = [{**r, "command": command} for r in asyncio.run(run(args))]
    if args.out is not None:
        previous = json.loads(args.out.read_text()) if args.out.exists() else []
        write_atomically(args.out, json.dumps(previous + records, indent=1) + "\n")
    return records


if __name__ == "__main__":
    main()
