"""Load typed dataclass configs from TOML / JSON / YAML files and ``--field value`` CLI flags.

Every config in kilnlm (``ModelConfig``, ``TrainConfig``, ``SamplingParams``, ``EngineConfig``, ...)
is a plain dataclass validated in its own ``__post_init__``; this module only moves values into
it, so validation lives in one place per config and errors name the field.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def read_file(path: str | Path) -> dict[str, Any]:
    """Parse a .toml, .json or .yaml/.yml file into a dict."""
    path = Path(path)
    text = path.read_text()
    if path.suffix == ".toml":
        return tomllib.loads(text)
    if path.suffix == ".json":
        return json.loads(text)
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as e:  # PyYAML comes with Ray, but the library does not require it
            raise ValueError(
                f"{path}: reading YAML needs PyYAML (pip install pyyaml), or use TOML"
            ) from e
        return yaml.safe_load(text) or {}
    raise ValueError(f"{path}: unknown config format {path.suffix!r}; use .toml, .json or .yaml")


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, recursing into nested dataclass fields.

    Unknown keys are an error (a typo must not be silently ignored).
    """
    known = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(
            f"{where or cls.__name__}: unknown fields {unknown}; known: {sorted(known)}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        inner = _dataclass_in(hints[name])
        if inner is not None and isinstance(value, dict):
            value = from_dict(inner, value, f"{where or cls.__name__}.{name}")
        kwargs[name] = value
    return cls(**kwargs)


def load(
    cls: type[T], path: str | Path | None = None, section: str | None = None, **overrides: Any
) -> T:
    """``cls`` from an optional file (optionally one [section] of it), then explicit overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        data = read_file(path)
        if section is not None:
            data = data.get(section, {})
    data.update({k: v for k, v in overrides.items() if v is not None})
    return from_dict(cls, data)


def add_arguments(
    parser: argparse.ArgumentParser, cls: type, prefix: str = "", skip: tuple[str, ...] = ()
) -> None:
    """Add ``--field`` flags for a dataclass's scalar fields (default None = keep the config's value)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind = _scalar_type(hints[f.name])
        if kind is None:
            continue
        flag = "--" + (prefix + f.name).replace("_", "-")
        if kind is bool:
            parser.add_argument(
                flag, dest=prefix + f.name, action=argparse.BooleanOptionalAction, default=None
            )
        else:
            parser.add_argument(
                flag, dest=prefix + f.name, type=kind, default=None, metavar=kind.__name__.upper()
            )


def overrides_from(args: argparse.Namespace, cls: type, prefix: str = "") -> dict[str, Any]:
    """The flags of ``add_arguments`` that were given on the command line."""
    out = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, prefix + f.name, None)
        if value is not None:
            out[f.name] = value
    return out


def _dataclass_in(hint: Any) -> type | None:
    for t in (hint, *typing.get_args(hint)):
        if dataclasses.is_dataclass(t):
            return t  # type: ignore[return-value]
    return None


def _scalar_type(hint: Any) -> type | None:
    """int/float/str/bool for ``X`` or ``X | None`` (Literal[str...] counts as str); else None."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _scalar_type(args[0]) if len(args) == 1 else None
    if origin is typing.Literal:
        return type(typing.get_args(hint)[0])
    return hint if hint in (int, float, str, bool) else None
