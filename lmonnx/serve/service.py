"""The model behind ``lmonnx serve``: a :class:`~lmonnx.scorer.Scorer`, its batcher and the
decoder states, as ``async`` methods an HTTP route awaits.

Every method checks its input on the event loop (a ``ValueError`` / ``TypeError`` before any
work is queued, so one caller's bad word never fails another caller's batch), then queues the
work and awaits it: :meth:`ScoringService.run` owns the deadline (work not started within
``timeout_s`` is taken off the queue: :class:`~lmonnx.serve.batch_queue.NotStarted`) and the
caller's disconnect (its queued work is withdrawn).  Scores are the ``Scorer``'s own code path
(``examples`` then ``score_examples``), so a served number is ``Scorer.score``'s number.  What
is longer than one onnxruntime call (a sentence, a prefix, a prompt) runs a window per turn
of the compute thread (:meth:`ScoringService.run_steps`).
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable, Protocol, Sequence

from lmonnx.serve.batch_queue import CALL, SCORE, STEP, Batcher, BatchStats, NotStarted
from lmonnx.errors import InvalidArgumentError
from lmonnx.evaluate import SentenceResult
from lmonnx.examples import Example
from lmonnx.incremental import END, LMState
from lmonnx.scorer import Scorer
from lmonnx.serve.states import StateStore, state_bytes
from lmonnx.serve.telemetry import ServerMetrics
from lmonnx.validation import check_int, check_real

_TOKENIZE_INLINE_CHARS = 1 << 16  # past this, text is tokenized on a worker thread
ARRIVING = "lmonnx.arriving"  # ASGI scope key: the request still counts as arriving
ADMITTED = "lmonnx.admitted"  # ASGI scope key: the request was accepted (draining waits)
# A request still waiting after this long starts watching for its client's disconnect: most
# are answered sooner, and a watcher per request costs the event loop (see ScoringService.run).
WATCH_AFTER_S = 0.05


class ClientGone(Exception):
    """The caller disconnected before its work ran; nothing is left queued for it."""


class Stepper(Protocol):
    """A computation in steps of one onnxruntime call each (a
    :class:`~lmonnx.windows.CarriedWindows` underneath): ``WindowedRow``, ``HistoryRun``, the
    OpenAI routes' ``PromptRun``."""

    @property
    def done(self) -> bool: ...

    def step(self) -> None: ...


