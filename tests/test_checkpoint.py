"""kilnlm.checkpoint: our logits = transformers' Llama logits in both directions, and exports
that refuse to load when they are incomplete, corrupted, pickled or the wrong shape."""

from __future__ import annotations

import hashlib
import json
import pickle
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from kilnlm.checkpoint import (
    CheckpointError,
    ChecksumError,
    IncompleteCheckpointError,
    Manifest,
    ShapeMismatchError,
    UnsafeFormatError,
    UnsupportedConfigError,
    config_from_hf,
    config_to_hf,
    export_content_addressed,
    hf_compatible,
    load,
    load_state_dict_into,
    load_tokenizer,
    read_manifest,
    save_pretrained,
    verify_manifest,
)
from kilnlm.model import ModelConfig, Transformer
from kilnlm.tokenizer import MIN_VOCAB_SIZE, Tokenizer

# The same tiny model in both vocabularies: hidden 64, 2 layers, 4 heads, 2 kv heads, vocab 300.
HF_SHAPE: dict[str, Any] = {
    "vocab_size": 300,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
}
OUR_SHAPE: dict[str, Any] = {
    "vocab_size": 300,
    "n_embd": 64,
    "intermediate_size": 128,
    "n_layer": 2,
    "n_head": 4,
    "n_kv_head": 2,
    "block_size": 256,
    "norm_eps": 1e-5,
}
YARN = {"factor": 4.0, "original_max_position_embeddings": 64}
# variant: (HF LlamaConfig overrides, ModelConfig overrides) describing the same model
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "gqa": ({}, {}),
    "mha": ({"num_key_value_heads": 4}, {"n_kv_head": 4}),
    "tied": ({"tie_word_embeddings": True}, {"tie_embeddings": True}),
    "bias": ({"attention_bias": True, "mlp_bias": True}, {"bias": True}),
    "linear": (
        {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}},
        {"rope_scaling": {"type": "linear", "factor": 2.0}},
    ),
    "yarn": (
        {"rope_parameters": {"rope_type": "yarn", "rope_theta": 50000.0, **YARN}},
        {"rope_theta": 50000.0, "rope_scaling": {"type": "yarn", **YARN}},
    ),
}
# 96 positions: past yarn's original 64, so scaling matters to the logits.
TOKENS = torch.randint(0, 300, (2, 96), generator=torch.Generator().manual_seed(1))


