"""``recbole-bento-batch`` / ``python -m recbole_bento.batch``: arguments, the model, the run, and
every refusal as one line on stderr with exit status 1."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

from ..core import store
from ..core.artifact import ArtifactError
from ..settings import SETTINGS
from .files import FILE_ERRORS, FORMATS
from .pipeline import score_file
from .scorer import BatchError, Options, Scorer


class Interrupted(Exception):
    """SIGTERM or Ctrl-C: stop, remove the partial output."""


def _interrupt(_signum: int, _frame: Any) -> None:
    raise Interrupted


def load_model(model: str, home: Path) -> Any:
    """A model store tag, or a file written by `bentoml models export` (imported into *home*)."""
    if Path(model).is_file() or os.sep in model:
        return store.import_archive(Path(model), home)
    return store.resolve(model)


def _check_paths(source: Path, target: Path) -> None:
    for path in (source, target):
        if path.suffix not in FORMATS:
            raise BatchError(f"{path}: the format is chosen by extension: {', '.join(FORMATS)}")
    if not source.is_file():
        raise BatchError(f"{source}: no such file")
    if not target.parent.is_dir():
        raise BatchError(f"{target.parent}: no such folder for the output")
    if source.resolve() == target.resolve():
        raise BatchError("--output must not be the input file")


def run(args: argparse.Namespace, progress: bool = True) -> tuple[int, int]:
    """Score args.input into args.output; returns (rows written, bad rows skipped)."""
    source, target = Path(args.input), Path(args.output)
    _check_paths(source, target)
    options = Options(
        topk=args.topk,
        exclude_seen=args.exclude_seen,
        filters=args.filters,
        sequence_col=args.sequence_col,
        user_col=args.user_col,
        batch_size=args.batch_size,
        skip_bad_rows=args.on_bad_row == "skip",
    )
    if SETTINGS.torch_threads:
        import torch

        torch.set_num_threads(SETTINGS.torch_threads)
    with tempfile.TemporaryDirectory(prefix="recbole-bento-batch-") as home:
        scorer = Scorer(load_model(args.model, Path(home)), options)
    return score_file(scorer, source, target, progress)


def _filters(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc.msg}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="recbole-bento-batch", description="/recommend's answer for every row of a file, without HTTP."
    )
    parser.add_argument("--model", required=True, help="model store tag, or a `bentoml models export` file")
    parser.add_argument("--input", required=True, help="rows to score: .jsonl, .csv or .parquet")
    parser.add_argument("--output", required=True, help="where the answers go: .jsonl, .csv or .parquet")
    parser.add_argument("--topk", type=int, default=10)
    parser.add_argument("--exclude-seen", action="store_true", help="drop each history's items")
    parser.add_argument("--filters", type=_filters, help="the request's filters field, as JSON")
    parser.add_argument(
        "--sequence-col", default="sequence", help="the history column (CSV: space-separated)"
    )
    parser.add_argument("--user-col", default="user_id", help="the user column, for models that need one")
    parser.add_argument("--on-bad-row", choices=["skip", "stop"], default="stop")
    parser.add_argument("--batch-size", type=int, default=SETTINGS.max_batch_size, help="rows per model call")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    warnings.filterwarnings("ignore", category=FutureWarning)  # RecBole 1.2.1 vs pandas 2.x
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        written, skipped = run(args, progress=not args.no_progress)
    except (BatchError, ArtifactError, *FILE_ERRORS) as exc:
        print("recbole-bento-batch: " + " ".join(str(exc).split()), file=sys.stderr)
        return 1
    except Interrupted:
        print("recbole-bento-batch: interrupted; no output written", file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    note = f", {skipped} bad rows skipped" if skipped else ""
    print(f"recbole-bento-batch: {written} rows written to {args.output}{note}", file=sys.stderr)
    return 0
