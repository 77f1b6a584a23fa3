"""Every use of BentoML's private internals, in one place, checked when a server starts.

Both wings use it (the edge's server patches, the core store's private model stores), so it lives
beside them, not in either.

The rest of the project uses BentoML's public API only (``@bentoml.service``, ``bentoml.api``,
``bentoml.depends``, ``add_asgi_middleware``, its configuration keys, its ``bentoml`` logger) and
OpenTelemetry's for trace ids. What follows has no public equivalent in BentoML 1.4; each entry says
why. ``check()`` runs first in every ``bentoml serve`` process (``edge/startup.py``): it compares
the installed BentoML with the range this was written for (``TESTED_BENTOML``, the pyproject pin)
and the shape of each internal below, and stops the server with one line when one differs, so a
BentoML upgrade fails loudly at start instead of silently at the first request. With
``RECBOLE_BENTO_ALLOW_UNTESTED_BENTOML=1`` it logs the differences and the server runs without any
of them (slower, every path traced, the arbiter's own log lines in BentoML's format). The
assumptions are tested one by one in tests/test_compat.py.

* ``_bentoml_sdk.io_models.IORootModel.mime_type`` (patched, ``apply``): builds the output type's
  whole JSON schema (pydantic) on every response, only to learn that a ``list[RankResult]`` is sent
  as JSON/pickle: about 15% of the ranking worker's CPU under load (py-spy). The answer depends on
  the class alone, so it is cached per class. BentoML offers no option to declare the media type of
  a root output.
* ``_bentoml_sdk.method.APIMethod._local_call`` (patched, ``apply``): runs ``inspect.signature``
  and builds a new wrapper each time an API method is looked up on the service instance, which
  BentoML's endpoint does once per request: about 5% of the public worker's CPU on ml-100k. The
  wrapper depends only on the method and the instance, so it is built once per pair. The lookup is
  inside BentoML's request handling; nothing public reaches it.
* ``bentoml._internal.server.http.traffic.TimeoutMiddleware.__call__`` (patched, ``apply``): the
  ``traffic.timeout`` middleware schedules a timer per request (``loop.call_later(timeout, ...)``)
  and never cancels it, so each answered request leaves a timer, a future and a context alive for
  the whole timeout (30 s here): ~90,000 objects at 3,000 requests/s, which every full garbage
  collection scans, a 100-200 ms pause each time (the p99 of bench/run.py; found with
  gc.callbacks). The replacement is BentoML's method with the timer cancelled once the request is
  done: the same 504 when the timeout passes. ``traffic.timeout`` must be positive, so the
  middleware cannot be left out through configuration.
* ``BentoMLContainer.config.tracing.sample_rate`` (read, ``untraced``): whether the operator set a
  sample rate, merged from ``BENTOML_CONFIG``, ``BENTOML_CONFIG_OVERRIDES`` and the defaults.
  BentoML's one public reader of the effective configuration, ``bentoml.save_config``, fails in
  1.4 (it YAML-dumps the configuration provider itself: ``RepresenterError``), and re-implementing
  BentoML's merge here would drift from it.
* ``bentoml._internal.log.SERVER_LOGGING_CONFIG`` / ``CLI_LOGGING_CONFIG`` (their formatters
  replaced, ``use_log_formatter``): the JSON log format. BentoML's configuration has no log
  format option (``logging.formatting`` only formats trace ids), and the ``bentoml serve`` process
  hands ``SERVER_LOGGING_CONFIG`` to circus *after* importing the service, so setting the
  formatter on the live handlers does not reach its lines.
* ``bentoml._internal.models.model.ModelStore`` (``import_model_into``): a model store at a folder
  of our choosing, for ``bentoml.models.import_model``'s ``_model_store`` argument. The batch
  command and Spark executors import a ``bentoml models export`` file into a temporary store so
  that they never write to the user's; BentoML's public ``import_model`` takes only the default
  store, which is fixed when BentoML is first imported (``BENTOML_HOME``). ``core/store.py`` calls
  it; a BentoML that differs gets the one-line refusal of ``import_model_into`` (the command is no
  server: nothing else runs ``check`` there).
* ``circus.sighandler.SysHandler.handle_hup`` (replaced in the ``bentoml serve`` process,
  ``on_hangup``): circus, BentoML's process manager, answers SIGHUP by restarting every worker
  (``reload``): each reloads its models from scratch, and the routes file would be read by each on
  its own. With ``RECBOLE_BENTO_ROUTES`` set, SIGHUP instead re-reads the routes file once, in the
  arbiter, and publishes it to the workers, which swap in place (``edge/variants.py``). BentoML
  exposes no signal hook of its arbiter.
* ``WORKER_MODULE`` (``lifecycle.py``): the sibling workers of one ``bentoml serve`` are recognised
  by this module and its ``--service-name`` option on their command line. BentoML exposes no list
  of the processes serving which service (``bentoml.server_context`` knows the current process
  only).
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import re
import weakref
from collections.abc import Callable
from typing import Any

import bentoml
from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

logger = logging.getLogger("recbole_bento")

TESTED_BENTOML = ">=1.4.30,<1.5"  # the range the internals below were read in (pyproject's pin)
ALLOW_UNTESTED = "RECBOLE_BENTO_ALLOW_UNTESTED_BENTOML"
WORKER_MODULE = "_bentoml_impl.worker.service"  # what `bentoml serve` runs each worker as

_applied = False


# ---------------------------------------------------------------------------------------- the check


def problems() -> list[str]:
    """How the installed BentoML differs from what this module was written for; [] when it does not."""
    found = []
    try:
        tested = Version(bentoml.__version__) in SpecifierSet(TESTED_BENTOML)
    except InvalidVersion:
        tested = False
    if not tested:
        found.append(f"BentoML {bentoml.__version__} is outside {TESTED_BENTOML}")
    for name, assumption in ASSUMPTIONS.items():
        try:
            assumption()
        except Exception as exc:  # an import, an attribute, a shape: each says what moved
            found.append(f"{name}: {type(exc).__name__}: {exc}")
    return found


def check(allow_untested: bool) -> bool:
    """True when the internals may be used. Otherwise stops the process (``SystemExit``, one line),
    or, with *allow_untested*, logs the differences and returns False."""
    found = problems()
    if not found:
        return True
    differences = "; ".join(found)
    if allow_untested:
        logger.warning("BentoML differs (%s): serving without recbole-bento's BentoML patches", differences)
        return False
    raise SystemExit(
        f"recbole-bento needs bentoml{TESTED_BENTOML}: {differences}. Install bentoml{TESTED_BENTOML}, or "
        f"set {ALLOW_UNTESTED}=1 to serve without the BentoML patches (slower, untested)"
    )


def _expect(condition: bool, what: str) -> None:
    if not condition:
        raise AssertionError(what)


def _positional(func: Callable[..., Any]) -> list[str]:
    return [p.name for p in inspect.signature(func).parameters.values()]


# Each internal is reached through one function that checks its shape and returns it: ``check``
# calls them all at start-up, the uses below call the one they need.


def _io_root_model() -> Any:
    from _bentoml_sdk.io_models import IOMixin, IORootModel

    _expect(issubclass(IORootModel, IOMixin), "IORootModel no longer derives from IOMixin")
    original = inspect.getattr_static(IOMixin, "mime_type")
    _expect(isinstance(original, classmethod), "IOMixin.mime_type is no longer a classmethod")
    _expect(_positional(original.__func__) == ["cls"], "IOMixin.mime_type takes more than the class")
    return IORootModel


def _api_method() -> Any:
    from _bentoml_sdk.method import APIMethod

    _expect(len(_positional(APIMethod._local_call)) == 2, "APIMethod._local_call(self, instance) changed")
    _expect(
        "_local_call" in APIMethod.__get__.__code__.co_names, "APIMethod.__get__ no longer calls _local_call"
    )
    return APIMethod


def _timeout_middleware() -> Any:
    from bentoml._internal.server.http.traffic import TimeoutMiddleware

    source = inspect.getsource(TimeoutMiddleware.__call__)
    _expect(
        "loop.call_later(self.timeout, self._set_timer_out, waiter)" in source,
        "TimeoutMiddleware.__call__ no longer schedules its timer as read here",
    )
    _expect(
        callable(getattr(TimeoutMiddleware, "_set_timer_out", None)), "no TimeoutMiddleware._set_timer_out"
    )
    return TimeoutMiddleware


def _tracing_sample_rate() -> float | None:
    from bentoml._internal.configuration.containers import BentoMLContainer

    rate = BentoMLContainer.config.tracing.sample_rate.get()
    _expect(rate is None or isinstance(rate, (int, float)), f"tracing.sample_rate is {rate!r}")
    return rate


def _logging_configs() -> dict[str, dict[str, Any]]:
    """BentoML's logging configs by the name of the formatter their handlers use."""
    from bentoml._internal.log import CLI_LOGGING_CONFIG, SERVER_LOGGING_CONFIG

    configs = {"traced": SERVER_LOGGING_CONFIG, "simple": CLI_LOGGING_CONFIG}
    for formatter, config in configs.items():
        handlers = config["handlers"].values()
        _expect(formatter in config["formatters"], f"no formatter {formatter!r}")
        _expect(any(h.get("formatter") == formatter for h in handlers), f"no handler uses {formatter!r}")
    return configs


