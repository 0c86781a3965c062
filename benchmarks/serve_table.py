"""``lmonnx serve`` under load on loopback, beside ``Scorer.score`` in-process, in one run.

    python benchmarks/serve_table.py --corpus ptb.test.txt [--model model.onnx] [--quick]

Every row scores PTB test sentences (cycled from the first line, the same ones for every
method of a row) on one model and prints sentences/s, requests/s, p50/p95/p99 latency, 429s,
errors, the two ratios and the CPU each side burnt:

  in-process   ``Scorer.score`` on the same sentences in calls of ``--inprocess-batch`` (64):
               the ceiling, no HTTP; latency is one call's; requests/s is sentences/s / k;
  batched      a real ``python -m lmonnx serve MODEL`` subprocess with its defaults
               (``--max-wait-ms 2 --max-batch-sentences 64``);
  unbatched    the same server with ``--max-batch-sentences 1``: one sentence per
               onnxruntime call, the baseline batching is measured against;
  (--variant)  further servers: ``LABEL=FLAGS``, e.g. ``wait0=--max-wait-ms 0``; the pseudo
               flag ``--uvicorn=LOOP:HTTP`` (``asyncio:h11``) runs uvicorn with that event
               loop and HTTP parser instead of what it picks (uvloop + httptools when
               installed).

Requests: ``single`` (one sentence each) and ``nbest`` (8 hypotheses each: a PTB sentence
and 7 copies with a word deleted, replaced or two words swapped).  Load: async httpx, one
client per server and row holding ``C`` connections, on uvloop when installed
(``--client-loop``), on one CPU (``--client-cpu``).  The load client shares the two cores
with the server, so what it burns per request the server does not get; by default
(``--client-pool transport``) each distinct request is built once as an ``httpx.Request``
and then sent through httpx's transport (httpcore's HTTP/1.1 connection, h11) on a free
list of connections, O(1) a request, over asyncio's streams.  Measured at C = 32 on the
2x64 model: the client's CPU fell from 0.72 to 0.55 cores and the server's requests/s rose
by 1.4x against ``httpx.AsyncClient.post`` on the same free list (``freelist``: URL merging,
cookies, auth and redirects, an ``httpx.Response`` per request); httpcore's own pool
(``httpx``) scans every connection for every request, 3x fewer requests/s at C = 32;
``aiohttp`` (C-accelerated parser) takes less still.  Closed
loop (C workers, each sending its next request when the last returns; a 429 is retried after
5 ms) or, with ``--mode open``, Poisson arrivals at ``--rates`` requests/s with at most
``--max-inflight`` in flight (arrivals past the cap are dropped, counted; latency from the
scheduled arrival, so a stalled server is not hidden).  Each server's client warms up once a
row (connections opened, server warm); then a row's methods run ``--repeats`` slices of
``--seconds`` (or ``--requests``) each, in rotated order (ABC BCA CAB ...), each method's
slices added up, so drifting load from other users hits every method alike and no method
holds a place; while the 95% interval of batched/unbatched straddles the goal, those two run
more rounds (``--max-repeats``).  All server processes of a model are up at once (idle
ones cost nothing) and stopped with SIGTERM at the end; each must drain and exit 0.

CPU columns, in cores of this machine (``os.cpu_count()``): ``client`` is this process's CPU
time over the row's wall time (the load generator; for in-process rows, the scoring itself),
``server`` the server process's (``/proc/PID/stat``), ``others`` every other process's
(``/proc/stat`` less the two: other users of a shared machine).  They share the same cores, so the
client's share is capacity the server did not get.

Models: ``2x200`` (V = 10,000, embedding 10, the course's PTB shape) and ``2x64``
(V = 3,000, embedding 7), random weights over the corpus's most frequent words (speed does
not depend on trained weights); ``--model PATH`` replaces the 2x200 one by a trained model.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import itertools
import json
import math
import os
import platform
import queue
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `lmonnx serve` sets it: fair ceiling

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_model  # noqa: E402

MODELS = {"2x200": dict(layers=2, units=200, vocab=10_000),
          "2x64": dict(layers=2, units=64, vocab=3_000)}
CONCURRENCIES = (1, 8, 32, 128)
KINDS = ("single", "nbest")
NBEST = 8
GOAL_SERVER_VS_INPROCESS = {"2x200": 0.6, "2x64": 0.3}  # at C=32, single-sentence requests
GOAL_BATCHED_VS_UNBATCHED = 0.95
GOAL_CONCURRENCY = 32
HEADERS = {"content-type": "application/json"}
READY_LINE = re.compile(r"lmonnx: serving .* on (http://\S+)")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# ---- inputs ----------------------------------------------------------------------------------

def read_sentences(path: Path) -> list[str]:
    return [line.strip() for line in path.open(encoding="utf-8") if line.strip()]


def random_model(directory: Path, lines: list[str], *, layers: int, units: int, vocab: int,
                 seed: int = 0) -> Path:
    """A random-weight lmonnx model over the corpus's ``vocab - 4`` most frequent words
    (filler words past the corpus's own), embedding ``int(vocab ** 0.25)`` (the course's)."""
    from lmonnx._testing import build_random_lm, make_vocab

    counts = Counter(w for line in lines for w in line.split())
    counts.pop("<unk>", None)
    words = [w for w, _ in counts.most_common(vocab - 4)]
    words += [f"filler{i}" for i in range(vocab - 4 - len(words))]
    path = directory / f"random_{layers}x{units}_v{vocab}.onnx"
    build_random_lm(path, make_vocab(words), units=units, layers=layers,
                    embedding_dim=max(1, int(vocab ** 0.25)), seed=seed)
    return path


def nbest_list(sentence: str, rng: np.random.Generator, pool: list[str], n: int = NBEST):
    """``sentence`` and ``n - 1`` hypotheses near it: a word deleted, replaced by a corpus
    word, or two neighbours swapped (what a recogniser's n-best list looks like)."""
    words = sentence.split()
    out = [sentence]
    while len(out) < n:
        w = list(words)
        op = int(rng.integers(3)) if len(w) > 1 else 1
        i = int(rng.integers(len(w))) if w else 0
        if op == 0:
            del w[i]
        elif op == 1 and w:
            w[i] = pool[int(rng.integers(len(pool)))]
        elif op == 2:
            i = min(i, len(w) - 2)
            w[i], w[i + 1] = w[i + 1], w[i]
        out.append(" ".join(w))
    return out


def request_sets(lines: list[str], kinds, seed: int = 0) -> dict[str, list[list[str]]]:
    """Each kind's requests, in order: lists of sentences."""
    out = {}
    if "single" in kinds:
        out["single"] = [[s] for s in lines]
    if "nbest" in kinds:
        rng = np.random.default_rng(seed)
        pool = sorted({w for line in lines[:2000] for w in line.split()})
        out["nbest"] = [nbest_list(s, rng, pool) for s in lines]
    return out


# ---- one row's numbers -------------------------------------------------------------------------

@dataclass
class Sample:
    """What one method did in one row."""

    sentences: int = 0
    requests: int = 0
    seconds: float = 0.0
    latencies: list = field(default_factory=list)
    rejected: int = 0
    errors: int = 0
    dropped: int = 0
    client_cpu: float = 0.0  # CPU seconds of this process
    server_cpu: float = math.nan  # CPU seconds of the server process
    machine_cpu: float = math.nan  # CPU seconds of every process on the machine
    first_error: str = ""

    def __iadd__(self, other: "Sample") -> "Sample":
        """Add another slice of the same method and row."""
        for name in ("sentences", "requests", "seconds", "rejected", "errors", "dropped",
                     "client_cpu", "server_cpu", "machine_cpu"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.latencies += other.latencies
        self.first_error = self.first_error or other.first_error
        return self

    @property
    def other_cpu(self) -> float:
        """CPU seconds of the processes that are neither client nor server (other users)."""
        server = 0.0 if math.isnan(self.server_cpu) else self.server_cpu
        return self.machine_cpu - self.client_cpu - server

    @property
    def sentences_per_s(self) -> float:
        return self.sentences / self.seconds if self.seconds else 0.0

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) * 1e3 if self.latencies else math.nan

    def cores(self, cpu: float) -> float:
        return cpu / self.seconds if self.seconds else math.nan


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def machine_cpu() -> float:
    """CPU seconds busy on the whole machine so far (``/proc/stat``: all but idle and
    iowait)."""
    try:
        with open("/proc/stat") as fh:
            values = [int(v) for v in fh.readline().split()[1:]]
    except OSError:
        return math.nan
    return (sum(values[:8]) - values[3] - values[4]) / CLOCK_TICKS


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from ``/proc``."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return math.nan
    fields = text.rsplit(")", 1)[1].split()  # after "pid (comm)": state is field 3
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def in_process(scorer, requests: list[list[str]], batch: int, seconds: float | None,
               count: int | None) -> Sample:
    """``Scorer.score`` on the requests' sentences, ``batch`` per call, from the first one on."""
    sentences = [s for r in requests for s in r]
    per_request = len(requests[0])
    sample = Sample()
    cpu, machine = own_cpu(), machine_cpu()
    start = time.perf_counter()
    stop = start + seconds if seconds is not None else math.inf
    limit = count * per_request if count is not None else math.inf
    i = 0
    while time.perf_counter() < stop and sample.sentences < limit:
        chunk = [sentences[(i + j) % len(sentences)] for j in range(batch)]
        i += batch
        t = time.perf_counter()
        scored = scorer.score(chunk)
        sample.latencies.append(time.perf_counter() - t)
        sample.sentences += len(scored)
    sample.seconds = time.perf_counter() - start
    sample.requests = sample.sentences // per_request
    sample.client_cpu = own_cpu() - cpu
    sample.machine_cpu = machine_cpu() - machine
    return sample


class _Load:
    """The bookkeeping of one load run."""

    def __init__(self, client, url: str, bodies: list[bytes], sizes: list[int]):
        self.client, self.url, self.bodies, self.sizes = client, url, bodies, sizes
        self.sample = Sample()

    async def send(self, i: int, sent_at: float | None = None) -> int:
        """Post request ``i``; its HTTP status, or 0 on a transport error."""
        k = i % len(self.bodies)
        t = time.perf_counter() if sent_at is None else sent_at
        s = self.sample
        try:
            response = await self.client.post(self.url, content=self.bodies[k], headers=HEADERS)
        except Exception as exc:  # noqa: BLE001 - counted, the run goes on
            s.errors += 1
            s.first_error = s.first_error or f"{type(exc).__name__}: {exc}"
            return 0
        status = response.status_code
        if status == 200 and response.content.count(b'"logprob"') == self.sizes[k]:
            s.latencies.append(time.perf_counter() - t)
            s.requests += 1
            s.sentences += self.sizes[k]
        elif status == 429:
            s.rejected += 1
        else:
            s.errors += 1
            s.first_error = s.first_error or f"HTTP {status}: {response.text[:200]}"
        return status


async def closed_loop(client, url, bodies, sizes, concurrency: int, seconds: float | None = None,
                      count: int | None = None) -> Sample:
    """``concurrency`` workers, each sending its next request when the last returns, for
    ``seconds`` (requests started before the end are awaited) or ``count`` requests."""
    load = _Load(client, url, bodies, sizes)
    numbers = itertools.count()
    start = time.perf_counter()
    stop = start + seconds if seconds is not None else math.inf

    async def worker():
        while time.perf_counter() < stop:
            i = next(numbers)
            if count is not None and i >= count:
                return
            if await load.send(i) == 429:
                await asyncio.sleep(0.005)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    load.sample.seconds = time.perf_counter() - start
    return load.sample


async def open_loop(client, url, bodies, sizes, rate: float, max_inflight: int,
                    seconds: float | None = None, count: int | None = None,
                    seed: int = 0) -> Sample:
    """Poisson arrivals at ``rate`` requests/s for ``seconds`` (or ``count`` arrivals), at
    most ``max_inflight`` in flight: an arrival past the cap is dropped (counted).  Latency
    runs from the scheduled arrival."""
    load = _Load(client, url, bodies, sizes)
    rng = np.random.default_rng(seed)
    tasks: set[asyncio.Task] = set()
    start = time.perf_counter()
    at = start
    for i in itertools.count():
        at += float(rng.exponential(1.0 / rate))
        if (seconds is not None and at - start >= seconds) or (count is not None and i >= count):
            break
        delay = at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(tasks) >= max_inflight:
            load.sample.dropped += 1
            continue
        task = asyncio.ensure_future(load.send(i, sent_at=at))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)
    load.sample.seconds = time.perf_counter() - start
    return load.sample


