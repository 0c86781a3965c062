"""Issue 11: evaluation on Ray Data gives the local numbers, bit for bit (issue 15).

One local cluster for the module (``ray.init(num_cpus=2)``); two scoring actors of half a CPU
each, so that a read task and both actors fit on 2 CPUs.  Compared with local evaluation with
``==``: PTB test, files with byte-order marks, CRLF, blank lines and a line longer than the
token budget (scored in windows), globs, directories and ``file://`` URIs, an existing Ray
Dataset, per-sentence rows (Parquet and JSON lines), an actor killed mid-run.  Only
``seconds`` and ``tokens_per_second`` (wall time) may differ.  Every source is listed once.
Bad input fails in one line, and before Ray starts.  The last tests run without a cluster.
"""

import ast
import json
import os
import random
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest

from lmonnx import Scorer
from lmonnx._testing import SOFTMAXES, build_random_lm, make_vocab, random_cutoffs
from lmonnx.cli import main
from lmonnx.corpus import read_sentences
from lmonnx.distributed import _ChunkScorer
from lmonnx.evaluate import LOOKAHEAD, LOOKAHEAD_BYTES, Evaluator, Totals, lookahead_chunks
from lmonnx.examples import ExampleBuilder
from lmonnx.runtime import ModelSession

# Ray Data's own copies of its context warn about its own deprecated fields.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")

RAY = dict(num_actors=2, cpus_per_actor=0.5, providers="cpu", progress=False)
CLI_RAY = ["--ray", "auto", "--actors", "2", "--cpus-per-actor", "0.5"]
WALL_TIME = ("seconds", "tokens_per_second")  # the job's wall time, not the scoring's
WORDS = [f"w{i}" for i in range(60)]


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    pytest.importorskip("pyarrow")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING",
                 log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def lray(ray_cluster):
    import lmonnx.distributed

    return lmonnx.distributed


@pytest.fixture(scope="module", params=SOFTMAXES)
def model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("ray_model") / "m.onnx"
    build_random_lm(path, make_vocab(WORDS[:40]), units=16, layers=2,
                    cutoffs=random_cutoffs(request.param, 44))
    return path


