"""The accuracy harness end to end (CI smoke) and the equal-budget accounting of its methods."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import make_tiny_model
from test_runtime import make_profile

import catekv_runtime as ck
from catekv_eval.methods import METHODS, method_overrides
from catekv_eval.run import evaluate, main, markdown
from catekv_eval.tasks import make_samples
from catekv_models import ModelInfo
from catekv_models import load_model as load_model_real
from catekv_runtime.profile import budget_for_kv_fraction, resolve_profile
from catekv_runtime.policies import CateKV, DuoAttention, Full, SnapKV, StreamingLLM, get_policy

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "catekv_profiles" / "smollm2-135m-instruct.safetensors"


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


def _overrides_before_policies(method, profile, length):
    """``catekv_eval.methods.method_overrides`` as it was before the policies (issue #19), kept as the reference."""
    p = profile.params
    if method == "full":
        return {"adaptive_ratio": 1.0, "eta": 1.0}
    if method == "catekv":
        return {}
    if method == "duo":
        return {"budget": p.budget, "init_tokens": p.init_tokens, "recent_tokens": p.budget - p.init_tokens}
    reserve = p.reserve_tokens // p.chunk_size * p.chunk_size
    per_head = max(p.init_tokens + p.recent_tokens,
                   math.floor(profile.kv_kept_fraction(length) * length) - reserve)
    if method == "snapkv":
        return {"adaptive_ratio": 0.0, "budget": per_head, "init_tokens": p.init_tokens,
                "recent_tokens": p.recent_tokens}
    return {"adaptive_ratio": 0.0, "budget": per_head, "init_tokens": p.init_tokens,
            "recent_tokens": per_head - p.init_tokens}


@pytest.mark.parametrize("name, policy", [("full", Full()), ("catekv", CateKV()), ("duo", DuoAttention()),
                                          ("snapkv", SnapKV()), ("streaming", StreamingLLM())])
def test_each_policy_keeps_what_its_overrides_kept(name, policy):
    """Each policy resolves to the head map, budgets and parameters of the former overrides, and a cache forked
    from one tiny-model prefill keeps the same tokens under both."""
    assert METHODS[name] == policy and policy.name == name
    model = make_tiny_model("llama")
    profile = make_profile(model, 0.5, budget=48, init_tokens=4, recent_tokens=8, reserve_tokens=8)
    ids = torch.randint(0, model.config.vocab_size, (1, 200), generator=torch.Generator().manual_seed(3))
    for length in (200, 1000, 5000):
        before = resolve_profile(profile, _overrides_before_policies(name, profile, length))
        now = policy.resolve(profile, length)
        assert now.params == before.params
        assert torch.equal(now.head_map, before.head_map) and torch.equal(now.budgets, before.budgets)
    ck.apply(model, profile)
    try:
        source = ck.make_cache(model, profile, eager=False)
        with torch.inference_mode():
            model(input_ids=ids, **{ck.cache_argument(model): source})
        kept = []
        for chosen in (resolve_profile(profile, _overrides_before_policies(name, profile, 200)),
                       policy.resolve(profile, 200)):
            cache = source.fork(chosen.head_map, chosen.params, budgets=chosen.budgets)
            kept.append([(g.kv_heads.tolist(), g.kv[:, :, :, : g.length]) for layer in cache.layers
                         for g in layer.groups])
    finally:
        ck.remove(model)
    assert len(kept[0]) == len(kept[1])
    for (heads_a, kv_a), (heads_b, kv_b) in zip(*kept):
        assert heads_a == heads_b and torch.equal(kv_a, kv_b)
    if name != "full":
        assert sum(kv.shape[3] * len(h) for h, kv in kept[1]) < len(model.model.layers) * 2 * 200  # it evicts


def test_evaluate_takes_policy_objects():
    """``evaluate`` lists policies; names resolve through ``METHODS`` and unknown ones are refused."""
    with pytest.raises(ValueError, match="unknown method 'h2o'"):
        get_policy("h2o")
    assert list(METHODS) == ["full", "catekv", "duo", "snapkv", "streaming"]


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


def test_evaluate_keeps_the_profiles_per_head_budgets(smollm2):
    """At the profile's own r the profile's per-head budgets are what is kept, not uniform ones; another r re-votes
    the head map, with uniform budgets (``Profile.with_adaptive_ratio``)."""
    model, tokenizer, _ = smollm2
    uniform = resolve_profile(ck.load_profile(PROFILE), {"budget": 256})
    small = uniform.with_budgets(torch.where(uniform.head_map, -1, 64))
    own_ratio = small.params.adaptive_ratio
    other_ratio = 0.2 if own_ratio != 0.2 else 0.3

    def kept(profile, **kwargs):
        return evaluate(model, tokenizer, profile, tasks=["niah_single_1"], context_length=1024, num_samples=1,
                        methods=["catekv"], max_new_tokens=4, **kwargs)[0]["kv_kept_pct"]

    own = kept(small)
    assert own == kept(small, ratios=[own_ratio])
    assert abs(own - 100 * small.kv_kept_fraction(1024)) < 3  # measured bytes vs the per-head formula
    assert own < kept(uniform) - 5
    assert kept(small, ratios=[other_ratio]) == kept(uniform.with_adaptive_ratio(other_ratio))


def test_kv_fraction_gives_each_ratio_one_memory_budget(smollm2):
    """``kv_fraction``: each r gets the budget of ``budget_for_kv_fraction``, larger at a lower r, and the KV measured
    from the cache's bytes lands at the fraction for CateKV and for SnapKV beside it."""
    model, tokenizer, _ = smollm2
    profile = ck.load_profile(PROFILE)
    records = evaluate(model, tokenizer, profile, tasks=["niah_single_1"], context_length=1024, num_samples=1,
                       methods=["full", "catekv", "snapkv"], ratios=[0.2, 0.4], kv_fraction=0.5, max_new_tokens=4)
    catekv = {r["adaptive_ratio"]: r for r in records if r["method"] == "catekv"}
    for ratio, record in catekv.items():
        assert record["budget"] == budget_for_kv_fraction(profile.with_adaptive_ratio(ratio), 0.5, 1024)
    assert catekv[0.2]["budget"] > catekv[0.4]["budget"]
    for record in records:
        if record["method"] == "full":
            assert record["budget"] is None and record["kv_fraction"] is None and record["kv_kept_pct"] == 100.0
        else:  # the formula's 50% at 1024 tokens; a sample is up to 64 tokens shorter, and 4 tokens are generated
            assert 48 <= record["kv_kept_pct"] <= 54 and record["kv_fraction"] == 0.5, record


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


# ------------------------------------------------------------------------- the catekv-eval command

# SmolLM2-135M's shape and maximum context, as its config gives them (what the fake loader below reports).
SMOLLM2_INFO = ModelInfo(model_id="HuggingFaceTB/SmolLM2-135M-Instruct", revision="", source="embedded",
                         architecture="LlamaForCausalLM", num_layers=30, num_kv_heads=3, num_attention_heads=9,
                         head_dim=64, max_context=8192, sliding_window_layers=())


@pytest.fixture
def fake_run(monkeypatch):
    """catekv-eval without a model: the loader reports SmolLM2's config, ``evaluate`` records its calls.

    Returns the list of ``evaluate`` calls (keyword arguments, plus ``context_length``).
    """
    from catekv_eval import run
    import catekv_models

    def load_model(spec, *, on_config=None, **kwargs):
        on_config(SMOLLM2_INFO)
        return torch.nn.Linear(1, 1), object(), SMOLLM2_INFO

    calls = []
    monkeypatch.setattr(catekv_models, "load_model", load_model)
    monkeypatch.setattr(run, "evaluate", lambda model, tokenizer, profile, **kwargs: calls.append(kwargs) or [])
    return calls


def test_cli_takes_one_or_more_values_and_records_the_command(tmp_path, fake_run):
    """Options keep argparse's form (--lengths 1024 2048); the --out JSON records the command as given."""
    out = tmp_path / "results" / "r.json"
    args = ["smollm2-135m", "smollm2-135m-instruct", "--lengths", "1024", "2048", "--tasks", "vt", "cwe", "--ratios",
            "0.2", "0.4", "--methods", "full", "catekv", "--samples", "3", "--batch-size", "2", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert [c["context_length"] for c in fake_run] == [1024, 2048]
    assert fake_run[0]["tasks"] == ("vt", "cwe") and fake_run[0]["ratios"] == (0.2, 0.4)
    assert fake_run[0]["methods"] == ("full", "catekv") and fake_run[0]["num_samples"] == 3
    assert fake_run[0]["batch_size"] == 2 and fake_run[0]["seed"] == 1000 and fake_run[0]["max_new_tokens"] is None
    record = json.loads(out.read_text())
    assert record["command"] == "catekv-eval " + " ".join(args) and record["records"] == []
    assert out.with_suffix(".md").exists() and sorted(p.name for p in out.parent.iterdir()) == ["r.json", "r.md"]


def test_cli_defaults_are_shown_and_used(fake_run):
    help_text = CliRunner().invoke(main, ["--help"]).output
    for shown in ("[default: 4096; x>=1]", "[default: 20;", "[default: (all)]", "the profile's"):
        assert shown in " ".join(help_text.split()), help_text
    assert CliRunner().invoke(main, ["smollm2-135m", "smollm2-135m-instruct"]).exit_code == 0
    assert [c["context_length"] for c in fake_run] == [4096]
    assert fake_run[0]["ratios"] == () and fake_run[0]["num_samples"] == 20  # () = the profile's r


def random_bytes_profile(tmp_path) -> str:
    path = tmp_path / "junk.safetensors"
    path.write_bytes(bytes(range(256)) * 4)
    return str(path)


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["qwen2.5-coder-0.5b-instruct-32k"], 1, "with num_layers=24, but the model has num_layers=30"),
        ([random_bytes_profile], 1, "not a safetensors file"),
        (["smollm2-135m-instruct", "--lengths", "0"], 2, "'--lengths': 0 is not in the range x>=1"),
        (["smollm2-135m-instruct", "--lengths", "1024", "100"], 2, "100 is shorter than the 184 tokens"),
        (["smollm2-135m-instruct", "--lengths", "100000"], 2, "100000 exceeds the model's maximum of 8192 tokens"),
        (["smollm2-135m-instruct", "--samples", "0"], 2, "'--samples': 0 is not in the range x>=1"),
        (["smollm2-135m-instruct", "--ratios", "0.2", "2"], 2, "'--ratios': 2.0 is not in the range 0<=x<=1"),
        (["smollm2-135m-instruct", "--ratios", "-0.5"], 2, "'--ratios': -0.5 is not in the range 0<=x<=1"),
        (["smollm2-135m-instruct", "--budget", "1"], 2, "budget (1) must be at least init + recent tokens"),
        (["smollm2-135m-instruct", "--budget", "256", "--kv-fraction", "0.4"], 2,
         "--budget and --kv-fraction both set the budget"),
        (["smollm2-135m-instruct", "--ratios", "0.5", "--kv-fraction", "0.3"], 2,
         "--kv-fraction: at r = 0.5 the adaptive heads alone keep"),
        (["smollm2-135m-instruct", "--kv-fraction", "0"], 2, "'--kv-fraction': 0.0 is not in the range 0<x<=1"),
        (["smollm2-135m-instruct", "--batch-size", "0"], 2, "'--batch-size': 0 is not in the range x>=1"),
        (["smollm2-135m-instruct", "--tasks", "qa"], 2, "'qa' is not one of"),
        (["smollm2-135m-instruct", "--out", "r.md"], 2, "r.md ends in .md"),
    ],
)
def test_cli_bad_input_is_one_line_before_the_model_loads(tmp_path, monkeypatch, args, code, message):
    """Each refused from the options, the profile and the model's config: no weights, no traceback."""
    import catekv_models

    def load_model(spec, *, on_config=None, **kwargs):
        on_config(SMOLLM2_INFO)
        raise AssertionError("the model's weights would load now")

    monkeypatch.setattr(catekv_models, "load_model", load_model)
    monkeypatch.chdir(tmp_path)
    args = [arg(tmp_path) if callable(arg) else arg for arg in args]
    before = set(tmp_path.iterdir())
    result = CliRunner().invoke(main, ["smollm2-135m", *args])
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # a click error, not a traceback
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert set(tmp_path.iterdir()) == before  # nothing left behind


