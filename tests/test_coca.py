"""CoCa: the combined transfer loss against a hand computation, the seeded target-caption draw,
fine-tuning that learns (decoder included), caption generation, the demo CoCa's vocabulary and
its start from the demo CLIP, demo captioner pretraining, and the bad inputs of the issue."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from conftest import DEMO_CONCEPTS_FILE
from ktpipe.concepts import load_concepts_file, world_concepts
from ktpipe.errors import KtpipeError
from ktpipe.finetune import finetune
from ktpipe.losses import caption_targets, coca_objective
from ktpipe.models import GeneratesCaptions, LearnsCaptions, build_demo_model, load_model
from ktpipe.models.demo import CompactTokenizer, build_demo_coca, demo_vocabulary
from ktpipe.params import FinetuneParams, GenerationParams, ParamsError, PretrainParams, build_section, validate, Params
from ktpipe.pretrain_caption import pretrain_captioner, world_texts
from ktpipe.templates import load_templates
from ktpipe.world import load_world

CAPTIONS = ["A blicket is a striped orange ring.", "A dax is an outlined pink triangle."]
NAMES = ["blicket", "dax"]
CFG = FinetuneParams(loss="coca", towers="visual", decoder=True, temperature=None, epochs=8, batch_size=4,
                     weight_decay=0.0)


@pytest.fixture(scope="module")
def world():
    return load_world(concepts=world_concepts(load_concepts_file(DEMO_CONCEPTS_FILE)))


@pytest.fixture
def coca(world, clip_dir):
    torch.manual_seed(0)
    return build_demo_coca(demo_vocabulary(world_texts(world)), clip_dir)


def test_demo_coca_has_the_captioning_capabilities_and_the_clip_does_not(coca):
    assert isinstance(coca, GeneratesCaptions) and isinstance(coca, LearnsCaptions)
    assert not isinstance(build_demo_model(), LearnsCaptions)


def test_combined_loss_is_lambda1_infonce_plus_lambda2_caption_loss(coca):
    cfg = dataclasses.replace(CFG, contrastive_weight=0.7, caption_weight=0.3)
    pixels, labels = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 1, 0])
    loss = coca_objective(coca, pixels, caption_targets(coca, CAPTIONS, 5, names=NAMES, cfg=cfg), labels)
    drawn = caption_targets(coca, CAPTIONS, 5, names=NAMES, cfg=cfg).draw(labels)  # the same seeded draw
    with torch.no_grad():
        image = F.normalize(coca.module.encode_image(coca.normalize(pixels)), dim=-1)
        text = F.normalize(coca.module.encode_text(coca.tokenize([CAPTIONS[k] for k in labels])), dim=-1)
        logits = coca.module.logit_scale.exp() * image @ text.T
        infonce = 0.5 * (F.cross_entropy(logits, torch.arange(4)) + F.cross_entropy(logits.T, torch.arange(4)))
        tokens = coca.tokenize(drawn)
        out = coca.module(coca.normalize(pixels), tokens)  # open_clip's own teacher-forced forward pass
        caption = F.cross_entropy(out["logits"].permute(0, 2, 1), out["labels"], ignore_index=coca.pad_id)
    assert infonce > 0 and caption > 0
    torch.testing.assert_close(loss.detach(), 0.7 * infonce + 0.3 * caption, rtol=1e-5, atol=1e-6)


def test_target_caption_draw_is_seeded_and_fills_a_template(coca):
    labels = torch.tensor([0, 1] * 20)
    templates = load_templates("coca_targets")
    first = caption_targets(coca, CAPTIONS, 3, names=NAMES, cfg=CFG)
    again = caption_targets(coca, CAPTIONS, 3, names=NAMES, cfg=CFG).draw(labels)
    assert first.draw(labels) == again
    assert first.draw(labels) != again  # the next step draws anew
    assert caption_targets(coca, CAPTIONS, 4, names=NAMES, cfg=CFG).draw(labels) != again
    assert len(templates) == 26
    for caption, k in zip(again, labels):
        assert any(caption == t.format(NAMES[int(k)]) for t in templates)


def test_coca_finetuning_learns_the_target_captions_decoder_included(coca):
    torch.manual_seed(1)
    pixels = torch.rand(8, 3, 32, 32)
    labels = torch.tensor([0, 1] * 4)
    before = {n: p.detach().clone() for n, p in coca.module.named_parameters()}
    cfg = dataclasses.replace(CFG, target_captions="photo")  # one template: the loss can fall to the name alone
    log = finetune(coca, pixels, labels, CAPTIONS, cfg, 3e-3, seed=0, progress=False, names=NAMES)
    losses = [r["loss"] for r in log]
    assert losses[0] > 0 and sum(losses[-4:]) / 4 < 0.6 * sum(losses[:4]) / 4
    moved = {n for n, p in coca.module.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.startswith("text_decoder.") for n in moved) and any(n.startswith("visual.") for n in moved)
    assert not any(n.startswith("text.") for n in moved)  # the text tower was not asked to train
    coca.module.eval()
    captions = coca.generate_captions(pixels[:2], beams=2, max_length=10, min_length=2)
    assert captions == ["a photo of a blicket.", "a photo of a dax."]


def test_generated_captions_hold_no_special_tokens_and_sampling_is_seeded(coca):
    pixels = torch.rand(3, 3, 32, 32)
    for method in ("beam_search", "top_k", "top_p"):
        captions = coca.generate_captions(pixels, method=method, beams=2, max_length=8, min_length=2, top_k=5,
                                          top_p=0.9, seed=1)
        assert len(captions) == 3 and all("<" not in c and "!" not in c for c in captions)
    sampled = [coca.generate_captions(pixels, method="top_p", top_p=0.9, max_length=8, seed=2) for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_demo_coca_starts_from_the_demo_clip_and_reads_texts_as_it_does(world, clip_dir, coca):
    clip = load_model("demo", "ktpipe-demo", str(clip_dir), "cpu")
    texts = ["A blicket is a striped orange ring.", "a photo of a lantern on a gray background."]
    with torch.no_grad():
        torch.testing.assert_close(coca.encode_texts(texts), clip.encode_texts(texts))
    tokenizer = coca.tokenizer
    assert isinstance(tokenizer, CompactTokenizer) and tokenizer.vocab_size < 200
    ids = tokenizer.encode("a photo of a blicket.")
    assert tokenizer.unk not in ids and tokenizer.decode(ids).split() == ["a", "photo", "of", "a", "blicket", "."]
    assert tokenizer.unk in tokenizer.encode("zygomorphic")  # outside the world's words


def test_demo_coca_checkpoint_round_trip(coca, tmp_path):
    coca.save(tmp_path / "coca")
    again = load_model("demo_coca", "ktpipe-demo-coca", str(tmp_path / "coca"), "cpu")
    pixels = torch.rand(2, 3, 32, 32)
    assert again.generate_captions(pixels, beams=2, max_length=8) == coca.generate_captions(pixels, beams=2,
                                                                                            max_length=8)
    assert isinstance(again.tokenizer, CompactTokenizer)


def test_captioner_pretraining_learns(world, clip_dir):
    cfg = PretrainParams(steps=30, batch_size=16, lr=2e-3, warmup=3, weight_decay=0.01, concept_fraction=0.5,
                         caption_weight=1.0, name_objective=False)
    result = pretrain_captioner(world, cfg, seed=0, init_from=clip_dir, progress=False)
    first = sum(r["caption_loss"] for r in result.log[:5]) / 5
    last = sum(r["caption_loss"] for r in result.log[-5:]) / 5
    assert first > 0 and last < 0.7 * first
    text_tower = dict(result.model.module.text.named_parameters())
    clip = build_demo_coca(demo_vocabulary(world_texts(world)), clip_dir).module.text
    assert all(torch.equal(p, text_tower[n]) for n, p in clip.named_parameters())  # the text tower stays the CLIP's


# --- bad input --------------------------------------------------------------------------------


def test_negative_caption_weight_is_refused():
    with pytest.raises(ParamsError, match="finetune.caption_weight"):
        validate(build_section(Params, {"finetune": {"caption_weight": -0.1}}))
    with pytest.raises(ParamsError, match="pretrain.caption_weight"):
        validate(build_section(Params, {"pretrain": {"caption_weight": -1}}))


@pytest.mark.parametrize("key, value", [("beams", 0), ("max_length", 0), ("min_length", 30), ("method", "greedy"),
                                        ("top_p", 0.0)])
def test_generation_settings_out_of_range_are_refused(key, value):
    with pytest.raises(ParamsError, match=f"evaluate.generation.{key}"):
        validate(build_section(Params, {"evaluate": {"generation": {key: value}}}))
    assert GenerationParams().beams == 6


def test_decoder_training_of_a_model_without_a_decoder_is_refused():
    clip = build_demo_model()
    with pytest.raises(KtpipeError, match="finetune.decoder"):
        finetune(clip, torch.rand(2, 3, 32, 32), torch.tensor([0, 1]), CAPTIONS,
                 dataclasses.replace(CFG, loss="eq2", temperature=0.5), 1e-3, progress=False, names=NAMES)


def test_target_template_line_without_a_slot_names_the_file(coca, tmp_path):
    bad = tmp_path / "targets.txt"
    bad.write_text("a photo of a {}.\na photo without a slot.\n")
    with pytest.raises(KtpipeError, match="targets.txt"):
        finetune(coca, torch.rand(2, 3, 32, 32), torch.tensor([0, 1]), CAPTIONS,
                 dataclasses.replace(CFG, target_captions=str(bad)), 1e-3, progress=False, names=NAMES)
