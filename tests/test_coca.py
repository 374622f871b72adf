"""CoCa: the combined transfer loss against a hand computation (and InfoNCE alone at caption weight
0), the seeded target-caption draw, fine-tuning that learns (decoder included), caption generation
(open_clip's group beam search against open_clip's own loop), the demo CoCa's vocabulary and its
start from the demo CLIP, demo captioner pretraining, and the bad inputs of the issue."""
from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
import torch.nn.functional as F
from open_clip import CoCa, coca_model

from conftest import DEMO_CONCEPTS_FILE
from ktpipe.concepts import load_concepts_file, world_concepts
from ktpipe.errors import KtpipeError
from ktpipe.transfer.finetune import finetune
from ktpipe.transfer.losses import caption_targets, coca_objective
from ktpipe.models import GeneratesCaptions, LearnsCaptions, build_demo_model, load_model
from ktpipe.models.coca import group_beam_search
from ktpipe.demo.models import CompactTokenizer, build_demo_coca, demo_vocabulary
from ktpipe.params import FinetuneParams, GenerationParams, ParamsError, PretrainParams, build_section, validate, Params
from ktpipe.demo.pretrain_caption import pretrain_captioner, world_texts
from ktpipe.templates import load_templates
from ktpipe.demo.world import load_world

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



def test_caption_weight_zero_is_infonce_alone_without_the_decoder(coca, monkeypatch):
    """Table 9's rows without the captioning loss: lambda2 = 0 gives lambda1 * InfoNCE, and the
    decoder is never run (a forward of it would raise here)."""
    cfg = dataclasses.replace(CFG, contrastive_weight=0.7, caption_weight=0.0, decoder=False)
    pixels, labels = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 1, 0])
    with torch.no_grad():
        image = F.normalize(coca.module.encode_image(coca.normalize(pixels)), dim=-1)
        text = F.normalize(coca.module.encode_text(coca.tokenize([CAPTIONS[k] for k in labels])), dim=-1)
        logits = coca.module.logit_scale.exp() * image @ text.T
        infonce = 0.5 * (F.cross_entropy(logits, torch.arange(4)) + F.cross_entropy(logits.T, torch.arange(4)))

    def no_decoder(*args, **kwargs):
        raise AssertionError("the text decoder ran at caption weight 0")

    monkeypatch.setattr(coca.module.text_decoder, "forward", no_decoder)
    loss = coca_objective(coca, pixels, caption_targets(coca, CAPTIONS, 5, names=NAMES, cfg=cfg), labels)
    torch.testing.assert_close(loss.detach(), 0.7 * infonce, rtol=1e-5, atol=1e-6)
    before = {n: p.detach().clone() for n, p in coca.module.named_parameters()}
    log = finetune(coca, pixels, labels, CAPTIONS, dataclasses.replace(cfg, epochs=2), 1e-3, progress=False,
                   names=NAMES)
    assert len(log) == 2 and all(r["loss"] > 0 for r in log)
    moved = {n for n, p in coca.module.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.startswith("visual.") for n in moved) and not any(n.startswith("text_decoder.") for n in moved)


# --- open_clip's decoding: its own `_generate_beamsearch` on a tiny random-init CoCa ------------------
# open_clip 3.3's loop runs as installed; only transformers' BeamSearchScorer, which transformers 5
# removed (open_clip issue #1129) and without which open_clip cannot generate, is ported below from
# transformers 4.57 (generation/beam_search.py), line for line, and patched into open_clip.

VOCAB, SOT, EOT, PAD, CONTEXT = 40, 38, 39, 0, 12


class ReferenceHypotheses:
    """transformers 4.57's BeamHypotheses (early_stopping=False), ported line for line."""

    def __init__(self, num_beams, length_penalty):
        self.num_beams, self.length_penalty = num_beams, length_penalty
        self.beams, self.worst_score = [], 1e9

    def __len__(self):
        return len(self.beams)

    def add(self, hyp, sum_logprobs, generated_len):
        score = sum_logprobs / (generated_len ** self.length_penalty)
        if len(self) < self.num_beams or score > self.worst_score:
            self.beams.append((score, hyp))
            if len(self) > self.num_beams:
                sorted_next_scores = sorted([(s, idx) for idx, (s, _) in enumerate(self.beams)])
                del self.beams[sorted_next_scores[0][1]]
                self.worst_score = sorted_next_scores[1][0]
            else:
                self.worst_score = min(score, self.worst_score)

    def is_done(self, best_sum_logprobs, cur_len):
        if len(self) < self.num_beams:
            return False
        return self.worst_score >= best_sum_logprobs / cur_len ** self.length_penalty


