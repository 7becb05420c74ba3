"""Image metrics of rendered frames against ground truth (NumPy, on the host)."""

import numpy as np

from geneface_jax.errors import ShapeError


def psnr(a, b, mask=None):
    """PSNR (dB) between images in [0, 1]; `mask [H, W]` restricts it to a region."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    err = np.square(a - b)
    if mask is not None:
        m = np.asarray(mask, bool)
        err = err[m]
    mse = float(np.mean(err)) if err.size else 0.0
    return float(-10.0 * np.log10(max(mse, 1e-12)))


def ssim(a, b, sigma=1.5, size=11, c1=0.01 ** 2, c2=0.03 ** 2):
    """SSIM of two `[H, W, 3]` images in [0, 1] (Gaussian window 11, sigma 1.5, valid
    region, mean over channels: Wang et al. 2004 with the usual constants)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 3:
        raise ShapeError(f"ssim: expected two [H, W, C] images, got {a.shape}, {b.shape}")
    x = np.arange(size) - size // 2
    g = np.exp(-0.5 * (x / sigma) ** 2)
    g /= g.sum()

    def blur(img):
        v = np.apply_along_axis(lambda s: np.convolve(s, g, "valid"), 0, img)
        return np.apply_along_axis(lambda s: np.convolve(s, g, "valid"), 1, v)

    mu_a, mu_b = blur(a), blur(b)
    s_aa = blur(a * a) - mu_a ** 2
    s_bb = blur(b * b) - mu_b ** 2
    s_ab = blur(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * s_ab + c2)
    den = (mu_a ** 2 + mu_b ** 2 + c1) * (s_aa + s_bb + c2)
    return float(np.mean(num / den))


def rect_mask(rect, height, width):
    """Boolean `[H, W]` of the half-open rectangle (x0, y0, x1, y1)."""
    m = np.zeros((height, width), bool)
    x0, y0, x1, y1 = (int(v) for v in rect)
    m[max(y0, 0):min(y1, height), max(x0, 0):min(x1, width)] = True
    return m
