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
and 7 copies with a word deleted, replaced or two words swapped).

Load: a closed loop of C callers (each sends its next request when it has its answer), by
``wrk`` (``--client-pool wrk``, the default; Debian's package ``wrk``): C keep-alive HTTP/1.1
connections driven from C, one wrk thread each, all on one CPU (``--client-cpu``).  A Lua
script written for each run gives each connection its share of the prepared ``/v1/score``
bodies in rotation, times each answer (``CLOCK_MONOTONIC`` through LuaJIT's FFI, the clock of
Python's ``time.monotonic``), checks it (status 200 and one ``"logprob"`` a sentence; a 429
is counted and that caller goes on at once) and prints every answer's record as one JSON
line from ``done()``.  A slice is the answers that came in between two instants this script
takes: once every connection is sending, and just before it stops wrk (SIGINT), so wrk's
start-up and stop lie outside it.  (wrk's own latency histogram is not used: it adds
samples for coordinated omission, right for a fixed-rate load, not for a closed loop.)  The
load client shares the two cores with the server, so what it burns per request the server
does not get; wrk burns a fraction of what a Python client does.  Python clients on public
APIs only, async on uvloop when installed (``--client-loop``): ``--client-pool httpx``
(``httpx.AsyncClient``, its own pool, which scans every connection for every request: the
client saturates first past a few connections) and ``aiohttp`` (a C-accelerated parser).
They alone drive ``--requests`` (a fixed number per slice) and ``--mode open``: Poisson
arrivals at ``--rates`` requests/s with at most C in flight (arrivals past the cap are
dropped, counted; latency from the scheduled arrival, so a stalled server is not hidden).

Each server gets ``--warmup`` seconds of the row's load once a row; then a row's methods run
``--repeats`` slices of ``--seconds`` (or ``--requests``) each, in rotated order (ABC BCA
CAB ...), each method's slices added up, so drifting load from other users hits every method
alike and no method holds a place; while the 95% interval of batched/unbatched straddles the
goal, those two run more rounds (``--max-repeats``).  All server processes of a model are up
at once (idle ones cost nothing) and stopped with SIGTERM at the end; each must drain and
exit 0.

CPU columns, in cores of this machine (``os.cpu_count()``): ``client`` is the load
generator's CPU time over the slice's wall time (wrk's process and this one; for in-process
rows, the scoring itself), ``server`` the server process's (``/proc/PID/stat``), ``others``
every other process's (``/proc/stat`` less the two: other users of a shared machine).  They
share the same cores, so the client's share is capacity the server did not get.

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
from dataclasses import dataclass, field, replace
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
CLIENT_POOLS = {"wrk": "C connections, a thread each, Lua-rotated prepared bodies",
                "httpx": "AsyncClient, its own pool", "aiohttp": "ClientSession"}


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


class CpuWindow:
    """The CPU seconds burnt from its creation to :meth:`stop`: by the load generator (this
    process, and ``client_pid``'s, a wrk child), by the server ``server_pid`` and by the
    whole machine."""

    def __init__(self, server_pid: int | None = None, client_pid: int | None = None):
        self.server_pid, self.client_pid = server_pid, client_pid
        self.start, self.end = self.read(), None

    def read(self) -> tuple[float, float, float]:
        client = own_cpu() + (process_cpu(self.client_pid) if self.client_pid else 0.0)
        server = process_cpu(self.server_pid) if self.server_pid else math.nan
        return client, server, machine_cpu()

    def stop(self) -> "CpuWindow":
        self.end = self.read()
        return self

    def fill(self, sample: Sample) -> Sample:
        """``sample``'s CPU columns from this window (stopped now if it was not yet)."""
        end = self.end or self.read()
        sample.client_cpu, sample.server_cpu, sample.machine_cpu = (
            b - a for a, b in zip(self.start, end))
        return sample


def in_process(scorer, requests: list[list[str]], batch: int, seconds: float | None,
               count: int | None) -> Sample:
    """``Scorer.score`` on the requests' sentences, ``batch`` per call, from the first one on."""
    sentences = [s for r in requests for s in r]
    per_request = len(requests[0])
    sample = Sample()
    cpu = CpuWindow()
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
    return cpu.fill(sample)


# ---- the load: wrk (default) -------------------------------------------------------------------

WRK_SCRIPT = r'''-- benchmarks/serve_table.py's load, written for one run of wrk.  Each wrk
-- thread holds one connection and sends its own share of the prepared /v1/score bodies in
-- turn; each answer is recorded (when it came, its latency, its status, its sentences if it
-- holds one "logprob" a sentence) and done() prints the records as one JSON line.
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } serve_table_timespec;
int clock_gettime(int clock, serve_table_timespec *now);
]]
local clock = ffi.new("serve_table_timespec")

local function now()  -- CLOCK_MONOTONIC (1 on Linux), the clock of Python's time.monotonic
  ffi.C.clock_gettime(1, clock)
  return tonumber(clock.tv_sec) + tonumber(clock.tv_nsec) * 1e-9
end

local SHARES = "@SHARES@"  -- thread k reads SHARES .. k: "SENTENCES<TAB>BODY" lines
local threads = {}

function setup(thread)
  thread:set("id", #threads)
  threads[#threads + 1] = thread
end

function init(args)
  bodies, sizes, turn, sent, first_sent, first_error = {}, {}, 0, 0, 0, ""
  done_at, latency, status, sentences = {}, {}, {}, {}
  local headers = {["Content-Type"] = "application/json"}
  for line in io.lines(SHARES .. id) do
    local tab = line:find("\t", 1, true)
    sizes[#sizes + 1] = tonumber(line:sub(1, tab - 1))
    bodies[#bodies + 1] = wrk.format("POST", nil, headers, line:sub(tab + 1))
  end
  io.stderr:write("ready\n")
end

function request()
  turn = turn % #bodies + 1
  sent = now()
  if first_sent == 0 then first_sent = sent end
  return bodies[turn]
end

local function logprobs(body)
  local n, at = 0, 1
  while true do
    local found = body:find('"logprob"', at, true)
    if not found then return n end
    n, at = n + 1, found + 9
  end
end

function response(code, headers, body)
  local t = now()
  local n = #done_at + 1
  done_at[n], latency[n], status[n] = t, t - sent, code
  sentences[n] = (code == 200 and logprobs(body) == sizes[turn]) and sizes[turn] or 0
  if sentences[n] == 0 and code ~= 429 and first_error == "" then
    first_error = "HTTP " .. code .. ": " .. body:sub(1, 200)
  end
end

local function escaped(c)
  return string.format("\\u%04x", c:byte())
end

local function quoted(text)  -- a JSON string
  return '"' .. (text:gsub('[%c"\\]', escaped)) .. '"'
end

function done(summary, latency_histogram, rate_histogram)
  local out = {}
  for i, thread in ipairs(threads) do
    out[i] = string.format(
      '{"first_sent":%.9f,"first_error":%s,"done_at":[%s],"latency":[%s],"status":[%s],'
      .. '"sentences":[%s]}', thread:get("first_sent"), quoted(thread:get("first_error")),
      table.concat(thread:get("done_at"), ","), table.concat(thread:get("latency"), ","),
      table.concat(thread:get("status"), ","), table.concat(thread:get("sentences"), ","))
  end
  local e = summary.errors  -- e.timeout is an answer slower than --timeout: recorded above
  io.write(string.format('\n{"socket_errors":%d,"threads":[%s]}\n',
                         e.connect + e.read + e.write, table.concat(out, ",")))
end
'''


def wrk_path() -> str | None:
    return shutil.which("wrk")


def wrk_version() -> str:
    """wrk's own first line, e.g. ``wrk debian/4.1.0-3+b2 [epoll]``."""
    shown = subprocess.run([wrk_path(), "-v"], capture_output=True, text=True)
    first = (shown.stdout or shown.stderr).splitlines()[0]
    return first.split(" Copyright")[0].strip()


def pump_lines(stream, log: deque, name: str) -> queue.Queue:
    """Read ``stream`` line by line in a thread (a child's stderr must be read all along, or
    a chatty child blocks on the pipe): each line into ``log`` and the queue, then None."""
    lines: queue.Queue = queue.Queue()

    def pump():
        for line in stream:
            log.append(line.rstrip())
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True, name=name).start()
    return lines


