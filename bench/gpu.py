"""The exact top-k on CUDA against the CPU: parity and throughput, in one command.

    bench/gpu.sh                                    # what to run on a CUDA machine
    python bench/gpu.py --items 20000 --budget 0.3  # a quick dry run; without CUDA the CPU half only

For each catalogue size, a synthetic SASRec (RecBole's defaults: window 50, hidden 64, 2 layers,
untrained weights as RecBole's initialiser makes them, the item table scaled so norms vary) is
stored as ``import_model.py`` stores a model (``artifact.write_files``) and loaded by ``Engine``
once on the CPU and once on CUDA:

* parity: the same batch of next-item queries (with ``exclude`` and ``candidates`` rows) and
  similar-item queries ranked on both devices; per row the same top-k scores position by position,
  and every item CUDA returns scores that on the CPU too (fp32, to ``--rtol``: the two devices
  round the transformer's arithmetic differently). Items may differ only where scores tie.
* throughput: sequences/s of ``Engine.rank`` (top-10, full-length histories) at each batch size,
  on the CPU (all its cores) and on CUDA, and on CUDA also the plain path (``full_sort_predict``
  and ``torch.topk`` over the whole [batch, items] matrix) for comparison.

On CUDA the engine ranks every batch with the chunked top-k, in one chunk while the batch's scores
fit ``engine.DEVICE_CHUNK_SCORES``, so parity and throughput are also measured with chunks small
enough that every batch is scored in several and their top-k merged (``chunked_always``).

Prints a table, exits 1 if any parity check fails, and writes JSON to ``--json`` (default
``$OUT/gpu.json`` where ``OUT`` is set). Needs no network and no BentoML: RecBole, torch, NumPy.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recbole_bento.core.artifact import DatasetStub, ServingConfig, load_artifact, write_files  # noqa: E402
from recbole_bento.core.blockwise import ChunkedTopK  # noqa: E402
from recbole_bento.core.engine import DEVICE_CHUNK_SCORES, Engine  # noqa: E402
from recbole_bento.core.models import spec_for  # noqa: E402
from recbole_bento.core.ranking import RankQuery, apply_masks  # noqa: E402

WINDOW = 50
STAND_IN = "cpu-as-cuda"
FORCED_CHUNK_SCORES = 1 << 24  # chunked_always: 64 MB of scores a chunk (batch 64: 262,144 items)
SASREC = {  # bench/make_large_fixture.py's model, with the fields a RecBole Config would add
    "model": "SASRec",
    "USER_ID_FIELD": "user_id",
    "ITEM_ID_FIELD": "item_id",
    "LIST_SUFFIX": "_list",
    "ITEM_LIST_LENGTH_FIELD": "item_length",
    "NEG_PREFIX": "neg_",
    "MAX_ITEM_LIST_LENGTH": WINDOW,
    "hidden_size": 64,
    "inner_size": 256,
    "n_layers": 2,
    "n_heads": 2,
    "hidden_dropout_prob": 0.5,
    "attn_dropout_prob": 0.5,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-12,
    "initializer_range": 0.02,
    "loss_type": "CE",
}


def synthetic_model(n_items: int, directory: Path, seed: int = 0) -> Path:
    """A stored SASRec over *n_items* items (plus RecBole's padding item 0) in *directory*."""
    directory.mkdir(parents=True)
    torch.manual_seed(seed)
    info = {
        "uid_field": "user_id",
        "iid_field": "item_id",
        "field2seqlen": {"item_id_list": WINDOW},
        "field2type": {
            "user_id": "TOKEN",
            "item_id": "TOKEN",
            "item_id_list": "TOKEN_SEQ",
            "item_length": "TOKEN",
        },
        "field_num": {"user_id": 2, "item_id": n_items + 1},
    }
    spec = spec_for("SASRec")
    config = ServingConfig({**SASREC, "device": torch.device("cpu")})
    model = spec.model_class()(config, DatasetStub(info, config))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    table = state["item_embedding.weight"]
    # norms from 0.5x to 2x: ranking must not rely on a flat table
    table.mul_(torch.empty(table.shape[0], 1).uniform_(0.5, 2.0))
    table[0] = 0
    counts = np.random.default_rng(seed).zipf(1.5, n_items + 1).astype(np.int64)
    tokens = ["[PAD]"] + [f"i{i}" for i in range(1, n_items + 1)]
    write_files(directory, spec, state, dict(SASREC), info, tokens, None, counts, {})
    return directory


def parity_queries(engine: Engine, batch: int, seed: int) -> list[RankQuery]:
    """Next-item rows of every length: plain, excluding their own best items (as *engine* ranks
    them), restricted to candidates (some of them among their best); then similar-item rows."""
    gen = torch.Generator().manual_seed(seed)
    n = engine.n_items
    out = [
        RankQuery(torch.randint(1, n, (1 + row * 7 % WINDOW,), generator=gen).tolist(), 10)
        for row in range(batch)
    ]
    best = [result.items for result in engine.rank(out)]
    for row, query in enumerate(out):
        if row % 4 == 1:
            query.exclude = best[row][:5]
        elif row % 4 == 2:
            query.candidates = best[row][3:8] + torch.randint(1, n, (100,), generator=gen).tolist()
    for row in range(8):
        out.append(RankQuery(torch.randint(1, n, (1 + row,), generator=gen).tolist(), 10, kind="similar"))
    return out


def reference_scores(engine: Engine, queries: list[RankQuery]) -> torch.Tensor:
    """[rows, items] masked scores on *engine* (the CPU): the model's for next-item rows, the
    cosine for similar-item rows."""
    rows = []
    with torch.inference_mode():
        for query in queries:
            if query.kind == "next":
                scores = engine.scores([query]).float()
            else:
                table = engine.unit
                q = torch.nn.functional.normalize(table[query.history].mean(0, keepdim=True), dim=1)
                scores = q @ table.T
            apply_masks(scores, [query])
            rows.append(scores[0])
    return torch.stack(rows)


def check_parity(cpu: Engine, gpu: Engine, queries: list[RankQuery], rtol: float) -> dict:
    """CUDA's answers against the CPU's, row by row (module docstring)."""
    scores = reference_scores(cpu, queries)
    want, got = cpu.rank(queries), gpu.rank(queries)
    failures, same_items, max_diff = [], 0, 0.0
    for row, (w, g) in enumerate(zip(want, got, strict=True)):
        same_items += w.items == g.items
        if len(w.scores) != len(g.scores):
            failures.append(f"row {row}: {len(g.scores)} items on CUDA, {len(w.scores)} on the CPU")
            continue
        for pos, (ws, gs, item) in enumerate(zip(w.scores, g.scores, g.items, strict=True)):
            tol = rtol * max(1.0, abs(ws))
            cpu_score = float(scores[row, item])
            max_diff = max(max_diff, abs(gs - ws), abs(cpu_score - gs))
            if abs(gs - ws) > tol or abs(cpu_score - gs) > tol:
                failures.append(f"row {row} ({queries[row].kind}) position {pos}: CUDA {item}={gs}, CPU {ws}")
                break
    return {
        "rows": len(queries),
        "rows_with_identical_items": int(same_items),
        "max_abs_score_diff": max_diff,
        "failures": failures[:5],
        "ok": not failures,
    }


def rate(call: Callable[[], object], batch: int, budget_s: float, sync: Callable[[], None]) -> dict:
    """Sequences/s and ms per call of *call* (one batch) sustained over *budget_s*."""
    for _ in range(3):
        call()
    sync()
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < budget_s:
        call()
        calls += 1
    sync()
    elapsed = time.perf_counter() - start
    return {"seq_s": round(calls * batch / elapsed, 1), "ms_per_batch": round(1000 * elapsed / calls, 3)}


def throughput(
    engine: Engine, batches: list[int], topk: int, budget_s: float, plain: bool, label: str | None = None
) -> list[dict]:
    device = engine.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(1)
    rows = []
    for batch in batches:
        queries = [
            RankQuery(torch.randint(1, engine.n_items, (WINDOW,), generator=gen).tolist(), topk)
            for _ in range(batch)
        ]
        row = {"device": label or str(device), "batch": batch, "path": "engine"}
        rows.append({**row, **rate(lambda q=queries: engine.rank(q), batch, budget_s, sync)})
        if plain:
            call = lambda q=queries: engine.plain_topk(q, topk)[1].cpu()  # noqa: E731
            rows.append({**row, "path": "plain", **rate(call, batch, budget_s, sync)})
    return rows


def chunked_stand_in(engine: Engine) -> Engine:
    """*engine* (on the CPU) with the exact scorers it would get on CUDA (``engine.exact_scorer``)."""
    if engine.block is not None:
        engine.block.scorer = ChunkedTopK(
            engine.block.scorer.table, engine.n_items, max_scores=DEVICE_CHUNK_SCORES
        )
    if engine.similar_block is not None:
        engine.similar_block = ChunkedTopK(engine.unit, engine.n_items, max_scores=DEVICE_CHUNK_SCORES)
    return engine


@contextlib.contextmanager
def chunked_always(engine: Engine) -> Iterator[None]:
    """*engine*'s exact scorers take every batch, however small, in chunks of at most
    ``FORCED_CHUNK_SCORES`` scores (so that the merge of several chunks runs too), while inside."""
    scorers = [s for s in (engine.block and engine.block.scorer, engine.similar_block) if s is not None]
    before = [(s.min_scores, s.max_scores) for s in scorers]
    for scorer in scorers:
        scorer.min_scores, scorer.max_scores = 0, FORCED_CHUNK_SCORES
    try:
        yield
    finally:
        for scorer, (low, high) in zip(scorers, before, strict=True):
            scorer.min_scores, scorer.max_scores = low, high


def scorer_name(engine: Engine) -> str:
    return type(engine.block.scorer).__name__ if engine.block is not None else "plain"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", default="100000,1000000", help="catalogue sizes, comma-separated")
    parser.add_argument("--batches", default="1,32,64")
    parser.add_argument("--topk", type=int, default=10)
    parser.add_argument("--budget", type=float, default=2.0, help="seconds per throughput figure")
    parser.add_argument("--rtol", type=float, default=1e-4, help="score tolerance across devices")
    parser.add_argument("--json", type=Path, default=None, help="default: $OUT/gpu.json where OUT is set")
    parser.add_argument(
        "--work", type=Path, default=None, help="where the synthetic models go (default: a temp dir)"
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    started = time.perf_counter()
    cuda = torch.cuda.is_available()
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "cpu_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if cuda else None,
    }
    print(json.dumps(env), flush=True)
    if not cuda:
        print(
            f"NO CUDA DEVICE: no CUDA figures; the CUDA half runs on the CPU as '{STAND_IN}' "
            "(a second CPU engine with the scorer CUDA gets), to check this script",
            flush=True,
        )
    batches = [int(b) for b in args.batches.split(",")]
    report: dict = {"env": env, "catalogues": []}
    ok = True
    target = args.json or (Path(os.environ["OUT"]) / "gpu.json" if os.environ.get("OUT") else None)
    with tempfile.TemporaryDirectory(prefix="recbole-bento-gpu-", dir=args.work) as work:
        for n_items in (int(n) for n in args.items.split(",")):
            entry = catalogue(n_items, Path(work), cuda, batches, args, lambda text: say(started, text))
            ok &= entry["parity"]["ok"] and entry["parity_chunked"]["ok"]
            report["catalogues"].append(entry)
            print(json.dumps(entry), flush=True)
            if target is not None:  # after each catalogue: what was measured survives a cut-off
                target.write_text(json.dumps(report, indent=1))
    report["total_s"] = round(time.perf_counter() - started, 1)
    print(table(report), flush=True)
    if target is not None:
        target.write_text(json.dumps(report, indent=1))
        print(f"wrote {target}", flush=True)
    if not ok:
        print("PARITY FAILED (see 'failures' above)", flush=True)
    return 0 if ok else 1


def say(started: float, text: str) -> None:
    print(f"[{time.perf_counter() - started:6.1f} s] {text}", flush=True)


def catalogue(
    n_items: int,
    work: Path,
    cuda: bool,
    batches: list[int],
    args: argparse.Namespace,
    log: Callable[[str], None],
) -> dict:
    """One catalogue size: make the model, load it on both sides, parity, then throughput."""
    log(f"{n_items:,} items: making the stored model")
    t0 = time.perf_counter()
    directory = synthetic_model(n_items, work / f"synth-{n_items}")
    entry: dict = {"items": n_items, "make_s": round(time.perf_counter() - t0, 1)}
    log("loading it on the CPU")
    cpu = Engine(load_artifact(directory), device="cpu")
    log("loading it on CUDA" if cuda else f"loading it again as '{STAND_IN}'")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        gpu = Engine(load_artifact(directory), device="cuda")
    else:  # the CUDA half's code, run on the CPU with the scorer CUDA gets
        gpu = chunked_stand_in(Engine(load_artifact(directory), device="cpu"))
    entry.update(cpu_path=scorer_name(cpu), cuda_path=scorer_name(gpu))
    log("parity")
    queries = parity_queries(cpu, 64, n_items)
    entry["parity"] = check_parity(cpu, gpu, queries, args.rtol)
    with chunked_always(gpu):
        entry["parity_chunked"] = check_parity(cpu, gpu, queries, args.rtol)
    verdict = "OK" if entry["parity"]["ok"] and entry["parity_chunked"]["ok"] else "FAILED"
    log(f"parity {verdict}; throughput on the CPU")
    rows = throughput(cpu, batches, args.topk, args.budget, plain=False)
    log("throughput on CUDA" if cuda else f"throughput as '{STAND_IN}'")
    label = None if cuda else STAND_IN
    rows += throughput(gpu, batches, args.topk, args.budget, plain=True, label=label)
    with chunked_always(gpu):
        forced = throughput(gpu, batches, args.topk, args.budget, plain=False, label=label)
    rows += [{**row, "path": "chunked"} for row in forced]
    entry["throughput"] = rows
    if cuda:
        entry["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
        del gpu
        torch.cuda.empty_cache()
    return entry


def table(report: dict) -> str:
    """The throughput rows as a markdown table, parity per catalogue under it."""
    lines = ["| items | device | path | batch | seq/s | ms/batch |", "|---:|---|---|---:|---:|---:|"]
    notes = []
    for entry in report["catalogues"]:
        for row in entry["throughput"]:
            path = "full_sort_predict + topk"
            if row["path"] == "chunked":
                path = "Engine.rank (ChunkedTopK on every batch, 2^24-score chunks)"
            elif row["path"] == "engine":
                path = "Engine.rank, as served" + (" (BlockTopK)" if row["device"] == "cpu" else "")
            lines.append(
                f"| {entry['items']:,} | {row['device']} | {path} | {row['batch']} | {row['seq_s']:,.1f} "
                f"| {row['ms_per_batch']} |"
            )
        p, c = entry["parity"], entry["parity_chunked"]
        peak = f"; CUDA peak {entry['cuda_peak_mb']} MB" if "cuda_peak_mb" in entry else f" ({STAND_IN})"
        notes.append(
            f"parity {entry['items']:,} items: {'OK' if p['ok'] else 'FAILED'} ({p['rows']} rows, "
            f"{p['rows_with_identical_items']} with identical item lists, largest score difference "
            f"{p['max_abs_score_diff']:.2e}); chunked on every batch: {'OK' if c['ok'] else 'FAILED'} "
            f"({c['rows_with_identical_items']} identical, "
            f"largest difference {c['max_abs_score_diff']:.2e}){peak}"
        )
    return "\n".join(lines + [""] + notes + [f"total {report['total_s']} s"])


if __name__ == "__main__":
    raise SystemExit(main())
