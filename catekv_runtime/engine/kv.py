"""Static per-slot KV: each layer's head groups in preallocated buffers, one row per slot, written in place.

A layer has one buffer per head group (CateKV: its adaptive heads, and its consistent heads of each budget; full
attention: one group of every head), ``[2, slots, heads, capacity, head_dim]``. Row ``s`` holds slot ``s``'s
sequence. Slot index 0 of every row is a sink: a row without a running request has length 1, so the decode step
(which writes each row's new K/V at index ``length - 1`` and attends to ``[1, length)``) writes its throwaway K/V
there and reads nothing. That keeps a row that is being prefilled, or is free, intact while the other rows decode,
with no host-side branching. A request's tokens live at ``[1, 1 + kept + decoded)``.

The lengths ``[groups, slots]`` int32 live in device memory, one row per (layer, group), read by the decode
attention; a decode step adds ``active`` to all of them at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..attention import chunk_attention
from ..cache import CateKVLayer
from ..params import UNLIMITED_BUDGET
from ..profile import ProfileParams
from .model import DecoderModel


@dataclass
class GroupKV:
    """One head group of one layer across all slots: the layer's heads of one budget."""

    kv_heads: torch.Tensor  # [h] int64 on the device: the model's KV heads in this group
    q_heads: torch.Tensor  # [h * G] int64: their query heads, in cache order
    kv: torch.Tensor  # [2, slots, h, capacity, D]
    row: int  # this group's row in SlotKV.lengths
    budget: int  # the heads' budget, UNLIMITED_BUDGET for adaptive heads

    @property
    def adaptive(self) -> bool:
        return self.budget == UNLIMITED_BUDGET


class SlotKV:
    """Every layer's head groups for ``slots`` sequences, and their lengths.

    Args:
        model: the decode model (heads, dtype, device).
        budgets: int ``[layers, kv_heads]``, each head's budget (``UNLIMITED_BUDGET``: an adaptive head, which keeps
            every token; all of them: full attention). A layer has one group per distinct budget, in ascending
            order (adaptive heads first), the order of ``CateKVLayer.select_heads``.
        slots: rows of every buffer.
        capacities: the tokens a row of each budget's group can hold (the sink slot is added on top).
    """

    def __init__(self, model: DecoderModel, budgets: torch.Tensor, slots: int, capacities: dict[int, int]):
        self.slots = slots
        device, dtype, dim = model.device, model.dtype, model.head_dim
        group = model.q_heads // model.kv_heads
        self.layers: list[list[GroupKV]] = []
        row = 0
        for layer in budgets.cpu():
            groups = []
            for budget in torch.unique(layer).tolist():
                heads = (layer == budget).nonzero().flatten()
                q_heads = (heads[:, None] * group + torch.arange(group)).flatten()
                kv = torch.zeros(2, slots, heads.numel(), 1 + capacities[budget], dim, dtype=dtype, device=device)
                groups.append(GroupKV(heads.to(device), q_heads.to(device), kv, row, budget))
                row += 1
            self.layers.append(groups)
        self.lengths = torch.ones(row, slots, dtype=torch.int32, device=device)
        self.starts = torch.ones(slots, dtype=torch.int32, device=device)

    @staticmethod
    def bytes_per_slot(model: DecoderModel, budgets: torch.Tensor, capacities: dict[int, int]) -> int:
        """Bytes one slot takes in every buffer (to size the slot count from a memory budget)."""
        values, counts = torch.unique(budgets.cpu(), return_counts=True)
        tokens = sum(int(c) * (1 + capacities[int(b)]) for b, c in zip(values, counts))
        return 2 * tokens * model.head_dim * model.embed.element_size()

    @property
    def groups(self) -> list[GroupKV]:
        return [g for layer in self.layers for g in layer]

    def load_layer(self, slot: int, layer: int, keys: torch.Tensor, values: torch.Tensor,
                   selections: list[tuple[torch.Tensor, torch.Tensor | None]]) -> list[int]:
        """Copy what one layer's head groups keep of one prompt (``keys``/``values`` ``[kv_heads, n, d]``;
        ``selections`` from ``CateKVLayer.select_heads``) into row ``slot``; returns each group's token count (the
        row's lengths stay as they are until :meth:`activate`)."""
        mine = self.layers[layer]
        if len(mine) != len(selections):
            raise RuntimeError(f"layer {layer}: selection made {len(selections)} head groups, the slots hold "
                               f"{len(mine)}")
        counts = []
        for group, (heads, kept_tokens) in zip(mine, selections):
            kept = keys.shape[1] if kept_tokens is None else kept_tokens.shape[1]
            # Both groupings come from the same head map (adaptive heads first, then the consistent ones); the
            # heads' count is compared on the host, since comparing device tensors would wait for the device.
            if group.kv_heads.numel() != heads.numel() or 1 + kept > group.kv.shape[3]:
                raise RuntimeError(f"layer {layer}: selected {kept} tokens of {heads.numel()} heads, which do not fit "
                                   f"the slot group of {group.kv_heads.numel()} heads and {group.kv.shape[3]} tokens")
            for source, target in ((keys, group.kv[0, slot]), (values, group.kv[1, slot])):
                if kept_tokens is not None:  # one gather of the group's heads and tokens
                    source = source[heads[:, None], kept_tokens]
                elif heads.numel() != source.shape[0]:
                    source = source[heads]
                target[:, 1 : 1 + kept] = source
            counts.append(kept)
        return counts

    def activate(self, slot: int, counts: list[int]) -> None:
        """Make row ``slot`` decode: its lengths become sink + kept tokens + the token about to be decoded."""
        self.lengths[:, slot] = torch.tensor(counts, dtype=torch.int32).to(self.lengths.device) + 2

    def release(self, slot: int) -> None:
        """Row ``slot`` stops decoding: length 1 (the sink only)."""
        self.lengths[:, slot] = 1