class AsyncioStream:
    """An httpcore network stream on asyncio's streams: httpcore's default (anyio) opens a
    cancel scope around every read and write, a third of the load client's CPU per request."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._reader, self._writer = reader, writer

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        if timeout is None:
            return await self._reader.read(max_bytes)
        async with asyncio.timeout(timeout):
            return await self._reader.read(max_bytes)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._writer.write(buffer)
        if self._writer.transport.get_write_buffer_size() > 1 << 16:
            await self._writer.drain()

    async def aclose(self) -> None:
        self._writer.close()

    def get_extra_info(self, info: str):
        if info == "is_readable":  # httpcore's check of an idle keep-alive connection
            return self._reader.at_eof() or bool(self._reader._buffer)  # noqa: SLF001
        return self._writer.get_extra_info(info)


class AsyncioBackend:
    """httpcore's network backend on asyncio (see :class:`AsyncioStream`)."""

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None, socket_options=None):
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        return AsyncioStream(reader, writer)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class FreeListTransport:
    """An ``httpx`` transport whose pool is a free list of at most ``size`` keep-alive
    connections: O(1) a request.  httpcore's own pool scans every connection for every
    queued request (``_assign_requests_to_connections``: 2.2 M ``is_idle`` calls for 900
    requests at 32 connections), which makes the client, not the server, the bottleneck
    past a few connections on a 2-core machine (``--client-pool httpx`` measures it)."""

    def __init__(self, size: int):
        import httpcore

        self._httpcore = httpcore
        self._backend = AsyncioBackend()
        self._idle: list = []
        self._slots = asyncio.Semaphore(size)

    async def handle_async_request(self, request):
        import httpx

        status, headers, body = await self.exchange(core_request(request))
        return httpx.Response(status_code=status, headers=headers, content=body)

    async def exchange(self, request) -> tuple[int, list, bytes]:
        """Send an ``httpcore.Request`` on a free connection: (status, headers, body)."""
        httpcore = self._httpcore
        url = request.url
        async with self._slots:
            connection = self._idle.pop() if self._idle else httpcore.AsyncHTTPConnection(
                httpcore.Origin(url.scheme, url.host, url.port), keepalive_expiry=60,
                network_backend=self._backend)
            try:
                response = await connection.handle_async_request(request)
                body = await response.aread()
                await response.aclose()
            except BaseException:
                await connection.aclose()
                raise
            if connection.is_available():
                self._idle.append(connection)
            else:
                await connection.aclose()
        return response.status, response.headers, body

    async def aclose(self) -> None:
        while self._idle:
            await self._idle.pop().aclose()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


