"""Throughput under load of the engine, in-process: a closed loop of N concurrent clients at a memory cap.

Each client sends a request (random prompt tokens, lengths cycling through ``--prompt-lengths``; ``--output-tokens``
greedy tokens, end of sequence ignored) and sends the next when it is done, until ``--requests`` have finished.
Arms: ``catekv`` (the engine with a random profile at r = 0.4, budget ``--budget``), ``full`` (the same engine,
full attention) and ``transformers`` (``model.generate`` on SDPA, ``--transformers-batch`` requests at a time, first
come first served). The engines get ``--memory-cap-gib`` in all (``gpu_memory_utilization`` = cap / GPU memory; on
CPU, ``kv_cache_memory`` = cap less the weights) and as many slots as that and the concurrency allow.

Per arm and concurrency a record ``{"arm", "concurrency", "memory_cap_gib", "output_tokens_per_s", "ttft_p50_s",
"ttft_p99_s", "itl_p50_ms", "itl_p99_ms", ...}``: output tokens over the wall time of the whole loop; time to first
token from a request's arrival (queueing included) to the step that returned its first token; inter-token latency
between the steps that returned a request's tokens, each token of a step that returned k counting 1/k of it.
The engine's tokens are seen as a server sees them (``partial`` after each ``step``).

    python benchmarks/engine_throughput.py --concurrency 4 8 16 --out docs/results/engine_throughput.json
    python benchmarks/engine_throughput.py --smoke   # CPU, a tiny model, tiny sizes: checks the script
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.decode import (  # noqa: E402
    TINY,
    StepTimer,
    build_model,
    emit,
    engine_memory,
    random_profile,
    sync,
    write_records,
)
from benchmarks.serve_load import percentile  # noqa: E402
from catekv_runtime.engine import Engine, SamplingParams  # noqa: E402

RECORD_FIELDS = ("arm", "concurrency", "memory_cap_gib", "output_tokens_per_s", "ttft_p50_s", "ttft_p99_s",
                 "itl_p50_ms", "itl_p99_ms")


def rounded_percentile(values: list[float], q: float, digits: int) -> float | None:
    """serve_load's percentile (linear between ranks; None, JSON's null, for no values), rounded."""
    value = percentile(values, q)
    return None if value is None else round(value, digits)


def make_prompts(lengths: list[int], count: int, vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, min(vocab, 32000), (n,), generator=gen).tolist()
            for n, _ in zip(itertools.cycle(lengths), range(count))]


def run_engine(engine: Engine, prompts: list[list[int]], concurrency: int, output_tokens: int) -> dict:
    """The closed loop on the engine: returns output tokens, wall seconds, TTFTs (s) and ITLs (ms)."""
    params = SamplingParams(max_tokens=output_tokens, temperature=0, ignore_eos=True)
    queue = list(prompts)
    live: dict[int, dict] = {}  # request id -> arrival, tokens seen, time of the last new tokens
    ttft, itl, produced = [], [], 0

    def send() -> None:
        if queue:
            live[engine.add_request(queue.pop(0), params)] = {"arrival": time.perf_counter(), "seen": 0, "last": None}

    sync()
    start = time.perf_counter()
    for _ in range(concurrency):
        send()
    while live:
        finished = {c.request_id: c for c in engine.step()}
        now = time.perf_counter()
        for request_id, state in list(live.items()):
            output = finished.get(request_id) or engine.partial(request_id)
            new = len(output.token_ids) - state["seen"]
            if new > 0:
                if state["seen"] == 0:
                    ttft.append(now - state["arrival"])
                    new_after_first = new - 1
                else:
                    new_after_first = new
                if new_after_first > 0:
                    itl += [1e3 * (now - state["last"]) / new] * new_after_first if state["last"] is not None else []
                state["seen"] += new
                state["last"] = now
            if request_id in finished:
                produced += len(output.token_ids)
                del live[request_id]
                send()
    sync()
    return {"tokens": produced, "seconds": time.perf_counter() - start, "ttft": ttft, "itl": itl}


def run_transformers(model, prompts: list[list[int]], concurrency: int, output_tokens: int, batch: int) -> dict:
    """The closed loop on ``model.generate``: batches of up to ``batch`` waiting requests, one after the other;
    token times from a stopping criterion that never stops (``benchmarks.decode.StepTimer``)."""
    device = model.device
    queue = list(prompts)
    waiting = [time.perf_counter() for _ in range(min(concurrency, len(queue)))]  # arrivals of the clients' requests
    ttft, itl, produced = [], [], 0
    sync()
    start = time.perf_counter()
    while waiting:
        arrivals, waiting = waiting[:batch], waiting[batch:]
        chunk = [queue.pop(0) for _ in arrivals]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        timer = StepTimer()
        timer.start()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=output_tokens, min_new_tokens=output_tokens,
                                 do_sample=False, pad_token_id=0, stopping_criteria=[timer])
        sync()
        began = timer.walls[0]
        marks = [began + sum(timer.intervals_ms()[: i + 1]) / 1e3 for i in range(len(timer.intervals_ms()))]
        produced += (out.shape[1] - width) * len(chunk)
        for arrival in arrivals:
            ttft.append(marks[0] - arrival)
            itl += [1e3 * (b - a) for a, b in zip(marks, marks[1:])]
        now = time.perf_counter()
        waiting += [now] * min(len(arrivals), len(queue) - len(waiting))  # the clients send their next requests
    return {"tokens": produced, "seconds": time.perf_counter() - start, "ttft": ttft, "itl": itl}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", nargs="+", choices=["catekv", "full", "transformers"],
                        default=["catekv", "full", "transformers"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--prompt-lengths", type=int, nargs="+", default=[16384, 32768, 65536])
    parser.add_argument("--output-tokens", type=int, default=256)
    parser.add_argument("--requests", type=int, default=None, help="requests per run (default 2 x concurrency)")
    parser.add_argument("--memory-cap-gib", type=float, default=80.0)
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--transformers-batch", type=int, default=1, help="requests per model.generate call")
    parser.add_argument("--layers", type=int, default=32, help="layers of the random Llama-3-8B-shaped model")
    parser.add_argument("--smoke", action="store_true", help="CPU, a tiny model, tiny sizes (figures mean nothing)")
    parser.add_argument("--out", type=Path, default=None, help="write the records here, e.g. "
                        "docs/results/engine_throughput.json")
    args = parser.parse_args(argv)
    if args.smoke:
        model = build_model(2, device="cpu", **TINY)
        lengths, output_tokens, concurrency, cap, budget = [40, 70], 4, [2], 1.0, 32
    else:
        if not torch.cuda.is_available():
            parser.error("needs a CUDA GPU (or --smoke)")
        model = build_model(args.layers)
        lengths, output_tokens, concurrency = args.prompt_lengths, args.output_tokens, args.concurrency
        cap, budget = args.memory_cap_gib, args.budget
    results: list[dict] = []
    max_len = max(lengths) + output_tokens + 16
    for n in concurrency:
        prompts = make_prompts(lengths, args.requests or 2 * n, model.config.vocab_size)
        for arm in args.arms:
            extra = {}
            if arm == "transformers":
                run = run_transformers(model, prompts, n, output_tokens, args.transformers_batch)
                extra["transformers_batch"] = args.transformers_batch
            else:
                profile = random_profile(model, budget, args.ratio) if arm == "catekv" else None
                engine = Engine(model, profile, max_batch_size=n, max_model_len=max_len,
                                max_decode_len=output_tokens + 16, **engine_memory(model, cap))
                run = run_engine(engine, prompts, n, output_tokens)
                extra["slots"] = engine.slots
                del engine
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            emit(results, arm=arm, concurrency=n, memory_cap_gib=cap,
                 output_tokens_per_s=round(run["tokens"] / run["seconds"], 3),
                 ttft_p50_s=rounded_percentile(run["ttft"], 50, 4), ttft_p99_s=rounded_percentile(run["ttft"], 99, 4),
                 itl_p50_ms=rounded_percentile(run["itl"], 50, 3), itl_p99_ms=rounded_percentile(run["itl"], 99, 3),
                 requests=len(prompts), output_tokens=run["tokens"], seconds=round(run["seconds"], 3),
                 prompt_lengths=lengths, budget=budget if arm == "catekv" else None, smoke=args.smoke, **extra)
    if args.out is not None:
        write_records(args.out, results)
    return results


if __name__ == "__main__":
    main()
