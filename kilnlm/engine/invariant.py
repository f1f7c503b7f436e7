"""Batch-invariant numerics: a row's arithmetic must not depend on the rows beside it.

Why this exists: the engine promises that a seeded request produces the same tokens whatever
else shares its batch. Sampling already draws each row from its own generator, but the logits
themselves change in the last bits with the batch: BLAS picks a different kernel for a matrix
of 3 rows than for one of 30 (on the dev machine, MKL's sgemm gives other bits for M < 12 unless
M is 4 or 8), and SDPA's CPU kernels take other paths for one query than for many and for
other key lengths. A last-bit change flips a sampled token now and then, and every token after
it. The same drift breaks "preempt and recompute gives the same tokens" and prefix reuse (the
reused keys were computed in another batch shape).

The cure, from outside the model (``model.py`` stays plain): while ``batch_invariant()`` is
active, a ``TorchFunctionMode`` routes the two reductions whose order depends on the batch
shape through fixed-shape kernels:

- ``F.linear``: the rows (every token of every sequence) are zero-padded to a multiple of
  ``ROW_TILE`` (4) and multiplied by one GEMM. MKL computes a row of an M-row GEMM the same
  way for every M >= 4 (only 1-3 rows take other kernels), so each output row gets the same
  bits wherever it sits and however many rows there are.
- ``F.scaled_dot_product_attention``: the query rows of a kv head are padded to a multiple of
  ``QUERY_TILE`` (4); each score is one dot product over head_dim (one GEMM per head);
  the softmax denominator and probs·values are reduced over fixed tiles of ``KEY_TILE`` keys
  and the tiles are summed in order. Padding keys (masked) contribute exact zeros, so a
  query's result depends neither on how far the batch pads the keys, nor on how many queries
  share its call (decode or a prefill chunk), nor on the batch size.

Everything else the model does is per row already (embedding lookups, norms reducing over one
row, elementwise ops on sizes that are multiples of the SIMD width). The tests check the
whole claim end to end: a sequence's logits are bitwise equal alone, in mixed batches,
chunked, from the prefix cache and recomputed after preemption.

What is guaranteed, and where: bitwise invariance within one process, one device, one thread
count, verified on CPU (MKL). Two assumptions are the BLAS's, not ours: that a batched GEMM
computes each problem the same way whatever the batch count, and that a GEMM's column does not
depend on how many columns there are (the score GEMM's width is the padded key count). Both
hold for MKL here; on CUDA, cuBLAS may pick kernels by batch size, so treat GPU invariance as
unverified until tests/test_engine*.py pass there. Different hardware, BLAS builds or thread
counts give different (each still batch-invariant) bits.

The cost is padding (a decode step of 3 sequences computes 4 rows; a multi-head decode query
4 query rows) and fixed-length key tiles. The first version cut the rows into tiles of
16 (and queries of 8, each tile with its own copy of the keys): the same bits, but decode
attention of a 5M model took 4x and prefill attention 7x longer (docs/benchmarks.md, "Stream
path"). The engine turns the kernels on by default (``EngineConfig.batch_invariant``); turn
them off for throughput when the same-seed-same-tokens promise is not needed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

ROW_TILE = 4
"""GEMM rows are padded to a multiple of this. Why 4 and not a tile loop: MKL computes a row of
a GEMM with M >= 4 rows the same way whatever M is (bmm of M rows equals M/8 problems of 8 rows,
bit for bit; tests/test_engine_invariant.py checks it on the machine that runs the tests); only
M in 1..3 takes another path (gemv-like kernels). So a decode step of 3 sequences computes 4
rows, not 16, and one GEMM of M rows replaces M/16 small ones, with the same bits as before."""
QUERY_TILE = 4
"""Query rows per (kv head, sequence) are padded to a multiple of this, for the same reason: a
decode step has only g = n_head/n_kv_head rows per kv head (1 for multi-head attention)."""
KEY_TILE = 64
"""Keys per attention tile; a multiple of the SIMD width so no scalar tail path is ever taken."""


def _pad_rows(x: Tensor, multiple: int) -> tuple[Tensor, int]:
    """Zero-pad dim 0 of x (M, ...) up to a multiple; returns the padded tensor and M."""
    M = x.shape[0]
    pad = -M % multiple
    if pad:
        x = torch.cat((x, x.new_zeros(pad, *x.shape[1:])))
    return x, M


def invariant_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear`` whose every output row is computed the same way whatever the other rows:
    one GEMM over the rows padded to a multiple of ROW_TILE (see ROW_TILE for why that is
    enough)."""
    *lead, K = x.shape
    N = weight.shape[0]
    rows, M = _pad_rows(x.reshape(-1, K), ROW_TILE)
    y = torch.bmm(rows[None], weight.t()[None])[0, :M]  # (M, N)
    if bias is not None:
        y = y + bias
    return y.view(*lead, N)


def _attention_mask(
    attn_mask: Tensor | None, is_causal: bool, B: int, T: int, S: int, device: torch.device
) -> Tensor:
    """A boolean (B, 1|nh, T, S) mask from SDPA's arguments (True = may attend)."""
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool:
            raise TypeError("batch_invariant attention supports boolean masks only")
        return (
            attn_mask.expand(B, -1, T, S) if attn_mask.dim() == 4 else attn_mask.expand(B, 1, T, S)
        )
    mask = torch.ones(T, S, dtype=torch.bool, device=device)
    if is_causal:
        mask = mask.tril(diagonal=S - T)
    return mask.expand(B, 1, T, S)


