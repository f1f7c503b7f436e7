"""A reward-model export served by a replica: the Reward RPC over real gRPC gives the value
``kiln reward score`` computes in-process for the same (prompt, reply), tagged with its version.

The export is made as ``kiln reward train`` makes one (an ordinary checkpoint whose manifest's
``reward_head`` names the output row read as the scalar), from a random model whose head row is
not zero, so the rewards differ pair to pair.
"""

from __future__ import annotations

import json
import subprocess
import sys

import grpc
import pytest
from serving_utils import LoopThread, make_checkpoint

from kilnlm.actors.gateway import start_gateway
from kilnlm.actors.serving_model import ServingModel
from kilnlm.checkpoint import load, load_tokenizer, save_pretrained
from kilnlm.client import Client
from kilnlm.engine import EngineConfig
from kilnlm.posttrain.reward import reward_head_field
from kilnlm.serving_config import ServeConfig

ENGINE = EngineConfig(kv_budget_mib=4, max_num_seqs=8, max_tokens_limit=32)
PAIRS = [
    {"prompt": "What does os.path.join do?", "chosen": "Join paths.", "rejected": "Sort a list."},
    {
        "prompt": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Which module provides deque?"},
        ],
        "chosen": "collections",
        "rejected": "the kiln fires clay",
    },
]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward")
    plain = make_checkpoint(root / "plain", version=1)
    tok = load_tokenizer(plain)
    head = tok.special_id("<|mask|>")
    reward = save_pretrained(
        load(plain), root / "rm", tokenizer=tok, version=2, reward_head=reward_head_field(head)
    )
    return plain, reward


def _serve(loop, path):
    config = ServeConfig(port=0, health_poll_s=0.05, engine=ENGINE)
    model = ServingModel(config)
    loop.run(model.load(str(path)))
    return model, loop.run(start_gateway(model, config))


@pytest.fixture(scope="module")
def servers(exports):
    loop = LoopThread()
    served = [_serve(loop, path) for path in exports]
    yield [gateway.address for _, gateway in served]
    for model, gateway in served:
        loop.run(gateway.stop(None))
        model.shutdown()
    loop.stop()


def _kiln_reward_score(model_dir, data) -> list[dict[str, float]]:
    code = "import sys; from kilnlm.cli import main; sys.exit(main(sys.argv[1:]))"
    cmd = [sys.executable, "-c", code, "reward", "score", "--model", str(model_dir)]
    cmd += ["--data", str(data), "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True).stdout
    return json.loads(out)


def test_served_reward_equals_kiln_reward_score(exports, servers, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    expected = _kiln_reward_score(exports[1], data)
    with Client(servers[1], timeout=60) as client:
        got = []
        for p in PAIRS:
            kind = "prompt" if isinstance(p["prompt"], str) else "messages"
            r = {k: client.reward(p[k], **{kind: p["prompt"]}) for k in ("chosen", "rejected")}
            assert {x.model_version for x in r.values()} == {2}
            got.append({k: x.reward for k, x in r.items()})
    assert len(expected) == len(got) == len(PAIRS)
    for e, g in zip(expected, got, strict=True):
        assert g == pytest.approx(e, abs=1e-5)
    assert len({round(g["chosen"], 4) for g in got} | {round(g["rejected"], 4) for g in got}) == 4


def test_reward_from_a_model_without_head_is_failed_precondition(servers):
    with Client(servers[0], timeout=60) as client, pytest.raises(grpc.RpcError) as err:
        client.reward("hi", prompt="hello")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "reward model" in err.value.details()


def test_reward_needs_exactly_one_prompt_form(servers):
    with Client(servers[1], timeout=60) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.reward("hi")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        messages = [{"role": "user", "content": "hello"}]
        assert client.reward("hi", messages=messages).reward == pytest.approx(
            client.reward("hi", prompt="hello").reward, abs=1e-6
        )
