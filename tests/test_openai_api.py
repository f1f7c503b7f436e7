"""The OpenAI-compatible HTTP API, driven by the official ``openai`` client (one we did not write).

One Serve application for the module: Serve's HTTP proxy on a free loopback port (not 8000),
the gRPC gateway beside it on another, one LLMServer replica behind both. Serve has one HTTP
proxy per cluster and the session's other modules run theirs without one, so this module
restarts Serve around itself.

What is checked: streamed text equals non-streamed text choice by choice, exactly one
finish_reason per choice, usage in the stream (``include_usage``) equals the whole response's,
greedy text equals the gRPC gateway's on the same replica, errors carry OpenAI's shape and the
status of the gRPC table, the model version is in every body and header, ``/v1/models`` lists
the id clients pass as ``model``.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request

import pytest
from serving_utils import make_checkpoint

from kilnlm.engine import EngineConfig
from kilnlm.serving_config import ServeConfig

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.ray

APP = "kiln-test-openai"
MODEL = "kiln-test-model"
KEY = "sk-kiln-test"
ENGINE = EngineConfig(kv_budget_mib=16, max_num_seqs=32, max_tokens_limit=200)
CHAT = [
    {"role": "system", "content": "You are a potter."},
    {"role": "user", "content": "Tell me about the kiln 🏺"},
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def deployed(ray_cluster, tmp_path_factory):
    from ray import serve

    from kilnlm.actors import serve_app

    ckpt = make_checkpoint(tmp_path_factory.mktemp("openai") / "v1", version=1)
    serve.shutdown()  # another module's Serve runs without an HTTP proxy
    config = ServeConfig(
        checkpoint=str(ckpt), port=0, http_port=free_port(), app_name=APP, engine=ENGINE,
        served_model_name=MODEL, api_key=KEY, health_poll_s=0.1,
    )  # fmt: skip
    address = serve_app.run(config)
    yield {"grpc": address, "http": serve_app.http_url(config), "config": config}
    serve.delete(APP)
    serve.shutdown()  # the next module starts Serve its own way


@pytest.fixture(scope="module")
def client(deployed):
    return openai.OpenAI(base_url=deployed["http"], api_key=KEY, max_retries=0, timeout=120)


def _raw(deployed, path: str, body: dict | None = None, key: str | None = KEY):
    """(status, headers, JSON body) of a raw HTTP call; errors included."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(deployed["http"].removesuffix("/v1") + path, data=data)
    request.add_header("content-type", "application/json")
    if key:
        request.add_header("authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def test_models_lists_the_id_clients_pass(client):
    raw = client.models.with_raw_response.list()
    models = raw.parse()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].model_extra["model_version"] == 1
    assert raw.headers["x-kiln-model-version"] == "1"
    assert client.models.retrieve(MODEL).id == MODEL


def test_health_names_the_version(deployed):
    status, headers, body = _raw(deployed, "/health", key=None)
    assert (status, body["model_version"], headers["x-kiln-model-version"]) == (200, 1, "1")


def test_greedy_completion_equals_grpc_and_its_stream(client, deployed):
    from kilnlm.client import Client

    args = {"model": MODEL, "prompt": "The kiln", "max_tokens": 24, "temperature": 0}
    raw = client.completions.with_raw_response.create(**args)
    whole = raw.parse()
    assert raw.headers["x-kiln-model-version"] == "1"
    assert whole.model_extra["model_version"] == 1
    with Client(deployed["grpc"], timeout=60) as grpc_client:
        reference = grpc_client.generate("The kiln", max_tokens=24, temperature=0)
    (choice,) = whole.choices
    assert choice.text == reference.text
    assert choice.finish_reason == "length"
    assert whole.usage.completion_tokens == 24
    assert whole.usage.prompt_tokens == reference.finish.prompt_tokens
    streamed = list(client.completions.create(**args, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == choice.text
    assert [c.choices[0].finish_reason for c in streamed if c.choices[0].finish_reason] == [
        "length"
    ]


@pytest.mark.parametrize("n", [1, 3])
def test_chat_stream_equals_whole_choice_by_choice(client, n):
    args = {
        "model": MODEL, "messages": CHAT, "max_tokens": 20, "n": n, "seed": 7,
        "temperature": 0.9, "extra_body": {"top_k": 50, "min_p": 0.01},
    }  # fmt: skip
    whole = client.chat.completions.create(**args)
    assert [c.index for c in whole.choices] == list(range(n))
    chunks = list(
        client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True})
    )
    texts, reasons = [""] * n, [[] for _ in range(n)]
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        texts[choice.index] += choice.delta.content or ""
        if choice.finish_reason is not None:
            reasons[choice.index].append(choice.finish_reason)
        assert chunk.usage is None
        assert chunk.model_extra["model_version"] == 1
    assert texts == [c.message.content for c in whole.choices]
    assert reasons == [[c.finish_reason] for c in whole.choices]  # exactly one per choice
    assert chunks[-1].choices == []
    assert chunks[-1].usage == whole.usage
    if n > 1:  # seed + i per choice: the choices differ, each reproducible
        assert len(set(texts)) > 1


def test_stop_string_ends_the_reply(client):
    whole = client.completions.create(model=MODEL, prompt="The kiln", max_tokens=30, temperature=0)
    stop = whole.choices[0].text[5:8]
    cut = client.completions.create(
        model=MODEL, prompt="The kiln", max_tokens=30, temperature=0, stop=[stop]
    )
    assert cut.choices[0].finish_reason == "stop"
    assert stop not in cut.choices[0].text
    assert whole.choices[0].text.startswith(cut.choices[0].text)


