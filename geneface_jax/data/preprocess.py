"""Real-video preprocessing: a talking-person video -> a person dataset; a clip -> landmarks.

`preprocess_video(video, out_dir)` writes the same person dataset as the synthetic world
(docs/dataset_format.md), so stages 2 and 3 train on it unchanged. `track_clip(video)` runs
the per-frame landmark part alone (for the LRS3 corpus builder).

Steps (all CPU, models through LiteRT, see `geneface_jax.data.face_models`):
 1. Decode at 25 fps (nearest-timestamp resampling) and track the face: BlazeFace finds it
    on the first frame (and whenever tracking is lost), the 468-point face mesh follows it
    from frame to frame (each crop placed from the previous frame's points). Frames whose
    face presence is below `presence` are gaps: gaps of at most `max_gap` frames are
    filled by linear interpolation of the points and reported; a longer gap, or a video
    with no face at all, is an error.
 2. The 68-point topology is taken from the mesh (`face_models.MESH_TO_68`, one mesh
    vertex per point) in image pixels `(u, v)` with the mesh's weak-perspective depth.
 3. One square crop for the whole video (the NeRFs need a static camera): `crop_scale`
    times the median brow-to-chin height, centred on the median face position and moved
    down by `crop_down` face heights so shoulders show; shrunk and shifted to fit in the
    frame; resized to `size`.
 4. Head pose: a generalised Procrustes fit. Each frame's points are fitted by a
    similarity transform (scale, rotation, translation; rigid points only: brows, eyes,
    nose, upper jaw) to a mean shape; the mean shape is re-estimated from the pose-free
    points of all frames (aligned to the project's synthetic mean face, which fixes the
    head-space axes, origin and units), three times. Rotations and translations are
    The similarity scale `s` (pixels per head unit) gives the depth `f / s` for the focal
    length `f`; each pose is then refined under the pinhole camera (Gauss-Newton on the 2D
    reprojection of the rigid points) and smoothed in time (Gaussian, `smooth_sigma`
    frames). The focal length is estimated
    (`estimate_focal`): for each candidate on a log grid every frame's pose is refined
    under a pinhole camera and the 2D reprojection error of the mean shape's rigid points
    is measured; the minimum is taken when the error clearly rises on both sides of it
    (perspective foreshortening, from head rotations and depth changes, constrains it);
    otherwise (a near-frontal, motionless head, or a flat picture) GeneFace's 1200 px at
    512 px is used and the summary says so. `focal` (in units of the crop size) fixes it.
 5. Head-space landmarks: every frame's 68 points with its smoothed pose removed: each
    point keeps its observed (u, v) and takes its depth from the fit, so the landmarks
    projected with the pose land exactly on the tracked points.
 6. Masks: MediaPipe selfie segmentation gives the person (probability > 0.5); the head is
    the person above the neck line (a line 12 % of the face height below the chin,
    perpendicular to the chin->brow axis) within 0.85 face heights of that axis; the rest
    of the person is torso.
 7. Background: per pixel, the mean colour over frames where the (dilated) person does not
    cover it; pixels covered in every frame take their nearest uncovered neighbour's
    colour.
 8. Blink: 1 - eye aspect ratio / (its 90th percentile over the video), clipped to [0, 1].
 9. Audio: the video's audio track at 16 kHz mono, padded or trimmed to 640 samples per
    frame; log-mel features, or HuBERT with `hubert_checkpoint`.
10. Paste-back record (meta.json `source_video`, `source_record`): the source file's path
    and SHA-256, its frame size and fps, the crop box and each frame's source index.
"""

import dataclasses
import pathlib
import shutil
import sys
import tempfile
import time

import numpy as np
import tqdm
from scipy import ndimage

from geneface_jax import files
from geneface_jax.audio import features as feat
from geneface_jax.data import face_models
from geneface_jax.data import format as fmt
from geneface_jax.data import head_space
from geneface_jax.data import landmarks as lm_topology
from geneface_jax.data import video as video_io
from geneface_jax.errors import VideoError

