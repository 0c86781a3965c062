"""``lmonnx serve``: the HTTP API (FastAPI on uvicorn) over a :class:`ScoringService`.

    POST /v1/score     {"sentences": [...], "per_token": false}  -> {"results": [...]}
    POST /v1/predict   {"prefix": "...", "k": 5}                  -> {"predictions": [...]}
    POST /v1/generate  {"prefix": "", "words": 20, "temperature": 1, "top_k": null, "seed": null}
    POST /v1/states    {"prefix": ""}                             -> {"state": id, "words": n}
    POST /v1/step      {"steps": [{"state": id, "word": "cat"} | {"state": id, "end": true}]}
    POST /v1/rescore   {"utterances": [{"hypotheses": [...], "am_scores": [...]}],
                        "alpha": 0.5, "beta": 0}                 -> {"results": [...]}
    DELETE /v1/states/{id}
    GET /health, /ready, /metrics; the OpenAI / vLLM routes of :mod:`lmonnx.serve.openai_routes`

Log-probabilities are natural logs (nats); ``</s>`` is scored, ``<s>`` is not.  Errors are
``{"error": {"type": ..., "message": ...}}`` with their status: 400 a body that is not JSON or
not UTF-8, 404 an unknown or expired state, 405 a method a route does not take, 413 a body
over ``max_body_bytes``, 422 a value of the wrong type or out of range, 429 a full queue
(``Retry-After``), 503 while draining, 504 a request not started within ``timeout_s``.  The
OpenAI routes answer errors as OpenAI does (a malformed request: 400
``invalid_request_error``).

Every onnxruntime call of every route holds at most the one token budget, the scorer's
window (``max_batch_tokens``: ``lmonnx serve --max-batch-tokens``).  This module neither
prints nor installs signal handlers: :class:`DrainingServer` drains or stops when told
(``lmonnx serve``'s signal handlers tell it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time

import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import ValidationError
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmonnx.errors import InferenceError, LmonnxError, ProviderError
from lmonnx.evaluate import token_scores
from lmonnx.incremental import END, EOS_TEXT
from lmonnx.metrics import finite_or_none
from lmonnx.rescore import Utterance, combined_scores, distinct_texts, lm_arrays
from lmonnx.serve.batch_queue import Draining, NotStarted, Overloaded, hand_over_the_gil_quickly
from lmonnx.serve.openai_routes import OpenAIRoute, add_openai_routes
from lmonnx.serve.protocol import (ApiError, GenerateBody, PredictBody, RescoreBody, ScoreBody,
                                   StatesBody, StepBody, StrictJSONResponse, error_response,
                                   json_body, openai_error_response, validation_error)
from lmonnx.serve.service import ADMITTED, ARRIVING, ClientGone, ScoringService
from lmonnx.serve.states import UnknownState

log = logging.getLogger("lmonnx.serve.app")
DEFAULT_MAX_BODY_BYTES = 32 << 20  # a 1M-word sentence is ~6 MB of JSON


def _api_error(exc: BaseException) -> ApiError:
    """The HTTP answer of an exception raised while serving a request."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, Overloaded):
        return ApiError(429, "overloaded", str(exc), {"Retry-After": str(exc.retry_after)})
    if isinstance(exc, Draining):
        return ApiError(503, "unavailable", str(exc), {"Connection": "close"})
    if isinstance(exc, NotStarted):
        return ApiError(504, "timeout", str(exc))
    if isinstance(exc, UnknownState):
        return ApiError(404, "not_found", str(exc))
    if isinstance(exc, ClientGone):
        return ApiError(499, "client_closed", str(exc))
    if isinstance(exc, (InferenceError, ProviderError)):  # the model or the runtime failed
        log.error("model failure: %s", exc)
        return ApiError(500, "model_error", str(exc).splitlines()[0])
    if isinstance(exc, (LmonnxError, ValueError, TypeError)):
        return ApiError(422, "invalid_request", str(exc).splitlines()[0] if str(exc) else
                        type(exc).__name__)
    log.exception("internal error", exc_info=exc)
    return ApiError(500, "internal", f"{type(exc).__name__}: {exc}".splitlines()[0])


def _score_record(example, result, per_token: bool) -> dict:
    record = {"logprob": result.logprob, "tokens": result.tokens, "oovs": result.oovs,
              "perplexity": finite_or_none(result.perplexity)}
    if per_token:
        record["per_token"] = [{"word": t.word, "id": t.id, "logprob": t.logprob,
                                "oov": t.is_oov}
                               for t in token_scores(example, result)]
    return record


