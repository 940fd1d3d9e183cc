import hashlib
import json
import re
import struct
from pathlib import Path

import pytest

from catekv_profiler.reference import (
    ReferenceSetError,
    ReferenceSample,
    load_reference_jsonl,
    reference_hash,
    variable_tracking_samples,
)


class CharTokenizer:
    """One token per character: exact and instant, for the tokenizer-independent tests."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        assert add_special_tokens is False
        return [ord(c) for c in text]


class QuadraticTokenizer(CharTokenizer):
    """Token count grows faster than the text, so the filler-count estimate is off and bisection must step in."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = super().encode(text, add_special_tokens)
        return ids + [0] * (len(ids) ** 2 // 20_000)


def assert_chain_in_order(text: str, names: list[str], value: str) -> None:
    statements = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    positions = [text.index(s) for s in statements]
    assert positions == sorted(positions)


# --- variable tracking: length ---------------------------------------------


@pytest.mark.parametrize("context_length", [512, 2048, 4096])
def test_vt_length_with_smollm2(smollm2_tokenizer, context_length):
    samples = variable_tracking_samples(smollm2_tokenizer, 2, context_length, seed=3)
    for s in samples:
        assert context_length - 64 <= len(s.input_ids) <= context_length
        assert s.input_ids == smollm2_tokenizer.encode(s.text, add_special_tokens=False)


@pytest.mark.parametrize("context_length", [777, 1024, 3000, 20_000])
def test_vt_length_with_char_tokenizer(context_length):
    for s in variable_tracking_samples(CharTokenizer(), 3, context_length, num_chains=2):
        assert context_length - 64 <= len(s.input_ids) <= context_length
        assert len(s.text) == len(s.input_ids)


def test_vt_length_when_tokenization_is_not_additive():
    tok = QuadraticTokenizer()
    for s in variable_tracking_samples(tok, 3, 8000):
        assert 8000 - 64 <= len(s.input_ids) <= 8000
        assert s.input_ids == tok.encode(s.text, add_special_tokens=False)


def test_vt_unfittable_tokenizer_is_a_clear_error():
    class CoarseTokenizer(CharTokenizer):
        # Every "green" sentence costs 200 tokens: no filler count lands within 64 tokens of the target.
        def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
            return super().encode(text, add_special_tokens) + [0] * (200 * text.count("green"))

    with pytest.raises(ReferenceSetError, match="could not fit .* load_reference_jsonl"):
        variable_tracking_samples(CoarseTokenizer(), 1, 4000)


def test_vt_context_too_small_is_a_clear_error():
    with pytest.raises(ReferenceSetError, match=r"too small.*larger context length \(catekv-profile -L\)") as info:
        variable_tracking_samples(CharTokenizer(), 1, 200)
    assert "num_chains" not in str(info.value)  # the advice names a command-line option, not an internal argument


@pytest.mark.parametrize(
    "kwargs", [dict(num_samples=0), dict(num_hops=0), dict(num_chains=0), dict(context_length=0)]
)
def test_vt_invalid_arguments(kwargs):
    args = dict(num_samples=1, context_length=1024) | kwargs
    with pytest.raises(ReferenceSetError, match=">= 1"):
        variable_tracking_samples(CharTokenizer(), **args)


# --- variable tracking: determinism ----------------------------------------


def test_vt_deterministic_per_seed_and_prefix_stable():
    tok = CharTokenizer()
    a = variable_tracking_samples(tok, 3, 1024, seed=7)
    assert a == variable_tracking_samples(tok, 3, 1024, seed=7)
    assert a[:2] == variable_tracking_samples(tok, 2, 1024, seed=7)
    assert a + variable_tracking_samples(tok, 5, 1024, seed=7)[3:] == variable_tracking_samples(tok, 5, 1024, seed=7)
    b = variable_tracking_samples(tok, 3, 1024, seed=8)
    assert all(x.text != y.text and x.answer != y.answer for x, y in zip(a, b))
    # Samples of one set differ from each other too.
    assert len({s.text for s in a}) == 3


def test_vt_deterministic_with_smollm2(smollm2_tokenizer):
    a = variable_tracking_samples(smollm2_tokenizer, 2, 1024, seed=11)
    assert a == variable_tracking_samples(smollm2_tokenizer, 2, 1024, seed=11)
    assert a[1:] != variable_tracking_samples(smollm2_tokenizer, 1, 1024, seed=12)


# --- variable tracking: content --------------------------------------------


def test_vt_answer_chain_is_in_the_text_in_order(smollm2_tokenizer):
    (s,) = variable_tracking_samples(smollm2_tokenizer, 1, 2048, seed=5, num_hops=6)
    assert len(s.answer) == 7
    assert all(re.fullmatch(r"[A-Z]{5}", name) for name in s.answer)
    value = re.search(rf"VAR {s.answer[0]} = (\d{{5}})\.", s.text).group(1)
    assert_chain_in_order(s.text, s.answer, value)
    assert s.text.endswith(
        f"Question: Find all variables that are assigned the value {value} in the text above."
        " Answer: According to the chain(s) of variable assignment in the text above,"
        f" 7 variables are assigned the value {value}, they are: "
    )
    # The chain is spread through the haystack, not bunched at one end.
    first, last = s.text.index(f"VAR {s.answer[0]} ="), s.text.index(f"VAR {s.answer[-1]} =")
    assert last - first > len(s.text) // 4
    assert "The grass is green." in s.text and "There and back again." in s.text


def test_vt_several_chains_are_distinct_and_in_order():
    for s in variable_tracking_samples(CharTokenizer(), 4, 2048, num_chains=3, num_hops=3):
        assignments = re.findall(r"VAR ([A-Z]{5}) = (\d{5})\.", s.text)
        assert len(assignments) == 3
        values = [v for _, v in assignments]
        assert len(set(values)) == 3
        links = dict(re.findall(r"VAR ([A-Z]{5}) = VAR ([A-Z]{5})\.", s.text))
        asked = re.search(r"assigned the value (\d{5}) in the text above", s.text).group(1)
        assert asked in values
        names = []
        for head, value in assignments:
            chain = [head]
            while len(chain) < 4:
                chain.append(next(b for b, a in links.items() if a == chain[-1]))
            assert_chain_in_order(s.text, chain, value)
            names += chain
            if value == asked:
                assert s.answer == chain
        assert len(set(names)) == 12


# --- JSON Lines --------------------------------------------------------------


def write(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "ref.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_reads_samples_and_keeps_first_tokens(tmp_path):
    path = write(tmp_path, [json.dumps({"text": "abcdef", "id": 1}), "", "   ", json.dumps({"text": "xy"})])
    samples = load_reference_jsonl(path, CharTokenizer(), context_length=4)
    assert samples == [
        ReferenceSample(text="abcdef", input_ids=[97, 98, 99, 100], answer=[]),
        ReferenceSample(text="xy", input_ids=[120, 121], answer=[]),
    ]


def test_jsonl_custom_field_with_smollm2(tmp_path, smollm2_tokenizer):
    text = "The quick brown fox jumps over the lazy dog. " * 50
    path = write(tmp_path, [json.dumps({"body": text})])
    (s,) = load_reference_jsonl(str(path), smollm2_tokenizer, context_length=100, text_field="body")
    assert s.input_ids == smollm2_tokenizer.encode(text, add_special_tokens=False)[:100]


@pytest.mark.parametrize(
    "lines, message",
    [
        ([json.dumps({"text": "ok"}), "{not json"], r"ref\.jsonl:2: invalid JSON"),
        (["", json.dumps(["text"])], r"ref\.jsonl:2: expected a JSON object, got list"),
        ([json.dumps({"txt": "a"})], r"ref\.jsonl:1: missing field 'text' \(fields present: \['txt'\]\)"),
        ([json.dumps({"text": 5})], r"ref\.jsonl:1: field 'text' must be a non-empty string, got int"),
        ([json.dumps({"text": ""})], r"ref\.jsonl:1: field 'text' must be a non-empty string"),
        (["", "  "], r"has no samples"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path, lines, message):
    with pytest.raises(ReferenceSetError, match=message):
        load_reference_jsonl(write(tmp_path, lines), CharTokenizer(), context_length=16)


def test_jsonl_missing_file(tmp_path):
    with pytest.raises(ReferenceSetError, match=r"cannot read reference file .*nope\.jsonl.*existing"):
        load_reference_jsonl(tmp_path / "nope.jsonl", CharTokenizer(), context_length=16)


# --- hash -------------------------------------------------


def test_reference_hash_is_the_documented_digest():
    samples = [ReferenceSample("", [1, 2], []), ReferenceSample("", [3], [])]
    expected = hashlib.sha256(struct.pack("<QQQ", 2, 1, 2) + struct.pack("<QQ", 1, 3)).hexdigest()
    assert reference_hash(samples) == expected
    # Text and answer are not part of the identity; tokens, their split and their order are.
    assert reference_hash([ReferenceSample("x", [1, 2], ["A"]), ReferenceSample("y", [3], [])]) == expected
    assert reference_hash([ReferenceSample("", [1], []), ReferenceSample("", [2, 3], [])]) != expected
    assert reference_hash(samples[::-1]) != expected


def test_reference_hash_changes_with_one_token(smollm2_tokenizer):
    samples = variable_tracking_samples(smollm2_tokenizer, 2, 512)
    changed = list(samples[1].input_ids)
    changed[100] += 1
    assert reference_hash(samples) == reference_hash(variable_tracking_samples(smollm2_tokenizer, 2, 512))
    assert reference_hash([samples[0], ReferenceSample(samples[1].text, changed, [])]) != reference_hash(samples)
