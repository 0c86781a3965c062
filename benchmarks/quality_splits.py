"""What quality_table.py and torch_lm.py share: each corpus's splits and the printed table.

Corpora (DIR holds the Penn Treebank and King James Bible text the README names):
  ptb  train = the first 3,033 lines of ptb.valid.txt, valid = its other lines, test =
       ptb.test.txt (PTB's own training split is not in DIR)
  kjv  train = kjv.train.txt less 3% of its verses drawn at random (held out for early
       stopping): the split ``lmonnx train --holdout 0.03`` makes with its default seed, so
       every model trains on the same verses; test = kjv.valid.txt

Both tables import this module and neither imports the other's table code back.
"""

from __future__ import annotations

from pathlib import Path

PTB_TRAIN_LINES = 3033
KJV_HELD_OUT = 0.03


def read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def splits(data: Path) -> dict[str, dict[str, list[str]]]:
    """{corpus: {"train", "valid", "test": sentences}} as the module docstring says."""
    out = {}
    if (data / "ptb.valid.txt").is_file() and (data / "ptb.test.txt").is_file():
        valid = read_lines(data / "ptb.valid.txt")
        out["ptb"] = {"train": valid[:PTB_TRAIN_LINES], "valid": valid[PTB_TRAIN_LINES:],
                      "test": read_lines(data / "ptb.test.txt")}
    if (data / "kjv.train.txt").is_file() and (data / "kjv.valid.txt").is_file():
        from lmonnx.train.config import TrainConfig
        from lmonnx.train.trainer import held_out_split

        train, held_out = held_out_split(read_lines(data / "kjv.train.txt"),
                                         TrainConfig(holdout=KJV_HELD_OUT))
        out["kjv"] = {"train": train, "valid": held_out,
                      "test": read_lines(data / "kjv.valid.txt")}
    return out


def print_table(corpus: str, rows: list[dict]) -> None:
    """Rows of method, perplexity, tokens, training seconds (None: unknown) and words/s, or
    method and the one line saying why it was ``skipped``."""
    print(f"\n{corpus}: test perplexity, closed vocabulary (<unk> an ordinary word), "
          "</s> counted")
    print(f"{'method':58s} {'perplexity':>10s} {'tokens':>8s} {'train s':>9s} "
          f"{'words/s':>12s}")
    for r in rows:
        if "skipped" in r:
            print(f"{r['method']:58s} skipped: {r['skipped']}")
            continue
        trained = "-" if r["train_seconds"] is None else f"{r['train_seconds']:.1f}"
        print(f"{r['method']:58s} {r['perplexity']:10.2f} {r['tokens']:8d} {trained:>9s} "
              f"{r['words_per_second']:12,.0f}")
