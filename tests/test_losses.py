"""The losses (pipeline/model/losses.py): hand-made cases, smp's implementations as the reference."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from helpers import TINY_TRAIN as TINY
from pipeline.model import losses
from pipeline.params import TrainParams


def test_soft_dice_on_hand_made_masks() -> None:
    target = torch.zeros(3, 1, 4, 4)
    target[0, 0, :2, :2] = 1  # 4 pixels
    target[1, 0, 2:, 2:] = 1  # 4 pixels
    probs = torch.zeros(3, 1, 4, 4)
    probs[0, 0, :2, :2] = 1  # perfect
    probs[1, 0, :2, :2] = 1  # disjoint, 4 pixels
    probs[2] = 1  # an empty truth: left to BCE and the presence head
    expected = 1 - ((2 * 4 + 1) / (8 + 1) + (0 + 1) / (8 + 1)) / 2
    assert losses.soft_dice_loss(probs, target).item() == pytest.approx(expected)
    assert losses.soft_dice_loss(probs[:1], target[:1]).item() == pytest.approx(0.0)
    assert losses.soft_dice_loss(probs[2:], target[2:]).item() == 0.0


def test_total_loss_weights_its_three_terms() -> None:
    target = torch.zeros(2, 1, 4, 4)
    target[0, 0, :2, :] = 1  # 8 of 16 pixels; image 1 empty
    logits, presence = torch.zeros(2, 1, 4, 4), torch.zeros(2)  # p = 0.5 everywhere
    dice = 1 - (2 * 4 + 1) / (8 + 8 + 1)
    for bce_w, dice_w, pres_w in [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (1.0, 1.0, 0.5)]:
        t = dataclasses.replace(TINY, bce_weight=bce_w, dice_weight=dice_w, presence_weight=pres_w)
        expected = bce_w * math.log(2) + dice_w * dice + pres_w * math.log(2)
        assert losses.compute_loss(logits, presence, target, t).item() == pytest.approx(expected, rel=1e-6)


def _confident(target: torch.Tensor, right: bool) -> torch.Tensor:
    """Logits of +-20: the truth when `right`, its opposite otherwise."""
    return (target * 2 - 1) * (20.0 if right else -20.0)


@pytest.mark.parametrize("loss", ["bce_dice", "lovasz", "focal_dice"])
def test_each_loss_is_zero_when_perfect_larger_when_wrong_and_has_gradients(loss: str) -> None:
    target = torch.zeros(3, 1, 8, 8)
    target[0, 0, 2:5, 1:6] = 1
    target[1, 0, :, :3] = 1  # image 2 empty
    t = dataclasses.replace(TINY, loss=loss, presence_weight=0.0)
    assert losses.mask_loss(_confident(target, True), target, t).item() == pytest.approx(0.0, abs=1e-6)
    assert losses.mask_loss(_confident(target, False), target, t).item() > 0.5
    logits = torch.randn(3, 1, 8, 8, requires_grad=True)
    losses.compute_loss(logits, torch.zeros(3), target, t).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_lovasz_and_focal_equal_smp_and_handle_empty_images() -> None:
    from segmentation_models_pytorch.losses import FocalLoss, LovaszLoss

    torch.manual_seed(0)
    logits = torch.randn(4, 1, 8, 8) * 3
    target = (torch.rand(4, 1, 8, 8) > 0.6).float()
    target[1] = 0  # an empty truth
    assert losses.lovasz_hinge_loss(logits, target).item() == pytest.approx(
        LovaszLoss("binary", per_image=True)(logits, target).item(), rel=1e-5)
    for gamma in (0.0, 2.0):
        assert losses.focal_loss(logits, target, gamma).item() == pytest.approx(
            FocalLoss("binary", gamma=gamma)(logits, target).item(), rel=1e-5)
    # an empty truth: only the most confident pixel counts, relu(1 + max logit)
    empty = torch.full((1, 1, 4, 4), -3.0)
    empty[0, 0, 1, 2] = 0.5
    assert losses.lovasz_hinge_loss(empty, torch.zeros_like(empty)).item() == pytest.approx(1.5)
    assert losses.lovasz_hinge_loss(empty - 10, torch.zeros_like(empty)).item() == 0.0
    # focal with gamma 0 is the BCE; with gamma > 0 it discounts the easy pixels
    assert losses.focal_loss(logits, target, 0.0).item() == pytest.approx(
        torch.nn.functional.binary_cross_entropy_with_logits(logits, target).item(), rel=1e-6)
    assert losses.focal_loss(logits, target, 2.0) < losses.focal_loss(logits, target, 0.0)


def test_default_loss_is_the_old_formula() -> None:
    torch.manual_seed(1)
    logits, presence = torch.randn(4, 1, 8, 8), torch.randn(4)
    target = (torch.rand(4, 1, 8, 8) > 0.5).float()
    target[2] = 0
    old = (TINY.bce_weight * torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
           + TINY.dice_weight * losses.soft_dice_loss(torch.sigmoid(logits), target)
           + TINY.presence_weight * torch.nn.functional.binary_cross_entropy_with_logits(
               presence, (target.flatten(1).amax(1) > 0).float()))
    assert TrainParams().loss == "bce_dice"
    assert torch.equal(losses.compute_loss(logits, presence, target, TINY), old)


def test_soft_dice_is_smp_dice_per_positive_image_averaged() -> None:
    """smp's binary DiceLoss scores a batch as one image; on one image at a time it is ours. smp 0.6
    counts the intersection as (|p| + |t| - |p - t|_1) / 2, which is our sum(p * t) for hard
    predictions only: the reference is checked on 0/1 predictions. Its Tversky form adds `smooth`
    once where ours adds eps = 1 twice (2I + 1) / (|p| + |t| + 1): smp's smooth 0.5 is our eps 1."""
    from segmentation_models_pytorch.losses import DiceLoss

    torch.manual_seed(4)
    probs = (torch.rand(5, 1, 12, 10) > 0.5).float()
    target = (torch.rand(5, 1, 12, 10) > 0.6).float()
    target[1] = 0  # an empty truth: ours leaves it out, smp gives it zero loss
    smp_dice = DiceLoss("binary", from_logits=False, smooth=0.5, eps=0.0)
    per_image = [smp_dice(probs[i:i + 1], target[i:i + 1]).item() for i in range(5) if target[i].any()]
    assert losses.soft_dice_loss(probs, target).item() == pytest.approx(sum(per_image) / len(per_image), rel=1e-5)
    assert smp_dice(probs[1:2], target[1:2]).item() == 0.0 == losses.soft_dice_loss(probs[1:2], target[1:2]).item()


