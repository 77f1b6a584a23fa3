"""RecBole checkpoint + Dataset -> a verified artifact in the BentoML model store."""

from __future__ import annotations

import contextlib
import importlib
import re
import tempfile
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any, cast

import bentoml
import numpy as np
import torch
from bentoml.exceptions import BentoMLException, NotFound

from . import attributes, index, store
from .artifact import ArtifactError, check_config_bounds, file_digests, load_artifact, write_artifact
from .engine import Engine
from .models import ModelSpec, UnsupportedModelError, spec_for
from .ranking import RankQuery
from .safe_pickle import load_checkpoint, load_dataset_pickle
from .vocabulary import VocabularyMismatch, check_vocabulary


class ImportRefused(ValueError):
    """A one-line reason why the inputs cannot be imported."""


class Progress:
    """Where import_checkpoint reports what it is doing. This default says nothing (library use,
    tests); import_model.py passes one that writes to stderr."""

    def step(self, text: str) -> None:
        """A new step begins."""

    def bar(self, total: int, unit: str) -> contextlib.AbstractContextManager[Callable[[int], None]]:
        """Context for a long step of *total* units: yields a function to call with units done."""
        return contextlib.nullcontext(lambda done: None)


# Size-like config values the model constructors allocate from (``ModelSpec.width_keys`` and
# ``count_keys``). The checkpoint's weights fix the real sizes, but a constructor allocates before
# load_state_dict can compare: bound them first. The window is bounded by the longest history the
# service accepts (settings.max_history).
MAX_WINDOW = 10_000
MAX_WIDTH = 16_384
MAX_COUNT = 64
DEFAULT_MIN_RECALL = 0.95  # recall@10 of a retrieval index, unless --min-recall says otherwise


def check_file(path: Path, what: str) -> Path:
    """The path of an existing regular file (or a link to one), else a one-line refusal saying
    what it is instead."""
    path = Path(path)
    if not path.exists():
        raise ImportRefused(f"{what} {path} does not exist")
    if path.is_dir():
        raise ImportRefused(f"{what} {path} is a directory, not a file")
    if not path.is_file():
        kind = "a device" if path.is_char_device() or path.is_block_device() else "a pipe or socket"
        raise ImportRefused(f"{what} {path} is not a regular file ({kind})")
    return path


def check_name(name: str) -> bentoml.Tag:
    """A model name (or name:version) BentoML accepts and that is not in the store yet."""
    try:
        tag = bentoml.Tag.from_taglike(name)
    except (ValueError, BentoMLException) as exc:
        raise ImportRefused(f"--name {name!r}: {exc}") from None
    if tag.version == "latest":
        raise ImportRefused(f"--name {name!r}: 'latest' names the newest version; it cannot be set")
    if tag.version is not None:
        with contextlib.suppress(NotFound):
            bentoml.models.get(tag)
            raise ImportRefused(f"model {tag} already exists in the BentoML model store")
    return tag


def check_sizes(config: Any, spec: ModelSpec, source: str) -> None:
    """Refuse size-like config values no real model has, before *spec*'s constructor allocates them."""
    bounds = {"MAX_ITEM_LIST_LENGTH": MAX_WINDOW}
    bounds.update(dict.fromkeys(spec.width_keys, MAX_WIDTH))
    bounds.update(dict.fromkeys(spec.count_keys, MAX_COUNT))
    for key, bound in bounds.items():
        value = config[key]
        if value is None and key != "MAX_ITEM_LIST_LENGTH":
            continue
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= bound:
            raise ImportRefused(f"{source}: {key}={value!r} is not an integer in 1..{bound}")


