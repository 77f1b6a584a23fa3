"""Server-side session histories: the items a client sent for a session, most recent last, so that a
front-end sends only the click that just happened and asks for the next items by session.

A store is the one source of truth for every API worker and replica, with no per-process cache: a
read after a successful append sees it, whichever process made either call (read-your-writes).

* ``SQLiteStore``, the default: one file (under the BentoML home) in WAL mode, shared by every API
  worker of a server and surviving its restart. An append is one read-modify-write transaction
  opened with ``BEGIN IMMEDIATE``, which takes the write lock first: appends from several processes
  wait for it in turn (short retries, up to a busy timeout) instead of failing on a lock upgrade,
  and none is lost. An append runs on the event loop when the lock is free, else on one thread of
  the process, where the wait blocks nothing else; reads run on the loop (a WAL reader never waits).
* ``RedisStore`` (``redis://host:port/db``), for several replicas: one Lua script appends, trims to
  the window, renews the expiry and records the activity in a sorted set (the eviction order)
  atomically, on Redis's clock. Every call is bounded by a short timeout, with no retries, so a down
  or slow Redis is a ``StoreUnavailable`` within that time, never a hang.

A session expires ``ttl_s`` after its last append and at most ``max_sessions`` are kept, the least
recently appended to evicted first. Whatever a store returns is untrusted (a file or a Redis shared
with others may hold anything): a stored value that is not a list of item ids within the limits
reads as no history, with a warning, never as an error; a file that is not a session store is
refused when the store is opened.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

logger = logging.getLogger("recbole_bento")
T = TypeVar("T")


class StoreUnavailable(Exception):
    """The session store cannot answer now; the message names it (HTTP 503)."""


class StoreError(Exception):
    """The configured store cannot be used at all (a file that is not a session store, a bad URL)."""


@dataclass(frozen=True)
class Session:
    items: list[str] = field(default_factory=list)  # most recent last, at most the window
    user_id: str | None = None  # the last one an event carried


@dataclass(frozen=True)
class Limits:
    """What a stored value may hold to be read as a session; anything else is corrupt."""

    max_items: int = 10_000  # more stored items than any window: a corrupt value
    max_id_length: int = 256  # characters in one item or user id, as in requests


class SessionStore(Protocol):
    name: str  # in every StoreUnavailable and log line: which store

    async def append(self, session_id: str, items: Sequence[str], user_id: str | None, keep: int) -> Session:
        """Append *items* (and remember *user_id* unless None), keep the last *keep* items, renew
        the session's expiry; the session as stored afterwards."""
        ...

    async def get(self, session_id: str) -> Session | None: ...

    async def delete(self, session_id: str) -> bool:
        """Forget the session; whether one was stored."""
        ...

    async def close(self) -> None: ...


# Opaque tokens (a UUID, a cookie's value): printable ASCII without spaces, so that a character is a
# byte, and an id is the same in a JSON body, a Redis key and a URL path.
SESSION_ID_PATTERN = "^[!-~]+$"  # as published (ECMA-262); checked with fullmatch ("$" would pass "a\n")
_SESSION_ID = re.compile("[!-~]+")


def check_session_id(value: str, max_bytes: int) -> str:
    """*value* when it is a usable session id: 1 to *max_bytes* (0: any number of) printable
    ASCII characters other than space; ValueError saying what is wrong otherwise."""
    if not value or (max_bytes and len(value) > max_bytes):
        raise ValueError(f"a session id is 1 to {max_bytes} characters, got {len(value)}")
    if not _SESSION_ID.fullmatch(value):
        raise ValueError("a session id is printable ASCII without spaces (a UUID, a token)")
    return value


def valid_items(values: object, limits: Limits) -> list[str] | None:
    """*values* as a history when it is a list of item ids within *limits*; None otherwise."""
    if not isinstance(values, list) or len(values) > limits.max_items:
        return None
    if all(isinstance(v, str) and 0 < len(v) <= limits.max_id_length for v in values):
        return values
    return None


def _valid_user(value: object, limits: Limits) -> str | None:
    return value if isinstance(value, str) and 0 < len(value) <= limits.max_id_length else None


def _corrupt(store: str, what: str) -> None:
    logger.warning("session store %s: %s; read as no history", store, what)