@pytest.fixture(scope="module")
def ptb_model(ptb_dir, tmp_path_factory):
    counts = Counter((ptb_dir / "ptb.valid.txt").read_text(encoding="utf-8").split())
    counts.pop("<unk>", None)
    path = tmp_path_factory.mktemp("ray_ptb") / "ptb.onnx"
    build_random_lm(path, make_vocab([w for w, _ in counts.most_common(2000)]), units=16)
    return path


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """2000 sentences of 1-30 words, some out of the vocabulary, with blank lines."""
    rng = random.Random(0)
    lines = []
    for i in range(2000):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30))))
        if i % 97 == 0:
            lines.append("")
    path = tmp_path_factory.mktemp("ray_corpus") / "synthetic.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """13,000 sentences of 1-20 words: four look-ahead chunks, so that an actor scores two."""
    rng = random.Random(2)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 20)))
             for _ in range(3 * LOOKAHEAD + 700)]
    path = tmp_path_factory.mktemp("ray_big") / "big.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def messy(tmp_path):
    """Two files: a BOM and CRLF line breaks, blank and whitespace-only lines, a line
    longer than the token budget of the tests (256), no final line break."""
    rng = random.Random(1)
    long_line = " ".join(rng.choice(WORDS) for _ in range(1500))
    a = tmp_path / "a.txt"
    a.write_bytes("\ufeffw1 w2 w3\r\n\r\n   \r\nw4 zz w5  \r\n\tw6\r\n".encode("utf-8") +
                  long_line.encode("utf-8") + b"\r\nw7 w8\r\nlast w9")
    b = tmp_path / "b.txt"
    b.write_text("\n\n" + "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
                                    for _ in range(300)) + "\n\n", encoding="utf-8")
    return a, b


def assert_same_report(ray_report: dict, local: dict, ignore=()) -> None:
    """Every field equal to the last bit (padding and provider included), wall time aside."""
    assert ray_report.keys() == local.keys()
    for key in local.keys() - set(WALL_TIME) - set(ignore):
        assert ray_report[key] == local[key], key


def local_report(model, files, errors="strict", corpus="x") -> dict:
    """Local evaluation of ``files`` as one corpus: each file through its own Evaluator (as
    ``lmonnx evaluate`` reads a file), the sentences added in order into one Totals."""
    session = ModelSession(model, providers="cpu")
    builder = ExampleBuilder(session.vocab)
    totals = Totals()
    for path in files:
        evaluator = Evaluator(session)
        for example, result in evaluator.scored(builder.build_all(read_sentences(path, errors))):
            totals.add(result, example.nbytes)
        totals.real_positions += evaluator.totals.real_positions
        totals.computed_positions += evaluator.totals.computed_positions
    return totals.report(corpus, session.provider_description, 1.0).to_dict()


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def cli_json(capsys, *args):
    capsys.readouterr()
    assert main(["evaluate", *map(str, args), "--json", "--providers", "cpu"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture
def listed(lray, monkeypatch):
    """The sources the driver lists (local files, directories and globs; URIs), in order."""
    calls = []
    for name in ("_local_files", "_remote_files"):
        def spy(source, _list=getattr(lray, name)):
            calls.append(str(source))
            return _list(source)
        monkeypatch.setattr(lray, name, spy)
    return calls


# ---- equal to local evaluation ---------------------------------------------------------------

def test_ptb_test_totals_and_parquet_rows_equal_local(lray, ptb_model, ptb_dir, tmp_path):
    import pyarrow.parquet as pq

    corpus = ptb_dir / "ptb.test.txt"
    local = Scorer(ptb_model, providers="cpu").evaluate(corpus,
                                                        per_sentence=tmp_path / "local.jsonl")
    report = lray.evaluate(corpus, ptb_model, per_sentence=tmp_path / "ray.parquet", **RAY)
    assert report.sentences == 3761 and report.tokens == 82430
    assert_same_report(report.to_dict(), local.to_dict())
    rows = pq.read_table(tmp_path / "ray.parquet").to_pylist()
    assert rows == read_jsonl(tmp_path / "local.jsonl")
    assert list(rows[0]) == ["corpus", "line", "tokens", "oovs", "nll", "perplexity", "hits"]


def test_cli_messy_files_equal_local(ray_cluster, model, messy, tmp_path, capsys, listed):
    a, b = messy
    args = [a, b, "--model", model, "--max-tokens", "256", "--batch-size", "16"]
    local = cli_json(capsys, *args, "--per-sentence", tmp_path / "local.jsonl")
    remote = cli_json(capsys, *args, *CLI_RAY, "--per-sentence", tmp_path / "ray.jsonl")
    assert listed == [str(a), str(b)]  # each corpus listed and checked once, before Ray
    assert [r["corpus"] for r in remote] == [str(a), str(b)]
    for r, l in zip(remote, local):
        assert_same_report(r, l)
    rows = read_jsonl(tmp_path / "ray.jsonl")
    assert rows == read_jsonl(tmp_path / "local.jsonl")
    # real line numbers: blank lines counted, the long line is line 6 of a.txt
    assert [r["line"] for r in rows if r["corpus"] == str(a)] == [1, 4, 5, 6, 7, 8]
    assert rows[3]["tokens"] == 1501


def test_globs_directories_and_errors_replace(lray, model, messy, tmp_path, listed):
    a, b = messy
    (tmp_path / "bad.txt").write_bytes(b"w1 \xff w2\n\nw3\n")
    files = [a, b, tmp_path / "bad.txt"]
    local = local_report(model, files, errors="replace")
    for source in (str(tmp_path / "*.txt"), tmp_path, [str(f) for f in files],
                   f"file://{tmp_path}"):
        listed.clear()
        report = lray.evaluate(source, model, errors="replace", **RAY).to_dict()
        assert_same_report(report, local, ignore=("corpus",))
        # every source listed once (a URI's listing is a request to its file system)
        assert listed == ([str(f) for f in source] if isinstance(source, list)
                          else [str(source)])


def test_an_existing_dataset_and_a_model_only_in_the_object_store(lray, ray_cluster, model,
                                                                  synthetic, tmp_path):
    import shutil

    lines = synthetic.read_text(encoding="utf-8").splitlines()
    local = Scorer(model, providers="cpu").evaluate(lines).to_dict()
    # One block of fewer rows than the look-ahead: one chunk, the local batches.
    dataset = ray_cluster.data.from_items([{"text": t, "line": i}
                                           for i, t in enumerate(lines, 1)],
                                          override_num_blocks=1)
    copy = tmp_path / "gone.onnx"
    shutil.copy(model, copy)
    runner = lray.RayEvaluator(copy, **RAY)
    copy.unlink()  # the actors get the model's bytes from the object store, not the file
    report = runner.evaluate(dataset, corpus="<lines>").to_dict()
    assert_same_report(report, local)


def test_chunks_cut_by_the_byte_bound_equal_local(lray, model, tmp_path):
    """Long lines end a look-ahead chunk by bytes, long before LOOKAHEAD sentences: the read
    tasks (which have not tokenized) must cut exactly where the local evaluator does."""
    rng = random.Random(3)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.choice([3, 40_000])))
             for _ in range(90)]
    corpus = tmp_path / "long.txt"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    chunks = list(lookahead_chunks(read_sentences(corpus)))
    assert len(chunks) > 2 and all(len(c) < LOOKAHEAD for c in chunks)
    assert corpus.stat().st_size > 2 * LOOKAHEAD_BYTES
    local = Scorer(model, providers="cpu").evaluate(corpus, per_sentence=tmp_path / "l.jsonl")
    report = lray.evaluate(corpus, model, per_sentence=tmp_path / "r.jsonl", **RAY)
    assert_same_report(report.to_dict(), local.to_dict())
    assert read_jsonl(tmp_path / "r.jsonl") == read_jsonl(tmp_path / "l.jsonl")


# ---- faults ----------------------------------------------------------------------------------

def _crash_once(marker: str) -> None:
    """The first call that creates ``marker`` (a path every local actor sees) kills its
    process without any cleanup, as a lost node would."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, f"{os.getpid()}\n".encode())
    os.close(fd)
    os._exit(17)


