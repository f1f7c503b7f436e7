"""The engine's KV bookkeeping and paged attention: block manager invariants, paged = contiguous,
and the batch-invariant kernels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from kilnlm.engine.block_manager import BlockManager, NoFreeBlocks, Sequence
from kilnlm.engine.invariant import batch_invariant, invariant_attention, invariant_linear
from kilnlm.engine.paged_cache import PagedCache
from kilnlm.model import KVCache, ModelConfig, Transformer

BS = 4


def computed_seq(bm: BlockManager, seq_id: int, tokens: list[int], salt: int = 1) -> Sequence:
    """A sequence started on the prefix cache with all its tokens computed."""
    seq = Sequence(seq_id, list(tokens), salt)
    bm.take_prefix(seq, bm.match_prefix(seq))
    n = seq.num_uncomputed
    assert bm.append_slots(seq, n) == []
    bm.mark_computed(seq, n)
    return seq


def test_worked_example_alloc_share_free_reuse():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = computed_seq(bm, 0, list(range(10)))  # blocks: 4 + 4 + 2 tokens
    assert len(a.block_table) == 3 and bm.num_free == 5
    assert len(bm.cached) == 2  # the two full blocks; the partial one is never shared

    b = computed_seq(bm, 1, [*range(8), 99, 98, 97])  # same first two blocks, then its own
    assert b.block_table[:2] == a.block_table[:2]
    assert bm.prefix_hit_tokens == 8
    assert [bm.ref_count[x] for x in a.block_table] == [2, 2, 1]
    assert bm.num_free == 4  # b needed one new block only

    shared = a.block_table[:2]
    bm.free_seq(a)
    bm.free_seq(b)
    bm.check([])
    assert bm.num_free == 8 and len(bm.cached) == 2  # free but still cached

    c = computed_seq(bm, 2, list(range(9)))  # a third request finds the prefix on the free list
    assert c.block_table[:2] == shared and bm.prefix_hit_tokens == 16
    bm.free_seq(c)
    bm.check([])


def test_prefix_leaves_a_token_to_compute_and_is_salted_by_version():
    bm = BlockManager(num_blocks=8, block_size=BS)
    bm.free_seq(computed_seq(bm, 0, list(range(8))))
    # exactly two full blocks: only one may come from the cache (the last token needs logits)
    assert len(bm.match_prefix(Sequence(1, list(range(8)), salt=1))) == 1
    assert bm.match_prefix(Sequence(2, list(range(8)), salt=2)) == []  # other weights


def test_lru_evicts_uncached_blocks_first_then_oldest_cached():
    bm = BlockManager(num_blocks=4, block_size=BS)
    old = computed_seq(bm, 0, [1] * 4 + [7])  # caches block [1,1,1,1]
    new = computed_seq(bm, 1, [2] * 4 + [7])  # caches block [2,2,2,2]
    bm.free_seq(old)
    bm.free_seq(new)
    bm.allocate()
    bm.allocate()  # the two uncached tail blocks go first: both prefixes survive
    assert len(bm.cached) == 2
    bm.allocate()  # then the least recently freed cached block: old's
    assert bm.match_prefix(Sequence(2, [1] * 4 + [7], 1)) == []
    assert len(bm.match_prefix(Sequence(3, [2] * 4 + [7], 1))) == 1
    bm.allocate()
    with pytest.raises(NoFreeBlocks):
        bm.allocate()


def test_fork_shares_blocks_and_copies_on_write():
    bm = BlockManager(num_blocks=8, block_size=BS)
    parent = computed_seq(bm, 0, list(range(6)))  # one full block + 2 tokens in the second
    child = bm.fork(parent, 1)
    assert child.block_table == parent.block_table
    assert all(bm.ref_count[b] == 2 for b in parent.block_table)
    child.tokens.append(50)
    assert bm.blocks_needed(child, 1) == 1  # the copy
    (src, dst), *rest = bm.append_slots(child, 1)
    assert not rest and src == parent.block_table[1] and child.block_table[1] == dst
    assert bm.ref_count[src] == 1 and bm.ref_count[dst] == 1
    assert child.block_table[0] == parent.block_table[0]  # full block still shared
    bm.mark_computed(child, 1)
    parent.tokens.append(60)
    assert bm.append_slots(parent, 1) == []  # the old block is parent's alone now: no copy
    bm.check([parent, child])
    bm.free_seq(parent)
    bm.free_seq(child)
    assert bm.num_free == 8


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_random_operation_sequences_keep_invariants_and_leak_nothing(data):
    """Random starts (from a 3-letter alphabet, so prefixes collide), chunked appends, forks
    and frees; reference counts always match the block tables, and freeing all frees all."""
    bm = BlockManager(num_blocks=24, block_size=BS)
    live: list[Sequence] = []
    for step in range(data.draw(st.integers(5, 40))):
        op = data.draw(st.sampled_from(["start", "grow", "fork", "free"]))
        if op == "start":
            tokens = data.draw(st.lists(st.integers(0, 2), min_size=1, max_size=14))
            seq = Sequence(step, tokens, salt=data.draw(st.integers(1, 2)))
            prefix = bm.match_prefix(seq)
            n = data.draw(st.integers(1, len(tokens) - len(prefix) * BS))
            if bm.blocks_needed(seq, n, prefix) <= bm.num_free:
                bm.take_prefix(seq, prefix)
                bm.append_slots(seq, n)
                bm.mark_computed(seq, n)
                live.append(seq)
        elif op == "grow" and live:
            seq = data.draw(st.sampled_from(live))
            seq.tokens += data.draw(st.lists(st.integers(0, 2), max_size=6))
            n = data.draw(st.integers(0, seq.num_uncomputed))
            if bm.blocks_needed(seq, n) <= bm.num_free:
                bm.append_slots(seq, n)
                bm.mark_computed(seq, n)
        elif op == "fork" and live:
            live.append(bm.fork(data.draw(st.sampled_from(live)), 1000 + step))
        elif op == "free" and live:
            seq = live.pop(data.draw(st.integers(0, len(live) - 1)))
            bm.free_seq(seq)
        bm.check(live)
        assert bm.num_free + len({b for s in live for b in s.block_table}) == bm.num_blocks
    for seq in live:
        bm.free_seq(seq)
    bm.check([])
    assert bm.num_free == bm.num_blocks and all(c == 0 for c in bm.ref_count)


# --------------------------------------------------------------------------------------------
# Paged attention


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_preset("test-1m")).eval()


def run_paged(
    model: Transformer, prompts: list[list[int]], chunks: list[int], steps: int
) -> Tensor:
    """Prefill every prompt in the given chunk sizes, then decode greedily; logits (B, steps+1, V)."""
    cfg = model.config
    torch.manual_seed(1)
    cache = PagedCache(cfg, num_blocks=64, block_size=BS)
    free = torch.randperm(64).tolist()  # scattered, non-contiguous blocks
    tables = [[free.pop() for _ in range(16)] for _ in prompts]
    seqs = [list(p) for p in prompts]
    done = [0] * len(prompts)
    last: list[Tensor] = [torch.empty(0)] * len(prompts)
    for size in chunks:  # chunked prefill: every unfinished row advances by up to `size` tokens
        todo = [i for i in range(len(seqs)) if done[i] < len(seqs[i])]
        rows = [(seqs[i][done[i] : done[i] + size], done[i], tables[i]) for i in todo]
        logits = model(*cache.bind(rows), cache, last_only=True)  # (len(todo), 1, V)
        for j, i in enumerate(todo):
            done[i] += len(rows[j][0])
            last[i] = logits[j, -1]
    assert done == [len(p) for p in prompts]
    out = [torch.stack(last)]
    for _ in range(steps):
        nxt = out[-1].argmax(-1).tolist()
        for s, t in zip(seqs, nxt, strict=True):
            s.append(t)
        rows = [([s[-1]], len(s) - 1, t) for s, t in zip(seqs, tables, strict=True)]
        out.append(model(*cache.bind(rows), cache, last_only=True)[:, -1])
    return torch.stack(out, 1)


def run_contiguous(model: Transformer, prompt: list[int], steps: int) -> Tensor:
    cache = KVCache(model.config, 1, len(prompt) + steps + 1)
    seq = list(prompt)
    pos = torch.arange(len(seq))[None]
    out = [model(torch.tensor([seq]), pos, cache, last_only=True)[:, -1]]
    for _ in range(steps):
        seq.append(int(out[-1].argmax(-1)))
        pos = torch.tensor([[len(seq) - 1]])
        out.append(model(torch.tensor([[seq[-1]]]), pos, cache)[:, -1])
    return torch.stack(out, 1)


PROMPTS = [[5, 17, 300, 41, 9, 1000, 3], list(range(100, 123)), [42]]


@torch.inference_mode()
def test_paged_logits_equal_contiguous_cache_logits(model):
    paged = run_paged(model, PROMPTS, chunks=[5, 5, 100], steps=6)  # chunked, ragged batch
    for i, prompt in enumerate(PROMPTS):
        ref = run_contiguous(model, prompt, steps=6)
        torch.testing.assert_close(paged[i : i + 1], ref, rtol=0, atol=1e-5)


@torch.inference_mode()
def test_paged_logits_bitwise_equal_under_batch_invariant_kernels(model):
    with batch_invariant():
        paged = run_paged(model, PROMPTS, chunks=[3, 100], steps=4)
        alone = [run_paged(model, [p], chunks=[len(p)], steps=4) for p in PROMPTS]
        contiguous = [run_contiguous(model, p, steps=4) for p in PROMPTS]
    for i in range(len(PROMPTS)):
        assert torch.equal(paged[i], alone[i][0])  # batch and chunking do not change a bit
        assert torch.equal(paged[i], contiguous[i][0])  # nor does the cache layout


def test_invariant_kernels_match_torch_and_ignore_the_batch():
    torch.manual_seed(0)
    x, w, b = torch.randn(37, 64), torch.randn(96, 64), torch.randn(96)
    torch.testing.assert_close(invariant_linear(x, w, b), F.linear(x, w, b))
    rows = [invariant_linear(x[i : i + 1], w, b) for i in range(0, 37, 6)]
    assert all(torch.equal(r[0], invariant_linear(x, w, b)[6 * k]) for k, r in enumerate(rows))

    q, k, v = torch.randn(3, 4, 20, 16), torch.randn(3, 2, 90, 16), torch.randn(3, 2, 90, 16)
    mask = torch.rand(3, 1, 20, 90) > 0.4
    mask[..., 0] = True
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    got = invariant_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # one query alone, with its keys padded further: the same bits
    padded_k = torch.cat((k[1:2], torch.randn(1, 2, 50, 16)), 2)
    padded_v = torch.cat((v[1:2], torch.randn(1, 2, 50, 16)), 2)
    one_mask = torch.cat((mask[1:2, :, 7:8], torch.zeros(1, 1, 1, 50, dtype=torch.bool)), -1)
    one = invariant_attention(
        q[1:2, :, 7:8], padded_k, padded_v, attn_mask=one_mask, enable_gqa=True
    )
    assert torch.equal(one[0, :, 0], got[1, :, 7])


@torch.inference_mode()
def test_invariant_kernels_every_batch_size_gives_the_same_bits():
    """The BLAS assumption the kernels rest on (invariant.py, ROW_TILE): a GEMM row computed
    among M >= 4 rows has the same bits whatever M is, so padding to a multiple of 4 is enough.
    Every batch size 1..40 (decode steps) and chunk size (prefill) is checked at model-like
    shapes; a machine whose BLAS breaks the assumption fails here, before any engine test."""
    torch.manual_seed(0)
    x, w = torch.randn(40, 256), torch.randn(704, 256)
    full = invariant_linear(x, w)
    for m in range(1, 41):
        assert torch.equal(invariant_linear(x[:m], w), full[:m]), f"{m} rows"
    # multi-head (g = 1, the padding-heavy decode case) and grouped (g = 3) attention
    for nh, nkv in ((4, 4), (6, 2)):
        q, k, v = (
            torch.randn(6, nh, 9, 48),
            torch.randn(6, nkv, 128, 48),
            torch.randn(6, nkv, 128, 48),
        )
        pos = torch.arange(119, 128)
        mask = (torch.arange(128)[None, :] <= pos[:, None]).expand(6, 1, 9, 128)
        chunk = invariant_attention(q, k, v, attn_mask=mask, enable_gqa=nh != nkv)
        for b in (1, 2, 5):
            for t in range(9):  # each query alone (a decode step), in batches of b sequences
                one = invariant_attention(
                    q[:b, :, t : t + 1],
                    k[:b],
                    v[:b],
                    attn_mask=mask[:b, :, t : t + 1],
                    enable_gqa=nh != nkv,
                )
                assert torch.equal(one[:, :, 0], chunk[:b, :, t]), (nh, nkv, b, t)
