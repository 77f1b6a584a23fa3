"""Issue 12: every hostile or mistaken input to import_model.py is refused by the real CLI with exit 1
and one line on stderr naming the file and the reason: no traceback, nothing registered. The files
are generated here from the session's genuine checkpoint and dataset."""

from __future__ import annotations

import inspect
import io
import os
import pickle
import random
import re
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bentoml
import cloudpickle
import numpy as np
import pytest
import torch
from conftest import ROOT, free_port, import_ok, run_import

from recbole_bento.core import store
from recbole_bento.core.engine import Engine
from recbole_bento.core.importer import ImportRefused, check_sizes
from recbole_bento.core.models import MODEL_SPECS, spec_for
from recbole_bento.core.ranking import RankQuery
from recbole_bento.core.safe_pickle import load_checkpoint, load_dataset_pickle


def stored_tags() -> set[str]:
    return {str(m.tag) for m in bentoml.models.list()}


def refused(*args: str | Path) -> str:
    """Run the CLI; assert exit 1, one stderr line, no stdout, nothing registered; return the line."""
    before = stored_tags()
    result = run_import(*args)
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("import_model: "), result.stderr[-2000:]
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert stored_tags() == before, "nothing may be registered on a refusal"
    return lines[0]


def saved_checkpoint(sasrec, path: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    """The genuine checkpoint with *edit* applied to its config values, torch.save'd to *path*."""
    checkpoint = load_checkpoint(sasrec.checkpoint)
    edit(checkpoint["config"].final_config_dict)
    torch.save(checkpoint, path)
    return path


def deeply_nested_checkpoint(sasrec, path: Path, depth: int) -> Path:
    """A checkpoint whose config holds a list nested *depth* deep. Python's pickler recurses, so the
    nesting is spliced in as opcodes (depth EMPTY_LISTs, then depth - 1 APPENDs) in place of a
    marker string, in torch's legacy format (a plain stream of pickles)."""
    marker = "@@nested@@"
    checkpoint = load_checkpoint(sasrec.checkpoint)
    checkpoint["config"].final_config_dict["note"] = marker
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer, _use_new_zipfile_serialization=False)
    encoded = pickle.dumps(marker, protocol=2)[2:-1]  # BINUNICODE + the marker, then its memo put
    data = buffer.getvalue()
    assert data.count(encoded[:-2]) == 1
    path.write_bytes(data.replace(encoded[:-2], b"]" * depth + b"a" * (depth - 1)))
    return path


# ------------------------------------------------------------------ the table


def test_build_state_bypass_is_refused_before_a_dataset_constructor_runs(sasrec, tmp_path):
    """The (dict, 0) BUILD state planted a Config into a Dataset; refused before it is applied."""
    from test_security import P2, _new_dataset, _value

    path = tmp_path / "bypass.pkl"
    path.write_bytes(P2 + _new_dataset() + b"}" + _value("config") + _value(1) + b"s" + _value(0) + b"\x86b.")
    line = refused(sasrec.checkpoint, "--dataset-pickle", path)
    assert str(path) in line
    assert "sets the state of SequentialDataset from a tuple (dict, int)" in line


def test_numpy_dtype_probe_is_refused_in_one_line(sasrec, tmp_path):
    """The probe that made an object array from raw bytes (a SIGSEGV when compared): run only in the
    CLI's process, and refused there at the dtype, before any array exists."""
    from test_security import P2, _object_array_from_bytes

    path = tmp_path / "dtype.pkl"
    compare = b"\x94h\x00\x85R."  # not reached: the load stops at the rewritten dtype
    path.write_bytes(P2 + _object_array_from_bytes(0) + compare)
    line = refused(sasrec.checkpoint, "--dataset-pickle", path)
    assert str(path) in line and "rewrites the numpy dtype object" in line


def test_shared_reference_bomb_is_refused_within_seconds(sasrec, tmp_path):
    def bomb(config: dict[str, Any]) -> None:
        node: list[Any] = []
        for _ in range(40):
            node = [node, node]  # 2^40 leaves through shared references
        config["note"] = node

    path = saved_checkpoint(sasrec, tmp_path / "bomb.pth", bomb)
    assert path.stat().st_size < 2**20
    start = time.monotonic()
    line = refused(path, "--dataset-pickle", sasrec.dataset_pickle)
    assert time.monotonic() - start < 60
    assert str(path) in line and "the config holds more than 100000 values" in line


def test_deep_nesting_is_refused_in_one_line(sasrec, tmp_path):
    path = deeply_nested_checkpoint(sasrec, tmp_path / "deep.pth", 200_000)
    line = refused(path, "--dataset-pickle", sasrec.dataset_pickle)
    assert str(path) in line and "the config nests deeper than 64 levels" in line