def core_request(request):
    """The ``httpcore.Request`` an ``httpx.Request`` sends (its stream can be sent again)."""
    import httpcore

    url = request.url
    return httpcore.Request(
        method=request.method,
        url=httpcore.URL(scheme=url.raw_scheme, host=url.raw_host, port=url.port,
                         target=url.raw_path),
        headers=request.headers.raw, content=request.stream, extensions=request.extensions)


class _Response:
    """What the load generator reads of an answer."""

    __slots__ = ("status_code", "content")

    def __init__(self, status: int, content: bytes):
        self.status_code, self.content = status, content

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")


class TransportClient:
    """The load generator's ``post`` on httpx's transport layer (``--client-pool
    transport``, the default): each distinct request is built once as an ``httpx.Request``
    (by an ``httpx.AsyncClient``, timeout included) and then sent again and again through
    :class:`FreeListTransport` (httpcore and h11, as every httpx request).  What it skips
    per request is the ``AsyncClient`` layer a load generator does not use -- URL merging,
    the cookie jar, auth and redirect handling, building an ``httpx.Response`` -- which took
    a third of the client's CPU at 32 callers (py-spy), CPU the server gets instead on
    2 cores."""

    def __init__(self, concurrency: int):
        import httpx

        self._transport = FreeListTransport(concurrency)
        self._client = httpx.AsyncClient(transport=self._transport, timeout=120.0)
        self._prepared: dict = {}

    def prepare(self, url: str, bodies: list[bytes], headers: dict = HEADERS) -> None:
        """Build the requests of ``bodies`` now, not during the timed slices."""
        for body in bodies:
            self._request(url, body, headers)

    def _request(self, url: str, content: bytes, headers: dict):
        key = (url, content)  # bytes cache their hash: a cheap lookup
        request = self._prepared.get(key)
        if request is None:
            request = self._prepared[key] = core_request(
                self._client.build_request("POST", url, content=content, headers=headers))
        return request

    async def post(self, url: str, content: bytes, headers: dict) -> _Response:
        status, _, body = await self._transport.exchange(self._request(url, content, headers))
        return _Response(status, body)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        await self._client.aclose()


