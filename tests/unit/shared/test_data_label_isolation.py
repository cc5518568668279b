"""Proof that the unlabeled pool never reads labels of unlabeled cases, for every layout.

- nnU-Net/MSD: file opens are recorded with an audit hook while the whole unlabeled pool is read; no
  labelsTr file of an unlabeled case is opened. Then those label files are deleted and the pool still
  reads.
- SSL4MIS HDF5: the `label` dataset is deleted from the unlabeled patients' files; the pool still reads
  (a reader touching `label` would fail), while a labeled read of such a slice fails.
- Prepared cache: the unlabeled slices' label streams are overwritten with garbage; the pool still
  reads, and the label pack is not even opened.
"""

from __future__ import annotations

import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import h5py
import pytest

from shared.data import open_dataset, split_by_patient
from shared.data.prepare import prepare_cache
from shared.data.synth import write_msd_dataset, write_ssl4mis_layout

_recording: list[list[str]] = []
_lock = threading.Lock()


def _hook(event: str, args: tuple) -> None:
    if event == "open" and _recording:
        path = args[0]
        if isinstance(path, bytes | str | Path):
            with _lock:
                for sink in _recording:
                    sink.append(str(path if not isinstance(path, bytes) else path.decode(errors="replace")))


sys.addaudithook(_hook)  # audit hooks cannot be removed; it records only inside `record_opens`


@contextmanager
def record_opens():
    opened: list[str] = []
    _recording.append(opened)
    try:
        yield opened
    finally:
        _recording.remove(opened)


@pytest.fixture(scope="module")
def msd_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("iso_msd")
    write_msd_dataset(root, cases=5, seed=21)
    return root


@pytest.fixture(scope="module")
def h5_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("iso_h5")
    write_ssl4mis_layout(root, cases=4, seed=22, val_cases=1)
    return root


def test_msd_unlabeled_pool_opens_no_unlabeled_label_file(msd_root):
    split = split_by_patient(open_dataset(msd_root), 1)
    unlabeled_cases = {r.case_id for r in split.unlabeled.refs}
    assert unlabeled_cases
    with record_opens() as opened:
        images = [item.image for item in split.unlabeled]
    assert len(images) == len(split.unlabeled)
    assert any("imagesTr" in p for p in opened)  # the hook does see the reader's opens
    assert not [p for p in opened if "labelsTr" in p], "the unlabeled pool opened a label file"
    # the hook would have caught it: a labeled read opens the labeled case's label file
    with record_opens() as opened:
        _ = split.labeled[0].label
    assert any("labelsTr" in p and split.labeled.refs[0].case_id in p for p in opened)


def test_msd_unlabeled_pool_reads_without_label_files(msd_root, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(msd_root, root)
    split = split_by_patient(open_dataset(root), 1)
    for case in {r.case_id for r in split.unlabeled.refs}:
        (root / "labelsTr" / f"{case}.nii.gz").unlink()
    assert len([x for x in split.unlabeled]) == len(split.unlabeled)
    assert split.labeled[0].label is not None


def _strip_labels(root: Path, patients: set[str]) -> int:
    removed = 0
    for path in (root / "slices").glob("*.h5"):
        if path.name.split("_")[0] in patients:
            with h5py.File(path, "r+") as f:
                del f["label"]
            removed += 1
    return removed


def test_h5_unlabeled_pool_never_touches_label_dataset(h5_root, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(h5_root, root)
    split = split_by_patient(open_dataset(root), 1)
    assert _strip_labels(root, set(split.unlabeled_patients)) == len(split.unlabeled)
    items = list(split.unlabeled)
    assert len(items) == len(split.unlabeled) and all(i.image.ndim == 2 for i in items)
    assert split.labeled[0].label.ndim == 2  # labeled patients keep their labels
    ds = open_dataset(root)
    with pytest.raises(KeyError, match="label"):  # reading a stripped label does fail
        ds.read_labeled(split.unlabeled.refs[0])


def test_cache_unlabeled_pool_never_reads_label_pack(h5_root, tmp_path):
    cache = tmp_path / "cache"
    prepare_cache(h5_root, cache, size=64)
    ds = open_dataset(cache)
    split = split_by_patient(ds, 1)
    # overwrite the unlabeled slices' label streams with garbage
    index = ds.index
    by_key = {s["key"]: s for s in index["slices"]}
    with open(cache / "train_labels.bin", "r+b") as fh:
        for ref in split.unlabeled.refs:
            entry = by_key[ref.key]["label"]
            fh.seek(entry["offset"])
            fh.write(b"\xff" * entry["length"])
    ds = open_dataset(cache)
    split = split_by_patient(ds, 1)
    with record_opens() as opened:
        items = list(split.unlabeled)
    assert len(items) == len(split.unlabeled)
    assert not [p for p in opened if "train_labels" in p]
    assert split.labeled[0].label.shape == (64, 64)
    with pytest.raises(Exception):  # noqa: B017 - zlib.error: the garbage is really there
        ds.read_labeled(split.unlabeled.refs[0])
