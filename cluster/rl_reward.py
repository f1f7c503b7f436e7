"""``kiln rl``'s rewards, computed in a Ray task: a Python function or a reward-model export.

Why a task and not a Serve deployment for the reward model: the RL loop asks for every
iteration's rewards at once, as one batch, and the reward model is fixed for the whole run
(never gated or hot-swapped). A task scores the batch in one padded forward pass per 16 rows,
on the cluster, and holds nothing between iterations but its process's cache of the loaded
export (``kilnlm.rl.reward._reward_model``; Ray reuses the worker, so later iterations skip the
load). A deployment would keep a second replica, with its engine, KV-cache reservation and swap
agent, alive on the 2-core laptop for the whole run, and its ``Reward`` RPC scores one pair per
call. Both paths read the head as ``kiln reward score`` does (``kilnlm.rl.reward.score_replies``
and ``actors.serving_model.ServingModel.reward`` share the encoding and
``kilnlm.posttrain.reward.rewards``); a reward model that other clients query while it serves
is what ``kiln serve`` on the export and the ``Reward`` RPC are for.

A ``module:function`` reward is imported in the task (``load_reward``); the module travels as
the task's PYTHONPATH (the current directory and this shell's PYTHONPATH): enough on one
machine, not a multi-node shipping of the module.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Literal

import ray

from kilnlm.rl.prompts import RLPrompt


@ray.remote(num_cpus=0.25)
def score_task(
    reward: str,
    pairs: list[tuple[str, str]],
    kind: Literal["model", "function"] = "function",
    messages: list[list[dict[str, str]]] | None = None,
) -> list[float]:
    """Rewards of (prompt text, completion text) pairs; a reward model reads ``messages`` (each
    pair's prompt conversation) instead of the prompt text."""
    from kilnlm.rl.reward import load_reward, score_replies

    if kind == "model":
        if messages is None:
            raise ValueError("a reward model needs each prompt's messages")
        return score_replies(reward, messages, [c for _, c in pairs])
    fn = load_reward(reward)
    return [float(fn(p, c)) for p, c in pairs]


def reward_env() -> dict[str, Any]:
    """The task finds the reward's module as this command does: the current directory and
    PYTHONPATH travel as the task's PYTHONPATH."""
    path = os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH", "")) if p)
    return {"env_vars": {"PYTHONPATH": path}}


def score_rewards(
    reward: str,
    prompts: Sequence[RLPrompt],
    prompt_texts: Sequence[str],
    completions: Sequence[str],
) -> list[float]:
    """One reward per completion, in order, computed in one Ray task."""
    from kilnlm.rl.reward import reward_kind

    kind = reward_kind(reward)
    pairs = list(zip(prompt_texts, completions, strict=True))
    messages = [p.reward_messages() for p in prompts] if kind == "model" else None
    task = score_task.options(runtime_env=reward_env())
    return ray.get(task.remote(reward, pairs, kind, messages))


__all__ = ["reward_env", "score_rewards", "score_task"]
