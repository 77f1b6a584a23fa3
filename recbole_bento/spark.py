"""Batch scoring on Spark: /recommend's answer for every row of a DataFrame.

    from recbole_bento.spark import recommend
    scored = recommend(df, model="sasrec.bentomodel", sequence_col="sequence", topk=10)

``model`` is a file written by ``bentoml models export`` (or a model store tag on the driver, which
is exported to a temporary file). The file is shipped with the job (``SparkContext.addFile``);
each Python worker imports it once into a temporary private BentoML home and keeps the loaded model
for every later partition (``_SCORERS``); the function Spark pickles carries only the file's name
and the options. Rows are scored with ``batch.scorer.Scorer``, the single-machine command's own code, on Arrow
batches (``mapInArrow``): the answers are those of /recommend for the same rows.

Executors must run the Python environment this package is installed in (``PYSPARK_PYTHON`` or
``spark.pyspark.python``); docs/operations.md shows a spark-submit.
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from .batch.scorer import ADDED, BatchError, Chunk, Options, Scorer, check_columns, check_request_fields
from .core import store
from .core.planner import Planner
from .settings import SETTINGS

_SCORERS: dict[tuple[str, str], Scorer] = {}  # per Python worker: loaded once, reused by each task


def _scorer(name: str, options: Options) -> Scorer:
    key = (name, repr(options))  # repr: ``filters`` may be a dict, which does not hash
    if key not in _SCORERS:
        from pyspark import SparkFiles

        with tempfile.TemporaryDirectory(prefix="recbole-bento-spark-") as home:  # loaded: not needed after
            _SCORERS[key] = Scorer(store.import_archive(Path(SparkFiles.get(name)), Path(home)), options)
    return _SCORERS[key]


def _score_partition(
    name: str, options: Options, batches: Iterator[pa.RecordBatch]
) -> Iterator[pa.RecordBatch]:
    scorer = _scorer(name, options)
    for batch in batches:
        scored = scorer.score(Chunk(batch, range(1, batch.num_rows + 1)))
        if scored.bad and not options.skip_bad_rows:
            number, reason = scored.bad[0]
            raise BatchError(f"row {number} of a partition batch: {reason}")
        yield from scored.data.to_batches()


def _shipped(model: str, workdir: Path) -> tuple[Path, Any]:
    """The exported model file to ship (*model* itself, or a store tag exported into *workdir*) and
    the stored model, for the driver's checks."""
    if Path(model).is_file():
        return Path(model), store.import_archive(Path(model), workdir / "home")
    stored = store.resolve(model)
    return Path(stored.export(str(workdir / f"{stored.tag.name}-{stored.tag.version}.bentomodel"))), stored


def recommend(
    df: Any,
    model: str,
    sequence_col: str = "sequence",
    user_col: str = "user_id",
    topk: int = 10,
    exclude_seen: bool = False,
    filters: Any = None,
    batch_size: int = SETTINGS.max_batch_size,
    on_bad_row: str = "stop",
) -> Any:
    """*df* with ``item_list``, ``score_list``, ``unknown_items`` and ``fallback`` added per row.

    ``on_bad_row="stop"`` fails the job on the first row /recommend would refuse (its reason in the
    error); ``"skip"`` drops such rows. Options and columns are checked here, on the driver, before
    any task runs."""
    from pyspark.sql.pandas.types import from_arrow_schema
    from pyspark.sql.types import StructType

    if on_bad_row not in ("stop", "skip"):
        raise ValueError(f"on_bad_row must be 'stop' or 'skip', got {on_bad_row!r}")
    options = Options(
        topk=topk,
        exclude_seen=exclude_seen,
        filters=filters,
        sequence_col=sequence_col,
        user_col=user_col,
        batch_size=batch_size,
        skip_bad_rows=on_bad_row == "skip",
    )
    workdir = Path(tempfile.mkdtemp(prefix="recbole-bento-spark-"))
    archive, stored = _shipped(model, workdir)
    planner = Planner(store.load(stored, load_weights=False), SETTINGS.max_topk)  # no weights, no model
    check_request_fields(planner, options)
    check_columns(df.columns, planner, options)
    df.sparkSession.sparkContext.addFile(str(archive))
    schema = StructType(df.schema.fields + list(from_arrow_schema(ADDED)))
    return df.mapInArrow(functools.partial(_score_partition, archive.name, options), schema)
