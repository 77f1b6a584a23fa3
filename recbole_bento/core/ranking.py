"""What a ranking request is, what comes back, and which items a request may get back.

``BatchMask`` is the one implementation of the masking rules; the plain path (whole score matrix),
the block top-k (one block of items at a time, then gathered items) and the popularity fallback
all apply it:

* item 0 (RecBole's padding) is never returned;
* the items of a query's ``exclude`` list are never returned;
* when a query sets ``candidates``, only those items may be returned;
* when a query sets ``filters``, only the items that pass them may be returned (compiled into an
  allow-list by the item attributes, ``attributes.ItemAttributes.compile``, and intersected with
  ``candidates``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

NEG_INF = float("-inf")


@dataclass(frozen=True)
class Allowed:
    """The items a compiled filter lets through, both ways: a bool mask over the catalogue (for
    masking score blocks) and the sorted ids of the passing items (for scoring only those, and
    counting them, without a pass over the catalogue). Shared by every query with that filter:
    never modified."""

    mask: torch.Tensor  # bool [n_items]
    ids: torch.Tensor  # int64, ascending

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> Allowed:
        return cls(mask, torch.nonzero(mask).flatten())


# a normalised filter -> the items that pass it (ItemAttributes.compile)
FilterCompiler = Callable[[dict[str, Any]], Allowed]


@dataclass
class RankQuery:
    """One already-validated request in internal ids."""

    history: list[int]  # internal item ids, oldest first (empty only for the popularity fallback)
    topk: int
    user: int | None = None
    exclude: list[int] = field(default_factory=list)
    candidates: list[int] | None = None
    # "next": the model's next items after *history*; "similar": the items most like *history*'s
    # by cosine in the model's item table
    kind: Literal["next", "similar"] = "next"
    filters: dict[str, Any] | None = None  # normalised (ItemAttributes.normalize)
    explain: bool = False  # also say which history items each returned item is most like
    model: str | None = None  # the stored model that ranks it, where a ranker holds several (routes)


@dataclass
class RankResult:
    items: list[int]
    scores: list[float]
    because: list[list[int]] | None = None  # per returned item, history items (explain)
    retrieval: Literal["exact", "index"] = "exact"  # the exact top-k, or a retrieval index's candidates


class BatchMask:
    """Which items each row of a batch of queries may return, over a catalogue of *n_items*."""

    def __init__(
        self,
        queries: Sequence[RankQuery],
        n_items: int,
        device: torch.device | str = "cpu",
        compile_filter: FilterCompiler | None = None,
    ) -> None:
        self.n_items = n_items
        rows: list[int] = []
        cols: list[int] = []
        for row, query in enumerate(queries):
            rows.extend([row] * len(query.exclude))
            cols.extend(query.exclude)
        excl_rows = torch.tensor(rows, dtype=torch.long, device=device)
        excl_cols = torch.tensor(cols, dtype=torch.long, device=device)
        order = torch.sort(excl_cols, stable=True)  # by item: a block of items finds its own slice
        self.excl_rows, self.excl_cols = excl_rows[order.indices], order.values
        # rows restricted to an allow-list: row -> bool [n_items], and row -> its ascending item ids
        self.allowed: dict[int, torch.Tensor] = {}
        self.allowed_ids: dict[int, torch.Tensor] = {}
        for row, query in enumerate(queries):
            mask = ids = None
            if query.candidates is not None:
                ids = torch.unique(torch.tensor(query.candidates, dtype=torch.long, device=device))
            if query.filters:
                if compile_filter is None:
                    raise ValueError("a query with filters needs the model's item attributes")
                passing = compile_filter(query.filters)
                if ids is None:
                    mask, ids = passing.mask.to(device), passing.ids.to(device)
                else:
                    ids = ids[passing.mask.to(device)[ids]]
            if ids is not None:
                if mask is None:
                    mask = torch.zeros(n_items, dtype=torch.bool, device=device)
                    mask[ids] = True
                self.allowed[row] = mask
                self.allowed_ids[row] = ids

    def restricted(self, row: int) -> bool:
        return row in self.allowed

    def apply(self, scores: torch.Tensor, start: int = 0) -> None:
        """In place: -inf wherever a row may not return an item. *scores* is [batch, width] and
        covers the items ``start .. start + width - 1`` (the whole catalogue by default)."""
        width = scores.shape[1]
        if start == 0:
            scores[:, 0] = NEG_INF
        bounds = torch.tensor([start, start + width], device=self.excl_cols.device)  # same device: CUDA
        lo, hi = torch.searchsorted(self.excl_cols, bounds).tolist()
        if hi > lo:
            scores[self.excl_rows[lo:hi], self.excl_cols[lo:hi] - start] = NEG_INF
        for row, allowed in self.allowed.items():
            part = allowed[start : start + width]
            scores[row, : part.numel()].masked_fill_(~part, NEG_INF)

    def blocked(self, ids: torch.Tensor) -> torch.Tensor:
        """bool [batch, width]: True where row r may not return item ``ids[r, j]`` (-1 = no item)."""
        out = (ids <= 0) | (ids >= self.n_items)
        if self.excl_cols.numel():
            keys = torch.arange(ids.shape[0], device=ids.device).unsqueeze(1) * self.n_items + ids
            out |= torch.isin(keys, self.excl_rows * self.n_items + self.excl_cols)
        for row, allowed in self.allowed.items():
            out[row] |= ~allowed[ids[row].clamp(0, self.n_items - 1)]
        return out


def apply_masks(
    scores: torch.Tensor, queries: Sequence[RankQuery], compile_filter: FilterCompiler | None = None
) -> None:
    """In place on a [batch, n_items] score matrix: the masks of *queries* (``BatchMask.apply``)."""
    BatchMask(queries, scores.shape[1], scores.device, compile_filter).apply(scores)


def popularity_order(counts: torch.Tensor) -> torch.Tensor:
    """Internal item ids, most interactions first; ties by id (the padding item 0 included: masks drop it)."""
    return torch.sort(-counts.double(), stable=True).indices


def popular_topk(
    order: torch.Tensor, counts: torch.Tensor, query: RankQuery, compile_filter: FilterCompiler | None = None
) -> RankResult:
    """The fallback answer: the query's top-k by training popularity, masked as the model's answers are.

    Without an allow-list only the first ``topk + len(exclude) + 1`` items of *order* can be
    needed (at most that many are masked), so the check does not grow with the catalogue."""
    mask = BatchMask([query], counts.numel(), compile_filter=compile_filter)
    if mask.restricted(0):  # the allowed items in *order*'s order: by count, ties by id
        ids = mask.allowed_ids[0]
        pool = ids[torch.sort(-counts[ids].double(), stable=True).indices]
    else:
        pool = order[: query.topk + len(query.exclude) + 1]
    keep = pool[~mask.blocked(pool.unsqueeze(0))[0]][: query.topk]
    return RankResult(keep.tolist(), counts[keep].double().tolist())
