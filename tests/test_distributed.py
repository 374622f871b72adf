"""Several processes through torchrun (params `distributed.nproc_per_node`, ktpipe/distributed.py).

A tiny project (the tiny random-init CLIP, 5 concepts) runs the stages as dvc.yaml runs them,
once in one process and once with `distributed.nproc_per_node: 2`, where the stage starts itself
again under torchrun and its two processes join a gloo group on the CPU (one thread each, as the
one-process run here):

- inversion shares out the concepts and writes the one-process run's bytes;
- fine-tuning runs DDP over each batch, for an objective that averages over images (Eq. 2) and one
  that contrasts the batch's images with each other (the authors' InfoNCE, with distillation): the
  same loss at every step, and weights that differ only by the rounding of the gradient average;
- evaluation shares out the image batches and gathers the embeddings: the one-process run's
  embeddings (bit for bit) and metrics.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_project, read_params, run_stage, run_stage_here, write_params

pytestmark = pytest.mark.slow

CONCEPTS = ["blicket", "dax", "wug", "lantern", "clover"]
RECIPES = {"paper": {"rehearsal": False},  # Eq. 2: a mean over the batch's images
           "authors": {"loss": "authors", "rehearsal": True, "kd_weight": 0.5}}  # contrasts the batch's images


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_checkpoint) -> Path:
    """The project with two params files: one.yaml (one process) and two.yaml (two)."""
    root = make_project(tmp_path_factory.mktemp("distributed") / "project", tiny_checkpoint)
    model = read_params(root)["model"]
    write_params(root, concepts={"names": CONCEPTS}, invert={"steps": 4, "samples": 3},
                 finetune={"epochs": 2, "batch_size": 5}, evaluate={"batch_size": 7},
                 families={"tiny": {"lr": 1.0e-4, "model": model, "pretrain": None, "recipes": RECIPES}})
    for args in (("captions", "captions/demo.yaml", "captions/generated.yaml", "data/concepts", "data/world.json",
                  "data/known.json"), ("data", "data/world.json", "data/eval")):
        result = run_stage_here(root, *args)
        assert result.returncode == 0, result.stderr
    shutil.copy(root / "params.yaml", root / "one.yaml")
    write_params(root, distributed={"nproc_per_node": 2})
    (root / "params.yaml").rename(root / "two.yaml")
    return root


def run_both(project: Path, stage: str, *args: str) -> str:
    """The stage in one process (in-process, one.yaml) into one/..., then in two (two.yaml, a subprocess
    as dvc.yaml runs it) into two/...; `{}` in an argument is the run's folder. Returns the second's stderr."""
    one = run_stage_here(project, stage, "--params", "one.yaml", *(a.format("one") for a in args))
    assert one.returncode == 0, one.stderr
    two = run_stage(project, stage, "--params", "two.yaml", *(a.format("two") for a in args))
    assert two.returncode == 0, two.stdout + two.stderr
    assert "running stages." in two.stderr and "in 2 processes" in two.stderr, two.stderr
    return two.stderr


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def inverted(project) -> Path:
    run_both(project, "invert", "data/concepts", "{}/inverted", "--store", "", "--timing", "{}/invert.json")
    return project


def test_inversion_shares_out_the_concepts_and_writes_one_process_bytes(inverted):
    one, two = folder_bytes(inverted / "one" / "inverted"), folder_bytes(inverted / "two" / "inverted")
    assert sorted({name.split("/")[0] for name in one}) == sorted(CONCEPTS)
    assert one == two
    timing = json.loads((inverted / "two" / "invert.json").read_text())["concepts"]
    assert list(timing) == CONCEPTS  # every concept, in params order, from both ranks
    assert {name: entry["rank"] for name, entry in timing.items()} == {
        "blicket": 0, "dax": 1, "wug": 0, "lantern": 1, "clover": 0}


@pytest.fixture(scope="module")
def finetuned(inverted) -> Path:
    run_both(inverted, "finetune_family", "--family", "tiny", "data/concepts", "one/inverted", "{}/models",
             "{}/logs")
    return inverted


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v.float() for path in sorted(folder.glob("*.safetensors")) for k, v in load_file(path).items()}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_ddp_fine_tuning_learns_what_one_process_learns(finetuned, tiny_checkpoint, recipe):
    logs = {run: json.loads((finetuned / run / "logs" / f"{recipe}.json").read_text())["log"] for run in ("one", "two")}
    assert len(logs["one"]) == len(logs["two"]) == {"paper": 2 * 2, "authors": 2 * 3}[recipe]  # batches of 5 of 9
    # (3 novel concepts x 3 images) or 15 images (and the 2 known concepts') over 2 epochs: a last batch of 4 or 5
    for a, b in zip(logs["one"], logs["two"]):
        assert a["loss"] > 0 and b["loss"] == pytest.approx(a["loss"], abs=2e-6)
        if "kd_loss" in a:
            assert b["kd_loss"] == pytest.approx(a["kd_loss"], rel=1e-3, abs=1e-9)
    base = weights(tiny_checkpoint)
    one, two = weights(finetuned / "one" / "models" / recipe), weights(finetuned / "two" / "models" / recipe)
    moved = sum(((one[k] - base[k]) ** 2).sum() for k in one).sqrt()
    apart = sum(((one[k] - two[k]) ** 2).sum() for k in one).sqrt()
    # Adam turns a gradient's rounding into a step of up to lr where the gradient is near zero; a rank
    # training on its half of each batch alone lands as far from the one-process weights as they moved
    assert moved > 0.01 and apart < 0.03 * moved, (float(moved), float(apart))


def test_ddp_refuses_an_objective_it_cannot_share_out(monkeypatch, tiny_checkpoint):
    from ktpipe import distributed
    from ktpipe.models import OpenClipModel
    from ktpipe.params import FinetuneParams, ParamsError
    from ktpipe.transfer.finetune import finetune

    model = OpenClipModel.load(f"local-dir:{tiny_checkpoint}")
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with pytest.raises(ParamsError, match="'mlm' cannot be shared out.*'distributed.nproc_per_node' to 1"):
        finetune(model, torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 0, 1]), ["A a is b.", "A c is d."],
                 FinetuneParams(loss="mlm"), 1e-4)


def test_distributed_evaluation_gathers_one_process_embeddings_and_metrics(finetuned):
    store = finetuned / ".ktpipe" / "store" / "embed"
    shutil.rmtree(store, ignore_errors=True)
    one = run_stage_here(finetuned, "evaluate_family", "--params", "one.yaml", "--family", "tiny", "one/models",
                         "data/eval", "data/concepts", "one/eval")
    assert one.returncode == 0, one.stderr
    store.rename(finetuned / "one" / "store")
    two = run_stage(finetuned, "evaluate_family", "--params", "two.yaml", "--family", "tiny", "one/models",
                    "data/eval", "data/concepts", "two/eval")
    assert two.returncode == 0, two.stderr
    # the image embeddings each run stored: the same entries, bit for bit (3 models x 2 sets of 22 images,
    # 4 batches of 7 shared out over 2 processes)
    assert len(list((finetuned / "one" / "store").glob("*.safetensors"))) == 6
    assert folder_bytes(finetuned / "one" / "store") == folder_bytes(store)
    for model in ("baseline", *RECIPES):
        a, b = (json.loads((finetuned / run / "eval" / f"{model}.json").read_text()) for run in ("one", "two"))
        assert a["metrics"] == b["metrics"] and a["metrics"]["test"]["classification"]["n_images"] == 22
    assert two.stdout.count("tiny baseline on test") == 1  # rank 0 tells; rank 1 is silent


@pytest.mark.parametrize("world", [1, 2, 3])
def test_ranks_share_out_every_batch_once_and_gather_them_in_order(monkeypatch, world):
    from ktpipe import distributed

    n, batch_size = 10, 3  # batches [0:3], [3:6], [6:9], [9:10]
    shares, slices = {}, []
    for rank in range(world):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        monkeypatch.setattr(distributed, "world_size", lambda: world)
        shares[rank] = distributed.my_chunks(n, batch_size)
        slices.append(distributed.shard(n))
    assert sorted((c for share in shares.values() for c in share), key=lambda c: c.start) == [
        range(0, 3), range(3, 6), range(6, 9), range(9, 10)]
    assert [list(range(n))[s] for s in slices] == [list(p) for p in torch.arange(n).tensor_split(world)]
    # each rank's results of its batches, gathered: every batch in batch order
    results = {rank: [f"batch {c.start // batch_size}" for c in share] for rank, share in shares.items()}
    monkeypatch.setattr(distributed, "active", lambda: world > 1)
    monkeypatch.setattr(distributed, "gather_objects", lambda mine: [results[r] for r in range(world)])
    assert distributed.gather_chunks(results[0]) == ["batch 0", "batch 1", "batch 2", "batch 3"]
