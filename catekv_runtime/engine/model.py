"""The engine's own model of a Llama-family decoder: the weights of a transformers model and the math, written out.

Llama 2/3 (including llama3 RoPE scaling), Mistral without a sliding window, Qwen2/2.5 (q/k/v bias), Qwen3 (RMSNorm
of each query and key head before RoPE), Phi-3 without partial rotary or longrope, SmolLM2. Every layer is

    h = x + o(attention(rope(q), rope(k), v))        q, k, v = split(qkv(rmsnorm(x)))
    y = h + down(silu(gate) * up)                    gate, up = split(gate_up(rmsnorm(h)))

with RoPE in the rotate-half form over the whole head. The RoPE frequencies are the model's own rotary module's
``inv_freq`` and ``attention_scaling`` (so linear, llama3 and yarn scaling need no code here); RoPE types whose
frequencies change with the sequence length (dynamic, longrope) are refused, as are sliding windows and models
transformers sharded itself (``tp_plan``): this code would compute something else for them.

Tensor parallelism is this same code with each rank's share of the weights (:meth:`DecoderModel.shard`, Megatron's
split): q/k/v and gate/up split by output rows (column-parallel), o and down by input columns (row-parallel),
followed by an all-reduce of their output; the embedding and the LM head stay whole on every rank.

q/k/v and gate/up run as one projection each. Their weights are concatenated once and the transformers model's own
parameters become views of the result (:func:`fuse_linears`), so building this model costs no weight memory
and leaves the transformers model working as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3")
_STATIC_ROPE = ("default", "linear", "llama3", "yarn")


class UnsupportedModelError(ValueError):
    """The transformers model is not one the engine's model code computes correctly (the message says why)."""


@dataclass
class LayerWeights:
    """One decoder layer's tensors; ``*_bias`` and the Qwen3 head norms are None where the model has none."""

    input_norm: torch.Tensor
    qkv: torch.Tensor  # [(Hq + 2 Hkv) * D, hidden]
    qkv_bias: torch.Tensor | None
    q_norm: torch.Tensor | None  # [D], Qwen3
    k_norm: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor
    gate_up: torch.Tensor  # [2 * intermediate, hidden]
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None


