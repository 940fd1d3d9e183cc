"""Decode and prefill benchmarks on a random-weight Llama-3-8B-shaped model (bf16, one GPU).

Arms, all in one run: CateKV on the lean path, full attention on the same lean path, and transformers'
``generate`` (SDPA, DynamicCache). Prints one JSON object per measurement and writes them all to --out.

    python benchmarks/decode.py --suite real --contexts 32768 131072 --out results.json
    python benchmarks/decode.py --suite synthetic --contexts 131072 524288 --out results.json
    python benchmarks/decode.py --suite batch --out results.json

``real`` prefills real prompts (peak memory includes prefill). ``synthetic`` fills the caches with random
K/V of the sizes a prefill would leave (the decode step does not depend on the values) to time decode at
lengths where a prefill per arm would cost minutes of GPU time. ``batch`` is the paper's throughput
setting: 40K context, budget 256 (init 8, recent 32), the largest batch under an 80 GiB cap.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import catekv_runtime as ck  # noqa: E402
from catekv_runtime.cache import HeadGroup  # noqa: E402
from catekv_runtime.files import write_atomically  # noqa: E402
from catekv_runtime.lean import LeanGenerator, _DecodeState  # noqa: E402
from catekv_runtime.profile import UNLIMITED_BUDGET, Profile, ProfileParams, ReferenceSpec  # noqa: E402

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
    # The embedding table is read one row per token, not in full.
    embed = model.get_input_embeddings().weight
    read = weight_bytes(model) - embed.numel() * embed.element_size() + kv_bytes
    return 1e3 * read / bandwidth


def synthetic_state(gen: LeanGenerator, head_map: torch.Tensor, params: ProfileParams, batch: int,
                    context: int, new_tokens: int) -> _DecodeState:
    """The decode state a prefill of ``context`` tokens would leave, filled with random K/V."""
    config = gen.model.config.get_text_config(decoder=True)
    device, dtype = gen.model.device, gen.model.dtype
    dim = config.head_dim
    group = config.num_attention_heads // config.num_key_value_heads
    layers = []
    for layer_map in head_map:
        groups = []
        for adaptive in (True, False):
            heads = (layer_map == adaptive).nonzero().flatten()
            if heads.numel() == 0:
                continue
            kept = params.kept_tokens(context, UNLIMITED_BUDGET if adaptive else params.budget)
            kv = torch.randn(2, batch, heads.numel(), kept + new_tokens, dim, dtype=dtype, device=device)
            q_heads = (heads[:, None] * group + torch.arange(group)).flatten().to(device)
            groups.append(HeadGroup(heads.to(device), q_heads, kv, kept, None))
        layers.append(SimpleNamespace(groups=groups))
    token = torch.randint(0, min(1000, config.vocab_size), (batch, 1), device=device)
    position = torch.full((batch, 1), context, device=device)
    return _DecodeState(gen, SimpleNamespace(layers=layers), token, position, new_tokens)


def time_graph_steps(state: _DecodeState, steps: int) -> float:
    return time_replays(state.capture(), steps)


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


def kv_bytes_of(state: _DecodeState) -> int:
    """KV bytes one decode step reads: every filled slot of every group."""
    return sum(slot.group.used_bytes for layer in state.layers for slot in layer)


def kernel_config(profile: Profile | None, block_n: int | None = None, programs_per_sm: float | None = None,
                  concurrent_groups: bool | None = None):
    """LeanGenerator's decode-kernel config for ``profile``, with the given fields (not None) overridden."""
    config = LeanGenerator.default_kernel_config(profile)
    return dataclasses.replace(config, block_n=block_n or config.block_n,
                               programs_per_sm=programs_per_sm or config.programs_per_sm,
                               concurrent_groups=config.concurrent_groups if concurrent_groups is None
                               else concurrent_groups)


def suite_synthetic(model, args, results, bandwidth) -> None:
    for context in args.contexts:
        for name in ("catekv", "full"):
            torch.cuda.empty_cache()
            profile = random_profile(model, args.budget) if name == "catekv" else None
            config = kernel_config(profile, args.block_n, args.programs_per_sm)
            gen = LeanGenerator(model, profile, kernel_config=config)
            head_map, params = gen._head_map_and_params()
            state = synthetic_state(gen, head_map, params, args.batch, context, args.steps + 8)
            kv = kv_bytes_of(state)
            ms = time_graph_steps(state, args.steps)
            floor = decode_floor_ms(model, kv, bandwidth)
            emit(results, suite="synthetic", arm=f"lean-{name}", context=context, batch=args.batch,
                 block_n=config.block_n,
                 decode_ms_per_step=round(ms, 3), floor_ms=round(floor, 3), ratio_to_floor=round(ms / floor, 3),
                 kv_gib=round(kv / GiB, 3))
            del state, gen


