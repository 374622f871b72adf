"""Contrastive losses against brute-force references (paper Eq. 2, CLIP, multi-positive CLIP)."""

import math

import pytest
import torch
import torch.nn.functional as F

from ktpipe.losses import clip_loss, info_nce
from ktpipe.pretrain import group_ids, multi_positive_clip_loss

SCALE = 10.0


def unit_rows(n: int, d: int = 8, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return sum(x * y for x, y in zip(a.tolist(), b.tolist()))


def eq2(images: torch.Tensor, texts: torch.Tensor, targets: list[int]) -> float:
    """Mean over images of -log(exp(s_t) / (exp(s_t) + sum over the other captions exp(s_k)))."""
    total = 0.0
    for i, t in enumerate(targets):
        s = [SCALE * cosine(images[i], texts[k]) for k in range(len(texts))]
        negatives = sum(math.exp(s[k]) for k in range(len(texts)) if k != t)
        total += -math.log(math.exp(s[t]) / (math.exp(s[t]) + negatives))
    return total / len(targets)


def soft_ce(queries: torch.Tensor, keys: torch.Tensor, positives: list[list[int]]) -> float:
    """Mean over queries of the cross-entropy against a uniform target over its positive keys."""
    total = 0.0
    for i, pos in enumerate(positives):
        s = [SCALE * cosine(queries[i], keys[k]) for k in range(len(keys))]
        log_z = math.log(sum(math.exp(v) for v in s))
        total += -sum(s[k] - log_z for k in pos) / len(pos)
    return total / len(positives)


def test_info_nce_matches_eq2():
    images, texts, targets = unit_rows(5, seed=0), unit_rows(3, seed=1), [0, 2, 1, 2, 0]
    loss = info_nce(images, texts, torch.tensor(targets), SCALE)
    assert loss.item() == pytest.approx(eq2(images, texts, targets), rel=1e-5)


def test_info_nce_accepts_a_tensor_logit_scale():
    images, texts, targets = unit_rows(5), unit_rows(3, seed=1), torch.tensor([0, 1, 2, 1, 0])
    expected = info_nce(images, texts, targets, SCALE)
    torch.testing.assert_close(info_nce(images, texts, targets, torch.tensor(SCALE)), expected)


def test_info_nce_gradient_when_all_images_share_one_caption():
    images = unit_rows(4).requires_grad_(True)
    loss = info_nce(images, unit_rows(3, seed=1), torch.zeros(4, dtype=torch.long), SCALE)
    loss.backward()
    assert (images.grad.norm(dim=-1) > 1e-4).all()


def test_clip_loss_matches_symmetric_brute_force():
    images, texts = unit_rows(4, seed=2), unit_rows(4, seed=3)
    diagonal = [[i] for i in range(4)]
    expected = 0.5 * (soft_ce(images, texts, diagonal) + soft_ce(texts, images, diagonal))
    assert clip_loss(images, texts, SCALE).item() == pytest.approx(expected, rel=1e-5)
    assert expected != pytest.approx(soft_ce(images, texts, diagonal), rel=1e-3)  # both directions matter


def test_group_ids():
    assert group_ids(["a", "b", "a", "c", "b"]).tolist() == [0, 1, 0, 2, 1]


def test_multi_positive_equals_clip_loss_for_distinct_groups():
    images, texts = unit_rows(5, seed=4), unit_rows(5, seed=5)
    groups = group_ids(["w", "x", "y", "z", "v"])
    torch.testing.assert_close(
        multi_positive_clip_loss(images, texts, groups, torch.tensor(SCALE)), clip_loss(images, texts, SCALE)
    )


def test_multi_positive_with_duplicate_captions():
    images, texts = unit_rows(5, seed=6), unit_rows(5, seed=7)
    groups = group_ids(["a", "b", "a", "c", "a"]).tolist()
    positives = [[j for j in range(5) if groups[j] == groups[i]] for i in range(5)]
    expected = 0.5 * (soft_ce(images, texts, positives) + soft_ce(texts, images, positives))
    loss = multi_positive_clip_loss(images, texts, torch.tensor(groups), torch.tensor(SCALE))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert loss.item() != pytest.approx(clip_loss(images, texts, SCALE).item(), rel=1e-3)
