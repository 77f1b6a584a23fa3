"""Shared fixtures: tiny models trained once per session, a private BentoML home, real servers."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

# Before anything imports bentoml: every test uses a private, empty model store, removed at exit.
os.environ["BENTOML_HOME"] = tempfile.mkdtemp(prefix="recbole-bento-home-")
atexit.register(shutil.rmtree, os.environ["BENTOML_HOME"], ignore_errors=True)
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

import httpx  # noqa: E402
import pytest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from devtools.local_server import free_port, local_server  # noqa: E402, F401
from devtools.training import RECBOLE_DATASETS, Trained, train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SUBSET_USERS = 300  # ml-100k users 1..300: ~30k interactions, seconds per epoch

_trained: dict[tuple, Trained] = {}

# What marks a test (pyproject.toml registers the markers; `make test-fast` leaves both out): a
# test that needs a trained model is slow, one that needs a running server is a server test. Tests
# that start a server of their own (``serving``) carry ``@pytest.mark.server`` themselves.
SLOW_FIXTURES = {"train_tiny"}
SERVER_FIXTURES = {
    "sasrec_server",
    "sasrec_split_server",
    "layout_server",
    "gru4rec_split_server",
    "sasrec_items_server",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        needs = set(getattr(item, "fixturenames", ()))
        if needs & SLOW_FIXTURES:
            item.add_marker(pytest.mark.slow)
        if needs & SERVER_FIXTURES:
            item.add_marker(pytest.mark.server)


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("work")


@pytest.fixture(scope="session")
def ml100k_subset(workdir: Path) -> Path:
    """A data_path whose ml-100k/ holds the first users' interactions and all side files."""
    src = RECBOLE_DATASETS / "ml-100k"
    dst = workdir / "data" / "ml-100k"
    dst.mkdir(parents=True)
    for path in src.iterdir():
        if path.suffix != ".inter":
            shutil.copy(path, dst / path.name)
    lines = (src / "ml-100k.inter").read_text().splitlines()
    kept = [lines[0]] + [ln for ln in lines[1:] if int(ln.split("\t")[0]) <= SUBSET_USERS]
    (dst / "ml-100k.inter").write_text("\n".join(kept) + "\n")
    return dst.parent


@pytest.fixture(scope="session")
def train_tiny(ml100k_subset: Path, workdir: Path):
    """train_tiny(model, **overrides) -> Trained, cached for the session."""

    def _train(model: str, dataset: str = "ml-100k", data_path: Path | None = None, **overrides):
        key = (model, dataset, str(data_path), repr(sorted(overrides.items())))
        if key not in _trained:
            out = workdir / "ckpt" / f"{model}-{dataset}-{len(_trained)}"
            _trained[key] = train(model, out, dataset, data_path or ml100k_subset, overrides)
        return _trained[key]

    return _train


