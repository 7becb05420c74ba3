"""Ground-truth ray-caster of the synthetic world (NumPy, analytic ellipsoids).

Deliberately independent of `geneface_jax.render`: it shares no code with the NeRF
renderer, so a bug there cannot hide itself in the ground truth.

Camera convention (the one the datasets document): OpenGL-style camera frame, x right,
y up, looking down -z. A pixel (row i, column j) covers [j, j+1) x [i, i+1) in continuous
image coordinates and its centre is (j + 0.5, i + 0.5). A camera-frame point (x, y, z),
z < 0, projects to u = fx * x / -z + cx, v = -fy * y / -z + cy.
"""

import numpy as np

from geneface_jax.data.synthetic import face as face_lib

HEAD, TORSO = 1, 2   # mask labels; 0 is background
_LIGHT = np.array([-0.4, 0.5, 0.75]) / np.linalg.norm([-0.4, 0.5, 0.75])

# Torso primitives in the reference head frame (identity rotation, rest translation).
NECK = (np.array([0.0, -0.118, -0.012]), np.array([0.036, 0.065, 0.036]))
SHOULDERS = (np.array([0.0, -0.245, -0.03]), np.array([0.19, 0.10, 0.085]))


def pixel_rays(height, width, intrinsics, supersample=1):
    """Unnormalised camera-frame ray directions through (sub)pixel centres.

    Returns `[height * s, width * s, 3]` with z = -1, where s = supersample; sub-pixel
    centres of pixel (i, j) are at (j + (k + 0.5) / s, i + (l + 0.5) / s).
    """
    fx, fy, cx, cy = intrinsics
    s = supersample
    u = (np.arange(width * s) + 0.5) / s
    v = (np.arange(height * s) + 0.5) / s
    uu, vv = np.meshgrid(u, v)
    return np.stack([(uu - cx) / fx, -(vv - cy) / fy, -np.ones_like(uu)], axis=-1)


def project(points_cam, intrinsics):
    """Camera-frame points `[..., 3]` -> continuous pixel coordinates `[..., 2]` (u, v)."""
    fx, fy, cx, cy = intrinsics
    z = -points_cam[..., 2]
    return np.stack([fx * points_cam[..., 0] / z + cx, -fy * points_cam[..., 1] / z + cy], -1)


def _ellipsoid_hit(origin, dirs, center, axes):
    """Nearest positive ray parameter t of each ray hitting an ellipsoid, inf if none."""
    o = (origin - center) / axes
    d = dirs / axes
    a = np.sum(d * d, -1)
    b = 2.0 * np.sum(o * d, -1)
    c = np.sum(o * o) - 1.0
    disc = b * b - 4.0 * a * c
    with np.errstate(invalid="ignore"):
        t = (-b - np.sqrt(disc)) / (2.0 * a)
    return np.where((disc > 0) & (t > 0), t, np.inf)


def _skin_texture(p, phase):
    return (1.0 + 0.05 * np.sin(61 * p[..., 0] + phase[0]) * np.sin(53 * p[..., 1] + phase[1])
            + 0.04 * np.sin(47 * p[..., 2] + 38 * p[..., 1] + phase[2])
            + 0.025 * np.sin(230 * p[..., 0] + phase[3]) * np.sin(190 * p[..., 1] + phase[4]))


