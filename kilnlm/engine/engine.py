"""``LLMEngine``: continuous batching over a block-paged KV cache, in token ids.

The loop is ``add_request`` ... ``step()`` ... ``step()``: each step schedules (scheduler.py),
runs one forward pass per weight version and shape (decode rows apart from prefill chunks, so
a decode never pays for a chunk's padding), samples every row that reached the end of its
tokens with that request's own parameters and generator, and returns a ``RequestOutput`` per
request with news. The Serve replica and the gateway wrap this class; it knows nothing of
either, and nothing of text except through the optional ``decode`` that stop strings need.

Which weights serve is the engine's to say (serving.py): one ``Snapshot`` (version, model,
the caller's payload) that changes only at a flip, read by everything that names a version.
A request's pin_version / min_version are checked against the version it is admitted on.

Determinism: with ``batch_invariant`` (the default) a row's logits are bitwise the same
whatever else is in the batch, however its prompt was chunked, and whether its keys were
computed, reused from the prefix cache or recomputed after preemption (see invariant.py); each
request samples from its own generator. So a seeded request gives the same tokens whatever
the load, and greedy output equals ``kilnlm.generate`` run under the same numerics.
"""

from __future__ import annotations

import math
import secrets
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor

from kilnlm.decoding import (
    BeamSearch,
    Continuation,
    Decode,
    FinishReason,
    TokenLogprob,
    check_request,
    prompt_token_ids,
)
from kilnlm.engine.block_manager import BlockManager
from kilnlm.engine.config import DTYPES, EngineConfig, QueueFull, free_memory_bytes
from kilnlm.engine.hotswap import HotSwap
from kilnlm.engine.invariant import KEY_TILE, batch_invariant
from kilnlm.engine.paged_cache import PagedCache
from kilnlm.engine.request import Request, RequestOutput
from kilnlm.engine.scheduler import Chunk, Scheduler
from kilnlm.engine.serving import ServingState, Snapshot, VersionError, VersionRule
from kilnlm.engine.weights import StagedWeights, SwapReport
from kilnlm.errors import InvalidArgumentError
from kilnlm.model import Transformer, kv_cache_bytes_per_token
from kilnlm.sampling import (
    SamplingParams,
    apply_allowed_token_ids,
    process_logits,
    sample,
    token_logprobs,
)


