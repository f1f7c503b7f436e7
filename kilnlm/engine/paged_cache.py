"""The KV pool as tensors, and the model's ``Cache`` protocol over it for one forward pass.

Layout: keys and values of every layer live in one flat array of token *slots* per kv head,
(n_layer, n_kv_head, num_slots, head_dim); slot = block · block_size + offset. One extra block
at the end is scratch: padding tokens write there and padding keys read from there (with
position -1, so attention masks them).

A forward pass over a batch of sequences is *bound* first (``bind``): each row's new tokens
(left-padded so every row's last token sits in the last column, which is all ``last_only``
needs), their absolute positions, the slots they write, and for reading, each row's slots in
block-table order with their positions. ``update`` then writes the new keys/values through the
slot mapping and gathers each row's keys/values through its block table. The model builds the
causal (and sliding-window) mask from the positions, so it never learns the cache is paged.

Per step, per layer, the gather writes every row's keys and values (megabytes at 32 rows of a
few hundred tokens) into two buffers the cache keeps and reuses: a fresh tensor of that size
per layer and step came from ``mmap`` and cost thousands of page faults per step (the library
kernels' decode step of a 5M model spent more time faulting pages in than computing). The
buffers only grow. The keys ``update`` returns are therefore valid until the next ``update``:
the model's attention reads them at once, within the same layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from kilnlm.model import ModelConfig


class PagedCache:
    """Block-paged keys/values for every layer, shared by all sequences (and weight versions)."""

    def __init__(
        self,
        cfg: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        key_multiple: int = 1,
    ):
        assert cfg.n_kv_head is not None
        self.key_multiple = key_multiple  # pad each pass's key length to a multiple of this
        self.block_size, self.num_blocks = block_size, num_blocks
        self.scratch_block = num_blocks  # the extra block
        self.scratch_slot = num_blocks * block_size
        # (layer, kv head, slot, head_dim): a gather yields (nkv, B, S, hs) in one piece, so the
        # batch-invariant attention reads it without another copy.
        shape = (cfg.n_layer, cfg.n_kv_head, (num_blocks + 1) * block_size, cfg.head_dim)
        # Zeros, not empty: attention multiplies masked values by an exact 0, and 0 · NaN is NaN.
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.device = self.k.device
        self._write: Tensor | None = None  # (B·T,) slot of every new token
        self._read: Tensor | None = None  # (B·S,) slots each row attends to
        self._read_pos: Tensor | None = None  # (B, S) their positions, -1 for padding
        self._gathered = (self.k.new_empty(0), self.v.new_empty(0))  # reused gather buffers

    def nbytes(self) -> int:
        """Bytes reserved (the scratch block included)."""
        return self.k.nbytes + self.v.nbytes

    def bind(
        self, rows: Sequence[tuple[Sequence[int], int, Sequence[int]]]
    ) -> tuple[Tensor, Tensor]:
        """Prepare one forward pass; rows are (new token ids, position of the first, block table).

        Returns the model's inputs: tokens and positions, (B, T) each, left-padded. A padding
        token takes its row's first new position (so it sees at least one key, as every query
        must) and writes to the scratch block. The rows are laid out in Python lists and turned
        into tensors once (a decode step of 32 rows made ~130 tiny tensors before).
        """
        bs, scratch = self.block_size, self.scratch_block
        B, T = len(rows), max(len(chunk) for chunk, _, _ in rows)
        ends = [start + len(chunk) for chunk, start, _ in rows]
        unit = math.lcm(bs, self.key_multiple) // bs  # blocks per key_multiple
        n_blocks = math.ceil(math.ceil(max(ends) / bs) / unit) * unit
        table_rows, token_rows, position_rows = [], [], []
        for (chunk, start, blocks), end in zip(rows, ends, strict=True):
            used = -(-end // bs)
            table_rows.append([*blocks[:used], *[scratch] * (n_blocks - used)])
            pad = T - len(chunk)
            token_rows.append([*[0] * pad, *chunk])
            position_rows.append([*[start] * pad, *range(start, end)])
        table = torch.tensor(table_rows, dtype=torch.long)  # (B, n_blocks)
        tokens = torch.tensor(token_rows, dtype=torch.long)  # (B, T)
        positions = torch.tensor(position_rows, dtype=torch.long)  # (B, T)
        lengths = torch.tensor(ends)  # (B,)
        slots = (table[:, :, None] * bs + torch.arange(bs)).view(B, n_blocks * bs)  # (B, S)
        key_pos = torch.arange(n_blocks * bs).expand(B, -1)
        valid = key_pos < lengths[:, None]
        read = torch.where(valid, slots, self.scratch_slot)
        write = read.gather(1, positions)  # (B, T)
        n_new = torch.tensor([len(chunk) for chunk, _, _ in rows])
        is_pad = torch.arange(T)[None, :] < (T - n_new)[:, None]  # left padding
        write = torch.where(is_pad, self.scratch_slot, write)
        dev = self.device
        self._write = write.reshape(-1).to(dev)
        self._read = read.reshape(-1).to(dev)
        self._read_pos = torch.where(valid, key_pos, -1).to(dev)
        return tokens.to(dev), positions.to(dev)

    def update(
        self, layer: int, k: Tensor, v: Tensor, positions: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Write k, v (B, nkv, T, hs) to their slots; return every row's keys/values, (B, nkv, S,
        hs), gathered through its block table, and their positions (B, S). The keys/values are
        views of the cache's gather buffers: valid until the next ``update``."""
        assert self._write is not None and self._read is not None and self._read_pos is not None
        B, nkv, T, hs = k.shape
        self.k[layer].index_copy_(1, self._write, k.transpose(0, 1).reshape(nkv, B * T, hs))
        self.v[layer].index_copy_(1, self._write, v.transpose(0, 1).reshape(nkv, B * T, hs))
        S = self._read_pos.shape[1]
        keys_out, values_out = self._gather_buffers(nkv * B * S * hs)
        keys = keys_out.view(nkv, B * S, hs)
        values = values_out.view(nkv, B * S, hs)
        torch.index_select(self.k[layer], 1, self._read, out=keys)
        torch.index_select(self.v[layer], 1, self._read, out=values)
        return (
            keys.view(nkv, B, S, hs).transpose(0, 1),
            values.view(nkv, B, S, hs).transpose(0, 1),
            self._read_pos,
        )

    def _gather_buffers(self, n: int) -> tuple[Tensor, Tensor]:
        """The first n elements of the key and value gather buffers, grown (never shrunk) with
        headroom so a batch that grows by a block does not reallocate every step."""
        k_buf, v_buf = self._gathered
        if k_buf.numel() < n:
            size = n + n // 2
            self._gathered = k_buf, v_buf = self.k.new_empty(size), self.v.new_empty(size)
        return k_buf[:n], v_buf[:n]

    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy-on-write: block dst takes block src's keys/values in every layer."""
        if not pairs:
            return
        bs = self.block_size
        offsets = torch.arange(bs)
        src = torch.cat([offsets + s * bs for s, _ in pairs]).to(self.device)
        dst = torch.cat([offsets + d * bs for _, d in pairs]).to(self.device)
        self.k[:, :, dst] = self.k[:, :, src]
        self.v[:, :, dst] = self.v[:, :, src]


__all__ = ["PagedCache"]
