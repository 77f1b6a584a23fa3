"""Issue 13: similar items, attribute filters and "because" explanations.

In-process: filter compilation and validation, the fallback and the block top-k with filters,
attributes read from a Dataset vs from the atomic file. Over HTTP (one SASRec server with the
ml-100k item attributes, in-process; one GRU4Rec server, split): parity with numpy cosine over the
stored table, with RecBole's own full_sort_predict scores under a filter, and explanations
recomputed with numpy.
"""

from __future__ import annotations

import csv
import gc
import json
import weakref
from pathlib import Path
from types import SimpleNamespace

import bentoml
import httpx
import numpy as np
import pytest
import torch
from conftest import assert_same_topk, recbole_reference, run_import, scrape, server_log

from devtools.training import QUIET_CPU
from recbole_bento.core import attributes
from recbole_bento.core.artifact import load_artifact
from recbole_bento.core.attributes import FilterError, ItemAttributes
from recbole_bento.core.blockwise import BlockTopK
from recbole_bento.core.models import MODEL_SPECS
from recbole_bento.core.planner import Planner, RequestError
from recbole_bento.core.ranking import NEG_INF, Allowed, RankQuery, apply_masks, popular_topk

ITEM_FILE = """item_id:token\tgenre:token_seq\tyear:token\tprice:float\tvec:float_seq
1\tComedy Drama\t1995\t10.5\t1 2
2\tAction\t1995\t30\t1 2
3\tDrama\t1996\t\t1 2
4\t\t1997\t5\t1 2
99\tComedy\t1995\t1\t1 2
"""
TOKENS = ["[PAD]", "1", "2", "3", "4", "5"]  # item 5 is not in the file: no values


def post(url: str, path: str, body: object) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=60)


@pytest.fixture
def stored(tmp_path: Path) -> dict:
    path = tmp_path / "shop.item"
    path.write_text(ITEM_FILE)
    return json.loads(json.dumps(attributes.from_item_file(path, "item_id", TOKENS)))  # as stored


@pytest.fixture
def attrs(stored: dict) -> ItemAttributes:
    return ItemAttributes(stored, len(TOKENS))


def passing(attrs: ItemAttributes, filters: dict) -> list[str]:
    return [TOKENS[i] for i in attrs.compile(attrs.normalize(filters)).ids.tolist()]


# ------------------------------------------------------------------ filters, in-process


def test_item_file_columns_become_typed_fields(attrs):
    assert {n: f["type"] for n, f in attrs.describe().items()} == {
        "genre": "token_seq",
        "year": "token",
        "price": "float",
    }  # float_seq is not filterable; the item id is not an attribute
    assert attrs.describe()["year"]["examples"] == ["1995", "1996", "1997"]
    assert attrs.describe()["price"]["examples"] == [5.0, 10.5, 30.0]


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({"genre": ["Comedy"]}, ["1"]),  # 99 is not a model item
        ({"genre": ["Drama", "Action"]}, ["1", "2", "3"]),  # any listed token of the sequence
        ({"year": ["1995"]}, ["1", "2"]),
        ({"year": [1995, 1997]}, ["1", "2", "4"]),  # integers read as the tokens they spell
        ({"year": ["1995"], "genre": ["Drama"]}, ["1"]),  # fields AND
        ({"price": {"gte": 5, "lte": 10.5}}, ["1", "4"]),  # bounds inclusive; no value never passes
        ({"price": {"lte": 100}}, ["1", "2", "4"]),
        ({"genre": ["Horror"]}, []),
        ({}, ["1", "2", "3", "4", "5"]),  # no condition: every item, never the padding
    ],
)
def test_filter_compilation(attrs, filters, expected):
    assert passing(attrs, filters) == expected


def test_compiled_filters_are_cached_and_keyed_by_their_normal_form(attrs):
    first = attrs.compile(attrs.normalize({"year": ["1995", 1997]}))
    assert attrs.compile(attrs.normalize({"year": ["1997", "1995", "1995"]})) is first


