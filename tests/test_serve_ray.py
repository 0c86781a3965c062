"""``lmonnx serve --ray``: the local server's app as a Ray Serve deployment of 2 replicas.

One local cluster for the module (``ray.init(num_cpus=2)``), two replicas of half a CPU
each.  Every answer (score with and without per-token, predict, seeded generate, decoder
steps) is compared with ``==`` to the local single-process app's (``httpx.ASGITransport``),
requests spread over both replicas, and a state session works whether its calls carry the
session header (routed to the state's replica, also when many arrive at once) or not
(forwarded there).  The CLI runs first, in a subprocess with a cluster of its own, and stops
with exit status 0 on SIGTERM.
"""

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from lmonnx._testing import SOFTMAXES, build_random_lm, make_vocab, random_cutoffs

WORDS = [f"w{i}" for i in range(60)]
SENTENCES = ["w1 w2 w3", "w4 zz w5 w6 w7 w8", "w9", "w10 w11 w12 w13 w14 w15 w16 w17 w18"]
REQUESTS = [  # (path, body): answered equally by the local app and by the deployment
    ("/v1/score", {"sentences": SENTENCES}),
    ("/v1/score", {"sentences": SENTENCES, "per_token": True}),
    ("/v1/predict", {"prefix": "w1 w2", "k": 7}),
    ("/v1/predict", {"prefix": ""}),
    ("/v1/generate", {"prefix": "w3", "words": 15, "seed": 7}),
    ("/v1/generate", {"prefix": "", "words": 12, "temperature": 0.7, "top_k": 5, "seed": 3}),
    ("/v1/score", {"sentences": []}),  # 422, the same message
]
STEP_WORDS = ["w5", "w6", "zz", "w7"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=SOFTMAXES)
def model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("serve_ray") / "m.onnx"
    build_random_lm(path, make_vocab(WORDS[:40]), units=16, layers=2,
                    cutoffs=random_cutoffs(request.param, 44))
    return path


