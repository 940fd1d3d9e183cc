"""Write docs/benchmarks.md and docs/benchmarks.png from the JSON results of the GPU benchmarks.

    python benchmarks/report.py            # reads docs/results/*.json

The results of the current code (CURRENT below) come from, on one H200, 2026-11-30:
    python benchmarks/decode_stages.py --out docs/results/decode_stages.json
    python benchmarks/decode.py --suite real --contexts 131072 --out docs/results/decode_real_128k.json
    python benchmarks/decode_stages.py --out docs/results/decode_stages_repeat.json   (the same, later, for the spread)
and of BASE (CURRENT less the compiled greedy pick of the decode step), the same day:
    python benchmarks/kernel_decode.py --out docs/results/kernel_decode.json
    python benchmarks/decode.py --suite real --contexts 32768 131072 --out docs/results/decode_real_32k_128k.json
        (its 32K rows; its 128K rows were re-run on CURRENT, above)
    python benchmarks/decode.py --suite real --contexts 524288 --arms lean-catekv --out docs/results/decode_real_512k_layered.json
    python benchmarks/decode.py --suite batch --out docs/results/decode_batch.json
    python benchmarks/chunk_attention.py --context 131072 --chunk 8192      (docs/results/chunk_attention.log)
and, on one H200, 2026-12-01 (one sort per head for every (k, alpha) setting):
    python benchmarks/profile_speed.py --contexts 32768 131072 --out docs/results/profile_speed.json
and, with that code less RoPE in the decode kernel (a working tree between d393b41 and CURRENT):
    python benchmarks/decode_stages.py --contexts 131072 524288 --arms catekv --concurrent-groups off on
    python benchmarks/decode_stages.py --contexts 131072 --arms catekv --programs-per-sm 2 3 4
        (joined in docs/results/decode_stages_concurrent.json)
Earlier code, on one H200, 2026-11-28 to 30 (each file's "setup" record has the date):
    python benchmarks/kernel_decode.py --sweep --out docs/results/kernel_sweep_128k.json
    python benchmarks/kernel_decode.py --sweep --sweep-context 32768 --batches 1 --out docs/results/kernel_sweep_32k.json
    python benchmarks/decode.py --suite real --contexts 524288 --arms lean-catekv --out docs/results/decode_real_512k.json
        (transformers' forward as the prefill)
    python benchmarks/decode.py --suite synthetic --contexts 131072 524288 --block-n 32 --out docs/results/decode_synthetic_synth_bn32.json
    python benchmarks/decode.py --suite synthetic --contexts 131072 524288 --block-n 64 --out docs/results/decode_synthetic_synth_bn64.json
    python benchmarks/prefill_chunks.py      (code of c3ba616; output: docs/results/prefill_chunks.log)
    python benchmarks/chunk_attention.py --context 65536 (and 131072)    (526e8c5; docs/results/chunk_attention.log)
    python benchmarks/linear_decode.py --sweep --out docs/results/linear_sweep.json   (the script of d393b41,
        which timed with a fixed 20 replays, 10 in the sweep; it now uses kernel_decode.time_graph)
    python benchmarks/decode_stages.py --contexts 131072 524288 --arms catekv --programs-per-sm 1.5 2 3 4
    python benchmarks/decode_stages.py --contexts 131072 524288 --arms catekv --block-n 32 64 --programs-per-sm 2 4
        (d393b41; the last two joined in docs/results/decode_stages_split_sweep.json)
and, where docs/results/plain_decode.json exists (section h, 6315041):
    python benchmarks/plain_decode.py --context 131072 --out docs/results/plain_decode.json
and the engine and server (sections i and j: their commands are in the sections), 2026-12-01;
and, on two H200s, where docs/results/tp1.json and tp2.json exist (section g, earlier code):
    torchrun --standalone --nproc-per-node 1 benchmarks/tp_decode.py --out docs/results/tp1.json
    torchrun --standalone --nproc-per-node 2 benchmarks/tp_decode.py --out docs/results/tp2.json --reference docs/results/tp1.json
"""

from __future__ import annotations

import json
from pathlib import Path

from catekv_runtime.files import markdown_table, write_atomically

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"


def load(name: str) -> list[dict]:
    return json.loads((RESULTS / name).read_text())


def rows(records: list[dict], **match) -> list[dict]:
    return [r for r in records if all(r.get(k) == v for k, v in match.items())]


def table(header: list[str], body: list[list]) -> str:
    return "\n".join(markdown_table(header, body))


def kib(n: int) -> str:
    return f"{n // 1024}K"


# The commit whose code the current-code runs measured: fused Triton projections, per-group split counts, the two head
# groups of a layer on two streams, RoPE in the decode kernel, the layer-by-layer prefill with cuDNN chunk attention.
CURRENT = "464a20c"
# CURRENT less the compiled greedy pick (6 us per step): the kernel, batch, 32K, 512K and chunk-attention runs.
BASE = "ef0e77f"


def real_runs() -> list[dict]:
    """Section b's real runs: 128K with the current code; 32K and 512K with BASE; 512K with transformers' forward
    as prefill (earlier code)."""
    runs = [dict(r, code=CURRENT) for r in rows(load("decode_real_128k.json"), suite="real")]
    runs += [dict(r, code=BASE) for r in rows(load("decode_real_32k_128k.json"), suite="real", context=32768)]
    runs += [dict(r, code=BASE) for r in rows(load("decode_real_512k_layered.json"), suite="real")]
    runs += [dict(r, code="earlier") for r in rows(load("decode_real_512k.json"), suite="real")]
    return sorted(runs, key=lambda r: (r["context"], r["code"] != "earlier"))