def read_checkpoint(path: Path, *, trust: bool = False) -> dict[str, Any]:
    check_file(path, "checkpoint")
    try:
        checkpoint = load_checkpoint(Path(path), trust=trust)
    except ValueError as exc:  # UnsafePickleError included
        raise ImportRefused(f"{path}: {exc}") from exc
    except Exception as exc:  # torch/pickle raise many types for a file that is not a checkpoint
        raise ImportRefused(f"{path} is not a RecBole checkpoint ({type(exc).__name__}: {exc})") from exc
    config = checkpoint.get("config") if isinstance(checkpoint, dict) else None
    values = getattr(config, "__dict__", {}).get("final_config_dict")
    if not isinstance(values, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise ImportRefused(
            f"{path} is not a RecBole checkpoint (expected the dict RecBole's Trainer saves, "
            "with 'config' and 'state_dict')"
        )
    try:
        check_config_bounds(values, str(path))
    except ArtifactError as exc:
        raise ImportRefused(str(exc)) from None
    for key in ("model", "dataset", "USER_ID_FIELD", "ITEM_ID_FIELD"):
        if not isinstance(values.get(key), str):
            raise ImportRefused(f"{path}: the config's {key} is {type(values.get(key)).__name__}, not a name")
    for key, kinds in (("epoch", (int,)), ("best_valid_score", (int, float))):
        value = checkpoint.get(key)
        if value is not None and not (isinstance(value, kinds) and not isinstance(value, bool)):
            raise ImportRefused(f"{path}: the checkpoint's {key} is {type(value).__name__}, not a number")
    check_sizes(config, spec_for(values["model"]), str(path))  # refuses an unsupported model too
    return checkpoint


def read_dataset_pickle(path: Path, *, trust: bool = False, progress: Progress | None = None) -> Any:
    check_file(path, "dataset pickle")
    try:
        with (progress or Progress()).bar(Path(path).stat().st_size, "B") as advance:
            dataset = load_dataset_pickle(Path(path), trust=trust, on_read=advance)
    except ValueError as exc:
        raise ImportRefused(f"{path}: {exc}") from exc
    except Exception as exc:
        raise ImportRefused(f"{path} is not a pickled RecBole Dataset ({type(exc).__name__}: {exc})") from exc
    if not hasattr(dataset, "field2id_token") or not hasattr(dataset, "iid_field"):
        raise ImportRefused(f"{path} does not hold a RecBole Dataset (found {type(dataset).__name__})")
    values = getattr(getattr(dataset, "config", None), "__dict__", {}).get("final_config_dict")
    if not isinstance(values, dict):
        raise ImportRefused(f"{path} does not hold a RecBole Dataset (its config is not a RecBole Config)")
    try:
        check_config_bounds(values, str(path))
    except ArtifactError as exc:
        raise ImportRefused(str(exc)) from None
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


def build_splits(dataset: Any) -> list[Any]:
    """``dataset.build()``: the train/valid/test splits training used. A Dataset pickled after
    ``data_preparation`` was built in place (its tables already converted to Interaction, sequences
    already augmented), and converting them again fails: split it without that step."""
    from recbole.data.interaction import Interaction

    if not isinstance(dataset.inter_feat, Interaction):
        return dataset.build()
    dataset._change_feat_format = lambda: None  # this instance only
    try:
        return dataset.build()
    finally:
        del dataset._change_feat_format


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
        "user_count": artifact.dataset.user_num - 1,
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
    skip_vocabulary_check: bool = False,
    progress: Progress | None = None,
    item_features: Path | None = None,
    retrieval_index: str | None = None,
    min_recall: float = DEFAULT_MIN_RECALL,
) -> bentoml.Model:
    """Validate everything, round-trip the artifact through the serving loader, check the item
    vocabulary against the checkpoint's recorded validation score, build the *retrieval_index*
    asked for (``ivf``, ``hnsw``; core/index.py), then register."""
    progress = progress or Progress()
    if (dataset_pickle is None) == (data_path is None):
        raise ImportRefused("give exactly one of --dataset-pickle or --data-path")
    check_index_options(retrieval_index, min_recall)
    if name is not None:
        check_name(name)  # before the slow steps; register() refuses a race
    progress.step(f"reading the checkpoint {checkpoint_path}")
    checkpoint = read_checkpoint(checkpoint_path, trust=trust_pickles)
    config = checkpoint["config"]
    spec = spec_for(config["model"])  # refuses unsupported models before the (slow) dataset load
    if retrieval_index and spec.dot_product is None:
        raise ImportRefused(no_index_reason(spec.name))
    if dataset_pickle is not None:
        progress.step(f"reading the dataset pickle {dataset_pickle}")
        dataset = read_dataset_pickle(dataset_pickle, trust=trust_pickles, progress=progress)
        source = f"checkpoint {Path(checkpoint_path).name} + dataset pickle {Path(dataset_pickle).name}"
    else:
        progress.step(f"building the dataset from the atomic files under {data_path}")
        dataset = dataset_from_atomic_files(config, Path(data_path))  # type: ignore[arg-type]
        source = f"checkpoint {Path(checkpoint_path).name} + atomic files"
    check_dataset_matches(config, dataset)
    progress.step("splitting the dataset as training did (Dataset.build)")
    try:
        train, valid, _ = build_splits(dataset)
    except Exception as exc:
        raise ImportRefused(f"cannot split the dataset as RecBole does: {_reason(exc)}") from exc
    with tempfile.TemporaryDirectory(prefix="recbole-bento-") as tmp:
        directory = Path(tmp)
        progress.step("writing the artifact")
        try:
            write_artifact(directory, checkpoint, dataset, train)
        except (ArtifactError, UnsupportedModelError):
            raise
        except Exception as exc:
            raise ImportRefused(f"cannot store the model: {_reason(exc)}") from exc
        try:
            attributes.store(directory, dataset, item_features)
        except attributes.ItemFeaturesError as exc:
            raise ImportRefused(str(exc)) from exc
        progress.step(f"building {config['model']} from the stored files and loading its weights")
        artifact = load_artifact(directory)
        try:
            engine = Engine(artifact, device="cpu", block_items=0)
        except ArtifactError as exc:  # load_state_dict: item counts, or the model class itself
            raise ImportRefused(
                f"the dataset or the config does not match the checkpoint's weights: {_reason(exc)}"
            ) from exc
        except Exception as exc:  # the config's model class, or its sizes, do not fit the weights
            raise ImportRefused(
                f"{checkpoint_path}: {config['model']} cannot be built from the checkpoint's config "
                f"and weights: {_reason(exc)}"
            ) from exc
        if not skip_vocabulary_check:
            progress.step(f"checking the item vocabulary ({config['valid_metric']} on the validation split)")
            try:
                with progress.bar(len(valid.inter_feat), "rows") as advance:
                    check_vocabulary(engine, checkpoint, valid, on_rows=advance)
            except VocabularyMismatch as exc:
                raise ImportRefused(f"{_dataset_source(dataset_pickle, data_path)}: {exc}") from None
        if retrieval_index:
            histories = validation_histories(valid, artifact.item_seq_field, artifact.item_seq_len_field)
            queries = f"{len(histories)} validation histories"
            params = add_retrieval_index(
                engine, directory, retrieval_index, histories, min_recall, queries, progress
            )
        metadata = build_metadata(checkpoint, directory, artifact, source)
        if retrieval_index:
            metadata["retrieval_index"] = params.to_json()
        progress.step("registering in the BentoML model store")
        try:
            return store.register(name or default_name(config), directory, metadata, labels or {})
        except BentoMLException as exc:
            raise ImportRefused(str(exc)) from None


