"""The post-training data formats people already have, read strictly, with every skip counted.

Two JSONL shapes, the ones TRL and the OpenAI fine-tuning API read:

* **chat**: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``;
* **preference**: ``{"prompt": str | messages, "chosen": reply, "rejected": reply}``, where a reply
  is a string or a one-message list ``[{"role": "assistant", "content": str}]`` (TRL's
  conversational form).

A path is one ``.jsonl`` file or a folder of them (read recursively, in sorted order, so the
examples' order never depends on the file system). A line that is not what the format says
raises ``DataFormatError`` naming the file, the line and what to fix: nothing malformed is
guessed at. Lines that are well-formed but unusable (blank, duplicate, a chat with no assistant
turn, a pair whose two replies are equal) are skipped and counted in ``ReadStats``, which every
command prints in its summary.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kilnlm.chat import Message, validate_messages

Chat = list[Message]


class DataFormatError(ValueError):
    """A line of a post-training data file does not have the documented shape."""

    def __init__(self, path: Path, line: int, problem: str) -> None:
        super().__init__(f"{path}:{line}: {problem}")
        self.path, self.line = path, line


@dataclass(frozen=True)
class Preference:
    """One preference pair: the conversation so far, and the better and worse assistant replies."""

    prompt: tuple[Message, ...]
    chosen: str
    rejected: str
    group: str = ""
    """Where the pair came from (a file name, or a stdlib module for the defaults): held-out
    splits are made by group so nothing of a held-out group is trained on."""


@dataclass
class ReadStats:
    """What reading kept and what it skipped, by reason (a count per reason, never silent)."""

    files: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)

    def to_dict(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "kept": self.kept,
            "skipped": dict(sorted(self.skipped.items())),
        }


def jsonl_files(path: str | Path) -> list[Path]:
    """The one file, or every ``*.jsonl`` under the folder (sorted); an error if there is none."""
    root = Path(path)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"no data at {root}; pass a .jsonl file or a folder of them")
    files = sorted(p for p in root.rglob("*.jsonl") if p.is_file())
    if not files:
        raise FileNotFoundError(f"{root} holds no .jsonl files; pass a file or a folder of them")
    return files


def _records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON object) of each non-blank line; ``None`` marks a blank one."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                yield n, None
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(path, n, f"not valid JSON ({e.msg}, column {e.colno})") from e
            if not isinstance(record, dict):
                raise DataFormatError(
                    path, n, f"expected a JSON object, got {type(record).__name__}"
                )
            yield n, record


def _messages(path: Path, line: int, value: Any, key: str) -> Chat:
    if not isinstance(value, list):
        raise DataFormatError(path, line, f"'{key}' must be a list of {{role, content}} messages")
    try:
        validate_messages(value)
    except ValueError as e:
        raise DataFormatError(path, line, f"'{key}': {e}") from e
    return [{"role": m["role"], "content": m["content"]} for m in value]


def read_chats(path: str | Path) -> tuple[list[Chat], ReadStats]:
    """Chat JSONL: every conversation with at least one assistant turn, duplicates dropped."""
    stats, seen, chats = ReadStats(), set(), []
    for file in jsonl_files(path):
        stats.files += 1
        for n, record in _records(file):
            if record is None:
                stats.skipped["blank"] += 1
                continue
            if "messages" not in record:
                raise DataFormatError(
                    file, n, "missing 'messages' (chat lines are {\"messages\": [...]})"
                )
            chat = _messages(file, n, record["messages"], "messages")
            key = json.dumps(chat, sort_keys=True)
            if not any(m["role"] == "assistant" for m in chat):
                stats.skipped["no_assistant_turn"] += 1
            elif key in seen:
                stats.skipped["duplicate"] += 1
            else:
                seen.add(key)
                chats.append(chat)
    stats.kept = len(chats)
    return chats, stats


def _reply(path: Path, line: int, value: Any, key: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        msgs = _messages(path, line, value, key)
        if len(msgs) == 1 and msgs[0]["role"] == "assistant":
            return msgs[0]["content"]
    raise DataFormatError(
        path, line, f"'{key}' must be a string or [{{'role': 'assistant', 'content': ...}}]"
    )


def _prompt(path: Path, line: int, value: Any) -> tuple[Message, ...]:
    if isinstance(value, str):
        return ({"role": "user", "content": value},)
    return tuple(_messages(path, line, value, "prompt"))


def read_preferences(path: str | Path, dedup: bool = True) -> tuple[list[Preference], ReadStats]:
    """Preference JSONL: (prompt, chosen, rejected) triples; equal replies and duplicates skipped
    (counted) unless ``dedup`` is False, which keeps one pair per non-blank line (for scoring)."""
    stats, seen, pairs = ReadStats(), set(), []
    for file in jsonl_files(path):
        stats.files += 1
        for n, record in _records(file):
            if record is None:
                stats.skipped["blank"] += 1
                continue
            missing = [k for k in ("prompt", "chosen", "rejected") if k not in record]
            if missing:
                raise DataFormatError(file, n, f"missing {missing} (need prompt, chosen, rejected)")
            pair = Preference(
                _prompt(file, n, record["prompt"]),
                _reply(file, n, record["chosen"], "chosen"),
                _reply(file, n, record["rejected"], "rejected"),
                group=file.name,
            )
            key = json.dumps([pair.prompt, pair.chosen, pair.rejected], sort_keys=True)
            if not dedup:
                pairs.append(pair)
            elif pair.chosen == pair.rejected:
                stats.skipped["chosen_equals_rejected"] += 1
            elif key in seen:
                stats.skipped["duplicate"] += 1
            else:
                seen.add(key)
                pairs.append(pair)
    stats.kept = len(pairs)
    return pairs, stats


def write_jsonl(path: str | Path, records: Sequence[Mapping[str, Any]]) -> Path:
    """One JSON object per line (how the embedded defaults are written out for users to read)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def preference_record(pair: Preference) -> dict[str, Any]:
    return {"prompt": list(pair.prompt), "chosen": pair.chosen, "rejected": pair.rejected}


__all__ = [
    "Chat",
    "DataFormatError",
    "Preference",
    "ReadStats",
    "jsonl_files",
    "preference_record",
    "read_chats",
    "read_preferences",
    "write_jsonl",
]
