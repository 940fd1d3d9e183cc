"""The profiler end to end: capture, per-sample statistics, checkpoints and resume, the CLI."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import FAMILIES, make_tiny_model
from test_runtime import fresh_python
from transformers import DynamicCache

import catekv_runtime as ck
from catekv_eval.calibrate import CALIBRATOR
from catekv_profiler.capture import capture_attention
from catekv_profiler.cli import main
from catekv_profiler.profiler import Checkpoint, ProfilingError, profile_model, sample_statistics, statistics_key
from catekv_profiler.reference import ReferenceSample, variable_tracking_samples
from catekv_profiler.stats import layer_statistics
from catekv_runtime.profile import ProfileParams, ReferenceSpec

PARAMS = ProfileParams(budget=64, init_tokens=4, recent_tokens=16, chunk_size=4, obs_window=8, adaptive_ratio=0.4)


def random_samples(model, count: int, length: int, seed: int = 0) -> list[ReferenceSample]:
    gen = torch.Generator().manual_seed(seed)
    return [
        ReferenceSample(text="", input_ids=torch.randint(0, model.config.vocab_size, (length,), generator=gen).tolist(),
                        answer=[])
        for _ in range(count)
    ]


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_sees_post_rope_keys_of_every_layer(family):
    """The keys handed to the profiler are exactly what the model caches (post-RoPE)."""
    model = make_tiny_model(family)
    ids = torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    seen = {}
    with torch.no_grad(), capture_attention(model, lambda m, q, k: seen.setdefault(m.layer_idx, (q, k))):
        model(ids, use_cache=False)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, **{ck.cache_argument(model): cache}, use_cache=True)
    assert sorted(seen) == list(range(model.config.num_hidden_layers))
    for i, (q, k) in seen.items():
        torch.testing.assert_close(k, cache.layers[i].keys, rtol=0, atol=0)
        assert q.shape[1] == model.config.num_attention_heads and q.shape[2] == 40
    assert model.config._attn_implementation == "sdpa"  # restored


@pytest.mark.parametrize("family", FAMILIES)
def test_profile_model_on_every_family(family):
    model = make_tiny_model(family)
    samples = random_samples(model, 3, 120)
    spec = ck.model_spec(model)
    ref = ReferenceSpec("random", 120, 3, 0, "h")
    profile = profile_model(model, spec, samples, PARAMS, ref)
    layers, heads = model.config.num_hidden_layers, model.config.num_key_value_heads
    assert profile.cv.shape == (3, layers, heads)
    assert int(profile.head_map.sum()) == math.ceil(0.4 * layers * heads)
    # Sample statistics equal those of the (separately tested) per-layer function on captured tensors.
    captured = {}
    with torch.no_grad(), capture_attention(model, lambda m, q, k: captured.setdefault(m.layer_idx, (m, q, k))):
        model(torch.tensor([samples[1].input_ids]), use_cache=False)
    for i, (module, q, k) in captured.items():
        expected = layer_statistics(q[0, :, -PARAMS.obs_window :], k[0], module.scaling, PARAMS)
        torch.testing.assert_close(profile.cv[1, i], expected.cv[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_statistics_are_close_to_float32(dtype):
    model = make_tiny_model("llama")
    ids = random_samples(model, 1, 160)[0].input_ids
    ref = sample_statistics(model, ids, PARAMS)
    half = sample_statistics(model.to(dtype), ids, PARAMS)
    assert all(torch.isfinite(half[name]).all() for name in half)
    torch.testing.assert_close(half["threshold"], ref["threshold"], rtol=0.1, atol=1e-3)


def test_interrupted_run_resumes_from_checkpoint(tmp_path):
    model = make_tiny_model("qwen2")
    samples = random_samples(model, 4, 100)
    spec = ck.model_spec(model)
    ref = ReferenceSpec("random", 100, 4, 0, "h")
    out = tmp_path / "p.safetensors"
    key = statistics_key(PARAMS, spec, "float32")

    def killed(index, resumed):
        if index == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        profile_model(model, spec, samples, PARAMS, ref, checkpoint=Checkpoint(out, key), on_sample=killed)
    assert sorted(p.name for p in (tmp_path / "p.safetensors.ckpt").iterdir()) == [
        "sample_00000.safetensors", "sample_00001.safetensors"
    ]
    resumed = []
    result = profile_model(model, spec, samples, PARAMS, ref, checkpoint=Checkpoint(out, key),
                           on_sample=lambda i, r: resumed.append(r))
    assert resumed == [True, True, False, False]
    fresh = profile_model(model, spec, samples, PARAMS, ref)
    assert torch.equal(result.cv, fresh.cv) and torch.equal(result.head_map, fresh.head_map)

    other = ProfileParams(**{**PARAMS.__dict__, "percentile": 0.95})
    with pytest.raises(ProfilingError, match="other settings"):
        profile_model(model, spec, samples, other, ref,
                      checkpoint=Checkpoint(out, statistics_key(other, spec, "float32")))


def test_too_short_reference_text_is_refused():
    model = make_tiny_model("llama")
    with pytest.raises(ProfilingError, match="fewer than the 64"):
        profile_model(model, ck.model_spec(model), random_samples(model, 1, 20), PARAMS,
                      ReferenceSpec("random", 20, 1, 0, "h"))


# ------------------------------------------------------------------------- CLI on the real SmolLM2

SMALL = ["-L", "192", "-n", "2", "-B", "64", "--obs-window", "16", "--init-tokens", "4", "--recent-tokens", "16",
         "--chunk-size", "4", "-q"]


@pytest.fixture(scope="module")
def smollm2_profile(tmp_path_factory, smollm2):
    out = tmp_path_factory.mktemp("cli") / "smollm2.safetensors"
    result = CliRunner().invoke(main, ["smollm2-135m", "-o", str(out), *SMALL])
    assert result.exit_code == 0, result.output
    # -q: no progress bar at all, the GGUF de-quantisation's and transformers' weight loading's included
    assert "de-quantizing" not in result.output and "Loading weights" not in result.output, result.output
    assert "%|" not in result.output
    return out


def test_cli_writes_a_valid_profile(smollm2_profile):
    profile = ck.load_profile(smollm2_profile)
    assert profile.head_map.shape == (30, 3)
    assert int(profile.head_map.sum()) == math.ceil(0.4 * 90)
    assert profile.model.model_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert profile.reference.task == "variable_tracking" and profile.reference.num_samples == 2
    auto_dtype = "bfloat16" if torch.cuda.is_available() else "float32"  # --dtype auto: bf16 on a GPU
    assert profile.provenance["dtype"] == auto_dtype and profile.provenance["tool"].startswith("catekv_profiler")
    assert not smollm2_profile.with_name(smollm2_profile.name + ".ckpt").exists()


def test_cli_show_reports_agreement_and_draws(smollm2_profile, tmp_path):
    png = tmp_path / "map.png"
    result = CliRunner().invoke(main, ["show", str(smollm2_profile), "--png", str(png)])
    assert result.exit_code == 0, result.output
    assert "agreement" in result.output.lower()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    as_json = CliRunner().invoke(main, ["show", str(smollm2_profile), "--json"])
    assert json.loads(as_json.output)["agreement"]["num_samples"] == 2


def test_cli_refuses_to_overwrite(smollm2_profile):
    result = CliRunner().invoke(main, ["smollm2-135m", "-o", str(smollm2_profile), *SMALL])
    assert result.exit_code != 0 and "--overwrite" in result.output


def test_setup_reproduces_the_shipped_profile(smollm2):
    """README's set-up claim: the shipped 2K profile's head map and votes, statistics equal up to float32 rounding.

    Its first reference sample, profiled again here, gives the shipped file's statistics within 1e-6 (the
    last bits may differ between CPUs); voting with it in place of the shipped one changes nothing.
    """
    model, tokenizer, info = smollm2
    shipped = ck.load_profile("smollm2-135m-instruct")
    # the parameters README's set-up command gives (-B 512, every other option at its default)
    assert shipped.params == ProfileParams.for_budget(512)
    assert (shipped.reference.context_length, shipped.reference.num_samples) == (2048, 8)
    ref = shipped.reference
    sample = variable_tracking_samples(tokenizer, 1, ref.context_length, seed=ref.seed)
    again = profile_model(model, info.spec(), sample, shipped.params, dataclasses.replace(ref, num_samples=1))
    for name in ("cv", "threshold", "hit_mean"):
        torch.testing.assert_close(getattr(again, name)[0], getattr(shipped, name)[0], rtol=1e-5, atol=1e-6)
    cv, threshold, hit_mean = (torch.cat([getattr(again, name), getattr(shipped, name)[1:]])
                               for name in ("cv", "threshold", "hit_mean"))
    revoted = ck.Profile.from_statistics(cv, threshold, hit_mean, shipped.params, shipped.model, shipped.reference)
    for name in ("head_map", "votes", "budgets"):
        assert torch.equal(getattr(revoted, name), getattr(shipped, name)), name


@pytest.mark.parametrize(
    "args, message",
    [
        (["-k", "1.5"], "percentile"),
        (["--eta", "0"], "eta"),
        (["-r", "2"], "adaptive ratio"),
        (["--alpha", "-1"], "alpha"),
        (["-L", "100000"], "100000 exceeds the model's maximum of 8192 tokens"),
    ],
)
def test_cli_bad_parameters(tmp_path, args, message, smollm2, no_weights):
    """Refused before the weights load (-L: from the GGUF file's config)."""
    out = tmp_path / "x.safetensors"
    result = CliRunner().invoke(main, ["smollm2-135m", "-o", str(out), *SMALL, *args])
    assert result.exit_code != 0
    assert message in result.output
    assert not out.exists()


def test_cli_reference_file_too_short(tmp_path, smollm2):
    ref = tmp_path / "ref.jsonl"
    ref.write_text(json.dumps({"text": "far too short"}) + "\n")
    out = tmp_path / "x.safetensors"
    result = CliRunner().invoke(main, ["smollm2-135m", "-o", str(out), *SMALL, "--reference", str(ref)])
    assert result.exit_code != 0 and "fewer than" in result.output
    assert not out.exists()


# ------------------------------------------------------------------------- a model split by a device map


def save_with_byte_tokenizer(model, folder) -> None:
    """Save ``model`` with a one-token-per-byte tokenizer, built offline, so the CLI can load the folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    bpe = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    model.save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=bpe).save_pretrained(folder)


def per_layer_map(model, device: str = "cpu") -> dict[str, str]:
    """A device map naming every top-level module and each decoder layer (what a 2-GPU split looks like)."""
    layers = {f"model.layers.{i}": device for i in range(model.config.num_hidden_layers)}
    return {"model.embed_tokens": device, **layers, "model.norm": device, "model.rotary_emb": device,
            "lm_head": device}


def test_statistics_through_accelerate_hooks_equal_plain():
    """With accelerate's hooks on every layer (as a model split over GPUs has), the statistics are the same."""
    from accelerate import dispatch_model

    model = make_tiny_model("llama")
    ids = random_samples(model, 1, 120)[0].input_ids
    plain = sample_statistics(model, ids, PARAMS)
    hooked = dispatch_model(make_tiny_model("llama"), device_map=per_layer_map(model), force_hooks=True)
    assert hasattr(hooked.model.layers[0], "_hf_hook")
    split = sample_statistics(hooked, ids, PARAMS)
    for name in plain:
        assert split[name].device.type == "cpu"
        torch.testing.assert_close(split[name], plain[name], rtol=0, atol=0)


def test_cli_device_map_gives_the_same_profile(tmp_path):
    save_with_byte_tokenizer(make_tiny_model("llama", seed=5), tmp_path / "model")
    args = ["-L", "512", "-n", "2", "-B", "64", "--obs-window", "16", "--init-tokens", "4", "--recent-tokens", "16",
            "--chunk-size", "4", "-q"]
    runs = {}
    # accelerate's "auto" places the model on the GPU when there is one: compare against that device.
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    layers = per_layer_map(make_tiny_model("llama"), device)
    for name, where in (("device", ["--device", device]), ("strategy", ["--device-map", "auto"]),
                        ("layers", ["--device-map", json.dumps(layers)])):
        out = tmp_path / f"{name}.safetensors"
        result = CliRunner().invoke(main, [str(tmp_path / "model"), "-o", str(out), *args, *where])
        assert result.exit_code == 0, result.output
        # A strategy without a GPU splits nothing: the run says so.
        warned = "no GPU is visible, so --device-map auto puts the whole model on the CPU" in result.output
        assert warned == (name == "strategy" and not torch.cuda.is_available()), result.output
        runs[name] = ck.load_profile(out)
    for name in ("strategy", "layers"):
        assert torch.equal(runs[name].cv, runs["device"].cv)
        assert torch.equal(runs[name].head_map, runs["device"].head_map)
        assert runs[name].provenance["device"] == device


@pytest.mark.parametrize(
    "where, message",
    [
        (["--device-map", "everywhere"], "unknown device map"),
        (["--device-map", "{not json"], "not valid JSON"),
        (["--device-map", '{"model.layers.0": [0]}'], "is not a device"),
        (["--device-map", "auto", "--device", "cpu"], "either --device or --device-map"),
    ],
)
def test_cli_bad_device_map(tmp_path, where, message):
    save_with_byte_tokenizer(make_tiny_model("llama"), tmp_path / "model")
    out = tmp_path / "x.safetensors"
    result = CliRunner().invoke(main, [str(tmp_path / "model"), "-o", str(out), "-q", *where])
    assert result.exit_code != 0 and message in result.output, result.output
    assert not out.exists()


# ------------------------------------------------------------------------- calibration (--calibrate)

CALIBRATE = ["--calibrate", "--grid-k", "0.9,0.99", "--grid-alpha", "1.0", "--calibration-tasks", "niah_single_1,vt",
             "--calibration-samples", "2", "--calibration-length", "1024", "--calibration-seed", "5",
             "--calibration-ratios", "0.2,0.4"]


def calibrated(out: Path, *args: str) -> tuple[ck.Profile, list[dict]]:
    """The profile ``catekv-profile smollm2-135m --calibrate`` (the small settings and ``args``) writes to ``out``,
    and its calibration table."""
    result = CliRunner().invoke(main, ["smollm2-135m", "-o", str(out), *SMALL, *CALIBRATE, *args], obj=CALIBRATOR)
    assert result.exit_code == 0, result.output
    profile = ck.load_profile(out)
    return profile, json.loads(profile.calibration["table"])


def test_cli_calibrate_picks_by_the_one_standard_error_rule(tmp_path, smollm2):
    out = tmp_path / "calibrated.safetensors"
    profile, table = calibrated(out, "--calibration-rule", "one-se")
    assert [(row["k"], row["alpha"]) for row in table] == [(0.9, 1.0), (0.99, 1.0)]
    best = max(table, key=lambda row: row["score"])
    chosen = next(row for row in table if (row["k"], row["alpha"]) == (profile.params.percentile, profile.params.alpha))
    # The best setting, unless it is within one standard error of the paper's default (k 0.99), which then stays.
    assert profile.calibration["rule"] == "one-se"
    if chosen is not best:
        assert (chosen["k"], chosen["alpha"]) == (0.99, 1.0)
        assert best["score"] - chosen["score"] <= best["se_vs_chosen"] + 0.01  # scores are rounded to 0.01
    assert profile.calibration["seed"] == "5" and profile.calibration["tasks"] == "niah_single_1,vt"
    assert profile.calibration["ratios"] == "0.2,0.4" and profile.params.adaptive_ratio == ck.ProfileParams().adaptive_ratio
    for row in table:
        assert set(row["tasks"]) == {"niah_single_1", "vt"} and set(row["by_ratio"]) == {"0.2", "0.4"}
        # The score is the mean over the ratios of the mean over the tasks (each rounded to 0.01).
        assert row["score"] == pytest.approx(sum(row["by_ratio"].values()) / 2, abs=0.01)
        assert row["score"] == pytest.approx(sum(row["tasks"].values()) / 2, abs=0.02)
        assert row["se_vs_chosen"] >= 0
    assert chosen["se_vs_chosen"] == 0  # its differences to itself
    # The chosen setting's head map is the one a plain profiling run with that k and alpha writes.
    plain = tmp_path / "plain.safetensors"
    k, alpha = profile.params.percentile, profile.params.alpha
    assert CliRunner().invoke(main, ["smollm2-135m", "-o", str(plain), *SMALL, "-k", str(k), "--alpha", str(alpha)]).exit_code == 0
    assert torch.equal(ck.load_profile(plain).head_map, profile.head_map)
    assert torch.equal(ck.load_profile(plain).cv, profile.cv)
    shown = CliRunner().invoke(main, ["show", str(out)])
    assert "Calibration" in shown.output and "<- chosen" in shown.output and "at r=0.2" in shown.output
    assert "the chosen" in shown.output and "rule: the paper's k 0.99" in shown.output


def test_cli_calibrate_at_one_memory_budget_chooses_r_too(tmp_path, smollm2):
    """--calibrate --kv-fraction: every r is scored with its budget for the fraction, k and alpha are chosen as
    without it, then r is the chosen setting's best; the profile is the chosen statistics retargeted there."""
    from catekv_runtime.profile import retarget

    out = tmp_path / "calibrated.safetensors"
    profile, table = calibrated(out, "--kv-fraction", "0.7")
    chosen = json.loads(profile.calibration["chosen"])
    row = next(r for r in table if (r["k"], r["alpha"]) == (chosen["k"], chosen["alpha"]))
    by_ratio = {float(r): score for r, score in row["by_ratio"].items()}
    assert by_ratio[chosen["r"]] == max(by_ratio.values())
    if by_ratio[0.2] == by_ratio[0.4]:
        assert chosen["r"] == 0.4  # ties to the profile's own r (-r, default 0.4)
    plain = tmp_path / "plain.safetensors"
    assert CliRunner().invoke(main, ["smollm2-135m", "-o", str(plain), *SMALL, "-k", str(chosen["k"]), "--alpha",
                                     str(chosen["alpha"])]).exit_code == 0
    expected = retarget(ck.load_profile(plain), adaptive_ratio=chosen["r"], kv_fraction=0.7)
    assert profile.params == expected.params and torch.equal(profile.head_map, expected.head_map)
    assert chosen["budget"] == profile.params.budget and profile.calibration["kv_fraction"] == "0.7"
    assert profile.kv_kept_fraction(192) <= 0.7 and profile.provenance["statistics_windows"].startswith('{"budget": 64')
    assert f"r = {chosen['r']:g} (budget {profile.params.budget}) scored best" in CliRunner().invoke(
        main, ["show", str(out)]).output


def test_cli_kv_fraction_sets_the_budget_after_the_vote(tmp_path, smollm2):
    """--kv-fraction without --calibrate: the profile is the plain one retargeted to the fraction at its r; a
    fraction below the adaptive heads' share is one line after profiling, and the statistics stay checkpointed, so a
    second run with another fraction writes the profile from them."""
    from catekv_runtime.profile import retarget

    plain, out = tmp_path / "plain.safetensors", tmp_path / "x.safetensors"
    assert CliRunner().invoke(main, ["smollm2-135m", "-o", str(plain), *SMALL]).exit_code == 0
    refused = CliRunner().invoke(main, ["smollm2-135m", "-o", str(out), *SMALL, "--kv-fraction", "0.2"])
    assert refused.exit_code == 1 and "--kv-fraction: at r = 0.4 the adaptive heads alone keep" in refused.output
    assert not out.exists() and out.with_name(out.name + ".ckpt").exists()
    result = CliRunner().invoke(main, ["smollm2-135m", "-o", str(out), *SMALL, "--kv-fraction", "0.6"])
    assert result.exit_code == 0, result.output
    expected = retarget(ck.load_profile(plain), kv_fraction=0.6)
    written = ck.load_profile(out)
    assert written.params == expected.params and torch.equal(written.head_map, expected.head_map)
    assert torch.equal(written.cv, expected.cv) and f"budget {expected.params.budget})" in result.output


def test_one_standard_error_rule_keeps_the_default_inside_the_noise():
    """calibrate's choice: the best setting only when it beats k 0.99 / alpha 1 by more than one paired SE."""
    import statistics

    from catekv_eval.calibrate import choose_setting

    default = [100, 0, 100, 0, 100, 0, 100, 0]
    lucky = [100, 100, 0, 0, 100, 25, 100, 0]  # 3.1 points better, on two samples out of eight
    clearly = [100, 100, 100, 100, 100, 100, 100, 0]  # 37.5 points better on most samples

    def rows(*settings):
        return [{"k": k, "alpha": a, "score": statistics.mean(s)} for k, a, s in settings]

    def margin_and_se(better, base):
        diffs = [x - y for x, y in zip(better, base)]
        return statistics.mean(diffs), statistics.stdev(diffs) / len(diffs) ** 0.5

    margin, se = margin_and_se(lucky, default)
    assert 0 < margin < se  # the test's premise: inside the noise
    margin, se = margin_and_se(clearly, default)
    assert margin > se  # and outside it
    noisy = rows((0.99, 1.0, default), (0.95, 1.0, lucky))
    assert choose_setting(noisy, [default, lucky], "one-se") == 0
    assert choose_setting(noisy, [default, lucky], "best") == 1
    clear = rows((0.95, 1.0, clearly), (0.99, 1.0, default))
    assert choose_setting(clear, [clearly, default], "one-se") == 0
    # Without the default among the settings the rule has nothing to keep: the best wins.
    assert choose_setting(rows((0.95, 1.0, lucky), (0.9, 1.0, default)), [lucky, default], "one-se") == 0
    # The default wins ties under either rule.
    tie = rows((0.95, 1.0, default), (0.99, 1.0, default))
    assert choose_setting(tie, [default, default], "best") == 1 == choose_setting(tie, [default, default], "one-se")


@pytest.mark.parametrize(
    "args, message",
    [
        (["-k", "0.95"], "exclude each other"),
        (["--grid-k", "0.9,x"], "comma-separated"),
        (["--grid-k", "1.2"], "percentile"),
        (["--calibration-tasks", "nope"], "unknown tasks"),
        (["--calibration-samples", "0"], ">= 1"),
        (["--calibration-ratios", "0.2,x"], "comma-separated"),
        (["--calibration-ratios", "1.5"], "adaptive ratio r must be in [0, 1]"),
        (["--calibration-rule", "median"], "is not one of"),
    ],
)
def test_cli_calibrate_bad_parameters(tmp_path, args, message):
    out = tmp_path / "x.safetensors"
    result = CliRunner().invoke(main, ["smollm2-135m", "-o", str(out), *SMALL, *CALIBRATE, *args], obj=CALIBRATOR)
    assert result.exit_code != 0
    assert message in result.output
    assert not out.exists()


def test_cli_calibrate_without_a_calibrator_says_where_one_is(tmp_path, no_model):
    """The profiler's CLI alone (python -m catekv_profiler) has no scorer: the evaluation's is plugged in by
    catekv-profile's console script, catekv_eval.calibrate.main."""
    out = tmp_path / "x.safetensors"
    result = CliRunner().invoke(main, ["smollm2-135m", "-o", str(out), *SMALL, *CALIBRATE])
    assert result.exit_code == 2 and "python -m catekv_eval.calibrate" in result.output, result.output
    assert not out.exists()


def test_the_catekv_profile_command_has_the_calibrator():
    """pyproject's catekv-profile starts the profiler's CLI with catekv_eval's calibrator."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["catekv-profile"] == "catekv_eval.calibrate:main"
    code = ("import sys\nfrom catekv_eval.calibrate import main\nsys.argv = ['catekv-profile', 'profile', '--help']\n"
            "main()\n")
    assert "--calibrate" in fresh_python(code)


def test_the_profiler_imports_nothing_of_the_evaluation():
    """Layering: catekv_eval builds on the profiler, so no profiler module may load a catekv_eval module."""
    code = (
        "import importlib, pkgutil, sys, catekv_profiler\n"
        "for module in pkgutil.walk_packages(catekv_profiler.__path__, 'catekv_profiler.'):\n"
        "    if module.name != 'catekv_profiler.__main__':\n"
        "        importlib.import_module(module.name)\n"
        "print(sorted(name for name in sys.modules if name.startswith(('catekv_eval', 'catekv_serve'))))\n"
    )
    assert fresh_python(code) == "[]\n"

# ------------------------------------------------------------------------- bad input, refused before any compute


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: what these tests give must be refused before."""
    import catekv_models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(catekv_models, "load_model", refuse)


@pytest.fixture
def no_weights(monkeypatch):
    """Loading a model's weights (its config is fine) fails the test."""
    from transformers import AutoModelForCausalLM

    def refuse(*args, **kwargs):
        raise AssertionError("the model's weights were loaded")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


def assert_usage_error(result, *fragments: str) -> None:
    """Exit code 2, one line of error naming each fragment, no traceback."""
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    error = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1, result.output
    for fragment in fragments:
        assert fragment in error[0], result.output


def test_cli_output_that_cannot_be_written(unwritable_dir, no_model):
    """-o in a directory that cannot be written: refused before the model loads, and nothing is left behind."""
    before = sorted(unwritable_dir.iterdir()) if unwritable_dir.is_dir() else unwritable_dir.read_text()
    out = unwritable_dir / "out.safetensors"
    result = CliRunner().invoke(main, ["smollm2-135m", "-o", str(out), *SMALL])
    assert_usage_error(result, "'-o' / '--output'", f"cannot write {out}")
    assert (sorted(unwritable_dir.iterdir()) if unwritable_dir.is_dir() else unwritable_dir.read_text()) == before


def test_cli_output_that_is_a_directory(tmp_path, no_model):
    assert_usage_error(CliRunner().invoke(main, ["smollm2-135m", "-o", str(tmp_path), "--overwrite", *SMALL]),
                       f"'{tmp_path}' is a directory")


def test_cli_context_length_below_what_the_parameters_need(tmp_path, no_model):
    result = CliRunner().invoke(main, ["smollm2-135m", "-o", str(tmp_path / "x.safetensors"), *SMALL, "-L", "30"])
    assert_usage_error(result, "30 is shorter than the 72 tokens", "observation window (16)")  # 16 + 4 + 16 + 32 + 4
    assert not any(tmp_path.iterdir())


def test_cli_context_length_beyond_the_model_is_refused_from_its_config(tmp_path, no_weights):
    save_with_byte_tokenizer(make_tiny_model("llama"), tmp_path / "model")  # max_position_embeddings 4096
    out = tmp_path / "x.safetensors"
    result = CliRunner().invoke(main, [str(tmp_path / "model"), "-o", str(out), *SMALL, "-L", "5000"])
    assert_usage_error(result, "5000 exceeds the model's maximum of 4096 tokens")
    assert not out.exists() and not out.with_name(out.name + ".ckpt").exists()


def test_cli_show_png_that_cannot_be_written(unwritable_dir):
    png = unwritable_dir / "h.png"
    result = CliRunner().invoke(main, ["show", "smollm2-135m-instruct", "--png", str(png)])
    assert_usage_error(result, "'--png'", f"cannot write {png}")
    assert not png.exists() and not result.output.startswith("CateKV profile")  # checked before the summary


@pytest.mark.parametrize("length", ["0", "-100"])
def test_cli_show_refuses_a_context_length_below_one(length):
    result = CliRunner().invoke(main, ["show", "smollm2-135m-instruct", "-L", length])
    assert_usage_error(result, "'--context-length' / '-L'", f"{length} is not in the range x>=1")


def test_cli_show_a_directory(tmp_path):
    result = CliRunner().invoke(main, ["show", str(tmp_path)])
    assert result.exit_code == 1 and "is a directory, not a profile file" in result.output, result.output


def test_cli_retarget_writes_the_profile_at_another_ratio_and_memory(tmp_path):
    """``retarget`` on a shipped profile by name: the file is ``retarget`` of it (head map, budget, parameters) and
    says so in ``show``; an existing output is kept unless --overwrite; bad requests are one-line errors."""
    from catekv_runtime.profile import retarget

    out = tmp_path / "r.safetensors"
    result = CliRunner().invoke(main, ["retarget", "smollm2-135m-instruct", "-o", str(out), "-r", "0.2",
                                       "--kv-fraction", "0.43"])
    assert result.exit_code == 0, result.output
    expected = retarget(ck.load_profile("smollm2-135m-instruct"), adaptive_ratio=0.2, kv_fraction=0.43)
    written = ck.load_profile(out)
    assert written.params == expected.params and torch.equal(written.head_map, expected.head_map)
    assert f"-> {written.params.budget} " in result.output and "of the KV kept at 2048 tokens" in result.output
    assert "statistics_windows" in CliRunner().invoke(main, ["show", str(out)]).output
    before = out.read_bytes()
    assert_usage_error(CliRunner().invoke(main, ["retarget", "smollm2-135m-instruct", "-o", str(out), "-B", "512"]),
                       "exists; pass --overwrite")
    assert out.read_bytes() == before
    assert_usage_error(CliRunner().invoke(main, ["retarget", "smollm2-135m-instruct", "-o", str(tmp_path / "x"),
                                                 "-L", "8192"]), "give --kv-fraction too")
    refused = CliRunner().invoke(main, ["retarget", "smollm2-135m-instruct", "-o", str(tmp_path / "y"),
                                        "-r", "0.6", "--kv-fraction", "0.3"])
    assert refused.exit_code == 1 and "the adaptive heads alone keep" in refused.output, refused.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_paired_standard_error_is_that_of_the_mean_difference():
    """calibrate's noise figure: the standard error of the mean of paired differences, against statistics'."""
    import statistics

    from catekv_eval.calibrate import paired_standard_error

    a, b = [100, 0, 100, 100, 0, 50], [100, 100, 0, 100, 0, 25]
    diffs = [x - y for x, y in zip(a, b)]
    assert paired_standard_error(a, b) == pytest.approx(statistics.stdev(diffs) / len(diffs) ** 0.5)
    assert paired_standard_error(a, a) == 0 and paired_standard_error([1.0], [0.0]) == 0
    with pytest.raises(ValueError):
        paired_standard_error(a, b[:-1])  # unpaired