def run_import(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run the real CLI, as other tooling drives it."""
    return subprocess.run(
        [sys.executable, str(ROOT / "import_model.py"), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )


def import_ok(*args: str | Path) -> str:
    result = run_import(*args)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


@contextlib.contextmanager
def serving(tag: str, cwd: Path = ROOT, ready_timeout: float = 120, **env: str) -> Iterator[str]:
    """`bentoml serve` on 127.0.0.1 for *tag*; yields the base URL once /readyz answers 200."""
    # Each server gets its own BentoML home sharing the one model store: `bentoml serve` empties
    # <home>/prometheus_multiproc_dir at start, which would blank the metrics of servers running.
    shared = Path(os.environ["BENTOML_HOME"])
    (shared / "models").mkdir(parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix="bentoml-serve-home-"))
    (home / "models").symlink_to(shared / "models")
    env = {"BENTOML_HOME": str(home), **env}
    log = home / "serve.log"
    try:
        with local_server(tag, cwd=cwd, env=env, ready_timeout=ready_timeout, log_path=log) as url:
            _LOGS[url] = log
            yield url
    finally:
        serving.last_log = log.read_text() if log.exists() else ""  # type: ignore[attr-defined]
        _LOGS.pop(locals().get("url", ""), None)
        shutil.rmtree(home, ignore_errors=True)


_LOGS: dict[str, Path] = {}  # the log of each server ``serving`` runs, by its URL


def server_log(url: str) -> str:
    """What the server at *url* (started by ``serving``, still running) has logged so far."""
    return _LOGS[url].read_text()


@pytest.fixture(scope="session")
def sasrec(train_tiny) -> Trained:
    return train_tiny("SASRec")


@pytest.fixture(scope="session")
def sasrec_import(sasrec: Trained) -> subprocess.CompletedProcess[str]:
    """The session's import of SASRec through the real CLI, under its default name, with a label
    and --progress: the tests of what the CLI prints and stores read this one import."""
    result = run_import(
        sasrec.checkpoint, "--dataset-pickle", sasrec.dataset_pickle, "--label", "team=recs", "--progress"
    )
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="session")
def sasrec_tag(sasrec_import: subprocess.CompletedProcess[str]) -> str:
    return sasrec_import.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def sasrec_server(sasrec_tag: str) -> Iterator[str]:
    """The service as shipped: for this small CPU catalogue, the in-process topology."""
    with serving(sasrec_tag) as url:
        yield url


@pytest.fixture(scope="session")
def sasrec_split_server(sasrec_tag: str) -> Iterator[str]:
    """The same model behind the two-service topology (public service -> Ranker)."""
    with serving(sasrec_tag, RECBOLE_BENTO_TOPOLOGY="split") as url:
        yield url


# An item title that is HTML: the playground must show it as text (tests/test_playground.py); to the
# filters and /items it is one more attribute value.
HOSTILE_TITLE = "<img src=x onerror=window.__pwned=1> Evil <script>window.__pwned=2</script>"


@pytest.fixture(scope="session")
def item_file(ml100k_subset: Path, workdir: Path) -> Path:
    """The subset's ml-100k.item (genres as ``class``, ``release_year``, ``movie_title``), with
    item 1's title replaced by HOSTILE_TITLE."""
    lines = (ml100k_subset / "ml-100k" / "ml-100k.item").read_text().splitlines()
    header = lines[0].split("\t")
    title = header.index("movie_title:token_seq")
    rows = [line.split("\t") for line in lines[1:]]
    for row in rows:
        if row[0] == "1":
            row[title] = HOSTILE_TITLE
    path = workdir / "items" / "ml-100k.item"
    path.parent.mkdir(parents=True)
    path.write_text("\n".join(["\t".join(header)] + ["\t".join(row) for row in rows]) + "\n")
    return path


@pytest.fixture(scope="session")
def sasrec_items_tag(sasrec: Trained, item_file: Path) -> str:
    """SASRec imported with *item_file*'s columns as filterable attributes."""
    args = ("--dataset-pickle", sasrec.dataset_pickle, "--item-features", item_file, "--name", "sasrec-items")
    return import_ok(sasrec.checkpoint, *args)


@pytest.fixture(scope="session")
def sasrec_items_server(sasrec_items_tag: str) -> Iterator[str]:
    """The model with attributes, served (filters, /similar_items, /items, the playground)."""
    with serving(sasrec_items_tag) as url:
        yield url


@pytest.fixture(scope="session")
def gru4rec(train_tiny) -> Trained:
    """A second dot-product model, with another window than SASRec's (10)."""
    return train_tiny("GRU4Rec", MAX_ITEM_LIST_LENGTH=10)


@pytest.fixture(scope="session")
def gru4rec_tag(gru4rec: Trained) -> str:
    return import_ok(gru4rec.checkpoint, "--dataset-pickle", gru4rec.dataset_pickle, "--name", "gru4rec-w10")


@pytest.fixture(scope="session")
def gru4rec_split_server(gru4rec_tag: str) -> Iterator[str]:
    """GRU4Rec behind the two-service topology: parity and similar items through the Ranker."""
    with serving(gru4rec_tag, RECBOLE_BENTO_TOPOLOGY="split") as url:
        yield url


@pytest.fixture(scope="session", params=["inprocess", "split"])
def layout_server(request: pytest.FixtureRequest, sasrec_tag: str) -> str:
    """The same model in each layout (``RECBOLE_BENTO_TOPOLOGY``), for what must hold in both."""
    return request.getfixturevalue("sasrec_server" if request.param == "inprocess" else "sasrec_split_server")


def recbole_reference(trained: Trained, k: int = 10, max_users: int = 40) -> list[dict]:
    """RecBole's own answer (case_study.full_sort_scores on the checkpoint's weights) for the
    first test users: the request body that reproduces each, and RecBole's scores."""
    import torch
    from recbole.utils.case_study import full_sort_scores

    from recbole_bento.core.safe_pickle import load_checkpoint

    checkpoint = load_checkpoint(trained.checkpoint)
    model = trained.model
    model.load_state_dict(checkpoint["state_dict"])
    model.load_other_parameter(checkpoint.get("other_parameter"))
    model.eval()
    test = trained.test_data
    ds = test.dataset
    uid_field, iid_field = ds.uid_field, ds.iid_field
    seq_field = iid_field + trained.config["LIST_SUFFIX"]
    len_field = trained.config["ITEM_LIST_LENGTH_FIELD"]
    uids = ds.inter_feat[uid_field][:max_users]
    scores = full_sort_scores(uids.numpy(), model, test)
    rows = []
    for row, uid in enumerate(uids.tolist()):
        index = int((ds.inter_feat[uid_field] == uid).nonzero()[0, 0])
        length = int(ds.inter_feat[len_field][index])
        history = ds.inter_feat[seq_field][index][:length].tolist()
        top = torch.topk(scores[row], k)
        rows.append(
            {
                "body": {
                    "sequence": list(ds.id2token(iid_field, history)),
                    "user_id": str(ds.id2token(uid_field, uid)),
                    "topk": k,
                },
                "items": list(ds.id2token(iid_field, top.indices.tolist())),
                "scores": top.values.tolist(),
                "score_of": dict(zip(ds.field2id_token[iid_field], scores[row].tolist(), strict=True)),
            }
        )
    return rows


def assert_same_topk(got: dict, ref: dict, tol: float = 1e-4) -> None:
    """Same ids in the same order and scores within *tol*; tied items (|Δscore| < tol) may swap."""
    assert len(got["item_list"]) == len(ref["items"])
    for got_score, ref_score in zip(got["score_list"], ref["scores"], strict=True):
        assert abs(got_score - ref_score) < tol, (got, ref["items"], ref["scores"])
    for pos, (got_id, ref_id) in enumerate(zip(got["item_list"], ref["items"], strict=True)):
        if got_id != ref_id:
            assert abs(ref["score_of"][got_id] - ref["scores"][pos]) < tol, (pos, got, ref["items"])


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample on /metrics: (name, sorted labels) -> value."""
    response = httpx.get(f"{url}/metrics", timeout=30)
    assert response.status_code == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def batch_rows(item_tokens: list[str], n: int, seed: int = 0) -> list[dict]:
    """*n* rows for the batch scorers: histories of known ids (as strings or integers, as clients
    send them), some with unknown ids, every tenth with unknown ids only (the popularity fallback),
    and three passthrough columns of different types."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        seq: list = rng.sample(item_tokens, rng.randint(1, 30))
        if i % 10 == 0:
            seq = [f"nope-{i}", "nope"]
        elif i % 10 == 1:
            seq.insert(rng.randrange(len(seq)), f"nope-{i}")
        if i % 3 == 0:
            seq = [int(x) if x.isdigit() else x for x in seq]
        rows.append({"row": i, "name": f"user {i}", "sequence": seq, "weight": i / 7})
    return rows