def store_address(spec: str | None) -> tuple[str, str | None]:
    """What *spec* (``RECBOLE_BENTO_SESSION_STORE``) names, checked without opening anything:
    ``("sqlite", None)`` unset (the default file), ``("sqlite", "/abs/path")`` for
    ``sqlite:///abs/path``, ``("redis", url)`` for ``redis://host:port/db`` (``rediss://``: TLS)."""
    if not spec:
        return "sqlite", None
    parts = urlsplit(spec)
    shown = spec.replace(f":{parts.password}@", ":***@") if parts.password else spec  # no password in logs
    try:
        parts.port  # noqa: B018  (a port that is not a number raises here)
    except ValueError as exc:
        raise StoreError(f"RECBOLE_BENTO_SESSION_STORE={shown!r}: {exc}") from None
    if parts.scheme in ("redis", "rediss") and parts.hostname:
        return "redis", spec
    if parts.scheme == "sqlite" and spec.startswith("sqlite:///") and len(spec) > len("sqlite:///"):
        return "sqlite", spec.removeprefix("sqlite://")
    raise StoreError(
        f"RECBOLE_BENTO_SESSION_STORE={shown!r}: use redis://host:port/db, sqlite:///absolute/path, "
        "or leave it unset for SQLite under the BentoML home"
    )


def open_store(
    spec: str | None,
    default_path: Path,
    *,
    ttl_s: float,
    max_sessions: int,
    timeout_s: float,
    limits: Limits,
) -> SessionStore:
    """The store *spec* names (``store_address``); unset: SQLite at *default_path*."""
    kind, target = store_address(spec)
    if kind == "redis":
        assert target is not None
        return RedisStore(target, ttl_s=ttl_s, max_sessions=max_sessions, timeout_s=timeout_s, limits=limits)
    path = Path(target) if target else default_path
    return SQLiteStore(path, ttl_s=ttl_s, max_sessions=max_sessions, limits=limits)


# ---------------------------------------------------------------------------------------------- SQLite


def _busy(exc: sqlite3.OperationalError) -> bool:
    """Another connection holds the lock (SQLITE_BUSY, SQLITE_LOCKED)."""
    return getattr(exc, "sqlite_errorcode", None) in (5, 6) or "locked" in str(exc)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    items TEXT NOT NULL,      -- JSON array of item ids, most recent last
    user_id TEXT,
    touched REAL NOT NULL     -- the clock at the last append
);
CREATE INDEX IF NOT EXISTS sessions_touched ON sessions (touched);
-- The number of sessions, kept by the triggers (count(*) reads the whole table), recounted at
-- each opening: a file edited by others is not trusted to hold the right one.
CREATE TABLE IF NOT EXISTS session_count (k INTEGER PRIMARY KEY CHECK (k = 0), n INTEGER NOT NULL);
INSERT OR REPLACE INTO session_count VALUES (0, (SELECT count(*) FROM sessions));
CREATE TRIGGER IF NOT EXISTS session_added AFTER INSERT ON sessions
    BEGIN UPDATE session_count SET n = n + 1; END;
CREATE TRIGGER IF NOT EXISTS session_removed AFTER DELETE ON sessions
    BEGIN UPDATE session_count SET n = n - 1; END;
