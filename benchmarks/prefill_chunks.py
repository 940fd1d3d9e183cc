"""The engine's prefill by chunk size (``Engine(prefill_chunk=)``): seconds to the first token and peak memory, against
transformers' forward over the whole prompt.

Random-weight Llama-3-8B shapes in bf16, a random CateKV profile (r = 0.4, budget 2048), one prompt of ``--context``
tokens, one new token, through the engine's public ``generate``. ``transformers`` is the model's own forward
(``logits_to_keep=1``, SDPA). A chunk as long as the prompt is the layer-by-layer prefill with no chunk attending to
earlier ones. Settings are run in the order given (repeat one to see warm-up).

    python benchmarks/prefill_chunks.py --context 65536 --chunks 8192 transformers 65536 8192 16384 \
        --out docs/results/prefill_chunks_engine.json
    python benchmarks/prefill_chunks.py --smoke     # CPU, a tiny model: checks the script (figures mean nothing)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import catekv_runtime as ck  # noqa: E402
from benchmarks.decode import TINY, build_model, emit, peak_gib, random_profile, reset_peak, sync, write_records  # noqa: E402,E501


def prefill_seconds(model, profile, ids: list[int], chunk: str) -> float:
    """Seconds of one prefill of ``ids``: the engine's with ``prefill_chunk=int(chunk)``, or transformers' forward."""
    if chunk == "transformers":
        tensor = torch.tensor([ids], device=model.device)
        sync()
        start = time.perf_counter()
        with torch.inference_mode():
            model(tensor, logits_to_keep=1)
        sync()
        return time.perf_counter() - start
    engine = ck.Engine(model, profile, max_batch_size=1, max_model_len=len(ids) + 16, max_decode_len=16,
                       prefill_chunk=int(chunk))
    sync()
    start = time.perf_counter()
    engine.generate([ids], ck.SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    sync()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=65536)
    parser.add_argument("--chunks", nargs="+", default=["8192", "transformers", "65536", "8192", "16384"],
                        help="prefill_chunk values of the engine, or 'transformers'")
    parser.add_argument("--smoke", action="store_true", help="CPU, a tiny model, 200 tokens (figures mean nothing)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.smoke:
        model, context, chunks = build_model(2, device="cpu", **TINY), 200, ["64", "transformers", "200"]
    else:
        if not torch.cuda.is_available():
            parser.error("needs a CUDA GPU (or --smoke)")
        model, context, chunks = build_model(32), args.context, args.chunks
    profile = random_profile(model, 64 if args.smoke else 2048)
    ids = torch.randint(3, min(model.config.vocab_size, 100000), (context,),
                        generator=torch.Generator().manual_seed(0)).tolist()
    records: list[dict] = []
    for chunk in chunks:
        reset_peak()
        seconds = prefill_seconds(model, profile, ids, chunk)
        emit(records, context=context, prefill_chunk=chunk, prefill_s=round(seconds, 2), peak_gib=peak_gib(),
             smoke=args.smoke)
    if args.out is not None:
        write_records(args.out, records)
    return records


if __name__ == "__main__":
    main()
