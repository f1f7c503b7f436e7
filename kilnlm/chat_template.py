"""A model's own Jinja chat template, rendered the way transformers' ``apply_chat_template`` does.

A chat template from a model directory is code written by strangers: it runs in Jinja's
``ImmutableSandboxedEnvironment`` (no attribute access to Python internals, no mutation of
the arguments), with the environment transformers builds, so the same template gives the same
text here and there: ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension,
``raise_exception(msg)`` (a template refusing a conversation, e.g. roles that do not
alternate, becomes a ValueError naming ``messages``), a ``tojson`` that does not escape HTML,
``strftime_now``, and the tokenizer's special tokens as variables (``bos_token``,
``eos_token``, ...). The ``{% generation %}`` tag that marks assistant text for training masks
is accepted and renders its body.

Templates compile once per text (``lru_cache``): a replica renders every chat request with the
same one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from kilnlm.errors import InvalidArgumentError


class GenerationTag(jinja2.ext.Extension):
    """``{% generation %}…{% endgeneration %}``: transformers marks assistant spans with it; the
    text renders unchanged."""

    tags = {"generation"}  # noqa: RUF012 (jinja's own class attribute)

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes <, >, & for HTML; a prompt must keep them.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=8)
def compile_template(source: str) -> jinja2.Template:
    """The template compiled in the sandbox; ValueError (naming the template) when it does not parse."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ValueError(f"chat_template does not parse ({e}); fix tokenizer_config.json") from e


def render_template(
    source: str,
    messages: Sequence[Mapping[str, Any]],
    special_tokens: Mapping[str, str],
    add_generation_prompt: bool = True,
) -> str:
    """The conversation as the template writes it; ValueError naming ``messages`` when the
    template refuses it (``raise_exception``) or fails on it."""
    template = compile_template(source)
    try:
        return template.render(
            messages=[dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            **special_tokens,
        )
    except jinja2.exceptions.TemplateError as e:
        raise InvalidArgumentError(
            f"messages: the model's chat template refused them: {e}", "messages"
        ) from e


__all__ = ["compile_template", "render_template"]
