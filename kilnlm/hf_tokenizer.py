"""A Hugging Face model's own tokenizer, with its own special tokens, chat template and defaults.

kilnlm's ``Tokenizer`` owns its specials (``<|bos|>``, ``<|eos|>``, ... at ids 0..9); a Llama
directory from the Hub has others (``<s>``, ``</s>``, ``<|begin_of_text|>``) at other ids, a
Metaspace or byte-level ``tokenizer.json``, and says in ``tokenizer_config.json`` which token is
which, whether a prompt starts with BOS (``add_bos_token``) and how a conversation is written
(``chat_template``). ``PretrainedTokenizer`` reads those files and offers the same surface as
``Tokenizer`` (``encode``, ``decode``, ``bos_id``, ``eos_id``, ``special_ids``, ``to_json``,
``encode_prompt``), so the engine, serving, Score and ``kiln eval`` take either.

What each file contributes, in the order transformers reads them:

* ``tokenizer.json``: the vocabulary and pipeline (``tokenizers`` runs it, no transformers);
* ``tokenizer_config.json``: ``bos_token``/``eos_token``/``pad_token``/``unk_token`` (a string or
  an ``AddedToken`` dict), ``add_bos_token``/``add_eos_token``, ``chat_template``;
* ``generation_config.json``: ``eos_token_id`` (an int or a list: every one ends a reply),
  ``bos_token_id``/``pad_token_id`` where the tokenizer config says nothing, and the sampling
  defaults (``temperature``, ``top_p``, ``top_k``, ``max_new_tokens``, ...);
* ``config.json``: the ids of last resort (``bos_token_id``/``eos_token_id``).

Plain ``encode`` never turns special-token text into special ids (as ``Tokenizer.encode``): a
user cannot forge ``</s>``. The chat template's output is encoded as transformers encodes it,
special-token text parsed (``encode_with_specials``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as RustTokenizer

TOKENIZER_CONFIG = "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
SPECIAL_ROLES = ("bos", "eos", "pad", "unk")


@dataclass(frozen=True)
class GenerationDefaults:
    """A model's sampling defaults from ``generation_config.json``; None: the server's own.

    Applied to the fields a client did not set (the OpenAI ingress does so), so a model served
    as its authors tuned it. ``do_sample: false`` there means greedy: temperature 0.
    """

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_tokens: int | None = None
    """``max_new_tokens`` in the file."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Every ``eos_token_id`` beyond the first (Llama 3 ends turns with ``<|eot_id|>`` too)."""

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], eos_ids: Sequence[int] = ()) -> GenerationDefaults:
        greedy = d.get("do_sample") is False
        return cls(
            temperature=0.0 if greedy else _number(d.get("temperature")),
            top_p=None if greedy else _number(d.get("top_p")),
            top_k=None if greedy else _int(d.get("top_k")),
            min_p=None if greedy else _number(d.get("min_p")),
            repetition_penalty=_number(d.get("repetition_penalty")),
            max_tokens=_int(d.get("max_new_tokens")),
            stop_token_ids=list(eos_ids[1:]),
        )

    def to_dict(self) -> dict[str, Any]:
        """Only the fields the model sets (what a request's unset fields take)."""
        return {k: v for k, v in asdict(self).items() if v not in (None, [])}


def _number(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else None


def _int(x: Any) -> int | None:
    return x if isinstance(x, int) and not isinstance(x, bool) and x > 0 else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); fix or remove it") from e
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _ids(value: Any) -> list[int]:
    """An id field of a config (an int, a list of ints, or null) as a list."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _chat_template(value: Any) -> str | None:
    """``chat_template`` is a string, or a list of named templates (the "default" one serves)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        template = named.get("default")
        return template if isinstance(template, str) else None
    return None


