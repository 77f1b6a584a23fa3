"""Run `bentoml serve` for a stored model on a free loopback port (tests, benchmarks, scripts)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_server(
    tag: str,
    *,
    cwd: Path = ROOT,
    env: dict[str, str] | None = None,
    ready_timeout: float = 180,
    log_path: Path | None = None,
) -> Iterator[str]:
    """Serve *tag* from *cwd* on 127.0.0.1; yields the base URL once /readyz answers 200
    (``local_server_process``, without the process)."""
    with local_server_process(tag, cwd=cwd, env=env, ready_timeout=ready_timeout, log_path=log_path) as (
        url,
        _,
    ):
        yield url


@contextlib.contextmanager
def local_server_process(
    tag: str,
    *,
    cwd: Path = ROOT,
    env: dict[str, str] | None = None,
    ready_timeout: float = 180,
    log_path: Path | None = None,
) -> Iterator[tuple[str, int]]:
    """Serve *tag* from *cwd* on 127.0.0.1; yields (the base URL, the `bentoml serve` pid) once
    /readyz answers 200, stops the whole process group (SIGTERM, then SIGKILL after 60 s) when the
    block ends. The server's output goes to *log_path* (default: a temporary file)."""
    port = free_port()
    own_log = log_path is None
    if log_path is None:
        log_path = Path(tempfile.mkstemp(prefix="bentoml-serve-", suffix=".log")[1])
    log = open(log_path, "w+")  # the server writes to it until the block ends
    proc = subprocess.Popen(
        [sys.executable, "-m", "bentoml", "serve", ".", "--host", "127.0.0.1", "--port", str(port)],
        cwd=cwd,
        env={**os.environ, "RECBOLE_BENTO_MODEL": tag, **(env or {})},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"bentoml serve exited:\n{Path(log.name).read_text()[-4000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"not ready in {ready_timeout}s:\n{Path(log.name).read_text()[-4000:]}")
            time.sleep(0.5)
        yield url, proc.pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        log.close()
        if own_log:
            log_path.unlink(missing_ok=True)
