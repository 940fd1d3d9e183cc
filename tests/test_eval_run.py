"""The accuracy harness end to end (CI smoke) and the equal-budget accounting of its methods."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model
from test_runtime import make_profile

import catekv_runtime as ck
from catekv_eval.methods import METHODS, method_overrides
from catekv_eval.run import evaluate, markdown
from catekv_eval.tasks import make_samples
from catekv_runtime.integration import resolve_profile

PROFILE = Path(__file__).resolve().parents[1] / "profiles" / "smollm2-135m-instruct.safetensors"


@pytest.mark.parametrize("length", [400, 1000, 5000])
def test_compressed_methods_keep_equal_kv(length):
    """snapkv and streaming get CateKV's total KV; duo keeps B per consistent head like CateKV."""
    model = make_tiny_model("llama")
    profile = make_profile(model, 0.5, budget=128, init_tokens=4, recent_tokens=16)
    kept = {}
    for method in METHODS:
        resolved = resolve_profile(profile, method_overrides(method, profile, length))
        kept[method] = resolved.kv_kept_fraction(length)
    assert kept["full"] == 1.0
    for method in ("snapkv", "streaming"):
        assert abs(kept[method] - kept["catekv"]) * length <= 8  # within a chunk per head
    assert kept["duo"] == pytest.approx(kept["catekv"], abs=8 / length)
    assert kept["streaming"] < 1.0 and kept["catekv"] < 1.0


def test_unknown_method():
    model = make_tiny_model("llama")
    with pytest.raises(ValueError, match="unknown method"):
        method_overrides("h2o", make_profile(model, 0.5), 1000)


def test_smoke_on_smollm2(smollm2):
    """A few samples of one task at short context, every method, through the real model on CPU."""
    model, tokenizer, _ = smollm2
    profile = resolve_profile(ck.load_profile(PROFILE), {"budget": 256})
    records = evaluate(model, tokenizer, profile, tasks=["niah_single_1"], context_length=1024, num_samples=2,
                       methods=["full", "catekv", "streaming"], max_new_tokens=12)
    by_method = {r["method"]: r for r in records}
    assert by_method["full"]["kv_kept_pct"] == 100.0
    expected = 100 * profile.kv_kept_fraction(1024)
    assert abs(by_method["catekv"]["kv_kept_pct"] - expected) < 3  # measured bytes vs formula (+12 decoded)
    assert abs(by_method["streaming"]["kv_kept_pct"] - by_method["catekv"]["kv_kept_pct"]) < 2
    assert all(0 <= r["score"] <= 100 for r in records)
    assert by_method["full"]["score"] == 100.0  # SmolLM2 finds a single needle at 1K with full attention
    table = markdown(records)
    assert "| niah_single_1 |" in table and "KV kept" in table
    assert not hasattr(model, "_catekv")


def test_shared_prefill_equals_a_run_per_method(smollm2):
    """Forking one prefill per batch gives each method the answers of its own plain generate run."""
    model, tokenizer, _ = smollm2
    profile = resolve_profile(ck.load_profile(PROFILE), {"budget": 256})
    methods = ["catekv", "snapkv", "streaming"]
    kwargs = dict(tasks=["niah_single_2"], context_length=1024, num_samples=3, methods=methods, max_new_tokens=10)
    batched = evaluate(model, tokenizer, profile, batch_size=2, **kwargs)
    singles = evaluate(model, tokenizer, profile, batch_size=1, **kwargs)
    samples = make_samples("niah_single_2", tokenizer, 1024, 3)
    for record, single in zip(batched, singles):
        assert record["predictions"] == single["predictions"]  # left padding changes nothing
        ck.apply(model, profile, **method_overrides(record["method"], profile, 1024))
        for sample, prediction in zip(samples, record["predictions"]):
            ids = torch.tensor([sample.input_ids])
            with torch.inference_mode():
                out = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.eos_token_id)
            assert prediction == tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        ck.remove(model)


def test_a_batch_out_of_memory_is_split(smollm2, monkeypatch, capsys):
    """A batch too large for the device runs in halves, with the answers a batch size of 1 gives."""
    from catekv_eval import run

    model, tokenizer, _ = smollm2
    profile = resolve_profile(ck.load_profile(PROFILE), {"budget": 256})
    kwargs = dict(tasks=["niah_single_1"], context_length=1024, num_samples=3, methods=["catekv"], max_new_tokens=6)
    singles = evaluate(model, tokenizer, profile, batch_size=1, **kwargs)
    prefill = run._prefill

    def small_device(model, tokenizer, profile, batch, new):
        if len(batch) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return prefill(model, tokenizer, profile, batch, new)

    monkeypatch.setattr(run, "_prefill", small_device)
    split = evaluate(model, tokenizer, profile, batch_size=3, **kwargs)
    assert [r["predictions"] for r in split] == [r["predictions"] for r in singles]
    assert [r["kv_kept_pct"] for r in split] == [r["kv_kept_pct"] for r in singles]
    assert "running them in two halves" in capsys.readouterr().err
