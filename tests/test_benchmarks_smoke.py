"""The GPU benchmarks in their --smoke modes (CPU, Triton's interpreter where they use the kernels, tiny models).

The figures of a smoke run mean nothing; what is tested is that each script runs and that its records have the
fields the results pages read.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import requires_smollm2

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

pytestmark = pytest.mark.skipif(torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
                                reason="runs the Triton kernels through their interpreter, on CPU")


def test_decode_smoke(tmp_path):
    """benchmarks/decode.py --smoke: each arm prefills and decodes one prompt through the engine's public loop (or
    transformers' generate), with the prefill time, the step time and the floor of the bytes it reads."""
    from benchmarks import decode

    out = tmp_path / "decode.json"
    records = decode.main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text()) == records
    assert records[0]["suite"] == "setup" and records[0]["smoke"] is True
    runs = {r["arm"]: r for r in records[1:]}
    assert list(runs) == ["engine-catekv", "engine-full", "transformers-generate"]
    for r in runs.values():  # generate's step is a difference of two runs: on a busy CPU it can come out negative
        assert r["context"] == 200 and r["prefill_s"] >= 0 and r["floor_ms"] > 0
    assert runs["engine-catekv"]["decode_ms_per_step"] > 0 and runs["engine-full"]["decode_ms_per_step"] > 0
    # CateKV keeps less of the prompt than full attention: less KV held, a lower floor.
    assert runs["engine-catekv"]["kv_gib"] <= runs["engine-full"]["kv_gib"] == runs["engine-full"]["full_kv_gib"]
    assert runs["engine-catekv"]["floor_ms"] < runs["engine-full"]["floor_ms"]


def test_prefill_chunks_smoke():
    """benchmarks/prefill_chunks.py --smoke: one record per setting, in the order given."""
    from benchmarks import prefill_chunks

    records = prefill_chunks.main(["--smoke"])
    assert [r["prefill_chunk"] for r in records] == ["64", "transformers", "200"]
    assert all(r["context"] == 200 and r["prefill_s"] >= 0 for r in records)


def test_engine_decode_smoke(tmp_path):
    """benchmarks/engine_decode.py --smoke: a batch-1 record per arm with the floor computed from the bytes read,
    the engine's own step (the fused projections and the Triton kernel, interpreted) timed."""
    from benchmarks import engine_decode

    out = tmp_path / "engine_decode.json"
    records = engine_decode.main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text()) == records
    assert records[0]["suite"] == "setup" and records[0]["smoke"] is True
    steps = records[1:]
    assert [r["arm"] for r in steps] == ["engine-catekv", "engine-full"]
    for r in steps:
        assert r["context"] == 200 and r["batch"] == 1 and r["projections"] == "triton"
        assert r["decode_ms_per_step"] > 0 and r["floor_ms"] > 0
        assert r["ratio_to_floor"] == pytest.approx(r["decode_ms_per_step"] / r["floor_ms"], rel=1e-2)
    # CateKV's consistent heads keep less than the full cache of the same context: a lower floor.
    assert steps[0]["floor_ms"] < steps[1]["floor_ms"]



@requires_smollm2
def test_engine_decode_runs_a_real_model_with_its_profile(tmp_path):
    """--model / --profile: the real SmolLM2 with its shipped profile instead of random Llama-3-8B shapes."""
    from benchmarks import engine_decode

    records = engine_decode.main(["--smoke", "--model", "smollm2-135m", "--profile", "smollm2-135m-instruct"])
    setup, catekv, full = records
    assert setup["model"] == "smollm2-135m" and setup["layers"] == 30 and setup["budget"] == 512
    assert catekv["arm"] == "engine-catekv" and full["arm"] == "engine-full"
    assert catekv["decode_ms_per_step"] > 0 and catekv["floor_ms"] > 0
    with pytest.raises(SystemExit):
        engine_decode.main(["--smoke", "--model", "smollm2-135m"])  # a real model needs its profile


def test_the_floor_reads_a_tied_embedding_table_once_in_full():
    """decode_floor_ms: the embedding table is read a row per token, but an output head that shares it reads all
    of it, so a tied model's floor counts the table once and an untied one's counts only the head."""
    from benchmarks import decode as bench

    tiny = dict(bench.TINY, vocab_size=512)
    tied = bench.build_model(1, device="cpu", tie_word_embeddings=True, **tiny)
    untied = bench.build_model(1, device="cpu", tie_word_embeddings=False, **tiny)
    table = 512 * tiny["hidden_size"] * 2  # bf16
    assert bench.weight_bytes(untied) - bench.weight_bytes(tied) == table
    # Both read the same bytes: the body and one full table (the head's).
    assert bench.decode_floor_ms(tied, 0, 1e9) == pytest.approx(bench.decode_floor_ms(untied, 0, 1e9))
    assert bench.decode_floor_ms(tied, 0, 1e9) == pytest.approx(bench.weight_bytes(tied) / 1e6)


def test_engine_decode_at_a_memory_cap_fills_every_slot():
    """--memory-cap-gib: the batch is every slot the engine has under the cap; CateKV's smaller slots fit more
    requests than full attention's, and the record gives the tokens per second of the step."""
    from benchmarks import engine_decode

    records = engine_decode.main(["--smoke", "--memory-cap-gib", "0.0012"])
    catekv, full = records[1:]
    assert catekv["batch"] > full["batch"] >= 2
    for r in (catekv, full):
        assert r["memory_cap_gib"] == 0.0012
        assert r["tokens_per_s"] == pytest.approx(r["batch"] * 1e3 / r["decode_ms_per_step"], abs=0.1)

def test_engine_throughput_smoke(tmp_path):
    """benchmarks/engine_throughput.py --smoke: one record per arm with the issue's fields; every request's 4
    tokens counted."""
    from benchmarks import engine_throughput

    out = tmp_path / "engine_throughput.json"
    records = engine_throughput.main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text()) == records
    assert [r["arm"] for r in records] == ["catekv", "full", "transformers"]
    for r in records:
        assert set(engine_throughput.RECORD_FIELDS) <= r.keys()
        assert r["concurrency"] == 2 and r["requests"] == 4 and r["output_tokens"] == 16
        assert r["output_tokens_per_s"] > 0 and 0 < r["ttft_p50_s"] <= r["ttft_p99_s"]
        assert 0 < r["itl_p50_ms"] <= r["itl_p99_ms"]


def test_prefill_smoke(tmp_path):
    """benchmarks/prefill.py --smoke: a record per arm on SDPA (the FlashAttention backends cannot run on CPU and are
    skipped), with the floor from the measured rates; a later run replaces the records of its arm and backend."""
    from benchmarks import prefill

    out = tmp_path / "prefill.json"
    records = prefill.main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text()) == records
    assert [(r["arm"], r["backend"]) for r in records] == [("catekv", "sdpa"), ("full", "sdpa")]
    for r in records:
        assert {"arm", "context", "backend", "prefill_s", "floor_s", "peak_gib"} <= r.keys()
        assert r["context"] == 200 and r["smoke"] is True and r["peak_gib"] is None
        assert r["prefill_s"] > 0 and r["warmup_s"] > 0 and r["warmed_by"] == "catekv"  # one warm-up per backend
        assert r["floor_s"] == pytest.approx(r["floor_attention_s"] + r["floor_linear_s"], rel=1e-3)
    again = prefill.main(["--smoke", "--arms", "full", "--backends", "auto", "--out", str(out)])
    assert [(r["arm"], r["requested"]) for r in again] == [("full", "auto")]
    assert json.loads(out.read_text()) == records[:1] + again
