"""Box conversions and overlaps against hand-computed cases (disjoint, nested, identical, touching)."""
import torch

from pretrain import box_ops


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_conversions_round_trip_and_values():
    cxcywh = t([0.5, 0.5, 0.2, 0.4], [0.1, 0.9, 0.2, 0.2])
    xyxy = box_ops.box_cxcywh_to_xyxy(cxcywh)
    assert torch.allclose(xyxy, t([0.4, 0.3, 0.6, 0.7], [0.0, 0.8, 0.2, 1.0]))
    assert torch.allclose(box_ops.box_xyxy_to_cxcywh(xyxy), cxcywh)
    assert torch.allclose(box_ops.box_xywh_to_xyxy(t([10, 20, 30, 40])), t([10, 20, 40, 60]))
    assert torch.allclose(box_ops.box_xyxy_to_xywh(t([10, 20, 40, 60])), t([10, 20, 30, 40]))


def test_pairwise_iou_and_giou_hand_cases():
    a = t([0, 0, 2, 2])
    b = t([0, 0, 2, 2],      # identical: iou 1, giou 1
          [3, 3, 4, 4],      # disjoint: iou 0, hull 4x4=16, union 5 -> giou -11/16
          [0.5, 0.5, 1.5, 1.5],  # nested: inter 1, union 4 -> iou 0.25 = giou
          [1, 0, 3, 2])      # half overlap: inter 2, union 6 -> 1/3; hull 3x2=6 -> giou 1/3
    iou, union = box_ops.box_iou(a, b)
    assert iou.shape == (1, 4)
    assert torch.allclose(iou[0], t(1.0, 0.0, 0.25, 1 / 3))
    assert torch.allclose(union[0], t(4.0, 5.0, 4.0, 6.0))
    giou = box_ops.generalized_box_iou(a, b)
    assert torch.allclose(giou[0], t(1.0, 0.0 - 11 / 16, 0.25, 1 / 3))


def test_elementwise_matches_diagonal_of_pairwise():
    a = t([0, 0, 2, 2], [0, 0, 2, 2], [0, 0, 2, 2], [0, 0, 1, 1])
    b = t([0, 0, 2, 2], [3, 3, 4, 4], [0.5, 0.5, 1.5, 1.5], [1, 1, 2, 2])  # last: touching corners
    iou = box_ops.elementwise_iou(a, b)
    giou = box_ops.elementwise_giou(a, b)
    assert torch.allclose(iou, t(1.0, 0.0, 0.25, 0.0))
    assert torch.allclose(giou, t(1.0, -11 / 16, 0.25, -0.5))
    assert torch.allclose(giou, torch.diagonal(box_ops.generalized_box_iou(a, b)))


def test_elementwise_giou_has_gradients_for_degenerate_boxes():
    pred = t([0.5, 0.5, 0.5, 0.5]).requires_grad_()       # zero-area prediction
    loss = 1 - box_ops.elementwise_giou(pred, t([0, 0, 1, 1]))
    loss.sum().backward()
    assert torch.isfinite(pred.grad).all()