# 68-point indices used for the rigid pose fit: brows, nose, eyes, upper jaw contour.
RIGID_POINTS = np.concatenate([np.arange(0, 4), np.arange(13, 17), np.arange(17, 48)])
GENEFACE_FOCAL = 1200.0 / 512.0      # GeneFace's tracker: 1200 px focal at 512 px frames


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    """Settings of `preprocess_video` / `track_clip` (sizes in pixels, times in frames)."""
    size: int = 512               # output frame size (square)
    max_gap: int = 5              # longest run of face-less frames that is interpolated
    min_frames: int = 50          # fewer 25-fps frames than this is an error (2 s)
    presence: float = 0.5         # face-presence threshold of the mesh model
    crop_scale: float = 3.0       # crop side / median brow-to-chin height
    crop_down: float = 0.35       # crop centre below the face centre, in face heights
    smooth_sigma: float = 1.0     # Gaussian smoothing of the pose, frames
    focal: float = None           # focal length / crop size; None: estimate (`estimate_focal`)
    valid_fraction: float = 0.1   # last fraction of frames forms the 'valid' split


# --------------------------------------------------------------------------- tracking


@dataclasses.dataclass
class Track:
    """Per-frame face mesh of a video at 25 fps.

    points: float32 `[N, 468, 3]` (u, v) image pixels and weak-perspective depth (pixels;
      gaps filled); found: bool `[N]` whether the model saw a face in that frame;
    filled: list of `(first, last)` frame ranges that were interpolated;
    width, height: source frame size in pixels; seconds: time spent tracking.
    """
    points: np.ndarray
    found: np.ndarray
    filled: list
    width: int
    height: int
    seconds: float


class FaceTracker:
    """Detector + mesh, tracking from frame to frame (see module doc, step 1)."""

    def __init__(self, models_dir=None, presence=0.5, num_threads=None):
        self.detector = face_models.FaceDetector(models_dir, num_threads=num_threads)
        self.mesh = face_models.FaceMesh(models_dir, num_threads=num_threads)
        self.presence = presence
        self._prev = None

    def __call__(self, image):
        """-> points `[468, 3]` or None when no face is seen."""
        if self._prev is not None:
            pts, p = self.mesh.from_points(image, self._prev)
            if p >= self.presence:
                self._prev = pts
                return pts
        self._prev = self.find(image)
        return self._prev

    def find(self, image):
        """The face of one image on its own, with no tracking state: -> points `[468, 3]`
        of the largest detected face, or None when no face is seen."""
        dets = self.detector.detect(image)
        if not dets:
            return None
        # the largest face (the person the video is about), not merely the most certain
        det = max(dets, key=lambda d: (d["box"][2] - d["box"][0]) * (d["box"][3] - d["box"][1]))
        pts, p = self.mesh.from_detection(image, det)
        if p < self.presence:
            return None
        # a second pass from the mesh's own points centres the crop as tracking will
        pts2, p2 = self.mesh.from_points(image, pts)
        return pts2 if p2 >= self.presence else pts


def _fill_gaps(points, found, max_gap, path):
    """Linear interpolation over short runs of missing frames (ends: nearest frame)."""
    n = len(found)
    if not found.any():
        raise VideoError(f"{path}: no face found in any of its {n} frames")
    filled = []
    out = points.copy()
    idx = np.nonzero(found)[0]
    t = 0
    while t < n:
        if found[t]:
            t += 1
            continue
        start = t
        while t < n and not found[t]:
            t += 1
        last = t - 1
        if last - start + 1 > max_gap:
            raise VideoError(
                f"{path}: no face in frames {start}-{last} ({start / 25:.2f}-"
                f"{(last + 1) / 25:.2f} s, {last - start + 1} frames > max_gap={max_gap}); "
                "trim the video or raise --max_gap")
        before = idx[idx < start]
        after = idx[idx > last]
        for k in range(start, last + 1):
            if len(before) and len(after):
                a, b = before[-1], after[0]
                w = (k - a) / (b - a)
                out[k] = (1 - w) * points[a] + w * points[b]
            else:
                out[k] = points[before[-1] if len(before) else after[0]]
        filled.append((start, last))
    return out, filled


