"""Issue 2: import a checkpoint into the model store and serve it with exact RecBole parity."""

from __future__ import annotations

import asyncio
import re
import shutil
from pathlib import Path

import bentoml
import httpx
import numpy as np
import pytest
import torch
from conftest import (
    assert_same_topk,
    import_ok,
    recbole_reference,
    run_import,
    scrape,
    serving,
)

from devtools.metrics import batch_counts
from recbole_bento.core import artifact as art
from recbole_bento.core.engine import pad_histories
from recbole_bento.core.ranking import (
    Allowed,
    BatchMask,
    RankQuery,
    RankResult,
    apply_masks,
    popular_topk,
    popularity_order,
)
from recbole_bento.core.safe_pickle import load_dataset_pickle
from recbole_bento.schemas import RecommendResponse


def post(url: str, path: str, body: object) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=60)


# ------------------------------------------------------------------ artifact


def test_artifact_round_trip_is_pickle_free(sasrec, sasrec_tag):
    model = bentoml.models.get(sasrec_tag)
    meta = model.info.metadata
    path = Path(model.path)
    assert meta["recbole_model"] == "SASRec" and meta["dataset"] == "ml-100k"
    assert meta["item_count"] == sasrec.dataset.item_num - 1
    assert meta["max_history_length"] == sasrec.config["MAX_ITEM_LIST_LENGTH"]
    assert meta["required_inputs"] == ["sequence"]
    assert set(meta["versions"]) == {"recbole", "torch"}
    assert meta["best_valid_score"] == pytest.approx(
        float(torch.load(sasrec.checkpoint, weights_only=False)["best_valid_score"])
    )
    stored = {p.name for p in path.iterdir()} - {"model.yaml"}
    assert (
        stored
        == set(meta["files"])
        == {
            art.WEIGHTS,
            art.CONFIG,
            art.DATASET,
            art.ITEM_TOKENS,
            art.POPULARITY,
            art.ITEM_TABLE,
            art.ITEM_UNIT,
        }
    )
    # weights load with the safe loader and, with the item table stored beside them, equal the checkpoint's
    weights = torch.load(path / art.WEIGHTS, weights_only=True)
    weights["item_embedding.weight"] = torch.from_numpy(np.load(path / art.ITEM_TABLE))
    original = torch.load(sasrec.checkpoint, weights_only=False)["state_dict"]
    assert weights.keys() == original.keys()
    for key in weights:
        assert torch.equal(weights[key], original[key])
    # vocabulary in RecBole's internal order, popularity per internal id
    loaded = art.load_artifact(path, meta["files"])
    assert loaded.item_tokens == list(sasrec.dataset.field2id_token[sasrec.dataset.iid_field])
    assert loaded.popularity.shape == (sasrec.dataset.item_num,) and loaded.popularity[0] == 0
    fresh = load_dataset_pickle(sasrec.dataset_pickle)  # build() mutates; training already built
    train = fresh.build()[0]
    assert loaded.popularity.sum() == len(train.inter_feat)
    # nothing stored grows with the interactions: only per-item / per-field data
    assert (path / art.POPULARITY).stat().st_size < 16 * sasrec.dataset.item_num + 1024


def test_config_json_round_trips_recbole_config(sasrec):
    encoded = art.config_to_json(sasrec.config)
    decoded = art.ServingConfig({k: art._decode(v) for k, v in encoded.items()})
    for key in ("MODEL_TYPE", "MAX_ITEM_LIST_LENGTH", "hidden_size", "loss_type", "ITEM_ID_FIELD"):
        assert decoded[key] == sasrec.config[key]
    assert decoded["no_such_key"] is None  # RecBole's Config semantics
    assert "device" not in encoded


def test_default_name_and_tag_printed_last(sasrec_import):
    tag = sasrec_import.stdout.strip().splitlines()[-1]  # imported with --label team=recs, no --name
    assert re.fullmatch(r"sasrec-ml-100k:[a-z0-9]+", tag)
    assert bentoml.models.get(tag).info.labels == {"team": "recs"}


# ------------------------------------------------------------------ import errors


def _store_tags() -> set[str]:
    return {str(m.tag) for m in bentoml.models.list()}