class LLMEngine(HotSwap):
    """Continuous-batching generation over one model (two during a hot-swap)."""

    def __init__(
        self,
        model: Transformer,
        config: EngineConfig | None = None,
        eos_id: int | None = None,
        version: int = 1,
        decode: Decode | None = None,
        payload: Any = None,
    ):
        self.config = config = config or EngineConfig()
        device = torch.device(config.device) if config.device else model.device
        dtype = DTYPES[config.dtype] if config.dtype else next(model.parameters()).dtype
        model = model.to(device=device, dtype=dtype).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.model_config = cfg = model.config
        if not cfg.causal:
            raise ValueError(
                "model is bidirectional (config.causal=False); serving needs a causal LM"
            )
        if eos_id is not None and not 0 <= eos_id < cfg.vocab_size:
            raise ValueError(f"eos_id {eos_id} is outside the vocabulary [0, {cfg.vocab_size})")
        self.device, self.dtype, self.eos_id, self.decode = device, dtype, eos_id, decode
        self.models: dict[int, Transformer] = {version: model}
        self.serving = ServingState(Snapshot(version, model, payload))
        self.bytes_per_token = kv_cache_bytes_per_token(cfg, dtype)
        num_blocks = self._num_blocks(device)
        self.blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        key_multiple = KEY_TILE if config.batch_invariant else 1  # no key padding in attention
        self.cache = PagedCache(cfg, num_blocks, config.block_size, dtype, device, key_multiple)
        self.scheduler = Scheduler(
            self.blocks, config.max_num_seqs, config.max_num_batched_tokens, eos_id
        )
        self.requests: dict[str, Request] = {}
        self._outbox: list[RequestOutput] = []  # finished outside step() (abort)
        self._staged: StagedWeights | None = None
        self._commit: tuple[StagedWeights, float] | None = None  # and when commit was called
        self._retiring: dict[int, float] = {}  # old version -> when it stopped taking requests
        self.last_swap: SwapReport | None = None
        self.num_steps = self.num_generated = 0

    def _num_blocks(self, device: torch.device) -> int:
        c, cfg = self.config, self.model_config
        per_block = self.bytes_per_token * c.block_size
        if c.kv_budget_mib is not None:
            budget = int(c.kv_budget_mib * 2**20)
        else:
            budget = int(free_memory_bytes(device) * (c.kv_budget_fraction or 0.5))
            useful = 2 * c.max_num_seqs * math.ceil(cfg.block_size / c.block_size) * per_block
            budget = min(budget, useful)
        if budget < per_block:
            raise ValueError(
                f"kv budget of {budget} bytes holds no block of {per_block} bytes; raise kv_budget_mib"
            )
        return budget // per_block

    # ---- requests --------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_ids: Any,
        params: SamplingParams | None = None,
        deadline: float | None = None,
        versions: VersionRule | None = None,
        resume: Sequence[int] = (),
    ) -> None:
        """Queue a request. ``deadline`` is a ``time.monotonic()`` instant; ``versions`` is
        checked when the request is admitted (a violation ends it "rejected", with ``error``).
        ``resume``: tokens a replica that died had already streamed for this request; it goes
        on after them as if it had made them (see ``_resume``).

        Raises InvalidArgumentError naming the bad field (request_id, prompt, max_tokens,
        num_beams, stop), and QueueFull when max_queue requests are waiting.
        """
        params = params if params is not None else SamplingParams()
        prompt = self._validate(request_id, prompt_ids, params)
        if len(self.scheduler.waiting) >= self.config.max_queue:
            raise QueueFull(
                f"queue full: {len(self.scheduler.waiting)} requests are waiting; retry later"
            )
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        request = Request(
            request_id=request_id,
            prompt=prompt,
            params=params,
            seed=seed,
            generator=torch.Generator(device=self.device).manual_seed(seed),
            deadline=deadline,
            out=Continuation(params, self.eos_id, self.decode),
            versions=versions or VersionRule(),
        )
        if request.is_beam:
            request.beam = BeamSearch(prompt, params, self.eos_id)
        if resume:
            self._resume(request, self._validate_resume(resume, params))
        self.requests[request_id] = request
        self.scheduler.add(request)

    def _validate_resume(self, resume: Sequence[int], params: SamplingParams) -> list[int]:
        tokens = prompt_token_ids(resume, "resume_token_ids", self.model_config.vocab_size)
        if params.num_beams > 1:
            raise InvalidArgumentError(
                "resume_token_ids cannot continue beam search (it streams at the end); resend "
                "the request without them",
                "resume_token_ids",
            )
        if len(tokens) >= params.max_tokens:
            raise InvalidArgumentError(
                f"resume_token_ids holds {len(tokens)} tokens, max_tokens is "
                f"{params.max_tokens}: nothing is left to generate",
                "resume_token_ids",
            )
        return tokens

    def _resume(self, request: Request, tokens: list[int]) -> None:
        """Continue from ``tokens`` exactly as the first replica would have: they join the
        sequence that is prefilled (the scheduler starts from prompt + output), count toward
        max_tokens, are not streamed again, and a sampling request's generator skips the draws
        that made them (one ``exponential_`` over the vocabulary per token, as ``sample``
        draws), so greedy and seeded requests give the undisturbed run's tokens."""
        request.out.resume(tokens)
        request.num_emitted = len(tokens)
        if self.decode is not None:
            request.text_emitted = len(request.out.visible_text(len(tokens)))
        if not request.params.greedy:
            noise = torch.empty(self.model_config.vocab_size, device=self.device)
            for _ in tokens:
                noise.exponential_(generator=request.generator)

    def _validate(self, request_id: str, prompt_ids: Any, params: SamplingParams) -> list[int]:
        if not isinstance(request_id, str) or not request_id:
            raise InvalidArgumentError(
                f"request_id must be a non-empty string, got {request_id!r}", "request_id"
            )
        if request_id in self.requests:
            raise InvalidArgumentError(f"request_id {request_id!r} is already in use", "request_id")
        if not isinstance(params, SamplingParams):
            raise InvalidArgumentError(
                f"params must be a SamplingParams, got {type(params).__name__}", "params"
            )
        cfg, c = self.model_config, self.config
        prompt = prompt_token_ids(prompt_ids, "prompt", cfg.vocab_size)
        params.validate_for(c.max_tokens_limit)
        check_request("prompt", len(prompt), params, cfg.block_size, self.decode is not None)
        beam_cap = min(c.max_num_seqs, c.max_num_batched_tokens)
        if params.num_beams > beam_cap:
            raise InvalidArgumentError(
                f"num_beams ({params.num_beams}) exceeds what this server runs at once ({beam_cap})",
                "num_beams",
            )
        need = params.num_beams * math.ceil((len(prompt) + params.max_tokens) / c.block_size)
        if need > self.blocks.num_blocks:
            raise InvalidArgumentError(
                f"prompt and max_tokens need up to {need} KV blocks but the server's KV budget holds "
                f"{self.blocks.num_blocks}; shorten the prompt or ask for fewer tokens",
                "max_tokens",
            )
        return prompt

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its blocks; its final output comes with the next step.
        Returns False if there is no such live request."""
        request = self.requests.get(request_id)
        if request is None:
            return False
        self._finish(request, "abort")
        return True

    def has_unfinished(self) -> bool:
        """Is there work for step(): requests, outputs to hand out, or a commit to flip?"""
        return bool(self.requests) or bool(self._outbox) or self._commit is not None

    def _finish(
        self,
        request: Request,
        reason: FinishReason | None = None,
        error: VersionError | None = None,
    ) -> None:
        """End a request (reason given for abort / deadline / rejected) and queue its last output."""
        if reason is not None:
            request.end(reason, error)
        self.scheduler.remove(request)
        del self.requests[request.request_id]
        out = request.take_output(self.decode is not None, self.serving_version)
        if out is not None:
            self._outbox.append(out)

    # ---- the step --------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Run one scheduling step; returns one output per request with news."""
        now = time.monotonic()
        self._swap_boundary(now)
        for request in [r for r in self.requests.values() if r.deadline is not None]:
            if now >= request.deadline:  # type: ignore[operator]
                self._finish(request, "deadline")
        self._check_versions()
        sched = self.scheduler.schedule(self.serving_version, admit_new=not self._draining)
        self.cache.copy_blocks(sched.copies)
        touched = dict.fromkeys(c.request for c in sched.chunks)
        if sched.chunks:
            self._sample(self._forward(sched.chunks))
        for request in touched:
            if request.finished:
                self._finish(request)
            else:
                out = request.take_output(self.decode is not None, self.serving_version)
                if out is not None:
                    self._outbox.append(out)
        self._retire_versions()
        self.num_steps += 1
        outputs, self._outbox = self._outbox, []
        self.num_generated += sum(len(o.token_ids) for o in outputs)
        return outputs

    def _check_versions(self) -> None:
        """Reject the requests about to be admitted whose version rule the serving version
        breaks: the version checked is the one the scheduler assigns in this same step."""
        if self._draining:
            return  # not admitted before the flip: checked against the new version then
        version = self.serving_version
        for request in [r for r in self.scheduler.waiting if r.version is None]:
            try:
                request.versions.check(version)
            except VersionError as e:
                self._finish(request, "rejected", e)

    def _forward(self, chunks: list[Chunk]) -> dict[int, Tensor]:
        """One forward pass per (weight version, decode or prefill); marks the tokens computed.
        Returns the last logits (V,) of every chunk that samples, by sequence id."""
        groups: dict[tuple[int, bool], list[Chunk]] = defaultdict(list)
        for c in chunks:
            assert c.request.version is not None
            groups[(c.request.version, c.n == 1)].append(c)
        logits_by_seq: dict[int, Tensor] = {}
        for (version, _), group in groups.items():
            rows = [
                (c.seq.tokens[c.start : c.start + c.n], c.start, c.seq.block_table) for c in group
            ]
            tokens, positions = self.cache.bind(rows)
            with batch_invariant(self.config.batch_invariant):
                logits = self.models[version](tokens, positions, self.cache, last_only=True)
            for row, c in enumerate(group):
                self.blocks.mark_computed(c.seq, c.n)
                if c.samples:
                    logits_by_seq[c.seq.seq_id] = logits[row, -1]  # (V,)
        return logits_by_seq

    def _sample(self, logits_by_seq: dict[int, Tensor]) -> None:
        """Next token for every sampling row (its own params and generator); beam steps."""
        rows: list[Request] = []
        for request in [r for r in self.requests.values() if r.seqs]:
            sampled = [logits_by_seq.get(s.seq_id) for s in request.seqs]
            if any(x is None for x in sampled):
                continue
            if request.is_beam:
                self._beam_step(request, torch.stack(sampled))  # type: ignore[arg-type]
            else:
                rows.append(request)
        if rows:
            self._sample_rows(rows, torch.stack([logits_by_seq[r.seqs[0].seq_id] for r in rows]))

    def _sample_rows(self, rows: list[Request], logits: Tensor) -> None:
        """logits (B, V): one row per request, all sampled in one batch."""
        params = [r.params for r in rows]
        penalised = any(p.repetition_penalty != 1 for p in params)
        prev = [r.seqs[0].tokens for r in rows] if penalised else None
        tokens = sample(process_logits(logits, params, prev), params, [r.generator for r in rows])
        n_top = max((p.logprobs for p in params if p.logprobs is not None), default=None)
        lp = (
            token_logprobs(apply_allowed_token_ids(logits, params), tokens, n_top)
            if n_top is not None
            else None
        )
        for j, (request, token) in enumerate(zip(rows, tokens.tolist(), strict=True)):
            entry = None
            if lp is not None and request.params.logprobs is not None:
                n = request.params.logprobs
                top = list(
                    zip(lp.top_ids[j, :n].tolist(), lp.top_logprobs[j, :n].tolist(), strict=True)
                )
                entry = TokenLogprob(token, float(lp.chosen[j]), top)
            request.append(token, entry)

    def _beam_step(self, request: Request, logits: Tensor) -> None:
        """Advance a beam search one token: fork the chosen parents (sharing their blocks), free
        the dropped ones, append each new beam's token."""
        assert request.beam is not None
        parents = request.beam.step(logits)
        old, new, claimed = request.seqs, [], set()
        for p in parents:
            if p in claimed:
                new.append(self.blocks.fork(old[p], self.scheduler.new_seq_id()))
            else:
                claimed.add(p)
                new.append(old[p])
        for i, seq in enumerate(old):
            if i not in claimed:
                self.blocks.free_seq(seq)
        for seq, beam in zip(new, request.beam.live, strict=True):
            seq.tokens.append(beam.tokens[-1])
        request.seqs = new
        if request.beam.done():
            request.finish_beams()

    # ---- observability ---------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """KV budget and use, queue, versions, swap cost: what the replica exports as metrics."""
        bm, bs = self.blocks, self.config.block_size
        fill: dict[int, int] = {}
        for seq in self.scheduler.live_sequences():
            for i, block in enumerate(seq.block_table):
                fill[block] = max(fill.get(block, 0), min(bs, seq.num_computed - i * bs))
        used_slots = bm.num_used * bs
        live_tokens = sum(fill.values())
        return {
            "kv_budget_bytes": bm.num_blocks * bs * self.bytes_per_token,
            "kv_bytes_per_token": self.bytes_per_token,
            "block_size": bs,
            "total_blocks": bm.num_blocks,
            "used_blocks": bm.num_used,
            "free_blocks": bm.num_free,
            "cached_blocks": len(bm.cached),
            "live_tokens": live_tokens,
            "kv_utilization": live_tokens / used_slots if used_slots else 0.0,
            "prefix_hit_tokens": bm.prefix_hit_tokens,
            "prefix_query_tokens": bm.prefix_query_tokens,
            "cow_copies": bm.num_cow_copies,
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "num_preemptions": self.scheduler.num_preemptions,
            "num_steps": self.num_steps,
            "num_generated_tokens": self.num_generated,
            "serving_version": self.serving_version,
            "loaded_versions": sorted(self.models),
            "staged_version": self._staged.version if self._staged else None,
            "committing_version": self._commit[0].version if self._commit else None,
            "swap_mode": self.config.swap_mode,
            "last_swap": asdict(self.last_swap) if self.last_swap else None,
            "batch_invariant": self.config.batch_invariant,
        }


__all__ = ["DTYPES", "EngineConfig", "LLMEngine", "QueueFull", "free_memory_bytes"]