class ReferenceBeamSearchScorer:
    """transformers 4.57's BeamSearchScorer (the part open_clip's `_generate_beamsearch` calls),
    ported line for line: transformers 5 removed it (open_clip issue #1129)."""

    def __init__(self, batch_size, num_beams, device, length_penalty=1.0, num_beam_groups=1):
        if num_beams <= 1 or num_beam_groups > num_beams or num_beams % num_beam_groups:
            raise ValueError("num_beams > 1, divisible by num_beam_groups")
        self.num_beams, self.num_beam_groups = num_beams, num_beam_groups
        self.group_size = num_beams // num_beam_groups
        self._beam_hyps = [ReferenceHypotheses(self.group_size, length_penalty)
                           for _ in range(batch_size * num_beam_groups)]
        self._done = torch.zeros(batch_size * num_beam_groups, dtype=torch.bool)

    @property
    def is_done(self):
        return self._done.all().item()

    def process(self, input_ids, next_scores, next_tokens, next_indices, pad_token_id=None, eos_token_id=None,
                beam_indices=None, group_index=0):
        cur_len = input_ids.shape[-1] + 1
        batch_size = len(self._beam_hyps) // self.num_beam_groups
        next_beam_scores = torch.zeros((batch_size, self.group_size), dtype=next_scores.dtype)
        next_beam_tokens = torch.zeros((batch_size, self.group_size), dtype=next_tokens.dtype)
        next_beam_indices = torch.zeros((batch_size, self.group_size), dtype=next_indices.dtype)
        for batch_idx in range(batch_size):
            batch_group_idx = batch_idx * self.num_beam_groups + group_index
            if self._done[batch_group_idx]:
                next_beam_scores[batch_idx, :] = 0
                next_beam_tokens[batch_idx, :] = pad_token_id
                next_beam_indices[batch_idx, :] = 0
                continue
            beam_idx = 0
            for beam_token_rank, (next_token, next_score, next_index) in enumerate(
                    zip(next_tokens[batch_idx], next_scores[batch_idx], next_indices[batch_idx])):
                batch_beam_idx = batch_idx * self.group_size + next_index
                if next_token.item() in eos_token_id:
                    if beam_token_rank >= self.group_size:
                        continue
                    self._beam_hyps[batch_group_idx].add(input_ids[batch_beam_idx].clone(), next_score.item(),
                                                         generated_len=cur_len)
                else:
                    next_beam_scores[batch_idx, beam_idx] = next_score
                    next_beam_tokens[batch_idx, beam_idx] = next_token
                    next_beam_indices[batch_idx, beam_idx] = batch_beam_idx
                    beam_idx += 1
                if beam_idx == self.group_size:
                    break
            self._done[batch_group_idx] = self._done[batch_group_idx] or self._beam_hyps[batch_group_idx].is_done(
                next_scores[batch_idx].max().item(), cur_len)
        return {"next_beam_scores": next_beam_scores.view(-1), "next_beam_tokens": next_beam_tokens.view(-1),
                "next_beam_indices": next_beam_indices.view(-1)}

    def finalize(self, input_ids, final_beam_scores, final_beam_tokens, final_beam_indices, max_length,
                 pad_token_id=None, eos_token_id=None, beam_indices=None):
        batch_size = len(self._beam_hyps) // self.num_beam_groups
        for batch_group_idx, beam_hyp in enumerate(self._beam_hyps):
            if self._done[batch_group_idx]:
                continue
            for index_per_group in range(self.group_size):
                batch_beam_idx = batch_group_idx * self.group_size + index_per_group
                final_tokens = input_ids[batch_beam_idx]
                beam_hyp.add(final_tokens, final_beam_scores[batch_beam_idx].item(), generated_len=final_tokens.shape[-1])
        best = []
        for i in range(batch_size):
            groups = self._beam_hyps[i * self.num_beam_groups:(i + 1) * self.num_beam_groups]
            best.append(sorted([beam for hyps in groups for beam in hyps.beams], key=lambda x: x[0]).pop()[1])
        width = min(max(len(b) for b in best) + 1, max_length)
        decoded = torch.full((batch_size, width), pad_token_id, dtype=input_ids.dtype)
        for i, hypo in enumerate(best):
            decoded[i, :len(hypo)] = hypo
            if len(hypo) < width:
                decoded[i, len(hypo)] = eos_token_id[0]
        return {"sequences": decoded}


