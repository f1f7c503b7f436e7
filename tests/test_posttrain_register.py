"""``kiln finetune --from VERSION --register`` against a running ``kiln serve`` orchestrator.

Real Ray Serve replicas, the real orchestrator and gateway on loopback, and a real Ray Train run:
the parent is looked up as a registered version (``Admin.Status``), the result is handed back
with ``Admin.Register`` and gets the next version, whose checkpoint is the ``--out`` export.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kilnlm.checkpoint import read_manifest, save_pretrained
from kilnlm.model import ModelConfig, Transformer
from kilnlm.tokenizer import Tokenizer

APP = "kiln-test-posttrain-register"
TOKEN = "posttrain-register-test-token"

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def served(ray_cluster, tiny_corpus, tmp_path_factory):
    from ray import serve

    from kilnlm.actors import serve_orchestrator
    from kilnlm.engine import EngineConfig
    from kilnlm.serving_config import ServeConfig

    root = tmp_path_factory.mktemp("posttrain-register")
    tokenizer = Tokenizer.load(tiny_corpus)
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("test-1m", vocab_size=tokenizer.vocab_size, block_size=256)
    parent = save_pretrained(Transformer(cfg), root / "parent", tokenizer=tokenizer)
    (root / "heldout.txt").write_text("def f(x):\n    return x + 1\n" * 40, encoding="utf-8")
    config = ServeConfig(
        checkpoint=str(parent), port=0, http_port=0, app_name=APP, num_replicas=1,
        admin_token=TOKEN, health_poll_s=0.2, replica_num_cpus=0.5,
        engine=EngineConfig(kv_budget_mib=8, max_tokens_limit=64),
    )  # fmt: skip
    address, _ = serve_orchestrator.serve_with_orchestrator(
        config, str(root / "registry"), str(root / "heldout.txt"), say=lambda _: None
    )
    yield address, root, parent
    serve.delete(APP)
    serve_orchestrator.stop(APP)


def test_finetune_from_a_registered_version_registers_its_export(served, capsys, monkeypatch):
    from kilnlm.cli import main

    address, root, parent = served
    monkeypatch.setenv("KILN_ADMIN_TOKEN", TOKEN)
    out = root / "sft"
    argv = ["finetune", "--from", "1", "--out", str(out), "--register", "--address", address]
    argv += ["--max-steps", "2", "--warmup-steps", "1", "--workers", "1", "--eval-every", "0"]
    argv += ["--storage-path", str(root / "runs"), "--no-progress", "--json", "--max-failures", "0"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["registered_version"] == 2
    assert summary["parent"] == str(Path(parent).absolute())
    assert read_manifest(out).fields["parent_export"] == str(Path(parent).absolute())
    assert main(["status", "--address", address, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    uris = {int(c["version"]): c["uri"] for c in status["checkpoints"]}
    assert uris[2].removeprefix("file://") == str(out.absolute())