def main() -> None:
    setup = rows(load("decode_real_32k_128k.json"), suite="setup")[0]
    real = real_runs()
    stages = load("decode_stages.json")
    copy = setup["copy_bandwidth_gbs"]
    kernel = load("kernel_decode.json")
    kernel_copy = rows(kernel, impl="copy")[0]["gbps"]  # the kernel run's own copy bandwidth
    synth = load("decode_synthetic_synth_bn32.json") + load("decode_synthetic_synth_bn64.json")
    batch = load("decode_batch.json")
    out = [
        "# Benchmarks",
        "",
        f"One NVIDIA H200 (torch {setup['torch']}, transformers 5.17, triton 3.6), {setup['date']} (earlier code: "
        "2026-11-28 to 30). Random-weight",
        "Llama-3-8B shapes (32 layers, 32 query / 8 KV heads, head_dim 128, bf16, "
        f"{setup['weight_gib']} GiB of weights), CateKV r = 0.4, eta = 1, budget 2048 (init 64, recent 256), chunk 8.",
        f"Ceiling: device-to-device copy {copy:.0f} GB/s (read + write, measured in the same runs). The decode",
        "floor is (weight bytes read per step + KV bytes) / copy bandwidth. Raw JSON: `docs/results/`;",
        "commands: the docstring of `benchmarks/report.py`, which wrote this page.",
        "",
        f"Sections a to d and f measure the current code, `{CURRENT}` (section f, the 128K real runs) or `{BASE}`, which",
        "differs from it only by a compiled greedy pick in the decode step, about 6 us per step (sections a, c, d,",
        "the other real runs): the decode step (each",
        "batch-1 projection one Triton kernel with its RMSNorm, SiLU-gating and residual fused in; RoPE and the new",
        "K/V's append done by the attention kernel; each head group's own split count, the two groups of a CateKV",
        "layer on two streams) and the layer-by-layer prefill (later chunks' attention as two cuDNN calls merged",
        "by log-sum-exp). Rows marked `earlier`, section e and the sweeps say which older code they measured;",
        "section g ran on code before 6315041, section h on 6315041. GPU tests: the whole suite, `python3 -m pytest",
        f"-q`, passed on {BASE}: 727 passed, 90 skipped (84 need the real SmolLM2 model, whose packages the GPU",
        "machine lacks; CI runs them on CPU; 6 run Triton's interpreter on CPU only), `docs/results/gpu_tests.log`;",
        f"the lean path's GPU tests, `python3 -m pytest -q tests/test_lean.py -k gpu`, on {CURRENT} (10 passed).",
        "",
        "## a. Decode-attention kernel: KV bytes read per second",
        "",
        "`benchmarks/kernel_decode.py`: one query token per sequence, exactly-sized caches, CUDA-graph replay",
        "over enough layers' caches to defeat the L2. SDPA is PyTorch's flash decode on exact-length tensors",
        "(it cannot run inside a graph while the cache grows; ours reads the length from device memory).",
        "Decode only reads, so it can exceed a copy's read + write rate.",
        "",
    ]
    body = []
    for r in rows(kernel, impl="triton"):
        sdpa = rows(kernel, impl="sdpa", context=r["context"], batch=r["batch"])[0]
        body.append([kib(r["context"]), r["batch"], f"{r['gbps']:.0f}", f"{100 * r['gbps'] / kernel_copy:.0f}%",
                     f"{sdpa['gbps']:.0f}", f"{100 * sdpa['gbps'] / kernel_copy:.0f}%", f"{r['rel_err_vs_fp32']:.4f}"])
    out += [table(["context", "batch", "Triton GB/s", "of copy", "SDPA GB/s", "of copy", "rel. err vs fp32"],
                  body), ""]
    out += [
        "## b. Decode step and peak memory, batch 1",
        "",
        "Real prompts (random tokens), prefill included in the peak. `lean` = `catekv_runtime.lean.LeanGenerator`",
        "(static caches, Triton decode attention, each batch-1 projection one Triton kernel, whole step in one CUDA",
        "graph);",
        "`generate` = transformers `generate` with SDPA and its DynamicCache (full attention).",
        "",
    ]
    body = []
    for r in real:
        body.append([kib(r["context"]), r["arm"], r["code"], f"{r['decode_ms_per_step']:.2f}", f"{r['floor_ms']:.2f}",
                     f"{r['decode_ms_per_step'] / r['floor_ms']:.2f}", f"{r['prefill_s']:.1f}", f"{r['peak_gib']:.1f}",
                     r.get("kv_gib", "")])
    out += [table(["context", "arm", "code", "ms/step", "floor ms", "x floor", "prefill s", "peak GiB", "KV GiB"], body),
            ""]
    body = [[kib(r["context"]), r["arm"], f"{r['step_ms']:.2f}", f"{r['floor_ms']:.2f}", f"{r['ratio_to_floor']:.2f}"]
            for r in rows(stages, suite="stages", stage="summary")]
    out += [f"The current step ({CURRENT}) on caches filled with random K/V of the sizes a prefill leaves (the step",
            "does not depend on the values), from section f's runs; the whole step in one CUDA graph:", "",
            table(["context", "arm", "ms/step", "floor ms", "x floor"], body), ""]
    out += [
        "Earlier code, same kind of run, both tile sizes of the decode kernel (the CateKV default of 64 comes",
        "from here):",
        "",
    ]
    body = [[kib(r["context"]), r["arm"], r["block_n"], f"{r['decode_ms_per_step']:.2f}", f"{r['floor_ms']:.2f}",
             f"{r['ratio_to_floor']:.2f}", r["kv_gib"]] for r in rows(synth, suite="synthetic")]
    out += [table(["context", "arm", "kernel tile", "ms/step", "floor ms", "x floor", "KV GiB"], body), ""]
    out += [
        "## c. Batch throughput: 40K context, budget 256 (init 8, recent 32), 80 GiB cap",
        "",
        "Largest batch whose static caches and decode step fit under "
        "`torch.cuda.set_per_process_memory_fraction(80 GiB)`",
        "(the next size up fails), random K/V of prefill sizes; prefill not included (one sequence at a time).",
        "",
    ]
    body = [[r["arm"], r["batch"], f"{r['decode_ms_per_step']:.2f}", f"{r['tokens_per_s']:.0f}", r["kv_gib"],
             r["peak_gib"]] for r in rows(batch, suite="batch") if "tokens_per_s" in r]
    out += [table(["arm", "largest batch", "ms/step", "tokens/s", "KV GiB", "peak GiB"], body), ""]
    out += prefill_section(real)
    body = [[kib(r["context"]), r["arm"], r["code"], f"{r['prefill_s']:.1f}", f"{r['peak_gib']:.1f}"] for r in real]
    out += [table(["context", "arm", "code", "prefill s", "peak GiB"], body), ""]
    speed = load("profile_speed.json")
    out += ["## e. Profiler", "",
            "`benchmarks/profile_speed.py`: one reference sample through `catekv_profiler.profiler.sample_statistics`",
            "(the paper's defaults, and the 12 settings of `--calibrate`'s default grid) against a plain prefill of",
            "the same tokens, side by side after a warm-up. Statistics are computed one KV head at a time, so the peak",
            "stays that of the prefill; one softmax and one sort per head serve every setting. Before the sort",
            "(2026-11-30, four `kthvalue` calls per head) one sample took 57.0 s at 128K against 11.7 s of prefill.", ""]
    body = []
    for context in sorted({r["context"] for r in speed}):
        pre, prof, grid = (rows(speed, context=context, run=name)[0] for name in ("prefill", "profile", "profile_grid"))
        body.append([kib(context), pre["seconds"], f"{prof['seconds']} ({prof['over_prefill']}x)",
                     f"{grid['seconds']} ({grid['over_prefill']}x)", pre["peak_gib"], grid["peak_gib"]])
    out += [table(["context", "prefill s", "profiling s / sample (x prefill)", "12-setting grid s / sample",
                   "prefill peak GiB", "profiling peak GiB"], body), ""]
    plot(real, stages, ROOT / "docs" / "benchmarks.png")
    out += ["![decode ms/step](benchmarks.png)", ""]
    out += stages_section(stages)
    out += concurrent_section(load("decode_stages_concurrent.json"))
    out += split_sweep_section(load("decode_stages_split_sweep.json"))
    out += linear_section(load("linear_sweep.json"))
    if (RESULTS / "tp1.json").exists() and (RESULTS / "tp2.json").exists():
        out += tp_section(load("tp1.json"), load("tp2.json"))
    if (RESULTS / "plain_decode.json").exists():
        out += plain_section(load("plain_decode.json"))
    out += engine_section(load("engine_decode.json"), load("engine_decode_batch.json"), load("engine_throughput.json"))
    out += serve_section(load("serve_load.json"), load("serve_load_pre506fef5.json"), ROOT / "docs" / "serve_load.png")
    text = "\n".join(out)
    target = ROOT / "docs" / "benchmarks.md"
    write_atomically(target, text + targets(kernel_copy, kernel, real, stages, batch))
    print(f"wrote {target}")