class ScoringService:
    """One model served: ``score``, ``step``, ``begin``, ``call`` (anything else, in turn),
    ``run_steps`` (a long computation, a turn per step).

    One token budget, the scorer's :attr:`~lmonnx.scorer.Scorer.window` (``Scorer(...,
    max_tokens=...)``; ``lmonnx serve --max-batch-tokens``): no onnxruntime call of any route
    holds more positions -- a batch of short sentences or decoder steps, a window of a long
    sentence, prefix or prompt.  ``timeout_s``: the longest a request waits to start.
    States: at most ``state_max_bytes``, each kept ``state_ttl_s`` after its last use.
    """

    def __init__(self, scorer: Scorer, *, name: str = "lmonnx", max_wait_ms: float = 2.0,
                 max_batch_sentences: int = 64, max_queue: int = 1024, timeout_s: float = 30.0,
                 state_ttl_s: float = 600.0, state_max_bytes: int = 512 << 20,
                 watch_disconnects: bool = True):
        self.scorer = scorer
        self.name = name
        self.timeout_s = check_real("timeout_s", timeout_s, low=0, low_open=True)
        self.metrics = ServerMetrics()
        self.batcher = Batcher(
            scorer.score_examples, scorer.incremental.step_ids,
            max_wait_s=check_real("max_wait_ms", max_wait_ms, low=0) / 1000,
            max_batch_sentences=check_int("max_batch_sentences", max_batch_sentences),
            max_batch_tokens=scorer.window, max_queue=max_queue,
            on_batch=self._observe)
        self.states = StateStore(max_bytes=state_max_bytes, ttl_s=state_ttl_s)
        one = state_bytes(scorer.begin())
        if self.states.max_bytes < one:
            raise InvalidArgumentError(f"the state memory ({state_max_bytes} bytes) holds no "
                                       f"decoder state: one takes {one} bytes")
        self.watch_disconnects = watch_disconnects
        self.started = time.time()
        self._warm_up()

    def _warm_up(self) -> None:
        """Build both sessions' kernels and the state after ``<s>`` before ``/ready``: the
        first caller must not pay for onnxruntime's first run."""
        self.scorer.score(["warm up"])
        self.scorer.begin()

    @property
    def vocab(self):
        return self.scorer.vocab

    @property
    def window(self) -> int:
        """Positions per onnxruntime call, on every route: the scorer's window."""
        return self.scorer.window

    @property
    def ready(self) -> bool:
        return not self.batcher.draining

    def _observe(self, stats: BatchStats) -> None:
        self.metrics.observe_batch(stats)
        self.refresh_gauges()

    def refresh_gauges(self) -> None:
        """Queue depth and the states kept, as they are now."""
        self.metrics.queue_depth.set(self.batcher.queued_sentences)
        self.metrics.live_states.set(len(self.states))
        self.metrics.state_bytes.set(self.states.nbytes)

    # ---- queueing ----------------------------------------------------------------------

    async def run(self, kind: str, payload, sentences: int = 1, tokens: int = 1,
                  request=None):
        """Queue work and await its result under the deadline; ``request`` (an ASGI
        request with ``scope`` and ``receive``) is watched for a disconnect."""
        scope = request.scope if request is not None else {}
        first = scope.pop(ARRIVING, False)  # the gate's request, queuing its first work
        if first:
            self.batcher.arriving(-1)
        work = self.batcher.submit(kind, payload, sentences, tokens,
                                   admitted=scope.get(ADMITTED, False))
        if first:
            scope[ADMITTED] = True  # the gate lowers the count once the answer is written
            self.batcher.admit(+1)
        self.metrics.queue_depth.set(self.batcher.queued_sentences)
        # Timers, not a task per request: a watcher task and asyncio.wait cost the event loop
        # a tenth of its time per request at 32 callers (2x64 model, 2 cores).
        loop = asyncio.get_running_loop()
        timers = [loop.call_later(self.timeout_s, self._expire, work)]
        watcher: list[asyncio.Task] = []
        if request is not None and self.watch_disconnects:
            timers.append(loop.call_later(WATCH_AFTER_S, self._watch, work, request, watcher))
        try:
            return await work.future
        except asyncio.CancelledError:  # the caller was cancelled (Ray Serve: client gone)
            self.batcher.withdraw(work)
            raise
        finally:
            for timer in timers:
                timer.cancel()
            for task in watcher:
                task.cancel()

    def _expire(self, work) -> None:
        """The deadline passed: queued work is withdrawn (504); running work finishes."""
        self.batcher.withdraw(work, NotStarted(
            f"the request waited {self.timeout_s:g} s in the queue without starting "
            "(--timeout-s); retry later"))

    def _watch(self, work, request, watcher: list) -> None:
        """Still waiting after :data:`WATCH_AFTER_S`: watch the client; once it has gone,
        its queued work is withdrawn and its running work's answer dropped."""
        def gone(task: asyncio.Task) -> None:
            if task.cancelled() or task.exception() is not None:
                return
            reason = ClientGone("the client disconnected")
            if not self.batcher.withdraw(work, reason) and not work.future.done():
                work.future.set_exception(reason)  # running: its answer is dropped

        task = asyncio.ensure_future(_disconnect(request))
        task.add_done_callback(gone)
        watcher.append(task)

    async def call(self, function: Callable, request=None):
        """``function()`` on the compute thread, in turn with the batches."""
        return await self.run(CALL, function, request=request)

    async def run_steps(self, stepper: Stepper, request=None) -> Stepper:
        """Run ``stepper`` to its end, one ``step()`` (one onnxruntime call's work) per turn
        of the compute thread: other callers' batches run between its steps, so a long
        sentence, prefix or prompt never holds the server (a million words held it for
        seconds in one turn).  A step's numbers do not depend on the turns around it."""
        while not stepper.done:
            await self.call(stepper.step, request=request)
        return stepper

    # ---- what the routes ask -----------------------------------------------------------

    async def examples(self, sentences: Sequence) -> list[Example]:
        """Checked, tokenized sentences (on a worker thread when they are long)."""
        return await tokenize_off_loop(sentences, self.scorer.examples, sentences)

    async def score(self, sentences: Sequence, *, per_token: bool = False, request=None,
                    ) -> list[tuple[Example, SentenceResult]]:
        """``(example, result)`` per sentence, in order: ``Scorer.score``'s numbers."""
        self.batcher.check_room(len(sentences))
        examples = await self.examples(sentences)
        long = [e.tokens > self.window for e in examples]
        short = [e for e, is_long in zip(examples, long) if not is_long]
        batched = iter(await self.run(SCORE, (short, per_token), sentences=len(short),
                                      tokens=sum(e.tokens for e in short), request=request)
                       if short else ())
        results = []
        for example, is_long in zip(examples, long):
            results.append(await self._score_long(example, per_token, request) if is_long
                           else next(batched))
        return list(zip(examples, results))

    async def _score_long(self, example: Example, per_token: bool, request) -> SentenceResult:
        """A sentence longer than one onnxruntime call, a window per turn of the compute
        thread (:meth:`run_steps`): the same numbers as scoring it in one turn."""
        row = await self.run_steps(self.scorer.windowed(example), request)
        self.metrics.tokens_scored.inc(example.tokens)  # calls are not counted as scoring
        return row.results(per_token)[0]

    async def begin(self, prefix: str = "", request=None) -> tuple[str, LMState]:
        """A new state id after ``<s>`` and ``prefix`` (cleaned and tokenized as a sentence;
        run a window per turn of the compute thread; no words: the shared start state)."""
        incremental = self.scorer.incremental
        ids = await tokenize_off_loop([prefix], incremental.history_ids, prefix)
        if ids is None:
            state = incremental.begin()
        else:
            run = await self.run_steps(incremental.history_run(ids, self.window), request)
            state = run.state()
        return self.states.put(state), state

    async def step(self, state_ids: Sequence[str], words: Sequence, request=None,
                   ) -> list[tuple[float, str | None, LMState]]:
        """Advance the kept states by a word each (:data:`~lmonnx.incremental.END` ends
        one): ``(logprob in nats, the new state's id or None when ended, new state)``."""
        states = [self.states.get(key) for key in state_ids]
        states, ids = self.scorer.incremental.check_step(states, words)
        need = len(states) * state_bytes(states[0]) if states else 0
        if need > self.states.max_bytes:  # its own new states would evict each other
            raise InvalidArgumentError(
                f"a step of {len(states)} hypotheses makes {need / 2**20:.2f} MiB of states; "
                f"the server keeps at most {self.states.max_bytes / 2**20:.2f} MiB "
                f"(--state-memory-mib): step fewer at a time")
        logprobs, new = await self.run(STEP, (states, ids), sentences=len(states),
                                       tokens=len(states), request=request)
        return [(float(lp), None if s.ended else self.states.put(s), s)
                for lp, s in zip(logprobs, new)]

    def forget(self, state_id: str) -> None:
        """Drop a kept state now (a pruned hypothesis)."""
        self.states.drop(state_id)


async def tokenize_off_loop(texts, function: Callable, *args):
    """``function(*args)``, on a worker thread when ``texts`` (the strings of a request) hold
    more than 64k characters: a 1M-word text would hold the event loop, and every other
    caller, for a noticeable time."""
    return await off_loop_if_large(sum(len(t) for t in texts if isinstance(t, str)),
                                   function, *args)


async def off_loop_if_large(size: int, function: Callable, *args):
    """``function(*args)``, on a worker thread when ``size`` (characters of text, or token
    ids) is past 64k, inline otherwise (a thread hop costs more than a short request)."""
    if size > _TOKENIZE_INLINE_CHARS:
        return await asyncio.to_thread(function, *args)
    return function(*args)


async def _disconnect(request) -> None:
    """Return when the client has gone: the ASGI ``http.disconnect`` message, which a server
    sends only after the body has been read in full."""
    while True:
        message = await request.receive()
        if message.get("type") == "http.disconnect":
            return


__all__ = ["ScoringService", "ClientGone", "END", "ARRIVING", "ADMITTED", "tokenize_off_loop",
           "off_loop_if_large"]
