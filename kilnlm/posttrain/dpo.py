"""Direct preference optimisation (DPO; Rafailov et al., 2023).

The KL-regularised objective max_π E[r] − β·KL(π‖π_ref) has the closed-form optimum
π*(y|x) ∝ π_ref(y|x)·exp(r(x,y)/β). Solved for r, r(x,y) = β·log(π*(y|x)/π_ref(y|x)) + β·log Z(x);
put into the Bradley–Terry likelihood of the preferences, Z cancels and the policy is fitted to
the pairs directly, with no reward model and no sampling:

    loss = −log σ(β·[(log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))])

log π(y|x) is the sum of the reply's token log-probs (its closing ``<|eos|>`` included), prompt
tokens excluded. β·(log π − log π_ref) is the *implicit reward*; its ranking of held-out pairs
is the accuracy reported.

**Reference log-probs are computed once, before training** (``reference_logps``), not by a
frozen copy of the model beside the policy: π_ref never changes, so a frozen copy would redo the
same forward for every pair in every epoch and hold a second set of weights (and its FSDP
shards) on every worker for the whole run. Once costs one no-grad pass over the pairs and two
floats per pair, which travel inside the plug-in; a resumed run reuses them, so resume stays
bit-exact. (The price: they are computed by the launching process; for a model too large for
it, compute them on the workers in the same way.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kilnlm.posttrain.plugin import PostTrainPlugin, rank_share, right_pad
from kilnlm.posttrain.reward import PairExample, pair_accuracy
from kilnlm.train import IGNORE_INDEX, Objective, autocast, eval_mode

RefLogps = tuple[float, float]
"""(log π_ref(y_w|x), log π_ref(y_l|x)) of one pair."""


def reply_rows(examples: Sequence[PairExample]) -> tuple[list[list[int]], list[list[int]]]:
    """Inputs and targets of 2B rows (chosen first): targets only on the reply's tokens."""
    xs, ys = [], []
    for seq, e in [(e.chosen, e) for e in examples] + [(e.rejected, e) for e in examples]:
        xs.append(list(seq[:-1]))
        # target t is token t+1; it belongs to the reply when t+1 >= prompt_len
        ys.append([tok if t + 1 >= e.prompt_len else IGNORE_INDEX for t, tok in enumerate(seq[1:])])
    return xs, ys