def chunk_attention_runs() -> list[dict]:
    """The JSON records of docs/results/chunk_attention.log (comment lines skipped)."""
    lines = (RESULTS / "chunk_attention.log").read_text().splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def prefill_section(real: list[dict]) -> list[str]:
    """Section d's text: the layer-by-layer prefill and its chunk attention, figures from the records."""
    chunk = [r for r in chunk_attention_runs() if "runtime_s" in r][-1]
    before = {r["context"]: r for name in ("decode_real_128k_d393b41.json", "decode_real_512k_d393b41.json")
              for r in rows(load(f"investigation/{name}"), suite="real", arm="lean-catekv")}
    now = {r["context"]: r for r in rows(real, arm="lean-catekv") if r["code"] != "earlier"}
    gen = rows(real, arm="transformers-generate", context=131072, code=CURRENT)[0]
    full = rows(real, arm="lean-full", context=131072, code=CURRENT)[0]
    base32 = {r["arm"]: r["prefill_s"] for r in rows(real, context=32768, code=BASE)}
    base128 = rows(load("decode_real_32k_128k.json"), suite="real", arm="lean-catekv", context=131072)[0]["prefill_s"]
    return [
        "## d. Prefill time and peak memory", "",
        "From the real runs of (b). The lean arms prefill layer by layer in chunks of 8192 tokens",
        "(`LeanGenerator(prefill_chunk=)`): per layer the K/V of every chunk, then each chunk's attention, output",
        "projection and MLP in place, then that layer's selection; only one layer's full K/V and one chunk's",
        "activations exist at a time. A chunk after the first attends to every earlier key and, causally, to its",
        "own: SDPA runs that bottom-right-aligned mask on flash-attention only, while it runs one causal call over a",
        "whole prompt on cuDNN's attention. So each such chunk is two cuDNN calls, the earlier keys without a mask",
        "and its own keys with the square causal mask, merged by their log-sum-exp",
        "(`catekv_runtime.attention.chunk_attention`). `benchmarks/chunk_attention.py --context 131072`",
        f"(`docs/results/chunk_attention.log`), one layer's {chunk['chunks_timed']} chunks after the first: "
        f"{chunk['lower_right_s']} s with the",
        f"bottom-right mask, {chunk['runtime_s']} s as two cuDNN calls; one causal call over the whole prompt takes "
        f"{chunk['whole_s']} s",
        f"({chunk['whole_flash_s']} s restricted to flash, {chunk['whole_cudnn_s']} s to cuDNN). The two-call output "
        f"differs from the bottom-right call's by at most {chunk['runtime_max_abs_diff']:.4f}",
        f"(bf16). At 128K the full-attention arm prefilled in {full['prefill_s']:.1f} s and the CateKV arm in "
        f"{now[131072]['prefill_s']:.1f} s ({before[131072]['prefill_s']:.1f} s",
        f"with the flash chunk attention, d393b41) against {gen['prefill_s']:.1f} s for transformers' `generate`, "
        f"whose peak is {gen['peak_gib']:.1f} GiB against {now[131072]['peak_gib']:.1f}; at 512K "
        f"{now[524288]['prefill_s']:.0f} s ({before[524288]['prefill_s']:.0f} s at d393b41) with a peak of "
        f"{now[524288]['peak_gib']:.2f} GiB ({before[524288]['peak_gib']:.2f}).",
        "The CateKV arm runs first in its process, so its prefill includes start-up work (cuDNN plans for each new",
        f"prefix length, first kernel launches; not separated): at 32K it took {base32['lean-catekv']:.1f} s where "
        f"the full-attention arm took {base32['lean-full']:.1f} s",
        f"(`{BASE}`), and the 128K CateKV prefill took {base128:.1f} s in `{BASE}`'s run, which began at 32K.",
        "The `earlier` 512K row prefilled through transformers' own forward (SDPA, `logits_to_keep=1`), CateKV",
        "selecting each layer's tokens as soon as that layer's attention was done.", "",
        "`benchmarks/prefill_chunks.py` at 64K on older code (c3ba616, `docs/results/prefill_chunks.log`) showed that",
        "the layer order itself costs little (one chunk of the whole prompt: 4.05 s against 3.84 s through the model's",
        "forward); the chunk attention was the cost.", "",
    ]


