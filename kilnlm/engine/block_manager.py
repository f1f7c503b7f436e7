"""Bookkeeping of the paged KV pool: which physical block holds which tokens of which sequence.

No tensors here, only integers, so the invariants are cheap to test exhaustively.

- The pool has ``num_blocks`` blocks of ``block_size`` token slots. A sequence owns a *block
  table*: the physical blocks holding its tokens 0..bs-1, bs..2bs-1, ... in order.
- Every block has a reference count (how many block tables hold it). A block at 0 is on the
  free list.
- Prefix reuse: once a block is full and its keys/values are computed, it is registered under
  a hash of (the previous block's hash, its token ids). The chain starts from a salt (the weight
  version: keys computed by other weights must never be reused). A new sequence whose leading
  blocks hash the same takes those blocks instead of recomputing them (reference count + 1).
- A block whose count drops to 0 keeps its keys and its hash while it waits on the free list:
  uncached blocks are handed out first, then cached ones in least-recently-freed order, and a
  cached block that is handed out loses its hash. So a prompt seen a minute ago is often still
  there.
- Only full blocks are ever shared through the hash, and full blocks are never written again,
  so sharing by prefix needs no copy. Beam search forks sequences mid-block: then a shared,
  partially filled last block is copied before it is written (copy-on-write).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field


def root_hash(salt: int) -> bytes:
    """Start of a sequence's hash chain; the salt is the weight version."""
    return hashlib.blake2b(f"kilnlm-kv-v{salt}".encode(), digest_size=16).digest()


