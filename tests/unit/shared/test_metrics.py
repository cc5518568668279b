"""Segmentation metrics: hand-computed cases, a brute-force cross-check, spacing, the empty policy."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from shared.data.classes import CARDIAC_CLASSES
from shared.metrics import (
    EMPTY_POLICY,
    asd,
    binary_metrics,
    dice,
    evaluate_volume,
    format_table,
    hd95,
    jaccard,
    summarise,
)


def _cube(shape, lo, hi) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))] = True
    return m


def _brute_surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of the mask with a 6-neighbour outside the mask or outside the array."""
    padded = np.pad(mask, 1)
    inner = padded[1:-1, 1:-1, 1:-1].copy()
    for axis in range(3):
        for shift in (-1, 1):
            inner &= np.roll(padded, shift, axis=axis)[1:-1, 1:-1, 1:-1]
    return np.argwhere(mask & ~inner)


def _brute(pred, gt, spacing=(1.0, 1.0, 1.0)):
    sp = np.asarray(spacing)
    a, b = _brute_surface(pred) * sp, _brute_surface(gt) * sp
    d = cdist(a, b)
    d1, d2 = d.min(axis=1), d.min(axis=0)
    return float(np.percentile(np.hstack((d1, d2)), 95)), float(d1.mean())


def test_shifted_cubes_exact_overlap():
    gt = _cube((30, 30, 30), (5, 5, 5), (15, 15, 15))
    pred = _cube((30, 30, 30), (5, 5, 7), (15, 15, 17))  # shifted by 2 voxels along x
    assert dice(pred, gt) == pytest.approx(1600 / 2000)  # |P&G| = 10*10*8
    assert jaccard(pred, gt) == pytest.approx(800 / 1200)


def test_single_voxels_known_distances():
    gt = _cube((10, 10, 10), (1, 1, 1), (2, 2, 2))
    pred = _cube((10, 10, 10), (4, 5, 1), (5, 6, 2))  # offset (3, 4, 0) voxels
    assert hd95(pred, gt) == pytest.approx(5.0)
    assert asd(pred, gt) == pytest.approx(5.0)
    # anisotropic spacing (z, y, x) = (2, 1, 1) mm: sqrt(6^2 + 4^2)
    assert hd95(pred, gt, spacing=(2.0, 1.0, 1.0)) == pytest.approx(np.sqrt(52.0))
    m = binary_metrics(pred, gt, spacing=(10.0, 1.5, 1.5))
    assert m["hd95"] == pytest.approx(5.0)  # voxels unchanged
    assert m["hd95_mm"] == pytest.approx(np.hypot(30.0, 6.0))


def test_thick_slices_scale_through_plane_distances():
    gt = _cube((12, 20, 20), (2, 5, 5), (6, 15, 15))
    pred = _cube((12, 20, 20), (4, 5, 5), (8, 15, 15))  # 2 slices deeper
    vox = binary_metrics(pred, gt)
    mm = binary_metrics(pred, gt, spacing=(10.0, 1.0, 1.0))
    assert vox["hd95"] == pytest.approx(2.0)
    assert mm["hd95_mm"] == pytest.approx(20.0)  # the 2-slice offset is 20 mm at 10 mm slices
    assert mm["asd_mm"] > 5 * vox["asd"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_surface_distances(seed):
    rng = np.random.default_rng(seed)
    shape = (8, 24, 20)
    gt = _cube(shape, (1, 3, 2), (6, 17, 14)) | _cube(shape, (0, 0, 0), (3, 5, 4))  # touches the border
    pred = gt.copy()
    flip = rng.random(shape) < 0.08
    pred ^= flip
    spacing = (5.0, 1.3, 1.3)
    h, a = _brute(pred, gt)
    hm, am = _brute(pred, gt, spacing)
    m = binary_metrics(pred, gt, spacing)
    assert m["hd95"] == pytest.approx(h) and m["asd"] == pytest.approx(a)
    assert m["hd95_mm"] == pytest.approx(hm) and m["asd_mm"] == pytest.approx(am)


def test_asd_is_directed_like_medpy():
    gt = _cube((20, 20, 20), (5, 5, 5), (12, 12, 12))
    pred = gt.copy()
    pred[18, 18, 18] = True  # one stray voxel far from the ground truth
    forward, backward = asd(pred, gt), asd(gt, pred)
    assert forward > backward == pytest.approx(0.0)
    assert hd95(pred, gt) == pytest.approx(hd95(gt, pred))  # hd95 is symmetric


def test_empty_policy_follows_ssl4mis():
    assert EMPTY_POLICY == "ssl4mis"
    some = _cube((5, 5, 5), (1, 1, 1), (3, 3, 3))
    none = np.zeros((5, 5, 5), bool)
    for pred, gt in ((none, some), (some, none), (none, none)):
        m = binary_metrics(pred, gt, spacing=(1, 1, 1))
        assert (m["dice"], m["jaccard"], m["hd95"], m["asd"], m["hd95_mm"], m["asd_mm"]) == (0, 0, 0, 0, 0, 0)
        assert m["pred_empty"] == (not pred.any()) and m["gt_empty"] == (not gt.any())
    perfect = binary_metrics(some, some)
    assert perfect["dice"] == 1.0 and perfect["hd95"] == 0.0 and perfect["asd"] == 0.0


def test_evaluate_summarise_and_table():
    gt = np.zeros((6, 20, 20), np.uint8)
    gt[1:5, 2:8, 2:8] = 1
    gt[1:5, 10:16, 10:16] = 2
    gt[1:5, 12:14, 12:14] = 3
    pred = gt.copy()
    pred[1:5, 2:8, 2:5] = 0  # RV half missing
    r1 = evaluate_volume(pred, gt, CARDIAC_CLASSES, spacing=(10.0, 1.5, 1.5), case_id="a")
    r2 = evaluate_volume(gt, gt, CARDIAC_CLASSES, spacing=(10.0, 1.5, 1.5), case_id="b")
    assert list(r1["classes"]) == ["RV", "Myo", "LV"]  # background skipped
    assert r1["classes"]["RV"]["dice"] == pytest.approx(2 * 72 / (72 + 144))
    assert r1["classes"]["Myo"]["dice"] == 1.0
    s = summarise([r1, r2])
    assert s["n_volumes"] == 2
    assert s["per_class"]["RV"]["dice"]["mean"] == pytest.approx((2 / 3 + 1) / 2)
    assert s["mean"]["dice"] == pytest.approx(((2 / 3 + 1) / 2 + 1 + 1) / 3)
    assert "hd95_mm" in s["metrics"]
    table = format_table(s)
    for word in ("RV", "Myo", "LV", "mean", "Dice %", "HD95 mm"):
        assert word in table
    assert "83.33" in table  # RV mean Dice in percent
    with pytest.raises(ValueError):
        evaluate_volume(pred, gt[:3], CARDIAC_CLASSES)
    assert list(evaluate_volume(pred, gt, [1, 3])["classes"]) == ["1", "3"]
