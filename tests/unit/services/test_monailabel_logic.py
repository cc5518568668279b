"""The MONAI Label dialect's logic without a service: ids that would leave the datastore, label maps
mapped by Slicer's segment names, and the `vessa` strategy's order."""

from __future__ import annotations

import numpy as np
import pytest

from services.ingress.monailabel.datastore import DatastoreError, check_id, check_tag
from services.ingress.monailabel.strategies import rank_candidates
from services.ingress.monailabel.volumes import encode_label, read_image, read_label
from services.ingress.uploads import VolumeError, nifti_bytes
from shared.data.nrrd import read_nrrd, write_nrrd
from shared.wire.protocol import Limits

NAMES = {"rv": 1, "myo": 2, "lv": 3}
AFFINE = np.diag([1.5, 1.5, 6.0, 1.0])


@pytest.mark.parametrize("bad", ["", "..", "../x", "a/b", "a\\b", "x\x00", ".hidden", "a" * 129, "ä"])
def test_ids_that_are_paths_or_odd_are_refused(bad):
    with pytest.raises(DatastoreError) as err:
        check_id(bad)
    assert err.value.status == 400


def test_good_ids_and_tags_pass():
    assert check_id("patient001_frame01.v2") == "patient001_frame01.v2"
    assert check_tag("") == "final" and check_tag("second-opinion") == "second-opinion"
    with pytest.raises(DatastoreError):
        check_tag("a/b")


@pytest.fixture
def image():
    arr = np.random.default_rng(0).random((16, 12, 3)).astype(np.float32)
    return read_image(nifti_bytes(arr, AFFINE, (1.5, 1.5, 6.0)), Limits(), "case")


def test_label_values_are_mapped_by_segment_name(image):
    exported = np.zeros((16, 12, 3), np.uint8)
    exported[2:4, 2:4, 0] = 1  # Slicer's first segment: LV
    exported[5:7, 5:7, 1] = 2  # its second: RV
    lab = read_label(write_nrrd(exported, AFFINE), image, Limits(), [1, 2, 3], NAMES, [{"name": "LV"}, {"name": "RV"}])
    assert lab.shape == image.image.shape  # slices first
    assert set(np.unique(lab)) == {0, 1, 3}
    assert (lab == 3).sum() == 4 and (lab == 1).sum() == 4


def test_label_refusals_name_the_problem(image):
    wrong_grid = np.zeros((16, 12, 4), np.uint8)
    with pytest.raises(VolumeError, match="voxel grid"):
        read_label(write_nrrd(wrong_grid, AFFINE), image, Limits(), [1, 2, 3], NAMES)
    unknown = np.zeros((16, 12, 3), np.uint8)
    unknown[0, 0, 0] = 9
    with pytest.raises(VolumeError, match=r"\[9\] are not classes"):
        read_label(nifti_bytes(unknown, AFFINE), image, Limits(), [1, 2, 3], NAMES)
    with pytest.raises(VolumeError, match="no entry in label_info"):
        read_label(nifti_bytes(unknown, AFFINE), image, Limits(), [1, 2, 3], NAMES, [{"name": "LV"}])
    with pytest.raises(VolumeError, match="neither NRRD nor NIfTI"):
        read_label(b"\x00" * 500, image, Limits(), [1, 2, 3], NAMES)


def test_nrrd_and_nifti_answers_carry_the_same_label_and_geometry(image):
    labels = np.zeros(image.image.shape, np.uint8)
    labels[1, 3:5, 3:5] = 2
    arr, affine = read_nrrd(encode_label(labels, image, ".nrrd"), 1 << 20)
    assert arr.shape == (16, 12, 3) and np.allclose(affine, AFFINE)
    assert (arr[3:5, 3:5, 1] == 2).all() and arr.sum() == 8


def test_vessa_strategy_least_trusted_first_then_diversity():
    conf = {"a": 0.9, "b": 0.2, "c": 0.3, "d": 0.35}
    feats = {"a": np.array([10.0, 0]), "b": np.array([0.0, 0]), "c": np.array([0.1, 0]), "d": np.array([5.0, 0])}
    # nothing finalised: least trusted first; cases no job labeled come last
    assert rank_candidates(["a", "b", "c", "d", "z"], conf, feats.__getitem__, []) == ["b", "c", "d", "a", "z"]
    # b finalised: c is almost b (a near-copy), d is as doubtful and far away: d first
    order = rank_candidates(["a", "c", "d", "z"], conf, feats.__getitem__, ["b"])
    assert order[0] == "d" and order[-1] == "z"


def test_train_params_defaults_bounds_and_ignored_keys():
    from services.ingress.monailabel.training import DEFAULT_STEPS, parse_params

    assert parse_params(None)["max_steps"] == DEFAULT_STEPS
    got = parse_params({"max_steps": 3, "batch_size": 2, "lr": 1e-4, "max_epochs": 50, "name": "x"})
    assert got == {"max_steps": 3, "batch_size": 2, "lr": 1e-4}
    for bad_params in ({"max_steps": 0}, {"max_steps": "many"}, {"max_steps": 2.5}, {"max_steps": True}, {"lr": 0}, {"batch_size": 65}):
        with pytest.raises(ValueError):
            parse_params(bad_params)


def test_a_fine_tune_of_a_fine_tune_takes_this_runs_settings(monkeypatch, tmp_path):
    """The served checkpoint may itself be a fine-tune: its train_config then holds the keys a fine-tune
    sets (augment_views, p_pseudo, …). The second run's values replace them instead of clashing."""
    from services.ingress.monailabel import training

    cfg = {"augment_views": 4, "p_pseudo": 0.3, "num_templates": 3, "steps": 300, "lr": 1e-3, "seed": 7}
    monkeypatch.setattr("assistant_server.checkpoint.read_checkpoint", lambda path: {"train_config": cfg})
    params = {"max_steps": 20, "batch_size": 2, "lr": None}
    s = training.stage1_settings({"ckpt": "/x/vessa-1.pt", "encoder": "tiny-random"}, str(tmp_path), tmp_path / "m.pt", params)
    assert (s.augment_views, s.p_pseudo, s.steps, s.batch_size) == (0, 0.0, 20, 2)
    assert (s.num_templates, s.seed, s.init) == (3, 7, "/x/vessa-1.pt")  # the source's recipe kept
