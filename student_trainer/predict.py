"""`vessa predict`: segment a new NIfTI volume with a trained student.

The volume is read with `shared.data.nifti.load_nifti` (through-plane axis = the largest spacing, put
first; intensities min-max normalised to [0, 1] per volume, as the SSL4MIS preprocessing of the training
data), segmented slice by slice (`student_trainer.inference`), and written as a uint8 label map with the
input's affine and header (`shared.data.nifti.save_label_nifti`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shared.data.nifti import load_nifti, save_label_nifti
from student_trainer.checkpoint import load_checkpoint, model_from_checkpoint
from student_trainer.inference import predict_slices, resolve_device


def predict_file(
    ckpt_path: str | Path,
    in_path: str | Path,
    out_path: str | Path,
    device: str = "auto",
    amp: bool = True,
    batch_size: int = 32,
) -> dict:
    """Segment `in_path` (.nii/.nii.gz) into `out_path`. Returns a small summary (shape, voxels per class)."""
    dev = resolve_device(device)
    ckpt = load_checkpoint(ckpt_path, map_location="cpu")
    model, classes, image_size = model_from_checkpoint(ckpt, dev)
    vol = load_nifti(in_path, normalize=True)
    label = predict_slices(model, vol.image, image_size, dev, batch_size=batch_size, amp=amp).numpy()
    out = save_label_nifti(label.astype(np.uint8), vol, out_path)
    counts = np.bincount(label.ravel(), minlength=len(classes))
    return {
        "input": str(in_path),
        "output": str(out),
        "shape": list(vol.image.shape),
        "spacing": list(vol.spacing) if vol.spacing else None,
        "voxels": {c.name: int(counts[c.index]) for c in classes},
    }
