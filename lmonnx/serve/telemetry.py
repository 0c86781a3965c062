"""Prometheus metrics of ``lmonnx serve`` (``GET /metrics``), with ``prometheus_client``.

One registry per server, not the process-wide default, so that several apps in one process
(tests, a Ray replica) never collide.  Seconds everywhere; ``lmonnx_tokens_scored_total``
counts scored positions (words and ``</s>``; a decoder step is one).
"""

from __future__ import annotations

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge,
                               Histogram, generate_latest)

from lmonnx.serve.batch_queue import BatchStats

_LATENCY = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30)
_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class ServerMetrics:
    """The server's counters, gauges and histograms in their own registry."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("lmonnx_requests", "HTTP requests answered",
                                ["endpoint", "status"], registry=r)
        self.request_seconds = Histogram("lmonnx_request_seconds",
                                         "request latency, arrival to answer",
                                         ["endpoint"], buckets=_LATENCY, registry=r)
        self.queue_seconds = Histogram("lmonnx_queue_seconds",
                                       "time a request's work waited for the compute thread",
                                       ["kind"], buckets=_LATENCY, registry=r)
        self.compute_seconds = Histogram("lmonnx_compute_seconds",
                                         "compute time of one batch", ["kind"],
                                         buckets=_LATENCY, registry=r)
        self.batch_sentences = Histogram("lmonnx_batch_sentences",
                                         "sentences (or hypotheses) per batch", ["kind"],
                                         buckets=_SIZES, registry=r)
        self.batch_tokens = Histogram("lmonnx_batch_tokens", "scored positions per batch",
                                      ["kind"], buckets=_SIZES, registry=r)
        self.queue_depth = Gauge("lmonnx_queue_sentences", "sentences waiting", registry=r)
        self.live_states = Gauge("lmonnx_live_states", "decoder states kept", registry=r)
        self.state_bytes = Gauge("lmonnx_state_bytes", "bytes of decoder states kept",
                                 registry=r)
        self.rejections = Counter("lmonnx_rejections", "requests refused, by reason",
                                  ["reason"], registry=r)
        self.tokens_scored = Counter("lmonnx_tokens_scored", "positions scored", registry=r)

    def observe_batch(self, stats: BatchStats) -> None:
        for seconds in stats.queue_seconds:
            self.queue_seconds.labels(stats.kind).observe(seconds)
        self.compute_seconds.labels(stats.kind).observe(stats.compute_seconds)
        self.batch_sentences.labels(stats.kind).observe(stats.sentences)
        self.batch_tokens.labels(stats.kind).observe(stats.tokens)
        if stats.kind != "call":
            self.tokens_scored.inc(stats.tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)


__all__ = ["ServerMetrics"]
