"""Saliency maps for zero-shot segmentation (ktpipe/eval/saliency.py): M2IB's bottleneck KL against
the normal-distribution formula, map shapes and ranges on the demo CLIP and a BiomedCLIP-shaped
timm ViT-B/16, batched M2IB equal to one image at a time, the model left untouched, and both
methods finding the one token a toy tower's embedding reads."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from archs import biomedclip_config, write_tiny_bert
from ktpipe.demo.models import build_demo_model
from ktpipe.models.openclip import OpenClipModel
from ktpipe.params import ParamsError, SegmentationParams
from ktpipe.eval.saliency import (bottleneck, bottleneck_kl, compute_saliency, gradient_token_maps, m2ib_token_maps,
                             to_pixel_maps)

FAST = SegmentationParams(layer=1, steps=3, batch_size=2)  # the demo CLIP has 3 vision blocks


class OneTokenTower:
    """A toy `VisionFeatures`: 12 px images, 4 px patches (a class token and a 3x3 grid of
    16-wide tokens), and an embedding that reads patch token `k` alone, so every saliency method
    worth the name must put its peak there. The embedding is token k with 4 constant features
    appended, so the prompt of `text_embeddings` matches it better the less of token k is lost."""

    vision_layers = 2

    def __init__(self, k: int, width: int = 16, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.k = k
        self.patch_proj = torch.randn(3 * 4 * 4, width, generator=g) / 4  # (48, W)
        self.class_token = torch.randn(width, generator=g)  # (W,)
        self.constant = torch.ones(4)  # (4,) the embedding's features that no token moves

    def vision_token_grid(self) -> tuple[int, int, int]:
        return 1, 3, 3

    def tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = F.unfold(pixels, 4, stride=4).transpose(1, 2)  # (B, 9, 48)
        return torch.cat([self.class_token.expand(len(pixels), 1, -1), patches @ self.patch_proj], 1)  # (B, 10, W)

    def encode_images_through(self, pixels, layer, edit):
        tokens = edit(self.tokens(pixels))
        return F.normalize(torch.cat([tokens[:, 1 + self.k], self.constant.expand(len(pixels), -1)], 1), dim=-1)

    def text_embeddings(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, W + 4) token k's own features, none of the constant ones."""
        token = self.tokens(pixels)[:, 1 + self.k]
        return F.normalize(torch.cat([token, torch.zeros(len(pixels), 4)], 1), dim=-1)


@pytest.fixture(scope="module")
def demo():
    torch.manual_seed(0)
    return build_demo_model()


