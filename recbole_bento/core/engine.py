"""Batched inference: pad histories as RecBole does, call the model's own full_sort_predict,
mask, take the top-k. No HTTP here; the runner service and the benchmarks call it directly."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from recbole.data.interaction import Interaction

from .artifact import Artifact, ArtifactError, ServingConfig
from .blockwise import block_ranker

_OTHER_PREFIX = "__other__."


@dataclass
class RankQuery:
    """One already-validated request in internal ids."""

    history: list[int]  # internal item ids, oldest first, at least one
    topk: int
    user: int | None = None
    exclude: list[int] = field(default_factory=list)
    candidates: list[int] | None = None


@dataclass
class RankResult:
    items: list[int]
    scores: list[float]


def pick_device(requested: str | None = None) -> torch.device:
    """*requested* ("cpu", "cuda", "cuda:1"), else CUDA when present. A name torch does not parse, or
    a CUDA device this machine lacks, is a ValueError naming RECBOLE_BENTO_DEVICE: service.py checks
    at import, so `bentoml serve` stops with the reason instead of restarting a failing worker."""
    if not requested:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"RECBOLE_BENTO_DEVICE={requested!r} is not a device: use cpu, cuda or cuda:<index>")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(
            f"RECBOLE_BENTO_DEVICE={requested!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    return device


def pad_histories(histories: Sequence[Sequence[int]], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RecBole's layout: the most recent *width* items, left-aligned, tail-padded with 0."""
    seq = torch.zeros((len(histories), width), dtype=torch.long)
    lengths = torch.empty(len(histories), dtype=torch.long)
    for row, history in enumerate(histories):
        recent = list(history[-width:])
        seq[row, : len(recent)] = torch.as_tensor(recent, dtype=torch.long)
        lengths[row] = len(recent)
    return seq, lengths


def build_model(artifact: Artifact, device: torch.device) -> torch.nn.Module:
    """Instantiate the RecBole model class from the stored config and load its weights."""
    config = ServingConfig(artifact.spec.serving_config(artifact.config))  # + the spec's build-time values
    config["device"] = device
    model = artifact.spec.model_class()(config, artifact.dataset)
    weights = {k: v for k, v in artifact.state_dict.items() if not k.startswith(_OTHER_PREFIX)}
    other = {
        k[len(_OTHER_PREFIX) :]: v.to(device)
        for k, v in artifact.state_dict.items()
        if k.startswith(_OTHER_PREFIX)
    }
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise ArtifactError(f"the weights do not fit {artifact.model_name}: {exc}") from exc
    model.load_other_parameter(other or None)
    return model.to(device).eval()


class Engine:
    def __init__(self, artifact: Artifact, device: str | None = None, block_items: int = 8192) -> None:
        self.artifact = artifact
        self.device = pick_device(device)
        self.model = build_model(artifact, self.device)
        self.n_items = len(artifact.item_tokens)
        self._seq_field = artifact.item_seq_field
        self._len_field = artifact.item_seq_len_field
        self._uid_field = artifact.dataset.uid_field
        # large catalogues, dot-product models, CPU: exact top-k without the B x N matrix
        self.block = block_ranker(self, block_items)

    def interaction(self, queries: Sequence[RankQuery]) -> Interaction:
        seq, lengths = pad_histories([q.history for q in queries], self.artifact.window)
        data = {self._seq_field: seq, self._len_field: lengths}
        if self.artifact.spec.needs_user:
            data[self._uid_field] = torch.tensor([q.user or 0 for q in queries], dtype=torch.long)
        if self.artifact.spec.target_placeholder:  # read only by the loss full_sort_predict also computes
            data[self.artifact.dataset.iid_field] = torch.ones(len(queries), dtype=torch.long)
        if self.device.type == "cuda":  # page-locked batches: faster host-to-device copies
            data = {k: v.pin_memory() for k, v in data.items()}
        return Interaction(data).to(self.device)

    @torch.inference_mode()
    def scores(self, queries: Sequence[RankQuery]) -> torch.Tensor:
        """[batch, n_items] scores exactly as the model's full_sort_predict computes them."""
        out = self.model.full_sort_predict(self.interaction(queries))
        return out.view(len(queries), -1)[:, : self.n_items]

    @torch.inference_mode()
    def rank(self, queries: Sequence[RankQuery]) -> list[RankResult]:
        if not queries:
            return []
        k = min(max(q.topk for q in queries), self.n_items)
        top = self.block.topk(self.interaction(queries), queries, k) if self.block is not None else None
        values, indices = top if top is not None else self.plain_topk(queries, k)
        values, indices = values.cpu(), indices.cpu()
        results = []
        for row, query in enumerate(queries):
            vals = values[row, : query.topk]
            keep = vals > float("-inf")
            results.append(
                RankResult(items=indices[row, : query.topk][keep].tolist(), scores=vals[keep].tolist())
            )
        return results

    @torch.inference_mode()
    def plain_topk(self, queries: Sequence[RankQuery], k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference path: full_sort_predict, masks, torch.topk over the whole catalogue."""
        scores = self.scores(queries).float()
        apply_masks(scores, queries)
        return torch.topk(scores, k, dim=1)


def apply_masks(scores: torch.Tensor, queries: Sequence[RankQuery]) -> None:
    """In place: padding, excluded and non-candidate items get -inf, so top-k never returns them."""
    neg_inf = float("-inf")
    scores[:, 0] = neg_inf
    rows, cols = [], []
    for row, query in enumerate(queries):
        rows.extend([row] * len(query.exclude))
        cols.extend(query.exclude)
    if cols:
        scores[torch.tensor(rows), torch.tensor(cols)] = neg_inf
    for row, query in enumerate(queries):
        if query.candidates is not None:
            allowed = torch.zeros(scores.shape[1], dtype=torch.bool, device=scores.device)
            allowed[torch.tensor(query.candidates, dtype=torch.long)] = True
            scores[row, ~allowed] = neg_inf
