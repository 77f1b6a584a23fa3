"""The public HTTP API's request and response bodies (pydantic: a validation failure is a 400)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, WithJsonSchema

from ..settings import SETTINGS

ItemId = Annotated[
    StrictInt | Annotated[StrictStr, Field(min_length=1, max_length=SETTINGS.max_id_length)],
    Field(description="an external id as in the atomic files: JSON string or integer"),
]
IdList = Annotated[list[ItemId], Field(max_length=SETTINGS.max_history)]
# OpenAPI 3.0's "nullable" on an optional field: BentoML's /docs.json keeps only the first branch of
# its anyOf, so without it the published schema says the field is never null.
NULLABLE: dict = {"json_schema_extra": {"nullable": True}}


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sequence: IdList = Field(description="the item history, oldest first")
    topk: StrictInt = Field(10, ge=1, le=SETTINGS.max_topk, description="how many items to return")
    user_id: ItemId | None = Field(None, description="needed by models that read a user id", **NULLABLE)
    exclude_seen: StrictBool = Field(False, description="drop the history's items from the result")
    exclude: IdList = Field(default_factory=list, description="items never to return")
    candidates: IdList | None = Field(
        None, description="if set, only these items may be returned", **NULLABLE
    )


class RecommendBatchRequest(BaseModel):
    """The /recommend_batch body; unknown top-level fields are refused, as in /recommend."""

    model_config = ConfigDict(extra="forbid")

    requests: list[RecommendRequest] = Field(description="/recommend bodies, answered in this order")


class RecommendResponse(BaseModel):
    item_list: list[str] = Field(description="external item ids, best first")
    score_list: list[float] = Field(description="the model's scores (popularity counts on fallback)")
    unknown_items: list[str] = Field(description="history items the model does not know (skipped)")
    # OpenAPI 3.0's "nullable": BentoML's /docs.json keeps only the first branch of a top-level
    # anyOf, which would publish a schema that every non-fallback answer (null) violates.
    fallback: Annotated[
        Literal["popular"] | None, WithJsonSchema({"type": "string", "enum": ["popular"], "nullable": True})
    ] = Field(description='"popular" when no known history item (or user) was left to rank with')


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


class RecommendBatchResponse(BaseModel):
    results: list[RecommendResponse] = Field(description="one answer per request, in order")
