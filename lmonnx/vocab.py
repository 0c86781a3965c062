"""Vocabulary and tokenization: words <-> int32 ids, one contract for training, export and scoring.

Ids (ARCHITECTURE.md, "Token ids")::

    0 <pad>   padding, never a counted target
    1 <unk>   any word outside the vocabulary (an OOV), never dropped
    2 <s>     first input of every sentence
    3 </s>    last target of every sentence
    4 ..      words by descending training count, ties by first occurrence

Two tokenizer presets:

- ``keras``: the course's ``keras.preprocessing.text.Tokenizer`` defaults -- lowercase, replace
  every character of :data:`KERAS_FILTERS` by a space, split on whitespace;
- ``whitespace``: split on whitespace only, keep case; made for pre-tokenized text such as PTB,
  whose literal ``<unk>`` maps to id 1.

The options travel with the vocabulary (``to_json``) and inside the ONNX file, so scoring
tokenizes exactly as training did. Encoding is a ``str.translate`` plus one dict lookup per word:
evaluation encodes millions of lines.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from lmonnx.errors import InvalidArgumentError
from lmonnx.atomic import write_atomic
from lmonnx.validation import check_choice, check_int

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>")
KERAS_FILTERS = '!"#$%&()*+,-./:;<=>?@[\\]^_`{|}~\t\n'  # the old Keras Tokenizer's default

PRESETS = ("keras", "whitespace")
VOCAB_FORMAT = 1


@dataclass(frozen=True)
class TokenizerOptions:
    """How a line becomes words: lowercase or not, which characters count as separators."""

    preset: str  # "keras" | "whitespace"
    lower: bool  # keras: True, whitespace: False
    filters: str  # keras: KERAS_FILTERS, whitespace: ""
    _table: dict = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise InvalidArgumentError(f"unknown tokenizer preset {self.preset!r}; expected one of {PRESETS}")
        if not isinstance(self.lower, bool):
            raise InvalidArgumentError(f"tokenizer option 'lower' must be a bool, got {self.lower!r}")
        if not isinstance(self.filters, str):
            raise InvalidArgumentError(f"tokenizer option 'filters' must be a string, got {self.filters!r}")
        # Filter characters become spaces, as the Keras Tokenizer did with its split=" ".
        object.__setattr__(self, "_table", str.maketrans(self.filters, " " * len(self.filters)))

    @classmethod
    def from_preset(cls, name: str) -> "TokenizerOptions":
        if name == "keras":
            return cls("keras", True, KERAS_FILTERS)
        if name == "whitespace":
            return cls("whitespace", False, "")
        raise InvalidArgumentError(f"unknown tokenizer preset {name!r}; expected one of {PRESETS}")

    def split(self, line: str) -> list[str]:
        """Lowercase if ``lower``, replace filter characters by spaces, split on whitespace."""
        if self.lower:
            line = line.lower()
        if self.filters:
            line = line.translate(self._table)
        return line.split()

    def to_dict(self) -> dict:
        return {"preset": self.preset, "lower": self.lower, "filters": self.filters}

    @classmethod
    def from_dict(cls, d: dict) -> "TokenizerOptions":
        if not isinstance(d, dict):
            raise InvalidArgumentError(f"tokenizer options must be a JSON object, got {type(d).__name__}")
        unknown = set(d) - {"preset", "lower", "filters"}
        if unknown:
            raise InvalidArgumentError(f"unknown tokenizer option(s): {', '.join(sorted(unknown))}")
        return cls(preset=d["preset"], lower=d["lower"], filters=d["filters"])


def decoder_word_ids(tokens: Sequence[str], case_fold: bool = False) -> dict[str, int]:
    """A decoder's word -> token id for every vocabulary word (the specials excluded): the
    lookup of CTC decoders' words (:mod:`lmonnx.ctc_decoding`, :mod:`lmonnx.flashlight_decoding`).
    With ``case_fold`` the keys are lowercase and the lowest id (the spelling most frequent in
    training) wins."""
    word_ids: dict[str, int] = {}
    for token_id, token in enumerate(tokens):
        if token in SPECIAL_TOKENS:
            continue
        word_ids.setdefault(token.lower() if case_fold else token, token_id)
    return word_ids


UNKNOWN_WORD_POLICIES = ("error", "unk")
"""What a decoder adapter does with a decoder word the model lacks: refuse it, or score it
as ``<unk>``."""


def unknown_decoder_words(words: Sequence[str], word_ids: dict[str, int], case_fold: bool,
                          unknown: str) -> list[str]:
    """The words of ``words`` (a decoder's lexicon or unigrams) missing from ``word_ids``
    (:func:`decoder_word_ids`'s map); under ``unknown="error"`` any raises one
    ``InvalidArgumentError`` naming them."""
    check_choice("unknown", unknown, UNKNOWN_WORD_POLICIES)
    missing = [w for w in words if (w.lower() if case_fold else w) not in word_ids]
    if missing and unknown == "error":
        shown = ", ".join(repr(w) for w in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise InvalidArgumentError(
            f"{len(missing)} decoder word(s) unknown to the model: {shown}{more} (leave them "
            f"out, or pass unknown='unk' to score them as <unk>)")
    return missing


class Vocabulary:
    """Tokens in id order (``tokens[:4] == SPECIAL_TOKENS``) plus the tokenizer that produced them."""

    def __init__(self, tokens: Sequence[str], options: TokenizerOptions):
        tokens = tuple(tokens)
        if tokens[:4] != SPECIAL_TOKENS:
            raise InvalidArgumentError(f"a vocabulary must start with the special tokens {SPECIAL_TOKENS}, "
                             f"got {tokens[:4]}")
        if not all(isinstance(t, str) and t for t in tokens):
            raise InvalidArgumentError("vocabulary tokens must be non-empty strings")
        if not isinstance(options, TokenizerOptions):
            raise InvalidArgumentError(f"options must be TokenizerOptions, got {type(options).__name__}")
        index = {t: i for i, t in enumerate(tokens)}
        if len(index) != len(tokens):
            seen: set[str] = set()
            dup = next(t for t in tokens if t in seen or seen.add(t))
            raise InvalidArgumentError(f"duplicate token {dup!r} in vocabulary")
        self.tokens: tuple[str, ...] = tokens
        self.options: TokenizerOptions = options
        self._index = index
        # Encoding map for running text: a literal <pad>/<s>/</s> in a corpus is just an unknown
        # word (mapping it to 0 would make it padding); a literal <unk> is the unknown word.
        self._encode_index = dict(index)
        for special in ("<pad>", "<s>", "</s>"):
            self._encode_index.pop(special)

    # ---- construction

    @classmethod
    def fit(cls, lines: Iterable[str], vocab_size: int, options: TokenizerOptions) -> "Vocabulary":
        """Count words over ``lines`` and keep the ``vocab_size - 4`` most frequent ones.

        ``vocab_size`` includes the four specials. Ties keep the order of first occurrence.
        Literal special tokens in the text (PTB's ``<unk>``) are never added as words.
        """
        check_int("vocab_size", vocab_size, low=len(SPECIAL_TOKENS) + 1,
                  why="4 special tokens and one word")
        counts: dict[str, int] = {}  # insertion order == order of first occurrence
        get = counts.get
        split = options.split
        for line in lines:
            for w in split(line):
                counts[w] = get(w, 0) + 1
        for special in SPECIAL_TOKENS:
            counts.pop(special, None)
        # sorted() is stable, so equal counts keep their first-occurrence order.
        ranked = sorted(counts.items(), key=lambda kv: -kv[1])
        words = [w for w, _ in ranked[: int(vocab_size) - len(SPECIAL_TOKENS)]]
        return cls(SPECIAL_TOKENS + tuple(words), options)

    # ---- container protocol

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, word) -> bool:
        return word in self._index

    def __eq__(self, other) -> bool:
        if not isinstance(other, Vocabulary):
            return NotImplemented
        return self.tokens == other.tokens and self.options == other.options

    def __hash__(self) -> int:
        return hash((self.tokens, self.options))

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} tokens, preset={self.options.preset!r})"

    # ---- lookups

    def token_to_id(self, word: str) -> int:
        """Id of ``word``; an out-of-vocabulary word is ``UNK_ID``."""
        return self._index.get(word, UNK_ID)

    def id_to_token(self, i: int) -> str:
        if not 0 <= i < len(self.tokens):
            raise IndexError(f"token id {i} outside the vocabulary [0, {len(self.tokens)})")
        return self.tokens[int(i)]

    def words(self, line: str) -> list[str]:
        """The line's words as the tokenizer splits them (before any id lookup)."""
        return self.options.split(line)

    def encode_words(self, words: Sequence[str]) -> np.ndarray:
        """int32 ids of already-split words; OOV (and literal ``<pad>``/``<s>``/``</s>``) -> UNK."""
        return np.fromiter(map(self._encode_index.get, words, repeat(UNK_ID)),
                           dtype=np.int32, count=len(words))

    def encode(self, line: str) -> np.ndarray:
        """int32 word ids of one line, without ``<s>``/``</s>``. OOV words become ``UNK_ID``."""
        return self.encode_words(self.options.split(line))

    def decode(self, ids) -> list[str]:
        tokens = self.tokens
        n = len(tokens)
        out = []
        for i in np.asarray(ids).ravel().tolist():
            if not 0 <= i < n:
                raise IndexError(f"token id {i} outside the vocabulary [0, {n})")
            out.append(tokens[i])
        return out

    # ---- serialization

    def to_json(self) -> str:
        return json.dumps({"format": VOCAB_FORMAT, "options": self.options.to_dict(),
                           "tokens": list(self.tokens)}, ensure_ascii=False)

    @classmethod
    def from_json(cls, s: str) -> "Vocabulary":
        try:
            d = json.loads(s)
        except json.JSONDecodeError as exc:
            raise InvalidArgumentError(f"vocabulary is not valid JSON: {exc}") from None
        if not isinstance(d, dict) or "tokens" not in d or "options" not in d:
            raise InvalidArgumentError("vocabulary JSON must be an object with 'tokens' and 'options'")
        if d.get("format", VOCAB_FORMAT) != VOCAB_FORMAT:
            raise InvalidArgumentError(f"unsupported vocabulary format {d.get('format')!r}")
        if not isinstance(d["tokens"], list):
            raise InvalidArgumentError("vocabulary 'tokens' must be a list")
        try:
            options = TokenizerOptions.from_dict(d["options"])
        except KeyError as exc:
            raise InvalidArgumentError(f"tokenizer options lack {exc}") from None
        return cls(d["tokens"], options)

    def save(self, path) -> None:
        """Write the JSON form atomically (temp file in the same directory, then rename)."""
        write_atomic(path, self.to_json())

    @classmethod
    def load(cls, path) -> "Vocabulary":
        """The vocabulary saved at ``path``; errors name the file."""
        try:
            return cls.from_json(Path(path).read_text(encoding="utf-8"))
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(f"{path}: {exc}") from None
