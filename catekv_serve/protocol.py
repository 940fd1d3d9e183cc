"""The OpenAI API as this server speaks it: request fields, their sampling parameters, responses, stream chunks
and errors.

Field names and defaults follow OpenAI's API and vLLM's extensions (``top_k``, ``min_p``, ``ignore_eos``,
``stop_token_ids``). ``n`` choices are ``n`` requests to the engine, the i-th with ``seed + i`` when a seed is given.
Fields this server does not implement (log probabilities, penalties, tools, ...) are refused with a 400 naming the
field when set to anything but their neutral value, rather than silently ignored; unknown fields are ignored, as vLLM
does.
"""

from __future__ import annotations

import dataclasses
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict
from starlette.responses import JSONResponse

from catekv_runtime.engine import Completion, SamplingParams

# The most choices one request may ask for (OpenAI's limit).
MAX_CHOICES = 128

# OpenAI's error types by status.
_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
                405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}


class ApiError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": _ERROR_TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


class StreamOptions(BaseModel):
    include_usage: bool = False


class _GenerationRequest(BaseModel):
    """The fields both endpoints share."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    n: int | None = None
    # Refused unless neutral (see _NEUTRAL).
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    use_beam_search: bool | None = None

    # Field -> (its neutral values, what to do instead).
    _NEUTRAL: ClassVar[dict[str, tuple[tuple[Any, ...], str]]] = {
        "presence_penalty": ((None, 0), "penalties are not implemented"),
        "frequency_penalty": ((None, 0), "penalties are not implemented"),
        "repetition_penalty": ((None, 1), "penalties are not implemented"),
        "logit_bias": ((None, {}), "logit bias is not implemented"),
        "use_beam_search": ((None, False), "beam search is not implemented"),
    }

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def check(self) -> None:
        """Refuse what this server does not implement (400 naming the field)."""
        for name, (neutral, instead) in self._NEUTRAL.items():
            value = getattr(self, name)
            if value not in neutral:
                raise ApiError(400, f"{name}={value!r} is not supported by catekv-serve: {instead}", param=name)
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "stream_options: only allowed with stream=true", param="stream_options")
        if self.n is not None and not 1 <= self.n <= MAX_CHOICES:
            raise ApiError(400, f"n must be between 1 and {MAX_CHOICES}, got {self.n}", param="n")

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        """The engine's sampling parameters (a 400 naming the field for a bad value)."""
        given = {name: getattr(self, name) for name in ("temperature", "top_p", "top_k", "min_p")}
        try:
            return SamplingParams(max_tokens=max_tokens, stop=self.stop, stop_token_ids=self.stop_token_ids,
                                  seed=self.seed, ignore_eos=self.ignore_eos,
                                  **{k: v for k, v in given.items() if v is not None})
        except ValueError as error:
            raise invalid_request(error, "prompt") from None

    def choice_params(self, max_tokens: int) -> list[SamplingParams]:
        """The sampling parameters of each of the ``n`` choices: the i-th with ``seed + i`` when a seed is given (the
        choices differ, and each is what a request with that seed alone gives), else each drawn its own seed."""
        params = self.sampling_params(max_tokens)
        if params.seed is None:
            return [params] * (self.n or 1)
        try:
            return [dataclasses.replace(params, seed=params.seed + i) for i in range(self.n or 1)]
        except ValueError as error:
            raise invalid_request(error, "prompt") from None


