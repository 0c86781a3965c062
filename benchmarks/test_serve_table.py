"""Smoke test of ``serve_table.py``'s pieces: a tiny random model served by a real
``lmonnx serve`` subprocess, a few closed- and open-loop requests, SIGTERM -> exit 0."""

import math

import pytest

pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import serve_table as st  # noqa: E402

LINES = ["the cat sat on the mat", "a dog ran", "the cat ran on the mat again", ""]
LINES = [line for line in LINES if line] * 4


def test_requests_and_nbest():
    sets = st.request_sets(LINES, ("single", "nbest"))
    assert sets["single"][0] == [LINES[0]]
    nbest = sets["nbest"][0]
    assert len(nbest) == st.NBEST and nbest[0] == LINES[0]
    assert all(isinstance(s, str) for s in nbest)


def test_served_load(tmp_path):
    model = st.random_model(tmp_path, LINES, layers=1, units=8, vocab=20)
    from lmonnx import Scorer

    scorer = Scorer(model, providers="cpu")
    inproc = st.in_process(scorer, st.request_sets(LINES, ("single",))["single"], batch=4,
                           seconds=None, count=8)
    assert inproc.sentences == 8 and inproc.latencies
    server = st.ServerProcess(model, ["--max-wait-ms", "1"], "smoke").start(timeout=60)
    try:
        assert st.agree(server.url, scorer, LINES[:3])
        url = server.url + "/v1/score"
        for pool in ("transport", "freelist", "httpx"):
            closed = st.run_async(st.run_load(
                url, st.request_sets(LINES, ("nbest",))["nbest"], concurrency=3,
                mode="closed", seconds=None, count=12, warmup=0, pid=server.pid, pool=pool))
            assert (closed.requests, closed.sentences, closed.errors) == (12, 12 * st.NBEST, 0)
            assert closed.percentile_ms(99) >= closed.percentile_ms(50) > 0
            assert closed.server_cpu >= 0 and not math.isnan(closed.client_cpu)
        opened = st.run_async(st.run_load(
            url, [[s] for s in LINES], concurrency=4, mode="open", seconds=None, count=10,
            warmup=0, rate=500.0, pid=server.pid))
        assert opened.requests + opened.dropped == 10 and opened.errors == 0
    finally:
        assert server.stop() == 0
    line = st.format_row("tiny", "nbest", "3", "batched", closed, inproc, None, 2)
    assert "batched" in line and "x" in line
