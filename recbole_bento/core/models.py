"""The table of RecBole sequential models this project serves, and what each one needs.

Every model-specific fact lives here, so the importer, the artifact and the engine stay free of
per-model conditionals. A model's quirks are data in its ModelSpec row:

- what its constructor reads from the Dataset beyond field counts (item features, preloaded KG
  embeddings), which the importer captures into the pickle-free artifact;
- config values needed only to *construct* it for serving (S3Rec's fine-tune stage would load the
  pre-training file from disk: the stored weights replace that anyway);
- config values a checkpoint must have to be servable (S3Rec must be fine-tuned);
- whether full_sort_predict also computes a training loss, and so reads a target item (CPR models);
- what its scores are (RepeatNet and the CPR models return probabilities);
- whether it scores by a dot product with its item table, and how its forward is called;
- which item table its full_sort_predict scores against (/similar_items and explanations compare
  items by cosine in it, and a dot-product model's block top-k and retrieval index rank against it);
- which size-like config values its constructor allocates from (widths and counts), which the
  importer bounds before it constructs the model from an untrusted checkpoint.

Quirks that need no code are recorded in ``notes`` for the model table: the engine always pads to
MAX_ITEM_LIST_LENGTH as RecBole's dataloader does (SINE, Caser and NextItNet need that exact
width), missing config keys read as None as in RecBole's Config (HRM reads ``reg_weight``, which
its yaml lacks), and BERT4Rec's extra mask-token embedding row comes with its weights.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

DotProduct = Literal["seq_and_len", "seq_only"]


@dataclass(frozen=True)
class ModelSpec:
    name: str  # RecBole class name, as in the checkpoint's config["model"]
    needs_user: bool = False  # full_sort_predict reads the user id
    unsupported: str | None = None  # why import refuses it; None = supported
    # config keys whose values name the item-feature fields the constructor reads
    # (dataset.get_item_feature()[field]); those columns are stored at import
    item_feature_keys: tuple[str, ...] = ()
    # dataset.get_preload_weight(field) matrices the constructor reads, each with the config key of
    # the id field whose num() bounds the rows it reads; those rows are stored at import
    preload_weights: tuple[tuple[str, str], ...] = ()
    # config values set only while constructing the model for serving
    build_config: tuple[tuple[str, Any], ...] = ()
    # config values a checkpoint must have, with the reason it is refused otherwise
    requires_config: tuple[tuple[str, Any, str], ...] = ()
    # full_sort_predict also computes the training loss, so it reads a target item; any item will
    # do, the scores do not depend on it
    target_placeholder: bool = False
    output: str = "scores"  # what score_list holds: "scores" or "probabilities"
    # full_sort_predict is forward(...) @ item_embedding.weight.T: how forward is called
    # ("seq_and_len": (item_seq, item_seq_len), "seq_only": (item_seq,)); None = scored otherwise.
    # Such models are ranked by the exact block top-k on large catalogues (blockwise.py).
    dot_product: DotProduct | None = None
    # the module whose ``.weight`` (rows = internal item ids) full_sort_predict scores the catalogue
    # against; None where it scores against something else (a transformed table, two tables, a
    # decoder), and then /similar_items and explanations are refused
    item_table: str | None = "item_embedding"
    # size-like config keys the constructor allocates from: widths (embedding and hidden sizes,
    # kernels, interests) and counts (layers, heads, steps), bounded at import (importer.check_sizes)
    width_keys: tuple[str, ...] = ("embedding_size",)
    count_keys: tuple[str, ...] = ()
    notes: str = ""

    def __post_init__(self) -> None:
        if self.dot_product is not None and self.item_table is None:
            raise ValueError(f"{self.name}: a dot-product model scores against an item table")

    @property
    def required_inputs(self) -> list[str]:
        return ["sequence", "user_id"] if self.needs_user else ["sequence"]

    @property
    def stored_inputs(self) -> list[str]:
        """What the artifact holds beyond weights, counts and id maps (for the model table)."""
        out = []
        if self.item_feature_keys:
            out.append("item features (" + ", ".join(self.item_feature_keys) + ")")
        if self.preload_weights:
            out.append("preloaded KG embeddings (" + ", ".join(f for f, _ in self.preload_weights) + ")")
        return out

    def table(self, model: torch.nn.Module) -> torch.Tensor | None:
        """The weight of *model*'s ``item_table`` (rows = internal item ids), or None where the
        spec names none or the model has no such 2-D weight."""
        weight = getattr(getattr(model, self.item_table, None), "weight", None) if self.item_table else None
        return weight if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None

    def model_class(self) -> type[torch.nn.Module]:
        _numpy_aliases()
        module = importlib.import_module("recbole.model.sequential_recommender")
        return getattr(module, self.name)

    def item_feature_fields(self, config: Mapping[str, Any]) -> list[str]:
        fields: list[str] = []
        for key in self.item_feature_keys:
            value = config[key]
            for field in [value] if isinstance(value, str) else list(value or []):
                if field not in fields:
                    fields.append(field)
        return fields

    def check_config(self, config: Mapping[str, Any]) -> None:
        """Raise UnsupportedModelError when the checkpoint's config makes it unservable."""
        for key, value, reason in self.requires_config:
            if config[key] != value:
                raise UnsupportedModelError(
                    f"{self.name} is not supported with {key}={config[key]!r}: {reason}"
                )

    def serving_config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """The config the model is constructed with for serving."""
        return {**config, **dict(self.build_config)}


