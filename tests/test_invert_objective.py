"""The inversion objective (paper Eq. 3): TV penalty, random affine, loss, schedule, optimizer loop."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import ktpipe.transfer.invert as invert_module
from conftest import tiny_params
from ktpipe.concepts import ConceptText, write_concept_files
from ktpipe.images import load_inversion, save_inversion
from ktpipe.transfer.invert import (
    AffineDraw,
    affine_theta,
    check_progressive,
    clip_pixel_grad,
    cosine_lr,
    fresh_pixels,
    inversion_loss,
    invert_text,
    resolution_at,
    resolution_schedule,
    run_invert,
    sample_affine,
    total_variation,
)
from ktpipe.models import OpenClipModel
from ktpipe.params import InvertParams, Params, build_section, validate

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}
TEXT = "a striped orange ring"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: extra intra-op threads only add contention on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_model() -> OpenClipModel:
    torch.manual_seed(0)
    return OpenClipModel.from_config(TINY_CLIP)


def warp(image: torch.Tensor, draw: AffineDraw) -> torch.Tensor:
    """What `random_affine` does with a given draw."""
    grid = F.affine_grid(affine_theta(draw), list(image.shape), align_corners=False)
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def one_draw(angle=0.0, tx=0.0, ty=0.0, scale=1.0, applied=True) -> AffineDraw:
    return AffineDraw(torch.tensor([angle]), torch.tensor([[tx, ty]]), torch.tensor([scale]), torch.tensor([applied]))


# --- total variation ----------------------------------------------------------------------


def test_total_variation_matches_double_loop():
    """Four directions (right, down, two diagonals); per channel the L2 norm; channel mean; sum."""
    x = torch.rand(2, 3, 5, 6, generator=torch.Generator().manual_seed(0))
    n, c, h, w = x.shape
    steps = [(0, 1), (1, 0), (1, 1), (1, -1)]  # (row offset, column offset)
    expected = []
    for i in range(n):
        total = 0.0
        for dr, dq in steps:
            per_channel = []
            for k in range(c):
                sq = 0.0
                for r in range(h - dr):
                    for q in range(max(0, -dq), w - max(0, dq)):
                        sq += float(x[i, k, r + dr, q + dq] - x[i, k, r, q]) ** 2
                per_channel.append(sq ** 0.5)
            total += sum(per_channel) / c
        expected.append(total)
    torch.testing.assert_close(total_variation(x), torch.tensor(expected), rtol=1e-5, atol=1e-5)


def test_total_variation_of_constant_image_is_zero():
    assert torch.equal(total_variation(torch.full((2, 3, 5, 6), 0.3)), torch.zeros(2))


# --- random affine ------------------------------------------------------------------------


def test_sample_affine_ranges_and_probability():
    cfg = InvertParams(affine_p=0.3, rotation=20.0, translate=0.15, scale_min=0.6, scale_max=0.9)
    d = sample_affine(4000, cfg, torch.Generator().manual_seed(0))
    assert d.angle.abs().max() <= 20.0 and d.angle.abs().max() > 19.0
    assert d.translate.shape == (4000, 2) and d.translate.abs().max() <= 0.15
    assert d.scale.min() >= 0.6 and d.scale.max() <= 0.9
    assert abs(d.applied.float().mean().item() - 0.3) < 0.03  # ~4 standard deviations


@pytest.mark.parametrize("p, expected", [(0.0, False), (1.0, True)])
def test_sample_affine_extreme_probabilities(p, expected):
    d = sample_affine(500, InvertParams(affine_p=p), torch.Generator().manual_seed(1))
    assert bool(d.applied.all()) if expected else not bool(d.applied.any())


def test_sample_affine_is_seeded():
    a, b = (sample_affine(50, InvertParams(), torch.Generator().manual_seed(7)) for _ in range(2))
    for field in ("angle", "translate", "scale", "applied"):
        assert torch.equal(getattr(a, field), getattr(b, field))


def test_affine_theta_is_identity_when_not_applied():
    draw = AffineDraw(torch.tensor([30.0, -10.0]), torch.full((2, 2), 0.1), torch.tensor([0.7, 0.8]),
                      torch.tensor([False, True]))
    theta = affine_theta(draw)
    assert torch.equal(theta[0], torch.eye(2, 3))
    assert not torch.allclose(theta[1], torch.eye(2, 3))


def test_rotation_by_90_degrees_turns_clockwise_on_screen():
    """Forward map p_out = R p_in with x right and y down: +90 deg sends right to down."""
    image = torch.arange(36.0).view(1, 1, 6, 6)  # asymmetric: every pixel differs
    out = warp(image, one_draw(angle=90.0))

    # Brute force: pixel centers in normalized coords, p_in = R^T p_out with R = [[0, -1], [1, 0]].
    def center(i):  # pixel index -> normalized coordinate (align_corners=False)
        return (2 * i + 1) / 6 - 1

    def index(v):  # normalized coordinate -> pixel index
        return round(((v + 1) * 6 - 1) / 2)

    expected = torch.empty(6, 6)
    for r in range(6):
        for c in range(6):
            x_out, y_out = center(c), center(r)
            x_in, y_in = y_out, -x_out
            expected[r, c] = image[0, 0, index(y_in), index(x_in)]
    torch.testing.assert_close(out[0, 0], expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(out, torch.rot90(image, k=-1, dims=(-2, -1)), atol=1e-4, rtol=0)


def test_translation_is_a_fraction_of_the_image_side():
    image = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    out = warp(image, one_draw(tx=0.25))  # a quarter of 8 px: content moves 2 px right
    torch.testing.assert_close(out[..., 2:], image[..., :-2], atol=1e-5, rtol=0)
    assert torch.equal(out[..., :2], torch.zeros(1, 1, 8, 2))


def test_scale_below_one_shrinks_content():
    image = torch.ones(1, 1, 16, 16)
    full, small = warp(image, one_draw(scale=1.0)), warp(image, one_draw(scale=0.5))
    torch.testing.assert_close(full, image)
    assert (small == 0).sum() > 150  # about 3/4 of the 256 pixels become zero border
    assert small[0, 0, 8, 8] == 1.0 and small[0, 0, 0, 0] == 0.0


# --- loss and schedule --------------------------------------------------------------------


def test_inversion_loss_by_hand_and_gradient():
    pixels = torch.rand(3, 3, 4, 4, generator=torch.Generator().manual_seed(0), requires_grad=True)
    sims = torch.tensor([0.2, -0.1, 0.5])
    tv = [total_variation(pixels[i:i + 1]).item() for i in range(3)]
    expected = sum(-s + 0.05 * t for s, t in zip(sims.tolist(), tv))
    loss = inversion_loss(sims, pixels, 0.05)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert pixels.grad.abs().sum() > 0


def test_cosine_lr_endpoints():
    assert cosine_lr(0, 100, 0.1) == pytest.approx(0.1)
    assert cosine_lr(50, 100, 0.1) == pytest.approx(0.05)
    assert cosine_lr(100, 100, 0.1) == pytest.approx(0.0, abs=1e-12)
    assert cosine_lr(25, 100, 0.1) == pytest.approx(0.05 * (1 + math.cos(math.pi / 4)))


# --- the optimization loop on a tiny random-init CLIP -------------------------------------


@pytest.fixture(scope="module")
def inverted(tiny_model):
    cfg = InvertParams(steps=30, samples=3, lr=0.1)
    return invert_text(tiny_model, TEXT, cfg, seed=3, progress=False)


def test_invert_text_raises_similarity(tiny_model, inverted):
    pixels, sims = inverted
    assert pixels.shape == (3, 3, 16, 16) and sims.shape == (3,)
    assert pixels.min() >= 0.0 and pixels.max() <= 1.0
    noise = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        start = tiny_model.encode_images(noise) @ tiny_model.encode_texts([TEXT]).reshape(-1)
    assert (sims > start + 0.05).all(), (start, sims)
    with torch.no_grad():  # the returned sims are those of the returned pixels
        again = tiny_model.encode_images(pixels) @ tiny_model.encode_texts([TEXT]).reshape(-1)
    torch.testing.assert_close(again, sims, atol=1e-5, rtol=0)


def test_invert_text_is_deterministic(tiny_model, inverted):
    pixels, sims = invert_text(tiny_model, TEXT, InvertParams(steps=30, samples=3, lr=0.1), seed=3, progress=False)
    assert torch.equal(pixels, inverted[0]) and torch.equal(sims, inverted[1])


def test_save_and_load_inversion_round_trip(tmp_path, inverted):
    pixels, sims = inverted
    save_inversion(tmp_path / "blicket", pixels, sims, {"concept": "blicket"})
    assert torch.equal(load_inversion(tmp_path / "blicket"), pixels)
    with Image.open(tmp_path / "blicket" / "grid.png") as grid:
        assert grid.mode == "RGB" and grid.width > grid.height
    summary = json.loads((tmp_path / "blicket" / "summary.json").read_text())
    assert summary["concept"] == "blicket"
    assert summary["similarity"] == pytest.approx(sims.tolist(), abs=1e-5)
    with pytest.raises(FileNotFoundError, match="invert stage"):
        load_inversion(tmp_path / "missing")


# --- progressive resolution (authors' code: 64, 128 at step 900, the model's size at 1800) --

AUTHORS = InvertParams(progressive=True)  # sizes (64, 128), steps (900, 1800)


@pytest.mark.parametrize("step, side", [(0, 64), (899, 64), (900, 128), (1799, 128), (1800, 224), (4999, 224)])
def test_resolution_at_follows_the_authors_schedule(step, side):
    assert resolution_at(step, AUTHORS, model_size=224) == side


@pytest.mark.parametrize("step, side", [(0, 4), (2, 4), (3, 8), (6, 8), (7, 12), (100, 12)])
def test_resolution_at_custom_schedule_ends_at_image_size(step, side):
    cfg = InvertParams(progressive=True, progressive_sizes=(4, 8), progressive_steps=(3, 7), image_size=12)
    assert resolution_at(step, cfg, model_size=16) == side


@pytest.mark.parametrize("image_size, side", [(None, 224), (96, 96)])
def test_resolution_at_without_progressive_is_the_final_side(image_size, side):
    cfg = InvertParams(image_size=image_size)  # progressive_sizes are ignored when progressive is off
    assert {resolution_at(s, cfg, 224) for s in (0, 900, 1800, 4999)} == {side}


@pytest.mark.parametrize("steps, schedule", [
    (5000, [[0, 64], [900, 128], [1800, 224]]),
    (1800, [[0, 64], [900, 128]]),
    (300, [[0, 64]]),
])
def test_resolution_schedule_lists_the_sides_a_run_visits(steps, schedule):
    cfg = InvertParams(steps=steps, progressive=True)
    assert resolution_schedule(cfg, 224) == schedule
    assert resolution_schedule(InvertParams(steps=steps), 224) == [[0, 224]]


def test_check_progressive_rejects_sizes_above_the_final_side():
    check_progressive(AUTHORS, 224)
    check_progressive(InvertParams(), 32)  # progressive off: sizes do not matter
    with pytest.raises(ValueError, match="progressive_sizes"):
        check_progressive(AUTHORS, 32)


def test_fresh_pixels_upsamples_bilinearly_into_a_new_leaf_with_a_new_optimizer():
    small = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    leaf, optimizer = fresh_pixels(small, 8, lr=0.3)
    expected = F.interpolate(small, size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(leaf, expected)
    assert leaf.is_leaf and leaf.requires_grad and leaf.min() >= 0 and leaf.max() <= 1
    assert optimizer.param_groups[0]["params"] == [leaf] and optimizer.param_groups[0]["lr"] == 0.3
    assert not optimizer.state  # no moments carried over


def test_progressive_run_goes_through_the_sizes(tiny_model, monkeypatch):
    """Sides 4, 8 (from step 2), then the model's 16 (from step 4); lr cosine over all 6 steps."""
    sides, lr_calls, upsizes = [], [], []
    affine, cosine, fresh = invert_module.random_affine, invert_module.cosine_lr, invert_module.fresh_pixels

    def spy_affine(pixels, cfg, generator):
        sides.append(pixels.shape[-1])
        return affine(pixels, cfg, generator)

    def spy_cosine(step, total, peak):
        lr_calls.append((step, total))
        return cosine(step, total, peak)

    def spy_fresh(pixels, size, lr, mode):
        upsizes.append((pixels.shape[-1], size))
        return fresh(pixels, size, lr, mode)

    monkeypatch.setattr(invert_module, "random_affine", spy_affine)
    monkeypatch.setattr(invert_module, "cosine_lr", spy_cosine)
    monkeypatch.setattr(invert_module, "fresh_pixels", spy_fresh)
    cfg = InvertParams(steps=6, samples=2, progressive=True, progressive_sizes=(4, 8), progressive_steps=(2, 4))
    pixels, sims = invert_text(tiny_model, TEXT, cfg, seed=0, progress=False)
    assert sides == [4, 4, 8, 8, 16, 16]
    assert upsizes == [(4, 4), (4, 8), (8, 16)]  # the start, then one fresh Adam per upsize
    assert lr_calls == [(s, 6) for s in range(6)]
    assert pixels.shape == (2, 3, 16, 16) and sims.shape == (2,)
    assert pixels.min() >= 0.0 and pixels.max() <= 1.0


