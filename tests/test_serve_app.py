"""catekv_serve's application in-process (Starlette's test client) on a tiny random model: what a client sees when
the engine thread fails, and the queue limit at its smallest. The real server is tested in test_serve.py."""

from __future__ import annotations

import importlib.util

import pytest
from conftest import make_tiny_model
from test_engine import one_thread  # noqa: F401 (autouse)
from test_engine_serving import ByteTokenizer

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("fastapi", "httpx", "prometheus_client")),
    reason="needs the serve extra")


@pytest.fixture
def engine():
    from catekv_runtime.engine import Engine

    model = make_tiny_model("llama")
    model.generation_config.eos_token_id = None
    return Engine(model, None, tokenizer=ByteTokenizer(), max_batch_size=1, max_model_len=128)


def request(**fields) -> dict:
    return {"prompt": "hello", "max_tokens": 3, "temperature": 0, **fields}


def test_a_failed_step_stops_the_engine_and_every_request_hears_of_it(engine):
    """After a step raises, the request under way gets a 503 naming the error, /health answers 503, and new requests
    are refused at once with a 503 (the engine's state is unknown: nothing runs on it any more)."""
    from fastapi.testclient import TestClient

    from catekv_serve.app import build_app

    with TestClient(build_app(engine, "tiny")) as http:
        ok = http.post("/v1/completions", json=request())
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3

        def broken_step():
            raise RuntimeError("device lost")

        engine.step = broken_step  # the engine thread is idle: it calls step() only for the next request
        failed = http.post("/v1/completions", json=request())
        assert failed.status_code == 503 and "device lost" in failed.json()["error"]["message"]
        assert failed.json()["error"]["code"] == "engine_stopped"
        assert http.get("/health").status_code == 503
        for body in (request(), request(stream=True)):
            refused = http.post("/v1/completions", json=body)
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_stopped"


def test_no_waiting_places_refuses_a_second_request_while_one_runs(engine):
    """max_waiting=0 and one slot: while a stream runs, another request gets a 503 queue_full; once the stream has
    ended, requests are taken again."""
    from fastapi.testclient import TestClient

    from catekv_serve.app import build_app

    with TestClient(build_app(engine, "tiny", max_waiting=0)) as http:
        with http.stream("POST", "/v1/completions", json=request(max_tokens=60, stream=True)) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: ")
            refused = http.post("/v1/completions", json=request())
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "queue_full"
            assert [line for line in lines if line][-1] == "data: [DONE]"  # the stream runs to its end
        assert http.post("/v1/completions", json=request()).status_code == 200
