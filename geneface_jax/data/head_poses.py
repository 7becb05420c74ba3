"""Head poses for inference: held still, replayed from the person's video, or taken from
another person dataset, video or array, and checked against what the renderer was
trained on.

A pose is camera-to-world `[4, 4]` in head space (`data.head_space`). `parse_pose_spec`
reads the `--pose` value: `loop`, `mirror`, `static` or `static:FRAME` (a reference-track
frame, default 0), or a path. `load_pose_file` reads a path: a person dataset directory
(its `poses.npy`), a video (preprocessed on the fly with the same tracker as
`data.preprocess`), or an `.npy` of `[N, 4, 4]` poses. Poses from a dataset or a video
are another camera's: `retarget` moves their motion onto this person's mean pose.
"""

import dataclasses
import logging
import pathlib

import numpy as np

from geneface_jax.data.head_space import camera_to_world
from geneface_jax.errors import InputError, ShapeError

TRACK_MODES = ("loop", "mirror")
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v")
RANGE_MARGIN_DEG = 5.0           # rotations this far beyond the training range are flagged
ORTHONORMAL_TOL = 1e-3


@dataclasses.dataclass(frozen=True)
class PoseSpec:
    """A parsed `--pose`: `kind` is `loop`, `mirror`, `static` or `file`; `frame` the
    static frame; `path` the file."""
    kind: str
    frame: int = 0
    path: str = ""


def parse_pose_spec(spec):
    """`--pose` text -> PoseSpec (InputError for a malformed `static:FRAME`)."""
    spec = str(spec).strip()
    if spec in TRACK_MODES:
        return PoseSpec(spec)
    if spec == "static" or spec.startswith("static:"):
        text = spec.partition(":")[2] or "0"
        try:
            frame = int(text)
        except ValueError as e:
            raise InputError(f"--pose={spec}: FRAME must be an integer") from e
        if frame < 0:
            raise InputError(f"--pose={spec}: FRAME must be >= 0")
        return PoseSpec("static", frame=frame)
    if not spec:
        raise InputError("--pose is empty (loop, mirror, static[:FRAME] or a file)")
    return PoseSpec("file", path=spec)


def check_poses(poses, what):
    """float32 `[N, 4, 4]` rigid, finite camera-to-world poses, else ShapeError /
    InputError naming `what` (and the first bad frame)."""
    p = np.asarray(poses)
    if p.ndim != 3 or p.shape[1:] != (4, 4) or not len(p):
        raise ShapeError(f"{what}: poses must be [N, 4, 4] camera-to-world matrices with "
                         f"N >= 1, got shape {p.shape}")
    if not np.issubdtype(p.dtype, np.number):
        raise ShapeError(f"{what}: poses must be numbers, got dtype {p.dtype}")
    p = p.astype(np.float64)
    bad = ~np.isfinite(p).all((1, 2))
    if bad.any():
        raise InputError(f"{what}: {int(bad.sum())} poses hold NaN or inf values (first: "
                         f"frame {int(np.argmax(bad))})")
    rot = p[:, :3, :3]
    err = np.abs(np.swapaxes(rot, 1, 2) @ rot - np.eye(3)).max((1, 2))
    if (err > ORTHONORMAL_TOL).any() or not np.allclose(p[:, 3], [0, 0, 0, 1], atol=1e-6):
        k = int(np.argmax(err > ORTHONORMAL_TOL)) if (err > ORTHONORMAL_TOL).any() else 0
        raise InputError(f"{what}: poses must be rigid camera-to-world matrices (rotation "
                         f"orthonormal within {ORTHONORMAL_TOL}, last row 0 0 0 1); frame "
                         f"{k} is not")
    return p.astype(np.float32)


def _head_to_camera(poses):
    """camera-to-world `[N, 4, 4]` -> head-to-camera (R `[N, 3, 3]`, t `[N, 3]`)."""
    p = np.asarray(poses, np.float64)
    rot = np.swapaxes(p[:, :3, :3], 1, 2)
    return rot, -np.einsum("nij,nj->ni", rot, p[:, :3, 3])


def _mean_rotation(rot):
    """The chordal mean of rotations `[N, 3, 3]` (the nearest rotation to their average)."""
    u, _, vt = np.linalg.svd(np.mean(rot, 0))
    d = np.sign(np.linalg.det(u @ vt))
    return u @ np.diag([1.0, 1.0, d]) @ vt


def _rotvec(rot):
    """Rotation vectors `[N, 3]` (radians) of rotations `[N, 3, 3]`."""
    cos = np.clip((np.trace(rot, axis1=1, axis2=2) - 1.0) / 2.0, -1.0, 1.0)
    angle = np.arccos(cos)
    axis = np.stack([rot[:, 2, 1] - rot[:, 1, 2], rot[:, 0, 2] - rot[:, 2, 0],
                     rot[:, 1, 0] - rot[:, 0, 1]], -1)
    s = np.sin(angle)
    scale = np.where(s > 1e-9, angle / np.maximum(2.0 * s, 1e-12), 0.5)
    return axis * scale[:, None]


