"""Per-request costs of BentoML 1.4 that buy nothing here, removed without changing any answer.

* ``IORootModel.mime_type()`` builds the output type's whole JSON schema (pydantic) on *every*
  response, only to learn that a ``list[RankResult]`` is sent as JSON/pickle: about 15% of the
  ranking worker's CPU under load (py-spy, bench/). The answer depends on the class alone, so it
  is cached per class.
* ``APIMethod._local_call(instance)`` runs ``inspect.signature`` and builds a new wrapper each time
  an API method is looked up on the service instance, which BentoML's endpoint does once per
  request: about 5% of the public worker's CPU on ml-100k. The wrapper depends only on the method
  and the instance, so it is built once per pair.
"""

from __future__ import annotations

import logging
import re
import weakref
from typing import Any

logger = logging.getLogger("recbole_bento")
_applied = False


def apply() -> None:
    """Idempotent; a BentoML without these internals is left as it is."""
    global _applied
    if _applied:
        return
    _applied = True
    try:
        from _bentoml_sdk.io_models import IORootModel
    except ImportError:  # pragma: no cover - another BentoML layout
        logger.debug("bentoml_compat: no _bentoml_sdk.io_models.IORootModel; nothing patched")
        return
    compute = IORootModel.mime_type.__func__  # the classmethod's function (defined on IOMixin)
    cache: dict[type, str] = {}

    def mime_type(cls: Any) -> str:
        try:
            return cache[cls]
        except KeyError:
            value = cache[cls] = compute(cls)
            return value

    IORootModel.mime_type = classmethod(mime_type)  # type: ignore[method-assign,assignment]
    _cache_local_callers()


def _cache_local_callers() -> None:
    try:
        from _bentoml_sdk.method import APIMethod
    except ImportError:  # pragma: no cover - another BentoML layout
        logger.debug("bentoml_compat: no _bentoml_sdk.method.APIMethod; nothing patched")
        return
    build = APIMethod._local_call
    built: weakref.WeakKeyDictionary[Any, dict[int, Any]] = weakref.WeakKeyDictionary()

    def local_call(method: Any, instance: Any) -> Any:
        try:
            callers = built.setdefault(instance, {})
        except TypeError:  # an instance that cannot be weakly referenced: built each time, as before
            return build(method, instance)
        # by id: the instance keeps its class, hence the class's APIMethod objects, alive
        caller = callers.get(id(method))
        if caller is None:
            caller = callers[id(method)] = build(method, instance)
        return caller

    APIMethod._local_call = local_call  # type: ignore[method-assign]


def untraced(paths: list[str]) -> dict[str, Any]:
    """The ``tracing`` service config that spares *paths* BentoML's OpenTelemetry middleware when
    tracing is off (``tracing.sample_rate`` unset or 0, BentoML's default): each request otherwise
    builds and closes three spans that are never sampled, plus a client span per ranker call,
    about a fifth of the public worker's CPU on ml-100k (py-spy). With a sample rate set in the
    BentoML configuration every path is traced as before. Skipped paths carry no
    ``X-BentoML-Request-ID`` header (it is the span's id)."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    if BentoMLContainer.config.tracing.sample_rate.get():
        return {}
    # OpenTelemetry's ExcludeList: regular expressions searched in the whole URL.
    return {"excluded_urls": [rf"^[^?]*{re.escape(p)}(\?|$)" for p in paths]}


def freeze_startup_objects() -> None:
    """Move everything alive now (BentoML, torch, RecBole, the model) out of the garbage
    collector's sight: ``gc.freeze()``. Without it each worker scans several hundred thousand
    long-lived objects in a full collection about once a second under load, a 150-250 ms pause
    that every request in flight waits out (the p99 of bench/run.py; measured with gc.callbacks).
    Call it at the end of a service's __init__; objects created later are collected as usual."""
    import gc

    gc.collect()
    gc.freeze()
