"""``lmonnx serve``: the HTTP API (FastAPI on uvicorn) over a :class:`ScoringService`.

    POST /v1/score     {"sentences": [...], "per_token": false}  -> {"results": [...]}
    POST /v1/predict   {"prefix": "...", "k": 5}                  -> {"predictions": [...]}
    POST /v1/generate  {"prefix": "", "words": 20, "temperature": 1, "top_k": null, "seed": null}
    POST /v1/states    {"prefix": ""}                             -> {"state": id, "words": n}
    POST /v1/step      {"steps": [{"state": id, "word": "cat"} | {"state": id, "end": true}]}
    DELETE /v1/states/{id}
    GET /health, /ready, /metrics; the OpenAI / vLLM routes of :mod:`lmonnx.serve.openai_routes`

Log-probabilities are natural logs (nats); ``</s>`` is scored, ``<s>`` is not.  Errors are
``{"error": {"type": ..., "message": ...}}`` with their status: 400 a body that is not JSON or
not UTF-8, 404 an unknown or expired state, 413 a body over ``max_body_bytes``, 422 a value of
the wrong type or out of range, 429 a full queue (``Retry-After``), 503 while draining, 504
a request not started within ``timeout_s``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmonnx.errors import InferenceError, LmonnxError, ProviderError
from lmonnx.evaluate import token_scores
from lmonnx.incremental import END, EOS_TEXT
from lmonnx.metrics import finite_or_none
from lmonnx.serve.batch_queue import Draining, NotStarted, Overloaded, hand_over_the_gil_quickly
from lmonnx.serve.protocol import (ApiError, GenerateBody, PredictBody, ScoreBody, StatesBody,
                                   StepBody, StrictJSONResponse, error_response, json_body,
                                   validation_error)
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


def _score_record(service: ScoringService, example, result, per_token: bool) -> dict:
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
            body = await self._read_body(scope, receive, send_timed)
            if body is None:
                return
            direct = DIRECT_ROUTES.get(scope["path"]) if scope["method"] == "POST" else None
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
            return error_response(*validation_error(exc))
        except Exception as exc:  # noqa: BLE001 - answered as FastAPI's handlers answer it
            err = _api_error(exc)
            return error_response(err.status, err.kind, str(err), err.headers)

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
              "/v1/states", "/v1/step", "/v1/models", "/v1/completions", "/tokenizer_info",
              "/tokenize", "/detokenize"}
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
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, **service_options):
    """The app of one model file: a :class:`~lmonnx.scorer.Scorer`, its service (warmed
    up), the routes.  ``service_options``: :class:`ScoringService`'s keywords."""
    from lmonnx.scorer import Scorer

    scorer = Scorer(model, providers=providers, num_threads=threads)
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
    from lmonnx.serve.openai_routes import add_openai_routes

    add_openai_routes(app, service)
    return _Gate(app, service, max_body_bytes)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return error_response(*validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, kind, str(exc.detail),
                              getattr(exc, "headers", None))  # 405: Allow

    async def answer(request: Request, exc: Exception):
        err = _api_error(exc)
        return error_response(err.status, err.kind, str(err), err.headers)

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

    @app.post("/v1/score")
    async def score(body: ScoreBody, request: Request):
        return await score_answer(service, body, request)

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

    @app.post("/v1/states")
    async def states(body: StatesBody, request: Request):
        key, state = await service.begin(body.prefix, request=request)
        return {"state": key, "words": state.words}

    @app.delete("/v1/states/{state_id}")
    async def forget(state_id: str):
        service.forget(state_id)
        return {"deleted": state_id}

    @app.post("/v1/step")
    async def step(body: StepBody, request: Request):
        return await step_answer(service, body, request)


async def score_answer(service: ScoringService, body: ScoreBody, request) -> dict:
    """``POST /v1/score``'s answer."""
    scored = await service.score(body.sentences, per_token=body.per_token, request=request)
    return {"results": [_score_record(service, e, r, body.per_token) for e, r in scored]}


async def step_answer(service: ScoringService, body: StepBody, request) -> dict:
    """``POST /v1/step``'s answer."""
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
# injection, its middleware): the same body models and answer functions, pydantic's JSON
# parser (its messages say "array", "object"), about a quarter less event-loop CPU per
# request -- which is what caps throughput for small models (benchmarks/serve_table.py).
# FastAPI declares them too, for /docs and the OpenAPI schema; requests never reach those.
DIRECT_ROUTES = {"/v1/score": (ScoreBody, score_answer), "/v1/step": (StepBody, step_answer)}


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


def serve(app, sock: socket.socket, *, log_level: str = "warning", on_ready=None) -> bool:
    """Run ``app`` on uvicorn over ``sock`` until SIGINT/SIGTERM.  The first signal drains:
    ``/ready`` answers 503, new work 503, every accepted request is answered, then uvicorn
    stops; True.  A second signal stops at once, cutting off what runs: False."""
    host, port = sock.getsockname()[:2]
    hand_over_the_gil_quickly()
    # Keep-alive longer than clients' pools keep idle connections (httpx: 5 s), so that the
    # server never closes a connection a client is reusing at that moment (a failed request).
    # The access log (and the X-Forwarded-For it would name) only where it is printed:
    # uvicorn formats each line's client and path before the logger drops it.
    access_log = log_level in ("info", "debug")
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_keep_alive=65, lifespan="off", access_log=access_log,
                            proxy_headers=access_log)
    server = _DrainingServer(config, app.state.service, on_ready)
    server.run(sockets=[sock])
    return not server.forced


class _DrainingServer(uvicorn.Server):
    def __init__(self, config, service: ScoringService, on_ready=None):
        super().__init__(config)
        self.service = service
        self._on_ready = on_ready
        self._draining = False
        self.forced = False

    async def startup(self, sockets=None):
        await super().startup(sockets)
        if self._on_ready is not None:
            self._on_ready(self)

    def handle_exit(self, sig, frame):
        # Not uvicorn's handler: it would stop reading at once and re-raise the signal at
        # the end (exit 143); a drained server exits 0.
        if self._draining:  # the second signal: stop now
            self.should_exit = self.force_exit = self.forced = True
            return
        self._draining = True
        self.service.batcher.draining = True
        loop = asyncio.get_event_loop()
        loop.call_soon_threadsafe(lambda: loop.create_task(self._drain_then_exit()))

    async def _drain_then_exit(self):
        await self.service.batcher.drain()
        self.should_exit = True  # uvicorn answers the requests it is writing, then returns


__all__ = ["create_app", "serve", "ScoreBody", "StepBody", "ApiError", "error_response"]
