"""A simulated device sensor that differs from the host's: misaligned, rotated, dimmer, noisier.

numpy only, so the same shift can be applied on the device side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import DataError
from .datasets import Dataset


def _spans(d: int, size: int) -> tuple[slice, slice]:
    """(source, destination) slices along one axis for a move of d pixels (|d| < size)."""
    return (slice(0, size - d), slice(d, size)) if d >= 0 else (slice(-d, size), slice(0, size + d))


def translate_images(images: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """Move (N, H, W) images dx pixels right and dy pixels down; vacated pixels become 0."""
    n, h, w = images.shape
    out = np.zeros_like(images)
    if abs(dx) >= w or abs(dy) >= h:
        return out  # everything moved out of the frame
    src_r, dst_r = _spans(dy, h)
    src_c, dst_c = _spans(dx, w)
    out[:, dst_r, dst_c] = images[:, src_r, src_c]
    return out


def rotate_images(images: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate (N, H, W) images counter-clockwise (as displayed) about their centre, bilinear.

    Positive angles turn the same way as np.rot90(img, k=1); samples from outside the frame are 0.
    """
    n, h, w = images.shape
    theta = math.radians(degrees)
    cos, sin = math.cos(theta), math.sin(theta)
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0

    # Inverse mapping: for each output pixel, the source position it is read from.
    rows, cols = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    y, x = rows - cy, cols - cx
    src_r = cy + cos * y + sin * x
    src_c = cx + cos * x - sin * y

    r0, c0 = np.floor(src_r).astype(np.int64), np.floor(src_c).astype(np.int64)
    fr, fc = src_r - r0, src_c - c0
    flat = images.reshape(n, h * w).astype(np.float64)
    out = np.zeros((n, h * w), dtype=np.float64)
    # Sum the four neighbours; those outside the frame contribute 0 (zero padding).
    for dr, dc, weight in (
        (0, 0, (1 - fr) * (1 - fc)),
        (0, 1, (1 - fr) * fc),
        (1, 0, fr * (1 - fc)),
        (1, 1, fr * fc),
    ):
        r, c = r0 + dr, c0 + dc
        inside = ((r >= 0) & (r < h) & (c >= 0) & (c < w) & (weight > 0)).ravel()
        idx = (r * w + c).ravel()[inside]
        out[:, inside] += flat[:, idx] * weight.ravel()[inside]
    return out.reshape(n, h, w).astype(images.dtype)


@dataclass
class SensorShift:
    """How the device's sensor differs from the host's. Applied in the order of the fields."""

    dx: int = 1  # pixels right (positive) or left
    dy: int = 0  # pixels down (positive) or up
    rotation_deg: float = 0.0  # counter-clockwise about the image centre
    gain: float = 1.0
    offset: float = 0.0
    noise_std: float = 0.0  # additive Gaussian noise, in raw units
    clip: tuple[float, float] | None = None  # e.g. (0, 16) for digits

    def __post_init__(self) -> None:
        if self.noise_std < 0 or not math.isfinite(self.noise_std):
            raise DataError(f"noise_std must be a finite number >= 0, got {self.noise_std}")
        for name in ("rotation_deg", "gain", "offset"):
            if not math.isfinite(getattr(self, name)):
                raise DataError(f"{name} must be finite, got {getattr(self, name)}")
        if self.clip is not None:
            lo, hi = self.clip
            if not lo <= hi:
                raise DataError(f"clip must be (low, high) with low <= high, got {self.clip}")

    def apply(self, ds: Dataset, seed: int) -> Dataset:
        """A shifted copy of ds; the same seed gives the same noise."""
        if ds.image_shape is None:
            raise DataError(f"{ds.name}: a sensor shift needs images, but the dataset has no image_shape")
        if len(ds.image_shape) != 2:
            raise DataError(f"{ds.name}: a sensor shift needs one-channel images, got shape {ds.image_shape}")
        h, w = ds.image_shape
        images = ds.X.reshape(len(ds), h, w).astype(np.float64)

        # Geometry first (it is the optics), then the electronics: gain/offset, noise, ADC clipping.
        if self.dx or self.dy:
            images = translate_images(images, int(self.dx), int(self.dy))
        if self.rotation_deg:
            images = rotate_images(images, self.rotation_deg)
        X = images.reshape(len(ds), h * w) * self.gain + self.offset
        if self.noise_std > 0:
            X = X + np.random.default_rng(seed).normal(0.0, self.noise_std, size=X.shape)
        if self.clip is not None:
            X = np.clip(X, self.clip[0], self.clip[1])
        return Dataset(X.astype(np.float32), ds.y.copy(), ds.n_classes, ds.name, ds.image_shape)

    def describe(self) -> str:
        """One line for logs, e.g. "shift (1, 0) px, gain 0.75, noise 1.5"."""
        parts = []
        if self.dx or self.dy:
            parts.append(f"shift ({self.dx}, {self.dy}) px")
        if self.rotation_deg:
            parts.append(f"rotate {self.rotation_deg:g} deg")
        if self.gain != 1.0:
            parts.append(f"gain {self.gain:g}")
        if self.offset:
            parts.append(f"offset {self.offset:g}")
        if self.noise_std:
            parts.append(f"noise {self.noise_std:g}")
        if self.clip is not None:
            parts.append(f"clip [{self.clip[0]:g}, {self.clip[1]:g}]")
        return ", ".join(parts) if parts else "no shift"
