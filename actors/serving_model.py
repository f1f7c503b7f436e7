"""One replica's model at the text edge: weights, tokenizer and ``AsyncLLMEngine`` of one version.

The engine works in token ids (STYLE.md 5); this class is where text becomes ids and back for
a replica: it encodes prompts and chat conversations, checks them against the model (empty,
longer than the context), streams the engine's deltas as ``GenerationChunk``s (the conversions
are ``engine_protocol.py``'s), scores text, and holds the two-phase hot-swap (``stage`` then
``commit``) that the orchestrator drives through the replica's swap agent (the only control
path).

Which version serves is the engine's to say, never this class's: ``current``, ``info``,
``score`` and ``evaluate`` read the engine's snapshot (version, weights, and the ``Served``
payload: tokenizer and checkpoint path), and pin_version / min_version are checked where the
engine admits a request. A commit only queues the flip; until the engine flips (drain mode:
until the old version's last request ends), everything here keeps naming the old version.

No Ray here: the LLMServer deployment (``server.py``) wraps one of these, and the gateway's
tests drive one directly, in-process, through real gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from kilnlm import checkpoint
from kilnlm.actors.engine_protocol import (
    arrived_together,
    engine_deadline,
    to_chunk,
    version_errors,
)
from kilnlm.actors.protocol import (
    DeadlineExceededError,
    GenerationChunk,
    GenerationRequest,
    ModelInfo,
    NoModelError,
    NotARewardModelError,
    RewardRequest,
    RewardResult,
    ScoreRequest,
    ScoreResult,
    merge_chunks,
)
from kilnlm.chat import encode_chat
from kilnlm.engine import AsyncLLMEngine, EngineConfig, LLMEngine, Snapshot, VersionRule
from kilnlm.engine.engine import DTYPES
from kilnlm.errors import InvalidArgumentError
from kilnlm.eval import EvalResult, token_logprobs
from kilnlm.fim import infill_ids
from kilnlm.model import Transformer
from kilnlm.posttrain.reward import encode_reply, rewards
from kilnlm.sampling import SamplingParams
from kilnlm.serving_config import ServeConfig
from kilnlm.tokenizer import Tokenizer


@dataclass
class LoadedModel:
    """Weights and tokenizer of one checkpoint version, ready to serve."""

    model: Transformer
    tokenizer: Tokenizer
    version: int
    checkpoint: str


@dataclass(frozen=True)
class Served:
    """What the engine's snapshot carries beside the weights for this replica."""

    tokenizer: Tokenizer
    checkpoint: str


