"""What every peer server of the benchmark runs around its HTTP framework: the RecBole checkpoint and
the pickled Dataset loaded as blog posts do, a ``/recommend`` body checked and mapped to item ids,
and plain ``full_sort_predict`` on a batch of histories, the padding item masked, ``torch.topk``.

One module so that the peers (bench/baseline_fastapi.py, bench/peer_litserve.py,
bench/peer_rayserve.py) differ only in how they serve, not in what they compute. It imports
nothing but torch and RecBole: the LitServe and Ray Serve peers run it in their own venv
(bench/peers/setup.sh).

Both files are unpickled with plain pickle (``torch.load(weights_only=False)``), as the recipe
does: only run it on files you made.
"""

from __future__ import annotations

import pickle
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Query:
    history: list[int]  # internal item ids, the last `window` of the known ones
    topk: int


class RecipeModel:
    """Loaded once per server process; ``rank`` is called with one query (the per-request recipe) or
    a batch (the batching peers)."""

    def __init__(self, checkpoint_path: str, dataset_path: str, torch_threads: int = 0) -> None:
        sys.argv = sys.argv[:1]  # RecBole's Config parses sys.argv, which here holds the server's flags
        from recbole.utils import get_model

        if torch_threads:
            torch.set_num_threads(torch_threads)
        start = time.perf_counter()
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        with open(dataset_path, "rb") as f:
            dataset = pickle.load(f)
        config = checkpoint["config"]
        config["device"] = torch.device("cpu")
        model = get_model(config["model"])(config, dataset)
        model.load_state_dict(checkpoint["state_dict"])
        model.load_other_parameter(checkpoint.get("other_parameter"))
        self.model = model.eval()
        self.window: int = config["MAX_ITEM_LIST_LENGTH"]
        self.token2id: dict[str, int] = dataset.field2token_id[dataset.iid_field]
        self.id2token = dataset.field2id_token[dataset.iid_field]
        self.load_s = time.perf_counter() - start

    def parse(self, body: object) -> Query | str:
        """The query a ``{"sequence": [...], "topk": k}`` JSON body asks for, or why it is refused.

        Refusals are returned, not raised: LitServe fails every request of a batch when one raises.
        """
        if not isinstance(body, dict) or not isinstance(body.get("sequence"), list):
            return "the body must be a JSON object with a 'sequence' list"
        topk = body.get("topk", 10)
        if not isinstance(topk, int):
            return "topk must be an integer"
        return self.query(body["sequence"], topk)

    def query(self, sequence: list[int | str], topk: int) -> Query | str:
        """Unknown items are skipped, as the service does; a history with no known item is refused."""
        if not 1 <= topk < len(self.id2token):
            return f"topk must be between 1 and {len(self.id2token) - 1}"
        known = [self.token2id[str(x)] for x in sequence if str(x) in self.token2id]
        if not known:
            return "no known item in the sequence"
        return Query(known[-self.window :], topk)

    @torch.no_grad()
    def rank(self, queries: Sequence[Query]) -> list[dict[str, list]]:
        """``{"item_list", "score_list"}`` per query, from one ``full_sort_predict`` on the batch."""
        from recbole.data.interaction import Interaction

        seq = torch.zeros((len(queries), self.window), dtype=torch.long)
        for row, query in enumerate(queries):
            seq[row, : len(query.history)] = torch.tensor(query.history)
        lengths = torch.tensor([len(q.history) for q in queries])
        model = self.model
        scores = model.full_sort_predict(Interaction({model.ITEM_SEQ: seq, model.ITEM_SEQ_LEN: lengths}))
        scores = scores.view(len(queries), -1)
        scores[:, 0] = float("-inf")  # the padding item
        values, indices = torch.topk(scores, max(q.topk for q in queries), dim=1)
        return [
            {
                "item_list": self.id2token[indices[row, : q.topk].numpy()].tolist(),
                "score_list": values[row, : q.topk].tolist(),
            }
            for row, q in enumerate(queries)
        ]
