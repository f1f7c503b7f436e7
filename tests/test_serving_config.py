"""ServeConfig: validation names the field; `kiln serve` reads a [serve] file, then flags, then env."""

from __future__ import annotations

import pytest

from kilnlm.cli import build_parser
from kilnlm.cli.serving import serve_config
from kilnlm.engine import EngineConfig
from kilnlm.serving_config import ServeConfig


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"port": 70000}, "port"),
        ({"num_replicas": 0}, "num_replicas"),
        ({"replica_num_cpus": 0}, "replica_num_cpus"),
        ({"min_replicas": 3, "max_replicas": 2}, "min_replicas"),
        ({"tls_cert": "cert.pem"}, "tls_cert"),
        ({"max_queued_requests": 0}, "max_queued_requests"),
        ({"version": 0}, "version"),
        ({"engine": {"max_queue": 0}}, "max_queue"),
    ],
)
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ServeConfig(**kwargs)


def test_defaults_listen_on_loopback_50051():
    config = ServeConfig()
    assert config.address == "127.0.0.1:50051" and config.checkpoint is None
    assert isinstance(config.engine, EngineConfig)


def test_kiln_serve_reads_file_then_flags_then_env(tmp_path, monkeypatch):
    path = tmp_path / "serve.toml"
    path.write_text(
        '[serve]\ncheckpoint = "ckpt"\nnum_replicas = 2\nport = 6000\n'
        "[serve.engine]\nkv_budget_mib = 32\nmax_queue = 7\n"
    )
    monkeypatch.setenv("KILN_ADMIN_TOKEN", "from-env")
    args = build_parser().parse_args(
        ["serve", "--config", str(path), "--port", "0", "--engine-max-queue", "3"]
    )
    config = serve_config(args)
    assert (config.checkpoint, config.num_replicas, config.port) == ("ckpt", 2, 0)
    assert (config.engine.kv_budget_mib, config.engine.max_queue) == (32, 3)
    assert config.admin_token == "from-env"


def test_deployment_options_follow_the_config():
    from kilnlm.actors.serve_app import deployment_options

    fixed = deployment_options(ServeConfig(num_replicas=3, replica_num_cpus=0.5))
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 0.5, "num_gpus": 0.0}
    auto = deployment_options(ServeConfig(autoscaling=True, min_replicas=1, max_replicas=4))
    assert "num_replicas" not in auto
    assert auto["autoscaling_config"]["max_replicas"] == 4
    assert auto["max_ongoing_requests"] == ServeConfig().max_ongoing_requests
