"""Contrastive losses against brute-force references: paper Eq. 2 on (B, K) scores, and CLIP's
symmetric loss (a reference kept here, the only user) against the pretraining multi-positive loss."""

import math

import pytest
import torch
import torch.nn.functional as F

from ktpipe.transfer.losses import eq2_loss
from ktpipe.demo.pretrain import group_ids, multi_positive_clip_loss

SCALE = 10.0  # logit scale, i.e. 1 / temperature


def unit_rows(n: int, d: int = 8, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return sum(x * y for x, y in zip(a.tolist(), b.tolist()))


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """CLIP's symmetric in-batch loss over aligned (B, D) pairs: the reference that the pretraining
    loss reduces to when every caption in the batch is distinct."""
    targets = torch.arange(image_emb.shape[0])
    logits = logit_scale * image_emb @ text_emb.T  # (B, B)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


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


def test_eq2_loss_matches_brute_force():
    images, texts, targets = unit_rows(5, seed=0), unit_rows(3, seed=1), [0, 2, 1, 2, 0]
    loss = eq2_loss(images @ texts.T, torch.tensor(targets), 1 / SCALE)
    assert loss.item() == pytest.approx(eq2(images, texts, targets), rel=1e-5)


def test_eq2_loss_accepts_a_tensor_temperature():
    images, texts, targets = unit_rows(5), unit_rows(3, seed=1), torch.tensor([0, 1, 2, 1, 0])
    expected = eq2_loss(images @ texts.T, targets, 1 / SCALE)
    torch.testing.assert_close(eq2_loss(images @ texts.T, targets, torch.tensor(1 / SCALE)), expected)


def test_eq2_loss_gradient_when_all_images_share_one_caption():
    images = unit_rows(4).requires_grad_(True)
    loss = eq2_loss(images @ unit_rows(3, seed=1).T, torch.zeros(4, dtype=torch.long), 1 / SCALE)
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


def itm(scores: list[list[float]], targets: list[int]) -> float:
    """Half the mean -log sigmoid(s) over the positive pairs plus half the mean -log(1 - sigmoid(s))
    over the negative ones (every other caption of each image)."""
    pos, neg = [], []
    for row, t in zip(scores, targets):
        for k, s in enumerate(row):
            p = 1 / (1 + math.exp(-s))
            (pos if k == t else neg).append(-math.log(p if k == t else 1 - p))
    return 0.5 * (sum(pos) / len(pos) + sum(neg) / len(neg))


def test_itm_loss_matches_brute_force():
    from ktpipe.transfer.losses import itm_loss

    scores = torch.tensor([[2.0, -1.0, 0.5], [0.3, 1.5, -2.0], [-0.7, 0.2, 3.0], [1.0, 0.0, -1.0]])
    targets = [0, 1, 2, 2]  # 4 positives, 8 negatives: the halves weigh equally, not per pair
    assert itm_loss(scores, torch.tensor(targets)).item() == pytest.approx(itm(scores.tolist(), targets), rel=1e-6)
    # raising a positive's logit lowers the loss, raising a negative's raises it
    up = scores.clone().requires_grad_(True)
    itm_loss(up, torch.tensor(targets)).backward()
    assert up.grad[0, 0] < 0 and up.grad[0, 1] > 0


def test_coca_loss_is_the_sum_of_its_weighted_terms():
    from ktpipe.transfer.losses import coca_loss

    assert coca_loss(torch.tensor(0.75), torch.tensor(0.5)).item() == 1.25
