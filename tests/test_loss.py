"""Losses against values worked out by hand (CPU, tiny tensors)."""
import math

import pytest
import torch

from errors import UserError
from loss import LOSSES, BCELoss, CELoss, DiceBCELoss, DiceLoss, VarianceConstrainedCELoss, build_loss

BIG = 30.0  # sigmoid(30) = 1 - 9.4e-14: a confident logit


def binary_target(rows):
    return torch.tensor([rows], dtype=torch.uint8)  # (1, H, W)


# --- Dice ------------------------------------------------------------------------------------

def test_dice_binary_half_probabilities_without_smoothing():
    # logits 0 -> p = 0.5 on all 4 pixels; g = [[1, 1], [0, 0]].
    # sum p*g = 0.5 + 0.5 = 1; sum p^2 = 4 * 0.25 = 1; sum g^2 = 2
    # Dice = 2 * 1 / (1 + 2) = 2/3  ->  L = 1 - 2/3 = 1/3
    logits = torch.zeros(1, 1, 2, 2)
    loss = DiceLoss(smooth=0.0)(logits, binary_target([[1, 1], [0, 0]]))
    assert loss.item() == pytest.approx(1 / 3, abs=1e-7)


def test_dice_binary_half_probabilities_with_default_smoothing():
    # same sums, s = 1: Dice = (2 * 1 + 1) / (1 + 2 + 1) = 3/4  ->  L = 1/4
    loss = DiceLoss()(torch.zeros(1, 1, 2, 2), binary_target([[1, 1], [0, 0]]))
    assert loss.item() == pytest.approx(0.25, abs=1e-7)


def test_dice_three_classes_equal_logits_without_smoothing():
    # equal logits -> p = 1/3 for each class at both pixels; target = [0, 2].
    # class 0: sum p*g = 1/3, sum p^2 = 2/9, sum g^2 = 1 -> (2/3) / (11/9) = 6/11
    # class 1: sum p*g = 0 -> 0 / (2/9) = 0
    # class 2: like class 0 -> 6/11
    # mean = (12/11) / 3 = 4/11  ->  L = 7/11
    logits = torch.zeros(1, 3, 1, 2)
    target = torch.tensor([[[0, 2]]])
    loss = DiceLoss(smooth=0.0)(logits, target)
    assert loss.item() == pytest.approx(7 / 11, abs=1e-7)


def test_dice_three_classes_equal_logits_with_smoothing():
    # s = 1: class 0: (2/3 + 1) / (2/9 + 1 + 1) = (5/3) / (20/9) = 3/4
    #        class 1: (0 + 1) / (2/9 + 0 + 1) = 9/11
    #        class 2: 3/4
    # mean = (3/4 + 3/4 + 9/11) / 3 = (51/22) / 3 = 17/22  ->  L = 5/22
    loss = DiceLoss(smooth=1.0)(torch.zeros(1, 3, 1, 2), torch.tensor([[[0, 2]]]))
    assert loss.item() == pytest.approx(5 / 22, abs=1e-7)


def test_dice_sums_over_the_batch():
    # Two 1x1x1x2 images, logits 0 (p = 0.5): targets [1, 1] and [0, 0], s = 0.
    # Batch Dice: sum p*g = 1, sum p^2 = 4 * 0.25 = 1, sum g^2 = 2 -> 2/3, L = 1/3.
    # (A mean of per-image Dice would be (2/3 + 0) / 2 = 1/3, L = 2/3.)
    logits = torch.zeros(2, 1, 1, 2)
    target = torch.tensor([[[1, 1]], [[0, 0]]], dtype=torch.uint8)
    assert DiceLoss(smooth=0.0)(logits, target).item() == pytest.approx(1 / 3, abs=1e-7)


def test_dice_perfect_prediction_is_zero():
    target = binary_target([[1, 0], [0, 1]])
    logits = (target.float() * 2 - 1).mul(BIG).unsqueeze(1)  # +30 on foreground, -30 elsewhere
    assert DiceLoss(smooth=0.0)(logits, target).item() == pytest.approx(0.0, abs=1e-6)
    multi = torch.tensor([[[0, 1], [2, 1]]])
    multi_logits = torch.nn.functional.one_hot(multi, 3).permute(0, 3, 1, 2).float() * BIG
    assert DiceLoss()(multi_logits, multi).item() == pytest.approx(0.0, abs=1e-6)


def test_dice_empty_foreground():
    empty = binary_target([[0, 0], [0, 0]])
    # logits 0, s = 1: sum p*g = 0, sum p^2 = 1, sum g^2 = 0 -> Dice = 1 / 2, L = 1/2 (finite)
    assert DiceLoss()(torch.zeros(1, 1, 2, 2), empty).item() == pytest.approx(0.5, abs=1e-7)
    # confident background: sum p^2 ~ 4e-26 -> Dice = 1 / 1 -> L = 0
    assert DiceLoss()(torch.full((1, 1, 2, 2), -BIG), empty).item() == pytest.approx(0.0, abs=1e-6)


def test_dice_gradients_are_finite():
    for logits, target in [
        (torch.zeros(2, 1, 3, 3), torch.zeros(2, 3, 3, dtype=torch.uint8)),
        (torch.full((2, 1, 3, 3), -BIG), torch.zeros(2, 3, 3, dtype=torch.uint8)),
        (torch.randn(2, 4, 3, 3), torch.randint(0, 4, (2, 3, 3))),
    ]:
        logits.requires_grad_(True)
        DiceLoss()(logits, target).backward()
        assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("loss_class", [DiceLoss, BCELoss, DiceBCELoss])
