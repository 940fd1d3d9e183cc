"""The inference engine: requests in fixed slots, prefill interleaved with decode steps, sampling, stops, streaming.

A fixed number of slots (sized from ``max_batch_size`` and, if given, a KV memory budget) each hold one sequence's
KV in static buffers (:mod:`.kv`). A request waits until a slot is free, then prefills into it layer by layer, a
budget of ``prefill_chunk`` tokens through every layer per engine step, while the running requests keep decoding: every
:meth:`Engine.step` advances the prefill by that budget and then runs one decode step over the rows in use. A
request that finishes (end-of-sequence or a stop token, a stop string, ``max_tokens``) frees its slot; the other
rows never see it, because each row's lengths, position and sampling parameters are its own. The host reads a
step's tokens after launching the next step (a pinned buffer and an event, no synchronisation of the device), so
on a GPU a finished request decodes once more before its row is freed, and that token is dropped.

A step of a single row (one request decoding) runs its projections as fused Triton kernels; a step of several rows
runs them on cuBLAS with the RMSNorms (and residual adds) and SiLU-gating as one Triton kernel each
(``projections``).

With ``profile=None`` every head keeps every token: full attention on the same engine.

Under tensor parallelism (``tensor_parallel=True``, a ``torchrun`` job of t processes) every rank runs this same engine
on its share of the model (:meth:`.DecoderModel.shard`) and holds only its KV heads' slots; the ranks must run the
same steps in the same order, since every step all-reduces. The contract: every rank builds the engine with the
same arguments; rank 0 alone takes requests (its API is the one above) and, at each of its steps, sends the other
ranks the requests it added and aborted since the step before (over a gloo group, so the device never waits for
it); ranks 1.. call :meth:`Engine.follow`, which replays them and steps, until rank 0 calls :meth:`Engine.shutdown`.
Everything a rank decides from then on (slots, prefill order, stops) follows from those calls and the tokens, and
the tokens are rank 0's on every rank.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ..attention import resolve_prefill_backend
from ..params import UNLIMITED_BUDGET
from ..profile import Profile, ProfileParams, resolve_profile
from .config import default_kernel_config
from .kv import SlotKV, decode_attention_torch, layer_selectors, prefill
from .model import DecoderModel
from .sampling import Filters, SamplingParams, sample

Prompt = str | Sequence[int]


@dataclass
class Completion:
    """One finished request (vLLM's ``CompletionOutput`` with the prompt and usage folded in).

    ``token_ids`` include a final stop or end-of-sequence token; ``text`` (None without a tokenizer) excludes special
    tokens and a matched stop string. ``finish_reason`` is ``"stop"`` (a stop token, stop string or end of sequence;
    ``stop_reason`` says which, None for end of sequence) or ``"length"`` (``max_tokens`` reached); None while the
    request runs (:meth:`Engine.partial`).
    """

    request_id: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str | None
    stop_reason: int | str | None = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class _Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    seed: int
    output: list[int] = field(default_factory=list)
    text: str = ""
    slot: int = -1
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prefill: Iterator[int] | None = None
    kv_kept: int = 0  # token-heads its prompt keeps in the slot (set when its prefill ends)
    # Incremental detokenization (vLLM's offsets): the text of output[:read_offset] is final; each new token decodes
    # only output[prefix_offset:], a few tokens, rather than the whole output again.
    final_text: str = ""
    prefix_offset: int = 0
    read_offset: int = 0

    def detokenize(self, decode: Callable[[list[int]], str]) -> None:
        """Set ``text`` to the decoded output (``decode``: ids to text without special tokens, :func:`text_decoder`),
        equal to decoding it whole: the window from ``prefix_offset`` decodes with the tokens before the new ones as
        context (a SentencePiece leading space, a character split across tokens), and becomes final once it ends
        with a whole character."""
        window = self.output[self.prefix_offset :]
        context = decode(window[: self.read_offset - self.prefix_offset])
        text = decode(window)
        if not text.startswith(context):  # the new tokens changed how the context decodes: start over (rare)
            self.final_text, self.prefix_offset, self.read_offset = "", 0, 0
            context, text = "", decode(self.output)
        self.text = self.final_text + text[len(context) :]
        if len(text) > len(context) and not text.endswith("\ufffd"):
            self.final_text, self.prefix_offset, self.read_offset = self.text, self.read_offset, len(self.output)

    def completion(self, with_text: bool) -> Completion:
        return Completion(self.id, list(self.prompt), list(self.output), self.text if with_text else None,
                          self.finish_reason, self.stop_reason)


@dataclass
class _Readback:
    """A launched decode step's tokens on their way to the host: ``host[i]`` is row ``lo + i``'s once ``event`` is
    done; ``running`` the row -> request map the step ran with."""

    event: Any
    host: torch.Tensor
    lo: int
    running: dict[int, _Request]


class _HostEvent:
    """The CPU's stand-in for a CUDA event: CPU work is done when it returns."""

    def record(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


class Engine:
    """Continuous-batching generation over a transformers Llama-family model, with or without a CateKV profile.

    Args:
        model: a transformers causal LM of the Llama family (see :mod:`.model`); its weights are shared, not copied.
        profile: a CateKV profile, or None for full attention on the same engine. Its per-head budgets are kept
            (each layer's consistent heads of one budget are one head group); ``overrides`` (budget, eta, ...) apply
            to it as in :func:`catekv_runtime.apply`, and give every consistent head one budget.
        tokenizer: needed for string prompts, text outputs, stop strings and chat.
        max_batch_size: the most requests decoding at once (slots).
        max_model_len: the most tokens (prompt + output) of one request; default the model's
            ``max_position_embeddings``. It sizes the adaptive heads' buffers.
        max_decode_len: the most tokens one request may generate beyond what its consistent heads keep of the prompt
            (CateKV only; default ``min(max_model_len, 4096)``). It sizes the consistent heads' buffers: their budget
            plus this.
        kv_cache_memory: bytes of KV buffers to allocate at most; the slot count is then the smaller of
            ``max_batch_size`` and what fits.
        gpu_memory_utilization: on CUDA, the fraction of the GPU's memory the engine may hold in all (default 0.9
            unless ``kv_cache_memory`` is given): what the model and an estimate of the prefill's working memory
            leave of it bounds the KV buffers.
        prefill_chunk: tokens per prefill chunk, and the prefill work done between two decode steps: that many tokens
            through every layer (vLLM's token budget per step; lower it for a smaller worst-case inter-token
            latency, raise it for a shorter time to first token).
        attention: decode attention: ``"triton"`` (the split-K kernel, CUDA, or CPU under ``TRITON_INTERPRET=1``),
            ``"torch"`` (plain PyTorch, any device) or ``"auto"`` (triton on CUDA).
        prefill_backend: the prefill's attention: ``"fa4"`` (FlashAttention-4, the ``flash4`` extra; compute
            capability 9.0+), ``"flash2"`` (flash-attn 2, the ``flash`` extra), ``"sdpa"`` or ``"auto"`` (the fastest
            that runs here, :func:`catekv_runtime.attention.resolve_prefill_backend`); the attribute of the same name
            holds the one chosen.
        cuda_graphs: replay each decode step as a CUDA graph, one per decode window (one row, or a batch size
            rounded up to a power of two) and set of sampling filters in use: those of greedy and plain sampling
            captured at start-up, others when first needed. Default: on CUDA.
        projections: how a decode step runs its projections and the small ops around them: ``"triton"`` (CUDA, or
            CPU under ``TRITON_INTERPRET=1``: a single row's projections one kernel each,
            ``kernels.triton_linear.fused_linear``, with the RMSNorms, SiLU x up and the residual adds fused in;
            several rows' projections on cuBLAS, which reuses each weight tile across rows, with each RMSNorm and its
            residual add one kernel and SiLU x up another, ``kernels.triton_norm``), ``"torch"`` or ``"auto"``
            (triton with triton attention). Never under tensor parallelism (the fused residual add would come before
            the all-reduce).
        tensor_parallel: shard the model over every process of the initialized default process group (``torchrun``;
            NCCL on GPUs, each rank's model on its own device): rank r of t computes KV heads ``[r * H / t, (r + 1)
            * H / t)`` with their query heads and its share of the MLP, holds only those heads' slots and selects
            their tokens (selection is per head, so the result is the single-process engine's). ``model`` is loaded
            normally, the full weights on every rank; the engine keeps copies of its share. The KV heads and the
            MLP width must divide by t. See the module docstring for who calls what.
    """

    def __init__(self, model: torch.nn.Module, profile: Profile | None = None, *, tokenizer: Any = None,
                 max_batch_size: int = 8, max_model_len: int | None = None, max_decode_len: int | None = None,
                 kv_cache_memory: int | None = None, gpu_memory_utilization: float | None = None,
                 prefill_chunk: int = 8192, attention: str = "auto", prefill_backend: str = "auto",
                 cuda_graphs: bool | None = None,
                 projections: str = "auto", tensor_parallel: bool = False, **overrides: Any):
        from ..integration import model_spec, rank_heads

        self.model = DecoderModel.from_transformers(model)
        self.rank, self.tp_size, self._control = _tensor_parallel_group() if tensor_parallel else (0, 1, None)
        if self.tp_size > 1:
            self.model = self.model.shard(self.rank, self.tp_size)
        self.tokenizer = tokenizer
        self._decode_text = text_decoder(tokenizer) if tokenizer is not None else None
        config = model.config.get_text_config(decoder=True)
        if profile is not None:
            profile = resolve_profile(profile, overrides)
            profile.check_model(dataclasses.replace(model_spec(model), model_id=""))
        elif overrides:
            raise TypeError(f"overrides {sorted(overrides)} need a profile")
        self.profile = profile
        _check_positive("max_batch_size", max_batch_size)
        _check_positive("prefill_chunk", prefill_chunk)
        self.max_model_len = max_model_len if max_model_len is not None else int(config.max_position_embeddings)
        _check_positive("max_model_len", self.max_model_len)
        if profile is not None:  # the profile's budgets, per head (an override has made them one budget)
            self.budgets, self.params = profile.budgets.to(torch.int64), profile.params
        else:
            self.budgets = torch.full((self.model.num_layers, self.model.kv_heads * self.tp_size), UNLIMITED_BUDGET)
            self.params = ProfileParams(adaptive_ratio=1.0, eta=1.0)
        self.max_decode_len = min(self.max_model_len, 4096) if max_decode_len is None else max_decode_len
        _check_positive("max_decode_len", self.max_decode_len)
        # Tokens a row of each budget's heads holds: an adaptive head every position; a consistent head the most it
        # keeps of any prompt, plus max_decode_len.
        self.capacities = {b: self.max_model_len if b == UNLIMITED_BUDGET
                           else _max_consistent_tokens(self.params, b, self.max_model_len) + self.max_decode_len
                           for b in torch.unique(self.budgets).tolist()}
        self.prefill_chunk = prefill_chunk
        device = self.model.device
        self.attention = _kernel_kind("attention", attention, device, "triton" if device.type == "cuda" else "torch")
        self.projections = _kernel_kind("projections", projections, device, self.attention)
        self.prefill_backend = resolve_prefill_backend(prefill_backend, device, self.model.dtype,
                                                       self.model.head_dim)
        if self.projections == "triton" and not self.model.fusable():
            self.projections = "torch"
        self.cuda_graphs = device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and device.type != "cuda":
            raise ValueError("cuda_graphs needs the model on a CUDA device")
        self._graphs: dict[tuple[int, int, Filters], Any] = {}
        self._graph_pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        local_budgets = rank_heads(self.budgets, self.rank, self.tp_size)  # every head without TP
        per_slot = SlotKV.bytes_per_slot(self.model, local_budgets, self.capacities)
        budget = _kv_budget(kv_cache_memory, gpu_memory_utilization, device, self._prefill_bytes())
        slots = max_batch_size if budget is None else min(max_batch_size, budget // per_slot)
        if self._control is not None:  # ranks hold different heads (and memory): every rank takes the fewest slots
            fewest = torch.tensor(slots)
            dist.all_reduce(fewest, op=dist.ReduceOp.MIN, group=self._control)
            slots = int(fewest)
        if slots < 1:
            raise ValueError(f"kv_cache_memory: one slot needs {per_slot} bytes of KV, the budget is {budget}; "
                             "lower max_model_len (or max_decode_len) or give more memory")
        self.kv = SlotKV(self.model, local_budgets, slots, self.capacities)
        self._selectors = layer_selectors(local_budgets, self.params)
        self.slots = slots
        # Per-row decode state, in device memory; rows of free slots hold harmless values (token 0, length 1).
        self._tokens = torch.zeros(slots, dtype=torch.long, device=device)
        self._positions = torch.zeros(slots, dtype=torch.long, device=device)
        self._counters = torch.zeros(slots, dtype=torch.long, device=device)  # tokens generated so far
        self._active = torch.zeros(slots, dtype=torch.long, device=device)
        self._temperature = torch.zeros(slots, dtype=torch.float32, device=device)
        self._top_p = torch.ones(slots, dtype=torch.float32, device=device)
        self._top_k = torch.zeros(slots, dtype=torch.long, device=device)
        self._min_p = torch.zeros(slots, dtype=torch.float32, device=device)
        self._seeds = torch.zeros(slots, dtype=torch.long, device=device)
        self._workspaces: dict[int, tuple[Any, list[int]]] = {}
        # Sampled tokens go to the host through two buffers in turn (pinned on CUDA, so the copy is asynchronous):
        # a step's tokens are read after the next step is launched (see _step).
        pinned = device.type == "cuda"
        self._host_tokens = [torch.zeros(slots, dtype=torch.long, pin_memory=pinned) for _ in range(2)]
        self._readbacks = 0
        self._pending: _Readback | None = None
        # A step's own tokens are read at once when ready; under TP on a GPU never: readiness is a matter of timing,
        # which differs between ranks, and every rank must free a finished request's row at the same step.
        self._read_when_ready = self.tp_size == 1 or device.type != "cuda"
        self._kernel_config = None
        if self.attention == "triton":
            self._kernel_config = default_kernel_config(profile)
        self._ids = itertools.count()
        self._requests: dict[int, _Request] = {}  # every unfinished request, by id
        self._waiting: deque[_Request] = deque()
        self._prefilling: _Request | None = None
        self._running: dict[int, _Request] = {}  # slot -> request
        self._owned: set[int] = set()  # ids that generate() or stream() will collect
        self._finished: dict[int, _Request] = {}  # finished owned requests, by id, until collected
        self._outbox: list[_Request] = []  # finished add_request() requests, until step() returns them
        # Under TP, on rank 0: what the other ranks replay at the next step (see follow()); None elsewhere.
        self._commands: list[tuple] | None = [] if self._control is not None and self.rank == 0 else None
        self._shut_down = False
        if self.cuda_graphs:
            self._capture_windows()

    # ------------------------------------------------------------------------------------------ requests

    @property
    def head_map(self) -> torch.Tensor:
        """bool ``[layers, kv_heads]``: the heads that keep every token (all of them for full attention)."""
        return self.budgets == UNLIMITED_BUDGET

    def add_request(self, prompt: Prompt, params: SamplingParams | None = None) -> int:
        """Queue one request (a string, with a tokenizer, or token ids); returns its id. Checks everything first:
        a bad request raises ``ValueError`` naming the field and leaves the engine as it was."""
        self._check_leader("add_request")
        return self._add(*self._checked(prompt, params or SamplingParams()))

    def tokenize(self, prompt: Prompt) -> list[int]:
        """A prompt's token ids as :meth:`add_request` reads it (a string through the tokenizer). It touches only the
        tokenizer, no engine state: a server may call it from another thread than the one that runs the loop."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt: a string prompt needs a tokenizer (Engine(..., tokenizer=...)), or pass "
                                 "token ids")
            return list(self.tokenizer(prompt).input_ids) if prompt else []
        if isinstance(prompt, torch.Tensor):
            return prompt.flatten().tolist()
        return list(prompt)

    def max_new_tokens(self, prompt_tokens: int) -> int:
        """The most tokens a request with a prompt of ``prompt_tokens`` tokens may generate: what ``max_model_len``
        leaves, and (CateKV) what the consistent heads' buffers leave after what they keep of the prompt. A server's
        default ``max_tokens``; below 1 when the prompt is too long."""
        room = self.max_model_len - prompt_tokens
        for budget, capacity in self.capacities.items():
            if budget != UNLIMITED_BUDGET:
                room = min(room, capacity - self.params.kept_tokens(prompt_tokens, budget))
        return room

    def _checked(self, prompt: Prompt, params: SamplingParams) -> tuple[list[int], SamplingParams]:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        ids = self.tokenize(prompt)
        if not ids:
            raise ValueError("prompt: empty prompt (at least one token is needed)")
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self.model.vocab_size for t in ids):
            raise ValueError(f"prompt: token ids must be ints in [0, {self.model.vocab_size})")
        if len(ids) + params.max_tokens > self.max_model_len:
            raise ValueError(f"max_tokens: the prompt's {len(ids)} tokens + max_tokens {params.max_tokens} exceed "
                             f"max_model_len {self.max_model_len}")
        room = self.max_new_tokens(len(ids))
        if params.max_tokens > room:  # within max_model_len: the consistent heads' buffers are what is short
            raise ValueError(f"max_tokens {params.max_tokens} does not fit the consistent heads' room ({room} tokens "
                             f"after this prompt); raise Engine(max_decode_len=...) (now {self.max_decode_len})")
        if params.stop_strings and self.tokenizer is None:
            raise ValueError("stop: stop strings need a tokenizer (Engine(..., tokenizer=...)); use stop_token_ids")
        return ids, params

    def _add(self, ids: list[int], params: SamplingParams, seed: int | None = None) -> int:
        if seed is None:
            seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item())
        request = _Request(next(self._ids), ids, params, seed)
        self._waiting.append(request)
        self._requests[request.id] = request
        if self._commands is not None:
            self._commands.append(("add", ids, params, seed))
        return request.id

    def abort(self, request_id: int) -> bool:
        """Stop an unfinished request now (vLLM's ``abort_request``): it leaves the queue, its prefill stops, or its
        row stops decoding, and its slot is free for the next request. It is not returned by :meth:`step`. False
        if no request of that id is unfinished (a finished one is left as it is)."""
        self._check_leader("abort")
        if not self._abort(request_id):
            return False
        if self._commands is not None:
            self._commands.append(("abort", request_id))
        return True

    def _abort(self, request_id: int) -> bool:
        request = self._requests.pop(request_id, None)
        if request is None:
            return False
        self._owned.discard(request_id)
        request.finish_reason = "abort"
        if request is self._prefilling:
            request.prefill.close()  # the row keeps length 1: what the prefill wrote is never read
            self._prefilling = None
        elif self._running.get(request.slot) is request:
            self._free_row(request)
        else:
            self._waiting.remove(request)
        return True

    def partial(self, request_id: int) -> Completion | None:
        """The output so far of an unfinished request (None once it has finished, or for an unknown id): its
        token ids, and the part of its text that is safe to show, as :meth:`stream` shows it (no trailing partial
        character, nor the start of a stop string). ``finish_reason`` is None. Cheap enough to call for every
        request after every step: ``prompt_token_ids`` is the request's own list, not a copy (do not modify it)."""
        request = self._requests.get(request_id)
        if request is None:
            return None
        text = None
        if self.tokenizer is not None:
            text = request.text[: _stable_length(request.text, request.params.stop_strings)]
        return Completion(request.id, request.prompt, list(request.output), text, None)

    @property
    def num_running(self) -> int:
        """Requests in a slot: decoding, or prefilling."""
        return len(self._running) + (self._prefilling is not None)

    @property
    def num_waiting(self) -> int:
        """Requests queued for a free slot."""
        return len(self._waiting)

    def kv_usage(self) -> tuple[int, int]:
        """Bytes of KV the decoding requests hold, and what full attention would hold for the same requests: every
        head's positions in use (the prompt tokens it kept, plus the tokens generated so far), K and V; under tensor
        parallelism this rank's heads."""
        heads = sum(g.kv_heads.numel() for g in self.kv.groups)
        token_bytes = 2 * self.model.head_dim * self.model.embed.element_size()
        held = full = 0
        for request in self._running.values():
            generated = len(request.output)
            held += request.kv_kept + heads * generated
            full += heads * (len(request.prompt) + generated)
        return held * token_bytes, full * token_bytes

    def has_unfinished(self) -> bool:
        """Whether any request is waiting, prefilling or decoding, or finished without :meth:`step` having returned
        it yet (it finished while :meth:`generate` or :meth:`stream` ran the loop)."""
        return bool(self._waiting or self._prefilling or self._running or self._outbox)

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[Completion]:
        """Run prompts to completion (with whatever else is queued); their completions, in order.

        ``prompts``: one prompt (a string or a list of token ids) or a list of them; ``params`` one for all or one
        per prompt. Every request is checked before any is queued.
        """
        ids = self._add_all(prompts, params)
        self._owned.update(ids)
        while any(i not in self._finished for i in ids):
            self._step()
        return [self._finished.pop(i).completion(self.tokenizer is not None) for i in ids]

    def chat(self, messages: list[dict[str, str]] | list[list[dict[str, str]]],
             params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[Completion]:
        """Like :meth:`generate` for chat conversations (a list of messages, or a list of such lists), rendered by
        the tokenizer's chat template with the generation prompt."""
        if not messages:
            raise ValueError("messages: empty conversation")
        conversations = [messages] if isinstance(messages[0], dict) else messages
        prompts = [self.chat_prompt(c) for c in conversations]
        return self.generate(prompts, params)

    def chat_prompt(self, conversation: list[dict[str, Any]]) -> list[int]:
        """A conversation's prompt token ids: the tokenizer's chat template with the generation prompt. Like
        :meth:`tokenize` it touches no engine state."""
        if self.tokenizer is None:
            raise ValueError("messages: chat needs a tokenizer (Engine(..., tokenizer=...))")
        if not conversation:
            raise ValueError("messages: empty conversation")
        text = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Generate one prompt, yielding its text as it grows (needs a tokenizer). Other queued requests advance
        too. A piece is held back while it may be an incomplete character or the start of a stop string; the
        pieces joined equal the finished completion's text. Closing the iterator early aborts the request."""
        if self.tokenizer is None:
            raise ValueError("stream needs a tokenizer (Engine(..., tokenizer=...))")
        request_id = self.add_request(prompt, params)
        self._owned.add(request_id)
        sent = 0
        try:
            while True:
                request = self._finished.pop(request_id, None)
                if request is not None:
                    if len(request.text) > sent:
                        yield request.text[sent:]
                    return
                self._step()
                partial = self.partial(request_id)
                if partial is not None and len(partial.text) > sent:
                    yield partial.text[sent:]
                    sent = len(partial.text)
        finally:
            self.abort(request_id)

    def _add_all(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None) -> list[int]:
        self._check_leader("generate")
        single = isinstance(prompts, str) or (isinstance(prompts, Sequence) and len(prompts) > 0 and all(
            isinstance(t, int) for t in prompts))
        prompts = [prompts] if single or isinstance(prompts, torch.Tensor) else list(prompts)
        if not prompts:
            raise ValueError("prompts: no prompt given")
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        params = list(params)
        if len(params) != len(prompts):
            raise ValueError(f"params: {len(params)} sampling params for {len(prompts)} prompts")
        checked = [self._checked(p, s) for p, s in zip(prompts, params)]
        return [self._add(*c) for c in checked]

    # ------------------------------------------------------------------------------------------- the loop

    def step(self) -> list[Completion]:
        """One iteration: up to ``prefill_chunk`` tokens of prefill work through every layer (starting waiting
        requests in free slots), then one decode step over the running requests. Returns the requests added with
        :meth:`add_request` that have finished since the last call (requests of :meth:`generate` and :meth:`stream`
        go to their caller)."""
        self._check_leader("step")
        self._step()
        done, self._outbox = self._outbox, []
        return [r.completion(self.tokenizer is not None) for r in done]

    def follow(self) -> None:
        """Under tensor parallelism, on ranks 1..: run rank 0's steps until it calls :meth:`shutdown`. Before each
        step the requests rank 0 added and aborted since its step before are added and aborted here too, in the same
        order and with the same seeds (so request ids and slots match); what finishes here is dropped (rank 0
        returns it)."""
        if self._control is None or self.rank == 0:
            raise RuntimeError("follow() is for ranks 1.. of a tensor-parallel engine (Engine(..., tensor_parallel="
                               "True) under torchrun); rank 0 takes the requests")
        while (commands := self._exchange(None)) is not None:
            for name, *args in commands:
                if name == "add":
                    ids, params, seed = args
                    self._add(ids, SamplingParams(**params), seed)
                else:
                    self._abort(*args)
            self._advance()
            self._outbox.clear()

    def shutdown(self) -> None:
        """Under tensor parallelism, on rank 0: end the other ranks' :meth:`follow` (once, when done with the
        engine; it takes no requests after). Without tensor parallelism nothing to do."""
        self._check_leader("shutdown")
        if self._commands is not None:
            self._exchange(None)
        self._shut_down = True

    def _check_leader(self, what: str) -> None:
        if self.rank != 0:
            raise RuntimeError(f"{what}: under tensor parallelism rank 0 takes the requests; rank {self.rank} calls "
                               "engine.follow()")
        if self._shut_down:
            raise RuntimeError(f"{what}: the engine was shut down")

    def _exchange(self, commands: list[tuple] | None) -> list[tuple] | None:
        """Rank 0's ``commands`` on every rank (None: shut down), over the gloo group (host memory only) as JSON:
        plain data, never pickled. A step with nothing to send (most steps) costs one broadcast of its size, 0."""
        data = None
        if self.rank == 0 and commands != []:
            data = torch.frombuffer(bytearray(json.dumps(commands, cls=_CommandEncoder).encode()), dtype=torch.uint8)
        size = torch.tensor([0 if data is None else data.numel()])
        dist.broadcast(size, src=0, group=self._control)
        if int(size) == 0:
            return []
        if data is None:
            data = torch.empty(int(size), dtype=torch.uint8)
        dist.broadcast(data, src=0, group=self._control)
        return json.loads(bytes(data.numpy()))

    def _step(self) -> None:
        """One step of rank 0's loop; under TP the other ranks replay its new requests and aborts, then step."""
        if self._commands is not None:
            self._exchange(self._commands)
            self._commands = []
        self._advance()

    @torch.inference_mode()
    def _advance(self) -> None:
        """Prefill work, then launch a decode step and only then read the previous step's tokens (waiting for them:
        they were ready when this step started on the device), so the device never waits for the host. A request
        that finished in the previous step therefore decodes once more; that token is dropped and its row freed
        now. This step's own tokens are read at once if they are ready (always on CPU)."""
        self._prefill_some()
        launched = self._decode() if self._running else None
        previous, self._pending = self._pending, launched
        if previous is not None:
            self._read(previous)
        if launched is not None and self._read_when_ready and launched.event.query():
            self._pending = None
            self._read(launched)

    def _prefill_some(self) -> None:
        # The budget is prefill_chunk tokens through the whole model (vLLM's token budget per step); the prefill
        # yields after each chunk of each layer, so a step does that many layer-chunks.
        work, budget = 0, self.prefill_chunk * self.model.num_layers
        while work < budget:
            if self._prefilling is None and not self._start_prefill():
                return
            request = self._prefilling
            try:
                work += next(request.prefill)
            except StopIteration as end:
                self._prefilling = None
                logits, counts = end.value
                self._first_token(request, logits, counts)

    def _start_prefill(self) -> bool:
        free = [s for s in range(self.slots) if s not in self._running]
        if not self._waiting or not free:
            return False
        request = self._waiting.popleft()
        request.slot = free[0]  # the lowest free row: the decode batch stays as short as it can
        ids = torch.tensor(request.prompt, dtype=torch.long, device=self.model.device)
        request.prefill = prefill(self.model, self.kv, request.slot, ids, self._selectors, self.params,
                                  self.prefill_chunk, self.prefill_backend, triton=self.projections == "triton")
        self._prefilling = request
        return True

    def _first_token(self, request: _Request, logits: torch.Tensor, counts: list[int]) -> None:
        """Sample the first token from the prefill's logits, then start the row decoding (unless that was all)."""
        p, slot = request.params, request.slot
        row = self._set_row(slot, request)
        token = self._agreed(sample(logits[None], *row, Filters.of([p])))
        if self._accept(request, int(token)):
            self._finish(request, running=False)
            return
        self.kv.activate(slot, counts)
        request.kv_kept = sum(n * g.kv_heads.numel() for n, g in zip(counts, self.kv.groups))
        self._tokens[slot] = token[0]
        self._positions[slot] = len(request.prompt)
        self._counters[slot] = 1
        self._active[slot] = 1
        self._running[slot] = request

    def _set_row(self, slot: int, request: _Request) -> tuple[torch.Tensor, ...]:
        """Write a request's sampling parameters into its row; returns them as one-row tensors for the first token
        (temperature, top_k, top_p, min_p, seed, counter)."""
        p = request.params
        self._temperature[slot] = p.temperature
        self._top_k[slot] = max(p.top_k, 0)
        self._top_p[slot] = p.top_p
        self._min_p[slot] = p.min_p
        self._seeds[slot] = request.seed
        self._counters[slot] = 0
        rows = slice(slot, slot + 1)
        return (self._temperature[rows], self._top_k[rows], self._top_p[rows], self._min_p[rows], self._seeds[rows],
                self._counters[rows])

    def _decode(self) -> _Readback:
        """Launch one decode step over the rows in use and the asynchronous copy of its tokens to the host."""
        lo, rows = self._window()
        filters = Filters.of([r.params for r in self._running.values()])
        if self.cuda_graphs:
            graph = self._graphs.get((lo, rows, filters))
            if graph is None:
                graph = self._graphs[lo, rows, filters] = self._capture(lo, rows, filters)
            graph.replay()
        else:
            self._decode_step(lo, rows, filters)
        host = self._host_tokens[self._readbacks % 2]
        self._readbacks += 1
        host[:rows].copy_(self._tokens[lo : lo + rows], non_blocking=True)
        event = torch.cuda.Event() if self.model.device.type == "cuda" else _HostEvent()
        event.record()
        return _Readback(event, host, lo, dict(self._running))

    @torch.inference_mode()
    def _capture_windows(self) -> None:
        """Capture the decode graph of every window (:func:`decode_windows`) for greedy and for plain sampling, as
        vLLM captures its batch sizes at start-up: a graph first captured while serving stalls that step by an eager
        step and the capture, which shows in the inter-token latency. Other filter sets are captured when needed."""
        for filters in (Filters(), Filters(random=True)):
            for lo, rows in decode_windows(self.slots):
                self._graphs[lo, rows, filters] = self._capture(lo, rows, filters)

    def _window(self) -> tuple[int, int]:
        """The rows a decode step runs, ``(first, count)``: the one running row alone (batch 1, the fused
        projections), else rows ``[0, last running + 1)``, with CUDA graphs rounded up to a power of two (the extra
        rows are free: they write their sinks)."""
        if len(self._running) == 1:
            return next(iter(self._running)), 1
        rows = max(self._running) + 1
        return 0, _graph_rows(rows, self.slots) if self.cuda_graphs else rows

    def _read(self, readback: _Readback) -> None:
        """Wait for a step's tokens on the host and give each to its request, if it still runs in that row (one
        that finished in the step before, or was aborted, is skipped: its token is past its end)."""
        readback.event.synchronize()
        tokens = readback.host.tolist()
        for slot, request in readback.running.items():
            if self._running.get(slot) is request and self._accept(request, tokens[slot - readback.lo]):
                self._finish(request, running=True)

    def _decode_step(self, lo: int, n: int, filters: Filters) -> None:
        """One decode step of rows ``[lo, lo + n)`` entirely on the device: every row consumes its token, appends
        its K/V and samples the next; rows of running requests advance their position, counter and lengths."""
        model, rows = self.model, slice(lo, lo + n)
        triton = self.projections == "triton"
        x = model.embed[self._tokens[rows]]
        cos, sin = model.rope_tables(self._positions[rows])
        lengths, starts = self.kv.lengths[:, rows], self.kv.starts[rows]
        for weights, groups in zip(model.layers, self.kv.layers):
            q, k, v = model.qkv(weights, x, triton=triton)
            if self.attention == "triton":
                attn = self._kernel_attention(q, k, v, groups, cos, sin, rows)
            else:
                q, k = model.rope(q, cos, sin), model.rope(k, cos, sin)
                attn = decode_attention_torch(q, k, v, [dataclasses.replace(g, kv=g.kv[:, rows]) for g in groups],
                                              lengths, starts, model.scale)
            x = model.attention_out(weights, x, attn, triton=triton)
        logits = model.logits(x, triton=triton)
        token = self._agreed(sample(logits, self._temperature[rows], self._top_k[rows], self._top_p[rows],
                                    self._min_p[rows], self._seeds[rows], self._counters[rows], filters))
        active = self._active[rows]
        self._tokens[rows] = token
        self._positions[rows] += active
        self._counters[rows] += active
        lengths += active.to(torch.int32)

    def _agreed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Under TP rank 0's sampled ``tokens`` on every rank (in place; part of the step's CUDA graph on NCCL).

        Every rank samples the same tokens when its logits are bitwise rank 0's, and the seeds are (rank 0 sends
        them); but that rests on the all-reduce giving every rank the same bits, which depends on its algorithm,
        and one differing token would set the ranks' schedules apart and hang them. A broadcast of one int64 per
        row rules that out for a small cost next to the step's two all-reduces per layer."""
        if self.tp_size > 1:
            dist.broadcast(tokens, src=0)
        return tokens

    def _capture(self, lo: int, rows: int, filters: Filters) -> Any:
        """Capture :meth:`_decode_step` of rows ``[lo, lo + rows)`` as a CUDA graph. One eager step first compiles
        the kernels and makes the workspace; the state it advanced is then restored (the K/V it wrote is what the
        replay writes again: sampling is a pure function of the state)."""
        state = (self._tokens, self._positions, self._counters, self.kv.lengths)
        saved = [t.clone() for t in state]
        stream = torch.cuda.Stream(self.model.device)
        stream.wait_stream(torch.cuda.current_stream(self.model.device))
        with torch.cuda.stream(stream):
            self._decode_step(lo, rows, filters)
        torch.cuda.current_stream(self.model.device).wait_stream(stream)
        for tensor, value in zip(state, saved):
            tensor.copy_(value)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):  # records without running: the state stays restored
            self._decode_step(lo, rows, filters)
        return graph

    def _kernel_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: list, cos: torch.Tensor,
                          sin: torch.Tensor, rows: slice) -> torch.Tensor:
        """The Triton split-K kernel over the layer's groups for the step's ``rows``: it rotates q and the new key,
        appends the new K/V at each row's ``length - 1`` and attends to ``[start, length)``."""
        from ..kernels.triton_decode import KVGroup, decode_attention_two_groups

        workspace, splits = self._workspace(q.shape[0])
        kernel_groups = [KVGroup(g.kv[0, rows], g.kv[1, rows], self.kv.lengths[g.row, rows], self.kv.starts[rows],
                                 g.q_heads, g.kv_heads) for g in groups]
        return decode_attention_two_groups(
            q, kernel_groups, scale=self.model.scale, num_splits=[splits[g.row] for g in groups], workspace=workspace,
            config=self._kernel_config, new_k=k, new_v=v, rope=(cos, sin))

    def _workspace(self, n: int) -> tuple[Any, list[int]]:
        """The kernel's workspace and per-group split counts for a decode batch of ``n`` rows (made once per n)."""
        if n not in self._workspaces:
            from ..kernels.triton_decode import group_num_splits, make_workspace, sm_count

            splits = group_num_splits([g.kv[0, :n] for g in self.kv.groups], self._kernel_config,
                                      sm_count(self.model.device))
            workspace = make_workspace(n, self.model.q_heads, self.model.head_dim, max(splits), self.model.device)
            self._workspaces[n] = (workspace, splits)
        return self._workspaces[n]

    # ---------------------------------------------------------------------------------------- stopping

    def _accept(self, request: _Request, token: int) -> bool:
        """Append a sampled token and update the text; True if the request is now finished (sets the reason)."""
        p = request.params
        request.output.append(token)
        previous = len(request.text)
        if self.tokenizer is not None:
            request.detokenize(self._decode_text)
        # vLLM's order: end of sequence, stop tokens, stop strings, length.
        if not p.ignore_eos and token in self.model.eos_token_ids:
            request.finish_reason = "stop"
            return True
        if p.stop_token_ids and token in p.stop_token_ids:
            request.finish_reason, request.stop_reason = "stop", token
            return True
        if p.stop_strings:
            longest = max(len(s) for s in p.stop_strings)
            found = _find_stop(request.text, p.stop_strings, max(0, previous - longest))
            if found is not None:
                request.text = request.text[: found[0]]
                request.finish_reason, request.stop_reason = "stop", found[1]
                return True
        if len(request.output) >= p.max_tokens:
            request.finish_reason = "length"
            return True
        return False

    def _finish(self, request: _Request, *, running: bool) -> None:
        del self._requests[request.id]
        if running:
            self._free_row(request)
        else:
            self.kv.release(request.slot)
        if request.id in self._owned:
            self._owned.discard(request.id)
            self._finished[request.id] = request
        else:
            self._outbox.append(request)

    def _free_row(self, request: _Request) -> None:
        """A decoding request leaves its row: the row stops advancing and holds the sink only."""
        slot = request.slot
        del self._running[slot]
        self.kv.release(slot)
        self._active[slot] = 0
        self._positions[slot] = 0
        self._counters[slot] = 0

    def _prefill_bytes(self) -> int:
        """An estimate of the prefill's working memory at ``max_model_len``: one layer's full K/V, the hidden states,
        one chunk's activations and the selection's scores (``cache.SCORE_BYTES``)."""
        from ..cache import SCORE_BYTES

        m, n = self.model, self.max_model_len
        element = m.embed.element_size()
        hidden = m.embed.shape[1]
        full_kv = 2 * m.kv_heads * m.head_dim * n * element
        chunk = min(self.prefill_chunk, n)
        activations = chunk * (m.layers[0].qkv.shape[0] + 2 * m.layers[0].gate_up.shape[0] + 4 * hidden) * element
        return 2 * full_kv + 2 * n * hidden * element + activations + SCORE_BYTES


class _CommandEncoder(json.JSONEncoder):
    """Rank 0's commands as JSON: a request's :class:`SamplingParams` as its constructor's arguments."""

    def default(self, o: Any) -> Any:
        if isinstance(o, SamplingParams):
            return {f.name: getattr(o, f.name) for f in dataclasses.fields(o) if f.init}
        return super().default(o)


def _tensor_parallel_group() -> tuple[int, int, Any]:
    """This process's rank, the tensor-parallel size (the default group's world) and, with more than one rank, a
    gloo group for rank 0's request commands."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("tensor_parallel=True needs an initialized torch.distributed process group: run under "
                         "torchrun and call torch.distributed.init_process_group() before building the engine")
    size = dist.get_world_size()
    return dist.get_rank(), size, dist.new_group(backend="gloo") if size > 1 else None


def text_decoder(tokenizer: Any) -> Callable[[list[int]], str]:
    """Token ids to text without special tokens, as ``tokenizer.decode(ids, skip_special_tokens=True)``.

    For a fast tokenizer that cleans up no spaces, transformers' ``decode`` is its Rust tokenizer's ``decode`` behind
    a few layers of Python (input conversion, option handling) that cost several times the decoding itself; the
    engine decodes twice per running request per step, so it calls the Rust tokenizer directly there."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return lambda ids: backend.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


def decode_windows(slots: int) -> list[tuple[int, int]]:
    """Every window ``(first row, rows)`` a decode step over ``slots`` rows can run with CUDA graphs
    (``Engine._window``): each row alone, and rows ``[0, 2^k)`` (the last window all ``slots``)."""
    spans = sorted({_graph_rows(rows, slots) for rows in range(2, slots + 1)})
    return [(slot, 1) for slot in range(slots)] + [(0, rows) for rows in spans]


def _graph_rows(rows: int, slots: int) -> int:
    """The rows a graphed step of ``rows`` rows runs: the next power of two, at most ``slots`` (fewer graphs)."""
    return min(slots, 1 << (rows - 1).bit_length())


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _kernel_kind(name: str, value: str, device: torch.device, auto: str) -> str:
    """``"triton"`` or ``"torch"`` for option ``name`` (``"auto"``: ``auto``); Triton off CUDA only under Triton's
    interpreter (tests)."""
    if value not in ("auto", "triton", "torch"):
        raise ValueError(f"{name} must be 'triton', 'torch' or 'auto', got {value!r}")
    kind = auto if value == "auto" else value
    if kind == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"{name}='triton' needs the model on a CUDA device (or TRITON_INTERPRET=1)")
    return kind


