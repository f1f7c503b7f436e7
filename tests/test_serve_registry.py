"""``kiln serve`` with its orchestrator: checkpoints from anywhere, as an operator drives them.

Real Ray Serve replicas, the real orchestrator actor and the real ``kiln`` commands over gRPC on
loopback: ``kiln serve --checkpoint A`` (A becomes version 1, promoted without reloading),
``kiln register B`` (version 2, and again version 2), ``kiln promote 2`` (the gate, then the
two-phase swap), ``kiln rollback`` (back to 1). Each step is checked by what the replicas serve:
a greedy generation names the version that produced it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from serving_utils import TEXT

from kilnlm.checkpoint import save_pretrained
from kilnlm.client import Client
from kilnlm.engine import EngineConfig
from kilnlm.model import ModelConfig, Transformer
from kilnlm.serving_config import ServeConfig
from kilnlm.tokenizer import Tokenizer

APP = "kiln-test-serve-registry"
TOKEN = "serve-registry-test-token"


def export(path: Path, tokenizer: Tokenizer, seed: int, scale: float = 1.0) -> Path:
    """A random test-1m model; ``scale`` > 1 sharpens its logits (a much worse model, so that
    the gate's perplexity margin lets the other one be promoted over it)."""
    torch.manual_seed(seed)
    cfg = ModelConfig.from_preset("test-1m", vocab_size=tokenizer.vocab_size, block_size=256)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return save_pretrained(model, path, tokenizer=tokenizer)


@dataclass
class Served:
    address: str
    a: Path
    b: Path
    root: Path
    said: list[str]


@pytest.fixture(scope="module")
def served(ray_cluster, tmp_path_factory):
    from ray import serve

    from kilnlm.actors import serve_orchestrator

    root = tmp_path_factory.mktemp("serve-registry")
    tokenizer = Tokenizer.train([TEXT * 8], vocab_size=320, min_frequency=2)
    a = export(root / "a", tokenizer, seed=1, scale=40.0)
    b = export(root / "b", tokenizer, seed=2)
    (root / "heldout.txt").write_text(TEXT * 2, encoding="utf-8")
    config = ServeConfig(
        checkpoint=str(a), port=0, http_port=0, app_name=APP, num_replicas=2, admin_token=TOKEN,
        health_poll_s=0.2, engine=EngineConfig(kv_budget_mib=8, max_tokens_limit=64),
        replica_num_cpus=0.5,
    )  # fmt: skip
    said: list[str] = []
    address, _ = serve_orchestrator.serve_with_orchestrator(
        config, str(root / "registry"), str(root / "heldout.txt"), say=said.append
    )
    yield Served(address, a, b, root, said)
    serve.delete(APP)
    serve_orchestrator.stop(APP)


def kiln(served: Served, *argv: str) -> int:
    from kilnlm.cli import main

    return main([*argv, "--address", served.address])


def served_version(served: Served) -> int:
    """The version a greedy generation says produced it (every replica serves one version after
    a swap, so any replica answers the same)."""
    with Client(served.address, timeout=60) as client:
        return client.generate("The kiln", temperature=0, max_tokens=4).finish.model_version


@pytest.mark.ray
@pytest.mark.slow
def test_serve_register_promote_rollback_as_an_operator_expects(served, capsys, monkeypatch):
    monkeypatch.setenv("KILN_ADMIN_TOKEN", TOKEN)
    assert f"kiln: {served.a} is version 1: promoted" in served.said
    assert served_version(served) == 1
    assert kiln(served, "status") == 0
    assert "promoted version: 1" in capsys.readouterr().out

    monkeypatch.chdir(served.root)  # a relative path is resolved here, not in the orchestrator
    assert kiln(served, "register", "b") == 0
    assert f"{served.b} is version 2 (registered)" in capsys.readouterr().out
    assert kiln(served, "register", "b") == 0  # the same content again: the same version
    assert f"{served.b} is version 2" in capsys.readouterr().out
    with Client(served.address, token=TOKEN, timeout=60) as client:
        assert client.register(served.b) == 2
    assert served_version(served) == 1  # registering changes nothing that serves

    assert kiln(served, "promote", "2") == 0
    assert "version 2 serves on every replica (was 1)" in capsys.readouterr().out
    assert served_version(served) == 2

    assert kiln(served, "rollback") == 0
    assert "version 1 serves on every replica (was 2)" in capsys.readouterr().out
    assert served_version(served) == 1
    assert kiln(served, "status") == 0
    out = capsys.readouterr().out
    assert "promoted version: 1" in out and "rollback target: 2" not in out


@pytest.mark.ray
@pytest.mark.slow
def test_register_refuses_a_folder_that_is_no_export(served, capsys, monkeypatch):
    monkeypatch.setenv("KILN_ADMIN_TOKEN", TOKEN)
    (served.root / "empty").mkdir()
    assert kiln(served, "register", str(served.root / "empty")) == 1
    err = capsys.readouterr().err
    assert "INVALID_ARGUMENT" in err and "manifest.json" in err
    monkeypatch.setenv("KILN_ADMIN_TOKEN", "wrong")
    assert kiln(served, "register", str(served.b)) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err


def test_default_heldout_is_the_default_corpus_heldout_documents(tmp_path):
    from kilnlm.actors.serve_orchestrator import default_heldout
    from kilnlm.data import CorpusConfig, heldout_score
    from kilnlm.documents import default_corpus

    file = default_heldout(tmp_path, min_bytes=20_000)
    text = file.read_text(encoding="utf-8")
    assert len(text.encode("utf-8")) >= 20_000
    fraction = CorpusConfig().heldout_fraction
    first = next(d.text for d in default_corpus() if heldout_score(d.text) < fraction)
    assert text.startswith(first)  # held-out documents only, in corpus order
    assert default_heldout(tmp_path) == file and file.read_text(encoding="utf-8") == text
