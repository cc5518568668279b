"""What a record's (case id, input) names again, for the review page and the ranking
(services/labeling/cases.case_input): a DICOM series in a folder, a 4D cine, a NIfTI, an HDF5 file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from services.labeling.cases import case_input, discover, read_case
from shared.data.cine import write_cine_dataset
from shared.data.dicom_write import write_dicom_series


def test_dicom_series_found_again_by_uid(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    a = write_dicom_series(rng.integers(0, 900, (3, 16, 12)), (4, 1, 1), tmp_path / "a", series_number=1)
    write_dicom_series(rng.integers(0, 900, (2, 10, 10)), (4, 1, 1), tmp_path / "b", series_number=2)
    found = discover(tmp_path)
    assert found.format == "dicom-folder" and [c.kind for c in found.cases] == ["dicom", "dicom"]
    uid = str(pydicom.dcmread(a[0]).SeriesInstanceUID)
    rec_input = next(c for c in found.cases if c.case_id == uid).path  # what the record stores
    case = case_input(uid, rec_input)
    assert case.kind == "dicom" and case.series.series_uid == uid
    vol = read_case(case)
    assert vol.image.shape == (3, 16, 12) and 0.0 <= vol.image.min() and vol.image.max() <= 1.0
    with pytest.raises(FileNotFoundError, match="no longer in"):
        case_input("1.2.3", rec_input)


def test_cine_and_nifti_kinds(tmp_path: Path) -> None:
    write_cine_dataset(tmp_path, cases=1, frames=2, depth=2)
    assert case_input("synth000_4d", tmp_path / "synth000_4d.nii.gz").kind == "cine"
    assert case_input("x", tmp_path / "x.h5").kind == "h5"
    assert [c.kind for c in discover(tmp_path).cases] == ["cine"]
