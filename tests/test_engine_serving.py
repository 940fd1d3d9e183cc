"""Serving behaviour of the engine: stops and finish reasons, staggered arrivals, streaming, chat, bad input.

A byte-level tokenizer (each token id is one byte; ids 0-2 are special) gives the tiny models text, including
multi-byte UTF-8 characters split over tokens.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model
from test_engine import one_thread, prompts, reference  # noqa: F401 (one_thread: autouse)
from test_runtime import make_profile

from catekv_runtime.engine import Engine, SamplingParams
from catekv_runtime.engine.engine import _Request, text_decoder

SPECIAL = (0, 1, 2)


class ByteTokenizer:
    """Token id -> one byte (``table`` may remap some), decoded as UTF-8 with replacement characters, as Hugging Face
    tokenizers decode byte-level tokens; ids 0-2 are special (skipped with ``skip_special_tokens``)."""

    def __init__(self, table: dict[int, int] | None = None):
        self.table = table or {}

    def __call__(self, text: str, add_special_tokens: bool = True):
        class Encoding:
            input_ids = ([1] if add_special_tokens else []) + list(text.encode("utf-8"))
        return Encoding()

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        data = bytes(self.table.get(i, i) for i in ids if not (skip_special_tokens and i in SPECIAL))
        return data.decode("utf-8", errors="replace")

    def apply_chat_template(self, conversation, add_generation_prompt=False, tokenize=True):
        assert not tokenize
        text = "".join(f"<{m['role']}>{m['content']}" for m in conversation)
        return text + ("<assistant>" if add_generation_prompt else "")


@pytest.fixture(scope="module")
def model():
    m = make_tiny_model("llama")
    m.generation_config.eos_token_id = None
    return m


@pytest.fixture(scope="module")
def greedy_run(model):
    """A prompt and its first 24 greedy tokens (transformers' generate, full attention)."""
    prompt = prompts([50], seed=11)[0]
    return prompt, reference(model, prompt, 24)


def first_new(tokens: list[int], start: int) -> int:
    """The first index >= start whose token did not occur before it."""
    return next(i for i in range(start, len(tokens)) if tokens[i] not in tokens[:i])


def test_stop_token_ids_eos_and_length(model, greedy_run):
    prompt, tokens = greedy_run
    i = first_new(tokens, 4)
    engine = Engine(model, None, max_batch_size=2, max_model_len=128)
    out = engine.generate(prompt, SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[tokens[i]]))[0]
    assert (out.token_ids, out.finish_reason, out.stop_reason) == (tokens[: i + 1], "stop", tokens[i])
    out = engine.generate(prompt, SamplingParams(max_tokens=7, temperature=0))[0]
    assert (out.token_ids, out.finish_reason, out.stop_reason) == (tokens[:7], "length", None)
    model.generation_config.eos_token_id = tokens[i]
    try:
        eos_engine = Engine(model, None, max_batch_size=2, max_model_len=128)
    finally:
        model.generation_config.eos_token_id = None
    out = eos_engine.generate(prompt, SamplingParams(max_tokens=24, temperature=0))[0]
    assert (out.token_ids, out.finish_reason, out.stop_reason) == (tokens[: i + 1], "stop", None)
    out = eos_engine.generate(prompt, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    assert (out.token_ids, out.finish_reason) == (tokens, "length")
    # A stop on the very first token (sampled from the prefill) and max_tokens = 1.
    out = engine.generate(prompt, SamplingParams(max_tokens=5, temperature=0, stop_token_ids=[tokens[0]]))[0]
    assert (out.token_ids, out.finish_reason) == (tokens[:1], "stop")
    assert engine.generate(prompt, SamplingParams(max_tokens=1, temperature=0))[0].token_ids == tokens[:1]


def expected_stop(tokenizer, tokens: list[int], stops: list[str]) -> tuple[list[int], str, str]:
    """Plainly: the first prefix of tokens whose text holds a stop string; the text before the earliest one."""
    for k in range(1, len(tokens) + 1):
        text = tokenizer.decode(tokens[:k], skip_special_tokens=True)
        hits = [(text.find(s), s) for s in stops if s in text]
        if hits:
            index, stop = min(hits)
            return tokens[:k], text[:index], stop
    raise AssertionError("no stop string in the output")


@pytest.mark.parametrize("where", [5, 12])
def test_stop_strings_end_the_text_where_they_start(model, greedy_run, where):
    """A stop string spanning a token boundary: the text ends just before it, the token ids run to the token that
    completed it, finish_reason is "stop" and stop_reason the string; of two stop strings the earlier one wins."""
    prompt, tokens = greedy_run
    tokenizer = ByteTokenizer()
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    stop = text[where : where + 2]
    later = text[where + 4 : where + 6]
    engine = Engine(model, None, tokenizer=tokenizer, max_batch_size=2, max_model_len=128)
    for stops in ([stop], [later, stop]):
        out = engine.generate(prompt, SamplingParams(max_tokens=24, temperature=0, stop=stops))[0]
        want_ids, want_text, want_stop = expected_stop(tokenizer, tokens, stops)
        assert (out.token_ids, out.text, out.finish_reason, out.stop_reason) == (want_ids, want_text, "stop", want_stop)
        assert want_stop not in out.text


def test_staggered_arrivals_equal_runs_alone(model):
    """Seven requests of different lengths and max_tokens over three slots, arriving at different times while others
    prefill (64-token chunks, so a prefill spans several steps) and decode: each gives, greedily, the tokens of
    apply + generate run alone with the same profile. Slots are reused as requests finish."""
    profile = make_profile(model, 0.5)
    batch = prompts([230, 40, 150, 97, 64, 180, 20], seed=5)
    steps = [10, 6, 14, 3, 9, 5, 12]
    params = [SamplingParams(max_tokens=s, temperature=0, ignore_eos=True) for s in steps]
    expected = [reference(model, p, s, profile) for p, s in zip(batch, steps)]
    engine = Engine(model, profile, max_batch_size=3, max_model_len=256, prefill_chunk=64)
    ids, done = {}, {}
    arrivals = {0: [0, 1], 2: [2], 3: [3, 4], 9: [5], 10: [6]}
    step = 0
    while step <= max(arrivals) or engine.has_unfinished():
        for k in arrivals.get(step, []):
            ids[engine.add_request(batch[k], params[k])] = k
        for completion in engine.step():
            done[ids[completion.request_id]] = completion
        assert len(engine._running) <= 3
        step += 1
    assert [done[k].token_ids for k in range(len(batch))] == expected
    assert all(done[k].finish_reason == "length" for k in done)
    assert not engine._running and bool((engine.kv.lengths == 1).all())  # every row back to the sink only


def test_stream_yields_the_text_in_order_and_holds_back(model, greedy_run):
    """Streamed pieces join to the completion's text, so none held a partial UTF-8 character (two output tokens are
    mapped to the two bytes of "é": after the first, the decoded text ends in U+FFFD, which must not be sent) or the
    beginning of the stop string that is cut later."""
    prompt, tokens = greedy_run
    a, b = tokens[3], tokens[4]
    assert a != b
    table = {i: 0x20 + i % 95 for i in range(256)}  # printable ASCII, but for the two bytes of "é"
    tokenizer = ByteTokenizer({**table, a: 0xC3, b: 0xA9})
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    stop = text[10:13]
    params = SamplingParams(max_tokens=24, temperature=0, stop=stop)
    engine = Engine(model, None, tokenizer=tokenizer, max_batch_size=2, max_model_len=128)
    other = engine.add_request(prompts([30], seed=9)[0], SamplingParams(max_tokens=20, temperature=0))
    pieces = list(engine.stream(prompt, params))
    expected = engine.generate(prompt, params)[0].text
    assert "".join(pieces) == expected and len(pieces) > 1
    assert "é" in expected
    assert stop not in "".join(pieces)
    finished = []
    while engine.has_unfinished():  # the request added before the stream kept running beside it
        finished += engine.step()
    assert [(c.request_id, c.finish_reason) for c in finished] == [(other, "length")]


def test_chat_renders_the_template(model):
    tokenizer = ByteTokenizer()
    engine = Engine(model, None, tokenizer=tokenizer, max_batch_size=2, max_model_len=128)
    messages = [{"role": "user", "content": "hi"}]
    params = SamplingParams(max_tokens=5, temperature=0)
    ids = tokenizer(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                    add_special_tokens=False).input_ids
    assert engine.chat(messages, params)[0].token_ids == engine.generate(ids, params)[0].token_ids
    two = engine.chat([messages, [{"role": "user", "content": "yo"}]], params)
    assert len(two) == 2 and two[0].prompt_token_ids == ids
    with pytest.raises(ValueError, match="messages"):
        engine.chat([], params)


@pytest.mark.parametrize("prompt, params, field", [
    ([], SamplingParams(), "prompt"),
    ("", SamplingParams(), "prompt"),
    ([5] * 100, SamplingParams(max_tokens=29), "max_tokens"),
    ([5, 300], SamplingParams(), "prompt"),
])
def test_bad_requests_raise_before_compute_and_others_continue(model, prompt, params, field):
    """A bad request raises ValueError naming the field; the request already running finishes with the tokens it
    would have had alone, and a batch with a bad prompt queues nothing."""
    engine = Engine(model, None, tokenizer=ByteTokenizer(), max_batch_size=2, max_model_len=128)
    good = prompts([40], seed=3)[0]
    alone = reference(model, good, 8)
    running = engine.add_request(good, SamplingParams(max_tokens=8, temperature=0))
    engine.step()
    engine.step()
    with pytest.raises(ValueError, match=field):
        engine.add_request(prompt, params)
    with pytest.raises(ValueError, match=field):
        engine.generate([good, prompt], params)
    assert len(engine._waiting) == 0
    finished = []
    while engine.has_unfinished():
        finished += engine.step()
    assert [(c.request_id, c.token_ids) for c in finished] == [(running, alone)]


def test_requests_that_need_a_tokenizer_or_more_room_are_refused(model):
    engine = Engine(model, None, max_batch_size=1, max_model_len=128)
    with pytest.raises(ValueError, match="prompt"):
        engine.add_request("text", SamplingParams())
    with pytest.raises(ValueError, match="stop"):
        engine.add_request([5, 6], SamplingParams(stop="x"))
    with pytest.raises(ValueError, match="tokenizer"):
        next(engine.stream([5, 6]))
    with pytest.raises(TypeError, match="SamplingParams"):
        engine.add_request([5, 6], {"max_tokens": 3})
    profile = make_profile(model, 0.5)  # budget 64: consistent heads keep at most ~67 prompt tokens
    small = Engine(model, profile, max_batch_size=1, max_model_len=512, max_decode_len=16)
    with pytest.raises(ValueError, match="max_decode_len"):
        small.add_request(prompts([300])[0], SamplingParams(max_tokens=40))
    assert small.generate(prompts([300])[0], SamplingParams(max_tokens=16, temperature=0))[0].completion_tokens == 16
    with pytest.raises(ValueError, match="kv_cache_memory"):
        Engine(model, None, max_batch_size=4, max_model_len=128, kv_cache_memory=1000)
    slot_bytes = 3 * 2 * (1 + 128) * 16 * 2 * 4  # layers x KV heads x (sink + max_model_len) x head_dim x K,V x fp32
    sized = Engine(model, None, max_batch_size=8, max_model_len=128, kv_cache_memory=3 * slot_bytes + slot_bytes // 2)
    assert sized.slots == 3
    for bad in (dict(max_batch_size=0), dict(prefill_chunk=0), dict(attention="flash"),
                dict(gpu_memory_utilization=0.5), dict(prefill_backend="flash"), dict(prefill_backend="fa4")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Engine(model, None, **bad)


@pytest.mark.parametrize("where", ["waiting", "prefilling", "decoding"])
def test_abort_frees_the_slot_for_the_next_request(model, where):
    """One slot: a request aborted while it waits, while it prefills (a 230-token prompt in 64-token chunks takes
    several steps) or while it decodes is dropped (never returned by step, its slot back to the sink only), and
    the other request runs to the tokens it has alone."""
    victim_prompt, other_prompt = prompts([230, 40], seed=21)
    alone = reference(model, other_prompt, 6)
    engine = Engine(model, None, max_batch_size=1, max_model_len=256, prefill_chunk=64)
    greedy = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    if where == "waiting":
        other = engine.add_request(other_prompt, SamplingParams(max_tokens=6, temperature=0))
        victim = engine.add_request(victim_prompt, greedy)
        engine.step()
        assert (engine.num_running, engine.num_waiting) == (1, 1)
    else:
        victim = engine.add_request(victim_prompt, greedy)
        engine.step()
        if where == "decoding":
            while not engine._running:
                engine.step()
            engine.step()
        assert (engine._prefilling is not None) == (where == "prefilling")
        assert engine.num_running == 1
        other = engine.add_request(other_prompt, SamplingParams(max_tokens=6, temperature=0))
    assert engine.abort(victim)
    assert not engine.abort(victim) and not engine.abort(10_000)
    assert engine.partial(victim) is None
    finished = []
    while engine.has_unfinished():
        finished += engine.step()
    assert [(c.request_id, c.token_ids) for c in finished] == [(other, alone)]
    assert not engine.abort(other)  # finished: left as it is
    assert (engine.num_running, engine.num_waiting) == (0, 0)
    assert bool((engine.kv.lengths == 1).all())


def test_partial_output_and_kv_usage(model, greedy_run):
    """While a request decodes, partial() gives its tokens so far (a prefix of the final ones) and the text stream()
    would have shown; kv_usage() counts each head's positions in use (the slot lengths less the sink), which with a
    profile is less than full attention's prompt + output per head, and both are 0 once nothing runs."""
    prompt, tokens = greedy_run
    tokenizer = ByteTokenizer()
    profile = make_profile(model, 0.5)  # budget 64: the consistent heads drop most of a 180-token prompt
    long_prompt = prompts([180], seed=13)[0]
    for prof, request_prompt in ((None, prompt), (profile, long_prompt)):
        engine = Engine(model, prof, tokenizer=tokenizer, max_batch_size=2, max_model_len=256)
        rid = engine.add_request(request_prompt, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
        assert engine.partial(rid).token_ids == [] and engine.kv_usage() == (0, 0)
        for _ in range(4):
            engine.step()
        partial = engine.partial(rid)
        m = len(partial.token_ids)
        assert m == 5 and partial.finish_reason is None  # the first step prefills, samples and decodes once
        heads = engine.head_map.numel()
        token_bytes = 2 * engine.model.head_dim * 4  # K and V, fp32
        in_use = sum(g.kv_heads.numel() * (int(engine.kv.lengths[g.row, 0]) - 1) for g in engine.kv.groups)
        held, full = engine.kv_usage()
        assert held == in_use * token_bytes
        assert full == heads * (len(request_prompt) + m) * token_bytes
        assert (held == full) == (prof is None)
        final = engine.step() or []
        while engine.has_unfinished():
            final += engine.step()
        assert final[0].token_ids[:m] == partial.token_ids and final[0].text.startswith(partial.text)
        assert engine.kv_usage() == (0, 0) and engine.partial(rid) is None


def test_a_stream_closed_early_aborts_its_request(model, greedy_run):
    prompt, _ = greedy_run
    engine = Engine(model, None, tokenizer=ByteTokenizer(), max_batch_size=1, max_model_len=128)
    pieces = engine.stream(prompt, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    next(pieces)
    assert engine.has_unfinished()
    pieces.close()
    assert not engine.has_unfinished() and bool((engine.kv.lengths == 1).all())


def test_max_new_tokens_is_the_room_add_request_allows(model):
    """max_new_tokens(n) is accepted as max_tokens and one more is refused, for full attention (max_model_len binds)
    and with a profile whose consistent heads' room binds first; a prompt too long has no room."""
    profile = make_profile(model, 0.5)
    for prof, decode_len, field in ((None, None, "max_model_len"), (profile, 16, "max_decode_len")):
        engine = Engine(model, prof, max_batch_size=1, max_model_len=256, max_decode_len=decode_len)
        prompt = prompts([150], seed=2)[0]
        room = engine.max_new_tokens(len(prompt))
        assert room == (256 - 150 if prof is None else engine.capacities[profile.params.budget]
                        - profile.params.kept_tokens(150, profile.params.budget))
        engine.add_request(prompt, SamplingParams(max_tokens=room))
        with pytest.raises(ValueError, match=field):
            engine.add_request(prompt, SamplingParams(max_tokens=room + 1))
    assert Engine(model, None, max_batch_size=1, max_model_len=128).max_new_tokens(128) == 0
    assert engine.tokenize(torch.tensor([[5, 6]])) == [5, 6] and engine.tokenize((7,)) == [7]


def test_int64_bounds_of_seed_and_top_k(model):
    """The engine keeps seeds and top_k in int64 rows: values beyond int64 are refused with the field named (a server
    passes clients' values on; an overflow inside a step would stop it), the extremes of int64 run."""
    for name in ("seed", "top_k"):
        with pytest.raises(ValueError, match=name):
            SamplingParams(**{name: 2**63})
    engine = Engine(model, None, max_batch_size=2, max_model_len=64)
    params = [SamplingParams(max_tokens=3, seed=seed, top_k=2**63 - 1) for seed in (2**63 - 1, -(2**63))]
    outputs = engine.generate([prompts([10])[0]] * 2, params)
    assert [o.completion_tokens for o in outputs] == [3, 3]


@pytest.mark.parametrize("lagged", [False, True], ids=["read-at-once", "read-one-step-late"])
def test_tokens_read_a_step_late_give_the_same_outputs_and_nothing_past_a_stop(model, monkeypatch, lagged):
    """With every step's tokens read only after the next step is launched (what a GPU does: the CPU event is made
    to report "not done"), the rows that stopped decode once more; that token never reaches an output. Each request
    (a stop token, end of sequence, max_tokens, a stop string; two slots, so rows are reused) ends exactly where
    greedy generate's tokens alone say it should, and partial() after every step is a prefix of the final output."""
    from catekv_runtime.engine import engine as engine_module

    if lagged:
        monkeypatch.setattr(engine_module._HostEvent, "query", lambda self: False)
    batch = prompts([50, 64, 33, 80, 41], seed=31)
    refs = [reference(model, p, 16) for p in batch]
    j0, j1 = first_new(refs[0], 3), first_new(refs[1], 4)
    j3 = next(i for i in range(3, 16) if 32 <= refs[3][i] < 127 and refs[3][i] not in refs[3][:i])
    stop_string = chr(refs[3][j3])
    engine = Engine(model, None, tokenizer=ByteTokenizer(), max_batch_size=2, max_model_len=128)
    engine.model.eos_token_ids = (refs[1][j1],)
    greedy = dict(temperature=0, ignore_eos=True)
    params = [SamplingParams(max_tokens=16, stop_token_ids=[refs[0][j0]], **greedy),
              SamplingParams(max_tokens=16, temperature=0),
              SamplingParams(max_tokens=5, **greedy),
              SamplingParams(max_tokens=16, stop=stop_string, **greedy),
              SamplingParams(max_tokens=1, **greedy)]
    expected = [refs[0][: j0 + 1], refs[1][: j1 + 1], refs[2][:5], refs[3][: j3 + 1], refs[4][:1]]
    ids = [engine.add_request(p, s) for p, s in zip(batch, params)]
    seen: dict[int, list[int]] = {}
    finished = {}
    while engine.has_unfinished():
        for completion in engine.step():
            finished[completion.request_id] = completion
        if lagged and engine._running:
            assert engine._pending is not None  # the step's tokens are still "on the device"
        for i in ids:
            partial = engine.partial(i)
            if partial is not None:
                seen.setdefault(i, []).append(len(partial.token_ids))
                assert partial.token_ids == expected[ids.index(i)][: len(partial.token_ids)]
    assert [finished[i].token_ids for i in ids] == expected
    assert [(finished[i].finish_reason, finished[i].stop_reason) for i in ids] == [
        ("stop", refs[0][j0]), ("stop", None), ("length", None), ("stop", stop_string), ("length", None)]
    assert stop_string not in finished[ids[3]].text
    assert bool((engine.kv.lengths == 1).all()) and engine.kv_usage() == (0, 0)


def test_a_step_prefills_prefill_chunk_tokens_through_every_layer(model):
    """The prefill budget of a step is ``prefill_chunk`` tokens through the whole model (vLLM's token budget), not
    through one layer: a prompt of one chunk has its first token after one step, a prompt of two chunks after two."""
    short, long = prompts([64, 128], seed=5)
    engine = Engine(model, None, max_batch_size=2, max_model_len=256, prefill_chunk=64)
    greedy = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    first = engine.add_request(short, greedy)
    engine.step()
    assert engine._prefilling is None and len(engine.partial(first).token_ids) >= 1
    second = engine.add_request(long, greedy)
    engine.step()
    assert engine._prefilling is not None and not engine.partial(second).token_ids
    engine.step()
    assert engine._prefilling is None and len(engine.partial(second).token_ids) >= 1


def decoded_step_by_step(tokenizer, tokens: list[int]) -> list[str]:
    """The request's text after each token, as the engine detokenizes it incrementally."""
    request = _Request(0, [1], SamplingParams(), 0)
    decode = text_decoder(tokenizer)
    texts = []
    for token in tokens:
        request.output.append(token)
        request.detokenize(decode)
        texts.append(request.text)
    return texts


@pytest.mark.parametrize("seed", range(4))
def test_incremental_detokenization_equals_decoding_the_whole_output(seed):
    """Random bytes (multi-byte UTF-8 characters split over tokens, invalid sequences, special tokens): after every
    token the text equals decoding the whole output, while each step decodes only a few tokens."""
    gen = torch.Generator().manual_seed(seed)
    pieces = ["é".encode(), "你好".encode(), "🙂".encode(), b"a", b" ", b"\x80", b"\xff"]  # a byte is a token
    tokens: list[int] = []
    while len(tokens) < 300:
        choice = int(torch.randint(0, len(pieces) + 1, (), generator=gen))
        tokens += [int(torch.randint(0, 3, (), generator=gen))] if choice == len(pieces) else list(pieces[choice])
    tokenizer = CountingTokenizer()
    texts = decoded_step_by_step(tokenizer, tokens)
    assert texts == [ByteTokenizer().decode(tokens[: i + 1], skip_special_tokens=True) for i in range(len(tokens))]
    assert max(tokenizer.lengths) < 40  # windows, not the whole output


class CountingTokenizer(ByteTokenizer):
    """A ByteTokenizer that records how many tokens each decode call got."""

    def __init__(self):
        super().__init__()
        self.lengths: list[int] = []

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        self.lengths.append(len(ids))
        return super().decode(ids, skip_special_tokens)