"""
_COLUMNS = ["id", "items", "user_id", "touched"]


class SQLiteStore:
    """Sessions in one SQLite file in WAL mode, shared by the processes that open it."""

    CHECKPOINT_EVERY = 200  # appends on the event loop between two checkpoints on the store's thread

    def __init__(
        self,
        path: Path,
        *,
        ttl_s: float,
        max_sessions: int,
        limits: Limits = Limits(),
        clock: Callable[[], float] = time.time,
        busy_timeout_s: float = 5.0,
    ) -> None:
        self.path = Path(path)
        self.name = f"sqlite:{self.path}"
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self.limits = limits
        self._clock = clock
        self.busy_timeout_s = busy_timeout_s
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="session-store")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # timeout=0: a locked file raises at once and _retrying waits, in shorter steps than
            # SQLite's own busy handler, whose waits start at 1 ms (a write holds the lock ~50 us).
            self._db = sqlite3.connect(self.path, timeout=0, isolation_level=None, check_same_thread=False)
            # The event loop's own connection: reads (in WAL mode a reader waits for no writer), and
            # appends while no other connection holds the write lock.
            self._loop_db = sqlite3.connect(
                self.path, timeout=0, isolation_level=None, check_same_thread=False
            )
            self._appends = 0
            columns = self._retrying(self._open)  # several workers open the file at once
        except (sqlite3.Error, OSError) as exc:
            self._thread.shutdown(wait=False)
            raise StoreError(
                f"{self.path} cannot be used as the session store ({exc}): move it away, or point "
                "RECBOLE_BENTO_SESSION_STORE elsewhere"
            ) from None
        if columns != _COLUMNS:
            raise StoreError(
                f"{self.path} holds a 'sessions' table with columns {columns}, not a session store: "
                "move it away, or point RECBOLE_BENTO_SESSION_STORE elsewhere"
            )

    def _checkpoint(self) -> None:
        """Copy the write-ahead log into the database (PASSIVE: waits for no reader or writer)."""
        try:
            self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error as exc:  # the next one catches up
            logger.warning("session store %s: checkpoint failed: %s", self.name, exc)

    def _open(self) -> list[str]:
        """WAL mode and the schema; the columns of the sessions table found."""
        for db in (self._db, self._loop_db):
            # Per connection: synced at each checkpoint, not each commit (FULL syncs the log at every
            # append: ~7 ms here); erased histories zeroed, not left in free pages.
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA secure_delete=ON")
        # The loop's commits never checkpoint (a checkpoint writes the database file and syncs it:
        # milliseconds on the event loop); the store's thread does, every CHECKPOINT_EVERY appends.
        self._loop_db.execute("PRAGMA wal_autocheckpoint=0")
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} COMMIT;")
        return [row[1] for row in self._db.execute("PRAGMA table_info(sessions)")]

    def _retrying(self, work: Callable[[], T]) -> T:
        """*work* (a whole transaction, or one statement), run again while another process holds
        the file's lock, for up to ``busy_timeout_s``: waits of 50 us doubling to 2 ms."""
        deadline = time.monotonic() + self.busy_timeout_s
        pause = 50e-6
        while True:
            try:
                return work()
            except sqlite3.OperationalError as exc:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                if not _busy(exc) or time.monotonic() > deadline:
                    raise
            time.sleep(pause)
            pause = min(2 * pause, 0.002)

    async def _call(self, work: Callable[[], T]) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._thread, self._retrying, work)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"the session store {self.name} failed: {exc}") from None

    async def append(self, session_id: str, items: Sequence[str], user_id: str | None, keep: int) -> Session:
        """On the event loop while the write lock is free (~130 us, against ~300 us of CPU through
        the store's thread); else on that thread, which waits for the lock."""
        items = list(items)
        try:
            session = self._append(self._loop_db, session_id, items, user_id, keep)
            self._appends += 1
            if self._appends % self.CHECKPOINT_EVERY == 0:
                self._thread.submit(self._checkpoint)
            return session
        except sqlite3.OperationalError as exc:
            if not _busy(exc):
                raise StoreUnavailable(f"the session store {self.name} failed: {exc}") from None
        return await self._call(lambda: self._append(self._db, session_id, items, user_id, keep))

    async def get(self, session_id: str) -> Session | None:
        """On the event loop (one indexed read, ~30 us: less than the hop to the store's thread);
        only a busy file (a rare WAL recovery) sends it to the thread, to wait there."""
        try:
            return self._decode(self._row(self._loop_db, session_id), self._clock())
        except sqlite3.OperationalError as exc:
            if not _busy(exc):
                raise StoreUnavailable(f"the session store {self.name} failed: {exc}") from None
        return await self._call(lambda: self._read(session_id, self._clock()))

    async def delete(self, session_id: str) -> bool:
        return await self._call(
            lambda: self._db.execute("DELETE FROM sessions WHERE id = ?", (session_id,)).rowcount > 0
        )

    async def close(self) -> None:
        self._loop_db.close()
        await asyncio.get_running_loop().run_in_executor(self._thread, self._db.close)
        self._thread.shutdown(wait=False)

    @staticmethod
    def _row(db: sqlite3.Connection, session_id: str) -> tuple[Any, Any, Any] | None:
        return db.execute(
            "SELECT items, user_id, touched FROM sessions WHERE id = ?", (session_id,)
        ).fetchone()

    def _read(self, session_id: str, now: float) -> Session | None:
        return self._decode(self._row(self._db, session_id), now)

    def _decode(self, row: tuple[Any, Any, Any] | None, now: float) -> Session | None:
        if row is None:
            return None
        raw, user, touched = row
        if not isinstance(touched, (int, float)) or (self.ttl_s and now - touched > self.ttl_s):
            return None  # expired (a purge removes it at the next append)
        try:
            items = valid_items(json.loads(raw), self.limits) if isinstance(raw, str) else None
        except (ValueError, RecursionError):
            items = None
        if items is None:
            _corrupt(self.name, "a stored history is not a list of item ids")
            return None
        return Session(items, _valid_user(user, self.limits))

    def _append(
        self, db: sqlite3.Connection, session_id: str, items: list[str], user_id: str | None, keep: int
    ) -> Session:
        now = self._clock()
        db.execute("BEGIN IMMEDIATE")
        try:
            stored = self._row(db, session_id)
            exists = stored is not None
            old = self._decode(stored, now) or Session()
            session = Session((old.items + items)[-keep:], user_id if user_id is not None else old.user_id)
            row = (json.dumps(session.items, separators=(",", ":")), session.user_id, now, session_id)
            if exists:
                db.execute("UPDATE sessions SET items = ?, user_id = ?, touched = ? WHERE id = ?", row)
            else:
                db.execute("INSERT INTO sessions (items, user_id, touched, id) VALUES (?, ?, ?, ?)", row)
            if self.ttl_s:  # a few expired sessions per append: never a long stall after a quiet spell
                db.execute(
                    "DELETE FROM sessions WHERE id IN "
                    "(SELECT id FROM sessions WHERE touched < ? ORDER BY touched LIMIT 100)",
                    (now - self.ttl_s,),
                )
            if not exists and self.max_sessions:
                self._evict(db)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return session

    def _evict(self, db: sqlite3.Connection) -> None:
        """The least recently appended-to sessions beyond *max_sessions*."""
        (count,) = db.execute("SELECT n FROM session_count").fetchone() or (None,)
        if not isinstance(count, int) or count < 0:
            count = self._recount(db)
        if count <= self.max_sessions:
            return
        gone = db.execute(
            "DELETE FROM sessions WHERE id IN (SELECT id FROM sessions ORDER BY touched LIMIT ?)",
            (count - self.max_sessions,),
        ).rowcount
        if gone < count - self.max_sessions:  # the kept count was wrong (a file edited by others)
            self._recount(db)

    def _recount(self, db: sqlite3.Connection) -> int:
        db.execute("DELETE FROM session_count")
        db.execute("INSERT INTO session_count VALUES (0, (SELECT count(*) FROM sessions))")
        return int(db.execute("SELECT n FROM session_count").fetchone()[0])


