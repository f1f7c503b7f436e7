"""``kiln rl --defaults``: online RL on post-training I's embedded-default results, no Ray here.

Post-training I (``make posttrain``) leaves in one folder the SFT export (``DIR/sft``) and the
reward model trained from it (``DIR/reward``). The defaults run takes the SFT model as π0 (and
the KL reference), the reward model as the reward, and as prompts held-out prompts of the
embedded instruction set (``kilnlm.posttrain.defaults``: stdlib modules neither SFT nor the
reward model trained on), of the two kinds the preference set judges ("What does `m.f` do?",
"Write a Python function that ..."), taken evenly across the held-out modules. It runs the live
loop once per β of ``DEFAULT_BETAS``, each from π0, and draws the reward/KL trade-off of the
three runs in one PNG. ``DefaultsSize`` is sized to finish in minutes on 2 CPU cores.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path
from typing import Any

from kilnlm.rl.prompts import RLPrompt

DEFAULT_BETAS = (0.003, 0.01, 0.03)
"""In the default reward model's units. Its values are bimodal (≈ +3 for a reply it finds
sound, ≈ −3 for one that looks like a corrupted copy), and the SFT policy's replies sit in the
upper mode, spread by about 0.007 within a prompt's group (measured, docs/post-training.md):
what moves π* is r/β, so β is set against that spread. For a small tilt KL(π*‖π0) ≈
Var(r)/(2β²): about 3, 0.25 and 0.03 nats, from "the reward dominates" to "π0 dominates"."""
PROMPT_KINDS = ("What does `", "Write a Python function")


@dataclass(frozen=True)
class DefaultsSize:
    """The defaults run's size per β (each flag of ``kiln rl`` overrides its field)."""

    prompts: int = 8
    samples: int = 8
    iterations: int = 4
    steps: int = 2
    """Optimiser steps per iteration (the second one reuses the samples under the IS weight)."""
    max_tokens: int = 24
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


def tradeoff_rows(summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per β: mean reward and KL estimate of π0's samples and of the final version's."""
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
    "DEFAULT_BETAS",
    "DefaultsSize",
    "find_exports",
    "heldout_prompts",
    "plot_tradeoff",
    "tradeoff_rows",
]
