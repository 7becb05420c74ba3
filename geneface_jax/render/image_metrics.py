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


REGIONS = ("eyes", "mouth", "neck")


def region_rects(landmarks_2d, height, width, grow=0.3):
    """Half-open pixel rectangles (x0, y0, x1, y1) of a frame's eyes, mouth and neck from
    its 68 projected landmarks `[68, 2]` (u = column, v = row, pixels):

    eyes: the box of both eyes' points (36-47); mouth: the box of the lips (48-67); each
      grown by `grow` of its size on every side (at least 2 pixels).
    neck: below the chin line: columns between jaw points 5 and 11, rows from the chin
      (point 8) down by 0.6 x the nose-to-chin height (points 27 -> 8), clipped to the
      frame: where a head-torso seam or gap shows.
    """
    p = np.asarray(landmarks_2d, np.float64)
    if p.shape != (68, 2):
        raise ShapeError(f"region_rects: expected landmarks [68, 2], got {p.shape}")

    def box(points):
        lo, hi = points.min(0), points.max(0)
        g = np.maximum(grow * (hi - lo), 2.0)
        return _clip_rect(np.floor(lo - g), np.ceil(hi + g), height, width)

    chin = p[8, 1]
    drop = 0.6 * max(chin - p[27, 1], 1.0)
    neck = _clip_rect(np.array([min(p[5, 0], p[11, 0]), chin]),
                      np.array([max(p[5, 0], p[11, 0]), chin + drop]), height, width)
    return {"eyes": box(p[36:48]), "mouth": box(p[48:68]), "neck": neck}


def _clip_rect(lo, hi, height, width):
    x0, y0 = int(np.clip(np.floor(lo[0]), 0, width)), int(np.clip(np.floor(lo[1]), 0, height))
    x1, y1 = int(np.clip(np.ceil(hi[0]), 0, width)), int(np.clip(np.ceil(hi[1]), 0, height))
    return (x0, y0, max(x1, x0), max(y1, y0))
