"""The profile file (docs/profile-format.md): round trip, re-derivation, atomic save, validation on load.

Mutated files are written with safetensors only (load tensors + metadata, change, ``save_file``); no pickle.
"""

from __future__ import annotations

import dataclasses
import math
import os
import stat
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import catekv_runtime.files as files_module
from catekv_runtime.profile import (
    FORMAT_NAME,
    FORMAT_VERSION,
    UNLIMITED_BUDGET,
    ModelSpec,
    Profile,
    ProfileError,
    ProfileParams,
    ReferenceSpec,
    load_profile,
)

SAMPLES, LAYERS, HEADS = 3, 4, 2

MODEL = ModelSpec(
    model_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    revision="0123abcd",
    architecture="LlamaForCausalLM",
    num_layers=LAYERS,
    num_kv_heads=HEADS,
    num_attention_heads=3 * HEADS,
    head_dim=64,
)
REFERENCE = ReferenceSpec(task="variable_tracking", context_length=4096, num_samples=SAMPLES, seed=7, text_hash="ab" * 32)
PARAMS = ProfileParams.for_budget(256, percentile=0.99, alpha=0.8, adaptive_ratio=0.4, eta=1.0, chunk_size=8, obs_window=32)
PROVENANCE = {"tool": "catekv_profiler 0.1.0", "created": "2025-01-01T00:00:00+00:00", "device": "cpu", "dtype": "float32"}

EXPECTED_KEYS = {
    "format",
    "format_version",
    *(f"param.{f.name}" for f in dataclasses.fields(ProfileParams)),
    *(f"model.{f.name}" for f in dataclasses.fields(ModelSpec)),
    *(f"reference.{f.name}" for f in dataclasses.fields(ReferenceSpec)),
    *(f"provenance.{k}" for k in PROVENANCE),
}


