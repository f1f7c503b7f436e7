"""The reward model: a scalar head on the decoder, trained on pairwise preferences (Bradley–Terry).

r(prompt, reply) = w · h, where h is the decoder's final hidden state at the last token of
prompt + reply (the ``<|eos|>`` that closes the reply: with causal attention it has read
everything) and w is one row of the output projection, the row of ``<|mask|>``. A causal model
never reads ``<|mask|>`` as input and is never trained to emit it, so that row is free; using it
as the head means the reward model *is* a plain ``Transformer``: FSDP2 shards the head with the
root, DCP checkpoints and resumes it, and the export is an ordinary checkpoint (its manifest's
``reward_head`` names the row) that ``kilnlm.checkpoint.load`` and the serving replicas load as
they are. The row is zeroed before training, so every reward starts at 0 and the first loss is
exactly log 2.

Loss (Bradley–Terry, as in InstructGPT): −log σ(r(x, y_chosen) − r(x, y_rejected)), averaged
over pairs. A micro-batch holds B pairs as 2B rows, the B chosen first, then the B rejected.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kilnlm.chat import encode_chat
from kilnlm.posttrain.data import Preference
from kilnlm.posttrain.plugin import PostTrainPlugin, rank_share, right_pad
from kilnlm.tokenizer import Tokenizer
from kilnlm.train import Objective, autocast, eval_mode

HEAD_TOKEN = "<|mask|>"
"""The output row that serves as the scalar head."""


@dataclass(frozen=True)
class PairExample:
    """One preference pair as ids: the prompt (with ``<|assistant|>``) and each full sequence."""

    prompt_len: int
    chosen: tuple[int, ...]
    rejected: tuple[int, ...]


def encode_reply(tokenizer: Tokenizer, prompt_ids: list[int], reply: str) -> tuple[int, ...]:
    return tuple(prompt_ids + tokenizer.encode(reply) + [tokenizer.eos_id])


def encode_pairs(
    tokenizer: Tokenizer, pairs: Sequence[Preference], max_len: int, skipped: dict[str, int]
) -> list[PairExample]:
    """Encode every pair; a pair whose longer sequence exceeds ``max_len`` is skipped and counted."""
    out = []
    for p in pairs:
        prompt = encode_chat(tokenizer, list(p.prompt), add_generation_prompt=True)
        ex = PairExample(
            len(prompt),
            encode_reply(tokenizer, prompt, p.chosen),
            encode_reply(tokenizer, prompt, p.rejected),
        )
        if max(len(ex.chosen), len(ex.rejected)) > max_len:
            skipped["too_long"] = skipped.get("too_long", 0) + 1
        else:
            out.append(ex)
    return out


def collate_pairs(examples: Sequence[PairExample], pad_id: int) -> tuple[Tensor, Tensor]:
    """(ids (2B, T), last (2B,)): chosen rows, then rejected rows; last = index of the final token."""
    rows = [list(e.chosen) for e in examples] + [list(e.rejected) for e in examples]
    return right_pad(rows, pad_id), torch.tensor([len(r) - 1 for r in rows])


def rewards(model: nn.Module, ids: Tensor, last: Tensor, head_id: int) -> Tensor:
    """r per row (N,), in fp32: the head's logit at each row's last token."""
    logits = model(ids)  # (N, T, V)
    rows = torch.arange(ids.size(0), device=ids.device)
    return logits[rows, last, head_id].float()


def bradley_terry(r: Tensor) -> Tensor:
    """−log σ(r_chosen − r_rejected) per pair, for r laid out as (chosen rows, rejected rows)."""
    b = r.size(0) // 2
    return -F.logsigmoid(r[:b] - r[b:])


@dataclass(frozen=True)
class RewardLoss:
    """The Bradley–Terry objective for ``train_step``: counts pairs, sums their losses."""

    head_id: int

    def count(self, batch: tuple[Tensor, ...]) -> Tensor:
        return torch.tensor(batch[0].size(0) // 2, device=batch[0].device)

    def loss_sum(self, model: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
        ids, last = batch
        return bradley_terry(rewards(model, ids, last, self.head_id)).sum()


@torch.no_grad()
def score_pairs(
    model: nn.Module,
    examples: Sequence[PairExample],
    pad_id: int,
    head_id: int,
    batch_size: int = 16,
    autocast_dtype: torch.dtype | None = None,
) -> list[tuple[float, float]]:
    """(r_chosen, r_rejected) per pair, in order; the model's mode is kept."""
    device = next(model.parameters()).device
    out: list[tuple[float, float]] = []
    with eval_mode(model):
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            ids, last = (t.to(device) for t in collate_pairs(chunk, pad_id))
            with autocast(device, autocast_dtype):
                r = rewards(model, ids, last, head_id).cpu()
            out += list(zip(r[: len(chunk)].tolist(), r[len(chunk) :].tolist(), strict=True))
    return out