def _refused(*args) -> str:
    before = _store_tags()
    result = run_import(*args)
    assert result.returncode != 0
    assert _store_tags() == before, "nothing may be registered on failure"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("import_model: "), result.stderr
    return lines[0]


def test_import_refuses_missing_file(sasrec, tmp_path):
    assert "does not exist" in _refused(tmp_path / "nope.pth", "--dataset-pickle", sasrec.dataset_pickle)
    assert "does not exist" in _refused(sasrec.checkpoint, "--dataset-pickle", tmp_path / "nope.pkl")


def test_import_refuses_non_checkpoint(sasrec, tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a checkpoint")
    assert "not a RecBole checkpoint" in _refused(junk, "--dataset-pickle", sasrec.dataset_pickle)
    plain = tmp_path / "plain.pth"
    torch.save({"weights": torch.zeros(2)}, plain)
    assert "not a RecBole checkpoint" in _refused(plain, "--dataset-pickle", sasrec.dataset_pickle)


def test_import_refuses_mismatched_dataset(sasrec, gru4rec, workdir):
    other = gru4rec
    # same dataset name but fewer items than the checkpoint's embedding table
    small = workdir / "small" / "ml-100k"
    small.mkdir(parents=True)
    src = Path(sasrec.config["data_path"])
    lines = (src / "ml-100k.inter").read_text().splitlines()
    (small / "ml-100k.inter").write_text("\n".join(lines[:2000]) + "\n")
    message = _refused(other.checkpoint, "--data-path", small.parent)
    assert "does not match the checkpoint" in message


def test_import_refuses_unsupported_model(sasrec, tmp_path):
    checkpoint = torch.load(sasrec.checkpoint, weights_only=False)
    checkpoint["config"].final_config_dict["model"] = "DIN"
    din = tmp_path / "din.pth"
    torch.save(checkpoint, din)
    message = _refused(din, "--dataset-pickle", sasrec.dataset_pickle)
    assert "DIN is not supported" in message and "full_sort_predict" in message


# ------------------------------------------------------------------ engine units


def test_padding_is_recboles_layout():
    seq, lengths = pad_histories([[5, 6], [1, 2, 3, 4, 5, 6, 7], [9]], width=4)
    assert seq.tolist() == [[5, 6, 0, 0], [4, 5, 6, 7], [9, 0, 0, 0]]
    assert lengths.tolist() == [2, 4, 1]


def test_masks_padding_exclude_and_candidates():
    scores = torch.arange(6, dtype=torch.float).repeat(3, 1)
    queries = [
        RankQuery([1], 3),
        RankQuery([1], 3, exclude=[5, 4]),
        RankQuery([1], 3, candidates=[0, 2, 3]),
    ]
    apply_masks(scores, queries)
    inf = float("-inf")
    assert scores[0].tolist() == [inf, 1, 2, 3, 4, 5]
    assert scores[1].tolist() == [inf, 1, 2, 3, inf, inf]
    assert scores[2].tolist() == [inf, inf, 2, 3, inf, inf]
    # the same rules item by item (block top-k pass 2) and block by block (pass 1)
    mask = BatchMask(queries, 6)
    ids = torch.tensor([[0, 1, 4, 5, -1], [0, 1, 4, 5, 3], [0, 2, 3, 4, 1]])
    assert mask.blocked(ids).tolist() == [
        [True, False, False, False, True],
        [True, False, True, True, False],
        [True, False, False, True, True],
    ]
    tail = torch.zeros(3, 3)
    mask.apply(tail, start=3)
    assert tail.tolist() == [[0, 0, 0], [0, inf, inf], [0, inf, inf]]


def test_popularity_fallback_applies_the_same_masks():
    counts = torch.tensor([0, 5, 9, 9, 1, 7])  # item 0 is padding
    order = popularity_order(counts)
    assert popular_topk(order, counts, RankQuery([], 3)) == RankResult([2, 3, 5], [9.0, 9.0, 7.0])
    assert popular_topk(order, counts, RankQuery([], 3, exclude=[2, 5])).items == [3, 1, 4]
    assert popular_topk(order, counts, RankQuery([], 5, candidates=[0, 4, 1])).items == [1, 4]
    assert popular_topk(order, counts, RankQuery([], 2, candidates=[])).items == []


def test_allow_lists_as_masks_and_ids_agree():
    """Candidates, a filter, and both: the mask and the ascending ids name the same items, and the
    restricted fallback ranks them as the popularity order does (count, then id)."""
    gen = torch.Generator().manual_seed(0)
    n = 500
    passing = torch.rand(n, generator=gen) < 0.2
    passing[0] = False
    counts = torch.randint(0, 5, (n,), generator=gen)  # many ties: the id order must decide them
    order = popularity_order(counts)
    candidates = torch.randint(0, n, (80,), generator=gen).tolist()  # repeats, and maybe 0
    queries = [
        RankQuery([], 30, candidates=candidates),
        RankQuery([], 30, filters={"f": ["x"]}),
        RankQuery([], 30, exclude=candidates[:5], candidates=candidates, filters={"f": ["x"]}),
    ]
    compiled = Allowed.from_mask(passing)
    mask = BatchMask(queries, n, compile_filter=lambda _filters: compiled)
    wanted = [set(candidates), set(passing.nonzero().flatten().tolist())]
    wanted.append(wanted[0] & wanted[1])
    for row, items in enumerate(wanted):
        ids = mask.allowed_ids[row]
        assert ids.tolist() == sorted(items)
        assert mask.allowed[row].nonzero().flatten().tolist() == sorted(items)
        query = queries[row]
        brute = [i for i in order.tolist() if i in items and i != 0 and i not in query.exclude][: query.topk]
        assert popular_topk(order, counts, query, lambda _filters: compiled).items == brute


# ------------------------------------------------------------------ HTTP


def test_readyz_and_model_info(sasrec_server, sasrec_tag, sasrec):
    assert httpx.get(f"{sasrec_server}/readyz").status_code == 200
    info = post(sasrec_server, "/model_info", {}).json()
    assert info["tag"] == sasrec_tag
    assert info["recbole_model"] == "SASRec"
    assert info["item_count"] == sasrec.dataset.item_num - 1
    assert info["max_history_length"] == sasrec.config["MAX_ITEM_LIST_LENGTH"]
    assert info["required_inputs"] == ["sequence"]
    assert info["device"] == "cpu"


def test_recommend_answer_is_one_sized_body_of_the_documented_schema(sasrec_server):
    """/recommend returns its JSON itself (Content-Length, not chunked); /docs.json still documents it."""
    response = post(sasrec_server, "/recommend", {"sequence": ["1", "2"], "topk": 3})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    assert int(response.headers["content-length"]) == len(response.content)
    assert "transfer-encoding" not in response.headers
    answer = RecommendResponse.model_validate_json(response.content)
    assert len(answer.item_list) == len(answer.score_list) == 3 and answer.fallback is None
    documented = httpx.get(f"{sasrec_server}/docs.json").json()["paths"]["/recommend"]["post"]["responses"]
    schema = documented["200"]["content"]["application/json"]["schema"]
    assert set(schema["required"]) == set(RecommendResponse.model_fields)
    with bentoml.SyncHTTPClient(sasrec_server) as client:
        assert client.recommend(sequence=["1", "2"], topk=3) == answer.model_dump()


def test_parity_sasrec_over_http(sasrec, sasrec_server):
    _check_parity(sasrec, sasrec_server)


def test_parity_gru4rec_over_http_split(gru4rec, gru4rec_split_server):
    """Another model, in the other layout: through the public service and the Ranker."""
    _check_parity(gru4rec, gru4rec_split_server)


def _check_parity(trained, url: str) -> None:
    references = recbole_reference(trained, k=10, max_users=40)
    for ref in references:
        body = {k: v for k, v in ref["body"].items() if k != "user_id"}
        got = post(url, "/recommend", body).json()
        assert got["fallback"] is None and got["unknown_items"] == []
        assert_same_topk(got, ref)
    # the batch endpoint answers the same, in order
    got = post(url, "/recommend_batch", {"requests": [r["body"] | {"user_id": None} for r in references[:8]]})
    for result, ref in zip(got.json()["results"], references[:8], strict=True):
        assert_same_topk(result, ref)


def test_long_history_uses_most_recent_items(sasrec, sasrec_server):
    window = sasrec.config["MAX_ITEM_LIST_LENGTH"]
    tokens = [t for t in sasrec.dataset.field2id_token[sasrec.dataset.iid_field][1:]]
    history = tokens[: window * 3]
    long = post(sasrec_server, "/recommend", {"sequence": history}).json()
    recent = post(sasrec_server, "/recommend", {"sequence": history[-window:]}).json()
    assert long == recent


def test_filters_and_decoding(sasrec, sasrec_server):
    tokens = list(sasrec.dataset.field2id_token[sasrec.dataset.iid_field])
    history = tokens[1:6]
    base = post(sasrec_server, "/recommend", {"sequence": history, "topk": 50}).json()
    assert len(base["item_list"]) == 50 and "[PAD]" not in base["item_list"]
    assert set(base["item_list"]) <= set(tokens[1:])
    assert base["score_list"] == sorted(base["score_list"], reverse=True)
    # ints and strings are the same tokens
    as_ints = post(sasrec_server, "/recommend", {"sequence": [int(t) for t in history], "topk": 50}).json()
    assert as_ints == base
    seen = post(sasrec_server, "/recommend", {"sequence": history, "topk": 50, "exclude_seen": True}).json()
    assert not set(seen["item_list"]) & set(history)
    assert [i for i in base["item_list"] if i not in history][:40] == seen["item_list"][:40]
    drop = base["item_list"][:3]
    excluded = post(sasrec_server, "/recommend", {"sequence": history, "topk": 10, "exclude": drop}).json()
    assert excluded["item_list"] == [i for i in base["item_list"] if i not in drop][:10]
    cands = base["item_list"][10:13] + ["not-an-item"]
    only = post(sasrec_server, "/recommend", {"sequence": history, "topk": 10, "candidates": cands}).json()
    assert only["item_list"] == base["item_list"][10:13]  # fewer than topk, in score order


def test_unknown_items_and_popularity_fallback(sasrec, sasrec_server, sasrec_tag):
    tokens = list(sasrec.dataset.field2id_token[sasrec.dataset.iid_field])
    mixed = post(sasrec_server, "/recommend", {"sequence": ["nope", tokens[3], 99999999]}).json()
    assert mixed["unknown_items"] == ["nope", "99999999"] and mixed["fallback"] is None
    assert (
        mixed["item_list"] == post(sasrec_server, "/recommend", {"sequence": [tokens[3]]}).json()["item_list"]
    )
    counts = art.load_artifact(Path(bentoml.models.get(sasrec_tag).path)).popularity
    order = [tokens[i] for i in np.argsort(-counts, kind="stable") if i != 0]
    for body in ({"sequence": []}, {"sequence": ["nope"]}):
        popular = post(sasrec_server, "/recommend", body | {"topk": 5}).json()
        assert popular["fallback"] == "popular"
        assert popular["item_list"] == order[:5]
    filtered = post(sasrec_server, "/recommend", {"sequence": [], "topk": 3, "exclude": order[:2]}).json()
    assert filtered["item_list"] == order[2:5]


@pytest.mark.parametrize(
    "body, fragment",
    [
        ({"sequence": [1], "topk": 0}, "greater than or equal to 1"),
        ({"sequence": [1], "topk": 1001}, "less than or equal to 1000"),
        ({"sequence": [1], "topk": "ten"}, "valid integer"),
        ({"sequence": [1], "topk": 2.5}, "valid integer"),
        ({"sequence": "1 2 3"}, "valid array"),
        ({"sequence": [[1, 2]]}, "sequence"),
        ({"sequence": [None]}, "sequence"),
        ({"topk": 5}, "sequence"),
        ({"sequence": [1], "top_k": 5}, "top_k"),
        ({"sequence": [1] * 10_001}, "at most 10000"),
    ],
)
def test_bad_requests_are_400(sasrec_server, body, fragment):
    response = post(sasrec_server, "/recommend", body)
    assert response.status_code == 400, response.text
    assert fragment in response.text


@pytest.mark.server
@pytest.mark.parametrize("topology", ["inprocess", "split"])
def test_concurrent_requests_batch_without_errors(sasrec, topology, request):
    server = request.getfixturevalue("sasrec_server" if topology == "inprocess" else "sasrec_split_server")
    tokens = list(sasrec.dataset.field2id_token[sasrec.dataset.iid_field])[1:]
    rng = np.random.default_rng(0)
    bodies = [
        {"sequence": rng.choice(tokens, size=int(rng.integers(1, 30))).tolist(), "topk": 10}
        for _ in range(240)
    ]

    async def run(url: str) -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=240)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
            return await asyncio.gather(*(client.post("/recommend", json=b) for b in bodies))

    before = _batch_histogram(server)
    ranker_calls_before = _ranker_calls(server)
    responses = asyncio.run(run(server))
    after = _batch_histogram(server)
    assert [r.status_code for r in responses] == [200] * len(bodies)
    assert all(len(r.json()["item_list"]) == 10 for r in responses)
    calls, sequences = after[0] - before[0], after[1] - before[1]
    assert sequences == len(bodies), "every request reaches the model exactly once"
    assert calls < sequences, "adaptive batching never put two requests in one model call"
    ranker_calls = _ranker_calls(server) - ranker_calls_before
    if topology == "split":
        assert 1 <= ranker_calls < len(bodies), "the public service sent each request to the ranker alone"
    else:
        assert ranker_calls == 0, "the in-process topology called a Ranker service"


