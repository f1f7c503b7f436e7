"""Rewards as Python functions, named by an import path ``package.module:function``.

A reward is any callable ``(prompt_text, completion_text) -> float``: a user's own rule (tests
pass, a regex, a length). ``load_reward`` resolves the path where Python finds modules for the
command that runs it: the current directory first, then ``sys.path`` (which holds PYTHONPATH).
A console script's ``sys.path`` starts with the script's folder, not the current directory, so
the current directory is searched explicitly, through the import system's own path finder and
without editing ``sys.path``.

``toy_reward`` is the toy's default (``kilnlm.rl.reward:toy_reward``).

A reward can also be a **reward-model export** (``kiln reward train``: its manifest names the
``reward_head``). ``score_replies`` reads it exactly as ``kiln reward score`` does: the prompt
conversation with the generation prompt (``encode_chat``), the reply's text encoded, the closing
``<|eos|>``, the head's logit there (``kilnlm.posttrain.reward.rewards``), so a (prompt,
completion) gets the value ``kiln reward score`` prints for it. ``reward_kind`` tells the two
apart: an existing folder is a reward model, ``module:function`` is a function.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

RewardFn = Callable[[str, str], float]

TOY_REWARD = "kilnlm.rl.reward:toy_reward"


def toy_reward(prompt: str, completion: str) -> float:
    """A point per ``a`` and a point for ending on ``b``: the toy's π0 rarely writes ``a``, so π*
    moves mass to completions π0 finds unlikely, and the ending rule gives the posterior structure
    beyond a per-letter tilt (it couples letters and length). In [0, 5] for max_len 5."""
    return float(completion.count("a")) + (1.0 if completion.endswith("b") else 0.0)


def load_reward(path: str, search: Sequence[str] | None = None) -> RewardFn:
    """The callable at ``package.module:function``, its top-level module looked for in
    ``search`` (default: the current directory, then sys.path)."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"reward must look like package.module:function, got {path!r}")
    module = _import(module_name, search)
    obj: object = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{module_name} has no {attr!r}; check the name after ':' in {path!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(
            f"{path} is a {type(obj).__name__}, not a function (prompt, completion) -> float"
        )
    return obj  # type: ignore[return-value]


def _import(module_name: str, search: Sequence[str] | None = None) -> ModuleType:
    """Import ``module_name``, looking for its top-level package in ``search`` (default: the
    current directory first, then sys.path)."""
    top = module_name.split(".")[0]
    if top not in sys.modules:
        where = list(search) if search is not None else [os.getcwd(), *sys.path]
        spec = importlib.machinery.PathFinder.find_spec(top, where)
        if spec is None or spec.loader is None:
            raise ValueError(
                f"no module {top!r} in the current directory or on PYTHONPATH; "
                "run from the folder that holds it or add that folder to PYTHONPATH"
            )
        module = importlib.util.module_from_spec(spec)
        sys.modules[top] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[top]
            raise
    return importlib.import_module(module_name)  # submodules resolve through the package's path


def reward_kind(spec: str) -> Literal["model", "function"]:
    """``model`` for a reward-model export folder, ``function`` for ``module:function``; a
    ValueError saying what to give otherwise (checked before any Ray is started)."""
    path = Path(spec)
    if path.is_dir():
        from kilnlm.checkpoint import read_manifest

        if not (path / "manifest.json").is_file():
            raise ValueError(f"--reward {spec}: a folder without manifest.json is not an export")
        head = read_manifest(path).fields.get("reward_head")
        if not isinstance(head, dict):
            raise ValueError(
                f"--reward {spec} is an export without a reward_head (not a reward model); "
                "train one with `kiln reward train`, or give package.module:function"
            )
        return "model"
    if ":" in spec:
        return "function"
    raise ValueError(
        f"--reward {spec!r} is neither a folder (a reward-model export) nor package.module:function"
    )


@lru_cache(maxsize=2)
def _reward_model(path: str) -> tuple[Any, Any, int]:
    """(model, tokenizer, head id), loaded once per process: a Ray worker that scores every
    iteration keeps it (an export is immutable, so the path is a sound key)."""
    from kilnlm.checkpoint import load_tokenizer
    from kilnlm.posttrain.reward import load_reward_model

    model, head = load_reward_model(path)
    return model.eval(), load_tokenizer(path), head


def score_replies(
    path: str,
    prompts: Sequence[Sequence[Mapping[str, str]]],
    replies: Sequence[str],
    batch_size: int = 16,
) -> list[float]:
    """r(prompt, reply) under the reward-model export at ``path``, in order (``kiln reward
    score``'s encoding and head; rows right-padded in batches, read at each row's own eos)."""
    import torch

    from kilnlm.chat import encode_chat
    from kilnlm.posttrain.plugin import right_pad
    from kilnlm.posttrain.reward import encode_reply, rewards

    model, tok, head = _reward_model(str(Path(path).absolute()))
    rows = [
        list(encode_reply(tok, encode_chat(tok, list(p), add_generation_prompt=True), r))
        for p, r in zip(prompts, replies, strict=True)
    ]
    context = model.config.block_size
    too_long = [i for i, row in enumerate(rows) if len(row) > context]
    if too_long:
        raise ValueError(
            f"{len(too_long)} prompt + completion rows are longer than the reward model's context "
            f"({context} tokens; the longest is {max(len(rows[i]) for i in too_long)}): lower "
            "--max-tokens or shorten the prompts"
        )
    out: list[float] = []
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            ids = right_pad(chunk, tok.pad_id)
            last = torch.tensor([len(r) - 1 for r in chunk])
            out += rewards(model, ids, last, head).tolist()
    return out


__all__ = [
    "TOY_REWARD",
    "RewardFn",
    "load_reward",
    "reward_kind",
    "score_replies",
    "toy_reward",
]
