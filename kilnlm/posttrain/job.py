"""The driver side of a post-training run, without Ray: data in, plug-in out, figures after.

``prepare`` reads the parent export and the data (a file, a folder, or the embedded defaults),
splits off the held-out part, encodes both and builds the objective's plug-in (for DPO it also
computes the reference log-probs, once). The CLI hands the plug-in to the one Ray Train worker
through ``kilnlm.cluster.launcher.launch_spec``; ``finish`` then scores the parent and the
trained model on the held-out data and writes the ``--out`` export, whose manifest names the
parent, the data and the figures.

User files are split by a hash of each example (``heldout_fraction``); the embedded defaults are
split by stdlib module (``kilnlm.posttrain.defaults``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import nn

from kilnlm.posttrain.data import Chat, Preference, ReadStats, read_chats, read_preferences
from kilnlm.posttrain.plugin import PostTrainPlugin
from kilnlm.tokenizer import Tokenizer

Kind = Literal["sft", "reward", "dpo"]

DEFAULT_TRAIN: dict[str, dict[str, Any]] = {
    "sft": {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 10, "max_steps": 120, "batch_size": 8},
    "reward": {"lr": 5e-4, "min_lr": 5e-5, "warmup_steps": 10, "max_steps": 120, "batch_size": 8},
    "dpo": {"lr": 2e-4, "min_lr": 2e-5, "warmup_steps": 5, "max_steps": 60, "batch_size": 8},
}
"""Per-objective training defaults (per rank): each finishes in a minute or two on 2 CPU cores
with the tiny default models; the shared ones below fill in the rest."""
SHARED_TRAIN: dict[str, Any] = {
    "weight_decay": 0.0,
    "eval_every": 40,
    "eval_batches": 1,
    "log_every": 5,
    "checkpoint_every": 40,
}
EMBEDDED = "embedded stdlib defaults"


@dataclass
class PostTrainConfig:
    """One post-training run: what to train, from what, on what, and the figures' budgets."""

    objective: Kind
    parent: str
    """The export to start from (``--from``)."""
    out: str
    """Where the result is exported (``--out``)."""
    data: str | None = None
    """A JSONL file or folder; None: the embedded stdlib defaults."""
    beta: float = 0.1
    """DPO's β: how strongly the policy is held to the reference."""
    heldout_fraction: float = 0.1
    """Share of a user file's examples held out (by a hash of each example)."""
    answer_prompts: int = 24
    """Held-out prompts answered greedily (SFT) or sampled for the KL (DPO)."""
    max_answer_tokens: int = 48

    def __post_init__(self) -> None:
        if self.objective not in ("sft", "reward", "dpo"):
            raise ValueError(f"objective must be 'sft', 'reward' or 'dpo', got {self.objective!r}")
        if self.beta <= 0:
            raise ValueError(f"--beta must be > 0, got {self.beta}")
        if not 0 < self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        if self.answer_prompts < 0 or self.max_answer_tokens < 1:
            raise ValueError("answer_prompts must be >= 0 and max_answer_tokens >= 1")


@dataclass
class Prepared:
    """What ``prepare`` made: the plug-in for the workers, and what ``finish`` needs."""

    plugin: PostTrainPlugin
    tokenizer: Tokenizer
    data_summary: dict[str, Any]
    heldout_chats: list[Chat] = field(default_factory=list)
    heldout_pairs: list[Preference] = field(default_factory=list)


def _heldout(key: Any, fraction: float) -> bool:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return int(digest[:8], 16) / 0xFFFFFFFF < fraction


def load_chats(cfg: PostTrainConfig) -> tuple[list[Chat], list[Chat], dict[str, Any]]:
    """(train, held-out, summary) chats from the file or the defaults."""
    if cfg.data is None:
        from kilnlm.posttrain.defaults import default_sets

        sets = default_sets()
        return sets.train_chats, sets.heldout_chats, sets.summary()
    chats, stats = read_chats(cfg.data)
    train = [c for c in chats if not _heldout(c, cfg.heldout_fraction)]
    held = [c for c in chats if _heldout(c, cfg.heldout_fraction)]
    return train, held, _summary(cfg.data, stats, len(train), len(held))


