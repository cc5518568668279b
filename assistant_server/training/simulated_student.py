"""Simulated student predictions: ground truth made imperfect the way a half-trained student is.

Stage-1 training feeds these as dense prompts so the assistant learns to correct a student, and the
assistant's evaluation uses them (with a fixed seed) as its "noisy student" prompting mode. Per slice and
class, at random: erosion or dilation, a shift, holes, spurious blobs, or the class missing entirely;
then blurred and turned into soft probabilities. All on the label's device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class NoiseLevels:
    max_radius: int = 6  # erosion/dilation radius in pixels (of the 256×256 grid)
    max_shift: int = 8
    p_hole: float = 0.3
    p_blob: float = 0.3
    p_missing: float = 0.1
    blur: int = 7
    sharpness: float = 6.0  # logit scale of the binary masks before blurring


def _morph(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """mask: (1, 1, H, W) float; dilate (radius > 0) or erode (radius < 0) with a square."""
    if radius == 0:
        return mask
    k = 2 * abs(radius) + 1
    if radius > 0:
        return F.max_pool2d(mask, k, stride=1, padding=abs(radius))
    return 1 - F.max_pool2d(1 - mask, k, stride=1, padding=abs(radius))


def _disc(h: int, w: int, cy: float, cx: float, r: float, device) -> torch.Tensor:
    yy = torch.arange(h, device=device, dtype=torch.float32)[:, None]
    xx = torch.arange(w, device=device, dtype=torch.float32)[None, :]
    return (((yy - cy) ** 2 + (xx - cx) ** 2) <= r * r).float()


def simulate_student(
    label: torch.Tensor, num_classes: int, generator: torch.Generator, levels: NoiseLevels | None = None
) -> torch.Tensor:
    """label: (B, H, W) integer class map → simulated student softmax (B, C, H, W) float32."""
    lv = levels or NoiseLevels()
    b, h, w = label.shape
    dev = label.device

    def rnd() -> float:
        return float(torch.rand((), generator=generator))

    logits = torch.zeros(b, num_classes, h, w, device=dev)
    for i in range(b):
        for c in range(1, num_classes):
            m = (label[i] == c).float()[None, None]
            if m.sum() == 0 or rnd() < lv.p_missing:
                logits[i, c] = -lv.sharpness
                continue
            m = _morph(m, int(round((rnd() * 2 - 1) * lv.max_radius)))
            dy, dx = (int(round((rnd() * 2 - 1) * lv.max_shift)) for _ in range(2))
            m = torch.roll(m, shifts=(dy, dx), dims=(2, 3))
            ys, xs = torch.nonzero(m[0, 0] > 0, as_tuple=True)
            if len(ys) and rnd() < lv.p_hole:
                j = int(rnd() * len(ys))
                m = m * (1 - _disc(h, w, float(ys[j]), float(xs[j]), 3 + rnd() * 6, dev))
            if rnd() < lv.p_blob:
                cy = float(ys.float().mean()) if len(ys) else h / 2
                cx = float(xs.float().mean()) if len(xs) else w / 2
                cy += (rnd() * 2 - 1) * 40
                cx += (rnd() * 2 - 1) * 40
                m = torch.clamp(m + _disc(h, w, cy, cx, 3 + rnd() * 7, dev), 0, 1)
            logits[i, c] = lv.sharpness * (2 * m[0, 0] - 1)
    if lv.blur > 1:
        logits = F.avg_pool2d(logits, lv.blur, stride=1, padding=lv.blur // 2, count_include_pad=False)
    logits[:, 0] = 0.0  # background: the fixed reference logit, as in combine_classes
    return torch.softmax(logits, dim=1)
