"""Configs load from files and flags, and a typo is an error, not a silent default."""

import argparse

import pytest

from kilnlm import config
from kilnlm.model import ModelConfig, RopeScaling


def test_toml_with_nested_dataclass_and_overrides(tmp_path):
    path = tmp_path / "model.toml"
    path.write_text(
        '[model]\nn_layer = 3\nnorm = "layernorm"\n'
        '[model.rope_scaling]\ntype = "yarn"\nfactor = 4.0\noriginal_max_position_embeddings = 128\n'
    )
    cfg = config.load(ModelConfig, path, section="model", n_embd=64, n_head=4)
    assert (cfg.n_layer, cfg.norm, cfg.n_embd) == (3, "layernorm", 64)
    assert cfg.rope_scaling == RopeScaling("yarn", 4.0, 128)


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"n_layers": 3}')
    with pytest.raises(ValueError, match="n_layers"):
        config.load(ModelConfig, path)


def test_cli_flags_only_override_what_was_given():
    parser = argparse.ArgumentParser()
    config.add_arguments(parser, ModelConfig)
    args = parser.parse_args(["--n-layer", "5", "--no-causal", "--pos-emb", "sinusoidal"])
    assert config.overrides_from(args, ModelConfig) == {
        "n_layer": 5,
        "causal": False,
        "pos_emb": "sinusoidal",
    }
    with pytest.raises(SystemExit):
        parser.parse_args(["--n-layer", "five"])