class CompletionRequest(_GenerationRequest):
    """``POST /v1/completions``: one prompt, a string or token ids."""

    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None

    _NEUTRAL: ClassVar[dict[str, tuple[tuple[Any, ...], str]]] = {
        **_GenerationRequest._NEUTRAL,
        "echo": ((None, False), "the prompt is not echoed"),
        "suffix": ((None, ""), "suffixes are not implemented"),
        "best_of": ((None, 1), "one completion per request"),
        "logprobs": ((None,), "log probabilities are not returned"),
    }

    def single_prompt(self) -> str | list[int]:
        """The prompt, a string or token ids; a batch of one is accepted, larger batches are refused."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise ApiError(400, f"prompt: a batch of {len(prompt)} prompts; send one request per prompt",
                               param="prompt")
            prompt = prompt[0]
        return prompt


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(_GenerationRequest):
    """``POST /v1/chat/completions``: a conversation rendered by the tokenizer's chat template."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None

    _NEUTRAL: ClassVar[dict[str, tuple[tuple[Any, ...], str]]] = {
        **_GenerationRequest._NEUTRAL,
        "logprobs": ((None, False), "log probabilities are not returned"),
        "top_logprobs": ((None, 0), "log probabilities are not returned"),
        "tools": ((None, []), "tool calls are not implemented"),
        "response_format": ((None, {"type": "text"}), "structured output is not implemented"),
    }

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def conversation(self) -> list[dict[str, str]]:
        """The messages as the chat template takes them; content given as parts must be text parts."""
        if not self.messages:
            raise ApiError(400, "messages: empty conversation", param="messages")
        rendered = []
        for i, message in enumerate(self.messages):
            content = message.content
            if isinstance(content, list):
                kinds = {part.get("type") for part in content} - {"text"}
                if kinds:
                    raise ApiError(400, f"messages[{i}].content: only text parts are supported, got "
                                        f"{sorted(map(str, kinds))}", param="messages")
                content = "\n".join(str(part.get("text", "")) for part in content)
            entry = {"role": message.role, "content": content or ""}
            if message.name is not None:
                entry["name"] = message.name
            rendered.append(entry)
        return rendered


class TokenizeRequest(BaseModel):
    """``POST /tokenize`` (vLLM's): a prompt, or chat messages with the generation prompt."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | list[int] | None = None
    messages: list[ChatMessage] | None = None


_FIELDS = set(ChatCompletionRequest.model_fields) | set(CompletionRequest.model_fields)


def invalid_request(error: ValueError, prompt_field: str) -> ApiError:
    """A 400 from the ValueError of SamplingParams or the engine, whose message starts with the field it names
    (``SamplingParams.top_p must ...``, ``max_tokens: ...``); ``prompt`` is reported as ``prompt_field``."""
    message = str(error).removeprefix("SamplingParams.")
    name = re.match(r"\w+", message)
    param = name.group(0) if name and name.group(0) in _FIELDS else None
    return ApiError(400, message, param=prompt_field if param == "prompt" else param)


def context_length_error(prompt_tokens: int, max_model_len: int, prompt_field: str) -> ApiError:
    return ApiError(400, f"{prompt_field}: this model's maximum context length is {max_model_len} tokens, and the "
                         f"prompt has {prompt_tokens}, which leaves no room for a completion",
                    param=prompt_field, code="context_length_exceeded")


def usage(completions: list[Completion]) -> dict[str, int]:
    """One request's usage: its prompt once, and every choice's completion tokens."""
    prompt, generated = completions[0].prompt_tokens, sum(c.completion_tokens for c in completions)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


@dataclass
class Reply:
    """The response objects of one request: a whole response, or the chunks of a stream (``chat`` tells the two
    endpoints' shapes apart)."""

    chat: bool
    model: str
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = self.id or f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"

    def _envelope(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    def _choice(self, text: str | None, completion: Completion | None, streamed: bool, index: int) -> dict[str, Any]:
        end = {"finish_reason": completion.finish_reason if completion else None,
               "stop_reason": completion.stop_reason if completion else None}
        if not self.chat:
            return {"index": index, "text": text or "", "logprobs": None, **end}
        if streamed:
            return {"index": index, "delta": {"content": text} if text else {}, "logprobs": None, **end}
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None, **end}

    def body(self, completions: list[Completion]) -> dict[str, Any]:
        """The whole (not streamed) response: one choice per completion."""
        kind = "chat.completion" if self.chat else "text_completion"
        choices = [self._choice(c.text, c, False, i) for i, c in enumerate(completions)]
        return {**self._envelope(kind, choices), "usage": usage(completions)}

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return self._envelope("chat.completion.chunk" if self.chat else "text_completion", choices)

    def opening(self, choices: int = 1) -> list[dict[str, Any]]:
        """Chunks sent as soon as the request is accepted: a chat stream opens each choice with the assistant's
        role."""
        if not self.chat:
            return []
        return [self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}]) for i in range(choices)]

    def chunk(self, text: str, completion: Completion | None = None, index: int = 0) -> dict[str, Any]:
        """A chunk of choice ``index``'s new text; its last one (``completion`` given) carries the finish reason."""
        return self._chunk([self._choice(text, completion, True, index)])

    def usage_chunk(self, completions: list[Completion]) -> dict[str, Any]:
        """The chunk of ``stream_options.include_usage``: no choices, the usage."""
        return {**self._chunk([]), "usage": usage(completions)}