class WrkClient:
    """The closed loop of ``concurrency`` callers as one wrk process per slice
    (``--client-pool wrk``): :data:`WRK_SCRIPT` on each thread's share of the bodies, one
    connection a thread.  Pinning: wrk inherits the calling thread's CPUs."""

    SETTLE = 0.05  # after the last thread is ready: every connection is sending by then

    def __init__(self, url: str, bodies: list[bytes], sizes: list[int], concurrency: int):
        self.url, self.concurrency = url, concurrency
        self.workdir = Path(tempfile.mkdtemp(prefix="serve-table-wrk-"))
        shares = self.workdir / "share."
        for k in range(concurrency):  # thread k: bodies k, k + C, ... (at least one)
            with open(f"{shares}{k}", "wb") as out:
                for i in range(k, max(len(bodies), k + 1), concurrency):
                    out.write(b"%d\t%s\n" % (sizes[i % len(bodies)], bodies[i % len(bodies)]))
        self.script = self.workdir / "load.lua"
        self.script.write_text(WRK_SCRIPT.replace("@SHARES@", str(shares)))

    def warm(self, seconds: float) -> None:
        self.slice(seconds=seconds)

    def slice(self, *, seconds: float, pid: int | None = None, mode: str = "closed",
              count: int | None = None, rate: float = 0.0) -> Sample:
        """``seconds`` of load: the answers that came in between the two instants."""
        if mode != "closed" or count is not None or seconds is None:
            raise ValueError("wrk drives a closed loop for a time: no --mode open, --requests")
        n = str(self.concurrency)
        proc = subprocess.Popen(
            [wrk_path(), "-t", n, "-c", n, "-d", f"{math.ceil(seconds + self.SETTLE) + 2}s",
             "-s", str(self.script), self.url], stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace")
        log: deque[str] = deque(maxlen=50)
        try:
            self.wait_ready(proc, pump_lines(proc.stderr, log, "wrk-stderr"), log)
            time.sleep(self.SETTLE)
            cpu, start = CpuWindow(server_pid=pid, client_pid=proc.pid), time.monotonic()
            time.sleep(seconds)
            end = time.monotonic()
            cpu.stop()
            proc.send_signal(signal.SIGINT)  # wrk stops, prints its report, runs done()
            output = proc.stdout.read()
            code = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if code != 0:
            raise RuntimeError(f"wrk exited {code}: " + "\n".join(log))
        return cpu.fill(wrk_sample(output, start, end))

    def wait_ready(self, proc, lines: queue.Queue, log: deque) -> None:
        """Until each thread has read its bodies ("ready" on stderr)."""
        ready, deadline = 0, time.monotonic() + 30 + 0.05 * self.concurrency
        while ready < self.concurrency:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None or time.monotonic() > deadline:
                raise RuntimeError(f"wrk did not start: {proc.args}\n" + "\n".join(log))
            ready += line.strip() == "ready"

    def close(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


def wrk_sample(output: str, start: float, end: float) -> Sample:
    """The answers of :data:`WRK_SCRIPT`'s JSON line (the last line of wrk's output) that
    came in between ``start`` and ``end`` (``time.monotonic``); the window starts later if a
    connection's first request did.  Socket errors count whenever they happened."""
    report = json.loads(output.rstrip().rsplit("\n", 1)[-1])
    threads = report["threads"]
    start = max([start] + [t["first_sent"] for t in threads if t["first_sent"]])
    sample = Sample(seconds=end - start, errors=report["socket_errors"])
    for t in threads:
        sample.first_error = sample.first_error or t["first_error"]
        for done, latency, status, sentences in zip(t["done_at"], t["latency"], t["status"],
                                                    t["sentences"]):
            if not start <= done <= end:
                continue
            if sentences:
                sample.latencies.append(latency)
                sample.requests += 1
                sample.sentences += sentences
            elif status == 429:
                sample.rejected += 1
            else:
                sample.errors += 1
    if report["socket_errors"] and not sample.first_error:
        sample.first_error = f"{report['socket_errors']} socket errors (connect, read, write)"
    return sample


# ---- the load: Python clients on public APIs (--client-pool httpx | aiohttp) -----------------

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


class _Response:
    """What the load generator reads of an answer."""

    __slots__ = ("status_code", "content")

    def __init__(self, status: int, content: bytes):
        self.status_code, self.content = status, content

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")


class AiohttpClient:
    """``post`` on an ``aiohttp`` session of ``concurrency`` connections (``--client-pool
    aiohttp``): its C-accelerated HTTP parser costs the client about half the CPU per
    request of httpx's (h11 in Python)."""

    def __init__(self, concurrency: int):
        import aiohttp

        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=concurrency),
            timeout=aiohttp.ClientTimeout(total=120))

    async def post(self, url: str, content: bytes, headers: dict) -> _Response:
        async with self.session.post(url, data=content, headers=headers) as response:
            return _Response(response.status, await response.read())

    async def aclose(self) -> None:
        await self.session.close()


