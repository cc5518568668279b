"""A 4D cine per patient from a dataset's labeled frames of one split (e.g. ACDC's end-diastole and
end-systole volumes of each validation patient), with its 4D ground truth: a folder `vessa label --data`
labels frame by frame and `vessa label score --truth DIR/truth` scores per frame (issue 29's by-hand run).

    python -m benchmarks.cine_from_frames --data ../shared/data/acdc --split val --out runs/acdc_cine

Frames of a patient that differ in shape are left out (with a line saying so); a patient with one frame
gives no cine. Images are written as the dataset reads them ([0, 1] float32) and the affine is the
dataset's spacing where it knows it (identity otherwise), as `write_cine_dataset` writes its synthetic
cines: (x, y, z, t).
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np

from shared.data.base import patient_of_case
from shared.data.layouts import open_dataset
from shared.data.nifti import nifti_to_bytes


def _nifti(frames: list[np.ndarray], spacing, dtype) -> nib.Nifti1Image:
    """(T, D, H, W) frames → (x=H, y=W, z=D, t) NIfTI with the spacing on its diagonal."""
    zyx = spacing or (1.0, 1.0, 1.0)
    affine = np.diag([zyx[1], zyx[2], zyx[0], 1.0])
    xyzt = np.transpose(np.stack(frames), (2, 3, 1, 0)).astype(dtype)
    img = nib.Nifti1Image(xyzt, affine)
    img.header.set_xyzt_units("mm", "msec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return img


def build(data: Path, split: str, out: Path) -> list[str]:
    """Write OUT/<patient>_4d.nii.gz and OUT/truth/<patient>_4d.nii.gz; returns the cine ids."""
    ds = open_dataset(data)
    by_patient: dict[str, list[str]] = defaultdict(list)
    for cid in ds.volume_ids(split):
        by_patient[patient_of_case(cid)].append(cid)
    (out / "truth").mkdir(parents=True, exist_ok=True)
    ids = []
    for patient, cases in by_patient.items():
        vols = [ds.read_volume(c, split) for c in sorted(cases)]
        vols = [v for v in vols if v.image.shape == vols[0].image.shape]
        if len(vols) < 2:
            print(f"{patient}: fewer than two frames of one shape, no cine")
            continue
        cid = f"{patient}_4d"
        spacing = vols[0].spacing
        (out / f"{cid}.nii.gz").write_bytes(nifti_to_bytes(_nifti([v.image for v in vols], spacing, np.float32)))
        truth = _nifti([v.label for v in vols], spacing, np.uint8)
        (out / "truth" / f"{cid}.nii.gz").write_bytes(nifti_to_bytes(truth))
        ids.append(cid)
        print(f"{cid}: {len(vols)} frames ({', '.join(v.case_id for v in vols)}), {vols[0].image.shape}")
    return ids


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--split", default="val")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    ids = build(a.data, a.split, a.out)
    print(f"{len(ids)} cines in {a.out}")
    return 0 if ids else 1


if __name__ == "__main__":
    raise SystemExit(main())
