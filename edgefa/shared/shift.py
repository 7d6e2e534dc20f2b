"""A simulated device sensor that differs from the host's: misaligned, rotated, dimmer, noisier.

`SensorShift` is the camera's (one-channel images: pixels moved, rotation, gain, offset, noise,
ADC clipping); `SignalShift` is the same idea for 1-D signals such as MNIST-1D (a delay, a
different sampling rate, then the same electronics). `device_data` makes a device's data: the
samples the host held out, seen through a shift, split into device-train and device-test.
numpy only, so the same shift can be applied on the device side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import DataError
from .datasets import Dataset, stratified_split


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


def stretch_signals(signals: np.ndarray, factor: float) -> np.ndarray:
    """Stretch (N, L) signals in time by `factor` about their centre, linearly interpolated: what a
    sensor sampling `factor` times faster records of the same event (factor < 1: slower, the
    event shrinks). Samples read from outside the record are 0."""
    n, length = signals.shape
    centre = (length - 1) / 2.0
    source = centre + (np.arange(length, dtype=np.float64) - centre) / factor
    left = np.floor(source).astype(np.int64)
    frac = source - left
    out = np.zeros((n, length), dtype=np.float64)
    for at, weight in ((left, 1.0 - frac), (left + 1, frac)):
        inside = (at >= 0) & (at < length) & (weight > 0)
        out[:, inside] += signals[:, at[inside]].astype(np.float64) * weight[inside]
    return out


def electronics(X: np.ndarray, gain: float, offset: float, noise_std: float,
                clip: tuple[float, float] | None, seed: int) -> np.ndarray:
    """After the optics, the sensor's electronics: gain and offset, Gaussian read noise (seeded),
    ADC clipping; float32 out."""
    X = X * gain + offset
    if noise_std > 0:
        X = X + np.random.default_rng(seed).normal(0.0, noise_std, size=X.shape)
    if clip is not None:
        X = np.clip(X, clip[0], clip[1])
    return X.astype(np.float32)


def check_electronics(shift, finite: tuple[str, ...]) -> None:
    """A shift's fields are usable: noise >= 0, gain/offset and `finite` finite, clip ordered."""
    if shift.noise_std < 0 or not math.isfinite(shift.noise_std):
        raise DataError(f"noise_std must be a finite number >= 0, got {shift.noise_std}")
    for name in (*finite, "gain", "offset"):
        if not math.isfinite(getattr(shift, name)):
            raise DataError(f"{name} must be finite, got {getattr(shift, name)}")
    if shift.clip is not None:
        lo, hi = shift.clip
        if not lo <= hi:
            raise DataError(f"clip must be (low, high) with low <= high, got {shift.clip}")


def describe_parts(parts: list[str], shift) -> str:
    """`parts` (the optics), then the electronics' fields that differ from an ideal sensor."""
    if shift.gain != 1.0:
        parts.append(f"gain {shift.gain:g}")
    if shift.offset:
        parts.append(f"offset {shift.offset:g}")
    if shift.noise_std:
        parts.append(f"noise {shift.noise_std:g}")
    if shift.clip is not None:
        parts.append(f"clip [{shift.clip[0]:g}, {shift.clip[1]:g}]")
    return ", ".join(parts) if parts else "no shift"


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
        check_electronics(self, ("rotation_deg",))

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
        X = electronics(images.reshape(len(ds), h * w), self.gain, self.offset, self.noise_std, self.clip, seed)
        return Dataset(X, ds.y.copy(), ds.n_classes, ds.name, ds.image_shape)

    def describe(self) -> str:
        """One line for logs, e.g. "shift (1, 0) px, gain 0.75, noise 1.5"."""
        parts = []
        if self.dx or self.dy:
            parts.append(f"shift ({self.dx}, {self.dy}) px")
        if self.rotation_deg:
            parts.append(f"rotate {self.rotation_deg:g} deg")
        return describe_parts(parts, self)


@dataclass
class SignalShift:
    """How the device's sensor differs from the host's for 1-D signals (N, L), e.g. MNIST-1D.
    Applied in the order of the fields: the timing (delay, then sampling rate), then the electronics."""

    delay: int = 0                # samples later (positive) or earlier; vacated samples become 0
    stretch: float = 1.0          # time scale about the centre (stretch_signals): > 1 a faster sampling rate
    gain: float = 1.0
    offset: float = 0.0           # a DC offset, in the signal's units
    noise_std: float = 0.0        # additive Gaussian noise, in the signal's units
    clip: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        check_electronics(self, ("stretch",))
        if not self.stretch > 0:
            raise DataError(f"stretch must be > 0, got {self.stretch}")

    def apply(self, ds: Dataset, seed: int) -> Dataset:
        """A shifted copy of ds; the same seed gives the same noise."""
        if ds.image_shape is not None and len(ds.image_shape) != 1:
            raise DataError(f"{ds.name}: a signal shift needs 1-D signals, got samples shaped {ds.image_shape} "
                            "(images take a SensorShift)")
        signals = ds.X.astype(np.float64)
        if self.delay:
            signals = translate_images(signals[:, None, :], int(self.delay), 0)[:, 0, :]
        if self.stretch != 1.0:
            signals = stretch_signals(signals, self.stretch)
        X = electronics(signals, self.gain, self.offset, self.noise_std, self.clip, seed)
        return Dataset(X, ds.y.copy(), ds.n_classes, ds.name, ds.image_shape)

    def describe(self) -> str:
        """One line for logs, e.g. "delay 3 samples, stretch 1.2, gain 0.8, offset 0.5"."""
        parts = []
        if self.delay:
            parts.append(f"delay {self.delay} samples")
        if self.stretch != 1.0:
            parts.append(f"stretch {self.stretch:g}")
        return describe_parts(parts, self)


def device_shift(dataset: str) -> SensorShift | SignalShift:
    """The device sensor that edgefa's demo and accuracy table use for a built-in data set."""
    if dataset == "digits":
        # one pixel to the right, 30 % less gain, read noise of 1.5 grey levels, the 0..16 ADC range
        return SensorShift(dx=1, gain=0.7, noise_std=1.5, clip=(0.0, 16.0))
    if dataset == "mnist1d":
        # 2 samples of latency, sampled 1.2x faster, 30 % less gain, a DC offset of 0.3 and noise of
        # 0.2 (MNIST-1D signals have unit std): host DFA CNN 65 % clean -> 40 % through this sensor
        return SignalShift(delay=2, stretch=1.2, gain=0.7, offset=0.3, noise_std=0.2)
    raise DataError(f"no device sensor shift is defined for the data set {dataset!r} (digits, mnist1d)")


def device_data(full: Dataset, host_test_fraction: float, shift: SensorShift | SignalShift, seed: int,
                 device_test_fraction: float = 1 / 3) -> tuple[Dataset, Dataset]:
    """A device's data: the part of `full` a host run with `seed` held out (the trainer's own
    stratified split), seen through `shift` (noise seed + 1), split into (device-train,
    device-test) (seed + 2). The host never trained on any of it."""
    _, held_out = stratified_split(full, host_test_fraction, seed)
    shifted = shift.apply(held_out, seed=seed + 1)
    return stratified_split(shifted, device_test_fraction, seed + 2)
