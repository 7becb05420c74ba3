"""Pinhole camera rays, their inverse (projection) and the face-biased pixel sampler.

Conventions (docs/dataset_format.md, "Coordinates"):

- Camera frame is OpenGL: x right, y up, looking down -z. A pose is the 4x4
  *camera-to-world* matrix `[R | t]`; world = head space.
- Intrinsics `(fx, fy, cx, cy)` in pixels, given as a tuple or an array `[4]` (or `[..., 4]`
  broadcasting against a batch of poses). A camera-frame point `(x, y, z)`, `z < 0`,
  projects to `u = fx x / -z + cx`, `v = -fy y / -z + cy`.
- Pixel (row `i`, column `j`) covers `[j, j+1) x [i, i+1)`; its ray goes through its centre
  `(u, v) = (j + 0.5, i + 0.5)`. GeneFace's `get_rays` (modules/nerfs/commons/
  ray_samplers.py) instead casts through `(u, v) = (j, i)` with the principal point at
  `(W/2, H/2)` whatever the dataset says; `ray_intrinsics(..., convention="geneface")`
  gives the intrinsics under which the functions here cast exactly those rays.

Ray directions are NOT normalised: in camera space a ray direction is
`((u - cx) / fx, -(v - cy) / fy, -1)`, rotated into the world by the pose. The point
`origin + t * direction` therefore lies at camera depth `-z = t`, so sample positions `t`,
near/far bounds and rendered depths are all *depths along the camera's -z axis* (NeRF /
AD-NeRF convention). Metric distances along a ray are `t * |direction|`; the volume
renderer takes the direction norms for that (`geneface_jax.render.volume`).

Shapes: origins and directions are float32 `[..., 3]` in world units; rows/cols int32.
"""

from typing import Any, Sequence, Tuple, Union

import jax
import numpy as np
import jax.numpy as jnp

from geneface_jax.errors import InputError, ShapeError

Array = Any
Intrinsics = Union[Array, Sequence[float]]


# --------------------------------------------------------------------------- checks

ORTHONORMAL_TOL = 1e-3


def _as_pose(pose, what: str):
    """A `[..., 4, 4]` camera-to-world pose. Concrete (non-traced) poses are also checked
    for finite values and an orthonormal rotation (`|R^T R - I| <= 1e-3`): a scaled or
    sheared matrix would silently stretch every ray."""
    concrete = not isinstance(pose, jax.core.Tracer)
    pose = jnp.asarray(pose, jnp.float32)
    if pose.ndim < 2 or pose.shape[-2:] != (4, 4):
        raise ShapeError(f"{what}: expected a camera-to-world pose [..., 4, 4], "
                         f"got shape {tuple(pose.shape)}")
    if concrete and pose.size:
        p = np.asarray(pose, np.float64)
        if not np.all(np.isfinite(p)):
            raise InputError(f"{what}: the pose holds NaN or inf values")
        rot = p[..., :3, :3]
        err = np.abs(np.swapaxes(rot, -1, -2) @ rot - np.eye(3)).max()
        if err > ORTHONORMAL_TOL:
            raise InputError(f"{what}: the rotation part of the pose is not orthonormal "
                             f"(max |R^T R - I| = {err:.3g}); camera-to-world poses must "
                             "be rigid")
    return pose


def _as_intrinsics(intrinsics, what: str):
    k = jnp.asarray(intrinsics, jnp.float32)
    if k.ndim < 1 or k.shape[-1] != 4:
        raise ShapeError(f"{what}: expected intrinsics (fx, fy, cx, cy) of shape [4] or "
                         f"[..., 4], got shape {tuple(k.shape)}")
    return k


def _camera_directions(u, v, k):
    """Camera-frame directions `[..., 3]` (z = -1) through image points (u, v)."""
    fx, fy, cx, cy = k[..., 0], k[..., 1], k[..., 2], k[..., 3]
    x = (u - cx) / fx
    y = -(v - cy) / fy
    return jnp.stack([x, y, -jnp.ones_like(x)], axis=-1)


def _to_world(dirs_cam, pose):
    """Rotate camera-frame vectors `[..., 3]` by `pose[..., :3, :3]` (broadcasting)."""
    rot = pose[..., :3, :3]
    return jnp.sum(rot * dirs_cam[..., None, :], axis=-1)


# --------------------------------------------------------------------------- rays

PIXEL_CONVENTIONS = ("centers", "geneface")