class AiohttpClient:
    """The load generator's ``post`` on an ``aiohttp`` session of ``concurrency``
    connections (``--client-pool aiohttp``): its C-accelerated HTTP parser costs the client
    about half the CPU per request of httpx's (h11 in Python), CPU the server gets instead
    on a 2-core machine."""

    def __init__(self, concurrency: int):
        import aiohttp

        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=concurrency),
            timeout=aiohttp.ClientTimeout(total=120))

    async def post(self, url: str, content: bytes, headers: dict):
        async with self._session.post(url, data=content, headers=headers) as response:
            return _Response(response.status, await response.read())

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        await self._session.close()


CLIENT_POOLS = {"transport": "transport, prepared requests",
                "freelist": "AsyncClient on a free list", "httpx": "AsyncClient, its own pool",
                "aiohttp": "aiohttp"}


def make_client(concurrency: int, pool: str = "transport"):
    """The load generator's client, ``concurrency`` connections: httpx's transport sent
    prepared requests (``transport``, the default: :class:`TransportClient`), an
    ``httpx.AsyncClient`` on the free-list transport (``freelist``) or on httpx's own pool
    (``httpx``), or an aiohttp session (``aiohttp``)."""
    import httpx

    if pool == "transport":
        return TransportClient(concurrency)
    if pool == "aiohttp":
        return AiohttpClient(concurrency)
    if pool == "httpx":
        limits = httpx.Limits(max_connections=concurrency,
                              max_keepalive_connections=concurrency)
        return httpx.AsyncClient(limits=limits, timeout=120.0)
    return httpx.AsyncClient(transport=FreeListTransport(concurrency), timeout=120.0)


def prepare(client, url: str, bodies: list[bytes]) -> None:
    """Let a client that prepares its requests (:class:`TransportClient`) build them now."""
    if hasattr(client, "prepare"):
        client.prepare(url, bodies)


@contextlib.contextmanager
def pinned_to(cpu: int | None):
    """Run this thread (the load generator) on ``cpu`` only, if given, then as before.  Left
    free, the scheduler moves the client and the server's threads between the two cores
    from slice to slice, and one server's C = 1 throughput drifts +-10% between slices
    while identical servers differ; pinned, identical servers measure within 2%."""
    if cpu is None or not hasattr(os, "sched_setaffinity"):
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def run_async(coroutine, loop: str = "uvloop"):
    """Run ``coroutine`` on a fresh event loop: uvloop's when asked and installed."""
    if loop == "uvloop" and _installed("uvloop"):
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coroutine)
    return asyncio.run(coroutine)


def encode(requests: list[list[str]]) -> tuple[list[bytes], list[int]]:
    """Each request's ``/v1/score`` body and its sentence count."""
    return [json.dumps({"sentences": r}).encode() for r in requests], [len(r) for r in requests]


async def server_slice(client, url: str, bodies, sizes, *, concurrency: int, mode: str,
                       seconds: float | None, count: int | None, rate: float = 0,
                       pid: int | None = None) -> Sample:
    """One timed run of load on an open client, with the CPU each side burnt."""
    cpu, server, machine = own_cpu(), process_cpu(pid) if pid else math.nan, machine_cpu()
    if mode == "open":
        sample = await open_loop(client, url, bodies, sizes, rate, concurrency, seconds, count)
    else:
        sample = await closed_loop(client, url, bodies, sizes, concurrency, seconds, count)
    sample.client_cpu = own_cpu() - cpu
    sample.machine_cpu = machine_cpu() - machine
    if pid:
        sample.server_cpu = process_cpu(pid) - server
    return sample


