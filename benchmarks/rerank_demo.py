"""Retrieval with a cross-encoder on the demo: `rerank` (a dual encoder's top-k candidates rescored)
against `all_pairs` (every image with every caption), recall and ITM passes of each.

Runs on the outputs of `dvc repro` (the demo ViLT family and the demo CLIP): the cross-encoder
scores one of the demo's retrieval sets in data/eval, once with every pair and once per k with
the candidates the dual encoder proposes. Prints Recall@1/5/10 in both directions, the pairs
the cross-encoder scored, the wall time, and each rerank's largest recall gap to all pairs.

    python benchmarks/rerank_demo.py                                   # the fine-tuned demo ViLT, test_captions
    python benchmarks/rerank_demo.py --cross models/vilt/baseline --proposer models/baseline
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from ktpipe.concepts import read_concepts
from ktpipe.datasets import load_eval_set
from ktpipe.eval.base import TaskInput
from ktpipe.eval.retrieval import Retrieval
from ktpipe.models import load_model
from ktpipe.params import DatasetParams, ModelParams, RerankParams, load_params

RECALLS = ["t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="the project's params file")
    parser.add_argument("--family", default="vilt", help="the cross-encoder's model family (params `families`)")
    parser.add_argument("--cross", default="models/vilt/paper", help="cross-encoder checkpoint folder")
    parser.add_argument("--proposer", default="models/paper", help="demo CLIP checkpoint folder that proposes")
    parser.add_argument("--set", dest="set_name", default="test_captions", help="retrieval set in data/eval")
    parser.add_argument("--k", type=int, nargs="+", default=[4, 8, 16], help="candidates per query")
    parser.add_argument("--eval-dir", default="data/eval")
    parser.add_argument("--concepts-dir", default="data/concepts")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    params = load_params(args.params, args.family)
    manifest = load_eval_set(Path(args.eval_dir), args.set_name)
    concepts = read_concepts(Path(args.concepts_dir), params.concepts.names)
    model = load_model(params.model.backend, f"local-dir:{args.cross}", None, "cpu")
    proposer = ModelParams(backend="demo", name=f"local-dir:{args.proposer}", device="cpu")
    base = DatasetParams(task="retrieval", format="demo", split="test")
    rows = []
    for k in [None, *args.k]:
        spec = dataclasses.replace(base, rerank=None if k is None else RerankParams(k=k, model=proposer))
        data = TaskInput(args.set_name, manifest, spec, concepts, [], [], params.evaluate)
        start = time.perf_counter()
        with torch.no_grad():
            metrics = Retrieval().evaluate(model, data, progress=False)
        rows.append({"mode": "all_pairs" if k is None else "rerank", "k": k, "pairs": int(metrics["pairs_scored"]),
                     "seconds": round(time.perf_counter() - start, 1), **{m: metrics[m] for m in RECALLS}})
    full = rows[0]
    print(f"{args.cross} on {args.set_name} ({len(manifest)} images); rerank candidates from {args.proposer}")
    print("| mode | k | ITM pairs | fewer | s | " + " | ".join(RECALLS) + " | largest gap (pts) |")
    print("|---|---|---|---|---|" + "---|" * len(RECALLS) + "---|")
    for row in rows:
        gap = max(abs(row[m] - full[m]) for m in RECALLS) * 100
        cells = " | ".join(f"{100 * row[m]:.1f}" for m in RECALLS)
        print(f"| {row['mode']} | {row['k'] or '-'} | {row['pairs']} | {full['pairs'] / row['pairs']:.1f}x | "
              f"{row['seconds']} | {cells} | {gap:.1f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
