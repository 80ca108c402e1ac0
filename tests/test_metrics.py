"""Grounding metrics against hand-computed values, and the letterbox inverse."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from finetune.metrics import (box_iou_xywh, expression_record, format_table, summarize, unletterbox_box,
                              unletterbox_mask)


def test_box_iou_around_half():
    gt = [0, 0, 10, 10]
    assert box_iou_xywh([0, 0, 10, 5.1], gt) == pytest.approx(0.51)
    assert box_iou_xywh([0, 0, 10, 4.9], gt) == pytest.approx(0.49)
    assert box_iou_xywh([0, 0, 20, 10], gt) == 0.5                     # exactly 0.5 counts
    assert box_iou_xywh([20, 20, 5, 5], gt) == 0.0
    recs = [expression_record(b, gt, None, None) for b in ([0, 0, 10, 5.1], [0, 0, 10, 4.9], [0, 0, 20, 10])]
    assert summarize(recs)["rec"]["prec@0.5"] == pytest.approx(2 / 3)
    assert "res" not in summarize(recs)


def test_miou_differs_from_oiou():
    gt_a = np.zeros((8, 8), bool)
    gt_a[:4, :4] = True                                              # 16 px, predicted exactly
    gt_b = np.zeros((8, 8), bool)
    gt_b[7, 7] = True                                                # 1 px, predicted with one extra pixel
    pred_b = gt_b.copy()
    pred_b[7, 6] = True
    recs = [expression_record([0, 0, 4, 4], [0, 0, 4, 4], gt_a, gt_a),
            expression_record([6, 7, 2, 1], [7, 7, 1, 1], pred_b, gt_b)]
    assert recs[1]["inter"] == 1 and recs[1]["union"] == 2
    res = summarize(recs)["res"]
    assert res["miou"] == pytest.approx(0.75)
    assert res["oiou"] == pytest.approx(17 / 18)
    assert res["prec@0.5"] == 1.0 and res["prec@0.6"] == 0.5 and res["prec@0.9"] == 0.5
    table = format_table({"val": summarize(recs)})
    assert "val" in table and "75.00" in table and "94.44" in table


def test_box_back_through_letterbox():
    # original 100 (h) x 200 (w) letterboxed into 64: scale 0.32, pad (0, 16)
    scale, offset, orig = 0.32, (0.0, 16.0), (100, 200)
    x, y, w, h = 50, 20, 100, 40
    x0, y0 = x * scale + offset[0], y * scale + offset[1]
    x1, y1 = (x + w) * scale + offset[0], (y + h) * scale + offset[1]
    box = torch.tensor([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0]) / 64
    assert unletterbox_box(box, 64, scale, offset, orig) == pytest.approx([50, 20, 100, 40], abs=1e-4)
    # a box reaching into the padding is clipped to the image
    out = unletterbox_box(torch.tensor([0.5, 0.5, 1.0, 1.0]), 64, scale, offset, orig)
    assert out == pytest.approx([0, 0, 200, 100], abs=1e-4)


def test_mask_back_through_letterbox():
    # integer case: scale 2, pad (3, 1): original pixel (r, c) covers input [1 + 2r, 3 + 2c] .. +2
    orig = np.zeros((5, 4), bool)
    orig[1:3, 2:4] = True
    probs = torch.zeros(12, 12)
    probs[1 + 2:1 + 6, 3 + 4:3 + 8] = 0.9
    back = unletterbox_mask(probs, 2.0, (3.0, 1.0), (5, 4), threshold=0.35)
    assert back.shape == (5, 4)
    np.testing.assert_array_equal(back, orig)
    # downscaling: 100x200 original in a 64 input (scale 0.32, pad_y 16); the rectangle comes back
    rect = np.zeros((100, 200), bool)
    rect[20:60, 50:150] = True
    u = (torch.arange(64) + 0.5)
    ox, oy = (u / 0.32)[None, :], ((u - 16) / 0.32)[:, None]         # input pixel centres in original px
    probs = ((ox >= 50) & (ox < 150) & (oy >= 20) & (oy < 60)).float()
    back = unletterbox_mask(probs, 0.32, (0.0, 16.0), (100, 200))
    inter, union = (back & rect).sum(), (back | rect).sum()
    assert inter / union > 0.9
    assert back[40, 100] and not back[5, 5] and not back[90, 190]
