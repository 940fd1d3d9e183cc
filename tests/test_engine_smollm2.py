"""The engine on the real SmolLM2-135M-Instruct with its shipped profile, against apply + generate."""

from __future__ import annotations

import pytest
import torch
from test_engine import one_thread  # noqa: F401 (autouse)
from test_runtime_smollm2 import PROFILE, passkey_prompt

import catekv_runtime as ck
from catekv_runtime.engine import Engine, SamplingParams

pytestmark = pytest.mark.slow


def generate_with_apply(model, ids: list[int], steps: int, profile=None, **overrides) -> list[int]:
    """transformers' greedy generate (stopping at the model's EOS), with apply's cache when a profile is given."""
    if profile is not None:
        ck.apply(model, profile, **overrides)
    try:
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), max_new_tokens=steps, do_sample=False)
    finally:
        if profile is not None:
            ck.remove(model)
    return out[0, len(ids):].tolist()


def test_passkey_prompts_equal_apply_and_generate(smollm2):
    """Two passkey prompts (about 1500 and 2600 tokens, the shipped profile's budget of 512 evicts most of them)
    decoded together: each equals apply + generate alone, and the answer holds the key."""
    model, tokenizer, _ = smollm2
    profile = ck.load_profile(PROFILE)
    texts = [passkey_prompt(tokenizer, n, seed) for n, seed in ((1500, 1), (2600, 4))]
    engine = Engine(model, profile, tokenizer=tokenizer, max_batch_size=2, max_model_len=4096, max_decode_len=64,
                    prefill_chunk=1024)
    params = SamplingParams(max_tokens=8, temperature=0)
    outputs = engine.generate([text for text, _ in texts], params)
    for (text, key), out in zip(texts, outputs):
        ids = tokenizer(text).input_ids
        assert out.prompt_token_ids == ids
        assert out.token_ids == generate_with_apply(model, ids, 8, profile)
        assert out.text == tokenizer.decode(out.token_ids, skip_special_tokens=True)
        assert key in out.text


def test_chat_and_stream_equal_apply_and_generate(smollm2):
    """A chat request runs to the model's end-of-turn token (finish_reason "stop"), with the tokens of apply +
    generate on the rendered template; streaming it gives the same text in pieces."""
    model, tokenizer, _ = smollm2
    profile = ck.load_profile(PROFILE)
    messages = [{"role": "user", "content": "Name three colours of the rainbow, in one short sentence."}]
    engine = Engine(model, profile, tokenizer=tokenizer, max_batch_size=2, max_model_len=1024)
    params = SamplingParams(max_tokens=48, temperature=0)
    out = engine.chat(messages, params)[0]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert out.prompt_token_ids == ids
    assert out.token_ids == generate_with_apply(model, ids, 48, profile)
    assert out.finish_reason == "stop" and out.token_ids[-1] in engine.model.eos_token_ids
    pieces = list(engine.stream(ids, params))
    assert "".join(pieces) == out.text and len(pieces) > 3


def test_incremental_detokenization_equals_decoding_the_whole_output(smollm2):
    """SmolLM2's byte-level BPE tokenizer: text whose characters split over tokens, special tokens and random ids;
    after every token the engine's text equals decoding the whole output."""
    from test_engine_serving import decoded_step_by_step

    _, tokenizer, _ = smollm2
    text = "Grüße, 你好 🙂🙂! naïve café — ½ ∑ ok\n\tend"
    tokens = tokenizer(text, add_special_tokens=False).input_ids
    tokens += [0, 1, 2] + torch.randint(0, len(tokenizer), (200,), generator=torch.Generator().manual_seed(0)).tolist()
    texts = decoded_step_by_step(tokenizer, tokens)
    assert texts == [tokenizer.decode(tokens[: i + 1], skip_special_tokens=True) for i in range(len(tokens))]


def test_the_engine_decodes_through_the_rust_tokenizer_as_transformers_does(smollm2):
    """SmolLM2's fast tokenizer cleans up no spaces, so the engine's decoder calls its Rust tokenizer directly; on
    random ids, special ones included, that gives transformers' decode (a tokenizer without a Rust backend, or
    one that cleans up spaces, keeps transformers' decode: ByteTokenizer's test in test_engine_serving.py)."""
    from catekv_runtime.engine.engine import text_decoder

    _, tokenizer, _ = smollm2
    assert tokenizer.clean_up_tokenization_spaces is False and tokenizer.backend_tokenizer is not None
    decode = text_decoder(tokenizer)
    gen = torch.Generator().manual_seed(1)
    for n in (1, 2, 7, 64):
        for _ in range(20):
            ids = [0, 1, 2][: n % 3] + torch.randint(0, len(tokenizer), (n,), generator=gen).tolist()
            assert decode(ids) == tokenizer.decode(ids, skip_special_tokens=True)
