"""The chat template: a conversation is one document of role markers, content and ``<|eos|>``.

The format, exactly (no newlines or spaces are added around markers)::

    <|bos|><|system|>{system}<|eos|><|user|>{user}<|eos|><|assistant|>{reply}<|eos|>...

``add_generation_prompt=True`` appends ``<|assistant|>``: the model writes the reply and stops by
emitting ``<|eos|>`` (the engine's stop token). Every turn ends with ``<|eos|>``, so the token that
ends a reply at inference is the one the model was trained to produce after each assistant turn.

Markers are special ids only when the template puts them there: message content is encoded as
plain text, so a user who types ``<|assistant|>`` cannot forge a turn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TypedDict

from kilnlm.chat_template import render_template
from kilnlm.errors import InvalidArgumentError
from kilnlm.hf_tokenizer import PretrainedTokenizer
from kilnlm.tokenizer import Tokenizer

ROLE_TOKENS: dict[str, str] = {
    "system": "<|system|>",
    "user": "<|user|>",
    "assistant": "<|assistant|>",
}
BOS, EOS = "<|bos|>", "<|eos|>"


class Message(TypedDict):
    role: str
    content: str


def validate_messages(messages: Sequence[Mapping[str, str]]) -> None:
    """Raise InvalidArgumentError (a ValueError) naming the first bad message (index, and the
    role or field at fault): messages come from clients."""
    if not messages:
        raise InvalidArgumentError(
            "messages is empty; pass at least one {'role': ..., 'content': ...}", "messages"
        )
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping) or "role" not in msg or "content" not in msg:
            raise InvalidArgumentError(
                f"message {i} must be a mapping with 'role' and 'content', got {msg!r}",
                f"messages[{i}]",
            )
        if msg["role"] not in ROLE_TOKENS:
            raise InvalidArgumentError(
                f"message {i} has role {msg['role']!r}; use one of {', '.join(ROLE_TOKENS)}",
                f"messages[{i}].role",
            )
        if not isinstance(msg["content"], str):
            raise InvalidArgumentError(
                f"message {i} ({msg['role']}) content must be a str, got "
                f"{type(msg['content']).__name__}",
                f"messages[{i}].content",
            )


def render_chat(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
    """The conversation as text, markers written out (for display and logs; encode with ``encode_chat``)."""
    validate_messages(messages)
    turns = "".join(f"{ROLE_TOKENS[m['role']]}{m['content']}{EOS}" for m in messages)
    return BOS + turns + (ROLE_TOKENS["assistant"] if add_generation_prompt else "")


KILNLM_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
"""kilnlm's format as a Jinja template, for a Hugging Face tokenizer that brings none (its own
BOS/EOS, the role markers as text)."""


def encode_chat(
    tokenizer: Tokenizer | PretrainedTokenizer,
    messages: Sequence[Mapping[str, str]],
    add_generation_prompt: bool = True,
) -> list[int]:
    """The conversation as ids: markers are special ids, content is plain text (never parsed).

    A Hugging Face tokenizer's own ``chat_template`` renders the conversation instead, and the
    text is encoded as transformers' ``apply_chat_template`` encodes it (special-token text
    parsed, no BOS added: the template writes it).
    """
    validate_messages(messages)
    if isinstance(tokenizer, PretrainedTokenizer):
        return tokenizer.encode_with_specials(
            render_for(tokenizer, messages, add_generation_prompt)
        )
    ids = [tokenizer.bos_id]
    for m in messages:
        ids.append(tokenizer.special_id(ROLE_TOKENS[m["role"]]))
        ids.extend(tokenizer.encode(m["content"]))
        ids.append(tokenizer.eos_id)
    if add_generation_prompt:
        ids.append(tokenizer.special_id(ROLE_TOKENS["assistant"]))
    return ids


def render_for(
    tokenizer: PretrainedTokenizer,
    messages: Sequence[Mapping[str, str]],
    add_generation_prompt: bool = True,
) -> str:
    """The text a Hugging Face tokenizer's chat template (or kilnlm's, if it has none) writes."""
    validate_messages(messages)
    template = tokenizer.chat_template or KILNLM_TEMPLATE
    return render_template(template, messages, tokenizer.special_tokens, add_generation_prompt)


def loss_mask(tokenizer: Tokenizer, ids: Sequence[int]) -> list[int]:
    """1 on the tokens an assistant turn produced (its content and closing ``<|eos|>``), else 0.

    Aligned with ``ids``: for next-token training the mask of target ``ids[t+1]`` is
    ``mask[t+1]``. The ``<|assistant|>`` marker itself is 0 (it is given, not generated).
    Unambiguous because content can never encode to a special id.
    """
    markers = {tokenizer.special_id(t): role for role, t in ROLE_TOKENS.items()}
    mask, inside = [], False
    for token in ids:
        if token in markers:  # a marker opens a turn; only an assistant turn is trained on
            mask.append(0)
            inside = markers[token] == "assistant"
        else:
            mask.append(int(inside))
            inside = inside and token != tokenizer.eos_id
    return mask
