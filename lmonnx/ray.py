"""Corpus evaluation on a Ray cluster (Ray Data): the local numbers, beyond one machine.

    files ─read tasks─> chunks: 4096 consecutive sentences of one file (corpus, line, text,
                        nbytes), through lmonnx.corpus; one read task streams one file
          ─actor pool─> one row per sentence (corpus, line, tokens, oovs, nll, perplexity,
                        hits, oov_nll, oov_hits, nbytes) + chunk counters on its first row;
                        each actor: one ModelSession, ExampleBuilder, Evaluator.scored
          ─driver─────> sums of the rows ─> report_from_totals ─> EvaluationReport
                        (optional) the per-sentence rows, in input order ─> Parquet / JSON lines

    report = lmonnx.ray.evaluate("corpus/*.txt", "model.onnx", num_actors=8, cpus_per_actor=2)
    lmonnx evaluate corpus/ --model model.onnx --ray auto --per-sentence scores.parquet

**One code path.**  Read tasks cut a file into lines exactly as a local read does (at
``\n`` only, numbered from 1 with blank lines counted) and hand them to
:func:`lmonnx.corpus.sentences_of_lines` (decoding, BOM, CR, strip, ``--errors``, messages that
name ``file:line``).  Actors build examples with :class:`lmonnx.examples.ExampleBuilder` and
score them with :class:`lmonnx.evaluate.Evaluator` (buckets, token budget, windows for long
lines, the kernel).  A chunk is what the local evaluator's look-ahead holds (4096 sentences
of one file), so an actor forms the batches local evaluation forms and every per-sentence
number is bit-for-bit the local one.  Chunks travel as single rows, which Ray never cuts.  The
report comes from :func:`lmonnx.evaluate.report_from_totals`, the arithmetic of
``Evaluator.report``.  ``ray.data.read_text`` is not used: it decodes a whole file at once (an
undecodable byte fails without a line number), splits at ``\r`` and other Unicode line
breaks, and keeps no line numbers.

**Exact totals.**  Actors keep no counters: a chunk becomes one row per sentence, and the
driver sums the rows of the dataset as they arrive, in input order, as ``Evaluator`` adds
them.  A task that is retried (an actor that died, a lost node) replaces its output instead of
adding to it, so nothing is counted twice or lost.  Chunk-level counters (padded positions,
actor seconds, the provider) ride on the first row of each chunk and are summed the same way.

**The model** travels as bytes through Ray's object store (``ray.put`` once, fetched by each
actor when it starts): no shared file system needed.  ``model_is_shared=True`` sends the path
instead, for a file every node can read.  Each actor opens it once: one ``ModelSession`` (as
every lmonnx session: spinning off, the provider policy, the format checks) whose intra-op
threads equal its CPUs (rounded up).

Ray is optional (``pip install 'lmonnx[ray]'``): this module imports without it, and its
functions say which extra to install.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Iterable, Iterator

import numpy as np

from lmonnx.errors import InvalidArgumentError, MissingDependencyError
from lmonnx.validation import check_int
from lmonnx.atomic import atomic_path, check_output, output_file
from lmonnx.corpus import CorpusError, Line, check_errors, sentences_of_lines, to_line
from lmonnx.evaluate import (DEFAULT_BATCH_SIZE, LOOKAHEAD, EvaluationReport, Evaluator,
                             SentenceResult, SentenceWriter, Totals)
from lmonnx.examples import ExampleBuilder

try:
    import pyarrow as pa
    import ray
    import ray.data
    from ray.data.datasource import FileBasedDatasource
except ImportError as exc:  # everything else in lmonnx works without Ray
    ray = pa = None
    FileBasedDatasource = object
    _MISSING = f"{exc}"
else:
    _MISSING = ""

__all__ = ["evaluate", "RayEvaluator", "connect", "sentence_sink", "DEFAULT_LINES_PER_BATCH",
           "READ_CPUS"]

DEFAULT_LINES_PER_BATCH = LOOKAHEAD
"""Sentences per actor call: the unit of work and of retry.  Equal to the local evaluator's
look-ahead (4096), so that an actor buckets a file's sentences as local evaluation does."""

