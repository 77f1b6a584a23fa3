"""Items by id, and items found by a few typed characters: what a person picking a history (the
playground's item picker) and reading an answer (its result cards) needs of the catalogue.

A search matches, in this order: the item whose id is the text, the items whose id starts with it
(in id order), then the items having, for every word of the text, a ``token`` or ``token_seq``
attribute value that contains the word (case-insensitive; ml-100k's ``movie_title`` words, its
genres), most interactions in training first. Every search is bounded: at most ``MAX_RESULTS``
items, a text of at most ``MAX_TEXT`` characters and ``MAX_WORDS`` words, and the cost of a
word is one pass over each field's vocabulary and codes (vectorised), not over Python objects per
item.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch

from .attributes import ItemAttributes

MAX_RESULTS = 100
MAX_TEXT = 100
MAX_WORDS = 8

ExternalId = int | str


def split_ids(item_ids: Mapping[str, int], ids: Sequence[ExternalId]) -> tuple[list[int], list[str]]:
    """(internal ids of the known items of *ids* in order, the unknown ones as sent, as strings):
    the one mapping of external item ids, for the planner and the catalogue alike."""
    mapped = [item_ids.get(str(raw)) for raw in ids]
    if None not in mapped:  # the usual case: every item known, one pass
        return cast(list[int], mapped), []
    known: list[int] = []
    unknown: list[str] = []
    for raw, internal in zip(ids, mapped, strict=True):
        if internal is None:
            unknown.append(str(raw))
        else:
            known.append(internal)
    return known, unknown


class CatalogueError(ValueError):
    """A lookup or search the catalogue cannot do as asked; the message says what to change."""


@dataclass(frozen=True)
class Item:
    id: str  # the external id
    attributes: dict[str, Any]  # field -> token, list of tokens or float; fields without a value left out


class Catalogue:
    """The items of one stored model: their external ids, attributes and popularity order."""

    def __init__(
        self,
        item_tokens: Sequence[str],
        item_ids: dict[str, int],
        attributes: ItemAttributes | None,
        by_popularity: torch.Tensor,
    ) -> None:
        self.item_tokens = item_tokens  # internal id -> external id; 0 is the padding item
        self.item_ids = item_ids  # the reverse, without the padding item
        self.attributes = attributes
        self.by_popularity = by_popularity.numpy()  # internal ids, most interactions first
        self._sorted: list[str] | None = None  # the external ids in string order, for prefixes

    def item(self, internal: int) -> Item:
        attributes = self.attributes.of(internal) if self.attributes is not None else {}
        return Item(self.item_tokens[internal], attributes)

    def lookup(self, ids: Sequence[ExternalId]) -> tuple[list[Item], list[str]]:
        """The known items among *ids*, in order (repeats kept), and the unknown ids as strings."""
        known, unknown = split_ids(self.item_ids, ids)
        return [self.item(internal) for internal in known], unknown

    def search(self, text: str, limit: int) -> list[Item]:
        """Up to *limit* items matching *text* (the module docstring says how), best first."""
        text = text.strip()
        words = text.lower().split()
        if not words:
            raise CatalogueError("query: give a few characters of an item id or attribute")
        if len(text) > MAX_TEXT or len(words) > MAX_WORDS:
            raise CatalogueError(f"query: at most {MAX_TEXT} characters and {MAX_WORDS} words")
        if not 1 <= limit <= MAX_RESULTS:
            raise CatalogueError(f"limit must be between 1 and {MAX_RESULTS}, got {limit}")
        found: dict[int, None] = {}  # insertion-ordered set of internal ids
        exact = self.item_ids.get(text)
        if exact is not None:
            found[exact] = None
        for token in self._with_prefix(text, limit):
            if len(found) >= limit:
                break
            found.setdefault(self.item_ids[token], None)
        if len(found) < limit and self.attributes is not None:
            mask = self.attributes.containing(words[0])
            for word in words[1:]:
                mask &= self.attributes.containing(word)
            mask[0] = False  # the padding item has no attributes; never return it
            for internal in self.by_popularity[mask[self.by_popularity]].tolist():
                if len(found) >= limit:
                    break
                found.setdefault(internal, None)
        return [self.item(internal) for internal in found]

    def _with_prefix(self, text: str, limit: int) -> list[str]:
        """Up to *limit* + 1 external ids starting with *text*, in string order."""
        if self._sorted is None:
            self._sorted = sorted(self.item_tokens[1:])
        start = bisect.bisect_left(self._sorted, text)
        out = []
        for token in self._sorted[start : start + limit + 1]:
            if not token.startswith(text):
                break
            out.append(token)
        return out