def load_pairs(cfg: PostTrainConfig) -> tuple[list[Preference], list[Preference], dict[str, Any]]:
    """(train, held-out, summary) preference pairs from the file or the defaults."""
    if cfg.data is None:
        from kilnlm.posttrain.defaults import default_sets

        sets = default_sets()
        return sets.train_pairs, sets.heldout_pairs, sets.summary()
    pairs, stats = read_preferences(cfg.data)
    key = [[list(p.prompt), p.chosen, p.rejected] for p in pairs]
    held = [_heldout(k, cfg.heldout_fraction) for k in key]
    train = [p for p, h in zip(pairs, held, strict=True) if not h]
    heldout = [p for p, h in zip(pairs, held, strict=True) if h]
    return train, heldout, _summary(cfg.data, stats, len(train), len(heldout))


def _summary(path: str, stats: ReadStats, n_train: int, n_held: int) -> dict[str, Any]:
    return {"source": str(path), **stats.to_dict(), "train": n_train, "heldout": n_held}


def prepare(cfg: PostTrainConfig, seq_len: int, batch_size: int, seed: int) -> Prepared:
    """Read, split, encode and wrap the data into the objective's plug-in."""
    from kilnlm.checkpoint import load_tokenizer, verify_manifest

    verify_manifest(cfg.parent)  # a torn or corrupted parent fails here, naming the file
    tokenizer = load_tokenizer(cfg.parent)
    if tokenizer is None:
        raise ValueError(
            f"{cfg.parent} has no tokenizer.json; export the parent with its tokenizer"
        )
    common = {
        "parent": str(Path(cfg.parent).absolute()),
        "data": str(Path(cfg.data).absolute()) if cfg.data else EMBEDDED,
        "batch_size": batch_size,
        "seed": seed,
        "pad_id": tokenizer.pad_id,
    }
    skipped: dict[str, int] = {}
    if cfg.objective == "sft":
        prepared = _sft_plugin(cfg, tokenizer, seq_len, common, skipped)
    else:
        prepared = _pair_plugin(cfg, tokenizer, seq_len, common, skipped)
    prepared.data_summary["skipped_too_long"] = skipped.get("too_long", 0)
    prepared.data_summary["heldout_skipped_too_long"] = skipped.get("heldout_too_long", 0)
    return prepared


def _sft_plugin(
    cfg: PostTrainConfig, tok: Tokenizer, seq_len: int, common: dict, skipped: dict
) -> Prepared:
    from kilnlm.posttrain.sft import SFTPlugin, encode_all

    train, held, summary = load_chats(cfg)
    plugin = SFTPlugin(
        **common,
        train=encode_all(tok, train, seq_len, skipped),
        heldout_examples=encode_all(tok, held, seq_len, held_skips := {}),
    )
    skipped["heldout_too_long"] = held_skips.get("too_long", 0)
    _require(plugin.train, "conversations", cfg)
    return Prepared(plugin, tok, summary, heldout_chats=held)


def _pair_plugin(
    cfg: PostTrainConfig, tok: Tokenizer, seq_len: int, common: dict, skipped: dict
) -> Prepared:
    from kilnlm.posttrain.reward import HEAD_TOKEN, RewardPlugin, encode_pairs

    train, held, summary = load_pairs(cfg)
    train_ex = encode_pairs(tok, train, seq_len, skipped)
    held_ex = encode_pairs(tok, held, seq_len, held_skips := {})
    skipped["heldout_too_long"] = held_skips.get("too_long", 0)
    _require(train_ex, "preference pairs", cfg)
    if cfg.objective == "reward":
        plugin = RewardPlugin(
            **common, head_id=tok.special_id(HEAD_TOKEN), train=train_ex, heldout_examples=held_ex
        )
    else:
        from kilnlm.checkpoint import load
        from kilnlm.posttrain.dpo import DPOPlugin, reference_logps

        reference = load(cfg.parent)
        plugin = DPOPlugin(
            **common,
            beta=cfg.beta,
            train=train_ex,
            train_refs=reference_logps(reference, train_ex, tok.pad_id),
            heldout_examples=held_ex,
            heldout_refs=reference_logps(reference, held_ex, tok.pad_id),
        )
    return Prepared(plugin, tok, summary, heldout_pairs=held)


def _require(examples: list, what: str, cfg: PostTrainConfig) -> None:
    if not examples:
        raise ValueError(
            f"no usable {what} in {cfg.data or EMBEDDED} after the held-out split and the length "
            "limit; pass more data or raise --seq-len"
        )