def _batch_histogram(url: str) -> tuple[float, float]:
    """(model calls, sequences) from the service's batch size histogram on /metrics."""
    return batch_counts(httpx.get(f"{url}/metrics").text)


def _ranker_calls(url: str) -> float:
    """HTTP calls the Ranker answered on /rank (BentoML's request counter, all workers)."""
    return sum(
        count
        for (name, labels), count in scrape(url).items()
        if name == "bentoml_service_request_total"
        and dict(labels).get("runner_name") == "recbole_ranker"
        and dict(labels).get("endpoint") == "/rank"
    )


# ------------------------------------------------------------------ non-default field names


@pytest.fixture(scope="module")
def shop(train_tiny, workdir):
    """A dataset whose fields are not RecBole's defaults, with string product ids."""
    rng = np.random.default_rng(7)
    folder = workdir / "shop-data" / "shop"
    folder.mkdir(parents=True)
    rows = ["session_key:token\tproduct:token\tts:float"]
    for session in range(80):
        for step in range(int(rng.integers(6, 15))):
            rows.append(f"s{session:03d}\tsku-{int(rng.integers(0, 40)):04d}\t{session * 100 + step}")
    (folder / "shop.inter").write_text("\n".join(rows) + "\n")
    fields = {
        "USER_ID_FIELD": "session_key",
        "ITEM_ID_FIELD": "product",
        "TIME_FIELD": "ts",
        "LIST_SUFFIX": "_history",
        "ITEM_LIST_LENGTH_FIELD": "history_len",
        "load_col": {"inter": ["session_key", "product", "ts"]},
        "MAX_ITEM_LIST_LENGTH": 8,
    }
    trained = train_tiny("SASRec", dataset="shop", data_path=folder.parent, **fields)
    moved = workdir / "shop-elsewhere"  # the atomic files, not where training had them
    shutil.copytree(folder.parent, moved)
    tag = import_ok(trained.checkpoint, "--data-path", moved, "--name", "shop-sasrec")
    return trained, tag


@pytest.mark.server
def test_non_default_field_names_via_data_path(shop):
    trained, tag = shop
    meta = bentoml.models.get(tag).info.metadata
    assert meta["fields"] == {
        "user": "session_key",
        "item": "product",
        "item_sequence": "product_history",
        "sequence_length": "history_len",
    }
    with serving(tag) as url:
        for ref in recbole_reference(trained, k=5, max_users=20):
            got = post(url, "/recommend", {"sequence": ref["body"]["sequence"], "topk": 5}).json()
            assert all(item.startswith("sku-") for item in got["item_list"])
            assert_same_topk(got, ref)
        items = meta["item_count"]
        assert post(url, "/recommend", {"sequence": ["sku-0001"], "topk": items}).status_code == 200
        too_many = post(url, "/recommend", {"sequence": ["sku-0001"], "topk": items + 1})
        assert too_many.status_code == 400 and f"between 1 and {items}" in too_many.text