def _numpy_aliases() -> None:
    """RecBole's Config installs numpy aliases removed in numpy 1.24 (its layers use ``np.long``);
    serving builds no Config, so install the ones model code uses when numpy lacks them."""
    import numpy as np

    if "long" not in np.__dict__:
        np.long = np.int_  # type: ignore[attr-defined]


_NO_FULL_SORT = "has no full_sort_predict, so it cannot rank the whole catalogue"
_WINDOW = "reads the exact window: histories are padded to MAX_ITEM_LIST_LENGTH as RecBole does"
_FEATURES = "item feature columns named by selected_features are stored at import"
_CPR = "full_sort_predict computes a loss too, so a placeholder target item is passed"
_KG_ROWS = "ITEM_ID_FIELD"
_CPR_TABLE = "out_item_embedding"  # item_embedding itself, or a separate output layer
_DOT: DotProduct = "seq_and_len"
# The size keys of the two families most models belong to: transformer encoders and RNNs.
_ATTN = {"width_keys": ("hidden_size", "inner_size"), "count_keys": ("n_layers", "n_heads")}
_RNN = {"width_keys": ("embedding_size", "hidden_size"), "count_keys": ("num_layers",)}

MODEL_SPECS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec(
            "BERT4Rec", **_ATTN, notes="mask token = an extra embedding row, restored with the weights"
        ),
        ModelSpec("Caser", needs_user=True, width_keys=("embedding_size", "nh", "nv"), notes=_WINDOW),
        ModelSpec("CORE", width_keys=("embedding_size", "inner_size"), count_keys=_ATTN["count_keys"]),
        ModelSpec("FDSA", item_feature_keys=("selected_features",), **_ATTN, notes=_FEATURES),
        ModelSpec(
            "FEARec",
            **_ATTN,
            notes="its constructor indexes the training interactions for a training-only loss; "
            "serving gives it none (not used by full_sort_predict)",
        ),
        ModelSpec("FOSSIL", needs_user=True, width_keys=("embedding_size", "order_len")),
        ModelSpec("FPMC", needs_user=True, item_table=None),  # two tables: IU_emb and IL_emb
        ModelSpec(
            "GCSAN",
            dot_product=_DOT,
            width_keys=_ATTN["width_keys"],
            count_keys=("n_layers", "n_heads", "step"),
        ),
        ModelSpec("GRU4Rec", dot_product=_DOT, **_RNN),
        ModelSpec(
            "GRU4RecCPR",
            target_placeholder=True,
            output="probabilities",
            item_table=_CPR_TABLE,
            width_keys=(*_RNN["width_keys"], "reranker_CAN_NUM"),
            count_keys=_RNN["count_keys"],
            notes=_CPR,
        ),
        ModelSpec("GRU4RecF", item_feature_keys=("selected_features",), **_RNN, notes=_FEATURES),
        ModelSpec(
            "GRU4RecKG",
            preload_weights=(("ent_id", _KG_ROWS),),
            **_RNN,
            notes="the preloaded entity embeddings the constructor copies are stored at import",
        ),
        ModelSpec("HGN", needs_user=True, item_table="item_embedding_for_prediction"),
        ModelSpec(
            "HRM",
            needs_user=True,
            count_keys=("high_order",),
            notes="reads reg_weight, which its yaml lacks: missing keys read as None, as in RecBole",
        ),
        ModelSpec(
            "KSR",
            preload_weights=(("ent_id", _KG_ROWS), ("rel_id", "RELATION_ID_FIELD")),
            item_table=None,  # scores against dense_layer_i(item and entity embeddings)
            width_keys=(*_RNN["width_keys"], "kg_embedding_size"),
            count_keys=_RNN["count_keys"],
            notes="its relation embeddings (not in its state_dict) are stored at import, as float32: "
            "RecBole 1.2.1 preloads them as float64, with which KSR itself cannot train or predict "
            "(its memory_read mixes them with float32); cast them to float32 to train it",
        ),
        ModelSpec(
            "LightSANs",
            dot_product=_DOT,
            width_keys=(*_ATTN["width_keys"], "k_interests"),
            count_keys=_ATTN["count_keys"],
        ),
        ModelSpec("NARM", dot_product=_DOT, width_keys=_RNN["width_keys"], count_keys=("n_layers",)),
        ModelSpec(
            "NextItNet",
            dot_product="seq_only",
            width_keys=("embedding_size", "kernel_size"),
            count_keys=("block_num",),
            notes=_WINDOW,
        ),
        ModelSpec("NPE", needs_user=True, item_table=None),  # scores against relu(item_embedding)
        ModelSpec(
            "RepeatNet", output="probabilities", item_table=None, width_keys=_RNN["width_keys"]
        ),  # a repeat/explore decoder
        ModelSpec(
            "S3Rec",
            item_feature_keys=("item_attribute",),
            **_ATTN,
            build_config=(("train_stage", "pretrain"),),
            requires_config=(
                ("train_stage", "finetune", "only a fine-tuned S3Rec ranks next items; fine-tune it first"),
            ),
            notes="fine-tuned checkpoints only; built without re-reading pre_model_path (the stored "
            "weights replace it)",
        ),
        ModelSpec("SASRec", dot_product=_DOT, **_ATTN),
        ModelSpec(
            "SASRecCPR",
            target_placeholder=True,
            output="probabilities",
            item_table=_CPR_TABLE,
            width_keys=(*_ATTN["width_keys"], "reranker_CAN_NUM"),
            count_keys=_ATTN["count_keys"],
            notes=_CPR,
        ),
        ModelSpec("SASRecF", item_feature_keys=("selected_features",), **_ATTN, notes=_FEATURES),
        ModelSpec("SHAN", needs_user=True, width_keys=("embedding_size", "short_item_length")),
        ModelSpec(
            "SINE",
            dot_product=_DOT,
            width_keys=("embedding_size", "prototype_size", "interest_size"),
            notes=_WINDOW,
        ),
        ModelSpec("SRGNN", dot_product=_DOT, count_keys=("step",)),
        ModelSpec("STAMP", dot_product=_DOT),
        ModelSpec("TransRec", needs_user=True),
        ModelSpec("DIN", unsupported=_NO_FULL_SORT, item_table=None),
        ModelSpec("DIEN", unsupported=_NO_FULL_SORT, item_table=None),
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
