"""MediaPipe face models run through LiteRT: face detection, 468-point face mesh, person
segmentation; and the 468 -> 68 landmark mapping.

Where the model files come from
-------------------------------
The three `.tflite` files (BlazeFace short-range detector, the face-mesh landmark model,
the selfie-segmentation model; Apache-2.0, by Google) ship inside the `mediapipe` 0.10.21
wheel on PyPI and in no newer one. Installing that wheel is not possible next to
tensorflow-datasets (mediapipe 0.10.21 pins protobuf < 5, tfds needs protobuf >= 6), and
the wheel's Python code is not needed. So the wheel is *downloaded from the package
registry, never installed*: `python -m geneface_jax.data.face_models --fetch` runs
`pip download mediapipe==0.10.21 --no-deps` for one fixed platform tag, extracts the
three files, checks their SHA-256 and stores them in `models_dir()`
(`$GENEFACE_FACE_MODELS`, default `~/.cache/geneface_jax/face_models`). `--wheel=FILE`
takes a wheel already on disk instead (offline machines). Nothing is downloaded at run
time: a missing model raises `ModelError` naming the fetch command. The models run with
`ai-edge-litert` (Google's TFLite runtime, no protobuf pin), a normal dependency.

Conventions: images are RGB uint8 `[H, W, 3]`; points are `(u, v)` pixels with the
continuous-pixel convention of docs/dataset_format.md (pixel (i, j) covers
`[j, j+1) x [i, i+1)`), mesh depth `z` is in the same pixel scale as `u` (weak
perspective; smaller = nearer the camera, as MediaPipe emits it).

Model facts used here (MediaPipe's published graph settings): the detector takes a
128x128 image scaled to [-1, 1] and predicts, for 896 anchors (16x16 cells x 2 on stride
8, 8x8 x 6 on stride 16, unit-size anchors at cell centres), a box and six key points
(right eye, left eye, nose tip, mouth centre, right ear, left ear) as offsets in input
pixels, and a score logit. The mesh model takes a 192x192 crop scaled to [0, 1], rotated so
the eyes are level and 1.5x the face box, and returns 468 (x, y, z) in crop pixels plus a
face-presence logit. The segmenter takes a 256x256 image in [0, 1] and returns the person
probability per pixel.
"""

import hashlib
import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile

import numpy as np

from geneface_jax import files
from geneface_jax.errors import GenefaceError, ShapeError

MEDIAPIPE_VERSION = "0.10.21"
# The wheel the files are taken from: any platform's wheel carries identical .tflite files;
# pinning one tag makes the download the same on every machine.
_WHEEL_TAGS = ("--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
               "--implementation", "cp", "--abi", "cp311")
# name -> (path inside the wheel, SHA-256 of the file)
MODELS = {
    "face_detection": (
        "mediapipe/modules/face_detection/face_detection_short_range.tflite",
        "bbff11cebd1eb27a1e004cae0b0e63ec8c551cbf34a4451148b4908b8db3eca8"),
    "face_landmark": (
        "mediapipe/modules/face_landmark/face_landmark.tflite",
        "1055cb9d4a9ca8b8c688902a3a5194311138ba256bcc94e336d8373a5f30c814"),
    "selfie_segmentation": (
        "mediapipe/modules/selfie_segmentation/selfie_segmentation.tflite",
        "9ee168ec7c8f2a16c56fe8e1cfbc514974cbbb7e434051b455635f1bd1462f5c"),
}
FETCH_COMMAND = "python -m geneface_jax.data.face_models --fetch"

