"""The public HTTP API's request and response bodies (pydantic: a validation failure is a 400)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    WithJsonSchema,
    create_model,
    model_validator,
)

from .core import catalogue
from .core.sessions import SESSION_ID_PATTERN, check_session_id
from .settings import SETTINGS

ItemId = Annotated[
    StrictInt | Annotated[StrictStr, Field(min_length=1, max_length=SETTINGS.max_id_length)],
    Field(description="an external id as in the atomic files: JSON string or integer"),
]
IdList = Annotated[list[ItemId], Field(max_length=SETTINGS.max_history)]
# OpenAPI 3.0's "nullable" on an optional field: BentoML's /docs.json keeps only the first branch of
# its anyOf, so without it the published schema says the field is never null.
NULLABLE: dict = {"json_schema_extra": {"nullable": True}}
# Checked by the planner against the model's attributes (its 400 names the filterable fields); the
# schema documents the shape. OpenAPI 3.0 "nullable", as for fallback below.
Filters = Annotated[
    dict[str, Any] | None,
    WithJsonSchema(
        {
            "type": "object",
            "nullable": True,
            "additionalProperties": {
                "anyOf": [
                    {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
                    {
                        "type": "object",
                        "properties": {"gte": {"type": "number"}, "lte": {"type": "number"}},
                        "additionalProperties": False,
                    },
                ]
            },
        }
    ),
    Field(
        description="only items whose attributes pass (POST /model_info lists the filterable fields): "
        "a token field passes when its value is listed, a token_seq field when any of its values is, "
        'a float field takes {"gte": lo, "lte": hi}; several fields must all pass',
        examples=[{"class": ["Comedy", "Drama"], "release_year": ["1995"], "price": {"gte": 0, "lte": 20}}],
    ),
]


SessionId = Annotated[
    StrictStr,
    AfterValidator(lambda value: check_session_id(value, SETTINGS.max_session_id_bytes)),
    WithJsonSchema(
        {
            "type": "string",
            "minLength": 1,
            **({"maxLength": SETTINGS.max_session_id_bytes} if SETTINGS.max_session_id_bytes else {}),
            "pattern": SESSION_ID_PATTERN,
        }
    ),
]


def _sequence_or_session(schema: dict[str, Any]) -> None:
    """The published schema of a body that needs ``sequence`` unless it names a ``session_id``.
    ``oneOf`` with exclusive branches, not ``anyOf``: BentoML's /docs.json keeps only the first
    branch of a top-level anyOf (which would make ``sequence`` required again)."""
    schema["required"] = [name for name in schema.get("required", []) if name != "sequence"]
    if not schema["required"]:
        del schema["required"]
    schema["oneOf"] = [
        {"required": ["sequence"]},
        {"required": ["session_id"], "not": {"required": ["sequence"]}},
    ]


# Which model answers (docs/operations.md, "Model lifecycle"). OpenAPI 3.0 "nullable", as above.
AssignmentKey = Annotated[
    Annotated[StrictStr, Field(min_length=1, max_length=SETTINGS.max_id_length)] | None,
    Field(
        description="what the request is assigned to a variant by (the same key, the same variant); "
        "default: user_id, else a random draw",
        **NULLABLE,
    ),
]
VariantName = Annotated[
    Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")] | None,
    Field(description="answer with this variant of the routes (POST /model_info lists them)", **NULLABLE),
]


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_sequence_or_session)

    sequence: IdList = Field(
        description="the item history, oldest first; with session_id: the new events, recorded in "
        "the session before its stored history is read (optional then)"
    )
    # Absent or a string: a null is refused, as the published schema says.
    session_id: SessionId = Field(  # type: ignore[assignment]
        None,
        description="rank the session's stored history (POST /events), after appending sequence to it; "
        "the stored user_id is used unless one is sent",
    )
    topk: StrictInt = Field(10, ge=1, le=SETTINGS.max_topk, description="how many items to return")
    user_id: ItemId | None = Field(None, description="needed by models that read a user id", **NULLABLE)
    exclude_seen: StrictBool = Field(False, description="drop the history's items from the result")
    exclude: IdList = Field(default_factory=list, description="items never to return")
    candidates: IdList | None = Field(
        None, description="if set, only these items may be returned", **NULLABLE
    )
    filters: Filters = None
    explain: StrictBool = Field(
        False, description="also answer because: per returned item, the history items most like it"
    )
    assignment_key: AssignmentKey = None
    variant: VariantName = None

    @model_validator(mode="before")
    @classmethod
    def _session_needs_no_sequence(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("session_id") is not None and "sequence" not in data:
            return {**data, "sequence": []}
        return data


class RecommendBatchRequest(BaseModel):
    """The /recommend_batch body; unknown top-level fields are refused, as in /recommend."""

    model_config = ConfigDict(extra="forbid")

    requests: list[RecommendRequest] = Field(description="/recommend bodies, answered in this order")


class SimilarItemsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: IdList = Field(description="the items to find similar ones for (the query: their mean direction)")
    topk: StrictInt = Field(10, ge=1, le=SETTINGS.max_topk, description="how many items to return")
    exclude: IdList = Field(
        default_factory=list, description="items never to return (the query items never are)"
    )
    candidates: IdList | None = Field(
        None, description="if set, only these items may be returned", **NULLABLE
    )
    filters: Filters = None
    assignment_key: AssignmentKey = None
    variant: VariantName = None


class RankedItems(BaseModel):
    item_list: list[str] = Field(description="external item ids, best first")
    score_list: list[float] = Field(description="the model's scores (popularity counts on fallback)")
    unknown_items: list[str] = Field(description="history items the model does not know (skipped)")
    # OpenAPI 3.0's "nullable": BentoML's /docs.json keeps only the first branch of a top-level
    # anyOf, which would publish a schema that every non-fallback answer (null) violates.
    fallback: Annotated[
        Literal["popular"] | None, WithJsonSchema({"type": "string", "enum": ["popular"], "nullable": True})
    ] = Field(description='"popular" when no known history item (or user) was left to rank with')
    model: str = Field(description="the stored model that answered (BentoML tag, name:version)")
    variant: str = Field(description='the routes\' variant that answered ("default" without routes)')
    retrieval: Literal["exact", "index"] = Field(
        description='"index" when the model\'s retrieval index picked the candidates (their scores are '
        'still the exact ones; POST /model_info shows its measured recall), "exact" otherwise',
    )


class SimilarItemsResponse(RankedItems):
    """score_list: cosine similarity with the query in the model's item table."""