def hash_block(parent: bytes, tokens: Seq[int]) -> bytes:
    """Hash of a full block: its parent's hash and its token ids (128-bit: collisions are moot)."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(array("q", tokens).tobytes())
    return h.digest()


@dataclass(eq=False)
class Sequence:
    """The token ids of one sequence and where their keys/values live."""

    seq_id: int
    tokens: list[int]
    """Prompt + generated so far; the last one may not be computed yet."""
    salt: int
    """Weight version whose keys this sequence computes (salts the prefix hashes)."""
    num_computed: int = 0
    """Tokens whose keys/values are in the cache (always a prefix of ``tokens``)."""
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)
    """Hash of each full block of ``tokens`` so far (computed lazily)."""
    num_registered: int = 0
    """Leading blocks already offered to the prefix cache."""

    @property
    def num_uncomputed(self) -> int:
        return len(self.tokens) - self.num_computed

    def full_block_hashes(self, n_blocks: int, block_size: int) -> list[bytes]:
        """Hashes of the first n_blocks full blocks, extending the chain as needed."""
        while len(self.block_hashes) < n_blocks:
            i = len(self.block_hashes)
            parent = self.block_hashes[-1] if i else root_hash(self.salt)
            self.block_hashes.append(
                hash_block(parent, self.tokens[i * block_size : (i + 1) * block_size])
            )
        return self.block_hashes[:n_blocks]


class NoFreeBlocks(RuntimeError):
    """The scheduler asked for more blocks than are free (it should have checked)."""


class BlockManager:
    """Reference-counted blocks, a free list that doubles as an LRU prefix cache, and CoW."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}"
            )
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # hash -> block holding it
        # Front: handed out first (uncached blocks, then the least recently freed cached ones).
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.prefix_hit_tokens = 0
        self.prefix_query_tokens = 0
        self.num_cow_copies = 0

    # ---- block level ------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def allocate(self) -> int:
        """A fresh block (count 1); evicts the LRU cached block if no uncached one is free."""
        if not self.free:
            raise NoFreeBlocks("no free KV block; the scheduler must preempt first")
        block, _ = self.free.popitem(last=False)
        h = self.block_hash[block]
        if h is not None:  # its old contents are about to be overwritten
            del self.cached[h]
            self.block_hash[block] = None
        self.ref_count[block] = 1
        return block

    def share(self, block: int) -> None:
        """One more owner; takes the block off the free list if it was there (a prefix hit)."""
        if self.ref_count[block] == 0:
            del self.free[block]
        self.ref_count[block] += 1

    def release(self, block: int) -> None:
        """One owner fewer; at zero the block goes on the free list, keeping its cached contents."""
        if self.ref_count[block] <= 0:
            raise AssertionError(f"block {block} released more often than taken")
        self.ref_count[block] -= 1
        if self.ref_count[block] == 0:
            self.free[block] = None
            if self.block_hash[block] is None:  # nothing worth keeping: hand it out first
                self.free.move_to_end(block, last=False)

    def register(self, block: int, h: bytes) -> None:
        """Offer a full, computed block to the prefix cache (first block with a hash wins)."""
        if self.enable_prefix_caching and h not in self.cached and self.block_hash[block] is None:
            self.cached[h] = block
            self.block_hash[block] = h

    def lookup(self, hashes: Seq[bytes]) -> list[int]:
        """Blocks holding the longest cached prefix of this hash chain."""
        blocks: list[int] = []
        for h in hashes:
            block = self.cached.get(h)
            if block is None:
                break
            blocks.append(block)
        return blocks

    # ---- sequence level ---------------------------------------------------------------------

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks that can stand for the leading full blocks of a not-yet-started sequence.

        At least one token is always left to compute: its logits are what the step needs.
        """
        if not self.enable_prefix_caching or seq.block_table:
            return []
        n_max = (len(seq.tokens) - 1) // self.block_size
        return self.lookup(seq.full_block_hashes(n_max, self.block_size))

    def blocks_needed(self, seq: Sequence, n_new: int, prefix: Seq[int] = ()) -> int:
        """Free blocks that computing the next n_new tokens of seq takes (after taking prefix)."""
        computed = max(seq.num_computed, len(prefix) * self.block_size)
        have = max(len(seq.block_table), len(prefix))
        need = -(-(computed + n_new) // self.block_size) - have
        need += sum(1 for b in prefix if self.ref_count[b] == 0)  # hits taken off the free list
        if n_new and self._shared_partial(seq):
            need += 1  # copy-on-write
        return max(need, 0)

    def take_prefix(self, seq: Sequence, blocks: Seq[int]) -> None:
        """Start seq on cached blocks: their tokens count as computed."""
        for block in blocks:
            self.share(block)
        seq.block_table = list(blocks)
        seq.num_computed = len(blocks) * self.block_size
        seq.num_registered = len(blocks)  # already in the cache: nothing to offer
        self.prefix_hit_tokens += seq.num_computed
        self.prefix_query_tokens += len(seq.tokens)

    def append_slots(self, seq: Sequence, n_new: int) -> list[tuple[int, int]]:
        """Give seq room for its next n_new tokens; returns (src, dst) blocks to copy (CoW)."""
        copies: list[tuple[int, int]] = []
        if n_new and self._shared_partial(seq):
            i = seq.num_computed // self.block_size
            src = seq.block_table[i]
            dst = self.allocate()
            self.release(src)
            seq.block_table[i] = dst
            copies.append((src, dst))
            self.num_cow_copies += 1
        while len(seq.block_table) * self.block_size < seq.num_computed + n_new:
            seq.block_table.append(self.allocate())
        return copies

    def mark_computed(self, seq: Sequence, n_new: int) -> None:
        """After the forward pass: n_new more tokens are computed; newly full blocks are cached."""
        seq.num_computed += n_new
        n_full = seq.num_computed // self.block_size
        if not self.enable_prefix_caching or n_full <= seq.num_registered:
            return
        hashes = seq.full_block_hashes(n_full, self.block_size)
        for i in range(seq.num_registered, n_full):
            self.register(seq.block_table[i], hashes[i])
        seq.num_registered = n_full

    def fork(self, seq: Sequence, seq_id: int) -> Sequence:
        """A copy of seq sharing all its blocks (beam search); a later write copies the shared tail."""
        for block in seq.block_table:
            self.share(block)
        return Sequence(
            seq_id=seq_id,
            tokens=list(seq.tokens),
            salt=seq.salt,
            num_computed=seq.num_computed,
            block_table=list(seq.block_table),
            block_hashes=list(seq.block_hashes),
            num_registered=seq.num_registered,
        )

    def free_seq(self, seq: Sequence) -> None:
        """Release every block of seq (tail first, so the prefix stays cached longest)."""
        for block in reversed(seq.block_table):
            self.release(block)
        seq.block_table = []
        seq.num_computed = seq.num_registered = 0

    def _shared_partial(self, seq: Sequence) -> bool:
        """Is the block that seq writes next already there and owned by someone else too?"""
        i = seq.num_computed // self.block_size
        return i < len(seq.block_table) and self.ref_count[seq.block_table[i]] > 1

    # ---- accounting -------------------------------------------------------------------------

    def check(self, seqs: Seq[Sequence]) -> None:
        """Assert the invariants given every live sequence (tests call this after each step)."""
        owners = [0] * self.num_blocks
        for seq in seqs:
            assert len(seq.block_table) * self.block_size >= seq.num_computed
            for block in seq.block_table:
                owners[block] += 1
        assert owners == self.ref_count, "reference counts disagree with the block tables"
        assert all((c == 0) == (b in self.free) for b, c in enumerate(self.ref_count))
        for h, block in self.cached.items():
            assert self.block_hash[block] == h


__all__ = ["BlockManager", "NoFreeBlocks", "Sequence", "hash_block", "root_hash"]
