"""An approximate maximum-inner-product index over a model's item table (opt-in per model).

For a model that scores ``query @ item_embedding.T`` (``ModelSpec.dot_product``) the exact top-k
costs one dot product per catalogue item per request. An index (faiss: ``ivf`` = inverted lists
of 8-bit scalar-quantised vectors, ``hnsw`` = a graph over the float vectors) finds a few hundred
*candidates* per query instead, and the engine re-ranks them exactly with the model's own fp32
scores (``blockwise.rescore``): every returned score is the exact one, only the candidate set is
approximate. How often the served top-10 equals the exact top-10 (recall@10) is measured when the
index is built, on query vectors the model computes for real histories, and the search width
(``nprobe`` / ``efSearch``) is the smallest that meets the floor the user sets; the figure is
stored with the index and shown by /model_info.

The index lives in the model's folder as two files: ``retrieval_index.json`` (parameters, recall,
the index file's size and sha256) and ``retrieval_index.faiss`` (faiss's serialisation). faiss's
reader is not hardened against crafted input, so loading checks the size, then the sha256 of the
very bytes it will parse, then the header, and only then deserialises them from memory; the
index's shape is compared with the model's item table afterwards.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import numpy as np
import torch

from .artifact import ArtifactError
from .blockwise import rescore
from .ranking import BatchMask, RankQuery

INDEX_FILE = "retrieval_index.faiss"
INDEX_META = "retrieval_index.json"
KINDS = ("ivf", "hnsw")
EXTRA = "pip install 'recbole-bento[index]'"
RECALL_K = 10  # the recall that is measured, stored and held to the floor
CANDIDATES = 200  # items searched per query before the exact re-ranking (at least 4 x topk)
RECALL_QUERIES = 1000  # histories the recall is measured on (at most)
MAX_EF = 16_384  # hnsw: the widest search tried at build, and allowed for filtered rows
HNSW_M = 32
_MAX_META_BYTES = 64 * 1024
_FOURCC = {"ivf": b"IwSq", "hnsw": b"IHNf"}  # faiss's header of each kind's index type
_EXACT_SCORES_PER_CALL = 2**27  # queries x items scored at once when measuring the exact top-k


class RetrievalIndexError(ArtifactError):
    """The index cannot be built, loaded or used as asked; one line that says why."""


def faiss_module() -> ModuleType:
    """faiss, or RetrievalIndexError naming the optional extra that installs it."""
    try:
        import faiss
    except ImportError:
        raise RetrievalIndexError(
            f"this model has a retrieval index, which needs faiss: {EXTRA} (or re-import the model "
            "without --index)"
        ) from None
    return faiss


def require(metadata: dict[str, Any]) -> None:
    """At server start-up: a model imported with an index cannot be served without faiss."""
    if metadata.get("retrieval_index"):
        faiss_module()


class Progress(Protocol):
    def step(self, text: str) -> None: ...

    def bar(self, total: int, unit: str) -> Any: ...


@dataclass(frozen=True)
class IndexParams:
    """What was built and measured; stored as retrieval_index.json and in the model's metadata."""

    kind: str
    n_items: int  # rows indexed: the item table's, padding row 0 included (never returned)
    dim: int
    candidates: int
    nlist: int  # ivf: inverted lists (0 for hnsw)
    nprobe: int  # ivf: lists searched per query
    m: int  # hnsw: links per node (0 for ivf)
    ef_search: int  # hnsw: search width
    recall_at_10: float  # of the served top-10 against the exact one, at these settings
    min_recall: float
    recall_queries: int
    query_source: str
    build_s: float
    bytes: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: Any) -> IndexParams:
        """Refuse anything but the exact fields with the exact types."""
        names = {f.name: f.type for f in fields(cls)}
        if not isinstance(raw, dict) or set(raw) != set(names):
            raise RetrievalIndexError(f"{INDEX_META} does not describe a retrieval index")
        for name, kind in names.items():
            value = raw[name]
            want = {"str": str, "int": int, "float": (int, float)}[str(kind)]
            if isinstance(value, bool) or not isinstance(value, want):
                raise RetrievalIndexError(f"{INDEX_META}: {name} is {type(value).__name__}")
        params = cls(**raw)
        if params.kind not in KINDS or min(params.n_items, params.dim, params.candidates, params.bytes) <= 0:
            raise RetrievalIndexError(f"{INDEX_META}: kind, sizes or candidate count out of range")
        return params

    def describe(self) -> str:
        width = (
            f"nlist={self.nlist}, nprobe={self.nprobe}"
            if self.kind == "ivf"
            else (f"M={self.m}, efSearch={self.ef_search}")
        )
        return f"{self.kind} ({width}), recall@{RECALL_K} {self.recall_at_10:.3f}"


