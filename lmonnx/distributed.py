"""Corpus evaluation on a Ray cluster (Ray Data): the local numbers, beyond one machine.

    files ─driver──────> checked before Ray starts (exist, readable, a first sentence)
          ─read tasks──> chunks: the local look-ahead (evaluate.lookahead_chunks: consecutive
                         sentences of one file, at most LOOKAHEAD of them and LOOKAHEAD_BYTES
                         bytes), one row each: corpus, line[], text[], nbytes[]
          ─actor pool──> one row per chunk: the sentences' counts and float64 NLLs, the
                         chunk's positions, seconds, provider (one ModelSession per actor)
          ─driver──────> evaluate.Totals, sentence by sentence in input order ─> EvaluationReport
                         (optional) per-sentence records ─> Parquet / JSON lines

    report = lmonnx.distributed.evaluate("corpus/*.txt", "model.onnx", num_actors=8, cpus_per_actor=2)
    lmonnx evaluate corpus/ --model model.onnx --ray auto --per-sentence scores.parquet

**Bit for bit the local numbers** (for files).  A read task opens a file in binary and hands
its lines to :func:`lmonnx.corpus.sentences_of_lines`, as a local read does (``\\n`` only,
blank lines counted, BOM, CR, ``--errors``, messages naming ``file:line``).  A chunk is what
the local evaluator's look-ahead holds, and an actor scores it with
:class:`lmonnx.evaluate.Evaluator`: the same batches, so the same per-sentence NLLs (a
sentence's NLL does depend, in the last bits, on the batch it shares in onnxruntime).  The
driver adds the sentences into :class:`lmonnx.evaluate.Totals` in input order, as the
Evaluator does, so every sum and ratio is the local one.  Only ``seconds``,
``tokens_per_second`` (wall time of the job) and ``provider`` (the actors', joined) may differ.
A ``ray.data.Dataset`` input is scored in the batches Ray delivers: equal to local up to
float rounding unless those batches are the local look-ahead's.

**Public Ray Data only.**  Files become rows of ``ray.data.from_items``; ``map_batches`` reads
them (a generator: memory is one chunk) and scores them (an actor pool).  This dataset's own
``DataContext`` (a copy Ray makes at ``from_items``; the process's is untouched) keeps input
order and makes each chunk a block, so chunks spread over the actors.  A retried task (an
actor that died, a lost node) replaces its output: nothing is counted twice or lost.

**The model** travels as bytes through the object store (``model_is_shared=True`` sends the
path instead, for a file every node can read).  Joining the cluster, the model's check and its
trip through the object store are :mod:`lmonnx.cluster`'s, shared with serving on Ray.  Ray is
optional (``pip install 'lmonnx[ray]'``): this module imports without it, and its functions say
which extra to install.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import io
import os
import time
from pathlib import Path
from typing import Iterator, NamedTuple

from lmonnx.atomic import atomic_path, check_outputs, is_parquet, output_file
from lmonnx.cluster import (check_fits, checked_model, connect, optional_modules, require,
                            share_model, shared_model, threads_for)
from lmonnx.corpus import Line, check_errors, sentences_of_lines, to_line
from lmonnx.errors import CorpusError, InvalidArgumentError, LmonnxError
from lmonnx.evaluate import (DEFAULT_BATCH_SIZE, LOOKAHEAD, EvaluationReport, Evaluator,
                             SentenceResult, Totals, lookahead_chunks, sentence_record)
from lmonnx.examples import ExampleBuilder
from lmonnx.strict_json import json_line
from lmonnx.validation import check_int, check_optional_int, check_real

# Everything else in lmonnx works without Ray: these are None then, and _MISSING says why.
(ray, _, pa), _MISSING = optional_modules("ray", "ray.data", "pyarrow")

__all__ = ["evaluate", "RayEvaluator", "connect", "check_sources", "Sources", "sentence_sink",
           "sentence_record", "READ_CPUS"]

READ_CPUS = 0.25
"""CPUs reserved by a read task.  Reading and decoding cost well under 1% of scoring, and a
full CPU per read task would leave 2-CPU nodes too few for the actors (a read task and two
1-CPU actors deadlock on 2 CPUs)."""


def _require_ray() -> None:
    require(_MISSING, "evaluating on Ray needs Ray Data", "lmonnx[ray]")


@functools.cache
def _schemas() -> dict[str, "pa.Schema"]:
    """The three row shapes: a chunk to score, a scored chunk, a per-sentence record."""
    ints, floats = pa.list_(pa.int64()), pa.list_(pa.float64())
    return {
        "chunk": pa.schema([("corpus", pa.string()), ("line", ints),
                            ("text", pa.list_(pa.string())), ("nbytes", ints)]),
        "scored": pa.schema([("corpus", pa.string()), ("line", ints), ("nbytes", ints),
                             ("tokens", ints), ("oovs", ints), ("nll", floats),
                             ("oov_nll", floats), ("hits", ints), ("oov_hits", ints),
                             ("real_positions", pa.int64()),
                             ("computed_positions", pa.int64()), ("seconds", pa.float64()),
                             ("provider", pa.string())]),
        "sentence": pa.schema([("corpus", pa.string()), ("line", pa.int64()),
                               ("tokens", pa.int64()), ("oovs", pa.int64()),
                               ("nll", pa.float64()), ("perplexity", pa.float64()),
                               ("hits", pa.int64())]),
    }


# ---- sources: resolved and checked on the driver, before any cluster starts ------------------

def _is_uri(path: str) -> bool:
    return "://" in path


def _visible(name: str) -> bool:
    return not name.startswith((".", "_"))  # as Ray Data skips hidden files


def _local_files(source: str) -> list[tuple[str, str]]:
    """``(absolute path, corpus name)`` of a local file, directory (its files, recursively,
    sorted; names starting with ``.`` or ``_`` skipped) or glob."""
    if source == "-":
        raise InvalidArgumentError("--ray reads files, not stdin (-); save the input to a file")
    if os.path.isfile(source):
        return [(os.path.abspath(source), source)]
    if os.path.isdir(source):
        found = []
        for root, dirs, files in os.walk(source):
            dirs[:] = sorted(d for d in dirs if _visible(d))
            found += [os.path.join(root, f) for f in sorted(files) if _visible(f)]
    elif glob.has_magic(source):
        found = sorted(f for f in glob.glob(source, recursive=True) if os.path.isfile(f))
    elif os.path.exists(source):
        raise CorpusError(f"{source}: not a regular file")
    else:
        raise CorpusError(f"{source}: no such file")
    if not found:
        raise CorpusError(f"{source}: no file matches" if glob.has_magic(source)
                          else f"{source}: a directory without files")
    return [(os.path.abspath(f), f) for f in found]


def _remote_files(uri: str) -> list[tuple[str, str]]:
    """``(uri, uri)`` of a file, or of every visible file under a directory, that pyarrow's
    file systems reach (``s3://``, ``gs://``, ``file://``, ...)."""
    import pyarrow.fs as pafs

    try:
        fs, path = pafs.FileSystem.from_uri(uri)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        else:
            infos = [info]
    except (OSError, pa.ArrowException) as exc:
        raise CorpusError(f"{uri}: {exc}") from None
    if infos == [info] and info.type == pafs.FileType.NotFound:
        raise CorpusError(f"{uri}: no such file")
    prefix = uri[:len(uri) - len(path)] if uri.endswith(path) else uri.split("://")[0] + "://"
    files = sorted(i.path for i in infos if i.type == pafs.FileType.File
                   and all(_visible(part) for part in Path(i.path).relative_to(path).parts))
    if not files:
        raise CorpusError(f"{uri}: a directory without files")
    return [(prefix + f, prefix + f) for f in files]


def _open(path: str):
    """A binary file object of a local path or a URI, read line by line."""
    if not _is_uri(path):
        return open(path, "rb")
    import pyarrow.fs as pafs

    fs, inner = pafs.FileSystem.from_uri(path)
    return io.BufferedReader(fs.open_input_stream(inner))


def _sentences(path: str, name: str, errors: str) -> Iterator[Line]:
    """The sentences of one file, exactly as :func:`lmonnx.corpus.read_sentences` gives them;
    errors name ``name`` (the path as the user wrote it)."""
    try:
        f = _open(path)
    except (OSError, pa.ArrowException) as exc:
        raise CorpusError(f"{name}: {getattr(exc, 'strerror', None) or exc}") from None
    with f:
        yield from sentences_of_lines(f, errors, name)


class Sources(NamedTuple):
    """A corpus resolved and checked by :func:`check_sources`: hand it to
    :meth:`RayEvaluator.evaluate` as it is, and nothing is listed or checked again."""

    files: list[tuple[str, str]]
    """``(path or URI, corpus name)`` of every file, in input order."""
    label: str
    """The report's corpus: the sources as the user gave them."""


def check_sources(sources, errors: str = "strict") -> Sources:
    """Resolve ``sources`` (paths, globs, directories, URIs: one corpus) to its files, each
    listed once; fail now, in one line, as local evaluation would, for a missing or
    unreadable file, an undecodable line before the first sentence, or a corpus without any
    sentence.  Reads only until the first sentence."""
    _require_ray()
    check_errors(errors)
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    sources = [os.fspath(s) for s in sources]
    if not sources:
        raise InvalidArgumentError("no corpus given")
    files: dict[str, str] = {}
    for source in sources:
        for path, name in (_remote_files if _is_uri(source) else _local_files)(source):
            files.setdefault(path, name)
    label = ", ".join(sources)
    if not any(next(_sentences(path, name, errors), None) for path, name in files.items()):
        raise CorpusError(f"{label}: no sentences (the input is empty or blank)")
    return Sources(list(files.items()), label)


# ---- reading: chunks of sentences, one row each ----------------------------------------------

def _chunk_table(corpus: str, lines: list[Line]) -> "pa.Table":
    return pa.Table.from_pylist([{"corpus": corpus, "line": [ln.key for ln in lines],
                                  "text": [ln.text for ln in lines],
                                  "nbytes": [ln.nbytes for ln in lines]}],
                                _schemas()["chunk"])


def _read_files(batch: "pa.Table", *, errors: str) -> Iterator["pa.Table"]:
    """A read task: the chunks of each file of ``batch`` (columns ``path``, ``name``)."""
    for path, name in zip(batch.column("path").to_pylist(), batch.column("name").to_pylist()):
        for chunk in lookahead_chunks(_sentences(path, name, errors)):
            yield _chunk_table(name, chunk)


def _rows_as_chunks(batch: "pa.Table", *, errors: str, corpus: str) -> Iterator["pa.Table"]:
    """The rows of a user's dataset as chunks: ``text`` (str or bytes) through
    :func:`lmonnx.corpus.to_line`, blank ones dropped; optional ``line`` (the line number,
    else null) and ``path`` (the corpus name) columns.  A new chunk at each new ``path``."""
    names = batch.column_names
    texts = batch.column("text").to_pylist()
    keys = batch.column("line").to_pylist() if "line" in names else [None] * len(texts)
    paths = batch.column("path").to_pylist() if "path" in names else [corpus] * len(texts)
    runs: list[tuple[str, list[Line]]] = []
    for text, key, path in zip(texts, keys, paths):
        if text is None:
            continue
        where = f"{path}:{key}" if key is not None else f"{path} (a row of text {text[:40]!r})"
        line = to_line(key, text, errors, where)
        if line.text:
            if not runs or runs[-1][0] != path:
                runs.append((path, []))
            runs[-1][1].append(line)
    for path, lines in runs:
        for chunk in lookahead_chunks(lines):
            yield _chunk_table(path, chunk)


# ---- scoring: a pool of actors, each with one onnxruntime session ----------------------------

class _ChunkScorer:
    """A Ray Data actor: one model session; one scored row per chunk (see :func:`_schemas`)."""

    def __init__(self, model, *, name: str, providers: str, num_threads: int, batch_size: int,
                 max_tokens: int | None):
        from lmonnx.runtime import ModelSession

        self.session = ModelSession(shared_model(model), providers=providers,
                                    num_threads=num_threads, name=name)
        self.builder = ExampleBuilder(self.session.vocab)
        self.settings = dict(batch_size=batch_size, max_tokens=max_tokens,
                             num_threads=num_threads)

    def __call__(self, batch: "pa.Table") -> Iterator["pa.Table"]:
        for chunk in batch.to_pylist():
            yield pa.Table.from_pylist([self._score(chunk)], _schemas()["scored"])

    def _score(self, chunk: dict) -> dict:
        """The chunk scored as local evaluation scores one look-ahead window."""
        evaluator = Evaluator(self.session, **self.settings)
        lines = map(Line, chunk["line"], chunk["text"], chunk["nbytes"])
        results = [result for _, result in evaluator.scored(self.builder.build_all(lines))]
        columns = {key: [getattr(r, key) for r in results]
                   for key in ("tokens", "oovs", "nll", "oov_nll", "hits", "oov_hits")}
        return {"corpus": chunk["corpus"], "line": chunk["line"], "nbytes": chunk["nbytes"],
                **columns, "real_positions": evaluator.totals.real_positions,
                "computed_positions": evaluator.totals.computed_positions,
                "seconds": evaluator.seconds, "provider": self.session.provider_description}


# ---- the driver: totals in input order, per-sentence sinks -----------------------------------

class _Collector:
    """Adds scored chunks, in input order, into one :class:`Totals` (as ``Evaluator`` adds
    its sentences) and hands their per-sentence records to ``sink``."""

    def __init__(self, sink=None):
        self.totals = Totals()
        self.sink = sink
        self.providers: list[str] = []
        self.actor_seconds = 0.0

    def add(self, table: "pa.Table") -> None:
        for chunk in table.to_pylist():
            records = []
            for i, nbytes in enumerate(chunk["nbytes"]):
                result = SentenceResult(
                    key=chunk["line"][i], tokens=chunk["tokens"][i], oovs=chunk["oovs"][i],
                    logprob=-chunk["nll"][i], oov_nll=chunk["oov_nll"][i],
                    hits=chunk["hits"][i], oov_hits=chunk["oov_hits"][i])
                self.totals.add(result, nbytes)
                records.append(sentence_record(chunk["corpus"], result))
            self.totals.real_positions += chunk["real_positions"]
            self.totals.computed_positions += chunk["computed_positions"]
            self.actor_seconds += chunk["seconds"]
            if chunk["provider"] not in self.providers:
                self.providers.append(chunk["provider"])
            if self.sink is not None:
                self.sink.write(records)

    def report(self, corpus: str, seconds: float) -> EvaluationReport:
        return self.totals.report(corpus, ", ".join(self.providers) or "-", seconds)


class _ParquetSink:
    """Per-sentence records as one Parquet file."""

    def __init__(self, file):
        import pyarrow.parquet as pq

        self.writer = pq.ParquetWriter(file, _schemas()["sentence"])

    def write(self, records: list[dict]) -> None:
        self.writer.write_table(pa.Table.from_pylist(records, _schemas()["sentence"]))

    def close(self) -> None:
        self.writer.close()


class _JsonSink:
    """Per-sentence records as JSON lines (local ``--per-sentence``)."""

    def __init__(self, file):
        self.file = file

    def write(self, records: list[dict]) -> None:
        # The local writer's lines: strict JSON (NaN -> null), non-ASCII text as is.
        self.file.writelines(json_line(record) + "\n" for record in records)




@contextlib.contextmanager
def _parquet_sink(path: Path):
    """Parquet into a FIFO or device directly, into a regular file atomically."""
    if path.exists() and not path.is_file():
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


@contextlib.contextmanager
def sentence_sink(target, flag: str = "per_sentence"):
    """A per-sentence sink for ``target``: a path ending in ``.parquet`` (Parquet), another
    path (JSON lines, as local evaluation writes them) or an open text file (JSON lines).
    A regular file is written to a temp file that replaces it only when the block succeeds."""
    if target is None:
        yield None
    elif hasattr(target, "write"):
        yield _JsonSink(target)
    elif is_parquet(target):
        with _parquet_sink(Path(target)) as sink:
            yield sink
    else:
        with output_file(target, flag) as f:
            yield _JsonSink(f)


def _user_error(exc: BaseException) -> BaseException | None:
    """The lmonnx error inside Ray's wrappers (a task's exception comes back wrapped in a
    ``RayTaskError`` with a traceback in its message, itself maybe wrapped by Ray Data)."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        cause = getattr(e, "cause", None)
        # Ray's wrapper of a task's error subclasses the error's own type: look inside it.
        if isinstance(e, LmonnxError) and not isinstance(e, ray.exceptions.RayError):
            return e
        todo += [cause if isinstance(cause, BaseException) else None, e.__cause__,
                 e.__context__]
    return None


# ---- the public API --------------------------------------------------------------------------

class RayEvaluator:
    """Evaluates corpora on a Ray cluster with one model; each :meth:`evaluate` is one Ray
    Data job (read tasks, a pool of up to ``num_actors`` scoring actors) and returns the
    :class:`EvaluationReport` local evaluation gives.

    ``model``: a path or the model's bytes.  ``num_actors`` (None: as many as the cluster's
    CPUs, and GPUs when ``gpus_per_actor`` > 0, allow next to a read task), ``cpus_per_actor``
    (fractions are fine; onnxruntime gets that many intra-op threads, rounded up, unless
    ``num_threads`` says otherwise), ``gpus_per_actor``; ``providers``, ``batch_size``,
    ``max_tokens`` as in local evaluation.  ``progress``: Ray Data's progress bars (None:
    Ray's setting).
    """

    def __init__(self, model, *, num_actors: int | None = None, cpus_per_actor: float = 1.0,
                 gpus_per_actor: float = 0, providers: str = "auto",
                 num_threads: int | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                 max_tokens: int | None = None, model_is_shared: bool = False,
                 address: str | None = "auto", progress: bool | None = None):
        _require_ray()
        num_actors = check_optional_int("num_actors", num_actors)
        self.cpus_per_actor = check_real("cpus_per_actor", cpus_per_actor, low=0,
                                         low_open=True)
        self.gpus_per_actor = check_real("gpus_per_actor", gpus_per_actor, low=0)
        self.num_threads = (check_int("num_threads", num_threads) if num_threads is not None
                            else threads_for(self.cpus_per_actor))
        self.batch_size = check_int("batch_size", batch_size)
        self.max_tokens = check_optional_int("max_tokens", max_tokens)
        self.providers = providers
        self.progress = progress
        self.model_name, data = checked_model(model, shared=model_is_shared)
        connect(address)
        self._model = share_model(self.model_name, data)
        self.num_actors = num_actors or self._default_actors()
        actors = f"{self.num_actors} actor(s)"
        check_fits("CPU", self.num_actors * self.cpus_per_actor + READ_CPUS,
                   f"{actors} x {self.cpus_per_actor:g} CPU plus {READ_CPUS:g} for reading",
                   "lower --actors or --cpus-per-actor (fractions allowed)")
        check_fits("GPU", self.num_actors * self.gpus_per_actor,
                   f"{actors} x {self.gpus_per_actor:g} GPU")
        self.actor_seconds = 0.0

    def _default_actors(self) -> int:
        resources = ray.cluster_resources()
        count = (resources.get("CPU", 1.0) - READ_CPUS) / self.cpus_per_actor
        if self.gpus_per_actor > 0:
            count = min(count, resources.get("GPU", 0.0) / self.gpus_per_actor)
        return max(1, int(count + 1e-9))

    def _file_chunks(self, files: list[tuple[str, str]], errors: str) -> "ray.data.Dataset":
        items = [{"path": path, "name": name} for path, name in files]
        listing = ray.data.from_items(items, override_num_blocks=min(len(items),
                                                                     4 * self.num_actors))
        # from_items gave this dataset a copy of the current DataContext: ours to set.
        listing.context.execution_options.preserve_order = True  # sums in input order
        listing.context.target_max_block_size = 1  # a block per chunk: spread over actors
        if self.progress is not None:
            listing.context.enable_progress_bars = self.progress
        return listing.map_batches(_read_files, batch_format="pyarrow", batch_size=1,
                                   fn_kwargs=dict(errors=errors), num_cpus=READ_CPUS)

    def _dataset_chunks(self, dataset, errors: str, label: str) -> "ray.data.Dataset":
        if "text" not in dataset.schema().names:
            raise InvalidArgumentError("a dataset to evaluate needs a 'text' column (str or "
                                       "bytes; optional 'line' and 'path' columns)")
        return dataset.map_batches(_rows_as_chunks, batch_format="pyarrow",
                                   batch_size=LOOKAHEAD, num_cpus=READ_CPUS,
                                   fn_kwargs=dict(errors=errors, corpus=label))

    def _scored(self, chunks: "ray.data.Dataset") -> "ray.data.Dataset":
        # min_size 1: a corpus of fewer chunks than actors leaves some idle, which is fine.
        pool = ray.data.ActorPoolStrategy(min_size=1, max_size=self.num_actors,
                                          initial_size=self.num_actors)
        remote_args = {"num_gpus": self.gpus_per_actor} if self.gpus_per_actor else {}
        return chunks.map_batches(
            _ChunkScorer, batch_format="pyarrow", batch_size=1, compute=pool,
            num_cpus=self.cpus_per_actor, **remote_args,
            fn_constructor_kwargs=dict(
                model=self._model, name=self.model_name, providers=self.providers,
                num_threads=self.num_threads, batch_size=self.batch_size,
                max_tokens=self.max_tokens))

    def evaluate(self, source, *, corpus: str | None = None, errors: str = "strict",
                 sink=None) -> EvaluationReport:
        """Evaluate ``source`` (paths, globs, directories, URIs: one corpus; :class:`Sources`
        that :func:`check_sources` gave, not listed again; or a Ray Dataset with a ``text``
        column) and return its report; ``sink``: from :func:`sentence_sink`."""
        check_errors(errors)
        if isinstance(source, ray.data.Dataset):
            label = corpus or "<dataset>"
            chunks = self._dataset_chunks(source, errors, label)
        else:
            if not isinstance(source, Sources):
                source = check_sources(source, errors)
            label = source.label
            chunks = self._file_chunks(source.files, errors)
        collector = _Collector(sink)
        start = time.perf_counter()
        try:
            for table in self._scored(chunks).iter_batches(batch_size=None,
                                                           batch_format="pyarrow"):
                collector.add(table)
        except Exception as exc:
            ours = _user_error(exc)
            if ours is None:
                raise
            raise ours.with_traceback(None) from None
        self.actor_seconds = collector.actor_seconds
        return collector.report(corpus or label, time.perf_counter() - start)


def evaluate(dataset_or_paths, model, *, num_actors: int | None = None,
             cpus_per_actor: float = 1.0, gpus_per_actor: float = 0, per_sentence=None,
             corpus: str | None = None, errors: str = "strict", providers: str = "auto",
             num_threads: int | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
             max_tokens: int | None = None, model_is_shared: bool = False,
             address: str | None = "auto", progress: bool | None = None,
             force: bool = False) -> EvaluationReport:
    """Evaluate a corpus on Ray and return the :class:`EvaluationReport` that local evaluation
    (``lmonnx evaluate``, ``Scorer.evaluate``) gives for it.

    ``dataset_or_paths``: a text file, a directory, a glob, a URI (``s3://...``), a list of
    those (one corpus), or a ``ray.data.Dataset`` with a ``text`` column (optional ``line``
    and ``path`` columns name the sentences).  ``per_sentence``: a path (``.parquet``:
    Parquet, else JSON lines; an existing file needs ``force``) or an open text file.  Files
    are checked before Ray starts; see :class:`RayEvaluator` for the rest.
    """
    _require_ray()
    inputs = [] if isinstance(model, (bytes, bytearray)) else [model]
    if not isinstance(dataset_or_paths, ray.data.Dataset):
        dataset_or_paths = check_sources(dataset_or_paths, errors)  # listed here, once
        inputs += [path for path, _ in dataset_or_paths.files]
    if not hasattr(per_sentence, "write"):
        check_outputs({"per_sentence": per_sentence}, inputs, force=force)
    runner = RayEvaluator(model, num_actors=num_actors, cpus_per_actor=cpus_per_actor,
                          gpus_per_actor=gpus_per_actor, providers=providers,
                          num_threads=num_threads, batch_size=batch_size,
                          max_tokens=max_tokens, model_is_shared=model_is_shared,
                          address=address, progress=progress)
    with sentence_sink(per_sentence) as sink:
        return runner.evaluate(dataset_or_paths, corpus=corpus, errors=errors, sink=sink)