class PretrainedTokenizer:
    """A ``tokenizer.json`` with the specials, chat template and defaults of its directory."""

    def __init__(
        self,
        rust: RustTokenizer,
        tokenizer_config: Mapping[str, Any] | None = None,
        generation_config: Mapping[str, Any] | None = None,
        model_config: Mapping[str, Any] | None = None,
    ) -> None:
        self._configs = {
            "tokenizer_config": dict(tokenizer_config or {}),
            "generation_config": dict(generation_config or {}),
            "model_config": {
                k: v for k, v in (model_config or {}).items() if k.endswith("_token_id")
            },
        }
        self._rust_json = rust.to_str()
        # Two copies so no flag is ever toggled under a concurrent encode: plain text never
        # yields special ids, templated text does (as transformers encodes a rendered chat).
        self._plain = RustTokenizer.from_str(self._rust_json)
        self._plain.encode_special_tokens = True
        self._templated = rust
        self._templated.encode_special_tokens = False
        self._resolve_specials()

    # ---- construction ------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path) -> PretrainedTokenizer:
        """From a directory holding ``tokenizer.json`` (and maybe the three config files)."""
        root = Path(path)
        file = root / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(
                f"no tokenizer.json in {root}; a Hugging Face directory has one"
            )
        tokenizer_config = _read_json(root / TOKENIZER_CONFIG)
        if (root / CHAT_TEMPLATE_FILE).is_file():  # transformers 5 writes it there, and prefers it
            tokenizer_config["chat_template"] = (root / CHAT_TEMPLATE_FILE).read_text("utf-8")
        return cls(
            RustTokenizer.from_file(str(file)),
            tokenizer_config,
            _read_json(root / GENERATION_CONFIG),
            _read_json(root / "config.json"),
        )

    def __getstate__(self) -> dict[str, Any]:
        return {"json": self._rust_json, **self._configs}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(  # type: ignore[misc]
            RustTokenizer.from_str(state["json"]),
            state["tokenizer_config"],
            state["generation_config"],
            state["model_config"],
        )

    def to_json(self) -> str:
        """Everything that decides the ids (two served versions must agree on it to hot-swap)."""
        return json.dumps({"tokenizer": self._rust_json, **self._configs}, sort_keys=True)

    def __repr__(self) -> str:
        return (
            f"PretrainedTokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, "
            f"eos={self.eos_token!r}, chat_template={self.chat_template is not None})"
        )

    def _resolve_specials(self) -> None:
        """Each role's token: tokenizer_config's text first, then generation_config's and
        config.json's ids (the order transformers trusts them in)."""
        tc, gc, mc = (
            self._configs[k] for k in ("tokenizer_config", "generation_config", "model_config")
        )
        self.special_tokens: dict[str, str] = {}
        role_ids: dict[str, list[int]] = {}
        for role in SPECIAL_ROLES:
            text = _token_text(tc.get(f"{role}_token"))
            ids = [] if text is None else _ids(self._plain.token_to_id(text))
            ids = ids or _ids(gc.get(f"{role}_token_id")) or _ids(mc.get(f"{role}_token_id"))
            role_ids[role] = ids
            if ids:
                self.special_tokens[f"{role}_token"] = text or self._plain.id_to_token(ids[0])
        # Every eos id of generation_config ends a reply; the tokenizer's own eos comes first.
        eos = role_ids["eos"] + _ids(gc.get("eos_token_id")) + _ids(mc.get("eos_token_id"))
        self.eos_ids: list[int] = list(dict.fromkeys(eos))
        self._bos = role_ids["bos"][0] if role_ids["bos"] else None
        self._pad = role_ids["pad"][0] if role_ids["pad"] else None
        self.chat_template: str | None = _chat_template(tc.get("chat_template"))
        self.add_bos_token: bool = self._adds_bos(tc)
        self.generation_defaults = GenerationDefaults.from_dict(gc, self.eos_ids)
        added = self._plain.get_added_tokens_decoder()
        self._special_ids = (
            frozenset(i for i, t in added.items() if t.special)
            | frozenset(i for ids in role_ids.values() for i in ids)
            | frozenset(self.eos_ids)
        )

    def _adds_bos(self, tc: Mapping[str, Any]) -> bool:
        """``add_bos_token`` when the config says; else whether tokenizer.json's post-processor
        puts BOS first (Llama 2/3 exports do it there)."""
        if isinstance(tc.get("add_bos_token"), bool):
            return bool(tc["add_bos_token"]) and self._bos is not None
        if self._bos is None:
            return False
        ids = self._templated.encode("a", add_special_tokens=True).ids
        return bool(ids) and ids[0] == self._bos

    # ---- ids ----------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._plain.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        """The id Score puts before a text; a model without BOS uses its EOS (GPT-2's habit)."""
        if self._bos is not None:
            return self._bos
        if self.eos_ids:
            return self.eos_ids[0]
        raise ValueError(
            "this tokenizer declares no BOS or EOS token; set bos_token in tokenizer_config.json"
        )

    @property
    def eos_id(self) -> int:
        if not self.eos_ids:
            raise ValueError(
                "this tokenizer declares no EOS token; set eos_token in tokenizer_config.json or "
                "eos_token_id in generation_config.json"
            )
        return self.eos_ids[0]

    @property
    def pad_id(self) -> int:
        return self._pad if self._pad is not None else self.eos_id

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    @property
    def special_ids(self) -> frozenset[int]:
        return self._special_ids

    def special_id(self, name: str) -> int:
        """Id of a special token by its text (``"</s>"``) or role (``"eos"``)."""
        text = self.special_tokens.get(f"{name}_token", name)
        token_id = self._plain.token_to_id(text)
        if token_id is None:
            raise KeyError(f"unknown special token {name!r}; known: {self.special_tokens}")
        return token_id

    def token_text(self, token_id: int) -> str:
        """The text one token decodes to alone (logprobs name tokens by it, as vLLM does)."""
        return self._plain.decode([token_id], skip_special_tokens=False)

    def count_bytes(self, ids: Sequence[int]) -> int:
        """UTF-8 bytes of the decoded text, special tokens counting 0."""
        return len(self.decode(ids, skip_special_tokens=True).encode("utf-8"))

    # ---- encode / decode ----------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Plain text → ids, no BOS, special-token text encoded as ordinary text."""
        return self._plain.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._plain.encode_batch(list(texts), add_special_tokens=False)]

    def encode_prompt(self, text: str) -> list[int]:
        """A completion prompt as transformers' ``tokenizer(text)`` gives it: BOS first when
        ``add_bos_token`` (the model saw BOS at position 0 in training)."""
        ids = self.encode(text)
        return [self._bos, *ids] if self.add_bos_token and self._bos is not None else ids

    def encode_with_specials(self, text: str) -> list[int]:
        """Trusted text (a rendered chat template) whose special-token strings ARE markers."""
        return self._templated.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = list(ids)
        if ids and not 0 <= min(ids) <= max(ids) < self.vocab_size:
            bad = [i for i in ids if not 0 <= i < self.vocab_size]
            raise ValueError(f"token ids {bad[:5]} are outside [0, {self.vocab_size})")
        return self._plain.decode(ids, skip_special_tokens=skip_special_tokens)


def sidecar_files(root: str | Path) -> list[str]:
    """The files beside ``tokenizer.json`` that change what the tokenizer does, where present."""
    names = (TOKENIZER_CONFIG, GENERATION_CONFIG, CHAT_TEMPLATE_FILE)
    return [n for n in names if (Path(root) / n).is_file()]


def is_pretrained_dir(path: str | Path) -> bool:
    """A directory whose tokenizer is a Hugging Face one (it has ``tokenizer_config.json``;
    kilnlm's own exports never write one)."""
    return (Path(path) / TOKENIZER_CONFIG).is_file()


__all__ = [
    "GENERATION_CONFIG",
    "TOKENIZER_CONFIG",
    "GenerationDefaults",
    "PretrainedTokenizer",
    "is_pretrained_dir",
    "sidecar_files",
]
