"""Procedural 3-D head of the synthetic world: shape parameters, articulation, landmarks.

Head space (canonical, pose-free): origin near the centre of the skull, x to the viewer's
right in a frontal view (the person's left), y up, z out of the face towards a frontal
camera. Units are roughly metres (the skull is ~0.2 tall).

The head is a union of ellipsoids (skull, a jaw that drops when the mouth opens, nose,
two ears). Eyes, brows, lips and the mouth opening are painted on the front surface as
functions of the frontal coordinates (x, y) of a surface point, and every landmark is
placed at the frontal surface point with the same (x, y) as the painted feature it marks,
so landmarks and pixels agree by construction.

Articulation per frame (arrays of shape [T]):
  open  : mouth opening in [0, ~2.5]; inner-lip gap = open * MAX_GAP (head units).
  width : mouth width factor, 1 at rest.
  smile : lip-corner raise in head units (positive = corners up).
  blink : eye closure in [0, 1], 1 = closed.
"""

import dataclasses

import numpy as np

from geneface_jax.data import landmarks as lm_topology

MAX_GAP = 0.014         # inner-lip gap at open == 1 (head units)
JAW_DROP = 0.6          # jaw translation per unit of gap
LIP_THICKNESS = 0.0055  # outer minus inner lip half-height


@dataclasses.dataclass(frozen=True)
class FaceShape:
    """Identity of one synthetic person (all lengths in head units, colours in [0, 1])."""
    skull_center: np.ndarray   # [3]
    skull_axes: np.ndarray     # [3]
    jaw_center: np.ndarray     # [3] at rest
    jaw_axes: np.ndarray       # [3]
    nose_center: np.ndarray    # [3]
    nose_axes: np.ndarray      # [3]
    ear_axes: np.ndarray       # [3]
    eye_dx: float              # half distance between eye centres
    eye_y: float
    eye_half_width: float
    eye_half_height: float
    brow_y: float
    mouth_y: float             # y of the closed mouth line
    mouth_half_width: float
    hairline_y: float
    skin: np.ndarray           # [3]
    hair: np.ndarray           # [3]
    lips: np.ndarray           # [3]
    iris: np.ndarray           # [3]
    shirt: np.ndarray          # [3]
    texture_phase: np.ndarray  # [6] phases of the skin texture


def sample_face_shape(rng):
    """Draws a random, plausible face identity from a `np.random.Generator`."""
    u = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731
    s = u(0.94, 1.06)
    skull_axes = np.array([0.075 * u(0.95, 1.05), 0.098, 0.088]) * s
    skull_center = np.array([0.0, 0.012, 0.0])
    jaw_axes = np.array([0.060 * u(0.92, 1.08), 0.060 * u(0.95, 1.08), 0.072]) * s
    jaw_center = np.array([0.0, -0.035 * s, 0.014 * s])
    nose_len = u(0.9, 1.15)
    nose_axes = np.array([0.012 * u(0.9, 1.2), 0.026 * nose_len, 0.018 * u(0.9, 1.2)]) * s
    nose_y = -0.006 * s
    # Put the nose on the front of the skull at its height.
    front_z = skull_center[2] + skull_axes[2] * np.sqrt(
        max(0.0, 1.0 - ((nose_y - skull_center[1]) / skull_axes[1]) ** 2))
    nose_center = np.array([0.0, nose_y, front_z - 0.35 * nose_axes[2]])
    skin_tone = u(0.35, 0.85)
    skin = np.array([0.95, 0.78, 0.66]) * skin_tone + np.array([0.05, 0.03, 0.02])
    hair = np.array([u(0.05, 0.5), u(0.03, 0.35), u(0.02, 0.25)])
    lips = np.clip(skin * np.array([1.0, 0.62, 0.62]) + np.array([0.08, 0.0, 0.02]), 0, 1)
    return FaceShape(
        skull_center=skull_center, skull_axes=skull_axes,
        jaw_center=jaw_center, jaw_axes=jaw_axes,
        nose_center=nose_center, nose_axes=nose_axes,
        ear_axes=np.array([0.010, 0.024, 0.015]) * s,
        eye_dx=0.030 * s * u(0.93, 1.07), eye_y=0.024 * s * u(0.9, 1.1),
        eye_half_width=0.0125 * s * u(0.9, 1.1), eye_half_height=0.0062 * s * u(0.85, 1.15),
        brow_y=0.043 * s * u(0.95, 1.05),
        mouth_y=-0.047 * s * u(0.95, 1.05), mouth_half_width=0.022 * s * u(0.88, 1.12),
        hairline_y=0.060 * s * u(0.9, 1.1),
        skin=np.clip(skin, 0, 1), hair=hair, lips=lips,
        iris=np.array([u(0.1, 0.4), u(0.15, 0.45), u(0.1, 0.5)]),
        shirt=np.array([u(0.1, 0.9), u(0.1, 0.9), u(0.1, 0.9)]),
        texture_phase=rng.uniform(0, 2 * np.pi, size=6))


def ellipsoid_front_z(center, axes, x, y):
    """Front (+z) surface z of an ellipsoid at frontal coordinates; NaN outside it."""
    r = ((x - center[0]) / axes[0]) ** 2 + ((y - center[1]) / axes[1]) ** 2
    with np.errstate(invalid="ignore"):
        return np.where(r <= 1.0, center[2] + axes[2] * np.sqrt(np.maximum(1.0 - r, 0.0)),
                        np.nan)


def face_ellipsoids(shape, open_):
    """Front-facing head primitives for one frame: list of (center [3], axes [3])."""
    jaw_c = shape.jaw_center - np.array([0.0, JAW_DROP * MAX_GAP * open_, 0.0])
    return [(shape.skull_center, shape.skull_axes), (jaw_c, shape.jaw_axes),
            (shape.nose_center, shape.nose_axes)]


