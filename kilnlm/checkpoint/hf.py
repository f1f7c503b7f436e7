"""The Hugging Face Llama mapping: ModelConfig <-> config.json keys (RoPE scaling included) and
our tensor names <-> HF's.

Module names of ``kilnlm.model`` follow HF Llama and RoPE uses HF's rotate-half layout, so the
mapping is a rename, never a permutation. What HF Llama cannot express is said by
``hf_incompatibilities`` and refused by ``config_to_hf``, never approximated.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from functools import cache
from typing import Any

from torch import Tensor

from kilnlm.checkpoint.errors import CheckpointError, UnsupportedConfigError
from kilnlm.model import ModelConfig, RopeScaling

SUPPORTED_ROPE_TYPES = ("default", "linear", "yarn")

# --------------------------------------------------------------------------------------------
# Config: ModelConfig <-> HF LlamaConfig (config.json)


def hf_incompatibilities(cfg: ModelConfig) -> list[str]:
    """Why HF Llama cannot express ``cfg`` (empty when it can)."""
    reasons = []
    if cfg.norm != "rmsnorm":
        reasons.append(f"norm={cfg.norm!r} (HF Llama uses RMSNorm)")
    if cfg.mlp != "swiglu":
        reasons.append(f"mlp={cfg.mlp!r} (HF Llama uses SwiGLU)")
    if cfg.pos_emb != "rope":
        reasons.append(f"pos_emb={cfg.pos_emb!r} (HF Llama uses RoPE)")
    if cfg.sliding_window is not None:
        reasons.append(f"sliding_window={cfg.sliding_window} (HF Llama attends to every position)")
    if not cfg.causal:
        reasons.append("causal=False (HF Llama is causal)")
    return reasons


def hf_compatible(cfg: ModelConfig) -> bool:
    """True when transformers' LlamaForCausalLM computes exactly what Transformer(cfg) computes."""
    return not hf_incompatibilities(cfg)


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """HF LlamaConfig keys (config.json) for ``cfg``; raises if HF Llama cannot express it."""
    reasons = hf_incompatibilities(cfg)
    if reasons:
        raise UnsupportedConfigError(
            "HF Llama cannot express this model: " + "; ".join(reasons) + ". save_pretrained "
            "still writes it for kilnlm (kilnlm.checkpoint.load reads it back)"
        )
    scaling = _rope_scaling_to_hf(cfg.rope_scaling)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **hf_sizes(cfg),
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": cfg.bias,
        "mlp_bias": cfg.bias,
        "attention_dropout": 0.0,
        "use_cache": True,
        # transformers 5.x reads rope_parameters (theta inside); 4.x reads rope_theta and
        # rope_scaling and would silently fall back to theta 10000 / no scaling without them.
        # 5.x gives rope_scaling priority, so both must say the same thing (they do).
        "rope_parameters": {"rope_theta": cfg.rope_theta, **(scaling or {"rope_type": "default"})},
        "rope_theta": cfg.rope_theta,
        "rope_scaling": scaling,
    }


def hf_sizes(cfg: ModelConfig) -> dict[str, Any]:
    """The size keys of an HF config.json (also written for exports HF Llama cannot load)."""
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.block_size,
    }


def _rope_scaling_to_hf(s: RopeScaling | None) -> dict[str, Any] | None:
    if s is None:
        return None
    if s.type == "linear":
        return {"rope_type": "linear", "factor": s.factor}
    return {
        "rope_type": "yarn",
        "factor": s.factor,
        "original_max_position_embeddings": s.original_max_position_embeddings,
        "beta_fast": s.beta_fast,
        "beta_slow": s.beta_slow,
    }


def config_from_hf(d: Mapping[str, Any]) -> ModelConfig:
    """ModelConfig from a config.json dict: our "kilnlm" key when present, else HF Llama keys.

    Raises UnsupportedConfigError for what kilnlm does not implement (another architecture,
    another activation, RoPE types such as "llama3" or "dynamic", partial rotary, ...).
    """
    if "kilnlm" in d:
        return ModelConfig.from_dict(dict(d["kilnlm"]))
    _check_llama(d)
    heads = _required(d, "num_attention_heads")
    theta, scaling = _rope_from_hf(d)
    return ModelConfig(
        vocab_size=_required(d, "vocab_size"),
        block_size=d.get("max_position_embeddings", 2048),
        n_layer=_required(d, "num_hidden_layers"),
        n_head=heads,
        n_kv_head=d.get("num_key_value_heads") or heads,
        n_embd=_required(d, "hidden_size"),
        intermediate_size=_required(d, "intermediate_size"),
        norm="rmsnorm",
        norm_eps=d.get("rms_norm_eps", 1e-6),
        mlp="swiglu",
        pos_emb="rope",
        rope_theta=theta,
        rope_scaling=scaling,
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        bias=bool(d.get("attention_bias", False)),
        init_std=d.get("initializer_range", 0.02),
    )


def _required(d: Mapping[str, Any], key: str) -> Any:
    if d.get(key) is None:
        raise CheckpointError(f"config.json has no {key!r}; it is not a complete Llama config")
    return d[key]


