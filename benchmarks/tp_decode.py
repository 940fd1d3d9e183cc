"""CateKV under transformers' tensor parallelism: greedy output and decode cost, TP=2 against one GPU.

A random-weight Llama-3-8B-shaped model (bf16) is saved once to --model-dir (with a byte-level tokenizer, so
that ``catekv-profile`` can load the folder too), then loaded by transformers: under ``torchrun`` with
several processes through ``DistributedConfig(tp_plan="auto")`` (each rank holds its shard of every layer,
and CateKV keeps that rank's KV heads), else on one GPU. CateKV gets a random profile (r = 0.4, eta = 1,
budget 2048, chunk 8), as in benchmarks/decode.py.

    torchrun --nproc-per-node 1 benchmarks/tp_decode.py --out tp1.json
    torchrun --nproc-per-node 2 benchmarks/tp_decode.py --out tp2.json --reference tp1.json
    torchrun --nproc-per-node 2 benchmarks/tp_decode.py --smoke        # tiny model, CPU (gloo) or GPU

The saved folder is a complete model folder: ``python -m catekv_profiler /tmp/catekv-llama3-8b-random -o p.safetensors
--device-map balanced -L 16384 -n 2`` profiles it split over the visible GPUs.

Measures, one JSON record each (rank 0 prints them and writes them all to --out):
- ``correctness``: greedy tokens of a --prompt-tokens prompt through ``model.generate`` (the cache made by
  ``catekv_runtime.apply``), per dtype of --check-dtypes, with the top-2 logit gap of every step; with
  --reference, ``comparison`` records: identical or not, the first divergence and the gaps there;
- ``decode``: at --context tokens, through ``generate`` with ``catekv_runtime.make_cache``: prefill seconds,
  decode ms/step (CUDA events at every step, mean after --warmup steps), peak GPU memory and KV bytes
  (``cache.memory()``) of every rank.
"""

from __future__ import annotations

import os

# NVLink multicast (NVLS) is not available on the GPU machines; these must be set before NCCL starts.
for _name, _value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                      ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ.setdefault(_name, _value)

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import catekv_runtime as ck  # noqa: E402
from benchmarks.decode import LLAMA3_8B, TINY, StepTimer, random_profile, weight_bytes, write_records  # noqa: E402
from catekv_runtime.profile import Profile  # noqa: E402

GiB = 1024**3
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes, from torchrun's environment (1 without torchrun)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def save_random_model(folder: Path, shape: dict, seed: int = 0) -> None:
    """Save a random-weight Llama of ``shape`` (bf16) and a byte-level tokenizer to ``folder``, atomically."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    torch.manual_seed(seed)
    config = LlamaConfig(**shape, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device_type()):  # initialising 8B parameters on a GPU takes seconds, on a CPU minutes
        model = AutoModelForCausalLM.from_config(config)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(partial)
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    # One token per byte: any text encodes, no download needed (the profiler's reference set needs a tokenizer).
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    bpe = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
    tokenizer.save_pretrained(partial)
    os.replace(partial, folder)


def ensure_model(folder: Path, shape: dict, rank: int) -> None:
    """Rank 0 saves the model once; the other ranks wait for the folder to appear."""
    if folder.is_dir():
        return
    if rank == 0:
        started = time.perf_counter()
        save_random_model(folder, shape)
        print(f"saved a random model to {folder} in {time.perf_counter() - started:.0f} s", flush=True)
        return
    deadline = time.monotonic() + 1800
    while not folder.is_dir():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank 0 did not save {folder} within 30 minutes")
        time.sleep(1)


def load_model(folder: Path, dtype: torch.dtype, world: int):
    """The model, through transformers: tensor-parallel over all processes when there are several."""
    from transformers import AutoModelForCausalLM

    kwargs = dict(dtype=dtype, attn_implementation="sdpa")
    if world > 1:
        from transformers import DistributedConfig

        # The same as tp_plan="auto"; transformers 5.2x deprecates the bare keyword for this one.
        kwargs["distributed_config"] = DistributedConfig(tp_plan="auto")
    else:
        kwargs["device_map"] = device_type()
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    model.eval().requires_grad_(False)
    return model


def random_prompt(length: int, vocab: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, vocab, (1, length), generator=torch.Generator().manual_seed(length))
    return ids.to(device), torch.ones_like(ids, device=device)


def gather(value):
    """``value`` of every rank, in rank order (a one-element list without torch.distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def correctness(model, args, dtype_name: str) -> dict:
    """Greedy tokens through apply's generate (a fresh CateKV cache per call), with top-2 logits per step."""
    device = model.get_input_embeddings().weight.device
    ids, mask = random_prompt(args.prompt_tokens, model.config.vocab_size, device)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                             do_sample=False, return_dict_in_generate=True, output_logits=True)
    top = torch.stack(out.logits, dim=1)[0].float().topk(2, dim=-1)
    return dict(kind="correctness", dtype=dtype_name, prompt_tokens=args.prompt_tokens,
                tokens=out.sequences[0, ids.shape[1]:].tolist(),
                top1=[round(v, 5) for v in top.values[:, 0].tolist()],
                top2_gap=[round(v, 5) for v in (top.values[:, 0] - top.values[:, 1]).tolist()])


