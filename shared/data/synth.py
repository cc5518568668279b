"""Synthetic short-axis cardiac cine-MRI volumes with RV / Myo / LV labels, in the nnU-Net/MSD layout.

Each case is an analytic scene evaluated on a deformed pixel grid, one short-axis stack of 8-12 slices
from the base (slice 0) to the apex:

- heart: LV blood pool (bright ellipse, papillary muscles inside, labelled LV as in ACDC), myocardial
  ring around it (dark), RV cavity (bright crescent wrapped around the septum) with a thin unlabelled
  free wall, patchy epicardial fat; the LV cavity and RV shrink toward the apex (the RV ends earlier),
  and a stack can run past the apex (slices with no heart);
- surroundings that make it non-trivial: body with subcutaneous fat, lungs with vessels, a bright
  descending aorta (as bright as the blood pool), vertebra, liver in the apical slices;
- acquisition: random pose (rotation, translation, scale), a smooth random elastic deformation,
  through-plane drift and breath-hold jitter between slices, partial-volume edges, point-spread blur,
  a smooth multiplicative bias field and Rician noise. Intensities are in MR-like arbitrary units
  (blood ~900-1300, myocardium ~0.3x blood, lungs ~0.05x), stored as int16.

Geometry: in-plane 160-224 pixels per side (not necessarily square), 1.2-1.8 mm pixels, 5-10 mm slices;
the spacing is written into the NIfTI header. Case `i` of seed `s` depends only on (s, i): the same seed
gives byte-identical arrays, and adding cases does not change earlier ones.

`write_ssl4mis_layout` writes the same cases in the SSL4MIS HDF5 layout (for tests of that reader).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from shared.data.classes import CARDIAC_CLASSES
from shared.data.nifti import array_to_nifti_bytes, normalize_minmax

GENERATOR_VERSION = 1


@dataclass
class SynthCase:
    """One synthetic volume. image: (D, H, W) int16 MR intensities; label: (D, H, W) uint8;
    spacing: (z, y, x) mm; affine: (4, 4) of the NIfTI file (array axes x=H, y=W, z=D)."""

    case_id: str
    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray


def _ellipse_sd(x: np.ndarray, y: np.ndarray, a, b) -> np.ndarray:
    """Approximate signed distance (mm, negative inside) to the axis-aligned ellipse with semi-axes a, b.

    First-order (k - 1) / |grad k| near the boundary; a scaled level set deep inside, where only the
    sign matters. a, b broadcast against x, y (per-slice radii); non-positive radii mean 'absent'.
    """
    a = np.maximum(np.asarray(a, np.float32), np.float32(1e-3))  # float32 throughout: float64 scalars
    b = np.maximum(np.asarray(b, np.float32), np.float32(1e-3))  # would promote whole arrays
    px, py = x / a, y / b
    k = np.sqrt(px * px + py * py)
    px /= a
    py /= b
    g = np.sqrt(px * px + py * py)  # |grad k| * k
    km1 = k - 1.0
    near = km1 * k / np.maximum(g, 1e-6)
    deep = km1 * np.minimum(a, b)
    return np.where(k < 0.5, deep, near).astype(np.float32, copy=False)


def _rot(x: np.ndarray, y: np.ndarray, cx, cy, angle) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates of (x, y) in a frame centred at (cx, cy) and rotated by `angle` (radians)."""
    c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    dx, dy = x - np.asarray(cx, np.float32), y - np.asarray(cy, np.float32)
    return dx * c + dy * s, -dx * s + dy * c


def _soft(sd: np.ndarray, width: float) -> np.ndarray:
    """Partial-volume membership from a signed distance: 1 inside, 0 outside, ~1 pixel ramp."""
    return (0.5 * (1.0 - np.tanh(sd / (2.0 * width)))).astype(np.float32)