def track_video(path, cfg=PreprocessConfig(), models_dir=None, progress=True):
    """Tracks the face mesh through a video at 25 fps (module doc, step 1) -> Track.

    Raises:
      VideoError: unreadable file, no video stream, no face, a long face-less gap.
    """
    t0 = time.time()
    tracker = FaceTracker(models_dir, cfg.presence)
    frames = video_io.read_video(path, fps=video_io.FPS)
    pts, found = [], []
    width = height = 0
    for img in tqdm.tqdm(frames, desc="tracking face", unit="frame", disable=not progress,
                         leave=False):
        height, width = img.shape[:2]
        p = tracker(img)
        found.append(p is not None)
        pts.append(np.zeros((468, 3), np.float32) if p is None else p)
    if not pts:
        raise VideoError(f"{path}: has no decodable video frames")
    found = np.asarray(found)
    points, filled = _fill_gaps(np.stack(pts), found, cfg.max_gap, path)
    return Track(points=points.astype(np.float32), found=found, filled=filled, width=width,
                 height=height, seconds=time.time() - t0)


# --------------------------------------------------------------------------- pose fit


def mean_face_shape():
    """`[68, 3]` neutral landmarks of the synthetic world's average face (head space):
    the reference that fixes the axes, origin and units of real data's head space
    (`data.head_space.reference_face`)."""
    return head_space.reference_face()


def similarity_fit(src, dst):
    """Least-squares similarity `dst ~ s R src + t` (Umeyama), batched.

    Args: src `[..., K, 3]`, dst `[..., K, 3]`. Returns (s `[...]`, R `[..., 3, 3]`
    proper rotations, t `[..., 3]`).
    """
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(-2, keepdims=True), dst.mean(-2, keepdims=True)
    a, b = src - mu_s, dst - mu_d
    cov = np.einsum("...ki,...kj->...ij", b, a) / src.shape[-2]
    u, sig, vt = np.linalg.svd(cov)
    d = np.sign(np.linalg.det(u @ vt))
    fix = np.ones(sig.shape)
    fix[..., -1] = d
    rot = u @ (fix[..., :, None] * vt)
    var = (a * a).sum((-1, -2)) / src.shape[-2]
    s = (sig * fix).sum(-1) / var
    t = mu_d[..., 0, :] - s[..., None] * np.einsum("...ij,...j->...i", rot, mu_s[..., 0, :])
    return s, rot, t


def _to_camera_like(points):
    """Image (u, v, z_mesh) -> right-handed (x right, y up, z towards the viewer)."""
    p = np.asarray(points, np.float64)
    return np.stack([p[..., 0], -p[..., 1], -p[..., 2]], -1)


def _smooth(x, sigma):
    return x if sigma <= 0 else ndimage.gaussian_filter1d(x, sigma, axis=0, mode="nearest")


def _smooth_rotations(rot, sigma):
    """Gaussian smoothing of rotations `[N, 3, 3]` through sign-aligned quaternions."""
    if sigma <= 0:
        return rot
    q = _rot_to_quat(rot)
    flip = np.sign(np.sum(q[1:] * q[:-1], -1))
    flip = np.concatenate([[1.0], np.cumprod(np.where(flip == 0, 1.0, flip))])
    q = _smooth(q * flip[:, None], sigma)
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    return _quat_to_rot(q)


def _rot_to_quat(r):
    w = np.sqrt(np.maximum(0.0, 1.0 + r[..., 0, 0] + r[..., 1, 1] + r[..., 2, 2])) / 2
    x = np.sqrt(np.maximum(0.0, 1.0 + r[..., 0, 0] - r[..., 1, 1] - r[..., 2, 2])) / 2
    y = np.sqrt(np.maximum(0.0, 1.0 - r[..., 0, 0] + r[..., 1, 1] - r[..., 2, 2])) / 2
    z = np.sqrt(np.maximum(0.0, 1.0 - r[..., 0, 0] - r[..., 1, 1] + r[..., 2, 2])) / 2
    x = np.copysign(x, r[..., 2, 1] - r[..., 1, 2])
    y = np.copysign(y, r[..., 0, 2] - r[..., 2, 0])
    z = np.copysign(z, r[..., 1, 0] - r[..., 0, 1])
    return np.stack([w, x, y, z], -1)


def _quat_to_rot(q):
    w, x, y, z = np.moveaxis(q, -1, 0)
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
    ], -2)


FOCAL_GRID = np.geomspace(0.7, 7.0, 15)      # candidate focal lengths / frame size


