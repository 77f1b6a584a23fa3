"""The table of RecBole sequential models this project serves, and what each one needs.

Every model-specific fact lives here, so the importer and the engine stay free of per-model
conditionals.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModelSpec:
    name: str  # RecBole class name, as in the checkpoint's config["model"]
    needs_user: bool = False  # full_sort_predict reads the user id
    unsupported: str | None = None  # why import refuses it; None = supported

    @property
    def required_inputs(self) -> list[str]:
        return ["sequence", "user_id"] if self.needs_user else ["sequence"]

    def model_class(self) -> type[torch.nn.Module]:
        module = importlib.import_module("recbole.model.sequential_recommender")
        return getattr(module, self.name)


_NO_FULL_SORT = "has no full_sort_predict, so it cannot rank the whole catalogue"
_NEEDS_FEATURES = "needs item features at serving time, which this version does not store yet"
_NEEDS_KG = "needs knowledge-graph embeddings at serving time, which this version does not store yet"

MODEL_SPECS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec("BERT4Rec"),
        ModelSpec("Caser", needs_user=True),
        ModelSpec("CORE"),
        ModelSpec("FDSA", unsupported=_NEEDS_FEATURES),
        ModelSpec("FEARec", unsupported="reads the training interactions in its constructor"),
        ModelSpec("FOSSIL", needs_user=True),
        ModelSpec("FPMC", needs_user=True),
        ModelSpec("GCSAN"),
        ModelSpec("GRU4Rec"),
        ModelSpec("GRU4RecCPR", unsupported="CPR models are not supported yet"),
        ModelSpec("GRU4RecF", unsupported=_NEEDS_FEATURES),
        ModelSpec("GRU4RecKG", unsupported=_NEEDS_KG),
        ModelSpec("HGN", needs_user=True),
        ModelSpec("HRM", needs_user=True),
        ModelSpec("KSR", unsupported=_NEEDS_KG),
        ModelSpec("LightSANs"),
        ModelSpec("NARM"),
        ModelSpec("NextItNet"),
        ModelSpec("NPE", needs_user=True),
        ModelSpec("RepeatNet"),
        ModelSpec("S3Rec", unsupported=_NEEDS_FEATURES),
        ModelSpec("SASRec"),
        ModelSpec("SASRecCPR", unsupported="CPR models are not supported yet"),
        ModelSpec("SASRecF", unsupported=_NEEDS_FEATURES),
        ModelSpec("SHAN", needs_user=True),
        ModelSpec("SINE"),
        ModelSpec("SRGNN"),
        ModelSpec("STAMP"),
        ModelSpec("TransRec", needs_user=True),
        ModelSpec("DIN", unsupported=_NO_FULL_SORT),
        ModelSpec("DIEN", unsupported=_NO_FULL_SORT),
    ]
}


class UnsupportedModelError(ValueError):
    pass


def spec_for(model_name: str) -> ModelSpec:
    """The spec of a supported model; raises UnsupportedModelError with a one-line reason."""
    spec = MODEL_SPECS.get(model_name)
    if spec is None:
        raise UnsupportedModelError(
            f"{model_name} is not a RecBole sequential model this project serves "
            f"(supported: {', '.join(s for s, v in MODEL_SPECS.items() if v.unsupported is None)})"
        )
    if spec.unsupported:
        raise UnsupportedModelError(f"{model_name} is not supported: it {spec.unsupported}")
    return spec
