"""Synthetic cardiac MRI generator: determinism, layout, geometry, labels."""

from __future__ import annotations

import functools
import hashlib
import json

import nibabel as nib
import numpy as np
import pytest

from shared.data import open_dataset
from shared.data.classes import CARDIAC_CLASSES
from shared.data.synth import synth_case, write_msd_dataset, write_ssl4mis_layout

_case = functools.lru_cache(maxsize=None)(synth_case)  # each (seed, index) generated once per module


@pytest.fixture(scope="module")
def msd_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth_msd")
    write_msd_dataset(root, cases=5, seed=7)
    return root


def _digest(folder) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_same_seed_identical_different_seed_differs():
    a, b = synth_case(3, 1), synth_case(3, 1)  # uncached on purpose
    assert a.image.tobytes() == b.image.tobytes()
    assert a.label.tobytes() == b.label.tobytes()
    assert a.spacing == b.spacing
    c = _case(4, 1)
    assert a.image.shape != c.image.shape or a.image.tobytes() != c.image.tobytes()
    # a case depends on (seed, index) only, not on how many cases are generated
    assert _case(3, 2).image.tobytes() != a.image.tobytes()


def test_written_files_are_byte_identical(tmp_path):
    write_msd_dataset(tmp_path / "a", cases=2, seed=11, val_fraction=0.0, min_val=0)
    write_msd_dataset(tmp_path / "b", cases=2, seed=11, val_fraction=0.0, min_val=0)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")


@pytest.mark.parametrize("index", range(5))
def test_case_geometry_and_labels(index):
    case = _case(7, index)  # the fixture's cases
    d, h, w = case.image.shape
    assert 8 <= d <= 12
    assert 160 <= h <= 224 and 160 <= w <= 224
    assert case.image.dtype == np.int16 and case.label.dtype == np.uint8
    assert case.label.shape == case.image.shape
    assert set(np.unique(case.label)) <= {0, 1, 2, 3}
    assert {1, 2, 3} <= set(np.unique(case.label))  # every class present in every volume
    dz, dy, dx = case.spacing
    assert 5.0 <= dz <= 10.0 and 1.2 <= dy <= 1.8 and dy == dx
    assert 0 <= case.image.min() and 600 < case.image.max() < 3000  # MR-like arbitrary units
    # structures shrink toward the apex: LV cavity area at the base exceeds the last slices'
    lv = (case.label == 3).reshape(d, -1).sum(1)
    assert lv[0] > lv[-1]
    # blood pool brighter than myocardium, on average
    img = case.image.astype(np.float32)
    assert img[case.label == 3].mean() > 1.8 * img[case.label == 2].mean()


def test_not_trivially_thresholdable():
    # bright distractors (aorta, fat, vessels) mean a global threshold cannot find the LV
    case = _case(7, 0)
    img, lv = case.image.astype(np.float32), case.label == 3
    best = 0.0
    for thr in np.quantile(img, np.linspace(0.5, 0.999, 60)):
        pred = img > thr
        best = max(best, 2 * (pred & lv).sum() / (pred.sum() + lv.sum()))
    assert best < 0.75