class RecommendResponse(RankedItems):
    # oneOf, not anyOf or "type": "array": BentoML's client decodes an array-typed field by
    # iterating it (a null would fail) and keeps only the first branch of an anyOf
    because: Annotated[
        list[list[str]] | None,
        WithJsonSchema(
            {
                "oneOf": [{"type": "array", "items": {"type": "array", "items": {"type": "string"}}}],
                "nullable": True,
            }
        ),
    ] = Field(
        description="with explain: per returned item (aligned with item_list), up to 3 distinct items "
        "of the known history most like it by cosine in the model's item table, most similar first; "
        "null without explain and on the fallback"
    )


class ModelInfo(BaseModel):
    tag: str
    recbole_model: str
    dataset: str
    item_count: int
    max_history_length: int
    required_inputs: list[str]
    device: str
    metrics: dict[str, float | str | None]
    limits: dict[str, int]
    similar_items: bool = Field(description="whether /similar_items and explain are available")
    filterable_fields: dict[str, dict[str, Any]] = Field(
        description="per field: its type (token, token_seq, float) and a few example values"
    )
    variants: list[dict[str, Any]] = Field(
        description="the routes in force: per variant its name, model, weight, status, loaded_at "
        "(Unix time) and load_seconds; tag and the fields above describe the first variant's model"
    )
    shadow: str | None = Field(description="the shadow model, scored off the request path", **NULLABLE)
    retrieval_index: dict[str, Any] | None = Field(
        None,
        description="the first variant's retrieval index: kind, nlist/nprobe or M/efSearch, candidates "
        "re-ranked exactly, recall@10 against the exact top-10 as measured at import; null: exact only",
        **NULLABLE,
    )


class RecommendBatchResponse(BaseModel):
    results: list[RecommendResponse] = Field(description="one answer per request, in order")