def test_progressive_run_stopped_early_still_returns_model_size(tiny_model):
    cfg = InvertParams(steps=2, samples=2, progressive=True, progressive_sizes=(4, 8), progressive_steps=(2, 4))
    pixels, _ = invert_text(tiny_model, TEXT, cfg, seed=0, progress=False)
    assert pixels.shape == (2, 3, 16, 16) and pixels.min() >= 0.0 and pixels.max() <= 1.0


# --- gradient clipping -----------------------------------------------------------------------


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_clip_pixel_grad_matches_by_hand(max_norm):
    pixels = torch.zeros(2, 3, 4, 4, requires_grad=True)
    grad = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    pixels.grad = grad.clone()
    norm = sum(float(g) ** 2 for g in grad.flatten()) ** 0.5  # total norm over every sample
    assert clip_pixel_grad(pixels, max_norm) == pytest.approx(norm, rel=1e-5)
    factor = min(1.0, max_norm / norm)
    torch.testing.assert_close(pixels.grad, grad * factor, rtol=1e-5, atol=1e-6)
    assert pixels.grad.norm().item() <= max_norm * (1 + 1e-5)


def test_tiny_grad_clip_nearly_freezes_the_first_adam_step(tiny_model):
    """Adam divides by |g| + 1e-8: a gradient clipped far below eps barely moves the pixels."""
    start = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))  # invert_text's first draw
    clipped, _ = invert_text(tiny_model, TEXT, InvertParams(steps=1, samples=2, grad_clip=1e-12), 5, False)
    free, _ = invert_text(tiny_model, TEXT, InvertParams(steps=1, samples=2), 5, False)
    assert (clipped - start).abs().max() < 0.1 * 1e-3  # lr * |g| / eps, |g| <= 1e-12
    assert (free - start).abs().max() > 0.05  # unclipped, Adam's first step is about lr per pixel


