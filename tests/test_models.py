"""Issue 3: every RecBole 1.2.1 sequential model with full_sort_predict imports (from a dataset pickle
and from atomic files) and serves RecBole's own answers; DIN and DIEN are refused in one line.

Each model is trained for one epoch on a 100-user slice of ml-100k (window 10, hidden 16, one
layer), imported both ways (the two artifacts must be byte-identical), and its top-10 for RecBole's
first 40 test users is compared with ``case_study.full_sort_scores`` on the same checkpoint: through
the runner's code path (store.load + Engine.rank) for every model, over HTTP (`bentoml serve`) for
one model of each kind (user id, item features, mask token, the replayed SINE). The results go to
build/model-parity.json, from which ``python docs/gen_model_table.py`` writes the model table.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bentoml
import httpx
import numpy as np
import pytest
import torch
from conftest import ROOT, assert_same_topk, import_ok, recbole_reference, run_import, serving

from devtools.training import RECBOLE_DATASETS, Trained, train
from recbole_bento.core import store
from recbole_bento.core.engine import Engine, RankQuery
from recbole_bento.core.importer import import_checkpoint
from recbole_bento.core.models import MODEL_SPECS, UnsupportedModelError

pytestmark = pytest.mark.slow  # every test here trains its models

RESULTS = ROOT / "build" / "model-parity.json"
USERS = 100  # ml-100k users 1..100: ~11k interactions, ~1.2k items
KG_DIM = 16
TINY = {
    "MAX_ITEM_LIST_LENGTH": 10,
    "hidden_size": 16,
    "embedding_size": 16,
    "inner_size": 32,
    "train_batch_size": 2048,
}
_BPR = {
    "loss_type": "BPR",
    "train_neg_sample_args": {"distribution": "uniform", "sample_num": 1, "alpha": 1.0, "dynamic": False},
}
# RecBole's KSR documentation's settings for ml-100k's .kg/.link plus pretrained entity and
# relation vectors (ml-100k.ent_feature / .rel_feature, written by the kg_data fixture).
_KG = {
    "load_col": {
        "inter": ["user_id", "item_id", "rating", "timestamp"],
        "kg": ["head_id", "relation_id", "tail_id"],
        "link": ["item_id", "entity_id"],
        "ent_feature": ["ent_id", "ent_vec"],
        "rel_feature": ["rel_id", "rel_vec"],
    },
    "alias_of_entity_id": ["ent_id"],
    "alias_of_relation_id": ["rel_id"],
    "preload_weight": {"ent_id": "ent_vec", "rel_id": "rel_vec"},
    "additional_feat_suffix": ["ent_feature", "rel_feature"],
    "kg_embedding_size": KG_DIM,
    # sequential_embedding_model.yaml, which RecBole loads for these two, lacks the sequential split
    "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full"},
    "repeatable": True,
}
OVERRIDES: dict[str, dict[str, Any]] = {
    "Caser": {"nh": 4, "nv": 2},
    "FEARec": {"n_layers": 2},  # its frequency layers divide by n_layers - 1
    "FPMC": _BPR,  # BPR-only models
    "TransRec": _BPR,
    "NextItNet": {"block_num": 1},
    "SINE": {"prototype_size": 10, "epochs": 3},  # also replayed: trained past chance level
    "KSR": _KG,
    "GRU4RecKG": _KG,
}
# checked over HTTP (SASRec is in test_core), each imported once through the real CLI
SERVED = {
    "BERT4Rec": "dataset-pickle",
    "Caser": "data-path",
    "SASRecF": "data-path",
    "SINE": "dataset-pickle",
}
SUPPORTED = [name for name, spec in MODEL_SPECS.items() if spec.unsupported is None]
REFUSED = [name for name, spec in MODEL_SPECS.items() if spec.unsupported is not None]

_trained: dict[str, Trained] = {}


# ------------------------------------------------------------------ data and training


@pytest.fixture(scope="module")
def model_data(workdir: Path) -> Path:
    """A data_path whose ml-100k/ holds users 1..USERS, the item/user files, the .kg/.link rows of
    those items, and pretrained-looking entity and relation vectors for the KG models."""
    src = RECBOLE_DATASETS / "ml-100k"
    dst = workdir / "model-data" / "ml-100k"
    dst.mkdir(parents=True)
    for name in ("ml-100k.item", "ml-100k.user"):
        (dst / name).write_bytes((src / name).read_bytes())
    lines = (src / "ml-100k.inter").read_text().splitlines()
    kept = [lines[0]] + [ln for ln in lines[1:] if int(ln.split("\t")[0]) <= USERS]
    (dst / "ml-100k.inter").write_text("\n".join(kept) + "\n")
    items = {ln.split("\t")[1] for ln in kept[1:]}
    link = (src / "ml-100k.link").read_text().splitlines()
    link = [link[0]] + [ln for ln in link[1:] if ln.split("\t")[0] in items]
    (dst / "ml-100k.link").write_text("\n".join(link) + "\n")
    entities = sorted({ln.split("\t")[1] for ln in link[1:]})
    kg = (src / "ml-100k.kg").read_text().splitlines()
    kg = [kg[0]] + [ln for ln in kg[1:] if ln.split("\t")[0] in set(entities)][:5000]
    (dst / "ml-100k.kg").write_text("\n".join(kg) + "\n")
    relations = sorted({ln.split("\t")[1] for ln in kg[1:]})
    rng = np.random.default_rng(0)
    for suffix, id_field, vec_field, tokens in (
        ("ent_feature", "ent_id", "ent_vec", entities),
        ("rel_feature", "rel_id", "rel_vec", relations),
    ):
        rows = [f"{id_field}:token\t{vec_field}:float_seq"]
        rows += [t + "\t" + " ".join(f"{x:.5f}" for x in rng.normal(0, 0.1, KG_DIM)) for t in tokens]
        (dst / f"ml-100k.{suffix}").write_text("\n".join(rows) + "\n")
    return dst.parent


@contextlib.contextmanager
def _float32_preload() -> Iterator[None]:
    """RecBole 1.2.1's KSR cannot train as shipped: the preloaded relation matrix is float64 and its
    memory_read multiplies it with float32 activations (torch refuses to mix them). Its users cast
    the preloaded weights to float32; this does the same while KSR trains. (The artifact stores
    preloaded weights as float32 for the same reason, so serving matches.)"""
    from recbole.data.dataset import Dataset

    original = Dataset.get_preload_weight
    Dataset.get_preload_weight = lambda self, field: original(self, field).astype(np.float32)
    try:
        yield
    finally:
        Dataset.get_preload_weight = original


def trained_model(name: str, data: Path, workdir: Path) -> Trained:
    """One epoch of *name* on the slice, cached for the module. S3Rec: one pre-training epoch, then
    fine-tuning from it, as RecBole's S3Rec is used."""
    if name in _trained:
        return _trained[name]
    out = workdir / "models" / name
    overrides = {**TINY, **OVERRIDES.get(name, {})}
    if name == "S3Rec":
        pre = train(
            name,
            out / "pretrain",
            "ml-100k",
            data,
            {**overrides, "train_stage": "pretrain", "pretrain_epochs": 1, "save_step": 1},
        )
        _trained["S3Rec-pretrain"] = pre
        # S3Rec's fine-tune stage torch.load()s this file with torch>=2.6's weights_only default,
        # which refuses the Config RecBole's pre-training saves beside the weights: keep the weights.
        weights = out / "pretrained-weights.pth"
        torch.save({"state_dict": torch.load(pre.checkpoint, weights_only=False)["state_dict"]}, weights)
        overrides |= {"train_stage": "finetune", "pre_model_path": str(weights)}
    with _float32_preload() if name == "KSR" else contextlib.nullcontext():
        _trained[name] = train(name, out, "ml-100k", data, overrides)
    return _trained[name]


