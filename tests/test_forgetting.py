"""Forgetting controls beyond the paper: L2-SP (`finetune.l2sp_weight`, a pull toward the base
weights) and WiSE-FT (`evaluate.wise_alphas`, the fine-tuned weights moved back toward the base
model's after training, ktpipe/transfer/wise.py)."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from conftest import TINY_ARCH, write_params
from ktpipe.eval import run_evaluate
from ktpipe.models import OpenClipModel
from ktpipe.params import FinetuneParams, ParamsError, load_params
from ktpipe.transfer.finetune import finetune
from ktpipe.transfer.wise import interpolate, load_wise

CAPTIONS = ["A blicket is a red circle.", "A dax is a blue square."]


def tiny(seed: int) -> OpenClipModel:
    torch.manual_seed(seed)
    return OpenClipModel.from_config(copy.deepcopy(TINY_ARCH))


def test_wise_ft_at_alpha_0_and_1_is_the_base_and_the_fine_tuned_model_exactly():
    base, tuned = tiny(0), tiny(1)
    ends = {alpha: {k: v.clone() for k, v in load_wise(tiny(2), base.module.state_dict(), tuned.module.state_dict(),
                                                        alpha).module.state_dict().items()} for alpha in (0.0, 0.5, 1.0)}
    for key, value in base.module.state_dict().items():
        assert torch.equal(ends[0.0][key], value)
        assert torch.equal(ends[1.0][key], tuned.module.state_dict()[key])
        if value.is_floating_point() and not torch.equal(value, tuned.module.state_dict()[key]):
            assert torch.allclose(ends[0.5][key], (value + tuned.module.state_dict()[key]) / 2, atol=1e-6)
    assert torch.equal(tuned.module.state_dict()["logit_scale"], tiny(1).module.state_dict()["logit_scale"])  # untouched
    with pytest.raises(ValueError, match="one architecture"):
        interpolate({"a": torch.zeros(1)}, {"b": torch.zeros(1)}, 0.5)


@pytest.mark.parametrize("backend", [None, "aot_eager"])  # with compiled towers too (evaluate.compile)
def test_evaluation_at_wise_alphas_0_and_1_scores_the_base_and_the_recipe_model(rendered_project, backend):
    tuned = OpenClipModel.load(f"local-dir:{load_params('params.yaml').model.name.removeprefix('local-dir:')}")
    with torch.no_grad():
        for p in tuned.module.visual.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    tuned.save(Path("models/paper"))
    write_params(rendered_project, evaluate={"wise_alphas": [0.0, 1.0], "compile": backend})
    params = load_params("params.yaml")
    args = (Path("data/eval"), Path("data/concepts"))
    base = run_evaluate(params, "baseline", Path("unused"), *args, Path("metrics/baseline.json"), None)
    paper = run_evaluate(params, "paper", Path("models/paper"), *args, Path("metrics/paper.json"), None)
    assert "wise" not in base and paper["metrics"] != base["metrics"]  # the perturbation changed what it scores
    assert set(paper["wise"]["0"]["metrics"]) == {"test"}  # the report's target and retention set only
    assert paper["wise"]["0"]["metrics"]["test"] == base["metrics"]["test"]
    assert paper["wise"]["1"]["metrics"]["test"] == paper["metrics"]["test"]


def test_wise_alphas_outside_0_1_are_a_params_error(tiny_project):
    write_params(tiny_project, evaluate={"wise_alphas": [0.5, 1.5]})
    with pytest.raises(ParamsError, match=r"'evaluate.wise_alphas' must list distinct numbers in \[0, 1\]"):
        load_params(tiny_project / "params.yaml")


def test_l2sp_learns_while_staying_closer_to_the_base_weights():
    """Both runs learn (the loss falls, the images' own captions gain similarity); the L2-SP run moves
    its weights less, and its penalty is the half squared distance it logs."""
    pixels = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    cfg = FinetuneParams(epochs=30, batch_size=8, loss="eq2", weight_decay=0.0, temperature=0.1)
    moved, logs, gain = {}, {}, {}
    for weight in (0.0, 1.0):
        model = tiny(0)
        start = {k: v.clone() for k, v in model.module.visual.state_dict().items()}

        def own_similarity() -> float:
            with torch.no_grad():
                image, text = model.encode_images(pixels), model.encode_texts(CAPTIONS)
                return float((image * text[labels]).sum(-1).mean())

        before = own_similarity()
        logs[weight] = finetune(model, pixels, labels, CAPTIONS, FinetuneParams(**{**cfg.__dict__, "l2sp_weight": weight}),
                                1e-3, progress=False)
        gain[weight] = own_similarity() - before
        moved[weight] = torch.cat([(v - start[k]).flatten() for k, v in model.module.visual.state_dict().items()])
    for weight, log in logs.items():
        assert log[0]["loss"] > 0 and log[-1]["loss"] < 0.9 * log[0]["loss"], (weight, log[0], log[-1])
        assert gain[weight] > 0.01
    assert "l2sp" not in logs[0.0][-1] and logs[1.0][-1]["l2sp"] > 0
    assert logs[1.0][-1]["l2sp"] == pytest.approx(0.5 * float(moved[1.0].norm() ** 2), rel=0.05)  # one step
    # before the last update
    assert moved[1.0].norm() < 0.5 * moved[0.0].norm()


def test_lora_learns_low_rank_updates_of_its_target_layers_only():
    pixels = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    model = tiny(0)
    start = {k: v.clone() for k, v in model.module.state_dict().items()}
    cfg = FinetuneParams(epochs=20, batch_size=8, loss="eq2", weight_decay=0.0, temperature=0.1, lora_rank=2,
                         lora_alpha=16.0)
    log = finetune(model, pixels, labels, CAPTIONS, cfg, 1e-2, progress=False)
    assert log[0]["loss"] > 0 and log[-1]["loss"] < 0.5 * log[0]["loss"]
    after = model.module.state_dict()
    assert list(after) == list(start)  # merged: the base model's keys, no adapter left
    changed = {k for k in start if not torch.equal(after[k], start[k])}
    assert changed == {"visual.transformer.resblocks.0.mlp.c_fc.weight", "visual.transformer.resblocks.0.mlp.c_proj.weight"}
    for key in changed:  # rank 2: two singular values, the rest float32 rounding of the merge
        singular = torch.linalg.svdvals(after[key] - start[key])
        assert singular[1] > 1e-3 * singular[0] and singular[2] < 1e-4 * singular[0], singular[:4]


def test_a_merged_lora_checkpoint_loads_in_plain_open_clip_and_gives_the_unmerged_outputs(tmp_path):
    import open_clip

    from ktpipe.transfer.finetune import set_trainable
    from ktpipe.transfer.lora import add_lora, merge_lora

    model = tiny(0)
    adapters = add_lora(model, set_trainable(model, "visual"), FinetuneParams(lora_rank=2), "test")
    with torch.no_grad():
        for p in adapters:  # a trained adapter: B no longer zero
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    pixels = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        unmerged, plain_base = model.encode_images(pixels), tiny(0).encode_images(pixels)
    assert not torch.allclose(unmerged, plain_base, atol=1e-3)  # the adapters change the outputs
    merge_lora(model)
    model.save(tmp_path / "merged")
    plain, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'merged'}")
    plain.eval()
    with torch.no_grad():
        found = torch.nn.functional.normalize(plain.encode_image(model.normalize(pixels)), dim=-1)
    assert torch.allclose(found, unmerged, atol=1e-5)
