"""Joining a Ray cluster and handing it a model: the set-up that evaluation on Ray Data
(:mod:`lmonnx.distributed`) and serving on Ray Serve (:mod:`lmonnx.serve.ray_deployment`)
share, written once.

- the optional extras: :func:`optional_modules` imports them or says why not, and
  :func:`require` turns that into one line naming the extra to install;
- :func:`connect`: join a cluster (``"auto"``: ``RAY_ADDRESS``, else one started on this
  machine, else a new local one) unless this process already has;
- :func:`checked_model`: the model checked on the driver, one session, before any cluster
  starts (a missing or foreign file fails in one line, with the local message), and its bytes;
- :func:`share_model` / :func:`shared_model`: the bytes through the object store, so that
  workers on any node load the model without a shared file system;
- :func:`check_fits`: Ray waits forever for resources that never come; say so now.

Public Ray APIs only (``ray.init``, ``ray.is_initialized``, ``ray.put``, ``ray.get``,
``ray.cluster_resources``).  Ray is optional (``pip install 'lmonnx[ray]'``): this module
imports without it.
"""

from __future__ import annotations

import importlib
import math
import os
from pathlib import Path

from lmonnx.errors import InvalidArgumentError, MissingDependencyError

__all__ = ["optional_modules", "require", "connect", "checked_model", "share_model",
           "shared_model", "check_fits", "threads_for"]


def optional_modules(*names: str) -> tuple[list, str]:
    """The modules ``names``, imported, and ``""``; or, when one of them does not import,
    ``[None, ...]`` and the ``ImportError``'s text (for :func:`require` to report)."""
    try:
        return [importlib.import_module(name) for name in names], ""
    except ImportError as exc:
        return [None] * len(names), str(exc)


def require(missing: str, purpose: str, extra: str) -> None:
    """Raise :class:`MissingDependencyError` naming ``extra`` when ``missing`` (the text
    :func:`optional_modules` gave) says a module did not import."""
    if missing:
        raise MissingDependencyError(f"{purpose}: install the extra '{extra}' ({missing})")


(ray,), _MISSING = optional_modules("ray")


def connect(address: str | None = "auto", **init_kwargs) -> bool:
    """Join a Ray cluster unless this process already has: ``"auto"`` (or None) the one in
    ``RAY_ADDRESS``, else one started on this machine (``ray start``), else a new local one;
    any other value is a cluster address (``head:6379``, ``ray://head:10001``).  True when
    this call joined (``ray.init``): the caller then leaves it (``ray.shutdown()``, which also
    stops a local cluster that the join started)."""
    require(_MISSING, "running on Ray needs Ray", "lmonnx[ray]")
    if ray.is_initialized():
        return False
    kwargs = dict(include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    kwargs.update(init_kwargs)
    ray.init(address=None if address in (None, "auto") else address, **kwargs)
    return True


def checked_model(model, *, shared: bool = False) -> tuple[str, bytes | None]:
    """``model`` (a path or the model's bytes) checked here, on the driver, with one CPU
    session: ``(name, bytes)``, or ``(name, None)`` with ``shared`` (a file every node reads
    at that path)."""
    from lmonnx.runtime import ModelSession

    if isinstance(model, (bytes, bytearray)):
        if shared:
            raise InvalidArgumentError("model_is_shared needs a path, not bytes")
        ModelSession(bytes(model), providers="cpu", num_threads=1)
        return "<model bytes>", bytes(model)
    name = os.fspath(model)
    ModelSession(name, providers="cpu", num_threads=1)
    return name, None if shared else Path(name).read_bytes()


def share_model(name: str, data: bytes | None):
    """What a worker gets to load the model: ``[ObjectRef]`` of the bytes (in a list, so
    that the worker fetches them itself and Ray keeps them alive meanwhile), or the absolute
    path of a shared file."""
    return os.path.abspath(name) if data is None else [ray.put(data)]


def shared_model(model):
    """In a worker: the model's bytes (or its path) from :func:`share_model`'s value."""
    return ray.get(model[0]) if isinstance(model, list) else model


def check_fits(resource: str, need: float, what: str, hint: str = "") -> None:
    """Fail now, in one line, when the cluster has less ``resource`` (``"CPU"``, ``"GPU"``)
    than ``need``: Ray would wait forever.  ``what`` says who needs it, ``hint`` what to do."""
    have = ray.cluster_resources().get(resource, 0.0)
    if need > have + 1e-9:
        raise InvalidArgumentError(f"{what} need {need:g} {resource}s, the cluster has "
                                   f"{have:g}" + (f"; {hint}" if hint else ""))


def threads_for(cpus: float) -> int:
    """onnxruntime's intra-op threads for a worker of ``cpus`` CPUs: that many, rounded up."""
    return max(1, math.ceil(cpus - 1e-9))