class RetrievalIndex:
    """A loaded index: candidate search, with per-row allow-lists, on the CPU."""

    def __init__(self, index: Any, params: IndexParams, faiss: ModuleType) -> None:
        self.index = index
        self.params = params
        self._faiss = faiss

    # ------------------------------------------------------------------ loading

    @staticmethod
    def present(directory: Path) -> bool:
        """Whether *directory* (a stored model) has index files, complete or not."""
        return (Path(directory) / INDEX_META).exists() or (Path(directory) / INDEX_FILE).exists()

    @classmethod
    def load(cls, directory: Path, n_items: int, dim: int) -> RetrievalIndex | None:
        """The index stored in *directory*, checked against the model's table (*n_items* rows of
        *dim*); None when the model has none. RetrievalIndexError says what is wrong."""
        meta_path, path = Path(directory) / INDEX_META, Path(directory) / INDEX_FILE
        if not cls.present(directory):
            return None
        faiss = faiss_module()
        params = IndexParams.from_json(_read_json(meta_path))
        if (params.n_items, params.dim) != (n_items, dim):
            raise RetrievalIndexError(
                f"the retrieval index covers {params.n_items} items of {params.dim} dimensions, "
                f"the model's item table {n_items} of {dim}: rebuild it"
            )
        if not path.is_file():
            raise RetrievalIndexError(f"{INDEX_FILE} is missing or not a regular file")
        size = path.stat().st_size
        if size != params.bytes:
            raise RetrievalIndexError(f"{INDEX_FILE} is {size} bytes, {params.bytes} were written")
        with open(path, "rb") as f:
            data = f.read(params.bytes + 1)
        if len(data) != params.bytes or hashlib.sha256(data).hexdigest() != params.sha256:
            raise RetrievalIndexError(f"{INDEX_FILE} does not match the sha256 recorded when it was built")
        if data[:4] != _FOURCC[params.kind]:
            raise RetrievalIndexError(f"{INDEX_FILE} is not a faiss {params.kind} index")
        try:
            index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        except RuntimeError as exc:
            reason = " ".join(str(exc).split())[:200]
            raise RetrievalIndexError(f"{INDEX_FILE} cannot be read: {reason}") from None
        loaded = cls(index, params, faiss)
        loaded._check(index)
        # faiss's OpenMP threads as many as torch's: a worker sized to one core stays on one
        faiss.omp_set_num_threads(torch.get_num_threads())
        return loaded

    def _check(self, index: Any) -> None:
        p, faiss = self.params, self._faiss
        kind = {"ivf": faiss.IndexIVFScalarQuantizer, "hnsw": faiss.IndexHNSWFlat}[p.kind]
        if not isinstance(index, kind) or index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise RetrievalIndexError(f"{INDEX_FILE} is not an inner-product {p.kind} index")
        if index.d != p.dim or index.ntotal != p.n_items:
            raise RetrievalIndexError(
                f"{INDEX_FILE} holds {index.ntotal} vectors of {index.d} dimensions, "
                f"{p.n_items} of {p.dim} were recorded"
            )
        if p.kind == "ivf" and (index.nlist != p.nlist or not 0 < p.nprobe <= p.nlist):
            raise RetrievalIndexError(f"{INDEX_FILE}: {index.nlist} lists, {p.nlist} were recorded")
        if p.kind == "hnsw" and not 0 < p.ef_search <= MAX_EF:
            raise RetrievalIndexError(f"{INDEX_META}: efSearch {p.ef_search} out of range")

    # ------------------------------------------------------------------ searching

    def width(self, allowed: int) -> int:
        """nprobe (ivf) or efSearch (hnsw) for a row that may return *allowed* of the items: the
        stored one, scaled by the share of items filtered out, so that about as many allowed
        items are reached as without a filter."""
        p = self.params
        base, top = (p.nprobe, p.nlist) if p.kind == "ivf" else (p.ef_search, MAX_EF)
        return min(top, math.ceil(base * p.n_items / max(allowed, 1)))

    def prefers_exact(self, allowed: int) -> bool:
        """Whether scoring a row's *allowed* items exactly costs no more vector products than
        searching the index for it (at ``width(allowed)``): true for small allow-lists."""
        p = self.params
        if p.kind == "ivf":
            cost = p.nlist + self.width(allowed) * p.n_items / p.nlist
        else:
            cost = self.width(allowed) * 2 * p.m
        return allowed <= max(cost, 4 * p.candidates)

    def search(self, q: np.ndarray, k: int, allowed: Sequence[torch.Tensor | None]) -> np.ndarray:
        """[rows, k] candidate item ids (-1: none) for the float32 query vectors *q*; row r only
        among the items of its bool mask ``allowed[r]`` (None: any item)."""
        out = np.full((q.shape[0], k), -1, dtype=np.int64)
        free = [r for r, a in enumerate(allowed) if a is None]
        if free:
            out[free] = self.index.search(q[free], k, params=self._params(None, None))[1]
        for r, mask in enumerate(allowed):
            if mask is not None:
                bits = np.packbits(mask.cpu().numpy(), bitorder="little")
                selector = self._faiss.IDSelectorBitmap(mask.numel(), self._faiss.swig_ptr(bits))
                params = self._params(selector, self.width(int(mask.sum())))
                out[r] = self.index.search(q[r : r + 1], k, params=params)[1][0]
        return out

    def _params(self, selector: Any, width: int | None) -> Any:
        p, faiss = self.params, self._faiss
        extra = {} if selector is None else {"sel": selector}
        if p.kind == "ivf":
            return faiss.SearchParametersIVF(nprobe=width or p.nprobe, **extra)
        return faiss.SearchParametersHNSW(efSearch=max(width or p.ef_search, 1), **extra)


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise RetrievalIndexError(f"{INDEX_META} is missing or not a regular file")
    if path.stat().st_size > _MAX_META_BYTES:
        raise RetrievalIndexError(f"{INDEX_META} is larger than {_MAX_META_BYTES} bytes")
    try:
        return json.loads(path.read_bytes())
    except (ValueError, RecursionError) as exc:
        raise RetrievalIndexError(f"{INDEX_META} is not JSON: {exc}") from None


