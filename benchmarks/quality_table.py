"""Model quality against the classic peer: KenLM n-grams and lmonnx models on the same text.

    python benchmarks/quality_table.py --data DIR [--kenlm-bin DIR] [--orders 5,3]
        [--model ptb=runs/ptb-small.onnx --model kjv=runs/kjv.onnx]
        [--run ptb=runs/ptb-small --run kjv=runs/kjv] [--torch-minutes 30] [--repeats 3]
        [--mix-weight 0.5|auto|none]

``--model`` may name several models of one corpus (full and adaptive softmax, say): each
gets its fp32 and int8 rows, scored in turn for ``--repeats`` passes (the best counts).

Corpora and their train/valid/test splits: see ``quality_splits.py`` (shared with
``torch_lm.py``).

One convention for every row: a closed vocabulary of the training words; a test word
outside it is ``<unk>``, and ``<unk>`` is an ordinary word (PTB's text already holds it).
A sentence of n words scores n+1 tokens (``</s>`` included, ``<s>`` never), as KenLM and
lmonnx both report; perplexity = exp(total NLL in nats / tokens).  lmplz refuses a literal
``<unk>`` in its training text, so KenLM sees it renamed to an ordinary word, in training and
at test time alike.

Rows: KenLM's lmplz (modified Kneser-Ney) of each order, built by
``benchmarks/build_kenlm.sh`` and queried through the ``kenlm`` Python module (``pip install
kenlm``, or the ``bench`` extra); lmonnx models given with ``--model`` (fp32, and int8
quantized here from it), their training time read from ``--run``'s history.json; with
``--torch-minutes M``, the same-size model in PyTorch trained here by pytorch/examples'
word_language_model recipe (``torch_lm.py``, up to 40 epochs or M minutes); each fp32
model mixed per token with the first order's KenLM (``--mix-weight``, :mod:`lmonnx.mix`).  Scoring
speed is words (tokens) per second of one process on this machine, scoring the test text
sentence by sentence (KenLM) or with ``Scorer.evaluate`` (lmonnx, best of ``--repeats``).  Rows that cannot run say
why in one line.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_model
from quality_splits import print_table, splits

UNK = "<unk>"
KENLM_UNK = "unk_token"  # lmplz refuses a literal <unk>: the same word under another name


def closed(sentences: list[str], vocabulary: set[str], unk: str) -> list[str]:
    """Each sentence with the words outside ``vocabulary`` (and ``<unk>``) written ``unk``."""
    return [" ".join(w if w in vocabulary and w != UNK else unk for w in s.split())
            for s in sentences]


def kenlm_row(bin_dir: Path, order: int, split: dict, workdir: Path) -> dict:
    """Train an order-``order`` KenLM on ``split["train"]`` and score ``split["test"]``."""
    import kenlm

    vocabulary = {w for s in split["train"] for w in s.split()}
    train = workdir / "train.txt"
    train.write_text("\n".join(closed(split["train"], vocabulary, KENLM_UNK)) + "\n",
                     encoding="utf-8")
    arpa, binary = workdir / f"{order}.arpa", workdir / f"{order}.bin"
    start = time.perf_counter()
    with open(train, "rb") as text, open(arpa, "wb") as out:
        subprocess.run([str(bin_dir / "lmplz"), "-o", str(order), "--discount_fallback",
                        "-S", "20%", "-T", str(workdir)], stdin=text, stdout=out,
                       stderr=subprocess.DEVNULL, check=True)
    subprocess.run([str(bin_dir / "build_binary"), str(arpa), str(binary)],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    train_seconds = time.perf_counter() - start
    model = kenlm.Model(str(binary))
    test = closed(split["test"], vocabulary, KENLM_UNK)
    start = time.perf_counter()
    log10 = sum(model.score(s, bos=True, eos=True) for s in test)
    seconds = time.perf_counter() - start
    tokens = sum(len(s.split()) + 1 for s in test)
    return {"method": f"KenLM {order}-gram (lmplz, modified Kneser-Ney)",
            "perplexity": math.exp(-log10 * math.log(10) / tokens), "tokens": tokens,
            "train_seconds": train_seconds, "words_per_second": tokens / seconds}


def lmonnx_rows(models: list[tuple[Path, Path | None]], split: dict, workdir: Path,
                repeats: int = 3) -> list[dict]:
    """Each (fp32 model, its run directory or None) and its int8 form, scored on
    ``split["test"]`` with the same closed vocabulary (the model's own: words outside it are
    <unk>, as it was trained).  Speed: the best of ``repeats`` passes, the models taken in
    turn (round-robin), so that every row saw the same machine."""
    from lmonnx import Scorer
    from lmonnx.quantize import quantize_file

    test = workdir / "test.txt"
    test.write_text("\n".join(split["test"]) + "\n", encoding="utf-8")
    entries = []
    for i, (model, run) in enumerate(models):
        int8 = workdir / f"int8-{i}.onnx"
        quantize_file(model, int8, sample=test, force=True)
        for kind, path in (("fp32", model), ("int8", int8)):
            scorer = Scorer(path, providers="cpu")
            softmax = scorer.config.get("softmax", "full") + (
                " (tied tails)" if scorer.config.get("tie_tails") else "")
            entries.append({"method": f"lmonnx {kind}, {softmax} softmax ({model.name})",
                            "scorer": scorer, "train_seconds": _train_seconds(run),
                            "words_per_second": 0.0})
    for _ in range(repeats):
        for entry in entries:
            report = entry["scorer"].evaluate(test)
            entry.update(perplexity=report.perplexity, tokens=report.tokens,
                         words_per_second=max(entry["words_per_second"],
                                              report.tokens_per_second))
    return [{k: v for k, v in e.items() if k != "scorer"} for e in entries]


def mixed_rows(models: list[Path], kenlm_binary: Path, order: int, split: dict,
               weight: str) -> list[dict]:
    """Each fp32 model mixed per token with the KenLM ``order``-gram (:mod:`lmonnx.mix`) at
    lmonnx's weight ``weight`` (a number, or ``auto``: EM on ``split["valid"]``).  The test
    text goes in as the KenLM row reads it (a word outside KenLM's training words, ``<unk>``
    included, renamed ``unk_token``); lmonnx never knows those words either, so its tokens
    and numbers are its own row's."""
    from lmonnx import Scorer
    from lmonnx.mix import MixedScorer

    vocabulary = {w for s in split["train"] for w in s.split()}
    fit_on = closed(split["valid"], vocabulary, KENLM_UNK) if weight == "auto" else None
    test = closed(split["test"], vocabulary, KENLM_UNK)
    rows = []
    for model in models:
        mixer = MixedScorer(Scorer(model, providers="cpu"), str(kenlm_binary),
                            weight if weight == "auto" else float(weight), fit_on=fit_on)
        start = time.perf_counter()
        report = mixer.evaluate(test)
        seconds = time.perf_counter() - start
        fitted = " by EM on valid" if weight == "auto" else ""
        rows.append({"method": f"lmonnx fp32 + KenLM {order}-gram, L={mixer.weight:.3g}{fitted} "
                               f"({model.name})",
                     "perplexity": report.mixed_perplexity, "tokens": report.tokens,
                     "train_seconds": None, "words_per_second": report.tokens / seconds})
    return rows


