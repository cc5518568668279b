"""A zip of one DICOM series as a `POST /v1/pseudo-labels` upload, checked by content before a pixel is
read (docs/dicom.md, "DICOM over REST").

The zip is refused with a VolumeError (a 400 naming the problem) when it is over the upload limits
(`Limits.max_array_bytes` compressed, and again for its members decompressed; at most
`Limits.max_slices` members), when a member's name would leave the folder it is unpacked into
(absolute, `..`, a drive letter), when a member is not a DICOM Part 10 file, or when it holds anything
but one image series (several series, an SR, a SEG, ...). Members are unpacked under names of our own
into a temporary folder, never under the client's names, and read with shared/data/dicom_series.py.
"""

from __future__ import annotations

import tempfile
import zipfile
from io import BytesIO
from pathlib import Path, PurePosixPath

from services.ingress.uploads import VolumeError, check_slices
from shared.data.types import Volume
from shared.wire.protocol import Limits

_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a local file header, or the end record of an empty zip


def is_zip(data: bytes) -> bool:
    return data[:4] in _ZIP_MAGIC


def _safe_member(name: str) -> bool:
    """A member name that stays inside the folder it is unpacked into."""
    if "\x00" in name or "\\" in name:
        return False
    path = PurePosixPath(name)
    return not path.is_absolute() and ".." not in path.parts and not (path.parts and ":" in path.parts[0])


def unpack_dicom_zip(data: bytes, limits: Limits, dest: Path) -> int:
    """The zip's DICOM files written to `dest` as 00000.dcm, 00001.dcm, ...; returns how many."""
    if len(data) > limits.max_array_bytes:
        raise VolumeError(f"the zip is {len(data)} bytes, over the limit of {limits.max_array_bytes}")
    try:
        zf = zipfile.ZipFile(BytesIO(data))
        members = [m for m in zf.infolist() if not m.is_dir()]
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise VolumeError(f"not a readable zip file: {exc}") from None
    if len(members) > limits.max_slices:
        raise VolumeError(f"the zip holds {len(members)} files, at most {limits.max_slices} per request")
    bad = [m.filename for m in members if not _safe_member(m.filename)]
    if bad:
        raise VolumeError(f"zip member name {bad[0]!r} leaves the folder it is unpacked into")
    if any(m.flag_bits & 0x1 for m in members):
        raise VolumeError("the zip is encrypted")
    # the sizes in the headers first (cheap), then what decompression really gives (a header can lie)
    declared = sum(m.file_size for m in members)
    if declared > limits.max_array_bytes:
        raise VolumeError(f"the zip unpacks to {declared} bytes, over the limit of {limits.max_array_bytes}")
    left = limits.max_array_bytes
    written = 0
    for m in members:
        name = PurePosixPath(m.filename).name
        if name.upper() == "DICOMDIR" or name.startswith("."):
            continue  # a media directory or a hidden file (e.g. __MACOSX/._x): nothing to label
        try:
            with zf.open(m) as fh:
                raw = fh.read(left + 1)
        except (zipfile.BadZipFile, OSError, RuntimeError, NotImplementedError, EOFError) as exc:
            raise VolumeError(f"zip member {m.filename!r} cannot be read: {exc}") from None
        if len(raw) > left:
            raise VolumeError(f"the zip unpacks to more than {limits.max_array_bytes} bytes")
        left -= len(raw)
        if raw[128:132] != b"DICM":
            raise VolumeError(f"zip member {m.filename!r} is not a DICOM file (no DICM marker after the preamble)")
        (dest / f"{written:05d}.dcm").write_bytes(raw)
        written += 1
    if not written:
        raise VolumeError("the zip holds no DICOM files")
    return written


def read_dicom_zip(data: bytes, limits: Limits) -> list[Volume]:
    """The zip's one series as one Volume per temporal position (one for a 3D series): image (D, H, W)
    float32 in modality units, the scanner affine, `meta["dicom"]` what a DICOM-SEG must reference.
    Each frame is checked against the per-request limits. VolumeError for anything else."""
    from shared.data.dicom_series import DicomInputError, read_series_frames, scan_folder

    with tempfile.TemporaryDirectory(prefix="vessa-dicom-") as tmp:
        unpack_dicom_zip(data, limits, Path(tmp))
        found = scan_folder(tmp)
        if len(found) != 1:
            listed = ", ".join(f"{s.series_uid} ({s.modality or '?'})" for s in found[:10])
            raise VolumeError(f"the zip holds {len(found)} series ({listed}): send one image series per request")
        series = found[0]
        try:
            frames = read_series_frames(series, max_voxels=limits.max_array_bytes // 4, case_id=series.series_uid)
        except DicomInputError as exc:
            raise VolumeError(str(exc)) from None
        for vol in frames:
            vol.meta.pop("source", None)  # the temporary folder, gone when this returns
    from services.ingress.uploads import MAX_CINE_FRAMES

    if len(frames) > MAX_CINE_FRAMES:
        raise VolumeError(f"a cine of {len(frames)} frames, at most {MAX_CINE_FRAMES} per request")
    for t, vol in enumerate(frames):
        try:
            check_slices(vol.image, limits)
        except VolumeError as exc:
            raise VolumeError(f"frame {t}: {exc}" if len(frames) > 1 else str(exc)) from None
    return frames
