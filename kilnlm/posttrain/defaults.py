"""Embedded default post-training data, built from the standard library that every Python has.

No download: the instruction set and the preference set are read out of stdlib modules with
``inspect``, the way the pretraining corpus is read out of their sources.

Instructions (chat), three kinds per public function with a docstring:

* "What does `module.func` do?" → the docstring's first paragraph;
* "Write a Python function that <the docstring's first line>" → the function's source (only
  functions of at most ``max_source_lines`` lines);
* "Which module provides `func`?" → "`func` is in the `module` module."

Preferences, two kinds, each with a preference anyone can check:

* the "what does" prompt: its true docstring paragraph over another function's (same module);
* the "write a function" prompt: source that ``ast.parse`` accepts over each of three corrupted
  copies that it rejects (a dropped ``:``, an unclosed bracket, the body cut off mid-line).

Deduplicated (an answer given once: ``os.path.join`` and ``posixpath.join`` are one function) and
split **by module**: a module is held out or trained on as a whole (by a hash of its name), so no
held-out answer was ever an SFT or preference target. Pretraining read stdlib *sources*, which may
include held-out modules; that is stated wherever the figures are. Everything is a pure function
of the module list and the interpreter, so two runs on one machine build the same sets.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import inspect
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kilnlm.posttrain.data import Chat, Preference

MODULES: tuple[str, ...] = (
    "abc", "argparse", "ast", "base64", "bisect", "calendar", "cmd", "codecs", "colorsys",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "difflib", "dis",
    "email.utils", "enum", "filecmp", "fnmatch", "fractions", "ftplib", "functools", "genericpath",
    "getopt", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html", "http.cookies",
    "imaplib", "inspect", "ipaddress", "json", "keyword", "linecache", "locale", "logging",
    "mailbox", "mimetypes", "netrc", "ntpath", "numbers", "operator", "optparse", "os",
    "pathlib", "pickle", "pkgutil", "platform", "plistlib", "poplib", "posixpath", "pprint",
    "quopri", "random", "re", "reprlib", "sched", "secrets", "selectors", "shlex", "shutil",
    "smtplib", "socket", "socketserver", "statistics", "string", "subprocess", "tarfile",
    "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace", "traceback", "types",
    "typing", "urllib.parse", "urllib.request", "uu", "uuid", "warnings", "wave", "weakref",
    "webbrowser", "xml.dom.minidom", "zipfile", "zipimport",
)  # fmt: skip
"""Pure-Python stdlib modules the sets are read from (missing ones are skipped)."""


@dataclass(frozen=True)
class DefaultsConfig:
    """How the embedded sets are cut."""

    heldout_fraction: float = 0.15
    """Share of modules held out (chosen by a hash of the module name)."""
    max_source_lines: int = 12
    """"Write a function" answers are functions of at most this many lines."""
    max_answer_chars: int = 400
    """Answers longer than this are left out (the tiny default models train on short turns)."""
    per_module: int = 12
    """At most this many functions per module, in name order (keeps the set balanced)."""

    def __post_init__(self) -> None:
        if not 0 < self.heldout_fraction < 1:
            raise ValueError(
                f"DefaultsConfig.heldout_fraction must be in (0, 1), got {self.heldout_fraction}"
            )
        for name in ("max_source_lines", "max_answer_chars", "per_module"):
            if getattr(self, name) < 1:
                raise ValueError(f"DefaultsConfig.{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class Function:
    """One documented stdlib function: where it lives, what its docstring says, its source."""

    module: str
    name: str
    summary: str
    """The docstring's first paragraph, on one line."""
    first_line: str
    source: str | None
    """Dedented source when short enough (and ast-parseable), else None."""


def is_heldout(module: str, fraction: float) -> bool:
    """A module is held out when the first 8 hex digits of sha256(name) fall under ``fraction``."""
    h = int(hashlib.sha256(module.encode()).hexdigest()[:8], 16)
    return h / 0xFFFFFFFF < fraction


def _summary(doc: str) -> tuple[str, str]:
    para = inspect.cleandoc(doc).split("\n\n")[0]
    return " ".join(para.split()), para.splitlines()[0].strip()


def _source(fn: Callable[..., Any], cfg: DefaultsConfig) -> str | None:
    try:
        src = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError):
        return None
    if src.count("\n") > cfg.max_source_lines or len(src) > cfg.max_answer_chars:
        return None
    try:
        ast.parse(src)
    except SyntaxError:
        return None
    return src.rstrip("\n")


def _functions_of(module_name: str, cfg: DefaultsConfig, seen: set[int]) -> list[Function]:
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return []
    out: list[Function] = []
    for name in sorted(vars(module)):
        fn = vars(module)[name]
        if name.startswith("_") or not inspect.isfunction(fn) or id(fn) in seen:
            continue
        if getattr(fn, "__module__", None) != module.__name__ or not fn.__doc__:
            continue
        summary, first = _summary(fn.__doc__)
        if len(summary) < 20 or len(summary) > cfg.max_answer_chars:
            continue
        seen.add(id(fn))
        out.append(Function(module_name, name, summary, first, _source(fn, cfg)))
        if len(out) == cfg.per_module:
            break
    return out