# ------------------------------------------------------------------ results for the model table


@pytest.fixture(scope="module")
def parity_log() -> Iterator[dict[str, dict[str, Any]]]:
    log: dict[str, dict[str, Any]] = {}
    yield log
    if not log:
        return
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    merged = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    for name, entry in log.items():
        merged[name] = {**merged.get(name, {}), **entry}
    RESULTS.write_text(json.dumps(merged, indent=1, sort_keys=True) + "\n")


# ------------------------------------------------------------------ helpers


def post(url: str, path: str, body: object) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=120)


def import_both(name: str, trained: Trained, data: Path, cli: str | None = None) -> tuple[str, str]:
    """Import from the dataset pickle and from the atomic files, with import_checkpoint (what the
    CLI calls) or, for the source named by *cli*, the real CLI; the two artifacts must be
    byte-identical. Returns (from pickle, from atomic files)."""
    sources = {"dataset-pickle": ("p", trained.dataset_pickle), "data-path": ("d", data)}
    tags = []
    for source, (suffix, path) in sources.items():
        tag_name = f"{name.lower()}-{suffix}"
        if source == cli:
            tags.append(import_ok(trained.checkpoint, f"--{source}", path, "--name", tag_name))
        else:
            keyword = source.replace("-", "_")
            tags.append(str(import_checkpoint(trained.checkpoint, name=tag_name, **{keyword: path}).tag))
    pickled, atomic = (bentoml.models.get(t).info.metadata["files"] for t in tags)
    assert pickled == atomic, {k for k in pickled.keys() | atomic.keys() if pickled.get(k) != atomic.get(k)}
    return tags[0], tags[1]


