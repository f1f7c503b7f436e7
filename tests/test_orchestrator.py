"""The orchestrator without Serve: registry, validation gate, and the two-phase protocol in-process.

Everything here is real: checkpoints exported and loaded from disk, ``ServingModel`` replicas
with running engines, ``SwapAgent``s long-polling an ``Orchestrator`` through ``DirectLink`` (the
same object that runs as the Ray actor; only the transport differs). ``test_hotswap.py`` runs
the same protocol through real Ray Serve replicas and real gRPC.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from serving_utils import TEXT

from kilnlm import checkpoint
from kilnlm.actors.admin import admin_status, status_pb
from kilnlm.actors.orchestrator import (
    CheckpointRejected,
    NotFoundError,
    Orchestrator,
    OrchestratorConfig,
    PreconditionError,
    SwapAborted,
    heldout_ids,
    run_gate,
)
from kilnlm.actors.registry import Registry, RegistryError
from kilnlm.actors.serving_model import ServingModel
from kilnlm.actors.swap_agent import DirectLink, SwapAgent
from kilnlm.actors.swap_messages import Hello
from kilnlm.checkpoint import save_pretrained
from kilnlm.engine import EngineConfig
from kilnlm.eval import evaluate
from kilnlm.gate import Validation
from kilnlm.model import ModelConfig, Transformer
from kilnlm.serving_config import ServeConfig
from kilnlm.tokenizer import Tokenizer

SERVE = ServeConfig(engine=EngineConfig(kv_budget_mib=4, max_tokens_limit=200))
OTHER_TEXT = "Sand, lime and soda ash melt into glass; the glassblower gathers it on a pipe. " * 8


# --------------------------------------------------------------------------------------------
# Checkpoints


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train([TEXT * 8], vocab_size=320, min_frequency=2)


def export(
    path: Path, tokenizer: Tokenizer, seed: int, scale: float = 1.0, **overrides: Any
) -> Path:
    """A random test-1m-shaped model; ``scale`` > 1 sharpens its logits (a much worse model)."""
    torch.manual_seed(seed)
    cfg = ModelConfig.from_preset(
        "test-1m", vocab_size=tokenizer.vocab_size, block_size=256, **overrides
    )
    model = Transformer(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_id].zero_()  # greedy never stops early
        model.lm_head.weight.mul_(scale)
    return save_pretrained(model, path, tokenizer=tokenizer)


def flip_byte(path: Path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("orch-ckpts")
    other = Tokenizer.train([OTHER_TEXT * 4], vocab_size=300, min_frequency=2)
    (root / "heldout.txt").write_text(TEXT * 2, encoding="utf-8")
    return {
        "heldout": root / "heldout.txt",
        **{f"v{i}": export(root / f"v{i}", tokenizer, seed=i) for i in range(1, 5)},
        "worse": export(root / "worse", tokenizer, seed=9, scale=40.0),
        "wide": export(root / "wide", tokenizer, seed=5, n_embd=64),
        "other_tokenizer": export(root / "other", other, seed=6),
    }


def config(tmp_path: Path, ckpts: dict[str, Path], **kw: Any) -> OrchestratorConfig:
    defaults: dict[str, Any] = dict(
        storage_path=str(tmp_path / "registry"),
        heldout=str(ckpts["heldout"]),
        max_ppl_increase=10.0,  # random models: the margin itself is tested on its own
        poll_timeout_s=0.3,
        replica_timeout_s=3.0,  # generous: a loaded 2-core machine delays polls
        stage_timeout_s=20.0,
        commit_timeout_s=10.0,
        check_serve=False,
    )
    return OrchestratorConfig(**{**defaults, **kw})


# --------------------------------------------------------------------------------------------
# An in-process cluster: orchestrator + replicas with agents, on one event loop


class Cluster:
    def __init__(self, orchestrator: Orchestrator) -> None:
        self.orchestrator = orchestrator
        self.models: list[ServingModel] = []
        self.agents: list[SwapAgent] = []

    async def add_replica(self, load: Path | None = None, version: int = 1) -> ServingModel:
        model = ServingModel(SERVE)
        if load is not None:
            await model.load(str(load), version)
        agent = SwapAgent(model, DirectLink(self.orchestrator), f"r{len(self.models)}")
        await agent.start(sync_timeout_s=30)
        self.models.append(model)
        self.agents.append(agent)
        return model

    def versions(self) -> list[int | None]:
        return [None if m.current is None else m.current.version for m in self.models]

    async def close(self) -> None:
        for agent in self.agents:
            await agent.stop()
        for model in self.models:
            model.shutdown()


def run(cfg: OrchestratorConfig, body: Callable[[Cluster], Awaitable[None]]) -> None:
    async def main() -> None:
        cluster = Cluster(Orchestrator(cfg))
        try:
            await body(cluster)
        finally:
            await cluster.close()

    asyncio.run(main())


async def promoted_cluster(c: Cluster, ckpts: dict[str, Path], n: int = 2) -> int:
    """n empty replicas, then v1 registered and promoted into them; returns its version."""
    for _ in range(n):
        await c.add_replica()
    version = await c.orchestrator.register(str(ckpts["v1"]))
    await c.orchestrator.promote(version)
    return version


# --------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"policy": "sometimes"}, "policy"),
        ({"max_ppl_increase": -0.1}, "max_ppl_increase"),
        ({"heldout_max_tokens": 1}, "heldout_max_tokens"),
        ({"heldout_stride": 0}, "heldout_stride"),
        ({"heldout_stride": 1.5}, "heldout_stride"),
        ({"stage_timeout_s": 0}, "stage_timeout_s"),
        ({"replica_timeout_s": 1.0, "poll_timeout_s": 2.0}, "replica_timeout_s"),
        ({"keep_last": -1}, "keep_last"),
        ({"validate_in": "gpu"}, "validate_in"),
        ({"heldout": ""}, "heldout"),
    ],
)
def test_config_errors_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        OrchestratorConfig(**{"storage_path": "/tmp/x", "heldout": "h.txt", **kw})


# --------------------------------------------------------------------------------------------
# Registry


def _add(reg: Registry, name: str, sha: str = "a" * 64, **fields: Any):
    return reg.add(f"file:///ck/{name}", f"/ck/{name}", sha, {"model.safetensors": sha}, fields)


def _validation(ppl: float) -> Validation:
    return Validation(perplexity=ppl, bits_per_byte=1.0, tokens=10, smoke_text="x", seconds=0.1)


def test_registry_round_trips_exactly_and_writes_atomically(tmp_path):
    reg = Registry.open(tmp_path)
    a = _add(reg, "a", step=100, tokens_seen=12800, heldout_loss=3.5)
    b = _add(reg, "b", "b" * 64, step=200)
    assert (a.version, b.version) == (1, 2)
    assert _add(reg, "a").version == 1, "registering the same files again is a no-op"
    reg.set_status(1, "validating")
    reg.set_validation(1, _validation(40.0))
    reg.promote(1)
    swap = reg.start_swap("promote", 1, None)
    reg.finish_swap(swap, "ok")
    reg.report_training(250, loss=3.1, tokens_seen=32000, heldout_loss=None, metrics={"lr": 1e-3})
    again = Registry.open(tmp_path)
    assert again.to_dict() == reg.to_dict()
    assert again.promoted == 1 and again.get(1).validation.perplexity == 40.0
    assert again.training.step == 250 and again.training.heldout_loss == 3.5
    assert [p.name for p in tmp_path.iterdir()] == ["registry.json"], "no temp file left behind"
    assert [t.status for t in again.get(1).history] == [
        "registered",
        "validating",
        "validated",
        "promoted",
    ]


def test_registry_refuses_illegal_transitions_and_unknown_versions(tmp_path):
    reg = Registry.open(tmp_path)
    _add(reg, "a")
    reg.set_status(1, "validating")
    reg.set_status(1, "rejected", "checksum: model.safetensors")
    with pytest.raises(RegistryError, match="rejected"):
        reg.set_status(1, "validated")
    with pytest.raises(KeyError, match="not registered"):
        reg.get(7)
    (tmp_path / "registry.json").write_text("{not json")
    with pytest.raises(RegistryError, match="not valid JSON"):
        Registry.open(tmp_path)


def test_recover_settles_what_was_in_flight(tmp_path):
    reg = Registry.open(tmp_path)
    _add(reg, "a")
    _add(reg, "b", "b" * 64)
    reg.set_status(2, "validating")
    reg.start_swap("promote", 1, None)
    again = Registry.open(tmp_path)
    assert again.recover() == [1, 2]
    assert again.get(2).status == "registered" and "interrupted" in again.get(2).reason
    assert again.swaps[0].outcome == "interrupted"


def test_lineage_rollback_and_retention_never_touch_promoted_or_rollback_target(tmp_path):
    reg = Registry.open(tmp_path)
    for i, name in enumerate("abcde"):
        _add(reg, name, str(i) * 64)
        reg.set_status(i + 1, "validating")
        reg.set_validation(i + 1, _validation(10.0))
    reg.promote(1)
    reg.promote(2)
    reg.promote(3)
    assert (reg.promoted, reg.rollback_target) == (3, 2)
    assert reg.get(2).status == "retired" and "replaced by version 3" in reg.get(2).reason
    reg.rollback(2)
    assert (reg.promoted, reg.rollback_target) == (2, 1)
    assert reg.get(3).status == "retired" and "rolled back to version 2" in reg.get(3).reason
    # keep_last=0: only the protected ones survive; 3, 4, 5 may go (nothing is in validation)
    assert {r.version for r in reg.retention_candidates(0)} == {3, 4, 5}
    assert {r.version for r in reg.retention_candidates(2)} == {3}  # newest 2 kept: 4, 5


def test_retention_keeps_versions_in_use_and_every_path_a_kept_version_shares(tmp_path):
    """A canary or a version a replica still serves is kept; so is a path that a kept version
    points at, even where an older registry recorded two versions on it (a re-export)."""
    reg = Registry.open(tmp_path)
    for i, name in enumerate("abcd"):
        _add(reg, name, str(i) * 64)
        reg.set_status(i + 1, "validating")
        reg.set_validation(i + 1, _validation(10.0))
    reg.promote(1)
    assert {r.version for r in reg.retention_candidates(0, in_use={3})} == {2, 4}
    reg.checkpoints[4].path = reg.checkpoints[1].path  # as a pre-immutability registry had it
    assert {r.version for r in reg.retention_candidates(0)} == {2, 3}


def test_a_rewritten_registered_path_is_refused_and_a_swap_is_finished_once(tmp_path):
    reg = Registry.open(tmp_path)
    _add(reg, "a", "a" * 64)
    assert _add(reg, "a", "a" * 64).version == 1, "the same content again is the same version"
    with pytest.raises(RegistryError, match="rewritten"):
        _add(reg, "a", "b" * 64)
    swap = reg.start_swap("canary", 1, None)
    reg.finish_swap(swap, "ok")
    with pytest.raises(RegistryError, match="already finished"):
        reg.finish_swap(swap, "aborted", "the canary's verdict, written over the outcome")
    assert Registry.open(tmp_path).swaps[-1].outcome == "ok"


# --------------------------------------------------------------------------------------------
# Validation gate


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_gate_measures_the_same_perplexity_as_eval(tmp_path, ckpts, tokenizer, fraction):
    cfg = replace(config(tmp_path, ckpts), heldout_stride=fraction)
    gate = run_gate(str(ckpts["v1"]), cfg)
    assert gate.ok, gate.reason
    model = checkpoint.load(ckpts["v1"])
    ids = [tokenizer.bos_id, *tokenizer.encode(ckpts["heldout"].read_text())][:4096]
    context = model.config.block_size
    assert len(ids) > context  # more than one window: the stride changes the windows
    stride = None if fraction == 1.0 else int(context * fraction)  # None: eval's default
    reference = evaluate(model, ids, tokenizer.count_bytes(ids), stride=stride)
    if stride is not None:
        plain = evaluate(model, ids, tokenizer.count_bytes(ids))
        assert plain.perplexity != pytest.approx(reference.perplexity, rel=1e-6)
    assert gate.validation.perplexity == pytest.approx(reference.perplexity, rel=1e-6)
    assert gate.validation.bits_per_byte == pytest.approx(reference.bits_per_byte, rel=1e-6)
    assert gate.validation.tokens == len(ids) - 1
    assert gate.validation.smoke_text  # the smoke generation produced text


def test_gate_rejects_a_flipped_byte_naming_the_file(tmp_path, ckpts, tokenizer):
    bad = export(tmp_path / "bad", tokenizer, seed=1)
    flip_byte(bad / "model.safetensors")
    gate = run_gate(str(bad), config(tmp_path, ckpts))
    assert not gate.ok and gate.reason.startswith("checksum:")
    assert "model.safetensors" in gate.reason


def test_gate_rejects_a_checkpoint_without_tokenizer(tmp_path, ckpts):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("test-1m", vocab_size=320))
    path = save_pretrained(model, tmp_path / "no-tok")
    gate = run_gate(str(path), config(tmp_path, ckpts))
    assert not gate.ok and gate.reason.startswith("load:") and "tokenizer" in gate.reason


def test_gate_reads_a_corpus_heldout_split(tmp_path, ckpts):
    from kilnlm.data import CorpusConfig, build_corpus
    from kilnlm.shards import TokenShards

    corpus = tmp_path / "corpus"
    build_corpus(CorpusConfig(max_bytes=120_000, heldout_fraction=0.2), corpus, 300, progress=False)
    tok = Tokenizer.load(corpus)
    shards = TokenShards(corpus, "heldout")
    ids, n_bytes = heldout_ids(str(corpus), tok, len(shards))  # all of it fits: read as stored
    assert ids == [int(t) for t in shards.read(0, len(shards))]
    assert n_bytes == tok.count_bytes(ids)
    assert len(shards) > 1500  # the filters leave enough held-out text for two chunks
    few, _ = heldout_ids(str(corpus), tok, 1500)  # two chunks of 750: the start and the middle
    half = len(shards) // 2
    assert few == [int(t) for t in [*shards.read(0, 750), *shards.read(half, 750)]]
    path = export(tmp_path / "m", tok, seed=3)
    assert run_gate(str(path), config(tmp_path, ckpts, heldout=str(corpus))).ok
    with pytest.raises(ValueError, match="another tokenizer"):
        heldout_ids(str(corpus), Tokenizer.load(ckpts["v1"]), 100)


def test_perplexity_margin_rejects_a_worse_checkpoint(tmp_path, ckpts):
    async def body(c: Cluster) -> None:
        o = c.orchestrator
        await promoted_cluster(c, ckpts, n=1)
        worse = await o.register(str(ckpts["worse"]))
        with pytest.raises(CheckpointRejected, match="worse than version 1"):
            await o.promote(worse)
        record = (await o.list_checkpoints())[-1]
        assert record.status == "rejected" and "perplexity" in record.reason
        assert c.versions() == [1]
        with pytest.raises(CheckpointRejected):  # rejected is final
            await o.promote(worse)

    run(config(tmp_path, ckpts, max_ppl_increase=0.5), body)


# --------------------------------------------------------------------------------------------
# The two-phase protocol, in-process


def test_promote_swaps_every_replica_and_records_the_swap(tmp_path, ckpts):
    async def body(c: Cluster) -> None:
        o = c.orchestrator
        await promoted_cluster(c, ckpts)
        assert c.versions() == [1, 1]
        v2 = await o.register(str(ckpts["v2"]))
        swap = await o.promote(v2)
        assert c.versions() == [2, 2]
        assert swap.outcome == "ok" and swap.previous_version == 1 and swap.swap_mode == "double"
        assert set(swap.replicas) == {"r0", "r1"}
        assert all(p.stage_s > 0 and p.commit_s is not None for p in swap.replicas.values())
        assert 0 < swap.seconds < swap.registered_to_serving_s
        st = await o.status()
        assert st.promoted_version == 2 and st.rollback_version == 1
        assert [(r.replica_id, r.version) for r in st.replicas] == [("r0", 2), ("r1", 2)]
        assert [r.status for r in await o.list_checkpoints()] == ["retired", "promoted"]

    run(config(tmp_path, ckpts), body)


def test_a_stage_failure_on_one_replica_leaves_every_replica_as_it_was(tmp_path, ckpts):
    """All or nothing: r1 (empty) can stage the new checkpoint, r0 cannot (its served model has
    another tokenizer), so the stage is aborted on r1 too and the checkpoint rejected."""

    async def body(c: Cluster) -> None:
        o = c.orchestrator
        await c.add_replica(load=ckpts["v1"], version=1)  # started with --checkpoint
        await c.add_replica()  # started empty
        version = await o.register(str(ckpts["other_tokenizer"]))
        assert version == 2, "the number the replica serves is never handed out"
        with pytest.raises(CheckpointRejected, match="different tokenizer"):
            await o.promote(version)
        assert c.versions() == [1, None]
        assert [m.staged for m in c.models] == [None, None], "r1's staged weights were dropped"
        record = (await o.list_checkpoints())[-1]
        assert record.status == "rejected" and "replica r0 failed to stage" in record.reason
        swap = (await o.status()).swaps[-1]
        assert swap.outcome == "aborted" and "tokenizer" in swap.replicas["r0"].error
        assert (await o.status()).promoted_version is None

    run(config(tmp_path, ckpts), body)


def test_another_architecture_is_rejected_by_every_replica(tmp_path, ckpts):
    async def body(c: Cluster) -> None:
        o = c.orchestrator
        await promoted_cluster(c, ckpts)
        wide = await o.register(str(ckpts["wide"]))
        with pytest.raises(CheckpointRejected, match="n_embd"):
            await o.promote(wide)
        assert c.versions() == [1, 1] and [m.staged for m in c.models] == [None, None]

    run(config(tmp_path, ckpts), body)


def test_a_replica_that_never_stages_times_out_and_nothing_flips(tmp_path, ckpts):
    """A hung replica (attached, never answering) aborts the swap without rejecting the
    checkpoint; once it is gone (heartbeat lost) the same checkpoint promotes fine."""

    async def body(c: Cluster) -> None:
        o = c.orchestrator
        await promoted_cluster(c, ckpts, n=1)
        hung = Hello("hung", None, None, version=1, checkpoint=str(ckpts["v1"]),
                     staged_version=None, swap_mode="double")  # fmt: skip
        await o.attach(hung)
        v2 = await o.register(str(ckpts["v2"]))
        with pytest.raises(SwapAborted, match="hung"):
            await o.promote(v2)
        assert c.versions() == [1] and c.models[0].staged is None
        assert (await o.list_checkpoints())[-1].status == "validated"
        assert await _eventually(lambda: set(o.replicas) == {"r0"}), "the reaper drops it"
        await o.promote(v2)
        assert c.versions() == [2]

    run(config(tmp_path, ckpts, stage_timeout_s=1.0), body)


def test_rollback_returns_to_the_previous_version_the_same_way(tmp_path, ckpts):
    async def body(c: Cluster) -> None:
        o = c.orchestrator
        await promoted_cluster(c, ckpts)
        with pytest.raises(PreconditionError, match="no earlier promoted version"):
            await o.rollback()
        await o.promote(await o.register(str(ckpts["v2"])))
        await o.promote(await o.register(str(ckpts["v3"])))
        swap = await o.rollback()
        assert swap.kind == "rollback" and swap.version == 2 and c.versions() == [2, 2]
        st = await o.status()
        assert (st.promoted_version, st.rollback_version) == (2, 1)
        assert (await o.rollback(3)).version == 3 and c.versions() == [3, 3]
        with pytest.raises(NotFoundError):
            await o.promote(42)

    run(config(tmp_path, ckpts), body)


def test_rollback_waits_for_streams_still_on_the_old_weights(tmp_path, ckpts):
    """v1 is still finishing a stream when v2 takes over; rolling back to v1 at once must wait
    for that stream (the engine cannot stage weights it still holds) instead of failing."""
    from kilnlm.actors.protocol import GenerationRequest
    from kilnlm.sampling import SamplingParams

    async def body(c: Cluster) -> None:
        o = c.orchestrator
        await promoted_cluster(c, ckpts, n=1)
        model = c.models[0]
        request = GenerationRequest("long", SamplingParams(temperature=0, max_tokens=200), "The")
        chunks = model.generate(request)
        first = await anext(chunks)  # running on version 1
        rest = asyncio.ensure_future(_drain(chunks))
        await o.promote(await o.register(str(ckpts["v2"])))
        assert await _eventually(lambda: model.engine.stats()["loaded_versions"] == [1, 2])
        assert not rest.done(), "the stream still holds version 1's weights"
        swap = await o.rollback()
        finish = (await rest)[-1].finish
        assert finish.model_version == 1 and len(first.token_ids) + finish.completion_tokens > 1
        assert swap.outcome == "ok" and c.versions() == [1]

    run(config(tmp_path, ckpts), body)


async def _drain(chunks: Any) -> list[Any]:
    return [chunk async for chunk in chunks]


def test_a_fresh_replica_loads_the_promoted_version_before_it_is_ready(tmp_path, ckpts):
    async def body(c: Cluster) -> None:
        o = c.orchestrator
        await promoted_cluster(c, ckpts, n=1)
        await o.promote(await o.register(str(ckpts["v2"])))
        fresh = await c.add_replica(load=ckpts["v1"], version=1)  # started on an old model
        assert fresh.current.version == 2 and c.agents[-1].ready
        c.agents[-1].check()

    run(config(tmp_path, ckpts), body)


def test_canary_passes_then_promotes_the_rest(tmp_path, ckpts):
    async def body(c: Cluster) -> None:
        o = c.orchestrator
        await promoted_cluster(c, ckpts)
        swap = await o.promote(await o.register(str(ckpts["v2"])), canary=True)
        assert c.versions() == [2, 2]
        kinds = [s.kind for s in (await o.status()).swaps]
        assert kinds == ["promote", "canary", "promote"]
        assert swap.replicas["r0"].skipped, "the canary replica already served it"
        m = swap.canary
        assert m["tokens"] == 64 and math.isfinite(m["canary_perplexity"])
        assert m["mean_abs_logprob_diff"] > 0, "two different models give different logprobs"

    run(config(tmp_path, ckpts, canary_tokens=65, canary_max_ppl_increase=10.0), body)


def test_canary_that_is_worse_rolls_itself_back(tmp_path, ckpts):
    async def body(c: Cluster) -> None:
        o = c.orchestrator
        await promoted_cluster(c, ckpts)
        worse = await o.register(str(ckpts["worse"]))
        with pytest.raises(CheckpointRejected, match="canary"):
            await o.promote(worse, canary=True)
        assert c.versions() == [1, 1], "the canary replica went back to version 1"
        swaps = (await o.status()).swaps
        assert [s.kind for s in swaps] == ["promote", "canary", "canary-rollback"]
        canary = swaps[1]
        assert canary.outcome == "aborted"
        assert canary.canary["canary_perplexity"] > canary.canary["reference_perplexity"]
        assert (await o.list_checkpoints())[-1].status == "rejected"

    # The gate's margin is off: the canary alone must catch the worse model.
    run(config(tmp_path, ckpts, max_ppl_increase=math.inf, canary_max_ppl_increase=0.02), body)


def test_auto_policy_promotes_what_passes_and_skips_what_fails(tmp_path, ckpts):
    async def body(c: Cluster) -> None:
        o = c.orchestrator
        for _ in range(2):
            await c.add_replica()
        await o.register(str(ckpts["v1"]))
        bad = tmp_path / "bad"
        bad_path = export(bad, Tokenizer.load(ckpts["v1"]), seed=2)
        flip_byte(bad_path / "config.json", 10)
        await o.register(str(bad_path))
        assert await _eventually(lambda: c.versions() == [1, 1])
        assert await _eventually(lambda: o.registry.get(2).status == "rejected")
        assert "config.json" in o.registry.get(2).reason
        # promoted once every replica's commit report arrived (a moment after they flipped)
        assert await _eventually(lambda: o.registry.promoted == 1)

    run(config(tmp_path, ckpts, policy="auto"), body)


async def _eventually(predicate: Callable[[], bool], timeout: float = 20.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return predicate()


def test_restarted_orchestrator_recovers_and_leaves_replicas_untouched(tmp_path, ckpts):
    async def body(c: Cluster) -> None:
        await promoted_cluster(c, ckpts)
        await c.orchestrator.promote(await c.orchestrator.register(str(ckpts["v2"])))
        before = await c.orchestrator.list_checkpoints()
        engines = [m.engine for m in c.models]
        swaps = [e.stats()["last_swap"] for e in engines]
        fresh = Orchestrator(cfg)  # a new life on the same storage
        for agent in c.agents:
            agent.link = DirectLink(fresh)
        assert await fresh.list_checkpoints() == before
        assert await _eventually(lambda: len(fresh.replicas) == 2)
        st = await fresh.status()
        assert st.promoted_version == 2 and [r.version for r in st.replicas] == [2, 2]
        assert [m.engine for m in c.models] == engines
        assert [e.stats()["last_swap"] for e in engines] == swaps, "no replica swapped again"
        assert len(st.swaps) == 2

    cfg = config(tmp_path, ckpts)
    run(cfg, body)


def test_retention_deletes_old_files_but_never_promoted_or_rollback_target(
    tmp_path, ckpts, tokenizer
):
    paths = [export(tmp_path / f"r{i}", tokenizer, seed=i) for i in range(4)]

    async def body(c: Cluster) -> None:
        o = c.orchestrator
        await c.add_replica()
        versions = [await o.register(str(p)) for p in paths]
        for v in versions[:3]:
            await o.promote(v)
        await o.validate(versions[3])  # newest, validated, not promoted: kept by keep_last=1
        await o.promote(versions[2])
        assert [p.exists() for p in paths] == [False, True, True, True]
        assert o.registry.get(1).deleted
        with pytest.raises(PreconditionError, match="deleted"):
            await o.rollback(1)

    run(config(tmp_path, ckpts, keep_last=1), body)


# --------------------------------------------------------------------------------------------
# Admin conversions


def test_admin_errors_map_to_grpc_status_codes():
    assert admin_status(NotFoundError("x"))[0] == grpc.StatusCode.NOT_FOUND
    assert admin_status(CheckpointRejected("x"))[0] == grpc.StatusCode.FAILED_PRECONDITION
    assert admin_status(SwapAborted("x"))[0] == grpc.StatusCode.ABORTED
    assert admin_status(ValueError("uri"))[0] == grpc.StatusCode.INVALID_ARGUMENT


def test_status_converts_to_protobuf(tmp_path, ckpts):
    async def body(c: Cluster) -> None:
        await promoted_cluster(c, ckpts)
        await c.orchestrator.report_progress(300, loss=2.5, tokens_seen=99)
        pb = status_pb(await c.orchestrator.status())
        assert pb.promoted_version == 1 and pb.policy == "manual"
        assert [r.version for r in pb.replicas] == [1, 1]
        assert pb.checkpoints[0].state == 3 and pb.checkpoints[0].heldout_perplexity > 1
        assert (
            pb.checkpoints[0].manifest_sha256
            == checkpoint.read_manifest(ckpts["v1"]).content_sha256()
        )
        assert pb.training.step == 300 and pb.training.loss == 2.5
        assert pb.swaps[0].replicas[0].stage_seconds > 0
        assert json.loads(json.dumps(pb.swaps[0].kind)) == "promote"

    run(config(tmp_path, ckpts), body)


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_register_refuses_missing_manifests(tmp_path, ckpts):
    """(Object-store URIs are registered too: tests/test_object_storage.py.)"""

    async def body(c: Cluster) -> None:
        os.makedirs(tmp_path / "empty")
        with pytest.raises(checkpoint.CheckpointError, match=r"manifest\.json"):
            await c.orchestrator.register(str(tmp_path / "empty"))

    run(config(tmp_path, ckpts), body)
