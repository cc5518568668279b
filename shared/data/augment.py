"""Batched augmentations in torch, on whatever device the batch lives on (CPU or GPU).

Shapes: images (B, H, W) or (B, C, H, W) float; label maps (B, H, W) integer. Every random draw goes
through the `torch.Generator` passed in (sampled on the generator's device, then moved to the batch's
device), so a run is reproducible from its seed.

Weak (SSL4MIS `RandomGenerator`): with probability 1/2 a random rot90 (k in 0..3) followed by a flip
of one random axis; otherwise, with probability 1/2, a rotation by an angle in [-20, 20] degrees;
then a resize to 256 x 256. The geometric part is drawn as explicit `GeometricParams` and applied by
`apply_geometric`, so the same transform can be applied later to a pseudo-label or a probability map
computed on the unaugmented slice (`mode='nearest'` for labels). Conventions: k counts
counter-clockwise quarter turns as displayed (row 0 at the top), like `torch.rot90(x, k, (-2, -1))`;
`flip` is 0 none, 1 up-down (rows), 2 left-right (columns); `angle` is degrees counter-clockwise as
displayed, about the image centre, zero-filled outside the source (labels: background). Order: rot90,
then flip, then rotation.

Strong (UniMatch / FixMatch style, for images in [0, 1]): `color_jitter` (brightness, contrast,
gamma), `gaussian_blur`, `cutout`; `strong_augment` chains them. `cutmix_box` draws UniMatch's CutMix
boxes and `bcp_copy_paste_mask` BCP's copy-paste masks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


# -- random helpers --------------------------------------------------------------------------------
def _gen_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _rand(n: int, generator: torch.Generator | None, device: torch.device | None = None) -> Tensor:
    """(n,) uniform [0, 1) float32 drawn with `generator`, moved to `device`."""
    out = torch.rand(n, generator=generator, device=_gen_device(generator))
    return out if device is None else out.to(device)


def _randint(low: int, high: int, n: int, generator: torch.Generator | None, device=None) -> Tensor:
    """(n,) int64 uniform in [low, high)."""
    out = torch.randint(low, high, (n,), generator=generator, device=_gen_device(generator))
    return out if device is None else out.to(device)


def _uniform(lo: float, hi: float, n: int, generator, device=None) -> Tensor:
    return lo + (hi - lo) * _rand(n, generator, device)


# -- geometric -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GeometricParams:
    """Per-sample geometric transform. k: (B,) int64 0..3; flip: (B,) int64 0/1/2; angle: (B,) float32 deg."""

    k: Tensor
    flip: Tensor
    angle: Tensor

    def __len__(self) -> int:
        return int(self.k.shape[0])

    def to(self, device: torch.device | str) -> GeometricParams:
        return GeometricParams(self.k.to(device), self.flip.to(device), self.angle.to(device))

    @staticmethod
    def identity(batch: int, device: torch.device | str | None = None) -> GeometricParams:
        z = torch.zeros(batch, dtype=torch.int64, device=device)
        return GeometricParams(z, z.clone(), torch.zeros(batch, dtype=torch.float32, device=device))


def sample_geometric(
    batch: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    p_rot_flip: float = 0.5,
    p_rotate: float = 0.5,
    max_angle: float = 20.0,
) -> GeometricParams:
    """SSL4MIS's choice per sample: rot90+flip with p_rot_flip, else rotation with p_rotate, else none.

    rot90+flip: k uniform in 0..3 and one of the two axes flipped (SSL4MIS always flips one axis);
    rotation: angle uniform in [-max_angle, max_angle] degrees."""
    device = torch.device(device) if device is not None else _gen_device(generator)
    u1 = _rand(batch, generator, device)
    u2 = _rand(batch, generator, device)
    k = _randint(0, 4, batch, generator, device)
    axis = _randint(1, 3, batch, generator, device)
    angle = _uniform(-max_angle, max_angle, batch, generator, device)
    rot_flip = u1 < p_rot_flip
    rotate = (~rot_flip) & (u2 < p_rotate)
    zero = torch.zeros_like(k)
    return GeometricParams(
        k=torch.where(rot_flip, k, zero),
        flip=torch.where(rot_flip, axis, zero),
        angle=torch.where(rotate, angle, torch.zeros_like(angle)).float(),
    )


def _as_4d(x: Tensor) -> tuple[Tensor, bool]:
    if x.dim() == 3:
        return x.unsqueeze(1), True
    if x.dim() == 4:
        return x, False
    raise ValueError(f"expected a (B, H, W) or (B, C, H, W) tensor, got shape {tuple(x.shape)}")


def _rotation_grid(angle_deg: Tensor, h: int, w: int, dtype: torch.dtype) -> Tensor:
    """Sampling grid (n, h, w, 2) rotating each image counter-clockwise (as displayed) by its angle."""
    a = angle_deg.to(dtype) * (math.pi / 180.0)
    c, s = torch.cos(a), torch.sin(a)
    # Output pixel p (x right, y down, about the centre) samples the source at [[c, -s], [s, c]] p; in
    # affine_grid's normalised coordinates (x scaled by w/2, y by h/2) the off-diagonals pick up h/w.
    theta = torch.zeros(a.shape[0], 2, 3, dtype=dtype, device=a.device)
    theta[:, 0, 0] = c
    theta[:, 0, 1] = -s * (h / w)
    theta[:, 1, 0] = s * (w / h)
    theta[:, 1, 1] = c
    return F.affine_grid(theta, [a.shape[0], 1, h, w], align_corners=False)


def apply_geometric(x: Tensor, params: GeometricParams, mode: str = "bilinear") -> Tensor:
    """Apply per-sample rot90, flip and rotation to a batch (B, H, W) or (B, C, H, W).

    mode: 'bilinear' for images and probability maps, 'nearest' for label maps (integer tensors keep
    their dtype). rot90 and flips are exact index operations; odd k needs square images. Pixels rotated
    in from outside the image are 0 (for a probability map, apply to a ones tensor to get the valid mask).
    """
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"mode must be 'bilinear' or 'nearest', got {mode!r}")
    x4, squeezed = _as_4d(x)
    b, _, h, w = x4.shape
    if len(params) != b:
        raise ValueError(f"params are for {len(params)} samples, the batch has {b}")
    params = params.to(x4.device)
    out = x4.clone()
    if h != w and bool((params.k % 2 == 1).any()):
        raise ValueError(f"odd rot90 needs square images, got {h}x{w}; resize first")
    combos = params.k * 3 + params.flip
    for combo in torch.unique(combos).tolist():
        k, flip = divmod(int(combo), 3)
        if k == 0 and flip == 0:
            continue
        idx = (combos == combo).nonzero(as_tuple=True)[0]
        sel = out.index_select(0, idx)
        if k:
            sel = torch.rot90(sel, k, dims=(-2, -1))
        if flip:
            sel = torch.flip(sel, dims=(-2,) if flip == 1 else (-1,))
        out.index_copy_(0, idx, sel)
    rot_idx = (params.angle != 0).nonzero(as_tuple=True)[0]
    if rot_idx.numel():
        sel = out.index_select(0, rot_idx)
        integer = not sel.is_floating_point()
        work = sel.float() if integer else sel
        grid = _rotation_grid(params.angle.index_select(0, rot_idx), h, w, work.dtype)
        rotated = F.grid_sample(work, grid, mode=mode, padding_mode="zeros", align_corners=False)
        if integer:
            rotated = rotated.round().to(sel.dtype)
        out.index_copy_(0, rot_idx, rotated)
    return out.squeeze(1) if squeezed else out


def resize(x: Tensor, size: int | tuple[int, int] = 256, mode: str = "bilinear") -> Tensor:
    """Resize (B, H, W) / (B, C, H, W) to `size`: 'bilinear' (align_corners=False) for images,
    'nearest' for labels (centre-aligned 'nearest-exact', matching `shared.data.resize.resize_label`)."""
    if isinstance(size, int):
        size = (size, size)
    x4, squeezed = _as_4d(x)
    if tuple(x4.shape[-2:]) == tuple(size):
        return x
    if mode == "bilinear":
        out = F.interpolate(
            x4.float() if not x4.is_floating_point() else x4, size=size, mode="bilinear", align_corners=False
        )
    elif mode == "nearest":
        integer = not x4.is_floating_point()
        out = F.interpolate(x4.float() if integer else x4, size=size, mode="nearest-exact")
        if integer:
            out = out.round().to(x4.dtype)
    else:
        raise ValueError(f"mode must be 'bilinear' or 'nearest', got {mode!r}")
    return out.squeeze(1) if squeezed else out


@dataclass(frozen=True)
class WeakAugmented:
    """Output of `weak_augment`: image (B, [C,] S, S), label (B, S, S) or None, and the parameters."""

    image: Tensor
    label: Tensor | None
    params: GeometricParams


def weak_augment(
    image: Tensor,
    label: Tensor | None = None,
    generator: torch.Generator | None = None,
    size: int | tuple[int, int] | None = 256,
    **sample_kwargs,
) -> WeakAugmented:
    """SSL4MIS weak augmentation: `sample_geometric`, `apply_geometric` (image bilinear, label nearest),
    then resize to `size` (None: keep). Non-square inputs are resized first so rot90 keeps the shape."""
    if size is not None and image.shape[-2] != image.shape[-1]:
        image = resize(image, size, "bilinear")
        label = None if label is None else resize(label, size, "nearest")
    params = sample_geometric(image.shape[0], generator, image.device, **sample_kwargs)
    img = apply_geometric(image, params, "bilinear")
    lab = None if label is None else apply_geometric(label, params, "nearest")
    if size is not None:
        img = resize(img, size, "bilinear")
        lab = None if lab is None else resize(lab, size, "nearest")
    return WeakAugmented(img, lab, params)


# -- strong (photometric and masking) --------------------------------------------------------------
def _per_sample(v: Tensor, x: Tensor) -> Tensor:
    return v.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)


def color_jitter(
    x: Tensor,
    generator: torch.Generator | None = None,
    brightness: float = 0.4,
    contrast: float = 0.4,
    gamma: tuple[float, float] = (0.7, 1.5),
    p: float = 0.8,
) -> Tensor:
    """Per-sample brightness (x * b, b in [1-brightness, 1+brightness]), contrast (about the sample
    mean, c in [1-contrast, 1+contrast]) and gamma (x ** g, log-uniform in `gamma`), each applied with
    probability p; output clamped to [0, 1]. x: (B, ...) float in [0, 1]."""
    n = x.shape[0]
    dev = x.device
    apply = _rand(n, generator, dev) < p
    b = torch.where(
        apply, _uniform(1 - brightness, 1 + brightness, n, generator, dev), torch.ones(n, device=dev)
    )
    c = torch.where(apply, _uniform(1 - contrast, 1 + contrast, n, generator, dev), torch.ones(n, device=dev))
    lg = _uniform(math.log(gamma[0]), math.log(gamma[1]), n, generator, dev)
    g = torch.where(apply, lg.exp(), torch.ones(n, device=dev))
    out = x * _per_sample(b, x)
    mean = out.flatten(1).mean(dim=1)
    out = (out - _per_sample(mean, x)) * _per_sample(c, x) + _per_sample(mean, x)
    out = out.clamp(0.0, 1.0) ** _per_sample(g, x)
    return out.clamp(0.0, 1.0)


def gaussian_blur(
    x: Tensor,
    generator: torch.Generator | None = None,
    p: float = 0.5,
    sigma: tuple[float, float] = (0.1, 2.0),
) -> Tensor:
    """Per-sample Gaussian blur with sigma uniform in `sigma`, applied with probability p (separable,
    reflect padding; one depthwise convolution for the whole batch). x: (B, H, W) or (B, C, H, W)."""
    x4, squeezed = _as_4d(x)
    b, ch, h, w = x4.shape
    dev = x4.device
    apply = _rand(b, generator, dev) < p
    s = _uniform(sigma[0], sigma[1], b, generator, dev)
    radius = int(math.ceil(3 * sigma[1]))
    taps = torch.arange(-radius, radius + 1, device=dev, dtype=x4.dtype)
    kern = torch.exp(-0.5 * (taps[None, :] / s[:, None].to(x4.dtype)) ** 2)
    kern = kern / kern.sum(dim=1, keepdim=True)
    delta = (taps == 0).to(x4.dtype).expand(b, -1)
    kern = torch.where(apply[:, None], kern, delta)  # samples not drawn pass through unchanged
    kern = kern.repeat_interleave(ch, dim=0)  # (B*C, K)
    pad_r = min(radius, h - 1, w - 1)
    if pad_r < radius:  # tiny images: crop the kernel so reflect padding stays valid
        kern = kern[:, radius - pad_r : radius + pad_r + 1]
        kern = kern / kern.sum(dim=1, keepdim=True)
    flat = x4.reshape(1, b * ch, h, w)
    flat = F.pad(flat, (pad_r, pad_r, 0, 0), mode="reflect")
    flat = F.conv2d(flat, kern[:, None, None, :], groups=b * ch)
    flat = F.pad(flat, (0, 0, pad_r, pad_r), mode="reflect")
    flat = F.conv2d(flat, kern[:, None, :, None], groups=b * ch)
    out = flat.reshape(b, ch, h, w)
    return out.squeeze(1) if squeezed else out


def _boxes(
    b: int,
    h: int,
    w: int,
    generator,
    device,
    area: tuple[float, float],
    ratio: tuple[float, float],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Random boxes (y0, x0, bh, bw), each (B,) int64, area fraction in `area`, aspect ratio in `ratio`."""
    a = _uniform(area[0], area[1], b, generator, device) * (h * w)
    r = torch.exp(_uniform(math.log(ratio[0]), math.log(ratio[1]), b, generator, device))
    bh = torch.sqrt(a * r).round().clamp(1, h).long()
    bw = torch.sqrt(a / r).round().clamp(1, w).long()
    y0 = (_rand(b, generator, device) * (h - bh + 1).float()).floor().long()
    x0 = (_rand(b, generator, device) * (w - bw + 1).float()).floor().long()
    return y0, x0, bh, bw


