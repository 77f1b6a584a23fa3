"""The retrieval index (core/index.py): exact scores over its candidates, recall held to the floor,
masks and filters, the exact fallback for small allow-lists, refusals, hostile index files, and the
server that cannot start without faiss. On a 50k-item SASRec: the tiny trained one with its item
table widened to a structured synthetic one (bench/make_large_fixture.py's ``widen``)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT

from recbole_bento import index as index_cli
from recbole_bento.core import attributes, importer, index, store
from recbole_bento.core.artifact import file_digests, load_artifact
from recbole_bento.core.engine import Engine
from recbole_bento.core.planner import Planner
from recbole_bento.core.ranking import RankQuery

sys.path.insert(0, str(ROOT / "bench"))
import make_large_fixture  # noqa: E402

ITEMS = 50_000
CATEGORIES = 100


@pytest.fixture(scope="module")
def wide(
    sasrec_tag: str, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, list[list[int]], list[list[int]]]:
    """An artifact folder of a 50k-item SASRec with a category attribute (item id mod 100), no
    index yet; tuning and held-out sessions in internal ids."""
    directory = tmp_path_factory.mktemp("wide") / "model"
    shutil.copytree(store.resolve(sasrec_tag).path, directory, ignore=shutil.ignore_patterns("model.yaml"))
    assignment = make_large_fixture.widen(directory, ITEMS, seed=0)
    category = [None] + [str(i % CATEGORIES) for i in range(1, ITEMS + 1)]
    (directory / attributes.FILE).write_text(
        json.dumps({"category": attributes.encode_field("token", category)})
    )

    def internal(part_seed: int) -> list[list[int]]:
        return [[int(t[1:]) + 1 for t in s] for s in make_large_fixture.sessions(assignment, 300, part_seed)]

    return directory, internal(1), internal(2)


def with_index(wide: tuple, tmp_path: Path, kind: str = "ivf", min_recall: float = 0.95) -> Path:
    directory, tune, _ = wide
    target = tmp_path / "model"
    shutil.copytree(directory, target)
    engine = Engine(load_artifact(target), device="cpu")
    importer.add_retrieval_index(engine, target, kind, tune, min_recall, "tune sessions", importer.Progress())
    return target


@pytest.fixture(scope="module")
def ivf(wide: tuple, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    return Engine(load_artifact(with_index(wide, tmp_path_factory.mktemp("ivf"))), device="cpu")


def exact_engine(engine: Engine) -> Engine:
    """The same engine without its index (the exact path), for reference answers."""
    exact = Engine.__new__(Engine)
    exact.__dict__.update(engine.__dict__, index=None)
    return exact


def recall_of(got: list, ref: list) -> float:
    return sum(len(set(a.items) & set(b.items)) for a, b in zip(got, ref, strict=True)) / sum(
        len(b.items) for b in ref
    )


def assert_exact_scores(engine: Engine, queries: list[RankQuery], results: list) -> None:
    """Every returned score is the model's own full_sort_predict score of that item."""
    full = engine.scores(queries).float()
    for row, result in enumerate(results):
        assert result.items
        torch.testing.assert_close(torch.tensor(result.scores), full[row, result.items], rtol=1e-5, atol=1e-6)
        assert result.scores == sorted(result.scores, reverse=True)


def test_index_answers_with_exact_scores_and_the_recall_it_measured(ivf: Engine, wide: tuple) -> None:
    params = ivf.index.params
    assert params.kind == "ivf" and params.recall_at_10 >= 0.95 and 0 < params.nprobe <= params.nlist
    assert params.query_source == "tune sessions" and params.recall_queries == 300
    queries = [RankQuery(h, 10) for h in wide[2]]  # held-out sessions
    got = ivf.rank(queries)
    assert {r.retrieval for r in got} == {"index"}
    assert_exact_scores(ivf, queries[:40], got[:40])
    ref = exact_engine(ivf).rank(queries)
    assert {r.retrieval for r in ref} == {"exact"}
    assert recall_of(got, ref) >= 0.93  # held-out sessions: near the 0.95 floor it was tuned to


