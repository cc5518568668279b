"""A zip of one DICOM series as a REST upload (services/ingress/dicom_upload.py): what is read, and every
zip that is refused before a pixel is read, each with a message naming the problem. Real zips of real
DICOM files (shared/data/dicom_write.py); the route itself runs in tests/integration/test_rest_cine.py."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest

from services.ingress.dicom_upload import is_zip, read_dicom_zip
from services.ingress.uploads import VolumeError
from shared.data.dicom_write import write_dicom_series
from shared.wire.protocol import Limits


def _series(tmp_path: Path, name: str, depth: int = 3, seed: int = 0) -> list[Path]:
    image = (np.random.default_rng(seed).random((depth, 16, 20)) * 1000).astype(np.int16)
    return write_dicom_series(image, (2.0, 1.0, 1.0), tmp_path / name)


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_one_series_is_read_in_its_geometry(tmp_path) -> None:
    files = _series(tmp_path, "a")
    data = _zip({f"study/a/{p.name}": p.read_bytes() for p in files} | {"DICOMDIR": files[0].read_bytes()})
    assert is_zip(data) and not is_zip(b"\x1f\x8b")
    (vol,) = read_dicom_zip(data, Limits())
    assert vol.image.shape == (3, 16, 20) and vol.image.dtype == np.float32
    assert vol.meta["dicom"].series_uid == str(pydicom.dcmread(files[0]).SeriesInstanceUID)
    assert "source" not in vol.meta  # the temporary folder is gone


@pytest.mark.parametrize(
    ("members", "limits", "message"),
    [
        ({"../evil.dcm": b"x"}, Limits(), "leaves the folder"),
        ({"/etc/evil.dcm": b"x"}, Limits(), "leaves the folder"),
        ({"C:/evil.dcm": b"x"}, Limits(), "leaves the folder"),
        ({"a\\..\\..\\evil.dcm": b"x"}, Limits(), "leaves the folder"),
        ({"readme.txt": b"hello"}, Limits(), "is not a DICOM file"),
        ({}, Limits(), "no DICOM files"),
        ({f"{i}.dcm": b"x" for i in range(3)}, Limits(max_slices=2), "at most 2 per request"),
        ({"big.dcm": b"\0" * 5000}, Limits(max_array_bytes=4000), "over the limit"),
    ],
)
def test_bad_zips_are_refused_by_name(members, limits, message) -> None:
    with pytest.raises(VolumeError, match=message):
        read_dicom_zip(_zip(members), limits)


def test_a_lying_size_header_is_caught_when_unpacked(tmp_path) -> None:
    data = bytearray(_zip({"a.dcm": b"\0" * 100_000}))
    # the central directory's uncompressed size says 10 bytes; decompression gives 100,000
    cd = data.rfind(b"PK\x01\x02")
    data[cd + 24 : cd + 28] = (10).to_bytes(4, "little")
    with pytest.raises(VolumeError):
        read_dicom_zip(bytes(data), Limits(max_array_bytes=50_000))


def test_several_series_or_a_non_image_object_are_refused(tmp_path) -> None:
    a, b = _series(tmp_path, "a"), _series(tmp_path, "b", seed=1)
    with pytest.raises(VolumeError, match="holds 2 series"):
        read_dicom_zip(_zip({f"{p.parent.name}/{p.name}": p.read_bytes() for p in a + b}), Limits())
    sr = pydicom.dcmread(a[0])
    sr.SOPClassUID = sr.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    for key in ("PixelData", "Rows", "Columns"):
        delattr(sr, key)
    buf = io.BytesIO()
    sr.save_as(buf, enforce_file_format=True)
    with pytest.raises(VolumeError, match="not an image series"):
        read_dicom_zip(_zip({"sr.dcm": buf.getvalue()}), Limits())
    with pytest.raises(VolumeError, match="not a readable zip"):
        read_dicom_zip(b"PK\x03\x04 truncated", Limits())