def pair_accuracy(margins: Tensor, n: int) -> float:
    """Share of ``n`` pairs whose margin (chosen minus rejected) is positive, a tie counting half:
    a model that cannot tell the two apart scores 0.5, not 0 or 1."""
    return float(((margins > 0).double() + 0.5 * (margins == 0).double()).sum() / n)


def pairwise_figures(scores: Sequence[tuple[float, float]]) -> dict[str, float]:
    """Accuracy (ties count half), mean Bradley–Terry loss and mean margin over scored pairs."""
    n = max(len(scores), 1)
    margins = torch.tensor([c - r for c, r in scores] or [0.0], dtype=torch.float64)
    return {
        "accuracy": pair_accuracy(margins, n),
        "loss": float(-F.logsigmoid(margins).sum() / n),
        "margin": float(margins.sum() / n),
        "pairs": len(scores),
    }


@dataclass
class RewardPlugin(PostTrainPlugin):
    """The reward model as a plug-in of the one worker (see ``kilnlm.posttrain.plugin``)."""

    head_id: int = 3
    train: list[PairExample] = field(default_factory=list)
    heldout_examples: list[PairExample] = field(default_factory=list)

    objective_name = "reward"

    @property
    def loss(self) -> Objective:
        return RewardLoss(self.head_id)

    def n_train(self) -> int:
        return len(self.train)

    def prepare_state_dict(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        # Every reward starts at 0. The embedding row goes too: with tied embeddings it is the
        # same tensor, and a causal model never reads <|mask|> anyway.
        for key in ("lm_head.weight", "embed_tokens.weight"):
            state_dict[key][self.head_id] = 0.0
        return state_dict

    def batch(self, index: int, rank: int, world: int) -> tuple[Tensor, Tensor]:
        return collate_pairs([self.train[i] for i in self.rows(index, rank, world)], self.pad_id)

    def heldout(
        self, model: nn.Module, rank: int, world: int, autocast_dtype: torch.dtype | None
    ) -> dict[str, float]:
        share = rank_share(self.heldout_examples, rank, world, self.eval_cap)
        if not share:
            return {}
        scores = score_pairs(
            model, share, self.pad_id, self.head_id, self.batch_size, autocast_dtype
        )
        f = pairwise_figures(scores)
        return {"heldout_loss": f["loss"], "heldout_accuracy": f["accuracy"]}

    def manifest_fields(self) -> dict[str, Any]:
        return {**super().manifest_fields(), "reward_head": reward_head_field(self.head_id)}


def reward_head_field(head_id: int) -> dict[str, Any]:
    return {"kind": "lm_head_row", "token": HEAD_TOKEN, "token_id": head_id}


def load_reward_model(path: str | Path) -> tuple[nn.Module, int]:
    """(model, head id) of a reward-model export; an error naming the fix for any other export."""
    from kilnlm.checkpoint import load, read_manifest

    head = read_manifest(path).fields.get("reward_head")
    if not isinstance(head, dict) or head.get("kind") != "lm_head_row":
        raise ValueError(
            f"{path} is not a reward model (its manifest has no reward_head); train one with "
            "`kiln reward train`"
        )
    return load(path), int(head["token_id"])


__all__ = [
    "HEAD_TOKEN",
    "PairExample",
    "RewardLoss",
    "RewardPlugin",
    "bradley_terry",
    "collate_pairs",
    "encode_pairs",
    "load_reward_model",
    "pairwise_figures",
    "rewards",
    "score_pairs",
]