def test_masks_keep_their_meaning(ivf: Engine, wide: tuple) -> None:
    history = wide[2][0]
    exact = exact_engine(ivf)
    top = ivf.rank([RankQuery(history, 10)])[0].items
    # exclude (and exclude_seen, which the planner turns into exclude) drop items, others move up
    excluded = RankQuery(history, 10, exclude=top[:5] + history)
    got = ivf.rank([excluded])[0]
    assert got.retrieval == "index" and not set(got.items) & set(top[:5] + history)
    assert got.items[:5] == top[5:10]
    # a broad filter (half the categories) is searched in the index with the filter
    half = {"category": [str(c) for c in range(0, CATEGORIES, 2)]}
    queries = [RankQuery(h, 10, filters=half) for h in wide[2][:50]]
    got_all = ivf.rank(queries)
    assert {r.retrieval for r in got_all} == {"index"}
    assert all(i % 2 == 0 for r in got_all for i in r.items)  # category = id mod 100, even ones pass
    assert recall_of(got_all, exact.rank(queries)) >= 0.9
    assert_exact_scores(ivf, queries[:10], got_all[:10])


def test_a_small_allow_list_is_ranked_exactly(ivf: Engine, wide: tuple) -> None:
    exact = exact_engine(ivf)
    one = {"category": ["7"]}  # 1% of the catalogue
    assert ivf.index.prefers_exact(ivf.compile_filter(one).ids.numel())
    queries = [RankQuery(h, 10, filters=one) for h in wide[2][:20]]
    queries += [RankQuery(h, 5, candidates=list(range(1, ITEMS, 97))) for h in wide[2][:5]]
    got, ref = ivf.rank(queries), exact.rank(queries)
    assert {r.retrieval for r in got} == {"exact"}
    assert [r.items for r in got] == [r.items for r in ref]
    torch.testing.assert_close(
        torch.tensor([r.scores for r in got[:20]]), torch.tensor([r.scores for r in ref[:20]])
    )
    # in one batch with unfiltered queries: each row takes its own path
    mixed = ivf.rank([queries[0], RankQuery(wide[2][1], 10)])
    assert [r.retrieval for r in mixed] == ["exact", "index"]


def test_the_planner_says_which_path_answered(ivf: Engine, wide: tuple) -> None:
    planner = Planner(ivf.artifact, 100)
    tokens = [ivf.artifact.item_tokens[i] for i in wide[2][0]]
    request = type("Req", (), dict(sequence=tokens, topk=5, user_id=None, exclude_seen=True, exclude=[],
                                   candidates=None, filters=None, explain=False))()  # fmt: skip
    plan = planner.plan(request)
    answer = planner.answer(plan, ivf.rank([plan.query])[0])
    assert answer["retrieval"] == "index" and not set(answer["item_list"]) & set(tokens)


def test_hnsw(wide: tuple, tmp_path: Path) -> None:
    engine = Engine(load_artifact(with_index(wide, tmp_path, "hnsw")), device="cpu")
    params = engine.index.params
    assert params.kind == "hnsw" and params.recall_at_10 >= 0.95 and params.ef_search >= params.candidates
    queries = [RankQuery(h, 10) for h in wide[2][:100]]
    got = engine.rank(queries)
    assert {r.retrieval for r in got} == {"index"}
    assert_exact_scores(engine, queries[:20], got[:20])
    assert recall_of(got, exact_engine(engine).rank(queries)) >= 0.93


def test_a_floor_the_index_cannot_reach_is_refused(wide: tuple, tmp_path: Path, capsys) -> None:
    directory, tune, _ = wide
    model = store.register("wide-50k", directory, {"files": file_digests(directory), "item_count": ITEMS}, {})
    sessions = tmp_path / "sessions.jsonl"
    sessions.write_text("".join(json.dumps([f"i{i - 1}" for i in h]) + "\n" for h in tune))
    before = len(store.bentoml.models.list("wide-50k"))
    argv = [
        str(model.tag),
        "--index",
        "ivf",
        "--min-recall",
        "0.999",
        "--max-probe",
        "1",
        "--histories",
        str(sessions),
    ]
    assert index_cli.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "below --min-recall 0.999" in err[0] and "nprobe=1" in err[0]
    assert len(store.bentoml.models.list("wide-50k")) == before  # nothing registered
    # reachable: a new version of the same name, with the index recorded in its metadata
    assert index_cli.main([str(model.tag), "--index", "ivf", "--histories", str(sessions)]) == 0
    tag = capsys.readouterr().out.strip()
    new = store.resolve(tag)
    assert new.tag.name == "wide-50k" and new.tag != model.tag
    assert new.info.metadata["retrieval_index"]["recall_at_10"] >= 0.95
    store.verify(new)  # the index files are among the verified ones
    assert {index.INDEX_FILE, index.INDEX_META} <= set(new.info.metadata["files"])
    assert Engine(store.load(new), device="cpu").index is not None


