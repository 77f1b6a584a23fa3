"""What the serving edge assumes about BentoML, checked against the BentoML installed: each test
fails when BentoML moves or reshapes what recbole_bento/bentoml_compat.py (or the edge's public-API
replacements for former internals) relies on, and the start-up check itself is tested."""

from __future__ import annotations

import asyncio
import logging
import logging.config
import os
import re
import subprocess
import sys

import bentoml
import pytest
from conftest import ROOT
from starlette.requests import Request

from recbole_bento import bentoml_compat
from recbole_bento.edge import guard, observability

# ------------------------------------------------------------------ the start-up check


def test_installed_bentoml_meets_every_assumption() -> None:
    assert bentoml_compat.problems() == []
    assert bentoml_compat.check(allow_untested=False) is True


def test_tested_range_is_the_pyproject_pin() -> None:
    assert f'"bentoml{bentoml_compat.TESTED_BENTOML}"' in (ROOT / "pyproject.toml").read_text()


def test_an_untested_version_stops_the_server_in_one_line(monkeypatch, caplog) -> None:
    monkeypatch.setattr(bentoml, "__version__", "1.5.0")
    with pytest.raises(SystemExit) as stopped:
        bentoml_compat.check(allow_untested=False)
    message = str(stopped.value.code)
    assert "\n" not in message
    assert "BentoML 1.5.0 is outside >=1.4.30,<1.5" in message
    assert "RECBOLE_BENTO_ALLOW_UNTESTED_BENTOML=1" in message
    with caplog.at_level(logging.WARNING, logger="recbole_bento"):
        assert bentoml_compat.check(allow_untested=True) is False
    assert "BentoML 1.5.0 is outside" in caplog.text


def _mime_type_takes_an_argument(monkeypatch) -> None:
    from _bentoml_sdk.io_models import IOMixin

    monkeypatch.setattr(IOMixin, "mime_type", classmethod(lambda cls, request: "application/json"))


def _local_call_renamed(monkeypatch) -> None:
    from _bentoml_sdk.method import APIMethod

    monkeypatch.delattr(APIMethod, "_local_call")


def _server_log_formatter_renamed(monkeypatch) -> None:
    from bentoml._internal.log import SERVER_LOGGING_CONFIG

    monkeypatch.delitem(SERVER_LOGGING_CONFIG["formatters"], "traced")


def _timeout_middleware_rewritten(monkeypatch) -> None:
    from bentoml._internal.server.http.traffic import TimeoutMiddleware

    async def call(self, scope, receive, send) -> None:  # e.g. BentoML moved to asyncio.timeout
        async with asyncio.timeout(self.timeout):
            await self.app(scope, receive, send)

    monkeypatch.setattr(TimeoutMiddleware, "__call__", call)


def _worker_module_moved(monkeypatch) -> None:
    monkeypatch.setattr(bentoml_compat, "WORKER_MODULE", "_bentoml_impl.worker.moved")


def _model_store_argument_renamed(monkeypatch) -> None:
    import bentoml

    def import_model(path, *, model_store=None):  # the private argument renamed
        raise AssertionError("not called")

    monkeypatch.setattr(bentoml.models, "import_model", import_model)


def _circus_hangup_rewritten(monkeypatch) -> None:
    from circus.sighandler import SysHandler

    def handle_hup(self) -> None:  # e.g. circus stops reloading on SIGHUP
        self.quit()

    monkeypatch.setattr(SysHandler, "handle_hup", handle_hup)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (_circus_hangup_rewritten, "circus SIGHUP handler"),
        (_mime_type_takes_an_argument, "IORootModel.mime_type"),
        (_local_call_renamed, "APIMethod._local_call"),
        (_server_log_formatter_renamed, "logging configs"),
        (_timeout_middleware_rewritten, "TimeoutMiddleware.__call__"),
        (_worker_module_moved, "worker command line"),
        (_model_store_argument_renamed, "ModelStore"),
    ],
)
def test_each_assumption_notices_its_change(monkeypatch, change, named) -> None:
    change(monkeypatch)
    found = bentoml_compat.problems()
    assert [p.split(":")[0] for p in found] == [named], found
    with pytest.raises(SystemExit, match=re.escape(named)):
        bentoml_compat.check(allow_untested=False)


