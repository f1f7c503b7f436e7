"""On-policy preference pairs: the policy's own samples, ranked by a rule anyone can check.

The embedded preference set (``kilnlm.posttrain.defaults``) pairs a true answer with a planted
wrong one (another function's docstring, a corrupted copy of the source). A reward model
trained on it separates those two modes, but the SFT policy's own replies all sit in one of
them, so it cannot rank them (docs/post-training.md, "Online RL"). RLHF collects its pairs
from the policy it will improve instead: k replies per prompt from the SFT policy, labelled.
Here the label is a rule against the prompt's reference answer in the embedded instruction
set: the reply with the higher ROUGE-L F1 to the reference (``kilnlm.posttrain.sft.rouge_l``,
the overlap post-training I reports) is chosen; pairs whose ROUGE-L differ by no more than
``min_gap`` (ties) and identical replies are dropped and counted.

Prompts are the two kinds the RL run is asked ("What does `m.f` do?", "Write a Python
function that ..."), from the **training** modules for the pairs a reward model trains on and
from the **held-out** modules for the pairs its accuracy is measured on: the RL run's held-out
prompts are never a pair's prompt in training. Replies are sampled in-process with
``kilnlm.generate`` exactly as the RL loop asks the replicas (temperature 1, top-p 1, the same
``max_tokens``, the chat rendered with the generation prompt), each with its own seed, so the
reward model sees replies of the distribution it will score. No Ray here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from kilnlm.posttrain.data import Preference, preference_record, write_jsonl
from kilnlm.posttrain.sft import rouge_l

Split = Literal["train", "heldout"]
KINDS = ("What does `", "Write a Python function")
"""The user-prompt kinds paired: the two the RL defaults run asks (``kilnlm.rl.defaults``)."""


@dataclass(frozen=True)
class OnPolicyConfig:
    """How many replies are sampled and which pairs are kept."""

    samples: int = 4
    """Replies per prompt (k); up to k(k−1)/2 pairs each (``build_pairs`` needs >= 2)."""
    max_tokens: int = 24
    """Longest reply: the RL defaults run's ``max_tokens``, so the pairs look like its samples."""
    min_gap: float = 0.0
    """A pair is kept only when the two ROUGE-L differ by more than this (0: exact ties dropped)."""
    seed: int = 0
    temperature: float = 1.0
    """1 as the RL loop samples; 0 gives greedy replies (for figures, not pairs)."""
    batch_rows: int = 256
    """Rows per batched ``generate`` call (memory, not results: every row has its own seed)."""

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")
        if self.max_tokens < 1 or self.min_gap < 0 or self.batch_rows < 1:
            raise ValueError("max_tokens and batch_rows must be >= 1 and min_gap >= 0")


@dataclass(frozen=True)
class Reference:
    """One prompt of the embedded instruction set with its reference answer."""

    user: str
    answer: str
    module: str