# ---------------------------------------------------------------------------------------------- Redis

# KEYS: none, the names are built from ARGV[1] (a standalone Redis, not a Cluster). ARGV: prefix,
# session id, ttl in ms (0: none), items to keep, max sessions (0: any), user id ('' = keep the
# stored one), the items. A key holding another type (written by someone else) is replaced.
APPEND_SCRIPT = """
local prefix, id = ARGV[1], ARGV[2]
local ttl, keep, max, user = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
local items_key, user_key, index = prefix .. 's:' .. id, prefix .. 'u:' .. id, prefix .. 'active'
for key, kind in pairs({[items_key] = 'list', [user_key] = 'string', [index] = 'zset'}) do
  local t = redis.call('TYPE', key).ok
  if t ~= kind and t ~= 'none' then redis.call('DEL', key) end
end
local n = redis.call('RPUSH', items_key, unpack(ARGV, 7))
if n > keep then redis.call('LTRIM', items_key, -keep, -1) end
if user ~= '' then redis.call('SET', user_key, user) end
if ttl > 0 then
  redis.call('PEXPIRE', items_key, ttl)
  redis.call('PEXPIRE', user_key, ttl)
end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1e6
if ttl > 0 then redis.call('ZREMRANGEBYSCORE', index, '-inf', now - ttl / 1000) end
local added = redis.call('ZADD', index, now, id)
if added == 1 and max > 0 then
  local over = redis.call('ZCARD', index) - max
  if over > 0 then
    for _, old in ipairs(redis.call('ZRANGE', index, 0, over - 1)) do
      redis.call('DEL', prefix .. 's:' .. old, prefix .. 'u:' .. old)
    end
    redis.call('ZREMRANGEBYRANK', index, 0, over - 1)
  end
end
return {redis.call('LRANGE', items_key, 0, -1), redis.call('GET', user_key)}
"""


