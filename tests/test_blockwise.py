"""The block top-k (recbole_bento/core/blockwise.py) returns what the plain path returns (full score
matrix, ranking.apply_masks, torch.topk): the same items in the same order with the same scores,
under padding, exclude and candidates masks, ragged tails and any block size. Scores are compared
to fp32 rounding (two matmul shapes may round a dot product differently by an ulp); an item may
differ from the plain path's only where the plain path's own scores tie to within that rounding."""

from __future__ import annotations

import pytest
import torch

from recbole_bento.core.blockwise import BlockTopK, ChunkedTopK, _bf16_blocks, _PackedBlocks, native_bf16
from recbole_bento.core.engine import DEVICE_CHUNK_SCORES, Engine, block_ranker, exact_scorer
from recbole_bento.core.models import MODEL_SPECS
from recbole_bento.core.ranking import RankQuery, apply_masks

NEG_INF = float("-inf")


RTOL = 1e-5


def plain(q: torch.Tensor, table: torch.Tensor, queries: list[RankQuery], k: int):
    """(values, indices, masked scores) of the plain path."""
    scores = torch.matmul(q, table.transpose(0, 1))
    apply_masks(scores, queries)
    values, indices = torch.topk(scores, k, dim=1)
    return values, indices, scores


def kept(values: torch.Tensor, indices: torch.Tensor, row: int, topk: int) -> tuple[list[float], list[int]]:
    """What Engine.rank returns for a row: the first topk entries, -inf dropped."""
    vals, idx = values[row, :topk], indices[row, :topk]
    keep = vals > NEG_INF
    return vals[keep].tolist(), idx[keep].tolist()


def assert_same(got, want, queries: list[RankQuery]) -> None:
    """Row by row, what Engine.rank would return: identical, up to fp32 rounding and exact ties."""
    assert got is not None
    want_values, want_indices, scores = want
    for row, query in enumerate(queries):
        got_vals, got_items = kept(*got, row, query.topk)
        want_vals, want_items = kept(want_values, want_indices, row, query.topk)
        assert len(got_items) == len(want_items), (row, query)
        for pos, (g_val, w_val, g_item, w_item) in enumerate(
            zip(got_vals, want_vals, got_items, want_items, strict=True)
        ):
            tol = RTOL * max(1.0, abs(w_val))
            assert abs(g_val - w_val) <= tol, (row, pos, g_val, w_val)
            assert abs(float(scores[row, g_item]) - g_val) <= tol, (row, pos, g_item)  # a real, allowed item
            if g_item != w_item:  # only where the plain path's scores tie
                ties = [v for v in want_vals if abs(v - w_val) <= tol]
                assert len(ties) > 1 or pos == len(want_vals) - 1, (row, pos, g_item, w_item)