def step_and_attention(records: list[dict], *keys: str) -> list[list]:
    """Rows ``[*keys values, context, step ms, x floor, attention ms, of copy]`` of decode_stages records, one per
    setting of ``keys`` and context, sorted; where two runs measured a setting, the later run's figures."""
    def setting(r: dict) -> tuple:
        return (*(r[k] for k in keys), r["context"])

    summaries = {setting(r): r for r in rows(records, suite="stages", stage="summary")}
    attention = {setting(r): r for r in rows(records, suite="stages", stage="attention")}
    return [[*key[:-1], kib(key[-1]), f"{r['step_ms']:.3f}", f"{r['ratio_to_floor']:.3f}",
             f"{attention[key]['ms']:.3f}", f"{100 * attention[key]['of_copy']:.0f}%"]
            for key, r in sorted(summaries.items())]


def concurrent_section(records: list[dict]) -> list[str]:
    """Part of section f: CateKV's two head groups of a layer on one stream or two."""
    body = [[per_sm, "two" if concurrent else "one", *rest]
            for per_sm, concurrent, *rest in step_and_attention(records, "programs_per_sm", "concurrent_groups")]
    return ["### The head groups of a layer on two streams (CateKV)", "",
            "`DecodeConfig(concurrent_groups=True)` launches the consistent heads' split kernel on a side stream, so",
            "that it runs beside the adaptive heads' kernel (a CUDA graph records the two as parallel branches) and",
            "its few programs fill SMs the long kernel's tail leaves idle. Two runs of `benchmarks/decode_stages.py`",
            "(commands in `benchmarks/report.py`; code of the current commit less RoPE in the decode kernel), joined in",
            "`docs/results/decode_stages_concurrent.json`; with two streams, 2 programs per SM stays the best split count.",
            "",
            table(["programs / SM", "streams", "context", "step ms", "x floor", "attention ms", "of copy"], body), ""]


def tp_section(single: list[dict], split: list[dict]) -> list[str]:
    """Section g, from benchmarks/tp_decode.py: one GPU against transformers' tensor parallelism over two."""
    setup = rows(split, kind="setup")[0]
    out = [
        "## g. Two GPUs: transformers' tensor parallelism with CateKV",
        "",
        f"`benchmarks/tp_decode.py` on 2 x {setup['device']} (torch {setup['torch']}, transformers "
        f"{setup['transformers']}), {setup['date']}:",
        "`torchrun --nproc-per-node 1 ... --out tp1.json` (one GPU), then `torchrun --nproc-per-node 2 ... --out tp2.json "
        "--reference tp1.json`.",
        "A random Llama-3-8B-shaped model saved once and loaded by `from_pretrained` (with `tp_plan=\"auto\"` under",
        "TP=2), CateKV applied on every rank (random profile, r = 0.4, eta = 1, budget 2048). Both arms run the plain",
        "transformers `generate` path (the lean CUDA-graph path is single-GPU), so compare them with each other, not",
        "with (b).",
        "",
    ]
    body = []
    for record in rows(split, kind="comparison"):
        where = ("identical" if record["identical"] else
                 f"first differs at token {record['first_divergence']} (top-2 logit gap there "
                 f"{record['top2_gap_here']} under TP=2, {record['top2_gap_there']} on one GPU)")
        body.append([record["dtype"], record["tokens_compared"], where, record["max_top1_logit_diff_before"]])
    out += ["Greedy tokens after a 4096-token prompt, TP=2 against one GPU:", "",
            table(["dtype", "tokens", "TP=2 against 1 GPU", "max top-1 logit difference before"], body), ""]
    body = []
    for arm, records in (("1 GPU", single), ("TP=2", split)):
        r = rows(records, kind="decode")[0]
        gib = lambda key: " / ".join(f"{v:.1f}" for v in r[key])  # noqa: E731
        body.append([kib(r["context"]), arm, f"{r['decode_ms_per_step']:.1f}", f"{r['prefill_s']:.1f}",
                     gib("peak_gib_per_rank"), gib("weights_gib_per_rank"), gib("kv_gib_per_rank"),
                     gib("full_kv_gib_per_rank")])
    out += ["Decode at 128K, batch 1 (per GPU where there are two):", "",
            table(["context", "arm", "decode ms/step", "prefill s", "peak GiB", "weights GiB", "CateKV KV GiB",
                   "full KV GiB"], body), "",
            "These decode figures predate the fix of section h (SDPA's cuDNN backend on the CateKV decode call) and",
            "are about 9x slower than transformers' own `generate` with full attention at 128K in (b); they were not",
            "re-measured.", ""]
    split_log = RESULTS / "profile_split.log"
    if split_log.exists():
        out += ["Profiling split over both GPUs (`docs/results/profile_split.log`): "
                "`catekv-profile /tmp/catekv-llama3-8b-random -o p2.safetensors --device-map balanced -L 16384 -n 2`",
                "against the same with `--device cuda` on one GPU:", "", "```", split_log.read_text().strip(), "```", ""]
    return out


def plain_section(records: list[dict]) -> list[str]:
    """Section h, from benchmarks/plain_decode.py: the plain transformers path with and without CateKV."""
    first = records[0]
    body = [[kib(r["context"]), r["arm"], f"{r['ms_per_step']:.1f}"] for r in records]
    return [
        "## h. The plain transformers path (`apply` + `generate`)",
        "",
        f"`{first.get('command', 'benchmarks/plain_decode.py')}` on {first['device']} (torch {first['torch']}, "
        f"transformers {first['transformers']}), {first['date']}: random Llama-3-8B shapes, bf16, batch 1, transformers'",
        "`generate` with its own SDPA full attention, then the same after `catekv_runtime.apply` (random profile, r = 0.4,",
        "budget 2048). No CUDA graph: this is what a user of the transformers integration gets.",
        "",
        table(["context", "arm", "decode ms/step"], body),
        "",
        "Before this run the CateKV arm took 660 ms/step (section g): for the decode call (query heads folded into",
        "the query axis) SDPA picked its cuDNN backend, which builds a new execution plan for every new cache length,",
        "about 40 ms per call at 128K, and even with a cached plan took 1.5 ms against 0.11 ms for the flash backend",
        "(3 KV heads of 128K tokens; `python benchmarks/sdpa_decode_backends.py`, output in",
        "`docs/results/sdpa_decode_backends.log`). The runtime now leaves cuDNN out of that call.",
        "",
    ]


