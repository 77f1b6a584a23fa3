"""Make a large-catalogue benchmark fixture: a synthetic dataset in RecBole's atomic-file format in
which every item is seen, an untrained SASRec saved exactly as RecBole's Trainer saves a checkpoint
(``Trainer._save_checkpoint``: config, epoch, cur_step, best_valid_score, state_dict,
other_parameter, optimizer), and the Dataset pickled as RecBole's ``Dataset.save()`` does.

    python bench/make_large_fixture.py --items 1000000 --out bench/.work/fixtures

Writes ``<out>/synth-<n>/``: ``data/synth-<n>/synth-<n>.inter``, ``SASRec.pth`` and
``synth-<n>-SequentialDataset.pth`` (the pickle). Prints a JSON line with the paths, sizes and
timings. Memory and time stay small: about 1.1 interactions per item (every item once, plus a
popular head), short histories, and RecBole's own loader (create_dataset) builds the Dataset.

    BENTOML_HOME=bench/.work/bentoml python bench/make_large_fixture.py --wide --items 10000000

``--wide``: a catalogue RecBole's own Dataset cannot hold in memory (at 10M items, SASRec's
augmented sequences alone are 4.4 GB of int64). The stored model is the importer's artifact of a
10k-item fixture with its item table widened to N rows (``wide()``), registered in the model
store as ``sasrec-wide-<n>`` (no Dataset, no training); the rest of the SASRec is the 10k one's.
The table is structured as trained tables are, not i.i.d. noise: items fall in clusters (one per
1,000 items, assigned at random, so item ids say nothing of the cluster) with log-normal norms.
``<out>/wide-<n>/sessions-{tune,eval}.jsonl`` hold coherent sessions (items of one or two
clusters, external ids, one JSON list a line): the ones a retrieval index is tuned on and the
held-out ones the benchmark measures with.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from devtools.training import QUIET_CPU, in_directory  # noqa: E402

SASREC = {  # RecBole's SASRec defaults, window 50
    "MAX_ITEM_LIST_LENGTH": 50,
    "hidden_size": 64,
    "inner_size": 256,
    "n_layers": 2,
    "n_heads": 2,
    "hidden_dropout_prob": 0.5,
    "attn_dropout_prob": 0.5,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-12,
    "initializer_range": 0.02,
    "loss_type": "CE",
    "train_neg_sample_args": None,
}


def catalogue_name(n_items: int) -> str:
    if n_items % 1_000_000 == 0:
        return f"synth-{n_items // 1_000_000}m"
    if n_items % 1000 == 0:
        return f"synth-{n_items // 1000}k"
    return f"synth-{n_items}"


def write_atomic(path: Path, n_items: int, seed: int, extra: float = 0.1, mean_len: int = 10) -> int:
    """``<name>.inter``: every item once (shuffled) plus ``extra * n_items`` Zipf-popular repeats,
    cut into user histories of 3..2*mean_len items. Returns the number of interactions."""
    rng = np.random.default_rng(seed)
    head = rng.zipf(1.2, size=int(extra * n_items)) % n_items
    items = np.concatenate([rng.permutation(n_items), head])
    rng.shuffle(items)
    lengths = rng.integers(3, 2 * mean_len + 1, size=len(items) // 3 + 1)
    bounds = np.cumsum(lengths)
    bounds = bounds[bounds < len(items)]
    users = np.zeros(len(items), dtype=np.int64)
    users[bounds] = 1
    users = np.cumsum(users)
    stamps = 1_000_000_000 + np.arange(len(items), dtype=np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.write("user_id:token\titem_id:token\ttimestamp:float\n")
        chunk = 200_000
        for start in range(0, len(items), chunk):
            rows = zip(
                users[start : start + chunk].tolist(),
                items[start : start + chunk].tolist(),
                stamps[start : start + chunk].tolist(),
                strict=True,
            )
            f.write("".join(f"u{u}\ti{i}\t{t}\n" for u, i, t in rows))
    return len(items)


def make(n_items: int, out: Path, seed: int = 0) -> dict:
    warnings.filterwarnings("ignore")
    from recbole.config import Config
    from recbole.data import create_dataset
    from recbole.utils import get_model, get_trainer, init_seed

    name = catalogue_name(n_items)
    root = (out / name).resolve()
    data = root / "data"
    t0 = time.perf_counter()
    n_inter = write_atomic(data / name / f"{name}.inter", n_items, seed)
    t_write = time.perf_counter() - t0
    config = Config(
        model="SASRec",
        dataset=name,
        config_dict={
            **SASREC,
            "data_path": str(data),
            "checkpoint_dir": str(root),
            "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
            "seed": seed,
            "reproducibility": True,
            **QUIET_CPU,
        },
    )
    init_seed(config["seed"], config["reproducibility"])
    logging.getLogger().setLevel(logging.WARNING)
    t0 = time.perf_counter()
    dataset = create_dataset(config)
    t_dataset = time.perf_counter() - t0
    seen = dataset.item_num - 1  # minus [PAD]
    if seen != n_items:
        raise SystemExit(f"expected {n_items} items in the dataset, RecBole kept {seen}")
    dataset.save()  # RecBole's own pickle: <checkpoint_dir>/<dataset>-SequentialDataset.pth
    pickle_path = root / f"{name}-{type(dataset).__name__}.pth"
    model = get_model("SASRec")(config, dataset)
    with in_directory(root):  # the Trainer opens ./log_tensorboard
        trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    checkpoint = root / "SASRec.pth"
    trainer.saved_model_file = str(checkpoint)
    trainer._save_checkpoint(0, verbose=False)  # the Trainer's own save: the exact dict and torch.save
    return {
        "name": name,
        "items": n_items,
        "interactions": n_inter,
        "checkpoint": str(checkpoint),
        "dataset_pickle": str(pickle_path),
        "data_path": str(data),
        "checkpoint_mb": round(checkpoint.stat().st_size / 2**20, 1),
        "dataset_pickle_mb": round(pickle_path.stat().st_size / 2**20, 1),
        "write_s": round(t_write, 1),
        "create_dataset_s": round(t_dataset, 1),
    }


def structured_table(n_items: int, dim: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """[n_items + 1, dim] float32 (row 0: padding, zeros) and each item's cluster: item rows are
    ``0.02 * norm * (center + 0.6 * noise)``, ``norm`` log-normal (sigma 0.25), in 1M-row chunks."""
    rng = np.random.default_rng(seed)
    clusters = max(16, n_items // 1000)
    centers = rng.standard_normal((clusters, dim), dtype=np.float32)
    assignment = rng.integers(0, clusters, size=n_items)
    table = torch.zeros(n_items + 1, dim)
    for start in range(0, n_items, 1_000_000):
        z = assignment[start : start + 1_000_000]
        noise = rng.standard_normal((len(z), dim), dtype=np.float32)
        norm = rng.lognormal(0.0, 0.25, size=(len(z), 1)).astype(np.float32)
        table[1 + start : 1 + start + len(z)] = torch.from_numpy(0.02 * norm * (centers[z] + 0.6 * noise))
    return table, assignment


def sessions(assignment: np.ndarray, count: int, seed: int) -> list[list[str]]:
    """*count* coherent sessions of 5..20 external item ids from one or two clusters."""
    rng = np.random.default_rng(seed)
    order = np.argsort(assignment, kind="stable")
    starts = np.searchsorted(assignment[order], np.arange(assignment.max() + 2))
    out = []
    for _ in range(count):
        picked = rng.integers(0, len(starts) - 1, size=rng.integers(1, 3))
        pool = np.concatenate([order[starts[c] : starts[c + 1]] for c in picked])
        items = rng.choice(pool, size=min(len(pool), int(rng.integers(5, 21))), replace=False)
        out.append([f"i{i}" for i in items.tolist()])  # item j of the table is external id i<j-1>
    return out


def widen(directory: Path, n_items: int, seed: int = 0) -> np.ndarray:
    """The artifact in *directory* (as the importer writes it) with its item table replaced by
    *n_items* rows of ``structured_table`` (external ids ``i0``, ``i1``, ...), rewritten in place by
    the importer's own writer (``artifact.write_files``); each item's cluster."""
    from recbole_bento.core import artifact

    stored = artifact.load_artifact(directory)
    key = f"{stored.spec.item_table}.weight"
    # copies: the stored files are mapped, and rewritten below
    state = {k: v.clone() for k, v in stored.state_dict.items() if k != key}
    table, assignment = structured_table(n_items, stored.state_dict[key].shape[1], seed)
    state[key] = table
    spec, users = stored.spec, stored.user_tokens
    del stored
    config = json.loads((directory / artifact.CONFIG).read_text())
    info = json.loads((directory / artifact.DATASET).read_text())
    info["field_num"][info["iid_field"]] = n_items + 1
    tokens = ["[PAD]"] + [f"i{i}" for i in range(n_items)]
    popularity = np.ones(n_items + 1, dtype=np.int64)
    artifact.write_files(directory, spec, state, config, info, tokens, users, popularity, {})
    return assignment


def wide(n_items: int, out: Path, seed: int = 0) -> dict:
    """The 10k fixture's artifact widened to *n_items* (``widen``), registered in the store."""
    from recbole_bento.core import artifact, store
    from recbole_bento.core.importer import build_metadata, build_splits
    from recbole_bento.core.safe_pickle import load_checkpoint, load_dataset_pickle

    base = make(10_000, out, seed)
    t0 = time.perf_counter()
    checkpoint = load_checkpoint(Path(base["checkpoint"]))
    dataset = load_dataset_pickle(Path(base["dataset_pickle"]))
    root = out / f"wide-{catalogue_name(n_items)[len('synth-') :]}"
    directory = root / "artifact"
    directory.mkdir(parents=True, exist_ok=True)
    artifact.write_artifact(directory, checkpoint, dataset, build_splits(dataset)[0])
    assignment = widen(directory, n_items, seed)
    for part, count, part_seed in (("tune", 2000, seed + 1), ("eval", 2000, seed + 2)):
        lines = "".join(json.dumps(s) + "\n" for s in sessions(assignment, count, part_seed))
        (root / f"sessions-{part}.jsonl").write_text(lines)
    stored = artifact.load_artifact(directory, load_weights=False)
    source = f"bench/make_large_fixture.py --wide --items {n_items}"
    metadata = build_metadata(checkpoint, directory, stored, source)
    name = f"sasrec-wide-{catalogue_name(n_items)[len('synth-') :]}"
    model = store.register(name, directory, metadata, {})
    return {
        "name": name,
        "tag": str(model.tag),
        "items": n_items,
        "sessions": str(root),
        "weights_mb": round((directory / artifact.WEIGHTS).stat().st_size / 2**20, 1),
        "wide_s": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, action="append", help="catalogue size (repeatable)")
    parser.add_argument("--out", type=Path, default=Path("bench/.work/fixtures"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--wide", action="store_true", help="a widened stored model, no Dataset (see the module docstring)"
    )
    args = parser.parse_args()
    sys.argv = sys.argv[:1]  # RecBole's Config parses sys.argv too
    for n in args.items or [1_000_000]:
        print(json.dumps((wide if args.wide else make)(n, args.out, args.seed)), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
