"""From a recommendation request in external ids to a ranking query, and from a ranking result back
to the answer: id mapping (``catalogue.split_ids``), the request rules that depend on the model,
the popularity fallback and decoding. The HTTP service, the batch scorer and Spark all use it, so
the same request gets the same answer whichever way it comes in.

A request is anything with the fields of ``schemas.RecommendRequest`` (``sequence``, ``topk``,
``user_id``, ``exclude_seen``, ``exclude``, ``candidates``, ``filters``, ``explain``), already
validated for shape and types; a similar-items request has ``schemas.SimilarItemsRequest``'s.
Filters are checked here against the stored item attributes and travel to the ranker in their
normalised form (a few values, not an allow-list over the catalogue): the ranker compiles them
against its own copy of the attributes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Protocol

import torch

from .artifact import Artifact
from .attributes import FilterError, ItemAttributes
from .catalogue import Catalogue, split_ids
from .ranking import RankQuery, RankResult, popular_topk, popularity_order

ExternalId = int | str


class RequestLike(Protocol):
    sequence: list[ExternalId]
    topk: int
    user_id: ExternalId | None
    exclude_seen: bool
    exclude: list[ExternalId]
    candidates: list[ExternalId] | None
    filters: dict[str, Any] | None
    explain: bool


class SimilarRequestLike(Protocol):
    items: list[ExternalId]
    topk: int
    exclude: list[ExternalId]
    candidates: list[ExternalId] | None
    filters: dict[str, Any] | None


class RequestError(ValueError):
    """A request this model cannot answer as asked; the message says what to change (HTTP 400)."""


@dataclass
class Plan:
    query: RankQuery
    unknown: list[str]  # history items the model does not know, as sent
    fallback: str | None  # why popularity answers ("no_known_items", "unknown_user"); None: the model
    passing: int | None = None  # with filters: how many items pass them (metrics: selectivity)

    @property
    def rankable(self) -> bool:
        return self.fallback is None


class Planner:
    """Everything the public side needs of a stored model; no weights, no model."""

    def __init__(self, artifact: Artifact, max_topk: int) -> None:
        self.spec = artifact.spec
        self.item_tokens = artifact.item_tokens
        self.item_ids = {token: i for i, token in enumerate(artifact.item_tokens) if i}
        users = artifact.user_tokens or []
        self.user_ids = {token: i for i, token in enumerate(users) if i}
        self.n_items = len(artifact.item_tokens) - 1
        self.window = artifact.window  # the most recent items the model reads of a history
        self.max_topk = min(max_topk, self.n_items)
        self.popularity = torch.from_numpy(artifact.popularity)
        self.by_popularity = popularity_order(self.popularity)
        self.attributes = ItemAttributes.load(artifact.path, len(artifact.item_tokens))
        self.compile_filter = self.attributes.compile if self.attributes is not None else None

    @cached_property
    def catalogue(self) -> Catalogue:
        """This model's items to look up and search (POST /items), built on first use."""
        return Catalogue(self.item_tokens, self.item_ids, self.attributes, self.by_popularity)

    def known(self, ids: list[ExternalId]) -> list[int]:
        """Internal ids of the items the model knows, in order; unknown ids are dropped."""
        return [self.item_ids[str(x)] for x in ids if str(x) in self.item_ids]

    def plan(self, req: RequestLike) -> Plan:
        """Map one request to internal ids; RequestError for what this model cannot do."""
        self._check_topk(req.topk)
        if req.explain:
            self._need_table("explain")
        history, unknown = self._split(req.sequence)
        user = None
        if self.spec.needs_user:
            if req.user_id is None:
                raise RequestError(f"{self.spec.name} needs a user_id: it ranks with the user's embedding")
            user = self.user_ids.get(str(req.user_id))
        exclude = self.known(req.exclude)
        if req.exclude_seen:
            exclude = exclude + history
        fallback = None
        if not history:
            fallback = "no_known_items"
        elif self.spec.needs_user and user is None:
            fallback = "unknown_user"
        query = RankQuery(history, req.topk, user, exclude, explain=req.explain)
        return self._restrict(Plan(query, unknown, fallback), req.candidates, req.filters)

    def plan_similar(self, req: SimilarRequestLike) -> Plan:
        """Map a similar-items request: the query items are never returned themselves."""
        self._check_topk(req.topk)
        self._need_table("/similar_items")
        items, unknown = self._split(req.items)
        query = RankQuery(items, req.topk, exclude=self.known(req.exclude) + items, kind="similar")
        plan = Plan(query, unknown, None if items else "no_known_items")
        return self._restrict(plan, req.candidates, req.filters)

    def _check_topk(self, topk: int) -> None:
        if topk > self.max_topk:
            raise RequestError(f"topk must be between 1 and {self.max_topk}, got {topk}")

    def _need_table(self, what: str) -> None:
        if self.spec.item_table is None:
            raise RequestError(
                f"{what} is not available for {self.spec.name}: it compares items by cosine in the "
                "item embedding table full_sort_predict scores against, and this model scores "
                "against none (docs/model_table.md lists the models that have one)"
            )

    def _split(self, ids: list[ExternalId]) -> tuple[list[int], list[str]]:
        """(internal ids of the known items in order, the unknown ones as sent)."""
        return split_ids(self.item_ids, ids)

    def _restrict(self, plan: Plan, candidates: list[ExternalId] | None, filters: dict | None) -> Plan:
        """*plan* with the request's allow-lists: candidates in internal ids, filters normalised.
        An empty filter sets no condition, so it is no filter, on any model: the published schema
        accepts ``{}`` whatever the model's attributes."""
        if candidates is not None:
            plan.query.candidates = self.known(candidates)
        if filters:
            if self.attributes is None:
                raise RequestError(
                    "filters: this model has no filterable item attributes; import it with "
                    "--item-features FILE.item (a RecBole atomic item file)"
                )
            try:
                plan.query.filters = self.attributes.normalize(filters)
            except FilterError as exc:
                raise RequestError(str(exc)) from None
            plan.passing = self.attributes.compile(plan.query.filters).ids.numel()
        return plan

    def popular(self, plan: Plan) -> RankResult:
        """The popularity fallback's answer to *plan*, masked as the model's answers are."""
        return popular_topk(self.by_popularity, self.popularity, plan.query, self.compile_filter)

    def answers(self, plans: Iterable[Plan], ranked: Iterable[RankResult]) -> Iterator[dict[str, Any]]:
        """The response fields of each of *plans*, in order: a rankable plan's from the next of
        *ranked* (the model's results for the rankable plans, in their order), the others' from the
        popularity fallback. The one answer step of every way in (HTTP, batch, Spark)."""
        results = iter(ranked)
        for plan in plans:
            yield self.answer(plan, next(results) if plan.rankable else self.popular(plan))

    def answer(self, plan: Plan, result: RankResult) -> dict[str, Any]:
        """The response fields for *plan* answered with *result*: ``RecommendResponse``'s, or
        ``SimilarItemsResponse``'s for a similar-items plan (no ``because``)."""
        out: dict[str, Any] = {
            "item_list": [self.item_tokens[i] for i in result.items],
            "score_list": result.scores,
            "unknown_items": plan.unknown,
            "fallback": None if plan.rankable else "popular",
            "retrieval": result.retrieval,
        }
        if plan.query.kind == "next":
            because = result.because
            out["because"] = None if because is None else [[self.item_tokens[i] for i in b] for b in because]
        return out