def _max_consistent_tokens(params: ProfileParams, budget: int, max_model_len: int) -> int:
    """The most prompt tokens a consistent head of ``budget`` keeps for any prompt up to ``max_model_len``. Past one
    chunk beyond the budget's chunks the kept count repeats with period ``chunk_size``, so a short scan covers every
    length."""
    c = params.chunk_size
    horizon = params.init_tokens + params.recent_tokens + params.reserve_tokens + (params.budget_chunks(budget) + 2) * c
    return max(params.kept_tokens(n, budget) for n in range(1, min(max_model_len, horizon) + 1))


def _kv_budget(kv_cache_memory: int | None, utilization: float | None, device: torch.device,
               prefill_bytes: int) -> int | None:
    if kv_cache_memory is not None:
        _check_positive("kv_cache_memory", kv_cache_memory)
        return kv_cache_memory
    if device.type != "cuda":
        if utilization is not None:
            raise ValueError("gpu_memory_utilization needs a CUDA model; give kv_cache_memory (bytes) instead")
        return None
    utilization = 0.9 if utilization is None else utilization
    if not 0 < utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {utilization}")
    total = torch.cuda.get_device_properties(device).total_memory
    return max(0, int(total * utilization) - torch.cuda.memory_allocated(device) - prefill_bytes)


def _find_stop(text: str, stops: tuple[str, ...], start: int) -> tuple[int, str] | None:
    """The earliest stop string in ``text[start:]``: (its index, the string), or None."""
    best = None
    for stop in stops:
        index = text.find(stop, start)
        if index >= 0 and (best is None or index < best[0]):
            best = (index, stop)
    return best


def _stable_length(text: str, stops: tuple[str, ...]) -> int:
    """How much of an unfinished output's text can be shown: not a trailing incomplete character (U+FFFD from a
    partial UTF-8 sequence), nor a suffix that could be the start of a stop string."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    held = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, end), held, -1):
            if text[end - size : end] == stop[:size]:
                held = size
                break
    return end - held