def test_cli_out_that_cannot_be_written(unwritable_dir, fake_run):
    out = unwritable_dir / "r.json"
    result = CliRunner().invoke(main, ["smollm2-135m", "smollm2-135m-instruct", "--out", str(out)])
    assert result.exit_code == 2 and f"Invalid value for '--out': cannot write {out}" in result.output, result.output
    assert not fake_run  # nothing evaluated


def test_cli_model_and_task_errors_are_one_line(tmp_path, fake_run, monkeypatch):
    from catekv_eval import run
    from catekv_eval.tasks import EvalTaskError
    import catekv_models

    def too_short(*args, **kwargs):
        raise EvalTaskError("context_length=1024 is too small for task vt")

    monkeypatch.setattr(run, "evaluate", too_short)
    result = CliRunner().invoke(main, ["smollm2-135m", "smollm2-135m-instruct", "--lengths", "1024"])
    assert result.exit_code == 1 and "Error: context_length=1024 is too small" in result.output, result.output
    monkeypatch.setattr(catekv_models, "load_model", load_model_real)
    result = CliRunner().invoke(main, [str(tmp_path / "nope"), "smollm2-135m-instruct"])
    assert result.exit_code == 1 and result.output.startswith("Error: model path") and "not found" in result.output


def test_module_entry_point_refuses_bad_input_without_a_traceback():
    """``python -m catekv_eval.run`` is the same command; a usage error exits 2 with one line."""
    done = subprocess.run([sys.executable, "-m", "catekv_eval.run", "smollm2-135m", "smollm2-135m-instruct",
                           "--lengths", "0"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.splitlines()[-1] == "Error: Invalid value for '--lengths': 0 is not in the range x>=1."


def test_cli_end_to_end_on_smollm2(smollm2, tmp_path):
    """The real command, model loading included: a JSON and a table, the KV kept by each method."""
    out = tmp_path / "r.json"
    result = CliRunner().invoke(main, ["smollm2-135m", "smollm2-135m-instruct", "--lengths", "1024", "--budget", "256",
                                       "--tasks", "niah_single_1", "--methods", "full", "catekv", "--samples", "1",
                                       "--max-new-tokens", "6", "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    records = json.loads(out.read_text())["records"]
    assert [(r["method"], r["kv_kept_pct"] == 100.0) for r in records] == [("full", True), ("catekv", False)]
    assert "| niah_single_1 |" in out.with_suffix(".md").read_text()