def test_huge_integer_in_the_config_is_refused(sasrec, tmp_path):
    path = saved_checkpoint(sasrec, tmp_path / "int.pth", lambda c: c.update(note=10**5000))
    assert "the config holds an integer of 16610 bits" in refused(
        path, "--dataset-pickle", sasrec.dataset_pickle
    )


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"model": "GRU4Rec", "num_layers": 1, "dropout_prob": 0.3}, "the dataset or the config does not"),
        ({"model": "GRU4Rec"}, "GRU4Rec cannot be built from the checkpoint's config and weights: TypeError"),
        ({"hidden_act": ["gelu"]}, "SASRec cannot be built from the checkpoint's config and weights"),
    ],
    ids=["another model class", "a class whose constructor fails", "a constructor TypeError"],
)
def test_model_that_does_not_fit_the_weights(sasrec, tmp_path, values, expected):
    path = saved_checkpoint(sasrec, tmp_path / "misfit.pth", lambda c: c.update(values))
    assert expected in refused(path, "--dataset-pickle", sasrec.dataset_pickle)


@pytest.mark.parametrize(
    ("key", "value"),
    [("MAX_ITEM_LIST_LENGTH", 10**9), ("MAX_ITEM_LIST_LENGTH", -5), ("MAX_ITEM_LIST_LENGTH", 1.5),
     ("hidden_size", 10**7), ("n_layers", 10**4)],
)  # fmt: skip
def test_absurd_sizes_are_refused_before_allocating(sasrec, tmp_path, key, value):
    path = saved_checkpoint(sasrec, tmp_path / "size.pth", lambda c: c.update({key: value}))
    line = refused(path, "--dataset-pickle", sasrec.dataset_pickle)
    assert f"{path}: {key}={value!r} is not an integer in 1.." in line


def test_size_bounds_follow_the_models_spec():
    """The bounds come from the model's ModelSpec: Caser's ``nh`` is bounded, SASRec never reads it."""
    config = defaultdict(lambda: None, {"MAX_ITEM_LIST_LENGTH": 50, "nh": 10**6})
    with pytest.raises(ImportRefused, match=r"ckpt: nh=1000000 is not an integer in 1..16384"):
        check_sizes(config, spec_for("Caser"), "ckpt")
    check_sizes(config, spec_for("SASRec"), "ckpt")


def test_each_spec_names_the_size_keys_its_constructor_reads():
    """A size key read by a model's RecBole module but missing from its ModelSpec would reach its
    constructor unbounded; a key the class never reads has no place in its spec."""
    size_keys = {k for spec in MODEL_SPECS.values() for k in (*spec.width_keys, *spec.count_keys)}
    for name, spec in MODEL_SPECS.items():
        if spec.unsupported:
            continue
        source = inspect.getsource(inspect.getmodule(spec.model_class()))  # with its helper classes
        read = set(re.findall(r'config\[\s*"([^"]+)"\s*\]', source))
        own = {*spec.width_keys, *spec.count_keys}
        assert read & size_keys <= own and own <= read, (name, read & size_keys, own)


def test_invalid_and_taken_names(sasrec, sasrec_tag):
    inputs = (sasrec.checkpoint, "--dataset-pickle", sasrec.dataset_pickle)
    line = refused(*inputs, "--name", "../../etc")
    assert "--name '../../etc': ../../etc is not a valid BentoML tag" in line
    assert f"model {sasrec_tag} already exists" in refused(*inputs, "--name", sasrec_tag)