class CrashingChunkScorer(_ChunkScorer):
    """The scoring actor, with a fault injected here and not in lmonnx: the first actor to
    score its second chunk dies after scoring it and before returning it."""

    marker = ""  # set by the fixture

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.chunks = 0

    def __call__(self, batch):
        for table in super().__call__(batch):
            self.chunks += 1
            if self.chunks > 1:
                _crash_once(self.marker)  # mid-run: this chunk is never returned
            yield table


@pytest.fixture
def crashing_actors(lray, monkeypatch, tmp_path):
    """Ray Data's actors are CrashingChunkScorer; the marker path says whether one died.
    The actors' processes cannot import this test module: Ray ships its classes by value."""
    from ray import cloudpickle

    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)
    monkeypatch.setattr(CrashingChunkScorer, "marker", str(tmp_path / "crashed"))
    monkeypatch.setattr(lray, "_ChunkScorer", CrashingChunkScorer)
    yield tmp_path / "crashed"
    cloudpickle.unregister_pickle_by_value(module)


def test_an_actor_killed_mid_run_is_retried_and_counted_once(lray, model, big, tmp_path,
                                                              crashing_actors):
    import pyarrow.parquet as pq

    local = Scorer(model, providers="cpu").evaluate(big, per_sentence=tmp_path / "l.jsonl")
    runner = lray.RayEvaluator(model, **RAY)
    with lray.sentence_sink(tmp_path / "rows.parquet") as sink:
        report = runner.evaluate(big, sink=sink).to_dict()
    assert crashing_actors.exists()  # an actor did os._exit after scoring a chunk
    assert_same_report(report, local.to_dict())
    # nothing twice, nothing lost, in input order
    assert pq.read_table(tmp_path / "rows.parquet").to_pylist() == read_jsonl(tmp_path / "l.jsonl")