def _rodrigues(w):
    """Rotation matrices `[..., 3, 3]` of rotation vectors `[..., 3]` (radians)."""
    theta = np.linalg.norm(w, axis=-1)[..., None, None]
    k = w / np.maximum(np.linalg.norm(w, axis=-1, keepdims=True), 1e-12)
    zero = np.zeros(k.shape[:-1])
    cross = np.stack([np.stack([zero, -k[..., 2], k[..., 1]], -1),
                      np.stack([k[..., 2], zero, -k[..., 0]], -1),
                      np.stack([-k[..., 1], k[..., 0], zero], -1)], -2)
    return np.eye(3) + np.sin(theta) * cross + (1 - np.cos(theta)) * cross @ cross


def _project(shape, rot, trans, f, c):
    """Pinhole projection (dataset convention) of head-space `shape [K, 3]` posed by
    `rot [N, 3, 3]`, `trans [N, 3]` -> `[N, K, 2]` pixels."""
    return _project_each(np.broadcast_to(shape, (len(rot),) + np.shape(shape)), rot, trans,
                         f, c)


def _weak_to_perspective(scale, offset, f, c):
    """Camera-frame head origins `[N, 3]` from similarity scale `[N]` and the origin's
    image position `offset [N, >=2]` as (u, -v): depth f / s."""
    depth = f / scale
    return np.stack([(offset[:, 0] - c) * depth / f, (offset[:, 1] + c) * depth / f,
                     -depth], -1)


def refine_poses(shape, uv, f, c, rot, trans, iterations=8):
    """Gauss-Newton refinement of per-frame poses under a pinhole camera.

    Args: shape `[K, 3]` head space; uv `[N, K, 2]` observed pixels; focal `f` and
    principal point `(c, c)` in pixels; initial rot `[N, 3, 3]`, trans `[N, 3]`.
    Returns (rot, trans, mean squared reprojection error per frame `[N]`, pixels^2).
    """
    n = len(uv)
    rot, trans = rot.copy(), trans.copy()
    for _ in range(iterations):
        r0 = (_project(shape, rot, trans, f, c) - uv).reshape(n, -1)
        cols = []
        for j in range(6):
            d = np.zeros((n, 3))
            h = 1e-6 if j < 3 else 1e-6 * np.maximum(np.abs(trans[:, 2]), 1e-3)
            d[:, j % 3] = h
            moved = (_project(shape, _rodrigues(d) @ rot, trans, f, c) if j < 3
                     else _project(shape, rot, trans + d, f, c))
            cols.append(((moved - uv).reshape(n, -1) - r0) / np.reshape(h, (-1, 1)))
        jac = np.stack(cols, -1)                                     # [N, 2K, 6]
        jtj = np.einsum("nki,nkj->nij", jac, jac)
        jtj += 1e-9 * np.trace(jtj, axis1=1, axis2=2)[:, None, None] * np.eye(6)
        step = -np.linalg.solve(jtj, np.einsum("nki,nk->ni", jac, r0)[..., None])[..., 0]
        rot = _rodrigues(step[:, :3]) @ rot
        trans = trans + step[:, 3:]
    err = ((_project(shape, rot, trans, f, c) - uv) ** 2).sum(-1).mean(-1)
    return rot, trans, err


