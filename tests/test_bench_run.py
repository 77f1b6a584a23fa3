"""bench/run.py's own arithmetic: wrk's result line, parity, best of rounds, the targets. No servers,
no timings."""

from __future__ import annotations

import sys

import pytest
from conftest import ROOT

from recbole_bento.edge import topology
from recbole_bento.settings import Settings

sys.path.insert(0, str(ROOT / "bench"))

import run  # noqa: E402


def test_wrk_result_is_the_last_json_line() -> None:
    out = 'Running 1s test\n  1 threads\n{"requests": 1}\nRequests/sec: 5\n{"requests": 7, "non2xx": 2}\n'
    assert run.parse_wrk(out) == {"requests": 7, "non2xx": 2}


def test_rps_counts_only_answers_without_errors() -> None:
    result = run.WrkResult(requests=110, errors=10, duration_s=2.0, p50_ms=1, p99_ms=2, generator_cpu_s=0.1)
    assert result.rps == 50.0


def test_parity_tells_order_from_items() -> None:
    service = [["a", "b"], ["a", "b"], ["a", "b"]]
    peer = [["a", "b"], ["b", "a"], ["a", "c"]]
    assert run.parity(service, peer) == {"n": 3, "same_order": 1, "same_items": 2, "differ": [2]}


def _phase(rps: float, p50: float, p99: float, errors: int = 0) -> run.Phase:
    result = run.WrkResult(int(rps) + errors, errors, 1.0, p50, p99, 0.01)
    return run.Phase(
        "ml-100k", "recipe", "service", 32, 0, result, cpu_s=1.0, batch_calls=2, batch_histories=10
    )


def test_best_of_rounds_takes_each_figure_at_its_best_and_sums_errors() -> None:
    out = run.best([_phase(100, 5, 50, errors=1), _phase(80, 4, 60)])
    assert (out["rps"], out["p50_ms"], out["p99_ms"], out["errors"]) == (100, 4, 50, 1)
    assert out["mean_batch"] == 5


def test_targets_compare_within_a_pairing_and_against_the_best_peer() -> None:
    def pair(s_rps: float, p_rps: float, s_p99: float, p_p99: float) -> dict:
        return {
            "service": {"rps": s_rps, "p50_ms": 1.0, "p99_ms": s_p99},
            "peer": {"rps": p_rps, "p50_ms": 1.0, "p99_ms": p_p99},
            "rps_ratio": s_rps / p_rps,
            "p99_ratio": s_p99 / p_p99,
        }

    report = {
        "results": {
            "ml-100k": {"32": {"recipe": pair(130, 100, 10, 20), "litserve": pair(110, 100, 10, 20)}}
        },
        "served_vs_ceiling": {},
        "concurrencies": [1, 32],
        "soak_s": 60,
        "phases": [{"catalogue": "ml-100k", "concurrency": 32, "side": "service", "errors": 0}],
    }
    got = {t["target"].split(",")[0]: (t["measured"], t["met"]) for t in run.targets(report)}
    assert got["ml-100k c=32 req/s"] == (1.1, False)  # LitServe's pairing decides
    assert got["ml-100k c=32 p99"] == (0.5, True)
    assert got["ml-100k c=32 for 60 s: service errors"] == (0, True)


def test_ceiling_layout_is_read_from_the_services_own_log_line() -> None:
    """The ceiling runs in the layout the service logged: its line (topology.Layout.describe), as
    written, for both topologies; a log without it stops the run."""
    gib = 2**30
    inprocess = topology.choose(Settings(), "cpu", 2, gib, 24 * gib)
    split = topology.choose(Settings(), "cpu", 16, gib, 24 * gib)
    log = f"2026-11-28 INFO [recbole_bento] loaded sasrec:v1 on cpu; {inprocess.describe()}\n"
    assert run.served_layout(log) == {"topology": "inprocess", "processes": 2, "threads": 1}
    expected = {"topology": "split", "processes": 2, "threads": 8}
    assert run.served_layout("...; " + split.describe()) == expected
    with pytest.raises(SystemExit, match="no 'topology ...' line"):
        run.served_layout("loaded sasrec:v1 on cpu\n")