def layer_selectors(budgets: torch.Tensor, params: ProfileParams) -> list[CateKVLayer]:
    """One selector per layer (``budgets`` ``[layers, kv_heads]``) for :func:`prefill` (made once per engine, so
    that what they copy to the device is copied once)."""
    return [CateKVLayer(layer, params, 0, True) for layer in budgets]


def prefill(model: DecoderModel, kv: SlotKV, slot: int, token_ids: torch.Tensor, selectors: list[CateKVLayer],
            params: ProfileParams, chunk: int, backend: str, triton: bool = False) -> Iterator[int]:
    """Prefill one prompt (``token_ids`` ``[n]``) into row ``slot``, layer by layer, ``chunk`` tokens at a time, the
    chunks' attention on prefill backend ``backend`` (``attention.chunk_attention``); ``triton``: the RMSNorms (with
    their residual add) and SiLU x up of each chunk in the Triton row kernels, as a decode step's rows
    (``DecoderModel.qkv``), each one pass over the chunk where PyTorch's ops make several.

    A generator: it yields the number of tokens it just processed after every chunk of every layer but the last
    (whose work ends with the return), so that the engine can run decode steps in between, and returns the last
    position's logits ``[vocab]`` and the per-group token counts to pass to :meth:`SlotKV.activate`. Per layer, each
    chunk's q/k/v come from the layer's input (the chunks before it already hold the layer's output, but their K/V
    were written first), its queries attend to every key up to their own, and then the layer selects what each head
    keeps (``CateKVLayer.select_heads``, the same rule as ``apply``'s cache) and the selection is copied into the
    row: only one layer's full K/V exists at a time.
    """
    n = token_ids.shape[0]
    hidden = model.embed[token_ids]  # [n, hidden]
    positions = torch.arange(n, device=token_ids.device)
    spans = [(start, min(start + chunk, n)) for start in range(0, n, chunk)]
    counts: list[int] = []
    for index, weights in enumerate(model.layers):
        keys = hidden.new_empty(1, model.kv_heads, n, model.head_dim)
        values = torch.empty_like(keys)
        window = params.obs_window
        last_queries = None
        for start, end in spans:
            x = hidden[start:end]
            q, k, v = model.qkv(weights, x, triton=triton)  # [m, H, D]
            cos, sin = model.rope_tables(positions[start:end])
            q, k = model.rope(q, cos, sin), model.rope(k, cos, sin)
            keys[0, :, start:end] = k.transpose(0, 1)
            values[0, :, start:end] = v.transpose(0, 1)
            q = q.transpose(0, 1)[None]  # [1, Hq, m, D]
            tail = q[:, :, -window:]
            last_queries = tail if last_queries is None else torch.cat([last_queries, tail], dim=2)[:, :, -window:]
            out = chunk_attention(q, keys, values, start, model.scale, backend=backend)
            hidden[start:end] = model.attention_out(weights, x, out[0].transpose(0, 1), triton=triton)
            if index < model.num_layers - 1 or end < n:  # the last chunk's work goes with the return
                yield end - start
        selections = selectors[index].select_heads(keys[0], last_queries[0], model.scale)
        counts += kv.load_layer(slot, index, keys[0], values[0], selections)
        del keys, values
    return model.logits(hidden[-1]), counts


def decode_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: list[GroupKV],
                           lengths: torch.Tensor, starts: torch.Tensor, scale: float) -> torch.Tensor:
    """One decode step's attention in plain PyTorch over rows ``[0, n)``: append each row's new K/V (``k``, ``v``
    ``[n, Hkv, D]``, after RoPE) at index ``length - 1`` of its groups, then attend q ``[n, Hq, D]`` to
    ``[start, length)`` and the new token. Reads every group's whole capacity (masking what is not valid): the CPU
    path, and the reference of the Triton kernel's."""
    n = q.shape[0]
    rows = torch.arange(n, device=q.device)
    out = torch.empty_like(q)
    for group in layer:
        length = lengths[group.row, :n].long()
        keys, values = group.kv[0, :n], group.kv[1, :n]  # [n, h, cap, D]
        keys[rows, :, length - 1] = k[:, group.kv_heads]
        values[rows, :, length - 1] = v[:, group.kv_heads]
        heads = group.kv_heads.numel()
        query = q[:, group.q_heads].unflatten(1, (heads, -1)).float()  # [n, h, G, D]
        scores = torch.einsum("nhgd,nhcd->nhgc", query, keys.float()) * scale
        slot = torch.arange(keys.shape[2], device=q.device)
        # The new token is always attended, as the kernel does from registers: a free row (length 1, its new K/V in
        # the sink) then attends to that alone and stays finite; NaN there would reach its sink, and a masked weight
        # of 0 times NaN is NaN when a request later uses the row.
        last = length[:, None] - 1
        valid = ((slot >= starts[:n, None].long()) & (slot < length[:, None])) | (slot == last)  # [n, cap]
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[:, group.q_heads] = torch.einsum("nhgc,nhcd->nhgd", probs, values.float()).flatten(1, 2).to(q.dtype)
    return out
