"""CTC beam search with no LM, a KenLM 5-gram and an lmonnx model, side by side, in two
decoders: pyctcdecode and flashlight-text's lexicon decoder (torchaudio's ``ctc_decoder``).

    python benchmarks/ctc_table.py --model kjv.onnx [--sentences 200] [--beam-width 32]
    python benchmarks/ctc_table.py --random-model --sentences 5      # a smoke run

The emissions are simulated (:func:`simulate_emissions`): a character-level CTC posterior
matrix per sentence, with seeded substitutions and noise, so WER differences come from the
language models alone.  Sentences: the first ``--sentences`` usable lines of ``kjv.valid.txt``
(or ``ptb.test.txt``, ``--corpus ptb``) in ``--data``, lowercased, keeping letters, apostrophes
and spaces; a line with ``<unk>`` is skipped (its real word is unknown, so it has no
transcript).  Every decoder gets the same emissions, beam width, ``alpha`` and ``beta``
(pyctcdecode's defaults 0.5 and 1.5 unless given).

KenLM: ``lmplz -o 5`` (``--lmplz-dir``, default ``.kenlm/bin``) on ``kjv.train.txt`` cleaned the
same way, ``<unk>`` renamed ``<rare>`` (lmplz refuses the literal token; the decoder cannot
spell it), wrapped by pyctcdecode's own ``LanguageModel`` with the training words as unigrams.

flashlight: one lexicon for its three rows (the model's vocabulary words the labels spell),
flashlight's own KenLM over the same binary, lmonnx through :mod:`lmonnx.flashlight_decoding`
with states computed lazily (one call per history the beam extends) and batched over the last
``--batch-frames`` frames' pending children; its
``lm_weight`` is ``alpha * ln 10`` (it takes log10 LM scores) and ``word_score`` is ``beta``.

lmonnx: ``--model`` (an ``.onnx`` file) through :mod:`lmonnx.ctc_decoding`.  The decoder spells
lowercase words; the KJV and PTB files are lowercase already (PTB's ``N`` aside), so a model
trained on them matches decoder words exactly.  For a model with capitalised words pass
``--case-fold`` (each lowercase word stands for the model's most frequent spelling); otherwise
such words are unknown to it (``<unk>`` plus the unknown-word offset).  ``--random-model``
builds a random-weight model over the training vocabulary instead (runtime only: its
"knowledge" is noise, so its WER means nothing).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import string
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
CORPORA = {"kjv": "kjv.valid.txt", "ptb": "ptb.test.txt"}
TRAINING_TEXT = "kjv.train.txt"

LABELS = ["", " ", *string.ascii_lowercase, "'"]
"""pyctcdecode's character alphabet: the CTC blank ``""`` first, the space, a-z, apostrophe."""
BLANK, SPACE = 0, 1
LABEL_INDEX = {label: i for i, label in enumerate(LABELS)}

CONFUSABLE = {  # letters a listener (or an acoustic model) mixes up; others draw at random
    "a": "eo", "b": "pdv", "c": "ksz", "d": "tb", "e": "ia", "f": "vph", "g": "kj", "h": "f",
    "i": "ey", "j": "g", "k": "gc", "l": "r", "m": "n", "n": "m", "o": "ua", "p": "b",
    "q": "k", "r": "l", "s": "zc", "t": "d", "u": "o", "v": "fb", "w": "v", "x": "s",
    "y": "i", "z": "s", "'": "s",
}

_NOT_KEPT = re.compile(r"[^a-z' ]+")


def clean_sentence(line: str, unk_as: str | None = None) -> str | None:
    """``line`` lowercased, with letters, apostrophes and single spaces kept; None when it is
    empty or holds ``<unk>`` (unless ``unk_as`` names a word to put in its place)."""
    words = line.lower().split()
    if "<unk>" in words:
        if unk_as is None:
            return None
        words = [unk_as if w == "<unk>" else w for w in words]
    kept = [w if w == unk_as else _NOT_KEPT.sub("", w) for w in words]
    text = " ".join(w for w in kept if w)
    return text or None


def read_sentences(path: Path, count: int) -> list[str]:
    """The first ``count`` usable sentences of ``path`` (:func:`clean_sentence`)."""
    sentences = []
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            sentence = clean_sentence(line)
            if sentence is not None:
                sentences.append(sentence)
                if len(sentences) == count:
                    break
    return sentences


