"""CateKV on the real SmolLM2-135M-Instruct: passkey retrieval matches full attention."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

import catekv_runtime as ck

PROFILE = Path(__file__).resolve().parents[1] / "catekv_profiles" / "smollm2-135m-instruct.safetensors"
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def passkey_prompt(tokenizer, n_tokens: int, seed: int) -> tuple[str, str]:
    """A passkey hidden at a random depth in ~n_tokens of filler (the classic retrieval test)."""
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    per_filler = len(tokenizer.encode(FILLER, add_special_tokens=False))
    reps = (n_tokens - 60) // per_filler
    depth = rng.randint(0, reps)
    text = (
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
        "I will quiz you about the important information there.\n"
        + FILLER * depth + needle + FILLER * (reps - depth)
        + "\nWhat is the pass key? The pass key is"
    )
    return text, key


def test_shipped_profile_matches_the_model(smollm2):
    model, _, _ = smollm2
    profile = ck.load_profile(PROFILE)
    assert profile.head_map.shape == (30, 3) and int(profile.head_map.sum()) == 36
    ck.apply(model, profile)  # refused if the shapes or Hub id did not match
    ck.remove(model)


@pytest.mark.parametrize("n_tokens, seed", [(2048, 1), (3072, 4), (4096, 3)])
def test_passkey_answers_equal_full_attention(smollm2, n_tokens, seed):
    """r = 0.4 and a budget of a quarter of the prompt: the greedy answer is the full-attention answer."""
    model, tokenizer, _ = smollm2
    text, key = passkey_prompt(tokenizer, n_tokens, seed)
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.inference_mode():
        full = model.generate(ids, max_new_tokens=7, do_sample=False)
        ck.apply(model, ck.load_profile(PROFILE), budget=ids.shape[1] // 4)
        try:
            compressed = model.generate(ids, max_new_tokens=7, do_sample=False)
        finally:
            ck.remove(model)
    full_answer = tokenizer.decode(full[0, ids.shape[1]:])
    catekv_answer = tokenizer.decode(compressed[0, ids.shape[1]:])
    assert catekv_answer == full_answer, (key, full_answer, catekv_answer)