READ_CPUS = 0.25
"""CPUs reserved by a read task.  Reading and decoding cost well under 1% of scoring, and a
full CPU per read task would leave 2-CPU nodes too few for the actors (a read task and two
1-CPU actors deadlock on 2 CPUs)."""

SENTENCE_COLUMNS = ("corpus", "line", "tokens", "oovs", "nll", "perplexity", "hits")
"""Per-sentence output: the keys of the local ``--per-sentence`` JSON lines, in their order."""

_SUM_COLUMNS = ("tokens", "oovs", "nll", "oov_nll", "hits", "oov_hits", "nbytes",
                "real_positions", "computed_positions", "actor_seconds")


def _require_ray() -> None:
    if ray is None:
        raise MissingDependencyError("evaluating on Ray needs Ray Data: install the extra 'lmonnx[ray]' "
                          f"({_MISSING})")


# ---- reading: exact lines, numbered as a local read numbers them -----------------------------

def _raw_lines(pieces: Iterable[bytes]) -> Iterator[bytes]:
    """The lines of a byte stream given in pieces, split at ``\\n`` only (as iterating a file
    opened in binary splits them; the break itself is dropped, ``to_line`` would drop it).
    A last line without a break is a line; a final break starts none.  A line spanning many
    pieces is joined once (no quadratic copying)."""
    pending: list[bytes] = []
    for piece in pieces:
        parts = piece.split(b"\n")
        if len(parts) == 1:
            pending.append(piece)
            continue
        pending.append(parts[0])
        yield b"".join(pending)
        yield from parts[1:-1]
        pending = [parts[-1]] if parts[-1] else []
    if pending:
        last = b"".join(pending)
        if last:
            yield last


def _pieces(f, size: int = 1 << 20) -> Iterator[bytes]:
    while True:
        data = f.read(size)
        if not data:
            return
        yield bytes(data)


def _chunk_table(chunks: list[list[tuple]]) -> "pa.Table":
    """One row per chunk of sentences: ``corpus``, and the lists ``line``, ``text``,
    ``nbytes`` of its sentences.  A chunk is the unit an actor scores; rows, unlike blocks,
    are never cut by Ray, so a chunk stays what the reader made it."""
    columns = {"corpus": [], "line": [], "text": [], "nbytes": []}
    for rows in chunks:
        corpus, line, text, nbytes = zip(*rows)
        columns["corpus"].append(corpus[0])
        columns["line"].append(line)
        columns["text"].append(text)
        columns["nbytes"].append(nbytes)
    return pa.table({"corpus": pa.array(columns["corpus"], pa.string()),
                     "line": pa.array(columns["line"], pa.list_(pa.int64())),
                     "text": pa.array(columns["text"], pa.list_(pa.string())),
                     "nbytes": pa.array(columns["nbytes"], pa.list_(pa.int64()))})


def _chunks_of(rows: Iterable[tuple], size: int) -> Iterator[list[tuple]]:
    """Consecutive runs of ``size`` rows ``(corpus, line, text, nbytes)``, a new run at each
    new corpus (the last of each shorter)."""
    chunk: list[tuple] = []
    for row in rows:
        if len(chunk) >= size or (chunk and chunk[0][0] != row[0]):
            yield chunk
            chunk = []
        chunk.append(row)
    if chunk:
        yield chunk


