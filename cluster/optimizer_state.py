"""Optimizer state without pickles: its tensors for DCP, everything else as tagged JSON.

DCP saves every non-tensor value of a state dict (AdamW's ``param_groups``: lr, betas, eps,
weight decay, the parameters' names) with ``torch.save`` and loads it back with
``torch.load(weights_only=False)``, which can run any code a checkpoint carries. So the
checkpoint keeps those values as JSON instead, with tuples tagged so that they come back as
tuples: the restored state dict equals the saved one, types included.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

TUPLE = "__tuple__"


def split_optimizer_state(optim_sd: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the tensors, everything else) of an optimizer state dict, each keeping its nesting."""
    tensors: dict[str, Any] = {}
    rest: dict[str, Any] = {}
    for key, value in optim_sd.items():
        if isinstance(value, dict):
            t, r = split_optimizer_state(value)
            if t:
                tensors[key] = t
            if r:
                rest[key] = r
        elif isinstance(value, Tensor):
            tensors[key] = value
        else:
            rest[key] = value
    return tensors, rest


def merge_optimizer_state(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """The inverse of ``split_optimizer_state``."""
    out = dict(a)
    for key, value in b.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merge_optimizer_state(out[key], value) if both else value
    return out


def to_json(value: Any) -> Any:
    """``value`` as JSON that ``from_json`` turns back into an equal value of the same types
    (tuples are tagged: AdamW's betas must come back a tuple)."""
    if isinstance(value, tuple):
        return {TUPLE: [to_json(v) for v in value]}
    if isinstance(value, list):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value) or TUPLE in value:
            raise TypeError(
                f"optimizer state has a dict with keys {list(value)[:3]}; keys must be str"
            )
        return {k: to_json(v) for k, v in value.items()}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(
        f"optimizer state holds {value!r} ({type(value).__name__}), which is neither a tensor nor "
        "a JSON value; checkpoints keep no pickles, so use an optimizer whose settings are plain"
    )


def from_json(value: Any) -> Any:
    if isinstance(value, list):
        return [from_json(v) for v in value]
    if isinstance(value, dict):
        if set(value) == {TUPLE}:
            return tuple(from_json(v) for v in value[TUPLE])
        return {k: from_json(v) for k, v in value.items()}
    return value
