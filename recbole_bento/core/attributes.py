"""Filterable item attributes: read at import, stored pickle-free next to the model, compiled into
allow-lists at serving time.

They are business attributes (a category, a year, a price), not model inputs: the model never reads
them. They come from a RecBole atomic item file (``--item-features FILE.item``: tab-separated, header
``name:type``) or, without one, from the item features the Dataset itself loaded. Three RecBole
types are filterable:

* ``token``: one value per item; a filter lists values, an item passes when its value is listed;
* ``token_seq``: several values per item (space-separated in the file, as RecBole's
  ``seq_separator``); an item passes when any of its values is listed;
* ``float``: an item passes when its value lies in ``{"gte": lo, "lte": hi}`` (either bound may
  be left out).

Several fields in one filter must all pass. An item missing from the file (or with an empty cell)
has no value for the field and passes no filter on it.

Stored as ``item_attributes.json``, aligned with the internal item ids (index 0 is RecBole's
padding and never passes): per field its type and, for token types, a vocabulary and per item the
vocabulary indices (``-1``/``[]`` = no value); for floats the values (``null`` = no value).
"""

from __future__ import annotations

import csv
import json
import math
import weakref
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .ranking import Allowed

FILE = "item_attributes.json"
# What ItemAttributes.load has loaded in this process, by file and version; weak, so that the
# attributes of a model no longer served are freed with it.
_LOADED: weakref.WeakValueDictionary[tuple[Any, ...], ItemAttributes] = weakref.WeakValueDictionary()
TYPES = ("token", "token_seq", "float")
Filters = dict[str, Any]  # normalised: token fields -> sorted list[str]; float -> {"gte"?, "lte"?}
_EXAMPLES = 5  # example values /model_info shows per field
_CACHE = 256  # compiled filters kept per process (category pages repeat the same filter)


class ItemFeaturesError(ValueError):
    """An item-features file that cannot be read; the message names the file and what is wrong."""


class FilterError(ValueError):
    """A filter this model cannot apply; the message names the filterable fields."""


class _Field:
    """One attribute over the catalogue, ready to be matched."""

    def __init__(self, kind: str, n_items: int, vocab: list[str], values: list[Any]) -> None:
        self.kind = kind
        self.vocab = vocab
        self.index = {token: i for i, token in enumerate(vocab)}
        if kind == "float":
            self.values = np.array([math.nan if v is None else v for v in values], dtype=np.float64)
        elif kind == "token":
            self.codes = np.asarray(values, dtype=np.int64)
        else:  # token_seq: every (item, code) pair, flattened
            lengths = np.fromiter((len(v) for v in values), dtype=np.int64, count=n_items)
            self.owner = np.repeat(np.arange(n_items), lengths)
            self.flat = np.fromiter((c for v in values for c in v), dtype=np.int64, count=int(lengths.sum()))
            self.starts = np.concatenate(([0], np.cumsum(lengths)))  # item i: flat[starts[i] : starts[i + 1]]
        self._lowered: np.ndarray | None = None  # the vocabulary in lower case, for text search

    def match(self, condition: Any, n_items: int) -> np.ndarray:
        if self.kind == "float":
            out = ~np.isnan(self.values)
            if "gte" in condition:
                out &= self.values >= condition["gte"]
            if "lte" in condition:
                out &= self.values <= condition["lte"]
            return out
        wanted = np.array([self.index[v] for v in condition if v in self.index], dtype=np.int64)
        if self.kind == "token":
            return np.isin(self.codes, wanted)
        out = np.zeros(n_items, dtype=bool)
        out[self.owner[np.isin(self.flat, wanted)]] = True
        return out

    def value(self, item: int) -> Any:
        """Item *item*'s value as stored at import (a token, a list of tokens, a float); None: none."""
        if self.kind == "float":
            value = float(self.values[item])
            return None if math.isnan(value) else value
        if self.kind == "token":
            code = int(self.codes[item])
            return None if code < 0 else self.vocab[code]
        codes = self.flat[self.starts[item] : self.starts[item + 1]]
        return [self.vocab[c] for c in codes.tolist()] or None

    def containing(self, text: str, n_items: int) -> np.ndarray:
        """The items with a token that contains *text* (lower case), as a mask; floats match nothing."""
        if self.kind == "float":
            return np.zeros(n_items, dtype=bool)
        if self._lowered is None:
            self._lowered = np.char.lower(np.array(self.vocab, dtype=str))
        wanted = np.flatnonzero(np.char.find(self._lowered, text) >= 0)
        if self.kind == "token":
            return np.isin(self.codes, wanted)
        out = np.zeros(n_items, dtype=bool)
        out[self.owner[np.isin(self.flat, wanted)]] = True
        return out

    def examples(self) -> list[Any]:
        if self.kind == "float":
            present = self.values[~np.isnan(self.values)]
            return sorted({float(v) for v in present[:1000]})[:_EXAMPLES]
        return self.vocab[:_EXAMPLES]