class _LinesDatasource(FileBasedDatasource):
    """Text files as chunks of ``lines_per_batch`` sentences (non-empty lines), read through
    :func:`lmonnx.corpus.sentences_of_lines`: the look-ahead chunks of local evaluation.  A
    file is streamed by one read task in 1 MiB pieces, so its line numbers are exact and its
    memory is one chunk (and the longest line)."""

    def __init__(self, paths: list[str], *, names: dict[str, str], errors: str,
                 lines_per_batch: int, **kwargs):
        super().__init__(paths, **kwargs)
        self._names = names
        self._errors = errors
        self._lines_per_batch = lines_per_batch

    def _read_stream(self, f, path: str):
        name = self._names.get(path) or self._names.get(os.path.abspath(path)) or path
        lines = sentences_of_lines(_raw_lines(_pieces(f)), self._errors, name)
        rows = ((name, ln.key, ln.text, ln.nbytes) for ln in lines)
        for chunk in _chunks_of(rows, self._lines_per_batch):
            yield _chunk_table([chunk])


def _dataset_chunks(batch: "pa.Table", *, errors: str, corpus: str,
                    lines_per_batch: int) -> "pa.Table":
    """An existing dataset's rows as chunks of sentences: ``text`` (str or bytes) through
    :func:`lmonnx.corpus.to_line`, blank ones dropped.  Optional columns: ``line`` (kept as
    the line number; else null) and ``path`` (the corpus name)."""
    names = batch.column_names
    texts = batch.column("text").to_pylist()
    keys = batch.column("line").to_pylist() if "line" in names else [None] * len(texts)
    paths = batch.column("path").to_pylist() if "path" in names else [corpus] * len(texts)
    rows = []
    for text, key, path in zip(texts, keys, paths):
        if text is None:
            continue
        where = f"{path}:{key}" if key is not None else f"{path} (a row of text {text[:40]!r})"
        line = to_line(key, text, errors, where)
        if line.text:
            rows.append((path, key, line.text, line.nbytes))
    chunks = list(_chunks_of(rows, lines_per_batch))
    if not chunks:
        return _chunk_table([[(corpus, 0, "", 0)]]).slice(0, 0)
    return _chunk_table(chunks)


# ---- scoring: a pool of actors, each with one onnxruntime session ----------------------------

