"""LLMEngine: continuous batching agrees with the reference generator, whatever the schedule.

Every engine run here goes through ``drive``, which checks the block manager's invariants
after every step and that every block is free at the end (no leaks).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pytest
import torch

from kilnlm.engine import EngineConfig, LLMEngine, QueueFull, RequestOutput, batch_invariant
from kilnlm.errors import InvalidArgumentError
from kilnlm.generate import generate
from kilnlm.model import ModelConfig, Transformer
from kilnlm.sampling import SamplingParams

V = 2048  # test-1m vocabulary


def make_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig.from_preset("test-1m")).eval()


@pytest.fixture(scope="module")
def model() -> Transformer:
    return make_model(0)


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def decode(ids: list[int]) -> str:
    """A toy detokenizer: one letter per id (enough to exercise stop strings)."""
    return "".join(chr(ord("a") + i % 26) for i in ids)


@dataclass
class Result:
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    text: str = ""
    outputs: list[RequestOutput] = field(default_factory=list)

    @property
    def final(self) -> RequestOutput:
        return self.outputs[-1]


def collect(results: dict[str, Result], outputs: list[RequestOutput]) -> None:
    for out in outputs:
        r = results.setdefault(out.request_id, Result())
        assert not (r.outputs and r.outputs[-1].finished), "output after the finished one"
        r.token_ids += out.token_ids
        r.logprobs += out.logprobs or []
        r.text += out.text or ""
        r.outputs.append(out)


def drive(engine: LLMEngine, arrivals: dict[int, list[tuple]] | None = None) -> dict[str, Result]:
    """Step to the end; arrivals[step] = [(request_id, prompt, params), ...] join at that step."""
    arrivals = arrivals or {}
    results: dict[str, Result] = {}
    step = 0
    while engine.has_unfinished() or any(s >= step for s in arrivals):
        for args in arrivals.get(step, []):
            engine.add_request(*args)
        collect(results, engine.step())
        engine.blocks.check(engine.scheduler.live_sequences())
        step += 1
        assert step < 5000
    assert engine.blocks.num_free == engine.blocks.num_blocks, "blocks leaked"
    assert all(c == 0 for c in engine.blocks.ref_count)
    return results


def run_all(engine: LLMEngine, requests: list[tuple[str, list[int], SamplingParams]]) -> dict:
    return drive(engine, {0: requests})


def reference(model: Transformer, p: list[int], params: SamplingParams, **kw):
    """kilnlm.generate (cached path) under the engine's numerics: bitwise the same logits."""
    with batch_invariant():
        return generate(model, p, params, **kw)


MIXED = [  # prompt length, max_tokens, params
    (3, 12, dict(temperature=0)),
    (40, 5, dict(temperature=0, logprobs=3)),
    (17, 20, dict(temperature=0.9, top_p=0.9, seed=7)),
    (90, 9, dict(temperature=0)),
    (1, 16, dict(temperature=0, repetition_penalty=1.3)),
    (25, 14, dict(temperature=1.2, top_k=50, seed=11, logprobs=2)),
    (64, 3, dict(temperature=0)),
]


def mixed_requests() -> list[tuple[str, list[int], SamplingParams]]:
    return [
        (f"r{i}", prompt(n, i), SamplingParams(max_tokens=m, **kw))
        for i, (n, m, kw) in enumerate(MIXED)
    ]


def test_greedy_and_seeded_output_equal_reference_generation_in_a_mixed_batch(model):
    engine = LLMEngine(model, EngineConfig(kv_budget_mib=2, max_num_batched_tokens=48))
    requests = mixed_requests()
    results = run_all(engine, requests)
    for rid, p, params in requests:
        ref = reference(model, p, params)
        got = results[rid]
        assert got.token_ids == ref.token_ids, rid
        assert got.final.finish_reason == ref.finish_reason
        if params.logprobs is not None:
            assert [(e.token_id, e.logprob, e.top) for e in got.logprobs] == [
                (e.token_id, e.logprob, e.top) for e in ref.logprobs
            ]
        if params.greedy:  # and the plain reference (library kernels) agrees on greedy tokens
            assert got.token_ids == generate(model, p, params).token_ids, rid
    assert engine.stats()["num_steps"] > 5  # it really was batched over several steps


