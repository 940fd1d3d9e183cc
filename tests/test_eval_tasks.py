"""catekv_eval: RULER's synthetic tasks (lengths, content, determinism), RULER's scoring, and the
separation of evaluation data from the profiler's reference set. Uses the real SmolLM2 tokenizer."""

import dataclasses
import re
from collections import Counter

import pytest

from catekv_eval import (
    TASKS,
    EvalTaskError,
    make_samples,
    postprocess_prediction,
    reference_overlap,
    score,
    string_match_all,
    string_match_part,
)
from catekv_profiler.reference import variable_tracking_samples

ALL_TASKS = sorted(TASKS)
NIAH_TASKS = [t for t in ALL_TASKS if t.startswith("niah")]
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
NEEDLE = re.compile(r"One of the special magic (numbers|uuids) for (\S+) is: (\S+)\.")


@pytest.fixture
def tok(smollm2_tokenizer):
    return smollm2_tokenizer


class CountingTokenizer:
    """Counts encode calls: sizing must tokenize a few times per sample, not once per haystack unit."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, 0

    def encode(self, text, add_special_tokens=True):
        self.calls += 1
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)


def body(sample) -> str:
    """The prompt without its answer prefix."""
    assert sample.prompt.endswith(sample.answer_prefix)
    return sample.prompt[: len(sample.prompt) - len(sample.answer_prefix)]


def cwe_counts(text: str) -> Counter:
    """Word counts of the task's own numbered list (the last one; the first is the solved example)."""
    listing = text.rsplit("Memorize the ones that appear most often.\n", 1)[1].split("\nQuestion:")[0]
    entries = re.findall(r"(\d+)\. (\S+)", listing)
    assert [int(i) for i, _ in entries] == list(range(1, len(entries) + 1))
    return Counter(word for _, word in entries)


def fwe_counts(text: str) -> Counter:
    coded = text.split("Find the three most frequently appeared coded words. ", 1)[1].split("\nQuestion:")[0]
    counts = Counter(coded.split())
    assert counts.most_common(1)[0][0] == "..."  # RULER's top-ranked "word" is the noise
    del counts["..."]
    return counts


def assert_truly_most_common(counts: Counter, answers: list[str]) -> None:
    ranked = counts.most_common()
    k = len(answers)
    assert {word for word, _ in ranked[:k]} == set(answers)
    assert ranked[k - 1][1] > ranked[k][1]  # no tie with a word outside the answer


def assert_answers_in_prompt(task: str, sample) -> None:
    text = body(sample)
    if task == "cwe":
        assert len(sample.answers) == 10
        assert_truly_most_common(cwe_counts(text), sample.answers)
    elif task == "fwe":
        assert len(sample.answers) == 3
        assert_truly_most_common(fwe_counts(text), sample.answers)
    else:
        assert sample.answers and all(answer in text for answer in sample.answers)


# --- the task table ----------------------------------------------------------------


def test_task_table_is_rulers():
    assert ALL_TASKS == sorted(
        [f"niah_single_{i}" for i in (1, 2, 3)] + [f"niah_multikey_{i}" for i in (1, 2, 3)]
        + ["niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe"]
    )
    assert {t: TASKS[t].max_new_tokens for t in ("vt", "cwe", "fwe")} == {"vt": 30, "cwe": 120, "fwe": 50}
    assert all(TASKS[t].max_new_tokens == 128 for t in NIAH_TASKS)
    assert all(spec.metric == "all" for spec in TASKS.values())  # "part" is RULER's QA metric


# --- length and content ---------------------------------------------------------------


@pytest.mark.parametrize("context_length", [1024, 4096])
@pytest.mark.parametrize("task", ALL_TASKS)
def test_length_and_answers(tok, task, context_length):
    counting = CountingTokenizer(tok)
    samples = make_samples(task, counting, context_length, 2)
    assert counting.calls <= 2 * 8
    for i, s in enumerate(samples):
        assert (s.task, s.index, s.max_new_tokens) == (task, i, TASKS[task].max_new_tokens)
        assert context_length - 128 <= len(s.input_ids) <= context_length
        assert s.input_ids == tok.encode(s.prompt)
        assert_answers_in_prompt(task, s)


