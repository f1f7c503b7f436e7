"""Byte-level BPE tokenizer: trained with Hugging Face ``tokenizers``, wrapped so specials stay ours.

Three promises, each tested:

* **Lossless.** Text is split into UTF-8 bytes before BPE, with no normaliser, so
  ``decode(encode(s)) == s`` for every string (emoji, NUL, combining marks, whitespace runs).
* **Specials are unforgeable.** ``encode`` treats its input as plain text: a user who types
  ``<|assistant|>`` gets the bytes of that string, never the marker's id. Only
  ``encode_with_specials`` (used by the chat template) turns marker text into ids.
* **Streaming is exact.** A byte-level token can end in the middle of a UTF-8 character, so
  ``StreamDecoder`` holds incomplete bytes back; the concatenation of its deltas always equals
  ``decode`` of all the ids.

Special tokens take the first ids (0..9) in a fixed order, so ``eos_id`` etc. do not depend on the
vocabulary size or the training text.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS: tuple[str, ...] = (
    "<|bos|>",
    "<|eos|>",
    "<|pad|>",
    "<|mask|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
)
"""Every special token, in id order (``<|bos|>`` is 0, ``<|eos|>`` is 1, ...)."""

N_BYTES = 256
MIN_VOCAB_SIZE = N_BYTES + len(SPECIAL_TOKENS)
"""The smallest vocabulary: every byte and every special token, with no merges."""

_SPECIAL_RE = re.compile("|".join(re.escape(s) for s in SPECIAL_TOKENS))


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """The byte-level alphabet: each byte as one printable character (the GPT-2 convention).

    BPE works on strings, so each byte needs a visible stand-in: printable Latin-1 bytes stand for
    themselves, the others (controls, space, ...) are moved to code points from U+0100 up.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in keep}
    shifted = 0
    for b in range(N_BYTES):
        if b not in table:
            table[b] = chr(N_BYTES + shifted)
            shifted += 1
    return table


