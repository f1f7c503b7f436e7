"""The gRPC gateway over real gRPC on loopback, with a real engine behind it but no Ray.

The gateway delegates to a ``Backend``; here that is a ``ServingModel`` in-process (the same
class each Serve replica wraps), so every row of DESIGN.md's status table, health, reflection,
TLS, cancellation and deadlines are checked in seconds. ``test_serving.py`` repeats the
end-to-end paths through Ray Serve.
"""

from __future__ import annotations

import asyncio
import io
import math
import subprocess
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from ray.exceptions import RayTaskError
from serving_utils import LoopThread, make_checkpoint, wait_until

from kilnlm import checkpoint
from kilnlm.actors.gateway import (
    invalid_utf8_field,
    sampling_from_proto,
    start_gateway,
    status_of,
    to_request,
)
from kilnlm.actors.protocol import (
    DeadlineExceededError,
    NoModelError,
    VersionMismatchError,
    VersionUnavailableError,
)
from kilnlm.actors.serving_model import ServingModel
from kilnlm.client import AsyncClient, Client
from kilnlm.engine import EngineConfig, QueueFull
from kilnlm.errors import InvalidArgumentError
from kilnlm.eval import token_logprobs
from kilnlm.generate import generate as reference_generate
from kilnlm.proto import admin_pb2, admin_pb2_grpc
from kilnlm.proto import generation_pb2 as pb
from kilnlm.sampling import SamplingParams
from kilnlm.serving_config import ServeConfig

MAX_TOKENS_LIMIT = 240
ENGINE = EngineConfig(kv_budget_mib=4, max_num_seqs=16, max_tokens_limit=MAX_TOKENS_LIMIT)
TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "v1", version=1)


@pytest.fixture(scope="module")
def loop():
    loop = LoopThread()
    yield loop
    loop.stop()


def _serve(loop, config, ckpt=None):
    model = ServingModel(config)
    if ckpt is not None:
        loop.run(model.load(str(ckpt)))
    return model, loop.run(start_gateway(model, config))


@pytest.fixture(scope="module")
def server(loop, ckpt):
    """A gateway with the v1 checkpoint loaded: (ServingModel, GatewayServer)."""
    config = ServeConfig(port=0, admin_token=TOKEN, health_poll_s=0.05, engine=ENGINE)
    model, gateway = _serve(loop, config, ckpt)
    yield model, gateway
    loop.run(gateway.stop(None))
    model.shutdown()


@pytest.fixture(scope="module")
def client(server):
    with Client(server[1].address, timeout=30) as c:
        yield c


def _info(model, loop):
    return loop.run(model.info())


# --------------------------------------------------------------------------------------------
# Pure pieces: wire walker, conversion, status mapping


def test_invalid_utf8_field_names_the_nested_field():
    ok = pb.ChatRequest(
        messages=[pb.ChatMessage(role=pb.ROLE_USER, content="hé"), pb.ChatMessage(content="añb")]
    ).SerializeToString()
    bad = ok.replace("ñ".encode(), b"\xff")
    assert invalid_utf8_field(pb.ChatRequest.DESCRIPTOR, ok) is None
    assert invalid_utf8_field(pb.ChatRequest.DESCRIPTOR, bad) == "messages[1].content"
    prompt = pb.GenerateRequest(
        prompt="é", sampling=pb.SamplingParams(stop=["x"])
    ).SerializeToString()
    assert (
        invalid_utf8_field(pb.GenerateRequest.DESCRIPTOR, prompt.replace("é".encode(), b"\xc3"))
        == "prompt"
    )


def test_chat_defaults_apply_only_to_unset_fields():
    chat = sampling_from_proto(pb.SamplingParams(), chat=True)
    assert (chat.temperature, chat.top_p) == (0.7, 0.9)
    greedy = sampling_from_proto(pb.SamplingParams(temperature=0.0), chat=True)
    assert (greedy.temperature, greedy.top_p) == (0.0, 0.9)  # explicit 0 is not "unset"
    plain = sampling_from_proto(pb.SamplingParams(), chat=False)
    assert (plain.temperature, plain.top_p) == (1.0, 1.0)


