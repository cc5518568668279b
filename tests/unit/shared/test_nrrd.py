"""shared/data/nrrd.py: NRRD written and read back with its geometry, the header fields Slicer writes, and
every malformed file refused with a message before a big allocation."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from shared.data.nrrd import NrrdError, read_nrrd, write_nrrd

AFFINE = np.array([[1.5, 0, 0, -120.0], [0, 1.5, 0, 30.0], [0, 0, 6.0, 12.0], [0, 0, 0, 1]])


@pytest.mark.parametrize("compress", [True, False])
def test_round_trip_keeps_voxels_and_ras_affine(compress):
    arr = np.random.default_rng(0).integers(0, 4, (7, 5, 3)).astype(np.uint8)
    data = write_nrrd(arr, AFFINE, compress=compress)
    assert b"space: left-posterior-superior" in data[:400]
    back, affine = read_nrrd(data, 1 << 20)
    assert back.dtype == np.uint8 and np.array_equal(back, arr)
    assert np.allclose(affine, AFFINE)


def test_reads_a_slicer_style_header_in_lps_with_big_endian_shorts():
    arr = np.arange(24, dtype=np.int16).reshape(4, 3, 2)
    header = (
        "NRRD0004\n# written by 3D Slicer\ntype: short\ndimension: 3\nspace: left-posterior-superior\n"
        "sizes: 4 3 2\nspace directions: (-2,0,0) (0,-2,0) (0,0,5)\nkinds: domain domain domain\n"
        "endian: big\nencoding: gzip\nspace origin: (10,20,30)\nmeasurement frame: (1,0,0) (0,1,0) (0,0,1)\n\n"
    )
    data = header.encode() + gzip.compress(arr.astype(">i2").tobytes(order="F"))
    back, affine = read_nrrd(data, 1 << 20)
    assert np.array_equal(back, arr)
    # LPS → RAS flips x and y of the directions and the origin
    assert np.allclose(affine[:3, :3], np.diag([2.0, 2.0, 5.0])) and np.allclose(affine[:3, 3], [-10, -20, 30])


@pytest.mark.parametrize(
    "data, message",
    [
        (b"P3\n", "magic"),
        (b"NRRD0004\ntype: uchar\ndimension: 3\nsizes: 2 2 2\nencoding: raw\n\n\x00", "truncated"),
        (b"NRRD0004\ntype: complex\ndimension: 3\nsizes: 2 2 2\nencoding: raw\n\n" + b"\x00" * 8, "type"),
        (b"NRRD0004\ntype: uchar\ndimension: 3\nsizes: 2 2 2\nencoding: bzip2\n\n" + b"\x00" * 8, "encoding"),
        (b"NRRD0004\ntype: uchar\ndimension: 3\nsizes: 2 2 2\ndata file: /etc/passwd\nencoding: raw\n\n", "detached"),
        (b"NRRD0004\ntype: uchar\ndimension: 3\nsizes: 100000 100000 100000\nencoding: raw\n\n", "over the limit"),
        (b"NRRD0004\ntype: uchar\ndimension: 4\nsizes: 3 2 2 2\nencoding: raw\n\n" + b"\x00" * 24, "4D"),
        (b"NRRD0004\ntype: uchar\ndimension: 3\nsizes: 2 2 2\nencoding: gzip\n\nnot gzip", "gzip"),
    ],
)
def test_malformed_files_are_refused_with_a_reason(data, message):
    with pytest.raises(NrrdError, match=message):
        read_nrrd(data, 1 << 20)


def test_a_gzip_bomb_is_cut_at_the_promised_size():
    header = b"NRRD0004\ntype: uchar\ndimension: 3\nsizes: 4 4 4\nencoding: gzip\n\n"
    bomb = gzip.compress(b"\x00" * (50 << 20))
    arr, _ = read_nrrd(header + bomb, 1 << 20)  # only the 64 promised bytes are inflated
    assert arr.shape == (4, 4, 4)