def _model_store_class() -> Any:
    from bentoml._internal.models.model import ModelStore

    _expect(_positional(ModelStore.__init__)[:2] == ["self", "base_path"], "ModelStore(base_path) changed")
    _expect(
        "_model_store" in inspect.signature(bentoml.models.import_model).parameters,
        "bentoml.models.import_model takes no _model_store",
    )
    return ModelStore


TESTED_CIRCUS = ">=0.18,<0.19"


def _circus_sighandler() -> Any:
    import circus
    from circus.sighandler import SysHandler

    _expect(Version(circus.__version__) in SpecifierSet(TESTED_CIRCUS), f"circus {circus.__version__}")
    source = inspect.getsource(SysHandler.handle_hup)
    _expect("self.reload()" in source, "SysHandler.handle_hup no longer reloads")
    _expect("add_callback_from_signal" in inspect.getsource(SysHandler.reload), "SysHandler.reload changed")
    return SysHandler


def _worker_command_line() -> None:
    command = importlib.import_module(WORKER_MODULE).main
    options = {opt for param in command.params for opt in param.opts}
    _expect("--service-name" in options, f"{WORKER_MODULE} has no --service-name option")


ASSUMPTIONS: dict[str, Callable[[], Any]] = {
    "IORootModel.mime_type": _io_root_model,
    "APIMethod._local_call": _api_method,
    "TimeoutMiddleware.__call__": _timeout_middleware,
    "tracing.sample_rate": _tracing_sample_rate,
    "logging configs": _logging_configs,
    "worker command line": _worker_command_line,
    "ModelStore": _model_store_class,
    "circus SIGHUP handler": _circus_sighandler,
}