def _crash_once(marker: str) -> None:
    """The fault-injection hook of the tests: the first actor call that creates ``marker``
    (a path every actor can see) kills its process without any cleanup, as a lost node would."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, f"{os.getpid()}\n".encode())
    os.close(fd)
    os._exit(17)


class _LineScorer:
    """A Ray Data actor: one model session; scores chunks of sentences (see _chunk_table)."""

    def __init__(self, model, *, name: str, providers: str, num_threads: int, batch_size: int,
                 max_tokens: int | None, crash_marker: str | None = None):
        from lmonnx.runtime import ModelSession

        if isinstance(model, list):  # [ObjectRef]: the model's bytes in the object store
            model = ray.get(model[0])
        self.session = ModelSession(model, providers=providers, num_threads=num_threads,
                                    name=name)
        self.builder = ExampleBuilder(self.session.vocab)
        self.settings = dict(batch_size=batch_size, max_tokens=max_tokens,
                             num_threads=num_threads)
        self.crash_marker = crash_marker
        self.calls = 0

    def __call__(self, batch: "pa.Table") -> Iterator["pa.Table"]:
        """Score each chunk (row) of ``batch``: one output row per sentence."""
        for row in batch.to_pylist():
            self.calls += 1
            yield self._score(row)

    def _score(self, chunk: dict) -> "pa.Table":
        texts, nbytes = chunk["text"], chunk["nbytes"]
        evaluator = Evaluator(self.session, corpus="<ray chunk>", **self.settings)
        lines = (Line(i, text, n) for i, (text, n) in enumerate(zip(texts, nbytes)))
        n = len(texts)
        ints = {k: np.zeros(n, np.int64) for k in ("tokens", "oovs", "hits", "oov_hits")}
        floats = {k: np.zeros(n, np.float64) for k in ("nll", "oov_nll", "perplexity")}
        count = 0
        for example, result in evaluator.scored(self.builder.build_all(lines)):
            i = example.key  # results come in input order: i == count
            ints["tokens"][i], ints["oovs"][i] = result.tokens, result.oovs
            ints["hits"][i], ints["oov_hits"][i] = result.hits, result.oov_hits
            floats["nll"][i], floats["oov_nll"][i] = result.nll, result.oov_nll
            floats["perplexity"][i] = result.perplexity
            count += 1
        if count != n:
            raise RuntimeError(f"scored {count} of {n} sentences")  # cannot happen: no blanks
        if self.crash_marker and self.calls > 1:
            _crash_once(self.crash_marker)  # mid-run: this chunk's rows are never returned
        # Chunk-level counters ride on the chunk's first row (0 on the others).
        first = np.zeros(n, np.int64)
        real, computed = first.copy(), first.copy()
        real[:1] = evaluator.totals.real_positions
        computed[:1] = evaluator.totals.computed_positions
        seconds = np.zeros(n, np.float64)
        seconds[:1] = evaluator.seconds
        provider = [""] * n
        provider[:1] = [self.session.provider_description]
        return pa.table({
            "corpus": pa.array([chunk["corpus"]] * n, pa.string()),
            "line": pa.array(chunk["line"], pa.int64()),
            "tokens": ints["tokens"], "oovs": ints["oovs"], "nll": floats["nll"],
            "perplexity": floats["perplexity"], "hits": ints["hits"],
            "oov_nll": floats["oov_nll"], "oov_hits": ints["oov_hits"],
            "nbytes": np.asarray(nbytes, np.int64), "real_positions": real,
            "computed_positions": computed, "actor_seconds": seconds,
            "provider": pa.array(provider, pa.string())})


# ---- the driver: sums of rows, per-sentence output -------------------------------------------

@dataclass
class _Totals:
    sentences: int = 0
    sums: dict = field(default_factory=lambda: dict.fromkeys(_SUM_COLUMNS, 0))
    providers: list = field(default_factory=list)

    def add(self, table: "pa.Table") -> None:
        self.sentences += table.num_rows
        for key in _SUM_COLUMNS:
            column = table.column(key).to_numpy()
            if column.dtype.kind == "f":  # one by one, in input order, as Evaluator adds
                total = np.add.accumulate(np.concatenate([[self.sums[key]], column]))[-1]
                self.sums[key] = float(total)
            else:
                self.sums[key] += int(column.sum(dtype=np.int64))
        for provider in table.column("provider").to_pylist():
            if provider and provider not in self.providers:
                self.providers.append(provider)

    def report(self, corpus: str, seconds: float) -> EvaluationReport:
        s = self.sums
        return Totals(
            sentences=self.sentences,
            tokens=s["tokens"], oovs=s["oovs"], nll=s["nll"], oov_nll=s["oov_nll"],
            hits=s["hits"], oov_hits=s["oov_hits"], bytes=s["nbytes"],
            real_positions=s["real_positions"], computed_positions=s["computed_positions"],
        ).report(corpus, ", ".join(self.providers) or "-", seconds)


def _sentence_schema() -> "pa.Schema":
    return pa.schema([("corpus", pa.string()), ("line", pa.int64()), ("tokens", pa.int64()),
                      ("oovs", pa.int64()), ("nll", pa.float64()), ("perplexity", pa.float64()),
                      ("hits", pa.int64())])


class _ParquetSink:
    """Per-sentence rows as one Parquet file (the local ``--per-sentence`` columns)."""

    def __init__(self, file):
        import pyarrow.parquet as pq

        self.schema = _sentence_schema()
        self.writer = pq.ParquetWriter(file, self.schema)

    def write(self, table: "pa.Table") -> None:
        self.writer.write_table(table.select(list(SENTENCE_COLUMNS)).cast(self.schema))

    def close(self) -> None:
        self.writer.close()


class _JsonSink:
    """Per-sentence rows as the local ``--per-sentence`` JSON lines, by the same writer."""

    def __init__(self, file):
        self.writer = SentenceWriter(file)

    def write(self, table: "pa.Table") -> None:
        columns = {k: table.column(k).to_pylist()
                   for k in ("corpus", "line", "tokens", "oovs", "nll", "oov_nll", "hits",
                             "oov_hits")}
        for corpus, line, tokens, oovs, nll, oov_nll, hits, oov_hits in zip(*columns.values()):
            result = SentenceResult(key=line, tokens=tokens, oovs=oovs, logprob=-nll,
                                    oov_nll=oov_nll, hits=hits, oov_hits=oov_hits)
            self.writer.write(corpus, SimpleNamespace(key=line), result)

    def close(self) -> None:
        pass


def is_parquet(path) -> bool:
    return Path(path).suffix.lower() in (".parquet", ".pq")


@contextlib.contextmanager
def sentence_sink(target, flag: str = "per_sentence"):
    """A per-sentence sink for ``target``: a path ending in ``.parquet`` (Parquet), another
    path (JSON lines, as local evaluation writes them) or an open text file (JSON lines).
    A regular file is written to a temp file that replaces it only when the block succeeds."""
    if target is None:
        yield None
        return
    if hasattr(target, "write"):
        sink = _JsonSink(target)
        yield sink
        return
    if not is_parquet(target):
        with output_file(target, flag) as f:
            yield _JsonSink(f)
        return
    path = Path(target)
    if path.exists() and not path.is_file():  # a FIFO or /dev/stdout: written directly
        with open(path, "wb") as f:
            sink = _ParquetSink(f)
            yield sink
            sink.close()
        return
    with atomic_path(Path(os.path.realpath(path)), suffix=".parquet") as tmp:
        sink = _ParquetSink(str(tmp))
        try:
            yield sink
        finally:
            sink.close()


# ---- inputs ----------------------------------------------------------------------------------

def _is_uri(path: str) -> bool:
    return "://" in path


def _local_files(source: str) -> list[tuple[str, str]]:
    """``(absolute path, corpus name)`` of a local file, directory (its files, recursively,
    sorted; names starting with ``.`` or ``_`` skipped, as Ray Data skips them) or glob."""
    if source == "-":
        raise CorpusError("-: Ray reads files, not stdin; save the input to a file first")
    if os.path.isfile(source):
        return [(os.path.abspath(source), source)]
    if os.path.isdir(source):
        found = []
        for root, dirs, files in os.walk(source):
            dirs[:] = sorted(d for d in dirs if not d.startswith((".", "_")))
            found += [os.path.join(root, f) for f in sorted(files)
                      if not f.startswith((".", "_"))]
        if not found:
            raise CorpusError(f"{source}: a directory without files")
        return [(os.path.abspath(f), f) for f in found]
    if glob.has_magic(source):
        found = sorted(f for f in glob.glob(source, recursive=True) if os.path.isfile(f))
        if not found:
            raise CorpusError(f"{source}: no file matches")
        return [(os.path.abspath(f), f) for f in found]
    if os.path.exists(source):
        raise CorpusError(f"{source}: not a regular file")
    raise CorpusError(f"{source}: no such file")


def _resolve(sources) -> tuple[list[str], dict[str, str], str]:
    """Files to read, the corpus name of each, and the report's corpus label."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    sources = [os.fspath(s) for s in sources]
    if not sources:
        raise InvalidArgumentError("no corpus given")
    paths, names = [], {}
    for source in sources:
        pairs = [(source, source)] if _is_uri(source) else _local_files(source)
        for path, name in pairs:
            if path not in names:
                paths.append(path)
                names[path] = name
    return paths, names, ", ".join(sources)


