"""The Infill RPC: the fill-in-the-middle prompt built by the replica, streamed and
version-tagged, over real gRPC; and end to end through Ray Serve with a model trained with FIM.
"""

from __future__ import annotations

import json
import subprocess
import sys

import grpc
import pytest
from serving_utils import LoopThread, make_checkpoint

from kilnlm import checkpoint
from kilnlm.actors.gateway import start_gateway
from kilnlm.actors.serving_model import ServingModel
from kilnlm.client import Client
from kilnlm.engine import EngineConfig
from kilnlm.fim import infill_ids
from kilnlm.generate import generate as reference_generate
from kilnlm.sampling import SamplingParams
from kilnlm.serving_config import ServeConfig

ENGINE = EngineConfig(kv_budget_mib=4, max_num_seqs=8, max_tokens_limit=64)
PREFIX, SUFFIX = "def double(x):\n", "\n\ndef half(x):\n    return x / 2\n"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("infill") / "v1", version=1)


@pytest.fixture(scope="module")
def address(ckpt):
    loop = LoopThread()
    config = ServeConfig(port=0, health_poll_s=0.05, engine=ENGINE)
    model = ServingModel(config)
    loop.run(model.load(str(ckpt)))
    gateway = loop.run(start_gateway(model, config))
    yield gateway.address
    loop.run(gateway.stop(None))
    model.shutdown()
    loop.stop()


def test_infill_streams_the_greedy_continuation_of_the_fim_prompt(address, ckpt):
    """The replica's prompt is <|fim_prefix|>prefix<|fim_suffix|>suffix<|fim_middle|>: the
    stream equals the library's greedy decoding of exactly those ids, every message tagged."""
    model, tok = checkpoint.load(ckpt), checkpoint.load_tokenizer(ckpt)
    params = SamplingParams(temperature=0, max_tokens=12)
    ids = infill_ids(tok, PREFIX, SUFFIX)
    expected = reference_generate(model, ids, params, eos_id=tok.eos_id, decode=tok.decode)
    with Client(address, timeout=30) as client:
        deltas = list(client.infill_stream(PREFIX, SUFFIX, temperature=0, max_tokens=12))
        whole = client.infill(PREFIX, SUFFIX, temperature=0, max_tokens=12)
    assert [t for d in deltas for t in d.token_ids] == expected.token_ids == whole.token_ids
    assert whole.text == expected.text
    assert all(d.model_version == 1 for d in deltas if d.token_ids)
    assert whole.finish.model_version == 1 and whole.finish.prompt_tokens == len(ids)


def test_infill_without_prefix_and_suffix_is_invalid_argument(address):
    with Client(address, timeout=30) as client, pytest.raises(grpc.RpcError) as err:
        client.infill("", "", max_tokens=4)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prefix" in err.value.details()
    with Client(address, timeout=30) as client:  # and the server keeps serving
        assert len(client.infill("", SUFFIX, temperature=0, max_tokens=3).token_ids) == 3


def test_kiln_infill_prints_the_middle_as_json(address, tmp_path):
    (tmp_path / "pre.py").write_text(PREFIX)
    (tmp_path / "suf.py").write_text(SUFFIX)
    cmd = [
        sys.executable, "-m", "kilnlm.cli.__init__", "infill", "--address", address, "--json",
        "--prefix-file", str(tmp_path / "pre.py"), "--suffix-file", str(tmp_path / "suf.py"),
        "--temperature", "0", "--max-tokens", "5",
    ]  # fmt: skip
    cmd[1:3] = ["-c", "import sys; from kilnlm.cli import main; sys.exit(main(sys.argv[1:]))"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    summary = json.loads(out)
    with Client(address, timeout=30) as client:
        middle = client.infill(PREFIX, SUFFIX, temperature=0, max_tokens=5).text
    assert summary["middle"] == middle
    assert (summary["completion_tokens"], summary["model_version"]) == (5, 1)