async def _python_client(pool: str, concurrency: int):
    """An ``httpx.AsyncClient`` of ``concurrency`` connections, or :class:`AiohttpClient`
    (made on the running loop, as aiohttp wants)."""
    if pool == "aiohttp":
        return AiohttpClient(concurrency)
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    return httpx.AsyncClient(limits=limits, timeout=120.0)


class PythonClient:
    """The load of ``--client-pool httpx`` or ``aiohttp``: one client of ``concurrency``
    connections on an event loop of its own (uvloop's when asked and installed), kept for
    the row; closed or open loop, for a time or a number of requests."""

    def __init__(self, pool: str, url: str, bodies: list[bytes], sizes: list[int],
                 concurrency: int, loop: str = "uvloop"):
        factory = None
        if loop == "uvloop" and _installed("uvloop"):
            import uvloop

            factory = uvloop.new_event_loop
        self.runner = asyncio.Runner(loop_factory=factory)
        self.client = self.runner.run(_python_client(pool, concurrency))
        self.load = (url, bodies, sizes)
        self.concurrency = concurrency

    def warm(self, seconds: float) -> None:
        self.runner.run(closed_loop(self.client, *self.load, self.concurrency, seconds=seconds))

    def slice(self, *, seconds: float | None, pid: int | None = None, mode: str = "closed",
              count: int | None = None, rate: float = 0.0) -> Sample:
        cpu = CpuWindow(server_pid=pid)
        if mode == "open":
            run = open_loop(self.client, *self.load, rate, self.concurrency, seconds, count)
        else:
            run = closed_loop(self.client, *self.load, self.concurrency, seconds, count)
        return cpu.fill(self.runner.run(run))

    def close(self) -> None:
        self.runner.run(self.client.aclose())
        self.runner.close()