def test_chunked_prefill_gives_the_same_tokens_as_one_shot_prefill(model):
    requests = mixed_requests()
    one_shot = run_all(
        LLMEngine(model, EngineConfig(kv_budget_mib=2, max_num_batched_tokens=512)), requests
    )
    chunked_engine = LLMEngine(
        model, EngineConfig(kv_budget_mib=2, max_num_batched_tokens=8, max_num_seqs=4)
    )
    chunked = run_all(chunked_engine, requests)
    assert {k: v.token_ids for k, v in chunked.items()} == {
        k: v.token_ids for k, v in one_shot.items()
    }
    assert chunked_engine.num_steps > 90 // 8  # the 90-token prompt took many chunks


def test_running_decodes_continue_while_a_long_prompt_is_chunked(model):
    engine = LLMEngine(
        model, EngineConfig(kv_budget_mib=2, max_num_batched_tokens=16, max_num_seqs=4)
    )
    engine.add_request("short", prompt(4, 1), SamplingParams(temperature=0, max_tokens=30))
    engine.step()
    engine.add_request("long", prompt(200, 2), SamplingParams(temperature=0, max_tokens=2))
    news = [{o.request_id for o in engine.step()} for _ in range(8)]
    assert all("short" in n for n in news)  # a token every step while "long" prefills
    drive(engine)


def test_preemption_under_a_tiny_budget_gives_the_same_tokens(model):
    requests = mixed_requests()
    ample = run_all(LLMEngine(model, EngineConfig(kv_budget_mib=2)), requests)
    # 8 blocks of 16 tokens for 7 requests that need up to 7 blocks each
    tiny = LLMEngine(
        model, EngineConfig(kv_budget_mib=8 * 16 * 1024 / 2**20, max_num_batched_tokens=64)
    )
    assert tiny.blocks.num_blocks == 8
    squeezed = run_all(tiny, requests)
    assert tiny.stats()["num_preemptions"] > 0
    for rid, res in squeezed.items():  # streams neither repeat nor lose tokens
        assert res.token_ids == ample[rid].token_ids, rid
        assert res.final.num_completion_tokens == len(res.token_ids)


def test_prefix_reuse_gives_the_same_tokens_and_hits(model):
    system = prompt(48, 99)  # three full blocks shared by every request
    requests = [
        (f"q{i}", system + prompt(5 + i, 200 + i), SamplingParams(temperature=0, max_tokens=6))
        for i in range(4)
    ]
    cached_engine = LLMEngine(model, EngineConfig(kv_budget_mib=2))
    first = drive(cached_engine, {0: requests[:1], 3: requests[1:]})
    uncached = drive(
        LLMEngine(model, EngineConfig(kv_budget_mib=2, enable_prefix_caching=False)),
        {0: requests[:1], 3: requests[1:]},
    )
    assert {k: v.token_ids for k, v in first.items()} == {
        k: v.token_ids for k, v in uncached.items()
    }
    assert cached_engine.stats()["prefix_hit_tokens"] == 3 * 48


@pytest.mark.parametrize("arrival", [0, 2, 5])
def test_seeded_request_is_batch_invariant(model, arrival):
    """One seeded sampled request: alone, and joining different batches at different steps."""
    target = (
        "t",
        prompt(21, 5),
        SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=24, logprobs=1),
    )
    alone = run_all(LLMEngine(model, EngineConfig(kv_budget_mib=2)), [target])["t"]
    others = [
        (
            f"o{i}",
            prompt(7 + 13 * i, 50 + i + arrival),
            SamplingParams(temperature=0.7, max_tokens=10 + i),
        )
        for i in range(3 + arrival)
    ]
    engine = LLMEngine(model, EngineConfig(kv_budget_mib=2, max_num_batched_tokens=24 + arrival))
    crowded = drive(engine, {0: others[:2], arrival: [target], arrival + 1: others[2:]})["t"]
    assert crowded.token_ids == alone.token_ids
    assert [e.logprob for e in crowded.logprobs] == [e.logprob for e in alone.logprobs]


