"""The batch command's files: JSON lines, CSV and Parquet read in chunks (``Reader``) and written
back with the answer columns (``Writer``); the format is chosen by extension."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pydantic_core

from .scorer import ADDED, Chunk, Unusable

FORMATS = (".jsonl", ".csv", ".parquet")
# what reading or writing a file raises: the run stops with its message as the one line
FILE_ERRORS = (OSError, pa.ArrowException, csv.Error, UnicodeDecodeError)


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
