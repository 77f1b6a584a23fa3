"""Metrics reproduction: replay RecBole's test split through the HTTP API and print Hit@K / NDCG@K
next to RecBole's own ``trainer.evaluate`` on the same checkpoint.

    python bench/replay_eval.py CHECKPOINT.pth --dataset-pickle DATASET.pkl --url http://127.0.0.1:3000
    python bench/replay_eval.py CHECKPOINT.pth --data-path DIR --url URL [--k 10] [--json OUT.json]

The server must serve that checkpoint (``import_model.py`` it, then ``bentoml serve``). RecBole's
side: the checkpoint's own config and dataset, ``data_preparation``, the model built as RecBole builds
it with the checkpoint's weights, ``trainer.evaluate(test_data, load_best_model=False)`` (with
``load_best_model=True`` RecBole 1.2.1 ``torch.load``s the checkpoint with torch>=2.6's
weights_only default, which refuses it). The HTTP side: every test row as a ``/recommend_batch``
request (its history, its user id, ``topk`` K), scored against the row's target item the way
RecBole scores a full ranking with one positive.

Exit status: 0 when every metric agrees to 4 decimals, 1 when one does not, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from devtools.training import in_directory  # noqa: E402  RecBole's Trainer writes ./log_tensorboard


def load_inputs(args: argparse.Namespace) -> tuple[dict[str, Any], Any]:
    from recbole_bento.core.importer import (
        check_dataset_matches,
        dataset_from_atomic_files,
        read_checkpoint,
        read_dataset_pickle,
    )

    checkpoint = read_checkpoint(args.checkpoint, trust=args.trust_pickles)
    config = checkpoint["config"]
    if args.dataset_pickle is not None:
        dataset = read_dataset_pickle(args.dataset_pickle, trust=args.trust_pickles)
    else:
        dataset = dataset_from_atomic_files(config, args.data_path)
    check_dataset_matches(config, dataset)
    return checkpoint, dataset


def recbole_evaluate(checkpoint: dict[str, Any], dataset: Any, k: int, workdir: str) -> tuple[dict, Any]:
    """RecBole's own metrics on the test split, and that split's dataloader."""
    import torch
    from recbole.data import data_preparation
    from recbole.utils import get_model, get_trainer, init_seed

    from recbole_bento.core.models import spec_for

    config = checkpoint["config"]
    spec = spec_for(config["model"])
    # RecBole's Config installs numpy aliases (np.float, np.long, ...) its evaluator and layers use
    # when it is built; this one was unpickled, so install them as it would have
    config.compatibility_settings()
    config.final_config_dict.update(
        metrics=["Hit", "NDCG"],
        topk=[k],
        metric_decimal_place=10,  # RecBole rounds metrics; compare the unrounded values
        device=torch.device("cpu"),
        use_gpu=False,
        show_progress=False,
        checkpoint_dir=workdir,
        save_dataset=False,
        save_dataloaders=False,
        # set only while constructing (S3Rec would otherwise re-read its pre-training file):
        # every weight is replaced by the checkpoint's below
        **dict(spec.build_config),
    )
    init_seed(config["seed"], config["reproducibility"])
    train_data, _, test_data = data_preparation(config, dataset)
    model = get_model(config["model"])(config, train_data._dataset)
    torch.autograd.set_detect_anomaly(False)  # RecBole's SINE module turns it on at import
    model.load_state_dict(checkpoint["state_dict"])
    model.load_other_parameter(checkpoint.get("other_parameter"))
    with in_directory(Path(workdir)):
        trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    result = trainer.evaluate(test_data, load_best_model=False, show_progress=False)
    return {key.lower(): float(value) for key, value in result.items()}, test_data


def test_rows(test_data: Any, needs_user: bool) -> list[tuple[dict[str, Any], str]]:
    """Every test row as the /recommend body that reproduces it, with its target item."""
    ds = test_data.dataset
    config = test_data.config
    iid, uid = ds.iid_field, ds.uid_field
    seq_field = iid + config["LIST_SUFFIX"]
    len_field = config["ITEM_LIST_LENGTH_FIELD"]
    inter = ds.inter_feat
    rows = []
    for row in range(len(inter)):
        length = int(inter[len_field][row])
        history = inter[seq_field][row][:length].tolist()
        body: dict[str, Any] = {"sequence": [str(t) for t in ds.id2token(iid, history)]}
        if needs_user:
            body["user_id"] = str(ds.id2token(uid, int(inter[uid][row])))
        rows.append((body, str(ds.id2token(iid, int(inter[iid][row])))))
    return rows


def http_evaluate(url: str, rows: list[tuple[dict[str, Any], str]], k: int, batch: int) -> tuple[dict, int]:
    """Hit@K and NDCG@K of the served model on *rows* (one positive each), and the fallbacks seen."""
    import httpx

    hits = ndcg = 0.0
    fallbacks = 0
    with httpx.Client(base_url=url, timeout=120) as client:
        for start in range(0, len(rows), batch):
            chunk = rows[start : start + batch]
            response = client.post(
                "/recommend_batch", json={"requests": [body | {"topk": k} for body, _ in chunk]}
            )
            response.raise_for_status()
            for result, (_, target) in zip(response.json()["results"], chunk, strict=True):
                fallbacks += result["fallback"] is not None
                if target in result["item_list"][:k]:
                    rank = result["item_list"].index(target)  # 0-based
                    hits += 1.0
                    ndcg += 1.0 / math.log2(rank + 2)
    n = max(len(rows), 1)
    return {f"hit@{k}": hits / n, f"ndcg@{k}": ndcg / n}, fallbacks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset-pickle", type=Path)
    source.add_argument("--data-path", type=Path)
    parser.add_argument("--url", required=True, help="base URL of the running service")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--batch", type=int, default=128, help="requests per /recommend_batch call")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--trust-pickles", action="store_true", help="as import_model.py's")
    args = parser.parse_args(argv)
    sys.argv = sys.argv[:1]  # RecBole's Config parses sys.argv too
    logging.disable(logging.INFO)
    warnings.filterwarnings("ignore", category=FutureWarning)

    from recbole_bento.core.artifact import ArtifactError
    from recbole_bento.core.importer import ImportRefused
    from recbole_bento.core.models import UnsupportedModelError, spec_for

    with tempfile.TemporaryDirectory(prefix="replay-eval-") as workdir:
        try:
            checkpoint, dataset = load_inputs(args)
            spec = spec_for(checkpoint["config"]["model"])
        except (ImportRefused, ArtifactError, UnsupportedModelError) as exc:
            print(f"replay_eval: {exc}", file=sys.stderr)
            return 2
        recbole, test_data = recbole_evaluate(checkpoint, dataset, args.k, workdir)
    rows = test_rows(test_data, spec.needs_user)
    served, fallbacks = http_evaluate(args.url, rows, args.k, args.batch)

    config = checkpoint["config"]
    print(f"{config['model']} on {config['dataset']}: {len(rows)} test rows replayed through {args.url}")
    print(f"{'metric':<10} {'HTTP API':>10} {'RecBole':>10}")
    agree = True
    for metric in served:
        ok = f"{served[metric]:.4f}" == f"{recbole[metric]:.4f}"
        agree &= ok
        print(
            f"{metric:<10} {served[metric]:>10.4f} {recbole[metric]:>10.4f}  {'same' if ok else 'DIFFERENT'}"
        )
    if fallbacks:
        print(f"{fallbacks} rows were answered by the popularity fallback")
    print("agree to 4 decimals" if agree else "DISAGREE at 4 decimals")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "model": config["model"],
                    "dataset": config["dataset"],
                    "rows": len(rows),
                    "k": args.k,
                    "http": served,
                    "recbole": recbole,
                    "fallbacks": fallbacks,
                    "agree": agree,
                },
                indent=1,
            )
        )
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
