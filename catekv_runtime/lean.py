"""The lean greedy path (`LeanGenerator`): static caches, one decode step captured in a CUDA graph.

Superseded by :mod:`catekv_runtime.engine` (sampling, stops, streaming, continuous batching); kept while the
engine's batch-1 step is measured against it on a GPU. An unpadded prompt is prefilled layer by layer in chunks
(``prefill_chunk``), each layer selecting what its heads keep before the next starts (:meth:`CateKVLayer.select_from`);
a left-padded batch prefills through the model's forward and the same cache. Every decode step is then a fixed
sequence of kernels over preallocated buffers: at batch 1 the fused Triton projections
(:mod:`.kernels.triton_linear`), else the model's modules; the Triton split-K decode kernel appends the new K/V and
attends over each layer's head groups, reading the current lengths from device memory. No shape depends on the
step and nothing syncs with the host, so the step is captured once and replayed.

With ``profile=None`` the same path keeps the full cache (one group of all heads per layer): the full-attention
baseline of the benchmarks runs on exactly the same code.

Supported: decoders whose layers have ``self_attn.{q,k,v,o}_proj``, ``input_layernorm``,
``post_attention_layernorm`` and ``mlp`` (Llama, Qwen2, Mistral without sliding window, ...).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .attention import chunk_attention, group_attention
from .cache import CateKVCache, CateKVLayer, HeadGroup
from .engine.config import default_kernel_config
from .engine.model import fuse_linears
from .integration import IMPLEMENTATION, cache_argument, model_spec, tensor_parallel_rank
from .profile import Profile, ProfileParams, resolve_profile


@dataclass
class LeanStats:
    """Timings and memory of the last :meth:`LeanGenerator.generate` call."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_ms_per_step: float = 0.0
    kv_bytes: int = 0
    full_kv_bytes: int = 0