def test_unseeded_request_reports_a_seed_that_reproduces_it(model):
    engine = LLMEngine(model, EngineConfig(kv_budget_mib=1))
    first = run_all(engine, [("a", prompt(9, 3), SamplingParams(temperature=1.0, max_tokens=12))])[
        "a"
    ]
    seed = first.final.seed
    again = run_all(
        engine, [("b", prompt(9, 3), SamplingParams(temperature=1.0, max_tokens=12, seed=seed))]
    )
    assert again["b"].token_ids == first.token_ids


def test_beam_search_equals_reference_and_frees_forked_blocks(model):
    beams = SamplingParams(num_beams=3, max_tokens=10, length_penalty=0.8, logprobs=2)
    p = prompt(19, 8)
    engine = LLMEngine(model, EngineConfig(kv_budget_mib=2, max_num_batched_tokens=32))
    results = run_all(engine, [("beam", p, beams), *mixed_requests()[:3]])
    ref = reference(model, p, beams)
    assert results["beam"].token_ids == ref.token_ids
    assert results["beam"].final.finish_reason == ref.finish_reason
    assert [e.token_id for e in results["beam"].logprobs] == ref.token_ids
    assert len(results["beam"].outputs) == 1  # beams are not streamed: one final output
    assert engine.stats()["cow_copies"] > 0  # forked beams copied their shared last block


def test_stop_strings_cut_text_and_ids_like_the_reference(model):
    p = prompt(6, 7)  # its greedy continuation has no repeats
    full = reference(model, p, SamplingParams(temperature=0, max_tokens=20), decode=decode)
    stop = full.text[7:9]  # a string the greedy continuation is known to produce
    params = SamplingParams(temperature=0, max_tokens=20, stop=[stop, "zzzzzz"])
    ref = reference(model, p, params, decode=decode)
    got = run_all(
        LLMEngine(model, EngineConfig(kv_budget_mib=1), decode=decode), [("s", p, params)]
    )["s"]
    assert ref.finish_reason == "stop" and ref.stop_reason == stop
    assert got.token_ids == ref.token_ids and got.text == ref.text
    assert got.final.stop_reason == stop and stop not in got.text


def test_a_tiny_temperature_is_greedy_in_engine_and_reference(model):
    """1e-40 used to pass validation and divide the logits into NaN: token 0 every step."""
    p = prompt(9, 4)
    greedy = reference(model, p, SamplingParams(temperature=0, max_tokens=12)).token_ids
    tiny = SamplingParams(temperature=1e-40, max_tokens=12, seed=3)
    assert reference(model, p, tiny).token_ids == greedy
    assert generate(model, p, tiny, use_cache=False).token_ids == greedy  # the naive path too
    engine = LLMEngine(model, EngineConfig(kv_budget_mib=1))
    assert run_all(engine, [("t", p, tiny)])["t"].token_ids == greedy
    assert 0 not in greedy[:3]


def test_streaming_with_stop_strings_decodes_linearly(model):
    """The engine thread decodes only each request's new tail (the stop check, the hold-back
    and the streamed text), not the whole output every step."""
    decoded = []

    def counting(ids: list[int]) -> str:
        decoded.append(len(ids))
        return decode(ids)

    p, params = prompt(5, 2), SamplingParams(temperature=0, max_tokens=120, stop=["#!"])
    engine = LLMEngine(model, EngineConfig(kv_budget_mib=1), decode=counting)
    r = run_all(engine, [("s", p, params)])["s"]
    assert len(r.token_ids) == 120 and r.text == decode(r.token_ids)
    assert sum(decoded) <= 6 * 120, sum(decoded)


def test_stop_tokens_eos_and_lengths(model):
    p = prompt(6, 7)  # its greedy continuation has no repeats
    greedy = reference(model, p, SamplingParams(temperature=0, max_tokens=10)).token_ids
    eos = greedy[4]
    engine = LLMEngine(model, EngineConfig(kv_budget_mib=1), eos_id=eos)
    r = run_all(
        engine,
        [
            ("eos", p, SamplingParams(temperature=0, max_tokens=10)),
            ("stop", p, SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[greedy[2]])),
        ],
    )
    assert (r["eos"].token_ids, r["eos"].final.finish_reason) == (
        greedy[: greedy.index(eos)],
        "eos",
    )
    assert r["stop"].final.finish_reason == "stop" and r["stop"].final.stop_reason == greedy[2]
    assert r["stop"].token_ids == greedy[: greedy.index(greedy[2])]