def retarget(poses, source_poses, target_poses):
    """Moves the motion of `poses` onto this person's camera.

    Each pose's head-to-camera rotation and translation are taken relative to the mean of
    `source_poses` (the file's own frames) and applied to the mean of `target_poses` (the
    person's reference track); translation offsets are scaled by the ratio of the mean
    camera distances, so the head moves the same share of its size on screen. All
    camera-to-world `[N, 4, 4]`; returns float32 `[N, 4, 4]`.
    """
    rot, trans = _head_to_camera(poses)
    src_rot, src_trans = _head_to_camera(source_poses)
    tgt_rot, tgt_trans = _head_to_camera(target_poses)
    r_src, t_src = _mean_rotation(src_rot), src_trans.mean(0)
    r_tgt, t_tgt = _mean_rotation(tgt_rot), tgt_trans.mean(0)
    scale = np.linalg.norm(t_tgt) / max(np.linalg.norm(t_src), 1e-9)
    new_rot = np.einsum("nij,jk,kl->nil", rot, r_src.T, r_tgt)
    new_trans = t_tgt + scale * (trans - t_src)
    return camera_to_world(new_rot, new_trans).astype(np.float32)


def out_of_range(poses, train_poses, margin_deg=RANGE_MARGIN_DEG):
    """Frames whose head rotation lies beyond the training poses' range by more than
    `margin_deg` degrees on any axis of the rotation vector relative to the training
    mean. Returns (frame indices `[K]`, the largest excess in degrees)."""
    rot, _ = _head_to_camera(poses)
    train_rot, _ = _head_to_camera(train_poses)
    mean = _mean_rotation(train_rot)
    ref = np.degrees(_rotvec(np.einsum("nij,kj->nik", train_rot, mean)))
    cur = np.degrees(_rotvec(np.einsum("nij,kj->nik", rot, mean)))
    lo, hi = ref.min(0) - margin_deg, ref.max(0) + margin_deg
    excess = np.maximum(lo - cur, cur - hi).max(1)
    bad = np.flatnonzero(excess > 0)
    return bad, float(excess.max(initial=0.0))


def _frames_text(frames, limit=8):
    shown = ", ".join(str(int(f)) for f in frames[:limit])
    return shown + (f", ... ({len(frames)} frames)" if len(frames) > limit else "")


def warn_out_of_range(poses, train_poses, log=None, margin_deg=RANGE_MARGIN_DEG):
    """Logs a warning naming the frames `out_of_range` finds; returns those frames."""
    bad, excess = out_of_range(poses, train_poses, margin_deg)
    if len(bad):
        (log or logging.getLogger(__name__).warning)(
            f"head pose outside the range the renderer was trained on (rotation beyond the "
            f"training range by up to {excess:.1f} deg, margin {margin_deg} deg) in output "
            f"frames {_frames_text(bad)}: expect artefacts there")
    return bad


def load_pose_file(path, target_poses, *, models_dir=None, progress=False):
    """Poses `[M, 4, 4]` from a file (module doc), retargeted when they come from another
    camera (a dataset or a video; an `.npy` is taken as this person's head space as is).

    Raises:
      InputError (missing file, unknown kind, NaN or non-rigid poses), ShapeError (an
      array that is not `[N, 4, 4]`), DatasetError / VideoError from the readers.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise InputError(f"{path}: pose file does not exist")
    if path.is_dir():
        from geneface_jax.data import format as fmt
        person = fmt.load_person(path)
        poses = check_poses(np.asarray(person["poses"]), path)
        return retarget(poses, poses, target_poses)
    if path.suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except ValueError as e:
            raise InputError(f"{path}: not a readable .npy array ({e})") from e
        return check_poses(arr, path)
    if path.suffix.lower() in VIDEO_SUFFIXES:
        from geneface_jax.data import face_models, preprocess
        track = preprocess.track_video(path, preprocess.PreprocessConfig(),
                                       models_dir=models_dir, progress=progress)
        pts = face_models.mesh_to_68(track.points)
        cfg = preprocess.PreprocessConfig()
        u0, v0, side = preprocess.crop_box(pts, track.width, track.height, cfg)
        pts = pts.astype(np.float64)
        pts[..., 0] -= u0
        pts[..., 1] -= v0
        fit = preprocess.fit_head_pose(pts, side, cfg)
        poses = check_poses(fit["poses"], path)
        return retarget(poses, poses, target_poses)
    raise InputError(f"{path}: a pose file is a person dataset directory, a video "
                     f"({', '.join(VIDEO_SUFFIXES)}) or an .npy of [N, 4, 4] poses")
