"""Decoder states kept by a server under opaque ids: Triton's sequence batcher, for an LSTM LM.

A beam search over HTTP sends state ids, never prefixes: ``POST /v1/states`` keeps the state
after a prefix, ``POST /v1/step`` advances states by a word each and keeps the new ones.  A
state costs ``4 * (2 * layers * units + V)`` bytes (h, c and the next-word log-probabilities:
about 43 kB for a 2x200 model with V=10k), so the store is bounded by bytes, not by count:
the least recently used states go first, and a state unused for ``ttl_s`` seconds expires.
cachetools' ``TTLCache`` does the bookkeeping; lookups and inserts happen on the server's
event loop only, so no lock is needed.
"""

from __future__ import annotations

import secrets
import time

from cachetools import TTLCache

from lmonnx.incremental import LMState
from lmonnx.validation import check_int, check_real


class UnknownState(KeyError):
    """A state id that is not (or no longer) kept: the HTTP answer is 404."""

    def __str__(self) -> str:
        return self.args[0]


def state_bytes(state: LMState) -> int:
    return state.h.nbytes + state.c.nbytes + state.logprobs.nbytes


class StateStore:
    """``put(state) -> id`` and ``get(id) -> state``; at most ``max_bytes`` of states, each
    kept ``ttl_s`` seconds after its last use (a ``get`` renews it).  Ids start with
    ``prefix``."""

    def __init__(self, max_bytes: int = 512 << 20, ttl_s: float = 600.0,
                 timer=time.monotonic, prefix: str = ""):
        self.prefix = prefix  # Ray Serve: the replica that holds the state, for routing
        self.max_bytes = check_int("max_bytes", max_bytes)
        self.ttl_s = check_real("ttl_s", ttl_s, low=0, low_open=True)
        self._cache = TTLCache(maxsize=self.max_bytes, ttl=self.ttl_s, timer=timer,
                               getsizeof=state_bytes)

    def __len__(self) -> int:
        self._cache.expire()
        return len(self._cache)

    @property
    def nbytes(self) -> int:
        self._cache.expire()
        return int(self._cache.currsize)

    def put(self, state: LMState) -> str:
        """Keep ``state``; its new id (URL-safe, unguessable)."""
        key = self.prefix + secrets.token_urlsafe(12)
        self._cache[key] = state
        return key

    def get(self, key: str) -> LMState:
        """The state kept under ``key`` (its time to live starts again), or
        :class:`UnknownState` with a message that says why it may be gone."""
        try:
            state = self._cache[key]
        except KeyError:
            raise UnknownState(
                f"unknown state {key!r}: the server restarted, or the state expired "
                f"({self.ttl_s:g} s after its last use) or was evicted (at most "
                f"{self.max_bytes >> 20} MiB of states are kept, least recently used first); "
                f"start again from POST /v1/states") from None
        self._cache[key] = state  # renews the TTL: a live beam is not expired under it
        return state

    def drop(self, key: str) -> None:
        """Forget a state now (a pruned hypothesis); :class:`UnknownState` if not kept."""
        self.get(key)
        del self._cache[key]


__all__ = ["StateStore", "UnknownState", "state_bytes"]
