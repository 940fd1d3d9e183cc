"""Prefill, decode and peak memory of the engine on a random-weight Llama-3-8B-shaped model (bf16, one GPU), and the
set-up the other benchmarks share (the model, a random profile, the bandwidth floor, JSON records).

One prompt of ``context`` random tokens through the engine's public loop (``add_request``, then ``step`` until
done), for CateKV (``engine-catekv``: a random profile, r = 0.4, budget ``--budget``) and full attention on the same
engine (``engine-full``), against transformers' ``generate`` (SDPA, DynamicCache; up to ``--max-generate-context``).
``prefill_s`` is the time to the first token (the engine's layer-by-layer prefill, ``prefill_chunk`` tokens through
every layer per step), the decode figure the wall time per ``step`` after it, and the peak includes the prefill. A
short request first warms the engine up (kernels compiled, the batch-1 CUDA graph captured), so neither time counts
that; but the first arm's ``prefill_s`` still includes cuDNN's plans for the prompt's chunk shapes, which the arms
after it reuse (``benchmarks/prefill.py`` times prefill with them built beforehand). The decode step alone, at 128K and 512K, in batches and at a memory cap, is ``benchmarks/engine_decode.py``'s.

    python benchmarks/decode.py --contexts 32768 131072 --out docs/results/decode_real_engine.json
    python benchmarks/decode.py --smoke     # CPU, a tiny model, tiny sizes: checks the script (figures mean nothing)
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import catekv_runtime as ck  # noqa: E402
from catekv_runtime.files import write_atomically  # noqa: E402
from catekv_runtime.profile import Profile, ProfileParams, ReferenceSpec  # noqa: E402

GiB = 1024**3
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=1 << 20,
                 rope_theta=500000.0)
# Smoke runs and CPU tests of the benchmarks: seconds on CPU; 4 KV heads, so 2 per rank at TP=2.
TINY = dict(hidden_size=128, intermediate_size=256, num_attention_heads=8, num_key_value_heads=4, head_dim=16,
            vocab_size=512, max_position_embeddings=8192, rope_theta=10000.0)


def write_records(path: Path, results: list) -> None:
    """All the records of a run, as one JSON list, written atomically."""
    write_atomically(path, json.dumps(results, indent=1))


def emit(results: list, **record) -> None:
    results.append(record)
    print(json.dumps(record), flush=True)


def build_model(layers: int, device: str = "cuda", **shape):
    """Random bf16 weights of Llama-3-8B's shapes; ``shape`` overrides config fields (tiny models for tests)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**{**LLAMA3_8B, "num_hidden_layers": layers, **shape})
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    torch.set_default_dtype(torch.float32)
    model.eval().requires_grad_(False)
    return model