def test_to_request_carries_deadline_versions_and_messages():
    msg = pb.ChatRequest(
        messages=[
            pb.ChatMessage(role=pb.ROLE_SYSTEM, content="s"),
            pb.ChatMessage(role=pb.ROLE_USER, content="u"),
        ],
        min_version=3,
    )
    req = to_request(msg, deadline=123.0)
    assert req.messages == [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    assert (req.deadline, req.min_version, req.pin_version, req.prompt) == (123.0, 3, None, None)
    assert req.request_id  # made up when the client sent none


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (InvalidArgumentError("temperature must be >= 0"), grpc.StatusCode.INVALID_ARGUMENT),
        (ValueError("a bug, not the client's input"), grpc.StatusCode.INTERNAL),
        (QueueFull("queue full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (NoModelError("no model"), grpc.StatusCode.UNAVAILABLE),
        (VersionUnavailableError("v"), grpc.StatusCode.UNAVAILABLE),
        (VersionMismatchError("v"), grpc.StatusCode.FAILED_PRECONDITION),
        (DeadlineExceededError("late"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (RuntimeError("bug"), grpc.StatusCode.INTERNAL),
    ],
)
def test_status_of_maps_each_error(exc, code):
    assert status_of(exc).code == code


def test_status_of_unwraps_a_replica_error_and_hints_retry():
    """An InvalidArgumentError raised in a replica arrives wrapped in Ray's RayTaskError."""
    cause = InvalidArgumentError("prompt is too long", "prompt")
    wrapped = RayTaskError("generate", "Traceback ...", cause)
    status = status_of(wrapped)
    assert (
        status.code == grpc.StatusCode.INVALID_ARGUMENT and status.details == "prompt is too long"
    )
    full = status_of(QueueFull("full"), retry_after_ms=700)
    assert dict(full.trailers) == {"retry-after-ms": "700", "grpc-retry-pushback-ms": "700"}


class _BuggyModel(ServingModel):
    """A replica whose Score hits an internal bug that happens to be a ValueError."""

    async def score(self, request):
        raise ValueError("index 7 is out of range (an internal bug, not the client's input)")


def test_an_internal_value_error_is_internal_with_a_request_id_never_invalid_argument(
    loop, ckpt, caplog
):
    config = ServeConfig(port=0, admin_token=TOKEN, engine=ENGINE)
    model = _BuggyModel(config)
    loop.run(model.load(str(ckpt)))
    gateway = loop.run(start_gateway(model, config))
    try:
        with Client(gateway.address, timeout=30) as c, pytest.raises(grpc.RpcError) as e:
            c.score("The kiln")
        assert e.value.code() == grpc.StatusCode.INTERNAL
        request_id = e.value.details().rsplit("request id ", 1)[1]
        assert "ValueError" in e.value.details() and len(request_id) >= 12
        logged = [r for r in caplog.records if request_id in r.getMessage()]
        assert logged and logged[0].exc_info is not None, "the trace is logged under that id"
    finally:
        loop.run(gateway.stop(None))
        model.shutdown()


# --------------------------------------------------------------------------------------------
# Bad input over gRPC: INVALID_ARGUMENT naming the field, and the server keeps serving

BAD_SAMPLING = [
    ({"temperature": -0.5}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": MAX_TOKENS_LIMIT + 1}, "max_tokens"),
    ({"num_beams": 0}, "num_beams"),
    ({"logprobs": 99}, "logprobs"),
]


@pytest.mark.parametrize(("sampling", "field"), BAD_SAMPLING)
def test_out_of_range_parameter_is_invalid_argument_naming_it(client, sampling, field):
    for call in (client.generate, lambda *a, **k: list(client.generate_stream(*a, **k))):
        with pytest.raises(grpc.RpcError) as e:
            call("The kiln", **sampling)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details().startswith(field), e.value.details()


def test_bad_prompts_are_invalid_argument_naming_the_field(client, server):
    cases = [
        (lambda: client.generate(""), "prompt"),
        (lambda: client.generate("kiln " * 400, max_tokens=1), "prompt"),  # > 256 positions
        (lambda: client.chat([]), "messages"),
        (lambda: client.chat([{"role": "user", "content": "kiln " * 400}]), "messages"),
        (lambda: client.score(""), "text"),
    ]
    for call, field in cases:
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert e.value.details().startswith(field), e.value.details()


@pytest.mark.parametrize("method", ["Generate", "GenerateStream", "Chat"])
def test_non_utf8_text_is_invalid_argument_naming_the_field(server, method):
    """Another language's client can send any bytes in a string field; protobuf refuses to parse
    them, and the gateway still answers INVALID_ARGUMENT with the field's path."""
    if method == "Chat":
        msg = pb.ChatRequest(messages=[pb.ChatMessage(role=pb.ROLE_USER, content="é")])
        field = "messages[0].content"
    else:
        msg, field = pb.GenerateRequest(prompt="é"), "prompt"
    raw = msg.SerializeToString().replace("é".encode(), b"\xff\xfe")
    with grpc.insecure_channel(server[1].address) as channel:
        kind = channel.unary_unary if method == "Generate" else channel.unary_stream
        call = kind(
            f"/kiln.v1.Generation/{method}", request_serializer=None, response_deserializer=None
        )
        with pytest.raises(grpc.RpcError) as e:
            response = call(raw, timeout=10)
            list(response) if method != "Generate" else None
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith(field), e.value.details()


def test_unknown_role_is_invalid_argument(server):
    with Client(server[1].address) as c, pytest.raises(grpc.RpcError) as e:
        list(c.stub.Chat(pb.ChatRequest(messages=[pb.ChatMessage(content="hi")]), timeout=10))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith("messages[0].role")


def test_server_keeps_serving_after_bad_input(client):
    for sampling, _ in BAD_SAMPLING:
        with pytest.raises(grpc.RpcError):
            client.generate("The kiln", **sampling)
    done = client.generate("The kiln", max_tokens=4, temperature=0)
    assert len(done.token_ids) == 4 and client.health() == "SERVING"


# --------------------------------------------------------------------------------------------
# Generation: equal to the library's reference, streaming, seeds, chat, score, info


def test_streamed_greedy_equals_the_reference_generation(client, ckpt):
    """The stream through gRPC gives the tokens of kilnlm.generate's cached greedy decoding."""
    model = checkpoint.load(ckpt)
    tok = checkpoint.load_tokenizer(ckpt)
    prompt = "The kiln fires clay"
    params = SamplingParams(temperature=0, max_tokens=24)
    expected = reference_generate(
        model, tok.encode(prompt), params, eos_id=tok.eos_id, decode=tok.decode
    )
    deltas = list(client.generate_stream(prompt, temperature=0, max_tokens=24))
    ids = [t for d in deltas for t in d.token_ids]
    assert ids == expected.token_ids
    assert "".join(d.text for d in deltas) == tok.decode(ids) == expected.text
    assert [d.finish is not None for d in deltas] == [False] * (len(deltas) - 1) + [True]
    finish = deltas[-1].finish
    assert (finish.finish_reason, finish.completion_tokens, finish.model_version) == (
        "length",
        24,
        1,
    )
    assert finish.prompt_tokens == len(tok.encode(prompt))
    unary = client.generate(prompt, temperature=0, max_tokens=24)
    assert unary.token_ids == ids and unary.text == expected.text


def test_request_ids_are_labels_echoed_back_even_when_shared(client):
    """Two requests may carry the same request_id (clients pick them); both run, both echo it."""
    streams = [
        client.generate_stream("The kiln", temperature=0, max_tokens=60, request_id="mine")
        for _ in range(2)
    ]
    firsts = [next(s) for s in streams]  # both are in the engine now
    finishes = [[first, *s][-1].finish for first, s in zip(firsts, streams, strict=True)]
    assert [(f.request_id, f.completion_tokens) for f in finishes] == [("mine", 60)] * 2


def test_seed_is_reported_and_reproduces_the_tokens(client):
    first = client.generate("The kiln", temperature=1.0, max_tokens=12)
    again = client.generate("The kiln", temperature=1.0, max_tokens=12, seed=first.finish.seed)
    assert again.token_ids == first.token_ids and again.finish.seed == first.finish.seed


def test_logprobs_are_returned_per_token(client):
    out = client.generate("The kiln", temperature=0, max_tokens=5, logprobs=3)
    assert len(out.logprobs) == 5
    for token_id, lp in zip(out.token_ids, out.logprobs, strict=True):
        assert lp["token_id"] == token_id and lp["logprob"] <= 0 and len(lp["top"]) == 3
        assert lp["top"][0][0] == token_id  # greedy picks the most likely


def test_chat_streams_a_reply_with_chat_defaults(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    reply = client.chat(messages, max_tokens=6, seed=5)
    again = client.chat(messages, max_tokens=6, seed=5, temperature=0.7, top_p=0.9)
    assert reply.token_ids == again.token_ids  # unset temperature/top_p = 0.7/0.9
    assert reply.finish.completion_tokens == 6


def test_score_matches_eval_token_logprobs(client, ckpt):
    text = "The kiln fires clay into stone."
    result = client.score(text)
    model, tok = checkpoint.load(ckpt), checkpoint.load_tokenizer(ckpt)
    expected = token_logprobs(model, [tok.bos_id, *tok.encode(text)])
    assert result.token_ids == tok.encode(text)
    assert result.logprobs == pytest.approx(expected.tolist(), abs=1e-5)
    nll = -sum(result.logprobs)
    assert result.perplexity == pytest.approx(math.exp(nll / len(result.logprobs)))
    assert result.bits_per_byte == pytest.approx(nll / math.log(2) / len(text.encode()))


def test_model_info_reports_version_context_and_kv_budget(client):
    info = client.model_info()
    kv = info["kv_cache"]
    assert (info["version"], info["context_length"], info["config"]["n_layer"]) == (1, 256, 2)
    # 2 · n_layer · n_kv_head · head_dim · 4 bytes = 2·2·2·32·4
    assert kv["bytes_per_token"] == 1024
    assert kv["budget_bytes"] == kv["blocks_total"] * kv["block_size"] * kv["bytes_per_token"]
    assert kv["budget_bytes"] <= 4 * 2**20 and info["max_tokens_limit"] == MAX_TOKENS_LIMIT


def test_async_client_streams(server):
    async def run():
        async with AsyncClient(server[1].address) as c:
            deltas = [d async for d in c.generate_stream("The kiln", temperature=0, max_tokens=5)]
            return deltas, await c.health()

    deltas, health = asyncio.run(run())
    assert sum(len(d.token_ids) for d in deltas) == 5 and health == "SERVING"


# --------------------------------------------------------------------------------------------
# Cancellation and deadlines free the sequence's blocks


def _idle(model, loop):
    info = _info(model, loop)
    return info.running == 0 and info.waiting == 0 and info.blocks_used == 0


def test_client_cancel_stops_generation_and_frees_blocks(client, server, loop):
    model = server[0]
    before = _info(model, loop).generated_tokens
    stream = client.generate_stream("The kiln", temperature=0, max_tokens=MAX_TOKENS_LIMIT)
    next(stream), next(stream)
    assert _info(model, loop).running == 1 and _info(model, loop).blocks_used > 0
    stream.close()  # cancels the RPC
    assert wait_until(lambda: _idle(model, loop), timeout=2), _info(model, loop)
    assert _info(model, loop).generated_tokens - before < MAX_TOKENS_LIMIT // 2


def test_deadline_is_deadline_exceeded_and_frees_blocks(client, server, loop):
    model = server[0]
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        list(
            client.generate_stream(
                "The kiln", temperature=0, max_tokens=MAX_TOKENS_LIMIT, timeout=0.3
            )
        )
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - start < 2
    assert wait_until(lambda: _idle(model, loop), timeout=2), _info(model, loop)


# --------------------------------------------------------------------------------------------
# No model, health, admin auth, reflection, queue full, TLS, hot-swap


def test_no_model_is_unavailable_and_health_turns_serving_on_load(loop, ckpt):
    config = ServeConfig(port=0, health_poll_s=0.05, engine=ENGINE)
    model, gateway = _serve(loop, config)
    try:
        with grpc.insecure_channel(gateway.address) as channel, Client(gateway.address) as c:
            health = health_pb2_grpc.HealthStub(channel)
            watch = health.Watch(health_pb2.HealthCheckRequest(service="kiln.v1.Generation"))
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert c.health() == "NOT_SERVING"
            for call in (lambda: c.generate("hi"), lambda: c.score("hi")):
                with pytest.raises(grpc.RpcError) as e:
                    call()
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            assert c.model_info()["version"] == 0
            loop.run(model.load(str(ckpt)))
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            watch.cancel()
            assert c.health() == "SERVING" and c.health("kiln.v1.Generation") == "SERVING"
            assert c.generate("hi", max_tokens=2).finish.model_version == 1
    finally:
        loop.run(gateway.stop(None))
        model.shutdown()


def test_admin_calls_need_the_bearer_token(server):
    with grpc.insecure_channel(server[1].address) as channel:
        admin = admin_pb2_grpc.AdminStub(channel)
        for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)):
            with pytest.raises(grpc.RpcError) as e:
                admin.Status(admin_pb2.StatusRequest(), metadata=metadata, timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as e:  # authenticated: past the gate
            admin.Status(
                admin_pb2.StatusRequest(), metadata=(("authorization", f"Bearer {TOKEN}"),)
            )
        assert e.value.code() != grpc.StatusCode.UNAUTHENTICATED


def test_reflection_lists_the_services(server):
    with grpc.insecure_channel(server[1].address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        response = next(stub.ServerReflectionInfo(iter([request]), timeout=5))
    names = {s.name for s in response.list_services_response.service}
    assert {"kiln.v1.Generation", "kiln.v1.Admin", "grpc.health.v1.Health"} <= names


def test_queue_full_is_resource_exhausted_with_a_retry_hint(loop, ckpt):
    engine = EngineConfig(
        kv_budget_mib=4, max_num_seqs=1, max_queue=1, max_tokens_limit=MAX_TOKENS_LIMIT
    )
    config = ServeConfig(port=0, retry_after_ms=321, engine=engine)
    model, gateway = _serve(loop, config, ckpt)
    try:
        with Client(gateway.address, timeout=30) as c:
            running = c.generate_stream("The kiln", temperature=0, max_tokens=MAX_TOKENS_LIMIT)
            next(running)  # the one sequence slot is taken
            waiting = threading.Thread(target=lambda: c.generate("The kiln", max_tokens=2))
            waiting.start()
            assert wait_until(lambda: _info(model, loop).waiting == 1)
            with pytest.raises(grpc.RpcError) as e:
                c.generate("The kiln", max_tokens=2)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert dict(e.value.trailing_metadata())["retry-after-ms"] == "321"
            running.close()
            waiting.join(10)
            assert c.generate("The kiln", max_tokens=2).finish.completion_tokens == 2
    finally:
        loop.run(gateway.stop(None))
        model.shutdown()


def _self_signed(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return key, cert


def test_tls_gateway_serves_tls_clients_only(loop, ckpt, tmp_path):
    key, cert = _self_signed(tmp_path)
    config = ServeConfig(port=0, tls_cert=str(cert), tls_key=str(key), engine=ENGINE)
    model, gateway = _serve(loop, config, ckpt)
    try:
        with Client(gateway.address, tls_ca=str(cert), timeout=10) as c:
            assert c.generate("The kiln", max_tokens=3).finish.completion_tokens == 3
        with Client(gateway.address, timeout=3) as plain, pytest.raises(grpc.RpcError) as e:
            plain.generate("The kiln", max_tokens=3)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        loop.run(gateway.stop(None))
        model.shutdown()


def test_hot_swap_reports_the_new_version_and_a_failed_stage_keeps_the_old(loop, ckpt, tmp_path):
    config = ServeConfig(port=0, engine=ENGINE)
    model, gateway = _serve(loop, config, ckpt)
    try:
        with Client(gateway.address, timeout=10) as c:
            broken = make_checkpoint(tmp_path / "broken", version=2, seed=2)
            (broken / "model.safetensors").write_bytes(b"not the exported weights")
            with pytest.raises(checkpoint.CheckpointError):
                loop.run(model.stage(str(broken)))
            assert c.generate("The kiln", max_tokens=2).finish.model_version == 1
            v2 = make_checkpoint(tmp_path / "v2", version=2, seed=2)
            assert loop.run(model.stage(str(v2))) == 2
            with pytest.raises(ValueError, match="not staged"):
                loop.run(model.commit(3))
            loop.run(model.commit(2))
            out = c.generate("The kiln", max_tokens=2, pin_version=2)
            assert out.finish.model_version == 2 and c.model_info()["version"] == 2
            for kwargs, code in (
                ({"pin_version": 1}, grpc.StatusCode.FAILED_PRECONDITION),
                ({"min_version": 3}, grpc.StatusCode.UNAVAILABLE),
            ):
                with pytest.raises(grpc.RpcError) as e:
                    c.generate("The kiln", max_tokens=2, **kwargs)
                assert e.value.code() == code
    finally:
        loop.run(gateway.stop(None))
        model.shutdown()


# --------------------------------------------------------------------------------------------
# The CLI's client commands against the in-process server


def test_cli_generate_chat_and_score(server, client, tmp_path, capsys, monkeypatch):
    from kilnlm.cli import main

    address = ["--address", server[1].address]
    expected = client.generate("The kiln", temperature=0, max_tokens=6)
    assert (
        main(
            [
                "generate",
                "The kiln",
                "--stream",
                "--temperature",
                "0",
                "--max-tokens",
                "6",
                *address,
            ]
        )
        == 0
    )
    out = capsys.readouterr()
    assert out.out == expected.text + "\n"
    assert "[length: 6 tokens, model version 1" in out.err

    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n/reset\nHello\nAgain\n"))
    assert main(["chat", "--max-tokens", "3", "--seed", "1", *address]) == 0
    first, after_reset, second = capsys.readouterr().out.splitlines()
    history = [{"role": "user", "content": "Hello"}]
    assert first == after_reset == client.chat(history, max_tokens=3, seed=1).text
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "Again"}]
    assert second == client.chat(history, max_tokens=3, seed=1).text  # the conversation is kept

    text = tmp_path / "text.txt"
    text.write_text("The kiln fires clay.", encoding="utf-8")
    assert main(["score", str(text), *address]) == 0
    score = client.score("The kiln fires clay.")
    assert f"perplexity {score.perplexity:.3f}" in capsys.readouterr().out

    assert main(["generate", "The kiln", "--temperature", "-1", *address]) == 1
    assert "INVALID_ARGUMENT: temperature" in capsys.readouterr().err
