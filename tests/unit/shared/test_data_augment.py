"""Batched torch augmentations: geometric parameters re-applicable to labels, strong augs, BCP masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shared.data.augment import (
    GeometricParams,
    apply_geometric,
    bcp_copy_paste_mask,
    color_jitter,
    cutmix_box,
    cutout,
    gaussian_blur,
    resize,
    sample_geometric,
    strong_augment,
    weak_augment,
)
from shared.data.resize import resize_image, resize_label


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _params(k, flip, angle) -> GeometricParams:
    return GeometricParams(torch.tensor(k), torch.tensor(flip), torch.tensor(angle, dtype=torch.float32))


def test_sampling_is_seeded_and_follows_ssl4mis():
    a, b = sample_geometric(4000, _gen(1)), sample_geometric(4000, _gen(1))
    assert torch.equal(a.k, b.k) and torch.equal(a.flip, b.flip) and torch.equal(a.angle, b.angle)
    rot_flip = a.flip > 0
    rotate = a.angle != 0
    assert not (rot_flip & rotate).any()
    assert abs(rot_flip.float().mean().item() - 0.5) < 0.03  # p = 1/2
    assert abs(rotate.float().mean().item() - 0.25) < 0.03  # p = 1/2 of the rest
    assert a.angle.abs().max() <= 20 and set(a.k.tolist()) <= {0, 1, 2, 3}
    assert (a.k[~rot_flip] == 0).all()


def test_rot90_and_flip_are_exact():
    x = torch.arange(2 * 5 * 5, dtype=torch.float32).reshape(2, 5, 5)
    out = apply_geometric(x, _params([1, 3], [0, 2], [0.0, 0.0]))
    assert torch.equal(out[0], torch.rot90(x[0], 1, (0, 1)))
    assert torch.equal(out[1], torch.flip(torch.rot90(x[1], 3, (0, 1)), (1,)))
    labels = x.long()
    assert torch.equal(apply_geometric(labels, _params([1, 3], [0, 2], [0.0, 0.0]), "nearest"), out.long())


def test_rotation_direction_matches_rot90():
    x = torch.rand(3, 1, 16, 16, generator=_gen(2))
    by_angle = apply_geometric(x, _params([0, 0, 0], [0, 0, 0], [90.0, -90.0, 180.0]))
    by_k = apply_geometric(x, _params([1, 3, 2], [0, 0, 0], [0.0, 0.0, 0.0]))
    assert torch.allclose(by_angle, by_k, atol=1e-4)  # positive angle = counter-clockwise like k=1


def test_rotation_of_labels_keeps_classes_and_shape():
    lab = torch.zeros(2, 32, 24, dtype=torch.long)
    lab[:, 8:20, 6:18] = 3
    out = apply_geometric(lab, _params([0, 2], [1, 0], [15.0, -20.0]), "nearest")
    assert out.dtype == torch.long and out.shape == lab.shape
    assert set(out.unique().tolist()) <= {0, 3}
    with pytest.raises(ValueError, match="square"):
        apply_geometric(lab, _params([1, 0], [0, 0], [0.0, 0.0]), "nearest")


def test_same_params_reapply_to_probability_maps():
    # a pseudo-label computed on the canonical slice follows the image through the same transform
    g = _gen(3)
    image = torch.rand(6, 1, 32, 32, generator=g)
    prob = torch.softmax(torch.randn(6, 4, 32, 32, generator=g), dim=1)
    params = sample_geometric(6, _gen(4))
    img_aug = apply_geometric(image, params)
    prob_aug = apply_geometric(prob, params)
    hard = apply_geometric(prob.argmax(1), params, "nearest")
    unrotated = params.angle == 0
    assert torch.equal(prob_aug[unrotated].argmax(1), hard[unrotated])
    assert img_aug.shape == image.shape and prob_aug.shape == prob.shape


def test_resize_matches_numpy_resize():
    x = np.random.default_rng(0).random((2, 30, 20)).astype(np.float32)
    lab = (x > 0.5).astype(np.int64)
    assert np.allclose(resize(torch.from_numpy(x), 64).numpy(), resize_image(x, (64, 64)), atol=1e-5)
    assert np.array_equal(resize(torch.from_numpy(lab), 64, "nearest").numpy(), resize_label(lab, (64, 64)))


def test_weak_augment_shapes_and_determinism():
    img = torch.rand(4, 40, 30, generator=_gen(5))
    lab = (img > 0.5).long()
    a = weak_augment(img, lab, _gen(6), size=64)
    b = weak_augment(img, lab, _gen(6), size=64)
    assert a.image.shape == (4, 64, 64) and a.label.shape == (4, 64, 64)
    assert torch.equal(a.image, b.image) and torch.equal(a.label, b.label)
    assert set(a.label.unique().tolist()) <= {0, 1}


def test_color_jitter_and_blur():
    x = torch.rand(8, 1, 32, 32, generator=_gen(7))
    j = color_jitter(x, _gen(8), p=1.0)
    assert j.min() >= 0 and j.max() <= 1 and not torch.equal(j, x)
    assert torch.equal(color_jitter(x, _gen(8), p=0.0), x)
    assert torch.allclose(gaussian_blur(x, _gen(9), p=0.0), x, atol=1e-6)
    blurred = gaussian_blur(x, _gen(9), p=1.0, sigma=(1.5, 2.0))
    assert blurred.std() < 0.6 * x.std()  # white noise loses most of its variance
    assert torch.allclose(blurred.mean(), x.mean(), atol=0.02)


def test_cutout_mask_marks_changed_pixels():
    x = torch.rand(6, 32, 32, generator=_gen(10)) + 0.5
    out, mask = cutout(x, _gen(11), p=1.0)
    assert mask.shape == (6, 32, 32) and mask.any(dim=(1, 2)).all()
    assert (out[mask] == 0).all() and torch.equal(out[~mask], x[~mask])
    s, m = strong_augment(torch.rand(3, 1, 16, 16, generator=_gen(12)), _gen(13))
    assert s.shape == (3, 1, 16, 16) and m.shape == (3, 16, 16)


def test_bcp_mask_follows_generate_mask():
    m = bcp_copy_paste_mask(4, 30, generator=_gen(14))
    assert m.shape == (4, 30, 30) and m.dtype == torch.long
    assert (m == m[0]).all()  # one box for the batch, as BCP
    zeros = (m[0] == 0).nonzero()
    assert (m[0] == 0).sum() == 20 * 20  # box of int(30 * 2/3) on each side, 0 inside
    y0, x0 = zeros.min(0).values.tolist()
    assert 0 <= y0 < 10 and 0 <= x0 < 10
    per = bcp_copy_paste_mask(64, (24, 36), generator=_gen(15), per_sample=True)
    assert ((per == 0).sum(dim=(1, 2)) == 16 * 24).all()
    assert len({tuple((p == 0).nonzero().min(0).values.tolist()) for p in per}) > 1
    assert torch.equal(
        bcp_copy_paste_mask(2, 30, generator=_gen(14)), bcp_copy_paste_mask(2, 30, generator=_gen(14))
    )


def test_cutmix_box():
    box = cutmix_box(16, 32, _gen(16), p=1.0)
    assert box.shape == (16, 32, 32) and set(box.unique().tolist()) == {0, 1}
    assert cutmix_box(4, 32, _gen(16), p=0.0).sum() == 0