def _substitute(char: str, rng: np.random.Generator) -> str:
    """A confusable letter half the time, else any other letter."""
    if rng.random() < 0.5:
        return str(rng.choice(list(CONFUSABLE[char])))
    return str(rng.choice([c for c in string.ascii_lowercase if c != char]))


def _frame_targets(sentence: str, rng: np.random.Generator, p_sub: float, p_blank: float):
    """Per frame ``(label shown, true label)``: each character held 1-3 frames, a blank
    before a repeated character (CTC needs it) and, with ``p_blank``, before any other;
    a non-space character shown as a substitute with probability ``p_sub``."""
    frames = [(BLANK, BLANK)]
    previous = None
    for char in sentence:
        if char == previous or rng.random() < p_blank:
            frames.append((BLANK, BLANK))
        true = LABEL_INDEX[char]
        shown = true
        if char != " " and rng.random() < p_sub:
            shown = LABEL_INDEX[_substitute(char, rng)]
        frames.extend([(shown, true)] * int(rng.integers(1, 4)))
        previous = char
    frames.append((BLANK, BLANK))
    return frames


def simulate_emissions(sentence: str, rng: np.random.Generator, *, p_sub: float = 0.1,
                       p_blank: float = 0.3, peak: float = 8.0, confusion_gap: float = 2.0,
                       noise: float = 1.0) -> np.ndarray:
    """float32 [frames, len(LABELS)] CTC posteriors (rows sum to 1) for ``sentence``
    (characters of :data:`LABELS`).

    Logits: Gaussian noise (``noise``) on every label; the shown label of a frame gets
    ``peak``; a substituted frame gives its true character ``peak - confusion_gap`` (the
    second best: what a language model can recover); the blank gets ``peak / 2`` plus noise on
    character frames (blank noise: some characters blur into blanks); then a softmax.  The
    same ``rng`` state gives the same matrix."""
    targets = _frame_targets(sentence, rng, p_sub, p_blank)
    logits = rng.normal(0.0, noise, (len(targets), len(LABELS)))
    for t, (shown, true) in enumerate(targets):
        logits[t, shown] += peak
        if shown != true:
            logits[t, true] += peak - confusion_gap
        if shown != BLANK:
            logits[t, BLANK] += peak / 2 + rng.normal(0.0, noise)
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    return (probs / probs.sum(axis=1, keepdims=True)).astype(np.float32)


def emissions_for(sentences: list[str], seed: int, p_sub: float) -> list[np.ndarray]:
    """One emission matrix per sentence, sentence ``i`` drawn from seed ``(seed, i)``: the
    same whatever the number of sentences.  Each ends with a word boundary (a space), as a
    CTC model's output ends the last word (wav2vec2's ``|``): a lexicon decoder only ends a
    word there."""
    return [simulate_emissions(s + " ", np.random.default_rng((seed, i)), p_sub=p_sub)
            for i, s in enumerate(sentences)]


# ---- language models --------------------------------------------------------------------

def kenlm_training_text(data: Path, out: Path) -> list[str]:
    """Write the cleaned training text (``<unk>`` as ``<rare>``) to ``out``; its words that
    the decoder can spell (pyctcdecode's unigrams)."""
    words: set[str] = set()
    with open(data / TRAINING_TEXT, encoding="utf-8") as lines, open(out, "w") as text:
        for line in lines:
            sentence = clean_sentence(line, unk_as="<rare>")
            if sentence is not None:
                text.write(sentence + "\n")
                words.update(sentence.split())
    return sorted(w for w in words if w != "<rare>")