class RedisStore:
    """Sessions in Redis: a list per session, the user id beside it, a sorted set of activity."""

    MAX_PERIODS = 10  # of timeout_s each, while the event loop keeps being held past the deadline

    def __init__(
        self,
        url: str,
        *,
        ttl_s: float,
        max_sessions: int,
        timeout_s: float,
        limits: Limits = Limits(),
        prefix: str = "recbole_bento:",
    ) -> None:
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        parts = urlsplit(url)
        where = f"{parts.hostname or 'localhost'}:{parts.port or 6379}"
        self.name = f"{parts.scheme}://{where}{parts.path or '/0'}"  # no password in logs or answers
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self.timeout_s = timeout_s
        self.limits = limits
        self.prefix = prefix
        try:
            self._redis = Redis.from_url(
                url,
                # The deadline is _call's; the socket's own is only a backstop: redis-py measures it
                # on the event loop's clock, and an answer that came while the loop was busy (the
                # in-process model ranks on it) would count as late.
                socket_timeout=max(1.0, 10 * timeout_s),
                socket_connect_timeout=timeout_s,
                retry=Retry(NoBackoff(), 0),
                retry_on_timeout=False,
            )
        except ValueError as exc:
            raise StoreError(f"RECBOLE_BENTO_SESSION_STORE: {exc}") from None
        self._append_script = self._redis.register_script(APPEND_SCRIPT)

    async def _call(self, work: Awaitable[T]) -> T:
        """*work*'s answer, or StoreUnavailable once ``timeout_s`` has passed without one while the
        event loop was free. A deadline that fires late (the loop was held elsewhere: the in-process
        model ranks on it) starts another period: the answer that arrived meanwhile is read, not
        refused as late. At most ``MAX_PERIODS`` periods, plus whatever held the loop."""
        from redis.exceptions import RedisError

        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(work)
        try:
            for _ in range(self.MAX_PERIODS):
                deadline = loop.time() + self.timeout_s
                await asyncio.wait({task}, timeout=self.timeout_s)
                if task.done() or loop.time() - deadline < self.timeout_s / 4:
                    break  # answered, or the loop was free at the deadline: no answer is coming
            if task.done():
                return task.result()
            reason = f"no answer within {self.timeout_s * 1000:.0f} ms"
        except (RedisError, OSError) as exc:
            reason = str(exc) or type(exc).__name__
        finally:
            if not task.done():
                task.cancel()  # redis-py drops the connection of a cancelled command
        raise StoreUnavailable(f"the session store {self.name} is unavailable: {reason}")

    def _keys(self, session_id: str) -> tuple[str, str]:
        return f"{self.prefix}s:{session_id}", f"{self.prefix}u:{session_id}"

    async def append(self, session_id: str, items: Sequence[str], user_id: str | None, keep: int) -> Session:
        ttl_ms = round(self.ttl_s * 1000)
        args = [self.prefix, session_id, ttl_ms, keep, self.max_sessions, user_id or "", *items]
        session = self._decode(await self._call(self._append_script(args=args)))
        if session is None:  # it was appended to a corrupt history: replace that
            await self._call(self._redis.delete(*self._keys(session_id)))
            session = self._decode(await self._call(self._append_script(args=args)))
        return session or Session()

    async def get(self, session_id: str) -> Session | None:
        async def read() -> list[Any]:
            pipe = self._redis.pipeline(transaction=False)
            items_key, user_key = self._keys(session_id)
            pipe.lrange(items_key, -self.limits.max_items, -1)
            pipe.get(user_key)
            return await pipe.execute(raise_on_error=False)

        items, user = await self._call(read())
        if isinstance(items, list) and not items:
            return None
        return self._decode([items, user])

    async def delete(self, session_id: str) -> bool:
        async def forget() -> list[Any]:
            pipe = self._redis.pipeline(transaction=True)
            pipe.delete(*self._keys(session_id))
            pipe.zrem(f"{self.prefix}active", session_id)
            return await pipe.execute()

        deleted, _ = await self._call(forget())
        return bool(deleted)

    async def close(self) -> None:
        await self._redis.aclose()

    def _decode(self, stored: object) -> Session | None:
        """(LRANGE, GET) as Redis answered them, checked; None for a corrupt value."""
        if not isinstance(stored, list) or len(stored) != 2:
            _corrupt(self.name, "the script answered something else than (items, user)")
            return None
        raw_items, raw_user = stored
        try:
            items = [v.decode("utf-8") for v in raw_items] if isinstance(raw_items, list) else None
            user = raw_user.decode("utf-8") if isinstance(raw_user, bytes) else None
        except (AttributeError, UnicodeDecodeError):
            items = None
        items = valid_items(items, self.limits)
        if items is None:
            _corrupt(self.name, "a stored history is not a list of item ids")
            return None
        return Session(items, _valid_user(user, self.limits))
