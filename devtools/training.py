"""Train a small RecBole model the way RecBole users do (Config, create_dataset,
data_preparation, get_model, get_trainer), for the demo, the tests and the benchmarks.

    python -m devtools.training --model SASRec --out demo/            # ml-100k shipped with recbole

Writes the Trainer's checkpoint and the cloudpickled Dataset, and prints both paths. The command
shows each epoch (RecBole's batch bar, the training loss, the validation metric) on stderr;
``train()`` called from code (tests, benchmarks) stays quiet. RecBole's TensorBoard logs go under
the output folder, never the current directory.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import recbole

RECBOLE_DATASETS = Path(recbole.__file__).parent / "dataset_example"

SMALL = {  # seconds on 2 cores, good enough to rank sensibly
    "MAX_ITEM_LIST_LENGTH": 20,
    "n_layers": 1,
    "n_heads": 1,
    "hidden_size": 32,
    "inner_size": 64,
    "embedding_size": 32,
    "train_batch_size": 512,
    "eval_batch_size": 4096,
    "epochs": 1,
    "train_neg_sample_args": None,
    "loss_type": "CE",
}

# Train on the CPU, log only warnings, and leave no dataset/dataloader caches behind.
QUIET_CPU = {
    "show_progress": False,
    "state": "WARNING",
    "use_gpu": False,
    "device": "cpu",
    "worker": 0,
    "save_dataset": False,
    "save_dataloaders": False,
}


@contextlib.contextmanager
def in_directory(path: Path) -> Iterator[None]:
    """Run the block with *path* as the current directory. RecBole's Trainer writes its TensorBoard
    logs under ./log_tensorboard."""
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


@dataclass
class Trained:
    checkpoint: Path
    dataset_pickle: Path
    config: Any
    dataset: Any
    model: Any
    test_data: Any
    trainer: Any


def train(
    model: str,
    out_dir: Path,
    dataset: str = "ml-100k",
    data_path: Path = RECBOLE_DATASETS,
    overrides: dict[str, Any] | None = None,
    progress: bool = False,
) -> Trained:
    """Train *model* and save what RecBole users have after training: checkpoint + dataset pickle.
    With *progress*, RecBole's own per-epoch output (batch bar, loss, validation result) goes to
    stderr."""
    import cloudpickle
    import torch
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import get_model, get_trainer, init_seed

    warnings.filterwarnings("ignore", category=FutureWarning)
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    config_dict = {
        **SMALL,
        "data_path": str(data_path),
        "checkpoint_dir": str(out_dir),
        **QUIET_CPU,
        **(overrides or {}),
    }
    config = Config(model=model, dataset=dataset, config_dict=config_dict)
    # RecBole ignores data_path for a dataset named "ml-100k" (it reads its bundled copy): honour ours.
    config.final_config_dict["data_path"] = str(Path(data_path).resolve() / dataset)
    # Importing RecBole's SINE module turns on autograd anomaly detection for the whole process,
    # which only slows training down (several times over); it changes no result.
    torch.autograd.set_detect_anomaly(False)
    init_seed(config["seed"], config["reproducibility"])
    logging.getLogger().setLevel(logging.WARNING)
    ds = create_dataset(config)
    dataset_pickle = out_dir / f"{dataset}-{model}-dataset.pkl"
    with open(dataset_pickle, "wb") as f:
        cloudpickle.dump(ds, f)
    train_data, valid_data, test_data = data_preparation(config, ds)
    net = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    if progress:
        logging.basicConfig(stream=sys.stderr, format="%(message)s")
        logging.getLogger().setLevel(logging.INFO)  # the Trainer logs each epoch at INFO
    # The Trainer's TensorBoard writer keeps the relative path ./log_tensorboard/... it was made
    # with and reopens it while training: stay in out_dir until it is closed (every other path is
    # absolute).
    with in_directory(out_dir):
        trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, net)
        trainer.saved_model_file = str(out_dir / f"{model}.pth")
        trainer.fit(train_data, valid_data, saved=True, show_progress=progress, verbose=progress)
        trainer.tensorboard.close()  # its flush thread would write to the relative path later
    return Trained(Path(trainer.saved_model_file), dataset_pickle, config, ds, net, test_data, trainer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="SASRec")
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--data-path", type=Path, default=RECBOLE_DATASETS)
    parser.add_argument("--out", type=Path, default=Path("demo"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--hidden-size", type=int, default=64)
    args = parser.parse_args()
    sys.argv = sys.argv[:1]  # RecBole's Config also parses sys.argv
    size = {
        "epochs": args.epochs,
        "hidden_size": args.hidden_size,
        "inner_size": 2 * args.hidden_size,
        "embedding_size": args.hidden_size,
    }
    trained = train(args.model, args.out, args.dataset, args.data_path, size, progress=True)
    print(trained.checkpoint)
    print(trained.dataset_pickle)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
    main()
