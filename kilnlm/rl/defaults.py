"""``kiln rl --defaults``: online RL on post-training I's embedded-default results, no Ray here.

Post-training I (``make posttrain``) leaves in one folder the SFT export (``DIR/sft``) and the
reward model trained from it on the embedded preference set (``DIR/reward``). That reward model
separates a true answer from a planted wrong one but scores every reply of the SFT policy alike
(≈ +3, spread 0.007 within a prompt: docs/post-training.md), so RL on it only drifts. The
defaults run therefore uses a reward model trained the RLHF way, on pairs of the SFT policy's
own replies to training prompts, ranked by ROUGE-L to the reference answer
(``kilnlm.posttrain.onpolicy``; built into ``DIR/reward-onpolicy`` by
``ensure_onpolicy_reward`` when missing), and chooses its three β from that model's measured
spread on π0's replies (``betas_for``). π0 (and the KL reference) is the SFT model; the prompts
are held-out prompts of the embedded instruction set (modules neither SFT nor either reward
model trained on) of the two kinds the pairs judge ("What does `m.f` do?", "Write a Python
function that ..."), taken evenly across the held-out modules. It runs the live loop once per
β, each from π0, measures π0's and each final policy's ROUGE-L to the references next to their
reward (``policy_quality``: reward hacking would show), and draws the reward/KL trade-off of
the three runs in one PNG. ``DefaultsSize`` is sized to finish in minutes on 2 CPU cores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import zip_longest
from pathlib import Path
from typing import Any

from kilnlm.posttrain.data import read_preferences
from kilnlm.posttrain.onpolicy import KINDS as PROMPT_KINDS
from kilnlm.posttrain.onpolicy import OnPolicyConfig
from kilnlm.rl.prompts import RLPrompt


@dataclass(frozen=True)
class DefaultsSize:
    """The defaults run's size per β (each flag of ``kiln rl`` overrides its field)."""

    prompts: int = 8
    samples: int = 8
    iterations: int = 4
    steps: int = 2
    """Optimiser steps per iteration (the second one reuses the samples under the IS weight)."""
    max_tokens: int = OnPolicyConfig.max_tokens
    """The on-policy reward model's pairs were sampled at this length: one number for both."""
    lr: float = 3e-4
    """Ten times smaller than the toy's 3e-3: AdamW's steps are sign-sized whatever the reward's
    scale, and at 1e-3 the SFT policy drifted 1.3 nats of KL per update on rewards that differ
    by 0.01 (measured), i.e. on noise."""


def find_exports(from_dir: str | Path) -> tuple[str, str]:
    """(SFT export, reward-model export) in ``from_dir``; an error naming what to run otherwise."""
    from kilnlm.checkpoint import read_manifest

    root = Path(from_dir)
    found = []
    for name, what in (("sft", "kiln finetune"), ("reward", "kiln reward train")):
        path = root / name
        if not (path / "manifest.json").is_file():
            raise FileNotFoundError(
                f"--from-dir {root}: no {name} export at {path}; run `make posttrain` first "
                f"(or `{what} ... --out {path}`)"
            )
        found.append(str(path.absolute()))
    if not isinstance(read_manifest(found[1]).fields.get("reward_head"), dict):
        raise ValueError(f"{found[1]} has no reward_head: it is not a `kiln reward train` export")
    return found[0], found[1]


ONPOLICY_REWARD = "reward-onpolicy"
"""The on-policy reward model's export folder inside ``--from-dir`` (built when missing)."""
ONPOLICY_DATA = "onpolicy"
"""Its pairs (``train.jsonl``, ``heldout.jsonl``), samples and ``summary.json``."""
BETA_PER_SD = (0.4, 1.4, 4.0)
"""The three β as multiples of the reward model's within-prompt sd σ on π0's replies: for a
small tilt KL(π*‖π0) ≈ Var(r)/(2β²), i.e. about 3, 0.25 and 0.03 nats, from "the reward
dominates" to "π0 dominates" (the ratios ``DEFAULT_BETAS`` had to the old model's 0.007)."""


def betas_for(sd: float) -> tuple[float, ...]:
    """``BETA_PER_SD`` times ``sd``, each to two significant figures."""
    if not sd > 0:
        raise ValueError(f"the reward model's within-prompt sd must be > 0, got {sd}")
    return tuple(float(f"{m * sd:.2g}") for m in BETA_PER_SD)


ONPOLICY_STEPS = 240
"""``kiln reward train`` steps on the on-policy pairs (batch 8: about one pass over them)."""


def kiln_command(*argv: str) -> list[str]:
    """``kiln ARGV`` run by this interpreter (the same install, whatever PATH holds)."""
    import sys

    run = "import sys; from kilnlm.cli import main; sys.exit(main(sys.argv[1:]))"
    return [sys.executable, "-c", run, *argv]