def test_logprobs_in_both_apis(client):
    chat = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens == 6
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)  # greedy: the top
    completion = client.completions.create(
        model=MODEL, prompt="The kiln", max_tokens=5, temperature=0, logprobs=2
    )
    lp = completion.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == completion.choices[0].text


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 10_000}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"extra_body": {"top_k": -2}}, "top_k"),
        ({"extra_body": {"num_beams": 0}}, "num_beams"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
    ],
)
def test_bad_fields_are_400_naming_the_param(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=CHAT, **{"max_tokens": 4, **kwargs})
    assert e.value.status_code == 400
    assert e.value.body["param"] == param
    assert e.value.body["type"] == "invalid_request_error"
    assert e.value.body["message"]


def test_unknown_model_is_404_and_bad_key_401(client, deployed):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    stranger = openai.OpenAI(base_url=deployed["http"], api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        stranger.models.list()
    assert e.value.status_code == 401
    status, _, body = _raw(deployed, "/v1/nothing")
    assert status == 404
    assert set(body["error"]) == {"message", "type", "param", "code"}


def test_the_server_keeps_serving_after_errors(client):
    for _ in range(3):
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=MODEL, prompt="", max_tokens=2)
    ok = client.completions.create(model=MODEL, prompt="The kiln", max_tokens=3, temperature=0)
    assert ok.choices[0].finish_reason == "length"


def test_error_table_mirrors_grpc():
    """Each row of DESIGN.md's status table as HTTP (no Ray needed: the mapping itself)."""
    from ray.serve.exceptions import BackPressureError

    from kilnlm.actors.openai_protocol import error_of
    from kilnlm.actors.protocol import NoModelError, VersionMismatchError
    from kilnlm.engine import QueueFull
    from kilnlm.errors import InvalidArgumentError

    assert error_of(InvalidArgumentError("top_p must be in (0, 1]", "top_p")).status == 400
    assert error_of(InvalidArgumentError("top_p must be", "top_p")).param == "top_p"
    assert error_of(VersionMismatchError("pin_version 3 is not served")).status == 400
    full = error_of(QueueFull("queue is full"), retry_after_ms=1500)
    assert (full.status, full.headers["retry-after"], full.type) == (429, "2", "rate_limit_error")
    assert error_of(BackPressureError(num_queued_requests=9, max_queued_requests=8)).status == 429
    assert error_of(NoModelError("no model")).status == 503
    assert error_of(RuntimeError("bug")).status == 500


SERIES = [
    "kiln_num_requests_running", "kiln_num_requests_waiting", "kiln_kv_cache_usage_perc",
    "kiln_time_to_first_token_seconds_bucket", "kiln_inter_token_latency_seconds_bucket",
    "kiln_e2e_request_latency_seconds_bucket", "kiln_prompt_tokens_total",
    "kiln_generation_tokens_total", "kiln_request_success_total", "kiln_model_version",
    "kiln_energy_joules_total",
]  # fmt: skip


def test_vllm_named_series_reach_rays_metrics_endpoint(client):
    """Scraped from Ray's own Prometheus endpoint (Ray adds its ``ray_`` prefix), each series
    with this app's ``model_name`` (other modules' replicas leave theirs in the same agent)."""
    import ray
    from serving_utils import wait_until

    client.completions.create(model=MODEL, prompt="The kiln", max_tokens=4, temperature=0)
    port = ray._private.worker.global_worker.node.metrics_export_port
    ours: dict[str, list[str]] = {}

    def all_there() -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            lines = r.read().decode().splitlines()
        ours.clear()
        for name in SERIES:
            ours[name] = [
                ln for ln in lines
                if ln.startswith(f"ray_{name}{{") and f'model_name="{MODEL}"' in ln
            ]  # fmt: skip
        success = ours["kiln_request_success_total"]
        return all(ours.values()) and any('finished_reason="length"' in ln for ln in success)

    assert wait_until(all_there, timeout=120, period=2), [n for n, v in ours.items() if not v]
    (version,) = ours["kiln_model_version"]
    assert float(version.rsplit(" ", 1)[1]) == 1.0


def test_grafana_dashboard_graphs_every_series():
    from pathlib import Path

    dashboard = json.loads((Path(__file__).parents[1] / "deploy" / "grafana-kiln.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    for name in SERIES:
        assert f"ray_{name.removesuffix('_bucket')}" in exprs, name


def test_http_ingress_is_the_app_root_and_leaves_the_gateway_pin_alone():
    """Serve's own build (no cluster): with http_port the ingress is the root; it does not ask
    for the head's one kiln_gateway unit, which the gRPC gateway holds."""
    from ray.serve._private.build_app import build_app

    from kilnlm.actors import serve_app

    pinned = {"kiln_gateway": 1.0}
    on = build_app(serve_app.build_app(ServeConfig(gateway_resources=pinned)), name="a")
    options = {d.name: d.ray_actor_options for d in on.deployments}
    assert on.deployments[-1].name == "OpenAIServer"  # the ingress, built last
    assert options["Gateway"]["resources"] == pinned
    assert not options["OpenAIServer"].get("resources")
    off = build_app(serve_app.build_app(ServeConfig(http_port=0)), name="b")
    assert "OpenAIServer" not in {d.name for d in off.deployments}