def _new_hf_tokenizer() -> HFTokenizer:
    """An untrained byte-level BPE pipeline: no normaliser (lossless), GPT-2 pre-split regex."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


class Tokenizer:
    """Byte-level BPE with kilnlm's special tokens. Picklable (it crosses Ray processes)."""

    def __init__(self, hf: HFTokenizer) -> None:
        self._hf = hf
        # Plain-text encoding must never parse special-token text into special ids; the flag is set
        # once here and never toggled, so concurrent encodes cannot see it flip.
        self._hf.encode_special_tokens = True
        self._special_ids = {s: self._require_id(s) for s in SPECIAL_TOKENS}
        self._id_bytes = self._build_id_bytes()
        # (V,) bytes of text per id, specials 0: count_bytes is one gather and a sum.
        self._text_bytes = np.array(
            [0 if i in self._special_ids.values() else len(b) for i, b in enumerate(self._id_bytes)]
        )

    # ---- construction ------------------------------------------------------------------------

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        min_frequency: int = 2,
        max_token_length: int = 32,
        show_progress: bool = False,
    ) -> Tokenizer:
        """Learn merges from ``texts`` until the vocabulary (specials included) has ``vocab_size`` ids.

        The result can be smaller than asked when the text runs out of pairs seen
        ``min_frequency`` times; ``vocab_size`` reports the real size.
        """
        if vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(
                f"vocab_size must be >= {MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} "
                f"special tokens), got {vocab_size}"
            )
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            max_token_length=max_token_length,
            show_progress=show_progress,
        )
        hf = _new_hf_tokenizer()
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load from a ``tokenizer.json`` file or a directory that holds one."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"no tokenizer at {path}; pass a tokenizer.json or the directory holding it "
                "(build_corpus writes one next to the shards)"
            )
        return cls(HFTokenizer.from_file(str(path)))

    def save(self, path: str | Path) -> Path:
        """Write ``tokenizer.json`` (the Hugging Face format) to ``path`` (a file or a directory)."""
        path = Path(path)
        if path.is_dir() or path.suffix != ".json":
            path.mkdir(parents=True, exist_ok=True)
            path = path / "tokenizer.json"
        path.write_text(self.to_json(), encoding="utf-8")
        return path

    def to_json(self) -> str:
        """The Hugging Face ``tokenizer.json`` text."""
        return self._hf.to_str()

    def __getstate__(self) -> dict[str, Any]:
        # The HF object's own pickle drops `encode_special_tokens`; rebuild through __init__ instead.
        return {"json": self.to_json()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(HFTokenizer.from_str(state["json"]))

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size})"

    # ---- ids ----------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (the model's ``vocab_size`` must be at least this)."""
        return self._hf.get_vocab_size(with_added_tokens=True)

    def special_id(self, name: str) -> int:
        """Id of a special token, by full text (``"<|eos|>"``) or bare name (``"eos"``)."""
        key = name if name.startswith("<|") else f"<|{name}|>"
        if key not in self._special_ids:
            raise KeyError(f"unknown special token {name!r}; known: {', '.join(SPECIAL_TOKENS)}")
        return self._special_ids[key]

    @property
    def bos_id(self) -> int:
        return self._special_ids["<|bos|>"]

    @property
    def eos_id(self) -> int:
        return self._special_ids["<|eos|>"]

    @property
    def pad_id(self) -> int:
        return self._special_ids["<|pad|>"]

    @property
    def mask_id(self) -> int:
        return self._special_ids["<|mask|>"]

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset(self._special_ids.values())

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for (a special token: its UTF-8 text)."""
        return self._id_bytes[token_id]

    def count_bytes(self, ids: Sequence[int] | np.ndarray) -> int:
        """UTF-8 bytes of the text that ``ids`` encode, special tokens counting 0.

        Exact for any slice of a token stream (bits per byte of a window, not an estimate): on a
        whole document it equals ``len(text.encode())``.
        """
        return int(self._text_bytes[np.asarray(ids, dtype=np.int64)].sum())

    # ---- encode / decode ----------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Plain text → ids. Special-token text is encoded as ordinary bytes, never as a special id."""
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, text: str) -> list[int]:
        """A completion prompt: plain ids, no BOS (pretraining streams documents separated by
        ``<|eos|>`` only). A Hugging Face tokenizer adds its BOS here (``PretrainedTokenizer``)."""
        return self.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``encode`` for many texts at once (parallel in Rust)."""
        # encode_batch_fast skips character offsets we never use: about 1.6x faster.
        encode = getattr(self._hf, "encode_batch_fast", self._hf.encode_batch)
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]

    def encode_with_specials(self, text: str) -> list[int]:
        """Text in which special-token strings ARE markers (trusted templates only, never user text)."""
        ids: list[int] = []
        for piece in self._split_specials(text):
            ids.extend(
                [self._special_ids[piece]] if piece in self._special_ids else self.encode(piece)
            )
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Ids → text. Bytes that do not form valid UTF-8 become U+FFFD (as ``StreamDecoder`` does)."""
        return self._bytes_of(ids, skip_special_tokens).decode("utf-8", errors="replace")

    def _bytes_of(self, ids: Iterable[int], skip_special_tokens: bool) -> bytes:
        ids = list(ids)
        if ids and not 0 <= min(ids) <= max(ids) < len(self._id_bytes):
            bad = [i for i in ids if not 0 <= i < len(self._id_bytes)]
            raise ValueError(f"token ids {bad[:5]} are outside [0, {len(self._id_bytes)})")
        skip = self.special_ids if skip_special_tokens else frozenset()
        return b"".join(self._id_bytes[i] for i in ids if i not in skip)

    # ---- internals ----------------------------------------------------------------------------

    def _require_id(self, token: str) -> int:
        token_id = self._hf.token_to_id(token)
        if token_id is None:
            raise ValueError(
                f"tokenizer has no {token} token; it was not trained by kilnlm "
                "(retrain it with Tokenizer.train)"
            )
        return token_id

    def _build_id_bytes(self) -> list[bytes]:
        """id → bytes for every id, built once so decoding is a join (and exact for streaming)."""
        from_char = {c: b for b, c in byte_to_unicode().items()}
        table: list[bytes] = []
        for i in range(self.vocab_size):
            token = self._hf.id_to_token(i)
            if token in self._special_ids:
                table.append(token.encode("utf-8"))
            else:
                table.append(bytes(from_char[c] for c in token))
        return table

    @staticmethod
    def _split_specials(text: str) -> Iterator[str]:
        """Split ``text`` into special-token strings and the plain pieces between them."""
        pos = 0
        for m in _SPECIAL_RE.finditer(text):
            if m.start() > pos:
                yield text[pos : m.start()]
            yield m.group()
            pos = m.end()
        if pos < len(text):
            yield text[pos:]


class StreamDecoder:
    """Turn ids arriving one by one into text deltas that are always whole characters.

    A byte-level token may end inside a multi-byte UTF-8 character (an emoji is often 2–4 tokens);
    the incremental UTF-8 decoder keeps such a tail until the next token completes it. Invalid
    bytes become U+FFFD exactly as ``Tokenizer.decode`` would, so
    ``"".join(feed(i) for i in ids) + finish() == tokenizer.decode(ids)``.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tok = tokenizer
        self._skip = tokenizer.special_ids if skip_special_tokens else frozenset()
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        """The text that ``token_id`` completes ("" while a character is still incomplete)."""
        if token_id in self._skip:
            return ""
        return self._utf8.decode(self._tok.token_bytes(token_id))

    def finish(self) -> str:
        """Flush at end of stream: an incomplete trailing character becomes U+FFFD."""
        return self._utf8.decode(b"", final=True)
