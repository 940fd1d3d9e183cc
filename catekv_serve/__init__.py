"""``catekv-serve``: an OpenAI-compatible HTTP server on :class:`catekv_runtime.engine.Engine`.

``catekv-serve MODEL --profile PROFILE`` serves ``/v1/completions``, ``/v1/chat/completions`` (plain and streamed as
server-sent events), ``/v1/models``, ``/tokenize``, ``/health`` and ``/metrics`` (Prometheus text) with FastAPI and
uvicorn; vLLM's OpenAI server is the model for field names and behaviour.

Why a package of its own, beside ``catekv_runtime`` and ``catekv_models``: the runtime's core needs only torch and
safetensors and never imports the model loader, but a server has to load MODEL as every command does (a Hub id, a
folder, a GGUF file or an embedded name, through :func:`catekv_models.load_model`) and needs web dependencies
besides. Putting it inside the runtime would break that rule. ``catekv_serve`` sits on top of both and is installed
with the ``serve`` extra.

Layout: :mod:`.worker` (the one thread that owns the engine), :mod:`.protocol` (OpenAI request fields, responses,
errors), :mod:`.metrics`, :mod:`.app` (the FastAPI application), :mod:`.cli`. From Python,
``catekv_serve.app.build_app(engine, model_name)`` gives the ASGI application for an engine of your own, to run
with uvicorn in one process (the worker thread owns the engine). Nothing is imported here, so that the command line
checks its arguments before the web stack and torch load.
"""