# ---------------------------------------------------------------------------------------- the uses


def apply() -> None:
    """The per-request patches (``IORootModel.mime_type``, ``APIMethod._local_call``,
    ``TimeoutMiddleware.__call__``); idempotent. Call only after ``check()`` returned True."""
    global _applied
    if _applied:
        return
    _applied = True
    _cache_mime_types(_io_root_model())
    _cache_local_callers(_api_method())
    _cancel_finished_timeouts(_timeout_middleware())


def _cache_mime_types(root_model: Any) -> None:
    compute = root_model.mime_type.__func__  # the classmethod's function (defined on IOMixin)
    cache: dict[type, str] = {}

    def mime_type(cls: Any) -> str:
        try:
            return cache[cls]
        except KeyError:
            value = cache[cls] = compute(cls)
            return value

    root_model.mime_type = classmethod(mime_type)


def _cache_local_callers(api_method: Any) -> None:
    build = api_method._local_call
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

    api_method._local_call = local_call


def _cancel_finished_timeouts(middleware: Any) -> None:
    from starlette.responses import JSONResponse

    async def call(self: Any, scope: Any, receive: Any, send: Any) -> None:
        """BentoML 1.4's ``TimeoutMiddleware.__call__``, with its timer cancelled at the end."""
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        timer = loop.call_later(self.timeout, self._set_timer_out, waiter)

        async def _send(message: Any) -> None:
            if not waiter.done():
                waiter.set_result(None)
            await send(message)

        fut = asyncio.ensure_future(self.app(scope, receive, _send), loop=loop)
        try:
            await waiter
        except asyncio.TimeoutError:
            if fut.cancel():
                resp = JSONResponse(
                    {"error": f"Not able to process the request in {self.timeout} seconds"}, status_code=504
                )
                await resp(scope, receive, send)
        else:
            await fut
        finally:
            timer.cancel()

    middleware.__call__ = call


