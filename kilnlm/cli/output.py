"""Where a ``--json`` command's summary goes: stdout holds that one JSON document and nothing else.

A command that runs on Ray prints more than its summary: the driver forwards every worker's and
the raylet's log lines (``(raylet) WARNING: 10 PYTHON worker processes ...``) to its own stdout,
and our progress lines go there too. ``kiln train --json | jq .`` then fails on the first line.
``json_mode`` sends whatever is printed to ``sys.stdout`` while the command runs to stderr
(Ray's forwarder looks ``sys.stdout`` up at each print, so it follows), and ``print_json`` writes
the summary to the stdout the command was started with.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from typing import Any, TextIO

_summary_out: TextIO | None = None


@contextlib.contextmanager
def json_mode(enabled: bool) -> Iterator[None]:
    """While the block runs, stdout is stderr except for ``print_json``."""
    global _summary_out
    if not enabled:
        yield
        return
    previous, _summary_out = _summary_out, sys.stdout
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        _summary_out = previous


def print_json(obj: Any, *, indent: int | None = 2) -> None:
    """The command's summary, on the real stdout (``default=str`` for paths and enums)."""
    out = _summary_out or sys.stdout
    out.write(json.dumps(obj, indent=indent, default=str) + "\n")
    out.flush()


def print_text(text: str) -> None:
    """An already-serialised JSON document (a protobuf's ``MessageToJson``), same destination."""
    out = _summary_out or sys.stdout
    out.write(text + "\n")
    out.flush()