async def run_load(url: str, requests: list[list[str]], *, concurrency: int, mode: str,
                   seconds: float | None, count: int | None, warmup: float, rate: float = 0,
                   pid: int | None = None, pool: str = "transport") -> Sample:
    """One load run on its own client: a fresh client whose pool holds ``concurrency``
    connections, a warm-up (connections opened, server warm), then the timed run."""
    bodies, sizes = encode(requests)
    async with make_client(concurrency, pool) as client:
        prepare(client, url, bodies)
        if warmup > 0:
            await closed_loop(client, url, bodies, sizes, concurrency, seconds=warmup)
        return await server_slice(client, url, bodies, sizes, concurrency=concurrency,
                                  mode=mode, seconds=seconds, count=count, rate=rate, pid=pid)


# ---- the server process ----------------------------------------------------------------------

_UVICORN_BOOT = """\
import sys, uvicorn
_loop, _http = sys.argv.pop(1).split(":")
_init = uvicorn.Config.__init__
def _config(self, *args, **kwargs):
    kwargs["loop"], kwargs["http"] = _loop, _http
    _init(self, *args, **kwargs)
uvicorn.Config.__init__ = _config
from lmonnx.cli import main
sys.exit(main(sys.argv[1:]))
"""


def server_command(model: Path, flags: list[str]) -> list[str]:
    """``python -m lmonnx serve MODEL --port 0 --providers cpu FLAGS`` (port 0: the kernel
    picks one, read back from the ready line); ``--uvicorn=LOOP:HTTP`` runs the same CLI
    with uvicorn's loop and parser forced."""
    uvicorn_choice = [f.split("=", 1)[1] for f in flags if f.startswith("--uvicorn=")]
    flags = [f for f in flags if not f.startswith("--uvicorn=")]
    serve = ["serve", str(model), "--host", "127.0.0.1", "--port", "0", "--providers", "cpu",
             *flags]
    if uvicorn_choice:
        return [sys.executable, "-c", _UVICORN_BOOT, uvicorn_choice[-1], *serve]
    return [sys.executable, "-m", "lmonnx", *serve]


class ServerProcess:
    """A ``lmonnx serve`` subprocess: started, waited for (its ready line, then ``/ready``
    200), stopped with SIGTERM (:meth:`stop` returns the exit status)."""

    def __init__(self, model: Path, flags: list[str], label: str = "server"):
        self.command = server_command(model, flags)
        self.label = label
        self.url = ""
        self.proc: subprocess.Popen | None = None
        self.log: deque[str] = deque(maxlen=200)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self, timeout: float = 180.0) -> "ServerProcess":
        import httpx

        self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, errors="replace")
        lines: queue.Queue = queue.Queue()

        def pump():  # stderr must be read all along, or a chatty server blocks on the pipe
            for line in self.proc.stderr:
                self.log.append(line.rstrip())
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True, name=f"{self.label}-stderr").start()
        deadline = time.monotonic() + timeout
        while not self.url:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"{self.label} did not start: {' '.join(self.command)}\n"
                                   + "\n".join(self.log))
            match = READY_LINE.search(line)
            if match:
                self.url = match.group(1)
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/ready", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"{self.label}: /ready never answered 200")

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (drain), wait; the exit status (-9 when it had to be killed)."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return -9

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def agree(url: str, scorer, sentences: list[str]) -> bool:
    """The server's logprobs are ``Scorer.score``'s, bit for bit (through JSON)."""
    import httpx

    answer = httpx.post(url + "/v1/score", json={"sentences": sentences}, timeout=60).json()
    served = [r["logprob"] for r in answer["results"]]
    return served == [s.logprob for s in scorer.score(sentences)]


# ---- the table -------------------------------------------------------------------------------

@dataclass
class Method:
    name: str
    server: ServerProcess | None = None  # None: in-process


def measure_row(methods: list[Method], scorer, requests, *, concurrency: int, args,
                rate: float = 0):
    """Every method on the same requests, ``args.repeats`` slices each, the slices of a method
    added up: ``({method: Sample}, batched/unbatched interval or None)``.  Each server gets
    one client for the row, warmed up once; the slices then run in rotated order (ABC BCA CAB
    ...): load that drifts during the row hits every method alike, and no method holds a
    place in the order.  (Mirrored order, ABC CBA, ran the edge methods twice in a row at
    every turn and the middle one never: identical servers measured 2-4% apart by their
    place.)  While the batched/unbatched interval straddles the goal, batched and unbatched
    alone run more rounds (alternating which goes first), up to ``args.max_repeats`` rounds
    in all: on 2 cores shared with other users one C = 1 slice's throughput varies by 14%
    (standard deviation between identical servers' paired slices), so 30 rounds still leave
    +-5% on the ratio."""
    return run_async(_measure_row(methods, scorer, requests, concurrency=concurrency,
                                  args=args, rate=rate), args.client_loop)


