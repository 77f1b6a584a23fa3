"""Is the Dataset's item vocabulary the one the checkpoint was trained with?

A RecBole checkpoint stores no vocabulary: the item and user ids are row numbers of the embedding
tables, and RecBole numbers tokens in the order it first meets them in the atomic files. The same
interactions in another row order give a Dataset with the same name, fields and sizes whose ids
mean other items: every answer would be wrong, and nothing about the shapes shows it.

What a checkpoint does record is the validation score RecBole measured with exactly these weights
on its own Dataset's validation split (``best_valid_score``, the config's ``valid_metric``, rounded
to ``metric_decimal_place``). This module recomputes that score on the given Dataset's validation
split, with the model built from the artifact: under the right vocabulary it comes out the same
(to the recorded rounding); under another numbering the model ranks the validation items as if
they were other items, and the score moves. Over the whole split the comparison is exact; a split
too large to score in full is sampled, and then a score clearly below the recorded one (more than
four standard errors) is refused.

What this cannot tell: a model whose recorded score is at chance level (or zero) scores about the
same under any numbering, so a wrong vocabulary passes for it (its answers are no better than
chance either way); and a checkpoint that never ran a validation (``best_valid_score`` is -inf, as
for an untrained model) or validated with sampled negatives gives nothing to compare against.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .engine import Engine
from .ranking import RankQuery

SKIP_HINT = "pass --skip-vocabulary-check if you are sure it is the Dataset the model was trained with"
# Validation rows scored in full when rows x items stays under this; beyond it, a fixed-seed sample.
_FULL_BUDGET = 2 * 10**9
_SAMPLE_ROWS = 2000
_BATCH = 64
_SIGMAS = 4.0


class VocabularyMismatch(ValueError):
    """The Dataset's ids do not reproduce the checkpoint's recorded validation score (one line)."""


@dataclass(frozen=True)
class VocabularyCheck:
    metric: str  # as the config names it, e.g. "MRR@10"
    recorded: float
    recomputed: float
    rows: int  # validation rows scored
    total_rows: int  # rows in the validation split


def _per_row(metric: str, ranks: torch.Tensor) -> torch.Tensor:
    """RecBole's value of *metric* for rows with one positive item at 1-based *ranks*."""
    match = re.fullmatch(r"(hit|recall|mrr|ndcg|precision|map)@(\d+)", metric.lower())
    if match is None:
        raise VocabularyMismatch(
            f"its valid_metric {metric} cannot be recomputed (one of hit, recall, mrr, ndcg, "
            f"precision, map @k is needed), so the item vocabulary cannot be checked: {SKIP_HINT}"
        )
    name, k = match.group(1), int(match.group(2))
    ranks = ranks.double()
    hit = ranks <= k
    value = {
        "hit": hit.double(),
        "recall": hit.double(),  # one positive per row
        "precision": hit.double() / k,
        "mrr": torch.where(hit, 1 / ranks, 0.0),
        "map": torch.where(hit, 1 / ranks, 0.0),
        "ndcg": torch.where(hit, 1 / torch.log2(ranks + 1), 0.0),
    }
    return value[name]


def _valid_mode(config: Any) -> str:
    mode = (config["eval_args"] or {}).get("mode", "full")
    return str(mode.get("valid", "full") if isinstance(mode, dict) else mode)


def check_vocabulary(
    engine: Engine,
    checkpoint: dict[str, Any],
    valid: Any,
    on_rows: Callable[[int], None] | None = None,
) -> VocabularyCheck:
    """Recompute the checkpoint's validation score on *valid* (the Dataset's validation split)
    with *engine*; raise VocabularyMismatch when it does not match the recorded one."""
    config = checkpoint["config"]
    metric = str(config["valid_metric"])
    recorded = checkpoint.get("best_valid_score")
    if not isinstance(recorded, (int, float)) or not math.isfinite(recorded):
        raise VocabularyMismatch(
            f"the checkpoint records no validation score (best_valid_score {recorded!r}: the model "
            f"was never validated), so the item vocabulary cannot be checked against it: {SKIP_HINT}"
        )
    if _valid_mode(config) != "full":
        raise VocabularyMismatch(
            f"the checkpoint's validation ranked sampled negatives ({_valid_mode(config)}), which "
            f"cannot be recomputed, so the item vocabulary cannot be checked: {SKIP_HINT}"
        )
    feat = valid.inter_feat
    iid, uid = valid.iid_field, valid.uid_field
    seq = feat[engine.artifact.item_seq_field]
    lengths = feat[engine.artifact.item_seq_len_field]
    total = len(feat)
    if total == 0:
        raise VocabularyMismatch(f"the Dataset's validation split is empty: {SKIP_HINT}")
    rows = np.arange(total)
    if total * engine.n_items > _FULL_BUDGET:
        rows = np.sort(np.random.default_rng(0).choice(total, size=_SAMPLE_ROWS, replace=False))
    ranks = []
    for start in range(0, len(rows), _BATCH):
        batch = rows[start : start + _BATCH]
        queries = [
            RankQuery(seq[r][: int(lengths[r])].tolist(), 1, int(feat[uid][r]) if uid else None)
            for r in batch.tolist()
        ]
        scores = engine.scores(queries).float().clone()
        scores[:, 0] = float("-inf")  # RecBole's evaluation never ranks the padding item
        target = feat[iid][torch.as_tensor(batch)].view(-1, 1)
        ranks.append(1 + (scores > scores.gather(1, target)).sum(dim=1))
        if on_rows is not None:
            on_rows(len(batch))
    values = _per_row(metric, torch.cat(ranks))
    recomputed = float(values.mean())
    check = VocabularyCheck(metric, float(recorded), recomputed, len(rows), total)
    unit = 10.0 ** -int(config["metric_decimal_place"] or 4)  # RecBole rounds the recorded score
    if len(rows) == total:
        matches = abs(recomputed - recorded) <= 1.5 * unit
    else:
        spread = math.sqrt(max(recorded * (1 - recorded), 0.0) / len(rows))  # a [0, 1] metric's bound
        matches = recomputed >= recorded - _SIGMAS * spread - unit
    if not matches:
        raise VocabularyMismatch(
            f"the Dataset's item ids are not the ones the model was trained with: on its validation "
            f"split the model scores {metric} {recomputed:.4f} ({len(rows)} of {total} rows), but "
            f"the checkpoint records {recorded:.4f} for the same split and weights (RecBole numbers "
            "items in the order it reads them: the same interactions in another order give other "
            f"ids); {SKIP_HINT}"
        )
    return check