class DecoderModel:
    """A Llama-family decoder over plain tensors; build it with :meth:`from_transformers`.

    Shapes: hidden states are ``[..., hidden]``; :meth:`qkv` returns heads as ``[..., heads, head_dim]``; RoPE
    tables are ``[..., head_dim]`` for the same leading shape as the tokens. Under tensor parallelism
    (``tp_size`` > 1, from :meth:`shard`) ``q_heads`` and ``kv_heads`` are this rank's, and :meth:`attention_out`
    all-reduces over the default process group.
    """

    def __init__(self, *, layers: list[LayerWeights], embed: torch.Tensor, final_norm: torch.Tensor,
                 lm_head: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float, q_heads: int,
                 kv_heads: int, head_dim: int, eps: float, scale: float, eos_token_ids: tuple[int, ...],
                 tp_size: int = 1):
        self.layers = layers
        self.embed = embed
        self.final_norm = final_norm
        self.lm_head = lm_head
        self.inv_freq = inv_freq.float()
        self.attention_scaling = attention_scaling
        self.q_heads, self.kv_heads, self.head_dim = q_heads, kv_heads, head_dim
        self.eps = eps
        self.scale = scale
        self.eos_token_ids = eos_token_ids
        self.tp_size = tp_size

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def vocab_size(self) -> int:
        return self.lm_head.shape[0]

    @classmethod
    def from_transformers(cls, model: torch.nn.Module) -> DecoderModel:
        """The decode model of a transformers causal LM, sharing its weights; raises :class:`UnsupportedModelError`
        naming the reason for models this code does not compute correctly."""
        config = model.config.get_text_config(decoder=True)
        _check_supported(model, config)
        decoder = model.get_decoder()
        rotary = decoder.rotary_emb
        layers = [_layer_weights(layer) for layer in decoder.layers]
        attn = decoder.layers[0].self_attn
        q_heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or q_heads
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos = config.eos_token_id if eos is None else eos
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
        return cls(
            layers=layers, embed=decoder.embed_tokens.weight.detach(), final_norm=decoder.norm.weight.detach(),
            lm_head=model.lm_head.weight.detach(), inv_freq=rotary.inv_freq.detach(),
            attention_scaling=float(rotary.attention_scaling), q_heads=q_heads, kv_heads=kv_heads,
            head_dim=attn.head_dim, eps=float(config.rms_norm_eps), scale=float(attn.scaling), eos_token_ids=eos_ids,
        )

    def shard(self, rank: int, size: int) -> DecoderModel:
        """Rank ``rank`` of ``size``'s part of this model for tensor parallelism: the query heads, KV heads and MLP
        columns of rank r are the r-th of ``size`` equal contiguous blocks (KV heads ``[r * H / size, (r + 1) * H /
        size)`` and their query heads, as transformers' ``colwise`` plan and ``catekv_runtime.local_head_map``);
        o and down keep the matching input columns, and their biases live on rank 0 only (the all-reduce adds them
        once). The projections' shares are copies; the embedding, LM head and norms are shared, whole."""
        inter = self.layers[0].gate_up.shape[0] // 2
        if not 0 <= rank < size:
            raise ValueError(f"rank {rank} is not in [0, {size})")
        if self.kv_heads % size:
            raise ValueError(f"tensor parallelism over {size} ranks: the model has {self.kv_heads} KV heads, which do "
                             f"not divide by {size} (each rank must hold whole KV heads); run with a tensor-parallel "
                             f"size that divides {self.kv_heads}")
        if inter % size:
            raise ValueError(f"tensor parallelism over {size} ranks: the MLP's intermediate size {inter} does not "
                             f"divide by {size}; run with a tensor-parallel size that divides it")
        qkv_blocks = [self.q_heads * self.head_dim] + 2 * [self.kv_heads * self.head_dim]

        def columns(weight: torch.Tensor) -> torch.Tensor:
            return weight.chunk(size, dim=1)[rank].contiguous()

        def first_only(bias: torch.Tensor | None) -> torch.Tensor | None:
            return bias if rank == 0 else None

        layers = [LayerWeights(
            input_norm=w.input_norm, qkv=_rank_rows(w.qkv, qkv_blocks, rank, size),
            qkv_bias=_rank_rows(w.qkv_bias, qkv_blocks, rank, size), q_norm=w.q_norm, k_norm=w.k_norm,
            o=columns(w.o), o_bias=first_only(w.o_bias), post_norm=w.post_norm,
            gate_up=_rank_rows(w.gate_up, [inter, inter], rank, size),
            gate_up_bias=_rank_rows(w.gate_up_bias, [inter, inter], rank, size),
            down=columns(w.down), down_bias=first_only(w.down_bias),
        ) for w in self.layers]
        return DecoderModel(
            layers=layers, embed=self.embed, final_norm=self.final_norm, lm_head=self.lm_head, inv_freq=self.inv_freq,
            attention_scaling=self.attention_scaling, q_heads=self.q_heads // size, kv_heads=self.kv_heads // size,
            head_dim=self.head_dim, eps=self.eps, scale=self.scale, eos_token_ids=self.eos_token_ids, tp_size=size)

    # ------------------------------------------------------------------------------------------- the math

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Llama's RMSNorm: in float32, then back to the input dtype before the weight."""
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * x32.to(dtype)

    def rope_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin ``[*positions.shape, head_dim]`` in the model dtype (computed in float32, as transformers)."""
        freqs = positions[..., None].float() * self.inv_freq.to(positions.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return ((emb.cos() * self.attention_scaling).to(self.dtype),
                (emb.sin() * self.attention_scaling).to(self.dtype))

    @staticmethod
    def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate-half RoPE of heads ``x`` ``[..., heads, D]`` with ``cos``/``sin`` ``[..., D]``."""
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return (x * cos) + (rotated * sin)

    def qkv(self, layer: LayerWeights, x: torch.Tensor, *, triton: bool = False
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Norm, the fused projection and (Qwen3) the head norms of hidden states ``x`` ``[..., hidden]``: q
        ``[..., Hq, D]``, k and v ``[..., Hkv, D]``, before RoPE. ``triton`` (a decode step's rows or a prefill
        chunk, ``[rows, hidden]``): one row through one Triton kernel
        (:func:`~catekv_runtime.kernels.triton_linear.fused_linear`, the norm inside); several rows through the
        Triton RMSNorm and cuBLAS; the same math."""
        if triton and x.shape[0] == 1:
            from ..kernels.triton_linear import fused_linear

            out = fused_linear(x, layer.qkv, layer.qkv_bias, norm_weight=layer.input_norm, eps=self.eps)
        elif triton:
            from ..kernels.triton_norm import rms_norm

            out = F.linear(rms_norm(x, layer.input_norm, self.eps)[0], layer.qkv, layer.qkv_bias)
        else:
            out = F.linear(self.rms_norm(x, layer.input_norm), layer.qkv, layer.qkv_bias)
        q_rows, kv_rows = self.q_heads * self.head_dim, self.kv_heads * self.head_dim
        q = out[..., :q_rows].unflatten(-1, (self.q_heads, self.head_dim))
        k = out[..., q_rows : q_rows + kv_rows].unflatten(-1, (self.kv_heads, self.head_dim))
        v = out[..., q_rows + kv_rows :].unflatten(-1, (self.kv_heads, self.head_dim))
        if layer.q_norm is not None:
            q, k = self.rms_norm(q, layer.q_norm), self.rms_norm(k, layer.k_norm)
        return q, k, v

    def attention_out(self, layer: LayerWeights, x: torch.Tensor, attn: torch.Tensor, *,
                      triton: bool = False) -> torch.Tensor:
        """The rest of the layer after attention: ``x + o(attn)`` then the MLP block; ``attn`` ``[..., Hq, D]``.
        ``triton`` (a decode step's rows or a prefill chunk): one row in three Triton kernels (o with the residual
        add; the norm, gate/up and SiLU x up; down with the residual add); several rows with the residual add and the
        norm in one Triton kernel and SiLU x up in another, around cuBLAS; the same math."""
        if triton and x.shape[0] == 1:
            from ..kernels.triton_linear import fused_linear

            h = fused_linear(attn.reshape(x.shape[:-1] + (-1,)), layer.o, layer.o_bias, residual=x)
            act = fused_linear(h, layer.gate_up, layer.gate_up_bias, norm_weight=layer.post_norm, eps=self.eps,
                               glu=True)
            return fused_linear(act, layer.down, layer.down_bias, residual=h)
        if triton:
            from ..kernels.triton_norm import rms_norm, silu_mul

            o = self._all_reduce(F.linear(attn.flatten(-2), layer.o, layer.o_bias))
            normed, h = rms_norm(o, layer.post_norm, self.eps, residual=x)
            act = silu_mul(F.linear(normed, layer.gate_up, layer.gate_up_bias))
            return h + self._all_reduce(F.linear(act, layer.down, layer.down_bias))
        h = x + self._all_reduce(F.linear(attn.flatten(-2), layer.o, layer.o_bias))
        gate, up = F.linear(self.rms_norm(h, layer.post_norm), layer.gate_up, layer.gate_up_bias).chunk(2, dim=-1)
        return h + self._all_reduce(F.linear(F.silu(gate) * up, layer.down, layer.down_bias))

    def _all_reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """The sum over the ranks of a row-parallel projection's output (in place); itself without TP."""
        if self.tp_size > 1:
            dist.all_reduce(partial)
        return partial

    def logits(self, x: torch.Tensor, *, triton: bool = False) -> torch.Tensor:
        """Final norm and LM head: float32 logits ``[..., vocab]``. ``triton`` (a decode step's rows): one row in one
        Triton kernel; several rows with the Triton RMSNorm."""
        if triton and x.shape[0] == 1:
            from ..kernels.triton_linear import fused_linear

            return fused_linear(x, self.lm_head, norm_weight=self.final_norm, eps=self.eps).float()
        if triton:
            from ..kernels.triton_norm import rms_norm

            return F.linear(rms_norm(x, self.final_norm, self.eps)[0], self.lm_head).float()
        return F.linear(self.rms_norm(x, self.final_norm), self.lm_head).float()

    def fusable(self) -> bool:
        """Whether ``kernels.triton_linear.fused_linear`` can take every projection: weights in the model dtype
        with contiguous rows. The math it fuses (Llama's RMSNorm, SiLU-gating) is this model's own. Never under
        tensor parallelism: the kernels add the residual inside o and down, before the all-reduce would run."""
        if self.tp_size > 1:
            return False
        weights = [self.lm_head, self.final_norm]
        for layer in self.layers:
            weights += [layer.qkv, layer.o, layer.gate_up, layer.down, layer.input_norm, layer.post_norm]
        return all(w.dtype == self.dtype and w.stride(-1) == 1 for w in weights)


def _check_supported(model: torch.nn.Module, config) -> None:
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    from ..integration import tensor_parallel_rank

    kind = getattr(config, "model_type", type(model).__name__)
    if kind not in SUPPORTED_TYPES:
        raise UnsupportedModelError(f"the engine supports the Llama family ({', '.join(SUPPORTED_TYPES)}), not "
                                    f"{kind!r}; use catekv_runtime.apply(model, profile) with model.generate")
    if tensor_parallel_rank(model)[1] > 1:
        raise UnsupportedModelError("the engine shards the model itself: load it without tp_plan (the full weights "
                                    "on every rank) and pass Engine(..., tensor_parallel=True) under torchrun")
    if not all(type(layer) is DynamicLayer for layer in DynamicCache(config=config).layers):
        raise UnsupportedModelError(f"{kind}: sliding-window attention layers are not supported by the engine "
                                    "(set sliding_window=None if the model does not need it, or use apply())")
    rope = getattr(config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type not in _STATIC_ROPE:
        raise UnsupportedModelError(f"RoPE type {rope_type!r} is not supported by the engine (its frequencies "
                                    f"change with the sequence length); supported: {', '.join(_STATIC_ROPE)}")
    if rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) != 1.0:
        raise UnsupportedModelError("partial rotary embeddings are not supported by the engine")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"activation {config.hidden_act!r} is not supported by the engine (SiLU only)")
    attn = model.get_decoder().layers[0].self_attn
    if attn.head_dim % 2:
        raise UnsupportedModelError(f"RoPE needs an even head_dim, got {attn.head_dim}")