def _box_mask(y0: Tensor, x0: Tensor, bh: Tensor, bw: Tensor, h: int, w: int) -> Tensor:
    """(B, H, W) bool, True inside each sample's box."""
    rows = torch.arange(h, device=y0.device)[None, :, None]
    cols = torch.arange(w, device=y0.device)[None, None, :]
    inside_y = (rows >= y0[:, None, None]) & (rows < (y0 + bh)[:, None, None])
    inside_x = (cols >= x0[:, None, None]) & (cols < (x0 + bw)[:, None, None])
    return inside_y & inside_x


def cutout(
    x: Tensor,
    generator: torch.Generator | None = None,
    p: float = 0.5,
    area: tuple[float, float] = (0.02, 0.4),
    ratio: tuple[float, float] = (0.3, 1 / 0.3),
    fill: str | float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Blank one random box per sample (probability p). fill: a value, or 'noise' (uniform [0, 1) per
    pixel, as UniMatch's cutout). Returns (image, mask (B, H, W) bool, True where cut out), so an
    unsupervised loss can ignore the region."""
    x4, squeezed = _as_4d(x)
    b, _, h, w = x4.shape
    dev = x4.device
    apply = _rand(b, generator, dev) < p
    mask = _box_mask(*_boxes(b, h, w, generator, dev, area, ratio), h, w) & apply[:, None, None]
    if fill == "noise":
        noise = torch.rand(x4.shape, generator=generator, device=_gen_device(generator)).to(dev, x4.dtype)
        out = torch.where(mask[:, None], noise, x4)
    else:
        out = x4.masked_fill(mask[:, None], float(fill))
    return (out.squeeze(1) if squeezed else out), mask


def strong_augment(
    x: Tensor,
    generator: torch.Generator | None = None,
    jitter: dict | None = None,
    blur: dict | None = None,
    cut: dict | None = None,
) -> tuple[Tensor, Tensor]:
    """color_jitter -> gaussian_blur -> cutout with their defaults (override with the dicts).
    Returns (image, cutout mask (B, H, W) bool)."""
    out = color_jitter(x, generator, **(jitter or {}))
    out = gaussian_blur(out, generator, **(blur or {}))
    return cutout(out, generator, **(cut or {}))


def cutmix_box(
    batch: int,
    size: int | tuple[int, int],
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    p: float = 0.5,
    area: tuple[float, float] = (0.02, 0.4),
    ratio: tuple[float, float] = (0.3, 1 / 0.3),
) -> Tensor:
    """UniMatch's `obtain_cutmix_box`, batched: (B, H, W) int64, 1 inside the box (with probability p,
    else all 0). Mix as `x = where(box == 1, x_other, x)`."""
    h, w = (size, size) if isinstance(size, int) else size
    device = torch.device(device) if device is not None else _gen_device(generator)
    apply = _rand(batch, generator, device) < p
    mask = _box_mask(*_boxes(batch, h, w, generator, device, area, ratio), h, w) & apply[:, None, None]
    return mask.long()


def bcp_copy_paste_mask(
    batch: int,
    size: int | tuple[int, int],
    ratio: float = 2 / 3,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    per_sample: bool = False,
) -> Tensor:
    """BCP's `generate_mask`: (B, H, W) int64, 0 inside a box of (int(H*ratio), int(W*ratio)) at a
    random position, 1 outside.

    Convention (BCP's): mask == 1 keeps the first image, mask == 0 (the box) takes the second, i.e.
    `mixed = a * mask + b * (1 - mask)`; in BCP's ACDC code the box is filled from the labeled image and
    the surround from the unlabeled one. The box corner is uniform in [0, H - h) x [0, W - w) as BCP's
    `np.random.randint`. As in BCP, one box serves the whole batch unless `per_sample=True`.
    """
    h, w = (size, size) if isinstance(size, int) else size
    device = torch.device(device) if device is not None else _gen_device(generator)
    ph, pw = int(h * ratio), int(w * ratio)
    n = batch if per_sample else 1
    y0 = _randint(0, max(1, h - ph), n, generator, device)
    x0 = _randint(0, max(1, w - pw), n, generator, device)
    box = _box_mask(y0, x0, torch.full_like(y0, ph), torch.full_like(x0, pw), h, w)
    mask = (~box).long()
    return mask if per_sample else mask.expand(batch, h, w).clone()