def test_abort_and_deadline_free_blocks_within_one_step(model):
    engine = LLMEngine(model, EngineConfig(kv_budget_mib=1))
    for i in range(3):
        engine.add_request(f"r{i}", prompt(30, i), SamplingParams(max_tokens=50))
    engine.add_request(
        "late", prompt(30, 9), SamplingParams(max_tokens=50), deadline=time.monotonic() + 3600
    )
    for _ in range(3):
        engine.step()
    assert engine.blocks.num_used > 0
    assert engine.abort("r0") and not engine.abort("nope")
    engine.requests["late"].deadline = time.monotonic()  # its deadline passes now
    engine.add_request(
        "queued", prompt(5, 1), SamplingParams(max_tokens=5), deadline=time.monotonic() - 1
    )
    finals = {o.request_id: o for o in engine.step() if o.finished}
    assert finals["r0"].finish_reason == "abort"
    assert finals["late"].finish_reason == "deadline" and finals["late"].num_completion_tokens > 0
    assert finals["queued"].finish_reason == "deadline"
    for rid in ("r1", "r2"):
        engine.abort(rid)
    assert engine.blocks.num_used == 0  # freed at once, final outputs come with the next step
    assert {o.finish_reason for o in engine.step()} == {"abort"}
    assert not engine.has_unfinished()


def test_bad_input_names_the_field_and_a_full_queue_raises(model):
    engine = LLMEngine(model, EngineConfig(kv_budget_mib=1, max_queue=2, max_tokens_limit=64))
    ok = SamplingParams(max_tokens=4)
    cases = [
        ("prompt", [], ok),
        ("prompt", [1, V], ok),
        ("prompt", list(range(256)), ok),  # fills the context
        ("max_tokens", [1, 2], SamplingParams(max_tokens=65)),  # over the server's limit
        ("max_tokens", list(range(250)), SamplingParams(max_tokens=10)),  # past the context
        ("stop", [1], SamplingParams(stop=["x"])),  # no decode: stop strings impossible
    ]
    for field_name, ids, params in cases:
        with pytest.raises(InvalidArgumentError, match=rf"^{field_name}") as err:
            engine.add_request("x", ids, params)
        assert err.value.field == field_name
    engine.add_request("a", [1], ok)
    with pytest.raises(ValueError, match=r"^request_id"):
        engine.add_request("a", [1], ok)
    engine.add_request("b", [1], ok)
    with pytest.raises(QueueFull):
        engine.add_request("c", [1], ok)
    drive(engine)
    engine.add_request("c", [1], ok)  # serving goes on
    assert drive(engine)["c"].final.finish_reason == "length"


def test_sliding_window_model_equals_reference():
    torch.manual_seed(3)
    windowed = Transformer(ModelConfig.from_preset("test-1m", sliding_window=12)).eval()
    requests = mixed_requests()[:4]
    results = run_all(
        LLMEngine(windowed, EngineConfig(kv_budget_mib=2, max_num_batched_tokens=32)), requests
    )
    for rid, p, params in requests:
        assert results[rid].token_ids == reference(windowed, p, params).token_ids, rid


