"""From rows to their answers, shared by the batch command and Spark (``recbole_bento.spark``): one
path from a row to /recommend's answer for it.

Each row is validated with the HTTP API's own ``RecommendRequest``, mapped by
``core.planner.Planner``, ranked by ``core.engine.Engine`` and answered by ``Planner.answers``: the
same answer /recommend gives for that row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
from pydantic import TypeAdapter, ValidationError

from ..core import store
from ..core.engine import Engine, TopK
from ..core.planner import Plan, Planner, RequestError
from ..core.ranking import RankQuery, RankResult
from ..schemas import RecommendRequest
from ..settings import SETTINGS

# the answer columns added to every row, in every format
ADDED = pa.schema(
    [
        ("item_list", pa.list_(pa.string())),
        ("score_list", pa.list_(pa.float64())),
        ("unknown_items", pa.list_(pa.string())),
        ("fallback", pa.string()),
    ]
)


class BatchError(Exception):
    """Stops the run; the message is the one line the user reads."""


class Unusable:
    """A row that never reaches the request schema (no such field, not a JSON object); *reason* says why."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


@dataclass(frozen=True)
class Options:
    """Per-run request fields and input layout; small and picklable (Spark ships it to executors)."""

    topk: int = 10
    exclude_seen: bool = False
    filters: Any = None
    sequence_col: str = "sequence"
    user_col: str = "user_id"
    batch_size: int = SETTINGS.max_batch_size
    skip_bad_rows: bool = False


@dataclass
class Scored:
    """One chunk's outcome: the kept rows with their answers, and (row number, reason) per bad row."""

    data: pa.Table | list[dict[str, Any]]
    bad: list[tuple[int, str]] = field(default_factory=list)


def _one_line(errors: list[Any], names: dict[str, str]) -> str:
    """pydantic's errors for one request as one line; *names* renames the first location part."""
    parts = []
    for err in errors:
        loc = [names.get(str(p), str(p)) if i == 0 else str(p) for i, p in enumerate(err["loc"])]
        parts.append(f"{'.'.join(loc)}: {err['msg']}")
    return "; ".join(parts)


# One validator call per chunk: per-request model_validate calls cost several times more per row.
_REQUESTS = TypeAdapter(list[RecommendRequest])


def validate_requests(bodies: list[dict[str, Any]], names: dict[str, str]) -> list[RecommendRequest | str]:
    """Each body as a ``RecommendRequest``, or why /recommend would refuse it (one line)."""
    try:
        return _REQUESTS.validate_python(bodies)
    except ValidationError as exc:
        errors: dict[int, list[Any]] = {}
        for err in exc.errors():
            errors.setdefault(err["loc"][0], []).append({**err, "loc": err["loc"][1:]})
    valid = iter(_REQUESTS.validate_python([b for i, b in enumerate(bodies) if i not in errors]))
    return [_one_line(errors[i], names) if i in errors else next(valid) for i in range(len(bodies))]


def check_request_fields(planner: Planner, options: Options) -> dict[str, Any]:
    """The request fields every row shares, checked once against this model: a bad --topk or
    --filters stops the run before any row is read. Returns them for ``Scorer``."""
    fixed: dict[str, Any] = {"topk": options.topk, "exclude_seen": options.exclude_seen}
    if options.filters is not None:
        fixed["filters"] = options.filters
    probe = {"sequence": [], "user_id": 0, **fixed}  # user 0: unknown, so the user rule is not hit
    try:
        planner.plan(RecommendRequest.model_validate(probe))
    except ValidationError as exc:
        raise BatchError(_one_line(exc.errors(), {})) from None
    except RequestError as exc:
        raise BatchError(str(exc)) from None
    return fixed


def required_columns(planner: Planner, options: Options) -> list[str]:
    return [options.sequence_col] + ([options.user_col] if planner.spec.needs_user else [])


def check_columns(names: Sequence[str], planner: Planner, options: Options) -> None:
    missing = [c for c in required_columns(planner, options) if c not in names]
    if missing:
        raise BatchError(f"no column {missing[0]!r} in the input (columns: {', '.join(names)})")
    taken = [c for c in ADDED.names if c in names]
    if taken:
        raise BatchError(f"the input already has a column {taken[0]!r}, which the output adds")


def split_text(value: Any) -> Any:
    """A text sequence (CSV, an Arrow string column) is its space-separated ids; else as given."""
    return value.split() if isinstance(value, str) else value


@dataclass
class Chunk:
    """Rows as read: an Arrow batch (Parquet, Spark) or row dicts (JSON lines, CSV)."""

    data: pa.RecordBatch | pa.Table | list[dict[str, Any] | Unusable]
    numbers: Sequence[int]  # the rows' 1-based numbers (JSON lines: line numbers)
    text: bool = False  # CSV: every value is a string, sequences space-separated


@dataclass
class Pending:
    """A chunk on its way through ``Scorer``: planned, then ranked, then finished."""

    chunk: Chunk
    plans: list[Plan | str]  # a Plan, or why the row is bad
    ranked: list[RankResult] = field(default_factory=list)  # the rankable plans' results, in order

    def rankable(self) -> list[RankQuery]:
        return [p.query for p in self.plans if isinstance(p, Plan) and p.rankable]