def front_surface_z(shape, open_, x, y):
    """z of the visible front surface of the head at frontal (x, y) (arrays, same shape)."""
    zs = np.stack([ellipsoid_front_z(c, a, x, y) for c, a in face_ellipsoids(shape, open_)])
    return np.nanmax(np.where(np.isnan(zs), -np.inf, zs), axis=0)


def mouth_geometry(shape, open_, width, smile):
    """Mouth ellipses for one frame: (centre_y, inner (hw, hh), outer (hw, hh), smile)."""
    gap = MAX_GAP * max(open_, 0.0)
    center_y = shape.mouth_y - 0.45 * gap
    outer_hw = shape.mouth_half_width * width
    inner = (0.86 * outer_hw, 0.5 * gap)
    outer = (outer_hw, 0.5 * gap + LIP_THICKNESS)
    return center_y, inner, outer, smile


def _ellipse_points(cx, cy, hw, hh, angles_deg, smile, smile_hw):
    t = np.deg2rad(np.asarray(angles_deg, np.float64))
    x = cx + hw * np.cos(t)
    y = cy + hh * np.sin(t) + smile * (x / smile_hw) ** 2
    return x, y


def landmarks_2d(shape, open_, width, smile, blink):
    """Frontal (x, y) of the 68 landmarks for one frame: `[68, 2]` head units."""
    pts = np.zeros((68, 2))
    ew, eh = shape.eye_half_width, shape.eye_half_height
    # Jaw contour: from the person's right temple (image left) round the chin to the left.
    chin_y = (shape.jaw_center[1] - JAW_DROP * MAX_GAP * max(open_, 0.0)
              - 0.86 * shape.jaw_axes[1])
    top_y = shape.eye_y - 0.004
    phi = np.linspace(0.0, np.pi, 17)
    half_w = 0.86 * shape.skull_axes[0] * (1.0 - 0.22 * np.sin(phi) ** 2)
    pts[0:17, 0] = -half_w * np.cos(phi)
    pts[0:17, 1] = top_y - (top_y - chin_y) * np.sin(phi) ** 1.2
    # Brows: right brow outer -> inner, left brow inner -> outer.
    bx = np.linspace(-1.35, 0.85, 5) * ew
    arch = 0.004 * np.sin(np.linspace(0.3, np.pi - 0.3, 5))
    pts[17:22, 0] = -shape.eye_dx + bx
    pts[17:22, 1] = shape.brow_y + arch
    pts[22:27, 0] = shape.eye_dx - bx[::-1]
    pts[22:27, 1] = shape.brow_y + arch[::-1]
    # Nose bridge (27 between the eyes .. 30 tip) and base (31 right .. 35 left).
    tip_y = shape.nose_center[1] - 0.15 * shape.nose_axes[1]
    pts[27:31, 0] = 0.0
    pts[27:31, 1] = np.linspace(shape.eye_y, tip_y, 4)
    base_y = shape.nose_center[1] - 0.6 * shape.nose_axes[1]
    pts[31:36, 0] = np.linspace(-1.0, 1.0, 5) * 0.9 * shape.nose_axes[0]
    pts[31:36, 1] = base_y + 0.002 * np.array([1.0, 0.3, 0.0, 0.3, 1.0])
    # Eyes: outer corner, 2 upper, inner corner, 2 lower (right); mirrored order (left).
    upper = eh * (1.0 - blink)
    lower = 0.55 * eh * (1.0 - blink)
    sq = np.sqrt(1.0 - (1.0 / 3.0) ** 2)
    right = [(-ew, 0), (-ew / 3, upper * sq), (ew / 3, upper * sq), (ew, 0),
             (ew / 3, -lower * sq), (-ew / 3, -lower * sq)]
    for k, (dx, dy) in enumerate(right):
        pts[36 + k] = (-shape.eye_dx + dx, shape.eye_y + dy)
    left = [(-ew, 0), (-ew / 3, upper * sq), (ew / 3, upper * sq), (ew, 0),
            (ew / 3, -lower * sq), (-ew / 3, -lower * sq)]
    for k, (dx, dy) in enumerate(left):
        pts[42 + k] = (shape.eye_dx + dx, shape.eye_y + dy)
    # Lips.
    cy, (ihw, ihh), (ohw, ohh), sm = mouth_geometry(shape, open_, width, smile)
    outer_angles = [180, 150, 120, 90, 60, 30, 0, -30, -60, -90, -120, -150]
    pts[48:60, 0], pts[48:60, 1] = _ellipse_points(0.0, cy, ohw, ohh, outer_angles, sm, ohw)
    inner_angles = [180, 135, 90, 45, 0, -45, -90, -135]
    pts[60:68, 0], pts[60:68, 1] = _ellipse_points(0.0, cy, ihw, ihh, inner_angles, sm, ohw)
    return pts


def landmarks_3d(shape, artic):
    """68 landmarks in head space for every frame.

    Args:
      shape: a FaceShape.
      artic: dict of `[T]` arrays `open`, `width`, `smile`, `blink`.
    Returns:
      float32 `[T, 68, 3]`, each point on the visible front surface of the head.
    """
    num = len(artic["open"])
    out = np.zeros((num, lm_topology.NUM_LANDMARKS, 3))
    for t in range(num):
        o = float(artic["open"][t])
        xy = landmarks_2d(shape, o, float(artic["width"][t]), float(artic["smile"][t]),
                          float(artic["blink"][t]))
        out[t, :, :2] = xy
        out[t, :, 2] = front_surface_z(shape, o, xy[:, 0], xy[:, 1])
    return out.astype(np.float32)