class ItemsRequest(BaseModel):
    """Either ``ids`` (look them up) or ``query`` (search), not both."""

    model_config = ConfigDict(extra="forbid")

    ids: IdList | None = Field(None, description="the items to look up", **NULLABLE)
    query: Annotated[StrictStr, Field(min_length=1, max_length=catalogue.MAX_TEXT)] | None = Field(
        None,
        description="a search: an id, the start of ids, or words found in the items' token attributes",
        **NULLABLE,
    )
    limit: StrictInt = Field(
        20, ge=1, le=catalogue.MAX_RESULTS, description="with query: how many items at most"
    )
    variant: VariantName = None

    @model_validator(mode="after")
    def _one_of(self) -> ItemsRequest:
        if (self.ids is None) == (self.query is None):
            raise ValueError("give either ids (a list of item ids) or query (a search text), not both")
        return self


class CatalogueItem(BaseModel):
    id: str = Field(description="the external item id")
    attributes: dict[str, Any] = Field(
        description="its item attributes by field (a token, a list of tokens, or a number); "
        "fields without a value are left out"
    )


class ItemsResponse(BaseModel):
    items: list[CatalogueItem] = Field(description="ids: the known ones in order; query: best first")
    unknown_items: list[str] = Field(description="ids: those the model does not know")


class EventRequest(BaseModel):
    """The /events body: what the client just saw or clicked, appended to the session's history."""

    model_config = ConfigDict(extra="forbid")

    session_id: SessionId
    items: Annotated[list[ItemId], Field(min_length=1, max_length=SETTINGS.max_event_items or None)] = Field(
        description="item ids, oldest first; unknown ones are kept as sent (reported at /recommend)"
    )
    user_id: ItemId | None = Field(
        None, description="remembered for the session (models that read a user id)", **NULLABLE
    )


class EventResponse(BaseModel):
    session_id: str
    length: int = Field(description="the items now stored, at most the model's window")


# ------------------------------------------------------------------ the served model's request bodies

_LISTED = {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}}
_BOUNDS = {
    "type": "object",
    "properties": {"gte": {"type": "number"}, "lte": {"type": "number"}},
    "additionalProperties": False,
}


@dataclass(frozen=True)
class RequestModels:
    """The request bodies as the served model takes them (``requests_for``)."""

    recommend: type[RecommendRequest]
    recommend_batch: type[RecommendBatchRequest]
    similar_items: type[SimilarItemsRequest]


def requests_for(kinds: Mapping[str, str], variants: Sequence[str] = ()) -> RequestModels:
    """Request bodies whose published ``filters`` schema names exactly the served model's filterable
    fields (*kinds*: name -> ``token``, ``token_seq`` or ``float``) and whose ``variant`` is one of
    the *variants* served at start-up, so a body the OpenAPI document allows is one the server
    answers. Validation is the same as the base models' (the planner checks filters against the
    attributes, the request path the variant against the routes in force); only the documented
    schema differs."""
    schema = {
        "type": "object",
        "nullable": True,
        "properties": {name: _BOUNDS if kind == "float" else _LISTED for name, kind in kinds.items()},
        "additionalProperties": False,
    }
    description = RecommendRequest.model_fields["filters"].description
    filters = (Annotated[dict[str, Any] | None, WithJsonSchema(schema)], Field(None, description=description))
    # OpenAPI 3.0: a nullable enum lists null among its values
    pinned = {"type": "string", "nullable": True, **({"enum": [*variants, None]} if variants else {})}
    variant = (
        Annotated[VariantName, WithJsonSchema(pinned)],
        Field(None, description=RecommendRequest.model_fields["variant"].description),
    )
    recommend = create_model("RecommendRequest", __base__=RecommendRequest, filters=filters, variant=variant)
    batch = create_model(
        "RecommendBatchRequest",
        __base__=RecommendBatchRequest,
        requests=(list[recommend], Field(description="/recommend bodies, answered in this order")),
    )
    similar = create_model(
        "SimilarItemsRequest", __base__=SimilarItemsRequest, filters=filters, variant=variant
    )
    return RequestModels(recommend, batch, similar)