def open_client(pool: str, url: str, bodies: list[bytes], sizes: list[int], concurrency: int,
                loop: str = "uvloop"):
    """The load generator of one server and row: :class:`WrkClient` or :class:`PythonClient`
    (``warm(seconds)``, ``slice(...) -> Sample``, ``close()``)."""
    if pool == "wrk":
        return WrkClient(url, bodies, sizes, concurrency)
    return PythonClient(pool, url, bodies, sizes, concurrency, loop)


def run_load(url: str, requests: list[list[str]], *, concurrency: int, seconds: float | None,
             count: int | None = None, warmup: float = 0.0, mode: str = "closed",
             rate: float = 0.0, pid: int | None = None, pool: str = "wrk",
             loop: str = "uvloop") -> Sample:
    """One load run on a client of its own: a warm-up, then one timed slice."""
    client = open_client(pool, url, *encode(requests), concurrency, loop)
    try:
        if warmup > 0:
            client.warm(warmup)
        return client.slice(seconds=seconds, count=count, mode=mode, rate=rate, pid=pid)
    finally:
        client.close()


def encode(requests: list[list[str]]) -> tuple[list[bytes], list[int]]:
    """Each request's ``/v1/score`` body and its sentence count."""
    return [json.dumps({"sentences": r}).encode() for r in requests], [len(r) for r in requests]


