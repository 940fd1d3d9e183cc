"""The FastAPI application: OpenAI's routes on an :class:`~catekv_serve.worker.EngineWorker`.

Every request is checked before it reaches the engine (model name, fields this server does not implement, prompt
length, sampling values) and refused in OpenAI's error shape with its status; the engine refuses anything else with
a ``ValueError`` naming the field, also a 400. A streamed request sends server-sent events (``data: {...}``, then
``data: [DONE]``); a client that goes away aborts its request, which frees its slot at the engine's next step
(Starlette cancels a stream whose client disconnects; a plain request polls for the disconnect while it waits).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from catekv_runtime.engine import Completion, Engine

from .metrics import CONTENT_TYPE, Metrics
from .protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    Reply,
    TokenizeRequest,
    context_length_error,
    invalid_request,
)
from .worker import EngineDead, EngineWorker, QueueFull, RequestHandle

# Paths open without the API key: probes and metric scrapers.
OPEN_PATHS = ("/health", "/metrics")


def build_app(engine: Engine, model_name: str, *, api_key: str | None = None, max_waiting: int = 256,
              disconnect_poll: float = 0.5) -> FastAPI:
    """The ASGI application serving ``engine`` as ``model_name``. Its lifespan starts and stops the engine thread.

    Args:
        engine: needs a tokenizer; no other thread may use it while the application runs.
        model_name: the ``model`` that requests name (and ``/v1/models`` lists).
        api_key: if given, every path but ``/health`` and ``/metrics`` needs ``Authorization: Bearer <api_key>``.
        max_waiting: requests that may wait for a slot; beyond them a request gets a 503.
        disconnect_poll: seconds between two checks that the client of a plain (not streamed) request is still
            there.
    """
    if engine.tokenizer is None:
        raise ValueError("engine: serving needs a tokenizer (Engine(..., tokenizer=...))")
    worker = EngineWorker(engine, Metrics(engine), max_waiting=max_waiting)
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            await run_in_threadpool(worker.stop)

    app = FastAPI(title="catekv-serve", lifespan=lifespan)
    app.state.worker = worker
    if api_key is not None:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    _add_error_handlers(app)

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise ApiError(404, f"the model `{name}` does not exist; this server serves `{model_name}`",
                           param="model", code="model_not_found")

    async def encode(make_ids: Callable[[], list[int]], prompt_field: str) -> list[int]:
        """Token ids from the tokenizer, in a worker thread (a long prompt does not hold up the event loop);
        ``make_ids`` may raise an :class:`ApiError` of its own."""
        try:
            return await run_in_threadpool(make_ids)
        except (ValueError, TypeError) as error:
            raise invalid_request(error, prompt_field) from None
        except Exception as error:
            if type(error).__module__.startswith("jinja2"):  # the chat template refused the conversation
                raise ApiError(400, f"messages: the chat template failed: {error}", param="messages") from None
            raise

    async def generate(body: CompletionRequest | ChatCompletionRequest, request: Request, reply: Reply,
                       make_ids: Callable[[], list[int]], prompt_field: str) -> Response:
        arrival = time.perf_counter()
        check_model(body.model)
        body.check()
        ids = await encode(make_ids, prompt_field)
        room = engine.max_new_tokens(len(ids))
        if room < 1:
            raise context_length_error(len(ids), engine.max_model_len, prompt_field)
        requested = body.requested_max_tokens
        handles: list[RequestHandle] = []  # one engine request per choice
        try:
            for params in body.choice_params(room if requested is None else requested):
                handles.append(worker.submit(ids, params, stream=body.stream, arrival=arrival))
            for handle in handles:
                event = await handle.next()
                if event[0] == "error":
                    raise invalid_request(event[1], prompt_field)
                if event[0] == "failed":
                    raise ApiError(503, event[1], code="engine_stopped")
        except (QueueFull, EngineDead) as error:
            close(handles)
            code = "queue_full" if isinstance(error, QueueFull) else "engine_stopped"
            raise ApiError(503, str(error), code=code) from None
        except BaseException:
            close(handles)
            raise
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            # The generator closes the handles when it ends or is cancelled; the background task covers a stream
            # cancelled before the generator started.
            return StreamingResponse(events(handles, reply, include_usage), media_type="text/event-stream",
                                     background=BackgroundTask(close, handles))
        waits = [asyncio.ensure_future(result(handle, request)) for handle in handles]
        try:
            completions = await asyncio.gather(*waits)
        finally:  # one choice's error ends them all
            for wait in waits:
                wait.cancel()
            close(handles)
        if any(c is None for c in completions):  # the client went away; nobody reads this
            return Response(status_code=499)
        return JSONResponse(reply.body(completions))

    async def result(handle: RequestHandle, request: Request) -> Completion | None:
        """Wait for a plain request's completion; None if its client disconnects first."""
        waiting = asyncio.ensure_future(handle.next())
        try:
            while True:
                done, _ = await asyncio.wait({waiting}, timeout=disconnect_poll)
                if waiting in done:
                    event = waiting.result()
                    if event[0] == "finished":
                        return event[1]
                    raise ApiError(503, event[1], code="engine_stopped")
                if await request.is_disconnected():
                    return None
        finally:
            waiting.cancel()

    async def events(handles: list[RequestHandle], reply: Reply, include_usage: bool) -> AsyncIterator[str]:
        """The stream of every choice's chunks, as each choice's text grows, then the usage and the end."""
        try:
            for chunk in reply.opening(len(handles)):
                yield _sse(chunk)
            finished: dict[int, Completion] = {}
            async with aclosing(merged(handles)) as choice_events:
                async for index, event in choice_events:
                    if event[0] == "delta":
                        yield _sse(reply.chunk(event[1], index=index))
                    elif event[0] == "finished":
                        finished[index] = event[1]
                        yield _sse(reply.chunk(event[2], event[1], index=index))
                    else:
                        yield _sse(ApiError(503, event[1], code="engine_stopped").body())
                        break
                else:
                    if include_usage:
                        yield _sse(reply.usage_chunk([finished[i] for i in range(len(handles))]))
            yield "data: [DONE]\n\n"
        finally:
            close(handles)

    @app.get("/health")
    async def health() -> Response:
        if not worker.alive:
            return ApiError(503, f"the engine has stopped: {worker.error}", code="engine_stopped").response()
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(worker.metrics.exposition(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": started,
                                            "owned_by": "catekv", "max_model_len": engine.max_model_len}]}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "give either prompt or messages", param="prompt")
        if body.messages is not None:
            conversation = ChatCompletionRequest(messages=body.messages).conversation()
            ids = await encode(lambda: engine.chat_prompt(conversation), "messages")
        else:
            ids = await encode(lambda: engine.tokenize(body.prompt), "prompt")
        return {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await generate(body, request, Reply(chat=False, model=model_name),
                              lambda: engine.tokenize(body.single_prompt()), "prompt")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await generate(body, request, Reply(chat=True, model=model_name),
                              lambda: engine.chat_prompt(body.conversation()), "messages")

    return app


def close(handles: list[RequestHandle]) -> None:
    """Abort every request of ``handles`` that has not ended (idempotent)."""
    for handle in handles:
        handle.close()


async def merged(handles: list[RequestHandle]) -> AsyncIterator[tuple[int, tuple[Any, ...]]]:
    """``(choice index, event)`` of every handle as the events come, until each has had its final one; one handle
    is read directly (no task per event)."""
    if len(handles) == 1:
        while not handles[0].ended:
            yield 0, await handles[0].next()
        return
    pending = {asyncio.ensure_future(handle.next()): i for i, handle in enumerate(handles)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=pending.__getitem__):
                index = pending.pop(task)
                if not handles[index].ended:
                    pending[asyncio.ensure_future(handles[index].next())] = index
                yield index, task.result()
    finally:
        for task in pending:
            task.cancel()


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape: ours, FastAPI's validation errors (400, not 422, as OpenAI and vLLM answer),
    and Starlette's (unknown path, wrong method)."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> Response:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> Response:
        errors = error.errors()
        if errors and errors[0].get("type") == "json_invalid":
            reason = errors[0].get("ctx", {}).get("error", errors[0].get("msg"))
            return ApiError(400, f"the body is not valid JSON: {reason}").response()
        parts, params = [], []
        for item in errors[:5]:
            loc = [str(x) for x in item.get("loc", ()) if x != "body"]
            parts.append(f"{'.'.join(loc)}: {item.get('msg')}" if loc else str(item.get("msg")))
            params.append(loc[0] if loc else None)
        return ApiError(400, "; ".join(parts) or "invalid request", param=params[0] if params else None).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> Response:
        return ApiError(error.status_code, str(error.detail)).response()


class ApiKeyMiddleware:
    """401 in OpenAI's shape for a request without ``Authorization: Bearer <api_key>`` (but on :data:`OPEN_PATHS`).
    Plain ASGI, ahead of the routes: the key is checked before the body is read, and streams pass through as they
    are."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = header.partition(b" ")
            if scheme.lower() != b"bearer" or not token.strip():
                error = ApiError(401, "missing API key: send the header `Authorization: Bearer <key>`",
                                 code="invalid_api_key")
                await error.response()(scope, receive, send)
                return
            if not hmac.compare_digest(token.strip(), self.key):
                await ApiError(401, "incorrect API key", code="invalid_api_key").response()(scope, receive, send)
                return
        await self.app(scope, receive, send)
