"""The engine thread: the one thread that calls the engine, and the queues between it and the HTTP handlers.

torch does not support concurrent forward passes over one model, and the engine's state is not locked, so one
background thread owns the :class:`~catekv_runtime.engine.Engine`: it takes commands (add a request, abort one) from
a thread-safe queue, runs :meth:`~catekv_runtime.engine.Engine.step` while anything is unfinished, and after every
step hands each request's new text to its handler on the asyncio loop (``loop.call_soon_threadsafe`` onto the
request's :class:`asyncio.Queue`). Handlers never touch the engine, except :meth:`Engine.tokenize` and
:meth:`Engine.chat_prompt`, which read only the tokenizer.

A request's events, in order: ``("accepted",)`` or ``("error", ValueError)`` (the engine refused it); then, when
streamed, ``("delta", text)`` as its text grows; then ``("finished", Completion, rest_of_text)``, or
``("failed", message)`` if the engine thread died.

The queue has a limit: at most ``slots + max_waiting`` requests are unfinished at once; one more raises
:class:`QueueFull` in :meth:`EngineWorker.submit` (the server answers 503), so that a burst is refused instead of
holding unbounded prompts in memory.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from typing import Any

import torch

from catekv_runtime.engine import Completion, Engine, SamplingParams

from .metrics import Metrics

log = logging.getLogger("catekv_serve")


class QueueFull(RuntimeError):
    """The server holds as many unfinished requests as it may."""


class EngineDead(RuntimeError):
    """The engine thread has stopped (an error in a step, or shutdown)."""


class RequestHandle:
    """One request as its HTTP handler sees it: the events of the engine thread, and :meth:`close` to abort it.

    Made by :meth:`EngineWorker.submit` on the asyncio loop; ``arrival`` (``time.perf_counter()``) is when the HTTP
    request came, for the time to first token.
    """

    def __init__(self, worker: EngineWorker, loop: asyncio.AbstractEventLoop, arrival: float, stream: bool):
        self.events: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        self.ended = False  # the handler has seen "finished", "error" or "failed", or closed the request
        self._worker, self._loop, self.arrival, self.stream = worker, loop, arrival, stream
        # Engine-thread state.
        self.request_id: int | None = None
        self.tokens = 0
        self.sent = 0
        self.last_token: float | None = None

    async def next(self) -> tuple[Any, ...]:
        """The next event; the handle counts as ended after a final one."""
        event = await self.events.get()
        if event[0] in ("finished", "error", "failed"):
            self.ended = True
        return event

    def close(self) -> None:
        """Abort the request unless it has ended (the client went away, or the handler gave up on it); idempotent."""
        if not self.ended:
            self.ended = True
            self._worker.abort(self)

    def emit(self, event: tuple[Any, ...]) -> None:
        """Hand an event to the handler (from the engine thread)."""
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop has closed: the server is shutting down and nobody waits for the event
            pass


class EngineWorker:
    """Runs ``engine`` in a background thread; see the module docstring.

    Args:
        engine: the engine, used by no other thread from now on (but for its tokenizer).
        metrics: updated after every step; None for none.
        max_waiting: how many requests may wait for a slot (beyond the ``engine.slots`` running).
    """

    def __init__(self, engine: Engine, metrics: Metrics | None = None, *, max_waiting: int = 256):
        if isinstance(max_waiting, bool) or not isinstance(max_waiting, int) or max_waiting < 0:
            raise ValueError(f"max_waiting must be an int >= 0, got {max_waiting!r}")
        self.engine = engine
        self.metrics = metrics
        self.capacity = engine.slots + max_waiting
        self.error: str | None = None  # why the engine thread stopped, once it has
        self._commands: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards _unfinished, error and what submit puts on the queue
        self._unfinished = 0
        self._handles: dict[int, RequestHandle] = {}  # engine request id -> handle (engine thread only)
        self._thread = threading.Thread(target=self._run, name="catekv-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the thread after its current step; unfinished requests fail with "server shutting down"."""
        self._commands.put(("stop",))
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def submit(self, prompt: list[int], params: SamplingParams, *, stream: bool, arrival: float) -> RequestHandle:
        """Queue a request (from the asyncio loop). Raises :class:`QueueFull` or :class:`EngineDead` at once."""
        handle = RequestHandle(self, asyncio.get_running_loop(), arrival, stream)
        with self._lock:
            if self.error is not None:
                raise EngineDead(self.error)
            if self._unfinished >= self.capacity:
                if self.metrics is not None:
                    self.metrics.rejected.inc()
                raise QueueFull(f"the server holds {self._unfinished} unfinished requests, its limit "
                                f"({self.engine.slots} running + {self.capacity - self.engine.slots} waiting); "
                                "retry later")
            self._unfinished += 1
            self._commands.put(("add", handle, prompt, params))
        return handle

    def abort(self, handle: RequestHandle) -> None:
        self._commands.put(("abort", handle))

    # ------------------------------------------------------------------------------ the engine thread

    def _run(self) -> None:
        reason = "server shutting down"
        device = self.engine.model.device
        if device.type == "cuda":  # a new thread's current device is cuda:0; CUDA graphs capture on the current one
            torch.cuda.set_device(device)
        try:
            while self._take_commands(block=not self.engine.has_unfinished()):
                if self.engine.has_unfinished():
                    self._publish(self.engine.step())
                self._update_gauges()
        except Exception as error:  # a failed step leaves the engine in an unknown state: stop serving
            log.exception("the engine failed; the server stops taking requests")
            reason = f"the engine failed: {type(error).__name__}: {error}"
        with self._lock:
            self.error = reason
        for handle in self._handles.values():
            handle.emit(("failed", reason))
        self._handles.clear()
        while True:  # requests submitted before `error` was set
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            if command[0] == "add":
                command[1].emit(("failed", reason))

    def _take_commands(self, block: bool) -> bool:
        """Apply the queued commands (waiting for one if ``block``); False on "stop"."""
        try:
            command = self._commands.get(block=block)
        except queue.Empty:
            return True
        while True:
            if command[0] == "stop":
                return False
            if command[0] == "add":
                self._add(*command[1:])
            else:
                self._abort(command[1])
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _add(self, handle: RequestHandle, prompt: list[int], params: SamplingParams) -> None:
        try:
            request_id = self.engine.add_request(prompt, params)
        except (ValueError, TypeError) as error:
            self._release()
            handle.emit(("error", error))
            return
        handle.request_id = request_id
        self._handles[request_id] = handle
        handle.emit(("accepted",))

    def _abort(self, handle: RequestHandle) -> None:
        if handle.request_id is None or self._handles.get(handle.request_id) is not handle:
            return  # refused, finished, or aborted already
        del self._handles[handle.request_id]
        self.engine.abort(handle.request_id)
        self._release()
        if self.metrics is not None:
            self.metrics.finished.labels("abort").inc()
            self.metrics.e2e.observe(time.perf_counter() - handle.arrival)

    def _release(self) -> None:
        with self._lock:
            self._unfinished -= 1

    def _publish(self, finished: list[Completion]) -> None:
        """After a step: count each request's new tokens, send streamed requests their new text, end the finished."""
        now = time.perf_counter()
        done = {c.request_id: c for c in finished}
        for request_id, handle in list(self._handles.items()):
            output = done.get(request_id) or self.engine.partial(request_id)
            if output is None:
                continue
            self._count_tokens(handle, output, now)
            if request_id in done:
                del self._handles[request_id]
                self._release()
                if self.metrics is not None:
                    self.metrics.finished.labels(output.finish_reason).inc()
                    self.metrics.e2e.observe(now - handle.arrival)
                handle.emit(("finished", output, output.text[handle.sent:]))
            elif handle.stream and len(output.text) > handle.sent:
                handle.emit(("delta", output.text[handle.sent:]))
                handle.sent = len(output.text)

    def _count_tokens(self, handle: RequestHandle, output: Completion, now: float) -> None:
        """Token counters and latencies. The first step of a request may bring two tokens (the one sampled from the
        prefill and one decode step): the first counts for the time to first token, the second for no latency, as
        its own time is not seen; later steps bring one token each."""
        new = len(output.token_ids) - handle.tokens
        if new <= 0:
            return
        if self.metrics is not None:
            self.metrics.generation_tokens.inc(new)
            if handle.last_token is None:
                self.metrics.prompt_tokens.inc(output.prompt_tokens)
                self.metrics.ttft.observe(now - handle.arrival)
            else:
                for _ in range(new):
                    self.metrics.itl.observe((now - handle.last_token) / new)
        handle.tokens += new
        handle.last_token = now

    def _update_gauges(self) -> None:
        if self.metrics is None:
            return
        self.metrics.running.set(self.engine.num_running)
        self.metrics.waiting.set(self.engine.num_waiting)
        held, full = self.engine.kv_usage()
        self.metrics.kv_held.set(held)
        self.metrics.kv_full.set(full)
