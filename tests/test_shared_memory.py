"""Mapped loading (core/artifact.py): the stored tables are mapped read-only and become the model's
own parameters, so the worker processes of one server share one physical copy; the answers are the
ones a model loaded into private memory gives; a model stored before the mapped tables existed
still loads; a hostile mapped file is refused with one line."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from recbole_bento.core import store
from recbole_bento.core.artifact import (
    ITEM_TABLE,
    ITEM_UNIT,
    WEIGHTS,
    Artifact,
    ArtifactError,
    load_artifact,
    map_table,
    verify_digests,
)
from recbole_bento.core.engine import Engine
from recbole_bento.core.ranking import RankQuery

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", params=["SASRec", "GRU4Rec"])
def stored(request, sasrec_tag, gru4rec_tag) -> Path:
    """The directory of a model as import_model.py stores it now (mapped tables): the session's."""
    tag = sasrec_tag if request.param == "SASRec" else gru4rec_tag
    return Path(store.resolve(tag).path)


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def old_format(src: Path, dst: Path) -> Path:
    """*src* as the importer stored it before the mapped tables: the item table inside weights.pt."""
    copy_model(src, dst)
    state = torch.load(dst / WEIGHTS, weights_only=True)
    state["item_embedding.weight"] = torch.from_numpy(np.load(dst / ITEM_TABLE)).clone()
    torch.save(state, dst / WEIGHTS)
    (dst / ITEM_TABLE).unlink()
    (dst / ITEM_UNIT).unlink()
    return dst


def in_private_memory(artifact: Artifact) -> Artifact:
    """The same model with every tensor copied into this process's own memory, nothing mapped."""
    return dataclasses.replace(
        artifact, state_dict={k: v.clone() for k, v in artifact.state_dict.items()}, unit=None
    )


def queries(n_items: int) -> list[RankQuery]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for row in range(12):
        history = torch.randint(1, n_items, (1 + 3 * row,), generator=gen).tolist()
        query = RankQuery(history, 10, explain=row % 3 == 0)
        if row % 4 == 1:
            query.exclude = history[:3]
        elif row % 4 == 2:
            query.candidates = torch.randint(1, n_items, (40,), generator=gen).tolist()
        out.append(query)
    out += [RankQuery([1 + i, 7 + i], 10, kind="similar", explain=True) for i in range(4)]
    return out


def mappings(path: Path) -> list[tuple[int, int, str]]:
    """(start, end, permissions) of this process's mappings of *path*."""
    out = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == str(path):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            out.append((start, end, fields[1]))
    return out


def inside(tensor: torch.Tensor, spans: list[tuple[int, int, str]]) -> bool:
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    return any(lo <= start and end <= hi for lo, hi, _ in spans)


def test_mapped_old_format_and_private_copies_answer_the_same(stored: Path, tmp_path: Path) -> None:
    mapped = load_artifact(stored)
    old = load_artifact(old_format(stored, tmp_path / "old"))
    assert mapped.unit is not None and old.unit is None  # the old model's unit table is computed
    engines = [Engine(a, device="cpu") for a in (mapped, old, in_private_memory(mapped))]
    batch = queries(engines[0].n_items)
    want = engines[1].rank(batch)
    for engine in (engines[0], engines[2]):
        got = engine.rank(batch)
        assert [r.items for r in got] == [r.items for r in want]
        assert [r.scores for r in got] == [r.scores for r in want]  # bit for bit: same tables, same ops
        assert [r.because for r in got] == [r.because for r in want]
    assert torch.equal(engines[0].unit, engines[1].unit)


def test_every_weight_is_read_from_the_stored_files(stored: Path) -> None:
    """No parameter of the loaded model lives in private memory: each is inside a mapping of
    weights.pt or item_table.npy, and the unit table inside item_unit.npy's."""
    engine = Engine(load_artifact(stored), device="cpu")
    table_maps = mappings(stored / ITEM_TABLE)
    weight_maps = mappings(stored / WEIGHTS)
    assert table_maps and weight_maps
    assert inside(engine.model.item_embedding.weight, table_maps)
    for name, param in engine.model.named_parameters():
        assert inside(param, table_maps + weight_maps), name
    assert inside(engine.unit, mappings(stored / ITEM_UNIT))


