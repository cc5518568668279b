"""Training data in memory, index sampling and on-device batched augmentation.

The datasets are small (ACDC: 1,312 training slices, about 330 MB at 256×256 float32), so every slice of
the protocol split is read once through the data layer's split pools, resized to the training resolution
(bilinear images, centre-aligned nearest labels: `shared.data.resize`) and kept as one tensor on the
training device. A batch is then an index into those tensors plus a batched augmentation on the device:
no DataLoader workers, no host-to-device copies per step.

Labels of unlabeled slices are never read: the unlabeled pool of `shared.data.split` only hands out
`UnlabeledSlice`s (images). With `pseudo` (the closed loop of a labeling job, services/labeling/loop.py)
the unlabeled pool is not even opened: the unlabeled slices are the job's cases, with the job's
pseudo-labels and per-slice weights (`shared.data.pseudo.PseudoLabeledSlices`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from shared.data.augment import GeometricParams, apply_geometric, sample_geometric
from shared.data.layouts import open_dataset
from shared.data.pseudo import PseudoLabeledSlices
from shared.data.resize import resize_image, resize_label
from shared.data.split import split_by_patient
from shared.data.types import ClassInfo
from student_trainer.config import AugmentSettings


@dataclass
class TrainingData:
    """labeled_images (NL, 1, S, S) float32 and labeled_labels (NL, S, S) uint8 on the device;
    unlabeled_images (NU, 1, S, S) float32 on the device and unlabeled_host (NU, S', S') float32 numpy
    (the canonical slices sent to the assistant, S' = the canonical size, usually S); keys and patients
    for logs and requests."""

    classes: list[ClassInfo]
    labeled_images: torch.Tensor
    labeled_labels: torch.Tensor
    labeled_keys: list[str]
    labeled_patients: list[str]
    unlabeled_images: torch.Tensor
    unlabeled_host: np.ndarray
    unlabeled_keys: list[str]
    unlabeled_patients: list[str]
    # the closed loop: pseudo-labels (NU, S, S) uint8 and per-slice weights (NU,) float32 of the unlabeled
    # slices, on the device (None: the protocol's unlabeled pool, whose labels are never read)
    unlabeled_labels: torch.Tensor | None = None
    unlabeled_weights: torch.Tensor | None = None

    @property
    def num_labeled(self) -> int:
        return int(self.labeled_images.shape[0])

    @property
    def num_unlabeled(self) -> int:
        return int(self.unlabeled_images.shape[0])


def load_training_data(
    root: str | Path,
    n_labeled: int,
    image_size: int,
    device: torch.device | str,
    need_unlabeled: bool = True,
    host_size: int | None = None,
    pseudo: PseudoLabeledSlices | None = None,
) -> TrainingData:
    """Read the protocol split of the dataset at `root` into memory (see the module docstring).

    `host_size`: the size of the host copy of the unlabeled slices (the canonical slices sent to the
    assistant, `shared.wire.canonical.CANONICAL_SIZE`); None: the training size. `pseudo`: the
    unlabeled slices are these pseudo-labeled ones (the protocol's unlabeled pool is not read)."""
    ds = open_dataset(root)
    split = split_by_patient(ds, n_labeled)
    size = (image_size, image_size)
    hsize = (host_size, host_size) if host_size else size

    l_images, l_labels, l_keys = [], [], []
    for item in split.labeled:
        l_images.append(resize_image(item.image, size))
        l_labels.append(resize_label(item.label, size))
        l_keys.append(item.ref.key)
    if not l_images:
        raise ValueError(f"no labeled slices for n_labeled={n_labeled} in {root}")

    if pseudo is not None:
        return _with_pseudo(ds.classes, l_images, l_labels, l_keys, list(split.labeled.patients), pseudo, size, device)
    u_images, u_host_list, u_keys = [], [], []
    if need_unlabeled:
        for item in split.unlabeled:
            u_images.append(resize_image(item.image, size))
            if hsize != size:
                u_host_list.append(resize_image(item.image, hsize))
            u_keys.append(item.ref.key)
    u_train = np.stack(u_images).astype(np.float32) if u_images else np.zeros((0, *size), np.float32)
    u_host = np.stack(u_host_list).astype(np.float32) if u_host_list else u_train

    device = torch.device(device)
    return TrainingData(
        classes=list(ds.classes),
        labeled_images=torch.from_numpy(np.stack(l_images)[:, None]).to(device),
        labeled_labels=torch.from_numpy(np.stack(l_labels).astype(np.uint8)).to(device),
        labeled_keys=l_keys,
        labeled_patients=list(split.labeled.patients),
        unlabeled_images=torch.from_numpy(u_train[:, None].copy()).to(device),
        unlabeled_host=u_host,
        unlabeled_keys=u_keys,
        unlabeled_patients=list(split.unlabeled.patients),
    )


def _with_pseudo(classes, l_images, l_labels, l_keys, l_patients, pseudo: PseudoLabeledSlices, size, device) -> TrainingData:
    u_images = [resize_image(im, size) for im in pseudo.images]
    u_labels = [resize_label(lab, size) for lab in pseudo.labels]
    u_train = np.stack(u_images).astype(np.float32) if u_images else np.zeros((0, *size), np.float32)
    u_lab = np.stack(u_labels).astype(np.uint8) if u_labels else np.zeros((0, *size), np.uint8)
    device = torch.device(device)
    return TrainingData(
        classes=list(classes),
        labeled_images=torch.from_numpy(np.stack(l_images)[:, None]).to(device),
        labeled_labels=torch.from_numpy(np.stack(l_labels).astype(np.uint8)).to(device),
        labeled_keys=l_keys,
        labeled_patients=l_patients,
        unlabeled_images=torch.from_numpy(u_train[:, None].copy()).to(device),
        unlabeled_host=u_train,
        unlabeled_keys=list(pseudo.keys),
        unlabeled_patients=list(dict.fromkeys(pseudo.cases)),
        unlabeled_labels=torch.from_numpy(u_lab).to(device),
        unlabeled_weights=torch.from_numpy(pseudo.weights.astype(np.float32)).to(device),
    )


class IndexSampler:
    """An endless shuffled stream over range(n): successive random permutations (epochs), like SSL4MIS's
    samplers (a batch may straddle two epochs). Its own CPU generator, so its state is saveable."""

    def __init__(self, n: int, seed: int) -> None:
        if n <= 0:
            raise ValueError("IndexSampler needs n >= 1")
        self.n = n
        self.gen = torch.Generator().manual_seed(seed)
        self.perm = torch.randperm(n, generator=self.gen)
        self.pos = 0
        self.epoch = 0

    def next(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            if self.pos >= self.n:
                self.perm = torch.randperm(self.n, generator=self.gen)
                self.pos = 0
                self.epoch += 1
            take = min(k - len(out), self.n - self.pos)
            out.extend(self.perm[self.pos : self.pos + take].tolist())
            self.pos += take
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "gen": self.gen.get_state().clone(),
            "perm": self.perm.clone(),
            "pos": self.pos,
            "epoch": self.epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["n"]) != self.n:
            raise ValueError(f"sampler state is for {state['n']} items, this dataset has {self.n}")
        self.gen.set_state(state["gen"])
        self.perm = state["perm"].clone()
        self.pos = int(state["pos"])
        self.epoch = int(state["epoch"])


_QUARTER: dict[tuple[str, torch.dtype], torch.Tensor] = {}


def _quarter_turns(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """R^k for k = 0..3, (4, 2, 2): [[1,0],[0,1]], [[0,-1],[1,0]], [[-1,0],[0,-1]], [[0,1],[-1,0]].
    Cached per device: building it from a Python list on a GPU would sync the stream at every call."""
    key = (str(device), dtype)
    if key not in _QUARTER:
        table = [[[1, 0], [0, 1]], [[0, -1], [1, 0]], [[-1, 0], [0, -1]], [[0, 1], [-1, 0]]]
        _QUARTER[key] = torch.tensor(table, dtype=dtype).to(device)
    return _QUARTER[key]


def geometric_theta(params: GeometricParams, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, 2, 3) affine matrices (for `F.affine_grid`, align_corners=False) of `shared.data.augment`'s
    per-sample transform on a square image: rot90 by k, then flip, then rotation by `angle`.

    In centred normalised coordinates (u right, v down) an output pixel p samples the source at
    R^k · F · A · p, where R: (u, v) -> (-v, u) undoes one counter-clockwise quarter turn as displayed
    (torch.rot90(x, 1, (-2, -1))[i, j] = x[j, W-1-i]), F negates v (flip 1, rows) or u (flip 2, columns),
    and A = [[c, -s], [s, c]] is the rotation's own sampling matrix (`shared.data.augment._rotation_grid`).
    """
    k = params.k.long() % 4
    a = params.angle.to(dtype) * (math.pi / 180.0)
    c, s = torch.cos(a), torch.sin(a)
    rot = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)  # (B, 2, 2)
    fu = torch.where(params.flip == 2, -1.0, 1.0).to(dtype)
    fv = torch.where(params.flip == 1, -1.0, 1.0).to(dtype)
    m = rot * torch.stack([fu, fv], -1).unsqueeze(-1)  # F · A: scale row u by fu, row v by fv
    m = _quarter_turns(k.device, dtype)[k] @ m
    return torch.cat([m, torch.zeros(m.shape[0], 2, 1, dtype=dtype, device=m.device)], dim=2)


def apply_geometric_fused(x: torch.Tensor, params: GeometricParams, mode: str = "bilinear") -> torch.Tensor:
    """`shared.data.augment.apply_geometric` for square images as one `grid_sample` over the batch.

    Same result (rot90 and flips land exactly on pixel centres; up to float rounding for bilinear and
    ties at half-pixel positions for nearest), but without host synchronisation (the shared version
    groups samples with `torch.unique(...).tolist()`), so a GPU step never waits for the host.
    x (B, H, W) integer labels or (B, C, H, W) float; integer tensors keep their dtype.
    """
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"mode must be 'bilinear' or 'nearest', got {mode!r}")
    squeezed = x.dim() == 3
    x4 = x.unsqueeze(1) if squeezed else x
    b, _, h, w = x4.shape
    if h != w:
        return apply_geometric(x, params, mode)  # rot90 of non-square images: the shared path decides
    integer = not x4.is_floating_point()
    work = x4.float() if integer else x4
    theta = geometric_theta(params.to(x4.device), torch.float32)
    grid = F.affine_grid(theta, [b, 1, h, w], align_corners=False).to(work.dtype)
    out = F.grid_sample(work, grid, mode=mode, padding_mode="zeros", align_corners=False)
    if integer:
        out = out.round().to(x4.dtype)
    return out.squeeze(1) if squeezed else out


class Augmenter:
    """SSL4MIS `RandomGenerator` on a batch, on the batch's device: per slice, with probability
    p_rot_flip a random rot90 + flip, otherwise with probability p_rotate a rotation in ±max_angle
    degrees, otherwise nothing; images bilinear, labels nearest. Parameters are drawn by
    `shared.data.augment.sample_geometric` (on the generator's device) and applied by
    `apply_geometric_fused`. The slices are already at the training size, so there is no resize. The
    drawn `GeometricParams` are returned so the same transform can be applied later to another map of
    the same slices (the assistant's pseudo-labels).
    """

    def __init__(self, cfg: AugmentSettings, generator: torch.Generator | None) -> None:
        self.cfg = cfg
        self.gen = generator

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, GeometricParams]:
        """images (B, 1, S, S) float, labels (B, S, S) integer or None -> (images, labels, params)."""
        params = sample_geometric(
            images.shape[0],
            self.gen,
            images.device,
            p_rot_flip=self.cfg.p_rot_flip,
            p_rotate=self.cfg.p_rotate,
            max_angle=self.cfg.max_angle,
        )
        out_images = apply_geometric_fused(images, params, "bilinear")
        out_labels = None if labels is None else apply_geometric_fused(labels, params, "nearest")
        return out_images, out_labels, params

    @staticmethod
    def apply_geometric(x: torch.Tensor, params: GeometricParams, mode: str = "nearest") -> torch.Tensor:
        """The transform of `params` on another batch of the same slices: (B, [C,] S, S)."""
        return apply_geometric_fused(x, params, mode)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor to `device` without a stream synchronisation (pinned, non-blocking) on CUDA."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
