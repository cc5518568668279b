"""Pure logic of the review page: review states and versions on disk, the slice overlay."""

from __future__ import annotations

import numpy as np
import pytest

from services.labeling import review
from services.labeling.render import overlay, thumbnail_slice, windowed


def test_review_states_versions_and_what_goes_into_the_bank(tmp_path):
    assert review.read_review(tmp_path, "c1").state == "unreviewed"
    rev = review.set_state(tmp_path, "c1", "flagged", "RV too small")
    assert (rev.state, rev.comment) == ("flagged", "RV too small")
    assert rev.label_for_bank("labels/c1.nii.gz") is None  # flagged: not vouched for
    assert review.set_state(tmp_path, "c1", "approved").label_for_bank("labels/c1.nii.gz") == "labels/c1.nii.gz"
    v1 = review.add_corrected(tmp_path, "c1", b"first")
    v2 = review.add_corrected(tmp_path, "c1", b"second")
    assert [v.version for v in v2.versions] == [1, 2] and v1.versions[0].path == "reviewed/c1.v1.nii.gz"
    assert (tmp_path / "reviewed" / "c1.v1.nii.gz").read_bytes() == b"first"  # old versions stay
    assert v2.state == "corrected" and v2.label_for_bank("labels/c1.nii.gz") == "reviewed/c1.v2.nii.gz"
    assert [h["state"] for h in review.read_review(tmp_path, "c1").history] == ["flagged", "approved", "corrected", "corrected"]
    assert not (tmp_path / "labels").exists()  # reviews never touch the automatic labels
    with pytest.raises(ValueError):
        review.set_state(tmp_path, "c1", "corrected")
    (tmp_path / "reviews" / "c2.json").write_text("{broken")
    assert review.read_review(tmp_path, "c2").state == "unreviewed"


def test_overlay_tints_only_the_shown_classes_and_windows_the_image():
    image = np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)
    label = np.zeros((4, 4), np.uint8)
    label[0, 0], label[3, 3] = 1, 2
    rgb = overlay(image, label, opacity=1.0, classes={2})
    grey = windowed(image)
    assert tuple(rgb[0, 0]) == (grey[0, 0],) * 3  # class 1 hidden
    assert tuple(rgb[3, 3]) != (grey[3, 3],) * 3  # class 2 tinted
    assert tuple(overlay(image, label, opacity=0.0)[0, 0]) == (grey[0, 0],) * 3
    narrow = windowed(image, centre=0.5, width=0.2)
    assert narrow[0, 0] == 0 and narrow[3, 3] == 255 and 0 < narrow.ravel()[7] < 255  # 7/15 lies in [0.4, 0.6]
    assert thumbnail_slice(np.stack([np.zeros((4, 4)), np.ones((4, 4))]), 2) == 1
    assert thumbnail_slice(np.zeros((5, 4, 4)), 5) == 2