def statistics(seed: int = 0, samples: int = SAMPLES, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    cv = (0.2 + 3 * torch.rand(samples, LAYERS, HEADS, generator=g)).to(dtype)
    threshold = (1e-3 * torch.rand(samples, LAYERS, HEADS, generator=g)).to(dtype)
    hit_mean = (32 * torch.rand(samples, LAYERS, HEADS, generator=g)).to(dtype)
    return cv, threshold, hit_mean


def make_profile(params: ProfileParams = PARAMS, seed: int = 0) -> Profile:
    cv, threshold, hit_mean = statistics(seed)
    return Profile.from_statistics(cv, threshold, hit_mean, params, MODEL, REFERENCE, PROVENANCE)


def exact_ceil(r: float, n: int) -> int:
    return math.ceil(Fraction(repr(r)) * n)


def assert_same_profile(a: Profile, b: Profile) -> None:
    for name in ("head_map", "budgets", "cv", "threshold", "hit_mean", "votes"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype, name
        assert torch.equal(x, y), name
    assert a.params == b.params
    assert a.model == b.model
    assert a.reference == b.reference
    assert a.provenance == b.provenance


def read_raw(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
    return tensors, metadata


def rewrite(src: Path, dst: Path, *, tensors=None, drop_tensors=(), metadata=None, drop_keys=()) -> Path:
    """A copy of ``src`` with some tensors / metadata entries replaced or removed (safetensors only)."""
    t, m = read_raw(src)
    t.update(tensors or {})
    for name in drop_tensors:
        del t[name]
    m.update(metadata or {})
    for key in drop_keys:
        del m[key]
    save_file(t, str(dst), metadata=m)
    return dst


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    return make_profile().save(tmp_path / "profile.safetensors")


# ============================================================================ round trip


def test_round_trip_preserves_everything(saved: Path):
    original = make_profile()
    loaded = load_profile(saved)
    assert_same_profile(original, loaded)
    assert loaded.head_map.dtype == torch.bool and loaded.head_map.shape == (LAYERS, HEADS)
    assert loaded.votes.dtype == torch.int64
    assert loaded.budgets.dtype == torch.int64
    assert loaded.cv.shape == loaded.threshold.shape == loaded.hit_mean.shape == (SAMPLES, LAYERS, HEADS)
    assert load_profile(str(saved)).params == PARAMS  # str paths too


def test_file_layout_is_as_documented(saved: Path):
    tensors, metadata = read_raw(saved)
    assert {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()} == {
        "head_map": (torch.int8, (LAYERS, HEADS)),
        "budgets": (torch.int64, (LAYERS, HEADS)),
        "cv": (torch.float32, (SAMPLES, LAYERS, HEADS)),
        "threshold": (torch.float32, (SAMPLES, LAYERS, HEADS)),
        "hit_mean": (torch.float32, (SAMPLES, LAYERS, HEADS)),
        "votes": (torch.int64, (LAYERS, HEADS)),
    }
    assert set(metadata) == EXPECTED_KEYS
    assert metadata["format"] == FORMAT_NAME == "catekv-profile"
    assert metadata["format_version"] == str(FORMAT_VERSION) == "2"
    assert metadata["param.percentile"] == "0.99"
    assert metadata["param.budget"] == "256"
    assert metadata["param.init_tokens"] == "8" and metadata["param.recent_tokens"] == "32"
    assert metadata["model.num_layers"] == str(LAYERS)
    assert set(tensors["head_map"].unique().tolist()) <= {0, 1}
    budgets = tensors["budgets"]
    assert torch.equal(budgets == UNLIMITED_BUDGET, tensors["head_map"].bool())
    assert (budgets[~tensors["head_map"].bool()] == 256).all()
    assert int(tensors["head_map"].sum()) == exact_ceil(0.4, LAYERS * HEADS)


def test_round_trip_of_float64_statistics(tmp_path: Path):
    """from_statistics accepts float64 CVs; the saved file must load (it stores CVs as float32).

    Two CVs that differ by less than float32 resolution: voting on the float64 values and voting on the
    stored float32 values must give the same head map, or the file cannot be loaded again.
    """
    cv = torch.tensor([[[1.0 + 1e-12, 1.0]]], dtype=torch.float64)
    model = dataclasses.replace(MODEL, num_layers=1, num_kv_heads=2)
    reference = dataclasses.replace(REFERENCE, num_samples=1)
    params = dataclasses.replace(PARAMS, adaptive_ratio=0.5)
    profile = Profile.from_statistics(cv, torch.zeros_like(cv), torch.zeros_like(cv), params, model, reference)
    path = profile.save(tmp_path / "p.safetensors")
    try:
        loaded = load_profile(path)
    except ProfileError as e:
        pytest.fail(
            "BUG catekv_runtime/profile.py Profile.from_statistics: votes on the caller's float64 CVs but stores "
            f"float32 CVs, so load_profile re-derives another head map and rejects the file it saved: {e}"
        )
    assert torch.equal(loaded.head_map, profile.head_map), "BUG: head map changed by the float32 round trip"
    assert torch.equal(profile.with_adaptive_ratio(0.5).head_map, profile.head_map), (
        "BUG: with_adaptive_ratio(r) with the profile's own r changes the head map (voted on float64, stored float32)"
    )


# ============================================================================ re-derivation for another r


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.25, 0.4, 0.5, 0.9, 1.0])
def test_with_adaptive_ratio(ratio: float, tmp_path: Path):
    profile = make_profile()
    other = profile.with_adaptive_ratio(ratio)
    assert int(other.head_map.sum()) == exact_ceil(ratio, LAYERS * HEADS)
    assert other.params == dataclasses.replace(PARAMS, adaptive_ratio=ratio)
    cv, threshold, hit_mean = statistics()
    fresh = Profile.from_statistics(
        cv, threshold, hit_mean, dataclasses.replace(PARAMS, adaptive_ratio=ratio), MODEL, REFERENCE, PROVENANCE
    )
    assert_same_profile(other, fresh)
    assert torch.equal(other.budgets, torch.where(other.head_map, -1, PARAMS.budget))
    # and it survives its own round trip
    assert_same_profile(load_profile(other.save(tmp_path / "r.safetensors")), other)
    # the original is untouched (frozen dataclass, new tensors)
    assert profile.params.adaptive_ratio == 0.4


def test_with_adaptive_ratio_rejects_out_of_range():
    with pytest.raises(ProfileError, match="adaptive ratio"):
        make_profile().with_adaptive_ratio(1.5)


# ============================================================================ KV kept fraction


def test_kv_kept_fraction_by_hand():
    # B = 64, L_init = 4, L_rec = 8, c = 4: a consistent head keeps (64 - 4 - 8) / 4 = 13 middle chunks
    params = ProfileParams(budget=64, init_tokens=4, recent_tokens=8, chunk_size=4, obs_window=16, adaptive_ratio=0.25,
                           reserve_tokens=0)
    profile = make_profile(params)
    assert int(profile.head_map.sum()) == 2 and profile.adaptive_fraction == 0.25  # 2 of 8 heads adaptive
    # n = 100: 22 middle chunks (88 tokens), tail 100 - 4 - 88 = 8
    # eta = 1: adaptive heads keep all 100, consistent 4 + 13 * 4 + 8 = 64
    assert profile.kv_kept_fraction(100) == pytest.approx((0.25 * 100 + 0.75 * 64) / 100)  # 0.73
    # n = 101: still 22 chunks, tail 9: consistent 4 + 52 + 9 = 65
    assert profile.kv_kept_fraction(101) == pytest.approx((0.25 * 101 + 0.75 * 65) / 101)
    # eta = 0.5: floor(11) = 11 chunks: 4 + 44 + 8 = 56
    half = profile.replace_params(dataclasses.replace(params, eta=0.5))
    assert half.kv_kept_fraction(100) == pytest.approx((0.25 * 56 + 0.75 * 64) / 100)  # 0.62
    # eta = 0.3: floor(6.6) = 6 chunks (the authors' int()): 4 + 24 + 8 = 36
    third = profile.replace_params(dataclasses.replace(params, eta=0.3))
    assert third.kv_kept_fraction(100) == pytest.approx((0.25 * 36 + 0.75 * 64) / 100)  # 0.57
    # a reserve of 10 tokens is 2 whole chunks: 20 middle chunks, tail 100 - 4 - 80 = 16: consistent 4 + 52 + 16
    reserved = profile.replace_params(dataclasses.replace(params, reserve_tokens=10))
    assert reserved.kv_kept_fraction(100) == pytest.approx((0.25 * 100 + 0.75 * 72) / 100)
    # short prompts: 2 chunks (fewer than 13) or none: everything is kept
    assert profile.kv_kept_fraction(20) == 1.0
    assert profile.kv_kept_fraction(10) == 1.0


# ============================================================================ atomic save


def test_save_leaves_no_temporary_files(tmp_path: Path):
    target = tmp_path / "sub" / "dir" / "profile.safetensors"
    make_profile().save(target)
    make_profile(seed=1).save(target)  # overwrite
    assert [p.name for p in target.parent.iterdir()] == ["profile.safetensors"]
    assert torch.equal(load_profile(target).cv, make_profile(seed=1).cv)


def test_saved_profile_is_readable_by_everyone(tmp_path: Path):
    """0644, as a file meant to be shared (safetensors' save_file leaves its output 0600: the mode is set after)."""
    target = make_profile().save(tmp_path / "profile.safetensors")
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_failed_save_keeps_existing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    target = make_profile().save(tmp_path / "profile.safetensors")
    before = target.read_bytes()
    real_save = files_module.save_file

    def save_then_fail(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:  # a half-written temporary file
            f.truncate(os.path.getsize(filename) // 2)
        raise OSError("No space left on device")

    monkeypatch.setattr(files_module, "save_file", save_then_fail)
    with pytest.raises(OSError, match="No space"):
        make_profile(seed=1).save(target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["profile.safetensors"]
    assert_same_profile(load_profile(target), make_profile())


# ============================================================================ load errors


def expect_error(path, *fragments: str) -> str:
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def test_missing_file(tmp_path: Path):
    expect_error(tmp_path / "nope.safetensors", "not found", "nope.safetensors")


def test_truncated_file(saved: Path, tmp_path: Path):
    data = saved.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    expect_error(cut, "cut.safetensors", "truncated or corrupted")


def test_random_bytes(tmp_path: Path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).numpy().tobytes())
    expect_error(junk, "junk.safetensors", "not a safetensors file")


def test_empty_file(tmp_path: Path):
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    expect_error(empty, "not a safetensors file")


def test_json_file_is_not_a_safetensors_file(tmp_path: Path):
    """A file of another kind is named as such, not as a damaged profile."""
    other = tmp_path / "profile.json"
    other.write_text('{"format": "catekv-profile", "head_map": [[0, 1]]}')
    message = expect_error(other, "profile.json", "not a safetensors file")
    assert "truncated" not in message


def test_directory_is_not_a_profile(tmp_path: Path):
    message = expect_error(tmp_path, "is a directory", "pass the .safetensors file")
    assert "not found" not in message


def test_safetensors_file_that_is_not_a_profile(saved: Path, tmp_path: Path):
    expect_error(rewrite(saved, tmp_path / "a.safetensors", metadata={"format": "pt"}), "not a CateKV profile", "'pt'")
    plain = tmp_path / "plain.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(plain))  # no metadata at all
    expect_error(plain, "not a CateKV profile")


def test_unknown_format_version(saved: Path, tmp_path: Path):
    expect_error(rewrite(saved, tmp_path / "v3.safetensors", metadata={"format_version": "3"}),
                 "unsupported profile format version '3'", "upgrade catekv")
    expect_error(rewrite(saved, tmp_path / "vx.safetensors", metadata={"format_version": "one"}), "format version")
    expect_error(rewrite(saved, tmp_path / "v0.safetensors", drop_keys=["format_version"]), "format version")


@pytest.mark.parametrize("key", ["param.budget", "model.head_dim", "reference.num_samples", "model.model_id"])
def test_missing_metadata_key(saved: Path, tmp_path: Path, key: str):
    expect_error(rewrite(saved, tmp_path / "m.safetensors", drop_keys=[key]), f"metadata key {key!r} is missing")


def test_unparsable_metadata_value(saved: Path, tmp_path: Path):
    expect_error(rewrite(saved, tmp_path / "a.safetensors", metadata={"param.budget": "2k"}), "'param.budget'", "'2k'")
    expect_error(rewrite(saved, tmp_path / "b.safetensors", metadata={"param.alpha": "nan"}), "'param.alpha'")


@pytest.mark.parametrize(
    "name,tensor",
    [
        ("cv", torch.ones(SAMPLES - 1, LAYERS, HEADS)),  # one sample short of reference.num_samples
        ("threshold", torch.ones(SAMPLES, LAYERS, HEADS + 1)),
        ("head_map", torch.zeros(LAYERS, HEADS, dtype=torch.int64)),  # wrong dtype
        ("votes", torch.zeros(LAYERS * HEADS, dtype=torch.int64)),
    ],
)
def test_wrong_tensor_shape_or_dtype(saved: Path, tmp_path: Path, name: str, tensor: torch.Tensor):
    message = expect_error(rewrite(saved, tmp_path / "s.safetensors", tensors={name: tensor}), f"tensor {name!r}",
                           "expected")
    # The dimensions named are those of this tensor: per-sample statistics have three, the head map two.
    dims = "num_samples x num_layers x num_kv_heads" if name in ("cv", "threshold") else "(num_layers x num_kv_heads"
    assert dims in message


def test_missing_tensor(saved: Path, tmp_path: Path):
    expect_error(rewrite(saved, tmp_path / "t.safetensors", drop_tensors=["hit_mean"]), "missing tensors ['hit_mean']")


@pytest.mark.parametrize("index", range(LAYERS * HEADS))
def test_flipped_head_map_entry_is_detected(saved: Path, tmp_path: Path, index: int):
    tensors, _ = read_raw(saved)
    head_map = tensors["head_map"].clone()
    head_map.view(-1)[index] = 1 - head_map.view(-1)[index]
    budgets = torch.where(head_map.bool(), UNLIMITED_BUDGET, PARAMS.budget).to(torch.int64)  # consistent budgets
    path = rewrite(saved, tmp_path / "h.safetensors", tensors={"head_map": head_map, "budgets": budgets})
    expect_error(path, "do not follow from the stored statistics", "edited or corrupted")


def test_head_map_values_must_be_0_or_1(saved: Path, tmp_path: Path):
    tensors, _ = read_raw(saved)
    head_map = tensors["head_map"].clone()
    head_map[0, 0] = 2
    expect_error(rewrite(saved, tmp_path / "h.safetensors", tensors={"head_map": head_map}), "only 0")


def test_edited_votes_are_detected(saved: Path, tmp_path: Path):
    tensors, _ = read_raw(saved)
    expect_error(rewrite(saved, tmp_path / "v.safetensors", tensors={"votes": tensors["votes"] + 1}), "votes")


def test_edited_cv_is_detected_when_it_changes_the_head_map(saved: Path, tmp_path: Path):
    tensors, _ = read_raw(saved)
    cv = tensors["cv"].clone()
    consistent = (~tensors["head_map"].bool()).nonzero()[0]
    cv[:, consistent[0], consistent[1]] = 0.0  # the lowest CV in every sample: must become adaptive
    expect_error(rewrite(saved, tmp_path / "c.safetensors", tensors={"cv": cv}), "edited or corrupted")


def test_inconsistent_budgets(saved: Path, tmp_path: Path):
    tensors, _ = read_raw(saved)
    consistent = (~tensors["head_map"].bool()).nonzero()[0]
    # a consistent head below L_init + L_rec
    budgets = tensors["budgets"].clone()
    budgets[consistent[0], consistent[1]] = PARAMS.init_tokens + PARAMS.recent_tokens - 1
    expect_error(rewrite(saved, tmp_path / "b.safetensors", tensors={"budgets": budgets}), "budget", "L_init + L_rec")
    # a consistent head marked unlimited
    budgets[consistent[0], consistent[1]] = UNLIMITED_BUDGET
    expect_error(rewrite(saved, tmp_path / "u.safetensors", tensors={"budgets": budgets}), "budgets", "adaptive")
    # an adaptive head with a finite budget
    budgets = tensors["budgets"].clone()
    adaptive = tensors["head_map"].bool().nonzero()[0]
    budgets[adaptive[0], adaptive[1]] = PARAMS.budget
    expect_error(rewrite(saved, tmp_path / "c.safetensors", tensors={"budgets": budgets}), "budgets", "adaptive")


def test_per_head_budgets_round_trip(saved: Path, tmp_path: Path):
    """Budgets set per head are stored, loaded as they are, and survive only until an override re-derives them."""
    profile = load_profile(saved)
    budgets = profile.budgets.clone()
    consistent = (~profile.head_map).nonzero()
    budgets[consistent[0, 0], consistent[0, 1]] = 2 * PARAMS.budget
    budgets[consistent[1, 0], consistent[1, 1]] = PARAMS.init_tokens + PARAMS.recent_tokens
    path = profile.with_budgets(budgets).save(tmp_path / "per_head.safetensors")
    loaded = load_profile(path)
    assert torch.equal(loaded.budgets, budgets)
    assert torch.equal(loaded.replace_params(PARAMS).budgets, profile.budgets)  # overrides win
    n = 4096
    kept = sum(PARAMS.kept_tokens(n, int(b)) for b in budgets.flatten())
    assert loaded.kv_kept_fraction(n) == pytest.approx(kept / (n * budgets.numel()))
    assert loaded.kv_kept_fraction(n) > profile.kv_kept_fraction(n)


def test_version_1_profile_loads_with_its_old_meaning(saved: Path, tmp_path: Path):
    """A file written before the reserve and the tie rule existed keeps reserve 0 and the exact vote."""
    old = rewrite(saved, tmp_path / "v1.safetensors", metadata={"format_version": "1"},
                  drop_keys=["param.reserve_tokens", "param.tie_rule"])
    loaded = load_profile(old)
    assert loaded.params.reserve_tokens == 0 and loaded.params.tie_rule == "exact"
    assert loaded.params == dataclasses.replace(PARAMS, reserve_tokens=0)
    assert torch.equal(loaded.head_map, load_profile(saved).head_map)
    # a version-2 file must say both
    expect_error(rewrite(saved, tmp_path / "v2.safetensors", drop_keys=["param.reserve_tokens"]),
                 "param.reserve_tokens")


@pytest.mark.parametrize(
    "key,value,fragment",
    [
        ("param.percentile", "1.5", "percentile"),
        ("param.percentile", "0.3", "percentile"),
        ("param.alpha", "-0.1", "alpha"),
        ("param.adaptive_ratio", "1.01", "adaptive ratio"),
        ("param.eta", "0", "eta"),
        ("param.chunk_size", "0", "chunk size"),
        ("param.init_tokens", "300", "budget"),  # 300 + 32 > 256
        # sizes no model or profiling run has
        ("param.obs_window", "1000000000", "exceed the 4096-token reference samples"),
        ("reference.context_length", "64", "exceed the 64-token reference samples"),  # 32 + 8 + 32 + 8 > 64
        ("model.head_dim", "-64", "'model.head_dim'=-64 must be >= 1"),
        ("model.num_attention_heads", "0", "'model.num_attention_heads'=0 must be >= 1"),
        ("model.num_attention_heads", "5", "not a multiple of 'model.num_kv_heads'=2"),
        ("reference.context_length", "0", "'reference.context_length'=0 must be >= 1"),
    ],
)
def test_out_of_range_metadata(saved: Path, tmp_path: Path, key: str, value: str, fragment: str):
    message = expect_error(rewrite(saved, tmp_path / "p.safetensors", metadata={key: value}), fragment)
    assert "p.safetensors" in message
    assert "invalid parameter" in message or not key.startswith("param.")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_non_finite_or_negative_cv(saved: Path, tmp_path: Path, bad: float):
    tensors, _ = read_raw(saved)
    cv = tensors["cv"].clone()
    cv[1, 2, 1] = bad
    expect_error(rewrite(saved, tmp_path / "c.safetensors", tensors={"cv": cv}), "'cv'", "non-finite")


def test_unknown_metadata_keys_are_ignored(saved: Path, tmp_path: Path):
    """Forward compatibility within a version: extra keys are allowed (provenance.* ones are kept)."""
    path = rewrite(saved, tmp_path / "x.safetensors", metadata={"provenance.host": "box", "param.future": "1"})
    loaded = load_profile(path)
    assert loaded.provenance["host"] == "box"
    assert loaded.params == PARAMS


# ============================================================================ check_model


def test_check_model_accepts_the_same_model():
    profile = make_profile()
    profile.check_model(MODEL)
    profile.check_model(dataclasses.replace(MODEL, model_id="huggingfacetb/smollm2-135m-instruct/"))  # normalised
    profile.check_model(dataclasses.replace(MODEL, model_id=""))  # id unknown: shapes only


@pytest.mark.parametrize(
    "change,fragment",
    [
        ({"num_layers": LAYERS + 1}, "num_layers"),
        ({"num_kv_heads": HEADS * 2}, "num_kv_heads"),
        ({"head_dim": 128}, "head_dim"),
        ({"model_id": "meta-llama/Llama-3.1-8B-Instruct"}, "Llama-3.1-8B-Instruct"),
    ],
)
def test_check_model_refuses_another_model(change: dict, fragment: str):
    with pytest.raises(ProfileError) as info:
        make_profile().check_model(dataclasses.replace(MODEL, **change))
    assert fragment in str(info.value)


def test_shipped_profiles_load_by_short_name():
    from catekv_runtime import list_profiles

    names = list_profiles()
    assert "smollm2-135m-instruct" in names and "smollm2-135m-instruct-8k" in names
    profile = load_profile("smollm2-135m-instruct-8k")
    assert profile.params.budget == 2321 and profile.head_map.shape == (30, 3)
    with pytest.raises(ProfileError, match="shipped profiles by short name: .*smollm2-135m-instruct"):
        load_profile("no-such-profile")


@pytest.mark.parametrize("name, source, result", [
    ("smollm2-135m-instruct-4k", "smollm2-4k-calibrated-r0.4-B256", "accuracy_smollm2_4096_kv43_r0.2.json"),
    ("smollm2-135m-instruct-8k", "smollm2-8k-calibrated-r0.4-B512", "accuracy_smollm2_8192_kv43_r0.2.json"),
    ("qwen2.5-coder-0.5b-instruct-16k", "qwen-16k-calibrated-r0.4-B1024", "accuracy_qwen_16384_kv43_catekv_a.json"),
    ("qwen2.5-coder-0.5b-instruct-32k", "qwen-32k-reserve32-k0.99-r0.4-B2048", "accuracy_qwen_32768_kv43_catekv_a.json"),
])
def test_shipped_profiles_are_what_the_accuracy_page_measured(name, source, result):
    """Each shipped long-context profile is its kept source retargeted to r 0.2 at 43% of the KV
    (catekv_profiles/README.md), the configuration docs/accuracy.md ("At one memory budget") evaluated: the same
    head map as the source voted at r 0.2 and the budget its records name."""
    import json

    from catekv_runtime.profile import retarget

    r2 = Path(__file__).resolve().parents[1] / "docs" / "results" / "r2"
    shipped, kept = load_profile(name), load_profile(r2 / f"{source}.safetensors")
    expected = retarget(kept, adaptive_ratio=0.2, kv_fraction=0.43)
    assert shipped.params == expected.params and torch.equal(shipped.head_map, expected.head_map)
    assert torch.equal(shipped.head_map, kept.with_adaptive_ratio(0.2).head_map) and torch.equal(shipped.cv, kept.cv)
    budgets = {r["budget"] for r in json.loads((r2 / result).read_text())["records"] if r["method"] == "catekv"}
    assert budgets == {shipped.params.budget}


def test_shipped_profiles_are_package_data_of_the_wheel():
    """The wheel carries every shipped profile with its card and head map, so load_profile(NAME) works installed:
    setuptools finds the package catekv_profiles, and its package-data patterns match each profile's files (checked
    here without building a wheel, which would take too long for the tests)."""
    import fnmatch
    import importlib.resources

    import setuptools

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    from catekv_runtime import list_profiles

    repo = Path(__file__).resolve().parents[1]
    config = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "catekv_profiles" in setuptools.find_packages(repo, include=config["packages"]["find"]["include"])
    folder = importlib.resources.files("catekv_profiles")
    assert Path(str(folder)) == repo / "catekv_profiles"  # this checkout's, as the runtime finds them
    names = list_profiles()
    assert names == sorted(p.name.removesuffix(".safetensors") for p in folder.iterdir()
                           if p.name.endswith(".safetensors"))
    patterns = config["package-data"]["catekv_profiles"]
    for name in names:
        for suffix in (".safetensors", ".md", ".png"):
            assert (folder / f"{name}{suffix}").is_file(), f"{name}{suffix}"
            assert any(fnmatch.fnmatch(f"{name}{suffix}", pattern) for pattern in patterns), f"{name}{suffix}"