def test_a_model_file_on_a_changed_bentoml_is_one_line(monkeypatch, tmp_path) -> None:
    """The batch command and Spark import export files through the private ModelStore: a BentoML
    that moved it refuses in one line (ArtifactError), before touching the file."""
    from recbole_bento.core import store
    from recbole_bento.core.artifact import ArtifactError

    _model_store_argument_renamed(monkeypatch)
    model_file = tmp_path / "m.bentomodel"
    model_file.write_bytes(b"not read")
    with pytest.raises(ArtifactError, match=r"needs bentoml.*ModelStore: .*_model_store"):
        store.import_archive(model_file, tmp_path / "home")


@pytest.mark.server
def test_bentoml_serve_exits_in_one_line_on_an_untested_bentoml(tmp_path) -> None:
    """The real `bentoml serve` stops before any worker starts: status 1, one line, no traceback."""
    (tmp_path / "sitecustomize.py").write_text('import bentoml\nbentoml.__version__ = "1.5.0"\n')
    result = subprocess.run(
        [sys.executable, "-m", "bentoml", "serve", ".", "--host", "127.0.0.1", "--port", "1"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.strip().splitlines() == [
        "recbole-bento needs bentoml>=1.4.30,<1.5: BentoML 1.5.0 is outside >=1.4.30,<1.5. Install "
        "bentoml>=1.4.30,<1.5, or set RECBOLE_BENTO_ALLOW_UNTESTED_BENTOML=1 to serve without the "
        "BentoML patches (slower, untested)"
    ]


# ------------------------------------------------------------------ the patches keep every answer


def test_mime_type_cache_keeps_every_answer() -> None:
    from _bentoml_sdk.io_models import IOMixin, IORootModel, ensure_io_descriptor

    from recbole_bento.core.ranking import RankResult

    kinds = [list[RankResult], str, bytes, dict[str, int]]
    before = [ensure_io_descriptor(kind).mime_type() for kind in kinds]
    bentoml_compat.apply()
    bentoml_compat.apply()  # idempotent
    assert [ensure_io_descriptor(kind).mime_type() for kind in kinds] == before
    # the patch is in place: IORootModel no longer inherits IOMixin's per-call schema build
    assert IORootModel.mime_type.__func__ is not IOMixin.mime_type.__func__


def test_api_method_wrappers_are_built_once_per_instance() -> None:
    bentoml_compat.apply()

    @bentoml.service
    class Echo:
        @bentoml.api
        def echo(self, text: str = "hi") -> str:
            return text

    first, second = Echo(), Echo()
    assert first.echo.local is first.echo.local  # BentoML alone builds a new one per lookup
    assert first.echo.local is not second.echo.local
    assert first.echo() == "hi" and second.echo(text="x") == "x"


def test_timeout_middleware_cancels_its_timer_and_still_answers_504() -> None:
    """BentoML's traffic timeout leaves one live timer per answered request for the whole timeout
    (full garbage collections then scan them all); patched, every timer is cancelled once the
    request is done, and a request slower than the timeout still gets BentoML's 504."""
    import asyncio

    from bentoml._internal.server.http.traffic import TimeoutMiddleware

    bentoml_compat.apply()

    async def app(scope, receive, send) -> None:
        if scope["path"] == "/slow":
            await asyncio.sleep(1)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def run() -> tuple[list[asyncio.TimerHandle], list[int]]:
        loop = asyncio.get_running_loop()
        timers: list[asyncio.TimerHandle] = []
        schedule = loop.call_later

        def call_later(*args, **kwargs):
            timers.append(schedule(*args, **kwargs))
            return timers[-1]

        loop.call_later = call_later  # type: ignore[method-assign]
        middleware = TimeoutMiddleware(app, timeout=0.2)
        statuses: list[int] = []

        async def send(message) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        for path in ["/fast"] * 50 + ["/slow"]:
            await middleware({"type": "http", "path": path, "headers": []}, receive, send)
        return timers, statuses

    timers, statuses = asyncio.run(run())
    assert statuses == [200] * 50 + [504]
    assert len(timers) >= 51 and all(t.cancelled() for t in timers[:50])  # (and the slow app's sleep)


# ------------------------------------------------------------------ public APIs that replaced internals


def test_refused_requests_reach_the_bentoml_loggers_handlers() -> None:
    """BentoML logs a refused request (its endpoint's ``log_exception``) on a logger under
    ``bentoml``, with the exception and (path, method): the handler filter turns it into one line."""
    from bentoml._internal.server.http_app import log_exception
    from pydantic import BaseModel, ValidationError

    class Body(BaseModel):
        topk: int

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    parent = logging.getLogger("bentoml")
    parent.addHandler(handler)
    try:
        guard.quiet_client_errors()
        scope = {"type": "http", "method": "POST", "path": "/recommend", "headers": [], "query_string": b""}
        try:
            Body.model_validate({"topk": "x"})
        except ValidationError:
            log_exception(Request(scope))
    finally:
        parent.removeHandler(handler)
    assert [(r.levelname, r.getMessage(), r.exc_info) for r in records] == [
        (
            "WARNING",
            "refused POST /recommend: topk: Input should be a valid integer, "
            "unable to parse string as an integer",
            None,
        )
    ]


def test_log_lines_carry_the_trace_ids_bentoml_shows() -> None:
    """Trace ids from OpenTelemetry's public API are the ones BentoML's own log lines show."""
    from bentoml._internal.context import trace_context
    from opentelemetry.sdk.trace import TracerProvider

    assert observability._trace_ids() == {}  # no span, no ids
    with TracerProvider().get_tracer("test").start_as_current_span("request"):
        ids = observability._trace_ids()
        assert ids == {
            "trace_id": format(trace_context.trace_id, "032x"),
            "span_id": format(trace_context.span_id, "016x"),
        }
    assert int(ids["trace_id"], 16) and int(ids["span_id"], 16)


def test_json_logs_reach_the_configs_bentoml_applies_later(monkeypatch) -> None:
    """The ``bentoml serve`` process configures logging from BentoML's configs after importing the
    service: with JSON logs on, the formatter those configs build is the JSON one."""
    from bentoml._internal.log import CLI_LOGGING_CONFIG, SERVER_LOGGING_CONFIG

    for config in (SERVER_LOGGING_CONFIG, CLI_LOGGING_CONFIG):
        monkeypatch.setitem(config, "formatters", dict(config["formatters"]))
    bentoml_compat.use_log_formatter(observability.JsonFormatter)
    for config, name in ((SERVER_LOGGING_CONFIG, "traced"), (CLI_LOGGING_CONFIG, "simple")):
        built = logging.config.DictConfigurator(config).configure_formatter(config["formatters"][name])
        assert isinstance(built, observability.JsonFormatter), name


def test_sighup_in_the_arbiter_runs_the_routes_reload_instead_of_restarting_workers(monkeypatch) -> None:
    """circus's signal handler schedules its reload on its loop; with routes, SIGHUP schedules
    ours the same way (``on_hangup``), and nothing restarts."""
    import signal

    from circus.sighandler import SysHandler

    monkeypatch.setattr(SysHandler, "handle_hup", SysHandler.handle_hup)  # restored after the test
    scheduled = []
    loop = type("Loop", (), {"add_callback_from_signal": lambda self, f, *a: scheduled.append((f, a))})()
    controller = type("Controller", (), {"loop": loop, "dispatch": "circus-dispatch"})()
    handler = SysHandler.__new__(SysHandler)
    handler.controller = controller
    handler.signal(signal.SIGHUP)  # circus as shipped: a graceful reload of every worker
    assert scheduled[-1][0] == "circus-dispatch" and b"reload" in str(scheduled[-1][1]).encode()
    reread = []
    bentoml_compat.on_hangup(lambda: reread.append(1))
    handler.signal(signal.SIGHUP)
    callback, args = scheduled[-1]
    callback(*args)
    assert reread == [1] and len(scheduled) == 2