def split_sweep_section(records: list[dict]) -> list[str]:
    """Part of section f: the CateKV step against the decode kernel's tile and split count."""
    body = step_and_attention(records, "block_n", "programs_per_sm")
    return ["### Split counts of the decode kernel (CateKV)", "",
            "Each head group of a layer runs `default_num_splits` of its own cache, aiming at `programs_per_sm`",
            "programs per SM (`DecodeConfig`). Two runs of `benchmarks/decode_stages.py --arms catekv` on d393b41 (one",
            "stream, RoPE outside the kernel, the older q/k/v tile; the commands in `benchmarks/report.py`), joined in",
            "`docs/results/decode_stages_split_sweep.json`; where both ran a",
            "setting the second run's figure is shown. The full cache's 4 programs per SM over-split CateKV's",
            "narrower adaptive groups (more partials to merge, shorter splits): 2 is LeanGenerator's choice.",
            "Two other launch layouts were measured in earlier runs of the same day and not kept: both head groups",
            "of a layer in one launch (2.28-2.33 against 2.21 ms of attention at 128K, 7.64 against 6.88 at 512K)",
            "and, on top of that, the combine fused into the split kernel (2.71 against 2.33 ms at 128K). Their",
            "records are in `docs/results/investigation/attention_launch_variants.json`; the one-launch variant's",
            "code was not kept, so those runs cannot be repeated from this tree.", "",
            table(["kernel tile", "programs / SM", "context", "step ms", "x floor", "attention ms", "of copy"], body),
            ""]


def linear_section(records: list[dict]) -> list[str]:
    """Part of section f: benchmarks/linear_decode.py, the fused Triton GEMV against cuBLAS per projection."""
    setup = rows(records, suite="setup")[0]
    body = []
    for shape in dict.fromkeys(r["shape"] for r in records if "shape" in r and "arm" in r):
        cublas, ours = rows(records, shape=shape, arm="cublas")[0], rows(records, shape=shape, arm="triton")[0]
        best = rows(records, shape=shape, arm="triton_sweep_best")
        body.append([shape, f"{ours['rows']} x {ours['k']}", f"{cublas['us']:.1f}", f"{100 * cublas['of_copy']:.0f}%",
                     f"{ours['us']:.1f}", f"{100 * ours['of_copy']:.0f}%",
                     f"{best[0]['us']:.1f} ({best[0]['block_n']} x {best[0]['block_k']}, {best[0]['num_warps']} warps)"
                     if best else "", f"{100 * best[0]['of_copy']:.0f}%" if best else ""])
    return ["### The projections: one Triton kernel each against cuBLAS", "",
            f"`benchmarks/linear_decode.py --sweep` on {setup['device']}, {setup['date']} (copy bandwidth "
            f"{setup['copy_bandwidth_gbs']:.0f} GB/s): one token's projection, bf16,",
            "each over enough distinct weights to defeat the L2, in a CUDA graph. `cuBLAS` is `F.linear` alone; the",
            "Triton kernel (`kernels.triton_linear.fused_linear`) also does the work fused into it in the decode step",
            "(RMSNorm before q/k/v, gate/up and the head; SiLU x up after gate/up; the residual add after o_proj and",
            "down). The `Triton, first tile` column is the tile the kernel had in that run; its sweep chose the",
            "current defaults (`default_linear_config`): the best tile of each projection. cuBLAS wins on gate/up",
            "(the widest GEMV); the Triton kernel wins on the narrow ones and saves the launches of the small kernels",
            "around each, so the step uses it for all five (at d393b41: post-attention 3.61 to 3.13 ms at 128K,",
            "pre-attention 0.66 to 0.64 ms, the head 0.33 to 0.30 ms against c3ba616's run).", "",
            table(["projection", "weight", "cuBLAS us", "of copy", "Triton, first tile us", "of copy",
                   "best tile us", "of copy"], body), ""]


def size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.{2 if scale > 1024 else 0}f} {unit}"
    return f"{n} B"


STAGE_NAMES = {"step": "whole step", "pre_attention": "pre-attention (norm, q/k/v, RoPE)",
               "attention": "K/V append + attention (Triton split-K + combine)",
               "post_attention": "post-attention (o_proj, norm, MLP)",
               "embed_and_head": "embedding, RoPE cos/sin, norm, lm_head, argmax, counters"}


