"""The stored model format: plain files that load without unpickling anything.

Layout of an artifact directory (one BentoML model)::

    weights.pt           tensors-only state dict, loads with torch.load(weights_only=True)
    config.json          the RecBole config (enums tagged, the device dropped)
    dataset.json         what model constructors read from a Dataset: field sizes and types
    item_tokens.json     external item ids in RecBole's internal order; index 0 is [PAD]
    user_tokens.json     the same for users (only for models that read a user id)
    item_popularity.npy  interactions per item in the training split (popularity fallback)
    dataset_tensors.pt   only for models whose constructor reads more than counts (the ModelSpec
                         says what): item-feature columns, preloaded KG embedding rows; tensors
                         only, loads with torch.load(weights_only=True)

Nothing in it grows with the number of interactions.
"""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .models import ModelSpec, spec_for

WEIGHTS = "weights.pt"
CONFIG = "config.json"
DATASET = "dataset.json"
ITEM_TOKENS = "item_tokens.json"
USER_TOKENS = "user_tokens.json"
POPULARITY = "item_popularity.npy"
DATASET_TENSORS = "dataset_tensors.pt"
_ITEM_FEATURE = "item_feature."
_PRELOAD = "preload_weight."

_ENUM_TAG = "__recbole_enum__"


class ArtifactError(ValueError):
    """The stored model is incomplete, altered, or does not describe a servable model."""


class ServingConfig(dict):
    """A RecBole Config stand-in: ``config[key]`` is None for a missing key, as in RecBole."""

    def __getitem__(self, key: str) -> Any:
        return self.get(key)

    @property
    def final_config_dict(self) -> dict[str, Any]:
        return self


class DatasetStub:
    """What RecBole model constructors read from a Dataset, restored from dataset.json (and, for
    the models that need them, dataset_tensors.pt)."""

    def __init__(
        self,
        info: dict[str, Any],
        config: ServingConfig | None = None,
        tensors: dict[str, torch.Tensor] | None = None,
    ) -> None:
        from recbole.data.interaction import Interaction
        from recbole.utils import FeatureType

        self.uid_field: str = info["uid_field"]
        self.iid_field: str = info["iid_field"]
        self.field2seqlen: dict[str, int] = info["field2seqlen"]
        self.field2type = {k: FeatureType[v] for k, v in info["field2type"].items()}
        self._num: dict[str, int] = info["field_num"]
        self.config = config if config is not None else ServingConfig()
        tensors = tensors or {}
        self._item_feat = _with_prefix(tensors, _ITEM_FEATURE)
        self._preload = _with_prefix(tensors, _PRELOAD)
        # No interactions are served from: a constructor that indexes them (FEARec, for a
        # training-only loss) gets an empty table.
        self.inter_feat = Interaction({self.iid_field: torch.zeros(0, dtype=torch.long)})

    def get_item_feature(self) -> Any:
        from recbole.data.interaction import Interaction

        return Interaction(dict(self._item_feat))

    def get_preload_weight(self, field: str) -> np.ndarray:
        if field not in self._preload:
            raise ArtifactError(f"the stored model has no preloaded weights for {field!r}")
        return self._preload[field].numpy()

    def num(self, field: str) -> int:
        if field not in self._num:
            raise ArtifactError(f"the stored dataset description has no field {field!r}")
        return self._num[field]

    @property
    def user_num(self) -> int:
        return self.num(self.uid_field)

    @property
    def item_num(self) -> int:
        return self.num(self.iid_field)


def _with_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


# ---------------------------------------------------------------- writing


# A RecBole config is a few hundred small values; these bounds are far above any real one and keep
# a hostile one (shared references that expand to 2^40 leaves, 200,000-deep nesting, a 10^5000
# integer) from exhausting memory, the stack, or json's int conversion.
MAX_CONFIG_NODES = 100_000
MAX_CONFIG_DEPTH = 64
_CONTAINERS = (list, tuple, dict, set, frozenset)


def check_config_bounds(values: Any, source: str) -> None:
    """Refuse (ArtifactError) a config whose values, expanded as ``_encode`` would expand them,
    exceed MAX_CONFIG_NODES or MAX_CONFIG_DEPTH. Iterative, so it never recurses itself; a shared
    reference is counted every time it is reached, as encoding would copy it."""
    stack = [(values, 0)]
    nodes = 0
    while stack:
        value, depth = stack.pop()
        nodes += 1
        if nodes > MAX_CONFIG_NODES:
            raise ArtifactError(f"{source}: the config holds more than {MAX_CONFIG_NODES} values")
        if depth > MAX_CONFIG_DEPTH:
            raise ArtifactError(f"{source}: the config nests deeper than {MAX_CONFIG_DEPTH} levels")
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**63:
            raise ArtifactError(f"{source}: the config holds an integer of {value.bit_length()} bits")
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, (str, int, float, bool, type(None))):
                    raise ArtifactError(f"{source}: the config has a key that is {type(key).__name__}")
                stack.append((key, depth + 1))
                stack.append((item, depth + 1))
        elif isinstance(value, _CONTAINERS):
            stack.extend((item, depth + 1) for item in value)