# --------------------------------------------------------------------------------------------
# Figures and the final export


def sft_figures(
    model: nn.Module, prep: Prepared, cfg: PostTrainConfig, answers: bool = True
) -> dict[str, Any]:
    """Held-out assistant-token loss, and overlap of greedy answers with the references."""
    from kilnlm.posttrain.sft import answer_overlap, assistant_loss, greedy_answers

    plugin = prep.plugin
    out: dict[str, Any] = {
        "heldout_assistant_loss": assistant_loss(model, plugin.heldout_examples, plugin.pad_id)
    }
    if answers:
        chats = prep.heldout_chats[: cfg.answer_prompts]
        replies = greedy_answers(model, prep.tokenizer, chats, cfg.max_answer_tokens)
        out.update(answer_overlap(replies))
        out["samples"] = replies[:3]
    return out


def reward_figures(model: nn.Module, prep: Prepared) -> dict[str, Any]:
    from kilnlm.posttrain.reward import pairwise_figures, score_pairs

    p = prep.plugin
    return pairwise_figures(score_pairs(model, p.heldout_examples, p.pad_id, p.head_id))


def dpo_figures(
    model: nn.Module, reference: nn.Module, prep: Prepared, cfg: PostTrainConfig
) -> dict[str, Any]:
    """Implicit-reward accuracy and margin on held-out pairs; KL to the reference on their prompts."""
    from kilnlm.chat import encode_chat
    from kilnlm.posttrain.dpo import implicit_figures, kl_to_reference, pair_logps

    p = prep.plugin
    figures = implicit_figures(
        pair_logps(model, p.heldout_examples, p.pad_id), p.heldout_refs, p.beta
    )
    prompts = _unique_prompts(prep, cfg.answer_prompts)
    ids = [encode_chat(prep.tokenizer, list(q), add_generation_prompt=True) for q in prompts]
    figures.update(
        kl_to_reference(model, reference, ids, prep.tokenizer.eos_id, cfg.max_answer_tokens)
    )
    return figures


def _unique_prompts(prep: Prepared, n: int) -> list[tuple]:
    seen: dict[str, tuple] = {}
    for pair in prep.heldout_pairs:
        seen.setdefault(json.dumps(pair.prompt, sort_keys=True), pair.prompt)
    return list(seen.values())[:n]


def figures_of(model: nn.Module, parent: nn.Module, prep: Prepared, cfg: PostTrainConfig) -> dict:
    """The objective's figures for the trained ``model`` (and, where it means something, before)."""
    if cfg.objective == "sft":
        return {"before": sft_figures(parent, prep, cfg), "after": sft_figures(model, prep, cfg)}
    if cfg.objective == "reward":
        return {"after": reward_figures(model, prep)}
    return {"after": dpo_figures(model, parent, prep, cfg)}


def finish(final_export: str, prep: Prepared, cfg: PostTrainConfig) -> dict[str, Any]:
    """Score parent and result on the held-out data; write ``cfg.out``; return the summary."""
    from kilnlm.checkpoint import load, read_manifest, save_pretrained

    model, parent = load(final_export), load(cfg.parent)
    figures = figures_of(model, parent, prep, cfg)
    fields = dict(read_manifest(final_export).fields)
    fields.update(
        {
            "figures": _json_figures(figures),
            "data_summary": prep.data_summary,
            "trained_export": final_export,
        }
    )
    out = save_pretrained(model, cfg.out, prep.tokenizer, **fields)
    return {
        "objective": cfg.objective,
        "export": str(out),
        "parent": fields.get("parent_export"),
        "parent_version": fields.get("parent_version"),
        "data": prep.data_summary,
        "figures": figures,
    }


def _json_figures(figures: dict[str, Any]) -> dict[str, Any]:
    """Figures without the sample texts (the manifest keeps numbers)."""
    return {
        when: {k: v for k, v in f.items() if isinstance(v, int | float)}
        for when, f in figures.items()
    }


__all__ = [
    "DEFAULT_TRAIN",
    "SHARED_TRAIN",
    "PostTrainConfig",
    "Prepared",
    "figures_of",
    "finish",
    "load_chats",
    "load_pairs",
    "prepare",
]