@pytest.mark.parametrize(
    ("filters", "message"),
    [
        ({"colour": ["red"]}, "filters: unknown field 'colour'"),
        ({"year": "1995"}, "filters.year: a token field takes a non-empty list of values"),
        ({"year": []}, "filters.year: a token field takes a non-empty list"),
        ({"genre": [["Comedy"]]}, "filters.genre: a token_seq field takes a non-empty list"),
        ({"genre": [True]}, "filters.genre: a token_seq field takes"),
        ({"price": [10]}, 'filters.price: a float field takes {"gte": number, "lte": number}'),
        ({"price": {"gt": 1}}, "filters.price: a float field takes"),
        ({"price": {"gte": "1"}}, "filters.price: a float field takes"),
        ({"price": {}}, "filters.price: a float field takes"),
    ],
)
def test_filter_validation_names_the_filterable_fields(attrs, filters, message):
    with pytest.raises(FilterError) as err:
        attrs.normalize(filters)
    assert str(err.value).startswith(message)
    assert str(err.value).endswith("filterable fields: genre (token_seq), year (token), price (float)")


def _planner(spec: str, directory: Path, stored: dict | None = None) -> Planner:
    """A Planner over TOKENS for a model of class *spec*, with *stored* attributes if given."""
    directory.mkdir(exist_ok=True)
    if stored is not None:
        (directory / attributes.FILE).write_text(json.dumps(stored))
    artifact = SimpleNamespace(
        spec=MODEL_SPECS[spec],
        item_tokens=TOKENS,
        user_tokens=None,
        popularity=np.array([0, 5, 9, 1, 7, 3]),
        path=directory,
        window=50,
    )
    return Planner(artifact, max_topk=100)  # type: ignore[arg-type]


def _request(**fields):
    base = dict(sequence=[], topk=3, user_id=None, exclude_seen=False, exclude=[], candidates=None)
    return SimpleNamespace(**(base | {"filters": None, "explain": False} | fields))


def test_planner_refuses_what_the_model_cannot_do(stored, tmp_path):
    plain = _planner("SASRec", tmp_path / "plain")
    with pytest.raises(RequestError, match="this model has no filterable item attributes; import it with"):
        plain.plan(_request(sequence=["1"], filters={"year": ["1995"]}))
    tabled = _planner("SASRec", tmp_path / "shop", stored)
    with pytest.raises(RequestError, match="unknown field 'colour'; filterable fields: genre"):
        tabled.plan(_request(sequence=["1"], filters={"colour": ["red"]}))
    similar = SimpleNamespace(items=["1"], topk=3, exclude=[], candidates=None, filters=None)
    for spec in ("FPMC", "RepeatNet", "KSR", "NPE"):  # full_sort_predict scores against no plain table
        without = _planner(spec, tmp_path / "plain")
        with pytest.raises(RequestError, match=f"/similar_items is not available for {spec}"):
            without.plan_similar(similar)
        with pytest.raises(RequestError, match=f"explain is not available for {spec}"):
            without.plan(_request(sequence=["1"], user_id="1", explain=True))
    # a good plan carries the normalised filter and how many items pass it
    plan = tabled.plan_similar(
        SimpleNamespace(items=["1", "x"], topk=3, exclude=["2"], candidates=None, filters={"year": [1995]})
    )
    assert plan.query.kind == "similar" and plan.query.history == [1] and plan.unknown == ["x"]
    assert plan.query.exclude == [2, 1] and plan.query.filters == {"year": ["1995"]} and plan.passing == 2


def test_attributes_are_loaded_once_per_file_in_a_process(stored, tmp_path):
    """A worker's request schema, planner and engine load the same file: one copy, shared (with its
    compiled filters); a changed file is read again; a copy nobody holds any more is freed."""
    planner = _planner("SASRec", tmp_path, stored)
    again = ItemAttributes.load(tmp_path, len(TOKENS))
    assert again is planner.attributes and planner.compile_filter == again.compile
    fewer = {name: field for name, field in stored.items() if name != "price"}
    (tmp_path / attributes.FILE).write_text(json.dumps(fewer))
    changed = ItemAttributes.load(tmp_path, len(TOKENS))
    assert changed is not None and changed is not again and "price" not in changed.kinds()
    first = weakref.ref(again)
    del planner, again
    gc.collect()
    assert first() is None