def ray_intrinsics(intrinsics: Intrinsics, height: int, width: int,
                   convention: str = "centers"):
    """The intrinsics to cast rays with under a pixel convention, float32 `[..., 4]`.

    "centers" (this project): the dataset's `(fx, fy, cx, cy)` unchanged; rays go through
    pixel centres `(j + 0.5, i + 0.5)`.
    "geneface": GeneFace's `get_rays`, which casts through the integer coordinates `(j, i)`
    with `cx = W / 2`, `cy = H / 2` regardless of the dataset's principal point. Since the
    ray functions here add 0.5, that is the same as `(fx, fy, W / 2 + 0.5, H / 2 + 0.5)`:
    pixel (i, j) gets the camera direction `((j - W/2) / fx, -(i - H/2) / fy, -1)`.
    (GeneFace's own tracker writes cx = W/2, cy = H/2, so on its data the two conventions
    differ by half a pixel.)
    """
    k = _as_intrinsics(intrinsics, "ray_intrinsics intrinsics")
    if convention == "centers":
        return k
    if convention != "geneface":
        raise ValueError(f"ray_intrinsics: convention must be one of {PIXEL_CONVENTIONS}, "
                         f"got {convention!r}")
    centre = jnp.asarray([width / 2.0 + 0.5, height / 2.0 + 0.5], jnp.float32)
    return jnp.concatenate([k[..., :2], jnp.broadcast_to(centre, k.shape[:-1] + (2,))], -1)


def pixel_rays(poses, intrinsics: Intrinsics, height: int, width: int) -> Tuple[Array, Array]:
    """Rays through the centres of every pixel of an image.

    Args:
      poses: camera-to-world `[4, 4]` or a batch `[..., 4, 4]`.
      intrinsics: `(fx, fy, cx, cy)` as `[4]`, or `[..., 4]` matching the batch of poses.
      height, width: image size in pixels (static ints).

    Returns:
      (origins, directions), each float32 `[..., height, width, 3]` in world coordinates.
      Directions are un-normalised: camera-space z component -1, so `t` is depth.
    """
    pose = _as_pose(poses, "pixel_rays poses")
    k = _as_intrinsics(intrinsics, "pixel_rays intrinsics")
    if int(height) <= 0 or int(width) <= 0:
        raise ShapeError(f"pixel_rays: image size must be positive, got {height}x{width}")
    batch = jnp.broadcast_shapes(pose.shape[:-2], k.shape[:-1])
    u = jnp.arange(width, dtype=jnp.float32) + 0.5
    v = jnp.arange(height, dtype=jnp.float32) + 0.5
    uu, vv = jnp.meshgrid(u, v, indexing="xy")                     # [H, W]
    kk = k[..., None, None, :]                                     # [..., 1, 1, 4]
    dirs_cam = _camera_directions(uu, vv, kk)                       # [..., H, W, 3]
    dirs = _to_world(dirs_cam, pose[..., None, None, :, :])
    dirs = jnp.broadcast_to(dirs, batch + (height, width, 3))
    origins = jnp.broadcast_to(pose[..., None, None, :3, 3], dirs.shape)
    return origins, dirs


def rays_for_pixels(pose, intrinsics: Intrinsics, rows, cols) -> Tuple[Array, Array]:
    """Rays through the centres of selected pixels.

    Args:
      pose: camera-to-world `[4, 4]`, or one per pixel `[N, 4, 4]` (any shape broadcasting
        against `rows` followed by `(4, 4)`).
      intrinsics: `[4]` or broadcastable `[..., 4]`.
      rows, cols: integer pixel indices `[N]` (any equal shapes).

    Returns:
      (origins, directions) float32 `[N, 3]` (rows' shape + (3,)); directions un-normalised.
    """
    pose = _as_pose(pose, "rays_for_pixels pose")
    k = _as_intrinsics(intrinsics, "rays_for_pixels intrinsics")
    rows = jnp.asarray(rows)
    cols = jnp.asarray(cols)
    if rows.shape != cols.shape:
        raise ShapeError(f"rays_for_pixels: rows {tuple(rows.shape)} and cols "
                         f"{tuple(cols.shape)} must have the same shape")
    u = cols.astype(jnp.float32) + 0.5
    v = rows.astype(jnp.float32) + 0.5
    dirs = _to_world(_camera_directions(u, v, k), pose)
    batch = jnp.broadcast_shapes(dirs.shape[:-1], pose.shape[:-2])
    dirs = jnp.broadcast_to(dirs, batch + (3,))
    origins = jnp.broadcast_to(pose[..., :3, 3], dirs.shape)
    return origins, dirs


