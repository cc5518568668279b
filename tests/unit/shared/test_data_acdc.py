"""The real ACDC data (SSL4MIS layout), read where VESSA_ACDC_DIR points at it; skipped otherwise."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from shared.data import open_dataset, split_by_patient

ACDC = os.environ.get("VESSA_ACDC_DIR")
pytestmark = pytest.mark.skipif(not ACDC, reason="set VESSA_ACDC_DIR to the ACDC (SSL4MIS layout) directory")


@pytest.fixture(scope="module")
def acdc():
    return open_dataset(Path(ACDC))


def test_counts_and_classes(acdc):
    assert acdc.format == "ssl4mis-h5"
    assert len(acdc.slice_refs()) == 1312
    assert len(acdc.patients()) == 70
    assert len(acdc.volume_ids("val")) == 20
    assert [c.index for c in acdc.classes] == [0, 1, 2, 3]
    assert [c.name for c in acdc.classes] == ["background", "RV", "Myo", "LV"]


def test_slices_and_volumes(acdc):
    refs = acdc.slice_refs()
    for ref in refs[::40]:
        item = acdc.read_labeled(ref)
        assert item.image.ndim == 2 and item.image.dtype == np.float32
        assert item.label.shape == item.image.shape and item.label.dtype == np.uint8
        assert 0.0 <= item.image.min() and item.image.max() <= 1.0
        assert set(np.unique(item.label)) <= {0, 1, 2, 3}
    for case in acdc.volume_ids("val"):
        vol = acdc.read_volume(case, "val")
        assert vol.image.ndim == 3 and vol.label.shape == vol.image.shape
        assert set(np.unique(vol.label)) <= {0, 1, 2, 3}
    with pytest.raises(FileNotFoundError, match="test.list"):
        acdc.volume_ids("test")


@pytest.mark.parametrize(
    ("n", "patients", "slices"),
    [
        (3, {"patient038", "patient050", "patient099"}, 68),
        (
            7,
            {
                "patient038",
                "patient050",
                "patient099",
                "patient021",
                "patient049",
                "patient058",
                "patient100",
            },
            136,
        ),
    ],
)
def test_protocol_split(acdc, n, patients, slices):
    split = split_by_patient(acdc, n)
    assert set(split.labeled_patients) == patients
    assert len(split.labeled) == slices
    assert len(split.unlabeled) == 1312 - slices


def test_prepare_acdc(acdc, tmp_path):
    from shared.data.prepare import cache_size_bytes, prepare_cache

    started = time.perf_counter()
    index = prepare_cache(acdc, tmp_path / "cache", size=256)
    elapsed = time.perf_counter() - started
    size_mb = cache_size_bytes(index) / 1e6
    print(f"ACDC cache: {size_mb:.1f} MB in {elapsed:.1f} s; files {index['sizes']}")
    assert size_mb < 48  # measured: 44.4 MB (training images 37.8 MB with bz2-up)
    cache = open_dataset(tmp_path / "cache")
    assert len(cache.slice_refs()) == 1312 and len(cache.volume_ids("val")) == 20
    ref = acdc.slice_refs()[100]
    assert cache.read_labeled(ref).image.shape == (256, 256)
    assert cache.original_shape(ref) == acdc.read_unlabeled(ref).image.shape
    vol = cache.read_volume(acdc.volume_ids("val")[0], "val")
    src = acdc.read_volume(acdc.volume_ids("val")[0], "val")
    assert np.abs(vol.image - src.image).max() <= 0.5 / 255 + 1e-6
    assert np.array_equal(vol.label, src.label)
