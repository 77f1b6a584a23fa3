"""RecBole checkpoint + Dataset -> a verified artifact in the BentoML model store."""

from __future__ import annotations

import importlib
import re
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Any

import bentoml
import torch

from . import store
from .artifact import ArtifactError, file_digests, load_artifact, write_artifact
from .engine import build_model
from .models import spec_for
from .safe_pickle import load_checkpoint, load_dataset_pickle


class ImportRefused(ValueError):
    """A one-line reason why the inputs cannot be imported."""


def read_checkpoint(path: Path, *, trust: bool = False) -> dict[str, Any]:
    if not Path(path).is_file():
        raise ImportRefused(f"checkpoint {path} does not exist")
    try:
        checkpoint = load_checkpoint(Path(path), trust=trust)
    except ValueError as exc:  # UnsafePickleError included
        raise ImportRefused(str(exc)) from exc
    except Exception as exc:  # torch/pickle raise many types for a file that is not a checkpoint
        raise ImportRefused(f"{path} is not a RecBole checkpoint ({type(exc).__name__}: {exc})") from exc
    config = checkpoint.get("config") if isinstance(checkpoint, dict) else None
    if config is None or not hasattr(config, "final_config_dict") or "state_dict" not in checkpoint:
        raise ImportRefused(
            f"{path} is not a RecBole checkpoint (expected the dict RecBole's Trainer saves, "
            "with 'config' and 'state_dict')"
        )
    return checkpoint


def read_dataset_pickle(path: Path, *, trust: bool = False) -> Any:
    if not Path(path).is_file():
        raise ImportRefused(f"dataset pickle {path} does not exist")
    try:
        dataset = load_dataset_pickle(Path(path), trust=trust)
    except ValueError as exc:
        raise ImportRefused(str(exc)) from exc
    except Exception as exc:
        raise ImportRefused(f"{path} is not a pickled RecBole Dataset ({type(exc).__name__}: {exc})") from exc
    if not hasattr(dataset, "field2id_token") or not hasattr(dataset, "iid_field"):
        raise ImportRefused(f"{path} does not hold a RecBole Dataset (found {type(dataset).__name__})")
    return dataset


def dataset_from_atomic_files(config: Any, data_dir: Path) -> Any:
    """Rebuild the Dataset from atomic files, as RecBole's create_dataset would, minus its
    pickle cache (create_dataset unpickles any '<checkpoint_dir>/<dataset>-*.pth' it finds)."""
    name = config["dataset"]
    folder = Path(data_dir) / name
    if not (folder / f"{name}.inter").is_file():
        raise ImportRefused(f"--data-path {data_dir}: no {name}/{name}.inter under it")
    config.final_config_dict.update(data_path=str(folder), dataset_save_path=None, save_dataset=False)
    module = importlib.import_module("recbole.data.dataset")
    cls = getattr(module, config["model"] + "Dataset", None) or module.SequentialDataset
    try:
        return cls(config)
    except Exception as exc:
        raise ImportRefused(f"cannot build the dataset from {folder}: {type(exc).__name__}: {exc}") from exc


def check_dataset_matches(config: Any, dataset: Any) -> None:
    expected = (config["dataset"], config["ITEM_ID_FIELD"], config["USER_ID_FIELD"])
    found = (dataset.config["dataset"], dataset.iid_field, dataset.uid_field)
    if expected != found:
        raise ImportRefused(
            "the dataset does not match the checkpoint: checkpoint has dataset/item/user fields "
            f"{expected}, dataset has {found}"
        )


def default_name(config: Any) -> str:
    return re.sub(r"[^a-z0-9_.-]+", "-", f"{config['model']}-{config['dataset']}".lower()).strip("-.")


def parse_labels(pairs: list[str]) -> dict[str, str]:
    labels = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ImportRefused(f"--label {pair!r} is not KEY=VALUE")
        labels[key] = value
    return labels


def build_metadata(checkpoint: dict[str, Any], directory: Path, artifact: Any, source: str) -> dict[str, Any]:
    config = checkpoint["config"]
    best = checkpoint.get("best_valid_score")
    metadata = {
        "recbole_model": artifact.model_name,
        "dataset": config["dataset"],
        "item_count": len(artifact.item_tokens) - 1,
        "user_count": len(artifact.user_tokens) - 1 if artifact.user_tokens else None,
        "max_history_length": artifact.window,
        "required_inputs": artifact.spec.required_inputs,
        "fields": {
            "user": config["USER_ID_FIELD"],
            "item": config["ITEM_ID_FIELD"],
            "item_sequence": artifact.item_seq_field,
            "sequence_length": artifact.item_seq_len_field,
        },
        "valid_metric": config["valid_metric"],
        "best_valid_score": float(best) if best is not None else None,
        "epoch": checkpoint.get("epoch"),
        "imported_from": source,
        "versions": {"recbole": version("recbole"), "torch": version("torch")},
        "files": file_digests(directory),
    }
    return {k: v for k, v in metadata.items() if v is not None}  # the model store refuses None


def import_checkpoint(
    checkpoint_path: Path,
    *,
    dataset_pickle: Path | None = None,
    data_path: Path | None = None,
    name: str | None = None,
    labels: dict[str, str] | None = None,
    trust_pickles: bool = False,
) -> bentoml.Model:
    """Validate everything, round-trip the artifact through the serving loader, then register."""
    if (dataset_pickle is None) == (data_path is None):
        raise ImportRefused("give exactly one of --dataset-pickle or --data-path")
    checkpoint = read_checkpoint(checkpoint_path, trust=trust_pickles)
    config = checkpoint["config"]
    spec_for(config["model"])  # refuses unsupported models before the (slow) dataset load
    if dataset_pickle is not None:
        dataset = read_dataset_pickle(dataset_pickle, trust=trust_pickles)
        source = f"checkpoint {Path(checkpoint_path).name} + dataset pickle {Path(dataset_pickle).name}"
    else:
        dataset = dataset_from_atomic_files(config, Path(data_path))  # type: ignore[arg-type]
        source = f"checkpoint {Path(checkpoint_path).name} + atomic files"
    check_dataset_matches(config, dataset)
    with tempfile.TemporaryDirectory(prefix="recbole-bento-") as tmp:
        directory = Path(tmp)
        write_artifact(directory, checkpoint, dataset)
        artifact = load_artifact(directory)
        try:
            build_model(artifact, torch.device("cpu"))
        except ArtifactError as exc:
            raise ImportRefused(f"the dataset does not match the checkpoint: {exc}") from exc
        metadata = build_metadata(checkpoint, directory, artifact, source)
        return store.register(name or default_name(config), directory, metadata, labels or {})
