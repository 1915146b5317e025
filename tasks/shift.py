"""Covariate shift: deterministic, seeded image corruptions in the style of MNIST-C / CIFAR-10-C.

Hendrycks & Dietterich (2019) corrupt test images at five severities; the constants here follow
their CIFAR-10-C parameters (images in [0, 1]), with the blur and fog scales fitted to 28x28 images.
``inverted`` (1 - x) is a negative control: a shift no BN re-estimation can undo, since it flips the
sign of every first-layer response, and adaptation is expected not to help much there.

Every function takes images as float arrays (N, C, H, W) in [0, 1] and returns new ones in [0, 1];
the random ones draw from the generator they are given, so a corruption is a function of
(seed, corruption, severity).
"""

from __future__ import annotations

import zlib

import numpy as np

CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "brightness", "contrast", "gaussian_blur", "fog",
               "pixelate", "inverted")
SEVERITIES = (1, 2, 3, 4, 5)


def _gaussian_noise(x, s, rng):
    c = (0.08, 0.12, 0.18, 0.26, 0.38)[s - 1]
    return x + rng.normal(scale=c, size=x.shape)


def _shot_noise(x, s, rng):
    c = (60, 25, 12, 5, 3)[s - 1]
    return rng.poisson(x * c) / c


def _impulse_noise(x, s, rng):
    c = (0.03, 0.06, 0.09, 0.17, 0.27)[s - 1]  # salt-and-pepper: this share of pixels set to 0 or 1
    hit = rng.random(x.shape) < c
    return np.where(hit, (rng.random(x.shape) < 0.5).astype(x.dtype), x)


def _brightness(x, s, rng):
    return x + (0.1, 0.2, 0.3, 0.4, 0.5)[s - 1]


def _contrast(x, s, rng):
    c = (0.4, 0.3, 0.2, 0.1, 0.05)[s - 1]
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    return (x - mean) * c + mean


def _gaussian_blur(x, s, rng):
    from scipy.ndimage import gaussian_filter

    sigma = (0.5, 0.75, 1.0, 1.25, 1.5)[s - 1]
    return gaussian_filter(x, sigma=(0, 0, sigma, sigma), mode="nearest")


def _fog(x, s, rng):
    """Smooth random haze (a sum of upsampled noise octaves, as a plasma fractal) added, then the
    range compressed back, as CIFAR-10-C's fog."""
    c, decay = ((0.2, 3.0), (0.5, 2.5), (0.75, 2.5), (1.0, 2.0), (1.5, 1.75))[s - 1]
    n, ch, h, w = x.shape
    haze = np.zeros((n, 1, h, w))
    amp = 1.0
    for cells in (2, 4, 8):
        coarse = rng.random((n, 1, cells + 1, cells + 1))
        ys, xs = np.linspace(0, cells, h), np.linspace(0, cells, w)
        y0, x0 = np.minimum(ys.astype(int), cells - 1), np.minimum(xs.astype(int), cells - 1)
        fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
        g = lambda dy, dx: coarse[:, :, (y0 + dy)[:, None], (x0 + dx)[None, :]]  # noqa: E731
        haze += amp * ((1 - fy) * (1 - fx) * g(0, 0) + (1 - fy) * fx * g(0, 1) + fy * (1 - fx) * g(1, 0) + fy * fx * g(1, 1))
        amp /= decay
    haze /= haze.max(axis=(2, 3), keepdims=True)
    peak = x.max(axis=(1, 2, 3), keepdims=True)
    return (x + c * haze) * peak / (peak + c)


def _pixelate(x, s, rng):
    c = (0.9, 0.8, 0.7, 0.6, 0.5)[s - 1]
    n, ch, h, w = x.shape
    sh, sw = max(1, int(round(h * c))), max(1, int(round(w * c)))
    # Box-average down to (sh, sw) blocks, then nearest-neighbour back up.
    ys, xs = (np.arange(h) * sh) // h, (np.arange(w) * sw) // w
    small = np.zeros((n, ch, sh, sw))
    np.add.at(small, (slice(None), slice(None), ys[:, None], xs[None, :]), x)
    counts = np.zeros((sh, sw))
    np.add.at(counts, (ys[:, None], xs[None, :]), 1)
    return (small / counts)[:, :, ys[:, None], xs[None, :]]


def _inverted(x, s, rng):
    return 1.0 - x


_FUNCTIONS = {name: globals()[f"_{name}"] for name in CORRUPTIONS}


def corrupt(images: np.ndarray, corruption: str, severity: int, seed: int) -> np.ndarray:
    """``images`` (N, C, H, W) in [0, 1] under ``corruption`` at ``severity`` (1-5), clipped to [0, 1].

    Raises:
        ValueError: an unknown corruption or severity.
    """
    if corruption not in _FUNCTIONS:
        raise ValueError(f"unknown corruption {corruption!r}; one of {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity {severity} is not in 1..5")
    key = zlib.crc32(f"{seed}:{corruption}:{severity}".encode())
    rng = np.random.default_rng(key)
    return np.clip(_FUNCTIONS[corruption](images.astype(np.float64), severity, rng), 0.0, 1.0)


def split_name(corruption: str, severity: int) -> str:
    """The Arrow split holding ``corruption`` at ``severity``: ``shift-<corruption>-<severity>``."""
    return f"shift-{corruption}-{severity}"


def parse_split(name: str):
    """(corruption, severity) of a shifted split's name, or None for any other split."""
    if not name.startswith("shift-"):
        return None
    corruption, _, severity = name[len("shift-"):].rpartition("-")
    return corruption, int(severity)