def stages_section(records: list[dict]) -> list[str]:
    """Section f, from benchmarks/decode_stages.py's records; [] for a --smoke file (its figures mean nothing)."""
    setup = rows(records, suite="setup")[0]
    if setup.get("smoke"):
        print("decode_stages.json comes from a --smoke run: section f left out")
        return []
    stages = rows(records, suite="stages")
    traced = any("kernels" in r for r in stages)
    out = [
        "## f. Where a decode step's time goes",
        "",
        f"`benchmarks/decode_stages.py` on {setup['device']} (torch {setup['torch']}), {setup['date']}; copy bandwidth",
        f"{setup['copy_bandwidth_gbs']:.0f} GB/s in that run. The synthetic decode states of (b), batch 1: each part of the step",
        "that `_DecodeState.step` calls runs, for all layers, in its own CUDA graph over the step's static buffers,",
        f"replayed {setup['steps']} times per round (median of {setup['rounds']} rounds). Bytes: what a stage must move "
        "(the weights it reads,",
        "the embedding as one row; the retained KV the attention reads and the K/V it appends). Floor: those",
        "bytes at the copy bandwidth; the whole step's is the decode floor of (b), so its `over floor` is the gap to",
        "close. `between stages` = whole step minus the sum of the stages: what running them back to back in one",
        "graph adds.",
        "",
    ]
    header = ["context", "arm", "stage", "ms", "of step", "bytes", "GB/s", "of copy", "floor ms", "over floor ms"]
    if traced:
        header += ["kernels", "kernel busy ms"]
    body = []
    for context, arm in dict.fromkeys((r["context"], r["arm"]) for r in stages):
        mine = {r["stage"]: r for r in rows(stages, context=context, arm=arm)}
        step_ms = mine["step"]["ms"]
        for name in STAGE_NAMES:
            r = mine[name]
            row = [kib(context), arm, STAGE_NAMES[name], f"{r['ms']:.3f}", f"{100 * r['ms'] / step_ms:.0f}%",
                   size(r["bytes"]), f"{r['gbps']:.{0 if r['gbps'] >= 10 else 1}f}", f"{100 * r['of_copy']:.0f}%",
                   f"{r['floor_ms']:.3f}",
                   f"{r['ms'] - r['floor_ms']:+.3f}"]
            if traced:
                row += [r.get("kernels", ""), r.get("kernel_busy_ms", "")]
            body.append(row)
        summary = mine["summary"]
        for label, key in (("sum of stages", "sum_of_stages_ms"), ("between stages", "inter_stage_ms")):
            ms = summary[key]
            body.append([kib(context), arm, label, f"{ms:.3f}", f"{100 * ms / step_ms:.0f}%"]
                        + [""] * (len(header) - 5))
    return out + [table(header, body), ""]


def engine_section(steps: list[dict], batched: list[dict], load_runs: list[dict]) -> list[str]:
    """Section i: the engine's decode step against its floor (batch 1 and batched) and its throughput under load."""
    def step_rows(records: list[dict]) -> list[list]:
        return [[kib(r["context"]), r["batch"], r["arm"].removeprefix("engine-"), r["decode_ms_per_step"], r["floor_ms"],
                 r["ratio_to_floor"], r["kv_gib"]] for r in rows(records, suite="engine-step")]

    header = ["context", "batch", "arm", "ms/step", "floor ms", "x floor", "KV read GiB"]
    body = []
    for r in load_runs:
        lengths = "/".join(kib(n) for n in r["prompt_lengths"])
        body.append([r["arm"], lengths, r["concurrency"], r.get("slots", "-"), r["output_tokens_per_s"],
                     r["ttft_p50_s"], r["ttft_p99_s"], r["itl_p50_ms"], r["itl_p99_ms"]])
    return [
        "## i. The engine (`catekv_runtime.engine.Engine`)",
        "",
        "The production engine: continuous batching over fixed slots, sampling inside the CUDA graph, the",
        "fused batch-1 projections and the split-K kernel. Its decode step, captured and replayed, with every slot",
        "filled as a prefill of `context` tokens would leave it (random Llama-3-8B shapes, random profile r = 0.4,",
        "budget 2048; `arm` full is `profile=None` on the same engine). Code of 5a09d98 (the step is unchanged since).",
        "",
        "    python benchmarks/engine_decode.py --contexts 131072 524288 --out docs/results/engine_decode.json",
        "    python benchmarks/engine_decode.py --contexts 24576 --batches 1 8 16 32 --steps 100 \\",
        "        --out docs/results/engine_decode_batch.json",
        "",
        table(header, step_rows(steps) + step_rows(batched)),
        "",
        "Batched steps use cuBLAS for the projections (the fused kernels are batch-1) and are further from the floor",
        "(1.2-1.35x); at batch 32 and 24K the CateKV step is 2.0x faster than full attention's, whose 96 GiB of KV",
        "would not fit an 80 GiB cap anyway.",
        "",
        "Throughput under load, in process (`benchmarks/engine_throughput.py`): a closed loop of `concurrency`",
        "clients at an 80 GiB cap, prompt lengths cycling through the list, 256 greedy output tokens each,",
        "2 x concurrency requests (8 for transformers). Code of 5a09d98, whose prefill advanced one layer's chunk",
        "per engine step (fixed in 506fef5: a step now takes `prefill_chunk` tokens through every layer); these",
        "runs are to be repeated on the current code. The 16K-64K full-attention run at concurrency 16 did not",
        "finish within the call's time limit.",
        "",
        "    python benchmarks/engine_throughput.py --arms catekv full --concurrency 16 --prompt-lengths 16384 32768",
        "    python benchmarks/engine_throughput.py --arms catekv full --concurrency 8 16 \\",
        "        --prompt-lengths 16384 32768 65536",
        "    python benchmarks/engine_throughput.py --arms transformers --concurrency 8 --requests 8 \\",
        "        --prompt-lengths 16384 32768 65536",
        "    (records joined in docs/results/engine_throughput.json)",
        "",
        table(["arm", "prompts", "concurrency", "slots", "output tok/s", "TTFT p50 s", "TTFT p99 s", "ITL p50 ms",
               "ITL p99 ms"], body),
        "",
        "At 256 output tokens per 16K-64K prompt the loop is bound by prefill (about 1-5 s per prompt on these",
        "shapes, the same for both arms), so CateKV's cheaper decode step and its extra slots do not raise output",
        "tokens/s here (1.0x full's; the issue's target of 2.5x is not met by this workload). The engine is 3.6x",
        "transformers' `generate` (batch 1) at concurrency 8.",
        "",
    ]


