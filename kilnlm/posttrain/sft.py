"""Supervised fine-tuning (SFT): next-token loss on the assistant's tokens only.

A conversation is rendered with the model's chat template (``kilnlm.chat.encode_chat``, no
generation prompt): ``<|bos|><|user|>…<|eos|><|assistant|>…<|eos|>``. The inputs are the ids
but the last, the targets the ids but the first, and a target counts only where
``kilnlm.chat.loss_mask`` marks it: the content of an assistant turn and the ``<|eos|>`` that
closes it (so the tuned model learns to stop), never the system or user text, nor the role
markers, which are given. Everything else is ``IGNORE_INDEX``, so ``kilnlm.train.TokenLoss``,
the pretraining loss, trains SFT unchanged: the objective is in the batch, not in the step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from kilnlm.chat import encode_chat, loss_mask
from kilnlm.posttrain.data import Chat
from kilnlm.posttrain.plugin import PostTrainPlugin, rank_share, right_pad
from kilnlm.tokenizer import Tokenizer
from kilnlm.train import (
    IGNORE_INDEX,
    TOKEN_LOSS,
    Objective,
    autocast,
    eval_mode,
    lm_loss,
    n_scored,
)


@dataclass(frozen=True)
class SFTExample:
    """Inputs and targets of one conversation (targets ``IGNORE_INDEX`` off the assistant's turns)."""

    x: tuple[int, ...]
    y: tuple[int, ...]


def encode_sft(tokenizer: Tokenizer, chat: Chat) -> SFTExample:
    ids = encode_chat(tokenizer, chat, add_generation_prompt=False)
    mask = loss_mask(tokenizer, ids)
    y = [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:], strict=True)]
    return SFTExample(tuple(ids[:-1]), tuple(y))


def encode_all(
    tokenizer: Tokenizer, chats: Sequence[Chat], max_len: int, skipped: dict[str, int]
) -> list[SFTExample]:
    """Encode every chat; those longer than ``max_len`` tokens are skipped and counted."""
    out = []
    for chat in chats:
        ex = encode_sft(tokenizer, chat)
        if len(ex.x) > max_len:
            skipped["too_long"] = skipped.get("too_long", 0) + 1
        else:
            out.append(ex)
    return out


def collate(examples: Sequence[SFTExample], pad_id: int) -> tuple[Tensor, Tensor]:
    """(x, y), each (B, T): right-padded, pad targets ignored."""
    x = right_pad([list(e.x) for e in examples], pad_id)
    y = right_pad([list(e.y) for e in examples], IGNORE_INDEX, x.size(1))
    return x, y


@torch.no_grad()
def assistant_loss(
    model: nn.Module,
    examples: Sequence[SFTExample],
    pad_id: int,
    batch_size: int = 16,
    autocast_dtype: torch.dtype | None = None,
) -> float:
    """Mean NLL (nats) per assistant token over ``examples``; the model's mode is kept."""
    device = next(model.parameters()).device
    total, count = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.long)
    with eval_mode(model):
        for i in range(0, len(examples), batch_size):
            x, y = (t.to(device) for t in collate(examples[i : i + batch_size], pad_id))
            with autocast(device, autocast_dtype):
                logits = model(x)  # (B, T, V)
            total += lm_loss(logits, y, reduction="sum").double().cpu()
            count += n_scored(y).cpu()
    return float(total / count.clamp(min=1))


@dataclass
class SFTPlugin(PostTrainPlugin):
    """SFT as a plug-in of the one worker (see ``kilnlm.posttrain.plugin``)."""

    train: list[SFTExample] = field(default_factory=list)
    heldout_examples: list[SFTExample] = field(default_factory=list)

    objective_name = "sft"

    @property
    def loss(self) -> Objective:
        return TOKEN_LOSS

    def n_train(self) -> int:
        return len(self.train)

    def batch(self, index: int, rank: int, world: int) -> tuple[Tensor, Tensor]:
        return collate([self.train[i] for i in self.rows(index, rank, world)], self.pad_id)

    def heldout(
        self, model: nn.Module, rank: int, world: int, autocast_dtype: torch.dtype | None
    ) -> dict[str, float]:
        share = rank_share(self.heldout_examples, rank, world, self.eval_cap)
        if not share:
            return {}
        return {
            "heldout_loss": assistant_loss(
                model, share, self.pad_id, self.batch_size, autocast_dtype
            )
        }


# --------------------------------------------------------------------------------------------
# Answer quality on held-out prompts


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (the dynamic programme ROUGE-L rests on)."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 over whitespace tokens (Lin, 2004): 2PR/(P+R) of the longest common subsequence."""
    c, r = candidate.split(), reference.split()
    lcs = lcs_length(c, r)
    if lcs == 0:
        return 0.0
    p, rec = lcs / len(c), lcs / len(r)
    return 2 * p * rec / (p + rec)


def greedy_answers(
    model: nn.Module, tokenizer: Tokenizer, chats: Sequence[Chat], max_tokens: int
) -> list[dict[str, Any]]:
    """Greedy replies to each chat's prompt (every turn before its last, which is the reference)."""
    from kilnlm.generate import generate
    from kilnlm.sampling import SamplingParams

    out = []
    for chat in chats:
        prompt = encode_chat(tokenizer, chat[:-1], add_generation_prompt=True)
        room = model.config.block_size - len(prompt)
        if room < 1:
            continue
        params = SamplingParams(temperature=0.0, max_tokens=min(max_tokens, room))
        result = generate(model, prompt, params, eos_id=tokenizer.eos_id)
        answer = tokenizer.decode(result.token_ids)
        out.append(
            {
                "prompt": chat[-2]["content"],
                "reference": chat[-1]["content"],
                "answer": answer,
                "stopped_at_eos": result.finish_reason == "eos",
            }
        )
    return out


def answer_overlap(answers: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Exact-match rate, mean ROUGE-L F1 and the share of replies that ended at ``<|eos|>``."""
    n = max(len(answers), 1)
    return {
        "exact_match": sum(a["answer"].strip() == a["reference"].strip() for a in answers) / n,
        "rouge_l": sum(rouge_l(a["answer"], a["reference"]) for a in answers) / n,
        "stopped_at_eos": sum(a["stopped_at_eos"] for a in answers) / n,
        "prompts": len(answers),
    }


__all__ = [
    "SFTExample",
    "SFTPlugin",
    "answer_overlap",
    "assistant_loss",
    "collate",
    "encode_all",
    "encode_sft",
    "greedy_answers",
    "lcs_length",
    "rouge_l",
]
