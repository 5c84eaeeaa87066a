"""Two weight-free image encoders for the offline demo, each blind to what the other sees.

- :class:`ColourHistogramEncoder` (``offline_colour``): a soft hue histogram of the saturated pixels plus a
  soft grey-level histogram of the unsaturated ones, each normalised by its own pixel count. It sees the
  colour of an object and the tone pattern of the background, but not the object's outline (a histogram
  forgets where pixels are, and the normalisation forgets how many there are).
- :class:`EdgeOrientationEncoder` (``offline_shape``): a soft histogram of edge orientations of the
  brightness image (max over channels) (Sobel gradients above a contrast threshold), at two scales. It sees outlines (shape, letters) but
  not colour: orientations do not change with the fill colour, and weak background texture stays below the
  threshold.

Both are deterministic pure tensor code (CPU or CUDA), about a millisecond per 64x64 image.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from ...errors import SpecError
from .base import Encoder

__all__ = ["ColourHistogramEncoder", "EdgeOrientationEncoder"]

_EPS = 1e-6


def _check_size(image_size: Any) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 16:
        raise SpecError(f"encoder.image_size: expected an integer >= 16, got {image_size!r}")
    return image_size


def _soft_hist(values: torch.Tensor, weight: torch.Tensor, n_bins: int, *, circular: bool) -> torch.Tensor:
    """Weighted histogram with triangular soft binning, normalised to sum 1 (an all-zero one stays 0).

    ``values: [B, P]`` in [0, 1), ``weight: [B, P]`` -> ``[B, n_bins]``. Bin ``k`` is centred at
    ``(k + 0.5) / n_bins``; each value splits its weight between its two nearest centres (O(B P), no
    ``[B, P, K]`` temporary).
    """
    pos = values * n_bins - 0.5  # [B, P] in bin units
    lower = torch.floor(pos)
    frac = pos - lower  # share of the upper bin
    lower = lower.long()
    hist = torch.zeros(values.shape[0], n_bins + 2, device=values.device, dtype=weight.dtype)  # [B, K + 2]
    for idx, share in ((lower, 1 - frac), (lower + 1, frac)):
        idx = idx % n_bins if circular else idx.clamp(-1, n_bins) + 1  # out of range -> the two spare slots
        hist.scatter_add_(1, idx, weight * share)
    hist = hist[:, :n_bins] if circular else hist[:, 1 : n_bins + 1]  # [B, K]
    return hist / (hist.sum(dim=1, keepdim=True) + _EPS)


class _PilImageEncoder(Encoder):
    modality = "image"
    autocast_ok = False  # histograms: keep float32

    def __init__(self, image_size: int = 64):
        super().__init__()
        self.image_size = _check_size(image_size)

    def preprocess(self, raw: Image.Image) -> torch.Tensor:
        """PIL image -> ``[3, S, S]`` float in [0, 1] (resized to ``image_size``)."""
        img = raw.convert("RGB")
        if img.size != (self.image_size, self.image_size):
            img = img.resize((self.image_size, self.image_size), Image.Resampling.BILINEAR)
        return pil_to_tensor(img).float() / 255.0

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "model": type(self).__name__,
            "weights": None,
            "image_size": self.image_size,
        }


class ColourHistogramEncoder(_PilImageEncoder):
    """Hue histogram of saturated pixels ++ grey-level histogram of the rest (square-rooted), ``[B, 3, H, W] -> [B, d]``.

    Args:
        image_size: images are resized to this side first.
        hue_bins, grey_bins: histogram sizes; ``embed_dim = hue_bins + grey_bins``.
        saturation: a pixel counts as coloured above this saturation (soft threshold).
    """

    family = "offline_colour"

    def __init__(
        self, image_size: int = 64, hue_bins: int = 24, grey_bins: int = 12, saturation: float = 0.35
    ):
        super().__init__(image_size)
        self.hue_bins, self.grey_bins, self.saturation = int(hue_bins), int(grey_bins), float(saturation)
        self.embed_dim = self.hue_bins + self.grey_bins

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.float().flatten(2)  # [B, 3, P]
        r, g, b = x.unbind(1)  # [B, P] each
        v, _ = x.max(dim=1)  # [B, P]
        c = v - x.min(dim=1).values  # chroma [B, P]
        s = c / (v + _EPS)
        # hue in [0, 1): the standard piecewise formula
        cc = c + _EPS
        hue = (
            torch.where(v == r, ((g - b) / cc) % 6, torch.where(v == g, (b - r) / cc + 2, (r - g) / cc + 4))
            / 6
        )
        coloured = torch.sigmoid((s - self.saturation) * 20) * torch.sigmoid((v - 0.2) * 20)  # [B, P]
        h_hue = _soft_hist(hue % 1.0, coloured, self.hue_bins, circular=True)  # [B, Kh]
        grey = x.mean(dim=1).clamp(0, 1 - _EPS)  # [B, P]
        h_grey = _soft_hist(grey, 1 - coloured, self.grey_bins, circular=False)  # [B, Kg]
        return torch.cat([h_hue, h_grey], dim=1).sqrt()  # [B, Kh + Kg]

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "hue_bins": self.hue_bins,
            "grey_bins": self.grey_bins,
            "saturation": self.saturation,
        }


class EdgeOrientationEncoder(_PilImageEncoder):
    """Histograms of edge orientation at full and half resolution (square-rooted), ``[B, 3, H, W] -> [B, d]``.

    Args:
        image_size: images are resized to this side first.
        orientation_bins: bins over [0, pi) per scale; ``embed_dim = 2 * orientation_bins``.
        threshold: Sobel magnitude (brightness in [0, 1]) where an edge starts to count; full weight at 1.5x.
    """

    family = "offline_shape"

    def __init__(self, image_size: int = 64, orientation_bins: int = 16, threshold: float = 1.4):
        super().__init__(image_size)
        self.orientation_bins, self.threshold = int(orientation_bins), float(threshold)
        self.embed_dim = 2 * self.orientation_bins
        sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
        self.register_buffer("kernels", torch.stack([sobel_x, sobel_x.T]).unsqueeze(1), persistent=False)

    def _histogram(self, grey: torch.Tensor) -> torch.Tensor:
        grad = F.conv2d(grey, self.kernels.to(grey.dtype))  # [B, 1, H, W] -> [B, 2, H-2, W-2]
        gx, gy = grad[:, 0].flatten(1), grad[:, 1].flatten(1)  # [B, P]
        magnitude = torch.sqrt(gx**2 + gy**2)
        weight = ((magnitude - self.threshold) / (0.5 * self.threshold)).clamp(0, 1)  # [B, P]
        angle = torch.atan2(gy, gx) % math.pi / math.pi  # [B, P] in [0, 1)
        return _soft_hist(angle, weight, self.orientation_bins, circular=True)  # [B, K]

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.float()
        # brightness = max over channels: every saturated colour is bright, so edges do not depend on hue
        value = x.max(dim=1, keepdim=True).values  # [B, 1, H, W]
        half = F.avg_pool2d(value, 2)  # [B, 1, H/2, W/2]
        return torch.cat([self._histogram(value), self._histogram(half)], dim=1).sqrt()  # [B, 2K]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "orientation_bins": self.orientation_bins, "threshold": self.threshold}
