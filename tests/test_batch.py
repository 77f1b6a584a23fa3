"""recbole_bento.batch: /recommend's answers for every row of a file, in all three formats."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ROOT, assert_same_topk, batch_rows, import_ok, recbole_reference

from recbole_bento import batch
from recbole_bento.batch.scorer import Scorer
from recbole_bento.core import store

ADDED = ["item_list", "score_list", "unknown_items", "fallback"]
N_ROWS = 300


def write_input(path: Path, rows: list[dict]) -> None:
    """*rows* as a client would store them: CSV sequences space-separated, Parquet ids as strings."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".csv":
        with path.open("w", newline="") as out:
            writer = csv.DictWriter(out, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows({**r, "sequence": " ".join(map(str, r["sequence"]))} for r in rows)
    else:
        pq.write_table(
            pa.Table.from_pylist([{**r, "sequence": list(map(str, r["sequence"]))} for r in rows]), path
        )


def read_output(path: Path) -> list[dict]:
    """The output rows, the answer columns decoded back to /recommend's types."""
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row["item_list"] = row["item_list"].split()
        row["score_list"] = [float(s) for s in row["score_list"].split()]
        row["unknown_items"] = row["unknown_items"].split()
        row["fallback"] = row["fallback"] or None
    return rows


def answers_of(row: dict) -> dict:
    return {k: row[k] for k in ADDED}


def same_answer(got: dict, want: dict) -> None:
    assert got["item_list"] == want["item_list"]
    assert got["score_list"] == pytest.approx(want["score_list"], rel=1e-5, abs=1e-6)
    assert got["unknown_items"] == want["unknown_items"]
    assert got["fallback"] == want["fallback"]


def run_batch(*args: object) -> int:
    return batch.main([*map(str, args), "--no-progress"])


@pytest.fixture(scope="module")
def rows(sasrec_tag: str) -> list[dict]:
    tokens = store.load(store.resolve(sasrec_tag), load_weights=False).item_tokens[1:]
    return batch_rows(list(tokens), N_ROWS)


@pytest.fixture(scope="module")
def http_answers(sasrec_server: str, rows: list[dict]):
    """answers(topk, exclude_seen) -> /recommend's answer per row, through /recommend_batch."""
    cache: dict[tuple, list[dict]] = {}

    def answers(topk: int, exclude_seen: bool) -> list[dict]:
        if (topk, exclude_seen) not in cache:
            out = []
            for start in range(0, len(rows), 150):
                body = [
                    {"sequence": r["sequence"], "topk": topk, "exclude_seen": exclude_seen}
                    for r in rows[start : start + 150]
                ]
                response = httpx.post(
                    f"{sasrec_server}/recommend_batch", json={"requests": body}, timeout=120
                )
                assert response.status_code == 200, response.text
                out.extend(response.json()["results"])
            cache[topk, exclude_seen] = out
        return cache[topk, exclude_seen]

    return answers


@pytest.mark.parametrize(
    ("fmt", "out_fmt", "flags"),
    [
        (".jsonl", ".jsonl", []),
        (".csv", ".csv", ["--topk", "5", "--exclude-seen"]),
        (".parquet", ".parquet", ["--batch-size", "7"]),
        (".csv", ".parquet", []),
    ],
)
def test_rows_get_the_http_answers(tmp_path, sasrec_tag, rows, http_answers, fmt, out_fmt, flags):
    source, target = tmp_path / f"in{fmt}", tmp_path / f"out{out_fmt}"
    write_input(source, rows)
    assert run_batch("--model", sasrec_tag, "--input", source, "--output", target, *flags) == 0
    got = read_output(target)
    topk = int(flags[flags.index("--topk") + 1]) if "--topk" in flags else 10
    want = http_answers(topk, "--exclude-seen" in flags)
    assert len(got) == len(rows)
    assert sum(w["fallback"] == "popular" for w in want) == N_ROWS // 10
    assert any(w["unknown_items"] and not w["fallback"] for w in want)
    as_written = read_back_input(source)
    for out_row, in_row, answer in zip(got, as_written, want, strict=True):
        assert list(out_row) == list(in_row) + ADDED  # every input column, in input order
        assert {k: out_row[k] for k in in_row} == in_row  # unchanged
        same_answer(answers_of(out_row), answer)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def read_back_input(path: Path) -> list[dict]:
    if path.suffix == ".csv":
        with path.open(newline="") as handle:
            return list(csv.DictReader(handle))
    return read_output(path)


def test_user_model_matches_recbole(tmp_path, train_tiny):
    """A model that ranks with the user's embedding (Caser): the user column is read, and the
    answers are RecBole's own (case_study.full_sort_scores) for the test users."""
    caser = train_tiny("Caser", nh=4, nv=2)
    tag = import_ok(caser.checkpoint, "--dataset-pickle", caser.dataset_pickle, "--name", "caser-batch")
    refs = recbole_reference(caser, k=10, max_users=20)
    inputs = [{"uid": r["body"]["user_id"], "sequence": r["body"]["sequence"]} for r in refs]
    inputs.append({"uid": "no-such-user", "sequence": refs[0]["body"]["sequence"]})  # unknown user
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(source, inputs)
    assert run_batch("--model", tag, "--input", source, "--output", target, "--user-col", "uid") == 0
    got = read_output(target)
    for out_row, ref in zip(got, refs, strict=False):
        assert out_row["fallback"] is None
        assert_same_topk(out_row, ref)
    assert got[-1]["fallback"] == "popular"

    # without the user column the run stops before reading a row; a row without a user is a bad row
    assert run_batch("--model", tag, "--input", source, "--output", target.with_suffix(".csv")) == 1
    csv_in = tmp_path / "in.csv"
    write_input(csv_in, inputs)
    assert run_batch("--model", tag, "--input", csv_in, "--output", tmp_path / "x.csv") == 1
    source.write_text(json.dumps({"sequence": ["1"]}) + "\n")
    assert run_batch("--model", tag, "--input", source, "--output", tmp_path / "y.jsonl") == 1


def test_bad_rows_skip_or_stop(tmp_path, sasrec_tag, rows, http_answers, capsys):
    good = [json.dumps(r) for r in rows[:40]]
    lines = (
        good[:5]
        + [
            json.dumps({"row": "a", "sequence": "1 2 3"}),  # not a list (in JSON lines)
            json.dumps({"row": "b"}),  # no sequence
            "{not json",
            json.dumps({"row": "c", "sequence": [1.5]}),  # wrong id type
            json.dumps([1, 2]),  # not an object
        ]
        + good[5:]
    )
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(lines) + "\n")
    target = tmp_path / "out.jsonl"
    assert (
        run_batch("--model", sasrec_tag, "--input", source, "--output", target, "--on-bad-row", "skip") == 0
    )
    err = capsys.readouterr().err
    for number in (6, 7, 8, 9, 10):
        assert f"skipped row {number}:" in err
    assert "5 bad rows skipped" in err
    got = read_output(target)
    assert [r["row"] for r in got] == [r["row"] for r in rows[:40]]
    for out_row, answer in zip(got, http_answers(10, False)[:40], strict=True):
        same_answer(answers_of(out_row), answer)

    target.unlink()
    assert run_batch("--model", sasrec_tag, "--input", source, "--output", target) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("recbole-bento-batch: row 6: sequence: ")
    assert not target.exists() and not list(tmp_path.glob(".*.tmp"))


