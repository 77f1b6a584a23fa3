"""Progress on stderr for the command-line tools (import_model.py, ``python -m recbole_bento.index``)."""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
from collections.abc import Callable, Iterator


class StderrProgress:
    """Each step as a line on stderr with the seconds the previous one took, and a tqdm bar for the
    long ones. On a terminal the lines are transient (rewritten in place, cleared at the end), so a
    refusal still leaves exactly one line; elsewhere (--progress into a log) they stay."""

    def __init__(self, prefix: str, transient: bool) -> None:
        self.prefix = prefix
        self.transient = transient
        self.started = self.step_started = time.perf_counter()

    def step(self, text: str) -> None:
        now = time.perf_counter()
        line = f"{self.prefix}[{now - self.started:6.1f}s] {text} ..."
        self.step_started = now
        if self.transient:
            sys.stderr.write("\r\x1b[K" + line[: shutil.get_terminal_size().columns - 1])
            sys.stderr.flush()
        else:
            print(line, file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def bar(self, total: int, unit: str) -> Iterator[Callable[[int], None]]:
        from tqdm import tqdm

        if self.transient:
            sys.stderr.write("\n")
        with tqdm(
            total=total, unit=unit, unit_scale=unit == "B", leave=not self.transient, file=sys.stderr
        ) as bar:
            yield bar.update
        if self.transient:
            sys.stderr.write("\x1b[1A")  # back onto the step line, which the next step rewrites

    def clear(self) -> None:
        if self.transient:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
