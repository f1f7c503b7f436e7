"""``kiln rl``'s prompts: plain text or a chat, read from JSONL, one rule for all their uses.

A line is one of

* ``{"prompt": "text"}``: continued as it is (``Tokenizer.encode_prompt``);
* ``{"messages": [{"role": ..., "content": ...}, ...]}``: a conversation rendered with the
  policy's chat template plus the generation prompt for the assistant turn
  (``kilnlm.chat.encode_chat``: the rendering SFT trained on and the replicas serve chat with);
  ``{"prompt": [messages]}`` (TRL's conversational prompt) is read the same way.

Each prompt is used four ways and each use reads it here, so the replicas, the KL reference, the
reward function and the reward model all see the same prompt:

* ``request_fields``: what the ``GenerationRequest`` carries (``prompt`` or ``messages``: the
  replica encodes it, as it does for a client);
* ``prompt_ids``: the same ids, encoded by the driver (π0's log-probs, the eos log-prob);
* a ``module:function`` reward sees the prompt as text: the ids decoded with the special tokens
  written out (a chat reads ``<|bos|><|user|>…<|eos|><|assistant|>``, as the model saw it);
* a reward model sees ``reward_messages``: the conversation (a plain prompt as one user turn,
  as ``kiln reward score`` reads a preference line whose prompt is a string).

A bad line raises ``DataFormatError`` naming the file and the line.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kilnlm.chat import Message, encode_chat, validate_messages
from kilnlm.posttrain.data import DataFormatError


@dataclass(frozen=True)
class RLPrompt:
    """One prompt: exactly one of ``text`` (plain) or ``messages`` (a chat) is set."""

    text: str | None = None
    messages: tuple[Message, ...] | None = None

    def __post_init__(self) -> None:
        if (self.text is None) == (self.messages is None):
            raise ValueError("an RLPrompt is either text or messages, not both or neither")
        if self.text is not None and not self.text:
            raise ValueError("a prompt's text is empty")
        if self.messages is not None:
            validate_messages(self.messages)
            if self.messages[-1]["role"] == "assistant":
                raise ValueError(
                    "the last message is the assistant's; RL writes that turn, so end the "
                    "conversation with a user (or system) message"
                )

    @classmethod
    def chat(cls, messages: Sequence[Mapping[str, str]]) -> RLPrompt:
        return cls(messages=tuple({"role": m["role"], "content": m["content"]} for m in messages))

    def request_fields(self) -> dict[str, Any]:
        """``prompt=`` or ``messages=`` for a ``GenerationRequest``."""
        if self.messages is None:
            return {"prompt": self.text}
        return {"messages": [dict(m) for m in self.messages]}

    def reward_messages(self) -> list[dict[str, str]]:
        """The conversation a reward model judges the reply in."""
        if self.messages is None:
            return [{"role": "user", "content": str(self.text)}]
        return [dict(m) for m in self.messages]

    def label(self) -> str:
        """Short human text: the plain prompt, or the last message's content."""
        return str(self.text) if self.messages is None else self.messages[-1]["content"]


def as_prompt(value: str | RLPrompt) -> RLPrompt:
    """A bare string is a plain prompt (the toy's and the Python API's shorthand)."""
    return value if isinstance(value, RLPrompt) else RLPrompt(text=value)


def prompt_ids(tokenizer: Any, prompt: str | RLPrompt) -> list[int]:
    """The ids the replica encodes the prompt to (``actors.serving_model`` uses the same calls)."""
    p = as_prompt(prompt)
    if p.messages is None:
        return tokenizer.encode_prompt(p.text)
    return encode_chat(tokenizer, list(p.messages), add_generation_prompt=True)


def parse_prompt(record: Any, path: Path, line: int) -> RLPrompt:
    """One JSONL record as a prompt; ``DataFormatError`` naming the file and line otherwise."""
    expected = '{"prompt": "..."} or {"messages": [{"role": ..., "content": ...}, ...]}'
    if not isinstance(record, dict):
        raise DataFormatError(path, line, f"expected a JSON object, {expected}")
    keys = [k for k in ("prompt", "messages") if k in record]
    if len(keys) != 1:
        raise DataFormatError(path, line, f"give exactly one of 'prompt' or 'messages': {expected}")
    value = record[keys[0]]
    try:
        if isinstance(value, str):
            if keys[0] == "messages":
                raise ValueError("'messages' must be a list of {role, content} messages")
            return RLPrompt(text=value)
        if isinstance(value, list):
            return RLPrompt.chat(value)
        raise ValueError(f"'{keys[0]}' must be a string or a list of messages")
    except (ValueError, TypeError, KeyError) as e:
        raise DataFormatError(path, line, str(e)) from e


def read_prompts(path: str | Path) -> tuple[RLPrompt, ...]:
    """Every non-blank line of a JSONL file, in order; an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts {path}: no such file; give a JSONL file of prompts")
    prompts = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(path, n, f"not valid JSON ({e.msg}, column {e.colno})") from e
            prompts.append(parse_prompt(record, path, n))
    if not prompts:
        raise ValueError(f"--prompts {path} holds no prompt; give one JSON object per line")
    return tuple(prompts)


def check_fits(export: str, prompts: Sequence[RLPrompt], max_tokens: int, what: str) -> None:
    """Every prompt plus ``max_tokens`` fits the export's context; an error naming the first
    prompt that does not (the replica or the reward model would refuse it mid-run)."""
    from kilnlm.checkpoint import config_from_hf, load_tokenizer

    path = Path(export)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{export}: no export there (config.json missing)")
    context = config_from_hf(json.loads((path / "config.json").read_text())).block_size
    tokenizer = load_tokenizer(export)
    for i, p in enumerate(prompts):
        n = len(prompt_ids(tokenizer, p))
        if n + max_tokens > context:
            raise ValueError(
                f"prompt {i + 1} ({p.label()[:40]!r}…) is {n} tokens; with --max-tokens "
                f"{max_tokens} it does not fit {what}'s context of {context}: shorten it or "
                "lower --max-tokens"
            )


__all__ = ["RLPrompt", "as_prompt", "check_fits", "parse_prompt", "prompt_ids", "read_prompts"]
