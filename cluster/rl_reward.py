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

A ``module:function`` reward is imported in the task (``load_reward``); a module of the current
directory or PYTHONPATH travels with the task as its sources (``reward_sources``), so a node
without this machine's folders imports the same code.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import ray

from kilnlm.rl.prompts import RLPrompt


@ray.remote(num_cpus=0.25)
def score_task(
    reward: str,
    pairs: list[tuple[str, str]],
    kind: Literal["model", "function"] = "function",
    messages: list[list[dict[str, str]]] | None = None,
    sources: dict[str, bytes] | None = None,
) -> list[float]:
    """Rewards of (prompt text, completion text) pairs; a reward model reads ``messages`` (each
    pair's prompt conversation) instead of the prompt text; ``sources`` is the reward module's
    code when it comes from the driver's folders (``reward_sources``)."""
    from kilnlm.rl.reward import load_reward, score_replies

    search = None
    if sources:
        search = [_import_shipped(sources), *sys.path]

    if kind == "model":
        if messages is None:
            raise ValueError("a reward model needs each prompt's messages")
        return score_replies(reward, messages, [c for _, c in pairs])
    fn = load_reward(reward, search)
    return [float(fn(p, c)) for p, c in pairs]


def reward_env() -> dict[str, Any]:
    """On this machine the task finds the reward's module as this command does: the current
    directory and PYTHONPATH travel as the task's PYTHONPATH (the module's siblings too)."""
    path = os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH", "")) if p)
    return {"env_vars": {"PYTHONPATH": path}}


def reward_module_path(reward: str) -> Path | None:
    """The file or package folder of ``reward``'s top-level module when it lives in the current
    directory or on PYTHONPATH (what must travel to other nodes); None for a reward-model folder
    or a module installed in the environment (every node has those, like kilnlm itself)."""
    import importlib.machinery

    name, sep, _ = reward.partition(":")
    if not sep or not name:
        return None
    search = [os.getcwd(), *(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p)]
    spec = importlib.machinery.PathFinder.find_spec(name.split(".")[0], search)
    if spec is None:
        return None
    if spec.submodule_search_locations:  # a package: its folder
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(spec.origin) if spec.origin and spec.origin.endswith(".py") else None


def reward_sources(reward: str) -> dict[str, bytes] | None:
    """The reward module's Python sources, relative path -> bytes, to travel with the task.

    Ray uploads folders and modules (``py_modules``) only for a whole job (``ray.init``), not
    for one task, and the other nodes of a cluster do not have this machine's folders; so the
    sources go as the task's argument, and the task writes them into a folder of its node and
    imports from there (``_import_shipped``). A package travels whole (every ``.py`` under it).
    """
    path = reward_module_path(reward)
    if path is None:
        return None
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {
        str(f.relative_to(path.parent)): f.read_bytes()
        for f in sorted(path.rglob("*.py"))
        if "__pycache__" not in f.parts
    }


def _import_shipped(sources: dict[str, bytes]) -> str:
    """Write the shipped sources into a folder named by their hash (once per node), put it on
    ``sys.path`` (the package's own submodule imports) and return it: ``load_reward`` looks
    there first, so a same-named module in the worker's directory does not win."""
    import hashlib
    import tempfile

    digest = hashlib.sha256()
    for name in sorted(sources):
        digest.update(name.encode() + b"\0" + sources[name] + b"\0")
    root = Path(tempfile.gettempdir()) / f"kiln-reward-src-{digest.hexdigest()[:16]}"
    if not root.is_dir():
        staging = Path(tempfile.mkdtemp(prefix="kiln-reward-staging-"))
        for name, data in sources.items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_bytes(data)
        try:
            staging.rename(root)
        except OSError:  # another worker of this node got there first: same bytes
            import shutil

            shutil.rmtree(staging, ignore_errors=True)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return str(root)


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
    sources = reward_sources(reward) if kind == "function" else None
    task = score_task.options(runtime_env=reward_env())
    return ray.get(task.remote(reward, pairs, kind, messages, sources))


__all__ = ["reward_env", "reward_module_path", "reward_sources", "score_rewards", "score_task"]