class ItemAttributes:
    """The filterable attributes of one stored model, aligned with its internal item ids."""

    def __init__(self, stored: Mapping[str, Any], n_items: int) -> None:
        self.n_items = n_items
        self.fields = {
            name: _Field(f["type"], n_items, f.get("vocab", []), f["values"]) for name, f in stored.items()
        }
        self._compiled: OrderedDict[str, Allowed] = OrderedDict()

    @classmethod
    def load(cls, directory: Path, n_items: int) -> ItemAttributes | None:
        """The attributes stored in an artifact directory; None when it has none. One copy per file
        in a process: a worker's request schema, planner and engine share it (and its compiled
        filters) however many times they load it."""
        path = Path(directory) / FILE
        if not path.is_file():
            return None
        stat = path.stat()
        key = (str(path.resolve()), n_items, stat.st_ino, stat.st_size, stat.st_mtime_ns)
        loaded = _LOADED.get(key)
        if loaded is None:
            stored = json.loads(path.read_text())
            if not stored:
                return None
            loaded = _LOADED[key] = cls(stored, n_items)
        return loaded

    def kinds(self) -> dict[str, str]:
        """Every filterable field with its type (``token``, ``token_seq``, ``float``)."""
        return {name: f.kind for name, f in self.fields.items()}

    def describe(self) -> dict[str, dict[str, Any]]:
        """For /model_info: every filterable field with its type and a few example values."""
        return {name: {"type": f.kind, "examples": f.examples()} for name, f in self.fields.items()}

    def of(self, item: int) -> dict[str, Any]:
        """Every attribute item *item* has (internal id), by field; fields without a value are left out."""
        values = {name: f.value(item) for name, f in self.fields.items()}
        return {name: value for name, value in values.items() if value is not None}

    def containing(self, text: str) -> np.ndarray:
        """The items with a token value (in any token or token_seq field) that contains *text*, in
        lower case, as a mask over the internal ids."""
        out = np.zeros(self.n_items, dtype=bool)
        for field in self.fields.values():
            out |= field.containing(text, self.n_items)
        return out

    def normalize(self, filters: Mapping[str, Any]) -> Filters:
        """Check a request's filter against the fields and return it in canonical form (values as
        strings, sorted); FilterError says what is wrong and lists the filterable fields."""
        out: Filters = {}
        for name, condition in filters.items():
            field = self.fields.get(name)
            if field is None:
                raise FilterError(f"filters: unknown field {name!r}; {self._listing()}")
            out[name] = _condition(name, field.kind, condition, self._listing())
        return dict(sorted(out.items()))

    def compile(self, filters: Filters) -> Allowed:
        """The items that pass a normalised filter (the padding item never does). The last few
        filters compiled are cached: the tensors are shared, never modify them."""
        key = json.dumps(filters, sort_keys=True)
        hit = self._compiled.get(key)
        if hit is not None:
            self._compiled.move_to_end(key)
            return hit
        allowed = np.ones(self.n_items, dtype=bool)
        for name, condition in filters.items():
            allowed &= self.fields[name].match(condition, self.n_items)
        allowed[0] = False
        out = Allowed.from_mask(torch.from_numpy(allowed))
        self._compiled[key] = out
        if len(self._compiled) > _CACHE:
            self._compiled.popitem(last=False)
        return out

    def _listing(self) -> str:
        return "filterable fields: " + ", ".join(f"{n} ({f.kind})" for n, f in self.fields.items())


def _condition(name: str, kind: str, condition: Any, listing: str) -> Any:
    if kind == "float":
        if (
            not isinstance(condition, dict)
            or not condition
            or set(condition) - {"gte", "lte"}
            or not all(_is_number(v) for v in condition.values())
        ):
            raise FilterError(
                f'filters.{name}: a float field takes {{"gte": number, "lte": number}} '
                f"(either may be left out), got {_shown(condition)}; {listing}"
            )
        return {bound: float(condition[bound]) for bound in sorted(condition)}
    if (
        not isinstance(condition, list)
        or not condition
        or not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in condition)
    ):
        raise FilterError(
            f"filters.{name}: a {kind} field takes a non-empty list of values (strings or integers), "
            f"got {_shown(condition)}; {listing}"
        )
    return sorted({str(v) for v in condition})


def _shown(value: Any, limit: int = 80) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---------------------------------------------------------------- import