def tiny_coca(seed: int) -> CoCa:
    """A random-init open_clip CoCa of 40 tokens whose end token often wins (captions of many lengths)."""
    torch.manual_seed(seed)
    text = dict(context_length=CONTEXT, vocab_size=VOCAB, width=16, heads=2, layers=1)
    module = CoCa(embed_dim=16, multimodal_cfg=dict(text, attn_pooler_heads=2, dim_head=8),
                  text_cfg=dict(text, embed_cls=True, output_tokens=True),
                  vision_cfg=dict(image_size=16, layers=1, width=16, patch_size=8, head_width=8,
                                  attentional_pool=True, attn_pooler_heads=2, output_tokens=True), pad_id=PAD).eval()
    with torch.no_grad():  # open_clip leaves the decoder's projection uninitialized (torch.empty)
        torch.nn.init.normal_(module.text_decoder.text_projection, std=2.0)
        module.text_decoder.text_projection[:, EOT] *= 4.0
    return module


def open_clip_decoding(module: CoCa, images: torch.Tensor, cfg: GenerationParams, monkeypatch) -> list[list[int]]:
    """open_clip's `_generate_beamsearch` as `CoCa.generate` calls it, tokens between start and end."""
    from transformers import (LogitsProcessorList, MaxLengthCriteria, MinLengthLogitsProcessor,
                              RepetitionPenaltyLogitsProcessor, StoppingCriteriaList)

    scorer = functools.partial(ReferenceBeamSearchScorer, length_penalty=cfg.length_penalty)
    monkeypatch.setattr(coca_model, "BeamSearchScorer", scorer, raising=False)
    eos = torch.tensor([EOT])
    processors = LogitsProcessorList([MinLengthLogitsProcessor(cfg.min_length, eos),
                                      RepetitionPenaltyLogitsProcessor(cfg.repetition_penalty)])
    with torch.no_grad():
        out = module._generate_beamsearch(images, pad_token_id=PAD, eos_token_id=eos, sot_token_id=torch.tensor([SOT]),
                                          num_beams=cfg.beams, num_beam_groups=cfg.beam_groups,
                                          min_seq_len=cfg.min_length, logit_processor=processors,
                                          stopping_criteria=StoppingCriteriaList([MaxLengthCriteria(cfg.max_length)]))
    return [row[1:row.index(EOT)] if EOT in row else row[1:] for row in out.tolist()]


@pytest.mark.parametrize("beams, groups, min_length, repetition, length_penalty", [
    (6, 3, 5, 1.0, 1.0), (6, 3, 2, 1.3, 1.0), (4, 1, 1, 1.0, 0.6), (4, 2, 3, 1.0, 1.0)])
def test_open_clip_method_is_open_clips_own_group_beam_search(beams, groups, min_length, repetition, length_penalty,
                                                             monkeypatch):
    cfg = GenerationParams(method="open_clip", beams=beams, beam_groups=groups, max_length=CONTEXT,
                           min_length=min_length, repetition_penalty=repetition, length_penalty=length_penalty)
    lengths = set()
    for seed in range(3):
        module, images = tiny_coca(seed), torch.rand(4, 3, 16, 16)
        expected = open_clip_decoding(module, images, cfg, monkeypatch)
        assert group_beam_search(module, images, cfg, SOT, EOT, PAD, CONTEXT) == expected
        lengths |= {len(row) for row in expected}
    assert len(lengths) > 2  # captions that ended early and ones cut at max_length


def test_open_clip_groups_search_alike_without_a_diversity_penalty():
    module, images = tiny_coca(1), torch.rand(4, 3, 16, 16)
    grouped = GenerationParams(method="open_clip", beams=6, beam_groups=3, max_length=CONTEXT, min_length=2)
    one = dataclasses.replace(grouped, beams=2, beam_groups=1)
    assert group_beam_search(module, images, grouped, SOT, EOT, PAD, CONTEXT) == \
        group_beam_search(module, images, one, SOT, EOT, PAD, CONTEXT)


def test_demo_coca_decodes_with_open_clips_method(coca):
    pixels = torch.rand(2, 3, 32, 32)
    captions = coca.generate_captions(pixels, method="open_clip", beams=4, beam_groups=2, max_length=8, min_length=2)
    assert len(captions) == 2 and all(isinstance(c, str) and "<" not in c for c in captions)

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


def test_beam_groups_must_divide_the_beams_of_open_clips_method():
    with pytest.raises(ParamsError, match="evaluate.generation.beam_groups"):
        validate(build_section(Params, {"evaluate": {"generation": {"method": "open_clip", "beams": 4,
                                                                    "beam_groups": 3}}}))
    validate(build_section(Params, {"evaluate": {"generation": {"method": "beam_search", "beams": 4}}}))


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