@pytest.mark.parametrize("task", ALL_TASKS)
def test_length_at_16k(tok, task):
    (s,) = make_samples(task, tok, 16384, 1)
    assert 16384 - 128 <= len(s.input_ids) <= 16384
    assert_answers_in_prompt(task, s)  # CWE's list now runs past the real words into pseudo-words


@pytest.mark.parametrize("task", NIAH_TASKS)
def test_niah_needles_answer_the_question(tok, task):
    config = TASKS[task].niah
    for s in make_samples(task, tok, 2048, 2):
        text = body(s)
        kind = "uuids" if config.value_type == "uuids" else "numbers"
        singular = config.num_values * config.num_queries == 1
        if singular:
            assert text.startswith(f"A special magic {kind[:-1]} is hidden within the following text.")
            assert s.answer_prefix.endswith(" mentioned in the provided text is")
        else:
            assert text.startswith(f"Some special magic {kind} are hidden within the following text.")
            assert s.answer_prefix.endswith(" mentioned in the provided text are")
        query = re.search(r"\nWhat (?:is|are all) the special magic \w+ for (.+) mentioned in the provided text\?$", text)
        asked = re.split(r", and |, ", query.group(1))
        assert len(asked) == config.num_queries
        noun, verb = (kind[:-1], "is") if singular else (kind, "are")
        assert s.answer_prefix == f" The special magic {noun} for {query.group(1)} mentioned in the provided text {verb}"

        needles = NEEDLE.findall(text)
        assert {k for k, _, _ in needles} == {kind}
        values_of = {key: [v for _, k, v in needles if k == key] for key in asked}
        assert all(len(vs) == config.num_values for vs in values_of.values())
        assert sorted(s.answers) == sorted(v for key in asked for v in values_of[key])
        key_re = UUID if config.key_type == "uuids" else r"[a-z]+-[a-z]+"
        value_re = UUID if config.value_type == "uuids" else r"\d{7}"
        assert all(re.fullmatch(key_re, k) and re.fullmatch(value_re, v) for _, k, v in needles)
        assert len({v for _, _, v in needles if v in s.answers}) == len(s.answers)

        hidden = config.num_keys * config.num_values
        if config.haystack == "needle":
            assert len(needles) > 10 * hidden  # the haystack itself is needles
        else:
            assert len(needles) == hidden
        assert ("The grass is green." in text) == (config.haystack == "noise")


def test_vt_chain_in_order_after_a_solved_example(tok):
    for s in make_samples("vt", tok, 2048, 2):
        text = body(s)
        header = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
        assert text.count(header) == 2  # RULER's one-shot example, then the task
        example, task_text = text.split(header)[1:]
        assert re.search(r"they are:  [A-Z]{3} [A-Z]{3} [A-Z]{3} [A-Z]{3} [A-Z]{3}\n\n$", example)
        names = s.answers
        assert len(names) == 5 and all(re.fullmatch(r"[A-Z]{5}", n) for n in names)
        value = re.search(rf"VAR {names[0]} = (\d{{5}})\n", task_text).group(1)
        lines = [f"VAR {names[0]} = {value}"] + [f"VAR {b} = VAR {a} " for a, b in zip(names, names[1:])]
        positions = [task_text.index(line + "\n") for line in lines]
        assert positions == sorted(positions)
        question = f"\nQuestion: Find all variables that are assigned the value {value} in the text above."
        assert task_text.endswith(question)
        assert s.answer_prefix == (
            " Answer: According to the chain(s) of variable assignment in the text above,"
            f" 5 variables are assgined the value {value}, they are: "
        )
        assert value not in example


def test_chat_template_wraps_the_task_then_the_answer_prefix(tok):
    for task in ("niah_single_1", "cwe"):
        for s in make_samples(task, tok, 2048, 2, chat_template=True):
            assert 2048 - 128 <= len(s.input_ids) <= 2048
            assert s.input_ids == tok.encode(s.prompt, add_special_tokens=False)
            assert s.prompt.startswith("<|im_start|>system\n")
            assert s.prompt.endswith("<|im_end|>\n<|im_start|>assistant\n" + s.answer_prefix)
            assert_answers_in_prompt(task, s)


# --- determinism ------------------------------------------------------------------------