def test_deep_supervision_weights_halve_per_level_and_sum_to_one() -> None:
    assert losses.scale_weights(0) == [1.0]
    assert losses.scale_weights(3) == pytest.approx([8 / 15, 4 / 15, 2 / 15, 1 / 15])


@pytest.mark.parametrize("loss", ["bce_dice", "lovasz"])
def test_deep_supervision_scores_each_side_against_the_truth_resized_by_nearest_neighbour(loss: str) -> None:
    """Full-resolution and side mask losses weighted by scale_weights, the presence BCE once; a side whose
    logits match its resized truth adds nothing, a wrong one adds its weight's share."""
    torch.manual_seed(0)
    target = torch.zeros(2, 1, 8, 8)
    target[0, 0, 2:6, 2:8] = 1  # image 1 empty
    t = dataclasses.replace(TINY, loss=loss)
    logits, presence = torch.randn(2, 1, 8, 8), torch.randn(2)
    half, quarter = target[..., ::2, ::2], target[..., ::4, ::4]  # nearest neighbour at 1/2 and 1/4
    assert torch.equal(half, torch.nn.functional.interpolate(target, size=(4, 4), mode="nearest"))
    sides = [torch.randn(2, 1, 4, 4), _confident(quarter, False)]
    w = losses.scale_weights(2)
    presence_part = losses.compute_loss(logits, presence, target, t) - losses.mask_loss(logits, target, t)
    expected = (w[0] * losses.mask_loss(logits, target, t) + w[1] * losses.mask_loss(sides[0], half, t)
                + w[2] * losses.mask_loss(sides[1], quarter, t) + presence_part)
    assert losses.compute_loss(logits, presence, target, t, sides).item() == pytest.approx(expected.item(), rel=1e-6)
    perfect = [_confident(half, True), _confident(quarter, True)]
    assert losses.compute_loss(logits, presence, target, t, perfect).item() == pytest.approx(
        (w[0] * losses.mask_loss(logits, target, t) + presence_part).item(), rel=1e-5, abs=1e-6)


def test_batch_dice_is_smp_dice_over_the_whole_batch() -> None:
    """`dice_scope: batch` is smp's binary DiceLoss as it stands (the batch as one region, zero loss
    without a nerve), on the same 0/1 predictions and smooth 0.5 = our eps 1 as above."""
    from segmentation_models_pytorch.losses import DiceLoss

    torch.manual_seed(5)
    probs = (torch.rand(4, 1, 12, 10) > 0.5).float()
    target = (torch.rand(4, 1, 12, 10) > 0.6).float()
    target[1] = 0  # an empty image: its false positives now count
    smp_dice = DiceLoss("binary", from_logits=False, smooth=0.5, eps=0.0)
    batch = losses.soft_dice_loss(probs, target, scope="batch")
    assert batch.item() == pytest.approx(smp_dice(probs, target).item(), rel=1e-5)
    assert batch.item() != pytest.approx(losses.soft_dice_loss(probs, target).item(), rel=1e-3)
    assert losses.soft_dice_loss(probs[1:2], target[1:2], scope="batch").item() == 0.0


def test_dice_scope_reaches_the_training_loss() -> None:
    torch.manual_seed(6)
    logits, presence = torch.randn(3, 1, 8, 8), torch.randn(3)
    target = (torch.rand(3, 1, 8, 8) > 0.7).float()
    per_image = losses.compute_loss(logits, presence, target, TINY)
    batch = losses.compute_loss(logits, presence, target, dataclasses.replace(TINY, dice_scope="batch"))
    expected = (TINY.dice_weight * (losses.soft_dice_loss(torch.sigmoid(logits), target, scope="batch")
                                    - losses.soft_dice_loss(torch.sigmoid(logits), target)))
    assert (batch - per_image).item() == pytest.approx(expected.item(), abs=1e-6)
