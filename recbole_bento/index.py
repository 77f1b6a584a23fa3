"""Add a retrieval index to a model already in the BentoML model store.

    python -m recbole_bento.index TAG --index ivf|hnsw [--min-recall 0.95] [--histories FILE.jsonl]

A stored model is never changed in place (its files are checked against the sha256 recorded at
import): the model's files and the new index are registered as a NEW VERSION of the same model
name, whose metadata records the index, its parameters and its measured recall. ``name`` (its
latest version) then serves with the index; the version without it stays in the store until
``bentoml models delete``. The recall is measured on the model's query vectors for real
histories: ``--histories`` (one JSON list of external item ids a line, e.g. held-out sessions),
else histories drawn by the model's training popularity. Prints the new tag alone on stdout; on
a refusal, one line on stderr and exit 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

from .progress import StderrProgress

PREFIX = "recbole_bento.index: "
MAX_HISTORIES_BYTES = 64 * 2**20


class IndexCommandError(ValueError):
    """A one-line reason why the index was not added."""


def read_histories(path: Path, item_ids: dict[str, int], window: int, count: int) -> list[list[int]]:
    """The first *count* usable lines of *path* (JSON lists of external item ids) in internal ids,
    unknown items dropped, the most recent *window* kept."""
    if not path.is_file():
        raise IndexCommandError(f"--histories {path}: not a regular file")
    if path.stat().st_size > MAX_HISTORIES_BYTES:
        raise IndexCommandError(f"--histories {path}: larger than {MAX_HISTORIES_BYTES // 2**20} MB")
    histories = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            items = json.loads(line)
        except ValueError:
            raise IndexCommandError(f"--histories {path}: line {number} is not JSON") from None
        if not isinstance(items, list) or not all(isinstance(i, (str, int)) for i in items):
            raise IndexCommandError(f"--histories {path}: line {number} is not a list of item ids")
        known = [item_ids[str(i)] for i in items if str(i) in item_ids][-window:]
        if known:
            histories.append(known)
        if len(histories) == count:
            break
    return histories


def add_index(
    tag: str,
    kind: str,
    min_recall: float,
    histories_path: Path | None = None,
    progress: StderrProgress | None = None,
    max_width: int | None = None,
) -> str:
    """Register TAG's files plus a *kind* index as a new version of its name; its tag."""
    import numpy as np

    from .core import importer, store
    from .core.artifact import file_digests
    from .core.engine import Engine
    from .core.importer import ImportRefused, add_retrieval_index, check_index_options
    from .core.index import RECALL_QUERIES, histories_from_popularity

    progress = progress or importer.Progress()
    check_index_options(kind, min_recall)
    model = store.resolve(tag)
    progress.step(f"checking {model.tag} against its recorded sha256")
    store.verify(model)
    artifact = store.load(model, verified=True)
    if artifact.spec.dot_product is None:
        raise ImportRefused(importer.no_index_reason(artifact.model_name))
    if histories_path is not None:
        item_ids = {token: i for i, token in enumerate(artifact.item_tokens) if i}
        histories = read_histories(histories_path, item_ids, artifact.window, RECALL_QUERIES)
        source = f"{len(histories)} histories from {histories_path.name}"
    else:
        popularity = np.asarray(artifact.popularity)
        histories = histories_from_popularity(popularity, artifact.window, RECALL_QUERIES)
        source = f"{len(histories)} histories drawn by training popularity"
    progress.step(f"building {artifact.model_name} from the stored files")
    engine = Engine(artifact, device="cpu", block_items=0)  # the index measures the exact top-k itself
    with tempfile.TemporaryDirectory(prefix="recbole-bento-index-") as tmp:
        directory = Path(tmp)
        for path in sorted(Path(model.path).iterdir()):
            if path.is_file() and path.name in model.info.metadata.get("files", {}):
                _link_or_copy(path, directory / path.name)
        params = add_retrieval_index(
            engine, directory, kind, histories, min_recall, source, progress, max_width
        )
        metadata = {k: v for k, v in model.info.metadata.items() if k != "format"}
        metadata["files"] = file_digests(directory)
        metadata["retrieval_index"] = params.to_json()
        progress.step("registering the new version in the BentoML model store")
        new = store.register(model.tag.name, directory, metadata, dict(model.info.labels))
    return str(new.tag)


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link where the store and the temporary folder share a file system (no copy of a
    multi-GB table), else a copy. register() copies into the new version either way."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m recbole_bento.index", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("tag", help="the stored model (name or name:version)")
    parser.add_argument("--index", required=True, choices=["ivf", "hnsw"], help="the kind of index")
    parser.add_argument("--min-recall", type=float, default=0.95, help="recall@10 floor (default 0.95)")
    parser.add_argument("--histories", type=Path, help="JSON lines of external item ids to tune on")
    parser.add_argument(
        "--max-probe",
        type=int,
        help="the widest search a query may make: inverted lists (ivf) or efSearch (hnsw); the floor "
        "must be met within it (a latency budget)",
    )
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    args = parser.parse_args(argv)
    logging.disable(logging.INFO)
    warnings.filterwarnings("ignore", category=FutureWarning)

    from .core.artifact import ArtifactError
    from .core.importer import ImportRefused

    show = sys.stderr.isatty() if args.progress is None else args.progress
    progress = StderrProgress(PREFIX, transient=sys.stderr.isatty()) if show else None
    try:
        tag = add_index(args.tag, args.index, args.min_recall, args.histories, progress, args.max_probe)
    except (IndexCommandError, ImportRefused, ArtifactError) as exc:
        reason = str(exc)
    except MemoryError:
        reason = f"{args.tag}: building the index needs more memory than this machine has"
    else:
        if progress:
            progress.clear()
        print(tag)
        return 0
    if progress:
        progress.clear()
    print(PREFIX + " ".join(reason.split()), file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