def test_config_validation_and_kv_budget(model):
    for field_name, kwargs in [
        ("block_size", dict(block_size=0)),
        ("max_num_seqs", dict(max_num_seqs=0)),
        ("kv_budget_mib", dict(kv_budget_mib=-1)),
        ("kv_budget_fraction", dict(kv_budget_fraction=1.5)),
        ("swap_mode", dict(swap_mode="hot")),
        ("dtype", dict(dtype="int8")),
    ]:
        with pytest.raises(ValueError, match=rf"^{field_name}"):
            EngineConfig(**kwargs)
    engine = LLMEngine(model, EngineConfig(kv_budget_mib=1))
    stats = engine.stats()
    assert (
        stats["kv_bytes_per_token"] == 2 * 2 * 2 * 32 * 4
    )  # 2 · layers · kv heads · d_head · fp32
    assert stats["kv_budget_bytes"] == 2**20 and stats["total_blocks"] == 2**20 // (16 * 1024)
    by_fraction = LLMEngine(model, EngineConfig(kv_budget_fraction=0.5, max_num_seqs=4)).stats()
    assert by_fraction["total_blocks"] == 2 * 4 * 256 // 16  # capped at what 2x4 full contexts use


# --------------------------------------------------------------------------------------------
# Hot-swap


def test_hot_swap_double_running_request_keeps_its_version(model):
    new_model = make_model(1)
    p_old, p_new = prompt(10, 1), prompt(12, 2)
    params = SamplingParams(temperature=0, max_tokens=12)
    engine = LLMEngine(make_model(0), EngineConfig(kv_budget_mib=1, swap_mode="double"))
    engine.add_request("old", p_old, params)
    results: dict[str, Result] = {}
    for _ in range(3):
        collect(results, engine.step())
    assert engine.stage(new_model.state_dict(), version=2) >= 0
    engine.commit(2)
    engine.add_request("new", p_new, params)
    collect(results, engine.step())  # the boundary: both versions run in this step
    assert engine.stats()["loaded_versions"] == [1, 2]
    for r in drive(engine).values():
        collect(results, r.outputs)
    assert {o.version for o in results["old"].outputs} == {1}
    assert {o.version for o in results["new"].outputs} == {2}
    assert results["old"].token_ids == reference(model, p_old, params).token_ids
    assert results["new"].token_ids == reference(new_model, p_new, params).token_ids
    stats = engine.stats()
    assert stats["loaded_versions"] == [2] and stats["serving_version"] == 2  # old weights dropped
    swap = stats["last_swap"]
    assert swap["mode"] == "double" and swap["from_version"] == 1 and swap["overlap_s"] is not None


def test_failed_stage_leaves_serving_untouched(model):
    engine = LLMEngine(make_model(0), EngineConfig(kv_budget_mib=1))
    bad = make_model(1).state_dict()
    bad["blocks.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"blocks\.1\.mlp\.up_proj\.weight"):
        engine.stage(bad, version=2)
    del bad["blocks.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match="missing"):
        engine.stage(bad, version=2)
    with pytest.raises(ValueError, match="not staged"):
        engine.commit(2)
    p, params = prompt(8, 3), SamplingParams(temperature=0, max_tokens=6)
    r = run_all(engine, [("a", p, params)])["a"]
    assert r.final.version == 1 and r.token_ids == reference(model, p, params).token_ids
    assert engine.stats()["staged_version"] is None and engine.stats()["loaded_versions"] == [1]
    engine.stage(make_model(1), version=2)
    assert engine.abort_stage() and engine.stats()["staged_version"] is None


def test_hot_swap_drain_new_requests_wait_for_the_old_version(model):
    new_model = make_model(1)
    p_old, p_new = prompt(10, 1), prompt(12, 2)
    params = SamplingParams(temperature=0, max_tokens=8)
    engine = LLMEngine(make_model(0), EngineConfig(kv_budget_mib=1, swap_mode="drain"))
    engine.add_request("old", p_old, params)
    engine.step()
    engine.stage(new_model, version=2)
    engine.commit(2)
    engine.add_request("new", p_new, params)
    results: dict[str, Result] = {}
    while "old" not in results or not results["old"].final.finished:
        collect(results, engine.step())
        assert "new" not in results  # waits at the boundary
        assert engine.stats()["loaded_versions"] == [1]  # one weight set on the device
    rest = drive(engine)
    assert {o.version for o in results["old"].outputs} == {1}
    assert {o.version for o in rest["new"].outputs} == {2}
    assert rest["new"].token_ids == reference(new_model, p_new, params).token_ids
    swap = engine.stats()["last_swap"]
    assert swap["mode"] == "drain" and swap["wait_s"] > 0 and swap["to_version"] == 2