def test_popularity_fallback_is_filtered(stored, attrs, tmp_path):
    planner = _planner("SASRec", tmp_path, stored)
    plan = planner.plan(_request(sequence=["unknown"], topk=5, filters={"genre": ["Drama", "Action"]}))
    assert plan.fallback == "no_known_items"
    result = planner.popular(plan)  # popularity 9 (item 2), 5 (item 1), 1 (item 3)
    assert result.items == [2, 1, 3] and result.scores == [9.0, 5.0, 1.0]
    answer = planner.answer(plan, result)
    assert answer["item_list"] == ["2", "1", "3"] and answer["because"] is None
    # and with candidates: both restrict
    plan.query.candidates = [3, 4]
    assert popular_topk(planner.by_popularity, planner.popularity, plan.query, attrs.compile).items == [3]


@pytest.mark.parametrize(
    ("share", "direct"),
    [(0.001, True), (0.01, True), (0.05, True), (0.3, False)],  # 0.05: over a block, under n / 16
)
def test_block_topk_with_a_selective_filter_is_exact(share, direct):
    """Allow-lists of up to a sixteenth of the table are re-scored directly, larger ones go through
    pass 1 with the mask: both must equal the masked brute-force top-k."""
    gen = torch.Generator().manual_seed(3)
    n, dim = 40_000, 16
    table = torch.randn(n, dim, generator=gen)
    passing_items = torch.rand(n, generator=gen) < share
    passing_items[0] = False

    def compile_filter(_filters: dict) -> Allowed:
        return Allowed.from_mask(passing_items)

    queries = [
        RankQuery([1], 10, filters={"f": ["x"]}),
        RankQuery([2], 10),
        RankQuery([3], 10, exclude=passing_items.nonzero().flatten()[:3].tolist(), filters={"f": ["x"]}),
    ]
    q = torch.randn(len(queries), dim, generator=gen)
    block = BlockTopK(table, n, block_items=1024, low_precision=False)
    select, scanned = block._select, []  # pass 1's chunk selection, on the rows it scans
    block._select = lambda rows, *rest: scanned.append(rows.shape[0]) or select(rows, *rest)
    got = block.topk(q, queries, 10, force=True, compile_filter=compile_filter)
    assert got is not None
    assert scanned == [1 if direct else 3]  # the unfiltered row always goes through pass 1
    scores = q @ table.T
    apply_masks(scores, queries, compile_filter)
    want = torch.topk(scores, 10, dim=1)
    assert torch.equal(got[1], want.indices)
    assert torch.allclose(got[0], want.values)
    assert bool(passing_items[got[1][0]].all()) and bool(passing_items[got[1][2]].all())
    assert not set(got[1][2].tolist()) & set(queries[2].exclude)


def test_attributes_from_the_dataset_equal_those_from_the_item_file(ml100k_subset, tmp_path):
    """Without --item-features the Dataset's own item features are stored; with the same file
    loaded both ways the stored values are the same (before and after RecBole's build())."""
    from recbole.config import Config
    from recbole.data import create_dataset

    config = Config(
        model="SASRec",
        dataset="ml-100k",
        config_dict={
            "data_path": str(ml100k_subset),
            "load_col": {
                "inter": ["user_id", "item_id", "timestamp"],
                "item": ["item_id", "release_year", "class"],
            },
            "train_neg_sample_args": None,
            **QUIET_CPU,
        },
    )
    config.final_config_dict["data_path"] = str(ml100k_subset / "ml-100k")
    dataset = create_dataset(config)
    tokens = [str(t) for t in dataset.field2id_token["item_id"]]
    from_ds = attributes.from_dataset(dataset)
    from_file = attributes.from_item_file(ml100k_subset / "ml-100k" / "ml-100k.item", "item_id", tokens)
    assert set(from_ds) == {"release_year", "class"}
    for name, stored in from_ds.items():
        assert _decoded(stored) == _decoded(from_file[name]), name
    assert sum(v is not None for v in _decoded(from_ds["class"])) > 0.9 * len(tokens)
    dataset.build()  # a built Dataset holds them as an Interaction of tensors: the same values
    assert attributes.from_dataset(dataset) == from_ds


