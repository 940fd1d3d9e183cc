"""Decode ms/step through plain transformers ``generate``: full attention (SDPA) against a CateKV cache.

The path users of ``catekv_runtime.apply`` get (no CUDA graph): one JSON record per arm, and with
``--profile-step`` a torch.profiler table of one decode step of the CateKV arm. It found why that path
once took 660 ms/step at 128K on the H200: SDPA chose cuDNN for the decode call, which builds a new plan
for every cache length (catekv_runtime/attention.py now leaves cuDNN out).

    python benchmarks/plain_decode.py --context 131072 --out docs/results/plain_decode.json   # GPU, Llama-3-8B shapes
    python benchmarks/plain_decode.py --tiny --context 65536 --device cpu   # CPU: 2 small layers
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import catekv_runtime as ck  # noqa: E402
from benchmarks.decode import StepTimer, build_model, random_profile, write_records  # noqa: E402

# --tiny: 2 layers small enough for a CPU, but with head_dim 128 and GQA like the real models, so that
# attention over a long context, not per-call overhead, dominates a step (as at 128K on the GPU).
CPU_SHAPE = dict(hidden_size=1024, intermediate_size=2048, num_attention_heads=8, num_key_value_heads=2,
                 head_dim=128, vocab_size=1000)


def decode_ms(model, ids: torch.Tensor, new_tokens: int, on_mark=None, tokens: list | None = None) -> float:
    """Mean ms between generated tokens, the prefill and the first decode step (warm-up) left out. The greedy
    tokens generated are appended to ``tokens`` when given."""
    from transformers import StoppingCriteriaList

    timer = StepTimer(on_mark)
    timer.start()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, stopping_criteria=StoppingCriteriaList([timer]))
    if tokens is not None:
        tokens += out[0, ids.shape[1] :].tolist()
    steps = timer.intervals_ms()[2:]
    return sum(steps) / len(steps)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=131072)
    parser.add_argument("--new-tokens", type=int, default=12)
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--tiny", action="store_true", help="2 small layers (CPU_SHAPE) instead of Llama-3-8B shapes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--profile-step", action="store_true", help="print torch.profiler's table of one step")
    parser.add_argument("--out", type=Path, default=None, help="also write the records here as one JSON list")
    args = parser.parse_args(argv)

    model = build_model(2 if args.tiny else 32, device=args.device, **(CPU_SHAPE if args.tiny else {}))
    ids = torch.randint(0, model.config.vocab_size, (1, args.context), device=args.device,
                        generator=torch.Generator(args.device).manual_seed(0))
    records = []
    for arm in ("full-sdpa", "catekv"):
        if arm == "catekv":
            ck.apply(model, random_profile(model, args.budget))
        tokens: list[int] = []
        records.append({"arm": arm, "context": args.context,
                        "ms_per_step": decode_ms(model, ids, args.new_tokens, tokens=tokens), "tokens": tokens})
    device = torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else "cpu"
    for record in records:
        record.update(device=device, layers=model.config.num_hidden_layers, torch=torch.__version__,
                      transformers=transformers.__version__, date=time.strftime("%Y-%m-%d"))
        print(json.dumps(record), flush=True)
    if args.out:
        write_records(args.out, records)
    if args.profile_step:  # one decode step of the CateKV arm: skip the prefill and a warm-up step
        from torch.profiler import ProfilerActivity, profile as torch_profile, schedule

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if model.device.type == "cuda" else [])

        def report(prof) -> None:
            print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))

        with torch_profile(activities=activities, schedule=schedule(wait=1, warmup=1, active=1, repeat=1),
                           on_trace_ready=report) as prof:
            decode_ms(model, ids, 5, on_mark=prof.step)
    ck.remove(model)
    return records


if __name__ == "__main__":
    main()