def stdlib_functions(cfg: DefaultsConfig = DefaultsConfig()) -> list[Function]:
    """Every usable documented function of ``MODULES``, each once, answers unique."""
    seen_fns: set[int] = set()
    seen_answers: set[str] = set()
    out = []
    for module in MODULES:
        for f in _functions_of(module, cfg, seen_fns):
            if f.summary in seen_answers:  # the same docstring twice would leak across splits
                continue
            seen_answers.add(f.summary)
            out.append(f)
    return out


def _turn(user: str, assistant: str) -> Chat:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def what_prompt(f: Function) -> str:
    return f"What does `{f.module}.{f.name}` do?"


def write_prompt(f: Function) -> str:
    return f"Write a Python function that does this: {f.first_line}"


def instructions(fns: list[Function]) -> list[tuple[str, Chat]]:
    """(module, chat) for the three instruction kinds of every function."""
    out = []
    for f in fns:
        out.append((f.module, _turn(what_prompt(f), f.summary)))
        if f.source is not None:
            out.append((f.module, _turn(write_prompt(f), f.source)))
        out.append(
            (
                f.module,
                _turn(
                    f"Which module provides `{f.name}`?",
                    f"`{f.name}` is in the `{f.module}` module.",
                ),
            )
        )
    return out


CORRUPTIONS: tuple[str, ...] = ("drop_colon", "unclosed_bracket", "cut_off")


def corrupt(source: str, kind: str) -> str:
    """A copy of ``source`` that ``ast.parse`` rejects, made one of three visible ways."""
    lines = source.split("\n")
    if kind == "drop_colon":
        head = lines[0].rstrip()
        lines[0] = head[:-1] if head.endswith(":") else head + " ("
    elif kind == "unclosed_bracket":
        last = max(i for i, line in enumerate(lines) if line.strip())
        lines[last] = lines[last] + "(["
    elif kind == "cut_off":
        keep = max(1, len(lines) // 2)
        tail = lines[keep][: max(1, len(lines[keep]) // 2)] + " (" if keep < len(lines) else "("
        lines = [*lines[:keep], tail]
    else:
        raise ValueError(f"unknown corruption {kind!r}; use one of {CORRUPTIONS}")
    return "\n".join(lines)


def parses(source: str) -> bool:
    try:
        ast.parse(source)
    except SyntaxError:
        return False
    return True


def preferences(fns: list[Function]) -> list[Preference]:
    """The two checkable preference kinds; every pair's preference is verified when it is made."""
    by_module: dict[str, list[Function]] = {}
    for f in fns:
        by_module.setdefault(f.module, []).append(f)
    out: list[Preference] = []
    for i, f in enumerate(fns):
        siblings = [g for g in by_module[f.module] if g.summary != f.summary]
        if siblings:
            other = siblings[i % len(siblings)]
            out.append(
                Preference(
                    ({"role": "user", "content": what_prompt(f)},),
                    f.summary,
                    other.summary,
                    f.module,
                )
            )
        if f.source is None:
            continue
        prompt = ({"role": "user", "content": write_prompt(f)},)
        for bad in dict.fromkeys(corrupt(f.source, kind) for kind in CORRUPTIONS):
            if parses(f.source) and not parses(bad):
                out.append(Preference(prompt, f.source, bad, f.module))
    return out


@dataclass
class DefaultSets:
    """The embedded sets, split by module."""

    train_chats: list[Chat]
    heldout_chats: list[Chat]
    train_pairs: list[Preference]
    heldout_pairs: list[Preference]
    heldout_modules: list[str]

    def summary(self) -> dict[str, Any]:
        return {
            "source": "embedded stdlib defaults",
            "train_chats": len(self.train_chats),
            "heldout_chats": len(self.heldout_chats),
            "train_pairs": len(self.train_pairs),
            "heldout_pairs": len(self.heldout_pairs),
            "heldout_modules": self.heldout_modules,
        }


def default_sets(cfg: DefaultsConfig = DefaultsConfig()) -> DefaultSets:
    """Build both sets and split them by module (see the module docstring)."""
    fns = stdlib_functions(cfg)
    held = sorted({f.module for f in fns if is_heldout(f.module, cfg.heldout_fraction)})
    chats = instructions(fns)
    pairs = preferences(fns)
    return DefaultSets(
        train_chats=[c for m, c in chats if m not in held],
        heldout_chats=[c for m, c in chats if m in held],
        train_pairs=[p for p in pairs if p.group not in held],
        heldout_pairs=[p for p in pairs if p.group in held],
        heldout_modules=held,
    )


__all__ = [
    "CORRUPTIONS",
    "MODULES",
    "DefaultSets",
    "DefaultsConfig",
    "Function",
    "corrupt",
    "default_sets",
    "is_heldout",
    "parses",
    "stdlib_functions",
]