def _decoded(stored: dict) -> list:
    vocab = stored.get("vocab")
    if stored["type"] == "token":
        return [None if c < 0 else vocab[c] for c in stored["values"]]
    return [sorted(vocab[c] for c in codes) or None for codes in stored["values"]]


def test_import_refuses_an_unreadable_item_file(sasrec, tmp_path):
    bad = tmp_path / "bad.item"
    bad.write_text("item_id:token\tprice:float\n1\tcheap\n")
    result = run_import(sasrec.checkpoint, "--dataset-pickle", sasrec.dataset_pickle, "--item-features", bad)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"import_model: --item-features {bad}: line 2: price:float is 'cheap'"
    ]
    no_id = tmp_path / "noid.item"
    no_id.write_text("sku:token\tprice:float\n1\t2\n")
    result = run_import(
        sasrec.checkpoint, "--dataset-pickle", sasrec.dataset_pickle, "--item-features", no_id
    )
    assert result.returncode == 1 and "no item_id column" in result.stderr


# ------------------------------------------------------------------ over HTTP


ITEM_ATTRS = ("class", "release_year")


@pytest.fixture(scope="module")
def shop(sasrec_items_tag, sasrec_items_server, item_file) -> SimpleNamespace:
    """SASRec imported with the ml-100k item file as its attributes, served (the session's)."""
    tag = sasrec_items_tag
    return SimpleNamespace(
        url=sasrec_items_server, tag=tag, table=_unit_table(tag), tokens=_tokens(tag), item_file=item_file
    )


def _tokens(tag: str) -> list[str]:
    return json.loads((Path(bentoml.models.get(tag).path) / "item_tokens.json").read_text())


def _unit_table(tag: str, name: str = "item_embedding") -> np.ndarray:
    """The stored item table, rows L2-normalised, in float64 (the reference)."""
    weights = load_artifact(Path(bentoml.models.get(tag).path)).state_dict
    table = weights[f"{name}.weight"].double().numpy()[: len(_tokens(tag))]
    norms = np.linalg.norm(table, axis=1, keepdims=True)
    return table / np.where(norms == 0, 1, norms)


def _item_values(item_file: Path) -> dict[str, dict[str, set[str]]]:
    """field -> item token -> its values, read straight from the atomic file."""
    out: dict[str, dict[str, set[str]]] = {f: {} for f in ITEM_ATTRS}
    with open(item_file, newline="") as f:
        for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            out["class"][row["item_id:token"]] = set(row["class:token_seq"].split())
            out["release_year"][row["item_id:token"]] = {row["release_year:token"]}
    return out


def _numpy_similar(table: np.ndarray, tokens: list[str], items: list[str], k: int) -> dict:
    ids = [tokens.index(i) for i in items]
    query = table[ids].mean(0)
    scores = table @ (query / np.linalg.norm(query))
    scores[[0, *ids]] = -np.inf
    order = np.argsort(-scores, kind="stable")[:k]
    return {
        "items": [tokens[i] for i in order],
        "scores": scores[order].tolist(),
        "score_of": dict(zip(tokens, scores.tolist(), strict=True)),
    }


def _check_similar(url: str, table: np.ndarray, tokens: list[str]) -> None:
    for items in (["50"], ["1", "100"], ["181", "7", "258", "unknown"]):
        got = post(url, "/similar_items", {"items": items, "topk": 10}).json()
        known = [i for i in items if i in tokens]
        assert got["fallback"] is None and got["unknown_items"] == [i for i in items if i not in tokens]
        assert set(got) == {
            "item_list",
            "score_list",
            "unknown_items",
            "fallback",
            "model",
            "variant",
            "retrieval",
        }
        assert got["retrieval"] == "exact"
        assert_same_topk(got, _numpy_similar(table, tokens, known, 10), tol=1e-5)


