"""The inversion objective (paper Eq. 3): TV penalty, random affine, loss, schedule, optimizer loop."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ktpipe.invert import (
    AffineDraw,
    affine_theta,
    cosine_lr,
    inversion_loss,
    invert_text,
    load_inversion,
    sample_affine,
    save_inversion,
    total_variation,
)
from ktpipe.models import OpenClipModel
from ktpipe.params import InvertParams

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
