"""4D cine: a stack of 3D frames over the cardiac cycle, labeled frame by frame into a 4D label map.

ACDC's raw release is `patientXXX_4d.nii.gz`: (x, y, z, t). `load_cine_nifti` reads such a file as one
slice-first Volume per frame (the 3D frames share the file's affine and header); `cine_labels_to_nifti`
stacks per-frame label maps back into one 4D uint8 NIfTI in the input's geometry (same affine, qform and
sform codes, time step). `synth_cine` makes a beating synthetic heart with a ground truth on every frame
(shared/data/synth.py's scene with its contraction driven through the cycle), and `write_cine_dataset`
writes a folder of them for `vessa data synth --cine`.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from shared.data.nifti import (
    _axes_of,
    _data,
    _zooms3,
    label_to_nifti,
    label_values,
    nifti_from_bytes,
    nifti_to_bytes,
)
from shared.data.synth import synth_case
from shared.data.types import Volume


def is_cine_nifti(path: str | Path) -> bool:
    """A 4D NIfTI with more than one frame (read from the header alone)."""
    try:
        shape = nib.load(str(path)).shape
    except Exception:
        return False
    return len(shape) == 4 and shape[3] > 1


def load_cine_nifti(src: str | Path | bytes, case_id: str | None = None) -> list[Volume]:
    """Each frame of a 4D NIfTI as a slice-first Volume (raw intensities; see `load_nifti` for the axes).
    Frame t's case id is `<case>_t<tt>`, `meta["frame"]` its index. ValueError for a bad file."""
    if isinstance(src, bytes | bytearray | memoryview):
        img, name = nifti_from_bytes(bytes(src), allow_4d=True), "<bytes>"
    else:
        path = Path(src)
        if not path.is_file():
            raise FileNotFoundError(f"NIfTI file not found: {path}")
        img, name = nifti_from_bytes(path.read_bytes(), filename_hint=path.name, allow_4d=True), path.name
    if len(img.shape) != 4:
        raise ValueError(f"{name}: not a 4D cine (shape {img.shape})")
    raw = _data(img, f" ({name})")
    if raw.dtype.kind == "f" and not np.isfinite(raw).all():
        raise ValueError(f"NIfTI image ({name}) contains NaN or infinite values")
    zooms = _zooms3(img.header)
    axes = _axes_of(img)
    base = case_id or (name[: -len(".nii.gz")] if name.endswith(".nii.gz") else name.removesuffix(".nii"))
    header3 = img.header.copy()
    header3.set_data_shape(img.shape[:3])
    frames = []
    for t in range(img.shape[3]):
        frames.append(
            Volume(
                case_id=f"{base}_t{t:02d}",
                image=np.ascontiguousarray(np.transpose(raw[..., t], axes), dtype=np.float32),
                spacing=tuple(zooms[a] for a in axes),  # type: ignore[arg-type]
                affine=np.asarray(img.affine, np.float64),
                header=header3.copy(),
                meta={"axes": axes, "nifti_shape": tuple(int(s) for s in img.shape[:3]), "source": name, "frame": t, "cine_header": img.header},
            )
        )
    return frames


def cine_labels_to_nifti(labels: list[np.ndarray], frames: list[Volume]) -> nib.Nifti1Image:
    """Per-frame label maps (D, H, W) → one 4D uint8 NIfTI in the cine's geometry (frame t at [..., t])."""
    if len(labels) != len(frames) or not frames:
        raise ValueError(f"{len(labels)} label maps for {len(frames)} frames")
    per = [np.asarray(label_to_nifti(lab, f).dataobj) for lab, f in zip(labels, frames)]
    ref = label_to_nifti(labels[0], frames[0])
    header = frames[0].meta.get("cine_header", ref.header).copy()
    img = type(ref)(np.stack(per, axis=-1).astype(np.uint8), ref.affine, header=header)
    img.header.set_data_dtype(np.uint8)
    img.header["scl_slope"], img.header["scl_inter"] = 1.0, 0.0
    img.header["cal_min"], img.header["cal_max"] = 0, float(max(int(p.max(initial=0)) for p in per))
    img.set_qform(ref.affine, code=int(ref.header["qform_code"]))
    img.set_sform(ref.affine, code=int(ref.header["sform_code"]))
    return img


def load_cine_labels(src: str | Path | bytes, frames: list[Volume]) -> list[np.ndarray]:
    """A 4D label NIfTI (a path or the file's bytes) as per-frame (D, H, W) uint8 maps in the frames'
    axis order. ValueError for a file that is no 4D label map of len(frames) frames in 0..255."""
    if isinstance(src, bytes | bytearray | memoryview):
        img, name = nifti_from_bytes(bytes(src), allow_4d=True), "the label map"
    else:
        img, name = nib.load(str(src)), Path(src).name
    raw = np.asanyarray(img.dataobj)
    if raw.ndim != 4 or raw.shape[3] != len(frames):
        raise ValueError(f"{name}: a 4D label map of {len(frames)} frames expected, got shape {raw.shape}")
    data = label_values(raw, name).astype(np.uint8)
    return [np.ascontiguousarray(np.transpose(data[..., t], f.meta["axes"])) for t, f in enumerate(frames)]


