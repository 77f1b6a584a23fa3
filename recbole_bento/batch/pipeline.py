"""The batch command's two processes (``_pipeline``): this one ranks, a child forked from it reads,
validates, maps, decodes and writes; ``score_file`` runs them on one file and renames the output
into place when complete."""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
import queue
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from .files import FILE_ERRORS, Reader, Writer
from .scorer import BatchError, Pending, Scorer, check_columns

MAX_REPORTED = 20  # bad rows named one by one on stderr; the rest are counted


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
