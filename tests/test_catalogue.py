"""The item catalogue behind POST /items (the playground's item picker): lookups by id, searches by
id and attribute words, their bounds, and the request body's refusals. In process; the HTTP side
and the page are in tests/test_playground.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from recbole_bento.core import attributes
from recbole_bento.core.attributes import ItemAttributes
from recbole_bento.core.catalogue import MAX_RESULTS, Catalogue, CatalogueError
from recbole_bento.core.ranking import popularity_order
from recbole_bento.schemas import ItemsRequest

ITEM_FILE = """item_id:token\ttitle:token_seq\tyear:token\tprice:float
1\tToy Story\t1995\t10.5
2\tStar Wars\t1977\t30
3\tStar Trek\t1996\t
10\tThe Story of Us\t1999\t5
11\t<b>Bold</b> Title\t2001\t1
"""
TOKENS = ["[PAD]", "1", "2", "3", "10", "11", "12"]  # 12 is not in the file: no attributes
POPULARITY = torch.tensor([0, 5, 9, 1, 7, 3, 2])  # 2 (Star Wars) is the most popular


def _catalogue(tmp_path: Path, with_attributes: bool = True) -> Catalogue:
    item_attributes = None
    if with_attributes:
        path = tmp_path / "shop.item"
        path.write_text(ITEM_FILE)
        stored = json.loads(json.dumps(attributes.from_item_file(path, "item_id", TOKENS)))
        item_attributes = ItemAttributes(stored, len(TOKENS))
    ids = {token: i for i, token in enumerate(TOKENS) if i}
    return Catalogue(TOKENS, ids, item_attributes, popularity_order(POPULARITY))


def _ids(items) -> list[str]:
    return [item.id for item in items]


def test_lookup_returns_each_items_attributes_as_stored(tmp_path):
    catalogue = _catalogue(tmp_path)
    found, unknown = catalogue.lookup(["2", 3, "nope", "12", "2"])
    assert _ids(found) == ["2", "3", "12", "2"] and unknown == ["nope"]
    assert found[0].attributes == {"title": ["Star", "Wars"], "year": "1977", "price": 30.0}
    assert found[1].attributes == {"title": ["Star", "Trek"], "year": "1996"}  # no price: left out
    assert found[2].attributes == {}  # not in the item file
    assert _catalogue(tmp_path, with_attributes=False).lookup(["1"])[0][0].attributes == {}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # the exact id, ids starting with it (in string order), then attribute words (years here)
        ("1", ["1", "10", "11", "12", "2", "3"]),
        ("  10 ", ["10"]),
        ("star", ["2", "3"]),  # attribute words, most popular first
        ("STAR tr", ["3"]),  # every word must be found, case-insensitively
        ("story", ["10", "1"]),  # 10 (popularity 7) before 1 (5)
        ("199", ["10", "1", "3"]),  # release years contain it
        ("<b>", ["11"]),  # text, not markup
        ("nothing like it", []),
    ],
)
def test_search_by_id_then_attribute_words(tmp_path, text, expected):
    assert _ids(_catalogue(tmp_path).search(text, 10)) == expected


def test_search_is_bounded_and_never_returns_the_padding_item(tmp_path):
    catalogue = _catalogue(tmp_path)
    assert _ids(catalogue.search("1", 2)) == ["1", "10"]
    assert _ids(catalogue.search("12", 10)) == ["12"]
    assert _ids(catalogue.search("s", 3)) == ["2", "10", "1"]
    assert "[PAD]" not in _ids(catalogue.search("[PAD]", 10)) + _ids(catalogue.search("pad", 10))
    assert _ids(_catalogue(tmp_path, with_attributes=False).search("star", 10)) == []


@pytest.mark.parametrize(
    ("text", "limit", "message"),
    [
        ("   ", 10, "give a few characters"),
        ("x" * 101, 10, "at most 100 characters"),
        ("a b c d e f g h i", 10, "8 words"),
        ("star", 0, f"limit must be between 1 and {MAX_RESULTS}"),
        ("star", MAX_RESULTS + 1, f"limit must be between 1 and {MAX_RESULTS}"),
    ],
)
def test_search_refusals_say_what_to_change(tmp_path, text, limit, message):
    with pytest.raises(CatalogueError, match=message):
        _catalogue(tmp_path).search(text, limit)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "give either ids"),
        ({"ids": ["1"], "query": "star"}, "give either ids"),
        ({"query": ""}, "at least 1 character"),
        ({"query": 5}, "valid string"),
        ({"query": "star", "limit": 0}, "greater than or equal to 1"),
        ({"query": "star", "limit": "5"}, "valid integer"),
        ({"ids": "1"}, "valid list"),
        ({"ids": [True]}, "valid integer"),
        ({"query": "star", "extra": 1}, "Extra inputs are not permitted"),
    ],
)
def test_items_request_refusals(body, message):
    with pytest.raises(ValidationError, match=message):
        ItemsRequest.model_validate(body)
    assert ItemsRequest.model_validate({"ids": [1, "2"]}).ids == [1, "2"]