class LeanGenerator:
    """Greedy generation with a static hybrid cache and (on CUDA) a CUDA-graph decode step.

    Args:
        model: a transformers causal LM (Llama/Qwen2-style layers, see the module docstring).
        profile: a CateKV profile, or None for full attention on the same engine.
        backend: ``"triton"`` (CUDA), ``"sdpa"`` (any device, host-side lengths, no graph) or ``"auto"``.
        cuda_graph: capture the decode step (default: on with the Triton backend).
        compile: fuse each layer's norms, projections, RoPE and MLP with ``torch.compile`` (default: with
            CUDA graphs). One compilation serves every layer; it cuts the step's kernel count roughly in half.
        kernel_config: a ``kernels.triton_decode.DecodeConfig`` (tile sizes) for the Triton backend.
        fuse: let the decode step run q/k/v as one projection and gate/up as another. Their weights are
            concatenated once, per layer, and the model's own parameters become views of the result: no
            extra memory, and the model (``forward``, ``generate``, ``save_pretrained``) is unchanged in
            use. Layers whose projections are not plain ``nn.Linear`` of one dtype and device are left alone.
        prefill_chunk: prefill unpadded prompts layer by layer, ``prefill_chunk`` tokens at a time, selecting
            each layer's tokens before the next layer starts: the prompt's activations then never exceed one
            hidden state plus one chunk's, and one layer's full K/V (peak memory: weights + retained KV + one
            layer's full KV + that). None, or a left-padded batch, prefills with the model's own forward.
        projections: how a batch-1 decode step runs its projections: ``"triton"`` (one kernel per projection,
            ``kernels.triton_linear.fused_linear``, with the RMSNorms, SiLU x up and residual adds fused in),
            ``"torch"`` (``F.linear``, i.e. cuBLAS, with the small ops around it compiled) or ``"auto"`` (triton
            with the triton backend). Layers the fused kernel cannot reproduce (norms other than Llama's RMSNorm,
            activations other than SiLU, unfused projections) and batches above 1 use ``"torch"``. With ``"triton"``
            the decode kernel also applies RoPE to q and the new key, where the model's RoPE is the rotate-half
            form (checked numerically at set-up).
        overrides: runtime overrides of the profile, as in :func:`catekv_runtime.apply`.
    """

    def __init__(self, model: torch.nn.Module, profile: Profile | None = None, *, backend: str = "auto",
                 cuda_graph: bool | None = None, compile: bool | None = None, kernel_config: Any = None,
                 fuse: bool = True, prefill_chunk: int | None = 8192, projections: str = "auto", **overrides: Any):
        self.model = model
        self.profile = resolve_profile(profile, overrides) if profile is not None else None
        if self.profile is not None:  # refuse a profile of another shape before any compute
            self.profile.check_model(dataclasses.replace(model_spec(model), model_id=""))
        if tensor_parallel_rank(model)[1] > 1:
            raise ValueError("the lean path does not support tensor parallelism yet; under tp_plan='auto' use "
                             "catekv_runtime.apply(model, profile) and model.generate")
        device = next(model.parameters()).device
        if backend == "auto":
            backend = "triton" if device.type == "cuda" else "sdpa"
        if backend not in ("triton", "sdpa"):
            raise ValueError(f"unknown backend {backend!r}; choose 'triton', 'sdpa' or 'auto'")
        if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("the triton backend needs the model on a CUDA device (or TRITON_INTERPRET=1)")
        self.backend = backend
        self.cuda_graph = (backend == "triton") if cuda_graph is None else cuda_graph
        if self.cuda_graph and backend != "triton":
            raise ValueError("CUDA graphs need the triton backend (SDPA needs host-known lengths)")
        self.decoder = model.get_decoder()
        first = self.decoder.layers[0]
        if not all(hasattr(first.self_attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
            raise NotImplementedError(f"{type(model).__name__}: the lean path needs separate q/k/v/o projections")
        self._rope = sys.modules[type(first.self_attn).__module__].apply_rotary_pos_emb
        if kernel_config is None and backend == "triton":
            kernel_config = self.default_kernel_config(self.profile)
        self.kernel_config = kernel_config
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be a positive number of tokens or None, got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        self.compile = self.cuda_graph if compile is None else compile
        self._fused = {layer: _fuse_layer(layer) for layer in self.decoder.layers} if fuse else {
            layer: _FusedLayer() for layer in self.decoder.layers}
        if projections == "auto":
            projections = "triton" if backend == "triton" else "torch"
        if projections not in ("triton", "torch"):
            raise ValueError(f"unknown projections {projections!r}; choose 'triton', 'torch' or 'auto'")
        if projections == "triton" and backend != "triton":
            raise ValueError("projections='triton' needs the triton backend")
        self._head_eps = None
        self._fused_linear = None  # kernels.triton_linear.fused_linear with projections="triton"
        if projections == "triton":
            from .kernels.triton_linear import fused_linear

            self._fused_linear = fused_linear
            for layer in self.decoder.layers:
                _check_fused_kernels(layer, self._fused[layer])
            self._head_eps = _rms_norm_eps(self.decoder.norm) if type(model.lm_head) is torch.nn.Linear else None
        self.projections = projections
        # With the fused q/k/v kernel, the decode kernel applies RoPE itself (saves a launch per layer), if the
        # model's RoPE is the rotate-half form that kernel computes.
        self._kernel_rope = projections == "triton" and _rope_is_rotate_half(
            self._rope, self.decoder.rotary_emb, first.self_attn.head_dim, next(model.parameters()).dtype, device)
        self._pre_step, self._post_step, self._heads_step = self._pre_attention, self._post_attention, self._split_heads
        self._greedy_step = _greedy_token
        if self.compile:
            # Not fullgraph: past dynamo's recompile limit (many batch sizes) it falls back to eager.
            self._pre_step = torch.compile(self._pre_attention, dynamic=False)
            self._post_step = torch.compile(self._post_attention, dynamic=False)
            self._heads_step = torch.compile(self._split_heads, dynamic=False)
            # Eager argmax reduces a batch-1 row of 128K logits in one thread block (36 us on an H200, more
            # than the rest of the step's small kernels together); inductor splits the reduction.
            self._greedy_step = torch.compile(_greedy_token, dynamic=False)
        self.stats = LeanStats()

    @staticmethod
    def default_kernel_config(profile: Profile | None) -> Any:
        """The Triton decode kernel's ``DecodeConfig`` for a CateKV ``profile`` (None: full attention): the
        engine's (:func:`catekv_runtime.engine.config.default_kernel_config`)."""
        return default_kernel_config(profile)

    def _pre(self, layer: torch.nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Norm, projections and RoPE of one new token: q ``[B, Hq, 1, D]``, kv ``[2, B, Hkv, 1, D]`` and the RoPE
        left to the decode kernel: None, or its ``(cos, sin)`` ``[B, D]`` (then q and K come unrotated)."""
        fused = self._fused[layer]
        if fused.input_eps is not None and hidden.shape[0] == 1:
            qkv = self._fused_linear(hidden, fused.qkv_weight, fused.qkv_bias, norm_weight=layer.input_layernorm.weight,
                                     eps=fused.input_eps)
            if self._kernel_rope:
                return (*_qkv_heads(qkv, fused.q_rows, layer.self_attn.head_dim), (cos[:, 0], sin[:, 0]))
            return (*self._heads_step(layer, qkv, cos, sin, fused.q_rows), None)
        return (*self._pre_step(layer, hidden, cos, sin, fused.qkv_weight, fused.qkv_bias, fused.q_rows), None)

    def _post(self, layer: torch.nn.Module, hidden: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """Output projection, residual, MLP and residual; ``attn_out`` is ``[B, Hq, D]``."""
        fused = self._fused[layer]
        if fused.input_eps is not None and hidden.shape[0] == 1:
            linear = self._fused_linear
            o_proj, down_proj = layer.self_attn.o_proj, layer.mlp.down_proj
            hidden = linear(attn_out.reshape(hidden.shape), o_proj.weight, o_proj.bias, residual=hidden)
            act = linear(hidden, fused.gate_up_weight, norm_weight=layer.post_attention_layernorm.weight,
                         eps=fused.post_eps, glu=True)
            return linear(act, down_proj.weight, down_proj.bias, residual=hidden)
        return self._post_step(layer, hidden, attn_out, fused.gate_up_weight)

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and lm_head of the last position: logits ``[B, 1, vocab]``."""
        if self._head_eps is not None and hidden.shape[0] == 1:
            head = self.model.lm_head
            return self._fused_linear(hidden, head.weight, head.bias, norm_weight=self.decoder.norm.weight,
                                      eps=self._head_eps)
        return self.model.lm_head(self.decoder.norm(hidden))

    def _pre_attention(self, layer, hidden, cos, sin, qkv_weight, qkv_bias, q_rows: int):
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        if qkv_weight is None:
            shape = (hidden.shape[0], 1, -1, attn.head_dim)
            q, k, v = (proj(x).view(shape).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
            return self._rope_heads(q, k, v, cos, sin)
        # One GEMV instead of three (at batch 1 the small k/v ones run far below bandwidth).
        return self._split_heads(layer, F.linear(x, qkv_weight, qkv_bias), cos, sin, q_rows)

    def _split_heads(self, layer, qkv, cos, sin, q_rows: int):
        q, kv = _qkv_heads(qkv, q_rows, layer.self_attn.head_dim)
        return self._rope_heads(q, kv[0], kv[1], cos, sin)

    def _rope_heads(self, q, k, v, cos, sin):
        """RoPE of q and k ``[B, H, 1, D]``; returns q and the stacked kv ``[2, B, Hkv, 1, D]``."""
        q, k = self._rope(q, k, cos, sin)
        return q, torch.stack([k, v])

    def _post_attention(self, layer, hidden, attn_out, gate_up_weight):
        hidden = hidden + layer.self_attn.o_proj(attn_out.reshape(hidden.shape[0], 1, -1))
        x = layer.post_attention_layernorm(hidden)
        if gate_up_weight is None:
            return hidden + layer.mlp(x)
        mlp = layer.mlp
        gate, up = F.linear(x, gate_up_weight, None).chunk(2, dim=-1)
        return hidden + mlp.down_proj(mlp.act_fn(gate) * up)

    # ------------------------------------------------------------------------------------ prefill

    def _head_map_and_params(self) -> tuple[torch.Tensor, ProfileParams]:
        if self.profile is not None:
            return self.profile.head_map, self.profile.params
        config = self.model.config.get_text_config(decoder=True)
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        full = torch.ones(config.num_hidden_layers, heads, dtype=torch.bool)
        return full, ProfileParams(adaptive_ratio=1.0, eta=1.0)

    def _prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 max_new_tokens: int) -> tuple[CateKVCache, torch.Tensor, torch.Tensor]:
        head_map, params = self._head_map_and_params()
        cache = CateKVCache(self.model.config, head_map, params, reserve=max_new_tokens, eager=True)
        if not all(isinstance(layer, CateKVLayer) for layer in cache.layers):
            raise NotImplementedError("the lean path does not support sliding-window layers; use apply() instead")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        if self.prefill_chunk is not None and bool(attention_mask.all()):
            hidden = self._prefill_by_layer(input_ids, positions, cache)
            logits = self.model.lm_head(self.decoder.norm(hidden))
            return cache, logits[:, -1].argmax(-1, keepdim=True), positions[:, -1:] + 1
        previous = self.model.config._attn_implementation
        self.model.set_attn_implementation(IMPLEMENTATION)
        try:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                             use_cache=True, logits_to_keep=1, **{cache_argument(self.model): cache})
        finally:
            self.model.set_attn_implementation(previous)
        first_token = out.logits[:, -1].argmax(-1, keepdim=True)
        return cache, first_token, positions[:, -1:] + 1

    def _prefill_by_layer(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: CateKVCache) -> torch.Tensor:
        """The prompt through every layer in turn, in chunks of tokens; returns the last token's hidden state.

        Per layer: first the K/V of every chunk (they only need the layer's input), then each chunk's queries
        attend to the keys up to their own (causal, aligned bottom-right), and the chunk's hidden state is
        replaced in place by the layer's output (later chunks' K/V are already computed). The layer's cache
        selects its tokens at once, so only one layer's full K/V ever exists.
        """
        decoder, chunk = self.decoder, self.prefill_chunk
        hidden = decoder.embed_tokens(input_ids)
        batch, length, _ = hidden.shape
        spans = [(start, min(start + chunk, length)) for start in range(0, length, chunk)]
        for layer, layer_cache in zip(decoder.layers, cache.layers):
            attn = layer.self_attn
            dim = attn.head_dim
            keys = values = None
            for start, end in spans:
                x = layer.input_layernorm(hidden[:, start:end])
                # RoPE tables per chunk, not for the whole prompt (at 512K those would hold 0.25 GiB throughout).
                cos, sin = decoder.rotary_emb(x, positions[:, start:end])
                k = attn.k_proj(x).view(batch, end - start, -1, dim).transpose(1, 2)
                v = attn.v_proj(x).view(batch, end - start, -1, dim).transpose(1, 2)
                if keys is None:
                    keys = k.new_empty(batch, k.shape[1], length, dim)
                    values = torch.empty_like(keys)
                _, k = self._rope(k, k, cos, sin)  # RoPE of the keys alone
                keys[:, :, start:end] = k
                values[:, :, start:end] = v
            window = layer_cache.params.obs_window
            last_queries = None
            for start, end in spans:
                x = layer.input_layernorm(hidden[:, start:end])
                q = attn.q_proj(x).view(batch, end - start, -1, dim).transpose(1, 2)
                q, _ = self._rope(q, q, *decoder.rotary_emb(x, positions[:, start:end]))
                tail = q[:, :, -window:]
                last_queries = tail if last_queries is None else torch.cat([last_queries, tail], dim=2)[:, :, -window:]
                out = chunk_attention(q, keys, values, start, attn.scaling)
                h = hidden[:, start:end] + attn.o_proj(out.transpose(1, 2).reshape(batch, end - start, -1))
                hidden[:, start:end] = h + layer.mlp(layer.post_attention_layernorm(h))
            layer_cache.select_from(keys, values, last_queries, attn.scaling)
            del keys, values
        return hidden[:, -1:]

    # ------------------------------------------------------------------------------------- decode

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 32) -> torch.Tensor:
        """Greedy continuation of ``input_ids`` (left-padded if batched): ``[batch, max_new_tokens]``.

        Exactly ``max_new_tokens`` tokens are produced per sequence (no stopping at EOS: trim after).
        ``self.stats`` holds the prefill time and the decode time per step.
        """
        device = input_ids.device
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        cache, token, position = self._prefill(input_ids, attention_mask, max_new_tokens)
        sync()
        prefill_s = time.perf_counter() - start
        state = _DecodeState(self, cache, token, position, max_new_tokens)
        state.tokens[:, 0:1] = token
        steps = max_new_tokens - 1
        start = time.perf_counter()
        if steps > 0:
            if self.cuda_graph:
                graph = state.capture()
                sync()
                start = time.perf_counter()
                for _ in range(steps):
                    graph.replay()
            else:
                for _ in range(steps):
                    state.step()
        sync()
        decode_s = time.perf_counter() - start
        state.finish(steps)
        memory = cache.memory()
        self.stats = LeanStats(
            prompt_tokens=input_ids.shape[1], new_tokens=max_new_tokens, prefill_s=prefill_s,
            decode_ms_per_step=1e3 * decode_s / max(steps, 1), kv_bytes=memory["allocated_bytes"],
            full_kv_bytes=memory["full_attention_bytes"],
        )
        return state.tokens


@dataclass
class _FusedLayer:
    """One layer's concatenated projection weights (None where its projections could not be fused)."""

    qkv_weight: torch.Tensor | None = None
    qkv_bias: torch.Tensor | None = None
    q_rows: int = 0
    gate_up_weight: torch.Tensor | None = None
    # RMSNorm epsilons, set (by _check_fused_kernels) when kernels.triton_linear can run the layer's decode step.
    input_eps: float | None = None
    post_eps: float | None = None


def _greedy_token(logits: torch.Tensor) -> torch.Tensor:
    """The greedy pick of each sequence's last position: ``[B, 1]`` token ids (the first of tied maxima)."""
    return logits[:, -1:].argmax(-1)


def _qkv_heads(qkv: torch.Tensor, q_rows: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of one token's fused q/k/v output ``[B, 1, q_rows + 2 * kv_rows]``: q ``[B, Hq, 1, D]`` and kv
    ``[2, B, Hkv, 1, D]`` (no copy)."""
    batch = qkv.shape[0]
    q = qkv[..., :q_rows].view(batch, 1, -1, head_dim).transpose(1, 2)
    kv = qkv[..., q_rows:].view(batch, 1, 2, -1, head_dim).permute(2, 0, 3, 1, 4)
    return q, kv


def _rope_is_rotate_half(apply_rope, rotary_emb: torch.nn.Module, head_dim: int, dtype: torch.dtype,
                         device: torch.device) -> bool:
    """Whether the model's ``apply_rotary_pos_emb`` is ``x * cos + rotate_half(x) * sin`` over the whole head,
    in the model dtype (what the Triton decode kernel computes): checked once, numerically."""
    x = torch.randn(1, 2, 1, head_dim, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    cos, sin = rotary_emb(x, torch.tensor([[4099]], device=device))
    if cos.shape[-1] != head_dim or head_dim % 2:
        return False
    half = head_dim // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return torch.equal(apply_rope(x, x, cos, sin)[0], x * cos[:, None] + rotated * sin[:, None])


def _fuse_layer(layer: torch.nn.Module) -> _FusedLayer:
    attn, mlp = layer.self_attn, layer.mlp
    fused = _FusedLayer()
    qkv = fuse_linears([attn.q_proj, attn.k_proj, attn.v_proj])
    if qkv is not None:
        fused.qkv_weight, fused.qkv_bias = qkv
        fused.q_rows = attn.q_proj.weight.shape[0]
    # Llama-style gated MLP only: down(act(gate(x)) * up(x)), no bias on gate/up.
    if all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")) and mlp.gate_proj.bias is None:
        gate_up = fuse_linears([mlp.gate_proj, mlp.up_proj])
        if gate_up is not None:
            fused.gate_up_weight = gate_up[0]
    return fused


def _rms_norm_eps(norm: torch.nn.Module) -> float | None:
    """``norm``'s epsilon if it computes Llama's RMSNorm, ``weight * (x * rsqrt(mean(x^2) + eps)).to(dtype)``
    (checked on a random input with its own weight: a Gemma-style ``1 + weight`` fails), else None."""
    weight = getattr(norm, "weight", None)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or not isinstance(eps, float):
        return None
    x = torch.randn(2, weight.shape[0], generator=torch.Generator().manual_seed(0)).to(weight)
    expected = weight * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    with torch.no_grad():
        return eps if torch.allclose(norm(x).float(), expected.float(), rtol=1e-2, atol=1e-2) else None


def _check_fused_kernels(layer: torch.nn.Module, fused: _FusedLayer) -> None:
    """Set ``fused``'s epsilons when the layer's decode step is what ``fused_linear`` computes: fused q/k/v and
    gate/up, Llama RMSNorms, SiLU, plain ``nn.Linear`` o_proj/down_proj."""
    attn, mlp = layer.self_attn, layer.mlp
    if (fused.qkv_weight is None or fused.gate_up_weight is None
            or any(type(m) is not torch.nn.Linear for m in (attn.o_proj, mlp.down_proj))):
        return
    probe = torch.linspace(-6, 6, 97).to(fused.gate_up_weight)
    with torch.no_grad():
        if not torch.allclose(mlp.act_fn(probe).float(), F.silu(probe).float(), rtol=1e-2, atol=1e-3):
            return
    input_eps, post_eps = _rms_norm_eps(layer.input_layernorm), _rms_norm_eps(layer.post_attention_layernorm)
    if input_eps is not None and post_eps is not None:
        fused.input_eps, fused.post_eps = input_eps, post_eps


@dataclass
class _Slot:
    """One head group in the decode step: where this step's K/V goes and what the kernel reads."""

    group: HeadGroup
    base: int  # filled slots after prefill
    decode_kv: torch.Tensor  # group.kv[..., base:, :]: decode step i writes its slot i
    kernel_group: Any = None  # KVGroup for the Triton kernel
    num_splits: int = 1  # the kernel's split count for this group (group_num_splits)


class _DecodeState:
    """Static buffers of one generation and the decode step that reads and advances them in place."""

    def __init__(self, gen: LeanGenerator, cache: CateKVCache, token: torch.Tensor, position: torch.Tensor,
                 max_new_tokens: int):
        self.gen = gen
        device = token.device
        batch = token.shape[0]
        self.token = token.clone()
        self.position = position.clone()
        self.step_index = torch.zeros(1, dtype=torch.long, device=device)  # decode step, on the device
        self.steps_done = 0  # the same count on the host, for the SDPA backend (which never graphs)
        self.tokens = torch.empty(batch, max_new_tokens, dtype=torch.long, device=device)
        groups = [g for layer in cache.layers for g in layer.groups]
        # Slots each group's attention covers during the coming step: the prompt's plus the token being
        # decoded (appended before attention). One row per group, all advanced by a single add per step.
        self.lengths = torch.tensor([[g.length + 1] * batch for g in groups], dtype=torch.int32, device=device)
        rows = iter(self.lengths)
        self.layers = [
            [_Slot(g, g.length, g.kv[:, :, :, g.length :]) for g in layer.groups] for layer in cache.layers
        ]
        attn = gen.decoder.layers[0].self_attn
        self.scale = attn.scaling
        if gen.backend == "triton":
            from .kernels.triton_decode import (
                KVGroup,
                decode_attention_two_groups,
                group_num_splits,
                make_workspace,
                sm_count,
            )

            self._decode_attention = decode_attention_two_groups  # resolved once, not per layer and step

            q_heads = gen.model.config.get_text_config(decoder=True).num_attention_heads
            # Each group gets its own split count, fixed here (shapes only); the shared workspace holds the largest.
            splits = group_num_splits([g.keys for g in groups], gen.kernel_config, sm_count(device))
            self.workspace = make_workspace(batch, q_heads, attn.head_dim, max(splits), device)
            splits = iter(splits)
            self.attn_out = torch.empty(batch, q_heads, attn.head_dim, dtype=groups[0].kv.dtype, device=device)
            for slots in self.layers:
                for slot in slots:
                    g = slot.group
                    pad = g.pad.to(torch.int32) if g.pad is not None else None
                    kv_index = g.kv_heads if len(slots) > 1 else None
                    slot.kernel_group = KVGroup(g.keys, g.values, next(rows), pad, g.q_heads, kv_index)
                    slot.num_splits = next(splits)

    def step(self) -> None:
        """One decode step: consume ``self.token`` at ``self.position``, write the next token.

        Its parts are methods of their own, each over the same static buffers, so that a benchmark can
        run one alone (``benchmarks/decode_stages.py`` times each in its own CUDA graph).
        """
        gen = self.gen
        hidden, cos, sin = self._embed()
        self.steps_done += 1
        for layer, slots in zip(gen.decoder.layers, self.layers):
            q, kv, rope = gen._pre(layer, hidden, cos, sin)
            hidden = gen._post(layer, hidden, self._attention(q, kv, rope, slots))
        self._next_token(hidden)

    def _embed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The embedding of ``self.token`` and the RoPE cos/sin of ``self.position``."""
        decoder = self.gen.decoder
        hidden = decoder.embed_tokens(self.token)
        cos, sin = decoder.rotary_emb(hidden, self.position)
        return hidden, cos, sin

    def _append(self, kv: torch.Tensor, slots: list[_Slot]) -> None:
        """Write one layer's new K/V ``[2, B, Hkv, 1, D]`` into its groups, at slot ``self.step_index``
        (the SDPA backend; the Triton kernel appends by itself)."""
        for slot in slots:
            new = kv[:, :, slot.group.kv_heads] if len(slots) > 1 else kv
            slot.decode_kv.index_copy_(3, self.step_index, new)

    def _next_token(self, hidden: torch.Tensor) -> None:
        """Final norm, lm_head and greedy pick into ``self.token``; advance position, step and lengths."""
        self.token.copy_(self.gen._greedy_step(self.gen._head(hidden)))
        self.position.add_(1)
        self.step_index.add_(1)
        self.lengths.add_(1)
        self.tokens.index_copy_(1, self.step_index, self.token)

    def _attention(self, q: torch.Tensor, kv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                   slots: list[_Slot]) -> torch.Tensor:
        """Append this step's K/V ``[2, B, Hkv, 1, D]`` to the layer's groups and attend: ``[B, Hq, D]``. ``rope``
        as ``LeanGenerator._pre`` returns it (not None only with the Triton backend)."""
        if self.gen.backend == "triton":
            return self._decode_attention(
                q[:, :, 0], [slot.kernel_group for slot in slots], scale=self.scale, out=self.attn_out,
                num_splits=[slot.num_splits for slot in slots], workspace=self.workspace,
                config=self.gen.kernel_config, new_k=kv[0, :, :, 0], new_v=kv[1, :, :, 0], rope=rope,
            )
        self._append(kv, slots)
        out = torch.empty_like(q)
        for slot in slots:
            slot.group.length = slot.base + self.steps_done
            out[:, slot.group.q_heads] = group_attention(q[:, slot.group.q_heads], slot.group, self.scale)
        return out[:, :, 0]

    def finish(self, steps: int) -> None:
        """Record the decoded tokens in the groups' lengths (a replayed graph does not touch the host)."""
        for slot in (slot for layer in self.layers for slot in layer):
            slot.group.length = slot.base + steps

    def capture(self) -> torch.cuda.CUDAGraph:
        """Warm up (compiles the kernels), restore the state, capture one step as a CUDA graph."""
        state = (self.token, self.position, self.step_index, self.lengths)
        saved = [t.clone() for t in state]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.step()
        torch.cuda.current_stream().wait_stream(stream)
        for t, s in zip(state, saved):
            t.copy_(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # records the step without running it: the state stays as restored
            self.step()
        return graph
