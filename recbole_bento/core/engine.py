"""Batched inference: pad histories as RecBole does, call the model's own full_sort_predict,
mask, take the top-k. No HTTP here; the ranking service, the batch scorer and the benchmarks call
it directly. For models that score by a dot product with their item table (``ModelSpec.dot_product``)
large catalogues are ranked by an exact top-k of ``blockwise.py`` instead: the block top-k on a
CPU, chunked scoring on a GPU (``exact_scorer``).

Similar-item queries (``RankQuery.kind == "similar"``) and explanations compare items by cosine in
the model's item table (``ModelSpec.item_table``): with its rows L2-normalised once at start-up,
cosine is a dot product, so they go through the same masks and the same exact (block) top-k."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from recbole.data.interaction import Interaction

from .artifact import Artifact, ArtifactError, ServingConfig, unit_rows
from .attributes import ItemAttributes
from .blockwise import BlockTopK, ChunkedTopK, rescore, same_topk
from .index import RetrievalIndex, RetrievalIndexError
from .models import ModelSpec
from .ranking import NEG_INF, BatchMask, FilterCompiler, RankQuery, RankResult, apply_masks

EXPLAIN_ITEMS = 3  # history items named per returned item

_OTHER_PREFIX = "__other__."
logger = logging.getLogger("recbole_bento")


def pick_device(requested: str | None = None) -> torch.device:
    """*requested* ("cpu", "cuda", "cuda:1"), else CUDA when present. A name torch does not parse, or
    a CUDA device this machine lacks, is a ValueError naming RECBOLE_BENTO_DEVICE: service.py checks
    at import, so `bentoml serve` stops with the reason instead of restarting a failing worker."""
    if not requested:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"RECBOLE_BENTO_DEVICE={requested!r} is not a device: use cpu, cuda or cuda:<index>")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(
            f"RECBOLE_BENTO_DEVICE={requested!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    return device


def pad_histories(histories: Sequence[Sequence[int]], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RecBole's layout: the most recent *width* items, left-aligned, tail-padded with 0."""
    recent = [list(history[-width:]) for history in histories]
    lengths = [len(items) for items in recent]
    # one tensor from nested lists: per-row tensor writes cost more than the model on small catalogues
    seq = torch.tensor(
        [items + [0] * (width - n) for items, n in zip(recent, lengths, strict=True)], dtype=torch.long
    )
    return seq.view(len(recent), width), torch.tensor(lengths, dtype=torch.long)


def build_model(artifact: Artifact, device: torch.device) -> torch.nn.Module:
    """Instantiate the RecBole model class from the stored config and load its weights. The
    stored tensors become the parameters as they are (``assign``), not copied into the ones the
    constructor made: on a CPU the model reads the mapped files, one physical copy for every worker
    process (artifact.py); ``to(device)`` copies them to an accelerator."""
    config = ServingConfig(artifact.spec.serving_config(artifact.config))  # + the spec's build-time values
    config["device"] = device
    model = artifact.spec.model_class()(config, artifact.dataset)
    weights = {k: v for k, v in artifact.state_dict.items() if not k.startswith(_OTHER_PREFIX)}
    other = {
        k[len(_OTHER_PREFIX) :]: v.to(device)
        for k, v in artifact.state_dict.items()
        if k.startswith(_OTHER_PREFIX)
    }
    try:
        model.load_state_dict(weights, strict=True, assign=True)
    except RuntimeError as exc:
        raise ArtifactError(f"the weights do not fit {artifact.model_name}: {exc}") from exc
    model.load_other_parameter(other or None)
    return model.to(device).eval()


@dataclass
class TopK:
    """A batch's top-k as ``Engine.top_k`` ranks it, before ``Engine.results`` decodes it: per query
    kind, the rows of that kind with their [rows, k] scores and item ids, as NumPy arrays (a
    process that only ranks sends these to the one that decodes: two buffers, not k objects a row)."""

    parts: list[tuple[list[int], np.ndarray, np.ndarray]]
    indexed: list[int] = field(default_factory=list)  # the rows the retrieval index answered


