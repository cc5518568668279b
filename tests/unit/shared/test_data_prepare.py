"""The prepared cache reproduces its source within quantisation error, and reads as a SliceDataset."""

from __future__ import annotations

import json

import numpy as np
import pytest

from shared.data import open_dataset, split_by_patient
from shared.data.cache_format import quantise
from shared.data.packing import CODECS, decode, encode
from shared.data.prepare import prepare_cache
from shared.data.resize import resize_image, resize_label
from shared.data.synth import write_msd_dataset

QUANT = 0.5 / 255 + 1e-6  # rounding to uint8


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep_src")
    write_msd_dataset(root, cases=4, seed=5, val_fraction=0.5, test_cases=1)
    return root


@pytest.fixture(scope="module")
def cache(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("prep_cache")
    prepare_cache(source, out, size=96)
    return out


def test_index_contents(source, cache):
    index = json.loads((cache / "vessa_cache.json").read_text())
    assert index["format"] == "vessa-cache" and index["version"] == 1
    assert index["size"] == 96 and index["source"]["format"] == "msd-nifti"
    assert [c["name"] for c in index["classes"]] == ["background", "RV", "Myo", "LV"]
    src = open_dataset(source)
    assert [s["key"] for s in index["slices"]] == [r.key for r in src.slice_refs()]
    first = index["slices"][0]
    assert {"key", "case_id", "patient_id", "slice_index", "shape"} <= set(first)
    assert set(index["volumes"]) == {"val", "test"}
    for split, spec in index["volumes"].items():
        for v in spec["cases"]:
            assert v["spacing"] == pytest.approx(list(src.read_volume(v["case_id"], split, False).spacing))
    # images and labels in separate files
    assert (cache / "train_images.bin").is_file() and (cache / "train_labels.bin").is_file()


def test_slices_match_resized_source(source, cache):
    src, ds = open_dataset(source), open_dataset(cache)
    assert ds.format == "vessa-cache"
    assert ds.slice_refs() == src.slice_refs() and ds.patients() == src.patients()
    for ref in src.slice_refs():
        a, b = src.read_labeled(ref), ds.read_labeled(ref)
        assert b.image.shape == (96, 96) and b.image.dtype == np.float32
        assert np.abs(b.image - resize_image(a.image, (96, 96))).max() <= QUANT
        assert np.array_equal(b.label, resize_label(a.label, (96, 96)))  # labels exact
        assert ds.original_shape(ref) == a.image.shape
        assert np.array_equal(ds.read_unlabeled(ref).image, b.image)
    # resized back to the original grid the image stays close to the source (interpolation error)
    ref = src.slice_refs()[len(src.slice_refs()) // 2]
    back = resize_image(ds.read_unlabeled(ref).image, ds.original_shape(ref))
    assert np.abs(back - src.read_unlabeled(ref).image).mean() < 0.05


def test_volumes_at_original_resolution(source, cache):
    src, ds = open_dataset(source), open_dataset(cache)
    for split in ("val", "test"):
        assert ds.volume_ids(split) == src.volume_ids(split)
        for case in ds.volume_ids(split):
            a, b = src.read_volume(case, split), ds.read_volume(case, split)
            assert b.image.shape == a.image.shape
            assert np.abs(b.image - a.image).max() <= QUANT
            assert np.array_equal(b.label, a.label)
            assert b.spacing == pytest.approx(a.spacing)
            assert np.allclose(b.affine, a.affine)
            assert ds.read_volume(case, split, with_label=False).label is None


def test_split_works_on_cache(cache):
    import pickle

    ds = pickle.loads(pickle.dumps(open_dataset(cache)))  # data-loader workers may pickle it
    split = split_by_patient(ds, 1)
    assert len(split.labeled) > 0 and len(split.unlabeled) > 0
    assert split.unlabeled[0].image.shape == (96, 96)


def test_h5_source_without_test(tmp_path):
    from shared.data.synth import write_ssl4mis_layout

    write_ssl4mis_layout(tmp_path / "src", cases=3, seed=9, val_cases=1)
    prepare_cache(tmp_path / "src", tmp_path / "c", size=32, codec="zlib")
    ds = open_dataset(tmp_path / "c")
    assert ds.volume_splits() == ["val"]
    with pytest.raises(FileNotFoundError, match="test"):
        ds.volume_ids("test")
    with pytest.raises(ValueError, match="already"):
        prepare_cache(tmp_path / "c", tmp_path / "c2")


@pytest.mark.parametrize("codec", CODECS)
def test_codecs_round_trip(codec):
    rng = np.random.default_rng(0)
    arr = quantise(rng.random((3, 17, 9)))
    assert np.array_equal(decode(encode(arr, codec), codec, arr.shape), arr)