def project_points(points_world, pose, intrinsics: Intrinsics) -> Tuple[Array, Array, Array]:
    """Project world points into a camera: the inverse of the ray functions.

    Args:
      points_world: `[..., 3]` world points.
      pose: camera-to-world `[4, 4]` (or broadcastable `[..., 4, 4]`).
      intrinsics: `[4]` or broadcastable `[..., 4]`.

    Returns:
      (u, v, depth), each `[...]`: continuous image coordinates in pixels (pixel (i, j)
      centre = (j + 0.5, i + 0.5)) and the camera depth `-z` (positive in front of the
      camera; `u`, `v` are meaningless for depth <= 0). For a point `o + t d` of a ray
      from `pixel_rays`, depth equals `t`.
    """
    p = jnp.asarray(points_world, jnp.float32)
    if p.ndim < 1 or p.shape[-1] != 3:
        raise ShapeError(f"project_points: expected points [..., 3], got shape {tuple(p.shape)}")
    pose = _as_pose(pose, "project_points pose")
    k = _as_intrinsics(intrinsics, "project_points intrinsics")
    rot = pose[..., :3, :3]
    rel = p - pose[..., :3, 3]
    # camera = R^T (p - t): component a = sum_b R[b, a] rel[b]
    cam = jnp.sum(rot * rel[..., :, None], axis=-2)
    depth = -cam[..., 2]
    u = k[..., 0] * cam[..., 0] / depth + k[..., 2]
    v = -k[..., 1] * cam[..., 1] / depth + k[..., 3]
    return u, v, depth


# --------------------------------------------------------------------------- sampler

def sample_pixels(rng, rect, height: int, width: int, num_rays: int,
                  in_rect_percent: float = 0.95):
    """Draw `num_rays` pixels, most of them inside a rectangle (AD-NeRF/GeneFace's face
    rectangle sampler; NumPy, on the host, where training builds its ray batches).

    Departure: GeneFace draws each group without replacement (`np.random.choice(...,
    replace=False)` in `UniformRaySampler.sample_rays`) and its rectangle `[x, y, w, h]`
    includes its far edges; here draws are with replacement.
    Exactly `n_in = round(num_rays * in_rect_percent)` pixels are drawn uniformly (with
    replacement) from the rectangle and the other `num_rays - n_in` uniformly from the
    pixels *outside* it (from the whole image if the rectangle covers it all); the result
    is shuffled so any prefix or device shard is a fair mix.

    Args:
      rng: a `np.random.Generator`.
      rect: `[4]` ints `(x0, y0, x1, y1)` in pixels, half-open (`x0 <= col < x1`,
        `y0 <= row < y1`); clipped to the image; an empty rectangle becomes one pixel.
      height, width: image size.
      num_rays: number of pixels (output size).
      in_rect_percent: fraction of pixels inside the rectangle, in [0, 1].

    Returns:
      (rows, cols): int32 `[num_rays]`, all inside the image.
    """
    if np.shape(rect) != (4,):
        raise ShapeError(f"sample_pixels: rect must be [4] = (x0, y0, x1, y1), got shape "
                         f"{np.shape(rect)}")
    if not 0.0 <= float(in_rect_percent) <= 1.0:
        raise ValueError(f"sample_pixels: in_rect_percent must be in [0, 1], got {in_rect_percent}")
    height, width, num_rays = int(height), int(width), int(num_rays)
    if height <= 0 or width <= 0 or num_rays <= 0:
        raise ShapeError(f"sample_pixels: need a positive image size and ray count, got "
                         f"{height}x{width} and {num_rays} rays")
    x0, y0, x1, y1 = (int(v) for v in rect)
    x0, y0 = min(max(x0, 0), width - 1), min(max(y0, 0), height - 1)
    x1, y1 = min(max(x1, x0 + 1), width), min(max(y1, y0 + 1), height)
    n_in = int(round(num_rays * in_rect_percent))
    rows = [rng.integers(y0, y1, n_in)]
    cols = [rng.integers(x0, x1, n_in)]
    n_out = num_rays - n_in
    if n_out:
        inside = np.zeros((height, width), bool)
        inside[y0:y1, x0:x1] = True
        outside = np.flatnonzero(~inside.reshape(-1))
        pool = outside if len(outside) else np.arange(height * width)
        pick = pool[rng.integers(0, len(pool), n_out)]
        rows.append(pick // width)
        cols.append(pick % width)
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    perm = rng.permutation(num_rays)
    return rows[perm].astype(np.int32), cols[perm].astype(np.int32)