def estimate_focal(shape, uv, image_size, rot, scale, offset, grid=FOCAL_GRID,
                   max_frames=150, rise=0.1, shape_rounds=3):
    """Focal length / frame size that best explains 2D points under perspective.

    Args:
      shape: `[K, 3]` rigid points of the mean shape (head space).
      uv: `[N, K, 2]` their observed image positions (pixels of a square frame).
      image_size: the frame side in pixels.
      rot, scale, offset: the weak-perspective fit (rotation `[N, 3, 3]`, scale `[N]`,
        the head origin's image position `[N, 3]` as (u, -v, .)), the starting poses.
      grid: candidate ratios; max_frames: frames used (evenly spaced).
      rise: the error at both ends of the grid must exceed the minimum by this fraction.
      shape_rounds: alternations of pose refinement and shape re-estimation under each
        candidate camera (the weak-perspective mean shape absorbs some foreshortening,
        which would bias the focal length long).
    Returns:
      (ratio or None when the error curve has no clear interior minimum, errors `[G]`
      mean squared reprojection error in pixels^2 per candidate).
    """
    idx = np.unique(np.linspace(0, len(uv) - 1, min(len(uv), max_frames)).astype(int))
    c = image_size / 2.0
    obs = uv[idx]
    errors = []
    for g in grid:
        f = g * image_size
        r, trans = rot[idx], _weak_to_perspective(scale[idx], offset[idx], f, c)
        cur = np.asarray(shape, np.float64)
        for _ in range(shape_rounds):
            r, trans, err = refine_poses(cur, obs, f, c, r, trans)
            # the shape under this camera: back-project each observation at its current
            # depth, take it to head space, average over frames
            cam = np.einsum("nij,kj->nki", r, cur) + trans[:, None]
            depth = -cam[..., 2:3]
            xy = (obs - c) * depth / f
            cam = np.concatenate([xy[..., :1], -xy[..., 1:], -depth], -1)
            cur = np.einsum("nji,nkj->nki", r, cam - trans[:, None]).mean(0)
        r, trans, err = refine_poses(cur, obs, f, c, r, trans)
        errors.append(float(np.mean(err)))
    errors = np.asarray(errors)
    k = int(np.argmin(errors))
    if k in (0, len(grid) - 1) or min(errors[0], errors[-1]) < (1 + rise) * errors[k]:
        return None, errors
    # parabola through the minimum and its neighbours, in log focal
    x = np.log(grid[k - 1:k + 2])
    a, b, _ = np.polyfit(x, errors[k - 1:k + 2], 2)
    best = -b / (2 * a) if a > 0 else x[1]
    return float(np.exp(np.clip(best, x[0], x[2]))), errors


def fit_head_pose(points68, image_size, cfg=PreprocessConfig(), iterations=3):
    """Head pose and pose-free landmarks from 68 image points per frame (module doc, 4-5).

    Args:
      points68: `[N, 68, 3]` (u, v) pixels of a square `image_size` frame and mesh depth.
      image_size: the frame's side in pixels (sets the principal point and focal length).
    Returns dict:
      landmarks `[N, 68, 3]` head space; rot `[N, 3, 3]` head-to-camera rotation;
      trans `[N, 3]` head origin in the camera frame (OpenGL, z < 0); poses `[N, 4, 4]`
      camera-to-world; landmarks_2d `[N, 68, 2]` perspective projection of the head-space
      landmarks; intrinsics `[4]`; mean_shape `[68, 3]`; depth `[N]`.
    """
    q = _to_camera_like(points68)
    ref = mean_face_shape()
    mean = ref.copy()
    for _ in range(iterations):
        s, rot, t = similarity_fit(mean[RIGID_POINTS], q[:, RIGID_POINTS])
        local = np.einsum("nji,nkj->nki", rot, q - t[:, None]) / s[:, None, None]
        mean = local.mean(0)
        s0, r0, t0 = similarity_fit(mean, ref)      # keep the reference's frame and units
        mean = s0 * mean @ r0.T + t0
    s, rot, t = similarity_fit(mean[RIGID_POINTS], q[:, RIGID_POINTS])
    uv_obs = np.asarray(points68, np.float64)[..., :2]
    if cfg.focal is not None:
        ratio, source = float(cfg.focal), "flag"
    else:
        ratio, _ = estimate_focal(mean[RIGID_POINTS], uv_obs[:, RIGID_POINTS], image_size,
                                  rot, s, t)
        ratio, source = ((ratio, "estimated") if ratio is not None
                         else (GENEFACE_FOCAL, "default"))
    f = ratio * image_size
    c = image_size / 2.0
    # perspective poses: the weak-perspective fit refined under the pinhole camera
    rot_p, trans, _ = refine_poses(mean[RIGID_POINTS], uv_obs[:, RIGID_POINTS], f, c, rot,
                                   _weak_to_perspective(s, t, f, c))
    # each point's depth from its weak-perspective head-space position under the refined
    # pose; its (u, v) exactly as observed
    weak_local = np.einsum("nji,nkj->nki", rot, q - t[:, None]) / s[:, None, None]
    point_depth = -(np.einsum("nij,nkj->nki", rot_p, weak_local) + trans[:, None])[..., 2]
    rot_p = _smooth_rotations(rot_p, cfg.smooth_sigma)
    trans = _smooth(trans, cfg.smooth_sigma)
    xy = (uv_obs - c) * point_depth[..., None] / f
    cam = np.stack([xy[..., 0], -xy[..., 1], -point_depth], -1)
    local = np.einsum("nji,nkj->nki", rot_p, cam - trans[:, None])
    k = np.array([f, f, c, c], np.float32)
    return dict(landmarks=local.astype(np.float32), rot=rot_p, trans=trans,
                poses=head_space.camera_to_world(rot_p, trans).astype(np.float32),
                landmarks_2d=_project_each(local, rot_p, trans, f, c).astype(np.float32),
                intrinsics=k, mean_shape=mean.astype(np.float32), depth=-trans[:, 2],
                focal=ratio, focal_source=source)