def test_binary_losses_reject_bad_shapes_and_values(loss_class):
    loss = loss_class()
    logits = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="shape"):
        loss(logits, torch.zeros(1, 2, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="shape"):
        loss(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\{0, 1\}"):
        loss(logits, binary_target([[0, 2], [0, 0]]))
    with pytest.raises(ValueError, match="integer"):
        loss(logits, torch.zeros(1, 2, 2))


def test_dice_rejects_a_class_beyond_the_logits():
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        DiceLoss()(torch.zeros(1, 3, 1, 2), torch.tensor([[[0, 3]]]))
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        DiceLoss()(torch.zeros(1, 3, 1, 2), torch.tensor([[[-1, 0]]]))


# --- cross-entropy -------------------------------------------------------------------------

def test_bce_matches_hand_values():
    # logit 0 -> -log(1/2) = ln 2 whatever the target
    assert BCELoss()(torch.zeros(1, 1, 2, 2), binary_target([[1, 0], [0, 1]])).item() == pytest.approx(
        math.log(2), abs=1e-7)
    # logits [0, ln 3], targets [1, 1]: -log(1/2) = ln 2, -log(3/4) = ln(4/3)
    # mean = (ln 2 + ln(4/3)) / 2 = ln(8/3) / 2
    logits = torch.tensor([[[[0.0, math.log(3)]]]])
    assert BCELoss()(logits, binary_target([[1, 1]])).item() == pytest.approx(math.log(8 / 3) / 2, abs=1e-7)


def test_ce_matches_hand_values():
    # equal logits over 3 classes -> -log(1/3) = ln 3
    assert CELoss()(torch.zeros(1, 3, 1, 2), torch.tensor([[[0, 2]]])).item() == pytest.approx(
        math.log(3), abs=1e-7)
    # logits [ln 2, 0, 0] (softmax = [1/2, 1/4, 1/4]), target 0 -> ln 2; target 1 -> ln 4
    logits = torch.tensor([math.log(2), 0.0, 0.0]).view(1, 3, 1, 1).repeat(1, 1, 1, 2)
    target = torch.tensor([[[0, 1]]], dtype=torch.uint8)
    assert CELoss()(logits, target).item() == pytest.approx((math.log(2) + math.log(4)) / 2, abs=1e-7)


def test_cross_entropy_channel_checks():
    with pytest.raises(ValueError, match="CELoss"):
        BCELoss()(torch.zeros(1, 2, 1, 1), torch.zeros(1, 1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="BCELoss"):
        CELoss()(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, dtype=torch.long))


def test_dice_bce_is_the_sum():
    # binary, logits 0, g = [[1, 1], [0, 0]]: Dice (s = 1) = 1/4 (above), BCE = ln 2
    target = binary_target([[1, 1], [0, 0]])
    assert DiceBCELoss()(torch.zeros(1, 1, 2, 2), target).item() == pytest.approx(0.25 + math.log(2), abs=1e-6)
    # 3 classes, equal logits, target [0, 2]: Dice (s = 1) = 5/22 (above), CE = ln 3
    multi = DiceBCELoss()(torch.zeros(1, 3, 1, 2), torch.tensor([[[0, 2]]]))
    assert multi.item() == pytest.approx(5 / 22 + math.log(3), abs=1e-6)


# --- mixed precision -------------------------------------------------------------------------

@pytest.mark.parametrize("name,k", [("dice", 1), ("dice", 4), ("bce", 1), ("ce", 4),
                                    ("dice_bce", 1), ("dice_bce", 4)])
def test_losses_are_float32_under_bfloat16_autocast(name, k):
    torch.manual_seed(0)
    logits = torch.randn(2, k, 8, 8)
    target = torch.randint(0, max(k, 2), (2, 8, 8))
    loss = build_loss(name, k)
    reference = loss(logits.bfloat16().float(), target)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = loss(logits.bfloat16(), target)
    assert mixed.dtype == torch.float32
    assert mixed.item() == pytest.approx(reference.item(), abs=1e-6)


# --- registry ------------------------------------------------------------------------------------

def test_build_loss_returns_each_loss():
    assert LOSSES == ("dice", "bce", "ce", "dice_bce", "varce", "weighted_bce_dice", "weighted_bce_cldice")
    assert isinstance(build_loss("varce", 1), VarianceConstrainedCELoss)
    assert isinstance(build_loss("dice", 1), DiceLoss)
    assert isinstance(build_loss("dice", 5), DiceLoss)
    assert isinstance(build_loss("bce", 1), BCELoss)
    assert isinstance(build_loss("ce", 2), CELoss)
    assert isinstance(build_loss("dice_bce", 1), DiceBCELoss)
    assert isinstance(build_loss("dice_bce", 3), DiceBCELoss)


def test_build_loss_explains_mismatched_cross_entropy():
    with pytest.raises(UserError, match="'ce'"):
        build_loss("bce", 3)
    with pytest.raises(UserError, match="'bce'"):
        build_loss("ce", 1)


def test_build_loss_lists_valid_names():
    with pytest.raises(UserError) as error:
        build_loss("focal", 1)
    for name in LOSSES:
        assert name in str(error.value)
    with pytest.raises(UserError):
        build_loss("dice", 0)