def collate_dpo(
    examples: Sequence[PairExample], refs: Sequence[RefLogps], pad_id: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(x (2B, T), y (2B, T), ref (2B,)): chosen rows then rejected rows."""
    xs, ys = reply_rows(examples)
    x = right_pad(xs, pad_id)
    y = right_pad(ys, IGNORE_INDEX, x.size(1))
    ref = torch.tensor([r[0] for r in refs] + [r[1] for r in refs], dtype=torch.float32)
    return x, y, ref


def sequence_logps(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Σ log p(y_t | x_≤t) over each row's scored targets, (N,) in fp32."""
    logp = torch.log_softmax(model(x).float(), dim=-1)  # (N, T, V)
    scored = y != IGNORE_INDEX
    picked = logp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (N, T)
    return (picked * scored).sum(-1)


def dpo_margins(policy: Tensor, ref: Tensor, beta: float) -> Tensor:
    """β·[(π_w − ref_w) − (π_l − ref_l)] per pair, rows laid out (chosen, rejected)."""
    b = policy.size(0) // 2
    reward = beta * (policy - ref)
    return reward[:b] - reward[b:]


@dataclass(frozen=True)
class DPOLoss:
    """The DPO objective for ``train_step``: counts pairs, sums −log σ(margin)."""

    beta: float

    def count(self, batch: tuple[Tensor, ...]) -> Tensor:
        return torch.tensor(batch[0].size(0) // 2, device=batch[0].device)

    def loss_sum(self, model: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
        x, y, ref = batch
        return -F.logsigmoid(dpo_margins(sequence_logps(model, x, y), ref, self.beta)).sum()


@torch.no_grad()
def pair_logps(
    model: nn.Module,
    examples: Sequence[PairExample],
    pad_id: int,
    batch_size: int = 16,
    autocast_dtype: torch.dtype | None = None,
) -> list[RefLogps]:
    """(log π(y_w|x), log π(y_l|x)) per pair under ``model``; its mode is kept."""
    device = next(model.parameters()).device
    out: list[RefLogps] = []
    with eval_mode(model):
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            xs, ys = reply_rows(chunk)
            x = right_pad(xs, pad_id).to(device)
            y = right_pad(ys, IGNORE_INDEX, x.size(1)).to(device)
            with autocast(device, autocast_dtype):
                lp = sequence_logps(model, x, y).cpu()
            out += list(zip(lp[: len(chunk)].tolist(), lp[len(chunk) :].tolist(), strict=True))
    return out


reference_logps = pair_logps
"""The reference's log-probs, computed once with the parent model before training."""


def implicit_figures(
    policy: Sequence[RefLogps], ref: Sequence[RefLogps], beta: float
) -> dict[str, float]:
    """Implicit-reward accuracy (ties half) and mean margin; likelihood-ranking accuracy of both."""
    p = torch.tensor(policy, dtype=torch.float64)
    r = torch.tensor(ref, dtype=torch.float64)
    n = max(len(policy), 1)
    margin = beta * ((p[:, 0] - r[:, 0]) - (p[:, 1] - r[:, 1]))
    return {
        "implicit_accuracy": pair_accuracy(margin, n),
        "implicit_margin": float(margin.sum() / n),
        "loss": float(-F.logsigmoid(margin).sum() / n),
        "policy_logp_accuracy": pair_accuracy(p[:, 0] - p[:, 1], n),
        "reference_logp_accuracy": pair_accuracy(r[:, 0] - r[:, 1], n),
        "pairs": len(policy),
    }


@dataclass
class DPOPlugin(PostTrainPlugin):
    """DPO as a plug-in of the one worker (see ``kilnlm.posttrain.plugin``)."""

    beta: float = 0.1
    train: list[PairExample] = field(default_factory=list)
    train_refs: list[RefLogps] = field(default_factory=list)
    heldout_examples: list[PairExample] = field(default_factory=list)
    heldout_refs: list[RefLogps] = field(default_factory=list)

    objective_name = "dpo"

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"DPO beta must be > 0, got {self.beta}")
        if len(self.train_refs) != len(self.train) or len(self.heldout_refs) != len(
            self.heldout_examples
        ):
            raise ValueError(
                "DPOPlugin needs one reference (chosen, rejected) log-prob pair per example"
            )

    @property
    def loss(self) -> Objective:
        return DPOLoss(self.beta)

    def n_train(self) -> int:
        return len(self.train)

    def batch(self, index: int, rank: int, world: int) -> tuple[Tensor, Tensor, Tensor]:
        rows = self.rows(index, rank, world)
        return collate_dpo(
            [self.train[i] for i in rows], [self.train_refs[i] for i in rows], self.pad_id
        )

    def heldout(
        self, model: nn.Module, rank: int, world: int, autocast_dtype: torch.dtype | None
    ) -> dict[str, float]:
        share = rank_share(
            list(zip(self.heldout_examples, self.heldout_refs, strict=True)),
            rank,
            world,
            self.eval_cap,
        )
        if not share:
            return {}
        policy = pair_logps(
            model, [e for e, _ in share], self.pad_id, self.batch_size, autocast_dtype
        )
        f = implicit_figures(policy, [r for _, r in share], self.beta)
        return {
            "heldout_loss": f["loss"],
            "heldout_accuracy": f["implicit_accuracy"],
            "heldout_margin": f["implicit_margin"],
        }

    def manifest_fields(self) -> dict[str, object]:
        return {**super().manifest_fields(), "beta": self.beta}


# --------------------------------------------------------------------------------------------
# KL to the reference on held-out prompts


@torch.no_grad()
def kl_to_reference(
    policy: nn.Module,
    reference: nn.Module,
    prompts: Sequence[list[int]],
    eos_id: int,
    max_tokens: int = 48,
    seed: int = 0,
) -> dict[str, float]:
    """KL(π‖π_ref) per held-out prompt, in nats: replies sampled from π (temperature 1), and at
    every reply position the exact KL between the two next-token distributions, summed over the
    reply. Its mean over prompts is an unbiased estimate of the sequence-level KL."""
    from kilnlm.generate import generate
    from kilnlm.sampling import SamplingParams

    total = tokens = 0.0
    for i, prompt in enumerate(prompts):
        room = policy.config.block_size - len(prompt)
        if room < 1:
            continue
        params = SamplingParams(
            temperature=1.0, top_p=1.0, max_tokens=min(max_tokens, room), seed=seed + i
        )
        result = generate(policy, prompt, params, eos_id=eos_id)
        # The positions that chose a reply token, and the one that chose <|eos|> if it ended so.
        n_choices = len(result.token_ids) + (result.finish_reason == "eos")
        ids = (prompt + result.token_ids)[: len(prompt) - 1 + n_choices]
        x = torch.tensor([ids], device=next(policy.parameters()).device)
        lp = torch.log_softmax(policy(x).float(), -1)[0, len(prompt) - 1 :]  # (n_choices, V)
        lq = torch.log_softmax(reference(x).float(), -1)[0, len(prompt) - 1 :]
        total += float((lp.exp() * (lp - lq)).sum())
        tokens += lp.size(0)
    n = max(len(prompts), 1)
    return {
        "kl_per_prompt": total / n,
        "kl_per_token": total / max(tokens, 1),
        "prompts": len(prompts),
    }


__all__ = [
    "DPOLoss",
    "DPOPlugin",
    "collate_dpo",
    "dpo_margins",
    "implicit_figures",
    "kl_to_reference",
    "pair_logps",
    "reference_logps",
    "sequence_logps",
]