@contextlib.contextmanager
def pinned_to(cpu: int | None):
    """Run this thread (the load generator, and a wrk it starts) on ``cpu`` only, if given,
    then as before.  Left free, the scheduler moves the client and the server's threads
    between the two cores from slice to slice, and one server's C = 1 throughput drifts
    +-10% between slices while identical servers differ; pinned, identical servers measure
    within 2%."""
    if cpu is None or not hasattr(os, "sched_setaffinity"):
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


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
        lines = pump_lines(self.proc.stderr, self.log, f"{self.label}-stderr")
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
    one load client for the row (wrk's: its script and bodies, a wrk process a slice), warmed
    up once; the slices then run in rotated order (ABC BCA CAB ...): load that drifts during
    the row hits every method alike, and no method holds a place in the order.  (Mirrored order, ABC CBA, ran the edge methods twice in a row at
    every turn and the middle one never: identical servers measured 2-4% apart by their
    place.)  While the batched/unbatched interval straddles the goal, batched and unbatched
    alone run more rounds (alternating which goes first), up to ``args.max_repeats`` rounds
    in all: on 2 cores shared with other users one C = 1 slice's throughput varies by 14%
    (standard deviation between identical servers' paired slices), so 30 rounds still leave
    +-5% on the ratio."""
    bodies, sizes = encode(requests)
    clients = {}
    try:
        for method in methods:
            if method.server is not None:
                clients[method.name] = client = open_client(
                    args.client_pool, method.server.url + "/v1/score", bodies, sizes,
                    concurrency, args.client_loop)
                if args.warmup > 0:
                    with pinned_to(args.client_cpu):
                        client.warm(args.warmup)
        rounds: list[dict[str, Sample]] = []
        while order := next_order(methods, rounds, args):
            turn = len(rounds) % len(order)  # rotated; for the two, alternating
            rounds.append({m.name: one_slice(m, clients, scorer, requests, args, rate)
                           for m in order[turn:] + order[:turn]})
    finally:
        for client in clients.values():
            client.close()
    return add_up(rounds), paired_interval(rounds)


def next_order(methods: list[Method], rounds: list[dict[str, Sample]], args) -> list[Method]:
    """The methods of the next round: all of them for ``args.repeats`` rounds (whole
    rotations: main makes it a multiple), then batched and unbatched alone while undecided,
    up to ``args.max_repeats`` rounds; none when the row is done."""
    if len(rounds) < args.repeats:
        return methods
    compared = [m for m in methods if m.name in ("batched", "unbatched")]
    if len(compared) == 2 and len(rounds) < args.max_repeats and undecided(rounds):
        return compared
    return []


def one_slice(method: Method, clients: dict, scorer, requests, args, rate: float) -> Sample:
    """One slice of one method: ``Scorer.score`` in-process, or its client's load on its
    server (the load generator pinned to ``args.client_cpu``)."""
    if method.server is None:
        return in_process(scorer, requests, args.inprocess_batch, args.seconds, args.requests)
    with pinned_to(args.client_cpu):
        return clients[method.name].slice(seconds=args.seconds, count=args.requests,
                                          mode=args.mode, rate=rate, pid=method.server.pid)


def add_up(rounds: list[dict[str, Sample]]) -> dict[str, Sample]:
    """Each method's slices added up, in the order they ran."""
    total: dict[str, Sample] = {}
    for samples in rounds:
        for name, sample in samples.items():
            if name in total:
                total[name] += sample
            else:  # a copy: the round keeps its own slice for the paired interval
                total[name] = replace(sample, latencies=list(sample.latencies))
    return total


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


# ---- the command line --------------------------------------------------------------------------

def add_what_arguments(parser: argparse.ArgumentParser) -> None:
    """What is measured: corpus, models, loads, methods."""
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
    parser.add_argument("--providers", choices=("cpu", "cuda"), default="cpu",
                        help="onnxruntime provider of the servers and of the in-process rows "
                             "(default cpu)")


def add_how_arguments(parser: argparse.ArgumentParser) -> None:
    """How long and in which order: slices, repeats, warm-up, loop kind."""
    parser.add_argument("--mode", choices=("closed", "open"), default="closed",
                        help="open: Poisson arrivals (needs --client-pool httpx or aiohttp)")
    parser.add_argument("--rates", default="200,1000",
                        help="open loop: arrival rates, requests/s (default 200,1000)")
    parser.add_argument("--seconds", type=float, default=0.5,
                        help="per slice (method, row, repeat); default 0.5")
    parser.add_argument("--requests", type=int, default=None,
                        help="a fixed number of requests per method and row instead of "
                             "--seconds (needs --client-pool httpx or aiohttp)")
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
    parser.add_argument("--quick", action="store_true",
                        help="3 slices of 0.5 s (more for batched/unbatched while undecided), "
                             "concurrency 1,32, single requests")


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    """The load generator."""
    parser.add_argument("--client-pool", choices=tuple(CLIENT_POOLS), default="wrk",
                        help="the load generator: wrk, a closed loop from C (default; Debian "
                             "package wrk), httpx.AsyncClient on its own pool (O(connections) "
                             "a request: the client saturates first) or aiohttp")
    parser.add_argument("--client-loop", choices=("uvloop", "asyncio"), default="uvloop",
                        help="the Python load clients' event loop (uvloop when installed)")
    parser.add_argument("--client-cpu", default="last",
                        help="the CPU the load generator runs on during server rows: 'last' "
                             "(default: the highest-numbered CPU this process may use), a "
                             "number, or 'free' (the scheduler's choice); servers and "
                             "in-process rows may use every CPU")


def check_args(parser: argparse.ArgumentParser, args) -> str | None:
    """What makes this run impossible, in one line, or None."""
    if args.client_pool == "wrk" and wrk_path() is None:
        return ("serve_table: wrk not found on PATH: apt-get install wrk (Debian), or "
                "--client-pool httpx|aiohttp")
    if args.client_pool == "wrk" and (args.mode == "open" or args.requests is not None):
        return ("serve_table: wrk drives a closed loop for a time: --mode open and --requests "
                "need --client-pool httpx or aiohttp")
    if args.client_pool == "aiohttp" and not _installed("aiohttp"):
        return "serve_table: --client-pool aiohttp needs aiohttp (pip install aiohttp)"
    if args.corpus is None or not args.corpus.is_file():
        return (f"serve_table: corpus not found: {args.corpus} (give --corpus PATH, e.g. PTB "
                "test: ptb.test.txt)")
    if not (_installed("httpx") and _installed("uvicorn")):
        return ("serve_table: needs the serve extra and httpx (pip install "
                "'lmonnx[cpu,serve]' httpx)")
    unknown = [m for m in args.models.split(",") if m and m not in MODELS]
    if unknown:
        parser.error(f"--models: unknown {unknown}; known {list(MODELS)}")
    return None


def settle_args(args) -> None:
    """``--quick``'s settings, the lists parsed, repeats a multiple of the methods."""
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
    args.model_names = [m for m in args.models.split(",") if m]
    args.concurrencies = [int(c) for c in args.concurrency.split(",")]
    args.kind_list = [k for k in args.kinds.split(",") if k]
    args.wanted = set(args.methods.split(","))
    args.rate_list = [float(r) for r in args.rates.split(",")] if args.mode == "open" else [0.0]


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


# ---- the run ---------------------------------------------------------------------------------

def client_name(pool: str) -> str:
    """The load client as the header names it."""
    if pool == "wrk":
        name = wrk_version()
    elif pool == "aiohttp":
        name = f"aiohttp {_version('aiohttp')}"
    else:
        name = f"httpx {_version('httpx')}"
    return f"{name} ({CLIENT_POOLS[pool]})"


def print_header(args, lines: list[str], argv) -> None:
    import uvicorn

    cores = os.cpu_count() or 1
    loops = [m for m in ("uvloop", "httptools") if _installed(m)]
    print(f"CPU: {cpu_model()} ({cores} logical cores) | Python {platform.python_version()}, "
          f"uvicorn {uvicorn.__version__} ({' + '.join(loops) or 'asyncio + h11'}), load "
          f"client: {client_name(args.client_pool)}")
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


def start_methods(name: str, model_path: Path, args, started: list) -> list[Method]:
    """The row's methods: in-process, then each server, started and added to ``started``
    (the caller stops them whatever happens next)."""
    servers = []
    if "batched" in args.wanted:
        servers.append(("batched", []))
    if "unbatched" in args.wanted:
        servers.append(("unbatched", ["--max-batch-sentences", "1"]))
    servers += parse_variants(args.variant)
    methods = [Method("in-process")] if "inprocess" in args.wanted else []
    for label, flags in servers:
        t = time.perf_counter()
        server = ServerProcess(model_path, [*flags, "--providers", args.providers],
                               label).start()
        started.append(server)
        methods.append(Method(label, server))
        print(f"# {name}: {label} server up in {time.perf_counter() - t:.1f} s "
              f"({server.url}): lmonnx serve {' '.join(flags) or '(defaults)'}")
    return methods


def measure_model(name: str, args, lines: list[str], sets: dict, tmp: Path,
                  goals: list, codes: list) -> None:
    """Every row of one model: its servers up, the rows measured and printed, the goals
    added to ``goals``, each server's exit status after SIGTERM to ``codes``."""
    from lmonnx import Scorer

    if name == "2x200" and args.model is not None:
        model_path = args.model
    else:
        model_path = random_model(tmp, lines, **MODELS[name])
    scorer = Scorer(model_path, providers=args.providers)
    scorer.score(lines[:64])  # warm
    started: list[ServerProcess] = []
    try:
        methods = start_methods(name, model_path, args, started)
        if started:
            same = agree(started[0].url, scorer, lines[:50])
            print(f"# {name}: {model_path.name}, vocab {len(scorer.vocab):,}; served logprobs "
                  f"{'= Scorer.score bit for bit' if same else 'DIFFER from Scorer.score'}")
        print(HEADER)
        print("-" * len(HEADER))
        for kind, rate, c in itertools.product(args.kind_list, args.rate_list,
                                               args.concurrencies):
            row, interval = measure_row(methods, scorer, sets[kind], concurrency=c, args=args,
                                        rate=rate)
            load = str(c) if args.mode == "closed" else f"{c}@{rate:g}"
            print_row(name, kind, load, methods, row)
            goals += row_goals(name, kind, load, c, row, interval, args.mode)
    finally:
        for server in started:
            codes.append((f"{name} {server.label}", server.stop()))


def print_row(name: str, kind: str, load: str, methods: list[Method], row: dict) -> None:
    inproc, unbatched = row.get("in-process"), row.get("unbatched")
    for m in methods:
        print(format_row(name, kind, load, m.name, row[m.name], inproc, unbatched,
                         os.cpu_count() or 1), flush=True)
    for m in methods:
        if row[m.name].first_error:
            print(f"#   {m.name}: first error: {row[m.name].first_error}")


def row_goals(name: str, kind: str, load: str, c: int, row: dict, interval,
              mode: str) -> list[tuple[str, bool]]:
    """The row's checks: batched/unbatched at every load, server/in-process at the goal's."""
    goals = []
    batched, unbatched, inproc = row.get("batched"), row.get("unbatched"), row.get("in-process")
    if batched and unbatched:
        r = batched.sentences_per_s / max(unbatched.sentences_per_s, 1e-9)
        ci = ("" if interval is None else
              f" (95% CI {interval[0]:.2f}-{interval[1]:.2f}, {interval[2]} slices each)")
        goals.append((f"{name} {kind} C={load}: batched/unbatched {r:.2f}x >= "
                      f"{GOAL_BATCHED_VS_UNBATCHED}{ci}", r >= GOAL_BATCHED_VS_UNBATCHED))
    if (batched and inproc and kind == "single" and c == GOAL_CONCURRENCY and mode == "closed"
            and name in GOAL_SERVER_VS_INPROCESS):
        r = batched.sentences_per_s / max(inproc.sentences_per_s, 1e-9)
        goal = GOAL_SERVER_VS_INPROCESS[name]
        goals.append((f"{name} single C={c}: server/in-process {r:.2f}x >= {goal}", r >= goal))
    return goals


def print_verdicts(goals: list[tuple[str, bool]], codes: list[tuple[str, int]]) -> int:
    """The PASS/FAIL lines; 0 when every one passed, else 1."""
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")
    for label, ok in goals:
        print(f"{'PASS' if ok else 'FAIL'}  {label}")
    for label, code in codes:
        print(f"{'PASS' if code == 0 else 'FAIL'}  {label} server: SIGTERM -> exit {code}")
    return 0 if all(ok for _, ok in goals) and all(c == 0 for _, c in codes) else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_what_arguments(parser)
    add_how_arguments(parser)
    add_client_arguments(parser)
    args = parser.parse_args(argv)
    problem = check_args(parser, args)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    settle_args(args)
    lines = read_sentences(args.corpus)
    sets = request_sets(lines, args.kind_list)
    tmp = Path(tempfile.mkdtemp(prefix="lmonnx-serve-bench-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # the random models, after the servers
    print_header(args, lines, argv)
    goals: list[tuple[str, bool]] = []
    codes: list[tuple[str, int]] = []
    for name in args.model_names:
        measure_model(name, args, lines, sets, tmp, goals, codes)
    return print_verdicts(goals, codes)


def _version(module: str) -> str:
    from importlib.metadata import version

    return version(module)


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


if __name__ == "__main__":
    sys.exit(main())