def ensure_onpolicy_reward(
    from_dir: str | Path, sft: str, old_reward: str, say: Any = print, steps: int = ONPOLICY_STEPS
) -> tuple[str, dict[str, Any]]:
    """(export, summary) of the reward model trained on the SFT policy's own replies.

    Each step is skipped when its output is already in ``DIR`` (a run cut short resumes):
    sample k replies per training prompt and per held-out prompt from the SFT export and label
    them by ROUGE-L to the reference (``kilnlm.posttrain.onpolicy``) into
    ``DIR/onpolicy/{train,heldout}.jsonl``; ``kiln reward train --from SFT --data train.jsonl
    --out DIR/reward-onpolicy``; then the new and the embedded-set reward model's pairwise
    accuracy on the held-out pairs, and the new one's within-prompt sd on the held-out replies,
    from which the three β are chosen (``betas_for``). All of it goes into
    ``DIR/onpolicy/summary.json``, which later runs read back.
    """
    import json
    import subprocess

    from kilnlm.posttrain import onpolicy

    root = Path(from_dir).absolute()
    export, data = root / ONPOLICY_REWARD, root / ONPOLICY_DATA
    summary_path = data / "summary.json"
    if (export / "manifest.json").is_file() and summary_path.is_file():
        return str(export), json.loads(summary_path.read_text())
    data.mkdir(parents=True, exist_ok=True)
    built: dict[str, Any] = {}
    for split in ("train", "heldout"):
        figures_path = data / f"{split}-pairs.json"
        if not (figures_path.is_file() and (data / f"{split}.jsonl").is_file()):
            say(f"on-policy pairs ({split} prompts): sampling the SFT policy ...")
            pairs, figures, samples = onpolicy.build_pairs(sft, split)  # type: ignore[arg-type]
            (data / f"{split}-samples.json").write_text(json.dumps(samples, indent=1) + "\n")
            onpolicy.write_pairs(data / f"{split}.jsonl", pairs)
            figures_path.write_text(json.dumps(figures, indent=2) + "\n")
        built[split] = json.loads(figures_path.read_text())
        say(f"  {built[split]['pairs']} {split} pairs from {built[split]['prompts']} prompts "
            f"({built[split]['dropped_ties']} ties dropped)")  # fmt: skip
    trained = data / "reward-train.json"
    if not (export / "manifest.json").is_file():
        say(f"kiln reward train --from {sft} --data {data / 'train.jsonl'} ({steps} steps) ...")
        cmd = kiln_command(
            "reward", "train", "--from", sft, "--data", str(data / "train.jsonl"), "--out",
            str(export), "--storage-path", str(root), "--max-steps", str(steps),
            "--no-progress", "--json",
        )  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"training the on-policy reward model failed: {tail[0]}")
        trained.write_text(done.stdout)
    say("scoring the held-out on-policy pairs ...")
    heldout, _ = read_preferences(data / "heldout.jsonl", dedup=False)
    samples = json.loads((data / "heldout-samples.json").read_text())
    spread = onpolicy.reward_spread(export, samples)
    summary = {
        "export": str(export),
        "pairs": built,
        "heldout_accuracy": onpolicy.pair_accuracy(export, heldout),
        "heldout_accuracy_embedded_reward": onpolicy.pair_accuracy(old_reward, heldout),
        "spread_on_sft_replies": spread,
        "spread_on_sft_replies_embedded_reward": onpolicy.reward_spread(old_reward, samples),
        "betas": list(betas_for(spread["reward_sd_within_prompt"])),
        "train": json.loads(trained.read_text()) if trained.is_file() else None,
    }
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    return str(export), summary