# MediaPipe face-mesh index of each of the 68 iBUG/300-W points (the topology of
# geneface_jax.data.landmarks). Chosen on MediaPipe's canonical mesh so that left/right
# pairs are mirror vertices of the mesh: jaw contour from the person's right ear along
# the chin to the left ear; brows outer->inner (right) and inner->outer (left); nose
# bridge top->tip; nose base right->left; eyes outer corner, two upper-lid points, inner
# corner, two lower-lid points (left eye starts at its inner corner, as in iBUG); outer
# lip from the right corner over the upper lip, then back along the lower lip; inner lip
# likewise.
MESH_TO_68 = np.array([
    127, 234, 93, 132, 58, 136, 150, 176, 152, 400, 379, 365, 288, 361, 323, 454, 356,  # jaw
    70, 63, 105, 66, 107,                     # right brow 17-21
    336, 296, 334, 293, 300,                  # left brow 22-26
    168, 197, 5, 4,                           # nose bridge 27-30
    98, 97, 2, 326, 327,                      # nose base 31-35
    33, 160, 158, 133, 153, 144,              # right eye 36-41
    362, 385, 387, 263, 373, 380,             # left eye 42-47
    61, 40, 37, 0, 267, 270, 291, 321, 314, 17, 84, 91,   # outer lip 48-59
    78, 81, 13, 311, 308, 402, 14, 178,       # inner lip 60-67
], np.int64)
# Mesh points used to place the next frame's crop (eye outer corners).
_MESH_RIGHT_EYE, _MESH_LEFT_EYE = 33, 263


class ModelError(GenefaceError):
    """A face model file is missing or corrupt, or LiteRT is not installed."""


# --------------------------------------------------------------------------- model files


def models_dir():
    """Directory holding the .tflite files: `$GENEFACE_FACE_MODELS` or
    `~/.cache/geneface_jax/face_models`."""
    env = os.environ.get("GENEFACE_FACE_MODELS")
    if env:
        return pathlib.Path(env).expanduser()
    return pathlib.Path.home() / ".cache" / "geneface_jax" / "face_models"


