"""The SSL4MIS 2D UNet (HiLab-git/SSL4MIS `code/networks/unet.py`, borrowed there from PyMIC).

Encoder: five stages of two 3×3 conv + BatchNorm + LeakyReLU with dropout between the convolutions
(features 16-32-64-128-256, dropout 0.05-0.1-0.2-0.3-0.5), 2×2 max pooling between stages. Decoder: four
up blocks (upsample, concatenate the skip, conv block without dropout), then a 3×3 conv to C logits.

Upsampling. SSL4MIS's `UpBlock` has two modes: `transpose` (a 2×2 stride-2 ConvTranspose2d) and
`bilinear` (a 1×1 conv to the skip width, then ×2 bilinear upsampling with align_corners=True). Both are
here, picked by `upsampling`. Note: in SSL4MIS's published code the `UNet` that the ACDC tables were made
with ends up bilinear (the decoder does not pass its `bilinear: False` flag down and `UpBlock` defaults to
bilinear), and BCP's `UNet_2dBCP` is bilinear too. The state-dict key names match SSL4MIS's, so their
checkpoints load into the matching mode.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Upsampling = Literal["bilinear", "transpose"]

FEATURES: tuple[int, ...] = (16, 32, 64, 128, 256)
DROPOUT: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5)


class ConvBlock(nn.Module):
    """Two 3×3 conv + BN + LeakyReLU, dropout between them. (B, Cin, H, W) -> (B, Cout, H, W)."""

    def __init__(self, in_channels: int, out_channels: int, dropout_p: float) -> None:
        super().__init__()
        self.conv_conv = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(),
            nn.Dropout(dropout_p),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_conv(x)


class DownBlock(nn.Module):
    """2×2 max pooling then a conv block. (B, Cin, H, W) -> (B, Cout, H/2, W/2)."""

    def __init__(self, in_channels: int, out_channels: int, dropout_p: float) -> None:
        super().__init__()
        self.maxpool_conv = nn.Sequential(nn.MaxPool2d(2), ConvBlock(in_channels, out_channels, dropout_p))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool_conv(x)


class UpBlock(nn.Module):
    """Upsample x1 (B, C1, h, w) to (B, C2, 2h, 2w), concatenate the skip x2 (B, C2, 2h, 2w), conv block."""

    def __init__(
        self,
        in_channels1: int,
        in_channels2: int,
        out_channels: int,
        dropout_p: float,
        upsampling: Upsampling,
    ) -> None:
        super().__init__()
        self.bilinear = upsampling == "bilinear"
        if self.bilinear:
            self.conv1x1 = nn.Conv2d(in_channels1, in_channels2, kernel_size=1)
            self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        else:
            self.up = nn.ConvTranspose2d(in_channels1, in_channels2, kernel_size=2, stride=2)
        self.conv = ConvBlock(in_channels2 * 2, out_channels, dropout_p)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        if self.bilinear:
            x1 = self.conv1x1(x1)
        x1 = self.up(x1)
        return self.conv(torch.cat([x2, x1], dim=1))


class Encoder(nn.Module):
    """(B, Cin, H, W) -> five feature maps at strides 1, 2, 4, 8, 16."""

    def __init__(self, in_channels: int, features: tuple[int, ...], dropout: tuple[float, ...]) -> None:
        super().__init__()
        if len(features) != 5 or len(dropout) != 5:
            raise ValueError("the SSL4MIS UNet has exactly five encoder stages")
        self.in_conv = ConvBlock(in_channels, features[0], dropout[0])
        self.down1 = DownBlock(features[0], features[1], dropout[1])
        self.down2 = DownBlock(features[1], features[2], dropout[2])
        self.down3 = DownBlock(features[2], features[3], dropout[3])
        self.down4 = DownBlock(features[3], features[4], dropout[4])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x0 = self.in_conv(x)
        x1 = self.down1(x0)
        x2 = self.down2(x1)
        x3 = self.down3(x2)
        x4 = self.down4(x3)
        return [x0, x1, x2, x3, x4]


class Decoder(nn.Module):
    """Five feature maps -> (B, num_classes, H, W) logits. No dropout in the decoder, as SSL4MIS."""

    def __init__(self, features: tuple[int, ...], num_classes: int, upsampling: Upsampling) -> None:
        super().__init__()
        f = features
        self.up1 = UpBlock(f[4], f[3], f[3], 0.0, upsampling)
        self.up2 = UpBlock(f[3], f[2], f[2], 0.0, upsampling)
        self.up3 = UpBlock(f[2], f[1], f[1], 0.0, upsampling)
        self.up4 = UpBlock(f[1], f[0], f[0], 0.0, upsampling)
        self.out_conv = nn.Conv2d(f[0], num_classes, kernel_size=3, padding=1)

    def forward(self, feature: list[torch.Tensor]) -> torch.Tensor:
        x0, x1, x2, x3, x4 = feature
        x = self.up1(x4, x3)
        x = self.up2(x, x2)
        x = self.up3(x, x1)
        x = self.up4(x, x0)
        return self.out_conv(x)


class UNet(nn.Module):
    """SSL4MIS `UNet(in_chns, class_num)`: (B, in_channels, H, W) -> (B, num_classes, H, W) logits.

    H and W must be multiples of 16 (four poolings); training and inference use 256×256.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 4,
        upsampling: Upsampling = "bilinear",
        features: tuple[int, ...] = FEATURES,
        dropout: tuple[float, ...] = DROPOUT,
    ) -> None:
        super().__init__()
        if upsampling not in ("bilinear", "transpose"):
            raise ValueError(f"upsampling must be 'bilinear' or 'transpose', got {upsampling!r}")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.upsampling = upsampling
        self.encoder = Encoder(in_channels, tuple(features), tuple(dropout))
        self.decoder = Decoder(tuple(features), num_classes, upsampling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