def compare(mine: dict, theirs: dict, tp: int, their_tp: int) -> dict:
    """Whether two correctness records hold the same tokens; else where they first differ, and the gaps there."""
    a, b = mine["tokens"], theirs["tokens"]
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    agree = len(a) if first is None else first
    record = dict(kind="comparison", dtype=mine["dtype"], tp=tp, against_tp=their_tp, identical=a == b,
                  tokens_compared=min(len(a), len(b)), first_divergence=first,
                  max_top1_logit_diff_before=round(max((abs(x - y) for x, y in
                                                        zip(mine["top1"][:agree], theirs["top1"][:agree])),
                                                       default=0.0), 5))
    if first is not None:
        record.update(top2_gap_here=mine["top2_gap"][first], top2_gap_there=theirs["top2_gap"][first],
                      token_here=a[first], token_there=b[first])
    return record


def decode_benchmark(model, profile: Profile, args) -> dict:
    """Prefill and decode through plain ``generate`` with an explicit CateKV cache (``make_cache``)."""
    device = model.get_input_embeddings().weight.device
    ids, mask = random_prompt(args.context, model.config.vocab_size, device)
    new = args.warmup + args.steps + 1
    cache = ck.make_cache(model, profile, reserve=new + 1)
    timer = StepTimer()
    from transformers import StoppingCriteriaList

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        timer.start()
        model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                       stopping_criteria=StoppingCriteriaList([timer]), **{ck.cache_argument(model): cache})
    intervals = timer.intervals_ms()
    steps = intervals[1 + args.warmup:]
    memory = cache.memory()
    mine = dict(
        rank=ck.tensor_parallel_rank(model)[0],
        local_kv_heads=int(ck.local_head_map(model, profile.head_map).shape[1]),
        peak_bytes=torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        weight_bytes=weight_bytes(model),
        kv_bytes=memory["allocated_bytes"],  # held by this rank's cache at the end (decode capacity included)
        kv_used_bytes=memory["used_bytes"],
        full_kv_bytes=memory["full_attention_bytes"],  # full attention for this rank's heads
        decode_ms_per_step=round(sum(steps) / len(steps), 3),
        prefill_s=round(intervals[0] / 1e3, 2),
    )
    ranks = gather(mine)

    def gib(key: str) -> list:
        return [None if r[key] is None else round(r[key] / GiB, 3) for r in ranks]

    # Ranks run in lock-step (all-reduces every layer): the slowest rank's time is the step time.
    return dict(kind="decode", context=args.context, new_tokens=new, measured_steps=len(steps),
                decode_ms_per_step=max(r["decode_ms_per_step"] for r in ranks),
                prefill_s=max(r["prefill_s"] for r in ranks),
                peak_gib_per_rank=gib("peak_bytes"), weights_gib_per_rank=gib("weight_bytes"),
                kv_gib_per_rank=gib("kv_bytes"), full_kv_gib_per_rank=gib("full_kv_bytes"), ranks=ranks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="saved random model (created if missing)  [default: /tmp/catekv-llama3-8b-random, "
                             "or /tmp/catekv-tiny-random with --smoke]")
    parser.add_argument("--context", type=int, default=131072, help="prompt tokens of the decode benchmark")
    parser.add_argument("--prompt-tokens", type=int, default=4096, help="prompt tokens of the correctness check")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens of the correctness check")
    parser.add_argument("--check-dtypes", nargs="*", default=["bfloat16", "float32"], choices=sorted(DTYPES),
                        help="dtypes of the correctness check (float32 loads the model a second time)")
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=4, help="decode steps not timed")
    parser.add_argument("--steps", type=int, default=32, help="decode steps timed")
    parser.add_argument("--reference", type=Path, default=None, help="--out of the other arm, to compare tokens")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true", help="tiny model and lengths: the same code in seconds")
    args = parser.parse_args()
    if args.smoke:
        args.context, args.prompt_tokens, args.new_tokens, args.budget = 1024, 320, 8, 128
        args.warmup, args.steps = 2, 4
    shape = {**TINY, "num_hidden_layers": 4} if args.smoke else LLAMA3_8B
    folder = args.model_dir or Path("/tmp/catekv-tiny-random" if args.smoke else "/tmp/catekv-llama3-8b-random")
    rank, world = rank_and_world()
    started = time.perf_counter()
    ensure_model(folder, shape, rank)

    results: list[dict] = []

    def emit(record: dict) -> None:
        if rank != 0:
            return
        results.append(record)
        print(json.dumps(record), flush=True)
        if args.out:  # after every record: a run cut short keeps what it measured
            write_records(args.out, results)

    reference = json.loads(args.reference.read_text()) if args.reference else []
    their_tp = next((r["tp"] for r in reference if r.get("kind") == "setup"), None)
    for i, dtype_name in enumerate(["bfloat16"] + [d for d in args.check_dtypes if d != "bfloat16"]):
        t = time.perf_counter()
        model = load_model(folder, DTYPES[dtype_name], world)
        load_s = time.perf_counter() - t
        _, tp = ck.tensor_parallel_rank(model)
        if tp != world:
            raise SystemExit(f"expected tensor parallelism over {world} processes, the model reports {tp}")
        if i == 0:
            emit(dict(kind="setup", tp=tp, world=world, smoke=args.smoke, model_dir=str(folder),
                      device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                      torch=torch.__version__, transformers=__import__("transformers").__version__,
                      shape=shape, budget=args.budget, date=time.strftime("%Y-%m-%d"),
                      load_s=round(load_s, 1)))
        profile = random_profile(model, args.budget)
        ck.apply(model, profile)
        if dtype_name in args.check_dtypes:
            record = dict(correctness(model, args, dtype_name), tp=tp)
            emit(record)
            theirs = next((r for r in reference if r.get("kind") == "correctness" and r["dtype"] == dtype_name), None)
            if theirs is not None:
                emit(compare(record, theirs, tp, their_tp))
        if dtype_name == "bfloat16":  # the benchmark: the dtype the model is served in
            record = dict(decode_benchmark(model, profile, args), tp=tp, dtype=dtype_name)
            emit(record)
            theirs = next((r for r in reference if r.get("kind") == "decode" and r["context"] == args.context), None)
            if theirs is not None:
                emit(dict(kind="decode_comparison", context=args.context, tp=tp, against_tp=their_tp,
                          decode_ms_per_step=record["decode_ms_per_step"],
                          decode_ms_per_step_there=theirs["decode_ms_per_step"],
                          speedup=round(theirs["decode_ms_per_step"] / record["decode_ms_per_step"], 3),
                          prefill_s=record["prefill_s"], prefill_s_there=theirs["prefill_s"],
                          peak_gib_per_rank=record["peak_gib_per_rank"],
                          peak_gib_per_rank_there=theirs["peak_gib_per_rank"],
                          kv_gib_per_rank=record["kv_gib_per_rank"], kv_gib_per_rank_there=theirs["kv_gib_per_rank"]))
        del model, profile
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    emit(dict(kind="done", tp=world, wall_s=round(time.perf_counter() - started, 1)))
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