def on_hangup(callback: Callable[[], None]) -> None:
    """In the ``bentoml serve`` process: SIGHUP runs *callback* on circus's event loop instead of
    restarting every worker. Call only after ``check()`` returned True."""
    handler = _circus_sighandler()

    def handle_hup(self: Any) -> None:
        self.controller.loop.add_callback_from_signal(callback)

    handler.handle_hup = handle_hup


def untraced(paths: list[str]) -> dict[str, Any]:
    """The ``tracing`` service config that spares *paths* BentoML's OpenTelemetry middleware when
    tracing is off (``tracing.sample_rate`` unset or 0, BentoML's default): each request otherwise
    builds and closes three spans that are never sampled, plus a client span per ranker call,
    about a fifth of the public worker's CPU on ml-100k (py-spy). With a sample rate set in the
    BentoML configuration every path is traced as before. Skipped paths carry no
    ``X-BentoML-Request-ID`` header (it is the span's id)."""
    if _tracing_sample_rate():
        return {}
    # OpenTelemetry's ExcludeList: regular expressions searched in the whole URL.
    return {"excluded_urls": [rf"^[^?]*{re.escape(p)}(\?|$)" for p in paths]}


def use_log_formatter(factory: Callable[[], logging.Formatter]) -> None:
    """Make BentoML's server and CLI logging configs format with *factory*, for the
    configurations applied after this process imported the service (the arbiter's circus)."""
    for formatter, config in _logging_configs().items():
        config["formatters"][formatter] = {"()": factory}


def freeze_startup_objects() -> None:
    """Move everything alive now (BentoML, torch, RecBole, the model) out of the garbage
    collector's sight: ``gc.freeze()``. Without it each worker scans several hundred thousand
    long-lived objects in a full collection about once a second under load, a 150-250 ms pause
    that every request in flight waits out (the p99 of bench/run.py; measured with gc.callbacks).
    Call it at the end of a service's __init__; objects created later are collected as usual."""
    import gc

    gc.collect()
    gc.freeze()


def import_model_into(path: str, home: str) -> bentoml.Model:
    """``bentoml.models.import_model`` of the export file *path* into a model store at *home*
    (created if needed) instead of the user's. RuntimeError (one line) when this BentoML's
    internals differ from the ones read here."""
    found = problems()
    if found:
        raise RuntimeError(
            f"recbole-bento needs bentoml{TESTED_BENTOML} to import a model file: {'; '.join(found)}"
        )
    return bentoml.models.import_model(path, _model_store=_model_store_class()(home))
