"""From a recommendation request in external ids to a ranking query, and from a ranking result back
to the answer: the one implementation of id mapping, the request rules that depend on the model,
the popularity fallback and decoding. The HTTP service, the batch scorer and Spark all use it, so
the same request gets the same answer whichever way it comes in.

A request is anything with the fields of ``edge.schemas.RecommendRequest`` (``sequence``, ``topk``,
``user_id``, ``exclude_seen``, ``exclude``, ``candidates``), already validated for shape and types.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .artifact import Artifact
from .ranking import RankQuery, RankResult, popular_topk, popularity_order

ExternalId = int | str


class RequestLike(Protocol):
    sequence: list[ExternalId]
    topk: int
    user_id: ExternalId | None
    exclude_seen: bool
    exclude: list[ExternalId]
    candidates: list[ExternalId] | None


class RequestError(ValueError):
    """A request this model cannot answer as asked; the message says what to change (HTTP 400)."""


@dataclass
class Plan:
    query: RankQuery
    unknown: list[str]  # history items the model does not know, as sent
    fallback: str | None  # why popularity answers ("no_known_items", "unknown_user"); None: the model

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
        self.max_topk = min(max_topk, self.n_items)
        self.popularity = torch.from_numpy(artifact.popularity)
        self.by_popularity = popularity_order(self.popularity)

    def known(self, ids: list[ExternalId]) -> list[int]:
        """Internal ids of the items the model knows, in order; unknown ids are dropped."""
        return [self.item_ids[str(x)] for x in ids if str(x) in self.item_ids]

    def plan(self, req: RequestLike) -> Plan:
        """Map one request to internal ids; RequestError for what this model cannot do."""
        if req.topk > self.max_topk:
            raise RequestError(f"topk must be between 1 and {self.max_topk}, got {req.topk}")
        history: list[int] = []
        unknown: list[str] = []
        for raw in req.sequence:
            internal = self.item_ids.get(str(raw))
            if internal is None:
                unknown.append(str(raw))
            else:
                history.append(internal)
        user = None
        if self.spec.needs_user:
            if req.user_id is None:
                raise RequestError(f"{self.spec.name} needs a user_id: it ranks with the user's embedding")
            user = self.user_ids.get(str(req.user_id))
        exclude = self.known(req.exclude)
        if req.exclude_seen:
            exclude = exclude + history
        candidates = None if req.candidates is None else self.known(req.candidates)
        fallback = None
        if not history:
            fallback = "no_known_items"
        elif self.spec.needs_user and user is None:
            fallback = "unknown_user"
        return Plan(RankQuery(history, req.topk, user, exclude, candidates), unknown, fallback)

    def popular(self, plan: Plan) -> RankResult:
        """The popularity fallback's answer to *plan*, masked as the model's answers are."""
        return popular_topk(self.by_popularity, self.popularity, plan.query)

    def answer(self, plan: Plan, result: RankResult) -> dict[str, Any]:
        """The response fields (``RecommendResponse``'s) for *plan* answered with *result*."""
        return {
            "item_list": [self.item_tokens[i] for i in result.items],
            "score_list": result.scores,
            "unknown_items": plan.unknown,
            "fallback": None if plan.rankable else "popular",
        }