def random_queries(n_items: int, batch: int, gen: torch.Generator, best: list[list[int]]) -> list[RankQuery]:
    """A mix of plain rows, rows excluding their own best items, and candidate rows (with
    duplicates, the padding item, an empty candidate list, and one of about an eighth of the
    catalogue: over ``BlockTopK.direct_items`` where that is a sixteenth, so it goes through pass 1)."""
    queries = []
    for row in range(batch):
        topk = [1, 5, 10, 20][row % 4]
        query = RankQuery([1, 2, 3], topk)
        kind = row % 5
        if kind == 1:
            query.exclude = best[row][:7] + torch.randint(1, n_items, (20,), generator=gen).tolist()
        elif kind == 2:
            cand = torch.randint(0, n_items, (30,), generator=gen).tolist()
            query.candidates = cand + cand[:5] + [0]
            query.exclude = cand[:3]
        elif kind == 3 and row % 10 == 3:
            query.candidates = []
        elif kind == 3:
            query.candidates = torch.randint(1, n_items, (n_items // 8,), generator=gen).tolist()
        elif kind == 4:
            query.exclude = [0, 1, n_items - 1]
        queries.append(query)
    return queries


@pytest.mark.parametrize("n_items", [5_000, 10_007, 65_537])
@pytest.mark.parametrize("block_items", [256, 1024, 8192])
@pytest.mark.parametrize("batch", [1, 7, 32])
@pytest.mark.parametrize("threads,low_precision", [(1, False), (3, False), (2, True)])
def test_block_topk_equals_plain_path(
    n_items: int, block_items: int, batch: int, threads: int, low_precision: bool
) -> None:
    gen = torch.Generator().manual_seed(n_items + block_items + batch)
    table = torch.randn(n_items, 64, generator=gen) * 0.05
    q = torch.randn(batch, 64, generator=gen)
    best = torch.topk(q @ table.T, 10, dim=1).indices.tolist()
    queries = random_queries(n_items, batch, gen, best)
    k = max(x.topk for x in queries)
    scorer = BlockTopK(table, n_items, block_items=block_items, threads=threads, low_precision=low_precision)
    got = scorer.topk(q, queries, k)
    if got is None:  # declined: only where re-scoring the selected chunks could cover half the table
        assert batch * k * 64 > n_items // 2
        return
    assert_same(got, plain(q, table, queries, k), queries)


@pytest.mark.parametrize("n_items", [5000, 4096])
def test_bfloat16_blocks_are_packed_and_multiply_as_torch_mm(n_items: int) -> None:
    """Pass 1's bfloat16 weights, with torch.mm's products for every block (a ragged tail included)
    and batch size: oneDNN-packed on a CPU that multiplies bfloat16 in hardware; elsewhere the
    packed product may differ from torch.mm's, and then the plain slices are kept."""
    gen = torch.Generator().manual_seed(n_items)
    table = torch.randn(n_items, 64, generator=gen)
    blocks = _bf16_blocks(table, 1024)
    assert torch.backends.mkldnn.is_available()
    if native_bf16():
        assert isinstance(blocks, _PackedBlocks), "pass 1 fell back to unpacked torch.mm"
    low = table.to(torch.bfloat16)
    for batch in (1, 7, 64):
        q = torch.randn(batch, 64, generator=gen).to(torch.bfloat16)
        for i, start in enumerate(range(0, n_items, 1024)):
            assert torch.equal(blocks.mm(q, i), torch.mm(q, low[start : start + 1024].T)), (batch, i)


@pytest.mark.parametrize("low_precision", [False, True])
def test_skewed_norms_and_scales(low_precision: bool) -> None:
    """Trained tables are not Gaussian: a few long item vectors, tiny and huge query scales."""
    gen = torch.Generator().manual_seed(5)
    n_items = 30_000
    table = torch.randn(n_items, 64, generator=gen) * 0.05
    table[torch.randint(0, n_items, (300,), generator=gen)] *= 20  # popular items, long vectors
    table[5000:5100] = 0.0  # items never trained
    for scale in (1e-3, 1.0, 1e3):
        q = torch.randn(9, 64, generator=gen) * scale
        queries = [RankQuery([1], [1, 10, 50][row % 3]) for row in range(9)]
        scorer = BlockTopK(table, n_items, block_items=2048, low_precision=low_precision)
        got = scorer.topk(q, queries, 50)
        assert_same(got, plain(q, table, queries, 50), queries)


@pytest.mark.parametrize(
    "n_items,chunk_items", [(5_000, 1 << 20), (10_007, 1024), (65_537, 4096), (3_000, 7)]
)
@pytest.mark.parametrize("batch", [1, 7, 32])
def test_chunked_topk_equals_plain_path(n_items: int, chunk_items: int, batch: int) -> None:
    """The accelerator's exact top-k (engine.exact_scorer off the CPU), run here on the CPU: the
    same rows and masks as the block top-k above, the whole catalogue in one chunk or in chunks of
    thousands of items, ragged tails, and chunks narrower than k."""
    gen = torch.Generator().manual_seed(n_items + chunk_items + batch)
    table = torch.randn(n_items, 64, generator=gen) * 0.05
    q = torch.randn(batch, 64, generator=gen)
    best = torch.topk(q @ table.T, 10, dim=1).indices.tolist()
    queries = random_queries(n_items, batch, gen, best)
    k = max(x.topk for x in queries)
    got = ChunkedTopK(table, n_items, max_scores=chunk_items * batch).topk(q, queries, k)
    assert_same(got, plain(q, table, queries, k), queries)


def test_exact_scorer_follows_the_table_device() -> None:
    """A CPU table gets the block top-k; a table on any other device the chunked one, which leaves
    batches whose whole score matrix fits the budget to the plain path. (A meta tensor stands in
    for a device table: no data, so nothing is computed at construction.)"""
    assert isinstance(exact_scorer(torch.randn(40_000, 8), 40_000, 8192), BlockTopK)
    scorer = exact_scorer(torch.empty(40_000, 8, device="meta"), 40_000, 8192)
    assert isinstance(scorer, ChunkedTopK)
    assert (scorer.min_scores, scorer.max_scores) == (0, DEVICE_CHUNK_SCORES)
    with pytest.raises(ValueError, match="max_scores"):
        ChunkedTopK(torch.randn(4, 2), 4, max_scores=0)
    small = ChunkedTopK(torch.randn(100, 8), 100, max_scores=60, min_scores=2 * 100 + 1)
    q, queries = torch.randn(2, 8), [RankQuery([1], 5), RankQuery([2], 5)]
    assert small.topk(q, queries, 5) is None  # 2 x 100 scores: the plain path's batch
    assert small.topk(q, queries, 5, force=True)[0].shape == (2, 5)


def test_excluding_everything_but_a_few_items_still_returns_them() -> None:
    gen = torch.Generator().manual_seed(1)
    n_items = 20_000
    table = torch.randn(n_items, 32, generator=gen)
    q = torch.randn(2, 32, generator=gen)
    keep = [5, 17_001, 19_999]
    queries = [
        RankQuery([1], 10, exclude=[i for i in range(n_items) if i not in keep]),
        RankQuery([1], 10),
    ]
    got = BlockTopK(table, n_items, block_items=2048).topk(q, queries, 10)
    want = plain(q, table, queries, 10)
    assert_same(got, want, queries)
    assert sorted(kept(*got, 0, 10)[1]) == keep


def test_ties_and_duplicate_rows() -> None:
    """Identical item vectors (exact ties) and identical queries in one batch."""
    n_items = 9_000
    table = torch.randn(n_items, 16, generator=torch.Generator().manual_seed(2))
    table[100:200] = table[100]  # 100 items with the same vector
    q = torch.randn(1, 16, generator=torch.Generator().manual_seed(3)).repeat(4, 1)
    q[:, :] = table[100] * 3  # they are the best items
    queries = [RankQuery([1], 10) for _ in range(4)]
    got = BlockTopK(table, n_items, block_items=1024).topk(q, queries, 10)
    want = plain(q, table, queries, 10)
    assert_same(got, want, queries)
    for row in range(4):
        got_vals, got_items = kept(*got, row, 10)
        want_vals, want_items = kept(*want[:2], row, 10)
        assert got_vals == want_vals  # same scores; tied items may come back in another order
        assert set(got_items) <= set(range(100, 200)) and set(want_items) <= set(range(100, 200))


def test_large_topk_goes_to_the_plain_path() -> None:
    """Re-scoring most of the table costs more than the plain path: the block path declines."""
    table = torch.randn(10_000, 8)
    queries = [RankQuery([1], 500)] * 8
    assert BlockTopK(table, 10_000, block_items=1024).topk(torch.randn(8, 8), queries, 500) is None


# ---------------------------------------------------------------- through the engine, real models


@pytest.fixture(scope="module", params=["SASRec", "GRU4Rec"])
def trained_engine(request, sasrec_tag: str, gru4rec_tag: str):
    """An Engine on a trained model (the session's imports) with blocks small enough that the block
    path serves it."""
    from recbole_bento.core import store

    tag = {"SASRec": sasrec_tag, "GRU4Rec": gru4rec_tag}[request.param]
    engine = Engine(store.load(store.resolve(tag)), device="cpu", block_items=32)
    assert engine.block is not None, "the block path should serve this model"
    return engine


def test_engine_block_path_equals_plain_path(trained_engine: Engine) -> None:
    engine = trained_engine
    n = engine.n_items
    gen = torch.Generator().manual_seed(4)
    histories = [torch.randint(1, n, (int(length),), generator=gen).tolist() for length in range(1, 40, 3)]
    best = [
        engine.plain_topk([RankQuery(h, 10)], 10)[1][0].tolist() for h in histories
    ]  # each history's own best items, to exclude
    queries = []
    for row, history in enumerate(histories):
        query = RankQuery(history, [1, 5, 10][row % 3])
        if row % 4 == 1:
            query.exclude = best[row][:5] + history
        elif row % 4 == 2:
            query.candidates = best[row][3:] + torch.randint(0, n, (50,), generator=gen).tolist()
        queries.append(query)
    k = max(x.topk for x in queries)
    got = engine.block.topk(engine.interaction(queries), queries, k)
    with torch.inference_mode():
        scores = engine.scores(queries).float()
        apply_masks(scores, queries)
    want = (*engine.plain_topk(queries, k), scores)
    assert_same(got, want, queries)
    # and what the service returns: Engine.rank on the block path == on the plain path
    block_results = engine.rank(queries)
    saved, engine.block = engine.block, None
    try:
        plain_results = engine.rank(queries)
    finally:
        engine.block = saved
    for got_result, want_result in zip(block_results, plain_results, strict=True):
        assert got_result.items == want_result.items
        assert got_result.scores == pytest.approx(want_result.scores, rel=RTOL)


def test_block_path_is_off_where_it_does_not_apply(trained_engine: Engine) -> None:
    engine = trained_engine
    assert block_ranker(engine, 0) is None  # RECBOLE_BENTO_BLOCK_ITEMS=0
    assert block_ranker(engine, 8192) is None  # catalogue smaller than 4 blocks: plain path


def test_only_dot_product_models_are_listed() -> None:
    import inspect

    from recbole.model import sequential_recommender as seq

    dot_product = [spec.name for spec in MODEL_SPECS.values() if spec.dot_product]
    assert len(dot_product) >= 9
    for name in dot_product:
        source = inspect.getsource(getattr(seq, name).full_sort_predict)
        assert "self.item_embedding.weight" in source and "torch.matmul(" in source, name
        assert "output_bias" not in source and "normalize" not in source, name
        forward = inspect.signature(getattr(seq, name).forward).parameters
        assert ("item_seq_len" in forward) == (MODEL_SPECS[name].dot_product == "seq_and_len"), name