def _encode(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, enum.Enum):
        return {_ENUM_TAG: type(value).__name__, "name": value.name}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    raise TypeError(type(value).__name__)


def config_to_json(config: Any) -> dict[str, Any]:
    """RecBole Config -> JSON-able dict; values that are not data (device, classes) are dropped."""
    check_config_bounds(config.final_config_dict, "the checkpoint")
    out = {}
    for key, value in config.final_config_dict.items():
        try:
            out[key] = _encode(value)
        except TypeError:
            continue
    return out


def _decode(value: Any) -> Any:
    import recbole.utils.enum_type as enum_type

    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict):
        if _ENUM_TAG in value:
            enum_cls = getattr(enum_type, value[_ENUM_TAG], None)
            if not (isinstance(enum_cls, type) and issubclass(enum_cls, enum.Enum)):
                raise ArtifactError(f"config.json names an unknown enum {value[_ENUM_TAG]!r}")
            return enum_cls[value["name"]]
        return {k: _decode(v) for k, v in value.items()}
    return value


def dataset_info(dataset: Any) -> dict[str, Any]:
    """The small description of a RecBole Dataset that model constructors need."""
    field_num = {}
    for field in dataset.field2type:
        try:
            field_num[field] = int(dataset.num(field))
        except (ValueError, KeyError):
            continue
    return {
        "uid_field": dataset.uid_field,
        "iid_field": dataset.iid_field,
        "field2seqlen": {k: int(v) for k, v in dataset.field2seqlen.items()},
        "field2type": {k: v.name for k, v in dataset.field2type.items()},
        "field_num": field_num,
    }


def training_item_counts(dataset: Any, train: Any) -> np.ndarray:
    """Interactions per internal item id in the training split (what RecBole's Pop model counts)."""
    items = train.inter_feat[dataset.iid_field].numpy()
    return np.bincount(items, minlength=dataset.item_num).astype(np.int64)


def dataset_tensors(spec: ModelSpec, config: Any, dataset: Any) -> dict[str, torch.Tensor]:
    """What the model's constructor reads from the Dataset beyond counts, as its ModelSpec lists
    it: item-feature columns and the rows of preloaded embedding matrices it reads."""
    out: dict[str, torch.Tensor] = {}
    fields = spec.item_feature_fields(config)
    if fields:
        item_feat = dataset.get_item_feature()
        for field in fields:
            if field not in item_feat.interaction:
                raise ArtifactError(
                    f"{spec.name} reads the item feature {field!r}, which the dataset does not load"
                )
            out[_ITEM_FEATURE + field] = item_feat[field].detach().cpu().contiguous()
    for field, rows_key in spec.preload_weights:
        try:
            matrix = dataset.get_preload_weight(field)
        except ValueError as exc:
            raise ArtifactError(f"{spec.name} reads preloaded weights {field!r}: {exc}") from exc
        rows = int(dataset.num(config[rows_key]))
        # float32, the dtype of the model's parameters: RecBole builds these matrices as float64,
        # which GRU4RecKG's copy_ into its float32 table casts anyway, and which KSR's memory_read
        # cannot multiply with float32 activations (a KSR that ran had them cast to float32)
        out[_PRELOAD + field] = torch.from_numpy(np.ascontiguousarray(matrix[:rows], dtype=np.float32))
    return out


