"""Register a RecBole checkpoint in the BentoML model store.

    python import_model.py CHECKPOINT.pth --dataset-pickle DATASET.pkl [--name NAME] [--label KEY=VALUE ...]
    python import_model.py CHECKPOINT.pth --data-path DIR            [--name NAME] [--label KEY=VALUE ...]

Prints the new model tag alone as the last line of stdout, after one summary line on stderr. On a
terminal (or with --progress) each step is shown on stderr as it runs. On bad input: exit 1 and a
one-line reason on stderr, nothing registered.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

from recbole_bento.progress import StderrProgress

PREFIX = "import_model: "


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a .pth file as RecBole's Trainer saves it")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset-pickle", type=Path, help="the RecBole Dataset, (cloud)pickled")
    source.add_argument("--data-path", type=Path, help="folder holding <dataset>/<dataset>.inter")
    parser.add_argument("--name", help="model name (default: <model>-<dataset>, lower-cased)")
    parser.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--skip-vocabulary-check",
        action="store_true",
        help="do not recompute the checkpoint's validation score on the dataset (needed for a model "
        "that was never validated, e.g. untrained); a dataset whose item ids are numbered "
        "differently then imports and serves wrong answers",
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show each step on stderr (default: only when stderr is a terminal)",
    )
    parser.add_argument(
        "--item-features",
        type=Path,
        metavar="FILE.item",
        help="a RecBole atomic item file whose token, token_seq and float columns become filterable "
        "attributes (default: the item features the dataset loaded, if any)",
    )
    parser.add_argument(
        "--index",
        choices=["ivf", "hnsw"],
        help="also build an approximate retrieval index over the item table (needs the extra: "
        "pip install 'recbole-bento[index]'; dot-product models only): next-item queries then rank "
        "its candidates exactly instead of the whole catalogue (docs/operations.md)",
    )
    parser.add_argument(
        "--min-recall",
        type=float,
        default=0.95,
        help="with --index: the recall@10 against the exact top-10, on the validation histories, "
        "that the index must reach; its search width is tuned to it, and the import refused below it",
    )
    parser.add_argument(
        "--trust-pickles",
        action="store_true",
        help="DANGEROUS: load the checkpoint and dataset pickle with plain pickle, which runs any "
        "code they carry. Only for files you produced yourself and that the allowlist refuses.",
    )
    args = parser.parse_args(argv)
    logging.disable(logging.INFO)  # RecBole logs dataset statistics at INFO; keep stdout clean
    warnings.filterwarnings("ignore", category=FutureWarning)  # RecBole 1.2.1 vs pandas 2.x

    from recbole_bento.core.artifact import ArtifactError
    from recbole_bento.core.importer import ImportRefused, import_checkpoint, parse_labels
    from recbole_bento.core.index import IndexParams
    from recbole_bento.core.models import UnsupportedModelError
    from recbole_bento.core.store import stored_size

    show = sys.stderr.isatty() if args.progress is None else args.progress
    progress = StderrProgress(PREFIX, transient=sys.stderr.isatty()) if show else None
    if args.trust_pickles:
        print("WARNING: --trust-pickles: unpickling without the allowlist", file=sys.stderr)
    try:
        model = import_checkpoint(
            args.checkpoint,
            dataset_pickle=args.dataset_pickle,
            data_path=args.data_path,
            name=args.name,
            labels=parse_labels(args.label),
            trust_pickles=args.trust_pickles,
            skip_vocabulary_check=args.skip_vocabulary_check,
            progress=progress,
            item_features=args.item_features,
            retrieval_index=args.index,
            min_recall=args.min_recall,
        )
    except (ImportRefused, ArtifactError, UnsupportedModelError) as exc:
        reason = str(exc)
    except RecursionError:
        reason = f"{args.checkpoint}: the inputs nest too deeply to be read (RecursionError)"
    except MemoryError:
        reason = f"{args.checkpoint}: the inputs need more memory than this machine has (MemoryError)"
    else:
        if progress:
            progress.clear()
        meta = model.info.metadata
        print(
            f"{PREFIX}imported {meta['recbole_model']} ({meta['dataset']}): {meta['item_count']:,} items, "
            f"{meta['user_count']:,} users, {stored_size(model) / 2**20:.1f} MB in the model store"
            + (
                f"; retrieval index {IndexParams.from_json(meta['retrieval_index']).describe()}"
                if args.index
                else ""
            ),
            file=sys.stderr,
        )
        print(model.tag)
        return 0
    if progress:
        progress.clear()
    print(PREFIX + " ".join(reason.split()), file=sys.stderr)  # one line
    return 1


if __name__ == "__main__":
    sys.exit(main())