def engine_answers(tag: str, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """/recommend's answers computed in-process: the stored model through store.load and
    Engine.rank (the runner's code path), ids mapped as the public service maps them."""
    artifact = store.load(bentoml.models.get(tag))
    engine = Engine(artifact, device="cpu")
    item_ids = {t: i for i, t in enumerate(artifact.item_tokens) if i}
    user_ids = {t: i for i, t in enumerate(artifact.user_tokens or []) if i}
    queries = [
        RankQuery(
            [item_ids[t] for t in body["sequence"]],
            body["topk"],
            user_ids[body["user_id"]] if artifact.spec.needs_user else None,
        )
        for body in bodies
    ]
    return [
        {"item_list": [artifact.item_tokens[i] for i in r.items], "score_list": r.scores}
        for r in engine.rank(queries)
    ]


def max_score_diff(got: list[dict[str, Any]], refs: list[dict[str, Any]]) -> float:
    return max(
        abs(score - ref["score_of"][item])
        for answer, ref in zip(got, refs, strict=True)
        for item, score in zip(answer["item_list"], answer["score_list"], strict=True)
    )


def check_user_inputs(url: str, tag: str, refs: list[dict[str, Any]]) -> None:
    """A user-id model: model_info says so, a missing user_id is a 400 naming the need, an unknown
    one gets the popularity fallback."""
    info = post(url, "/model_info", {}).json()
    assert info["tag"] == tag and info["required_inputs"] == ["sequence", "user_id"]
    body = {k: v for k, v in refs[0]["body"].items() if k != "user_id"}
    missing = post(url, "/recommend", body)
    assert missing.status_code == 400 and "needs a user_id" in missing.text, missing.text
    unknown = post(url, "/recommend", body | {"user_id": "no-such-user"}).json()
    popularity = store.load(bentoml.models.get(tag), load_weights=False).popularity
    assert unknown["fallback"] == "popular"
    assert unknown["score_list"] == sorted(unknown["score_list"], reverse=True)
    assert unknown["score_list"][0] == float(popularity[1:].max())


# ------------------------------------------------------------------ the tests


@pytest.fixture(scope="module")
def sine_server(model_data: Path, workdir: Path) -> Iterator[tuple[Trained, str]]:
    """SINE served once for its parity test and the metrics replay."""
    trained = trained_model("SINE", model_data, workdir)
    tag, _ = import_both("SINE", trained, model_data, cli=SERVED["SINE"])
    with serving(tag) as url:
        yield trained, url


def http_answers(url: str, name: str, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """/recommend for the first few bodies, /recommend_batch for the rest (batches may differ from
    single requests in the last float bits: both are compared with RecBole)."""
    info = post(url, "/model_info", {}).json()
    assert info["recbole_model"] == name and info["required_inputs"] == MODEL_SPECS[name].required_inputs
    got = [post(url, "/recommend", body).json() for body in bodies[:4]]
    got += post(url, "/recommend_batch", {"requests": bodies[4:]}).json()["results"]
    assert all(r["fallback"] is None and r["unknown_items"] == [] for r in got)
    return got


@pytest.mark.server
@pytest.mark.parametrize("name", SUPPORTED)
def test_model_imports_and_serves_with_parity(name, model_data, workdir, parity_log, request):
    started = time.monotonic()
    entry = parity_log[name] = {"parity": "fail"}
    trained = trained_model(name, model_data, workdir)
    refs = recbole_reference(trained, k=10, max_users=40)
    bodies = [ref["body"] for ref in refs]
    if name == "SINE":
        _, url = request.getfixturevalue("sine_server")
        got = http_answers(url, name, bodies)
    elif name in SERVED:
        tag, _ = import_both(name, trained, model_data, cli=SERVED[name])
        with serving(tag) as url:
            got = http_answers(url, name, bodies)
            if MODEL_SPECS[name].needs_user:
                check_user_inputs(url, tag, refs)
    else:
        tag, _ = import_both(name, trained, model_data)
        got = engine_answers(tag, bodies)
    for answer, ref in zip(got, refs, strict=True):
        assert_same_topk(answer, ref)
    entry.update(
        parity="pass",
        users=len(refs),
        k=10,
        max_abs_score_diff=max_score_diff(got, refs),
        imports=["dataset-pickle", "data-path"],
        checked_via="HTTP" if name in SERVED else "runner code path (store.load + Engine.rank)",
        seconds=round(time.monotonic() - started, 1),
    )


@pytest.mark.parametrize("name", REFUSED)
def test_models_without_full_sort_predict_are_refused(name, model_data, workdir, parity_log, tmp_path):
    checkpoint = torch.load(trained_model("GRU4Rec", model_data, workdir).checkpoint, weights_only=False)
    checkpoint["config"].final_config_dict["model"] = name
    path = tmp_path / f"{name}.pth"
    torch.save(checkpoint, path)
    before = {str(m.tag) for m in bentoml.models.list()}
    result = run_import(path, "--data-path", model_data)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0, result.stderr  # one line
    assert f"{name} is not supported" in result.stderr and "full_sort_predict" in result.stderr
    assert {str(m.tag) for m in bentoml.models.list()} == before
    parity_log[name] = {"parity": "refused", "reason": result.stderr.strip()}


def test_s3rec_pretraining_checkpoint_is_refused(model_data, workdir):
    trained_model("S3Rec", model_data, workdir)
    pre = _trained["S3Rec-pretrain"]
    with pytest.raises(UnsupportedModelError, match="train_stage='pretrain'.*fine-tune it first"):
        import_checkpoint(pre.checkpoint, dataset_pickle=pre.dataset_pickle, name="s3rec-pretrain")


@pytest.mark.server
@pytest.mark.parametrize("name", ["SASRec", "SINE"])
def test_replayed_test_split_reproduces_recbole_metrics(name, request, tmp_path, parity_log):
    if name == "SASRec":
        trained, url = request.getfixturevalue("sasrec"), request.getfixturevalue("sasrec_server")
    else:
        trained, url = request.getfixturevalue("sine_server")
    out = tmp_path / "replay.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "replay_eval.py"),
            str(trained.checkpoint),
            "--dataset-pickle",
            str(trained.dataset_pickle),
            "--url",
            url,
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    numbers = json.loads(out.read_text())
    assert numbers["rows"] == trained.test_data.dataset.inter_num and numbers["fallbacks"] == 0
    assert numbers["recbole"]["hit@10"] > 0, "agreement on zero hits would prove nothing"
    for metric in ("hit@10", "ndcg@10"):
        assert f"{numbers['http'][metric]:.4f}" == f"{numbers['recbole'][metric]:.4f}"
        assert f"{numbers['http'][metric]:.4f}" in result.stdout
    assert "agree to 4 decimals" in result.stdout
    parity_log.setdefault(name, {})["replay"] = numbers