def random_batch(model, count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(count, 3, S, S) random pixels and (count, D) text embeddings (of other random images)."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(count, 3, model.image_size, model.image_size, generator=g)
    with torch.no_grad():
        texts = model.encode_images(torch.rand(count, 3, model.image_size, model.image_size, generator=g))
    return pixels, texts


def test_bottleneck_kl_is_the_kl_of_normals():
    g = torch.Generator().manual_seed(0)
    lamb = torch.rand(2, 5, 6, generator=g) * 0.9 + 0.05
    features = torch.randn(2, 5, 6, generator=g) * 3
    std = 1.7
    posterior = torch.distributions.Normal(lamb * features / std, 1 - lamb)
    expected = torch.distributions.kl_divergence(posterior, torch.distributions.Normal(0.0, 1.0))
    assert torch.allclose(bottleneck_kl(lamb, features, std), expected, atol=1e-5)


def test_bottleneck_keeps_tokens_when_open_and_noise_when_closed():
    tokens, noise = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    assert torch.equal(bottleneck(tokens, torch.ones(1), noise, 2.0), tokens)
    assert torch.equal(bottleneck(tokens, torch.zeros(1), noise, 2.0), 2.0 * noise)


@pytest.mark.parametrize("saliency", ["m2ib", "gradient"])
def test_maps_have_the_pixels_size_and_lie_in_0_1(demo, saliency):
    pixels, texts = random_batch(demo, 3)
    maps = compute_saliency(demo, pixels, texts, dataclasses.replace(FAST, saliency=saliency))
    assert maps.shape == (3, 32, 32)
    assert maps.min() >= 0 and maps.max() <= 1
    assert torch.allclose(maps.amax((1, 2)), torch.ones(3))  # every random image gives a non-constant map


def test_token_maps_lie_on_the_patch_grid(demo):
    pixels, texts = random_batch(demo, 2)
    assert m2ib_token_maps(demo, pixels, texts, layer=2, steps=2).shape == (2, 4, 4)
    assert gradient_token_maps(demo, pixels, texts, layer=0).shape == (2, 4, 4)


def test_constant_map_scales_to_zeros():
    maps = to_pixel_maps(torch.stack([torch.full((2, 2), 3.0), torch.tensor([[0.0, 1.0], [2.0, 3.0]])]), 8)
    assert torch.equal(maps[0], torch.zeros(8, 8))
    assert maps[1].min() == 0 and maps[1].max() == 1


def test_batched_m2ib_equals_one_image_at_a_time(demo):
    pixels, texts = random_batch(demo, 3)
    settings = dict(layer=1, steps=4, seed=3)
    batched = m2ib_token_maps(demo, pixels, texts, **settings)
    alone = torch.cat([m2ib_token_maps(demo, pixels[i:i + 1], texts[i:i + 1], **settings) for i in range(3)])
    reordered = m2ib_token_maps(demo, pixels.flip(0), texts.flip(0), **settings).flip(0)
    assert torch.allclose(batched, alone, atol=1e-4, rtol=1e-4)
    assert torch.allclose(batched, reordered, atol=1e-4, rtol=1e-4)


def test_m2ib_lowers_its_loss_and_leaves_the_model_alone():
    torch.manual_seed(1)
    model = build_demo_model()
    model.module.train()
    model.module.visual.requires_grad_(False)  # a mix of flags the call must restore
    flags = {name: p.requires_grad for name, p in model.module.named_parameters()}
    before = {name: t.clone() for name, t in model.module.state_dict().items()}
    pixels, texts = random_batch(model, 2)
    _, history = m2ib_token_maps(model, pixels, texts, layer=1, steps=6, return_history=True)
    assert history.shape == (6, 2)
    assert (history[-1] < history[0]).all()
    after = model.module.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert flags == {name: p.requires_grad for name, p in model.module.named_parameters()}
    assert all(p.grad is None for p in model.module.parameters())
    assert all(m.training for m in model.module.modules())


@pytest.mark.parametrize("k", [4, 7])
@pytest.mark.parametrize("method", ["m2ib", "gradient"])
def test_saliency_peaks_at_the_token_the_embedding_reads(k, method):
    toy = OneTokenTower(k)
    pixels = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(k))
    texts = toy.text_embeddings(pixels)
    if method == "m2ib":
        maps = m2ib_token_maps(toy, pixels, texts, layer=1)  # the MedCLIP-SAMv2 beta, variance, steps, lr
    else:
        maps = gradient_token_maps(toy, pixels, texts, layer=1)
    assert maps.shape == (2, 3, 3)
    top = maps.flatten(1).sort(1, descending=True)
    assert (top.indices[:, 0] == k).all()
    assert (top.values[:, 0] > 10 * top.values[:, 1]).all()  # M2IB: ~1500x, ~2x with the loss's sign flipped


def test_timm_vit_b16_trunk_gives_a_14x14_grid(tmp_path):
    model = OpenClipModel.from_config(biomedclip_config(write_tiny_bert(tmp_path / "bert")))
    assert model.vision_token_grid() == (1, 14, 14)
    pixels, texts = random_batch(model, 1)
    maps, history = m2ib_token_maps(model, pixels, texts, layer=7, steps=2, noise_samples=1, return_history=True)
    assert maps.shape == (1, 14, 14) and torch.isfinite(maps).all() and history.shape == (2, 1)
    masks = compute_saliency(model, pixels, texts, SegmentationParams(saliency="gradient"))
    assert masks.shape == (1, 224, 224)


@pytest.mark.parametrize("layer", [3, -1])
@pytest.mark.parametrize("saliency", ["m2ib", "gradient"])
def test_layer_outside_the_tower_names_the_key_and_depth(demo, layer, saliency):
    pixels, texts = random_batch(demo, 1)
    cfg = dataclasses.replace(FAST, saliency=saliency, layer=layer)
    with pytest.raises(ParamsError, match=r"evaluate\.segmentation\.layer.*3 blocks"):
        compute_saliency(demo, pixels, texts, cfg)


def test_negative_beta_names_the_key(demo):
    pixels, texts = random_batch(demo, 1)
    with pytest.raises(ParamsError, match=r"evaluate\.segmentation\.beta"):
        compute_saliency(demo, pixels, texts, dataclasses.replace(FAST, beta=-0.1))


def test_unknown_method_names_the_key(demo):
    pixels, texts = random_batch(demo, 1)
    with pytest.raises(ParamsError, match=r"evaluate\.segmentation\.saliency"):
        compute_saliency(demo, pixels, texts, dataclasses.replace(FAST, saliency="gradcam"))