def _paint_face(shape, rgb, p, frame):
    """Paints eyes, brows and lips on front-facing face points `p` ([N, 3] head space)."""
    x, y = p[:, 0], p[:, 1]
    ew, eh = shape.eye_half_width, shape.eye_half_height
    openness = 1.0 - frame["blink"]
    for sign in (-1.0, 1.0):
        dx = x - sign * shape.eye_dx
        dy = y - shape.eye_y
        inside_w = np.abs(dx) < ew
        prof = np.sqrt(np.clip(1.0 - (dx / ew) ** 2, 0.0, 1.0))
        eye = inside_w & (dy < eh * openness * prof) & (dy > -0.55 * eh * openness * prof)
        rgb[eye] = 0.93
        iris = eye & (dx ** 2 + dy ** 2 < (0.0048) ** 2)
        rgb[iris] = shape.iris
        rgb[iris & (dx ** 2 + dy ** 2 < (0.0019) ** 2)] = 0.04
        lash = inside_w & (np.abs(dy - eh * openness * prof) < 0.0007)
        rgb[lash] = 0.12
        bx = -sign * (dx + sign * 0.25 * ew)   # brow runs a bit outwards of the eye
        brow_y = shape.brow_y + 0.004 * np.cos(np.clip(bx / (1.15 * ew), -1, 1) * np.pi / 2)
        brow = (np.abs(dx + sign * 0.25 * ew) < 1.15 * ew) & (np.abs(y - brow_y) < 0.0023)
        rgb[brow] = shape.hair * 0.8
    cy, (ihw, ihh), (ohw, ohh), smile = face_lib.mouth_geometry(
        shape, frame["open"], frame["width"], frame["smile"])
    yy = y - cy - smile * (x / ohw) ** 2
    outer = (x / ohw) ** 2 + (yy / ohh) ** 2 < 1.0
    rgb[outer] = shape.lips
    rgb[outer & (np.abs(yy) < 0.0007)] = shape.lips * 0.45
    if ihh > 1e-4:
        inner = (x / ihw) ** 2 + (yy / ihh) ** 2 < 1.0
        rgb[inner] = np.array([0.22, 0.04, 0.06])
        rgb[inner & (yy > 0.35 * ihh)] = np.array([0.92, 0.9, 0.84])
        rgb[inner & (yy < -0.55 * ihh)] = np.array([0.6, 0.18, 0.2])


