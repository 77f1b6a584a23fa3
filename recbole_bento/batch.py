"""Offline batch scoring: /recommend's answer for every row of a file, without HTTP.

    python -m recbole_bento.batch --model TAG_OR_FILE --input IN --output OUT [--topk 10] [--exclude-seen]
                                  [--filters JSON] [--sequence-col sequence] [--user-col user_id]
                                  [--on-bad-row skip|stop] [--batch-size 64]

IN and OUT are ``.jsonl``, ``.csv`` or ``.parquet`` (chosen by extension). Each row is validated with
the HTTP API's own ``RecommendRequest``, mapped and answered by ``core.planner.Planner`` and ranked by
``core.engine.Engine``: the same answer /recommend gives for that row. OUT holds every input column,
in input order, plus ``item_list``, ``score_list``, ``unknown_items`` and ``fallback``. It is written
under a temporary name in OUT's folder and renamed when complete. On bad input: exit 1 and a one-line
reason on stderr.

The command runs in two processes (``_pipeline``): this one ranks, a child forked from it reads,
validates, maps, decodes and writes. ``Scorer`` is shared with ``recbole_bento.spark``: one path
from a row to its answer.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import json
import multiprocessing
import os
import queue
import signal
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pyarrow as pa
import pydantic_core
from pydantic import TypeAdapter, ValidationError

from .core import store
from .core.artifact import ArtifactError
from .core.engine import Engine, TopK
from .core.planner import Plan, Planner, RequestError
from .core.ranking import RankQuery, RankResult
from .schemas import RecommendRequest
from .settings import SETTINGS

FORMATS = (".jsonl", ".csv", ".parquet")
ADDED = pa.schema(
    [
        ("item_list", pa.list_(pa.string())),
        ("score_list", pa.list_(pa.float64())),
        ("unknown_items", pa.list_(pa.string())),
        ("fallback", pa.string()),
    ]
)
MAX_REPORTED = 20  # bad rows named one by one on stderr; the rest are counted
# what reading or writing a file raises: the run stops with its message as the one line
FILE_ERRORS = (OSError, pa.ArrowException, csv.Error, UnicodeDecodeError)


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


# ---------------------------------------------------------------- files


def _jsonl_chunks(path: Path, rows: int) -> Iterator[Chunk]:
    data: list[dict[str, Any] | Unusable] = []
    numbers: list[int] = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = pydantic_core.from_json(line)  # pydantic's Rust parser: half json.loads' time
            except ValueError as exc:
                row = Unusable(f"not JSON: {exc}")
            if not isinstance(row, dict | Unusable):
                row = Unusable("not a JSON object")
            taken = [c for c in ADDED.names if isinstance(row, dict) and c in row]
            if taken:
                row = Unusable(f"has a field {taken[0]!r}, which the output adds")
            data.append(row)
            numbers.append(number)
            if len(data) == rows:
                yield Chunk(data, numbers)
                data, numbers = [], []
    if data:
        yield Chunk(data, numbers)


class Reader:
    """Chunks of an input file; ``columns`` is known before the first row (None for JSON lines)."""

    def __init__(self, path: Path, rows: int) -> None:
        self.path = path
        self.total: int | None = None
        self.columns: list[str] | None = None
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            parquet = pq.ParquetFile(path)
            self.total = parquet.metadata.num_rows
            self.columns = parquet.schema_arrow.names
            self._chunks: Iterator[Chunk] = self._parquet(parquet, rows)
        elif path.suffix == ".csv":
            self._handle = path.open(newline="", encoding="utf-8")
            reader = csv.DictReader(self._handle)
            self.columns = list(reader.fieldnames or [])
            self._chunks = self._csv(reader, rows)
        else:
            self._chunks = _jsonl_chunks(path, rows)

    @staticmethod
    def _parquet(parquet: Any, rows: int) -> Iterator[Chunk]:
        start = 1
        for batch in parquet.iter_batches(batch_size=rows):
            yield Chunk(batch, range(start, start + batch.num_rows))
            start += batch.num_rows

    @staticmethod
    def _csv(reader: csv.DictReader, rows: int) -> Iterator[Chunk]:
        data: list[dict[str, Any]] = []
        start = 1
        for row in reader:
            # a short row has None for its missing cells: no value, as a JSON line without the field
            data.append({k: v for k, v in row.items() if v is not None and k is not None})
            if len(data) == rows:
                yield Chunk(data, range(start, start + len(data)), text=True)
                start += len(data)
                data = []
        if data:
            yield Chunk(data, range(start, start + len(data)), text=True)

    def __iter__(self) -> Iterator[Chunk]:
        return self._chunks

    def close(self) -> None:
        if self.path.suffix == ".csv":
            self._handle.close()


def _cell(value: Any) -> str:
    """A CSV cell: lists as space-separated ids (as the input's sequence), floats exactly, None empty."""
    if value is None:
        return ""
    if isinstance(value, list):
        return " ".join(_cell(v) for v in value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


class Writer:
    """Writes scored chunks to *path* in its extension's format; the columns are the first chunk's."""

    def __init__(self, path: Path, format: str) -> None:
        self.path = path
        self.format = format
        self._parquet: Any = None
        self._csv: Any = None
        self._header: list[str] | None = None
        self._closed = False
        self._handle: Any = None
        if self.format == ".jsonl":
            self._handle = path.open("wb")
        elif self.format == ".csv":
            self._handle = path.open("w", newline="", encoding="utf-8")

    def write(self, data: pa.Table | list[dict[str, Any]]) -> None:
        if self.format == ".parquet":
            self._write_parquet(data)
            return
        rows = data.to_pylist() if isinstance(data, pa.Table) else data
        if self.format == ".jsonl":
            assert self._handle is not None
            # pydantic's Rust encoder: a fifth of json.dumps' time; UTF-8, dates as ISO 8601
            self._handle.writelines(pydantic_core.to_json(row, fallback=str) + b"\n" for row in rows)
            return
        if self._csv is None:
            self._csv = csv.writer(self._handle)
            if not rows:
                return
            self._header = list(rows[0])
            self._csv.writerow(self._header)
        self._csv.writerows([_cell(row.get(name)) for name in self._header] for row in rows)

    def _write_parquet(self, data: pa.Table | list[dict[str, Any]]) -> None:
        import pyarrow.parquet as pq

        if self._parquet is None:
            if isinstance(data, pa.Table):
                schema = data.schema
            else:  # the first rows' passthrough types, then the answer columns' own
                names = [n for n in (data[0] if data else {}) if n not in ADDED.names]
                passthrough = pa.Table.from_pylist([{n: r.get(n) for n in names} for r in data]).schema
                schema = pa.schema(list(passthrough) + list(ADDED))
            self._parquet = pq.ParquetWriter(self.path, schema)
        schema = self._parquet.schema
        table = data if isinstance(data, pa.Table) else pa.Table.from_pylist(data, schema=schema)
        self._parquet.write_table(table.cast(schema))

    def close(self) -> None:
        """Finish the file (idempotent: the run closes it once more on its way out)."""
        if self._closed:
            return
        self._closed = True
        if self._parquet is not None:
            self._parquet.close()
        elif self.format == ".parquet":  # no row at all: an empty file with the answer columns
            import pyarrow.parquet as pq

            pq.write_table(ADDED.empty_table(), self.path)
        if self._handle is not None:
            self._handle.close()


# ---------------------------------------------------------------- the command


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class Interrupted(Exception):
    """SIGTERM or Ctrl-C: stop, remove the partial output."""


def _interrupt(_signum: int, _frame: Any) -> None:
    raise Interrupted


def load_model(model: str, home: Path) -> Any:
    """A model store tag, or a file written by `bentoml models export` (imported into *home*)."""
    if Path(model).is_file() or os.sep in model:
        return store.import_archive(Path(model), home)
    return store.resolve(model)


def _check_paths(source: Path, target: Path) -> None:
    for path in (source, target):
        if path.suffix not in FORMATS:
            raise BatchError(f"{path}: the format is chosen by extension: {', '.join(FORMATS)}")
    if not source.is_file():
        raise BatchError(f"{source}: no such file")
    if not target.parent.is_dir():
        raise BatchError(f"{target.parent}: no such folder for the output")
    if source.resolve() == target.resolve():
        raise BatchError("--output must not be the input file")


def run(args: argparse.Namespace, progress: bool = True) -> tuple[int, int]:
    """Score args.input into args.output; returns (rows written, bad rows skipped)."""
    source, target = Path(args.input), Path(args.output)
    _check_paths(source, target)
    options = Options(
        topk=args.topk,
        exclude_seen=args.exclude_seen,
        filters=args.filters,
        sequence_col=args.sequence_col,
        user_col=args.user_col,
        batch_size=args.batch_size,
        skip_bad_rows=args.on_bad_row == "skip",
    )
    if SETTINGS.torch_threads:
        import torch

        torch.set_num_threads(SETTINGS.torch_threads)
    with tempfile.TemporaryDirectory(prefix="recbole-bento-batch-") as home:
        scorer = Scorer(load_model(args.model, Path(home)), options)
    return score_file(scorer, source, target, progress)


@contextlib.contextmanager
def _naming(source: Path) -> Iterator[None]:
    """An input that cannot be read: the reason, with the file's name."""
    try:
        yield
    except FILE_ERRORS as exc:
        raise BatchError(f"{source}: {exc}") from None


def _score_in_child(
    scorer: Scorer, reader: Reader, source: Path, tmp: Path, format: str, model: Connection
) -> None:
    """The forked process's part: read and plan each chunk, send its rankable queries to *model*,
    and finish and write the chunk before it with the top-k that come back (decoded here:
    ``Scorer.results``). Tells *model*
    ("written", (rows, skipped rows [(number, reason)])) per chunk, then ("done", None), or
    ("error", one line). SIGINT is the command's to handle (it stops this process), and a command
    gone (a closed pipe) ends it quietly."""
    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    torch.set_num_threads(1)  # as torch's DataLoader workers: no intra-op pool in a forked child
    writer = Writer(tmp, format)

    def finish(pending: Pending) -> None:
        pending.ranked = scorer.results(pending.rankable(), model.recv())
        scored = scorer.finish(pending)
        if scored.bad and not scorer.options.skip_bad_rows:
            raise BatchError("row {}: {}".format(*scored.bad[0]))
        writer.write(scored.data)
        model.send(("written", (len(pending.chunk.numbers), scored.bad)))

    try:
        chunks = iter(reader)
        previous: Pending | None = None
        while True:
            with _naming(source):
                chunk = next(chunks, None)
            if chunk is None:
                break
            pending = scorer.plan(chunk)
            model.send(("rank", pending.rankable()))
            if previous is not None:
                finish(previous)  # the model ranks this chunk meanwhile
            previous = pending
        if previous is not None:
            finish(previous)
        writer.close()
        model.send(("done", None))
    except (BrokenPipeError, EOFError, ConnectionResetError):
        return
    except Exception as exc:
        known = (BatchError, *FILE_ERRORS)
        # a bug: still one line for the user, with what it was
        reason = str(exc) if isinstance(exc, known) else f"internal error: {type(exc).__name__}: {exc}"
        with contextlib.suppress(OSError):
            model.send(("error", reason))
    finally:
        writer.close()


def _pipeline(
    scorer: Scorer, reader: Reader, source: Path, tmp: Path, format: str, progress: bool
) -> tuple[int, int]:
    """Two processes: this one ranks and reports, a child forked from it does everything else.

    Reading, validation, id mapping, decoding and writing are Python that would hold the GIL the
    model needs between its operators; in the child they run beside the model instead of between
    its batches. The child shares the loaded model's memory and never calls it. At most two chunks
    are on their way at once, whatever the input's size. Returns (rows written, bad rows skipped)."""
    from tqdm import tqdm

    context = multiprocessing.get_context("fork")
    here, there = context.Pipe()
    child = context.Process(
        target=_score_in_child, args=(scorer, reader, source, tmp, format, there), daemon=True
    )
    inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def receive() -> None:
        """Always take what the child sends, so that neither side ever blocks on a full pipe."""
        while True:
            try:
                message = here.recv()
            except (EOFError, OSError):
                message = ("error", "the batch's reading process stopped unexpectedly; no output written")
            inbox.put(message)
            if message[0] in ("done", "error"):
                return

    bar = tqdm(total=reader.total, unit=" rows", unit_scale=True, file=sys.stderr, disable=not progress)
    written = skipped = 0
    frozen_before = gc.get_freeze_count() > 0  # a server's start-up freeze (service.py) stays
    gc.freeze()  # the loaded model's objects: never scanned (nor copied) by the child's collector
    try:
        child.start()
        there.close()
        threading.Thread(target=receive, daemon=True).start()
        while True:
            kind, value = inbox.get()
            if kind == "rank":
                try:
                    here.send(scorer.top_k(value))
                except (BrokenPipeError, ConnectionResetError):  # the child is gone: receive() says why
                    while kind != "error":
                        kind, value = inbox.get()
                    raise BatchError(value) from None
            elif kind == "written":
                rows, bad = value
                for number, reason in bad:
                    if skipped < MAX_REPORTED:
                        bar.write(f"skipped row {number}: {reason}", file=sys.stderr)
                    skipped += 1
                written += rows - len(bad)
                bar.update(rows)
            elif kind == "error":
                raise BatchError(value)
            else:
                return written, skipped
    finally:
        if not frozen_before:
            gc.unfreeze()
        bar.close()
        if child.is_alive():
            child.terminate()
        child.join()
        here.close()


def score_file(scorer: Scorer, source: Path, target: Path, progress: bool = True) -> tuple[int, int]:
    """Score *source* into *target* (written under a temporary name, renamed when complete);
    returns (rows written, bad rows skipped)."""
    options = scorer.options
    with _naming(source):
        reader = Reader(source, rows=max(options.batch_size * 16, 1024))
    if reader.columns is not None:
        check_columns(reader.columns, scorer.planner, options)
    # same folder: the rename is atomic; a leading dot and .tmp: never mistaken for a result
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        counts = _pipeline(scorer, reader, source, Path(tmp_name), target.suffix, progress)
        os.chmod(tmp_name, 0o666 & ~_umask())  # mkstemp's 0600 would make the result private
        os.replace(tmp_name, target)
    finally:
        reader.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
    return counts


def _filters(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc.msg}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="recbole-bento-batch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model store tag, or a `bentoml models export` file")
    parser.add_argument("--input", required=True, help="rows to score: .jsonl, .csv or .parquet")
    parser.add_argument("--output", required=True, help="where the answers go: .jsonl, .csv or .parquet")
    parser.add_argument("--topk", type=int, default=10)
    parser.add_argument("--exclude-seen", action="store_true", help="drop each history's items")
    parser.add_argument("--filters", type=_filters, help="the request's filters field, as JSON")
    parser.add_argument(
        "--sequence-col", default="sequence", help="the history column (CSV: space-separated)"
    )
    parser.add_argument("--user-col", default="user_id", help="the user column, for models that need one")
    parser.add_argument("--on-bad-row", choices=["skip", "stop"], default="stop")
    parser.add_argument("--batch-size", type=int, default=SETTINGS.max_batch_size, help="rows per model call")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    warnings.filterwarnings("ignore", category=FutureWarning)  # RecBole 1.2.1 vs pandas 2.x
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        written, skipped = run(args, progress=not args.no_progress)
    except (BatchError, ArtifactError, *FILE_ERRORS) as exc:
        print("recbole-bento-batch: " + " ".join(str(exc).split()), file=sys.stderr)
        return 1
    except Interrupted:
        print("recbole-bento-batch: interrupted; no output written", file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    note = f", {skipped} bad rows skipped" if skipped else ""
    print(f"recbole-bento-batch: {written} rows written to {args.output}{note}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