@pytest.mark.server
def test_similar_items_match_numpy_cosine_sasrec(shop):
    _check_similar(shop.url, shop.table, shop.tokens)


def test_similar_items_match_numpy_cosine_gru4rec_split(gru4rec_tag, gru4rec_split_server):
    """Split topology (SASRec's server runs in-process, the default here): similar-items queries
    travel to the Ranker service and back."""
    _check_similar(gru4rec_split_server, _unit_table(gru4rec_tag), _tokens(gru4rec_tag))
    assert "topology split" in server_log(gru4rec_split_server)


@pytest.mark.server
def test_similar_items_exclude_candidates_filters_and_fallback(shop):
    base = post(shop.url, "/similar_items", {"items": ["50"], "topk": 20}).json()["item_list"]
    excluded = post(shop.url, "/similar_items", {"items": ["50"], "exclude": base[:2]}).json()
    assert excluded["item_list"] == base[2:12]
    only = post(shop.url, "/similar_items", {"items": ["50"], "candidates": base[5:8] + ["50"]}).json()
    assert only["item_list"] == base[5:8]  # the query item never comes back
    values = _item_values(shop.item_file)
    horror = post(shop.url, "/similar_items", {"items": ["50"], "filters": {"class": ["Horror"]}}).json()
    assert len(horror["item_list"]) == 10 and all("Horror" in values["class"][i] for i in horror["item_list"])
    fallback = post(shop.url, "/similar_items", {"items": ["nope"], "filters": {"release_year": ["1994"]}})
    body = fallback.json()
    assert body["fallback"] == "popular" and body["unknown_items"] == ["nope"]
    assert body["item_list"] and all(values["release_year"][i] == {"1994"} for i in body["item_list"])


@pytest.mark.server
def test_filters_match_recbole_scores_with_non_matching_items_at_minus_inf(sasrec, shop):
    values = _item_values(shop.item_file)
    cases = [
        {"class": ["Comedy", "Drama"]},
        {"release_year": ["1995"]},
        {"class": ["Children's"], "release_year": ["1994", "1995", "1996"]},
        {"class": ["Documentary"]},  # fewer matching items than topk? then all of them
    ]
    references = recbole_reference(sasrec, k=10, max_users=12)
    bodies = []
    for case_no, filters in enumerate(cases):
        for ref in references:
            allowed = {
                token
                for token in shop.tokens[1:]
                if all(values[f].get(token, set()) & set(wanted) for f, wanted in filters.items())
            }
            scores = {t: (s if t in allowed else NEG_INF) for t, s in ref["score_of"].items() if t != "[PAD]"}
            order = sorted(scores, key=lambda t: -scores[t])[:10]
            order = [t for t in order if scores[t] > NEG_INF]
            want = {"items": order, "scores": [scores[t] for t in order], "score_of": scores}
            body = {"sequence": ref["body"]["sequence"], "topk": 10, "filters": filters}
            got = post(shop.url, "/recommend", body).json()
            assert_same_topk(got, want)
            if case_no == 0:
                bodies.append((body, want))
    # /recommend_batch applies them per entry
    batch = post(shop.url, "/recommend_batch", {"requests": [b for b, _ in bodies[:6]]}).json()["results"]
    for got, (_, want) in zip(batch, bodies[:6], strict=True):
        assert_same_topk(got, want)


