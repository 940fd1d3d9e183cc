"""``catekv-serve MODEL --profile PROFILE``: serve a model with a CateKV profile (or ``--profile none``, full
attention) over OpenAI's HTTP API.

MODEL is what ``catekv-profile`` takes (a Hub id, a folder, a ``.gguf`` file, an embedded name such as
``smollm2-135m``); PROFILE is what :func:`catekv_runtime.load_profile` takes (a file, a shipped profile's short name,
a Hub id). Bad input is one line on stderr and exit code 2, checked before the model loads where it can be.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from catekv_models.options import DEVICE_OPTION, DTYPE_OPTION
from catekv_runtime.attention import PREFILL_BACKENDS, resolve_prefill_backend


class BadInput(click.ClickException):
    """A one-line error with exit code 2, like click's usage errors."""

    exit_code = 2


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model")
@click.option("--profile", "profile_name", required=True,
              help="A profile file, a shipped profile's name or a Hub id; `none` for full attention.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--max-batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Requests decoding at once (slots); fewer if --gpu-memory-utilization leaves room for fewer.")
@click.option("--max-model-len", type=click.IntRange(min=1), default=None,
              help="Most tokens (prompt + output) of one request  [default: the model's maximum]")
@click.option("--max-decode-len", type=click.IntRange(min=1), default=None,
              help="Most tokens a request generates beyond what its consistent heads keep of the prompt (CateKV; "
                   "sizes their buffers)  [default: min(max-model-len, 4096)]")
@click.option("--max-waiting", type=click.IntRange(min=0), default=256, show_default=True,
              help="Requests that may wait for a slot; beyond them a request gets a 503.")
@click.option("--gpu-memory-utilization", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Fraction of the GPU's memory the engine may hold; it bounds the slots  [default: 0.9 on CUDA]")
@click.option("--prefill-chunk", type=click.IntRange(min=1), default=8192, show_default=True,
              help="Tokens per prefill chunk, and the prefill work between two decode steps.")
@click.option("--prefill-backend", type=click.Choice(PREFILL_BACKENDS), default="auto",
              show_default=True,
              help="Prefill attention: FlashAttention-4 (`catekv[flash4]`, Hopper and newer), flash-attn 2 (`catekv[flash]`) "
                   "or SDPA; auto picks the fastest installed one that runs on the device.")
@DEVICE_OPTION
@DTYPE_OPTION
@click.option("--api-key", envvar="CATEKV_API_KEY", default=None,
              help="Require `Authorization: Bearer KEY` on every path but /health and /metrics  [env: "
                   "CATEKV_API_KEY]")
@click.option("--served-model-name", default=None, help="The `model` that requests name  [default: MODEL]")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info",
              show_default=True)
@click.option("--access-log/--no-access-log", default=True, show_default=True, help="Log every HTTP request.")
def serve(model: str, profile_name: str, host: str, port: int, max_batch_size: int, max_model_len: int | None,
          max_decode_len: int | None, max_waiting: int, gpu_memory_utilization: float | None, prefill_chunk: int,
          prefill_backend: str, device: str, dtype: str, api_key: str | None, served_model_name: str | None,
          log_level: str, access_log: bool) -> None:
    """Serve MODEL with a CateKV profile over OpenAI's API: /v1/completions, /v1/chat/completions (streamed as
    server-sent events with stream=true), /v1/models, /tokenize, /health, /metrics (Prometheus).

    \b
    catekv-serve smollm2-135m --profile smollm2-135m-instruct --max-model-len 2048
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{"model": "smollm2-135m", "messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 32}'
    """
    import torch

    from catekv_models import ModelError, resolve_device, resolve_dtype
    from catekv_runtime.profile import ProfileError, load_profile

    if api_key is not None and not api_key.strip():
        raise BadInput("--api-key: empty key")
    device = resolve_device(device)
    try:
        kind = torch.device(device).type
    except RuntimeError as error:
        raise BadInput(f"--device: {error}") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise BadInput(f"--device {device}: CUDA is not available")
    if gpu_memory_utilization is not None and kind != "cuda":
        raise BadInput(f"--gpu-memory-utilization needs a CUDA device, and the device is {device}")
    try:
        torch_dtype = resolve_dtype(dtype, device)
    except ModelError as error:
        raise BadInput(f"--dtype: {error}") from None
    try:  # before the model loads; the engine checks again with the model's head_dim (64 passes every backend)
        resolve_prefill_backend(prefill_backend, torch.device(device), torch_dtype, 64)
    except ValueError as error:
        raise BadInput(f"--prefill-backend: {error}") from None
    profile = None
    if profile_name.lower() != "none":
        try:
            profile = load_profile(profile_name)
        except ProfileError as error:
            raise BadInput(f"--profile: {error}") from None
    try:
        import uvicorn

        from .app import build_app
    except ImportError as error:
        raise BadInput(f"{error}; install the server's dependencies with `pip install 'catekv[serve]'`") from None

    from catekv_models import load_model
    from catekv_runtime.engine import Engine

    try:
        model_obj, tokenizer, _ = load_model(model, device=device, dtype=dtype)
    except ModelError as error:
        raise BadInput(str(error)) from None
    if tokenizer is None:
        raise BadInput(f"{model} has no tokenizer files; serving needs one")
    try:
        engine = Engine(model_obj, profile, tokenizer=tokenizer, max_batch_size=max_batch_size,
                        max_model_len=max_model_len, max_decode_len=max_decode_len,
                        gpu_memory_utilization=gpu_memory_utilization, prefill_chunk=prefill_chunk,
                        prefill_backend=prefill_backend)
    except ValueError as error:  # ProfileError, UnsupportedModelError and the engine's checks are ValueErrors
        raise BadInput(str(error)) from None
    name = served_model_name or model
    app = build_app(engine, name, api_key=api_key, max_waiting=max_waiting)
    click.echo(f"catekv-serve: {model} as `{name}` with {_describe(profile, profile_name)}; {engine.slots} slots of "
               f"{engine.max_model_len} tokens, {_kv_gib(engine):.2f} GiB of KV buffers on {device}, prefill attention "
               f"{engine.prefill_backend}; "
               f"http://{host}:{port}/v1", err=True)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log,
                            timeout_graceful_shutdown=5)
    uvicorn.Server(config).run()


def _describe(profile: Any, name: str) -> str:
    if profile is None:
        return "full attention (no profile)"
    consistent = profile.budgets[~profile.head_map.bool()].unique().tolist()
    budget = (f"budget {consistent[0]}" if len(consistent) == 1 else
              f"budgets {min(consistent)}-{max(consistent)} per head" if consistent else "no consistent heads")
    return f"profile {name} ({int(profile.head_map.sum())}/{profile.head_map.numel()} adaptive heads, {budget})"


def _kv_gib(engine: Any) -> float:
    return sum(g.kv.nbytes for g in engine.kv.groups) / 2**30


def main(argv: list[str] | None = None) -> None:
    """The ``catekv-serve`` entry point: click's errors as one line (``Error: ...``) with exit code 2."""
    try:
        code = serve.main(args=argv, prog_name="catekv-serve", standalone_mode=False)
    except click.ClickException as error:
        click.echo(f"Error: {' '.join(error.format_message().split())}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("Aborted!", err=True)
        sys.exit(1)
    sys.exit(code or 0)