def file_sha256(path):
    """Hex SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_VERIFIED = {}


def model_path(name, directory=None):
    """Path of model `name` (a key of MODELS), checked against its SHA-256 once per process.

    Raises:
      ModelError: the file is missing or its hash differs, with the command that fetches it.
    """
    if name not in MODELS:
        raise KeyError(f"unknown face model {name!r}; known: {sorted(MODELS)}")
    inner, digest = MODELS[name]
    path = pathlib.Path(directory or models_dir()) / pathlib.PurePosixPath(inner).name
    if not path.is_file():
        raise ModelError(f"face model {path} is missing; run `{FETCH_COMMAND}` once "
                         "(it downloads the mediapipe wheel from the package registry and "
                         "extracts the model files), or set GENEFACE_FACE_MODELS")
    key = str(path.resolve())
    if key not in _VERIFIED:
        got = file_sha256(path)
        if got != digest:
            raise ModelError(f"face model {path} is corrupt (sha256 {got[:12]}..., expected "
                             f"{digest[:12]}...); delete it and run `{FETCH_COMMAND}`")
        _VERIFIED[key] = True
    return path


def fetch(directory=None, wheel=None, quiet=False):
    """Puts the three model files into `directory` (default `models_dir()`).

    Args:
      directory: destination; created if needed. Files already present and valid are kept.
      wheel: a mediapipe 0.10.21 wheel file already on disk; when None it is downloaded
        with `pip download` from the configured package index (nothing is installed).
      quiet: no progress lines.
    Returns:
      the destination directory.
    Raises:
      ModelError: the download failed, or a file in the wheel has an unexpected hash.
    """
    dest = pathlib.Path(directory or models_dir())
    dest.mkdir(parents=True, exist_ok=True)
    missing = [n for n in MODELS if not _is_valid(dest, n)]
    if not missing:
        if not quiet:
            print(f"face models present in {dest}")
        return dest
    with tempfile.TemporaryDirectory(prefix="geneface-mediapipe-") as tmp:
        if wheel is None:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   *_WHEEL_TAGS, "--dest", tmp, "--quiet", f"mediapipe=={MEDIAPIPE_VERSION}"]
            if not quiet:
                print(f"downloading the mediapipe {MEDIAPIPE_VERSION} wheel (not installed; "
                      "only its .tflite files are kept) ...")
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wheels = sorted(pathlib.Path(tmp).glob("mediapipe-*.whl"))
            if proc.returncode != 0 or not wheels:
                raise ModelError("could not download the mediapipe wheel with "
                                 f"`{' '.join(cmd[2:])}`: {proc.stderr.strip()[-400:]}")
            wheel = wheels[0]
        _extract(pathlib.Path(wheel), dest, missing)
    if not quiet:
        print(f"face models ready in {dest}: {', '.join(sorted(MODELS))}")
    return dest


def _is_valid(dest, name):
    path = dest / pathlib.PurePosixPath(MODELS[name][0]).name
    return path.is_file() and file_sha256(path) == MODELS[name][1]


def _extract(wheel, dest, names):
    try:
        archive = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as e:
        raise ModelError(f"{wheel}: not a readable wheel ({e})") from e
    with archive:
        for name in names:
            inner, digest = MODELS[name]
            try:
                data = archive.read(inner)
            except KeyError:
                raise ModelError(f"{wheel}: has no {inner} (need mediapipe "
                                 f"{MEDIAPIPE_VERSION})") from None
            got = hashlib.sha256(data).hexdigest()
            if got != digest:
                raise ModelError(f"{wheel}: {inner} has sha256 {got[:12]}..., expected "
                                 f"{digest[:12]}...")
            files.write_bytes_atomic(dest / pathlib.PurePosixPath(inner).name, data)


# --------------------------------------------------------------------------- geometry


def warp_affine(image, matrix, out_h, out_w):
    """Bilinear resampling: `out[i, j] = image(matrix @ [j + .5, i + .5, 1])`.

    Args:
      image: `[H, W, C]` array (any dtype; computed in float32).
      matrix: `[2, 3]` map from output pixel coordinates to input pixel coordinates
        (continuous convention, pixel centres at +0.5).
      out_h, out_w: output size.
    Returns:
      float32 `[out_h, out_w, C]`; samples outside the image repeat the border.
    """
    img = np.asarray(image, np.float32)
    h, w = img.shape[:2]
    jj, ii = np.meshgrid(np.arange(out_w, dtype=np.float32) + 0.5,
                         np.arange(out_h, dtype=np.float32) + 0.5)
    m = np.asarray(matrix, np.float32)
    x = m[0, 0] * jj + m[0, 1] * ii + m[0, 2] - 0.5
    y = m[1, 0] * jj + m[1, 1] * ii + m[1, 2] - 0.5
    x0 = np.floor(x)
    y0 = np.floor(y)
    fx = (x - x0)[..., None]
    fy = (y - y0)[..., None]
    x0 = x0.astype(np.int64)
    y0 = y0.astype(np.int64)
    xa, xb = np.clip(x0, 0, w - 1), np.clip(x0 + 1, 0, w - 1)
    ya, yb = np.clip(y0, 0, h - 1), np.clip(y0 + 1, 0, h - 1)
    top = img[ya, xa] * (1 - fx) + img[ya, xb] * fx
    bottom = img[yb, xa] * (1 - fx) + img[yb, xb] * fx
    return top * (1 - fy) + bottom * fy


def resize(image, out_h, out_w):
    """Antialiased bilinear resize (Pillow) of uint8 `[H, W, 3]` or float32 `[H, W]`.

    Pixel centres stay aligned: output pixel `(i + 0.5)` samples input
    `(i + 0.5) * H / out_h`, as `warp_affine` with a pure scale does (which is 5-10x slower
    and does not low-pass when shrinking).
    """
    from PIL import Image
    img = np.asarray(image)
    if img.ndim == 2:
        pil = Image.fromarray(np.ascontiguousarray(img, np.float32), mode="F")
        return np.asarray(pil.resize((out_w, out_h), Image.BILINEAR), np.float32)
    pil = Image.fromarray(np.ascontiguousarray(img, np.uint8))
    return np.asarray(pil.resize((out_w, out_h), Image.BILINEAR))


def roi_matrix(center, size, angle, out_size):
    """`[2, 3]` map from a square `out_size` crop to the image: the crop covers a
    `size`-pixel square centred at `center` (u, v) rotated by `angle` radians
    (counter-clockwise on screen)."""
    c, s = np.cos(angle), np.sin(angle)
    k = size / out_size
    # crop pixel (x, y) -> offset from the crop centre, scaled, rotated, then shifted.
    rot = np.array([[c, s], [-s, c]]) * k
    offset = np.asarray(center, np.float64) - rot @ np.array([out_size / 2, out_size / 2])
    return np.concatenate([rot, offset[:, None]], axis=1)


# --------------------------------------------------------------------------- runners


class _Model:
    """One LiteRT interpreter with a fixed input size."""

    def __init__(self, name, directory=None, num_threads=None):
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError as e:  # pragma: no cover - a normal dependency
            raise ModelError("ai-edge-litert is not installed (pip install ai-edge-litert)"
                             ) from e
        self.path = model_path(name, directory)
        self._interp = Interpreter(model_path=str(self.path),
                                   num_threads=num_threads or os.cpu_count() or 1)
        self._interp.allocate_tensors()
        self._input = self._interp.get_input_details()[0]["index"]
        self.input_hw = tuple(self._interp.get_input_details()[0]["shape"][1:3])
        self._outputs = [d["index"] for d in self._interp.get_output_details()]

    def __call__(self, x):
        """x: float32 `[H, W, 3]` (the model's size) -> list of output arrays (batch 1)."""
        self._interp.set_tensor(self._input, np.ascontiguousarray(x[None], np.float32))
        self._interp.invoke()
        return [self._interp.get_tensor(i)[0] for i in self._outputs]


def _anchors():
    """`[896, 2]` anchor centres (x, y) in [0, 1] of the short-range detector."""
    out = []
    for grid, per_cell in ((16, 2), (8, 6)):
        ys, xs = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
        centres = np.stack([(xs + 0.5) / grid, (ys + 0.5) / grid], -1).reshape(-1, 1, 2)
        out.append(np.repeat(centres, per_cell, axis=1).reshape(-1, 2))
    return np.concatenate(out).astype(np.float32)


def _iou(box, boxes):
    lo = np.maximum(box[:2], boxes[:, :2])
    hi = np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=1)
    area = lambda b: np.prod(b[..., 2:] - b[..., :2], axis=-1)
    return inter / np.maximum(area(box) + area(boxes) - inter, 1e-12)