def _upsample_matrix(n: int, cells: int) -> np.ndarray:
    """(n, cells + 2) row-normalised Gaussian weights from coarse nodes (one beyond each edge) to pixels."""
    nodes = (np.arange(cells + 2) - 0.5) * (n / cells)
    pix = np.arange(n) + 0.5
    w = np.exp(-0.5 * ((pix[:, None] - nodes[None, :]) / (0.6 * n / cells)) ** 2)
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def _smooth_field(
    rng: np.random.Generator, shape: tuple[int, int, int], cells: int, z_corr: float
) -> np.ndarray:
    """Smooth zero-mean unit-std random field (D, H, W): coarse Gaussian noise interpolated with
    Gaussian weights (two small matrix products, much faster than spline zooming).

    `cells` ~ number of correlation lengths across the longer side; `z_corr` in [0, 1] is the share of
    a component common to all slices, so neighbouring slices deform alike."""
    d, h, w = shape
    ch = max(2, int(round(cells * h / max(h, w))))
    cw = max(2, int(round(cells * w / max(h, w))))
    shared = rng.standard_normal((1, ch + 2, cw + 2))
    own = rng.standard_normal((d, ch + 2, cw + 2))
    coarse = (np.sqrt(z_corr) * shared + np.sqrt(1.0 - z_corr) * own).astype(np.float32)
    field = np.einsum(
        "hc,dcw,xw->dhx", _upsample_matrix(h, ch), coarse, _upsample_matrix(w, cw), optimize=True
    )
    return ((field - field.mean()) / max(float(field.std()), 1e-6)).astype(np.float32)


