"""Smoke test of ``serve_table.py``'s pieces: a tiny random model served by a real
``lmonnx serve`` subprocess, load from wrk (the default client) and from the Python clients
(closed and open loop), SIGTERM -> exit 0.

wrk is a Debian package (``apt-get install wrk``; ``.ci/run`` installs it): without it the
wrk tests skip, except under CI=1, where they fail."""

import json
import math
import os

import pytest

pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import serve_table as st  # noqa: E402

LINES = ["the cat sat on the mat", "a dog ran", "the cat ran on the mat again", ""]
LINES = [line for line in LINES if line] * 4


def need_wrk():
    if st.wrk_path() is None:
        message = "wrk not installed (apt-get install wrk)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(scorer, server) on a tiny random model; the server must drain on SIGTERM."""
    from lmonnx import Scorer

    model = st.random_model(tmp_path_factory.mktemp("model"), LINES, layers=1, units=8,
                            vocab=20)
    server = st.ServerProcess(model, ["--max-wait-ms", "1"], "smoke").start(timeout=60)
    try:
        yield Scorer(model, providers="cpu"), server
    finally:
        assert server.stop() == 0


def test_requests_and_nbest():
    sets = st.request_sets(LINES, ("single", "nbest"))
    assert sets["single"][0] == [LINES[0]]
    nbest = sets["nbest"][0]
    assert len(nbest) == st.NBEST and nbest[0] == LINES[0]
    assert all(isinstance(s, str) for s in nbest)


def test_in_process_and_agreement(served):
    scorer, server = served
    inproc = st.in_process(scorer, st.request_sets(LINES, ("single",))["single"], batch=4,
                           seconds=None, count=8)
    assert inproc.sentences == 8 and inproc.latencies
    assert st.agree(server.url, scorer, LINES[:3])


def test_wrk_closed_loop(served):
    need_wrk()
    _, server = served
    sample = st.run_load(server.url + "/v1/score", st.request_sets(LINES, ("nbest",))["nbest"],
                         concurrency=3, seconds=0.3, warmup=0.1, pid=server.pid)
    assert sample.requests > 0 and (sample.errors, sample.rejected) == (0, 0)
    assert sample.sentences == sample.requests * st.NBEST == len(sample.latencies) * st.NBEST
    assert sample.percentile_ms(99) >= sample.percentile_ms(50) > 0
    assert 0.25 < sample.seconds <= 0.3 + 1e-3  # the window, not wrk's start-up and stop
    assert sample.server_cpu >= 0 and not math.isnan(sample.client_cpu)
    line = st.format_row("tiny", "nbest", "3", "batched", sample, None, None, 2)
    assert "batched" in line


def test_wrk_counts_wrong_answers_as_errors(served):
    need_wrk()
    _, server = served
    bad = json.dumps({"sentences": 5}).encode()  # refused: 422
    client = st.WrkClient(server.url + "/v1/score", [bad], [1], 2)
    try:
        sample = client.slice(seconds=0.2)
    finally:
        client.close()
    assert sample.requests == 0 and sample.errors > 0
    assert sample.first_error.startswith("HTTP 422")


@pytest.mark.parametrize("pool", ["httpx", "aiohttp"])
def test_python_clients(served, pool):
    if pool == "aiohttp":
        pytest.importorskip("aiohttp")
    _, server = served
    url = server.url + "/v1/score"
    closed = st.run_load(url, st.request_sets(LINES, ("nbest",))["nbest"], concurrency=3,
                         seconds=None, count=12, pid=server.pid, pool=pool)
    assert (closed.requests, closed.sentences, closed.errors) == (12, 12 * st.NBEST, 0)
    assert closed.percentile_ms(99) >= closed.percentile_ms(50) > 0
    opened = st.run_load(url, [[s] for s in LINES], concurrency=4, mode="open", seconds=None,
                         count=10, rate=500.0, pid=server.pid, pool=pool)
    assert opened.requests + opened.dropped == 10 and opened.errors == 0


def test_wrk_runs_closed_loops_for_a_time(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(LINES) + "\n")
    assert st.main(["--corpus", str(corpus), "--mode", "open"]) == 2
    assert st.main(["--corpus", str(corpus), "--requests", "5"]) == 2
    said = capsys.readouterr().err
    assert ("--client-pool httpx or aiohttp" if st.wrk_path() else "wrk not found") in said