def _layer_weights(layer: torch.nn.Module) -> LayerWeights:
    attn, mlp = layer.self_attn, layer.mlp
    if hasattr(attn, "qkv_proj"):  # Phi-3: already fused
        qkv, qkv_bias = attn.qkv_proj.weight.detach(), _bias(attn.qkv_proj)
    else:
        qkv, qkv_bias = _fused([attn.q_proj, attn.k_proj, attn.v_proj])
    if hasattr(mlp, "gate_up_proj"):
        gate_up, gate_up_bias = mlp.gate_up_proj.weight.detach(), _bias(mlp.gate_up_proj)
    else:
        gate_up, gate_up_bias = _fused([mlp.gate_proj, mlp.up_proj])
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    return LayerWeights(
        input_norm=layer.input_layernorm.weight.detach(), qkv=qkv, qkv_bias=qkv_bias,
        q_norm=q_norm.weight.detach() if q_norm is not None else None,
        k_norm=k_norm.weight.detach() if k_norm is not None else None,
        o=attn.o_proj.weight.detach(), o_bias=_bias(attn.o_proj),
        post_norm=layer.post_attention_layernorm.weight.detach(),
        gate_up=gate_up, gate_up_bias=gate_up_bias, down=mlp.down_proj.weight.detach(), down_bias=_bias(mlp.down_proj),
    )


