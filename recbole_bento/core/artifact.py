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
    item_table.npy       the model's item table (``ModelSpec.item_table``'s weight), float32, taken
                         out of weights.pt; absent in models stored before it existed, and for
                         models without an item table
    item_unit.npy        its first n_items rows scaled to unit length (/similar_items, explanations)

Nothing in it grows with the number of interactions. What grows with the catalogue is mapped, not
read: weights.pt through ``torch.load(mmap=True)`` and the two tables as read-only NumPy memmaps,
assigned to the model as they are (``engine.build_model``), so every worker process of a server
reads the same physical pages (the page cache) instead of holding a copy each. A model stored
before the tables existed still loads (its item table maps from weights.pt, its unit table is
computed at start-up).
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .models import ModelSpec, spec_for

WEIGHTS = "weights.pt"
CONFIG = "config.json"
DATASET = "dataset.json"
ITEM_TOKENS = "item_tokens.json"
USER_TOKENS = "user_tokens.json"
POPULARITY = "item_popularity.npy"
DATASET_TENSORS = "dataset_tensors.pt"
ITEM_TABLE = "item_table.npy"
ITEM_UNIT = "item_unit.npy"
MAPPED_TABLES = (ITEM_TABLE, ITEM_UNIT)
_ROWS_PER_STEP = 1 << 20  # the unit table is written this many rows at a time (10M x 64 is 2.6 GB)
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
    """The artifact's files from what they hold (``write_artifact``; bench/gpu.py's synthetic models).
    The item table goes to its own mapped files (``write_item_table``) where the model has one."""
    key = table_key(spec)
    table = state.get(key) if key is not None else None
    if (
        table is not None
        and table.dim() == 2
        and table.dtype == torch.float32
        and len(table) >= len(item_tokens)
    ):
        state = {k: v for k, v in state.items() if k != key}
        write_item_table(directory, table, len(item_tokens))
    torch.save(state, directory / WEIGHTS)
    (directory / CONFIG).write_text(json.dumps(config, indent=1, sort_keys=True))
    (directory / DATASET).write_text(json.dumps(info, indent=1, sort_keys=True))
    (directory / ITEM_TOKENS).write_text(json.dumps(item_tokens))
    if user_tokens is not None:
        (directory / USER_TOKENS).write_text(json.dumps(user_tokens))
    np.save(directory / POPULARITY, popularity, allow_pickle=False)
    if extra:
        torch.save(extra, directory / DATASET_TENSORS)


def table_key(spec: ModelSpec) -> str | None:
    """The state_dict key of the model's item table, None where the spec names none."""
    return f"{spec.item_table}.weight" if spec.item_table else None


def unit_rows(table: torch.Tensor) -> torch.Tensor:
    """*table*'s rows scaled to unit length (an all-zero row, the padding item's, stays zero):
    cosine between items is then a dot product."""
    return F.normalize(table.float(), dim=1)


def write_item_table(directory: Path, table: torch.Tensor, n_items: int) -> None:
    """``item_table.npy`` (the whole table) and ``item_unit.npy`` (``unit_rows`` of its first
    *n_items* rows), as plain C-ordered float32 .npy files."""
    table = table.detach().cpu().contiguous()
    np.save(directory / ITEM_TABLE, table.numpy(), allow_pickle=False)
    unit = np.lib.format.open_memmap(
        directory / ITEM_UNIT, mode="w+", dtype=np.float32, shape=(n_items, table.shape[1])
    )
    for start in range(0, n_items, _ROWS_PER_STEP):
        end = min(start + _ROWS_PER_STEP, n_items)
        unit[start:end] = unit_rows(table[start:end]).numpy()
    unit.flush()
    del unit


def file_digests(directory: Path) -> dict[str, str]:
    """sha256 of every regular file in the artifact directory, by file name; read 1 MiB at a time
    (every server process verifies the stored files, and a 10M-item table is 2.6 GB)."""
    out = {}
    for path in sorted(Path(directory).iterdir()):
        if path.is_file():
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
            out[path.name] = digest.hexdigest()
    return out


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
    # item_unit.npy mapped, [n_items, H]; None for models stored without it (computed at start-up)
    unit: torch.Tensor | None = None

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
    for name in MAPPED_TABLES:  # a table the loader would map must be one the import recorded
        if os.path.lexists(Path(directory) / name) and name not in expected:
            raise ArtifactError(f"integrity check failed: stored file {name} was not recorded at import")
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
    state = _mapped_weights(directory / WEIGHTS) if load_weights else {}
    unit = None
    if load_weights and os.path.lexists(directory / ITEM_TABLE):
        key = table_key(spec)
        if key is None:
            raise ArtifactError(f"stored file {ITEM_TABLE}: {spec.name} has no item table")
        if key in state:
            raise ArtifactError(f"stored file {ITEM_TABLE}: {WEIGHTS} holds {key} too")
        state[key] = map_table(directory / ITEM_TABLE)
        unit = map_table(directory / ITEM_UNIT, rows=len(item_tokens), cols=state[key].shape[1])
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
        unit=unit,
    )


def _open_regular(path: Path) -> int:
    """A read-only descriptor of *path*, which must be a regular file and not a link (a stored
    model's files are its own, never pointers elsewhere)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        kind = "a link" if os.path.islink(path) else exc.strerror
        raise ArtifactError(f"stored file {path.name} cannot be opened ({kind})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ArtifactError(f"stored file {path.name} is not a regular file")
    return fd


def _mapped_weights(path: Path) -> dict[str, torch.Tensor]:
    """weights.pt, its tensors mapped from the file (copy-on-write: a write stays in the process
    that made it; the engine never writes them)."""
    os.close(_open_regular(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises several kinds for a file that is not a tensors-only zip
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        raise ArtifactError(f"stored file {path.name} cannot be read as tensors ({reason})") from None


def map_table(path: Path, rows: int | None = None, cols: int | None = None) -> torch.Tensor:
    """A stored .npy table mapped read-only (PROT_READ: a write faults instead of changing what
    the other workers read), as a tensor sharing the mapping. Refused with ArtifactError unless it
    is a regular file holding exactly a C-ordered 2-D little-endian float32 array of the size its
    header says (*rows*, *cols* where given)."""
    fd = _open_regular(path)
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"format version {version}")
        except ValueError as exc:
            raise ArtifactError(f"stored file {path.name} is not a NumPy table ({exc})") from None
        if dtype != np.dtype("<f4") or fortran or len(shape) != 2 or 0 in shape:
            order = "Fortran-ordered " if fortran else ""
            raise ArtifactError(
                f"stored file {path.name} holds a {order}{dtype} array of shape {shape}, "
                "not a 2-D float32 table"
            )
        if (rows is not None and shape[0] != rows) or (cols is not None and shape[1] != cols):
            raise ArtifactError(
                f"stored file {path.name} has shape {shape}, the model needs ({rows}, {cols})"
            )
        offset = f.tell()
        if size != offset + 4 * shape[0] * shape[1]:
            raise ArtifactError(
                f"stored file {path.name} is {size} bytes, its header says {offset + 4 * shape[0] * shape[1]}"
            )
        array = np.memmap(f, dtype=np.float32, mode="r", offset=offset, shape=shape)
    with warnings.catch_warnings():  # torch warns that the array is not writable: that is the point
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)