def _project_each(points, rot, trans, f, c):
    """Like `_project` with per-frame points `[N, K, 3]`."""
    cam = np.einsum("nij,nkj->nki", rot, points) + trans[:, None]
    z = np.maximum(-cam[..., 2], 1e-6)
    return np.stack([f * cam[..., 0] / z + c, -f * cam[..., 1] / z + c], -1)


def roll_degrees(rot):
    """In-plane rotation (about the camera's viewing axis, counter-clockwise on screen)
    of head-to-camera rotations `[N, 3, 3]` relative to the first frame, in degrees."""
    rel = np.einsum("nij,kj->nik", rot, rot[0])
    return np.degrees(np.arctan2(rel[:, 1, 0], rel[:, 0, 0]))


# --------------------------------------------------------------------------- crop, masks


def crop_box(points68, width, height, cfg=PreprocessConfig()):
    """The fixed square crop `(u0, v0, side)` in whole source pixels (module doc, step 3)."""
    p = np.asarray(points68)[..., :2]
    face_h = np.median(p[:, :, 1].max(1) - p[:, :, 1].min(1))
    centre = np.median((p.min(1) + p.max(1)) / 2, axis=0)
    side = int(round(min(cfg.crop_scale * face_h, width, height)))
    u0 = int(np.clip(round(centre[0] - side / 2), 0, width - side))
    v0 = int(np.clip(round(centre[1] + cfg.crop_down * face_h - side / 2), 0, height - side))
    return u0, v0, side


def head_torso_masks(person, points2d):
    """Labels `[H, W]` uint8 (0 background, 1 head, 2 torso) from a person mask `[H, W]`
    bool and the frame's 68 image points `[68, 2]` (module doc, step 6)."""
    h, w = person.shape
    chin = points2d[8]
    brow = points2d[17:27].mean(0)
    axis = brow - chin
    face_h = np.linalg.norm(axis)
    up = axis / max(face_h, 1e-6)
    vv, uu = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    du, dv = uu - chin[0], vv - chin[1]
    along = du * up[0] + dv * up[1]
    across = np.abs(du * up[1] - dv * up[0])
    head = person & (along >= -0.12 * face_h) & (across <= 0.85 * face_h)
    labels = np.zeros((h, w), np.uint8)
    labels[person] = fmt.TORSO
    labels[head] = fmt.HEAD
    return labels