def scramble_(model: nn.Module) -> nn.Module:
    """Large random weights, norms and biases included, so a wrong mapping cannot hide in
    near-zero logits (default init gives logits ~1e-2)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    return model.eval()


def hf_model(variant: str) -> LlamaForCausalLM:
    # eager attention: the reference must not share our SDPA code path
    config = LlamaConfig(**(HF_SHAPE | VARIANTS[variant][0]), attn_implementation="eager")
    return scramble_(LlamaForCausalLM(config))


def our_config(variant: str = "gqa", **kw: Any) -> ModelConfig:
    return ModelConfig(**(OUR_SHAPE | VARIANTS[variant][1] | kw))


def our_model(variant: str = "gqa", **kw: Any) -> Transformer:
    return scramble_(Transformer(our_config(variant, **kw)))


def max_diff(a: nn.Module, b: nn.Module) -> float:
    with torch.no_grad():
        la, lb = a(TOKENS), b(TOKENS)
    la, lb = getattr(la, "logits", la), getattr(lb, "logits", lb)
    return (la - lb).abs().max().item()


# --------------------------------------------------------------------------------------------
# Hugging Face interoperability


@pytest.mark.parametrize("variant", VARIANTS)
def test_hf_llama_directory_loads_with_the_same_logits(variant, tmp_path):
    hf = hf_model(variant)
    hf.save_pretrained(tmp_path)
    ours = load(tmp_path)
    assert ours.config == our_config(variant)
    assert max_diff(ours, hf) <= 1e-4


@pytest.mark.parametrize("variant", VARIANTS)
def test_our_export_loads_in_transformers_with_the_same_logits(variant, tmp_path):
    ours = our_model(variant)
    save_pretrained(ours, tmp_path / "export")
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "export", attn_implementation="eager").eval()
    expected_rope = {"linear": "linear", "yarn": "yarn"}.get(variant, "default")
    assert hf.config.rope_parameters["rope_type"] == expected_rope
    assert max_diff(ours, hf) <= 1e-4


def test_the_logit_comparison_can_fail(tmp_path):
    """Dropping yarn scaling moves logits far past the 1e-4 tolerance used above."""
    hf = hf_model("yarn")
    hf.save_pretrained(tmp_path)
    unscaled = Transformer(our_config("yarn", rope_scaling=None))
    load_state_dict_into(unscaled, load(tmp_path).state_dict())
    assert max_diff(unscaled.eval(), hf) > 1e-2


def test_older_transformers_config_with_rope_scaling_is_read(tmp_path):
    """transformers 4.x wrote rope_theta and rope_scaling at top level, torch_dtype for dtype."""
    hf = hf_model("linear")
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["rope_parameters"]
    config |= {"rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 2.0}}
    config["torch_dtype"] = config.pop("dtype")
    (tmp_path / "config.json").write_text(json.dumps(config))
    ours = load(tmp_path)
    assert ours.config == our_config("linear")
    assert max_diff(ours, hf) <= 1e-4


def test_sharded_hf_checkpoint_loads(tmp_path):
    hf = hf_model("gqa")
    hf.save_pretrained(tmp_path, max_shard_size="50KB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    assert max_diff(load(tmp_path), hf) <= 1e-4


@pytest.mark.parametrize("variant", VARIANTS)
def test_config_round_trips_through_hf_keys(variant):
    cfg = our_config(variant)
    assert hf_compatible(cfg)
    assert config_from_hf(config_to_hf(cfg)) == cfg


UNSUPPORTED_HF = {
    "llama3": {"rope_parameters": {"rope_type": "llama3", "factor": 8.0}},
    "dynamic": {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}},
    "longrope": {"rope_parameters": {"rope_type": "longrope", "factor": 2.0}},
    "partial_rotary_factor": {"partial_rotary_factor": 0.5},
    "attention_factor": {"rope_parameters": {"rope_type": "yarn", "attention_factor": 2.0, **YARN}},
    "hidden_act": {"hidden_act": "gelu"},
    "head_dim": {"head_dim": 32},
    "mlp_bias": {"attention_bias": True, "mlp_bias": False},
    "mistral": {"model_type": "mistral"},
}


@pytest.mark.parametrize("what", UNSUPPORTED_HF)
def test_unsupported_hf_config_is_refused_by_name(what):
    config = LlamaConfig(**HF_SHAPE).to_dict() | UNSUPPORTED_HF[what]
    with pytest.raises(UnsupportedConfigError, match=what):
        config_from_hf(config)


def test_non_llama_options_round_trip_through_kilnlm_only(tmp_path):
    classic = {"norm": "layernorm", "mlp": "gelu", "pos_emb": "sinusoidal", "bias": True}
    cfg = ModelConfig(**OUR_SHAPE, **classic, sliding_window=16, causal=False)
    model = scramble_(Transformer(cfg))
    assert not hf_compatible(cfg)
    with pytest.raises(UnsupportedConfigError, match="layernorm"):
        config_to_hf(cfg)
    with pytest.warns(UserWarning, match="transformers cannot load"):
        save_pretrained(model, tmp_path / "export")
    assert not read_manifest(tmp_path / "export").hf_compatible
    loaded = load(tmp_path / "export")
    assert loaded.config == cfg
    with torch.no_grad():
        assert torch.equal(loaded(TOKENS), model(TOKENS))
    with pytest.raises(ValueError, match="kilnlm"):  # refused, not silently computed as Llama
        AutoModelForCausalLM.from_pretrained(tmp_path / "export")


def test_dtype_is_kept_and_rope_tables_stay_fp32(tmp_path):
    model = our_model("yarn").to(torch.bfloat16)
    save_pretrained(model, tmp_path / "export")
    assert json.loads((tmp_path / "export/config.json").read_text())["dtype"] == "bfloat16"
    loaded = load(tmp_path / "export")
    assert loaded.embed_tokens.weight.dtype == torch.bfloat16
    assert loaded.rope.inv_freq.dtype == torch.float32
    as_fp32 = load(tmp_path / "export", dtype="float32")
    assert as_fp32.lm_head.weight.dtype == torch.float32
    assert torch.equal(as_fp32.lm_head.weight, model.lm_head.weight.float())


# --------------------------------------------------------------------------------------------
# Manifest and atomic export


def test_manifest_records_every_file_and_the_callers_fields(tmp_path):
    tok = Tokenizer.train(["hello world, hello kiln"] * 20, vocab_size=MIN_VOCAB_SIZE + 8)
    out = save_pretrained(
        our_model(),
        tmp_path / "export",
        tokenizer=tok,
        version=3,
        step=70,
        tokens_seen=4096,
        heldout_loss=torch.tensor(2.5),
    )
    manifest = verify_manifest(out)
    assert manifest.fields == {"version": 3, "step": 70, "tokens_seen": 4096, "heldout_loss": 2.5}
    assert set(manifest.files) == {"config.json", "model.safetensors", "tokenizer.json"}
    for name, entry in manifest.files.items():
        data = (out / name).read_bytes()
        assert (entry.size, entry.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    config = json.loads((out / "config.json").read_text())
    ids = (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"])
    assert ids == (tok.bos_id, tok.eos_id, tok.pad_id)
    loaded = load_tokenizer(out)
    assert loaded is not None and loaded.to_json() == tok.to_json()
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temp dirs left behind


def test_export_without_tokenizer_has_no_token_ids(tmp_path):
    out = save_pretrained(our_model(), tmp_path / "export")
    assert load_tokenizer(out) is None
    config = json.loads((out / "config.json").read_text())
    assert config["eos_token_id"] is None  # not LlamaConfig's default of 2


@pytest.mark.parametrize("damage", ["flip", "truncate"])
@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_damaged_file_is_detected_and_named(tmp_path, name, damage):
    out = save_pretrained(our_model(), tmp_path / "export")
    data = bytearray((out / name).read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    else:
        data = data[:-1]
    (out / name).write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=re.escape(name)) as info:
        verify_manifest(out)
    assert info.value.file == name
    with pytest.raises(ChecksumError, match=re.escape(name)):
        load(out)


def test_export_without_manifest_is_refused(tmp_path):
    out = save_pretrained(our_model(), tmp_path / "export")
    (out / "manifest.json").unlink()  # as a copy interrupted before its last file would be
    with pytest.raises(IncompleteCheckpointError, match="manifest"):
        load(out)
    with pytest.raises(IncompleteCheckpointError, match="manifest"):
        verify_manifest(out)


class BrokenTokenizer:
    """Fails half-way through an export, after the weights were written."""

    def save(self, directory: str) -> None:
        (Path(directory) / "tokenizer.json").write_text("{")
        raise RuntimeError("disk full")


@pytest.mark.parametrize(
    "text, why",
    [
        ("[1, 2]", "JSON list"),
        ('{"format": "kilnlm.checkpoint", "files": [1]}', "files"),
        ("{", ""),
    ],
)
def test_a_manifest_that_is_not_a_manifest_object_is_refused_cleanly(tmp_path, text, why):
    out = save_pretrained(our_model(), tmp_path / "export")
    (out / "manifest.json").write_text(text)
    for read in (read_manifest, verify_manifest, load):
        with pytest.raises(
            CheckpointError, match=rf"not a valid manifest \(.*{why}.*export it again"
        ):
            read(out)


def test_failed_export_is_invisible_and_keeps_the_previous_one(tmp_path):
    save_pretrained(our_model(), tmp_path / "export", version=1)
    with pytest.raises(RuntimeError, match="disk full"):
        save_pretrained(our_model("mha"), tmp_path / "export", BrokenTokenizer(), version=2)
    with pytest.raises(RuntimeError, match="disk full"):
        save_pretrained(our_model(), tmp_path / "fresh", BrokenTokenizer())
    assert [p.name for p in tmp_path.iterdir()] == ["export"]
    assert verify_manifest(tmp_path / "export").fields == {"version": 1}
    assert load(tmp_path / "export").config == our_config()


def test_an_export_is_never_overwritten_and_other_directories_are_refused(tmp_path):
    first = save_pretrained(our_model(), tmp_path / "export", version=1)
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    with pytest.raises(FileExistsError, match="immutable"):
        save_pretrained(our_model("mha"), tmp_path / "export", version=2)
    assert save_pretrained(our_model(), tmp_path / "export", version=1) == first  # same content
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before  # not even rewritten
    assert [p.name for p in tmp_path.iterdir()] == ["export"]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes/todo.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a kilnlm export"):
        save_pretrained(our_model(), tmp_path / "notes")
    assert (tmp_path / "notes/todo.txt").read_text() == "keep me"


def test_content_addressed_exports_differ_by_content_only(tmp_path):
    a = export_content_addressed(our_model().state_dict(), our_config(), tmp_path, "step-1", step=1)
    b = export_content_addressed(
        our_model("mha").state_dict(), our_config("mha"), tmp_path, "step-1", step=1
    )
    assert a != b and a.name.startswith("step-1-") and len(a.name) == len("step-1-") + 12
    again = export_content_addressed(
        our_model().state_dict(), our_config(), tmp_path, "step-1", step=1
    )
    assert again == a and sorted(p.name for p in tmp_path.iterdir()) == sorted([a.name, b.name])
    assert load(a).config == our_config() and load(b).config == our_config("mha")


def test_content_identity_ignores_when_and_by_what_an_export_was_written(tmp_path):
    manifest = read_manifest(save_pretrained(our_model(), tmp_path / "export", step=1))
    later = Manifest(**{**asdict(manifest), "created_unix": 1.0, "kilnlm_version": "9.9"})
    assert later.content_sha256() == manifest.content_sha256()
    for changed in ({"fields": {"step": 2}}, {"files": {}}):
        assert (
            Manifest(**{**asdict(manifest), **changed}).content_sha256()
            != manifest.content_sha256()
        )


def test_shape_mismatch_names_the_tensor_and_leaves_the_model_untouched():
    source = our_model()
    target = Transformer(ModelConfig(**(OUR_SHAPE | {"vocab_size": 301})))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ShapeMismatchError, match=r"embed_tokens\.weight") as info:
        load_state_dict_into(target, source.state_dict())
    assert info.value.tensor == "embed_tokens.weight"
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_missing_tensor_is_named():
    state = our_model().state_dict()
    del state["blocks.1.mlp_norm.weight"]
    with pytest.raises(CheckpointError, match=r"blocks\.1\.mlp_norm\.weight"):
        load_state_dict_into(Transformer(our_config()), state)


def test_tied_weights_load_once_and_must_agree_when_given_twice():
    source, target = our_model("tied"), Transformer(our_config("tied"))
    load_state_dict_into(target, source.state_dict())  # holds both names, same tensor
    assert target.lm_head.weight is target.embed_tokens.weight
    assert torch.equal(target.lm_head.weight, source.embed_tokens.weight)
    untied = source.state_dict() | {"lm_head.weight": torch.zeros(300, 64)}
    with pytest.raises(CheckpointError, match="tie"):
        load_state_dict_into(target, untied)


class RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # unpickling this creates the marker file
        return (open, (str(self.marker), "w"))


def test_pickle_weights_are_refused_without_being_unpickled(tmp_path):
    hf = hf_model("gqa")
    hf.config.save_pretrained(tmp_path)
    marker = tmp_path.parent / "unpickled"
    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps(RunsCode(marker)))
    with pytest.raises(UnsafeFormatError, match="safetensors"):
        load(tmp_path)
    assert not marker.exists()


def test_shard_outside_the_directory_is_refused(tmp_path):
    hf_model("gqa").save_pretrained(tmp_path)
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "../elsewhere.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="outside the checkpoint"):
        load(tmp_path)