def cycle_phase(t: int, frames: int) -> float:
    """Contraction of frame t of a cycle of `frames`: 0 at end-diastole (t=0), 1 at end-systole (mid-cycle)."""
    return 0.5 * (1.0 - np.cos(2.0 * np.pi * t / frames))


def synth_cine(seed: int, index: int, frames: int = 10, depth: int | None = None) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float], np.ndarray]:
    """A beating synthetic heart: image (T, D, H, W) int16, label (T, D, H, W) uint8 (RV 1, Myo 2, LV 3 on
    every frame), spacing (z, y, x) and the NIfTI affine. The same scene in every frame but the
    contraction, which runs end-diastole → end-systole → end-diastole. `depth` keeps the first slices."""
    if frames < 2:
        raise ValueError("a cine has at least 2 frames")
    imgs, labs = [], []
    for t in range(frames):
        c = synth_case(seed, index, phase=cycle_phase(t, frames))
        imgs.append(c.image[:depth] if depth else c.image)
        labs.append(c.label[:depth] if depth else c.label)
    return np.stack(imgs), np.stack(labs), c.spacing, c.affine


def write_cine_dataset(out: str | Path, cases: int, frames: int, seed: int = 0, depth: int | None = None) -> list[str]:
    """`out/<case>_4d.nii.gz` (x, y, z, t) int16 and its per-frame ground truth `out/truth/<case>_4d.nii.gz`
    (uint8); returns the case ids. The time step is 1000/frames ms (one cycle a second)."""
    out = Path(out)
    (out / "truth").mkdir(parents=True, exist_ok=True)
    ids = []
    for i in range(cases):
        image, label, _, affine = synth_cine(seed, i, frames, depth)
        cid = f"synth{i:03d}_4d"
        for arr, dest, dtype in ((image, out / f"{cid}.nii.gz", np.int16), (label, out / "truth" / f"{cid}.nii.gz", np.uint8)):
            xyzt = np.transpose(arr, (2, 3, 1, 0))  # (T, D, H, W) → (x=H, y=W, z=D, t)
            img = nib.Nifti1Image(xyzt.astype(dtype), affine)
            img.header.set_xyzt_units("mm", "msec")
            img.header.set_zooms((*np.abs(np.diag(affine)[:3]).tolist(), 1000.0 / frames))
            img.set_qform(affine, code=1)
            img.set_sform(affine, code=1)
            dest.write_bytes(nifti_to_bytes(img))
        ids.append(cid)
    return ids


def cine_dice(pred: np.ndarray, truth: np.ndarray, class_ids: list[int]) -> list[dict[int, float]]:
    """Per frame and class, the Dice of a 4D label map (x, y, z, t) against its ground truth."""
    from shared.metrics import dice

    if pred.shape != truth.shape or pred.ndim != 4:
        raise ValueError(f"4D label maps of one shape expected, got {pred.shape} and {truth.shape}")
    return [{k: float(dice(pred[..., t] == k, truth[..., t] == k)) for k in class_ids} for t in range(pred.shape[3])]


def temporal_prompts(probs: list[np.ndarray], weight: float, cyclic: bool = True) -> list[np.ndarray]:
    """The second pass's prompts of a cine from its first pass's per-frame probabilities: `temporal_blend`
    in the form the probabilities came in, uint8 p·255 (the wire's compact form, what a label job gets
    back) as uint8, floats as float32. Used by the label runner (`JobSpec.temporal_context`) and
    benchmarks/cine_context.py."""
    blended = temporal_blend(probs, weight, cyclic)
    if probs[0].dtype != np.uint8:
        return blended
    return [np.clip(np.rint(b), 0, 255).astype(np.uint8) for b in blended]


def temporal_blend(probs: list[np.ndarray], weight: float, cyclic: bool = True) -> list[np.ndarray]:
    """Frame t's refinement prompt from its neighbours in time, as `volume_context` does for slices z±1:
    (1 − 2w)·P_t + w·P_{t−1} + w·P_{t+1}, per frame (each (D, C, H, W) probabilities of one frame).
    The cardiac cycle is periodic, so by default frame 0's previous frame is the last; `cyclic=False`
    repeats the end frames instead. w in [0, 1/3]."""
    if not 0.0 <= float(weight) <= 1 / 3:
        raise ValueError(f"the temporal weight must be in [0, 1/3], got {weight}")
    n = len(probs)
    if n == 0 or len({p.shape for p in probs}) != 1:
        raise ValueError("one probability array of one shape per frame expected")
    w = float(weight)
    out = []
    for t in range(n):
        prev = probs[(t - 1) % n] if cyclic else probs[max(t - 1, 0)]
        nxt = probs[(t + 1) % n] if cyclic else probs[min(t + 1, n - 1)]
        out.append(((1 - 2 * w) * probs[t].astype(np.float32) + w * prev.astype(np.float32) + w * nxt.astype(np.float32)).astype(np.float32))
    return out