def test_msd_layout(msd_root):
    meta = json.loads((msd_root / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "RV": 1, "Myo": 2, "LV": 3}
    assert meta["channel_names"] == {"0": "MRI"}
    assert meta["numTraining"] == 5 and meta["description"]
    splits = json.loads((msd_root / "splits.json").read_text())
    assert len(splits["val"]) == 2 and len(splits["train"]) == 3
    assert not set(splits["val"]) & set(splits["train"])
    for case in splits["train"] + splits["val"]:
        assert (msd_root / "imagesTr" / f"{case}_0000.nii.gz").is_file()
        assert (msd_root / "labelsTr" / f"{case}.nii.gz").is_file()
        case_index = int(case[-3:])
        img = nib.load(msd_root / "imagesTr" / f"{case}_0000.nii.gz")
        ref = _case(7, case_index)
        zooms = img.header.get_zooms()
        assert np.allclose((zooms[2], zooms[0], zooms[1]), ref.spacing, atol=1e-4)  # spacing in the header
        assert np.array_equal(np.asanyarray(img.dataobj).transpose(2, 0, 1), ref.image)


def test_open_dataset_reads_synth(msd_root):
    ds = open_dataset(msd_root)
    assert ds.format == "msd-nifti"
    assert [c.name for c in ds.classes] == ["background", "RV", "Myo", "LV"]
    refs = ds.slice_refs()
    assert ds.patients() == ["synth000", "synth001", "synth002"]
    assert len(refs) == sum(_case(7, i).image.shape[0] for i in range(3))
    item = ds.read_labeled(refs[3])
    assert item.image.dtype == np.float32 and 0.0 <= item.image.min() and item.image.max() <= 1.0
    assert item.label.dtype == np.uint8 and item.label.shape == item.image.shape
    ref = _case(7, 0)
    assert np.array_equal(item.label, ref.label[refs[3].slice_index])
    assert ds.volume_ids("val") == ["synth003", "synth004"]
    vol = ds.read_volume("synth003", "val")
    assert vol.image.ndim == 3 and vol.label.shape == vol.image.shape
    assert np.isclose(vol.image.min(), 0) and np.isclose(vol.image.max(), 1)  # min-max normalised
    assert vol.spacing == pytest.approx(_case(7, 3).spacing, abs=1e-4)
    with pytest.raises(FileNotFoundError, match="test"):
        ds.volume_ids("test")


def test_test_split_and_too_few_cases(tmp_path):
    write_msd_dataset(tmp_path / "t", cases=3, seed=1, test_cases=1, min_val=1)
    ds = open_dataset(tmp_path / "t")
    assert ds.volume_ids("test") == ["synth003"]
    assert ds.read_volume("synth003", "test").label is not None
    assert (tmp_path / "t" / "imagesTs" / "synth003_0000.nii.gz").is_file()
    with pytest.raises(ValueError, match="validation"):
        write_msd_dataset(tmp_path / "u", cases=3, seed=1)


def test_ssl4mis_layout_writer(tmp_path):
    lists = write_ssl4mis_layout(tmp_path, cases=2, seed=2, val_cases=1, test_cases=1)
    ds = open_dataset(tmp_path)
    assert ds.format == "ssl4mis-h5"
    assert ds.patients() == ["patient001"]
    assert ds.volume_ids("val") == lists["val"] == ["patient002_frame01"]
    assert ds.volume_ids("test") == ["patient003_frame01"]
    item = ds.read_labeled(ds.slice_refs()[0])
    assert item.image.dtype == np.float32 and item.label.dtype == np.uint8


def test_msd_variants(msd_root, tmp_path):
    import pickle
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(msd_root, root)
    meta = json.loads((root / "dataset.json").read_text())
    # MSD-style label table, a patient mapping, and no splits.json
    meta["labels"] = {"0": "background", "1": "RV", "2": "Myo", "3": "LV"}
    meta.pop("channel_names")
    meta["modality"] = {"0": "MRI"}
    meta["patients"] = {"synth000": "p0", "synth001": "p0", "synth002": "p1"}
    (root / "dataset.json").write_text(json.dumps(meta))
    (root / "splits.json").unlink()
    ds = open_dataset(root)
    assert [c.name for c in ds.classes] == ["background", "RV", "Myo", "LV"]
    assert ds.classes[3].description == CARDIAC_CLASSES[3].description  # the dataset's own (dataset.json)
    assert ds.patients() == ["p0", "p1", "synth003", "synth004"]  # every imagesTr case is training
    assert ds.volume_splits() == []
    with pytest.raises(FileNotFoundError, match="splits.json"):
        ds.volume_ids("val")
    clone = pickle.loads(pickle.dumps(ds))  # data-loader workers may pickle the dataset
    assert np.array_equal(
        clone.read_unlabeled(ds.slice_refs()[0]).image, ds.read_unlabeled(ds.slice_refs()[0]).image
    )
    meta["labels"] = {"background": 0, "tumour": [1, 2]}
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="region"):
        open_dataset(root)