@pytest.fixture(scope="module")
def local_answers(model):
    """The local single-process app's answers to REQUESTS and to a state session."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from lmonnx.serve.app import build_app

    app = build_app(model, providers="cpu", threads=1, watch_disconnects=False)

    async def ask():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://local") as client:
            answers = []
            for path, body in REQUESTS:
                r = await client.post(path, json=body)
                answers.append((r.status_code, r.json()))
            steps = await _session(client)
        return answers, steps

    return asyncio.run(ask())


async def _session(client, header: dict | None = None) -> list:
    """A state after a prefix, stepped word by word, then ended: every answer without ids."""
    r = await client.post("/v1/states", json={"prefix": "w1 w2"})
    assert r.status_code == 200, r.text
    state, out = r.json()["state"], [r.json()["words"]]
    for word in STEP_WORDS + [None]:
        step = {"state": state, "end": True} if word is None else {"state": state, "word": word}
        headers = header(state) if header else None
        r = await client.post("/v1/step", json={"steps": [step]}, headers=headers)
        assert r.status_code == 200, r.text
        result = r.json()["results"][0]
        out.append((result["logprob"], result["ended"], result["words"]))
        state = result["state"] if result["state"] is not None else state
    return out


# ---- the CLI, first: a subprocess with a cluster of its own ---------------------------------

def test_cli_serves_on_ray_and_stops_on_sigterm(model):
    pytest.importorskip("ray.serve")
    httpx = pytest.importorskip("httpx")
    import ray

    if ray.is_initialized():
        pytest.skip("this process holds a Ray cluster; the CLI needs a cluster of its own")
    port = _free_port()
    env = dict(os.environ, RAY_ADDRESS="local")  # never another engineer's `ray start`
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmonnx", "serve", str(model), "--ray", "auto", "--replicas", "2",
         "--port", str(port), "--providers", "cpu"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    try:
        deadline, lines = time.monotonic() + 120, []
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("lmonnx: serving"):
                break
        assert lines and lines[-1].strip() == (
            f"lmonnx: serving {model} on http://127.0.0.1:{port} (Ray Serve, 2 replicas)"), \
            "".join(lines)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/score", json={"sentences": ["w1 w2"]},
                       timeout=30)
        assert r.status_code == 200 and r.json()["results"][0]["tokens"] == 3
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=60)[1]
        assert proc.returncode == 0, rest
        assert "lmonnx: drained and stopped" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_missing_ray_serve_says_which_extra(model, monkeypatch):
    import lmonnx.serve.ray_deployment as serve_ray
    from lmonnx.errors import MissingDependencyError

    monkeypatch.setattr(serve_ray, "_MISSING", "No module named 'ray.serve'")
    for start in (lambda: serve_ray.RayServer(model, replicas=2),
                  lambda: serve_ray.deploy(model, replicas=2)):
        with pytest.raises(MissingDependencyError, match=r"lmonnx\[ray,serve\]"):
            start()


def test_the_driver_checks_the_model_once_before_joining(model, tmp_path, monkeypatch):
    """One check session on the driver, before any cluster; a foreign file fails there."""
    pytest.importorskip("ray.serve")
    import lmonnx.runtime
    import lmonnx.serve.ray_deployment as serve_ray
    from lmonnx.errors import LmonnxError

    opened, steps = [], []

    class Counted(lmonnx.runtime.ModelSession):
        def __init__(self, *args, **kwargs):
            opened.append(args[0])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(lmonnx.runtime, "ModelSession", Counted)
    monkeypatch.setattr(serve_ray, "connect", lambda address: steps.append("join") or True)
    monkeypatch.setattr(serve_ray, "_serve_running", lambda: False)
    monkeypatch.setattr(serve_ray, "_deploy", lambda name, data, **kw: steps.append(
        ("deploy", name, len(data))) or "http://here")
    server = serve_ray.RayServer(model, replicas=2)
    assert opened == [str(model)] and steps == []
    server.connect()
    assert server.deploy() == "http://here"
    assert opened == [str(model)]
    assert steps == ["join", ("deploy", str(model), model.stat().st_size)]
    foreign = tmp_path / "foreign.onnx"
    foreign.write_bytes(b"not a model")
    with pytest.raises(LmonnxError):
        serve_ray.RayServer(foreign)
    assert steps == ["join", ("deploy", str(model), model.stat().st_size)]  # nothing joined


# ---- one deployment for the rest -----------------------------------------------------------

@pytest.fixture(scope="module")
def deployed(model):
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    httpx = pytest.importorskip("httpx")
    from lmonnx.serve.ray_deployment import deploy

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING",
                 log_to_driver=False)
    try:
        url = deploy(model, replicas=2, port=_free_port(), providers="cpu")
        with httpx.Client(base_url=url, timeout=60) as client:
            yield client
    finally:
        serve.shutdown()
        if started:
            ray.shutdown()


def _tag(state_id: str) -> str:
    return state_id.split(".", 1)[0]


@pytest.fixture(scope="module")
def replica_tags(deployed) -> list[str]:
    """Both replicas' tags, from the ids of new states routed at random (power of two
    choices), found once, on the new deployment: after a burst, Serve's cached queue lengths
    may steer a few sequential requests to one replica."""
    tags = []
    for _ in range(64):
        state = deployed.post("/v1/states", json={}).json()["state"]
        if _tag(state) not in tags:
            tags.append(_tag(state))
        if len(tags) == 2:
            break
    return tags


def test_answers_equal_the_local_app(deployed, local_answers):
    answers, _ = local_answers
    for (path, body), (status, local) in zip(REQUESTS, answers):
        for _ in range(3):  # whichever replica answers
            r = deployed.post(path, json=body)
            assert (r.status_code, r.json()) == (status, local), path


def test_requests_spread_over_both_replicas(deployed, replica_tags):
    tags = replica_tags
    assert len(tags) == 2, tags
    for tag in tags:  # the session header names the replica: StateRouter routes by it
        for _ in range(4):
            state = deployed.post("/v1/states", headers={"x-session-id": f"{tag}.x"},
                                  json={}).json()["state"]
            assert _tag(state) == tag

    def scored(tag):  # /metrics of one replica: routed there by the session header
        text = deployed.get("/metrics", headers={"x-session-id": f"{tag}.metrics"}).text
        found = re.search(r'^lmonnx_requests_total\{endpoint="/v1/score",status="200"\} (\S+)',
                          text, re.M)
        return float(found.group(1)) if found else 0.0

    before = [scored(t) for t in tags]
    for _ in range(24):
        assert deployed.post("/v1/score", json={"sentences": ["w1 w2"]}).status_code == 200
    after = [scored(t) for t in tags]
    gained = [a - b for a, b in zip(after, before)]
    assert sum(gained) == 24 and min(gained) > 0, gained


@pytest.mark.parametrize("routing", ["session_header", "forwarded", "no_header"])
def test_state_session(deployed, local_answers, replica_tags, routing):
    """Steps reach the state's replica: by the session header, by a header that names the
    other replica (forwarded in one hop), or without a header (either)."""
    httpx = pytest.importorskip("httpx")
    _, local_steps = local_answers
    tags = replica_tags

    def header(state):
        if routing == "session_header":
            return {"x-session-id": state}
        if routing == "forwarded":
            other = next(t for t in tags if t != _tag(state))
            return {"x-session-id": f"{other}.elsewhere"}
        return None

    async def run():
        async with httpx.AsyncClient(base_url=str(deployed.base_url), timeout=60) as client:
            return await _session(client, header)

    assert asyncio.run(run()) == local_steps


def test_states_of_another_replica_are_forwarded_and_deleted(deployed, replica_tags):
    tags = replica_tags
    assert len(tags) == 2
    states = {}
    while len(states) < 2:
        state = deployed.post("/v1/states", json={"prefix": "w3"}).json()["state"]
        states.setdefault(_tag(state), state)
    a, b = states[tags[0]], states[tags[1]]
    # Two states of one replica in one step, sent to the other replica: forwarded.
    a2 = deployed.post("/v1/states", headers={"x-session-id": a}, json={"prefix": "w4"})
    assert _tag(a2.json()["state"]) == tags[0]  # the header routed /v1/states too
    r = deployed.post("/v1/step", headers={"x-session-id": b},
                      json={"steps": [{"state": a, "word": "w1"},
                                      {"state": a2.json()["state"], "word": "w2"}]})
    assert r.status_code == 200, r.text
    assert {_tag(x["state"]) for x in r.json()["results"]} == {tags[0]}
    # States of two replicas in one step: refused in one line.
    r = deployed.post("/v1/step", json={"steps": [{"state": a, "word": "w1"},
                                                  {"state": b, "word": "w1"}]})
    assert r.status_code == 404 and "different replicas" in r.json()["error"]["message"]
    # DELETE reaches the owner, from either replica; then the state is gone.
    r = deployed.delete(f"/v1/states/{a}", headers={"x-session-id": b})
    assert (r.status_code, r.json()) == (200, {"deleted": a})
    r = deployed.delete(f"/v1/states/{a}")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"
    r = deployed.post("/v1/step", json={"steps": [{"state": a, "word": "w1"}]})
    assert r.status_code == 404
    assert deployed.post("/v1/step", json={"steps": [{"state": b, "end": True}]}).json()[
        "results"][0]["ended"] is True


def test_many_session_requests_at_once_each_reach_their_replica(deployed, replica_tags):
    """A burst of requests of both replicas' sessions, all in flight at once: each is routed
    to the replica its session header names, none to the other."""
    httpx = pytest.importorskip("httpx")
    tags = replica_tags
    assert len(tags) == 2

    async def burst():
        async with httpx.AsyncClient(base_url=str(deployed.base_url), timeout=60) as client:
            asks = [client.post("/v1/states", headers={"x-session-id": f"{tags[i % 2]}.s{i}"},
                                json={"prefix": "w1 w2"}) for i in range(64)]
            return [r.json()["state"] for r in await asyncio.gather(*asks)]

    states = asyncio.run(burst())
    assert [_tag(s) for s in states] == [tags[i % 2] for i in range(64)]
