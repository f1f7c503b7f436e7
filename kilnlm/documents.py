"""Where corpus text comes from: files and folders of .txt/.md/.py/.jsonl, or the Python standard
library's own sources, read as ``Document``s in a fixed order, with caps on count and bytes.

Both corpus builders (``kilnlm.data.build_corpus`` in one process, ``kiln corpus`` on Ray Data)
read through these functions, so they see the same documents in the same order.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TEXT_SUFFIXES = (".txt", ".md", ".py")
JSONL_SUFFIXES = (".jsonl",)

# Folders of the standard library that are not its own text: installed packages, bytecode.
_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
# Test suites are left out of the default corpus unless asked for: they are 60% of the stdlib's
# .py bytes and full of deliberately malformed, repetitive or machine-generated fixtures.
_STDLIB_TEST_DIRS = frozenset({"test", "tests", "idle_test"})


@dataclass(frozen=True)
class Document:
    """One unit of text: filtered, deduplicated and split as a whole."""

    text: str
    source: str
    """Where it came from: a path, ``path:line`` for JSONL, ``stdlib:<relative path>``."""


def iter_documents(paths: Iterable[str | Path]) -> Iterator[Document]:
    """Documents from files and folders (searched recursively, in sorted order).

    .txt/.md/.py files are one document each (bytes that are not UTF-8 become U+FFFD, which the
    non-text filter then counts); each line of a .jsonl file is ``{"text": ...}``.
    """
    for path in _list_files(paths):
        text = decode_text(path.read_bytes())
        if path.suffix in JSONL_SUFFIXES:
            yield from parse_jsonl(text, str(path))
        else:
            yield Document(text, str(path))


def decode_text(raw: bytes) -> str:
    """A file's bytes as ``Path.read_text(encoding="utf-8", errors="replace")`` reads them: bytes
    that are not UTF-8 become U+FFFD, and \\r\\n or \\r line ends become \\n. Both builders
    read through this one function, so they see the same text."""
    return raw.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n")


def _list_files(
    paths: Iterable[str | Path], suffixes: tuple[str, ...] = TEXT_SUFFIXES + JSONL_SUFFIXES
) -> Iterator[Path]:
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            yield path
        elif path.is_dir():
            found = (p for p in path.rglob("*") if p.suffix in suffixes and p.is_file())
            yield from sorted(found)
        else:
            raise FileNotFoundError(
                f"corpus source {path} does not exist; fix CorpusConfig.sources"
            )


def parse_jsonl(text: str, path: str) -> Iterator[Document]:
    """The ``{"text": ...}`` records of a JSONL file's text, named ``path:line``."""
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path}:{lineno} is not valid JSON ({e.msg}); fix or remove it"
            ) from e
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f'{path}:{lineno} must be a JSON object with a string "text" field')
        yield Document(record["text"], f"{path}:{lineno}")


def stdlib_root() -> Path:
    """The standard library folder of the running Python (``sysconfig``'s "stdlib" path)."""
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files(include_tests: bool) -> list[Path]:
    """The stdlib's text files in a fixed pseudo-random order (hash of the relative path).

    Sorted by name, a capped corpus would be all ``asyncio`` and ``collections``; hashing the path
    mixes modules while staying identical from run to run and machine to machine.
    """
    root = stdlib_root()
    skip = _STDLIB_SKIP_DIRS if include_tests else _STDLIB_SKIP_DIRS | _STDLIB_TEST_DIRS
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip]
        files += [Path(dirpath, f) for f in filenames if f.endswith(TEXT_SUFFIXES)]
    return sorted(files, key=lambda p: hash64(p.relative_to(root).as_posix()))


def default_corpus(
    max_documents: int | None = None, max_bytes: int | None = None, include_tests: bool = False
) -> Iterator[Document]:
    """The Python standard library's sources as documents, with optional caps (see ``take``)."""
    root = stdlib_root()

    def docs() -> Iterator[Document]:
        for path in _stdlib_files(include_tests):
            text = decode_text(path.read_bytes())
            yield Document(text, f"stdlib:{path.relative_to(root).as_posix()}")

    return take(docs(), max_documents, max_bytes)


def take(
    docs: Iterable[Document], max_documents: int | None = None, max_bytes: int | None = None
) -> Iterator[Document]:
    """At most ``max_documents`` documents whose UTF-8 sizes add up to at most ``max_bytes``.

    A document that would overflow the byte budget is skipped (a later, smaller one may still
    fit), so one huge file early in the order cannot starve the corpus; reading stops once 99% of
    the budget is used.
    """
    sized = ((doc, len(doc.text.encode("utf-8"))) for doc in docs)
    return (doc for doc, _ in within_caps(sized, max_documents, max_bytes))


def within_caps(
    sized: Iterable[tuple[Any, int]], max_documents: int | None, max_bytes: int | None
) -> Iterator[tuple[Any, int]]:
    """The (item, size) pairs ``take`` keeps, in order; stops reading once the caps are reached.
    ``kiln corpus`` applies the caps through this too, on sizes alone."""
    n_docs = n_bytes = 0
    for item, size in sized:
        if max_documents is not None and n_docs >= max_documents:
            return
        if max_bytes is not None and n_bytes + size > max_bytes:
            if n_bytes >= 0.99 * max_bytes:
                return
            continue
        n_docs, n_bytes = n_docs + 1, n_bytes + size
        yield item, size


def hash64(text: str) -> int:
    """A 64-bit hash of ``text`` that is the same in every process and on every machine (Python's
    ``hash`` is salted per process): it orders the stdlib and decides the held-out split."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")