# ---------------------------------------------------------------------- building


def exact_top(table: torch.Tensor, q: torch.Tensor, k: int = RECALL_K) -> torch.Tensor:
    """[Q, k] item ids of the exact top-k of ``q @ table.T`` (padding item 0 never), a few queries
    at a time (the whole [Q, n_items] matrix of a large catalogue would not fit)."""
    step = max(1, _EXACT_SCORES_PER_CALL // table.shape[0])
    out = []
    for start in range(0, q.shape[0], step):
        scores = q[start : start + step] @ table.T
        scores[:, 0] = float("-inf")
        out.append(torch.topk(scores, k, dim=1).indices)
    return torch.cat(out)


def served_top(index: RetrievalIndex, table: torch.Tensor, q: torch.Tensor, k: int) -> torch.Tensor:
    """[Q, k] item ids the engine would serve for unfiltered queries *q*: the index's candidates
    re-ranked exactly (``blockwise.rescore``, the engine's re-ranking), in batches of 64 queries
    (the service's largest by default)."""
    width = max(index.params.candidates, 4 * k)
    out = []
    for start in range(0, q.shape[0], 64):
        part = q[start : start + 64]
        ids = torch.from_numpy(index.search(part.numpy(), width, [None] * part.shape[0]))
        mask = BatchMask([RankQuery([], k)] * part.shape[0], table.shape[0])
        result = rescore(part, table, ids, mask, k)
        assert result is not None  # no union limit was given
        out.append(result[1])
    return torch.cat(out)


def recall(served: torch.Tensor, exact: torch.Tensor) -> float:
    """Mean share of each row's exact ids found in its served ids."""
    hits = (served.unsqueeze(2) == exact.unsqueeze(1)).any(1).sum().item()
    return hits / exact.numel()


def build(
    table: torch.Tensor,
    kind: str,
    q: torch.Tensor,
    min_recall: float,
    *,
    query_source: str,
    progress: Progress,
    max_width: int | None = None,
) -> tuple[bytes, IndexParams]:
    """Build a *kind* index over *table* ([n_items, dim] float32, CPU) and tune its search width on
    the query vectors *q* ([Q, dim], from real histories) to the smallest whose recall@10 meets
    *min_recall*; RetrievalIndexError when none up to *max_width* (default: all lists, or
    MAX_EF) does. Returns the serialised index and its parameters (bytes and sha256 included)."""
    faiss = faiss_module()
    if kind not in KINDS:
        raise RetrievalIndexError(f"--index {kind!r}: choose one of {', '.join(KINDS)}")
    if not 0 < min_recall <= 1:
        raise RetrievalIndexError(f"--min-recall {min_recall}: a recall between 0 (excluded) and 1")
    started = time.perf_counter()
    table = table.detach().float().contiguous()
    n, dim = table.shape
    if n <= RECALL_K:
        raise RetrievalIndexError(f"a catalogue of {n - 1} items needs no retrieval index")
    vectors = table.numpy()
    if kind == "ivf":
        # about sqrt(n) lists (a power of two), each trained on 40 items (faiss asks for 39)
        nlist = max(1, min(2 ** round(math.log2(math.sqrt(n))), n // 40))
        index = faiss.IndexIVFScalarQuantizer(
            faiss.IndexFlatIP(dim), dim, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
        )
        index.cp.niter = 10  # k-means iterations: the build stays minutes at 10M items on 2 cores
        progress.step(f"training the ivf index's {nlist} lists on {min(n, 40 * nlist):,} items")
        sample = np.random.default_rng(0).choice(n, size=min(n, 40 * nlist), replace=False)
        index.train(vectors[np.sort(sample)])
        widths = [w for w in _doubling(1, nlist) if max_width is None or w <= max_width]
    else:
        nlist = 0
        index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        top = min(MAX_EF, max_width or MAX_EF)
        widths = [w for w in _doubling(16, MAX_EF) if w <= top] or [top]
    progress.step(f"adding {n:,} items to the {kind} index")
    with progress.bar(n, "items") as advance:
        for start in range(0, n, 65536):
            index.add(vectors[start : start + 65536])
            advance(min(65536, n - start))
    progress.step(f"measuring recall@{RECALL_K} against the exact top-{RECALL_K} on {q.shape[0]} queries")
    exact = exact_top(table, q.float())
    params = IndexParams(
        kind=kind, n_items=n, dim=dim, candidates=CANDIDATES, nlist=nlist, nprobe=0,
        m=HNSW_M if kind == "hnsw" else 0, ef_search=0, recall_at_10=0.0, min_recall=min_recall,
        recall_queries=int(q.shape[0]), query_source=query_source, build_s=0.0, bytes=0, sha256="",
    )  # fmt: skip
    loaded = RetrievalIndex(index, params, faiss)
    reached = 0.0
    for width in widths:
        setting = {"nprobe": width} if kind == "ivf" else {"ef_search": max(width, CANDIDATES)}
        loaded.params = params = _replace(params, **setting)
        reached = recall(served_top(loaded, table, q.float(), RECALL_K), exact)
        if reached >= min_recall:
            break
    else:
        name = "nprobe" if kind == "ivf" else "efSearch"
        raise RetrievalIndexError(
            f"the {kind} index reaches recall@{RECALL_K} {reached:.3f} at {name}={widths[-1]} (the widest "
            f"search allowed), below --min-recall {min_recall}: import without --index, or lower the floor"
        )
    if kind == "hnsw":
        index.hnsw.efSearch = params.ef_search
    else:
        index.nprobe = params.nprobe
    data = faiss.serialize_index(index).tobytes()
    params = _replace(
        params,
        recall_at_10=round(reached, 4),
        build_s=round(time.perf_counter() - started, 1),
        bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )
    return data, params


def write(directory: Path, data: bytes, params: IndexParams) -> None:
    (Path(directory) / INDEX_FILE).write_bytes(data)
    (Path(directory) / INDEX_META).write_text(json.dumps(params.to_json(), indent=1, sort_keys=True))


def _doubling(start: int, stop: int) -> list[int]:
    out = []
    while start < stop:
        out.append(start)
        start *= 2
    return [*out, stop]


def _replace(params: IndexParams, **changes: Any) -> IndexParams:
    return IndexParams(**{**params.to_json(), **changes})


def histories_from_popularity(
    popularity: np.ndarray, window: int, count: int, seed: int = 0
) -> list[list[int]]:
    """*count* histories of 1..min(window, 20) items drawn by training popularity (every item
    counted once more, so unseen ones can appear): the queries a stored model's index is tuned
    on when no real histories are given."""
    rng = np.random.default_rng(seed)
    weights = popularity[1:].astype(np.float64) + 1.0
    weights /= weights.sum()
    lengths = rng.integers(1, min(window, 20) + 1, size=count)
    items = rng.choice(len(weights), size=int(lengths.sum()), p=weights) + 1
    return [chunk.tolist() for chunk in np.split(items, np.cumsum(lengths)[:-1])]