def build_kenlm(data: Path, lmplz_dir: Path, work: Path) -> tuple[Path, list[str]]:
    """A 5-gram KenLM binary of the cleaned training text, and its unigrams."""
    text, arpa, binary = work / "train.txt", work / "kjv5.arpa", work / "kjv5.bin"
    unigrams = kenlm_training_text(data, text)
    with open(text, "rb") as source, open(arpa, "wb") as sink:
        subprocess.run([str(lmplz_dir / "lmplz"), "-o", "5", "-S", "10%", "-T", str(work),
                        "--discount_fallback"], stdin=source, stdout=sink, check=True,
                       stderr=subprocess.DEVNULL)
    subprocess.run([str(lmplz_dir / "build_binary"), str(arpa), str(binary)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return binary, unigrams


def random_model(data: Path, path: Path) -> Path:
    """A random-weight lmonnx model over the training text's 10k words (smoke runs only)."""
    from lmonnx._testing import build_random_lm
    from lmonnx.vocab import TokenizerOptions, Vocabulary

    with open(data / TRAINING_TEXT, encoding="utf-8") as lines:
        vocab = Vocabulary.fit(lines, 10004, TokenizerOptions.from_preset("whitespace"))
    build_random_lm(path, vocab, units=64, layers=2, embedding_dim=16, seed=0)
    return path


WARM_UP = "in the beginning"
"""Decoded once by each decoder before timing (not a test sentence: the lmonnx states start
without the test sentences' prefixes)."""


@dataclass
class Row:
    """One decoder with one language model: ``decode`` maps an emission matrix (posteriors)
    to text; ``stats`` reports the lmonnx LM's work since the last ``reset``."""

    decoder: str
    lm: str
    decode: Callable[[np.ndarray], str]
    stats: Callable[[], dict] | None = None
    note: str = ""


def _flashlight_log_probs(matrix: np.ndarray) -> np.ndarray:
    return np.log(np.clip(matrix, 1e-30, 1.0)).astype(np.float32)


def pyctcdecode_rows(args, kenlm: tuple | None, model: Path) -> list[Row]:
    """pyctcdecode: no LM, its KenLM ``LanguageModel`` (the training words as unigrams),
    lmonnx (:mod:`lmonnx.ctc_decoding`)."""
    import pyctcdecode

    from lmonnx.ctc_decoding import build_ctcdecoder

    def beam(decoder):
        return lambda matrix: decoder.decode(matrix, beam_width=args.beam_width)

    rows = [Row("pyctcdecode", "no LM", beam(pyctcdecode.build_ctcdecoder(LABELS)))]
    if kenlm is not None:
        binary, unigrams = kenlm
        rows.append(Row("pyctcdecode", "KenLM 5-gram", beam(pyctcdecode.build_ctcdecoder(
            LABELS, str(binary), unigrams, alpha=args.alpha, beta=args.beta,
            unk_score_offset=args.unk_offset)), note=f"{len(unigrams)} unigrams"))
    decoder = build_ctcdecoder(LABELS, model, alpha=args.alpha, beta=args.beta,
                               unk_score_offset=args.unk_offset, case_fold=args.case_fold,
                               num_threads=args.threads)
    lm = decoder._language_model  # pyctcdecode keeps it there

    def stats():
        info = lm.cache_info()
        return dict(calls=info["steps"], hits=info["hits"])

    rows.append(Row("pyctcdecode", f"lmonnx {model.name}", beam(decoder), stats))
    return rows


def flashlight_rows(args, kenlm: tuple | None, model: Path) -> list[Row]:
    """flashlight-text's LexiconDecoder (torchaudio's ``ctc_decoder``) over one lexicon, the
    model's vocabulary words the labels spell: no LM, flashlight's KenLM, lmonnx with pending
    states batched and lazy (:mod:`lmonnx.flashlight_decoding`).  ``lm_weight`` = alpha * ln 10
    (its LM scores are log10) and ``word_score`` = beta: pyctcdecode's weights."""
    from flashlight.lib.text.decoder.kenlm import KenLM
    from flashlight.lib.text.dictionary import Dictionary

    from lmonnx import Scorer
    from lmonnx.flashlight_decoding import LexiconCTCDecoder, LmonnxFlashlightLM

    scorer = Scorer(model, providers="cpu", num_threads=args.threads)
    words = LexiconCTCDecoder.spellable(scorer.vocab.tokens, " ", args.case_fold, LABELS)
    options = dict(beam_size=args.beam_width, lm_weight=args.alpha * math.log(10),
                   word_score=args.beta)

    def words_of(decoder):
        return lambda matrix: " ".join(decoder.decode(_flashlight_log_probs(matrix)))

    note = f"{len(words)}-word lexicon"
    rows = [Row("flashlight", "no LM", words_of(LexiconCTCDecoder(
        LABELS, None, words=words, beam_size=args.beam_width, word_score=args.beta)), note=note)]
    if kenlm is not None:
        rows.append(Row("flashlight", "KenLM 5-gram", words_of(LexiconCTCDecoder(
            LABELS, KenLM(str(kenlm[0]), Dictionary(words)), words=words, **options)), note=note))
    for frames in [None, *args.batch_frames]:
        lm = LmonnxFlashlightLM(scorer, words, case_fold=args.case_fold, batch_frames=frames)
        decoder = LexiconCTCDecoder(LABELS, lm, words=words, **options)
        how = "lazy" if frames is None else f"batch {frames} frames"
        rows.append(Row("flashlight", f"lmonnx {model.name} ({how})",
                        words_of(decoder), lambda lm=lm: dict(
                            calls=lm.stats.calls, rows=lm.stats.computed, used=lm.stats.used)))
    return rows


def decode_all(row: Row, emissions) -> tuple[list[str], float]:
    """Decoded texts and decoding seconds per utterance."""
    texts, start = [], time.perf_counter()
    for matrix in emissions:
        texts.append(row.decode(matrix))
    return texts, (time.perf_counter() - start) / max(len(emissions), 1)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", type=Path, help="an lmonnx .onnx model")
    model.add_argument("--random-model", action="store_true",
                       help="a random-weight model over the training vocabulary (smoke run)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--corpus", choices=sorted(CORPORA), default="kjv")
    parser.add_argument("--sentences", type=int, default=200)
    parser.add_argument("--beam-width", type=int, default=32)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--beta", type=float, default=1.5)
    parser.add_argument("--unk-offset", type=float, default=-10.0, help="log10 units")
    parser.add_argument("--p-sub", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads")
    parser.add_argument("--case-fold", action="store_true",
                        help="match decoder words to the model's tokens case-insensitively")
    parser.add_argument("--no-kenlm", action="store_true")
    parser.add_argument("--batch-frames", type=lambda v: [int(x) for x in v.split(",") if x],
                        default=[4, 16], metavar="W1,W2,...",
                        help="flashlight rows with pending states batched over these many "
                             "frames (besides the lazy row)")
    parser.add_argument("--decoders", default="pyctcdecode,flashlight",
                        help="comma-separated: pyctcdecode, flashlight")
    parser.add_argument("--lmplz-dir", type=Path, default=REPO / ".kenlm" / "bin")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    import jiwer

    args = parse_args(argv)
    chosen = [d for d in args.decoders.split(",") if d]
    if not chosen or set(chosen) - {"pyctcdecode", "flashlight"}:
        raise SystemExit(f"--decoders: choose from pyctcdecode, flashlight (got {args.decoders!r})")
    sentences = read_sentences(args.data / CORPORA[args.corpus], args.sentences)
    emissions = emissions_for(sentences, args.seed, args.p_sub)
    frames = sum(len(e) for e in emissions)
    print(f"CTC beam search, {len(sentences)} sentences of {CORPORA[args.corpus]} ({frames} "
          f"frames), beam {args.beam_width}, alpha {args.alpha} (flashlight lm_weight "
          f"{args.alpha * math.log(10):.3f} per log10), beta {args.beta}, unk offset "
          f"{args.unk_offset} (log10), p_sub {args.p_sub}, seed {args.seed}")
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; onnxruntime threads {args.threads}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        kenlm = None if args.no_kenlm else build_kenlm(args.data, args.lmplz_dir, work)
        model = random_model(args.data, work / "random.onnx") if args.random_model else args.model
        rows = []
        if "pyctcdecode" in chosen:
            rows += pyctcdecode_rows(args, kenlm, model)
        if "flashlight" in chosen:
            rows += flashlight_rows(args, kenlm, model)
        print(f"\n{'decoder':<12} {'language model':<44} {'WER':>7} {'s/utt':>8}  notes")
        for row in rows:
            row.decode(warm_up_emissions())
            before = row.stats() if row.stats else None
            texts, seconds = decode_all(row, emissions)
            note = row.note
            if before is not None:  # the timed decodes' counts, per utterance
                after = row.stats()
                note = ", ".join(f"{(after[k] - before[k]) / len(sentences):.0f} {k}/utt"
                                 for k in after) + (f"; {note}" if note else "")
            wer = jiwer.wer(sentences, [t.strip() for t in texts])
            print(f"{row.decoder:<12} {row.lm:<44} {wer:>7.2%} {seconds:>8.3f}  {note}")


def warm_up_emissions() -> np.ndarray:
    return simulate_emissions(WARM_UP + " ", np.random.default_rng(2**31))


if __name__ == "__main__":
    main()