class Scorer:
    """The stored model, ready to answer rows exactly as /recommend answers the same requests.

    Three steps per chunk, so that the command can read and plan the next chunk and write the last
    one while the model ranks this one: ``plan`` (validation, id mapping), ``rank`` (the model, in
    batches of ``Options.batch_size``), ``finish`` (fallback, decoding, output columns)."""

    def __init__(self, stored: Any, options: Options) -> None:
        artifact = store.load(stored)
        self.options = options
        self.planner = Planner(artifact, SETTINGS.max_topk)
        self.fixed = check_request_fields(self.planner, options)
        self.needs_user = self.planner.spec.needs_user
        self.engine = Engine(artifact, device=SETTINGS.device, block_items=SETTINGS.block_items)
        self._names = {"sequence": options.sequence_col, "user_id": options.user_col}

    def _columns(self, chunk: Chunk) -> tuple[list[Any], list[Any] | None]:
        seq_col, user_col = self.options.sequence_col, self.options.user_col
        if isinstance(chunk.data, list):
            missing, no_user = Unusable(f"no {seq_col!r} field"), Unusable(f"no {user_col!r} field")
            rows = [r if isinstance(r, dict) else {seq_col: r, user_col: r} for r in chunk.data]
            sequences = [r.get(seq_col, missing) for r in rows]
            users = [r.get(user_col, no_user) for r in rows] if self.needs_user else None
        else:  # Arrow: the columns exist (checked before the first row), values as Python objects
            sequences = chunk.data.column(seq_col).to_pylist()
            users = chunk.data.column(user_col).to_pylist() if self.needs_user else None
        if chunk.text or (not isinstance(chunk.data, list) and pa.types.is_string(chunk.data[seq_col].type)):
            sequences = [split_text(s) for s in sequences]
        return sequences, users

    def plan(self, chunk: Chunk) -> Pending:
        sequences, users = self._columns(chunk)
        plans: list[Plan | str] = [""] * len(sequences)
        bodies: list[dict[str, Any]] = []
        where: list[int] = []
        for i, sequence in enumerate(sequences):
            user = None if users is None else users[i]
            unusable = next((v for v in (sequence, user) if isinstance(v, Unusable)), None)
            if unusable is not None:
                plans[i] = unusable.reason
                continue
            bodies.append({"sequence": sequence, **self.fixed})
            if self.needs_user:
                bodies[-1]["user_id"] = user
            where.append(i)
        for i, request in zip(where, validate_requests(bodies, self._names), strict=True):
            try:
                plans[i] = request if isinstance(request, str) else self.planner.plan(request)
            except RequestError as exc:
                plans[i] = str(exc)
        return Pending(chunk, plans)

    def rank(self, pending: Pending) -> Pending:
        pending.ranked = self.rank_queries(pending.rankable())
        return pending

    def rank_queries(self, queries: list[RankQuery]) -> list[RankResult]:
        """The model's answers, in batches of ``Options.batch_size``."""
        return self.results(queries, self.top_k(queries))

    def top_k(self, queries: list[RankQuery]) -> list[TopK]:
        """The model's part of ``rank_queries``: ``Engine.top_k`` of each batch."""
        size = self.options.batch_size
        return [self.engine.top_k(queries[start : start + size]) for start in range(0, len(queries), size)]

    def results(self, queries: list[RankQuery], tops: list[TopK]) -> list[RankResult]:
        """``top_k(queries)`` decoded (``Engine.results``), batch by batch, in order."""
        size = self.options.batch_size
        starts = range(0, len(queries), size)
        return [
            r
            for start, top in zip(starts, tops, strict=True)
            for r in self.engine.results(queries[start : start + size], top)
        ]

    def finish(self, pending: Pending) -> Scored:
        """The chunk's rows with the answer columns added; bad rows dropped and listed."""
        plans: list[Plan] = []
        keep: list[int] = []
        bad: list[tuple[int, str]] = []
        for i, (number, plan) in enumerate(zip(pending.chunk.numbers, pending.plans, strict=True)):
            if isinstance(plan, str):
                bad.append((number, plan))
            else:
                plans.append(plan)
                keep.append(i)
        answers = [  # the same columns in every format
            {name: a[name] for name in ADDED.names} for a in self.planner.answers(plans, pending.ranked)
        ]
        data = pending.chunk.data
        if isinstance(data, list):
            return Scored([{**data[i], **answer} for i, answer in zip(keep, answers, strict=True)], bad)
        table = pa.Table.from_batches([data]) if isinstance(data, pa.RecordBatch) else data
        if bad:
            table = table.take(keep)
        for name, type_ in zip(ADDED.names, ADDED.types, strict=True):
            table = table.append_column(name, pa.array([a[name] for a in answers], type_))
        return Scored(table, bad)

    def score(self, chunk: Chunk) -> Scored:
        return self.finish(self.rank(self.plan(chunk)))