def test_bad_options_are_refused_in_one_line(wide: tuple, capsys) -> None:
    with pytest.raises(importer.ImportRefused, match="--min-recall 1.5"):
        importer.check_index_options("ivf", 1.5)
    with pytest.raises(importer.ImportRefused, match="choose one of ivf, hnsw"):
        importer.check_index_options("lsh", 0.9)
    assert index_cli.main(["no-such-model", "--index", "ivf"]) == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


# ---------------------------------------------------------------------- hostile index files


@pytest.fixture(scope="module")
def indexed(wide: tuple, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return with_index(wide, tmp_path_factory.mktemp("indexed"))


def tampered(indexed: Path, tmp_path: Path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(indexed, target)
    return target


def rewrite_meta(directory: Path, **changes) -> None:
    meta = json.loads((directory / index.INDEX_META).read_text())
    (directory / index.INDEX_META).write_text(json.dumps({**meta, **changes}))


def load_index(directory: Path) -> index.RetrievalIndex | None:
    return index.RetrievalIndex.load(directory, ITEMS + 1, 32)


def test_the_stored_index_loads(indexed: Path) -> None:
    assert load_index(indexed) is not None


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / index.INDEX_FILE).write_bytes((d / index.INDEX_FILE).read_bytes()[:1000]), "bytes"),
        (
            lambda d: (d / index.INDEX_FILE).write_bytes(b"\0" * (d / index.INDEX_FILE).stat().st_size),
            "sha256",
        ),
        (lambda d: (d / index.INDEX_FILE).unlink(), "missing"),
        (
            lambda d: ((d / index.INDEX_FILE).unlink(), (d / index.INDEX_FILE).symlink_to("/dev/zero")),
            "regular",
        ),
        (lambda d: (d / index.INDEX_META).write_text("{"), "not JSON"),
        (lambda d: (d / index.INDEX_META).write_text("[" * 100_000), "not JSON|larger"),
        (lambda d: (d / index.INDEX_META).write_text(" " * 70_000 + "{}"), "larger than"),
        (lambda d: (d / index.INDEX_META).unlink(), "missing"),
        (lambda d: rewrite_meta(d, bytes=2**40), "bytes"),
        (lambda d: rewrite_meta(d, nprobe="8"), "nprobe is str"),
        (lambda d: rewrite_meta(d, extra=1), "does not describe"),
        (lambda d: rewrite_meta(d, kind="lsh"), "out of range"),
        (lambda d: rewrite_meta(d, n_items=10), "covers 10 items"),
    ],
)
def test_hostile_index_files_are_refused(indexed: Path, tmp_path: Path, damage, message: str) -> None:
    directory = tampered(indexed, tmp_path)
    damage(directory)
    with pytest.raises(index.RetrievalIndexError, match=message):
        load_index(directory)


def forged(indexed: Path, tmp_path: Path, vectors: np.ndarray) -> Path:
    """A well-formed ivf index of other *vectors*, with a json whose sha256 and size match it:
    only the shape check can refuse it."""
    import faiss

    directory = tampered(indexed, tmp_path)
    built = faiss.IndexIVFScalarQuantizer(
        faiss.IndexFlatIP(vectors.shape[1]),
        vectors.shape[1],
        16,
        faiss.ScalarQuantizer.QT_8bit,
        faiss.METRIC_INNER_PRODUCT,
    )
    built.train(vectors)
    built.add(vectors)
    data = faiss.serialize_index(built).tobytes()
    (directory / index.INDEX_FILE).write_bytes(data)
    meta = json.loads((directory / index.INDEX_META).read_text())
    import hashlib

    rewrite_meta(
        directory,
        bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        nlist=16,
        nprobe=min(meta["nprobe"], 16),
    )
    return directory