def blink_signal(points2d):
    """Eye closure `[N]` in [0, 1] from 68 image points `[N, 68, 2]` (module doc, step 8)."""
    ear = lm_topology.eye_aspect_ratio(points2d)
    ref = max(float(np.percentile(ear, 90)), 1e-6)
    return np.clip(1.0 - ear / ref, 0.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------- audio


def video_audio(path, num_frames, hubert_checkpoint=None):
    """The audio track at 16 kHz padded/trimmed to `num_frames` frames, and its features.

    Returns (wav `[640 N]`, features `[2N, C]`, energy `[2N]`, feature name)."""
    wav = video_io.read_audio_track(path, feat.SAMPLE_RATE)   # VideoError without audio
    n = num_frames * feat.SAMPLES_PER_VIDEO_FRAME
    wav = np.pad(wav[:n], (0, max(0, n - len(wav)))).astype(np.float32)
    energy = feat.frame_energy(wav)
    if hubert_checkpoint:
        from geneface_jax.audio import hubert as hb
        params, config = hb.load_hubert(hubert_checkpoint)
        features = np.asarray(hb.hubert_features(params, config, wav), np.float32)
        return wav, features[:2 * num_frames], energy, "hubert"
    return wav, feat.log_mel(wav), energy, "logmel80"


# --------------------------------------------------------------------------- entry points


def track_clip(path, cfg=PreprocessConfig(), models_dir=None, progress=False,
               hubert_checkpoint=None, tracker=None):
    """Landmarks and audio of one clip, no crop or masks (for a corpus such as LRS3).

    Returns dict: landmarks `[N, 68, 3]` head space, wav `[640 N]`, mel `[2N, C]`,
    energy `[2N]`, feature, filled (interpolated frame ranges), num_frames.
    Raises:
      VideoError: unreadable, no audio, no face, long gap, fewer than `cfg.min_frames`.
    """
    track = track_video(path, cfg, models_dir, progress)
    n = len(track.points)
    if n < cfg.min_frames:
        raise VideoError(f"{path}: only {n} frames at 25 fps (need >= {cfg.min_frames})")
    side = float(max(track.width, track.height))
    pts = track.points.copy()
    pts[..., 0] += (side - track.width) / 2       # centre in a square frame
    pts[..., 1] += (side - track.height) / 2
    fit = fit_head_pose(face_models.mesh_to_68(pts), side, cfg)
    wav, mel, energy, name = video_audio(path, n, hubert_checkpoint)
    return dict(landmarks=fit["landmarks"], wav=wav, mel=mel, energy=energy, feature=name,
                filled=track.filled, num_frames=n)


def preprocess_video(path, out_dir, cfg=PreprocessConfig(), *, models_dir=None,
                     hubert_checkpoint=None, overwrite=False, progress=True):
    """A talking-person video -> a person dataset in `out_dir` (see module doc).

    Returns a summary dict (frames, fps of each pass, interpolated gaps, crop, pose ranges).
    Raises:
      VideoError: unreadable file, no audio track, no face, a long gap, too few frames.
      DatasetError: `out_dir` exists and is not empty (without overwrite).
    Nothing is left in `out_dir` when it fails (the dataset is written atomically).
    """
    path = pathlib.Path(path)
    t_start = time.time()
    info = video_io.probe_video(path)
    if not info["has_audio"]:
        raise VideoError(f"{path}: has no audio track (the dataset needs the speech)")
    out_dir = pathlib.Path(out_dir)
    fmt.check_output_dir(out_dir, overwrite)           # before the work, not after it
    # pass 1: track on the source frames
    track = track_video(path, cfg, models_dir, progress)
    n = len(track.points)
    if n < cfg.min_frames:
        raise VideoError(f"{path}: only {n} frames at 25 fps (need >= {cfg.min_frames})")
    pts68_src = face_models.mesh_to_68(track.points)
    u0, v0, side = crop_box(pts68_src, track.width, track.height, cfg)
    scale = cfg.size / side
    pts68 = pts68_src.astype(np.float64).copy()
    pts68[..., 0] = (pts68[..., 0] - u0) * scale
    pts68[..., 1] = (pts68[..., 1] - v0) * scale
    pts68[..., 2] *= scale
    fit = fit_head_pose(pts68, cfg.size, cfg)
    wav, mel, energy, feature = video_audio(path, n, hubert_checkpoint)

    # pass 2: crop, segment, accumulate the background
    t1 = time.time()
    seg = face_models.PersonSegmenter(models_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    scratch = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.scratch-",
                                            dir=out_dir.parent))
    try:
        size = cfg.size
        frames = np.lib.format.open_memmap(scratch / "frames.npy", "w+", np.uint8,
                                           (n, size, size, 3))
        masks = np.lib.format.open_memmap(scratch / "masks.npy", "w+", np.uint8,
                                          (n, size, size))
        bg_sum = np.zeros((size, size, 3), np.float64)
        bg_count = np.zeros((size, size), np.float64)
        reader = video_io.read_video(path, fps=video_io.FPS)
        t = 0
        for img in tqdm.tqdm(reader, total=n, desc="masks", unit="frame",
                             disable=not progress, leave=False):
            if t >= n:
                break
            crop = face_models.resize(img[v0:v0 + side, u0:u0 + side], size, size)
            person = seg.probability(crop) > 0.5
            frames[t] = crop
            masks[t] = head_torso_masks(person, pts68[t, :, :2])
            free = ~ndimage.binary_dilation(person, iterations=max(1, size // 64))
            np.add(bg_sum, crop, out=bg_sum, where=free[..., None])
            bg_count[free] += 1
            t += 1
        if t != n:
            raise VideoError(f"{path}: decoded {t} frames on the second pass, {n} on the "
                             "first (the file changed?)")
        background = _background(bg_sum, bg_count)
        seconds_masks = time.time() - t1
        mean, std = fmt.landmark_stats(fit["landmarks"])
        n_train = max(1, int(round(n * (1.0 - cfg.valid_fraction))))
        depth = fit["depth"]
        head_size = float(np.ptp(fit["mean_shape"][:, 1]) * 1.6)     # brow->chin x 1.6
        arrays = dict(
            frames=frames, masks=masks, background=background, landmarks=fit["landmarks"],
            landmarks_2d=fit["landmarks_2d"], poses=fit["poses"],
            face_rect=lm_topology.face_rectangle(fit["landmarks_2d"], size),
            blink=blink_signal(pts68[..., :2]), mel=mel.astype(np.float32),
            energy=energy.astype(np.float32), landmark_mean=mean, landmark_std=std)
        meta = dict(source="video", seed=0, intrinsics=[float(v) for v in fit["intrinsics"]],
                    near=float(depth.min() - 0.7 * head_size),
                    far=float(depth.max() + 0.8 * head_size), feature=feature,
                    camera="opengl", splits=dict(train=[0, n_train], valid=[n_train, n]),
                    focal_source=fit["focal_source"],
                    video=str(path.name), crop=[u0, v0, side],
                    source_video=source_record(path, track.width, track.height,
                                               info["fps"], (u0, v0, side), range(n)),
                    interpolated=[list(map(int, g)) for g in track.filled])
        fmt.write_person(out_dir, arrays, meta, wav, overwrite=overwrite)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    roll = roll_degrees(fit["rot"])
    return dict(
        frames=n, source_size=[track.width, track.height], size=cfg.size,
        crop=[u0, v0, side], feature=feature,
        face_found=int(track.found.sum()), interpolated=track.filled,
        track_fps=round(n / max(track.seconds, 1e-9), 2),
        mask_fps=round(n / max(seconds_masks, 1e-9), 2),
        total_fps=round(n / max(time.time() - t_start, 1e-9), 2),
        roll_range_deg=[round(float(roll.min()), 2), round(float(roll.max()), 2)],
        focal=round(fit["focal"], 4), focal_source=fit["focal_source"],
        head_pixels_mean=float((masks == fmt.HEAD).mean() * size * size),
        blinks=int(np.sum(np.diff((arrays["blink"] > 0.5).astype(int)) == 1)))


def source_record(path, width, height, fps, crop, frames):
    """The `source_video` entry of a person dataset's meta.json: what paste-back
    (`render.paste`) needs to put renders back into the source video: its absolute `path`
    and `sha256`, frame `width`, `height`, `fps`, the `crop` `(u0, v0, side)` in source
    pixels and `frames`, each dataset frame's index in the source decoded at 25 fps."""
    path = pathlib.Path(path).resolve()
    return dict(path=str(path), sha256=files.sha256_file(path), width=int(width),
                height=int(height), fps=float(fps), crop=[int(v) for v in crop],
                frames=[int(v) for v in frames])


def _background(total, count):
    """Mean of uncovered samples; never-uncovered pixels take the nearest known colour."""
    known = count > 0
    bg = np.zeros(total.shape, np.float64)
    bg[known] = total[known] / count[known][:, None]
    if not known.any():
        return np.zeros(total.shape, np.uint8)
    if not known.all():
        _, (ii, jj) = ndimage.distance_transform_edt(~known, return_indices=True)
        bg = bg[ii, jj]
    return np.clip(np.round(bg), 0, 255).astype(np.uint8)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: python -m experiments.make_dataset --kind=video --video=FILE --out=DIR")