def _check_llama(d: Mapping[str, Any]) -> None:
    """Refuse, naming the key, every Llama-family variation our model does not compute."""
    unsupported = "; load it with transformers instead, or convert it"
    if d.get("model_type") != "llama":
        raise UnsupportedConfigError(
            f"config.json has model_type={d.get('model_type')!r}; kilnlm loads 'llama' "
            f"checkpoints and its own exports only{unsupported}"
        )
    if d.get("hidden_act", "silu") not in ("silu", "swish"):
        raise UnsupportedConfigError(
            f"config.json has hidden_act={d['hidden_act']!r}; kilnlm's SwiGLU uses silu{unsupported}"
        )
    heads, width = _required(d, "num_attention_heads"), _required(d, "hidden_size")
    if d.get("head_dim") not in (None, width // heads):
        raise UnsupportedConfigError(
            f"config.json has head_dim={d['head_dim']}, but kilnlm needs hidden_size / "
            f"num_attention_heads = {width // heads}{unsupported}"
        )
    if bool(d.get("attention_bias", False)) != bool(d.get("mlp_bias", False)):
        raise UnsupportedConfigError(
            f"config.json has attention_bias={d.get('attention_bias')} but mlp_bias="
            f"{d.get('mlp_bias')}; kilnlm has one bias switch for every linear layer{unsupported}"
        )


def _rope_from_hf(d: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from 5.x ``rope_parameters`` or 4.x ``rope_theta`` + ``rope_scaling``.

    Follows transformers' own precedence: ``rope_scaling`` wins over ``rope_parameters``, a
    top-level ``original_max_position_embeddings`` wins over the one inside, and yarn's original
    length defaults to max_position_embeddings.
    """
    rope = dict(d.get("rope_scaling") or d.get("rope_parameters") or {})
    theta = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
    partial = rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise UnsupportedConfigError(
            f"config.json has partial_rotary_factor={partial}; kilnlm rotates the whole head"
        )
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedConfigError(
            f"config.json uses RoPE type {kind!r}, which kilnlm does not implement (it supports "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}); load it with transformers instead"
        )
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, RopeScaling(type="linear", factor=float(_required(rope, "factor")))
    return theta, _yarn_from_hf(d, rope)


def _yarn_from_hf(d: Mapping[str, Any], rope: dict[str, Any]) -> RopeScaling:
    original = d.get("original_max_position_embeddings") or rope.get(
        "original_max_position_embeddings", d.get("max_position_embeddings", 2048)
    )
    factor = rope.get("factor") or d.get("max_position_embeddings", 2048) / original
    default_attention = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    attention = rope.get("attention_factor")
    if attention is not None and not math.isclose(attention, default_attention, rel_tol=1e-6):
        raise UnsupportedConfigError(
            f"config.json sets yarn attention_factor={attention}; kilnlm computes the paper's "
            f"0.1·ln(factor)+1 = {default_attention:.6f} only"
        )
    if rope.get("mscale") and rope.get("mscale_all_dim"):
        raise UnsupportedConfigError(
            "config.json sets yarn mscale/mscale_all_dim (DeepSeek style); kilnlm implements "
            "plain YaRN only"
        )
    if rope.get("truncate", True) is False:
        raise UnsupportedConfigError(
            "config.json sets yarn truncate=false; kilnlm always rounds the correction range "
            "(truncate=true)"
        )
    return RopeScaling(
        type="yarn",
        factor=float(factor),
        original_max_position_embeddings=int(original),
        beta_fast=float(rope.get("beta_fast") or 32.0),  # HF treats 0/None as the default too
        beta_slow=float(rope.get("beta_slow") or 1.0),
    )


# --------------------------------------------------------------------------------------------
# Tensor names: ours <-> HF Llama. {L} is a layer index, {P} a projection, {T} weight or bias.

_NAMES = (
    ("embed_tokens.{T}", "model.embed_tokens.{T}"),
    ("blocks.{L}.attn.{P}.{T}", "model.layers.{L}.self_attn.{P}.{T}"),
    ("blocks.{L}.mlp.{P}.{T}", "model.layers.{L}.mlp.{P}.{T}"),
    ("blocks.{L}.attn_norm.{T}", "model.layers.{L}.input_layernorm.{T}"),
    ("blocks.{L}.mlp_norm.{T}", "model.layers.{L}.post_attention_layernorm.{T}"),
    ("norm.{T}", "model.norm.{T}"),
    ("lm_head.{T}", "lm_head.{T}"),
)
_PLACEHOLDERS = {"L": r"\d+", "P": r"[a-z]+_proj", "T": r"weight|bias"}


@cache
def _pattern(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w)\}", template)  # literal, name, literal, name, ...
    return re.compile(
        "".join(
            re.escape(p) if i % 2 == 0 else f"(?P<{p}>{_PLACEHOLDERS[p]})"
            for i, p in enumerate(parts)
        )
    )


def _rename(name: str, to_hf: bool) -> str | None:
    for ours, hf in _NAMES:
        src, dst = (ours, hf) if to_hf else (hf, ours)
        m = _pattern(src).fullmatch(name)
        if m:
            return dst.format(**m.groupdict())
    return None


def to_hf_state_dict(state_dict: Mapping[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Our state dict under HF names, contiguous on CPU; a tied lm_head is left out (HF's way)."""
    out = {}
    for name, t in state_dict.items():
        name = name.replace("_orig_mod.", "")  # torch.compile's wrapper prefix
        if cfg.tie_embeddings and name == "lm_head.weight":
            continue
        hf = _rename(name, to_hf=True)
        if hf is None:
            raise CheckpointError(f"tensor {name!r} has no HF Llama name; is it a kilnlm model?")
        out[hf] = t.detach().to("cpu").contiguous()
    return out


def from_hf_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """An HF Llama state dict under our names (rotary inv_freq buffers, which are derived, dropped)."""
    out = {}
    for name, t in state_dict.items():
        if name.endswith("rotary_emb.inv_freq"):  # old HF exports stored this derived buffer
            continue
        ours = _rename(name, to_hf=False)
        if ours is None:
            raise CheckpointError(
                f"checkpoint tensor {name!r} is not part of a Llama model; kilnlm cannot load it"
            )
        out[ours] = t
    return out
