"""The ``lmonnx`` command line: thin subcommands over the library.

User errors print one line, ``lmonnx: error: ...``: status 2 for a command line that does not
parse (an unknown flag, a value of the wrong type), status 1 for everything found while
running (missing or undecodable files, foreign models, outputs that exist): an
:class:`~lmonnx.errors.LmonnxError` or an ``OSError``, nothing else.  Any other exception is a
bug in lmonnx and keeps its traceback; ``--debug`` shows the traceback of user errors too.
Progress and notices from the library arrive through the ``lmonnx`` logger, which ``main``
prints on stderr.  TensorFlow is imported only by ``train`` and ``export``, onnxruntime
only by the commands that run a model, both lazily.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from lmonnx import __version__
from lmonnx.errors import InvalidArgumentError, LmonnxError, MissingDependencyError, first_line
from lmonnx.validation import check_int, check_real

EXIT_USER_ERROR = 1
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the usage block is what ``--help`` is for."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _path(text: str) -> Path:
    """An argparse ``type`` for paths: an empty one is a usage error (``Path("")`` would be
    the current directory, silently)."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path; give a name")
    return Path(text)


def _flag_type(convert, what: str, check, **bounds):
    """An argparse ``type``: ``convert`` the text, then ``check`` it against ``bounds`` (a
    :mod:`lmonnx.validation` check); a bad value is a usage error naming the flag."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        try:
            return check("it", value, **bounds)
        except InvalidArgumentError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix("it ")) from None
    parse.__name__ = what.split()[-1]  # argparse names the type in some messages
    return parse


def _int_arg(low: int | None = 1, high: int | None = None, why: str = ""):
    """An integer flag within [low, high]."""
    return _flag_type(int, "an integer", check_int, low=low, high=high, why=why)


def _ints_arg(low: int | None = 1, why: str = ""):
    """Comma-separated integers, each at least ``low`` (``--cutoffs 2000,10000``)."""
    def check_all(name, values, **bounds):
        return tuple(check_int(name, v, **bounds) for v in values)
    return _flag_type(lambda text: [int(part) for part in text.split(",")],
                      "comma-separated integers", check_all, low=low, why=why)


def _real_arg(low: float | None = None, high: float | None = None, *, low_open: bool = False,
              high_open: bool = False, why: str = ""):
    """A finite-number flag within the bounds (``*_open``: the bound itself excluded)."""
    return _flag_type(float, "a number", check_real, low=low, high=high, low_open=low_open,
                      high_open=high_open, why=why)


def _add_encoding_errors(p: argparse.ArgumentParser) -> None:
    p.add_argument("--errors", choices=("strict", "replace"), default="strict",
                   help="undecodable UTF-8: fail naming the line (strict, default) or replace "
                        "bad bytes with U+FFFD")


def _add_quantize_options(p: argparse.ArgumentParser, quantize_flag: bool) -> None:
    if quantize_flag:
        p.add_argument("--quantize", choices=("int8",), default=None,
                       help="write the int8 (CPU) form of the checked model")
    p.add_argument("--max-change", type=_real_arg(low=0), default=None,
                   help="largest relative perplexity change int8 may cost (default 0.01 = 1%%)")


def _model_parent() -> argparse.ArgumentParser:
    """The flags of every command that runs a model."""
    p = _Parser(add_help=False)
    p.add_argument("--model", type=_path, default=Path("model.onnx"),
                   help="an lmonnx .onnx file (default: model.onnx)")
    p.add_argument("--providers", choices=("auto", "cpu", "cuda"), default="auto",
                   help="onnxruntime execution provider (auto: CUDA when usable, else CPU)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    return p


def _arguments_synth(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=_path, default=Path("synth"),
                   help="output directory: train.txt, valid.txt, test.txt and truth.json, "
                        "which is also printed (default: synth)")
    p.add_argument("--seed", type=_int_arg(0), default=0, help="same seed, same corpus")
    p.add_argument("--words", type=_int_arg(2), default=None, help="vocabulary size of the chain")
    p.add_argument("--train-sentences", type=_int_arg(1), default=None)
    p.add_argument("--valid-sentences", type=_int_arg(1), default=None)
    p.add_argument("--test-sentences", type=_int_arg(1), default=None)
    p.add_argument("--force", action="store_true", help="overwrite existing files in --out")


def _arguments_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("corpus", type=_path,
                   help="training text, one sentence per line (- reads stdin, once)")
    p.add_argument("--valid", type=_path, default=None, help="validation text (- reads stdin)")
    _add_train_settings(p)
    p.add_argument("--out", type=_path, default=Path("run"), help="run directory (default: run)")
    start = p.add_mutually_exclusive_group()  # continue, or start over: never both
    start.add_argument("--resume", action="store_true",
                       help="continue the run in --out with its settings; a larger --epochs "
                            "extends a finished one, and --epochs, --learning-rate, "
                            "--lr-decay, --lr-patience, --patience, --clipnorm and "
                            "--max-minutes may change")
    start.add_argument("--force", action="store_true",
                       help="start over in an existing --out, deleting only the files its run "
                            "lists in lmonnx-run.json")
    _add_encoding_errors(p)


def _arguments_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=_path)
    p.add_argument("-o", "--output", type=_path, default=Path("model.onnx"),
                   help="the .onnx to write (default: model.onnx; a FIFO or /dev/stdout works)")
    # The lowest opset lmonnx.export supports (MIN_OPSET, tested equal); the highest depends
    # on the installed tf2onnx and is checked once it is loaded.
    p.add_argument("--opset", type=_int_arg(11), default=None, help="ONNX opset (default: 17)")
    p.add_argument("--force", action="store_true",
                   help="overwrite an existing output file (never one of the run's files or "
                        "corpora); with --quantize, also write a model over --max-change")
    _add_quantize_options(p, quantize_flag=True)


def _arguments_quantize(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=_path, help="an lmonnx .onnx (fp32)")
    p.add_argument("-o", "--output", type=_path, required=True)
    p.add_argument("--sample", type=_path, default=None,
                   help="text whose first 1000 sentences measure the perplexity change "
                        "(default: 200 sentences sampled from the model itself)")
    p.add_argument("--force", action="store_true",
                   help="overwrite an existing output; write even over --max-change")
    _add_quantize_options(p, quantize_flag=False)
    _add_encoding_errors(p)


def _arguments_evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("corpus", type=_path, nargs="+", help="text files; - reads stdin")
    p.add_argument("--threads", type=_int_arg(1), default=None,
                   help="onnxruntime intra-op threads")
    p.add_argument("--batch-size", type=_int_arg(1), default=64,
                   help="sentences per batch at most")
    p.add_argument("--max-tokens", type=_int_arg(1), default=None,
                   help="padded tokens per batch at most (default: a batch's logits, or a "
                        "factored model's head and hidden states, <= 64 MiB)")
    p.add_argument("--per-sentence", type=_path, default=None,
                   help="JSON lines per sentence (a file, FIFO or /dev/stdout)")
    p.add_argument("--per-token", type=_path, default=None, help="JSON lines per token")
    p.add_argument("--force", action="store_true", help="overwrite existing --per-* files")
    _add_encoding_errors(p)
    p.add_argument("--ray", nargs="?", const="auto", default=None, metavar="auto|ADDRESS",
                   help="evaluate on a Ray cluster (extra lmonnx[ray]): auto = RAY_ADDRESS, "
                        "else a cluster started on this machine, else a new local one; or the "
                        "cluster's address.  --per-sentence FILE.parquet writes Parquet")
    p.add_argument("--actors", type=_int_arg(1), default=None,
                   help="with --ray: scoring actors (default: as many as the cluster's CPUs "
                        "allow)")
    p.add_argument("--cpus-per-actor", type=_real_arg(0, low_open=True), default=None,
                   help="with --ray: CPUs per actor, fractions allowed (its onnxruntime "
                        "threads, rounded up, unless --threads; default 1)")
    p.add_argument("--gpus-per-actor", type=_real_arg(0), default=None,
                   help="with --ray: GPUs per actor (default 0)")
    p.add_argument("--mix", type=_path, default=None, metavar="KENLM",
                   help="also interpolate per token with this KenLM model (ARPA or binary; "
                        "extra lmonnx[mix]): p = L * p_lmonnx + (1 - L) * p_kenlm, and report "
                        "lmonnx alone, KenLM alone and the mix")
    p.add_argument("--mix-weight", default=None, metavar="L|auto",
                   help="with --mix: lmonnx's share L in [0, 1] (default 0.5), or auto: L "
                        "fitted by EM on --mix-fit")
    p.add_argument("--mix-fit", type=_path, default=None, metavar="HELDOUT",
                   help="with --mix-weight auto: the held-out text L is fitted on (never the "
                        "evaluated text: fitting on it flatters the mix)")


def _arguments_score(p: argparse.ArgumentParser) -> None:
    p.add_argument("sentences", nargs="*",
                   help="sentences; none (or -) reads stdin, one sentence per line (an empty "
                        "one scores </s> alone)")
    _add_encoding_errors(p)


def _arguments_predict(p: argparse.ArgumentParser) -> None:
    p.add_argument("prefix", help="words to start from; - reads them from stdin")
    p.add_argument("-k", type=_int_arg(1), default=5, help="words to list (default 5)")
    _add_encoding_errors(p)


def _arguments_generate(p: argparse.ArgumentParser) -> None:
    p.add_argument("prefix", nargs="?", default="",
                   help="words to start from (default: none); - reads them from stdin")
    p.add_argument("--words", type=_int_arg(1), default=20, help="most words to generate")
    p.add_argument("--temperature", type=_real_arg(0), default=1.0,
                   help="0 is greedy (argmax)")
    p.add_argument("--top-k", type=_int_arg(1), default=None,
                   help="sample among the k most likely")
    p.add_argument("--seed", type=_int_arg(0), default=None, help="same seed, same text")
    _add_encoding_errors(p)


def _reals_arg(low: float | None = None):
    """Comma-separated finite numbers, each at least ``low`` (``--alpha-grid 0,0.5,1``)."""
    def check_all(name, values, **bounds):
        return tuple(check_real(name, v, **bounds) for v in values)
    return _flag_type(lambda text: [float(part) for part in text.split(",")],
                      "comma-separated numbers", check_all, low=low)


_RESCORE_DESCRIPTION = (
    "Rescore a first-pass decoder's n-best lists (ASR, OCR): each hypothesis gets score = "
    "am + alpha * lm + beta * words (NeMo's n-best rescoring formula), and the best of "
    "each utterance is written (ties: the earlier hypothesis).  am is the decoder's "
    "score; lm is the hypothesis's log-probability under the model (its words, then "
    "</s>) in nats (natural log), as lmonnx reports everywhere (NeMo's and KenLM's "
    "scripts use log10 or natural logs by tool: alpha absorbs the base); words is its "
    "whitespace-separated word count.  The first-pass best is the highest am score.")


def _arguments_rescore(p: argparse.ArgumentParser) -> None:
    p.description = _RESCORE_DESCRIPTION
    p.add_argument("nbest", type=_path, metavar="NBEST",
                   help="the n-best lists (- reads stdin, with --format): NeMo's TSV "
                        "(text<TAB>am_score, --beam-size lines per utterance) or JSON lines "
                        '({"utterance": ID, "text": ..., "am_score": ...}, an utterance\'s '
                        "hypotheses on consecutive lines)")
    p.add_argument("--format", choices=("tsv", "jsonl"), default=None,
                   help="the input's format (default: from the extension, .tsv or .jsonl); "
                        "the output has the same")
    p.add_argument("--beam-size", type=_int_arg(1), default=None, metavar="N",
                   help="TSV: lines per utterance (required; the line count must be a "
                        "multiple)")
    p.add_argument("--alpha", type=_real_arg(0), default=None,
                   help="weight of lm, a log-probability in nats (default 0.5)")
    p.add_argument("--beta", type=_real_arg(), default=None,
                   help="reward per word, negative for a penalty (default 0)")
    p.add_argument("-o", "--output", type=_path, default=None,
                   help="where to write (default: stdout): the best hypothesis per utterance, "
                        "one line each; TSV input: its text; JSON lines: {utterance, text, "
                        "am_score, lm_logprob, score, rank (its 0-based index in the n-best)}")
    p.add_argument("--force", action="store_true", help="overwrite an existing -o file")
    p.add_argument("--all", dest="all_hypotheses", action="store_true",
                   help="write every hypothesis with its new score instead (TSV: "
                        "text<TAB>score; JSON lines: plus best: true/false)")
    p.add_argument("--references", type=_path, default=None, metavar="REFS",
                   help="one reference transcript per utterance, in order: print the WER of "
                        "the first pass (the highest am score) and of the rescored best "
                        "(jiwer; extra lmonnx[asr])")
    p.add_argument("--tune", action="store_true",
                   help="with --references: choose alpha and beta on the grids by WER (the "
                        "model runs once), print the best settings and rescore with the best "
                        "(ties: the smallest alpha, then the smallest |beta|)")
    p.add_argument("--alpha-grid", type=_reals_arg(0), default=None, metavar="A1,A2,...",
                   help="with --tune: the alphas (default 0,0.1,...,2)")
    p.add_argument("--beta-grid", type=_reals_arg(), default=None, metavar="B1,B2,...",
                   help="with --tune: the betas (default -2,-1.5,...,2)")
    p.add_argument("--mix", type=_path, default=None, metavar="KENLM",
                   help="lm from lmonnx mixed per token with this KenLM model (ARPA or binary; "
                        "extra lmonnx[mix]), as evaluate --mix does")
    p.add_argument("--mix-weight", type=_real_arg(0, 1), default=None, metavar="L",
                   help="with --mix: lmonnx's share L in [0, 1] (default 0.5)")
    p.add_argument("--threads", type=_int_arg(1), default=None,
                   help="onnxruntime intra-op threads")
    p.add_argument("--batch-size", type=_int_arg(1), default=64,
                   help="sentences per batch at most")
    _add_encoding_errors(p)


def _arguments_serve(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=_path, help="an lmonnx .onnx file")
    p.add_argument("--providers", choices=("auto", "cpu", "cuda"), default="auto",
                   help="onnxruntime execution provider (auto: CUDA when usable, else CPU)")
    p.add_argument("--threads", type=_int_arg(1), default=None,
                   help="onnxruntime intra-op threads (default: one per core; with --ray, "
                        "the replica's CPUs, rounded up)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default "
                   "127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=_int_arg(0, 65535), default=8000, help="default 8000")
    p.add_argument("--name", default=None,
                   help="the model's name in /v1/models (default: the file's stem)")
    p.add_argument("--max-wait-ms", type=_real_arg(0), default=2.0,
                   help="longest a batch that is not full waits for requests being read, "
                        "when the model is slow enough for waiting to pay (default 2; 0: run "
                        "whatever is queued at once)")
    p.add_argument("--max-batch-sentences", type=_int_arg(1), default=64,
                   help="sentences (or decoder hypotheses) per batch at most (default 64; "
                        "1: one per onnxruntime call, the unbatched baseline)")
    p.add_argument("--max-batch-tokens", type=_int_arg(1), default=None,
                   help="scored positions per batch at most (default: a batch's logits, or a "
                        "factored model's head and hidden states, <= 64 MiB)")
    p.add_argument("--max-queue", type=_int_arg(1), default=1024,
                   help="sentences waiting at most: a request that would pass it gets 429 "
                        "with Retry-After (one larger than the whole queue is taken when the "
                        "queue is empty) (default 1024)")
    p.add_argument("--max-body-bytes", type=_int_arg(1), default=32 << 20,
                   help="largest request body; past it 413 (default 32 MiB)")
    p.add_argument("--timeout-s", type=_real_arg(0, low_open=True), default=30.0,
                   help="a request not started within this many seconds gets 504 (default 30)")
    p.add_argument("--state-ttl-s", type=_real_arg(0, low_open=True), default=600.0,
                   help="decoder states expire this long after their last use (default 600)")
    p.add_argument("--state-memory-mib", type=_int_arg(1), default=512,
                   help="memory for decoder states, in MiB: past it the least recently used "
                        "state is evicted (default 512)")
    p.add_argument("--ray", nargs="?", const="auto", default=None, metavar="auto|ADDRESS",
                   help="serve on a Ray cluster with Ray Serve (extra lmonnx[ray]): auto = "
                        "RAY_ADDRESS, else a local cluster; or the cluster's address")
    p.add_argument("--replicas", type=_int_arg(1), default=None,
                   help="with --ray: model replicas, each batching its own requests "
                        "(default 1)")
    p.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"),
                   default="warning", help="uvicorn's log level (default warning)")


_SUBCOMMANDS = (  # name, help, whether it runs a model (--model/--providers/--json), arguments
    ("synth", "write a synthetic corpus whose true perplexity is known", False, _arguments_synth),
    ("train", "train a stacked-LSTM word LM on a text corpus (--recipe tied or course)", False,
     _arguments_train),
    ("export", "export a run to one self-describing .onnx (tf2onnx)", False, _arguments_export),
    ("quantize", "int8 form of an exported model, for CPU (dynamic quantization)", False,
     _arguments_quantize),
    ("evaluate", "perplexity and friends of text corpora", True, _arguments_evaluate),
    ("score", "log-probability of sentences (arguments or stdin lines)", True, _arguments_score),
    ("predict", "top-k next words after a prefix", True, _arguments_predict),
    ("generate", "sample text after a prefix by stepping the LSTM state", True,
     _arguments_generate),
    ("rescore", "rescore n-best lists (ASR/OCR): am + alpha * lm + beta * words; tune on WER",
     True, _arguments_rescore),
    ("serve", "score over HTTP, batched across callers (extra lmonnx[serve]; OpenAI-compatible)",
     False, _arguments_serve),
)


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lmonnx",
        description="Stacked-LSTM word LMs: TensorFlow training, one ONNX file, fast exact scoring.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    # --debug is also accepted after the subcommand; SUPPRESS keeps it from resetting the flag
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks for errors")
    model = _model_parent()
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_Parser)
    parser.subcommands = {}  # name -> its parser, so that its own errors name it (main)
    for name, help, runs_model, add_arguments in _SUBCOMMANDS:
        parser.subcommands[name] = sub.add_parser(
            name, help=help, parents=[common, model] if runs_model else [common])
        add_arguments(parser.subcommands[name])
    return parser


def _stages():
    """A progress callback for commands that work for seconds: each stage as a line on
    stderr when stderr is a terminal, else None (logs and pipes get only the result)."""
    if not sys.stderr.isatty():
        return None
    return lambda message: print(f"lmonnx: {message} ...", file=sys.stderr, flush=True)


def _summary_stream(*outputs):
    """stdout for a command's summary or report, stderr when one of its outputs itself goes to
    stdout (``-o /dev/stdout``, ``--per-token -``): the two must not interleave."""
    from lmonnx.atomic import descriptor_of

    to_stdout = any(o is not None and descriptor_of(o) == 1 for o in outputs)
    return sys.stderr if to_stdout else sys.stdout


def _cmd_synth(args) -> None:
    from lmonnx.synth import write_corpus

    kwargs = {k: v for k, v in dict(words=args.words, train_sentences=args.train_sentences,
                                    valid_sentences=args.valid_sentences,
                                    test_sentences=args.test_sentences).items() if v is not None}
    summary = write_corpus(args.out, seed=args.seed, force=args.force, progress=_stages(),
                           **kwargs)
    print(json.dumps(summary, indent=2))


def _add_train_settings(p: argparse.ArgumentParser) -> None:
    """One flag per ``TrainConfig`` field, its help and range from the field (no TensorFlow);
    every default None, so ``_cmd_train`` passes only the flags given."""
    import dataclasses

    from lmonnx.train.config import TrainConfig

    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        bounds = {k: v for k, v in meta["bounds"].items() if k != "choices"}
        if meta["kind"] == "bool":  # --no-pack
            p.add_argument(meta["flag"], dest=f.name, action="store_const", const=not f.default,
                           default=None, help=meta["help"])
            continue
        kind = {"int": _int_arg, "real": _real_arg, "ints": _ints_arg}.get(meta["kind"])
        p.add_argument(meta["flag"], dest=f.name, type=kind and kind(**bounds), default=None,
                       choices=meta["bounds"].get("choices"),
                       metavar=None if kind is None else meta["flag"][2:].upper().replace("-", "_"),
                       help=_setting_help(f))


def _setting_help(f) -> str:
    """A train flag's help with its default: the recipes' own where the recipe decides."""
    from lmonnx.train.config import RECIPES, recipe_defaults

    help = f.metadata["help"]
    if f.name in RECIPES["tied"]:
        return f"{help} (default: {recipe_defaults(f.name)})"
    return help if f.default is None else f"{help} (default: {f.default})"


def _cmd_train(args) -> None:
    import dataclasses

    from lmonnx.train.config import TrainConfig
    from lmonnx.train.trainer import train

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if getattr(args, f.name) is not None}
    train(given, corpus=args.corpus, valid=args.valid, out_dir=args.out, errors=args.errors,
          resume=args.resume, force=args.force)


def _cmd_export(args) -> None:
    from lmonnx.export import export_run

    report = export_run(args.run_dir, args.output, opset=args.opset, force=args.force,
                        quantize=args.quantize, max_change=args.max_change,
                        progress=_stages())
    print(report.summary(), file=_summary_stream(args.output))


def _cmd_quantize(args) -> None:
    from lmonnx.quantize import describe, quantize_file

    bound = {} if args.max_change is None else {"max_change": args.max_change}
    record = quantize_file(args.model, args.output, sample=args.sample, errors=args.errors,
                           force=args.force, progress=_stages(), **bound)
    size = (f" ({args.output.stat().st_size / 1e6:.2f} MB)" if args.output.is_file() else "")
    stream = _summary_stream(args.output)
    print(f"wrote {args.output}{size}", file=stream)
    print(describe(record), file=stream)


def _passive_openmp() -> None:
    """The scoring commands' process: OpenMP workers of the loss kernel sleep between calls
    instead of spinning on the cores onnxruntime uses next.  libgomp reads this once, when
    ``lmonnx._xent`` loads, so it is set before the scoring modules are imported; a value the
    user set wins.  (The library never changes the environment: an application embedding
    ``Scorer`` sets ``OMP_WAIT_POLICY`` itself before importing it, if it wants this.)"""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _progress_bar(path: Path):
    """A tqdm bar over the corpus bytes on stderr, or None when stderr is not a terminal or
    the corpus is stdin."""
    if not sys.stderr.isatty() or str(path) == "-":
        return None
    from tqdm import tqdm

    total = path.stat().st_size if path.is_file() else None  # a pipe has no size
    return tqdm(total=total, unit="B", unit_scale=True, desc=path.name, file=sys.stderr,
                leave=False)


class _CorpusProgress:
    """The library's progress and report callbacks for ``evaluate``: a bar per corpus on a
    terminal, and each corpus's table as soon as it is done (unless ``--json``)."""

    def __init__(self, corpora: list[Path], as_json: bool, stream):
        self.corpora, self.as_json, self.stream = corpora, as_json, stream
        self.index, self.bar = None, None

    def update(self, index: int, nbytes: int) -> None:
        if index != self.index:
            self.close()
            self.index, self.bar = index, _progress_bar(self.corpora[index])
        if self.bar is not None:
            self.bar.update(nbytes)

    def report(self, index: int, report) -> None:
        self.close()
        if not self.as_json:
            print(report.format_table(), end="\n\n", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _print_reports(reports: list, as_json: bool, stream) -> None:
    """``--json``: one report as an object, several as a list; strict JSON (NaN -> null)."""
    if as_json:
        from lmonnx.strict_json import json_text

        payload = [r.to_dict() for r in reports]
        print(json_text(payload[0] if len(payload) == 1 else payload, indent=2), file=stream)


def _cmd_evaluate_ray(args) -> None:
    """``evaluate --ray``: the local command's checks, report and ``--json``, one Ray job per
    corpus (lmonnx.distributed).  Every corpus is checked before Ray starts."""
    from lmonnx.atomic import check_outputs
    from lmonnx.distributed import RayEvaluator, check_sources, sentence_sink

    if args.per_token is not None:
        raise InvalidArgumentError("--per-token is not available with --ray; use --per-sentence")
    corpora = [check_sources(str(corpus), args.errors) for corpus in args.corpus]  # listed once
    check_outputs({"--per-sentence": args.per_sentence},
                  [*(path for sources in corpora for path, _ in sources.files), args.model],
                  force=args.force)
    if not args.debug:  # errors are ours to report, in one line; Ray Data's news is not
        logging.getLogger("ray.data").setLevel(logging.CRITICAL)
    sizes = {k: v for k, v in (("cpus_per_actor", args.cpus_per_actor),
                               ("gpus_per_actor", args.gpus_per_actor)) if v is not None}
    runner = RayEvaluator(args.model, num_actors=args.actors, **sizes, providers=args.providers,
                          num_threads=args.threads, batch_size=args.batch_size,
                          max_tokens=args.max_tokens, address=args.ray)
    reports, stream = [], _summary_stream(args.per_sentence)
    with sentence_sink(args.per_sentence, "--per-sentence") as sink:
        for sources in corpora:
            reports.append(runner.evaluate(sources, errors=args.errors, sink=sink))
            if not args.json:
                print(reports[-1].format_table(), end="\n\n", file=stream, flush=True)
    _print_reports(reports, args.json, stream)


def _mix_weight_arg(value: str | None) -> float | str:
    """``--mix-weight``: a real in [0, 1], or ``auto``; refused in one line naming the flag."""
    if value is None or value == "auto":
        return value or 0.5
    try:
        weight = float(value)
    except ValueError:
        weight = None
    if weight is None or not 0.0 <= weight <= 1.0:  # NaN fails both comparisons
        raise InvalidArgumentError(f"--mix-weight takes a number in [0, 1] or auto, "
                                   f"got {value!r}")
    return weight


def _cmd_evaluate_mixed(args) -> None:
    """``evaluate --mix``: lmonnx, KenLM and their per-token mix on each corpus (lmonnx.mix)."""
    from lmonnx.corpus import check_corpora
    from lmonnx.mix import MixedScorer, load_kenlm
    from lmonnx.scorer import Scorer

    for flag, value in (("--ray", args.ray), ("--per-sentence", args.per_sentence),
                        ("--per-token", args.per_token)):
        if value is not None:
            raise InvalidArgumentError(f"{flag} is not available with --mix")
    weight = _mix_weight_arg(args.mix_weight)
    if (weight == "auto") != (args.mix_fit is not None):
        raise InvalidArgumentError("--mix-weight auto fits L on --mix-fit HELDOUT: give both, "
                                   "or a number without --mix-fit")
    check_corpora([*args.corpus, *([args.mix_fit] if args.mix_fit else [])], args.errors)
    kenlm_model = load_kenlm(args.mix)
    scorer = Scorer(args.model, providers=args.providers, num_threads=args.threads,
                    batch_size=args.batch_size, max_tokens=args.max_tokens)
    mixed = MixedScorer(scorer, kenlm_model, weight, fit_on=args.mix_fit)
    reports = []
    for corpus in args.corpus:
        reports.append(mixed.evaluate(corpus, errors=args.errors))
        if not args.json:
            r = reports[-1]
            print(f"{r.corpus}: {r.sentences} sentences, {r.tokens} tokens (</s> included), "
                  f"L = {r.weight:.4f}{' (fitted on ' + str(args.mix_fit) + ')' if args.mix_fit else ''}\n"
                  f"  lmonnx perplexity  {r.lm_perplexity:.3f}\n"
                  f"  KenLM perplexity   {r.kenlm_perplexity:.3f}"
                  f"{f'  ({r.kenlm_unknown} tokens KenLM does not know: q = 0)' if r.kenlm_unknown else ''}\n"
                  f"  mixed perplexity   {r.mixed_perplexity:.3f}", flush=True)
    _print_reports(reports, args.json, sys.stdout)


def _cmd_evaluate(args) -> None:
    if args.mix is not None:
        return _cmd_evaluate_mixed(args)
    for flag, value in (("--mix-weight", args.mix_weight), ("--mix-fit", args.mix_fit)):
        if value is not None:
            raise InvalidArgumentError(f"{flag} weighs the KenLM mix: it needs --mix KENLM")
    if args.ray is not None:
        return _cmd_evaluate_ray(args)
    for flag, value in (("--actors", args.actors), ("--cpus-per-actor", args.cpus_per_actor),
                        ("--gpus-per-actor", args.gpus_per_actor)):
        if value is not None:
            raise InvalidArgumentError(f"{flag} sizes the Ray actors: it needs --ray")
    from lmonnx.atomic import check_outputs, is_parquet
    from lmonnx.corpus import check_corpora
    from lmonnx.scorer import Scorer

    if args.per_sentence is not None and is_parquet(args.per_sentence):
        raise InvalidArgumentError(f"--per-sentence {args.per_sentence}: Parquet is written "
                                   "with --ray only; locally give a JSON-lines name")
    # Every corpus and output is checked before the model loads: a bad path fails first.
    flags = ("--per-sentence", "--per-token")
    check_outputs(dict(zip(flags, (args.per_sentence, args.per_token))),
                  [*args.corpus, args.model], force=args.force)
    check_corpora(args.corpus, args.errors)
    scorer = Scorer(args.model, providers=args.providers, num_threads=args.threads,
                    batch_size=args.batch_size, max_tokens=args.max_tokens)
    stream = _summary_stream(args.per_sentence, args.per_token)
    progress = _CorpusProgress(args.corpus, args.json, stream)
    try:
        reports = scorer.evaluate_corpora(
            args.corpus, errors=args.errors, per_sentence=args.per_sentence,
            per_token=args.per_token, force=args.force, progress=progress.update,
            on_report=progress.report, flags=flags)
    finally:
        progress.close()
    _print_reports(reports, args.json, stream)


def _stdin_lines(errors: str) -> list[str]:
    """Every line of stdin as cleaned text (blank lines too), decoded like a corpus line:
    errors name ``<stdin>:N``."""
    from lmonnx.corpus import to_line

    return [to_line(i, raw, errors, f"<stdin>:{i}").text
            for i, raw in enumerate(sys.stdin.buffer, 1)]


def _read_cli_sentences(sentences: list[str], errors: str) -> list[str]:
    """The sentences to ``score``: the arguments, or with none (or ``-``) every line of
    stdin.  Each is one sentence, an empty one too (it scores ``</s>`` alone), so the output
    has one line per argument or input line."""
    from lmonnx.corpus import to_line

    if "-" in sentences and len(sentences) > 1:
        raise InvalidArgumentError("- reads the sentences from stdin: give it alone, or only "
                                   "sentences as arguments")
    if sentences and sentences != ["-"]:
        return [to_line(i, s, errors, f"argument {i}").text for i, s in enumerate(sentences, 1)]
    if sys.stdin.isatty() and not sentences:
        raise InvalidArgumentError("give sentences as arguments or pipe them in, one per line")
    lines = _stdin_lines(errors)
    if not lines:
        raise InvalidArgumentError("no sentences on stdin")
    return lines


def _read_cli_prefix(prefix: str, errors: str) -> str:
    """The prefix of ``predict`` / ``generate``: the argument, or with ``-`` all of stdin (its
    lines are one prefix: a prefix too long for an argument list can be piped)."""
    return " ".join(_stdin_lines(errors)) if prefix == "-" else prefix


def _cmd_score(args) -> None:
    from lmonnx.strict_json import json_line
    from lmonnx.scorer import Scorer

    sentences = _read_cli_sentences(args.sentences, args.errors)
    scorer = Scorer(args.model, providers=args.providers)
    for text, score in zip(sentences, scorer.score(sentences)):
        if args.json:
            print(json_line({"sentence": text, "logprob": score.logprob, "tokens": score.tokens,
                             "oovs": score.oovs, "perplexity": score.perplexity}))
        else:
            print(f"{score.logprob:12.4f}  ppl {score.perplexity:10.3f}  {text}")


def _cmd_predict(args) -> None:
    from lmonnx.strict_json import json_line
    from lmonnx.scorer import Scorer

    prefix = _read_cli_prefix(args.prefix, args.errors)
    scorer = Scorer(args.model, providers=args.providers)
    top = scorer.predict_next(prefix, k=args.k)
    if args.json:
        print(json_line([{"word": w, "probability": p} for w, p in top]))
    else:
        for word, prob in top:
            print(f"{prob:8.4f}  {word}")


def _cmd_generate(args) -> None:
    from lmonnx.strict_json import json_line
    from lmonnx.scorer import Scorer

    prefix = _read_cli_prefix(args.prefix, args.errors)
    scorer = Scorer(args.model, providers=args.providers)
    words = scorer.generate(prefix, words=args.words, temperature=args.temperature,
                            top_k=args.top_k, seed=args.seed)
    if args.json:
        print(json_line({"prefix": prefix, "words": words,
                         "ended": bool(words) and words[-1] == "</s>"}))
    else:
        print(" ".join(w for w in [prefix.strip(), *words] if w))


def _check_rescore_flags(args) -> None:
    """The flags of ``rescore`` that only make sense with another one."""
    if args.tune and args.references is None:
        raise InvalidArgumentError("--tune chooses alpha and beta by WER: it needs "
                                   "--references REFS")
    if args.tune and (args.alpha is not None or args.beta is not None):
        raise InvalidArgumentError("--tune chooses alpha and beta: drop --alpha and --beta "
                                   "(a one-value --alpha-grid or --beta-grid fixes one)")
    for flag, value in (("--alpha-grid", args.alpha_grid), ("--beta-grid", args.beta_grid)):
        if value is not None and not args.tune:
            raise InvalidArgumentError(f"{flag} is the grid of --tune: it needs --tune")
    if args.mix_weight is not None and args.mix is None:
        raise InvalidArgumentError("--mix-weight weighs the KenLM mix: it needs --mix KENLM")


def _rescore_model(args):
    """``rescore``'s LM: the Scorer, or with --mix the MixedScorer (KenLM loaded first)."""
    from lmonnx.scorer import Scorer

    kenlm_model = None
    if args.mix is not None:
        from lmonnx.mix import load_kenlm
        kenlm_model = load_kenlm(args.mix)
    scorer = Scorer(args.model, providers=args.providers, num_threads=args.threads,
                    batch_size=args.batch_size)
    if kenlm_model is None:
        return scorer
    from lmonnx.mix import MixedScorer
    return MixedScorer(scorer, kenlm_model, 0.5 if args.mix_weight is None else args.mix_weight)


def _print_rescore_summary(args, summary: dict, tuned, stream) -> None:
    """WERs (and --tune's table) as text, or everything as one JSON object with --json."""
    from lmonnx.strict_json import json_text

    if args.json:
        payload = {**summary, "tune": None if tuned is None else tuned.to_dict()}
        print(json_text(payload, indent=2), file=stream)
        return
    if tuned is not None:
        print(f"tuned on {len(tuned.rows)} settings; the best {min(10, len(tuned.rows))}:",
              file=stream)
        print(tuned.format_table(10), file=stream)
    if summary.get("wer") is not None:
        print(f"first-pass WER {summary['first_pass_wer'] * 100:.2f}% (the highest am score)\n"
              f"rescored WER   {summary['wer'] * 100:.2f}% (alpha {summary['alpha']:g}, beta "
              f"{summary['beta']:g}{', tuned' if tuned else ''})", file=stream)


def _cmd_rescore(args) -> None:
    """``rescore``: every input, flag and output checked, then the n-best read, before the
    model loads; the LM runs once, even for --tune (lmonnx.rescore)."""
    import contextlib

    from lmonnx import rescore
    from lmonnx.atomic import check_outputs, output_file
    from lmonnx.corpus import check_corpora

    _check_rescore_flags(args)
    check_corpora([p for p in (args.nbest, args.references) if p is not None], args.errors)
    inputs = [p for p in (args.nbest, args.references, args.model, args.mix) if p is not None]
    check_outputs({"-o": args.output}, inputs, force=args.force)
    format = rescore.nbest_format(args.nbest, args.format)
    utterances = rescore.read_nbest(args.nbest, beam_size=args.beam_size, format=format,
                                    errors=args.errors)
    summary = {"utterances": len(utterances),
               "hypotheses": sum(len(u.hypotheses) for u in utterances)}
    references = None
    if args.references is not None:  # read and jiwer checked before the model loads
        references = rescore.read_references(args.references, args.errors)
        if len(references) != len(utterances):
            raise InvalidArgumentError(f"--references {args.references}: {len(references)} "
                                       f"references for {len(utterances)} utterances in "
                                       f"{args.nbest}")
        summary["first_pass_wer"] = rescore.word_error_rate(references, [
            u.hypotheses[i] for u, i in zip(utterances, rescore.first_pass(utterances))])
    lm = rescore.lm_scores(_rescore_model(args), utterances)
    alpha = rescore.DEFAULT_ALPHA if args.alpha is None else args.alpha
    beta = rescore.DEFAULT_BETA if args.beta is None else args.beta
    tuned = None
    if args.tune:
        tuned = rescore.tune(utterances, lm, references,
                             args.alpha_grid or rescore.DEFAULT_ALPHAS,
                             args.beta_grid or rescore.DEFAULT_BETAS)
        alpha, beta = tuned.best.alpha, tuned.best.beta
    summary.update(alpha=alpha, beta=beta)
    if references is not None:
        summary["wer"] = rescore.word_error_rate(references, [
            u.hypotheses[i] for u, i in zip(utterances, rescore.rescore(utterances, lm,
                                                                        alpha, beta))])
    target = (contextlib.nullcontext(sys.stdout) if args.output is None
              else output_file(args.output, "-o"))
    with target as out:
        for line in rescore.output_lines(utterances, lm, alpha, beta, format=format,
                                         all_hypotheses=args.all_hypotheses):
            out.write(line + "\n")
    if references is not None or args.json:
        _print_rescore_summary(args, summary, tuned, _summary_stream(args.output or "-"))


def _cmd_serve(args) -> int | None:
    if args.replicas is not None and args.ray is None:
        raise InvalidArgumentError("--replicas needs --ray (one process serves one model "
                                   "replica; see the README's deployment notes)")
    if args.name is not None and not args.name.strip():
        raise InvalidArgumentError("--name must not be empty (it is the model's id in /v1/models)")
    service_options = dict(
        name=args.name or args.model.stem, max_wait_ms=args.max_wait_ms,
        max_batch_sentences=args.max_batch_sentences, max_batch_tokens=args.max_batch_tokens,
        max_queue=args.max_queue, timeout_s=args.timeout_s, state_ttl_s=args.state_ttl_s,
        state_max_bytes=args.state_memory_mib << 20)
    if args.ray is not None:
        return _serve_on_ray(args, service_options)
    try:
        from lmonnx.serve.app import DrainingServer, build_app, listening_socket
    except ImportError as exc:
        raise MissingDependencyError("lmonnx serve needs the extra 'lmonnx[serve]' (pip install "
                                     f"'lmonnx[cpu,serve]'): {exc}") from None
    import signal

    sock = listening_socket(args.host, args.port)  # a port in use fails before the model loads
    app = build_app(args.model, providers=args.providers, threads=args.threads,
                    max_body_bytes=args.max_body_bytes, **service_options)
    service = app.state.service

    def announce(server) -> None:
        print(f"lmonnx: serving {args.model} ({service.scorer.provider}, vocabulary "
              f"{len(service.vocab)}) on http://{args.host}:{sock.getsockname()[1]}",
              file=sys.stderr, flush=True)

    server = DrainingServer(app, sock, log_level=args.log_level, on_ready=announce)

    def on_signal(signum, frame) -> None:
        # The first SIGINT / SIGTERM drains (exit 0); a second stops at once (exit 130).
        if server.draining:
            server.stop_now()
        else:
            server.drain()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        drained = server.run_until_stopped()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if drained:
        print("lmonnx: drained and stopped", file=sys.stderr)
        return 0
    print("lmonnx: stopped at a second signal: requests still running were cut off",
          file=sys.stderr, flush=True)
    # At once, not through the interpreter's shutdown: the compute thread may be inside
    # onnxruntime, and tearing the runtime down under it aborts the process (status 134).
    sys.stdout.flush()
    os._exit(130)


def _serve_on_ray(args, service_options: dict) -> int:
    """``serve --ray``: deploy, say the URL, serve until SIGINT/SIGTERM; then delete the app
    (Ray Serve drains it: accepted requests are answered), stop what this process started,
    and exit 0."""
    import signal
    import threading

    from lmonnx.serve.ray_deployment import RayServer

    replicas = args.replicas or 1
    server = RayServer(args.model, address=args.ray, replicas=replicas, host=args.host,
                       port=args.port, providers=args.providers, threads=args.threads,
                       max_body_bytes=args.max_body_bytes, service_options=service_options)
    stop, previous = threading.Event(), {}
    try:
        server.connect()
        # After ray.init, which installs its own SIGTERM handler (it would end the process at
        # once, exit status 15).
        previous = {sig: signal.signal(sig, lambda *_: stop.set())
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        url = server.deploy()
        print(f"lmonnx: serving {args.model} on {url} (Ray Serve, {replicas} "
              f"{'replica' if replicas == 1 else 'replicas'})", file=sys.stderr, flush=True)
        while not stop.wait(0.5):
            pass
        server.close()  # a second signal meanwhile changes nothing: the drain goes on
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.close()  # after an error too (twice is fine)
    print("lmonnx: drained and stopped", file=sys.stderr, flush=True)
    return 0


# The commands that load the loss kernel (scoring): OpenMP's wait policy is set for them
# once, in main, before any of them imports it (:func:`_passive_openmp`).
SCORING_COMMANDS = {"evaluate", "score", "predict", "generate", "rescore", "serve"}

COMMANDS = {"synth": _cmd_synth, "train": _cmd_train, "export": _cmd_export,
            "quantize": _cmd_quantize,
            "evaluate": _cmd_evaluate, "score": _cmd_score, "predict": _cmd_predict,
            "generate": _cmd_generate, "rescore": _cmd_rescore, "serve": _cmd_serve}


class _MessageHandler(logging.Handler):
    """The library's notices (logger ``lmonnx``, INFO and up) as plain lines on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(record.getMessage(), file=sys.stderr, flush=True)
        except Exception:  # a closed stderr must not turn a notice into a crash
            self.handleError(record)


def _show_library_messages() -> None:
    logger = logging.getLogger("lmonnx")
    if not any(isinstance(h, _MessageHandler) for h in logger.handlers):
        logger.addHandler(_MessageHandler())
    logger.setLevel(logging.INFO)
    logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # said by the subcommand's parser, which points at its own --help
        parser.subcommands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    _show_library_messages()
    if args.command in SCORING_COMMANDS:
        _passive_openmp()
    try:
        status = COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("lmonnx: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`lmonnx score ... | head`): stop quietly, as Unix tools do.
        # Point stdout at /dev/null so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (LmonnxError, OSError) as exc:
        if args.debug:
            raise
        message = first_line(exc)
        if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in message:
            message = f"{message}: {exc.filename}"
        print(f"lmonnx: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