def reference_prompts(split: Split, limit: int | None = None) -> list[Reference]:
    """The ``KINDS`` prompts of one split of the embedded instruction set, with their answers,
    split by module as ``default_sets`` splits them; ``limit`` takes that many spread evenly over
    the split (a pure function of the stdlib)."""
    from kilnlm.posttrain.defaults import DefaultsConfig, instructions, is_heldout, stdlib_functions

    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    cfg = DefaultsConfig()
    out = [
        Reference(chat[0]["content"], chat[-1]["content"], module)
        for module, chat in instructions(stdlib_functions(cfg))
        if chat[0]["content"].startswith(KINDS)
        and is_heldout(module, cfg.heldout_fraction) == (split == "heldout")
    ]
    if limit is not None and limit < len(out):
        out = [out[j * len(out) // limit] for j in range(limit)]
    return out


def label_pairs(
    user: str, reference: str, replies: Sequence[str], min_gap: float = 0.0
) -> tuple[list[Preference], dict[str, int]]:
    """Every pair of distinct replies whose ROUGE-L to ``reference`` differ by more than
    ``min_gap``, the higher one chosen; counts of what was dropped and why."""
    prompt = ({"role": "user", "content": user},)
    unique = list(dict.fromkeys(replies))
    scores = [rouge_l(r, reference) for r in unique]
    pairs: list[Preference] = []
    ties = 0
    for i in range(len(unique)):
        for j in range(i + 1, len(unique)):
            gap = scores[i] - scores[j]
            if abs(gap) <= min_gap:
                ties += 1
                continue
            win, lose = (i, j) if gap > 0 else (j, i)
            pairs.append(Preference(prompt, unique[win], unique[lose], None))
    n = len(replies)
    return pairs, {"identical": n * (n - 1) // 2 - len(unique) * (len(unique) - 1) // 2,
                   "ties": ties}  # fmt: skip


def sample_replies(
    model: Any, tokenizer: Any, users: Sequence[str], cfg: OnPolicyConfig
) -> list[list[str]]:
    """k replies per user prompt, sampled as the RL loop samples (temperature 1, own seeds)."""
    import torch

    from kilnlm.chat import encode_chat
    from kilnlm.generate import generate
    from kilnlm.sampling import SamplingParams

    rows = []
    for p, user in enumerate(users):
        ids = encode_chat(tokenizer, [{"role": "user", "content": user}], True)
        for j in range(cfg.samples):
            seed = cfg.seed * 1_000_003 + p * cfg.samples + j
            rows.append(
                (
                    ids,
                    SamplingParams(
                        temperature=cfg.temperature, max_tokens=cfg.max_tokens, seed=seed
                    ),
                )
            )
    texts: list[str] = []
    with torch.no_grad():
        for i in range(0, len(rows), cfg.batch_rows):
            chunk = rows[i : i + cfg.batch_rows]
            results = generate(
                model, [r[0] for r in chunk], [r[1] for r in chunk], eos_id=tokenizer.eos_id
            )
            texts += [tokenizer.decode(r.token_ids) for r in results]
    return [texts[p * cfg.samples : (p + 1) * cfg.samples] for p in range(len(users))]


def build_pairs(
    policy: str | Path,
    split: Split,
    cfg: OnPolicyConfig = OnPolicyConfig(),
    limit: int | None = None,
) -> tuple[list[Preference], dict[str, Any], list[dict[str, Any]]]:
    """(pairs, summary, samples) for one split: the policy export's own replies, labelled."""
    from kilnlm.checkpoint import load, load_tokenizer

    if cfg.samples < 2:
        raise ValueError(f"samples must be >= 2 to make a pair, got {cfg.samples}")
    refs = reference_prompts(split, limit)
    model, tokenizer = load(policy), load_tokenizer(policy)
    replies = sample_replies(model, tokenizer, [r.user for r in refs], cfg)
    pairs: list[Preference] = []
    dropped = {"identical": 0, "ties": 0}
    samples = []
    for ref, got in zip(refs, replies, strict=True):
        kept, why = label_pairs(ref.user, ref.answer, got, cfg.min_gap)
        pairs += kept
        for k in dropped:
            dropped[k] += why[k]
        samples.append(
            {"prompt": ref.user, "reference": ref.answer, "replies": got,
             "rouge_l": [rouge_l(g, ref.answer) for g in got]}
        )  # fmt: skip
    summary = {
        "policy": str(policy),
        "split": split,
        "prompts": len(refs),
        "samples": cfg.samples,
        "max_tokens": cfg.max_tokens,
        "min_gap": cfg.min_gap,
        "pairs": len(pairs),
        "dropped_identical": dropped["identical"],
        "dropped_ties": dropped["ties"],
        "mean_rouge_l": sum(x for s in samples for x in s["rouge_l"])
        / max(1, sum(len(s["rouge_l"]) for s in samples)),
    }
    return pairs, summary, samples


def pair_accuracy(reward: str | Path, pairs: Sequence[Preference]) -> dict[str, float]:
    """A reward-model export's pairwise figures on ``pairs`` (a tie counts half, as
    ``kilnlm.posttrain.reward.pairwise_figures`` counts it for every held-out figure)."""
    from kilnlm.posttrain.reward import pairwise_figures
    from kilnlm.rl.reward import score_replies

    prompts = [p.prompt for p in pairs]
    chosen = score_replies(str(reward), prompts, [p.chosen for p in pairs])
    rejected = score_replies(str(reward), prompts, [p.rejected for p in pairs])
    return pairwise_figures(list(zip(chosen, rejected, strict=True)))


def reward_spread(reward: str | Path, samples: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Mean reward and its mean within-prompt population sd over ``build_pairs``' samples
    (what RLOO's advantages are made of, computed as the RL run's before/after figure is)."""
    import statistics

    from kilnlm.rl.reward import score_replies

    prompts = [({"role": "user", "content": s["prompt"]},) for s in samples for _ in s["replies"]]
    scores = score_replies(str(reward), prompts, [r for s in samples for r in s["replies"]])
    k = len(samples[0]["replies"])
    groups = [scores[i : i + k] for i in range(0, len(scores), k)]
    return {
        "mean_reward": sum(scores) / len(scores),
        "reward_sd_within_prompt": sum(statistics.pstdev(g) for g in groups) / len(groups),
    }


def write_pairs(path: str | Path, pairs: Sequence[Preference]) -> Path:
    """Standard preference JSONL (``{"prompt": [messages], "chosen": ..., "rejected": ...}``)."""
    return write_jsonl(path, [preference_record(p) for p in pairs])


__all__ = [
    "KINDS",
    "OnPolicyConfig",
    "Reference",
    "build_pairs",
    "label_pairs",
    "pair_accuracy",
    "reference_prompts",
    "reward_spread",
    "sample_replies",
    "write_pairs",
]