def test_grad_clip_is_applied_once_per_step(tiny_model, monkeypatch):
    calls = []
    clip = invert_module.clip_pixel_grad
    monkeypatch.setattr(invert_module, "clip_pixel_grad", lambda p, m: calls.append(m) or clip(p, m))
    invert_text(tiny_model, TEXT, InvertParams(steps=3, samples=2), 0, False)
    assert calls == []
    invert_text(tiny_model, TEXT, InvertParams(steps=3, samples=2, grad_clip=1.0), 0, False)
    assert calls == [1.0, 1.0, 1.0]


# --- the stage's library call records the schedule ------------------------------------------


def test_run_invert_records_resolutions_in_the_summary(tmp_path, tiny_checkpoint):
    raw = tiny_params(tiny_checkpoint)
    raw["invert"] = {"steps": 3, "samples": 2, "progressive": True, "progressive_sizes": [8],
                     "progressive_steps": [2], "grad_clip": 1.0}
    params = validate(build_section(Params, raw))
    write_concept_files([ConceptText("blicket", TEXT)], tmp_path / "concepts")
    meta = run_invert(params, tmp_path / "concepts" / "blicket.json", tmp_path / "blicket")
    summary = json.loads((tmp_path / "blicket" / "summary.json").read_text())
    assert meta["resolutions"] == summary["resolutions"] == [[0, 8], [2, 16]]
    assert summary["grad_clip"] == 1.0
    assert load_inversion(tmp_path / "blicket").shape == (2, 3, 16, 16)


