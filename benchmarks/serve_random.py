"""catekv-serve on random Llama-3-8B-shaped weights, for load tests at long contexts without a real 8B model.

The same server as ``catekv-serve`` (``catekv_serve.app.build_app`` on a ``catekv_runtime.engine.Engine``), on the
model of ``benchmarks/decode.py`` (random bf16 weights, Llama-3-8B shapes) with a random profile (r = ``--ratio``,
budget ``--budget``) or full attention (``--profile none``). Its tokenizer is a word-level one whose vocabulary is
the model's (``t0``, ``t1``, ...; any other word is ``t0``): ``benchmarks/serve_load.py`` sends token ids, and the
generated text is those names. Speed does not depend on the weights or the tokens; accuracy is meaningless here.

    python benchmarks/serve_random.py --port 8011 --max-model-len 33024 --gpu-memory-utilization 0.56 &
    python benchmarks/serve_load.py --port 8011 --label catekv --concurrency 4,16,32 --prompt-tokens 16384 \\
        --out docs/results/serve_load.json
    # the same with `serve_random.py --profile none` and --label full

``--smoke`` serves a tiny model on the CPU (CI checks the script with it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import decode as bench  # noqa: E402
from catekv_runtime.attention import PREFILL_BACKENDS  # noqa: E402


def word_tokenizer(vocab_size: int):
    """A fast tokenizer with one word per id, ``t0`` .. ``t{vocab_size - 1}``, split on whitespace and punctuation."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=words, unk_token="t0")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True, help="port on 127.0.0.1")
    parser.add_argument("--profile", choices=["random", "none"], default="random")
    parser.add_argument("--budget", type=int, default=2048, help="CateKV budget B of the random profile")
    parser.add_argument("--ratio", type=float, default=0.4, help="adaptive-head ratio r of the random profile")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--max-model-len", type=int, default=33024)
    parser.add_argument("--max-decode-len", type=int, default=1024)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--gpu-memory-utilization", type=float, default=None)
    parser.add_argument("--prefill-chunk", type=int, default=8192)
    parser.add_argument("--prefill-backend", choices=PREFILL_BACKENDS, default="auto", help="the engine's prefill attention")
    parser.add_argument("--smoke", action="store_true", help="a tiny model on the CPU (the figures mean nothing)")
    args = parser.parse_args(argv)

    import uvicorn

    from catekv_runtime.engine import Engine
    from catekv_serve.app import build_app

    if args.smoke:
        model = bench.build_model(2, device="cpu", **bench.TINY)
        budget, memory = 64, dict(kv_cache_memory=256 * 2**20)
    else:
        if not torch.cuda.is_available():
            parser.error("needs a CUDA GPU (or --smoke)")
        model = bench.build_model(args.layers)
        budget, memory = args.budget, dict(gpu_memory_utilization=args.gpu_memory_utilization)
    profile = bench.random_profile(model, budget, args.ratio) if args.profile == "random" else None
    tokenizer = word_tokenizer(model.config.vocab_size)
    engine = Engine(model, profile, tokenizer=tokenizer, max_batch_size=args.max_batch_size,
                    max_model_len=args.max_model_len, max_decode_len=args.max_decode_len,
                    prefill_chunk=args.prefill_chunk, prefill_backend=args.prefill_backend, **memory)
    name = f"random-llama-{args.profile}"
    print(f"serve_random: {name}, {engine.slots} slots of {engine.max_model_len} tokens, prefill attention "
          f"{engine.prefill_backend}; "
          f"http://127.0.0.1:{args.port}/v1", file=sys.stderr)
    uvicorn.Server(uvicorn.Config(build_app(engine, name), host="127.0.0.1", port=args.port, log_level="warning",
                                  access_log=False, timeout_graceful_shutdown=5)).run()


if __name__ == "__main__":
    main()
