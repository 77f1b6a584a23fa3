"""recbole_bento.spark on local[2]: the single-machine command's answers for the same rows."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import batch_rows

from recbole_bento import batch
from recbole_bento.batch.scorer import BatchError
from recbole_bento.core import store

# Executors must run this venv's Python (docs/operations.md); set before the JVM starts.
os.environ["PYSPARK_PYTHON"] = sys.executable

ADDED = ["item_list", "score_list", "unknown_items", "fallback"]


@pytest.fixture(scope="module")
def spark():
    from pyspark.sql import SparkSession

    session = (
        SparkSession.builder.master("local[2]")
        .appName("recbole-bento-test")
        .config("spark.pyspark.python", sys.executable)
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "2")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


@pytest.fixture(scope="module")
def exported(sasrec_tag: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model as a cluster gets it: a `bentoml models export` file."""
    out = tmp_path_factory.mktemp("exported") / "sasrec.bentomodel"
    return Path(store.resolve(sasrec_tag).export(str(out)))


def test_spark_gives_the_batch_commands_answers(spark, exported, sasrec_tag, tmp_path):
    tokens = store.load(store.resolve(sasrec_tag), load_weights=False).item_tokens[1:]
    rows = [{**r, "sequence": list(map(str, r["sequence"]))} for r in batch_rows(list(tokens), 200, seed=1)]
    rows[7]["sequence"] = ["1"] * 20_000  # refused by /recommend (too long): skipped here
    source, target = tmp_path / "in.parquet", tmp_path / "out.parquet"
    pq.write_table(pa.Table.from_pylist(rows), source)
    args = ["--model", sasrec_tag, "--input", source, "--output", target, "--topk", "5"]
    assert batch.main([*map(str, args), "--on-bad-row", "skip", "--no-progress"]) == 0
    want = pq.read_table(target).to_pylist()

    from recbole_bento.spark import recommend

    df = spark.read.parquet(str(source)).repartition(3)
    got = recommend(df, model=str(exported), topk=5, batch_size=16, on_bad_row="skip")
    assert got.columns == list(rows[0]) + ADDED
    got_rows = sorted((r.asDict(recursive=True) for r in got.collect()), key=lambda r: r["row"])
    assert len(got_rows) == len(rows) - 1 == len(want)
    assert any(r["fallback"] == "popular" for r in got_rows)
    for g, w in zip(got_rows, want, strict=True):
        assert {k: g[k] for k in rows[0]} == {k: w[k] for k in rows[0]}  # passthrough
        assert g["item_list"] == w["item_list"] and g["unknown_items"] == w["unknown_items"]
        assert g["score_list"] == pytest.approx(w["score_list"], rel=1e-5, abs=1e-6)
        assert g["fallback"] == w["fallback"]

    # stop (the default): the job fails with the row's reason
    with pytest.raises(Exception, match="List should have at most"):
        recommend(df, model=str(exported)).collect()


def test_spark_checks_on_the_driver(spark, exported):
    df = spark.createDataFrame([("1 2 3",)], ["history"])
    with pytest.raises(BatchError, match="no column 'sequence'"):
        recommend_on(df, exported)
    with pytest.raises(BatchError, match="topk"):
        recommend_on(df, exported, sequence_col="history", topk=0)


def recommend_on(df, exported: Path, **kwargs):
    from recbole_bento.spark import recommend

    return recommend(df, model=str(exported), **kwargs)
