"""Register a RecBole checkpoint in the BentoML model store.

    python import_model.py CHECKPOINT.pth --dataset-pickle DATASET.pkl [--name NAME] [--label KEY=VALUE ...]
    python import_model.py CHECKPOINT.pth --data-path DIR            [--name NAME] [--label KEY=VALUE ...]

Prints the new model tag alone as the last line of stdout. On bad input: exit 1 and a one-line
reason on stderr, nothing registered.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a .pth file as RecBole's Trainer saves it")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset-pickle", type=Path, help="the RecBole Dataset, (cloud)pickled")
    source.add_argument("--data-path", type=Path, help="folder holding <dataset>/<dataset>.inter")
    parser.add_argument("--name", help="model name (default: <model>-<dataset>, lower-cased)")
    parser.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
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
    from recbole_bento.core.models import UnsupportedModelError

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
        )
    except (ImportRefused, ArtifactError, UnsupportedModelError) as exc:
        print("import_model: " + " ".join(str(exc).split()), file=sys.stderr)  # one line
        return 1
    print(model.tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