def render_frame(shape, frame, head_rot, head_trans, torso_trans, intrinsics, background,
                 supersample=2):
    """Renders one frame of the synthetic person.

    Args:
      shape: the person's FaceShape.
      frame: dict of scalars `open`, `width`, `smile`, `blink` (see face.py).
      head_rot, head_trans: `[3, 3]`, `[3]` head-to-camera transform, p_c = R p_h + t.
      torso_trans: `[3]` camera-frame translation of the torso (reference head frame).
      intrinsics: (fx, fy, cx, cy) in pixels.
      background: float `[H, W, 3]` in [0, 1].
      supersample: s x s rays per pixel, averaged (anti-aliasing).
    Returns:
      (rgb float32 `[H, W, 3]` in [0, 1], labels uint8 `[H, W]` with 0 bg / 1 head / 2 torso).
    """
    height, width = background.shape[:2]
    s = supersample
    dirs_c = pixel_rays(height, width, intrinsics, s).reshape(-1, 3)
    zero = np.zeros(3)
    # Head primitives are intersected in head space: o_h = R^T (0 - t), d_h = R^T d_c.
    o_h = head_rot.T @ (zero - head_trans)
    d_h = dirs_c @ head_rot
    open_ = float(frame["open"])
    skull, jaw, nose = face_lib.face_ellipsoids(shape, open_)
    ear_c = [np.array([sgn * shape.skull_axes[0] * 0.97, -0.005, -0.01]) for sgn in (-1, 1)]
    head_prims = [skull, jaw, nose, (ear_c[0], shape.ear_axes), (ear_c[1], shape.ear_axes)]
    torso_prims = [NECK, SHOULDERS]
    t_all = [_ellipsoid_hit(o_h, d_h, c, a) for c, a in head_prims]
    t_all += [_ellipsoid_hit(zero - torso_trans, dirs_c, c, a) for c, a in torso_prims]
    t_all = np.stack(t_all)
    which = np.argmin(t_all, axis=0)
    t_hit = t_all[which, np.arange(t_all.shape[1])]
    hit = np.isfinite(t_hit)
    n_rays = dirs_c.shape[0]
    rgb = np.broadcast_to(
        background.repeat(s, 0).repeat(s, 1).reshape(-1, 3), (n_rays, 3)).copy()
    labels = np.zeros(n_rays, np.uint8)

    # Head.
    is_head = hit & (which < len(head_prims))
    idx = np.nonzero(is_head)[0]
    p = o_h + t_hit[idx, None] * d_h[idx]
    prim = which[idx]
    centers = np.stack([c for c, _ in head_prims])[prim]
    axes = np.stack([a for _, a in head_prims])[prim]
    normal = (p - centers) / axes ** 2
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    col = shape.skin[None] * _skin_texture(p, shape.texture_phase)[:, None]
    col[prim == 2] *= np.array([1.04, 0.94, 0.92])
    col[prim >= 3] *= 0.9
    hair = (prim == 0) & ((p[:, 1] > shape.hairline_y - 0.2 * np.maximum(-p[:, 2], 0))
                          | ((p[:, 2] < -0.015) & (p[:, 1] > -0.03)))
    stripes = 0.85 + 0.15 * np.sin(400 * p[:, 0] + 90 * p[:, 1])
    col[hair] = shape.hair[None] * stripes[hair, None]
    front = (prim <= 1) & (normal[:, 2] > 0.25) & ~hair
    sub = col[front]
    _paint_face(shape, sub, p[front], frame)
    col[front] = sub
    nose_pts = prim == 2
    for sgn in (-1.0, 1.0):
        nx = p[:, 0] - sgn * 0.45 * shape.nose_axes[0]
        ny = p[:, 1] - (shape.nose_center[1] - 0.62 * shape.nose_axes[1])
        col[nose_pts & ((nx / 0.0032) ** 2 + (ny / 0.0018) ** 2 < 1.0)] = 0.12
    shade = 0.55 + 0.45 * np.maximum(normal @ _LIGHT, 0.0)
    rgb[idx] = col * shade[:, None]
    labels[idx] = HEAD

    # Torso (neck and shoulders), fixed in the camera frame up to torso_trans.
    is_torso = hit & (which >= len(head_prims))
    idx = np.nonzero(is_torso)[0]
    p = dirs_c[idx] * t_hit[idx, None] - torso_trans
    prim = which[idx] - len(head_prims)
    centers = np.stack([c for c, _ in torso_prims])[prim]
    axes = np.stack([a for _, a in torso_prims])[prim]
    normal = (p - centers) / axes ** 2
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    col = np.where((prim == 0)[:, None],
                   shape.skin[None] * 0.92 * _skin_texture(p, shape.texture_phase)[:, None],
                   shape.shirt[None] * (0.85 + 0.15 * np.sin(140 * p[:, 1:2] + 30 * p[:, 0:1])))
    shade = 0.55 + 0.45 * np.maximum(normal @ _LIGHT, 0.0)
    rgb[idx] = col * shade[:, None]
    labels[idx] = TORSO

    rgb = np.clip(rgb, 0.0, 1.0).reshape(height, s, width, s, 3).mean(axis=(1, 3))
    lab = labels.reshape(height, s, width, s)
    n_head = (lab == HEAD).sum(axis=(1, 3))
    n_torso = (lab == TORSO).sum(axis=(1, 3))
    half = s * s / 2.0
    out_labels = np.where(n_head >= half, HEAD, np.where(n_head + n_torso >= half, TORSO, 0))
    out_labels = np.where((out_labels == TORSO) & (n_head > n_torso), HEAD, out_labels)
    return rgb.astype(np.float32), out_labels.astype(np.uint8)


def make_background(rng, height, width):
    """A static procedural background `[H, W, 3]` float32 in [0, 1] (gradient + soft shapes)."""
    yy, xx = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    c0, c1 = rng.uniform(0.3, 0.9, 3), rng.uniform(0.2, 0.8, 3)
    img = c0 * (1 - yy[..., None]) + c1 * yy[..., None]
    for _ in range(4):
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.08, 0.3)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
        img = img + 0.25 * blob[..., None] * (rng.uniform(0, 1, 3) - 0.5)
    img = img + 0.04 * np.sin(2 * np.pi * 7 * xx + rng.uniform(0, 6))[..., None]
    return np.clip(img, 0, 1).astype(np.float32)
