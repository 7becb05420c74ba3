"""What a viewer sees: rendered frames tracked with a face tracker, scored against reference
frames (or a mouth-opening track).

The landmarks that drive the renderer can follow the speech while the pixels do not (a
blurred mouth, a missing face). These figures track the frames themselves with the same
MediaPipe detector + face mesh that preprocessing uses (`data.face_models`, run through
LiteRT), each frame on its own (no tracking state carried between frames, so a face found
in one frame cannot make one appear in the next), and map the mesh to the 68-point
topology (`face_models.mesh_to_68`):

  face_found, face_found_reference   fraction of frames in which a face is found
  lmd_mouth, lmd_face                mean L2 distance between tracked render and reference
                                     points (mouth points 48-67 / all 68), frame pixels;
                                     `*_512` the same scaled to a 512-pixel-wide frame (the
                                     scale published LMD figures use)
  tracked_mouth_r                    Pearson r over frames of the tracked inner-lip opening
                                     (|p62 - p66| / outer-eye-corner distance |p36 - p45|)
  frames, frames_both                frames given, frames where both sides have a face

Distances and r use the frames where both sides have a face; `frames - frames_both` says
how many were left out, so a render that loses the face cannot look better for it.

Small frames are upsampled (bicubic, by the smallest integer factor that makes the shorter
side at least `min_side`, 384 by default) before tracking: the mesh model sees a 192-pixel
crop of 1.5x the face box, and a 96-pixel frame's face is ~40 pixels. Points are mapped back
to the original frame's pixels (continuous convention, docs/dataset_format.md).

What the tracker cannot see: teeth, tongue and the texture inside the mouth (only the lip
contour), fine eyelid shape at small sizes, and anything the mesh's face prior fills in
(a blurred face can still get a plausible mesh): docs/tracking_metric.md.
"""

import math

import numpy as np

from geneface_jax.data import landmarks as lm
from geneface_jax.errors import ShapeError

DEFAULT_MIN_SIDE = 384