def heldout_prompts(n: int) -> tuple[RLPrompt, ...]:
    """``n`` held-out user prompts of the two judged kinds, alternating, spread evenly over the
    held-out set (a pure function of the interpreter's stdlib, like the sets themselves)."""
    from kilnlm.posttrain.defaults import default_sets

    if n < 1:
        raise ValueError(f"--prompt-count must be >= 1, got {n}")
    users = [c[0]["content"] for c in default_sets().heldout_chats]
    want = -(-n // len(PROMPT_KINDS))  # prompts of each kind
    spread = []
    for kind in PROMPT_KINDS:
        pool = [u for u in users if u.startswith(kind)]
        spread.append([pool[j * len(pool) // want] for j in range(min(want, len(pool)))])
    picked = [u for group in zip_longest(*spread) for u in group if u is not None][:n]
    return tuple(RLPrompt.chat([{"role": "user", "content": u}]) for u in picked)


def references(prompts: Sequence[RLPrompt]) -> list[str]:
    """The embedded instruction set's reference answer of each held-out chat prompt."""
    from kilnlm.posttrain.defaults import default_sets

    answer = {c[0]["content"]: c[-1]["content"] for c in default_sets().heldout_chats}
    return [answer[p.messages[-1]["content"]] for p in prompts if p.messages is not None]


def policy_quality(
    policy: str, reward: str, prompts: Sequence[RLPrompt], samples: int, max_tokens: int
) -> dict[str, Any]:
    """The checkable quality of a policy export next to its reward, in-process: ``samples``
    replies per prompt sampled as the loop samples (temperature 1, fixed seeds, so π0 and the
    final version answer the same draws), their mean ROUGE-L F1 to the reference answer and
    their mean reward; and the greedy replies' ROUGE-L. Reward hacking would show as the reward
    rising while ROUGE-L does not."""
    from kilnlm.checkpoint import load, load_tokenizer
    from kilnlm.posttrain.onpolicy import sample_replies
    from kilnlm.posttrain.sft import rouge_l
    from kilnlm.rl.reward import score_replies

    users = [p.messages[-1]["content"] for p in prompts if p.messages is not None]
    refs = references(prompts)
    model, tok = load(policy), load_tokenizer(policy)
    cfg = OnPolicyConfig(samples=samples, max_tokens=max_tokens, seed=7)
    replies = sample_replies(model, tok, users, cfg)
    flat = [(u, ref, r) for u, ref, rs in zip(users, refs, replies, strict=True) for r in rs]
    scores = score_replies(reward, [({"role": "user", "content": u},) for u, _, _ in flat],
                           [r for _, _, r in flat])  # fmt: skip
    greedy = sample_replies(model, tok, users, replace(cfg, samples=1, temperature=0.0))
    return {
        "policy": policy,
        "mean_reward": sum(scores) / len(scores),
        "rouge_l": sum(rouge_l(r, ref) for _, ref, r in flat) / len(flat),
        "greedy_rouge_l": sum(rouge_l(g[0], ref) for g, ref in zip(greedy, refs, strict=True))
        / len(refs),
        "samples": len(flat),
    }


def final_export(run_out: str | Path) -> str:
    """The last export a run wrote (the final promoted version's weights)."""
    exports = sorted((Path(run_out) / "train").glob("*/exports/step-*"))
    if not exports:
        raise FileNotFoundError(f"{run_out}: the run wrote no export")
    return str(exports[-1])


def tradeoff_rows(summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per β: mean reward and KL estimate of π0's samples and of the final version's
    (the run's own passes through the replicas), and where ``quality`` was measured, both
    policies' ROUGE-L to the references and reward in-process (``policy_quality``)."""
    rows = []
    for s in summaries:
        before, after = s.get("before") or {}, s.get("after") or {}
        rows.append(
            {
                "beta": s["beta"],
                "reward_before": before.get("mean_reward"),
                "kl_before": before.get("kl_estimate"),
                "reward_after": after.get("mean_reward"),
                "kl_after": after.get("kl_estimate"),
                "final_version": after.get("version"),
            }
        )
        quality = s.get("quality")  # policy_quality of π0 and of the final export, when measured
        if quality:
            for when in ("before", "after"):
                q = quality[when]
                rows[-1].update({f"rouge_l_{when}": q["rouge_l"],
                                 f"greedy_rouge_l_{when}": q["greedy_rouge_l"],
                                 f"sampled_reward_{when}": q["mean_reward"]})  # fmt: skip
    return rows


def plot_tradeoff(summaries: list[dict[str, Any]], path: Path) -> Path | None:
    """Mean reward against the KL(πθ‖π0) estimate, one line per β: π0, each iteration's served
    version, the final version; None without matplotlib."""
    from kilnlm.plots import pyplot, save_figure

    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for s in summaries:
        points = [(r["kl_estimate"], r["mean_reward"]) for r in s["iterations"]]
        if s.get("after"):
            points.append((s["after"]["kl_estimate"], s["after"]["mean_reward"]))
        ax.plot(*zip(*points, strict=True), "o-", label=f"β {s['beta']:g}")
        ax.plot(*points[-1], "k*", markersize=10)
    ax.set_xlabel("KL(πθ‖π0) estimate (nats, served samples)")
    ax.set_ylabel("mean reward (reward model)")
    ax.set_title("kiln rl --defaults: reward vs KL per β (★ final version)")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(plt, fig, path)


__all__ = [
    "BETA_PER_SD",
    "ONPOLICY_DATA",
    "ONPOLICY_REWARD",
    "DefaultsSize",
    "betas_for",
    "ensure_onpolicy_reward",
    "final_export",
    "find_exports",
    "heldout_prompts",
    "kiln_command",
    "plot_tradeoff",
    "policy_quality",
    "references",
    "tradeoff_rows",
]
