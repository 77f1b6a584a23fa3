"""Exact top-k without the [batch, n_items] score matrix, for models that score by a dot product.

For SASRec, GRU4Rec, NARM, ... RecBole's ``full_sort_predict`` is::

    seq_output = self.forward(item_seq, item_seq_len)               # [B, H]
    scores = torch.matmul(seq_output, self.item_embedding.weight.T)  # [B, n_items]

With a large catalogue the naive path writes that B x N matrix (128 MB at B=32, N=1M) and reads
it again in ``torch.topk``, whose CPU kernel copies every row into a (value, index) buffer. Here
the table is scored in cache-sized blocks with the *same* matmul, and each block is reduced at
once to the maximum of every chunk of ``chunk`` consecutive items (a vectorised ``amax``):

1. Pass 1, per block: ``scores = q @ E[block].T`` (into a reused buffer), mask, chunk maxima.
   Blocks are shared out to one thread per CPU. Where the CPU multiplies bfloat16 natively
   (AVX512-BF16, AMX) pass 1 runs on a bfloat16 copy of the table: half the bytes, 2-3x the rate.
2. Selection with proven error bounds: a pass-1 score is within ``slack = c * |q| * |e|`` of the
   fp32 score (c from the fp32 / bfloat16 rounding analysis, |e| the largest item norm of the
   chunk). The k-th largest ``max - slack`` over chunks is a lower bound L on the k-th best fp32
   score, and a chunk whose ``max + slack`` is below L cannot hold a top-k item. The others are
   kept: typically the k best chunks and a few near them.
3. Pass 2: fp32 ``q @ E[items].T`` over the union of the kept chunks (the whole batch at once, as
   full_sort_predict does), mask, ``torch.topk``.

The answer is the exact top-k of fp32 dot products computed as the model computes them: nothing is
approximated, pruned by heuristics or skipped. The scores can differ from the plain path's only by
fp32 rounding (two matmul shapes; with MKL and H=64 they agree bit for bit in practice), and so
the order only where scores tie to within rounding. The engine also compares both paths on probe
queries at start-up and keeps the plain path if they ever disagree.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from .ranking import NEG_INF, BatchMask, FilterCompiler, RankQuery


class BlockTopK:
    """Exact masked top-k of ``q @ table[:n_items].T`` without materialising the score matrix.

    Masks are ``ranking.BatchMask``'s, applied to every block in pass 1 and to the gathered items
    in pass 2. Pass 1 may run in bfloat16 (*low_precision*; default:
    where the CPU multiplies bfloat16 natively); pass 2 is always fp32.
    """

    def __init__(
        self,
        table: torch.Tensor,
        n_items: int,
        block_items: int = 8192,
        chunk: int | None = None,
        threads: int | None = None,
        low_precision: bool | None = None,
        min_scores: int = 0,
    ) -> None:
        if chunk is None:  # 64 items, fewer for small blocks (at least 16 chunks a block)
            chunk = 64
            while chunk > 1 and chunk * 16 > block_items:
                chunk //= 2
        self.table = table
        self.n_items = n_items
        self.min_scores = min_scores  # smaller batches (batch x n_items) take the plain path
        self.block = max(chunk, block_items - block_items % chunk)  # whole chunks
        self.chunk = chunk
        self.n_chunks = -(-n_items // chunk)
        # An allow-list this short is scored directly: a gather of at most a sixteenth of the table
        # costs far less than pass 1 over all of it (a 1%-selective filter at 1M items included).
        self.direct_items = max(self.block, n_items // 16)
        self._offsets = torch.arange(chunk, device=table.device)
        # Error bounds (see _deviation): fp32 dot products of length H are within gamma_H * sum|q_i e_i|
        # of exact in any summation order; |e| is bounded per chunk by its largest item norm.
        dim = table.shape[1]
        self._gamma = dim * 2.0**-24 / (1 - dim * 2.0**-24)
        self._chunk_norm = self._per_chunk(lambda rows: torch.linalg.vector_norm(rows.double(), dim=1))
        if low_precision is None:
            low_precision = table.device.type == "cpu" and native_bf16()
        # Pass 1's bfloat16 weights, one per block: oneDNN-packed where possible (_bf16_blocks).
        self.low = _bf16_blocks(table[:n_items], self.block) if low_precision else None
        if self.low is not None:  # per chunk, the largest |e - bfloat16(e)|
            self._chunk_resid = self._per_chunk(
                lambda rows: torch.linalg.vector_norm(rows.double() - rows.to(torch.bfloat16).double(), dim=1)
            )
        self.batches = 0  # batches with a bfloat16 pass 1,
        self.fallbacks = 0  # of which too loose (too many chunks in reach), run again in fp32
        # Pass 1 runs on this many threads, each op single-threaded when torch's intra-op threads
        # are 1 (RECBOLE_BENTO_TORCH_THREADS=1): no OpenMP barrier to stall on a busy machine.
        self.threads = threads if threads is not None else default_threads()
        self._pool: ThreadPoolExecutor | None = None

    def _per_chunk(self, row_values: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """[n_chunks] fp32: the largest of row_values(table rows) in each chunk (0 past the end),
        computed 64k rows at a time (a float64 copy of a 1M-row table would be 512 MB)."""
        out = torch.zeros(self.n_chunks * self.chunk, dtype=torch.float64, device=self.table.device)
        for start in range(0, self.n_items, 65536):
            end = min(start + 65536, self.n_items)
            out[start:end] = row_values(self.table[start:end])
        return out.view(self.n_chunks, self.chunk).amax(1).float()

    def _deviation(self, q: torch.Tensor, maxima: torch.Tensor, low: bool) -> torch.Tensor:
        """[P, n_chunks]: how far the fp32 score s2 that pass 2 computes for an item may lie from its
        pass-1 score s1, for every item of the chunk, doubled as a safety margin.

        fp32 pass 1: |s1 - s2| <= 2 gamma_H |q| |e|  (Cauchy-Schwarz on sum |q_i e_i|).
        bfloat16 pass 1 on q' = bf16(q), e' = bf16(e), fp32 accumulation, result rounded to bfloat16
        (unit roundoff u = 2**-8): |s1 - s2| <= u |s1| + |q'| |e - e'| + |q - q'| |e| + 2 gamma_H |q'| |e'|,
        with the residuals |e - e'| measured per chunk at start-up and |q - q'| per query. For the
        items of a chunk, |s1| <= |m| where it matters (s1 near the chunk maximum m)."""
        qf = q.float()
        if not low:
            return 2 * 2 * self._gamma * torch.linalg.vector_norm(qf, dim=1, keepdim=True) * self._chunk_norm
        u = 2.0**-8
        qb = qf.to(torch.bfloat16).float()
        nq = torch.linalg.vector_norm(qb, dim=1, keepdim=True)
        dq = torch.linalg.vector_norm(qf - qb, dim=1, keepdim=True)
        a = nq * self._chunk_resid + dq * self._chunk_norm + 2 * self._gamma * (1 + u) * nq * self._chunk_norm
        return 2 * (u * maxima.abs().nan_to_num(posinf=0.0) + a)

    # ------------------------------------------------------------------ pass 1

    def _chunk_maxima(self, q: torch.Tensor, mask: BatchMask, low: bool) -> torch.Tensor:
        """[B, n_chunks] fp32: the largest masked pass-1 score in every chunk of every row. The
        blocks are shared out to ``self.threads`` threads (each writes its own columns)."""
        n, block = self.n_items, self.block
        maxima = torch.empty((q.shape[0], self.n_chunks), dtype=torch.float32, device=q.device)
        if low and self.low is not None:
            q, weights = q.to(torch.bfloat16), self.low
        else:
            weights = _TableBlocks(self.table, block)
        starts = list(range(0, n, block))
        parts = min(self.threads, len(starts))
        args = (q, weights, maxima, mask)
        if parts <= 1:
            self._blocks(starts, *args)
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="block-topk")
            size = -(-len(starts) // parts)
            futures = [
                self._pool.submit(self._blocks, starts[i : i + size], *args)
                for i in range(0, len(starts), size)
            ]
            for future in futures:
                future.result()
        return maxima

    def _blocks(
        self,
        starts: list[int],
        q: torch.Tensor,
        weights: _Blocks,
        maxima: torch.Tensor,
        mask: BatchMask,
    ) -> None:
        """Pass 1 over the blocks at *starts*: score, mask, chunk maxima into *maxima*."""
        n, block, chunk = self.n_items, self.block, self.chunk
        batch = q.shape[0]
        with torch.inference_mode():  # thread-local: a pool thread starts outside it
            buf = torch.empty((batch, block), dtype=torch.float32, device=q.device)
            low = (
                torch.empty((batch, block), dtype=q.dtype, device=q.device) if q.dtype != buf.dtype else None
            )
            for start in starts:
                end = min(start + block, n)
                width = end - start
                if width == block:
                    if low is None:
                        scores = weights.mm(q, start // block, out=buf)
                    else:  # bfloat16 product; fp32 for the masks and maxima (amax is 3x slower in bf16)
                        scores = buf
                        scores.copy_(weights.mm(q, start // block, out=low))
                else:  # the tail: pad to whole chunks with -inf
                    padded = -(-width // chunk) * chunk
                    scores = torch.full((batch, padded), NEG_INF, dtype=torch.float32, device=q.device)
                    scores[:, :width] = weights.mm(q, start // block)
                mask.apply(scores, start)
                first = start // chunk
                last = first + scores.shape[1] // chunk
                torch.amax(scores.view(batch, -1, chunk), dim=2, out=maxima[:, first:last])

    def _select(self, q: torch.Tensor, maxima: torch.Tensor, kc: int, low: bool) -> torch.Tensor | None:
        """[P, w] chunk ids per row (-1 = none) that contain every item of the row's top-k, or None
        when the bounds leave too many. Every item of a chunk scores (fp32) within +-slack of its
        pass-1 score, so: the chunk's best item scores at least m - slack (m: the chunk's pass-1
        maximum), the k-th largest m - slack over chunks is a lower bound L on the k-th best score
        (k distinct items reach it), and a chunk whose m + slack is below L holds no top-k item."""
        slack = self._deviation(q, maxima, low)
        floor = torch.topk(maxima - slack, kc, dim=1).values[:, -1:]  # L, [P, 1]
        reach = (maxima + slack).masked_fill(maxima + slack < floor, NEG_INF)
        width = int((reach > NEG_INF).sum(1).max())
        if width > 4 * kc + 16:
            return None
        top = torch.topk(reach, max(width, 1), dim=1)
        return top.indices.masked_fill(top.values == NEG_INF, -1)

    # ------------------------------------------------------------------ pass 2

    def topk(
        self,
        q: torch.Tensor,
        queries: Sequence[RankQuery],
        k: int,
        force: bool = False,
        compile_filter: FilterCompiler | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(values, indices), each [B, <=k] and sorted like torch.topk, or None when the batch is
        better served by the plain path: a score matrix under *min_scores* (cheap to materialise;
        unless *force*), or a top-k so large that most of the table would be re-scored.

        A row restricted to an allow-list (``candidates``, ``filters``) of at most
        ``direct_items`` items skips pass 1: pass 2 scores exactly its allowed items. Every other
        row goes through pass 1 with its masks."""
        batch, device, chunk = q.shape[0], q.device, self.chunk
        if not force and batch * self.n_items < self.min_scores:
            return None
        k = min(k, self.n_items)
        kc = min(k, self.n_chunks)
        if kc * chunk > self.n_items // 2:  # one row alone would re-score half the table
            return None
        mask = BatchMask(queries, self.n_items, device, compile_filter)
        direct = {row: ids for row, ids in mask.allowed_ids.items() if ids.numel() <= self.direct_items}
        scan_rows = [r for r in range(batch) if r not in direct]
        picked = None
        if scan_rows:
            rows = torch.tensor(scan_rows, device=device)
            if self.low is not None:
                picked = self._select(q[rows], self._chunk_maxima(q, mask, low=True)[rows], kc, True)
                self.batches += 1
                self.fallbacks += picked is None
                if self.fallbacks > 50 and self.fallbacks > self.batches // 5:
                    self.low = None  # this model's norms make the bfloat16 bounds too loose: fp32 only
            if picked is None:
                picked = self._select(q[rows], self._chunk_maxima(q, mask, low=False)[rows], kc, False)
            if picked is None:
                return None  # too many near-ties: let the plain path decide
        # per row, the item ids to re-score: the items of its picked chunks, or its allowed items
        width = max([picked.shape[1] * chunk if picked is not None else 0, *map(len, direct.values()), 1])
        ids = torch.full((batch, width), -1, dtype=torch.long, device=device)
        if picked is not None:
            items = picked.unsqueeze(2) * chunk + self._offsets
            items = items.masked_fill((picked < 0).unsqueeze(2) | (items >= self.n_items), -1)
            ids[rows, : items.shape[1] * chunk] = items.reshape(len(scan_rows), -1)
        for row, allowed_ids in direct.items():
            ids[row, : allowed_ids.numel()] = allowed_ids
        return rescore(q, self.table, ids, mask, k, max_items=self.n_items // 2)


def rescore(
    q: torch.Tensor,
    table: torch.Tensor,
    ids: torch.Tensor,
    mask: BatchMask,
    k: int,
    max_items: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Row r's exact top-k among its own items ``ids[r]`` ([B, width], -1 = none): fp32
    ``q @ table[items].T`` over the union of the rows' items (the whole batch in one product, as
    full_sort_predict does), masked, ``torch.topk``. None when the union exceeds *max_items*."""
    union = torch.unique(ids[ids >= 0])
    if max_items is not None and union.numel() > max_items:
        return None
    scores = torch.mm(q, table[union].T)  # [B, U]: fp32 dot products, as full_sort_predict's
    cols = torch.searchsorted(union, ids.clamp(min=0)).clamp(max=max(union.numel() - 1, 0))
    values = scores.gather(1, cols) if union.numel() else torch.empty_like(ids, dtype=q.dtype)
    values = values.masked_fill(mask.blocked(ids), NEG_INF)
    top_values, pos = torch.topk(values, min(k, ids.shape[1]), dim=1)
    return top_values, ids.gather(1, pos)


class _TableBlocks:
    """A table, block by block: ``mm(q, i, out)`` returns ``q @ table[block i].T``, written into
    the buffer *out* where given (the packed blocks below may return a new tensor instead)."""

    def __init__(self, table: torch.Tensor, block: int) -> None:
        self.table, self.block = table, block

    def mm(self, q: torch.Tensor, i: int, out: torch.Tensor | None = None) -> torch.Tensor:
        rows = self.table[i * self.block : (i + 1) * self.block]
        return torch.mm(q, rows.T) if out is None else torch.mm(q, rows.T, out=out)


class _PackedBlocks:
    """bfloat16 blocks in oneDNN's pre-packed linear-weight layout, the one torch.compile's CPU
    freezing pass gives linear layers: the weight is reordered once here instead of on every
    product. Same products as ``torch.mm`` bit for bit (checked at build), at 1.3-1.8x its speed
    for batches of 8-64 x 8,192 items x 64 (bench/: 1M items, one thread, AVX512-BF16)."""

    def __init__(self, blocks: list[torch.Tensor]) -> None:
        self.blocks = blocks

    def mm(self, q: torch.Tensor, i: int, out: torch.Tensor | None = None) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(q, self.blocks[i], None, "none", [], "")


_Blocks = _TableBlocks | _PackedBlocks
_PACKED_FOR_BATCH = 32  # oneDNN's layout hint; products at other batch sizes are as fast (measured)


def _bf16_blocks(table: torch.Tensor, block: int) -> _Blocks:
    """The table in bfloat16, block by block: packed for oneDNN where this torch can and the packed
    product equals torch.mm's on probes, else plain bfloat16 slices."""
    low = table.to(torch.bfloat16)
    plain = _TableBlocks(low, block)
    if table.device.type != "cpu":
        return plain
    try:
        packed = _PackedBlocks(
            [
                torch.ops.mkldnn._reorder_linear_weight(low[i : i + block].contiguous(), _PACKED_FOR_BATCH)
                for i in range(0, low.shape[0], block)
            ]
        )
        gen = torch.Generator().manual_seed(0)
        for batch in (1, 5, 32):
            q = torch.randn(batch, low.shape[1], generator=gen).to(torch.bfloat16)
            for i in {0, len(packed.blocks) // 2, len(packed.blocks) - 1}:
                if not torch.equal(packed.mm(q, i), plain.mm(q, i)):
                    return plain
    except (AttributeError, RuntimeError):  # no such op in this torch build, or not for this layout
        return plain
    return packed


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX); Linux only."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def default_threads() -> int:
    """The CPUs this process may run on, divided by torch's intra-op threads (at least 1)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus // max(1, torch.get_num_threads()))


def same_topk(
    values: torch.Tensor,
    items: torch.Tensor,
    ref_values: torch.Tensor,
    row_scores: torch.Tensor,
    rtol: float = 1e-5,
) -> bool:
    """One row of a top-k answer (-inf entries dropped) against the plain path's: the same scores
    position by position, and each returned item really scores that (*row_scores*: the row's
    masked full scores), both to within *rtol*. Items may differ only where scores tie."""
    keep, ref_keep = values > NEG_INF, ref_values > NEG_INF
    values, items, ref_values = values[keep], items[keep], ref_values[ref_keep]
    if values.numel() != ref_values.numel():
        return False
    tol = rtol * ref_values.abs().clamp(min=1.0)
    return bool(
        ((values - ref_values).abs() <= tol).all() and ((row_scores[items] - values).abs() <= tol).all()
    )


class ChunkedTopK:
    """Exact masked top-k of ``q @ table[:n_items].T`` on an accelerator: the catalogue in column
    chunks of ``max_scores // batch`` items (the whole catalogue where that fits), each chunk's fp32
    scores masked and cut to its own top-k, then the chunks' top-k merged (the k best items overall
    are among the k best of their own chunk).

    No bounds and no second pass, unlike ``BlockTopK``: a GPU scores a [B, chunk] block faster than
    the host could decide which blocks to skip, and ``torch.topk`` there is fast. Chunking only keeps
    the score matrix to *max_scores*; each chunk costs its own launches, a host sync (the masks) and
    a merge, so chunks are as wide as that allows, and a batch whose whole matrix stays under
    *min_scores* is left to the plain path (``topk`` declines it, as ``BlockTopK``'s does). Same
    interface as ``BlockTopK`` (``topk``, ``n_items``, ``min_scores``)."""

    def __init__(
        self, table: torch.Tensor, n_items: int, max_scores: int = 1 << 30, min_scores: int = 0
    ) -> None:
        if max_scores <= 0:
            raise ValueError(f"max_scores must be positive, not {max_scores}")
        self.table = table
        self.n_items = n_items
        self.max_scores = max_scores
        self.min_scores = min_scores  # smaller batches (batch x n_items) take the plain path

    def topk(
        self,
        q: torch.Tensor,
        queries: Sequence[RankQuery],
        k: int,
        force: bool = False,
        compile_filter: FilterCompiler | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(values, indices), each [B, k] and sorted like torch.topk (masked items score -inf, as
        in the plain path); None for a batch under ``min_scores`` unless *force*."""
        if not force and len(queries) * self.n_items < self.min_scores:
            return None
        k = min(k, self.n_items)
        mask = BatchMask(queries, self.n_items, q.device, compile_filter)
        chunk = max(1, self.max_scores // max(1, q.shape[0]))
        values, ids = [], []
        for start in range(0, self.n_items, chunk):
            end = min(start + chunk, self.n_items)
            scores = torch.mm(q, self.table[start:end].T)  # fp32, as full_sort_predict's product
            mask.apply(scores, start)
            top = torch.topk(scores, min(k, end - start), dim=1)
            values.append(top.values)
            ids.append(top.indices + start)
        if len(values) == 1:
            return values[0], ids[0]
        merged = torch.topk(torch.cat(values, dim=1), k, dim=1)
        return merged.values, torch.cat(ids, dim=1).gather(1, merged.indices)