class FaceDetector:
    """BlazeFace short-range face detector (faces within ~2 m, roughly frontal).

    `detect(image)` returns a list of detections, best first, each a dict with `score`
    (0..1), `box` `(u0, v0, u1, v1)` and `keypoints` `[6, 2]` (right eye, left eye, nose,
    mouth, right ear, left ear) in image pixels. The image is letterboxed to a square
    (padding with edge pixels) before resizing, so non-square frames keep their aspect.
    """

    def __init__(self, directory=None, min_score=0.5, iou=0.3, num_threads=None):
        self._model = _Model("face_detection", directory, num_threads)
        self.min_score = min_score
        self.iou = iou
        self._anchors = _anchors()

    def detect(self, image):
        img = _check_image(image)
        h, w = img.shape[:2]
        side = float(max(h, w))
        n = self._model.input_hw[0]
        m = roi_matrix((w / 2, h / 2), side, 0.0, n)
        x = warp_affine(img, m, n, n) / 127.5 - 1.0
        raw, logits = self._model(x)
        scores = _sigmoid(logits[:, 0])
        keep = np.nonzero(scores >= self.min_score)[0]
        if len(keep) == 0:
            return []
        raw = raw[keep] / n
        anchor = self._anchors[keep]
        centre = raw[:, 0:2] + anchor
        half = raw[:, 2:4] / 2
        boxes = np.concatenate([centre - half, centre + half], 1)
        kps = raw[:, 4:16].reshape(-1, 6, 2) + anchor[:, None]
        dets = _weighted_nms(scores[keep], boxes, kps, self.iou)
        # crop-normalised -> image pixels
        to_px = lambda p: (p - 0.5) * side + np.array([w / 2, h / 2])
        return [dict(score=float(s), box=tuple(np.concatenate([to_px(b[:2]), to_px(b[2:])])),
                     keypoints=to_px(k)) for s, b, k in dets]


def _weighted_nms(scores, boxes, kps, iou):
    """Weighted non-maximum suppression: overlapping candidates are averaged with their
    scores as weights (MediaPipe's blending), best cluster first."""
    order = np.argsort(-scores)
    remaining = list(order)
    out = []
    while remaining:
        best = remaining[0]
        overlap = _iou(boxes[best], boxes[remaining]) > iou
        group = np.array(remaining)[overlap]
        wts = scores[group][:, None]
        box = (boxes[group] * wts).sum(0) / wts.sum()
        kp = (kps[group] * wts[:, :, None]).sum(0) / wts.sum()
        out.append((scores[best], box, kp))
        remaining = [r for r, o in zip(remaining, overlap) if not o]
    return out