# ---- the ASGI layer under FastAPI: body limit, UTF-8, arrivals, request metrics ---------

class _Gate:
    """Reads the body first (at most ``max_body_bytes``: 413 past it, at once when
    Content-Length says so), refuses bytes that are not UTF-8 (400), counts the request as
    arriving for the batcher until it queues work, and times every answer."""

    def __init__(self, app, service: ScoringService, max_body_bytes: int):
        self.app, self.service, self.max_body_bytes = app, service, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = {"code": 499}  # no answer started: the client left (nginx's 499)
        metrics = self.service.metrics

        async def send_timed(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message = self._closing_if_draining(message)
            await send(message)

        if scope["method"] == "POST":  # the API speaks JSON only: `curl -d` needs no header
            scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope["headers"].append((b"content-type", b"application/json"))
        batcher = self.service.batcher
        batcher.arriving(+1)
        scope[ARRIVING] = True
        try:
            direct = DIRECT_ROUTES.get(scope["path"])
            if direct is not None and scope["method"] != "POST":
                await error_response(405, "method_not_allowed", "Method Not Allowed",
                                     {"Allow": "POST"})(scope, receive, send_timed)
                return
            body = await self._read_body(scope, receive, send_timed)
            if body is None:
                return
            if direct is not None:
                answer = await self._answer_directly(direct, body, scope, receive)
                if isinstance(answer, bytes):  # 200: sent as is, no Response object to build
                    await send_timed({"type": "http.response.start", "status": 200,
                                      "headers": [(b"content-type", b"application/json"),
                                                  (b"content-length",
                                                   str(len(answer)).encode())]})
                    await send_timed({"type": "http.response.body", "body": answer})
                else:
                    await answer(scope, receive, send_timed)
                return
            await self.app(scope, replay_receive(body, receive), send_timed)
        finally:
            if scope.pop(ARRIVING, False):
                batcher.arriving(-1)
            if scope.pop(ADMITTED, False):
                batcher.admit(-1)
            endpoint = _endpoint(scope.get("path", ""))
            metrics.requests.labels(endpoint, str(status["code"])).inc()
            metrics.request_seconds.labels(endpoint).observe(time.perf_counter() - started)
            if scope["method"] != "GET" and status["code"] in _REASONS:
                metrics.rejections.labels(_REASONS[status["code"]]).inc()

    def _closing_if_draining(self, start: dict) -> dict:
        """A response start, with ``Connection: close`` while draining: the client must not
        send its next request on this connection, which closes when the server exits (that
        request would fail mid-way)."""
        headers = start.get("headers") or []
        if not self.service.batcher.draining or any(k.lower() == b"connection"
                                                    for k, _ in headers):
            return start
        return {**start, "headers": [*headers, (b"connection", b"close")]}

    async def _answer_directly(self, route, body: bytes, scope, receive) -> bytes | Response:
        """A hot route's answer: its JSON body (200), or an error response."""
        model, answer = route
        try:
            # A full queue refuses any work: before parsing, so a refusal costs next to nothing.
            self.service.batcher.check_room(1)
            parsed = model.model_validate_json(body)
            return json_body(await answer(self.service, parsed, _Request(scope, receive)))
        except ValidationError as exc:
            return _response(validation_error(exc))
        except Exception as exc:  # noqa: BLE001 - answered as FastAPI's handlers answer it
            return _response(_api_error(exc))

    async def _read_body(self, scope, receive, send) -> bytes | None:
        headers = dict(scope.get("headers") or ())
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await send_error(send, 413, "too_large", self._too_large(int(declared)))
            return None
        read = await read_body(receive, self.max_body_bytes)
        if read is None:
            return None
        body, over = read
        if over:
            await send_error(send, 413, "too_large", self._too_large(len(body), "at least "))
            return None
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as exc:
            await send_error(send, 400, "invalid_utf8",
                             f"the request body is not valid UTF-8 (byte {exc.start})")
            return None
        return body

    def _too_large(self, size: int, qualifier: str = "") -> str:
        return (f"the request body is {qualifier}{size} bytes; this server takes at most "
                f"{self.max_body_bytes} (--max-body-bytes)")

    @property
    def state(self):
        """The FastAPI app's ``state`` (``state.service``), for Ray Serve's replica."""
        return self.app.state


async def read_body(receive, limit: int) -> tuple[bytes, bool] | None:
    """``(body, over)``: the request body read from ASGI ``receive``, stopping once past
    ``limit`` bytes (``over`` True: what was read, and more may follow); None when the client
    disconnected first."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > limit:
            return b"".join(chunks), True
        if not message.get("more_body", False):
            return b"".join(chunks), False


async def send_error(send, status: int, kind: str, message: str) -> None:
    """Answer an ASGI request with an error of its own (the gate's refusals), closing the
    connection."""
    await error_response(status, kind, message, {"Connection": "close"})({"type": "http"},
                                                                          None, send)


def _endpoint(path: str) -> str:
    """A metrics label: the route, never the raw path (ids would explode the series)."""
    if path.startswith("/v1/states/"):
        return "/v1/states/{id}"
    return path if path in _ENDPOINTS else "other"


_ENDPOINTS = {"/health", "/ready", "/metrics", "/v1/score", "/v1/predict", "/v1/generate",
              "/v1/states", "/v1/step", "/v1/rescore", "/v1/models", "/v1/completions",
              "/tokenizer_info", "/tokenize", "/detokenize"}
def replay_receive(body: bytes, receive, more_body: bool = False):
    """An ASGI ``receive`` that gives the already read ``body`` first, then what ``receive``
    gives (the rest of the body, or the disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": more_body}]

    async def receive_again():
        return pending.pop() if pending else await receive()

    return receive_again


class _Request:
    """What the service needs of a request: its ASGI ``scope`` and ``receive``."""

    __slots__ = ("scope", "receive")

    def __init__(self, scope, receive):
        self.scope, self.receive = scope, receive


_REASONS = {400: "invalid_body", 413: "too_large", 429: "queue_full", 503: "draining",
            504: "timeout"}


def build_app(model, *, providers: str = "auto", threads: int | None = None,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_batch_tokens: int | None = None,
              **service_options):
    """The app of one model file: a :class:`~lmonnx.scorer.Scorer`, its service (warmed
    up), the routes.  ``max_batch_tokens``: the one token budget of every onnxruntime call
    (the scorer's window; None: its logits budget).  ``service_options``:
    :class:`ScoringService`'s keywords."""
    from lmonnx.scorer import Scorer

    scorer = Scorer(model, providers=providers, num_threads=threads,
                    max_tokens=max_batch_tokens)
    return create_app(ScoringService(scorer, **service_options), max_body_bytes=max_body_bytes)


def create_app(service: ScoringService, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               ) -> "_Gate":
    """The ASGI app of one :class:`ScoringService`: the gate in front of the FastAPI app
    (reachable as ``.app``; ``.state.service`` is the service)."""
    app = FastAPI(title="lmonnx", description="Stacked-LSTM word LM scoring (nats)",
                  default_response_class=StrictJSONResponse, docs_url="/docs", redoc_url=None)
    app.state.service = service
    _add_error_handlers(app)
    _add_routes(app, service)
    add_openai_routes(app, service)
    _document_direct_routes(app)
    return _Gate(app, service, max_body_bytes)


def _response(err: ApiError, request: Request | None = None):
    """The error answer of ``err``: OpenAI's shape on an OpenAI route, lmonnx's elsewhere."""
    if request is not None and isinstance(request.scope.get("route"), OpenAIRoute):
        return openai_error_response(err)
    return error_response(err.status, err.kind, str(err), err.headers)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return _response(validation_error(exc), request)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _response(ApiError(exc.status_code, kind, str(exc.detail),
                                  getattr(exc, "headers", None)), request)  # 405: Allow

    async def answer(request: Request, exc: Exception):
        return _response(_api_error(exc), request)

    # Named classes are answered by Starlette's exception middleware; only what is left (a
    # bug) reaches the catch-all, which answers 500 and lets the server log the traceback.
    for cls in (ApiError, Overloaded, Draining, NotStarted, UnknownState, ClientGone,
                LmonnxError, ValueError, TypeError, Exception):
        app.add_exception_handler(cls, answer)


def _add_routes(app: FastAPI, service: ScoringService) -> None:
    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if not service.ready:
            return error_response(503, "unavailable", "the server is draining")
        return {"status": "ready", "model": service.name}

    @app.get("/metrics")
    async def metrics():
        service.refresh_gauges()
        return Response(service.metrics.render(), media_type=service.metrics.content_type)

    @app.post("/v1/predict")
    async def predict(body: PredictBody, request: Request):
        top = await service.call(lambda: service.scorer.predict_next(body.prefix, k=body.k),
                                 request=request)
        return {"predictions": [{"word": w, "probability": p} for w, p in top]}

    @app.post("/v1/generate")
    async def generate(body: GenerateBody, request: Request):
        words = await service.call(lambda: service.scorer.generate(
            body.prefix, words=body.words, temperature=body.temperature, top_k=body.top_k,
            seed=body.seed), request=request)
        return {"prefix": body.prefix, "words": words,
                "ended": bool(words) and words[-1] == EOS_TEXT}

    @app.post("/v1/rescore")
    async def rescore(body: RescoreBody, request: Request):
        return await rescore_answer(service, body, request)

    @app.post("/v1/states")
    async def states(body: StatesBody, request: Request):
        key, state = await service.begin(body.prefix, request=request)
        return {"state": key, "words": state.words}

    @app.delete("/v1/states/{state_id}")
    async def forget(state_id: str):
        service.forget(state_id)
        return {"deleted": state_id}


async def score_answer(service: ScoringService, body: ScoreBody, request) -> dict:
    """Score sentences: each one's log-probability (nats, ``</s>`` included), tokens, OOVs
    and perplexity, with ``per_token`` each token's word, id, log-probability and OOV flag
    (``POST /v1/score``'s answer)."""
    scored = await service.score(body.sentences, per_token=body.per_token, request=request)
    return {"results": [_score_record(e, r, body.per_token) for e, r in scored]}


async def rescore_answer(service: ScoringService, body: RescoreBody, request) -> dict:
    """Rescore n-best lists as ``lmonnx rescore`` does (:mod:`lmonnx.rescore`): each
    hypothesis gets ``am + alpha * lm + beta * words`` (``lm``: its log-probability with
    ``</s>``, nats); per utterance, the best's index and text, and every hypothesis's
    ``lm_logprobs`` and ``scores``.  Each distinct text is scored once, batched with the
    other callers' sentences (``POST /v1/rescore``'s answer)."""
    utterances = []
    for i, item in enumerate(body.utterances):
        if len(item.am_scores) != len(item.hypotheses):
            raise ApiError(422, "invalid_request",
                           f"utterances.{i}: {len(item.hypotheses)} hypotheses but "
                           f"{len(item.am_scores)} am_scores", param=f"utterances.{i}")
        utterances.append(Utterance(str(i), tuple(h.strip() for h in item.hypotheses),
                                    np.array(item.am_scores, dtype=np.float64)))
    texts = distinct_texts(utterances)
    scored = await service.score(texts, request=request)
    lm = lm_arrays(utterances, {text: result.logprob for text, (_, result) in zip(texts, scored)})
    scores = combined_scores(utterances, lm, body.alpha, body.beta)
    results = []
    for utterance, lm_row, row in zip(utterances, lm, scores):
        best = int(np.argmax(row))  # the first of equal scores: the earlier hypothesis
        results.append({"best": best, "text": utterance.hypotheses[best],
                        "lm_logprobs": lm_row.tolist(), "scores": row.tolist()})
    return {"results": results}


async def step_answer(service: ScoringService, body: StepBody, request) -> dict:
    """Advance kept decoder states by one word each, or end them (``"end": true`` scores
    ``</s>``): each step's log-probability and its new state's id (``POST /v1/step``'s
    answer)."""
    words = []
    for i, item in enumerate(body.steps):
        if item.end == (item.word is not None):
            raise ApiError(422, "invalid_request",
                           f"steps.{i}: give either a word or \"end\": true")
        words.append(END if item.end else item.word)
    results = await service.step([s.state for s in body.steps], words, request=request)
    return {"results": [{"logprob": lp, "state": key, "ended": new.ended,
                         "words": new.words} for lp, key, new in results]}


# The hot routes, answered by the gate without FastAPI's layers (routing, dependency
# injection, its middleware): pydantic's JSON parser (its messages say "array", "object"),
# about a quarter less event-loop CPU per request -- which is what caps throughput for small
# models (benchmarks/serve_table.py).  FastAPI has no route for them (it would never be
# reached); /docs and the OpenAPI schema describe them from their body models
# (_document_direct_routes).
DIRECT_ROUTES = {"/v1/score": (ScoreBody, score_answer), "/v1/step": (StepBody, step_answer)}


def _document_direct_routes(app: FastAPI) -> None:
    """Add the gate's :data:`DIRECT_ROUTES` to ``app``'s OpenAPI schema (``/docs``,
    ``/openapi.json``): ``POST`` with their body models' JSON schemas, their answers'
    docstrings, and lmonnx's error answers."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        refs, defs = models_json_schema(
            [(model, "validation") for model, _ in DIRECT_ROUTES.values()],
            ref_template="#/components/schemas/{model}")
        schema.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
        error = {"description": "lmonnx's error: {\"error\": {\"type\", \"message\"}} (400, "
                                "404, 413, 422, 429, 503, 504)"}
        for path, (model, answer) in DIRECT_ROUTES.items():
            schema["paths"][path] = {"post": {
                "summary": answer.__doc__.split(":")[0],
                "description": " ".join(answer.__doc__.split()),
                "operationId": f"{answer.__name__}_post",
                "requestBody": {"required": True, "content": {
                    "application/json": {"schema": refs[(model, "validation")]}}},
                "responses": {"200": {"description": "Successful Response",
                                      "content": {"application/json": {"schema": {}}}},
                              "default": error}}}
        app.openapi_schema = schema
        return schema

    app.openapi = openapi


# ---- running it --------------------------------------------------------------------------

def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host``:``port`` and listening; an ``OSError`` that names the
    address when it cannot be (an unknown host, a port in use): the CLI's one-line error,
    before any model work, instead of uvicorn's log line and exit status 3."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen on {host}:{port} (--host, --port): "
                                 f"{exc.strerror or exc}") from None
    return sock


class DrainingServer(uvicorn.Server):
    """uvicorn serving ``app`` (:func:`create_app`'s) over the listening socket ``sock``,
    until told to stop: :meth:`drain` (``/ready`` and new work answer 503, every accepted
    request is answered, then it stops) or :meth:`stop_now` (cutting off what runs).

    It installs no signal handler (uvicorn's ``Server`` would: a library must not change
    its process): ``lmonnx serve`` installs its own, which call these two.  ``on_ready(self)``
    is called once it accepts connections.
    """

    def __init__(self, app, sock: socket.socket, *, log_level: str = "warning", on_ready=None):
        host, port = sock.getsockname()[:2]
        # Keep-alive longer than clients' pools keep idle connections (httpx: 5 s), so that
        # the server never closes a connection a client is reusing at that moment (a failed
        # request).  The access log (and the X-Forwarded-For it would name) only where it is
        # printed: uvicorn formats each line's client and path before the logger drops it.
        access_log = log_level in ("info", "debug")
        super().__init__(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                        timeout_keep_alive=65, lifespan="off",
                                        access_log=access_log, proxy_headers=access_log))
        self.sock = sock
        self.service: ScoringService = app.state.service
        self._on_ready = on_ready
        self.draining = False
        self.forced = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None

    @contextlib.contextmanager
    def capture_signals(self):
        """No signal handlers (uvicorn installs its own here): the program's to install."""
        yield

    def run_until_stopped(self) -> bool:
        """Serve until :meth:`drain` or :meth:`stop_now`: True when drained, False when
        stopped at once."""
        hand_over_the_gil_quickly()
        self.run(sockets=[self.sock])
        return not self.forced

    async def startup(self, sockets=None):
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)
        if self._on_ready is not None:
            self._on_ready(self)

    def drain(self) -> None:
        """Take nothing new, answer every accepted request, then stop (exit 0 for a CLI);
        from any thread or a signal handler; once (a second call does nothing).  Not
        uvicorn's exit, which stops reading at once."""
        if self.draining:
            return
        self.draining = True
        self.service.batcher.draining = True
        if self._loop is None:  # not serving yet: nothing was accepted
            self.should_exit = True
            return
        try:
            self._loop.call_soon_threadsafe(self._start_draining)
        except RuntimeError:  # the loop has closed: the server has stopped already
            pass

    def _start_draining(self) -> None:
        # The task is kept: the loop holds only a weak reference to a task, which could be
        # garbage-collected mid-drain.
        self._drain_task = self._loop.create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        await self.service.batcher.drain()
        self.should_exit = True  # uvicorn answers the requests it is writing, then returns

    def stop_now(self) -> None:
        """Stop at once, cutting off the requests that run (exit 130 for a CLI)."""
        self.should_exit = self.force_exit = self.forced = True


__all__ = ["create_app", "build_app", "DrainingServer", "listening_socket", "ScoreBody",
           "StepBody", "ApiError", "error_response"]
