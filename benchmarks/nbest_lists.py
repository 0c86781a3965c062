"""N-best lists for ``lmonnx rescore`` from simulated CTC emissions (benchmarks/ctc_table.py).

    python benchmarks/nbest_lists.py --out nbest/ [--sentences 200] [--beam-width 16]
    lmonnx rescore nbest/nbest.jsonl --model kjv.onnx --references nbest/references.txt --tune

A first pass decodes each sentence's emissions with pyctcdecode (no LM by default; ``--first-pass
kenlm``: with the KenLM 5-gram that ctc_table.py builds) and writes its beams as JSON lines,
``{"utterance": "i", "text": ..., "am_score": ...}``, an utterance's hypotheses on consecutive
lines, best first: ``am_score`` is pyctcdecode's beam score (the CTC log-posterior of the beam's
paths; with KenLM, plus its alpha * LM + beta terms).  ``references.txt`` holds the true
sentences, one per utterance.  Same sentences, emissions and seed as ctc_table.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ctc_table  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="a directory (made if missing)")
    parser.add_argument("--data", type=Path, default=ctc_table.DEFAULT_DATA)
    parser.add_argument("--corpus", choices=sorted(ctc_table.CORPORA), default="kjv")
    parser.add_argument("--sentences", type=int, default=200)
    parser.add_argument("--beam-width", type=int, default=16)
    parser.add_argument("--p-sub", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--first-pass", choices=("nolm", "kenlm"), default="nolm")
    parser.add_argument("--alpha", type=float, default=0.5, help="--first-pass kenlm's")
    parser.add_argument("--beta", type=float, default=1.5, help="--first-pass kenlm's")
    parser.add_argument("--lmplz-dir", type=Path, default=ctc_table.REPO / ".kenlm" / "bin")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    import pyctcdecode

    args = parse_args(argv)
    sentences = ctc_table.read_sentences(args.data / ctc_table.CORPORA[args.corpus],
                                         args.sentences)
    emissions = ctc_table.emissions_for(sentences, args.seed, args.p_sub)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        if args.first_pass == "kenlm":
            binary, unigrams = ctc_table.build_kenlm(args.data, args.lmplz_dir, Path(tmp))
            decoder = pyctcdecode.build_ctcdecoder(ctc_table.LABELS, str(binary), unigrams,
                                                   alpha=args.alpha, beta=args.beta)
        else:
            decoder = pyctcdecode.build_ctcdecoder(ctc_table.LABELS)
        hypotheses = 0
        with open(args.out / "nbest.jsonl", "w", encoding="utf-8") as nbest:
            for utterance, matrix in enumerate(emissions):
                beams = decoder.decode_beams(matrix, beam_width=args.beam_width)
                for beam in beams:  # (text, lm state, word frames, logit score, score)
                    nbest.write(json.dumps({"utterance": str(utterance), "text": beam[0].strip(),
                                            "am_score": round(float(beam[4]), 6)}) + "\n")
                hypotheses += len(beams)
    (args.out / "references.txt").write_text("".join(s + "\n" for s in sentences),
                                             encoding="utf-8")
    print(f"{len(sentences)} utterances, {hypotheses} hypotheses ({args.first_pass} first pass, "
          f"beam {args.beam_width}) in {args.out / 'nbest.jsonl'}; references in "
          f"{args.out / 'references.txt'}")


if __name__ == "__main__":
    main()