class Engine:
    def __init__(self, artifact: Artifact, device: str | None = None, block_items: int = 8192) -> None:
        self.artifact = artifact
        self.device = pick_device(device)
        self.model = build_model(artifact, self.device)
        self.n_items = len(artifact.item_tokens)
        self._seq_field = artifact.item_seq_field
        self._len_field = artifact.item_seq_len_field
        self._uid_field = artifact.dataset.uid_field
        attributes = ItemAttributes.load(artifact.path, self.n_items)
        self.compile_filter = attributes.compile if attributes is not None else None
        # large catalogues, dot-product models: exact top-k without the B x N matrix
        self.block = block_ranker(self, block_items)
        # the item table with unit rows (None: the model has none): cosine = dot product
        self.unit = unit_table(self.model, artifact.spec.item_table, self.n_items, artifact.unit)
        # ... ranked by a block top-k of its own where the model's would be (same conditions)
        self.similar_block = None
        if self.unit is not None and 0 < 4 * block_items <= self.n_items:
            self.similar_block = exact_scorer(self.unit, self.n_items, block_items)
        # next items from a retrieval index's candidates, where the model was imported with one
        self.index = retrieval_index(self.model, artifact, self.n_items)

    def interaction(self, queries: Sequence[RankQuery]) -> Interaction:
        seq, lengths = pad_histories([q.history for q in queries], self.artifact.window)
        data = {self._seq_field: seq, self._len_field: lengths}
        if self.artifact.spec.needs_user:
            data[self._uid_field] = torch.tensor([q.user or 0 for q in queries], dtype=torch.long)
        if self.artifact.spec.target_placeholder:  # read only by the loss full_sort_predict also computes
            data[self.artifact.dataset.iid_field] = torch.ones(len(queries), dtype=torch.long)
        if self.device.type == "cuda":  # page-locked batches: faster host-to-device copies
            data = {k: v.pin_memory() for k, v in data.items()}
        return Interaction(data).to(self.device)

    @torch.inference_mode()
    def scores(self, queries: Sequence[RankQuery]) -> torch.Tensor:
        """[batch, n_items] scores exactly as the model's full_sort_predict computes them."""
        out = self.model.full_sort_predict(self.interaction(queries))
        return out.view(len(queries), -1)[:, : self.n_items]

    def rank(self, queries: Sequence[RankQuery]) -> list[RankResult]:
        """Answer a batch of queries of either kind, in order; ``explain`` ones get ``because``."""
        return self.results(queries, self.top_k(queries))

    @torch.inference_mode()
    def top_k(self, queries: Sequence[RankQuery]) -> TopK:
        """The model's part of ``rank``: each kind's rows and their top-k, not yet decoded."""
        top = TopK([])
        for kind in ("next", "similar"):
            rows = [row for row, query in enumerate(queries) if query.kind == kind]
            if not rows:
                continue
            part = [queries[row] for row in rows]
            k = min(max(q.topk for q in part), self.n_items)
            if kind == "next" and self.index is not None:
                values, indices, indexed = self._index_topk(part, k)
                top.indexed.extend(row for row, used in zip(rows, indexed, strict=True) if used)
            else:
                values, indices = (self._next_topk if kind == "next" else self._similar_topk)(part, k)
            top.parts.append((rows, values.cpu().numpy(), indices.cpu().numpy()))
        return top

    @torch.inference_mode()  # ``because`` runs torch ops, as it did inside ``rank``
    def results(self, queries: Sequence[RankQuery], top: TopK) -> list[RankResult]:
        """*top* (``top_k(queries)``) as one RankResult per query, in order: each query's own k
        items, masked ones left out; ``explain`` ones get ``because``."""
        results: list[RankResult | None] = [None] * len(queries)
        indexed = set(top.indexed)
        for rows, values, indices in top.parts:
            # as Python lists once: per-row indexing costs more than the model on small catalogues
            for row, vals, ids in zip(rows, values.tolist(), indices.tolist(), strict=True):
                k = queries[row].topk
                kept = [(i, v) for i, v in zip(ids[:k], vals[:k], strict=True) if v > NEG_INF]
                retrieval = "index" if row in indexed else "exact"
                results[row] = RankResult([i for i, _ in kept], [v for _, v in kept], retrieval=retrieval)
        for query, result in zip(queries, results, strict=True):
            if query.explain and result is not None:
                result.because = self.because(query.history, result.items)
        return cast(list[RankResult], results)  # every query is of one of the two kinds

    def _next_topk(self, queries: Sequence[RankQuery], k: int) -> tuple[torch.Tensor, torch.Tensor]:
        top = None
        if self.block is not None:
            top = self.block.topk(self.interaction(queries), queries, k, compile_filter=self.compile_filter)
        return top if top is not None else self.plain_topk(queries, k)

    def _index_topk(
        self, queries: Sequence[RankQuery], k: int
    ) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
        """Next items through the retrieval index: each row's candidates from the index (searched
        within its allow-list), or all the items of an allow-list small enough to score directly
        (``RetrievalIndex.prefers_exact``), re-ranked exactly as the block path's pass 2 does
        (``blockwise.rescore``). Also says, per row, whether the index answered it."""
        index = cast(RetrievalIndex, self.index)
        q = self.model_query(queries)
        mask = BatchMask(queries, self.n_items, q.device, self.compile_filter)
        direct = {row: ids for row, ids in mask.allowed_ids.items() if index.prefers_exact(ids.numel())}
        searched = [row for row in range(len(queries)) if row not in direct]
        excluded = max((len(queries[row].exclude) for row in searched), default=0)
        width = min(max(index.params.candidates, 4 * k) + excluded, self.n_items) if searched else 0
        ids = torch.full((len(queries), max(width, *map(len, direct.values()), 1)), -1, dtype=torch.long)
        if searched:
            found = index.search(q[searched].cpu().numpy(), width, [mask.allowed.get(r) for r in searched])
            ids[searched, :width] = torch.from_numpy(found)
        for row, allowed in direct.items():
            ids[row, : allowed.numel()] = allowed.cpu()
        table = cast(torch.Tensor, self.artifact.spec.table(self.model)).detach()  # an index implies it
        values, items = cast(tuple[torch.Tensor, torch.Tensor], rescore(q, table, ids.to(q.device), mask, k))
        return values, items, [row not in direct for row in range(len(queries))]

    @torch.inference_mode()
    def model_query(self, queries: Sequence[RankQuery]) -> torch.Tensor:
        """[B, H] fp32: the query vectors a dot-product model's full_sort_predict multiplies with
        its item table (``query_fn``)."""
        query = query_fn(self.model, self.artifact.spec)
        if query is None:
            raise ValueError(f"{self.artifact.model_name} does not score by a dot product with an item table")
        return query(self.interaction(queries)).float()

    @torch.inference_mode()
    def plain_topk(self, queries: Sequence[RankQuery], k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference path: full_sort_predict, masks, torch.topk over the whole catalogue."""
        scores = self.scores(queries).float()
        apply_masks(scores, queries, self.compile_filter)
        return torch.topk(scores, k, dim=1)

    def _table(self) -> torch.Tensor:
        if self.unit is None:  # the planner refuses these requests first
            raise ValueError(f"{self.artifact.model_name} has no item table to compare items in")
        return self.unit

    def _similar_topk(self, queries: Sequence[RankQuery], k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Cosine with the mean of the query items' unit rows; masks as for next items."""
        table = self._table()
        q = torch.stack(
            [table[torch.tensor(query.history, device=table.device)].mean(0) for query in queries]
        )
        q = F.normalize(q, dim=1)
        top = None
        if self.similar_block is not None:
            top = self.similar_block.topk(q, queries, k, compile_filter=self.compile_filter)
        if top is None:
            scores = q @ table.T
            apply_masks(scores, queries, self.compile_filter)
            top = torch.topk(scores, k, dim=1)
        return top

    def because(self, history: Sequence[int], items: Sequence[int]) -> list[list[int]]:
        """Per item, up to EXPLAIN_ITEMS distinct *history* items most like it (cosine in the item
        table), most similar first; an item is never its own reason."""
        table = self._table()
        seen = torch.tensor(list(dict.fromkeys(history)), dtype=torch.long, device=table.device)
        wanted = torch.tensor(list(items), dtype=torch.long, device=table.device)
        if not seen.numel() or not wanted.numel():
            return [[] for _ in items]
        sims = table[wanted] @ table[seen].T  # [items, history]
        sims.masked_fill_(wanted.unsqueeze(1) == seen.unsqueeze(0), float("-inf"))
        top = torch.topk(sims, min(EXPLAIN_ITEMS, seen.numel()), dim=1)
        picked = seen[top.indices].cpu()
        return [
            row[keep].tolist() for row, keep in zip(picked, (top.values > float("-inf")).cpu(), strict=True)
        ]


class BlockRanker:
    """The model's query vectors (interaction -> [B, H], as its full_sort_predict computes them)
    and the block top-k over its item table."""

    def __init__(self, query: Callable[[Any], torch.Tensor], scorer: BlockTopK | ChunkedTopK) -> None:
        self.query = query
        self.scorer = scorer

    @torch.inference_mode()
    def topk(
        self,
        interaction: Any,
        queries: Sequence[RankQuery],
        k: int,
        force: bool = False,
        compile_filter: FilterCompiler | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not force and len(queries) * self.scorer.n_items < self.scorer.min_scores:
            return None  # before the model's forward: the plain path runs it again
        return self.scorer.topk(self.query(interaction), queries, k, force, compile_filter)


def unit_table(
    model: torch.nn.Module, name: str | None, n_items: int, stored: torch.Tensor | None = None
) -> torch.Tensor | None:
    """The first *n_items* rows of ``model.<name>.weight`` (``ModelSpec.item_table``), each scaled
    to unit length (``artifact.unit_rows``); None when the spec names no table. *stored*: the same,
    as the import stored it (``Artifact.unit``, mapped), used instead of a copy of one's own."""
    weight = getattr(getattr(model, name, None), "weight", None) if name else None
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[0] < n_items:
        return None
    if stored is not None:
        return stored.to(weight.device)
    return unit_rows(weight.detach()[:n_items]).contiguous()


def query_fn(model: torch.nn.Module, spec: ModelSpec) -> Callable[[Any], torch.Tensor] | None:
    """``interaction -> seq_output [B, H]`` as the model's full_sort_predict computes it before its
    product with its item table (``spec.table``); None when the spec says it scores otherwise
    (``ModelSpec.dot_product``) or the model has no such table."""
    if spec.dot_product is None or spec.table(model) is None:
        return None
    if spec.dot_product == "seq_and_len":
        return lambda inter: model.forward(inter[model.ITEM_SEQ], inter[model.ITEM_SEQ_LEN])
    return lambda inter: model.forward(inter[model.ITEM_SEQ])


def retrieval_index(model: torch.nn.Module, artifact: Artifact, n_items: int) -> RetrievalIndex | None:
    """The retrieval index stored with the model (core/index.py), checked against its item
    table; None without one. Only a dot-product model can have one (``ModelSpec.dot_product``)."""
    if not RetrievalIndex.present(artifact.path):
        return None
    table = artifact.spec.table(model)
    if query_fn(model, artifact.spec) is None or table is None:
        raise RetrievalIndexError(
            f"{artifact.model_name} does not score by a dot product with its item table: "
            "a retrieval index cannot serve it"
        )
    return RetrievalIndex.load(artifact.path, n_items, table.shape[1])


# On CUDA a batch's scores are one [batch, items] matrix up to 4 GiB of fp32, column chunks above it
# (docs/benchmarks.md, "The exact top-k on CUDA").
DEVICE_CHUNK_SCORES = 1 << 30


def exact_scorer(table: torch.Tensor, n_items: int, block_items: int) -> BlockTopK | ChunkedTopK:
    """The exact top-k over *table* for the device it lives on: on a CPU the block top-k (bounds
    skip most of the catalogue; below 64 blocks' worth of scores, 0.5M at the default, a 2 MB
    matrix, the plain path is as fast); elsewhere (CUDA) every batch, its masks built on the device
    and its items scored in chunks of at most ``DEVICE_CHUNK_SCORES`` scores (one for most)."""
    if table.device.type == "cpu":
        return BlockTopK(table, n_items, block_items, min_scores=64 * block_items)
    return ChunkedTopK(table, n_items, max_scores=DEVICE_CHUNK_SCORES)


def block_ranker(engine: Engine, block_items: int, min_items: int | None = None) -> BlockRanker | None:
    """A BlockRanker for the engine's model, or None where the plain path is the one to use: the
    model is not a dot product with its item table, the catalogue is small (< *min_items*,
    default 4 blocks), or the exact scorer (``exact_scorer``) disagrees with the plain path on
    probe queries at start-up."""
    if block_items <= 0:
        return None
    if engine.n_items < (4 * block_items if min_items is None else min_items):
        return None
    spec = engine.artifact.spec
    query = query_fn(engine.model, spec)
    if query is None:
        return None
    table = cast(torch.Tensor, spec.table(engine.model)).detach()  # query_fn found it
    if table.shape[0] != engine.n_items or table.dtype != torch.float32:
        return None
    ranker = BlockRanker(query, exact_scorer(table, engine.n_items, block_items))
    return ranker if _agrees(engine, ranker) else None


def _agrees(engine: Engine, ranker: BlockRanker) -> bool:
    """Same items and the same scores (to fp32 rounding) as the plain path on a few probes."""
    n = engine.n_items
    gen = torch.Generator().manual_seed(0)
    probes = [
        RankQuery([1], 10),
        RankQuery(torch.randint(1, n, (engine.artifact.window,), generator=gen).tolist(), 10),
        RankQuery(torch.randint(1, n, (3,), generator=gen).tolist(), 5),
    ]
    with torch.inference_mode():
        # exclude the plain path's best items of the first probe: masks must hold in pass 1
        first = engine.plain_topk(probes[:1], 10)[1][0].tolist()
        probes[0].exclude = first[:5]
        probes[2].candidates = first[5:] + [0, n - 1]
        got = ranker.topk(engine.interaction(probes), probes, 10, force=True)
        want = engine.plain_topk(probes, 10)
        scores = engine.scores(probes).float()
        apply_masks(scores, probes)
    if got is None:
        return True  # the batch went the plain way; nothing to compare
    for row, probe in enumerate(probes):
        k = probe.topk
        if not same_topk(got[0][row, :k], got[1][row, :k], want[0][row, :k], scores[row]):
            logger.warning("block top-k disagrees with the plain path on a probe; using the plain path")
            return False
    return True