def resolve_device(engine: EngineConfig) -> tuple[torch.device, torch.dtype]:
    """Where weights go: the engine config's choice, else CUDA in bfloat16 when this process
    sees a GPU, else CPU in float32 (one code path for the laptop and the cluster)."""
    device = torch.device(engine.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    default = "bfloat16" if device.type == "cuda" else "float32"
    return device, DTYPES[engine.dtype or default]


def load_checkpoint(
    path: str, version: int | None, device: torch.device, dtype: torch.dtype
) -> LoadedModel:
    """Verify and load a checkpoint directory (manifest checksums first: never serve a torn copy).

    A plain Hugging Face directory is adopted on first use (``checkpoint.ensure_manifest``: its
    manifest is computed and written, and verified on every later load) and serves with its own
    tokenizer, specials and chat template.
    """
    manifest = checkpoint.ensure_manifest(path)
    if version is None:
        version = int(manifest.fields.get("version", 1))
    tokenizer = checkpoint.load_tokenizer(path, verify=False)
    if tokenizer is None:
        raise checkpoint.IncompleteCheckpointError(
            f"checkpoint {path} has no tokenizer.json; serving needs one (export with "
            "save_pretrained(model, path, tokenizer=...), or copy the model's tokenizer files)"
        )
    model = checkpoint.load(path, device=device, dtype=dtype, verify=False)
    return LoadedModel(model.eval(), tokenizer, version, str(path))


class ServingModel:
    """The served model of one replica and its engine; empty (``NoModelError``) until loaded."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.device, self.dtype = resolve_device(config.engine)
        self.staged: LoadedModel | None = None
        """Phase 1's result, a separate object from what serves (drain mode: in host memory)."""
        self.engine: AsyncLLMEngine | None = None

    @property
    def current(self) -> LoadedModel | None:
        """What serves now, from the engine's snapshot (the flip, not the commit)."""
        if self.engine is None:
            return None
        return _loaded(self.engine.snapshot())

    # ---- lifecycle: two-phase hot-swap ------------------------------------------------------

    async def stage(self, checkpoint_path: str, version: int | None = None) -> int:
        """Phase 1: load and check ``checkpoint_path`` beside the serving weights; returns its version.

        Raises (and keeps serving the old version) on a bad checksum, a shape mismatch, or a
        tokenizer different from the served one (in-flight prompts were encoded with it).
        In "drain" swap mode the new weights are loaded into host memory, not the device; they
        stay a separate object until the engine copies them in at the flip.
        """
        drain = self.config.engine.swap_mode == "drain" and self.engine is not None
        device = torch.device("cpu") if drain else self.device
        loaded = await asyncio.to_thread(
            load_checkpoint, checkpoint_path, version, device, self.dtype
        )
        current = self.current
        if current is not None and loaded.tokenizer.to_json() != current.tokenizer.to_json():
            raise checkpoint.TokenizerMismatchError(
                f"checkpoint {checkpoint_path} has a different tokenizer from the served version "
                f"{current.version}; a new vocabulary needs a new deployment"
            )
        if self.engine is not None:
            payload = Served(loaded.tokenizer, loaded.checkpoint)
            await self.engine.stage(loaded.model, loaded.version, payload)
        self.staged = loaded
        return loaded.version

    async def commit(self, version: int) -> None:
        """Phase 2: the engine flips to ``version`` at its next step boundary (drain mode: once
        the old version's requests and readers are done); running requests finish on the
        weights they started with. Double mode returns after the flip (one step); drain mode
        once the flip is queued (``wait_serving`` waits for it). Committing a version already
        committed and waiting to flip is a no-op."""
        if self.staged is None or self.staged.version != version:
            if self.engine is not None and self.engine.committing_version == version:
                return
            staged = None if self.staged is None else self.staged.version
            raise ValueError(f"version {version} is not staged (staged: {staged}); stage it first")
        if self.engine is None:
            self.engine = self._new_engine(self.staged)
        else:
            await self.engine.commit(version)
            if self.config.engine.swap_mode == "double":
                await self.engine.wait_serving(version)
        self.staged = None

    async def abort_stage(self) -> None:
        """Drop staged weights, or a commit still waiting to flip (another replica failed):
        keep serving the old version."""
        if self.engine is not None:
            await self.engine.abort_stage()
        self.staged = None

    async def load(self, checkpoint_path: str, version: int | None = None) -> int:
        """Stage, commit and wait for the flip (the first model of an empty replica, or a
        replica catching up with the promoted version)."""
        version = await self.stage(checkpoint_path, version)
        await self.commit(version)
        await self.wait_serving(version)
        return version

    async def wait_serving(self, version: int) -> None:
        """Return once the engine serves ``version``."""
        if self.engine is not None:
            await self.engine.wait_serving(version)

    @property
    def flips(self) -> int:
        """Flips of the engine so far (the swap agent can report when a commit took effect)."""
        return 0 if self.engine is None else self.engine.flips

    def _new_engine(self, loaded: LoadedModel) -> AsyncLLMEngine:
        tok = loaded.tokenizer
        engine = LLMEngine(
            loaded.model,
            self.config.engine,
            tok.eos_id,
            loaded.version,
            decode=tok.decode,
            payload=Served(tok, loaded.checkpoint),
        )
        return AsyncLLMEngine(engine)

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()

    @property
    def healthy(self) -> bool:
        """False once the engine's step loop has died (the replica must be replaced)."""
        return self.engine is None or self.engine.healthy

    # ---- requests ---------------------------------------------------------------------------

    def _engine(self) -> AsyncLLMEngine:
        if self.engine is None:
            raise NoModelError(
                "no model is loaded yet: promote a checkpoint (kiln promote) or start the server "
                "with --checkpoint, then retry"
            )
        return self.engine

    @contextlib.asynccontextmanager
    async def _reading(
        self, min_version: int | None = None, pin_version: int | None = None
    ) -> AsyncIterator[Snapshot]:
        """Lease the engine's snapshot (its weights stay as they are meanwhile) and check the
        version rule against the version that will produce the answer."""
        async with self._engine().reading() as snapshot:
            with version_errors():
                VersionRule(min_version, pin_version).check(snapshot.version)
            yield snapshot

    def encode(self, request: GenerationRequest, loaded: LoadedModel | Snapshot) -> list[int]:
        """Prompt ids; InvalidArgumentError naming ``prompt``/``messages`` when empty or too long.
        (Every version of a deployment has the same tokenizer and context: stage checks it.)"""
        tok = loaded.tokenizer if isinstance(loaded, LoadedModel) else loaded.payload.tokenizer
        field = "prompt" if request.messages is None else "messages"
        if request.infill is not None:
            field = "prefix"
            ids = _infill_ids(tok, *request.infill)
        elif request.messages is not None:
            ids = encode_chat(tok, request.messages, add_generation_prompt=True)
        else:
            ids = tok.encode_prompt(request.prompt or "")
        if not ids:
            raise InvalidArgumentError(f"{field} must not be empty", field)
        context = loaded.model.config.block_size
        if len(ids) >= context:
            raise InvalidArgumentError(
                f"{field} is {len(ids)} tokens, longer than the context allows: the model reads "
                f"{context} positions and needs one for a new token; shorten it",
                field,
            )
        return ids

    def _params(self, params: SamplingParams, tokenizer: Any = None) -> SamplingParams:
        """The server's cap; and every EOS id of a Hugging Face model's generation_config.json
        ends the reply (Llama 3 ends a turn with <|eot_id|>, not its tokenizer's EOS)."""
        defaults = getattr(tokenizer, "generation_defaults", None)
        extra = [
            t for t in getattr(defaults, "stop_token_ids", []) if t not in params.stop_token_ids
        ]
        if extra:
            params = replace(params, stop_token_ids=[*params.stop_token_ids, *extra])
        return params.validate_for(self.config.engine.max_tokens_limit)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Stream one request. Closing this iterator (client gone) aborts it in the engine.

        pin_version / min_version are checked by the engine against the version it admits the
        request on, so the version in the finish message is the one that made every token."""
        engine = self._engine()
        snapshot = engine.snapshot()
        ids = self.encode(request, snapshot)
        params = self._params(request.params, snapshot.payload.tokenizer)
        deadline = engine_deadline(request.deadline)
        if deadline is not None and deadline <= time.monotonic():
            raise DeadlineExceededError("the request's deadline passed before it was scheduled")
        versions = VersionRule(request.min_version, request.pin_version)
        # The engine's id is ours: a client's request_id is only a label, two clients may pick
        # the same one.
        outputs = engine.generate(
            uuid.uuid4().hex, ids, params, deadline, versions, request.resume_token_ids
        )
        with version_errors():
            async with contextlib.aclosing(arrived_together(outputs)) as batches:
                async for batch in batches:
                    yield merge_chunks([to_chunk(out, request.request_id) for out in batch])

    async def score(self, request: ScoreRequest) -> ScoreResult:
        """Per-token logprobs of the text after a BOS token, perplexity and bits per byte, under
        the weights of the version the result names (held while they are read)."""
        self._engine()
        n_bytes = len(request.text.encode("utf-8"))
        if not 0 < n_bytes <= self.config.max_score_bytes:
            raise InvalidArgumentError(
                f"text must be 1..{self.config.max_score_bytes} UTF-8 bytes, got {n_bytes}; "
                "score a long file in parts",
                "text",
            )
        async with self._reading(request.min_version, request.pin_version) as snapshot:
            tok = snapshot.payload.tokenizer
            ids = [tok.bos_id, *tok.encode(request.text)]
            lp = await asyncio.to_thread(token_logprobs, snapshot.model, ids)
        result = EvalResult.from_total_nll(-float(lp.double().sum()), len(lp), n_bytes)
        return ScoreResult(
            token_ids=ids[1:],
            logprobs=[float(x) for x in lp],
            perplexity=result.perplexity,
            bits_per_byte=result.bits_per_byte,
            num_bytes=n_bytes,
            model_version=snapshot.version,
        )

    async def reward(self, request: RewardRequest) -> RewardResult:
        """r(prompt, completion) under a reward-model export (``kilnlm.posttrain.reward``): the
        head read at the closing ``<|eos|>``, from the weights of the version it names."""
        self._engine()
        async with self._reading(request.min_version, request.pin_version) as snapshot:
            head = _reward_head(snapshot.payload.checkpoint)
            tok = snapshot.payload.tokenizer
            prompt = encode_chat(tok, request.messages, add_generation_prompt=True)
            ids = list(encode_reply(tok, prompt, request.completion))
            context = snapshot.model.config.block_size
            if len(ids) > context:
                raise InvalidArgumentError(
                    f"prompt + completion is {len(ids)} tokens, more than the model's context "
                    f"of {context}; shorten them",
                    "completion",
                )
            value = await asyncio.to_thread(_reward_of, snapshot.model, ids, head)
        return RewardResult(reward=value, num_tokens=len(ids), model_version=snapshot.version)

    async def evaluate(self, token_ids: list[int]) -> tuple[int, list[float]]:
        """(version, log-probabilities of ``token_ids``) under the serving weights, both from one
        snapshot held while reading: the canary compares what it names."""
        async with self._reading() as snapshot:
            lp = await asyncio.to_thread(token_logprobs, snapshot.model, token_ids)
        return snapshot.version, [float(x) for x in lp]

    async def info(self) -> ModelInfo:
        """What this replica serves (the engine's snapshot) and how full its KV cache is."""
        loaded = self.current
        if loaded is None or self.engine is None:
            return ModelInfo(
                staged_version=None if self.staged is None else self.staged.version,
                max_tokens_limit=self.config.engine.max_tokens_limit,
                device=str(self.device),
            )
        cfg = loaded.model.config
        stats = self.engine.stats()
        return ModelInfo(
            version=loaded.version,
            checkpoint=loaded.checkpoint,
            config=asdict(cfg),
            context_length=cfg.block_size,
            vocab_size=cfg.vocab_size,
            num_params=loaded.model.num_params(),
            kv_budget_bytes=stats["kv_budget_bytes"],
            kv_bytes_per_token=stats["kv_bytes_per_token"],
            block_size=stats["block_size"],
            blocks_total=stats["total_blocks"],
            blocks_used=stats["used_blocks"],
            running=stats["num_running"],
            waiting=stats["num_waiting"],
            device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."),
            max_tokens_limit=self.config.engine.max_tokens_limit,
            generated_tokens=stats["num_generated_tokens"],
            staged_version=None if self.staged is None else self.staged.version,
        )


@functools.lru_cache(maxsize=16)
def _reward_head(path: str) -> int:
    """The reward head's output row, from the (immutable) export's manifest."""
    head = checkpoint.read_manifest(path).fields.get("reward_head")
    if not isinstance(head, dict) or head.get("kind") != "lm_head_row":
        raise NotARewardModelError(
            "the served model is not a reward model (its manifest has no reward_head); serve an "
            "export of `kiln reward train`"
        )
    return int(head["token_id"])


@torch.no_grad()
def _reward_of(model: Transformer, ids: list[int], head: int) -> float:
    x = torch.tensor([ids], device=next(model.parameters()).device)
    return float(rewards(model, x, torch.tensor([len(ids) - 1], device=x.device), head)[0])


def _infill_ids(tok: Any, prefix: str, suffix: str) -> list[int]:
    """The fill-in-the-middle prompt; INVALID_ARGUMENT for a tokenizer without the FIM tokens."""
    try:
        return infill_ids(tok, prefix, suffix)
    except KeyError as e:
        raise InvalidArgumentError(
            "this model's tokenizer has no <|fim_prefix|>/<|fim_suffix|>/<|fim_middle|> tokens; "
            "serve a kilnlm model trained with --fim-rate > 0",
            "prefix",
        ) from e


def _loaded(snapshot: Snapshot) -> LoadedModel:
    served: Served = snapshot.payload
    return LoadedModel(snapshot.model, served.tokenizer, snapshot.version, served.checkpoint)


__all__ = ["LoadedModel", "ServingModel", "load_checkpoint", "resolve_device"]