def _tensors_only(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ArtifactError(f"state_dict entry {key!r} is not a tensor")
        out[key] = value.detach().cpu().contiguous()
    return out


def write_artifact(directory: Path, checkpoint: dict[str, Any], dataset: Any, train: Any) -> None:
    """Write the artifact files for a checkpoint and the Dataset it was trained on. *train* is the
    split the model was constructed with (``dataset.build()[0]``, as RecBole passes
    train_data.dataset): it has the item-list fields sequence models size themselves by (CORE
    reads their length)."""
    directory = Path(directory)
    config = checkpoint["config"]
    spec = spec_for(config["model"])
    spec.check_config(config)
    state = _tensors_only(checkpoint["state_dict"])
    other = checkpoint.get("other_parameter") or {}
    for key, value in other.items():
        if isinstance(value, torch.nn.Module) and any(k.startswith(f"{key}.") for k in state):
            # A submodule (feature models' feature_embed_layer): its weights are in the state_dict
            # and the constructor rebuilds the rest from the stored item features; the strict
            # load_state_dict at serving time checks that every tensor it needs is there.
            continue
        if not isinstance(value, torch.Tensor):
            raise ArtifactError(f"other_parameter {key!r} is not a tensor and cannot be stored")
        state[f"__other__.{key}"] = value.detach().cpu().contiguous()
    users = [str(t) for t in dataset.field2id_token[dataset.uid_field]] if spec.needs_user else None
    write_files(
        directory,
        spec,
        state,
        config_to_json(config),
        dataset_info(train),
        [str(t) for t in dataset.field2id_token[dataset.iid_field]],
        users,
        training_item_counts(dataset, train),
        dataset_tensors(spec, config, train),
    )


def write_files(
    directory: Path,
    spec: ModelSpec,
    state: dict[str, torch.Tensor],
    config: dict[str, Any],
    info: dict[str, Any],
    item_tokens: list[str],
    user_tokens: list[str] | None,
    popularity: np.ndarray,
    extra: dict[str, torch.Tensor],
) -> None:
    """The artifact's files from what they hold (``write_artifact``; bench/gpu.py's synthetic models)."""
    torch.save(state, directory / WEIGHTS)
    (directory / CONFIG).write_text(json.dumps(config, indent=1, sort_keys=True))
    (directory / DATASET).write_text(json.dumps(info, indent=1, sort_keys=True))
    (directory / ITEM_TOKENS).write_text(json.dumps(item_tokens))
    if user_tokens is not None:
        (directory / USER_TOKENS).write_text(json.dumps(user_tokens))
    np.save(directory / POPULARITY, popularity, allow_pickle=False)
    if extra:
        torch.save(extra, directory / DATASET_TENSORS)


def file_digests(directory: Path) -> dict[str, str]:
    """sha256 of every regular file in the artifact directory, by file name."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(directory).iterdir())
        if p.is_file()
    }


# ---------------------------------------------------------------- reading


@dataclass
class Artifact:
    """A stored model, loaded and verified, ready for the engine and the public service."""

    path: Path
    config: ServingConfig
    dataset: DatasetStub
    spec: ModelSpec
    item_tokens: list[str]
    user_tokens: list[str] | None
    popularity: np.ndarray
    state_dict: dict[str, torch.Tensor]

    @property
    def model_name(self) -> str:
        return self.spec.name

    @property
    def item_seq_field(self) -> str:
        return self.config["ITEM_ID_FIELD"] + self.config["LIST_SUFFIX"]

    @property
    def item_seq_len_field(self) -> str:
        return self.config["ITEM_LIST_LENGTH_FIELD"]

    @property
    def window(self) -> int:
        return int(self.config["MAX_ITEM_LIST_LENGTH"])


def verify_digests(directory: Path, expected: dict[str, str]) -> None:
    """Raise ArtifactError naming the first stored file whose sha256 differs from the import's."""
    if not expected:
        raise ArtifactError("the model metadata records no file digests; re-import the model")
    actual = file_digests(directory)
    for name, digest in sorted(expected.items()):
        if name not in actual:
            raise ArtifactError(f"integrity check failed: stored file {name} is missing")
        if actual[name] != digest:
            raise ArtifactError(
                f"integrity check failed: stored file {name} does not match the sha256 recorded at import"
            )


def load_artifact(
    directory: Path, digests: dict[str, str] | None = None, *, load_weights: bool = True
) -> Artifact:
    """Load an artifact directory; with *digests*, verify every file against them first."""
    directory = Path(directory)
    if digests is not None:
        verify_digests(directory, digests)
    try:
        raw_config = json.loads((directory / CONFIG).read_text())
        info = json.loads((directory / DATASET).read_text())
        item_tokens = json.loads((directory / ITEM_TOKENS).read_text())
        user_path = directory / USER_TOKENS
        user_tokens = json.loads(user_path.read_text()) if user_path.exists() else None
        popularity = np.load(directory / POPULARITY, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"cannot read the stored model in {directory}: {exc}") from exc
    config = ServingConfig({k: _decode(v) for k, v in raw_config.items()})
    spec = spec_for(config["model"])
    state = (
        torch.load(directory / WEIGHTS, map_location="cpu", weights_only=True, mmap=True)
        if load_weights
        else {}
    )
    tensors = None
    if load_weights and (spec.item_feature_keys or spec.preload_weights):
        if not (directory / DATASET_TENSORS).is_file():
            raise ArtifactError(f"{spec.name} needs {DATASET_TENSORS}, which the stored model lacks")
        tensors = torch.load(directory / DATASET_TENSORS, map_location="cpu", weights_only=True)
    return Artifact(
        path=directory,
        config=config,
        dataset=DatasetStub(info, config, tensors),
        spec=spec,
        item_tokens=item_tokens,
        user_tokens=user_tokens,
        popularity=popularity,
        state_dict=state,
    )