def test_an_index_of_another_shape_is_refused(indexed: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    wrong_dim = forged(indexed, tmp_path / "dim", rng.standard_normal((ITEMS + 1, 16), dtype=np.float32))
    with pytest.raises(index.RetrievalIndexError, match="of 16 dimensions"):
        load_index(wrong_dim)
    wrong_count = forged(indexed, tmp_path / "count", rng.standard_normal((ITEMS - 5, 32), dtype=np.float32))
    with pytest.raises(index.RetrievalIndexError, match=f"holds {ITEMS - 5} vectors"):
        load_index(wrong_count)


def test_garbage_with_a_matching_digest_is_refused_by_its_header(indexed: Path, tmp_path: Path) -> None:
    import hashlib

    directory = tampered(indexed, tmp_path)
    data = b"IwSq" + bytes(range(256)) * 8
    (directory / index.INDEX_FILE).write_bytes(data)
    rewrite_meta(directory, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    with pytest.raises(index.RetrievalIndexError, match="cannot be read"):
        load_index(directory)
    rewrite_meta(directory, kind="hnsw", ef_search=200)
    with pytest.raises(index.RetrievalIndexError, match="not a faiss hnsw index"):
        load_index(directory)


# ---------------------------------------------------------------------- without the extra


def test_without_faiss_a_model_with_an_index_does_not_start(indexed: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss -> ImportError
    with pytest.raises(index.RetrievalIndexError, match=r"recbole-bento\[index\]"):
        Engine(load_artifact(indexed), device="cpu")
    with pytest.raises(index.RetrievalIndexError, match=r"recbole-bento\[index\]"):
        index.require({"retrieval_index": {"kind": "ivf"}})
    index.require({})  # a model without an index needs no faiss


def test_the_server_start_up_names_the_extra(indexed: Path, monkeypatch) -> None:
    from recbole_bento.edge import startup
    from recbole_bento.settings import Settings

    directory = indexed
    metadata = {
        "files": file_digests(directory),
        "retrieval_index": json.loads((directory / index.INDEX_META).read_text()),
    }
    model = store.register("wide-50k-indexed", directory, metadata, {})
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(SystemExit, match=r"recbole-bento: .*pip install 'recbole-bento\[index\]'"):
        startup.start(Settings(model=str(model.tag)), traced_paths=[])


@pytest.fixture(scope="module")
def imported(sasrec) -> tuple[str, str]:
    """The tiny SASRec imported with ``--index ivf``: its tag, and what the import said on stderr."""
    from conftest import run_import

    args = [sasrec.checkpoint, "--dataset-pickle", sasrec.dataset_pickle, "--index", "ivf"]
    result = run_import(*args, "--name", "sasrec-tiny-ivf")
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1], result.stderr


@pytest.mark.slow
def test_import_model_builds_the_index_on_validation_histories(sasrec, imported: tuple[str, str]) -> None:
    from conftest import run_import

    tag, stderr = imported
    model = store.resolve(tag)
    params = model.info.metadata["retrieval_index"]
    assert params["query_source"].endswith("validation histories") and params["recall_at_10"] >= 0.95
    assert "retrieval index ivf (nlist=" in stderr
    engine = Engine(store.load(model), device="cpu")
    assert engine.rank([RankQuery([1, 2, 3], 5)])[0].retrieval == "index"
    args = [sasrec.checkpoint, "--dataset-pickle", sasrec.dataset_pickle, "--index", "ivf"]
    refused = run_import(*args, "--name", "sasrec-tiny-ivf2", "--min-recall", "1.5")
    assert refused.returncode == 1 and refused.stderr.strip().splitlines() == [
        "import_model: --min-recall 1.5: a recall@10 above 0 and at most 1"
    ]


@pytest.mark.server
@pytest.mark.slow
def test_the_server_says_which_path_answered(imported: tuple[str, str]) -> None:
    import httpx
    from conftest import serving

    with serving(imported[0]) as url:
        info = httpx.post(f"{url}/model_info", json={}, timeout=30).json()
        assert info["retrieval_index"]["kind"] == "ivf" and info["retrieval_index"]["recall_at_10"] >= 0.95
        body = {"sequence": ["1", "2", "3"], "topk": 5, "exclude_seen": True}
        got = httpx.post(f"{url}/recommend", json=body, timeout=30).json()
        assert got["retrieval"] == "index" and len(got["item_list"]) == 5
        assert not {"1", "2", "3"} & set(got["item_list"])
        got = httpx.post(f"{url}/recommend", json={**body, "candidates": ["50", "100"]}, timeout=30).json()
        assert got["retrieval"] == "exact" and set(got["item_list"]) <= {"50", "100"}
