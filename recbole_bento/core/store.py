"""The BentoML model store side: register an artifact directory, find and load a stored model."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import bentoml
from bentoml.exceptions import NotFound

from ..bentoml_compat import import_model_into
from .artifact import (
    ITEM_TABLE,
    MAPPED_TABLES,
    WEIGHTS,
    Artifact,
    ArtifactError,
    load_artifact,
    verify_digests,
)

FORMAT = "recbole-bento/1"  # metadata["format"]: marks models this project can serve


def register(name: str, source: Path, metadata: dict[str, Any], labels: dict[str, str]) -> bentoml.Model:
    """Copy a verified artifact directory into the model store as one new model version."""
    with bentoml.models.create(name, labels=labels, metadata={"format": FORMAT, **metadata}) as model:
        for path in sorted(Path(source).iterdir()):
            shutil.copy2(path, Path(model.path) / path.name)
    return model


def resolve(tag: str | None) -> bentoml.Model:
    """The stored model for a tag (``name`` = its latest version); None = the newest import."""
    if tag:
        try:
            model = bentoml.models.get(tag)
        except NotFound:
            raise ArtifactError(f"no model {tag!r} in the BentoML model store") from None
        except ValueError as exc:  # not a tag at all (BentoML's message says why)
            raise ArtifactError(str(exc)) from None
        return _ours(model)
    ours = [m for m in bentoml.models.list() if m.info.metadata.get("format") == FORMAT]
    if not ours:
        raise ArtifactError("no recbole-bento model in the BentoML model store: run import_model.py first")
    return max(ours, key=lambda m: m.info.creation_time)


def _ours(model: bentoml.Model) -> bentoml.Model:
    if model.info.metadata.get("format") != FORMAT:
        raise ArtifactError(f"model {model.tag} was not imported by recbole-bento")
    return model


def import_archive(path: Path, home: Path) -> bentoml.Model:
    """A model file written by `bentoml models export`, imported into a private model store at *home*:
    the batch scorer and Spark executors load a shipped file without touching the user's store."""
    if not Path(path).is_file():
        raise ArtifactError(f"{path}: no such model file")
    try:
        model = import_model_into(str(path), str(home))  # a BentoML internal: see bentoml_compat
    except RuntimeError as exc:
        raise ArtifactError(str(exc)) from None
    except Exception as exc:  # BentoML raises several kinds for a file that is not an export
        reason = " ".join(str(exc).split())
        raise ArtifactError(f"{path}: not a model written by `bentoml models export` ({reason})") from None
    return _ours(model)


def stored_size(model: bentoml.Model) -> int:
    """Bytes of the model's stored files."""
    return sum(p.stat().st_size for p in Path(model.path).iterdir() if p.is_file())


def mapped_size(model: bentoml.Model) -> int:
    """Bytes of the model's stored files that every process of a server maps instead of reading
    (core/artifact.py): weights.pt and the item tables; 0 for a model stored before the tables
    were mapped, whose processes each compute a unit-norm table of their own."""
    path = Path(model.path)
    if not (path / ITEM_TABLE).is_file():
        return 0
    return sum((path / name).stat().st_size for name in (WEIGHTS, *MAPPED_TABLES) if (path / name).is_file())


def verify(model: bentoml.Model) -> None:
    """Check every stored file against the sha256 recorded at import (ArtifactError names the file)."""
    verify_digests(Path(model.path), model.info.metadata.get("files", {}))


def load(model: bentoml.Model, *, load_weights: bool = True, verified: bool = False) -> Artifact:
    """Load a stored model; unless this process already ran ``verify`` on it, check it first."""
    digests = None if verified else model.info.metadata.get("files", {})
    return load_artifact(Path(model.path), digests, load_weights=load_weights)