def synth_case(seed: int, index: int, case_id: str | None = None, phase: float | None = None) -> SynthCase:
    """Generate case `index` of `seed` (see the module docstring). Deterministic in (seed, index).

    `phase` (the contraction: 0 end-diastole .. 1 end-systole) overrides the case's own random phase, all else equal:
    the frames of a cine (`synth_cine`)."""
    if seed < 0 or index < 0:
        raise ValueError("seed and index must be non-negative")
    rng = np.random.default_rng([int(seed), int(index), GENERATOR_VERSION])
    case_id = case_id or f"synth{index:03d}"

    # -- acquisition geometry ---------------------------------------------------------------------
    depth = int(rng.integers(8, 13))
    height, width = (int(v) for v in rng.integers(160, 225, size=2))
    px = float(np.round(rng.uniform(1.2, 1.8), 3))
    dz = float(np.round(rng.uniform(5.0, 10.0), 2))
    shape = (depth, height, width)
    ys = ((np.arange(height) - (height - 1) / 2) * px).astype(np.float32)
    xs = ((np.arange(width) - (width - 1) / 2) * px).astype(np.float32)
    gy, gx = np.meshgrid(ys, xs, indexing="ij")

    # smooth elastic deformation of the whole scene, 1.5-4 mm, mostly shared between slices
    amp = rng.uniform(1.5, 4.0)
    fx = _smooth_field(rng, shape, cells=6, z_corr=0.7)
    fy = _smooth_field(rng, shape, cells=6, z_corr=0.7)
    X = gx[None] + amp * fx
    Y = gy[None] + amp * fy
    dmax = amp * float(max(np.abs(fx).max(), np.abs(fy).max()))

    # pose: global rotation, scale and translation; heart drift through the stack + breath-hold jitter
    theta = rng.uniform(-0.45, 0.45)
    scale = rng.uniform(0.85, 1.2)
    k = np.arange(depth, dtype=np.float32)[:, None, None]
    drift = rng.normal(0.0, 1.5, size=2)
    jitter = rng.normal(0.0, 1.0, size=(2, depth, 1, 1))
    hx = (rng.uniform(-0.1, 0.1) * width * px + drift[0] * k + jitter[0]).astype(np.float32)
    hy = (rng.uniform(-0.1, 0.1) * height * px + drift[1] * k + jitter[1]).astype(np.float32)
    # body frame: origin at the heart, x to the patient's left (image right), y posterior (down)
    bx, by = _rot(X, Y, hx, hy, theta)
    bx, by = bx / np.float32(scale), by / np.float32(scale)
    pv = 0.45 * px / scale  # partial-volume ramp width, in body-frame mm
    cos_t, sin_t = np.cos(theta), np.sin(theta)

    def window(cx: float, cy: float, radius: float) -> tuple[slice, slice, slice] | None:
        """Pixel box holding the body-frame disc (cx, cy, radius) in every slice, deformation included.
        Small structures are evaluated inside their box only (the scene is ~3x cheaper this way)."""
        dx, dy = scale * (cx * cos_t - cy * sin_t), scale * (cx * sin_t + cy * cos_t)
        cols = (hx.ravel() + dx) / px + (width - 1) / 2
        rows = (hy.ravel() + dy) / px + (height - 1) / 2
        r = (radius * scale + dmax) / px + 2
        y0, y1 = max(0, int(np.floor(rows.min() - r))), min(height, int(np.ceil(rows.max() + r)) + 1)
        x0, x1 = max(0, int(np.floor(cols.min() - r))), min(width, int(np.ceil(cols.max() + r)) + 1)
        return None if y0 >= y1 or x0 >= x1 else (slice(None), slice(y0, y1), slice(x0, x1))

    # -- intensities (arbitrary units) ------------------------------------------------------------
    blood = rng.uniform(900.0, 1300.0)
    fat = blood * rng.uniform(0.7, 0.95)
    tissue = blood * rng.uniform(0.28, 0.42)
    myo_i = blood * rng.uniform(0.24, 0.36)
    lung = blood * rng.uniform(0.03, 0.08)
    liver_i = blood * rng.uniform(0.35, 0.5)
    rv_i = blood * rng.uniform(0.85, 1.05)
    aorta_i = blood * rng.uniform(0.8, 1.1)
    texture = 1.0 + rng.uniform(0.03, 0.08) * _smooth_field(rng, shape, cells=24, z_corr=0.3)

    img = np.zeros(shape, np.float32)
    full = (slice(None), slice(None), slice(None))

    def paint(member: np.ndarray, value, win=full) -> None:
        """Lay a structure over the image: partial-volume membership `member` of intensity `value`."""
        img[win] = img[win] * (1.0 - member) + member * value

    def disc(cx: float, cy: float, radius: float, value: float) -> None:
        win = window(cx, cy, radius + 3 * pv)
        if win is not None:
            paint(_soft(np.sqrt((bx[win] - cx) ** 2 + (by[win] - cy) ** 2) - radius, pv), value, win)

    # -- surroundings -----------------------------------------------------------------------------
    body_c = (rng.uniform(5, 35), rng.uniform(10, 40))
    body_ax = (rng.uniform(150, 190), rng.uniform(105, 135))
    fat_th = rng.uniform(6, 18)
    ex, ey = _rot(bx, by, body_c[0], body_c[1], rng.uniform(-0.1, 0.1))
    paint(_soft(_ellipse_sd(ex, ey, body_ax[0], body_ax[1]), pv), fat * texture)
    paint(_soft(_ellipse_sd(ex, ey, body_ax[0] - fat_th, body_ax[1] - fat_th), pv), tissue * texture)

    t = np.clip(k / (depth - 1), 0, 1)  # 0 at the base, 1 at the last slice
    for side in (-1.0, 1.0):  # lungs either side of the mediastinum
        lc = (side * rng.uniform(65, 85), rng.uniform(-5, 20))
        la = (rng.uniform(35, 50), rng.uniform(50, 75) * (1.0 - 0.25 * t))
        lx, ly = _rot(bx, by, lc[0], lc[1], side * rng.uniform(0.0, 0.35))
        paint(_soft(_ellipse_sd(lx, ly, la[0], la[1]), pv), lung * texture)
        for _ in range(int(rng.integers(2, 5))):  # pulmonary vessels: small bright dots
            vx = lc[0] + rng.uniform(-0.6, 0.6) * la[0]
            vy = lc[1] + rng.uniform(-0.5, 0.5) * 60
            disc(vx, vy, rng.uniform(2.0, 4.5), blood * rng.uniform(0.4, 0.8))

    liver_scale = np.clip(1.3 * t - 0.15, 0, 1)  # appears toward the apex (diaphragm)
    lvx, lvy = _rot(bx, by, rng.uniform(-90, -50), rng.uniform(55, 80), rng.uniform(-0.3, 0.3))
    paint(_soft(_ellipse_sd(lvx, lvy, 85 * liver_scale, 55 * liver_scale), pv), liver_i * texture)

    vert = (rng.uniform(5, 25), rng.uniform(85, 105))
    win = window(vert[0], vert[1], 25)
    if win is not None:
        vx_, vy_ = bx[win] - vert[0], by[win] - vert[1]
        paint(_soft(_ellipse_sd(vx_, vy_, 20, 17), pv), tissue * 0.25, win)
        paint(_soft(_ellipse_sd(vx_, vy_, 17, 14), pv), blood * rng.uniform(0.4, 0.55) * texture[win], win)
    ao = (vert[0] + rng.uniform(15, 30), vert[1] - rng.uniform(25, 35))
    disc(ao[0], ao[1], rng.uniform(9, 13), aorta_i)

    # -- heart (evaluated in a box around it) -------------------------------------------------------
    drawn = rng.uniform(0.0, 1.0)  # 0 end-diastole .. 1 end-systole (drawn always: the stream stays aligned)
    contraction = drawn if phase is None else float(np.clip(phase, 0.0, 1.0))
    r_cav = rng.uniform(18, 27) * (1.0 - 0.35 * contraction)
    thick = rng.uniform(6.0, 9.5) * (1.0 + 0.45 * contraction)
    ecc = rng.uniform(0.85, 1.0)
    alpha = rng.uniform(0, np.pi)
    extent = rng.uniform(0.9, 1.06)  # >1: the stack may run past the apex
    th = t * extent
    t_cav = rng.uniform(0.82, 0.95)
    t_epi = t_cav + rng.uniform(0.1, 0.16)
    t_rv = rng.uniform(0.65, 0.9)
    p = rng.uniform(2.0, 3.0)
    f_cav = np.sqrt(np.clip(1 - (th / t_cav) ** p, 0, 1))
    f_epi = np.sqrt(np.clip(1 - (th / t_epi) ** p, 0, 1))
    f_rv = np.sqrt(np.clip(1 - (th / t_rv) ** 2, 0, 1))
    cav_r = r_cav * f_cav
    epi_r = np.where(f_epi > 0, np.maximum((r_cav + thick) * f_epi, cav_r + 0.6 * thick * (cav_r > 0)), 0)

    beta = np.pi + rng.uniform(-0.5, 0.5)  # RV direction: image left, anterior-ish
    rv_d = (r_cav + thick) * rng.uniform(0.5, 0.7)
    rv_a0 = (r_cav + thick) * rng.uniform(0.9, 1.15)
    rv_b0 = (r_cav + thick) * rng.uniform(1.3, 1.6)
    wall = rng.uniform(2.0, 3.5)
    fat_gap = rng.uniform(2.5, 5.0)
    fat_phase = rng.uniform(0, 2 * np.pi)
    reach = max(rv_d + max(rv_a0, rv_b0) + wall, (r_cav + thick) / ecc + thick) + fat_gap + 3 * pv
    win = window(0.0, 0.0, reach)
    if win is None:  # the heart lies outside the field of view (not produced by the ranges above)
        win = full
    bxw, byw, tex = bx[win], by[win], texture[win]

    hxl, hyl = _rot(bxw, byw, 0.0, 0.0, alpha)
    cav_sd = _ellipse_sd(hxl, hyl, cav_r * ecc, cav_r / ecc)
    cav_sd = np.where(cav_r > 1.0, cav_sd, 1e3).astype(np.float32)
    wall_lv = epi_r - cav_r  # myocardial thickness per slice; the epicardium is the cavity grown by it
    epi_sd = _ellipse_sd(hxl, hyl, cav_r * ecc + wall_lv, cav_r / ecc + wall_lv)
    epi_sd = np.where(epi_r > 1.0, epi_sd, 1e3).astype(np.float32)

    rx, ry = _rot(bxw, byw, rv_d * np.cos(beta), rv_d * np.sin(beta), beta)
    rv_sd = _ellipse_sd(rx, ry, rv_a0 * f_rv, rv_b0 * f_rv)
    rv_sd = np.where(f_rv > 0.15, rv_sd, 1e3).astype(np.float32)
    rv_cav_sd = np.maximum(rv_sd, -epi_sd)  # RV cavity = RV ellipse minus the LV epicardium

    # epicardial fat: patchy bright band just outside the heart
    heart_sd = np.minimum(epi_sd, rv_sd - wall)
    patch = np.clip(np.cos(np.arctan2(byw, bxw) - fat_phase) * 1.5 - 0.2, 0, 1)
    paint(_soft(heart_sd - fat_gap, pv) * patch.astype(np.float32), fat, win)
    paint(_soft(rv_sd - wall, pv), myo_i * tex, win)  # RV free wall (background label)
    paint(_soft(epi_sd, pv), myo_i * tex, win)
    paint(_soft(rv_cav_sd, pv), rv_i * tex, win)
    paint(_soft(cav_sd, pv), blood * tex, win)

    # papillary muscles: dark blobs inside the LV cavity, mid-ventricular slices only
    pap_sd = np.full(hxl.shape, 1e3, np.float32)
    for _ in range(2):
        pa = rng.uniform(0, 2 * np.pi)
        pr = rng.uniform(2.5, 4.5) * ((th > 0.15) & (th < 0.75))
        pc = 0.6 * cav_r
        d = np.sqrt((hxl - pc * np.cos(pa)) ** 2 + (hyl - pc * np.sin(pa)) ** 2) - pr
        pap_sd = np.minimum(pap_sd, np.where(pr > 0, d, 1e3).astype(np.float32))
    paint(_soft(np.maximum(pap_sd, cav_sd), pv), myo_i * 1.1, win)

    label_w = np.zeros(hxl.shape, np.uint8)
    label_w[rv_cav_sd < 0] = 1
    label_w[epi_sd < 0] = 2
    label_w[cav_sd < 0] = 3  # papillary muscles inside the cavity stay LV, as in ACDC
    label = np.zeros(shape, np.uint8)
    label[win] = label_w

    # -- acquisition: blur, bias, noise -----------------------------------------------------------
    img = ndimage.gaussian_filter(img, sigma=(0, 0.6, 0.6), mode="nearest")
    ny, nx = gy / (height * px / 2), gx / (width * px / 2)
    c = rng.normal(0, [0.25, 0.25, 0.12, 0.12, 0.1])
    bias = np.exp(c[0] * nx + c[1] * ny + c[2] * nx * nx + c[3] * ny * ny + c[4] * nx * ny)
    bias = (bias / bias.mean())[None] * rng.uniform(0.94, 1.06, size=(depth, 1, 1))
    img = img * bias.astype(np.float32)
    sigma = blood * rng.uniform(0.015, 0.04)
    n1 = rng.standard_normal(shape, dtype=np.float32) * sigma
    n2 = rng.standard_normal(shape, dtype=np.float32) * sigma
    img = np.sqrt((img + n1) ** 2 + n2 * n2)  # magnitude of complex Gaussian noise: Rician
    image = np.clip(np.rint(img), 0, 32767).astype(np.int16)

    origin = np.array([-(height - 1) / 2 * px, -(width - 1) / 2 * px, 0.0])
    affine = np.diag([px, px, dz, 1.0])
    affine[:3, 3] = origin
    return SynthCase(case_id=case_id, image=image, label=label, spacing=(dz, px, px), affine=affine)