def _rank_rows(tensor: torch.Tensor | None, blocks: list[int], rank: int, size: int) -> torch.Tensor | None:
    """``tensor``'s rows read as consecutive blocks of ``blocks`` rows (q, k, v; gate, up): the ``rank``-th of
    ``size`` equal parts of each block, concatenated (a copy). None stays None."""
    if tensor is None:
        return None
    return torch.cat([block.chunk(size)[rank] for block in tensor.split(blocks)])


def _bias(linear: torch.nn.Module) -> torch.Tensor | None:
    return linear.bias.detach() if linear.bias is not None else None


def _fused(linears: list[torch.nn.Module]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The rows of ``linears`` as one weight (and bias): the model's parameters become views of it where they can
    (plain ``nn.Linear`` of one dtype and device), else a copy."""
    fused = fuse_linears(linears)
    if fused is not None:
        return fused
    biases = [_bias(m) for m in linears]
    if any(b is None for b in biases) and not all(b is None for b in biases):
        biases = [b if b is not None else m.weight.new_zeros(m.weight.shape[0]) for b, m in zip(biases, linears)]
    bias = torch.cat(biases) if biases[0] is not None else None
    return torch.cat([m.weight.detach() for m in linears]), bias


def fuse_linears(linears: list[torch.nn.Module]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """One weight (and bias) holding the rows of ``linears`` in order; their parameters become views of it.

    Weights that already lie back to back in one storage (a previous fusion) are viewed, not copied. Returns
    None, changing nothing, unless all are plain ``nn.Linear`` with weights of one dtype on one real device
    and all or none have a bias.
    """
    weights = [m.weight for m in linears]
    biases = [m.bias for m in linears]
    first = weights[0]
    if (any(type(m) is not torch.nn.Linear for m in linears) or first.device.type == "meta"
            or any(w.dtype != first.dtype or w.device != first.device or type(w) is not torch.nn.Parameter
                   for w in weights)
            or len({b is None for b in biases}) > 1):
        return None
    return _concatenate_rows(linears, "weight"), (_concatenate_rows(linears, "bias") if biases[0] is not None else None)


def _concatenate_rows(linears: list[torch.nn.Module], name: str) -> torch.Tensor:
    parts = [getattr(m, name) for m in linears]
    rows = sum(p.shape[0] for p in parts)
    storage, offset = parts[0].untyped_storage(), parts[0].storage_offset()
    in_place = all(p.is_contiguous() and p.untyped_storage().data_ptr() == storage.data_ptr() for p in parts) and all(
        p.storage_offset() == offset + sum(q.numel() for q in parts[:i]) for i, p in enumerate(parts))
    if in_place:
        return parts[0].detach().new_empty(0).set_(storage, offset, (rows, *parts[0].shape[1:]))
    fused = torch.cat([p.detach() for p in parts])
    start = 0
    for m, p in zip(linears, parts):
        setattr(m, name, torch.nn.Parameter(fused[start : start + p.shape[0]], requires_grad=p.requires_grad))
        start += p.shape[0]
    return fused
