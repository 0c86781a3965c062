"""The cross-request batcher of ``lmonnx serve``: many callers' sentences, one onnxruntime call.

Requests put :class:`Work` on one queue from the event loop; one compute thread runs it,
so onnxruntime's intra-op threads own the cores and never compete with a second batch.
When the compute thread is free the batcher takes the oldest work and every queued work of
the same kind behind it, up to ``max_batch_sentences`` sentences (or decoder hypotheses) and
``max_batch_tokens`` scored positions, and runs them together:

- ``score``: sentences (:class:`~lmonnx.examples.Example`) in length-bucketed batches, as
  ``evaluate`` batches them; a sentence's numbers do not depend on its batch-mates.
- ``step``: decoder hypotheses advanced by one token each, in one call per budget.
- ``call``: anything else (predictions, generation, a prefix's state) runs alone, in turn.

The compute thread takes its batches itself: while a batch computes, the next one fills by
itself, and the thread takes it the moment it is done, never waiting for the event loop to
get round to it (continuous batching; when the loop started each batch, the compute thread
sat idle 35% of the time at 32 callers on 2 cores).  Before it runs a batch that is not
full, the batcher waits at most ``max_wait_s`` (from the oldest work's arrival) for more,
but only when more is in sight -- requests the server is already reading
(:meth:`Batcher.arriving`) -- and only when a batch takes much longer to compute than the
wait (:data:`WAIT_AGAINST_COMPUTE`): for a fast model a wait costs the queued callers more
than running a second batch.  A lone caller never waits.  (Waiting also whenever the last
batch served 8 requests or more, as an earlier version did, cost 8% at 8 callers on the
2x200 model once the thread took its own batches, and gained nothing at 32.)

Limits are answered at once, never by a slowly growing latency: past ``max_queue`` queued
sentences :meth:`Batcher.submit` raises :class:`Overloaded` (with a ``retry_after`` estimate);
while draining it raises :class:`Draining`.  A request that was not started within its
deadline, or whose caller went away, is taken off the queue (:meth:`Batcher.withdraw`).
:meth:`Batcher.drain` returns once every accepted request is answered, woken by the last
one (never polling).  The compute thread lives as long as its process.
"""

from __future__ import annotations

import asyncio
import math
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from lmonnx.validation import check_int, check_real

SCORE, STEP, CALL = "score", "step", "call"
# A batch waits for requests being read only for a model whose batches take this many times
# max_wait to compute: a wait small against the compute it saves (2x200 V=10k: ~15 ms a
# batch, may wait; 2x64 V=3000: ~0.5 ms, does not: 8 callers waiting 2 ms got 0.9x of not
# waiting).
WAIT_AGAINST_COMPUTE = 4
QUEUED, RUNNING, DONE, WITHDRAWN = "queued", "running", "done", "withdrawn"
# The compute thread takes the GIL back after every onnxruntime call and kernel; while the
# event loop holds it, CPython hands it over only after its switch interval (5 ms by default,
# longer than a small model's whole batch).  2x64 model, 32 callers, 2 cores, servers side by
# side: 5 ms gave 0.95x (95% CI 0.90-1.01) the requests/s of 0.2 ms; 0.05 ms was no better.
GIL_SWITCH_INTERVAL_S = 0.0002


class Overloaded(Exception):
    """The queue is full: answer 429 with ``Retry-After: retry_after`` seconds."""

    def __init__(self, queued: int, limit: int, retry_after: int):
        super().__init__(f"the server is busy: {queued} sentences are queued (limit "
                         f"{limit}); retry in {retry_after} s")
        self.retry_after = retry_after


class Draining(Exception):
    """The server is shutting down: it finishes what it accepted and takes nothing new."""


class NotStarted(Exception):
    """A request waited in the queue past its deadline and was never run."""


