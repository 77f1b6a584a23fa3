"""Every serving limit in one place. Each field reads ``RECBOLE_BENTO_<FIELD>`` from the environment."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Settings:
    model: str | None = None  # model store tag (name or name:version); unset = newest import
    device: str | None = None  # "cpu", "cuda", "cuda:1"; unset = CUDA when available
    max_history: int = 10_000  # longer histories are refused (the model sees its window anyway)
    max_topk: int = 1000
    max_batch_requests: int = 256  # entries in one /recommend_batch body
    max_id_length: int = 256  # characters in one item/user id
    max_batch_size: int = 64  # adaptive batching: sequences per model call
    max_latency_ms: int = 10_000  # adaptive batching: a request waits at most this long in total
    # Where the model runs and how many processes: edge/topology.py picks each 0 / unset from the
    # device, the catalogue size and the cores (docs/configuration.md).
    topology: str | None = None  # "split" | "inprocess"; unset = auto
    torch_threads: int = 0  # intra-op threads per process that holds the model; 0 = auto
    ranker_workers: int = 0  # split: model worker processes (each loads the model); 0 = auto
    api_workers: int = 0  # public service processes (in-process: each also holds the model); 0 = auto
    block_items: int = 8192  # exact block top-k over large catalogues (CPU); 0 = always full matrix
    # Traffic limits of the public service (docs/configuration.md); 0 turns a limit off.
    max_body_bytes: int = 4 * 1024 * 1024  # larger request bodies -> 413, never read into memory
    body_timeout_s: int = 10  # the whole body must arrive within this time -> else 408
    max_pending_bodies: int = 64  # requests still receiving their body at once; more -> 429
    max_concurrency: int = 256  # requests in progress at once; more -> 429 with Retry-After
    retry_after_s: int = 1  # the Retry-After a 429 carries
    request_timeout_s: int = 30  # a request not answered in this time -> 504
    shutdown_grace_s: int = 40  # after SIGTERM: finish accepted requests, exit within this time
    drain_s: int = 2  # after SIGTERM: keep answering, with readyz 503 and Connection: close, this long
    # Server-side sessions (POST /events, "session_id"; docs/operations.md).
    session_store: str | None = None  # unset: SQLite under the BentoML home; redis://host:port/db
    session_ttl: int = 30 * 86_400  # seconds after a session's last event before it is forgotten; 0 = never
    session_max: int = 1_000_000  # sessions kept, the least recently active evicted first; 0 = no limit
    session_timeout_ms: int = 200  # a Redis call not answered within this -> 503 naming the store
    max_session_id_bytes: int = 256  # a longer session id -> 400
    max_event_items: int = 1000  # items in one POST /events body; more -> 400
    fast_path: int = 1  # 0 = the JSON endpoints through BentoML's API dispatch (edge/fast_path.py)
    access_log: int = 0  # 1 = BentoML's access log (one INFO line per request) on both services
    json_logs: int = 0  # 1 = one JSON object per log line (docs/operations.md)
    # Several models and changing them while serving (docs/operations.md, "Model lifecycle").
    routes: str | None = None  # a routes file (YAML or JSON): variants, weights, shadow; unset = MODEL alone
    admin_token: str | None = None  # enables /admin/routes (Authorization: Bearer <token>); unset = off
    memory_budget_mb: int = 0  # models one process may hold at a swap's peak (old + new); 0 = no limit
    allow_untested_bentoml: int = 0  # 1 = serve on a BentoML the edge was not written for (no patches)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = env.get(f"RECBOLE_BENTO_{f.name.upper()}")
            if raw is None or raw == "":
                continue
            values[f.name] = raw if f.type == "str | None" else _positive_int(f.name, raw)
        return cls(**values)  # type: ignore[arg-type]


def _positive_int(name: str, raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"RECBOLE_BENTO_{name.upper()}={raw!r} is not an integer") from None
    if value < 0:
        raise ValueError(f"RECBOLE_BENTO_{name.upper()}={raw!r} must be >= 0")
    return value


# Read once per process, at import: every module that enforces a limit reads this object.
SETTINGS = Settings.from_env()
