"""Reading the service's own metrics back from a ``/metrics`` text (tests and the benchmark)."""

from __future__ import annotations

PREFIX = "recbole_bento"


def batch_counts(metrics_text: str) -> tuple[float, float]:
    """(model calls, histories ranked) from the ``recbole_bento_batch_size`` histogram in a
    ``/metrics`` text, summed over every label set (model tags, workers)."""
    histogram = f"{PREFIX}_batch_size"
    calls = histories = 0.0
    for line in metrics_text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name == histogram + "_count":
            calls += float(line.rsplit(" ", 1)[1])
        elif name == histogram + "_sum":
            histories += float(line.rsplit(" ", 1)[1])
    return calls, histories