def from_item_file(path: Path, item_field: str, item_tokens: Sequence[str]) -> dict[str, Any]:
    """The stored form of a RecBole atomic item file's filterable columns, aligned with
    *item_tokens* (the model's internal order). Columns of other types and the item id are skipped;
    rows of items the model does not know are ignored."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            header = next(reader, None)
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ItemFeaturesError(f"--item-features {path}: cannot read it ({exc})") from exc
    if not header:
        raise ItemFeaturesError(f"--item-features {path}: the file is empty")
    columns = []
    for col in header:
        name, sep, kind = col.partition(":")
        if not sep or not name:
            raise ItemFeaturesError(f"--item-features {path}: header column {col!r} is not name:type")
        columns.append((name, kind))
    names = [n for n, _ in columns]
    if item_field not in names:
        raise ItemFeaturesError(
            f"--item-features {path}: no {item_field} column (the model's item id field); header: {header}"
        )
    id_col = names.index(item_field)
    position = {token: i for i, token in enumerate(item_tokens) if i}
    raw: dict[str, list[Any]] = {n: [None] * len(item_tokens) for n, k in columns if k in TYPES}
    for line, row in enumerate(rows, start=2):
        if not row:
            continue
        if len(row) != len(columns):
            raise ItemFeaturesError(
                f"--item-features {path}: line {line} has {len(row)} columns, the header {len(columns)}"
            )
        item = position.get(row[id_col])
        if item is None:
            continue
        for (name, kind), cell in zip(columns, row, strict=True):
            if name in raw and cell != "":
                raw[name][item] = _cell(path, line, name, kind, cell)
    return {
        name: encode_field(dict(columns)[name], values) for name, values in raw.items() if name != item_field
    }


def from_dataset(dataset: Any) -> dict[str, Any]:
    """The stored form of the item features the RecBole Dataset loaded (its ``item_feat``: a
    DataFrame before ``build()``, as a pickled Dataset usually is, an Interaction after), as the
    external values: RecBole remaps token fields to ids, mapped back here (0 = no value)."""
    from recbole.utils import FeatureType

    feat = getattr(dataset, "item_feat", None)
    if feat is None:
        return {}
    kinds = {FeatureType.TOKEN: "token", FeatureType.TOKEN_SEQ: "token_seq", FeatureType.FLOAT: "float"}
    n_items = len(dataset.field2id_token[dataset.iid_field])
    items = [int(i) for i in feat[dataset.iid_field].tolist()]
    out: dict[str, Any] = {}
    for name in list(feat.columns):
        kind = kinds.get(dataset.field2type.get(name))
        if name == dataset.iid_field or kind is None:
            continue
        column = feat[name].tolist()
        if kind == "float":
            cells = [None if math.isnan(v) else float(v) for v in column]
        else:
            tokens = dataset.field2id_token[name]
            if kind == "token":
                cells = [str(tokens[int(v)]) if int(v) else None for v in column]
            else:
                cells = [[str(tokens[int(t)]) for t in row if int(t)] or None for row in column]
        values: list[Any] = [None] * n_items
        for item, cell in zip(items, cells, strict=True):
            if 0 < item < n_items:
                values[item] = cell
        out[name] = encode_field(kind, values)
    return out


def store(directory: Path, dataset: Any, item_features: Path | None = None) -> None:
    """At import: write the filterable attributes into the artifact directory, from
    *item_features* (an atomic item file) or else from the Dataset's own item features; nothing
    when there are none. ItemFeaturesError for a file that cannot be read."""
    if item_features is not None:
        tokens = [str(t) for t in dataset.field2id_token[dataset.iid_field]]
        stored = from_item_file(item_features, dataset.iid_field, tokens)
    else:
        stored = from_dataset(dataset)
    if stored:
        (Path(directory) / FILE).write_text(json.dumps(stored, separators=(",", ":")))


def _cell(path: Path, line: int, name: str, kind: str, cell: str) -> Any:
    if kind == "token":
        return cell
    if kind == "token_seq":
        return cell.split() or None
    try:
        value = float(cell)
    except ValueError:
        raise ItemFeaturesError(f"--item-features {path}: line {line}: {name}:float is {cell!r}") from None
    return value if math.isfinite(value) else None


def encode_field(kind: str, values: list[Any]) -> dict[str, Any]:
    """One field in the stored form: values per internal id (None = no value) -> vocabulary codes."""
    if kind == "float":
        return {"type": kind, "values": values}
    vocab: dict[str, int] = {}
    if kind == "token":
        codes: list[Any] = [-1 if v is None else vocab.setdefault(v, len(vocab)) for v in values]
    else:
        codes = [[vocab.setdefault(t, len(vocab)) for t in dict.fromkeys(v)] if v else [] for v in values]
    return {"type": kind, "vocab": list(vocab), "values": codes}
