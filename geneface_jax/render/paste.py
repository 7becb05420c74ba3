"""Paste-back: rendered crops put back into the person's original video frames.

Preprocessing (`data.preprocess.preprocess_video`, `source_record`) records where the
dataset came from in its meta.json under `source_video`: the file's absolute `path` and
`sha256`, its frame `width`, `height` and `fps`, the square `crop` `(u0, v0, side)` in
source pixels, and `frames`, the index of each dataset frame in the source decoded at
25 fps (`data.video.read_video(path, fps=25)`: nearest timestamp; the native frame index
when the source is 25 fps).

`paste(source, render, alpha, crop, region)` resizes a rendered crop into the crop box of
the source frame and blends it in with a weight

    w = border(x, y) * max(alpha, soft(region))

where `alpha` is the rendered person's opacity, `region` the pixels the person covers
anywhere in its video (`ReferenceTrack.render_mask`, softened by a box blur), and
`border` a linear ramp from 0 at the crop box's edge to 1 at `feather` pixels inside it
(no ramp on an edge that lies on the frame's edge: nothing is outside there). Outside the
crop box, and inside it away from the person, the source pixels are kept exactly.
"""

import pathlib

import numpy as np

from geneface_jax.files import sha256_file
from geneface_jax.errors import ShapeError, VideoError

SOURCE_KEY = "source_video"


def check_source(record, override=None):
    """The source video's path after checking it is the file preprocessing read.

    Args:
      record: a `source_video` entry; override: another path for the same file
        (`--source_video`).
    Raises:
      VideoError naming the file: missing (moved), or its SHA-256 differs (changed).
    """
    path = pathlib.Path(override or record["path"])
    if not path.is_file():
        raise VideoError(f"{path}: the person's source video is not there (moved or "
                         f"deleted?); pass --source_video=FILE to point at it, or "
                         f"--nopaste_back for the crop alone")
    digest = sha256_file(path)
    if digest != record["sha256"]:
        raise VideoError(f"{path}: this is not the video the person was made from (its "
                         f"SHA-256 {digest[:12]}... differs from the recorded "
                         f"{record['sha256'][:12]}...); the file changed")
    return path


def border_ramp(crop, width, height, feather):
    """`[side, side]` float32 weights: 0 -> 1 over `feather` pixels inside each crop-box
    edge that lies inside the `width` x `height` frame (1 on edges at the frame's edge)."""
    u0, v0, side = (int(v) for v in crop)
    c = np.arange(side, dtype=np.float32) + 0.5
    f = float(max(feather, 1e-6))
    ones = np.ones(side, np.float32)
    lo_u = np.clip(c / f, 0, 1) if u0 > 0 else ones
    hi_u = np.clip(c[::-1] / f, 0, 1) if u0 + side < width else ones
    lo_v = np.clip(c / f, 0, 1) if v0 > 0 else ones
    hi_v = np.clip(c[::-1] / f, 0, 1) if v0 + side < height else ones
    return np.minimum(lo_v, hi_v)[:, None] * np.minimum(lo_u, hi_u)[None, :]


def soften(mask, radius):
    """Box blur of a `[H, W]` mask by a square of half-size `radius` -> float32 in [0, 1]."""
    m = np.asarray(mask, np.float32)
    if radius <= 0:
        return m
    k = 2 * radius + 1
    p = np.pad(m, radius, mode="edge")
    c = np.cumsum(np.cumsum(np.pad(p, ((1, 0), (1, 0))), 0), 1)
    return (c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]) / (k * k)


