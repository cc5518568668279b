"""The protocol split: first N patients labeled, pools typed and separated, bad N rejected."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shared.data.base import SliceDataset, parse_slice_key, patient_of_case
from shared.data.classes import CARDIAC_CLASSES
from shared.data.split import LabeledPool, UnlabeledPool, split_by_patient
from shared.data.types import LabeledSlice, SliceRef, UnlabeledSlice, Volume


class ToyDataset(SliceDataset):
    """In-memory dataset whose slices come in a deliberately shuffled patient order."""

    format = "toy"

    def __init__(self, keys: list[str]):
        self.root = Path("/toy")
        self.name = "toy"
        self.classes = list(CARDIAC_CLASSES)
        self._refs = []
        for key in keys:
            case, k = parse_slice_key(key)
            self._refs.append(SliceRef(key, case, patient_of_case(case), k))
        self.label_reads: list[str] = []

    def slice_refs(self):
        return list(self._refs)

    def read_labeled(self, ref):
        self.label_reads.append(ref.key)
        return LabeledSlice(ref, np.zeros((4, 4), np.float32), np.full((4, 4), ref.slice_index, np.uint8))

    def read_unlabeled(self, ref):
        return UnlabeledSlice(ref, np.full((4, 4), ref.slice_index / 10, np.float32))

    def volume_ids(self, split):
        raise FileNotFoundError(split)

    def read_volume(self, case_id, split, with_label=True):
        return Volume(case_id, np.zeros((1, 4, 4), np.float32))


KEYS = [
    "patient099_frame01_slice_2",
    "patient038_frame01_slice_1",
    "patient099_frame02_slice_1",
    "patient050_frame01_slice_1",
    "patient038_frame02_slice_3",
    "patient007_frame01_slice_1",
    "patient050_frame02_slice_2",
]


def test_patients_in_first_appearance_order():
    ds = ToyDataset(KEYS)
    assert ds.patients() == ["patient099", "patient038", "patient050", "patient007"]
    assert ds.cases()[:3] == ["patient099_frame01", "patient038_frame01", "patient099_frame02"]


@pytest.mark.parametrize("n", [1, 2, 3])
def test_first_n_patients_are_labeled(n):
    ds = ToyDataset(KEYS)
    split = split_by_patient(ds, n)
    chosen = ds.patients()[:n]
    assert list(split.labeled_patients) == chosen
    assert list(split.unlabeled_patients) == ds.patients()[n:]
    assert all(r.patient_id in chosen for r in split.labeled.refs)
    assert all(r.patient_id not in chosen for r in split.unlabeled.refs)
    assert len(split.labeled) + len(split.unlabeled) == len(KEYS)
    # protocol order is kept inside each pool
    assert [r.key for r in split.labeled.refs] == [
        k for k in KEYS if patient_of_case(parse_slice_key(k)[0]) in chosen
    ]


def test_pool_item_types_and_reads():
    ds = ToyDataset(KEYS)
    split = split_by_patient(ds, 2)
    assert isinstance(split.labeled, LabeledPool) and isinstance(split.unlabeled, UnlabeledPool)
    assert all(isinstance(x, LabeledSlice) for x in split.labeled)
    items = [split.unlabeled[i] for i in range(len(split.unlabeled))]
    assert all(isinstance(x, UnlabeledSlice) and not hasattr(x, "label") for x in items)
    assert set(ds.label_reads) == {r.key for r in split.labeled.refs}  # unlabeled reads went elsewhere


def test_unlabeled_pool_holds_only_the_image_reader():
    ds = ToyDataset(KEYS)
    pool = split_by_patient(ds, 1).unlabeled
    assert set(vars(pool)) == {"_read_image", "refs", "patients"}
    assert pool._read_image.__func__ is ToyDataset.read_unlabeled
    assert not any(v is ds for v in vars(pool).values())


@pytest.mark.parametrize("n", [0, -1, 4, 5, True, 1.5])
def test_bad_n_rejected(n):
    with pytest.raises(ValueError, match="n_labeled"):
        split_by_patient(ToyDataset(KEYS), n)


def test_key_parsing():
    assert parse_slice_key("patient003_frame01_slice_12") == ("patient003_frame01", 12)
    assert patient_of_case("patient003_frame01") == "patient003"
    assert patient_of_case("synth004") == "synth004"
    with pytest.raises(ValueError):
        parse_slice_key("patient003_frame01")
