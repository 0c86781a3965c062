"""``lmonnx serve MODEL --ray auto|ADDRESS --replicas N``: the HTTP API of :mod:`lmonnx.serve.app`
as a Ray Serve application.

    client ──HTTP──> Ray Serve proxy ──StateRouter──> replica 1 .. N
                                                      each: Scorer + ScoringService (its own
                                                      batcher, its own decoder states) behind
                                                      the local server's app (body limit,
                                                      UTF-8 check, metrics, routes)

**The same app.**  A replica builds what ``lmonnx serve`` builds locally
(:func:`lmonnx.serve.app.build_app`: the ``Scorer``, the warmed-up ``ScoringService``, the
FastAPI routes behind the body-limit / UTF-8 / metrics gate) and hands that ASGI app to Ray
Serve (``@serve.ingress`` late-bound through ``__serve_build_asgi_app__``), so every route,
error and number is the local server's.  ``/metrics`` is the answering replica's.

**The model** travels as bytes through the object store (``ray.put`` on the driver, checked
there first, with one session): replicas on any node load it, no shared file system needed.
The driver (``lmonnx serve --ray``) owns that object and lives as long as the application.
Joining the cluster, the model's check and its trip through the object store are
:mod:`lmonnx.cluster`'s, shared with evaluation on Ray.

**Decoder states are per replica** (``/v1/states``, ``/v1/step``, ``DELETE /v1/states/ID``).
A state id starts with its replica's tag (``TAG.secret``; Ray Serve's replica unique id),
and the deployment routes with :class:`StateRouter`, a Ray Serve request router:

- a request carrying Ray Serve's session header (``x-session-id``, or the name in
  ``RAY_SERVE_SESSION_ID_HEADER_KEY`` on the cluster) whose value is a state id (any state of
  the session: they share the tag) goes straight to the replica holding it;
- a state request without it reaches any replica, which forwards it, in one hop, to the
  replica its state ids name (a deployment-handle call routed by the same router), so a
  client that knows nothing of Ray still works: the header only saves the hop;
- everything else goes to the less loaded of two random replicas (power of two choices),
  those on the router's own node first (Ray's ``LocalityMixin``, as Ray's default router).

States of different replicas cannot be stepped together (404, saying so); a replica that is
gone takes its states with it (404, as an expired state).  ``watch_disconnects`` is off by
default: Ray Serve itself cancels a request whose client went away.

**The driver** is :class:`RayServer`, in steps (check, connect, deploy, close) so that the
CLI can install its signal handlers between them: the library prints nothing and installs no
handler.  Public Ray APIs only (``ray.serve``, ``ray.serve.request_router``,
``ray.serve.config.RequestRouterConfig``).  Ray Serve is optional (``pip install
'lmonnx[ray,serve]'``): this module imports without it.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
from pathlib import Path

from lmonnx.cluster import (check_fits, checked_model, connect, optional_modules, require,
                            share_model, shared_model, threads_for)
from lmonnx.errors import InvalidArgumentError
from lmonnx.validation import check_int, check_real

# Everything else in lmonnx works without Ray Serve: these are None then, and _MISSING says why.
(ray, serve, request_router), _MISSING = optional_modules("ray", "ray.serve",
                                                          "ray.serve.request_router")

__all__ = ["RayServer", "deploy", "StateRouter", "APP_NAME", "SESSION_HEADER",
           "DEFAULT_CPUS_PER_REPLICA"]

APP_NAME = "lmonnx"
DEPLOYMENT = "lmonnx"
DEFAULT_CPUS_PER_REPLICA = 0.5
"""CPUs reserved per replica: two replicas fit a 2-CPU machine next to Serve's controller
and proxy (which reserve none).  onnxruntime gets ``ceil`` of it as intra-op threads unless
``threads`` says otherwise."""
DEFAULT_MAX_ONGOING = 256
"""Requests in flight per replica: high, so that the replica's batcher sees many callers'
sentences at once (Ray Serve's own default, 5, would starve cross-request batching); the
service's ``max_queue`` still answers 429 past its limit."""
_SEP = "."


def _require_serve() -> None:
    require(_MISSING, "serving on Ray needs Ray Serve", "lmonnx[ray,serve]")


SESSION_HEADER = os.environ.get("RAY_SERVE_SESSION_ID_HEADER_KEY", "x-session-id")
"""The HTTP header Ray Serve reads a session id from (``x-session-id`` unless the cluster
sets ``RAY_SERVE_SESSION_ID_HEADER_KEY``): send a state id in it to reach its replica.  Ray
keeps its own copy of the name in a private module only, so this reads the same documented
variable, the same way; requests carry the id to :class:`StateRouter` as the public
``PendingRequest.metadata.session_id``."""


def replica_of(state_id: str) -> str:
    """The replica tag a state id starts with ('' for an id without one)."""
    tag, sep, _ = state_id.partition(_SEP)
    return tag if sep else ""


# ---- routing ------------------------------------------------------------------------------

_ROUTER_BASES = ((request_router.LocalityMixin, request_router.RequestRouter)
                 if request_router is not None else (object,))


class StateRouter(*_ROUTER_BASES):
    """Ray Serve request router (``ray.serve.request_router``): a request whose session id
    (the session header, or a handle's ``session_id`` option) starts with a live replica's
    tag goes to that replica only; any other request to the less loaded of two random
    replicas (Serve's own probe picks between them), those on the router's node first
    (``LocalityMixin``'s ``apply_locality_routing``, as Serve's default router does).

    Not ``FIFOMixin``: it hands the replica found for one request to the oldest request
    waiting, whatever that one's session, so a state's request could land on another replica
    (one hop more); without it Serve gives each request the replica chosen for it, which is
    what routing by session needs (Ray's docs: FIFO suits policies that do not depend on the
    request).  Nor ``MultiplexMixin``: no replica loads multiplexed models."""

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        session = pending_request.metadata.session_id if pending_request is not None else ""
        tag = replica_of(session) if session else ""
        if tag:
            for replica in candidate_replicas:
                if replica.replica_id.unique_id == tag:
                    return [[replica]]
            # A replica that is gone: any other answers 404 (its states went with it).
        replicas = self.curr_replicas
        ids = [i for i in self.apply_locality_routing(pending_request) if i in replicas]
        return [[replicas[i] for i in random.sample(ids, min(2, len(ids)))]] if ids else []


# ---- the replica ---------------------------------------------------------------------------

def _tagged_store(store, tag: str):
    """A :class:`lmonnx.serve.states.StateStore` like ``store`` whose ids start with ``tag.``."""
    from lmonnx.serve.states import StateStore

    return StateStore(max_bytes=store.max_bytes, ttl_s=store.ttl_s, prefix=f"{tag}{_SEP}")


class _Replica:
    """One replica: the local server's app over its own Scorer and ScoringService.  Wrapped
    by ``serve.ingress()`` in :func:`_deployment` (the app is built here, bound late)."""

    def __init__(self, model, *, name: str, providers: str, threads: int,
                 max_body_bytes: int, service_options: dict):
        from lmonnx.serve.batch_queue import hand_over_the_gil_quickly
        from lmonnx.serve.app import build_app

        hand_over_the_gil_quickly()  # the replica's process serves: its loop beside the batcher
        model = shared_model(model)
        context = serve.get_replica_context()
        self.tag = context.replica_id.unique_id
        self.app_name, self.deployment = context.app_name, context.deployment
        self.gate = build_app(model, providers=providers, threads=threads,
                              max_body_bytes=max_body_bytes, **service_options)
        service = self.gate.state.service
        service.states = _tagged_store(service.states, self.tag)
        self.service = service
        self.model_name = name
        self._handle = None

    def __serve_build_asgi_app__(self):
        return _Forwarding(self)

    def _peer(self, state_id: str):
        if self._handle is None:
            self._handle = serve.get_deployment_handle(self.deployment, self.app_name)
        return self._handle.options(session_id=state_id, method_name="forwarded")

    async def forwarded(self, scope: dict, body: bytes) -> tuple[int, list, bytes]:
        """A request another replica received for a state of this one: answered here by the
        app, never forwarded again; ``(status, headers, body)``."""
        return await _call_asgi(self.gate, scope, body)


async def _call_asgi(app, scope: dict, body: bytes) -> tuple[int, list, bytes]:
    """One HTTP request through an ASGI app, its answer collected."""
    sent = False
    answer = {"status": 500, "headers": [], "body": []}

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # no disconnect: the forwarding replica holds the call

    async def send(message):
        if message["type"] == "http.response.start":
            answer["status"] = message["status"]
            answer["headers"] = list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            answer["body"].append(message.get("body", b""))

    await app(dict(scope), receive, send)
    return answer["status"], answer["headers"], b"".join(answer["body"])


def _state_ids(scope: dict, body: bytes) -> list[str] | None:
    """The state ids a state request names (None: not a state request, or a body the app
    will refuse anyway)."""
    method, path = scope.get("method"), scope.get("path", "")
    if method == "DELETE" and path.startswith("/v1/states/"):
        return [path[len("/v1/states/"):]]
    if method == "POST" and path == "/v1/step":
        try:
            steps = json.loads(body.decode("utf-8"))["steps"]
            return [s["state"] for s in steps if isinstance(s.get("state"), str)]
        except (ValueError, KeyError, TypeError, AttributeError):
            return None
    return None


class _Forwarding:
    """The replica's ASGI app: the local app, except that a state request for states of
    another replica is forwarded there (one hop) and its answer relayed."""

    def __init__(self, replica: _Replica):
        self.replica = replica
        self.gate = replica.gate
        self.state = replica.gate.state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not _may_hold_state_ids(scope):
            return await self.gate(scope, receive, send)
        from lmonnx.serve.app import read_body, replay_receive, send_error

        # Read the body (bounded by the gate's limit) to see which replica holds the states.
        read = await read_body(receive, self.gate.max_body_bytes)
        if read is None:
            return
        body, more = read  # more: past the limit, the gate answers 413
        ids = _state_ids(scope, body) if not more else None
        tags = {replica_of(i) for i in ids or ()} - {""}  # an untagged id: unknown anywhere
        foreign = tags - {self.replica.tag}
        if len(tags) > 1 and foreign:
            return await send_error(
                send, 404, "not_found", "these states are held by different replicas "
                f"({', '.join(sorted(tags))}); step states of one /v1/states session "
                "per request")
        if foreign:  # one other replica holds them all
            first = next(i for i in ids if replica_of(i) in foreign)
            plain = {k: scope[k] for k in _PLAIN_SCOPE if k in scope}
            status, headers, answer = await self.replica._peer(first).remote(plain, body)
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": answer})
            return
        await self.gate(scope, replay_receive(body, receive, more), send)


_PLAIN_SCOPE = ("type", "asgi", "http_version", "method", "scheme", "path", "raw_path",
                "query_string", "root_path", "headers", "client", "server")


def _may_hold_state_ids(scope) -> bool:
    return ((scope.get("method") == "POST" and scope.get("path") == "/v1/step")
            or (scope.get("method") == "DELETE"
                and scope.get("path", "").startswith("/v1/states/")))


def _deployment(*, replicas: int, cpus_per_replica: float, max_ongoing_requests: int,
                drain_s: float = 90.0):
    """``drain_s``: how long Ray Serve lets a replica finish its requests at shutdown (its
    default, 20 s, is shorter than a request may wait in the queue: --timeout-s, 30 s)."""
    from ray.serve.config import RequestRouterConfig

    return serve.deployment(
        serve.ingress()(_Replica), name=DEPLOYMENT, num_replicas=replicas,
        ray_actor_options={"num_cpus": cpus_per_replica},
        max_ongoing_requests=max_ongoing_requests, graceful_shutdown_timeout_s=drain_s,
        request_router_config=RequestRouterConfig(request_router_class=StateRouter))


# ---- the driver ----------------------------------------------------------------------------

def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _serve_extra() -> int:
    """The local server's default body limit; importing it checks the serve extra."""
    try:
        from lmonnx.serve.app import DEFAULT_MAX_BODY_BYTES
    except ImportError as exc:  # FastAPI, uvicorn: the serve extra
        require(str(exc), "serving on Ray needs the server", "lmonnx[ray,serve]")
    return DEFAULT_MAX_BODY_BYTES


def _checked_sizes(replicas: int, cpus_per_replica: float,
                   max_ongoing_requests: int) -> tuple[int, float, int]:
    return (check_int("replicas", replicas),
            check_real("cpus_per_replica", cpus_per_replica, low=0, low_open=True),
            check_int("max_ongoing_requests", max_ongoing_requests))


def _deploy(name: str, data: bytes, *, replicas: int, host: str, port: int, providers: str,
            threads: int | None, max_body_bytes: int | None, service_options: dict | None,
            cpus_per_replica: float, max_ongoing_requests: int) -> str:
    """:func:`deploy` of a model already checked: ``name`` and its bytes ``data``."""
    if not ray.is_initialized():
        raise InvalidArgumentError("deploy() needs a Ray cluster: call ray.init() first")
    check_fits("CPU", replicas * cpus_per_replica,
               f"{replicas} replica(s) x {cpus_per_replica:g} CPU", "lower --replicas")
    options = dict(service_options or {})
    options.setdefault("watch_disconnects", False)
    options.setdefault("name", Path(name).stem)
    port = port or _free_port(host)
    serve.start(http_options={"host": host, "port": port})
    app = _deployment(replicas=replicas, cpus_per_replica=cpus_per_replica,
                      max_ongoing_requests=max_ongoing_requests,
                      drain_s=float(options.get("timeout_s", 30.0)) + 60.0).bind(
        share_model(name, data), name=name, providers=providers,
        threads=threads or threads_for(cpus_per_replica),
        max_body_bytes=max_body_bytes or _serve_extra(), service_options=options)
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    return f"http://{host}:{port}"


def deploy(model, *, replicas: int = 1, host: str = "127.0.0.1", port: int = 8000,
           providers: str = "auto", threads: int | None = None,
           max_body_bytes: int | None = None, service_options: dict | None = None,
           cpus_per_replica: float = DEFAULT_CPUS_PER_REPLICA,
           max_ongoing_requests: int = DEFAULT_MAX_ONGOING) -> str:
    """Deploy ``model`` on the Ray cluster this process has joined (``ray.init``) as the
    Serve application ``lmonnx`` at ``/``, ``replicas`` replicas; return its URL once every
    replica is ready.  Serve's HTTP proxy listens on ``host:port`` (port 0: a free one) unless
    Serve already runs on the cluster with its own.  ``service_options``:
    :func:`~lmonnx.serve.app.build_app`'s keywords past the model (``max_batch_tokens``, the
    one token budget, and :class:`~lmonnx.serve.service.ScoringService`'s; ``watch_disconnects``
    False unless given)."""
    _require_serve()
    _serve_extra()
    replicas, cpus_per_replica, max_ongoing_requests = _checked_sizes(
        replicas, cpus_per_replica, max_ongoing_requests)
    name, data = checked_model(model)
    return _deploy(name, data, replicas=replicas, host=host, port=port, providers=providers,
                   threads=threads, max_body_bytes=max_body_bytes,
                   service_options=service_options, cpus_per_replica=cpus_per_replica,
                   max_ongoing_requests=max_ongoing_requests)


class RayServer:
    """``lmonnx serve --ray``, step by step, for a caller that serves until told to stop::

        server = RayServer("model.onnx", address="auto", replicas=2)  # the model checked
        server.connect()    # joins the cluster (ray.init sets its own SIGTERM handler)
        url = server.deploy()   # every replica ready
        ...                 # serve until a signal
        server.close()      # delete the app (Serve drains it: accepted requests answered)

    The model is checked when this is made, with one session, before any cluster starts.
    ``close`` (also on leaving a ``with`` block; twice is fine) shuts Serve down when this
    started it and leaves the cluster when this joined it (a local cluster that the join
    started stops).  The rest as :func:`deploy`; ``address`` as :func:`lmonnx.cluster.connect`.
    """

    def __init__(self, model, *, address: str | None = "auto", replicas: int = 1,
                 host: str = "127.0.0.1", port: int = 8000, providers: str = "auto",
                 threads: int | None = None, max_body_bytes: int | None = None,
                 service_options: dict | None = None,
                 cpus_per_replica: float = DEFAULT_CPUS_PER_REPLICA,
                 max_ongoing_requests: int = DEFAULT_MAX_ONGOING):
        _require_serve()
        _serve_extra()
        replicas, cpus_per_replica, max_ongoing_requests = _checked_sizes(
            replicas, cpus_per_replica, max_ongoing_requests)
        self.address = address
        self.name, self._data = checked_model(model)
        self._settings = dict(replicas=replicas, host=host, port=port, providers=providers,
                              threads=threads, max_body_bytes=max_body_bytes,
                              service_options=service_options,
                              cpus_per_replica=cpus_per_replica,
                              max_ongoing_requests=max_ongoing_requests)
        self.url: str | None = None
        self._connected = False
        self._joined = False  # this process's ray.init: ours to leave
        self._started_serve = False  # Serve was not running before: ours to shut down

    def connect(self) -> None:
        """Join the cluster (:func:`lmonnx.cluster.connect`) unless this process has."""
        self._joined = connect(self.address) or self._joined
        self._started_serve = not _serve_running()
        self._connected = True

    def deploy(self) -> str:
        """Deploy the application (after :meth:`connect`, called here if it was not) and
        return its URL once every replica is ready."""
        if not self._connected:
            self.connect()
        self.url = _deploy(self.name, self._data, **self._settings)
        return self.url

    def close(self) -> None:
        """Delete the application, shut Serve down if this started it, leave the cluster if
        this joined it."""
        url, started_serve, joined = self.url, self._started_serve, self._joined
        self.url, self._started_serve, self._joined, self._connected = None, False, False, False
        try:
            if url is not None:
                serve.delete(APP_NAME)  # Serve drains it: accepted requests are answered
            if started_serve:
                serve.shutdown()
        finally:
            if joined:
                ray.shutdown()

    def __enter__(self) -> "RayServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _serve_running() -> bool:
    try:
        serve.status()  # connects to a running Serve; raises when there is none
    except Exception:
        return False
    return True
