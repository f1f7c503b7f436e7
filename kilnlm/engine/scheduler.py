"""Continuous batching: which sequences compute how many tokens this step.

Every step has a token budget (``max_num_batched_tokens``) and a cap on live sequences
(``max_num_seqs``). A sequence is just tokens and how many of them are computed, so prefill,
decode, a prefill cut into chunks, and a re-prefill after preemption are one case: compute
the next n uncomputed tokens; when none are left, the step samples the next token.

1. Running requests, oldest first. A request in decode takes one token per live sequence
   (one per beam). A request still in prefill takes the rest of the budget, less what the
   decodes behind it need, so a long prompt never stalls running decodes (chunked prefill).
   If the KV pool cannot hold the new tokens, the newest running request is preempted: its
   blocks are freed and it goes back to the front of the waiting queue, to be recomputed
   later from prompt + generated tokens (its full blocks are often still in the prefix cache).
2. Waiting requests, in arrival order, while budget, sequence slots and free blocks last (and
   none was preempted this step). A request's leading full blocks are taken from the prefix
   cache when their hashes are there. During a drain-mode weight swap, requests that have not
   started wait; preempted ones of the old version still run.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

from kilnlm.decoding import BeamSearch
from kilnlm.engine.block_manager import BlockManager, Sequence
from kilnlm.engine.request import Request


@dataclass
class Chunk:
    """Compute tokens[start : start + n] of seq (a request's sequence) in this step."""

    request: Request
    seq: Sequence
    start: int
    n: int

    @property
    def samples(self) -> bool:
        """Does this chunk reach the end of the known tokens (so its last logits pick a token)?"""
        return self.start + self.n == len(self.seq.tokens)


@dataclass
class SchedulerOutput:
    chunks: list[Chunk] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)
    """(src, dst) blocks to copy before the forward pass (copy-on-write)."""
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.n for c in self.chunks)


class Scheduler:
    def __init__(
        self,
        blocks: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        eos_id: int | None,
    ):
        self.blocks = blocks
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.eos_id = eos_id
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._seq_ids = itertools.count()
        self.num_preemptions = 0

    # ---- queue -----------------------------------------------------------------------------

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def remove(self, request: Request) -> None:
        """Take a request out (finished, aborted, expired) and free its blocks."""
        for seq in request.seqs:
            self.blocks.free_seq(seq)
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)

    def live_sequences(self) -> list[Sequence]:
        return [s for r in self.running for s in r.seqs]

    def new_seq_id(self) -> int:
        return next(self._seq_ids)

    # ---- one step --------------------------------------------------------------------------

    def schedule(self, serving_version: int, admit_new: bool = True) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self._schedule_running(out, self.max_num_batched_tokens)
        if not out.preempted:
            self._admit(out, budget, serving_version, admit_new)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        decodes_behind = self._decode_tokens_behind()
        i = 0
        while i < len(self.running):
            request = self.running[i]
            plan = self._plan(request, budget, decodes_behind[i])
            if plan is None:
                i += 1
                continue
            if not self._make_room(request, plan, out):
                break  # the request itself was preempted: everything behind it is gone too
            for seq, n in plan:
                out.copies += self.blocks.append_slots(seq, n)
                out.chunks.append(Chunk(request, seq, seq.num_computed, n))
                budget -= n
            i += 1
        return budget

    def _decode_tokens_behind(self) -> list[int]:
        """For each running request, the decode tokens the requests after it need."""
        behind, total = [], 0
        for request in reversed(self.running):
            behind.append(total)
            total += sum(1 for s in request.seqs if s.num_uncomputed == 1)
        return behind[::-1]

    def _plan(
        self, request: Request, budget: int, reserve: int
    ) -> list[tuple[Sequence, int]] | None:
        """The (sequence, n tokens) a running request computes this step, or None if it waits."""
        pending = [s for s in request.seqs if s.num_uncomputed > 0]
        if not pending:
            return None
        if len(pending) > 1 or pending[0].num_uncomputed == 1:  # decode: all sequences or none
            need = sum(s.num_uncomputed for s in pending)
            return [(s, s.num_uncomputed) for s in pending] if need <= budget else None
        n = min(pending[0].num_uncomputed, budget - reserve)
        return [(pending[0], n)] if n > 0 else None

    def _make_room(
        self, request: Request, plan: list[tuple[Sequence, int]], out: SchedulerOutput
    ) -> bool:
        """Preempt the newest running requests until the plan fits; False if request itself went."""
        while sum(self.blocks.blocks_needed(s, n) for s, n in plan) > self.blocks.num_free:
            victim = self.running[-1]
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        """Free a running request's blocks and queue it first; it will be recomputed."""
        self.running.remove(request)
        for seq in request.seqs:
            self.blocks.free_seq(seq)
        if request.is_beam:  # beam search restarts (deterministically) from the prompt
            request.seqs = []
            request.beam = BeamSearch(request.prompt, request.params, self.eos_id)
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _admit(
        self, out: SchedulerOutput, budget: int, serving_version: int, admit_new: bool
    ) -> None:
        slots = sum(r.seq_slots for r in self.running)
        i = 0
        while i < len(self.waiting) and budget > 0:
            request = self.waiting[i]
            if request.version is None and not admit_new:
                i += 1  # drain: not-yet-started requests wait for the new weights
                continue
            if slots + request.seq_slots > self.max_num_seqs:
                break
            chunk = self._try_start(request, budget, serving_version)
            if chunk is None:
                break  # not enough free blocks: keep arrival order, try again next step
            del self.waiting[i]
            self.running.append(request)
            out.copies += self.blocks.append_slots(chunk.seq, chunk.n)
            out.chunks.append(chunk)
            budget -= chunk.n
            slots += request.seq_slots

    def _try_start(self, request: Request, budget: int, serving_version: int) -> Chunk | None:
        """Start (or restart) a waiting request on the prefix cache, if its first chunk fits."""
        version = request.version if request.version is not None else serving_version
        if request.seqs:  # preempted: recompute prompt + generated tokens
            seq = request.seqs[0]
        else:
            # prompt + output: the output is empty unless the request resumes another
            # replica's stream (failover), whose tokens are prefilled like the prompt's.
            seq = Sequence(self.new_seq_id(), [*request.prompt, *request.output], salt=version)
        prefix = self.blocks.match_prefix(seq)
        n = min(len(seq.tokens) - len(prefix) * self.blocks.block_size, budget)
        if self.blocks.blocks_needed(seq, n, prefix) > self.blocks.num_free:
            return None
        request.version = version
        request.seqs = [seq]
        self.blocks.take_prefix(seq, prefix)
        return Chunk(request, seq, seq.num_computed, n)


__all__ = ["Chunk", "Scheduler", "SchedulerOutput"]