def test_a_failure_midway_leaves_no_output(tmp_path, sasrec_tag, rows, capsys):
    """A bad row after several written chunks: nothing at OUT, and no temporary file left."""
    source, target = tmp_path / "in.parquet", tmp_path / "out.parquet"
    many = [{**r, "sequence": list(map(str, r["sequence"]))} for r in rows] * 20
    many.append({"row": -1, "name": "x", "sequence": ["1"] * 20_000, "weight": 0.0})  # too long
    pq.write_table(pa.Table.from_pylist(many), source, row_group_size=1000)
    assert run_batch("--model", sasrec_tag, "--input", source, "--output", target, "--batch-size", "8") == 1
    assert f"row {len(many)}: sequence: List should have at most" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [source]


def start_batch(tag: str, source: Path, target: Path, *extra: str) -> subprocess.Popen:
    """The command as a user runs it, in its own process, in small batches (a run long enough to
    be stopped midway); stderr kept for the assertions."""
    return subprocess.Popen(
        [sys.executable, "-m", "recbole_bento.batch", "--model", tag, "--input", str(source)]
        + ["--output", str(target), "--batch-size", "4", *extra],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_killed_run_leaves_no_output(tmp_path, sasrec_tag, rows):
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(source, rows * 200)
    proc = start_batch(sasrec_tag, source, target)
    deadline = time.monotonic() + 120
    while not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp") and p.stat().st_size]:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not target.exists()
    assert all(p.name.startswith(".out.jsonl.") for p in tmp_path.iterdir() if p != source)


def test_a_dead_reading_process_stops_the_run(tmp_path, sasrec_tag, rows, capsys, monkeypatch):
    """The forked process that reads and writes dies mid-run: one line, exit 1, no output."""
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(source, rows * 10)
    finish = Scorer.finish
    parent = os.getpid()

    def dies_in_the_child(self, pending):
        if os.getpid() != parent:
            os._exit(3)
        return finish(self, pending)

    monkeypatch.setattr(Scorer, "finish", dies_in_the_child)
    assert run_batch("--model", sasrec_tag, "--input", source, "--output", target) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["recbole-bento-batch: the batch's reading process stopped unexpectedly; no output written"]
    assert list(tmp_path.iterdir()) == [source]


def test_sigterm_stops_both_processes(tmp_path, sasrec_tag, rows):
    """SIGTERM to the command: exit 1 with one line, no output, and its forked process gone too."""
    import psutil

    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(source, rows * 200)
    proc = start_batch(sasrec_tag, source, target, "--no-progress")
    deadline = time.monotonic() + 120
    while not psutil.Process(proc.pid).children():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.1)
    child = psutil.Process(proc.pid).children()[0]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert err.strip().splitlines() == ["recbole-bento-batch: interrupted; no output written"]
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    assert list(tmp_path.iterdir()) == [source]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--model": "no-such-model"}, "no model 'no-such-model' in the BentoML model store"),
        ({"--input": "{tmp}/missing.jsonl"}, "missing.jsonl: no such file"),
        ({"--output": "{tmp}/out.txt"}, "the format is chosen by extension"),
        ({"--output": "{tmp}/nowhere/out.jsonl"}, "no such folder for the output"),
        ({"--sequence-col": "history"}, "no column 'history' in the input"),
        ({"--topk": "0"}, "topk: Input should be greater than or equal to 1"),
        ({"--topk": "100000"}, "topk: Input should be less than or equal to"),
        ({"--input": "{tmp}/broken.parquet"}, "broken.parquet"),
        ({"--filters": '{"class": ["Comedy"]}'}, "filters: this model has no filterable item attributes"),
        ({"--filters": '["Comedy"]'}, "filters"),
    ],
)
def test_one_line_errors(tmp_path, sasrec_tag, rows, capsys, change, message):
    source = tmp_path / "in.csv"
    write_input(source, rows[:3])
    (tmp_path / "broken.parquet").write_text("not parquet")
    args = {"--model": sasrec_tag, "--input": str(source), "--output": str(tmp_path / "out.csv")}
    args.update({flag: value.replace("{tmp}", str(tmp_path)) for flag, value in change.items()})
    assert run_batch(*[a for pair in args.items() for a in pair]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("recbole-bento-batch: ") and message in err[0], err
    assert not (tmp_path / "out.csv").exists()


def test_console_command_and_exported_model(tmp_path, sasrec_tag, rows, http_answers):
    """The installed entry point, on a model file written by `bentoml models export`."""
    exported = Path(store.resolve(sasrec_tag).export(str(tmp_path / "model.bentomodel")))
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(source, rows[:20])
    done = subprocess.run(
        [sys.executable, "-m", "recbole_bento.batch", "--model", exported, "--input", source]
        + ["--output", target],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "rows/s" in done.stderr  # the progress bar
    for out_row, answer in zip(read_output(target), http_answers(10, False), strict=False):
        same_answer(answers_of(out_row), answer)
    missing = subprocess.run(
        [sys.executable, "-m", "recbole_bento.batch", "--model", tmp_path / "nope.bentomodel"]
        + ["--input", source, "--output", target],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().splitlines() == [
        f"recbole-bento-batch: {tmp_path / 'nope.bentomodel'}: no such model file"
    ]


def test_console_script_points_at_main():
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, name = scripts["recbole-bento-batch"].partition(":")
    assert module == "recbole_bento.batch" and getattr(batch, name) is batch.main