def _split_sizes(cases: int, val_fraction: float, min_val: int) -> int:
    n_val = max(int(min_val), int(round(cases * val_fraction)))
    if cases - n_val < 2:
        raise ValueError(
            f"{cases} cases leave {cases - n_val} for training after {n_val} validation cases; "
            f"need at least {n_val + 2}"
        )
    return n_val


def write_msd_dataset(
    out: str | Path,
    cases: int = 12,
    seed: int = 0,
    val_fraction: float = 0.25,
    min_val: int = 2,
    test_cases: int = 0,
    progress: bool = False,
) -> dict:
    """Write `cases` synthetic volumes (plus `test_cases` in imagesTs/labelsTs) in the nnU-Net/MSD layout.

    Files: imagesTr/<case>_0000.nii.gz (int16), labelsTr/<case>.nii.gz (uint8), dataset.json, and
    splits.json with the last max(min_val, round(cases * val_fraction)) cases as 'val' (and 'test').
    Returns the dataset.json content.
    """
    if cases < 1 or test_cases < 0:
        raise ValueError("cases must be >= 1 and test_cases >= 0")
    n_val = _split_sizes(cases, val_fraction, min_val)
    root = Path(out)
    for sub in ("imagesTr", "labelsTr") + (("imagesTs", "labelsTs") if test_cases else ()):
        (root / sub).mkdir(parents=True, exist_ok=True)
    ids = [f"synth{i:03d}" for i in range(cases + test_cases)]
    indices = range(cases + test_cases)
    if progress:
        from tqdm import tqdm

        indices = tqdm(indices, desc="synth", unit="case")
    for i in indices:
        case = synth_case(seed, i, ids[i])
        img_dir, lab_dir = ("imagesTr", "labelsTr") if i < cases else ("imagesTs", "labelsTs")
        # NIfTI array order (x, y, z) = (H, W, D): slices on the last axis, as scanners write them.
        (root / img_dir / f"{case.case_id}_0000.nii.gz").write_bytes(
            array_to_nifti_bytes(
                case.image.transpose(1, 2, 0), case.affine, np.int16, descrip="VESSA synth MRI"
            )
        )
        (root / lab_dir / f"{case.case_id}.nii.gz").write_bytes(
            array_to_nifti_bytes(
                case.label.transpose(1, 2, 0), case.affine, np.uint8, descrip="VESSA synth labels"
            )
        )
    meta = {
        "name": "vessa-synth-cardiac",
        "description": (
            "Synthetic short-axis cardiac cine-MRI (VESSA shared.data.synth): LV blood pool, myocardium, "
            "RV crescent, surrounding anatomy, elastic deformation, bias field and Rician noise."
        ),
        "reference": "generated, not acquired",
        "licence": "CC0",
        "tensorImageSize": "3D",
        "channel_names": {"0": "MRI"},
        "labels": {c.name: c.index for c in CARDIAC_CLASSES},
        # The class texts of this dataset's own structures (shared/data/msd_layout.py reads them).
        "label_descriptions": {c.name: c.description for c in CARDIAC_CLASSES},
        "numTraining": cases,
        "numTest": test_cases,
        "file_ending": ".nii.gz",
        "generator": {"module": "shared.data.synth", "version": GENERATOR_VERSION, "seed": seed},
    }
    (root / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    splits = {"train": ids[: cases - n_val], "val": ids[cases - n_val : cases]}
    if test_cases:
        splits["test"] = ids[cases:]
    (root / "splits.json").write_text(json.dumps(splits, indent=2) + "\n")
    return meta


def write_ssl4mis_layout(
    out: str | Path, cases: int = 6, seed: int = 0, val_cases: int = 2, test_cases: int = 0
) -> dict[str, list[str]]:
    """Write synthetic cases in the SSL4MIS HDF5 layout (slices/, volumes/, *.list), images min-max
    normalised to [0, 1] float32 like the SSL4MIS ACDC preprocessing.

    Cases are named `patient<NNN>_frame01` (one frame per patient); the first `cases - val_cases` are
    training slices, then `val_cases` validation and `test_cases` test volumes. Returns the lists.
    """
    import h5py

    if cases - val_cases < 1:
        raise ValueError("need at least one training case")
    root = Path(out)
    (root / "slices").mkdir(parents=True, exist_ok=True)
    (root / "volumes").mkdir(parents=True, exist_ok=True)
    names = [f"patient{i + 1:03d}_frame01" for i in range(cases + test_cases)]
    lists: dict[str, list[str]] = {"train": [], "train_slices": [], "val": [], "test": []}
    for i, name in enumerate(names):
        case = synth_case(seed, i, name)
        image = normalize_minmax(case.image.astype(np.float32))
        split = "train" if i < cases - val_cases else ("val" if i < cases else "test")
        lists[split].append(name)
        if split == "train":
            for k in range(image.shape[0]):
                key = f"{name}_slice_{k}"
                with h5py.File(root / "slices" / f"{key}.h5", "w") as f:
                    f.create_dataset("image", data=image[k])
                    f.create_dataset("label", data=case.label[k])
                lists["train_slices"].append(key)
        else:
            with h5py.File(root / "volumes" / f"{name}.h5", "w") as f:
                f.create_dataset("image", data=image)
                f.create_dataset("label", data=case.label)
    for key in ("train_slices", "train", "val") + (("test",) if test_cases else ()):
        (root / f"{key}.list").write_text("".join(f"{n}\n" for n in lists[key]))
    return lists