def serve_section(records: list[dict], before: list[dict], path: Path) -> list[str]:
    """Section j: catekv-serve under a closed-loop HTTP load (benchmarks/serve_load.py), with a plot."""
    def body(runs: list[dict]) -> list[list]:
        return [[r["label"], r["concurrency"], int(r["slots"]), int(r["peak_running"]), r["requests"],
                 round(r["output_tokens_per_s"]), round(r["ttft_p50_ms"]), round(r["ttft_p99_ms"]),
                 round(r["itl_p50_ms"], 1), round(r["itl_p99_ms"]), f"{r['peak_kv_bytes'] / 2**30:.2f}",
                 f"{r['peak_kv_full_attention_bytes'] / 2**30:.2f}"] for r in runs]

    header = ["server", "clients", "slots", "peak running", "requests", "output tok/s", "TTFT p50 ms", "TTFT p99 ms",
              "ITL p50 ms", "ITL p99 ms", "peak KV GiB", "full attention's GiB"]
    plot_serve(records, path)
    return [
        "## j. `catekv-serve` under load",
        "",
        "The real server over HTTP on the H200, the real SmolLM2-135M-Instruct (its GGUF carried to the GPU), the",
        "shipped 8K profile (36 of 90 heads adaptive, budget 512) against `--profile none`, the same memory: each",
        "server gets `--gpu-memory-utilization 0.03` (about 3.5 GiB of KV buffers), so full attention has 20 slots",
        "of 8192 tokens and CateKV 41. Clients: `benchmarks/serve_load.py`, closed loop, prompts of 6144 tokens,",
        "256 streamed greedy tokens, 20-25 s per level. Per server:",
        "",
        "    catekv-serve smollm2-135m --profile smollm2-135m-instruct-8k --max-model-len 8192 --max-decode-len 512 \\",
        "        --max-batch-size 64 --gpu-memory-utilization 0.03 --port 8011 --no-access-log   # and --profile none",
        "    python benchmarks/serve_load.py --port 8011 --label catekv --concurrency 16,48 --prompt-tokens 6144 \\",
        "        --output-tokens 256 --duration 20 --max-requests 200 --out docs/results/serve_load.json",
        "",
        "Code of 506fef5:",
        "",
        table(header, body(records)),
        "",
        f"![catekv-serve under load]({path.name})",
        "",
        "CateKV holds 2.05x the concurrent requests in the same memory (41 running against 20 at 48 clients), each",
        "with 0.47x the KV full attention would hold, and at 48 clients its median time to first token is 3.8x",
        "shorter (waiting for a slot is most of full attention's); its p99 TTFT is 2.5x longer. This tiny model is",
        "bound by prefill and the host, not by KV bandwidth: CateKV's output tokens/s is 0.85x full attention's and",
        "its p99 inter-token latency 1.5x (the steps that carry a prefill chunk, where CateKV also selects tokens).",
        "The issue's target (2x the concurrent requests with p99 ITL no worse) is met on its first half only.",
        "",
        "The same load on the code before 506fef5, `docs/results/serve_load_pre506fef5.json`: a step prefilled one",
        "layer's chunk, so a 6K prompt took about 15 steps and the server admitted about 6 requests/s. Since",
        "506fef5 a step takes `--prefill-chunk` (8192) tokens through every layer: 1.6x the output tokens/s at 48",
        "clients and shorter waits, for a p99 inter-token latency 4-5x longer (a lower `--prefill-chunk` trades",
        "back, as vLLM's token budget does):",
        "",
        table(header, body(before)),
        "",
    ]


def plot_serve(records: list[dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.4))
    FigureCanvasAgg(fig)
    panels = (("output_tokens_per_s", "output tokens / s"), ("peak_running", "requests running (peak)"),
              ("ttft_p50_ms", "time to first token p50 (ms)"), ("itl_p99_ms", "inter-token latency p99 (ms)"))
    for i, (key, label) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for server, style in (("catekv", "o-"), ("full", "s-")):
            pts = sorted((r["concurrency"], r[key]) for r in rows(records, label=server))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=server)
        ax.set_xlabel("concurrent clients")
        ax.set_title(label, fontsize=9)
        ax.grid(True, alpha=0.3)
    fig.axes[0].legend()
    fig.suptitle("catekv-serve, SmolLM2-135M, 6144-token prompts, same KV memory (H200)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot(real: list[dict], stages: list[dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for arm, style in (("lean-catekv", "o-"), ("lean-full", "s-"), ("transformers-generate", "^-")):
        # Lean arms: the current step (section f's whole-step runs); generate: the real runs of (b).
        if arm == "transformers-generate":
            pts = sorted((r["context"], r["decode_ms_per_step"]) for r in rows(real, arm=arm))
        else:
            pts = sorted((r["context"], r["step_ms"]) for r in rows(stages, suite="stages", stage="summary", arm=arm))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=arm)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode ms / step (batch 1)")
    ax.set_title("Llama-3-8B shapes, bf16, H200")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def targets(copy: float, kernel: list[dict], real: list[dict], stages: list[dict], batch: list[dict]) -> str:
    """The issue's targets against the figures above, computed, not typed."""
    def one(records, **match):
        return rows(records, **match)[0]

    lines = []
    fracs = [(r["context"], r["batch"], r["gbps"] / copy) for r in rows(kernel, impl="triton") if r["context"] >= 32768]
    worst = min(fracs, key=lambda f: f[2])
    sweep = one(load("kernel_sweep_32k.json"), impl="triton_sweep_best")
    sweep_sdpa = one(load("kernel_sweep_32k.json"), impl="sdpa")
    lines.append(["kernel >= 90% of copy bandwidth at >= 32K",
                  f"worst {100 * worst[2]:.0f}% ({kib(worst[0])}, batch {worst[1]}); "
                  f"{sum(f[2] >= 0.9 for f in fracs)} of {len(fracs)} sizes >= 90%; best launch config at 32K batch 1 "
                  f"{100 * sweep['frac_copy']:.0f}% (SDPA {100 * sweep_sdpa['frac_copy']:.0f}%, "
                  "`kernel_sweep_32k.json`)",
                  all(f[2] >= 0.9 for f in fracs)])
    runs = [{(r["arm"], r["context"]): r for r in rows(records, suite="stages", stage="summary")}
            for records in (stages, load("decode_stages_repeat.json"))]  # two runs of section f's command
    ratio = {c: [step["lean-catekv", c]["step_ms"] / step["lean-catekv", c]["floor_ms"] for step in runs]
             for c in (131072, 524288)}
    real128 = one(real, arm="lean-catekv", context=131072, code=CURRENT)
    real_ratio = real128["decode_ms_per_step"] / real128["floor_ms"]
    worst = max(*ratio[131072], real_ratio)
    lines.append(["CateKV step <= 1.15 x floor at 128K and 512K",
                  f"128K: {' and '.join(f'{x:.4f}x' for x in ratio[131072])} in two runs of section f, "
                  f"{real_ratio:.4f}x in the real run of (b): {100 * abs(worst / 1.15 - 1):.2f}% "
                  f"{'under' if worst <= 1.15 else 'over'} the target at the closest; 512K: "
                  f"{' and '.join(f'{x:.4f}x' for x in ratio[524288])} ({CURRENT})",
                  max(worst, *ratio[524288]) <= 1.15])
    speedup = [step["lean-full", 524288]["step_ms"] / step["lean-catekv", 524288]["step_ms"] for step in runs]
    lines.append([">= 1.8x faster than full attention on the lean path at 512K",
                  " and ".join(f"{x:.2f}x ({step['lean-catekv', 524288]['step_ms']:.2f} vs "
                               f"{step['lean-full', 524288]['step_ms']:.2f} ms)" for x, step in zip(speedup, runs))
                  + f", two runs of section f ({CURRENT})", min(speedup) >= 1.8])
    gen = one(real, arm="transformers-generate", context=131072, code=CURRENT)["decode_ms_per_step"]
    cat = real128["decode_ms_per_step"]
    lines.append([">= 10x faster per step than transformers generate at 128K",
                  f"{gen / cat:.1f}x ({cat:.2f} vs {gen:.2f} ms, one run, {CURRENT})", gen / cat >= 10])
    bc = one(batch, arm="lean-catekv", suite="batch")
    bf = [r for r in rows(batch, arm="lean-full", suite="batch") if "tokens_per_s" in r][0]
    throughput = bc["tokens_per_s"] / bf["tokens_per_s"]
    lines.append(["batch throughput >= 2.3x full attention at 40K under 80 GiB",
                  f"{throughput:.2f}x (batch {bc['batch']} vs {bf['batch']}, {BASE})", throughput >= 2.3])
    weights = one(stages, suite="setup")["weight_gib"]

    def bound(r: dict) -> float:  # weights + retained KV + one layer's full KV (8 KV heads, d 128, bf16) + 6 GiB
        return weights + r["kv_gib"] + r["context"] * 8 * 128 * 2 * 2 / 2**30 + 6

    r512 = one(real, arm="lean-catekv", context=524288, code=BASE)
    lines.append(["peak memory at 512K <= weights + retained KV + one layer's full KV + 6 GiB",
                  f"{r512['peak_gib']:.2f} GiB against {bound(r512):.2f} GiB ({BASE}, layer-by-layer prefill; "
                  f"{one(real, arm='lean-catekv', context=524288, code='earlier')['peak_gib']:.1f} GiB with "
                  "transformers' forward as prefill, earlier code)", r512["peak_gib"] <= bound(r512)])
    body = [[name, measured, "met" if ok else "**missed**"] for name, measured, ok in lines]
    return ("\n## Targets of the issue\n\n" + table(["target", "measured", ""], body) + "\n"
            + where_time_goes(copy, kernel, real, stages))