@dataclass(eq=False)
class Work:
    """One request's part of a batch.  ``payload``: score: ``(examples, keep_tokens)``;
    step: ``(states, token ids)``; call: a function of no arguments.  ``sentences``:
    what it counts against ``max_queue`` and a batch's cap; ``tokens``: scored positions."""

    kind: str
    payload: Any
    sentences: int
    tokens: int
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)
    status: str = QUEUED


@dataclass(frozen=True)
class BatchStats:
    """What one batch did, for metrics: its kind, sentences, scored positions, the seconds
    each work waited in the queue and the seconds of compute."""

    kind: str
    sentences: int
    tokens: int
    queue_seconds: tuple
    compute_seconds: float


class Batcher:
    """Queue and compute thread of one model.

    ``score_examples(examples, keep_tokens, batch_size) -> results`` and ``step_ids(states,
    ids) -> (logprobs, states)`` run on the compute thread (``Scorer.score_examples``,
    ``Incremental.step_ids``).  ``on_batch(BatchStats)`` is called after each batch on the
    event loop of the batch's first caller.  ``max_wait_s`` 0 runs whatever is queued at
    once; ``max_batch_sentences`` 1 is one sentence per onnxruntime call (the unbatched
    baseline).
    """

    def __init__(self, score_examples: Callable, step_ids: Callable, *,
                 max_wait_s: float = 0.002, max_batch_sentences: int = 64,
                 max_batch_tokens: int = 8192, max_queue: int = 1024,
                 on_batch: Callable[[BatchStats], None] | None = None):
        self._score_examples = score_examples
        self._step_ids = step_ids
        self.max_wait_s = check_real("max_wait_s", max_wait_s, low=0)
        self.max_batch_sentences = check_int("max_batch_sentences", max_batch_sentences)
        self.max_batch_tokens = check_int("max_batch_tokens", max_batch_tokens)
        self.max_queue = check_int("max_queue", max_queue)
        self._on_batch = on_batch
        self._queue: list[Work] = []
        self.queued_sentences = 0
        self._running = 0
        self._arriving = 0
        self.admitted_requests = 0
        self._last_compute_s = 0.0
        self._rate = 0.0  # sentences per second of compute, smoothed: Retry-After
        self.draining = False
        # The queue, the work's status, and the counters the compute thread reads or the loop
        # waits on (queued, arriving, running, admitted) are shared by the event loop
        # (requests) and the compute thread (batches): they change under this lock, and its
        # condition wakes the compute thread.  _last_compute_s is the compute thread's own;
        # _rate is the loop's (Retry-After).
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        # drain()'s waiters, (loop, event): set once nothing is queued, running or admitted.
        self._drained: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    # ---- the request side --------------------------------------------------------------

    def arriving(self, delta: int) -> None:
        """The server counts requests it has begun to read (+1) until they submit or end
        (-1): the only requests a batch that is not full waits for."""
        with self._lock:
            self._arriving += delta
            if delta < 0:
                self._lock.notify()

    def submit(self, kind: str, payload, sentences: int = 1, tokens: int = 1, *,
               admitted: bool = False) -> Work:
        """Queue work now, or raise :class:`Overloaded` / :class:`Draining` at once.  A
        request larger than ``max_queue`` is taken when the queue is empty (it could never
        be taken otherwise).  ``admitted``: the work of a request already accepted (its
        second prompt, say), which draining does not refuse.  Await ``work.future``."""
        self.check_room(sentences, admitted=admitted)
        loop = asyncio.get_running_loop()
        work = Work(kind, payload, sentences, tokens, loop.create_future())
        with self._lock:
            self._queue.append(work)
            self.queued_sentences += sentences
            self._lock.notify()
            if self._thread is None:  # started lazily, from whichever loop comes first
                self._thread = threading.Thread(target=self._serve_forever,
                                                name="lmonnx-compute", daemon=True)
                self._thread.start()
        return work

    def check_room(self, sentences: int, *, admitted: bool = False) -> None:
        """Raise :class:`Draining` or :class:`Overloaded` now if ``sentences`` more would not
        be taken: a server asks before it tokenizes, so a refusal costs next to nothing."""
        if self.draining and not admitted:
            raise Draining("the server is shutting down and takes no new requests")
        if self.queued_sentences and self.queued_sentences + sentences > self.max_queue:
            raise Overloaded(self.queued_sentences, self.max_queue, self._retry_after())

    def withdraw(self, work: Work, reason: BaseException | None = None) -> bool:
        """Take queued work off the queue (its caller left, or its deadline passed): True
        when it was still queued; its future then raises ``reason`` (None: is cancelled).
        Running work finishes and its result is dropped if the future is done by then."""
        with self._lock:
            if work.status != QUEUED:
                return False
            self._queue.remove(work)
            self.queued_sentences -= work.sentences
            work.status = WITHDRAWN
            self._lock.notify()
            self._wake_drains()
        if not work.future.done():
            if reason is None:
                work.future.cancel()
            else:
                work.future.set_exception(reason)
        return True

    def _retry_after(self) -> int:
        """Whole seconds until the queue is likely to have room: queued sentences over the
        recent compute rate, at least 1."""
        if self._rate <= 0:
            return 1
        return max(1, math.ceil(self.queued_sentences / self._rate))

    def admit(self, delta: int) -> None:
        """The server counts requests it accepted (+1 at their first work) until they are
        answered (-1): :meth:`drain` waits for them, not only for queued work."""
        with self._lock:
            self.admitted_requests += delta
            self._wake_drains()

    @property
    def idle(self) -> bool:
        with self._lock:
            return self._idle()

    def _idle(self) -> bool:
        """Under the lock: nothing queued, running or accepted and still being answered."""
        return not self._queue and not self._running and not self.admitted_requests

    async def drain(self) -> None:
        """Take nothing new; return when every accepted request has been answered (woken by
        the last of them, never polling)."""
        self.draining = True
        event = asyncio.Event()
        with self._lock:
            if self._idle():
                return
            self._drained.append((asyncio.get_running_loop(), event))
        await event.wait()

    def _wake_drains(self) -> None:
        """Under the lock, from either thread: once idle, wake every :meth:`drain` on its
        own loop."""
        if not self._drained or not self._idle():
            return
        for loop, event in self._drained:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that loop is closed: nobody waits there any more
                pass
        self._drained.clear()

    # ---- the compute side --------------------------------------------------------------

    def _serve_forever(self) -> None:
        """The compute thread: take a batch, compute it, hand the answers to the event loop,
        and take the next batch at once -- it never waits for the loop to get round to it."""
        while True:
            with self._lock:
                works = self._next_batch()
            started = time.perf_counter()
            try:
                results = self._compute(works)
            except BaseException as exc:  # noqa: BLE001 - handed to every caller of the batch
                results = [exc] * len(works)
            seconds = time.perf_counter() - started
            if works[0].kind != CALL:
                self._last_compute_s = seconds
            with self._lock:
                self._running -= 1
                for work in works:
                    work.status = DONE
                self._wake_drains()
            self._hand_back(works, results, (works, started, seconds))

    def _hand_back(self, works: list[Work], results: list, batch: tuple) -> None:
        """Post each caller's answer to its own event loop (one loop in a server; a test
        client may run one per request), and ``batch`` (works, started, seconds) for the
        metrics to the first caller's; from the compute thread."""
        by_loop: dict = {}
        for work, result in zip(works, results):
            by_loop.setdefault(work.future.get_loop(), []).append((work.future, result))
        for i, (loop, answers) in enumerate(by_loop.items()):
            try:
                loop.call_soon_threadsafe(self._finish, answers, None if i else batch)
            except RuntimeError:  # that loop is closed: nobody is left to answer there
                pass

    def _next_batch(self) -> list[Work]:
        """Under the lock: wait for work (and, if it pays, for more of it); the batch to run."""
        while True:
            while not self._queue:
                self._lock.wait()
            first = self._queue[0]
            if self.max_wait_s and first.kind != CALL:
                self._fill(first)
                if not self._queue:
                    continue
            return self._take()

    def _full(self, kind: str) -> bool:
        sentences = tokens = 0
        for work in self._queue:
            if work.kind == kind:
                sentences += work.sentences
                tokens += work.tokens
        return sentences >= self.max_batch_sentences or tokens >= self.max_batch_tokens

    def _fill(self, first: Work) -> None:
        """Under the lock: wait at most ``max_wait_s`` after ``first`` arrived while requests
        are being read, if batches are slow to compute."""
        if self._last_compute_s < WAIT_AGAINST_COMPUTE * self.max_wait_s:
            return  # a fast model: the wait would cost more than the batch it fills
        deadline = first.enqueued + self.max_wait_s
        while self._arriving > 0 and not self._full(first.kind) and first.status == QUEUED:
            left = deadline - time.perf_counter()
            if left <= 0:
                return
            self._lock.wait(left)

    def _take(self) -> list[Work]:
        """Under the lock: the oldest work and the queued work of its kind behind it, within
        the caps, now running."""
        first = self._queue[0]
        taken = [first]
        if first.kind != CALL:
            sentences, tokens = first.sentences, first.tokens
            for work in self._queue[1:]:
                if work.kind != first.kind:
                    continue
                if (sentences + work.sentences > self.max_batch_sentences
                        or tokens + work.tokens > self.max_batch_tokens):
                    break
                taken.append(work)
                sentences += work.sentences
                tokens += work.tokens
        for work in taken:
            self._queue.remove(work)
            self.queued_sentences -= work.sentences
            work.status = RUNNING
        self._running += 1
        return taken

    def _finish(self, answers: list, batch: tuple | None) -> None:
        """On a caller's event loop: answer its callers of the batch; count the batch."""
        for future, result in answers:
            _settle(future, result)
        if batch is not None:
            self._account(*batch)

    def _account(self, works: list[Work], started: float, seconds: float) -> None:
        sentences = sum(w.sentences for w in works)
        if seconds > 0 and works[0].kind == SCORE:  # what the queue limit counts
            rate = sentences / seconds
            self._rate = rate if self._rate == 0 else 0.8 * self._rate + 0.2 * rate
        if self._on_batch is not None:
            self._on_batch(BatchStats(works[0].kind, sentences, sum(w.tokens for w in works),
                                      tuple(started - w.enqueued for w in works), seconds))

    def _compute(self, works: list[Work]) -> list:
        """On the compute thread: each work's result (or exception), in order."""
        kind = works[0].kind
        if kind == CALL:
            try:
                return [works[0].payload()]
            except Exception as exc:  # noqa: BLE001 - the caller's error, not the batch's
                return [exc]
        if kind == SCORE:
            examples = [e for w in works for e in w.payload[0]]
            keep = any(w.payload[1] for w in works)
            results = self._score_examples(examples, keep_tokens=keep,
                                           batch_size=self.max_batch_sentences)
            return _split(results, [len(w.payload[0]) for w in works])
        states = [s for w in works for s in w.payload[0]]
        ids = np.concatenate([w.payload[1] for w in works])
        logprobs, new = self._step_ids(states, ids)
        sizes = [len(w.payload[0]) for w in works]
        return [(lp, st) for lp, st in zip(_split(list(logprobs), sizes), _split(new, sizes))]


def hand_over_the_gil_quickly() -> None:
    """Set this process's GIL switch interval to :data:`GIL_SWITCH_INTERVAL_S`: for a process
    that serves (an event loop beside the compute thread), not for a library user's."""
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)


def _settle(future: asyncio.Future, result) -> None:
    """Answer a caller with ``result`` (an exception is raised to it), unless it went away."""
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


def _split(items: list, sizes: list[int]) -> list[list]:
    out, start = [], 0
    for n in sizes:
        out.append(items[start:start + n])
        start += n
    return out


__all__ = ["Batcher", "hand_over_the_gil_quickly", "BatchStats", "Work", "Overloaded", "Draining",
           "NotStarted",
           "SCORE", "STEP", "CALL"]
