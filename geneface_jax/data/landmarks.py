"""The 68-point iBUG / 300-W landmark topology and measurements on it.

Index groups (0-based, the person's right is the image left in a frontal view):
  jaw 0-16, right brow 17-21, left brow 22-26, nose bridge 27-30, nose base 31-35,
  right eye 36-41, left eye 42-47, outer lip 48-59, inner lip 60-67.
Within an eye the order is: outer corner, two upper-lid points, inner corner, two
lower-lid points (36-41 for the right eye). Outer lip: 48 right corner, 49-53 upper lip
right-to-left (51 upper centre), 54 left corner, 55-59 lower lip left-to-right
(57 lower centre). Inner lip: 60 right corner, 61-63 upper (62 centre), 64 left corner,
65-67 lower (66 centre).

All measurement functions take landmarks `[..., 68, 3]` (or `[..., 68, 2]`) in any unit
and return values in the same unit.
"""

import numpy as np

NUM_LANDMARKS = 68
JAW = np.arange(0, 17)
RIGHT_BROW = np.arange(17, 22)
LEFT_BROW = np.arange(22, 27)
NOSE_BRIDGE = np.arange(27, 31)
NOSE_BASE = np.arange(31, 36)
RIGHT_EYE = np.arange(36, 42)
LEFT_EYE = np.arange(42, 48)
OUTER_LIP = np.arange(48, 60)
INNER_LIP = np.arange(60, 68)
MOUTH = np.arange(48, 68)

# Pairs used for measurements.
INNER_LIP_TOP, INNER_LIP_BOTTOM = 62, 66
MOUTH_LEFT_CORNER, MOUTH_RIGHT_CORNER = 54, 48


def mouth_opening(lms):
    """Vertical inner-lip gap |p62 - p66|: `[..., 68, D]` -> `[...]`."""
    lms = np.asarray(lms)
    return np.linalg.norm(lms[..., INNER_LIP_TOP, :] - lms[..., INNER_LIP_BOTTOM, :], axis=-1)


def pearson(a, b):
    """Pearson correlation of two 1-D sequences (nan when one is constant), e.g. of two
    mouth-opening tracks."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    a, b = a - a.mean(), b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else float("nan")


def mouth_width(lms):
    """Lip-corner distance |p48 - p54|: `[..., 68, D]` -> `[...]`."""
    lms = np.asarray(lms)
    return np.linalg.norm(lms[..., MOUTH_LEFT_CORNER, :] - lms[..., MOUTH_RIGHT_CORNER, :], axis=-1)


def eye_aspect_ratio(lms):
    """Mean eye aspect ratio of both eyes (lid gap / eye width): `[..., 68, D]` -> `[...]`.

    About 0.25-0.35 for an open eye and near 0 for a closed one.
    """
    lms = np.asarray(lms)
    ratios = []
    for eye in (RIGHT_EYE, LEFT_EYE):
        p = lms[..., eye, :]
        vertical = (np.linalg.norm(p[..., 1, :] - p[..., 5, :], axis=-1)
                    + np.linalg.norm(p[..., 2, :] - p[..., 4, :], axis=-1))
        horizontal = np.linalg.norm(p[..., 0, :] - p[..., 3, :], axis=-1)
        ratios.append(vertical / (2.0 * np.maximum(horizontal, 1e-12)))
    return 0.5 * (ratios[0] + ratios[1])


def face_rectangle(points_2d, size, margin=0.04, forehead=0.3):
    """Face rectangles `[N, 4]` int32 (x0, y0, x1, y1), half-open pixel ranges.

    The box of the projected landmarks `[N, 68, 2]`, grown by `margin * size` on every
    side and by `forehead` times its height upwards (landmarks stop at the brows), clipped
    to the image.
    """
    lo = np.floor(points_2d.min(axis=1))
    hi = np.floor(points_2d.max(axis=1)) + 1
    m = np.ceil(margin * size)
    extra = np.ceil(forehead * (hi[:, 1] - lo[:, 1]))
    rect = np.stack([lo[:, 0] - m, lo[:, 1] - m - extra, hi[:, 0] + m, hi[:, 1] + m], -1)
    return np.clip(rect, 0, size).astype(np.int32)