@pytest.mark.server
def test_explanations_match_numpy(shop):
    history = ["50", "181", "1", "1", "100", "not-an-item"]
    got = post(shop.url, "/recommend", {"sequence": history, "topk": 10, "explain": True}).json()
    assert len(got["because"]) == len(got["item_list"]) == 10
    known = list(dict.fromkeys(h for h in history if h in shop.tokens))
    for item, because in zip(got["item_list"], got["because"], strict=True):
        reasons = [h for h in known if h != item]
        sims = [
            float(shop.table[shop.tokens.index(item)] @ shop.table[shop.tokens.index(h)]) for h in reasons
        ]
        assert because == [reasons[i] for i in np.argsort(-np.array(sims), kind="stable")[:3]]
    # without explain: null; on the fallback: null; in a batch: per entry
    assert post(shop.url, "/recommend", {"sequence": history}).json()["because"] is None
    fallback = post(shop.url, "/recommend", {"sequence": ["nope"], "explain": True}).json()
    assert fallback["fallback"] == "popular" and fallback["because"] is None
    batch = post(
        shop.url,
        "/recommend_batch",
        {"requests": [{"sequence": history, "explain": True}, {"sequence": history}]},
    ).json()["results"]
    assert batch[0]["because"] == got["because"] and batch[1]["because"] is None
    with bentoml.SyncHTTPClient(shop.url) as client:  # BentoML's own client decodes both answers
        assert client.recommend(sequence=history, topk=10, explain=True) == got
        assert client.recommend(sequence=history, topk=10)["because"] is None
        similar = post(shop.url, "/similar_items", {"items": ["50"], "topk": 3}).json()
        assert client.similar_items(items=["50"], topk=3) == similar


@pytest.mark.server
def test_bad_filters_are_400_naming_the_fields_and_model_info_lists_them(shop, sasrec_server):
    fields = "filterable fields: movie_title (token_seq), release_year (token), class (token_seq)"
    for path, body in [
        ("/recommend", {"sequence": ["1"], "filters": {"genre": ["Comedy"]}}),
        ("/recommend_batch", {"requests": [{"sequence": ["1"], "filters": {"class": "Comedy"}}]}),
        ("/similar_items", {"items": ["1"], "filters": {"release_year": {"gte": 1990}}}),
    ]:
        response = post(shop.url, path, body)
        assert response.status_code == 400, response.text
        assert response.json()["error"].endswith(fields)
    response = post(sasrec_server, "/recommend", {"sequence": ["1"], "filters": {"class": ["Comedy"]}})
    assert response.status_code == 400 and "no filterable item attributes" in response.json()["error"]
    assert post(shop.url, "/similar_items", {"items": ["1"], "topk": 0}).status_code == 400
    info = post(shop.url, "/model_info", {}).json()
    assert info["similar_items"] is True
    assert info["filterable_fields"]["class"]["type"] == "token_seq"
    assert info["filterable_fields"]["release_year"]["type"] == "token"
    assert len(info["filterable_fields"]["class"]["examples"]) == 5
    assert post(sasrec_server, "/model_info", {}).json()["filterable_fields"] == {}
    docs = httpx.get(f"{shop.url}/docs.json").json()
    schema = docs["paths"]["/similar_items"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "items" in json.dumps(docs["components"]) or "items" in json.dumps(schema)


@pytest.mark.server
def test_metrics_count_endpoints_and_filter_selectivity(shop):
    before = scrape(shop.url)
    post(shop.url, "/similar_items", {"items": ["50"], "filters": {"release_year": ["1995"]}})
    post(shop.url, "/recommend", {"sequence": ["50"], "filters": {"class": ["Comedy"]}})
    post(shop.url, "/similar_items", {"items": ["50"], "filters": {"nope": ["1"]}})  # refused
    after = scrape(shop.url)
    tag = ("model_tag", shop.tag)

    def delta(name: str, *labels: tuple[str, str]) -> float:
        key = (name, tuple(sorted([tag, ("variant", "default"), *labels])))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("recbole_bento_endpoint_requests_total", ("endpoint", "/similar_items")) == 2
    assert delta("recbole_bento_endpoint_requests_total", ("endpoint", "/recommend")) == 1
    assert delta("recbole_bento_filter_selectivity_count") == 2
    values = _item_values(shop.item_file)
    share = sum("1995" in values["release_year"].get(t, set()) for t in shop.tokens[1:]) + sum(
        "Comedy" in values["class"].get(t, set()) for t in shop.tokens[1:]
    )
    assert delta("recbole_bento_filter_selectivity_sum") == pytest.approx(share / (len(shop.tokens) - 1))