def _cause(exc: BaseException) -> BaseException:
    """The user's error inside Ray's wrappers (a task's exception comes back wrapped in a
    ``RayTaskError`` with a traceback in its message, itself maybe wrapped by Ray Data)."""
    from lmonnx.artifact import ArtifactError
    from lmonnx.errors import InferenceError, ProviderError

    ours = (CorpusError, ArtifactError, InferenceError, ProviderError)
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        cause = getattr(e, "cause", None)
        if isinstance(e, ray.exceptions.RayError) and isinstance(cause, BaseException):
            todo.insert(0, cause)
            continue
        if isinstance(e, ours):
            return e
        todo += [cause if isinstance(cause, BaseException) else None, e.__cause__,
                 e.__context__]
    return exc


# ---- the public API --------------------------------------------------------------------------

def connect(address: str | None = "auto", **init_kwargs) -> None:
    """Join a Ray cluster unless this process already has: ``"auto"`` (or None) the one in
    ``RAY_ADDRESS``, else one started on this machine (``ray start``), else a new local one;
    any other value is a cluster address (``head:6379``, ``ray://head:10001``)."""
    _require_ray()
    if ray.is_initialized():
        return
    kwargs = dict(include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    kwargs.update(init_kwargs)
    ray.init(address=None if address in (None, "auto") else address, **kwargs)


class RayEvaluator:
    """Evaluates corpora on a Ray cluster with one model; each :meth:`evaluate` is one Ray
    Data job (read tasks, a pool of ``num_actors`` scoring actors) and returns the
    :class:`EvaluationReport` local evaluation gives.

    ``model``: a path or the model's bytes; checked here, on the driver, so a foreign file
    fails at once in one line.  ``num_actors`` (None: as many as the cluster's CPUs, and GPUs
    when ``gpus_per_actor`` > 0, allow next to a read task), ``cpus_per_actor`` (fractions
    are fine; onnxruntime gets that many intra-op threads, rounded up, unless ``num_threads``
    says otherwise), ``gpus_per_actor``; ``providers``, ``batch_size``, ``max_tokens`` as in
    local evaluation; ``lines_per_batch`` sentences per actor call.
    """

    def __init__(self, model, *, num_actors: int | None = None, cpus_per_actor: float = 1.0,
                 gpus_per_actor: float = 0, providers: str = "auto",
                 num_threads: int | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                 max_tokens: int | None = None,
                 lines_per_batch: int = DEFAULT_LINES_PER_BATCH, model_is_shared: bool = False,
                 address: str | None = "auto", progress: bool | None = None,
                 log_errors: bool = True, _crash_marker: str | None = None):
        _require_ray()
        from lmonnx.runtime import ModelSession

        if num_actors is not None:
            num_actors = check_int("num_actors", num_actors)
        for what, value, low in (("cpus_per_actor", cpus_per_actor, 0.0),
                                 ("gpus_per_actor", gpus_per_actor, -1e-12)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= low:
                raise InvalidArgumentError(f"{what} must be a {'positive' if low == 0 else 'non-negative'}"
                                 f" number, got {value!r}")
        self.cpus_per_actor = float(cpus_per_actor)
        self.gpus_per_actor = float(gpus_per_actor)
        self.num_threads = (check_int("num_threads", num_threads) if num_threads
                            is not None else max(1, math.ceil(self.cpus_per_actor - 1e-9)))
        self.batch_size = check_int("batch size", batch_size)
        self.max_tokens = None if max_tokens is None else check_int("max tokens",
                                                                             max_tokens)
        self.lines_per_batch = check_int("lines_per_batch", lines_per_batch)
        self.providers = providers
        self.progress = sys.stderr.isatty() if progress is None else bool(progress)
        self.log_errors = log_errors
        self._crash_marker = _crash_marker
        # The driver checks the model before any cluster work: a missing or foreign file
        # fails here, in one line, with the local message.
        if isinstance(model, (bytes, bytearray)):
            data, self.model_name = bytes(model), "<model bytes>"
            if model_is_shared:
                raise InvalidArgumentError("model_is_shared needs a path, not bytes")
            ModelSession(data, providers="cpu", num_threads=1)
        else:
            self.model_name = os.fspath(model)
            ModelSession(self.model_name, providers="cpu", num_threads=1)
            data = None if model_is_shared else Path(self.model_name).read_bytes()
        connect(address)
        if model_is_shared:
            self._model = os.path.abspath(self.model_name)
        else:
            self._model = [ray.put(data)]  # in a list: the actor fetches it, Ray keeps it alive
        self.num_actors = num_actors or self._default_actors()
        self._check_fits()

    def _check_fits(self) -> None:
        """Ray waits forever for resources that never come: say so now, in one line."""
        resources = ray.cluster_resources()
        cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
        need_cpus = self.num_actors * self.cpus_per_actor + READ_CPUS
        if need_cpus > cpus + 1e-9:
            raise InvalidArgumentError(
                f"{self.num_actors} actor(s) x {self.cpus_per_actor:g} CPU plus {READ_CPUS:g} "
                f"for reading need {need_cpus:g} CPUs, the cluster has {cpus:g}; lower "
                "--actors or --cpus-per-actor (fractions allowed)")
        need_gpus = self.num_actors * self.gpus_per_actor
        if need_gpus > gpus + 1e-9:
            raise InvalidArgumentError(f"{self.num_actors} actor(s) x {self.gpus_per_actor:g} GPU need "
                             f"{need_gpus:g} GPUs, the cluster has {gpus:g}")

    def _default_actors(self) -> int:
        resources = ray.cluster_resources()
        count = (resources.get("CPU", 1.0) - READ_CPUS) / self.cpus_per_actor
        if self.gpus_per_actor > 0:
            count = min(count, resources.get("GPU", 0.0) / self.gpus_per_actor)
        return max(1, int(count + 1e-9))

    def _dataset(self, source, errors: str, corpus: str | None):
        """Chunks of sentences (see :func:`_chunk_table`), the report's corpus label, and the
        bytes to read (None when unknown)."""
        blocks = 4 * self.num_actors  # Ray splits blocks by rows: whole chunks, spread out
        if isinstance(source, ray.data.Dataset):
            if "text" not in source.schema().names:
                raise InvalidArgumentError("a dataset to evaluate needs a 'text' column (str or bytes; "
                                 "optional 'line' and 'path' columns)")
            label = corpus or "<dataset>"
            chunks = source.map_batches(
                _dataset_chunks, batch_format="pyarrow", batch_size=self.lines_per_batch,
                fn_kwargs=dict(errors=errors, corpus=label,
                               lines_per_batch=self.lines_per_batch),
                num_cpus=READ_CPUS)
            return chunks, label, None
        paths, names, label = _resolve(source)
        datasource = _LinesDatasource(paths, names=names, errors=errors,
                                      lines_per_batch=self.lines_per_batch)
        size = sum(os.path.getsize(p) for p in paths if os.path.isfile(p)) or None
        return (ray.data.read_datasource(datasource, num_cpus=READ_CPUS,
                                         override_num_blocks=max(blocks, len(paths))),
                corpus or label, size)

    def evaluate(self, source, *, corpus: str | None = None, errors: str = "strict",
                 sink=None) -> EvaluationReport:
        """Evaluate ``source`` (paths, globs, directories, URIs Ray can read, or a Ray
        Dataset with a ``text`` column) as one corpus; ``sink``: from :func:`sentence_sink`."""
        check_errors(errors)
        context = ray.data.DataContext.get_current()
        saved = (context.execution_options.preserve_order, context.enable_progress_bars,
                 context.print_on_execution_start)
        context.execution_options.preserve_order = True  # per-sentence rows in input order
        # Progress is ours: one bar over the corpus bytes, as local evaluation shows it.
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        totals = _Totals()
        quiet = contextlib.ExitStack()
        try:
            from ray.util.debug import log_once

            log_once("ray_data_progress_manager_disabled")  # no news of Ray's bars' absence
            quiet.enter_context(warnings.catch_warnings())
            # A chunk is one task: fewer chunks than actors is fine, not worth a warning.
            warnings.filterwarnings("ignore", message="The minimum number of concurrent actors")
            if not self.log_errors:  # the caller reports errors, in one line
                data_logger = logging.getLogger("ray.data")
                quiet.callback(data_logger.setLevel, data_logger.level)
                data_logger.setLevel(logging.CRITICAL)
            chunks, label, size = self._dataset(source, errors, corpus)
            if self.progress:
                from tqdm import tqdm

                bar = quiet.enter_context(tqdm(total=size, unit="B", unit_scale=True,
                                               desc=Path(label).name or label, leave=False,
                                               file=sys.stderr))
            remote_args = {"num_gpus": self.gpus_per_actor} if self.gpus_per_actor else {}
            rows = chunks.map_batches(
                _LineScorer, batch_format="pyarrow", batch_size=1,
                compute=ray.data.ActorPoolStrategy(size=self.num_actors),
                num_cpus=self.cpus_per_actor, **remote_args,
                fn_constructor_kwargs=dict(
                    model=self._model, name=self.model_name, providers=self.providers,
                    num_threads=self.num_threads, batch_size=self.batch_size,
                    max_tokens=self.max_tokens, crash_marker=self._crash_marker))
            start = time.perf_counter()
            for table in rows.iter_batches(batch_size=None, batch_format="pyarrow"):
                totals.add(table)
                if sink is not None:
                    sink.write(table)
                if self.progress:
                    bar.update(int(table.column("nbytes").to_numpy().sum()))
            seconds = time.perf_counter() - start
        except Exception as exc:
            cause = _cause(exc)
            if cause is exc:
                raise
            raise cause.with_traceback(None) from None
        finally:
            quiet.close()
            (context.execution_options.preserve_order, context.enable_progress_bars,
             context.print_on_execution_start) = saved
        if totals.sentences == 0 and not isinstance(source, ray.data.Dataset):
            raise CorpusError(f"{label}: no sentences (the input is empty or blank)")
        self.actor_seconds = totals.sums["actor_seconds"]
        return totals.report(label, seconds)


def evaluate(dataset_or_paths, model, *, num_actors: int | None = None,
             cpus_per_actor: float = 1.0, gpus_per_actor: float = 0, per_sentence=None,
             corpus: str | None = None, errors: str = "strict", providers: str = "auto",
             num_threads: int | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
             max_tokens: int | None = None, lines_per_batch: int = DEFAULT_LINES_PER_BATCH,
             model_is_shared: bool = False, address: str | None = "auto",
             progress: bool | None = None, force: bool = False) -> EvaluationReport:
    """Evaluate a corpus on Ray and return the :class:`EvaluationReport` that local evaluation
    (``lmonnx evaluate``, ``Scorer.evaluate``) gives for it.

    ``dataset_or_paths``: a text file, a directory, a glob, a URI Ray Data can read
    (``s3://...``), a list of those (one corpus), or a ``ray.data.Dataset`` with a ``text``
    column (optional ``line`` and ``path`` columns name the sentences).  ``model``: a path or
    the model's bytes (shipped through the object store; ``model_is_shared=True`` sends the
    path instead).  ``per_sentence``: a path (``.parquet``: Parquet, else JSON lines, the
    columns of local ``--per-sentence``; an existing file needs ``force``) or an open text
    file.  Joins the cluster at ``address`` (see :func:`connect`) unless Ray is initialized.
    """
    check_errors(errors)
    if per_sentence is not None and not hasattr(per_sentence, "write"):
        check_output(per_sentence, "per_sentence", force=force)
    runner = RayEvaluator(model, num_actors=num_actors, cpus_per_actor=cpus_per_actor,
                          gpus_per_actor=gpus_per_actor, providers=providers,
                          num_threads=num_threads, batch_size=batch_size,
                          max_tokens=max_tokens, lines_per_batch=lines_per_batch,
                          model_is_shared=model_is_shared, address=address, progress=progress)
    with sentence_sink(per_sentence) as sink:
        return runner.evaluate(dataset_or_paths, corpus=corpus, errors=errors, sink=sink)


def check_sources(paths) -> None:
    """Fail now, in one line, for a local path that does not exist or holds no file (URIs are
    checked by the read tasks): before any cluster starts."""
    _require_ray()
    for path in paths:
        if str(path) == "-":
            raise InvalidArgumentError("--ray reads files, not stdin (-); save the input to a file")
        if not _is_uri(str(path)):
            _local_files(str(path))