def check_frames(frames, name="frames"):
    """uint8 `[N, H, W, 3]` with N >= 1, else ShapeError naming `name`."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or not len(frames):
        raise ShapeError(f"{name}: expected uint8 frames [N, H, W, 3] with N >= 1, got "
                         f"{frames.dtype} {frames.shape}")
    return frames


def upsample_factor(height, width, min_side=DEFAULT_MIN_SIDE):
    """The integer factor that brings the shorter side to at least `min_side` (>= 1)."""
    return max(1, math.ceil(min_side / min(height, width)))


class FrameTracker:
    """Finds the 68 points of the face in each frame on its own.

    Args:
      models_dir: directory of the face models (default `face_models.models_dir()`).
      min_side: frames whose shorter side is smaller are upsampled to at least this.
      presence: the mesh's face probability below which a frame has no face.
    Raises:
      face_models.ModelError: the model files are missing (names the fetch command).
    """

    def __init__(self, models_dir=None, min_side=DEFAULT_MIN_SIDE, presence=0.5,
                 num_threads=None):
        from geneface_jax.data import preprocess
        self._finder = preprocess.FaceTracker(models_dir, presence=presence,
                                              num_threads=num_threads)
        self.min_side = min_side

    def track(self, frames):
        """uint8 `[N, H, W, 3]` -> (points float32 `[N, 68, 2]` in frame pixels, NaN where no
        face; found bool `[N]`)."""
        from PIL import Image

        from geneface_jax.data import face_models
        frames = check_frames(frames)
        n, h, w, _ = frames.shape
        k = upsample_factor(h, w, self.min_side)
        points = np.full((n, lm.NUM_LANDMARKS, 2), np.nan, np.float32)
        found = np.zeros(n, bool)
        for i, frame in enumerate(frames):
            image = frame if k == 1 else np.asarray(
                Image.fromarray(frame).resize((w * k, h * k), Image.BICUBIC))
            mesh = self._finder.find(image)
            if mesh is not None:
                points[i] = face_models.mesh_to_68(mesh)[:, :2] / k
                found[i] = True
        return points, found


def inner_lip_opening(points):
    """`[..., 68, 2]` -> `[...]`: |p62 - p66| over the outer eye corners' distance |p36 - p45|
    (scale-free, so renders and references of different sizes compare)."""
    points = np.asarray(points, np.float64)
    eyes = np.linalg.norm(points[..., 36, :] - points[..., 45, :], axis=-1)
    return lm.mouth_opening(points) / np.maximum(eyes, 1e-9)


def compare_tracks(points, found, ref_points, ref_found, width):
    """The figures of the module doc from two tracks of the same frames.

    Args:
      points, ref_points: float `[N, 68, 2]` frame pixels (NaN where not found).
      found, ref_found: bool `[N]`.
      width: frame width in pixels (for the 512-pixel scaling).
    """
    both = np.asarray(found) & np.asarray(ref_found)
    n = len(both)
    out = dict(frames=int(n), frames_both=int(both.sum()),
               face_found=float(np.mean(found)), face_found_reference=float(np.mean(ref_found)))
    if both.sum() == 0:
        return dict(out, lmd_mouth=float("nan"), lmd_face=float("nan"),
                    lmd_mouth_512=float("nan"), lmd_face_512=float("nan"),
                    tracked_mouth_r=float("nan"))
    dist = np.linalg.norm(np.asarray(points, np.float64)[both]
                          - np.asarray(ref_points, np.float64)[both], axis=-1)
    scale = 512.0 / width
    lmd_mouth, lmd_face = float(dist[:, lm.MOUTH].mean()), float(dist.mean())
    r = (lm.pearson(inner_lip_opening(points[both]), inner_lip_opening(ref_points[both]))
         if both.sum() >= 3 else float("nan"))
    return dict(out, lmd_mouth=lmd_mouth, lmd_face=lmd_face, lmd_mouth_512=lmd_mouth * scale,
                lmd_face_512=lmd_face * scale, tracked_mouth_r=r)


def track_and_compare(renders, references, tracker=None):
    """Tracks both frame sets and compares them (`compare_tracks`).

    Args:
      renders, references: uint8 `[N, H, W, 3]`, the same N, H, W (frame i of one is the
        counterpart of frame i of the other).
      tracker: a `FrameTracker` (default: a new one).
    Raises:
      ShapeError: wrong dtype or rank, or the two sets differ in shape.
    """
    renders = check_frames(renders, "renders")
    references = check_frames(references, "references")
    if renders.shape != references.shape:
        raise ShapeError(f"renders {renders.shape} and references {references.shape} "
                         "must have the same shape")
    tracker = tracker or FrameTracker()
    pts, found = tracker.track(renders)
    ref_pts, ref_found = tracker.track(references)
    return compare_tracks(pts, found, ref_pts, ref_found, renders.shape[2])


def h264_round_trip(frames, directory):
    """The frames after the project's own H.264 encode (`data.video.write_video`, default
    quality) and decode: what a viewer of an output video gets for a perfect render."""
    import pathlib

    from geneface_jax.data import video
    frames = check_frames(frames)
    path = pathlib.Path(directory) / "round_trip.mp4"
    video.write_video(path, frames, fps=video.FPS)
    decoded = np.stack(list(video.read_video(path)))
    path.unlink()
    return decoded


def noise_floor(references, directory, tracker=None):
    """`track_and_compare` of the references against their own H.264 round trip: the
    smallest LMD (and the highest r) a render can show, reported beside every LMD.
    Returns the figures with the keys prefixed `floor_`."""
    out = track_and_compare(h264_round_trip(references, directory), references, tracker)
    return {f"floor_{k}": v for k, v in out.items() if k.startswith(("lmd", "tracked"))}


def tracked_sync(frames, opening, tracker=None):
    """How well a video's tracked mouth follows a mouth-opening track.

    Args:
      frames: uint8 `[N, H, W, 3]` (e.g. the decoded output video).
      opening: float `[N]`, e.g. `landmarks.mouth_opening` of the landmarks that drove the
        renderer, or of the synthetic person's ground truth.
    Returns:
      dict(face_found, r): the fraction of frames with a face, and the Pearson r of the
      tracked inner-lip opening with `opening` over those frames (nan below 3 frames).
    """
    frames = check_frames(frames)
    opening = np.asarray(opening, np.float64)
    if opening.shape != (len(frames),):
        raise ShapeError(f"opening: expected [{len(frames)}] (one per frame), got "
                         f"{opening.shape}")
    tracker = tracker or FrameTracker()
    pts, found = tracker.track(frames)
    r = (lm.pearson(inner_lip_opening(pts[found]), opening[found])
         if found.sum() >= 3 else float("nan"))
    return dict(face_found=float(found.mean()), r=r)
