"""`vessa predict`: segment a new volume (a NIfTI file or a folder of one DICOM series) with a trained
student.

A NIfTI is read with `shared.data.nifti.load_nifti` (through-plane axis = the largest spacing, put
first); a DICOM folder with `shared.data.dicom_series` (slices ordered along the slice normal, the
scanner geometry from the headers; a cine series frame by frame). Intensities are min-max normalised
to [0, 1] per volume (over the whole cine for a cine), as the SSL4MIS preprocessing of the training
data and the label runner do. Each volume is segmented slice by slice (`student_trainer.inference`)
and written as a uint8 label map in the input's geometry (`shared.data.nifti.label_to_nifti`; a
cine as one 4D map). With `seg` a DICOM input also gets a DICOM-SEG beside the label map that
references the source instances (`shared.data.dicom_seg`; one per frame for a cine).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shared.data.nifti import load_nifti, nifti_to_bytes, save_label_nifti
from student_trainer.checkpoint import load_checkpoint, model_from_checkpoint
from student_trainer.inference import predict_slices, resolve_device


def read_dicom_input(folder: str | Path, series_uid: str | None = None) -> list:
    """The one series of `folder` (or `series_uid` of it) as Volumes, one per temporal position,
    normalised over them all. ValueError naming the problem (no series, several, a broken one)."""
    from shared.data.dicom_series import pick_series, read_series_frames, scan_folder

    found = pick_series(scan_folder(folder), series_uid)
    if not found:
        raise ValueError(f"no DICOM series in {folder}")
    if len(found) > 1:
        listed = ", ".join(f"{s.series_uid} ({s.modality or '?'})" for s in found[:10])
        raise ValueError(f"{folder} holds {len(found)} series ({listed}): name one with --series UID")
    frames = read_series_frames(found[0], case_id=found[0].series_uid)
    lo = min(float(f.image.min()) for f in frames)
    hi = max(float(f.image.max()) for f in frames)
    for f in frames:
        f.image = np.zeros_like(f.image) if hi <= lo else ((f.image - lo) / (hi - lo)).astype(np.float32)
    return frames


def seg_path_for(out_path: str | Path, frame: int | None = None) -> Path:
    """Where the DICOM-SEG of a label map goes: beside it, `.nii.gz`/`.nii` replaced by `.dcm`
    (`_tNN.dcm` for frame NN of a cine)."""
    out = Path(out_path)
    stem = out.name.removesuffix(".gz").removesuffix(".nii")
    return out.with_name(stem + ("" if frame is None else f"_t{frame:02d}") + ".dcm")


def predict_file(
    ckpt_path: str | Path,
    in_path: str | Path,
    out_path: str | Path,
    device: str = "auto",
    amp: bool = True,
    batch_size: int = 32,
    seg: bool = False,
    series_uid: str | None = None,
) -> dict:
    """Segment `in_path` (.nii/.nii.gz, or a folder of one DICOM series) into `out_path`; with `seg`
    (DICOM only) also write the DICOM-SEG beside it. Returns a small summary (shape, voxels per class)."""
    dicom = Path(in_path).is_dir()
    if seg and not dicom:
        raise ValueError("a DICOM-SEG needs a DICOM series as input (a folder): a NIfTI has no instances to reference")
    if series_uid is not None and not dicom:
        raise ValueError("--series names a series of a DICOM folder")
    dev = resolve_device(device)
    ckpt = load_checkpoint(ckpt_path, map_location="cpu")
    model, classes, image_size = model_from_checkpoint(ckpt, dev)
    frames = read_dicom_input(in_path, series_uid) if dicom else [load_nifti(in_path, normalize=True)]
    labels = [
        predict_slices(model, f.image, image_size, dev, batch_size=batch_size, amp=amp).numpy().astype(np.uint8)
        for f in frames
    ]
    if len(frames) > 1:  # a DICOM cine: one 4D map, as `vessa label` writes it
        from shared.data.cine import cine_labels_to_nifti

        out = Path(out_path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(nifti_to_bytes(cine_labels_to_nifti(labels, frames), compress=out.name.endswith(".gz")))
    else:
        out = save_label_nifti(labels[0], frames[0], out_path)
    summary = {
        "input": str(in_path),
        "output": str(out),
        "shape": [len(frames), *frames[0].image.shape] if len(frames) > 1 else list(frames[0].image.shape),
        "spacing": list(frames[0].spacing) if frames[0].spacing else None,
        "voxels": {c.name: int(sum(np.count_nonzero(lab == c.index) for lab in labels)) for c in classes},
    }
    if dicom:
        summary["series_uid"] = frames[0].meta["dicom"].series_uid
    if seg:
        from shared.data.dicom_seg import Algorithm, build_seg, seg_bytes

        names = {c.index: c.name for c in classes}
        ids = sorted(k for k in names if k != 0)
        algorithm = Algorithm(f"student {Path(ckpt_path).name}", -1)
        written = []
        for t, (lab, vol) in enumerate(zip(labels, frames)):
            dest = seg_path_for(out, t if len(frames) > 1 else None)
            dest.write_bytes(seg_bytes(build_seg(lab, vol, names, ids, algorithm)))
            written.append(str(dest))
        summary["seg"] = written if len(frames) > 1 else written[0]
    return summary