def test_normal_init_is_n01_clamped_to_vilts_input_range():
    """`invert.init: normal` after ViLT's normalization ((x - 0.5) / 0.5) is N(0, 1) clamped to
    [-1, 1], not N(0, 1): checked against that law's moments and masses, computed here."""
    from ktpipe.images import initial_pixels

    pixels = initial_pixels(16, 64, torch.Generator().manual_seed(0), "normal")  # 196,608 values
    z = ((pixels - 0.5) / 0.5).flatten().double()
    phi1, tail = math.exp(-0.5) / math.sqrt(2 * math.pi), 0.5 * math.erfc(1 / math.sqrt(2))  # density at 1, P(Z > 1)
    variance = (1 - 2 * tail - 2 * phi1) + 2 * tail  # E[clamp(Z)^2]: the inside's second moment plus the clamped tails
    assert pixels.min() >= 0 and pixels.max() <= 1
    assert abs(z.mean().item()) < 0.01
    assert z.std().item() == pytest.approx(math.sqrt(variance), abs=0.005)  # 0.72, N(0, 1) would give 1
    assert (z.abs() == 1).double().mean().item() == pytest.approx(2 * tail, abs=0.005)  # 32% at +-1
    assert (z.abs() < 0.5).double().mean().item() == pytest.approx(math.erf(0.5 / math.sqrt(2)), abs=0.005)