async def _measure_row(methods, scorer, requests, *, concurrency, args, rate):
    bodies, sizes = encode(requests)
    total: dict[str, Sample] = {}
    rounds: list[dict[str, Sample]] = []
    async with contextlib.AsyncExitStack() as stack:
        clients = {}
        for method in methods:
            if method.server is not None:
                client = await stack.enter_async_context(
                    make_client(concurrency, args.client_pool))
                prepare(client, method.server.url + "/v1/score", bodies)
                if args.warmup > 0:
                    with pinned_to(args.client_cpu):
                        await closed_loop(client, method.server.url + "/v1/score", bodies,
                                          sizes, concurrency, seconds=args.warmup)
                clients[method.name] = client
        compared = [m for m in methods if m.name in ("batched", "unbatched")]
        while True:
            if len(rounds) < args.repeats:  # whole rotations (main makes it a multiple)
                order = methods
            elif (len(compared) == 2 and len(rounds) < args.max_repeats
                  and undecided(rounds)):
                order = compared  # settling batched/unbatched: only those two run on
            else:
                break
            turn = len(rounds) % len(order)  # rotated; for the two, alternating
            rounds.append({})
            for method in order[turn:] + order[:turn]:
                if method.server is None:
                    sample = in_process(scorer, requests, args.inprocess_batch, args.seconds,
                                        args.requests)
                else:
                    with pinned_to(args.client_cpu):
                        sample = await server_slice(
                            clients[method.name], method.server.url + "/v1/score", bodies,
                            sizes, concurrency=concurrency, mode=args.mode,
                            seconds=args.seconds, count=args.requests, rate=rate,
                            pid=method.server.pid)
                rounds[-1][method.name] = sample
                if method.name in total:
                    total[method.name] += sample
                else:
                    total[method.name] = sample
    return total, paired_interval(rounds)


def paired_interval(rounds: list[dict[str, Sample]]) -> tuple[float, float, int] | None:
    """The 95% confidence interval of batched/unbatched throughput from each round's pair of
    slices (a t interval on the log ratios: drift that hits both slices of a round cancels),
    and the rounds it rests on; None without both methods or with fewer than 3 rounds."""
    ratios = [math.log(r["batched"].sentences_per_s / r["unbatched"].sentences_per_s)
              for r in rounds if "batched" in r and "unbatched" in r
              and r["batched"].sentences_per_s > 0 and r["unbatched"].sentences_per_s > 0]
    n = len(ratios)
    if n < 3:
        return None
    mean = sum(ratios) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in ratios) / (n - 1))
    half = _t975(n - 1) * sd / math.sqrt(n)
    return math.exp(mean - half), math.exp(mean + half), n


def undecided(rounds: list[dict[str, Sample]]) -> bool:
    """Whether the batched/unbatched interval still straddles the goal: another round may
    settle which side of it batching is (more slices, never a different rule)."""
    interval = paired_interval(rounds)
    return interval is not None and interval[0] < GOAL_BATCHED_VS_UNBATCHED < interval[1]


def _t975(df: int) -> float:
    """Student's t 97.5% quantile for ``df`` degrees of freedom (table, rounded down df)."""
    table = {2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
             10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021,
             60: 2.000, 120: 1.980}
    if df < 2:
        return 12.706
    return table[max(k for k in table if k <= df)]


HEADER = (f"{'model':<6} {'req':<6} {'C':>4} {'method':<12} {'sent/s':>8} {'req/s':>8} "
          f"{'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'429':>5} {'err':>4} {'drop':>4} "
          f"{'/inproc':>7} {'/unbat':>7} {'client':>6} {'server':>6} {'others':>6}")


def format_row(model: str, kind: str, load: str, name: str, s: Sample, inproc: Sample | None,
               unbatched: Sample | None, cores: int) -> str:
    def ratio(ref):
        if ref is None or not ref.sentences_per_s or ref is s:
            return f"{'':>7}"
        return f"{s.sentences_per_s / ref.sentences_per_s:>6.2f}x"

    def share(cpu):  # cores busy, out of this machine's
        value = s.cores(cpu)
        return f"{value:>6.2f}" if not math.isnan(value) else f"{'-':>6}"

    return (f"{model:<6} {kind:<6} {load:>4} {name:<12} {s.sentences_per_s:>8,.0f} "
            f"{s.requests_per_s:>8,.0f} {s.percentile_ms(50):>8.1f} {s.percentile_ms(95):>8.1f} "
            f"{s.percentile_ms(99):>8.1f} {s.rejected:>5} {s.errors:>4} {s.dropped:>4} "
            f"{ratio(inproc)} {ratio(unbatched)} {share(s.client_cpu)} {share(s.server_cpu)} "
            f"{share(s.other_cpu)}")