@pytest.mark.parametrize("case", ["missing", "undecodable", "foreign model", "stdin"])
def test_bad_input_fails_in_one_line_as_locally(ray_cluster, model, tmp_path, capsys, case):
    corpus, model_path = tmp_path / "c.txt", model
    corpus.write_text("w1 w2\n", encoding="utf-8")
    if case == "missing":
        corpus = tmp_path / "nothere.txt"
    elif case == "undecodable":
        corpus.write_bytes(b"w1 w2\nw3 \xff w4\n")
    elif case == "foreign model":
        model_path = tmp_path / "foreign.onnx"
        model_path.write_bytes(b"not a model")
    elif case == "stdin":
        corpus = "-"
    args = ["evaluate", str(corpus), "--model", str(model_path), "--providers", "cpu"]
    capsys.readouterr()
    assert main([*args, *CLI_RAY]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    ours = [line for line in err.splitlines() if line.startswith("lmonnx:")]
    assert len(ours) == 1, err
    if case != "stdin":  # locally stdin is fine; on Ray it is refused
        main(args)
        assert ours == capsys.readouterr().err.strip().splitlines()
    else:
        assert "stdin" in ours[0]


# ---- without a cluster -----------------------------------------------------------------------

def test_a_corpus_without_sentences_fails_before_ray_starts(model, tmp_path):
    pytest.importorskip("ray")
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.txt").write_bytes(b"\xef\xbb\xbf \r\n\n\t\n")
    (tmp_path / "bad.txt").write_bytes(b"\n\xff w1\nw2\n")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "e.txt").write_bytes(b"\n")
    code = textwrap.dedent(f"""
        import ray
        from lmonnx.cli import main
        for name in ("empty.txt", "blank.txt", "bad.txt", "dir", "nothere.txt"):
            path = {str(tmp_path)!r} + "/" + name
            assert main(["evaluate", path, "--model", {str(model)!r}, "--ray"]) == 1
            assert not ray.is_initialized(), name
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        f"lmonnx: error: {tmp_path}/empty.txt: no sentences (the input is empty or blank)",
        f"lmonnx: error: {tmp_path}/blank.txt: no sentences (the input is empty or blank)",
        f"lmonnx: error: {tmp_path}/bad.txt:2: not valid UTF-8 (byte 0xff at byte 1 of the "
        "line); pass --errors replace (errors=\"replace\" in Python) to substitute U+FFFD",
        f"lmonnx: error: {tmp_path}/dir: no sentences (the input is empty or blank)",
        f"lmonnx: error: {tmp_path}/nothere.txt: no such file"]


def test_everything_else_works_without_ray(model, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("w1 w2\nw3\n", encoding="utf-8")
    code = textwrap.dedent(f"""
        import sys
        sys.modules["ray"] = None  # `import ray` now raises ImportError
        import lmonnx, lmonnx.distributed
        from lmonnx.cli import main
        assert main(["evaluate", {str(corpus)!r}, "--model", {str(model)!r},
                     "--providers", "cpu"]) == 0
        lmonnx.Scorer({str(model)!r}, providers="cpu").score(["w1 w2"])
        assert main(["evaluate", {str(corpus)!r}, "--model", {str(model)!r}, "--ray"]) == 1
        try:
            lmonnx.distributed.evaluate({str(corpus)!r}, {str(model)!r})
        except ImportError as exc:
            print("API:", exc)
        print("loaded:", sorted(m for m in sys.modules if m == "ray" or m.startswith("ray.")
                                if sys.modules[m] is not None))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "lmonnx: error:" in result.stderr and "lmonnx[ray]" in result.stderr
    assert "API:" in result.stdout and "lmonnx[ray]" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "loaded: []"


RAY_MODULES = ["lmonnx/cluster.py", "lmonnx/distributed.py", "lmonnx/serve/ray_deployment.py"]


@pytest.mark.parametrize("module", RAY_MODULES)
def test_public_ray_only_and_no_prints_or_signal_handlers(module):
    """Ray's private modules change without notice; the library reports through return
    values and the ``lmonnx`` logger, and leaves the process's signals to the CLI."""
    tree = ast.parse((Path(__file__).resolve().parents[1] / module).read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""] + [a.name for a in node.names]
        elif isinstance(node, ast.Attribute):
            names = [node.attr]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names = [node.value] if node.value.startswith("ray.") else []
        else:
            names = []
        found += [n for n in names if "_private" in n.split(".") or n == "signal"]
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
            found.append("print")
    assert not found, found