def test_mapped_tables_are_read_only(stored: Path, tmp_path: Path) -> None:
    model = copy_model(stored, tmp_path / "model")
    table = map_table(model / ITEM_TABLE)
    spans = mappings(model / ITEM_TABLE)
    assert inside(table, spans) and all("w" not in perms for _, _, perms in spans)
    # the pages themselves refuse a write: the process that tries faults, the file is unchanged
    digest = hashlib.sha256((model / ITEM_TABLE).read_bytes()).hexdigest()
    code = (
        "import sys; from pathlib import Path; from recbole_bento.core.artifact import map_table; "
        "t = map_table(Path(sys.argv[1])); t[1].add_(1.0); print('written')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(model / ITEM_TABLE)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == -signal.SIGSEGV and "written" not in result.stdout
    assert hashlib.sha256((model / ITEM_TABLE).read_bytes()).hexdigest() == digest


def _rewrite_table(path: Path, array: np.ndarray) -> None:
    np.save(path, array, allow_pickle=False)


def _hostile_cases(model: Path) -> dict[str, tuple[Callable[[], None], str]]:
    table = np.load(model / ITEM_TABLE)
    size = (model / ITEM_TABLE).stat().st_size

    def truncate() -> None:
        os.truncate(model / ITEM_TABLE, size - 4)

    def pad() -> None:
        with open(model / ITEM_TABLE, "ab") as f:
            f.write(b"\0" * 64)

    def huge_header() -> None:  # a header claiming 2^40 rows over the same bytes
        raw = (model / ITEM_TABLE).read_bytes()
        old = f"({table.shape[0]}, {table.shape[1]})".encode()
        new = f"({2**40}, {table.shape[1]})".encode()
        header_end = raw.index(b"\n") + 1
        header = raw[:header_end].replace(old, new)
        header = header[:-1].rstrip(b" ")  # keep the header length: re-pad with spaces
        header += b" " * (header_end - 1 - len(header)) + b"\n"
        (model / ITEM_TABLE).write_bytes(header + raw[header_end:])

    def link() -> None:
        target = model.parent / "elsewhere.npy"
        shutil.move(model / ITEM_TABLE, target)
        os.symlink(target, model / ITEM_TABLE)

    def directory() -> None:
        (model / ITEM_TABLE).unlink()
        (model / ITEM_TABLE).mkdir()

    def weights_link() -> None:
        target = model.parent / "weights-elsewhere.pt"
        shutil.move(model / WEIGHTS, target)
        os.symlink(target, model / WEIGHTS)

    def table_in_weights_too() -> None:
        state = torch.load(model / WEIGHTS, weights_only=True)
        state["item_embedding.weight"] = torch.from_numpy(table)
        torch.save(state, model / WEIGHTS)

    return {
        "truncated": (truncate, "bytes, its header says"),
        "padded": (pad, "bytes, its header says"),
        "float64": (lambda: _rewrite_table(model / ITEM_TABLE, table.astype(np.float64)), "float64"),
        "big-endian": (lambda: _rewrite_table(model / ITEM_TABLE, table.astype(">f4")), "not a 2-D float32"),
        "fortran": (lambda: _rewrite_table(model / ITEM_TABLE, np.asfortranarray(table)), "Fortran-ordered"),
        "3-d": (lambda: _rewrite_table(model / ITEM_TABLE, table[None]), "not a 2-D float32"),
        "object": (
            lambda: np.save(model / ITEM_TABLE, np.array([None, 1], dtype=object), allow_pickle=True),
            "not a 2-D float32",
        ),
        "not npy": (
            lambda: (model / ITEM_TABLE).write_bytes(b"PK\x03\x04 not an array"),
            "not a NumPy table",
        ),
        "huge header": (huge_header, "bytes, its header says"),
        "unit rows": (lambda: _rewrite_table(model / ITEM_UNIT, table[:-1]), "has shape"),
        "unit width": (
            lambda: _rewrite_table(model / ITEM_UNIT, np.ascontiguousarray(table[:, :-1])),
            "has shape",
        ),
        "unit missing": (lambda: (model / ITEM_UNIT).unlink(), "cannot be opened"),
        "link": (link, "cannot be opened (a link)"),
        "directory": (directory, "not a regular file"),
        "weights link": (weights_link, "cannot be opened (a link)"),
        "weights not a zip": (
            lambda: (model / WEIGHTS).write_bytes(b"\x80\x02}q\x00."),
            "cannot be read as tensors",
        ),
        "table twice": (table_in_weights_too, "weights.pt holds item_embedding.weight too"),
    }


HOSTILE = [
    "truncated", "padded", "float64", "big-endian", "fortran", "3-d", "object", "not npy", "huge header",
    "unit rows", "unit width", "unit missing", "link", "directory", "weights link", "weights not a zip",
    "table twice",
]  # fmt: skip


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_mapped_files_are_refused_in_one_line(sasrec_tag: str, tmp_path: Path, case: str) -> None:
    model = copy_model(Path(store.resolve(sasrec_tag).path), tmp_path / "model")
    change, message = _hostile_cases(model)[case]
    change()
    with pytest.raises(ArtifactError, match=re.escape(message)) as info:
        Engine(load_artifact(model), device="cpu")
    assert "\n" not in str(info.value)


def test_a_table_the_import_did_not_record_is_refused(sasrec_tag: str, tmp_path: Path) -> None:
    """An old model's directory with a mapped table slipped in: verification names it."""
    stored_model = store.resolve(sasrec_tag)
    digests = dict(stored_model.info.metadata["files"])
    model = old_format(Path(stored_model.path), tmp_path / "old")
    old_digests = {k: v for k, v in digests.items() if k not in (ITEM_TABLE, ITEM_UNIT)}
    old_digests[WEIGHTS] = hashlib.sha256((model / WEIGHTS).read_bytes()).hexdigest()
    verify_digests(model, old_digests)  # the old model as it was verifies
    shutil.copy(Path(stored_model.path) / ITEM_TABLE, model / ITEM_TABLE)
    with pytest.raises(ArtifactError, match=f"{ITEM_TABLE} was not recorded at import"):
        load_artifact(model, old_digests)


# ------------------------------------------------------------------ the layout counts mapped files once


def test_mapped_files_count_once_per_server(stored: Path, tmp_path: Path) -> None:
    from types import SimpleNamespace

    from recbole_bento.edge import topology
    from recbole_bento.settings import Settings

    mapped = store.mapped_size(SimpleNamespace(path=str(stored)))
    assert mapped == sum((stored / name).stat().st_size for name in (WEIGHTS, ITEM_TABLE, ITEM_UNIT))
    old = old_format(stored, tmp_path / "old")
    assert store.mapped_size(SimpleNamespace(path=str(old))) == 0  # each process computes its unit table
    assert topology.model_copy_bytes(10 * 2**20, 8 * 2**20) == topology.RUNTIME_BYTES + 4 * 2 * 2**20
    gib = 2**30
    # 2 copies of 0.5 GiB + 1 GiB mapped once fit in half of 4 GiB; + 1.5 GiB mapped do not
    fits = topology.choose(Settings(), "cpu", 2, gib // 2, 4 * gib, shared_bytes=gib)
    assert (fits.topology, fits.api_workers) == ("inprocess", 2)
    assert "2 model copies of ~0.5 GiB + 1.0 GiB mapped once fit in half of 4.0 GiB" in fits.reason
    assert (
        topology.choose(Settings(), "cpu", 2, gib // 2, 4 * gib, shared_bytes=3 * gib // 2).topology
        == "split"
    )