class FaceMesh:
    """468-point face mesh on a rotated square crop around the face.

    `from_detection(image, det)` and `from_points(image, mesh)` (track from the previous
    frame's mesh) return `(points [468, 3], presence)`: `(u, v)` image pixels and depth `z`
    in the same pixel scale; presence is the model's face probability (0..1).
    """

    SCALE = 1.5    # crop side / face box side

    def __init__(self, directory=None, num_threads=None):
        self._model = _Model("face_landmark", directory, num_threads)

    def from_detection(self, image, det):
        kp = np.asarray(det["keypoints"])
        u0, v0, u1, v1 = det["box"]
        angle = _eye_angle(kp[0], kp[1])
        side = max(u1 - u0, v1 - v0) * self.SCALE
        return self._run(image, ((u0 + u1) / 2, (v0 + v1) / 2), side, angle)

    def from_points(self, image, mesh):
        pts = np.asarray(mesh)[:, :2]
        angle = _eye_angle(pts[_MESH_RIGHT_EYE], pts[_MESH_LEFT_EYE])
        # box of the points in the rotated frame
        c, s = np.cos(angle), np.sin(angle)
        centre0 = (pts.min(0) + pts.max(0)) / 2
        rot = np.array([[c, s], [-s, c]])        # crop axes as columns (see roi_matrix)
        local = (pts - centre0) @ rot
        lo, hi = local.min(0), local.max(0)
        centre = centre0 + rot @ ((lo + hi) / 2)
        side = float(np.max(hi - lo)) * self.SCALE
        return self._run(image, centre, side, angle)

    def _run(self, image, centre, side, angle):
        img = _check_image(image)
        n = self._model.input_hw[0]
        m = roi_matrix(centre, side, angle, n)
        crop = warp_affine(img, m, n, n) / 255.0
        raw, logit = self._model(crop)
        pts = raw.reshape(-1, 3).astype(np.float64)
        uv = pts[:, :2] @ m[:, :2].T + m[:, 2]
        z = pts[:, 2] * (side / n)
        presence = float(_sigmoid(logit.reshape(-1)[0]))
        return np.concatenate([uv, z[:, None]], 1).astype(np.float32), presence


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.clip(np.asarray(x, np.float64), -80.0, 80.0)))


def _eye_angle(right_eye, left_eye):
    """Roll of the eye line in radians, counter-clockwise on screen (v points down): the
    angle to rotate the crop by so the eyes come out level."""
    d = np.asarray(left_eye, np.float64) - np.asarray(right_eye, np.float64)
    return float(np.arctan2(-d[1], d[0]))


class PersonSegmenter:
    """Selfie segmentation: `probability(image)` -> float32 `[H, W]` person probability."""

    def __init__(self, directory=None, num_threads=None):
        self._model = _Model("selfie_segmentation", directory, num_threads)

    def probability(self, image):
        img = _check_image(image)
        h, w = img.shape[:2]
        n_h, n_w = self._model.input_hw
        small = resize(img.astype(np.uint8), n_h, n_w).astype(np.float32)
        (prob,) = self._model(small / 255.0)
        prob = np.clip(prob.reshape(n_h, n_w), 0.0, 1.0)
        return np.clip(resize(prob, h, w), 0.0, 1.0)


def _check_image(image):
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3 or img.shape[0] < 8 or img.shape[1] < 8:
        raise ShapeError(f"expected an RGB image [H, W, 3], got shape {img.shape}")
    return img


def mesh_to_68(mesh):
    """MediaPipe mesh `[..., 468, D]` -> the 68-point topology `[..., 68, D]`."""
    return np.asarray(mesh)[..., MESH_TO_68, :]


def main(argv=None):
    import argparse
    parser = argparse.ArgumentParser(description="Fetch the MediaPipe face models "
                                     "(from the mediapipe wheel on the package registry).")
    parser.add_argument("--fetch", action="store_true", help="download and extract")
    parser.add_argument("--dir", default=None, help=f"destination (default {models_dir()})")
    parser.add_argument("--wheel", default=None, help="use this mediapipe wheel file")
    args = parser.parse_args(argv)
    if not args.fetch:
        for name in MODELS:
            try:
                print(f"{name}: {model_path(name, args.dir)}")
            except ModelError as e:
                print(f"{name}: {e}")
        return 0
    try:
        fetch(args.dir, args.wheel)
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