def check_index_options(kind: str | None, min_recall: float) -> None:
    if kind is not None and kind not in index.KINDS:
        raise ImportRefused(f"--index {kind!r}: choose one of {', '.join(index.KINDS)}")
    if not 0 < min_recall <= 1:
        raise ImportRefused(f"--min-recall {min_recall}: a recall@10 above 0 and at most 1")


def no_index_reason(model: str) -> str:
    return (
        f"--index: {model} does not score by a dot product with its item table, so a retrieval "
        "index cannot find its top items: import it without --index"
    )


def validation_histories(
    valid: Any, seq_field: str, len_field: str, count: int = index.RECALL_QUERIES
) -> list[list[int]]:
    """Up to *count* histories of the validation split (a seeded sample): the real queries a
    retrieval index's recall is measured on."""
    seq, lengths = valid.inter_feat[seq_field], valid.inter_feat[len_field]
    rows = np.random.default_rng(0).permutation(len(lengths))[:count]
    return [seq[r, : lengths[r]].tolist() for r in sorted(rows.tolist()) if lengths[r] > 0]


def add_retrieval_index(
    engine: Engine,
    directory: Path,
    kind: str,
    histories: list[list[int]],
    min_recall: float,
    query_source: str,
    progress: Progress,
    max_width: int | None = None,
) -> index.IndexParams:
    """Build a *kind* index over the engine's item table into *directory*, tuned on the model's own
    query vectors for *histories* to reach *min_recall*; ImportRefused says why it cannot."""
    if engine.artifact.spec.dot_product is None:
        raise ImportRefused(no_index_reason(engine.artifact.model_name))
    if not histories:
        raise ImportRefused("--index: no history to measure the index's recall on")
    progress.step(f"computing {engine.artifact.model_name}'s query vectors for {len(histories)} histories")
    queries = [RankQuery(h, index.RECALL_K) for h in histories]
    q = torch.cat([engine.model_query(queries[i : i + 256]) for i in range(0, len(queries), 256)])
    table = cast(torch.Tensor, engine.artifact.spec.table(engine.model)).detach()  # model_query found it
    try:
        data, params = index.build(
            table, kind, q, min_recall, query_source=query_source, progress=progress, max_width=max_width
        )
    except index.RetrievalIndexError as exc:
        raise ImportRefused(str(exc)) from None
    index.write(directory, data, params)
    return params


def _dataset_source(dataset_pickle: Path | None, data_path: Path | None) -> str:
    return f"dataset pickle {dataset_pickle}" if dataset_pickle is not None else f"--data-path {data_path}"


def _reason(exc: BaseException) -> str:
    """An exception as one bounded line (messages can hold tensors or whole configs)."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= 300 else text[:297] + "..."