def test_paths_that_are_not_regular_files(sasrec, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert f"checkpoint {tmp_path} is a directory" in refused(
        tmp_path, "--dataset-pickle", sasrec.dataset_pickle
    )
    assert "dataset pickle /dev/zero is not a regular file (a device)" in refused(
        sasrec.checkpoint, "--dataset-pickle", "/dev/zero"
    )
    assert f"dataset pickle {fifo} is not a regular file (a pipe or socket)" in refused(
        sasrec.checkpoint, "--dataset-pickle", fifo
    )


# ------------------------------------------------------------------ the item vocabulary


def reordered_dataset(sasrec, folder: Path) -> Path:
    """The same interactions, rows shuffled, rebuilt with the checkpoint's config: same dataset
    name, fields and sizes, but RecBole numbers the items in another order. Pickled."""
    from recbole.data import create_dataset

    source = Path(sasrec.config["data_path"])
    target = folder / "ml-100k"
    target.mkdir(parents=True)
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    header, *rows = (source / "ml-100k.inter").read_text().splitlines()
    random.Random(0).shuffle(rows)
    (target / "ml-100k.inter").write_text("\n".join([header, *rows]) + "\n")
    config = load_checkpoint(sasrec.checkpoint)["config"]
    config.final_config_dict["data_path"] = str(target)
    dataset = create_dataset(config)
    original = sasrec.dataset
    assert dataset.item_num == original.item_num and dataset.user_num == original.user_num
    items = dataset.field2id_token[dataset.iid_field]
    assert list(items) != list(original.field2id_token[original.iid_field])
    path = folder / "reordered.pkl"
    path.write_bytes(cloudpickle.dumps(dataset))
    return path


def test_dataset_with_another_item_numbering_is_refused(sasrec, tmp_path):
    path = reordered_dataset(sasrec, tmp_path)
    line = refused(sasrec.checkpoint, "--dataset-pickle", path)
    assert f"dataset pickle {path}: the Dataset's item ids are not the ones the model was trained" in line
    assert "--skip-vocabulary-check" in line
    # the flag imports it anyway, as it says
    skip = ("--skip-vocabulary-check", "--name", "reordered")
    tag = import_ok(sasrec.checkpoint, "--dataset-pickle", path, *skip)
    assert bentoml.models.get(tag).info.metadata["item_count"] == sasrec.dataset.item_num - 1


def test_untrained_checkpoint_needs_the_skip_flag(sasrec, tmp_path):
    checkpoint = load_checkpoint(sasrec.checkpoint)
    checkpoint["best_valid_score"] = -np.inf  # what the Trainer saves before any validation
    path = tmp_path / "untrained.pth"
    torch.save(checkpoint, path)
    line = refused(path, "--dataset-pickle", sasrec.dataset_pickle)
    assert "the checkpoint records no validation score (best_valid_score -inf" in line
    assert "--skip-vocabulary-check" in line


# ------------------------------------------------------------------ accepted pickles, progress


def test_dataset_pickled_after_data_preparation_serves_the_same(sasrec, sasrec_tag, tmp_path):
    """data_preparation builds the Dataset in place (tensors, pickled by cloudpickle through
    torch.storage._load_from_bytes): accepted, read with the weights-only loader, and stored
    byte for byte as the create_dataset pickle is, so it ranks the same."""
    from recbole.data import data_preparation

    dataset = load_dataset_pickle(sasrec.dataset_pickle)
    data_preparation(sasrec.config, dataset)
    path = tmp_path / "prepared.pkl"
    path.write_bytes(cloudpickle.dumps(dataset))
    assert b"_load_from_bytes" in path.read_bytes()
    tag = import_ok(sasrec.checkpoint, "--dataset-pickle", path, "--name", "prepared")
    prepared, plain = bentoml.models.get(tag), bentoml.models.get(sasrec_tag)
    assert prepared.info.metadata["files"] == plain.info.metadata["files"]
    queries = [RankQuery([i, i + 1, i + 7], 10) for i in range(1, 200, 10)]
    answers = [
        [(r.items, r.scores) for r in Engine(store.load(m), device="cpu").rank(queries)]
        for m in (prepared, plain)
    ]
    assert answers[0] == answers[1]


def test_progress_and_summary(sasrec, sasrec_import):
    result = sasrec_import  # the session's import, with --progress
    for step in (
        "reading the checkpoint",
        "reading the dataset pickle",
        "splitting the dataset",
        "writing the artifact",
        "building SASRec",
        "checking the item vocabulary (MRR@10 on the validation split)",
        "registering in the BentoML model store",
    ):
        assert step in result.stderr
    items, users = sasrec.dataset.item_num - 1, sasrec.dataset.user_num - 1
    summary = result.stderr.strip().splitlines()[-1]
    assert summary.startswith(f"import_model: imported SASRec (ml-100k): {items:,} items, {users:,} users, ")
    assert summary.endswith(" MB in the model store")
    tag = result.stdout.strip().splitlines()[-1]
    assert bentoml.models.get(tag).tag.name == "sasrec-ml-100k"


@pytest.mark.server
@pytest.mark.parametrize("tag", [None, "no-such-model:v1"], ids=["empty store", "unknown tag"])
def test_serving_without_the_model_says_why_in_one_line(tmp_path, tag):
    env = {**os.environ, "BENTOML_HOME": str(tmp_path)}
    env.pop("RECBOLE_BENTO_MODEL", None)
    if tag:
        env["RECBOLE_BENTO_MODEL"] = tag
    result = subprocess.run(
        [sys.executable, "-m", "bentoml", "serve", ".", "--host", "127.0.0.1", "--port", str(free_port())],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    expected = f"no model {tag!r} in" if tag else "no recbole-bento model in the BentoML model store"
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("recbole-bento: ") and expected in lines[0], lines