@pytest.mark.parametrize("task", ALL_TASKS)
def test_deterministic_per_seed(tok, task):
    a = make_samples(task, tok, 1024, 2, seed=5)
    assert a == make_samples(task, tok, 1024, 2, seed=5)
    assert make_samples(task, tok, 1024, 1, seed=5) == a[:1]  # sample i does not depend on num_samples
    b = make_samples(task, tok, 1024, 2, seed=6)
    assert all(x.prompt != y.prompt and x.answers != y.answers for x, y in zip(a, b))
    assert a[0].prompt != a[1].prompt and a[0].answers != a[1].answers


# --- separation from the profiler's reference set ------------------------------------------


def test_disjoint_from_profiler_reference_set(tok):
    refs = variable_tracking_samples(tok, 4, 1024, seed=0)
    for task in ("vt", "niah_single_1"):
        for seed in (1000, 0):  # also with the profiler's seed: the RNG namespaces differ
            evals = make_samples(task, tok, 1024, 4, seed=seed)
            assert reference_overlap(evals, refs) == 0
    vt = make_samples("vt", tok, 1024, 4, seed=0)
    assert {tuple(s.answers) for s in vt}.isdisjoint(tuple(r.answer) for r in refs)

    # The check finds a reference inside a sample by its text or by its tokens.
    with_text = dataclasses.replace(vt[0], prompt=vt[0].prompt + refs[1].text)
    with_ids = dataclasses.replace(vt[1], input_ids=[7] + refs[2].input_ids + [8])
    assert reference_overlap([with_text, with_ids, vt[2]], refs) == 2
    # Token runs match whole tokens only: id 11 does not contain id 1.
    whole = dataclasses.replace(refs[0], text="\x00", input_ids=[1])
    assert reference_overlap([dataclasses.replace(vt[3], input_ids=[11, 21])], [whole]) == 0


# --- scoring ------------------------------------------------------------------------------


def test_string_match_all_gives_partial_credit_case_insensitively():
    predictions = ["The numbers are 123 and 456.", "nothing here", "ABC-Def"]
    references = [["123", "456", "789"], ["42"], ["abc-def"]]
    assert string_match_all(predictions, references) == 55.56  # (2/3 + 0 + 1) / 3 * 100, rounded
    assert string_match_all(["a"], [["A", "b"]]) == 50.0


def test_string_match_part_needs_any_one_reference():
    predictions = ["Answer: PARIS", "london", "nope"]
    references = [["paris", "france"], ["Berlin", "London"], ["x", "y"]]
    assert string_match_part(predictions, references) == 66.67  # (1 + 1 + 0) / 3 * 100, rounded
    assert string_match_part(["a"], [["A", "b"]]) == 100.0


@pytest.mark.parametrize("metric", [string_match_all, string_match_part])
def test_metrics_reject_mismatched_inputs(metric):
    with pytest.raises(ValueError, match="one list of references per prediction"):
        metric(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="one list of references per prediction"):
        metric([], [])
    with pytest.raises(ValueError, match="at least one reference"):
        metric(["a"], [[]])


def test_score_uses_the_tasks_metric_on_postprocessed_predictions(tok):
    assert postprocess_prediction("  a\tb\x00c \n") == "a\nb\nc"
    samples = make_samples("niah_multivalue", tok, 1024, 2)
    predictions = [" " + ", ".join(samples[0].answers) + "\x00", samples[1].answers[2] + " and more"]
    assert score("niah_multivalue", predictions, samples) == 62.5  # (4/4 + 1/4) / 2 * 100
    with pytest.raises(EvalTaskError, match="other tasks"):
        score("niah_single_1", predictions, samples)
    with pytest.raises(EvalTaskError, match="unknown task 'qa_1'"):
        score("qa_1", predictions, samples)


# --- errors -----------------------------------------------------------------------------


def test_errors_are_clear(tok):
    with pytest.raises(EvalTaskError, match="unknown task 'qa_2'; choose one of"):
        make_samples("qa_2", tok, 1024, 1)
    with pytest.raises(EvalTaskError, match=">= 1"):
        make_samples("vt", tok, 1024, 0)
    with pytest.raises(EvalTaskError, match="too small for task 'vt'"):
        make_samples("vt", tok, 256, 1)
