"""Rewards as Python functions, named by an import path ``package.module:function``.

A reward is any callable ``(prompt_text, completion_text) -> float``: a user's own rule (tests
pass, a regex, a length). ``load_reward`` resolves the path where Python finds modules for the
command that runs it: the current directory first, then ``sys.path`` (which holds PYTHONPATH).
A console script's ``sys.path`` starts with the script's folder, not the current directory, so
the current directory is searched explicitly, through the import system's own path finder and
without editing ``sys.path``.

``toy_reward`` is the toy's default (``kilnlm.rl.reward:toy_reward``).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Callable
from types import ModuleType

RewardFn = Callable[[str, str], float]

TOY_REWARD = "kilnlm.rl.reward:toy_reward"


def toy_reward(prompt: str, completion: str) -> float:
    """A point per ``a`` and a point for ending on ``b``: the toy's π0 rarely writes ``a``, so π*
    moves mass to completions π0 finds unlikely, and the ending rule gives the posterior structure
    beyond a per-letter tilt (it couples letters and length). In [0, 5] for max_len 5."""
    return float(completion.count("a")) + (1.0 if completion.endswith("b") else 0.0)


def load_reward(path: str) -> RewardFn:
    """The callable at ``package.module:function`` (module from the current directory or sys.path)."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"reward must look like package.module:function, got {path!r}")
    module = _import(module_name)
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


def _import(module_name: str) -> ModuleType:
    """Import ``module_name``, looking for its top-level package in the current directory first."""
    top = module_name.split(".")[0]
    if top not in sys.modules:
        spec = importlib.machinery.PathFinder.find_spec(top, [os.getcwd(), *sys.path])
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


__all__ = ["TOY_REWARD", "RewardFn", "load_reward", "toy_reward"]
