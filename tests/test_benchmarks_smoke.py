"""benchmarks/decode_stages.py in its --smoke mode (CPU, Triton interpreter, tiny model, no CUDA graphs).

The figures of a smoke run mean nothing; what is tested is that the script runs, that its records have
the structure benchmarks/report.py reads, and that its stages are, together, exactly one decode step.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

pytestmark = pytest.mark.skipif(torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
                                reason="runs the Triton kernels through their interpreter, on CPU")

STAGE_FIELDS = {"suite", "arm", "context", "batch", "block_n", "num_splits", "head_groups", "kv_gib", "stage",
                "ms", "bytes", "gbps", "of_copy", "floor_ms"}


def test_smoke_records(tmp_path):
    from benchmarks import decode_stages, report

    out = tmp_path / "stages.json"
    records = decode_stages.main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text()) == records
    setup = records[0]
    assert setup["suite"] == "setup" and setup["smoke"] is True
    assert setup["unattributed_weight_bytes"] == 0  # every parameter is read by exactly one stage
    for arm in ("lean-catekv", "lean-full"):
        mine = [r for r in records if r.get("arm") == arm]
        assert [r["stage"] for r in mine] == ["step", *decode_stages.STAGES, "summary"]
        by_stage = {r["stage"]: r for r in mine}
        for r in mine[:-1]:
            assert STAGE_FIELDS <= r.keys() and r["context"] == 200 and r["batch"] == 1
            assert r["ms"] > 0 and r["bytes"] > 0 and r["floor_ms"] >= 0
        summary = by_stage["summary"]
        stage_sum = sum(by_stage[name]["ms"] for name in decode_stages.STAGES)
        assert summary["sum_of_stages_ms"] == pytest.approx(stage_sum, abs=1e-3)
        assert summary["inter_stage_ms"] == pytest.approx(summary["step_ms"] - summary["sum_of_stages_ms"], abs=1e-3)
        assert summary["floor_ms"] == pytest.approx(by_stage["step"]["floor_ms"], abs=1e-3)
        # The stages' bytes are the step's (the floor's), plus the one embedding row and the appended K/V.
        stage_bytes = sum(by_stage[name]["bytes"] for name in decode_stages.STAGES)
        embed_row = decode_stages.TINY["hidden_size"] * 2  # bf16
        assert stage_bytes == by_stage["step"]["bytes"] + embed_row + summary["append_bytes"]
        # K and V, x KV heads x 2 layers x head_dim x 2 bytes (bf16): one slot per head, whatever the groups
        assert summary["append_bytes"] == 2 * decode_stages.TINY["num_key_value_heads"] * 2 * decode_stages.TINY["head_dim"] * 2
    # A smoke file never becomes a section of docs/benchmarks.md; a real one does.
    assert report.stages_section(records) == []
    records[0] = dict(setup, smoke=False)
    section = "\n".join(report.stages_section(records))
    assert "## f. Where a decode step's time goes" in section and section.count("| whole step |") == 2


class _Ops(TorchDispatchMode):
    """Counts the ATen operators run under it."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("arm", ["catekv", "full"])
def test_stages_are_exactly_one_step(arm):
    """The stages, each run once, run the same operators as one decode step, as many times each."""
    from benchmarks import decode_stages
    from benchmarks.decode import build_model, random_profile, synthetic_state
    from catekv_runtime.lean import LeanGenerator

    model = build_model(2, device="cpu", **decode_stages.TINY)
    profile = random_profile(model, 64) if arm == "catekv" else None
    gen = LeanGenerator(model, profile, backend="triton", cuda_graph=False)
    head_map, params = (profile.head_map, profile.params) if profile is not None else gen._head_map_and_params()
    state = synthetic_state(gen, head_map, params, 1, 200, 4)
    if arm == "catekv":  # both code paths of the append: one layer with two head groups at least
        assert max(len(slots) for slots in state.layers) == 2
    stages = decode_stages.stage_functions(state)
    assert tuple(stages) == decode_stages.STAGES
    with _Ops() as parts:
        for fn in stages.values():
            fn()
    with _Ops() as step:
        state.step()
    assert parts.ops == step.ops and sum(step.ops.values()) > 0


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
        assert r["prefill_s"] > 0 and r["warmup_s"] > 0
        assert r["floor_s"] == pytest.approx(r["floor_attention_s"] + r["floor_linear_s"], rel=1e-3)
    again = prefill.main(["--smoke", "--arms", "full", "--backends", "auto", "--out", str(out)])
    assert [(r["arm"], r["requested"]) for r in again] == [("full", "auto")]
    assert json.loads(out.read_text()) == records[:1] + again