def suite_real(model, args, results, bandwidth) -> None:
    for context in args.contexts:
        ids = torch.randint(0, 100000, (args.batch, context), device="cuda")
        arms = [("lean-catekv", random_profile(model, args.budget)), ("lean-full", None)]
        if context <= args.max_generate_context:
            arms.append(("transformers-generate", None))
        arms = [arm for arm in arms if arm[0] in args.arms]
        for name, profile in arms:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            if name.startswith("lean"):
                gen = LeanGenerator(model, profile, kernel_config=kernel_config(profile, args.block_n,
                                                                                args.programs_per_sm))
                gen.generate(ids, max_new_tokens=args.steps + 1)
                s = gen.stats
                record = dict(decode_ms_per_step=round(s.decode_ms_per_step, 3), prefill_s=round(s.prefill_s, 2),
                              kv_gib=round(s.kv_bytes / GiB, 3), full_kv_gib=round(s.full_kv_bytes / GiB, 3))
                kv_read = s.kv_bytes
                del gen
            else:
                timings = []
                for new in (1, args.steps + 1):
                    torch.cuda.synchronize()
                    t = time.perf_counter()
                    model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
                    torch.cuda.synchronize()
                    timings.append(time.perf_counter() - t)
                record = dict(decode_ms_per_step=round(1e3 * (timings[1] - timings[0]) / args.steps, 3),
                              prefill_s=round(timings[0], 2))
                kv_read = context * 32 * 8 * 128 * 2 * 2 * args.batch
            peak = torch.cuda.max_memory_allocated()
            floor = decode_floor_ms(model, kv_read, bandwidth)
            emit(results, suite="real", arm=name, context=context, batch=args.batch, peak_gib=round(peak / GiB, 2),
                 floor_ms=round(floor, 3), **record)


def suite_batch(model, args, results, bandwidth) -> None:
    """40K context, budget 256: largest batch that fits 80 GiB, and tokens/s, CateKV vs full.

    The largest batch is predicted from the KV bytes per sequence, then confirmed by allocating and
    running it (and the next size up must fail), so only a few sizes are compiled and captured.
    """
    context, cap = 40960, 80 * GiB
    torch._dynamo.config.recompile_limit = 64  # one compilation per batch size tried
    total = torch.cuda.get_device_properties(0).total_memory
    for name in ("catekv", "full"):
        if name == "catekv":
            profile = random_profile(model, 256, init_tokens=8, recent_tokens=32)
            gen = LeanGenerator(model, profile)
            head_map, params = profile.head_map, profile.params
        else:
            gen = LeanGenerator(model, None)
            head_map, params = gen._head_map_and_params()
        probe = synthetic_state(gen, head_map, params, 1, context, args.steps + 8)
        per_sequence = sum(slot.group.allocated_bytes for layer in probe.layers for slot in layer)
        del probe
        torch.cuda.empty_cache()
        batch = int((cap - weight_bytes(model) - 2 * GiB) // per_sequence) + 1
        best = None
        torch.cuda.set_per_process_memory_fraction(cap / total)
        while batch > 0 and best is None:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            try:
                state = synthetic_state(gen, head_map, params, batch, context, args.steps + 8)
                ms = time_graph_steps(state, args.steps)
                best = dict(batch=batch, decode_ms_per_step=round(ms, 3),
                            tokens_per_s=round(batch * 1e3 / ms, 1), kv_gib=round(kv_bytes_of(state) / GiB, 2),
                            peak_gib=round(torch.cuda.max_memory_allocated() / GiB, 2))
                del state
            except torch.OutOfMemoryError:
                emit(results, suite="batch", arm=f"lean-{name}", context=context, out_of_memory_at=batch)
                state = None
                batch -= 1
        torch.cuda.set_per_process_memory_fraction(1.0)
        emit(results, suite="batch", arm=f"lean-{name}", context=context, memory_cap_gib=80, **(best or {}))
        del gen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=["real", "synthetic", "batch"], nargs="+", default=["synthetic"])
    parser.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--max-generate-context", type=int, default=131072)
    parser.add_argument("--block-n", type=int, default=None, help="Triton decode tile (default: LeanGenerator's)")
    parser.add_argument("--programs-per-sm", type=float, default=None,
                        help="DecodeConfig.programs_per_sm of the decode kernel (default: LeanGenerator's)")
    parser.add_argument("--arms", nargs="+", default=["lean-catekv", "lean-full", "transformers-generate"],
                        help="arms of the real suite")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_model(args.layers)
    bandwidth = copy_bandwidth()
    results: list = []
    emit(results, suite="setup", device=torch.cuda.get_device_name(), torch=torch.__version__,
         copy_bandwidth_gbs=round(bandwidth / 1e9, 1), weight_gib=round(weight_bytes(model) / GiB, 2),
         date=time.strftime("%Y-%m-%d"))
    for suite in args.suite:
        {"real": suite_real, "synthetic": suite_synthetic, "batch": suite_batch}[suite](model, args, results, bandwidth)
    if args.out:
        write_records(args.out, results)


if __name__ == "__main__":
    main()
