"""The batch scorer against the engine's in-process ceiling, on the same rows, in one process.

    BENTOML_HOME=bench/.work/bentoml python bench/batch_throughput.py sasrec-ml-100k --rows 50000

Writes ``--rows`` random full-window histories (item ids from the model's catalogue) to a JSON-lines
file (and ``--format parquet``/``csv`` if asked), then alternately, ``--rounds`` times:
  - ``engine``: ``Engine.rank`` over the rows' queries in batches of ``--batch`` (what
    bench/ceiling.py's ``engine`` column times, here sustained over the whole input, not best-of);
  - ``batch``: ``recbole_bento.batch.pipeline.score_file`` on the file (read, validate, map, rank, decode,
    write), with the model already loaded.
Prints one JSON line per round and the median and best ratios batch/engine (rounds alternate,
so both see the same machine). ``--peak-rss`` instead runs the
command once in a child process and reports rows/s, the peak RSS of its largest process
(``ru_maxrss``) and the peak PSS of its processes together (sampled every 0.25 s); ``--spark``
times ``recbole_bento.spark.recommend`` on local[2] over the same rows as Parquet.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_input(path: Path, tokens: list[str], rows: int, window: int, seed: int = 0) -> None:
    """*rows* JSON lines ``{"row": i, "sequence": [...]}`` (or the same rows as Parquet / CSV)."""
    rng = random.Random(seed)
    if path.suffix == ".jsonl":
        with path.open("w") as out:
            for i in range(rows):
                out.write(json.dumps({"row": i, "sequence": rng.choices(tokens, k=window)}) + "\n")
        return
    import pyarrow as pa

    chunk = 100_000
    writer = None
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        seqs = [rng.choices(tokens, k=window) for _ in range(n)]
        if path.suffix == ".csv":
            with path.open("a" if start else "w") as out:
                out.write("" if start else "row,sequence\n")
                out.writelines(f"{start + i},{' '.join(s)}\n" for i, s in enumerate(seqs))
            continue
        import pyarrow.parquet as pq

        table = pa.table({"row": pa.array(range(start, start + n)), "sequence": seqs})
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    if writer is not None:
        writer.close()


def _pss(pid: int) -> int:
    """Bytes of memory the command and its forked process hold together (proportional set size:
    pages they share, such as the model's, counted once); 0 once it is gone."""
    import psutil

    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
        return sum(p.memory_full_info().pss for p in procs)
    except psutil.Error:
        return 0


def spark_rate(stored, source: Path, tokens: list[str], args: argparse.Namespace, load: float) -> None:
    """Rows/s of ``recommend`` on local[2] (two task slots, one torch thread each), model already
    loaded in the workers by a warm-up job."""
    from pyspark.sql import SparkSession

    from recbole_bento.spark import recommend

    os.environ["PYSPARK_PYTHON"] = sys.executable
    os.environ["RECBOLE_BENTO_TORCH_THREADS"] = "1"
    make_input(source, tokens, args.rows, stored.info.metadata["max_history_length"])
    spark = SparkSession.builder.master("local[2]").config("spark.ui.enabled", "false").getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    exported = stored.export(str(source.parent / "model.bentomodel"))
    df = spark.read.parquet(str(source)).repartition(2).cache()
    df.count()
    recommend(df.limit(100).repartition(2), model=exported).write.mode("overwrite").parquet(
        str(source.parent / "warm")
    )
    start = time.perf_counter()
    recommend(df, model=exported, batch_size=args.batch).write.mode("overwrite").parquet(
        str(source.parent / "o")
    )
    wall = time.perf_counter() - start
    print(
        json.dumps(
            {
                "spark": "local[2]",
                "rows": args.rows,
                "rows_s": round(args.rows / wall),
                "rows_s_per_core": round(args.rows / wall / 2),
                "load1": load,
            }
        )
    )
    spark.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tag")
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--format", default="jsonl", choices=["jsonl", "csv", "parquet"])
    parser.add_argument("--peak-rss", action="store_true", help="one CLI run in a child: peak RSS, rows/s")
    parser.add_argument("--spark", action="store_true", help="recbole_bento.spark.recommend on local[2]")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import torch

    from recbole_bento.batch.files import Reader
    from recbole_bento.batch.pipeline import score_file
    from recbole_bento.batch.scorer import Options, Scorer
    from recbole_bento.core import store

    torch.set_num_threads(args.threads)
    stored = store.resolve(args.tag)
    scorer = Scorer(stored, Options(batch_size=args.batch))
    loaded_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the model, loaded: per worker
    tokens = scorer.planner.item_tokens[1:]
    work = Path(tempfile.mkdtemp(prefix="batch-bench-"))
    source = work / f"in.{args.format}"
    make_input(source, tokens, args.rows, scorer.engine.artifact.window)
    load = os.getloadavg()[0]
    if args.spark:
        spark_rate(stored, source.with_suffix(".parquet"), tokens, args, load)
        return
    if args.peak_rss:
        env = {**os.environ, "RECBOLE_BENTO_TORCH_THREADS": str(args.threads)}
        cmd = [sys.executable, "-m", "recbole_bento.batch", "--model", str(stored.tag)]
        cmd += ["--input", str(source), "--output", str(work / f"out.{args.format}"), "--no-progress"]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT)
        peak_pss = 0
        while proc.poll() is None:
            peak_pss = max(peak_pss, _pss(proc.pid))
            time.sleep(0.25)
        if proc.returncode:
            raise SystemExit(f"the batch command failed ({proc.returncode})")
        wall = time.perf_counter() - start
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(
            json.dumps(
                {
                    "rows": args.rows,
                    "format": args.format,
                    "wall_s": round(wall, 1),
                    "rows_s_incl_start": round(args.rows / wall),
                    "peak_rss_mb_largest_process": round(peak_mb),
                    "peak_pss_mb_all_processes": round(peak_pss / 2**20),
                    "load1": load,
                }
            )
        )
        return
    queries = [p.query for c in Reader(source, 100_000) for p in scorer.plan(c).plans]
    ratios = []
    for rnd in range(args.rounds):
        start = time.perf_counter()
        for i in range(0, len(queries), args.batch):
            scorer.engine.rank(queries[i : i + args.batch])
        engine_s = len(queries) / (time.perf_counter() - start)
        start = time.perf_counter()
        score_file(scorer, source, work / f"out.{args.format}", progress=False)
        batch_s = args.rows / (time.perf_counter() - start)
        ratios.append(batch_s / engine_s)
        print(
            json.dumps(
                {
                    "round": rnd,
                    "model": args.tag,
                    "items": len(tokens),
                    "batch": args.batch,
                    "threads": args.threads,
                    "format": args.format,
                    "engine_rows_s": round(engine_s),
                    "batch_rows_s": round(batch_s),
                    "ratio": round(ratios[-1], 3),
                    "load1": round(os.getloadavg()[0], 2),
                }
            ),
            flush=True,
        )
    print(
        json.dumps(
            {
                "median_ratio": round(statistics.median(ratios), 3),
                "best_ratio": round(max(ratios), 3),
                "loaded_rss_mb": round(loaded_mb),
                "load1_at_start": load,
            }
        )
    )


if __name__ == "__main__":
    main()