def random_profile(model, budget: int, ratio: float = 0.4, **kw) -> Profile:
    spec = ck.model_spec(model)
    cv = torch.rand(4, spec.num_layers, spec.num_kv_heads, generator=torch.Generator().manual_seed(0))
    params = ProfileParams.for_budget(budget, adaptive_ratio=ratio, **kw)
    return Profile.from_statistics(cv, cv, cv, params, spec, ReferenceSpec("random", 0, 4, 0, "-"))


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (the ceiling for decode)."""
    src = torch.randn(GiB // 2, dtype=torch.float32, device="cuda")  # 2 GiB; uint8 copies run slower
    dst = torch.empty_like(src)
    import triton.testing

    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=200, rep=500, return_mode="median")
    del src, dst
    return 2 * 2 * GiB / (ms * 1e-3)


def weight_bytes(model) -> int:
    """Bytes of the parameters this process holds (its shards under tensor parallelism)."""
    local = (p.to_local() if hasattr(p, "to_local") else p for p in model.parameters())
    return sum(t.numel() * t.element_size() for t in local)


class StepTimer:
    """A ``generate`` stopping criterion that never stops: it timestamps the end of every generated token.

    ``generate`` calls it once per new token, after the forward and the token choice, so consecutive marks
    bound one decode step; the first mark minus :meth:`start` is the prefill (with the first token).
    ``on_mark`` is called at every mark (e.g. ``torch.profiler.profile.step``).
    """

    def __init__(self, on_mark=None):
        self.cuda = torch.cuda.is_available()
        self.on_mark = on_mark
        self.events: list = []
        self.walls: list[float] = []

    def start(self) -> None:
        self.events, self.walls = [], []
        self._mark()

    def _mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.events.append(event)
        self.walls.append(time.perf_counter())

    def __call__(self, input_ids, scores, **kwargs):
        self._mark()
        if self.on_mark is not None:
            self.on_mark()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def intervals_ms(self) -> list[float]:
        """Milliseconds between consecutive marks: [prefill, step 1, step 2, ...]."""
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.events, self.events[1:])]
        return [1e3 * (b - a) for a, b in zip(self.walls, self.walls[1:])]


def decode_floor_ms(model, kv_bytes: int, bandwidth: float) -> float:
    # The embedding table is read one row per token, not in full, unless the output head shares it (tied
    # embeddings, e.g. Qwen2.5-0.5B): model.parameters() counts a shared table once, and the head reads all of it.
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == embed.data_ptr()
    read = weight_bytes(model) - (0 if tied else embed.numel() * embed.element_size()) + kv_bytes
    return 1e3 * read / bandwidth


def time_replays(graph: torch.cuda.CUDAGraph, steps: int) -> float:
    """Milliseconds per replay of ``graph`` (after one untimed replay), over ``steps`` replays."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    torch.cuda.synchronize()
    start.record()
    for _ in range(steps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps


def host_copy_bandwidth() -> float:
    """Bytes read + written per second of a host copy (the smoke runs' stand-in for the device's)."""
    src = torch.randn(1 << 22)
    dst = torch.empty_like(src)
    start = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    return 10 * 2 * src.numel() * 4 / (time.perf_counter() - start)


def engine_memory(model, cap_gib: float) -> dict:
    """The engine's arguments for a memory cap of ``cap_gib`` in all: on CUDA ``gpu_memory_utilization`` (cap over
    the GPU's memory), elsewhere ``kv_cache_memory`` (the cap less the weights)."""
    if model.device.type == "cuda":
        total = torch.cuda.get_device_properties(model.device).total_memory
        return {"gpu_memory_utilization": min(1.0, cap_gib * GiB / total)}
    return {"kv_cache_memory": max(1, int(cap_gib * GiB) - weight_bytes(model))}


def peak_gib() -> float | None:
    """Peak device memory allocated since the last reset, GiB (None off CUDA)."""
    return round(torch.cuda.max_memory_allocated() / GiB, 2) if torch.cuda.is_available() else None


def reset_peak() -> None:
    gc.collect()  # the previous arm's engine and its CUDA graphs go first
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def add_step_arguments(parser: argparse.ArgumentParser, smoke: str, *, steps: bool = True) -> None:
    """The options of an engine benchmark on random Llama-3-8B shapes, arms ``catekv`` and ``full``
    (``engine_decode.py``, ``tp_engine.py``; ``prefill.py`` without ``--steps``)."""
    parser.add_argument("--contexts", type=int, nargs="+", default=[131072, 524288])
    parser.add_argument("--arms", nargs="+", choices=["catekv", "full"], default=["catekv", "full"])
    parser.add_argument("--budget", type=int, default=2048, help="CateKV budget B of the random profile")
    parser.add_argument("--ratio", type=float, default=0.4, help="adaptive-head ratio r of the random profile")
    if steps:
        parser.add_argument("--steps", type=int, default=200, help="timed steps per arm and context")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--smoke", action="store_true", help=smoke)


GREEDY = dict(temperature=0, ignore_eos=True)


def ms_per_step_to_the_end(engine: ck.Engine) -> float:
    """Wall milliseconds per :meth:`Engine.step` until nothing is unfinished. Every step launches one decode step and
    then reads the one before, so the host's work overlaps the device's."""
    sync()
    start, steps = time.perf_counter(), 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    sync()
    return 1e3 * (time.perf_counter() - start) / max(steps, 1)


def engine_run(model, profile: Profile | None, ids: list[int], steps: int) -> dict:
    """One prompt through the engine's public loop: prefill seconds (to the first token), ms per decode step after
    it, peak GiB and the KV held against full attention's."""
    engine = ck.Engine(model, profile, max_batch_size=1, max_model_len=len(ids) + steps + 16,
                       max_decode_len=steps + 16)
    engine.generate([ids[:16]], ck.SamplingParams(max_tokens=3, **GREEDY))  # warm-up: kernels, the CUDA graph
    reset_peak()
    sync()
    start = time.perf_counter()
    request = engine.add_request(ids, ck.SamplingParams(max_tokens=steps + 1, **GREEDY))
    while not engine.partial(request).token_ids:
        engine.step()
    sync()
    prefill_s = time.perf_counter() - start
    held, full = engine.kv_usage()
    ms = ms_per_step_to_the_end(engine)
    return dict(decode_ms_per_step=round(ms, 3), prefill_s=round(prefill_s, 2), peak_gib=peak_gib(),
                kv_gib=round(held / GiB, 3), full_kv_gib=round(full / GiB, 3), kv_bytes=held)


def generate_run(model, ids: list[int], steps: int) -> dict:
    """transformers' ``generate`` (greedy): prefill seconds (one new token), ms per further token, peak GiB."""
    tensor = torch.tensor([ids], device=model.device)
    reset_peak()
    timings = []
    for new in (1, steps + 1):
        sync()
        start = time.perf_counter()
        model.generate(tensor, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        sync()
        timings.append(time.perf_counter() - start)
    config = model.config
    kv = 2 * len(ids) * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * model.dtype.itemsize
    return dict(decode_ms_per_step=round(1e3 * (timings[1] - timings[0]) / steps, 3), prefill_s=round(timings[0], 2),
                peak_gib=peak_gib(), kv_bytes=kv)


def run(model, args, results: list, bandwidth: float) -> None:
    for context in args.contexts:
        ids = torch.randint(3, min(model.config.vocab_size, 100000), (context,),
                            generator=torch.Generator().manual_seed(context)).tolist()
        for arm in args.arms:
            if arm == "transformers-generate":
                if context > args.max_generate_context:
                    continue
                record = generate_run(model, ids, args.steps)
            else:
                profile = random_profile(model, args.budget) if arm == "engine-catekv" else None
                record = engine_run(model, profile, ids, args.steps)
            floor = decode_floor_ms(model, record.pop("kv_bytes"), bandwidth)
            emit(results, suite="real", arm=arm, context=context, batch=1, floor_ms=float(f"{floor:.4g}"),
                 ratio_to_floor=round(record["decode_ms_per_step"] / floor, 3), **record)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072], help="prompt lengths")
    parser.add_argument("--arms", nargs="+", choices=["engine-catekv", "engine-full", "transformers-generate"],
                        default=["engine-catekv", "engine-full", "transformers-generate"])
    parser.add_argument("--budget", type=int, default=2048, help="CateKV budget of the random profile")
    parser.add_argument("--steps", type=int, default=64, help="decode steps timed")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--max-generate-context", type=int, default=131072)
    parser.add_argument("--smoke", action="store_true", help="CPU, a tiny model, tiny sizes (figures mean nothing)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.smoke:
        model = build_model(2, device="cpu", **TINY)
        bandwidth = host_copy_bandwidth()
        args.contexts, args.steps, args.budget = [200], 2, 64
    else:
        if not torch.cuda.is_available():
            parser.error("needs a CUDA GPU (or --smoke)")
        model = build_model(args.layers)
        bandwidth = copy_bandwidth()
    results: list = []
    emit(results, suite="setup", smoke=args.smoke, device=torch.cuda.get_device_name() if not args.smoke else "cpu",
         torch=torch.__version__, copy_bandwidth_gbs=round(bandwidth / 1e9, 1),
         weight_gib=round(weight_bytes(model) / GiB, 2), date=time.strftime("%Y-%m-%d"))
    run(model, args, results, bandwidth)
    if args.out:
        write_records(args.out, results)
    return results


if __name__ == "__main__":
    main()
