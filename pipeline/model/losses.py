"""Training losses: the mask loss `train.loss` names plus the presence head's BCE.

Each has a reference: Lovasz and focal equal smp's `LovaszLoss` / `FocalLoss` (tests/test_losses.py
checks it); the soft Dice is the positives-only variant (empty truths are left to BCE and the
presence head), per image or, with `train.dice_scope: batch`, smp's binary `DiceLoss` over the batch.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from pipeline.params import TrainParams


def soft_dice_loss(probs: torch.Tensor, target: torch.Tensor, eps: float = 1.0, scope: str = "image") -> torch.Tensor:
    """1 - mean soft Dice over the images with a non-empty truth (`scope` "image"), or 1 - the soft
    Dice of the whole batch taken as one region ("batch": nnU-Net's 2d choice, where an empty
    image's false positives count against the batch's nerves).

    Empty images are left to the BCE terms and the presence head: a per-image soft Dice of
    an empty truth only rewards predicting nothing, which fights the positives. A batch without
    a nerve gives no Dice loss in either scope.
    """
    if scope == "batch":
        probs, target = probs.reshape(1, -1), target.reshape(1, -1)
    dims = tuple(range(1, probs.ndim))
    truth_area = target.sum(dims)
    positive = truth_area > 0
    if not positive.any():
        return probs.new_zeros(())
    dice = (2 * (probs * target).sum(dims) + eps) / (probs.sum(dims) + truth_area + eps)
    return 1 - dice[positive].mean()


def lovasz_hinge_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the images of the per-image binary Lovasz hinge (Berman et al. 2018), all images at once.

    The Lovasz extension of each image's Jaccard loss, applied to the hinge errors
    `1 - logit * sign`. An empty truth's Jaccard is 1 minus "any false positive", and its Lovasz
    extension is the hinge of the single most confident pixel, relu(1 + max logit): it asks for
    nothing above -1 and leaves the rest alone. Equals smp's `LovaszLoss("binary", per_image=True)`.
    """
    logits, target = logits.flatten(1), target.flatten(1).to(logits.dtype)
    errors = 1.0 - logits * (2.0 * target - 1.0)
    errors_sorted, order = torch.sort(errors, dim=1, descending=True)
    truth = torch.gather(target, 1, order)
    area = truth.sum(1, keepdim=True)
    jaccard = 1.0 - (area - truth.cumsum(1)) / (area + (1.0 - truth).cumsum(1))
    grad = torch.cat([jaccard[:, :1], jaccard[:, 1:] - jaccard[:, :-1]], dim=1)
    return (F.relu(errors_sorted) * grad).sum(1).mean()


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float) -> torch.Tensor:
    """Pixel mean of the binary focal loss (1 - p_t)^gamma * BCE (Lin et al. 2017, no alpha);
    gamma 0 is the BCE. Equals smp's `FocalLoss("binary", gamma=gamma)`."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return ((1.0 - torch.exp(-bce)).pow(gamma) * bce).mean()


def mask_loss(mask_logits: torch.Tensor, target: torch.Tensor, t: TrainParams) -> torch.Tensor:
    """The pixel loss `train.loss` names, on float32 logits."""
    if t.loss == "lovasz":
        return lovasz_hinge_loss(mask_logits, target)
    pixel = (F.binary_cross_entropy_with_logits(mask_logits, target) if t.loss == "bce_dice"
             else focal_loss(mask_logits, target, t.focal_gamma))
    return t.bce_weight * pixel + t.dice_weight * soft_dice_loss(torch.sigmoid(mask_logits), target,
                                                                 scope=t.dice_scope)


def scale_weights(sides: int) -> list[float]:
    """Weights of the full-resolution mask loss and of `sides` coarser ones: halved per level and
    summing to 1 (nnU-Net's deep supervision weights), so the mask loss keeps its size."""
    weights = [0.5 ** level for level in range(sides + 1)]
    return [w / sum(weights) for w in weights]


def compute_loss(mask_logits: torch.Tensor, presence_logit: torch.Tensor, target: torch.Tensor,
                 t: TrainParams, side_logits: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """The mask loss (`mask_loss`) + presence_weight * presence BCE.

    Default (`bce_dice`): bce_weight * pixel BCE + dice_weight * soft Dice + presence_weight * presence BCE.
    With deep supervision's `side_logits` (coarser, finest first) the mask loss is the
    `scale_weights` sum of it at every resolution, each against the truth resized by nearest
    neighbour (nnU-Net's choice: the targets stay 0/1)."""
    mask_logits, presence_logit = mask_logits.float(), presence_logit.float()
    present = (target.flatten(1).amax(1) > 0).float()
    weights = scale_weights(len(side_logits))
    masks = weights[0] * mask_loss(mask_logits, target, t)
    for weight, logits in zip(weights[1:], side_logits):
        small = F.interpolate(target, size=logits.shape[-2:], mode="nearest")
        masks = masks + weight * mask_loss(logits.float(), small, t)
    return masks + t.presence_weight * F.binary_cross_entropy_with_logits(presence_logit, present)