def _train_seconds(run: Path | None) -> float | None:
    """Training plus validation seconds from a run's history.json (None: not given)."""
    if run is None or not (run / "history.json").is_file():
        return None
    epochs = json.loads((run / "history.json").read_text())["epochs"]
    return sum(e["train_seconds"] + (e.get("valid_seconds") or 0) for e in epochs)


def _pairs(values: list[str], flag: str) -> dict[str, list[Path]]:
    """CORPUS=PATH values, grouped by corpus in the order given."""
    pairs: dict[str, list[Path]] = {}
    for value in values:
        corpus, sep, path = value.partition("=")
        if not sep or corpus not in ("ptb", "kjv"):
            sys.exit(f"{flag} takes CORPUS=PATH with CORPUS ptb or kjv, got {value!r}")
        pairs.setdefault(corpus, []).append(Path(path))
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True,
                        help="directory with ptb.valid/test.txt and kjv.train/valid.txt")
    parser.add_argument("--kenlm-bin", type=Path, default=None,
                        help="lmplz and build_binary (default: benchmarks/build_kenlm.sh's)")
    parser.add_argument("--orders", default="5,3")
    parser.add_argument("--model", action="append", default=[], metavar="CORPUS=ONNX",
                        help="an lmonnx model of a corpus (repeat it to compare several "
                             "side by side, e.g. full and adaptive softmax)")
    parser.add_argument("--run", action="append", default=[], metavar="CORPUS=RUN_DIR",
                        help="the run directory of the corpus's model given in the same "
                             "place (the k-th --run of a corpus goes with its k-th --model): "
                             "its training time")
    parser.add_argument("--repeats", type=int, default=3,
                        help="lmonnx scoring passes per model, taken in turn; the best "
                             "counts (default 3)")
    parser.add_argument("--mix-weight", default="0.5", metavar="L|auto|none",
                        help="add each fp32 model mixed per token with the first --orders "
                             "KenLM at lmonnx's weight L (auto: fitted by EM on the "
                             "validation split; none: no mixed rows) (default 0.5)")
    parser.add_argument("--torch-minutes", type=float, default=None,
                        help="add the PyTorch peer, trained here for at most this long")
    args = parser.parse_args()
    models, runs = _pairs(args.model, "--model"), _pairs(args.run, "--run")
    for corpus, dirs in runs.items():
        if len(dirs) > len(models.get(corpus, [])):
            sys.exit(f"--run {corpus}=... given {len(dirs)} times for "
                     f"{len(models.get(corpus, []))} --model {corpus}=...")
    if args.mix_weight not in ("auto", "none"):
        try:
            if not 0.0 <= float(args.mix_weight) <= 1.0:
                raise ValueError
        except ValueError:
            sys.exit(f"--mix-weight takes a number in [0, 1], auto or none, "
                     f"got {args.mix_weight!r}")
    if args.repeats < 1:
        sys.exit(f"--repeats must be at least 1, got {args.repeats}")
    bin_dir = args.kenlm_bin or Path(__file__).resolve().parents[1] / ".kenlm" / "bin"
    print(f"CPU: {cpu_model()}; 1 process; kenlm bin {bin_dir}")
    for corpus, split in splits(args.data).items():
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            for order in (int(o) for o in args.orders.split(",")):
                method = f"KenLM {order}-gram"
                if not (bin_dir / "lmplz").is_file():
                    rows.append({"method": method, "skipped": "no lmplz: run "
                                 "benchmarks/build_kenlm.sh"})
                elif not _has_kenlm():
                    rows.append({"method": method, "skipped": "pip install kenlm"})
                else:
                    rows.append(kenlm_row(bin_dir, order, split, Path(tmp)))
            if corpus in models:
                given = runs.get(corpus, [])
                pairs = [(m, given[i] if i < len(given) else None)
                         for i, m in enumerate(models[corpus])]
                rows += lmonnx_rows(pairs, split, Path(tmp), args.repeats)
                first = int(args.orders.split(",")[0])
                binary = Path(tmp) / f"{first}.bin"
                if args.mix_weight != "none" and binary.is_file():
                    rows += mixed_rows(models[corpus], binary, first, split, args.mix_weight)
            else:
                rows.append({"method": "lmonnx", "skipped": f"no --model {corpus}=PATH given"})
            if args.torch_minutes is not None:
                rows.append(_torch_row(split, args.torch_minutes))
        print_table(corpus, rows)


def _torch_row(split: dict, minutes: float) -> dict:
    method = "PyTorch word_language_model (tied 2x200)"
    try:
        import torch_lm
    except ImportError:
        return {"method": method, "skipped": "no torch: pip install -e '.[bench]'"}
    return torch_lm.torch_row(split, minutes=minutes, log=lambda line: None)


def _has_kenlm() -> bool:
    try:
        import kenlm  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()