def invariant_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """``F.scaled_dot_product_attention`` (inference only) with per-query fixed-shape arithmetic.

    q (B, nh, T, hs), k/v (B, nkv, S, hs); returns (B, nh, T, hs). The g = nh/nkv query heads
    that share a kv head are stacked into one block of R = g·T query rows, padded to a multiple
    of QUERY_TILE. Scores: one GEMM per (kv head, sequence), each a dot product over head_dim.
    The softmax denominator and probs·values are reduced over fixed tiles of KEY_TILE keys
    (one GEMM per key tile, its reduction dimension always KEY_TILE long) and the tiles are
    summed in order, so a query's result depends neither on how far the batch pads the keys,
    nor on how many queries share its call (decode or a prefill chunk), nor on the batch size.
    Every query must see at least one key (the engine guarantees it); one that sees none gets
    zeros. The softmax runs on the R real rows only; the padding rows stay exact zeros.
    """
    if dropout_p:
        raise ValueError("batch_invariant attention is for inference: dropout_p must be 0")
    out_dtype = q.dtype
    if q.dtype in (torch.bfloat16, torch.float16):  # softmax in fp32, as SDPA's kernels do
        q, k, v = q.float(), k.float(), v.float()
    B, nh, T, hs = q.shape
    nkv, S = k.shape[1], k.shape[-2]
    g, H = nh // nkv, nkv * B  # heads ordered (kv head, sequence): the paged cache's layout
    R = g * T  # query rows per (kv head, sequence)
    nS = math.ceil(S / KEY_TILE)
    Rp, Sp = math.ceil(R / QUERY_TILE) * QUERY_TILE, nS * KEY_TILE
    mask = _attention_mask(attn_mask, is_causal, B, T, S, q.device)  # (B, 1|nh, T, S)
    if mask.shape[1] == 1:  # one mask for every head: broadcast it over (kv head, group)
        mask = mask[None, :, None, 0].expand(nkv, B, g, T, S).reshape(H, R, S)
    else:
        mask = mask.reshape(B, nkv, R, S).transpose(0, 1).reshape(H, R, S)
    if Sp != S:
        mask = F.pad(mask, (0, Sp - S), value=False)
    scale = scale if scale is not None else 1.0 / math.sqrt(hs)
    qt = q.new_zeros(nkv, B, Rp, hs)  # padding rows: zeros
    qt[:, :, :R].view(nkv, B, g, T, hs).copy_((q * scale).view(B, nkv, g, T, hs).transpose(0, 1))
    kp = _pad_dim(k.transpose(0, 1).reshape(H, S, hs), 1, Sp)  # (H, Sp, hs)
    vp = _pad_dim(v.transpose(0, 1).reshape(H, S, hs), 1, Sp)
    # Scores: one (Rp, hs) x (hs, Sp) GEMM per head; each score is one dot product.
    scores = torch.bmm(qt.view(H, Rp, hs), kp.transpose(1, 2))  # (H, Rp, Sp)
    real = scores[:, :R]  # the softmax touches the real rows only
    real.masked_fill_(~mask, -math.inf)
    top = real.amax(dim=-1, keepdim=True)  # exact whatever the order
    top = torch.where(top > -math.inf, top, 0.0)  # a query that sees nothing: no 0/0 below
    torch.exp_(real.sub_(top))  # masked: 0
    probs = scores.view(H, Rp, nS, KEY_TILE)
    tile_sums = probs.sum(dim=-1)  # (H, Rp, nS): fixed-length reductions
    # probs·values: one (Rp, KEY_TILE) x (KEY_TILE, hs) GEMM per (head, key tile).
    p_tiles = probs.transpose(1, 2).reshape(H * nS, Rp, KEY_TILE)
    parts = torch.bmm(p_tiles, vp.view(H * nS, KEY_TILE, hs)).view(H, nS, Rp, hs)
    out, denom = parts[:, 0], tile_sums[..., 0]
    for j in range(1, nS):  # key tiles in order; padding tiles add exact zeros
        out, denom = out + parts[:, j], denom + tile_sums[..., j]
    out = out / denom.clamp_min(torch.finfo(out.dtype).tiny)[..., None]  # (H, Rp, hs)
    out = out[:, :R].reshape(nkv, B, g, T, hs).transpose(0, 1)
    return out.reshape(B, nh, T, hs).to(out_dtype)


def _pad_dim(x: Tensor, dim: int, size: int) -> Tensor:
    """x zero-padded along dim to size (no copy when it is already that long)."""
    missing = size - x.shape[dim]
    if not missing:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat((x, x.new_zeros(shape)), dim)


class BatchInvariantMode(TorchFunctionMode):
    """Routes ``F.linear`` and ``F.scaled_dot_product_attention`` to the fixed-shape kernels."""

    _routes: ClassVar[dict[Callable[..., Any], Callable[..., Tensor]]] = {
        F.linear: invariant_linear,
        F.scaled_dot_product_attention: invariant_attention,
    }

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        route = self._routes.get(func)
        return (route or func)(*args, **(kwargs or {}))


@contextmanager
def batch_invariant(enabled: bool = True) -> Iterator[None]:
    """Run the enclosed forward passes with batch-invariant linear and attention kernels."""
    if not enabled:
        yield
        return
    with BatchInvariantMode():
        yield


__all__ = [
    "KEY_TILE",
    "QUERY_TILE",
    "ROW_TILE",
    "BatchInvariantMode",
    "batch_invariant",
    "invariant_attention",
    "invariant_linear",
]
