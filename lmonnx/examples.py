"""The one example builder: a sentence's text -> words, ids, the (input, target) pair, bytes, OOVs.

Training, export's parity check, evaluation, ``Scorer.score``, ``Scorer.evaluate``, the CLI's
``score`` and per-token output all build their examples here, so a sentence gives the same
numbers whichever way it came in::

    Line(key, text, nbytes)   (lmonnx.corpus: decoded, BOM and whitespace removed)
        --vocab.words--> words          ["the", "cat", "sat"]
        --encode-------> word ids       [4, 9, 17]          (OOV -> 1 = <unk>)
        --make_pair----> inputs         [2, 4, 9, 17]       (<s> first)
                         targets        [4, 9, 17, 3]       (</s> last; n+1 scored tokens)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from lmonnx.errors import ArgumentTypeError
from lmonnx.batching import make_pair
from lmonnx.corpus import Line
from lmonnx.vocab import UNK_ID, Vocabulary


@dataclass(frozen=True, eq=False)
class Example:
    """One sentence ready to score or train on.

    ``words``: the tokenizer's words (what per-token output prints, ``</s>`` not included);
    ``inputs``, ``targets``: int32 [n+1]; ``nbytes``: original UTF-8 bytes plus one line break;
    ``oovs``: targets that are ``<unk>``.
    """

    key: object
    text: str
    words: tuple
    inputs: np.ndarray
    targets: np.ndarray
    nbytes: int
    oovs: int

    @property
    def tokens(self) -> int:
        """Scored positions: the words and ``</s>``."""
        return int(self.targets.shape[0])


class ExampleBuilder:
    """Builds :class:`Example` objects with one vocabulary (and its tokenizer)."""

    def __init__(self, vocab: Vocabulary):
        if not isinstance(vocab, Vocabulary):
            raise ArgumentTypeError(f"vocab must be a Vocabulary, got {type(vocab).__name__}")
        self.vocab = vocab

    def build(self, line: Line) -> Example:
        words = tuple(self.vocab.words(line.text))
        inputs, targets = make_pair(self.vocab.encode_words(words))
        return Example(key=line.key, text=line.text, words=words, inputs=inputs,
                       targets=targets, nbytes=line.nbytes,
                       oovs=int(np.count_nonzero(targets == UNK_ID)))

    def build_all(self, lines: Iterable[Line]) -> Iterator[Example]:
        """Examples of ``lines`` in order, streaming."""
        return map(self.build, lines)