def where_time_goes(copy: float, kernel: list[dict], real: list[dict], stages: list[dict]) -> str:
    """The text under the targets: where the step's time goes and why the missed targets are missed."""
    mine = {(r["context"], r["stage"]): r for r in rows(stages, suite="stages", arm="lean-catekv")}
    old = {r["context"]: r["step_ms"] for r in rows(load("investigation/decode_stages_d393b41.json"), suite="stages",
                                                    stage="summary", arm="lean-catekv")}

    def over(stage: str, context: int = 131072) -> float:
        r = mine[context, stage]
        return r["ms"] - r["floor_ms"]

    summary = {c: mine[c, "summary"] for c in (131072, 524288)}
    attention, post = mine[131072, "attention"], mine[131072, "post_attention"]
    k32, k128 = (rows(kernel, impl="triton", context=c, batch=1)[0] for c in (32768, 131072))
    sdpa32 = rows(kernel, impl="sdpa", context=32768, batch=1)[0]
    floor_us, floor128_us = (r["kv_bytes"] / (copy * 1e9) * 1e6 for r in (k32, k128))
    generate = {r["context"]: r["decode_ms_per_step"] for r in rows(real, arm="transformers-generate")}
    return f"""
Where the time goes (section f, {CURRENT}). At 128K the CateKV step is {summary[131072]['over_floor_ms']:.2f} ms over its
floor: attention {over('attention'):.2f} ms ({100 * attention['of_copy']:.0f}% of copy bandwidth: per layer a split
launch for each head group, on two streams, and a combine, against about 50 us of data; one launch for both groups
and a fused combine were tried at d393b41 and were slower), pre-attention {over('pre_attention'):.2f} ms (the q/k/v
kernel moves 50 MB per layer, too little to reach full bandwidth), post-attention {over('post_attention'):.2f} ms
({100 * post['of_copy']:.0f}% of copy), the head {over('embed_and_head'):.2f} ms. Against d393b41's run
(`docs/results/investigation/decode_stages_d393b41.json`) the 128K step went from {old[131072]:.2f} to
{summary[131072]['step_ms']:.2f} ms and the 512K step from {old[524288]:.2f} to {summary[524288]['step_ms']:.2f} ms: the
q/k/v tile, the head groups on two streams, RoPE inside the attention kernel and the compiled greedy pick. The 128K ratio sits on the
target (table above): what is left over the floor is spread thin over the 32 layers, per layer
{1e3 * over('attention') / 32:.0f} us in the attention (its launches and the combine), {1e3 * over('pre_attention') / 32:.0f} us in
pre-attention and {1e3 * over('post_attention') / 32:.0f} us in post-attention.

The kernel target is missed at 32K batch 1 only: one layer's 32K cache is {k32['kv_bytes'] / 2**20:.0f} MiB,
{floor_us:.0f} us at copy bandwidth, and the kernel takes {k32['us']:.0f} us. What lies above the floor does not grow
with the length ({k32['us'] - floor_us:.0f} us at 32K, {k128['us'] - floor128_us:.0f} us at 128K): the split and
combine launches, the pipeline's ramp and the last programs' tail, which longer caches and batches amortise.
SDPA's flash decode reaches {100 * sdpa32['gbps'] / copy:.0f}% on the same shape, and no launch setting of the sweep
(`kernel_sweep_32k.json`) passed 76%.

The `generate` arm is host-bound, not memory-bound: the same command gave {generate[32768]:.1f} ms per step at 32K
({BASE}'s run) and {generate[131072]:.1f} ms at 128K.
"""


if __name__ == "__main__":
    main()
