"""The benchmark harness's own pieces (bench/). No timings. (The BentoML patches: test_compat.py.)"""

from __future__ import annotations

import sys

from conftest import ROOT

from devtools.metrics import batch_counts

sys.path.insert(0, str(ROOT / "bench"))

import loadgen  # noqa: E402
import make_large_fixture  # noqa: E402


def test_percentile_is_nearest_rank() -> None:
    values = list(range(1, 101))
    assert loadgen.percentile(values, 50) == 50
    assert loadgen.percentile(values, 99) == 99
    assert loadgen.percentile([7.0], 99) == 7.0
    assert loadgen.percentile([], 50) != loadgen.percentile([], 50)  # NaN


def test_batch_counts_sum_the_model_call_histogram_over_label_sets() -> None:
    text = "\n".join(
        [
            "# TYPE recbole_bento_batch_size histogram",
            'recbole_bento_batch_size_sum{model_tag="a:1"} 30.0',
            'recbole_bento_batch_size_count{model_tag="a:1"} 3.0',
            'recbole_bento_batch_size_sum{model_tag="b:2"} 10.0',
            'recbole_bento_batch_size_count{model_tag="b:2"} 2.0',
            'recbole_bento_batch_size_bucket{le="1.0",model_tag="a:1"} 0.0',
            'bentoml_service_adaptive_batch_size_sum{method_name="rank",worker_index="1"} 99.0',
            "recbole_bento_rank_seconds_count 7.0",
        ]
    )
    assert batch_counts(text) == (5.0, 40.0)


def test_load_generator_parses_whole_http_responses_only() -> None:
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
    fixed = head + b"Content-Length: 13\r\n\r\n" + b'{"item_list":[]}'[:13]
    assert loadgen._parse_response(bytearray(fixed)) == (200, b'{"item_list":', len(fixed))
    assert loadgen._parse_response(bytearray(fixed[:-1])) is None
    chunked = head + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=y\r\n world\r\n0\r\n\r\n"
    assert loadgen._parse_response(bytearray(chunked + b"HTTP/1.1 ...")) == (
        200,
        b"hello world",
        len(chunked),
    )
    for cut in (len(head) + 10, len(chunked) - 3, len(chunked) - 1):
        assert loadgen._parse_response(bytearray(chunked[:cut])) is None, cut
    refused = b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 1\r\ncontent-length: 2\r\n\r\n{}"
    assert loadgen._parse_response(bytearray(refused)) == (429, b"{}", len(refused))


def test_fixture_atomic_file_sees_every_item(tmp_path) -> None:
    path = tmp_path / "synth" / "synth.inter"
    n_inter = make_large_fixture.write_atomic(path, 1000, seed=0)
    lines = path.read_text().splitlines()
    assert lines[0] == "user_id:token\titem_id:token\ttimestamp:float"
    rows = [line.split("\t") for line in lines[1:]]
    assert len(rows) == n_inter >= 1000
    assert {item for _, item, _ in rows} == {f"i{i}" for i in range(1000)}
    assert make_large_fixture.catalogue_name(1_000_000) == "synth-1m"
    assert make_large_fixture.catalogue_name(100_000) == "synth-100k"