def parse_variants(items: list[str]) -> list[tuple[str, list[str]]]:
    out = []
    for item in items:
        label, _, flags = item.partition("=")
        if not label or not _:
            raise SystemExit(f"serve_table: --variant wants LABEL=FLAGS, got {item!r}")
        out.append((label, shlex.split(flags)))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=None,
                        help="PTB test text, one sentence a line (required)")
    parser.add_argument("--model", type=Path, default=None,
                        help="a trained .onnx in place of the random 2x200 model")
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"which of {', '.join(MODELS)} (default both)")
    parser.add_argument("--concurrency", default=",".join(map(str, CONCURRENCIES)),
                        help="closed loop: concurrent callers; open loop: the in-flight cap "
                             "(default 1,8,32,128)")
    parser.add_argument("--kinds", default=",".join(KINDS), help="single,nbest")
    parser.add_argument("--methods", default="inprocess,batched,unbatched",
                        help="which of inprocess, batched, unbatched (variants always run)")
    parser.add_argument("--variant", action="append", default=[], metavar="LABEL=FLAGS",
                        help="one more server, e.g. 'wait0=--max-wait-ms 0' or "
                             "'h11=--uvicorn=asyncio:h11' (repeatable)")
    parser.add_argument("--mode", choices=("closed", "open"), default="closed")
    parser.add_argument("--rates", default="200,1000",
                        help="open loop: arrival rates, requests/s (default 200,1000)")
    parser.add_argument("--seconds", type=float, default=0.5,
                        help="per slice (method, row, repeat); default 0.5")
    parser.add_argument("--requests", type=int, default=None,
                        help="a fixed number of requests per method and row instead of "
                             "--seconds")
    parser.add_argument("--warmup", type=float, default=0.3,
                        help="seconds of load on each server before a row's slices")
    parser.add_argument("--repeats", type=int, default=9,
                        help="slices per method and row, in rotated order, added up (default "
                             "9: a multiple of the methods, so each holds each place alike)")
    parser.add_argument("--max-repeats", type=int, default=120,
                        help="more rounds of batched and unbatched alone, up to this many "
                             "in all, while the 95%% interval of batched/unbatched straddles "
                             "the goal (default 120)")
    parser.add_argument("--inprocess-batch", type=int, default=64,
                        help="sentences per Scorer.score call in the ceiling row (default 64)")
    parser.add_argument("--client-pool", choices=tuple(CLIENT_POOLS),
                        default="transport",
                        help="the load generator: httpx's transport sent prepared requests "
                             "over a free list of connections (default), httpx.AsyncClient "
                             "on that free list (a third more client CPU a request), "
                             "httpx.AsyncClient on its own pool (O(connections) a request: "
                             "the client saturates first), or aiohttp")
    parser.add_argument("--providers", choices=("cpu", "cuda"), default="cpu",
                        help="onnxruntime provider of the servers and of the in-process rows "
                             "(default cpu)")
    parser.add_argument("--client-loop", choices=("uvloop", "asyncio"), default="uvloop",
                        help="the load generator's event loop (uvloop when installed)")
    parser.add_argument("--client-cpu", default="last",
                        help="the CPU the load generator runs on during server rows: 'last' "
                             "(default: the highest-numbered CPU this process may use), a "
                             "number, or 'free' (the scheduler's choice); servers and "
                             "in-process rows may use every CPU")
    parser.add_argument("--quick", action="store_true",
                        help="3 slices of 0.5 s (more for batched/unbatched while undecided), "
                             "concurrency 1,32, single requests")
    args = parser.parse_args(argv)
    if args.client_pool == "aiohttp" and not _installed("aiohttp"):
        print("serve_table: --client-pool aiohttp needs aiohttp (pip install aiohttp)",
              file=sys.stderr)
        return 2
    if args.corpus is None or not args.corpus.is_file():
        print(f"serve_table: corpus not found: {args.corpus} (give --corpus PATH, e.g. PTB "
              "test: ptb.test.txt)", file=sys.stderr)
        return 2
    if args.quick:
        args.seconds, args.repeats, args.warmup = 0.5, 3, 0.2
        if args.concurrency == ",".join(map(str, CONCURRENCIES)):
            args.concurrency = "1,32"
        if args.kinds == ",".join(KINDS):
            args.kinds = "single"
    if args.requests is not None:
        args.seconds = None
    args.client_cpu = client_cpu(args.client_cpu)
    methods_per_row = len(args.methods.split(",")) + len(args.variant)
    args.repeats = -(-args.repeats // methods_per_row) * methods_per_row  # each holds each place
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"--models: unknown {unknown}; known {list(MODELS)}")
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    kinds = [k for k in args.kinds.split(",") if k]
    wanted = set(args.methods.split(","))
    rates = [float(r) for r in args.rates.split(",")] if args.mode == "open" else [0.0]
    try:
        import httpx
        import uvicorn
    except ImportError as exc:
        print(f"serve_table: needs the serve extra and httpx (pip install "
              f"'lmonnx[cpu,serve]' httpx): {exc}", file=sys.stderr)
        return 2

    from lmonnx import Scorer

    lines = read_sentences(args.corpus)
    sets = request_sets(lines, kinds)
    tmp = Path(tempfile.mkdtemp(prefix="lmonnx-serve-bench-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # the random models, after the servers
    cores = os.cpu_count() or 1
    loops = [m for m in ("uvloop", "httptools") if _installed(m)]
    print(f"CPU: {cpu_model()} ({cores} logical cores) | Python {platform.python_version()}, "
          f"uvicorn {uvicorn.__version__} ({' + '.join(loops) or 'asyncio + h11'}), load "
          f"client: " + (f"aiohttp {_version('aiohttp')}" if args.client_pool == "aiohttp"
                         else f"httpx {httpx.__version__} ({CLIENT_POOLS[args.client_pool]})"))
    print("command: python benchmarks/serve_table.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)))
    print(f"corpus {args.corpus.name}: {len(lines)} sentences; each row: slices of "
          + (f"{args.seconds:g} s" if args.seconds else f"{args.requests} requests")
          + f" x {args.repeats} in rotated order (ABC BCA CAB ...) and added up, after "
          f"{args.warmup:g} s warm-up a server; "
          f"{args.mode} loop" + (f" at {args.rates} req/s" if args.mode == "open" else "")
          + f"; in-process = Scorer.score in calls of {args.inprocess_batch}")
    print(f"client/server/others: cores busy (of {cores}) in the load generator / the server "
          f"process / every other process on the machine (other users); load average "
          f"{os.getloadavg()[0]:.2f} at the start; the load generator runs on "
          + ("any CPU" if args.client_cpu is None else f"CPU {args.client_cpu} only")
          + ", the servers and in-process rows on any")

    goals: list[tuple[str, bool]] = []
    codes: list[tuple[str, int]] = []
    for name in models:
        shape = MODELS[name]
        if name == "2x200" and args.model is not None:
            model_path = args.model
        else:
            model_path = random_model(tmp, lines, **shape)
        scorer = Scorer(model_path, providers=args.providers)
        scorer.score(lines[:64])  # warm
        servers = []
        if "batched" in wanted:
            servers.append(("batched", []))
        if "unbatched" in wanted:
            servers.append(("unbatched", ["--max-batch-sentences", "1"]))
        servers += parse_variants(args.variant)
        methods = [Method("in-process")] if "inprocess" in wanted else []
        started = []
        try:
            for label, flags in servers:
                t = time.perf_counter()
                server = ServerProcess(model_path, [*flags, "--providers", args.providers],
                                       label).start()
                started.append(server)
                methods.append(Method(label, server))
                print(f"# {name}: {label} server up in {time.perf_counter() - t:.1f} s "
                      f"({server.url}): lmonnx serve {' '.join(flags) or '(defaults)'}")
            if started:
                same = agree(started[0].url, scorer, lines[:50])
                print(f"# {name}: {model_path.name}, vocab {len(scorer.vocab):,}; served logprobs "
                      f"{'= Scorer.score bit for bit' if same else 'DIFFER from Scorer.score'}")
            print(HEADER)
            print("-" * len(HEADER))
            for kind in kinds:
                for rate in rates:
                    for c in concurrencies:
                        row, interval = measure_row(methods, scorer, sets[kind],
                                                    concurrency=c, args=args, rate=rate)
                        inproc, unbatched = row.get("in-process"), row.get("unbatched")
                        load = str(c) if args.mode == "closed" else f"{c}@{rate:g}"
                        for m in methods:
                            print(format_row(name, kind, load, m.name, row[m.name], inproc,
                                             unbatched, cores), flush=True)
                        batched = row.get("batched")
                        if batched and unbatched:
                            r = batched.sentences_per_s / max(unbatched.sentences_per_s, 1e-9)
                            ci = ("" if interval is None else
                                  f" (95% CI {interval[0]:.2f}-{interval[1]:.2f}, "
                                  f"{interval[2]} slices each)")
                            goals.append((f"{name} {kind} C={load}: batched/unbatched "
                                          f"{r:.2f}x >= {GOAL_BATCHED_VS_UNBATCHED}{ci}",
                                          r >= GOAL_BATCHED_VS_UNBATCHED))
                        if (batched and inproc and kind == "single" and c == GOAL_CONCURRENCY
                                and args.mode == "closed" and name in GOAL_SERVER_VS_INPROCESS):
                            r = batched.sentences_per_s / max(inproc.sentences_per_s, 1e-9)
                            goal = GOAL_SERVER_VS_INPROCESS[name]
                            goals.append((f"{name} single C={c}: server/in-process {r:.2f}x "
                                          f">= {goal}", r >= goal))
                        for m in methods:
                            if row[m.name].first_error:
                                print(f"#   {m.name}: first error: {row[m.name].first_error}")
        finally:
            for server in started:
                codes.append((f"{name} {server.label}", server.stop()))
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")
    for label, ok in goals:
        print(f"{'PASS' if ok else 'FAIL'}  {label}")
    for label, code in codes:
        print(f"{'PASS' if code == 0 else 'FAIL'}  {label} server: SIGTERM -> exit {code}")
    return 0 if all(ok for _, ok in goals) and all(c == 0 for _, c in codes) else 1


def client_cpu(choice: str) -> int | None:
    """The CPU ``--client-cpu`` names (None: not pinned; so on a single-CPU machine)."""
    usable = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if choice == "free" or len(usable) < 2:
        return None
    if choice == "last":
        return usable[-1]
    if not choice.isdigit() or int(choice) not in usable:
        raise SystemExit(f"serve_table: --client-cpu: {choice!r} is not one of this process's "
                         f"CPUs {usable} (or 'last', 'free')")
    return int(choice)


def _version(module: str) -> str:
    from importlib.metadata import version

    return version(module)


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


if __name__ == "__main__":
    sys.exit(main())