class Paster:
    """Pastes rendered crops (`[s, s]` renders) into `width` x `height` source frames.

    Args:
      crop: `(u0, v0, side)` in source pixels; width, height: source frame size.
      region: bool `[s, s]` where the person can be (render resolution) or None.
      feather: border ramp width in source pixels (default: side / 16, at least 2).
    """

    def __init__(self, crop, width, height, region=None, feather=None):
        self.crop = tuple(int(v) for v in crop)
        u0, v0, side = self.crop
        if side < 1 or u0 < 0 or v0 < 0 or u0 + side > width or v0 + side > height:
            raise ShapeError(f"crop box {self.crop} does not fit a {width}x{height} frame")
        self.width, self.height = int(width), int(height)
        self.feather = max(2.0, side / 16.0) if feather is None else float(feather)
        self.border = border_ramp(self.crop, width, height, self.feather)
        self.region = None if region is None else np.asarray(region, bool)
        self._region_w = {}

    def _resize(self, image, side):
        from geneface_jax.data import face_models
        if image.shape[0] == side and image.shape[1] == side:
            return image
        return face_models.resize(image, side, side)

    def weights(self, alpha):
        """`[side, side]` blend weights of one render's alpha `[s, s]` (module doc)."""
        side = self.crop[2]
        a = np.asarray(alpha, np.float32)
        if self.region is not None:
            s = self.region.shape[0]
            if s not in self._region_w:
                self._region_w[s] = soften(self.region, max(1, s // 32))
            a = np.maximum(a, self._region_w[s])
        a = np.clip(self._resize(a, side), 0.0, 1.0)
        return self.border * a

    def paste(self, source, render, alpha):
        """One frame: uint8 source `[H, W, 3]`, uint8 render `[s, s, 3]`, alpha `[s, s]`
        -> uint8 `[H, W, 3]` (a new array; pixels with zero weight are the source's)."""
        source = np.asarray(source)
        if source.shape != (self.height, self.width, 3):
            raise ShapeError(f"source frame is {source.shape}, expected "
                             f"({self.height}, {self.width}, 3)")
        u0, v0, side = self.crop
        w = self.weights(alpha)[..., None]
        top = self._resize(np.asarray(render, np.uint8), side).astype(np.float32)
        out = source.copy()
        box = source[v0:v0 + side, u0:u0 + side].astype(np.float32)
        blended = np.round(box + w * (top - box))
        out[v0:v0 + side, u0:u0 + side] = np.where(w > 0, blended, box).astype(np.uint8)
        return out


class SourceFrames:
    """Random access to the source frames a track needs, decoded once at 25 fps.

    Only the 25-fps frames listed in `needed` are kept, in a scratch memory map in
    `directory` (`len(needed) x H x W x 3` bytes on disk).
    """

    def __init__(self, path, needed, width, height, directory):
        from geneface_jax.data import video as video_io
        self.index = {int(k): i for i, k in enumerate(sorted(set(int(v) for v in needed)))}
        self.frames = np.lib.format.open_memmap(
            pathlib.Path(directory) / "source_frames.npy", "w+", np.uint8,
            (max(1, len(self.index)), int(height), int(width), 3))
        last = max(self.index) if self.index else -1
        got = 0
        for k, img in enumerate(video_io.read_video(path, fps=video_io.FPS)):
            if k > last:
                break
            if k in self.index:
                if img.shape != self.frames.shape[1:]:
                    raise VideoError(f"{path}: frame {k} is {img.shape}, recorded "
                                     f"{self.frames.shape[1:]}")
                self.frames[self.index[k]] = img
                got += 1
        if got != len(self.index):
            raise VideoError(f"{path}: has fewer frames than the dataset recorded "
                             f"(needed frame {last})")

    def __getitem__(self, k):
        return self.frames[self.index[int(k)]]


def resolve(source_json, paste_back=None, source_video="", log=None):
    """Whether and from which file to paste back: -> (record dict, checked path) or None.

    Args:
      source_json: `ReferenceTrack.source` ("" for a person not made from a video).
      paste_back: True (required: errors when impossible), False (never), None (when the
        person has a source record and the file, or `source_video`, is there; a missing
        file is then logged and the crop is written).
      source_video: the file's new path.
    Raises:
      VideoError: paste-back asked for a person with no source video, or the file is
        missing / changed (`check_source`).
    """
    import json
    import logging
    if paste_back is False:
        return None
    if not source_json:
        if paste_back:
            raise VideoError("--paste_back: the checkpoints' person was not made from a "
                             "video (no source video recorded by preprocessing)")
        return None
    record = json.loads(source_json)
    path = pathlib.Path(source_video or record["path"])
    if paste_back is None and not path.is_file():
        (log or logging.getLogger(__name__).warning)(
            f"{path}: the person's source video is not there; writing the crop "
            f"(--source_video=FILE to paste back into it)")
        return None
    return record, check_source(record, source_video or None)
