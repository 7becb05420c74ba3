"""Audio file -> talking-face mp4: GeneFace's three stages end to end.

    pipe = TalkingFacePipeline.load("demo_out/checkpoints")
    summary = pipe.synthesize("speech.wav", "out.mp4", SynthesisOptions(temperature=1.0))

Stages, per video frame t (25 fps; the audio rule of `geneface_jax.audio.features`: a clip
of n samples at 16 kHz gives N = round(n / 640) frames):

1. features `[2N, C]` at 50 Hz (log-mel, or HuBERT when stage 1 was trained on it) ->
   stage-1 sample (VAE prior at `temperature`, chunked: `motion.predict.MotionPredictor`)
   -> normalised identity-free motion `[N, 204]`;
2. post-net (`motion.postnet.refine_motion`, EMA generator, BatchNorm frozen) ->
   landmarks `[N, 68, 3]` = refined x std + the person's identity (mean landmarks);
3. eyes and pose from a *reference track* of the person's own video: frame t uses
   reference frame `track_indices(N, L, mode)[t]` (`loop` 0, 1, .., L-1, 0, 1, ..; `mirror`
   0, .., L-1, L-2, .., 1, 0, 1, ..): its camera-to-world pose and its eye landmarks
   (points 36-47, so blinks follow the real video, as in GeneFace);
4. silence closes the mouth: where the audio stays below `silence_db` dBFS for a whole
   5-frame window, the mouth points (48-67) take the person's rest mouth (its most closed
   reference frame), cross-faded over 3 frames;
5. head NeRF over the head-aware torso NeRF over the static background, rendered frame by
   frame (`render.frames.FrameRenderer`, rays split over every device) and streamed into an
   H.264 mp4 (`data.video.VideoWriter`) in chunks of `frames_per_chunk` frames with the
   input audio (16 kHz mono, AAC) muxed in: memory stays flat in the audio length. Each
   model traces only its region of the image (`ReferenceTrack.head_region` /
   `torso_region`: every pixel the head / torso covers anywhere in the person's video,
   grown by `region_margin`); elsewhere that model is taken as empty, which is what it
   learned there, and pixels outside both are the static background
   (`full_frame=True` traces every pixel through both models).

Checkpoint directory layout (what `experiments.demo` writes and `experiments.synthesize
--checkpoints` reads): `audio2motion/`, `postnet/`, `head/`, `torso/` (optional) are the
workdirs of the training entry points, and `reference.npz` the person's reference track
(`ReferenceTrack.save`; without it the head run's person dataset is read). `load` refuses
(CheckpointError) a missing directory or stage, a stage directory holding another stage,
and stages that do not belong together (a post-net trained on another stage-1 run or
another person than the NeRF, a torso trained on another head).
"""

import dataclasses
import json
import math
import pathlib
import sys
import tempfile
import time
import types
from typing import Callable, Optional

import jax
import numpy as np

from geneface_jax import files
from geneface_jax.audio import features as feat
from geneface_jax.audio import io as audio_io
from geneface_jax.data import format as fmt
from geneface_jax.data import landmarks as lm
from geneface_jax.data.landmarks import pearson
from geneface_jax.errors import AudioError, CheckpointError, InputError, ShapeError, VideoError

STAGES = ("audio2motion", "postnet", "head", "torso")
REFERENCE_FILE = "reference.npz"
POSE_MODES = ("loop", "mirror")
EYES = np.concatenate([lm.RIGHT_EYE, lm.LEFT_EYE])
MAX_CALL_RAYS = 1 << 17      # rays per render call (host memory ~100 B per ray)


# --------------------------------------------------------------------------- reference track

def track_indices(num_frames: int, length: int, mode: str = "loop") -> np.ndarray:
    """Reference-frame index `[num_frames]` of each output frame over a track of `length`
    frames: `loop` restarts at 0, `mirror` plays back and forth (no jump at the ends)."""
    if mode not in POSE_MODES:
        raise InputError(f"pose_mode must be one of {POSE_MODES}, got {mode!r}")
    if length < 1:
        raise InputError("the reference track is empty")
    t = np.arange(int(num_frames))
    if mode == "loop" or length == 1:
        return t % length
    k = t % (2 * length - 2)
    return np.where(k < length, k, 2 * length - 2 - k)


@dataclasses.dataclass(frozen=True)
class ReferenceTrack:
    """What inference takes from the person's own video.

    Attributes:
      poses: camera-to-world `[L, 4, 4]` of the track's frames (head space).
      landmarks: tracked landmarks `[L, 68, 3]` (head space), for the eyes.
      background: uint8 `[H, W, 3]` static background.
      intrinsics: `[4]` `(fx, fy, cx, cy)` in pixels.
      torso_pose: `[4, 4]` the torso NeRF's camera (the first train frame's pose).
      render_mask: bool `[H, W]`, the pixels worth ray-tracing (head or torso region).
      head_region, torso_region: bool `[H, W]`, where each model can be non-empty.
      rest_mouth: `[20, 3]` mouth points 48-67 of the most closed frame.
      source: JSON of the person's source video record (`render.paste`; its `frames`
        are the track's frames' source indices), "" for a person not from a video.
    """
    poses: np.ndarray
    landmarks: np.ndarray
    background: np.ndarray
    intrinsics: np.ndarray
    torso_pose: np.ndarray
    render_mask: np.ndarray
    rest_mouth: np.ndarray
    head_region: np.ndarray
    torso_region: np.ndarray
    source: str = ""

    @property
    def height(self):
        return self.background.shape[0]

    @property
    def width(self):
        return self.background.shape[1]

    def __len__(self):
        return len(self.poses)

    @classmethod
    def from_person(cls, person, *, split="train", region_margin=0.06):
        """The track of a person dataset (`format.load_person`): the frames of `split`.

        `head_region` / `torso_region` = pixels of the head / torso (mask labels) in any
        frame of the dataset, dilated by `region_margin` x the image size (room for a
        wider-open jaw); `render_mask` is their union.
        """
        meta = person.meta
        lo, hi = (int(v) for v in meta["splits"][split])
        if hi <= lo:
            raise CheckpointError(f"{person.path}: split {split!r} is empty")
        masks = np.asarray(person["masks"])
        head = np.zeros(masks.shape[1:], bool)
        torso = np.zeros(masks.shape[1:], bool)
        for start in range(0, len(masks), 256):
            block = masks[start:start + 256]
            head |= (block == fmt.HEAD).any(0)
            torso |= (block == fmt.TORSO).any(0)
        radius = int(math.ceil(region_margin * max(masks.shape[1:])))
        head, torso = _dilate(head, radius), _dilate(torso, radius)
        lms = np.asarray(person["landmarks"][lo:hi], np.float32)
        rest = lms[int(np.argmin(lm.mouth_opening(lms)))][lm.MOUTH]
        record = meta.get("source_video")
        source = "" if not record else json.dumps(dict(record,
                                                       frames=record["frames"][lo:hi]))
        return cls(source=source, poses=np.asarray(person["poses"][lo:hi], np.float32),
                   landmarks=lms,
                   background=np.asarray(person["background"], np.uint8),
                   intrinsics=np.asarray(meta["intrinsics"], np.float32),
                   torso_pose=np.asarray(person["poses"][lo], np.float32),
                   render_mask=head | torso, rest_mouth=rest.astype(np.float32),
                   head_region=head, torso_region=torso)

    def save(self, path):
        """Writes the track as one `.npz` (atomically)."""
        path = pathlib.Path(path)
        with files.atomic_path(path, ".npz") as tmp:
            np.savez(tmp, **dataclasses.asdict(self))
        return path

    @classmethod
    def load(cls, path):
        path = pathlib.Path(path)
        try:
            with np.load(path) as z:
                fields = {f.name: z[f.name] for f in dataclasses.fields(cls)
                          if f.name in z or f.name != "source"}
                fields["source"] = str(fields.get("source", ""))
        except (OSError, KeyError, ValueError) as e:
            raise CheckpointError(f"{path}: not a reference track ({e})") from e
        for name in ("render_mask", "head_region", "torso_region"):
            fields[name] = fields[name].astype(bool)
        return cls(**fields)


def _dilate(mask, radius):
    """Binary dilation of `mask [H, W]` by a square of half-size `radius` pixels."""
    out = mask.copy()
    if radius <= 0:
        return out
    h, w = mask.shape
    rows = np.zeros_like(mask)
    for d in range(-radius, radius + 1):
        rows[:, max(d, 0):w + min(d, 0)] |= mask[:, max(-d, 0):w + min(-d, 0)]
    for d in range(-radius, radius + 1):
        out[max(d, 0):h + min(d, 0)] |= rows[max(-d, 0):h + min(-d, 0)]
    return out


# --------------------------------------------------------------------------- options

@dataclasses.dataclass(frozen=True)
class SynthesisOptions:
    """Inference settings.

    temperature: stage-1 prior temperature (0: the flow's mode path, 1: as trained).
    seed: sampling seed (the same seed and audio give the same video).
    pose_mode: `loop` or `mirror` (see `track_indices`).
    silence_db: dBFS below which a 5-frame window counts as silence (mouth closed).
    frames_per_chunk: frames rendered and encoded per chunk (bounds memory).
    render_chunk: rays per device evaluated at once.
    head_samples: samples per ray of the grid head (0: as trained; fewer render faster and
      less sharply, `FrameRenderer.set_head_samples`).
    full_frame: ray-trace every pixel instead of `ReferenceTrack.render_mask`.
    max_frames: render only the first this many frames (0: all; for quick previews,
      the audio is cut to match).
    crf: H.264 constant rate factor.
    pose: `loop`, `mirror`, `static[:FRAME]` or a file (`data.head_poses`); "" takes
      `pose_mode` (kept as its alias).
    blink: `track` (the reference frames' eyes), `auto` (a seeded natural schedule,
      `data.blinks`) or `none` (eyes held open).
    paste_back: write the video in the source video's full frames (`render.paste`);
      None: when the person came from a video whose file is where it was recorded.
    source_video: the source video's path when it moved (checked by its SHA-256).
    """
    temperature: float = 1.0
    seed: int = 0
    pose_mode: str = "loop"
    silence_db: float = -50.0
    frames_per_chunk: int = 25
    render_chunk: int = 4096
    head_samples: int = 0
    full_frame: bool = False
    max_frames: int = 0
    crf: int = 18
    pose: str = ""
    blink: str = "track"
    paste_back: Optional[bool] = None
    source_video: str = ""

    def __post_init__(self):
        from geneface_jax.data import blinks, head_poses
        head_poses.parse_pose_spec(self.pose or self.pose_mode)
        if self.blink not in blinks.BLINK_MODES:
            raise InputError(f"blink must be one of {blinks.BLINK_MODES}, got {self.blink!r}")
        if self.pose_mode not in POSE_MODES:
            raise InputError(f"pose_mode must be one of {POSE_MODES}, got {self.pose_mode!r}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise InputError(f"temperature must be finite and >= 0, got {self.temperature}")
        if self.frames_per_chunk < 1 or self.render_chunk < 1 or self.max_frames < 0:
            raise InputError("frames_per_chunk and render_chunk must be >= 1, max_frames >= 0")
        if self.head_samples < 0:
            raise InputError(f"head_samples must be >= 0 (0: as trained), got "
                             f"{self.head_samples}")


def silence_weights(energy, silence_db=-50.0, window=5, fade=3):
    """Per-frame mouth-closing weight `[N]` in [0, 1] from hop energies `[2N]` (RMS).

    A frame is silent when the loudest hop within `window` frames around it is below
    `silence_db` dBFS; the 0/1 indicator is then smoothed by a `fade`-frame moving average
    so the mouth closes and opens over a few frames.
    """
    e = np.asarray(energy, np.float64)
    if e.ndim != 1 or len(e) % 2:
        raise ShapeError(f"energy must be [2N], got {e.shape}")
    db = feat.energy_db(e.reshape(-1, 2).max(1))
    n, r = len(db), window // 2
    padded = np.pad(db, r, mode="edge")
    loudest = np.lib.stride_tricks.sliding_window_view(padded, window).max(1)[:n]
    silent = (loudest < silence_db).astype(np.float64)
    if fade > 1:
        k = np.ones(fade) / fade
        silent = np.convolve(np.pad(silent, fade // 2, mode="edge"), k, "valid")[:n]
    return silent.astype(np.float32)


# --------------------------------------------------------------------------- pipeline

class TalkingFacePipeline:
    """Trained stages 1-3 and a reference track; `synthesize` makes the video.

    Build it with `load(checkpoints_dir)`. Attributes: `a2m_config`, `postnet_config`,
    `reference` (`ReferenceTrack`), `renderer` (`render.frames.FrameRenderer`),
    `feature_dim` (what stage 1 expects: 80 log-mel or a HuBERT width).
    """

    def __init__(self, *, a2m, postnet, head, torso, reference, hubert=None, mesh=None):
        from geneface_jax.motion.predict import MotionPredictor
        from geneface_jax.render import frames
        self.a2m_config, a2m_vars, self.a2m_run, self.std = a2m
        self.postnet_config, self.postnet_vars, self.postnet_run, _, self.identity = postnet
        head_cfg, head_vars, self.head_run, self.normalizer = head
        self.head_config = head_cfg
        torso_cfg = torso_vars = None
        self.torso_run = None
        if torso is not None:
            torso_cfg, torso_vars, self.torso_run, _ = torso
        self.reference = reference
        self.hubert = hubert
        self.feature_dim = self.a2m_config.feature_dim
        # An imported GeneFace stage 1 samples as GeneFace does (audio zero-padded to whole
        # latent frames); runs trained here use the masked padding they trained with.
        from geneface_jax.motion.predict import motion_representation
        kind = motion_representation(self.a2m_run).get("kind")
        self.predictor = MotionPredictor(
            self.a2m_config, a2m_vars,
            pad_mode="geneface" if kind == "geneface_idexp_lm3d" else "mask")
        self.window = head_cfg.smooth_window
        view = types.SimpleNamespace(intrinsics=reference.intrinsics, height=reference.height,
                                     width=reference.width,
                                     background=reference.background / np.float32(255.0))
        self.renderer = frames.FrameRenderer(
            head_cfg, head_vars, view, torso_cfg=torso_cfg, torso_vars=torso_vars,
            smooth=frames.head_smooth_enabled(head_cfg, self.head_run["trained_steps"]),
            mesh=mesh)

    # -- loading

    @classmethod
    def load(cls, checkpoints_dir, *, hubert_checkpoint=None, mesh=None):
        """Loads `audio2motion/`, `postnet/`, `head/`, `torso/` (optional) and
        `reference.npz` from `checkpoints_dir` and checks that they belong together.
        Rendering uses `mesh` (default: every device, `mesh.make_mesh()`)."""
        from geneface_jax.motion import predict
        from geneface_jax.render import frames
        root = pathlib.Path(checkpoints_dir)
        if not root.is_dir():
            raise CheckpointError(f"{root}: checkpoint directory does not exist")
        for stage in ("audio2motion", "postnet", "head"):
            if not (root / stage).is_dir():
                raise CheckpointError(f"{root}: no {stage}/ run (expected the stage "
                                      f"directories {list(STAGES)}; torso/ is optional)")
        a2m = predict.load_audio2motion(root / "audio2motion")
        postnet = predict.load_postnet(root / "postnet")
        head = frames.load_nerf(root / "head", frames.HEAD)
        torso = (frames.load_nerf(root / "torso", frames.TORSO) if (root / "torso").is_dir()
                 else None)
        _check_compatible(root, a2m, postnet, head, torso)
        ref_path = root / REFERENCE_FILE
        if ref_path.is_file():
            reference = ReferenceTrack.load(ref_path)
        else:
            data = head[2].get("data")
            if not data or not pathlib.Path(data).is_dir():
                raise CheckpointError(f"{root}: no {REFERENCE_FILE} and the head run's "
                                      f"person dataset ({data}) is not there")
            reference = ReferenceTrack.from_person(fmt.load_person(data))
        hubert = None
        if a2m[0].feature_dim != feat.N_MELS:
            if hubert_checkpoint is None:
                raise CheckpointError(
                    f"{root}/audio2motion: stage 1 takes {a2m[0].feature_dim}-d features "
                    f"(HuBERT); pass the HuBERT checkpoint it was trained with")
            from geneface_jax.audio import hubert as hb
            hubert = hb.load_hubert(hubert_checkpoint)
            if hubert[1].hidden_size != a2m[0].feature_dim:
                raise CheckpointError(f"{hubert_checkpoint}: HuBERT width "
                                      f"{hubert[1].hidden_size} != stage 1's "
                                      f"{a2m[0].feature_dim}")
        return cls(a2m=a2m, postnet=postnet, head=head, torso=torso, reference=reference,
                   hubert=hubert, mesh=mesh)

    # -- stages

    def features(self, wav):
        """Stage-1 input `[2N, C]` of 16 kHz mono audio (padded/trimmed to the frame rule)."""
        if self.hubert is None:
            return feat.log_mel(wav)
        from geneface_jax.audio import hubert as hb
        return hb.hubert_features(self.hubert[0], self.hubert[1], wav)

    def plan(self, num_frames, options: SynthesisOptions = SynthesisOptions(), log=None):
        """Per output frame: the reference-track index `[N]` (eyes with `blink=track`, the
        source frame with paste-back) and the camera-to-world pose `[N, 4, 4]`.

        `loop` / `mirror` replay the track; `static:FRAME` holds track frame FRAME; a file
        (`data.head_poses.load_pose_file`) is played back and forth over the output and
        the track loops. Poses beyond the track's rotation range are logged (`log`,
        default a logging warning) with their frames.
        """
        from geneface_jax.data import head_poses
        ref = self.reference
        spec = head_poses.parse_pose_spec(options.pose or options.pose_mode)
        if spec.kind in POSE_MODES:
            track = track_indices(num_frames, len(ref), spec.kind)
            return track, ref.poses[track]
        if spec.kind == "static":
            if spec.frame >= len(ref):
                raise InputError(f"--pose=static:{spec.frame}: the reference track has "
                                 f"{len(ref)} frames")
            track = np.full(num_frames, spec.frame, np.int64)
            return track, ref.poses[track]
        poses = head_poses.load_pose_file(spec.path, ref.poses)
        poses = poses[track_indices(num_frames, len(poses), "mirror")]
        head_poses.warn_out_of_range(poses, ref.poses, log=log)
        return track_indices(num_frames, len(ref), "loop"), poses

    def landmarks(self, features, energy, *, options: SynthesisOptions = SynthesisOptions(),
                  track=None):
        """Stages 1 and 2 plus the reference eyes and the silence gate.

        Args:
          features: `[2N, C]` stage-1 features; energy: `[2N]` hop RMS.
          track: reference indices `[N]` (default `track_indices(N, L, pose_mode)`).
        Returns:
          dict of float32 arrays: `stage1` and `postnet` `[N, 68, 3]` (head space, the
          person's identity), `landmarks` `[N, 68, 3]` (what is rendered), `silence` `[N]`,
          `blink` `[N]` (eye closure: the schedule with `auto`, zeros with `none`, NaN
          with `track`).
        """
        from geneface_jax.motion.postnet import refine_motion
        n = np.shape(features)[0] // 2
        rng = jax.random.PRNGKey(int(options.seed))
        motion = self.predictor.sample_motion(features, rng, options.temperature)
        refined = refine_motion(self.postnet_config, self.postnet_vars, motion)
        stage1 = motion.reshape(n, 68, 3) * self.std + self.identity
        post = refined.reshape(n, 68, 3) * self.std + self.identity
        track = track_indices(n, len(self.reference), options.pose_mode) if track is None \
            else np.asarray(track)
        out = post.copy()
        out[:, EYES] = self.reference.landmarks[track][:, EYES]
        closure = np.full(n, np.nan, np.float32)
        if options.blink != "track":
            from geneface_jax.data import blinks
            open_eyes, closed_eyes, _ = blinks.eye_shapes(self.reference.landmarks)
            closure = (blinks.blink_schedule(options.seed, n).closure
                       if options.blink == "auto" else np.zeros(n, np.float32))
            out = blinks.apply_closure(out, closure, open_eyes, closed_eyes)
        w = silence_weights(energy, options.silence_db)[:, None, None]
        out[:, lm.MOUTH] = w * self.reference.rest_mouth + (1 - w) * out[:, lm.MOUTH]
        return dict(stage1=stage1.astype(np.float32), postnet=post.astype(np.float32),
                    landmarks=out.astype(np.float32), silence=w[:, 0, 0], blink=closure)

    def render_frames(self, landmarks, track, *, options: SynthesisOptions = SynthesisOptions(),
                      poses=None, alpha=False):
        """Yields uint8 frame chunks `[<= frames_per_chunk, H, W, 3]` of `landmarks
        [N, 68, 3]` posed by reference frames `track [N]` (or by `poses [N, 4, 4]`); with
        `alpha`, pairs (frames, the person's opacity float32 `[.., H, W]`)."""
        from geneface_jax.render.frames import landmark_windows
        lms = self.normalizer(landmarks)
        n = len(lms)
        ref = self.reference
        poses = ref.poses[np.asarray(track)] if poses is None else np.asarray(poses)
        pixels = regions = None
        if not options.full_frame:
            if self.renderer.torso is not None:
                regions = (ref.head_region, ref.torso_region)
            elif ref.head_region.any():
                pixels = np.flatnonzero(ref.head_region.reshape(-1))
        # Frames per render call: as many as keep one call's rays under MAX_CALL_RAYS.
        traced = (ref.height * ref.width if pixels is None and regions is None
                  else len(pixels) if regions is None
                  else int(ref.head_region.sum() + ref.torso_region.sum()))
        per_call = max(1, min(options.frames_per_chunk, MAX_CALL_RAYS // max(traced, 1)))
        self.renderer.chunk = options.render_chunk
        self.renderer.set_head_samples(options.head_samples)
        for start in range(0, n, options.frames_per_chunk):
            ts = np.arange(start, min(n, start + options.frames_per_chunk))
            cond = self.renderer.condition(landmark_windows(lms, ts, self.window))
            chunk = np.empty((len(ts), ref.height, ref.width, 3), np.uint8)
            opacity = np.empty((len(ts), ref.height, ref.width), np.float32)
            for i in range(0, len(ts), per_call):
                sl = slice(i, min(len(ts), i + per_call))
                # A short last call renders a power-of-two number of frames (the last one
                # repeated), so clips of other lengths reuse the compiled renderers.
                k = sl.stop - sl.start
                take = np.minimum(np.arange(min(per_call, 1 << (k - 1).bit_length())), k - 1)
                out = self.renderer.render_many(poses[ts[sl]][take],
                                                cond[sl][take], ref.torso_pose,
                                                pixels=pixels, regions=regions)
                chunk[sl] = np.round(np.clip(out["rgb"][:k], 0.0, 1.0) * 255.0)
                if alpha:
                    a = 1.0 - (1.0 - out["head_acc"][:k]) * (
                        1.0 - out.get("torso_acc", np.zeros_like(out["head_acc"]))[:k])
                    opacity[sl] = np.clip(a, 0.0, 1.0)
            yield (chunk, opacity) if alpha else chunk

    def synthesize(self, audio_path, out_path, options: SynthesisOptions = SynthesisOptions(),
                   *, progress: Optional[Callable] = None, samples=None):
        """Audio file -> mp4 at `out_path` (25 fps, H.264, the audio muxed in as AAC).

        `samples`: the file's audio already loaded with `audio.io.load_audio` (16 kHz mono
        float32), so a caller that checked the file first does not decode it twice;
        `audio_path` then only names it in messages.

        The output is written under a temporary name and renamed when complete: on any
        error no file is left. `progress(done, total, frames_per_s)` is called after each
        chunk (default: a progress line on stderr).

        Returns:
          dict: `frames`, `seconds` (the muxed audio's duration: the input's, up to
          20 ms off the video's frames / 25), `render_fps`, `minutes`, `out`, and
          `pasted` (written in the source video's frames, `render.paste`), and the arrays
          `landmarks`, `stage1`, `postnet` `[N, 68, 3]`, `silence`, `blink` `[N]`,
          `track` `[N]`, `poses` `[N, 4, 4]`, `energy` `[2N]`.
        Raises:
          AudioError (bad audio), VideoError (unwritable output), CheckpointError.
        """
        from geneface_jax.data.video import VideoWriter
        t0 = time.time()
        raw = audio_io.load_audio(audio_path) if samples is None else samples
        raw, wav, n = clip_frames(raw, options.max_frames, audio_path)
        progress = progress or _stderr_progress
        from geneface_jax.render import paste
        track, poses = self.plan(n, options)
        source = paste.resolve(self.reference.source, options.paste_back,
                               options.source_video)
        size = ((self.reference.height, self.reference.width) if source is None
                else (source[0]["height"], source[0]["width"]))
        writer = VideoWriter(out_path, fps=feat.VIDEO_FPS, size=size, audio=raw,
                             audio_rate=feat.SAMPLE_RATE, crf=options.crf)
        scratch = tempfile.TemporaryDirectory(prefix="geneface-paste-")
        try:
            paster = frames_of = None
            if source is not None:
                record, path = source
                paster = paste.Paster(record["crop"], record["width"], record["height"],
                                      region=self.reference.render_mask)
                src_index = np.asarray(record["frames"])[track]
                frames_of = paste.SourceFrames(path, src_index, record["width"],
                                               record["height"], scratch.name)
            feats = self.features(wav)
            energy = feat.frame_energy(wav)
            res = self.landmarks(feats, energy, options=options, track=track)
            t_render = time.time()
            done = 0
            for chunk, alpha in self.render_frames(res["landmarks"], track, options=options,
                                                   poses=poses, alpha=True):
                if paster is not None:
                    chunk = np.stack([paster.paste(frames_of[src_index[done + i]], c, a)
                                      for i, (c, a) in enumerate(zip(chunk, alpha))])
                writer.write(chunk)
                done += len(chunk)
                progress(done, n, done / max(time.time() - t_render, 1e-9))
            writer.close()
        except BaseException:
            writer.abort()
            raise
        finally:
            scratch.cleanup()
        render_fps = n / max(time.time() - t_render, 1e-9)
        return dict(res, frames=n, seconds=len(raw) / feat.SAMPLE_RATE, track=track,
                    poses=poses, pasted=source is not None,
                    energy=energy, render_fps=render_fps, minutes=(time.time() - t0) / 60,
                    out=str(out_path))


def clip_frames(samples, max_frames=0, name="audio"):
    """The audio as synthesis renders it: `(samples, wav, n)`, the samples (16 kHz mono
    float32) cut to the `n` video frames rendered, and `wav` the same padded or trimmed
    to exactly 640 n samples (`audio.features.pad_or_trim`); `max_frames` > 0 renders
    only the first frames. AudioError (a clip too short) names `name`."""
    raw = np.asarray(samples, np.float32)
    try:
        wav = feat.pad_or_trim(raw)
    except AudioError as e:
        raise AudioError(f"{name}: {e}") from e
    n = len(wav) // feat.SAMPLES_PER_VIDEO_FRAME
    if max_frames:
        n = min(n, max_frames)
        wav = wav[:n * feat.SAMPLES_PER_VIDEO_FRAME]
        raw = raw[:n * feat.SAMPLES_PER_VIDEO_FRAME]
    return raw, wav, n


def _stderr_progress(done, total, fps):
    eta = (total - done) / fps if fps > 0 else float("inf")
    eta_s = f"{eta:.0f} s" if math.isfinite(eta) else "?"
    print(f"\rsynthesize: frame {done}/{total} | {fps:.2f} frames/s | ETA {eta_s}   ",
          end="\n" if done >= total else "", file=sys.stderr, flush=True)


def synthesize(audio, checkpoints, out, options: SynthesisOptions = SynthesisOptions(), *,
               hubert_checkpoint=None, save_landmarks=False, report=False, mesh=None):
    """Audio file -> talking-face mp4 with trained checkpoints: `experiments.synthesize`.

    Bad paths (no `out` directory, no `checkpoints`) and bad audio are refused before the
    models load; with `report`, missing face models too (before rendering).

    Args:
      audio: any file librosa reads; checkpoints: the stage runs' directory (module doc);
      out: the mp4 path (written under a temporary name, renamed when complete).
      options: `SynthesisOptions`; hubert_checkpoint: when stage 1 takes HuBERT features.
      save_landmarks: also write the predicted landmarks (`stage1`, `postnet`,
        `landmarks`, `silence`, `track`) to OUT.landmarks.npz.
      report: track the written video with the face tracker (`tracked_video_report`;
        for a synthetic person also against its true mouth for this audio).
      mesh: the devices rendering splits rays over (default: every device).
    Returns:
      dict: `out`, `frames`, `seconds`, `render_fps`, `minutes` (rounded), with `report`
      also `face_found`, `tracked_sync_r`, `tracked_frames` (and `tracked_oracle_r`).
    """
    out = pathlib.Path(out)
    if not out.parent.is_dir():
        raise VideoError(f"{out}: its directory {out.parent} does not exist")
    if not pathlib.Path(checkpoints).is_dir():
        raise CheckpointError(f"{checkpoints}: checkpoint directory does not exist")
    samples = audio_io.load_audio(audio)
    tracker = None
    if report:                              # missing face models fail now, not after rendering
        from geneface_jax.render import face_tracking
        tracker = face_tracking.FrameTracker()
    pipe = TalkingFacePipeline.load(checkpoints, hubert_checkpoint=hubert_checkpoint,
                                    mesh=mesh)
    res = pipe.synthesize(audio, out, options, samples=samples)
    if save_landmarks:
        with files.atomic_path(out.with_suffix(".landmarks.npz"), ".npz") as tmp:
            np.savez_compressed(tmp, **{k: res[k] for k in ("landmarks", "stage1", "postnet",
                                                            "silence", "track", "poses",
                                                            "blink")})
    summary = {"out": str(out), "frames": res["frames"], "seconds": round(res["seconds"], 3),
               "render_fps": round(res["render_fps"], 3), "minutes": round(res["minutes"], 3),
               "pasted": bool(res["pasted"])}
    if report:
        summary.update(tracked_video_report(out, res["landmarks"],
                                            _synthetic_truth(pipe, samples), tracker=tracker))
    return summary


def _synthetic_truth(pipe, samples):
    """The synthetic person's true landmarks for this audio, or None for a real person."""
    meta_path = pathlib.Path(pipe.head_run.get("data") or "") / "meta.json"
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("source") != "synthetic" or "seed" not in meta:
        return None
    from geneface_jax.data.synthetic import world
    return world.person_oracle(int(meta["seed"]), samples)["landmarks"]


def _check_compatible(root, a2m, postnet, head, torso):
    """CheckpointError unless the stage runs were trained on each other."""
    a2m_cfg, _, _, a2m_std = a2m
    pn_cfg, _, pn_run, pn_std, identity = postnet
    if pn_cfg.motion_dim != a2m_cfg.motion_dim:
        raise CheckpointError(f"{root}: post-net motion dim {pn_cfg.motion_dim} != stage 1's "
                              f"{a2m_cfg.motion_dim}")
    if np.shape(pn_std) != np.shape(a2m_std) or not np.allclose(pn_std, a2m_std, rtol=1e-5):
        raise CheckpointError(f"{root}: the post-net was trained on another stage-1 run "
                              f"(its landmark std differs from audio2motion/'s)")
    head_cfg, _, head_run, normalizer = head
    if not np.allclose(identity, normalizer.mean, atol=1e-5):
        raise CheckpointError(f"{root}: the post-net and the head NeRF were trained on "
                              f"different persons (mean landmarks differ)")
    if torso is not None:
        _, _, torso_run, torso_norm = torso
        same = (json.dumps(torso_run.get("head_model"), sort_keys=True)
                == json.dumps(head_run.get("model"), sort_keys=True)
                and np.allclose(torso_norm.mean, normalizer.mean)
                and np.isclose(torso_norm.scale, normalizer.scale))
        if not same:
            raise CheckpointError(f"{root}: the torso NeRF was trained with another head "
                                  f"model")


# --------------------------------------------------------------------------- scoring

def landmark_scores(pred, truth):
    """`lmd` / `lmd_mouth` (mean L2 over the 68 / mouth points, head units) and
    `sync_corr` (Pearson r of the mouth openings) of `pred` vs `truth` `[N, 68, 3]`."""
    pred, truth = np.asarray(pred, np.float64), np.asarray(truth, np.float64)
    n = min(len(pred), len(truth))
    pred, truth = pred[:n], truth[:n]
    dist = np.linalg.norm(pred - truth, axis=-1)
    return dict(lmd=float(dist.mean()), lmd_mouth=float(dist[:, lm.MOUTH].mean()),
                sync_corr=pearson(lm.mouth_opening(pred), lm.mouth_opening(truth)))


def mouth_boxes(landmarks, poses, intrinsics, height, width, margin=0.35, size="video"):
    """Per-frame box `[N, 4]` (x0, y0, x1, y1, pixels; pixel i spans [i, i + 1)) around
    the projected outer lips (points 48-59), grown by `margin` x the lips' box size on
    every side (room for the open jaw).

    `size="video"` (default, what the lip heuristics use): float boxes, all of one size
    (the median over the frames of the grown lip boxes, at most the image), centred on
    each frame's lip box and moved inside the image where they would cross its border;
    `mouth_pixel_activity` weights their border pixels by the share they cover, so a
    box moving by a fraction of a pixel changes its mean by a fraction too.
    `size="frame"`: each frame's own grown lip box, rounded out to whole pixels and
    clipped to the image. It grows as the mouth opens, and its extra area is skin, so the
    mean darkening in it understates the opening: on the synthetic person's ground-truth
    video of the demo's audio its r with the loudness is 0.54, with boxes of one size 0.9
    (docs/demo.md).
    """
    from geneface_jax.render import rays as rays_lib
    if size not in ("video", "frame"):
        raise ValueError(f"mouth_boxes: size must be 'video' or 'frame', got {size!r}")
    lo = np.zeros((len(landmarks), 2))
    hi = np.zeros((len(landmarks), 2))
    for t, (pts, pose) in enumerate(zip(landmarks, poses)):
        u, v, _ = rays_lib.project_points(np.asarray(pts[lm.OUTER_LIP]), pose, intrinsics)
        uv = np.stack([np.asarray(u), np.asarray(v)], axis=-1)
        grow = margin * (uv.max(0) - uv.min(0))
        lo[t], hi[t] = uv.min(0) - grow, uv.max(0) + grow
    limit = np.array([width, height], np.float64)
    if size == "frame":
        return np.concatenate([np.clip(np.floor(lo), 0, limit - 1),
                               np.clip(np.ceil(hi), 1, limit)], axis=1).astype(np.int64)
    extent = np.minimum(np.median(hi - lo, axis=0), limit)
    start = np.clip((lo + hi) / 2 - extent / 2, 0, limit - extent)
    return np.concatenate([start, start + extent], axis=1)


def _coverage(a, b, n):
    """Share of each of the `n` unit cells [i, i + 1) inside the interval [a, b]."""
    i = np.arange(n, dtype=np.float64)
    return np.clip(np.minimum(i + 1, b) - np.maximum(i, a), 0.0, 1.0)


def mouth_pixel_activity(frames, boxes):
    """How far each frame's mouth region has darkened: `[N]` = (mean luminance of all
    frames' mouth regions) - (this frame's), luminance in [0, 1] (BT.709 weights) averaged
    over the box `[N, 4]` (x0, y0, x1, y1; `mouth_boxes`), border pixels weighted by the
    share of them inside it. An opening mouth shows the dark cavity, so this rises with
    the opening."""
    lum = []
    boxes = np.asarray(boxes, np.float64)
    for img, (x0, y0, x1, y1) in zip(frames, boxes):     # frames may be a generator
        r0, r1 = int(np.floor(y0)), int(np.ceil(y1))
        c0, c1 = int(np.floor(x0)), int(np.ceil(x1))
        patch = np.asarray(img[r0:r1, c0:c1], np.float64) / 255.0
        wy = _coverage(y0 - r0, y1 - r0, r1 - r0)
        wx = _coverage(x0 - c0, x1 - c0, c1 - c0)
        w = wy[:, None] * wx[None, :]
        lum.append(float(np.sum(w * (patch @ np.array([0.2126, 0.7152, 0.0722])))
                         / np.sum(w)))
    lum = np.asarray(lum)
    return lum.mean() - lum


def frame_energy_db(energy, floor_db=-60.0):
    """Per-video-frame loudness `[N]` in dBFS from hop RMS energies `[2N]`, floored."""
    rms = feat.video_frame_rms(np.asarray(energy, np.float64))
    return np.maximum(20 * np.log10(rms + 1e-12), floor_db)


def lip_energy_correlation(video_path, landmarks, poses, intrinsics, energy, box_size="video"):
    """Pearson r between the mouth-region darkening of the decoded `video_path` (boxes
    from the rendered `landmarks [N, 68, 3]` and their `poses [N, 4, 4]`, `mouth_boxes`
    with `size=box_size`) and the audio loudness per frame (`frame_energy_db(energy
    [2N])`)."""
    from geneface_jax.data.video import probe_video, read_video
    info = probe_video(video_path)
    h, w = info["height"], info["width"]
    boxes = mouth_boxes(landmarks, poses, intrinsics, h, w, size=box_size)
    act = mouth_pixel_activity(read_video(video_path), boxes)
    return pearson(act, frame_energy_db(energy)[:len(act)])


def tracked_video_report(video_path, landmarks, truth=None, *, tracker=None, chunk=100):
    """What a face tracker sees in a synthesized video (`render.face_tracking`).

    The video is decoded and tracked `chunk` frames at a time (memory stays flat in its
    length); each frame's tracked inner-lip opening is correlated with the mouth opening of
    the landmarks that drove the renderer and, when given, with a ground truth.

    Args:
      video_path: the mp4 `synthesize` wrote.
      landmarks: `[N, 68, 3]` the rendered landmarks (`synthesize(...)["landmarks"]`).
      truth: optional `[N, 68, 3]` ground-truth landmarks for the same audio (the
        synthetic person's oracle).
      tracker: a `face_tracking.FrameTracker` (default: a new one; needs the face models).
    Returns:
      dict(face_found, tracked_sync_r[, tracked_oracle_r], tracked_frames).
    """
    from geneface_jax.data.video import read_video
    from geneface_jax.render import face_tracking as ft
    tracker = tracker or ft.FrameTracker()
    points, found, batch = [], [], []

    def flush():
        if batch:
            pts, ok = tracker.track(np.stack(batch))
            points.append(pts)
            found.append(ok)
            batch.clear()

    for frame in read_video(video_path):
        batch.append(frame)
        if len(batch) == chunk:
            flush()
    flush()
    points, found = np.concatenate(points), np.concatenate(found)
    n = min(len(found), len(landmarks))
    opening = ft.inner_lip_opening(points[:n])
    ok = found[:n]

    def r(reference):
        return (pearson(opening[ok], lm.mouth_opening(reference[:n])[ok])
                if ok.sum() >= 3 else float("nan"))

    out = dict(face_found=float(found.mean()), tracked_sync_r=r(np.asarray(landmarks)),
               tracked_frames=int(len(found)))
    if truth is not None:
        out["tracked_oracle_r"] = r(np.asarray(truth))
    return out


def darkening_vs_truth(rendered, truth, opening, poses):
    """How a render's mouth darkening `[N]` (`mouth_pixel_activity`) differs from the
    truth's `[N]` for the same mouth openings `[N]` and camera poses `[N, 4, 4]`:
    `slope` / `truth_slope` (least-squares darkening per unit of opening: does the
    rendered mouth darken as much as it opens), `residual_std` (std of rendered - truth,
    luminance in [0, 1]) and `residual_pose_r2` (the share of that residual's variance a
    linear fit on the pose's 12 rotation and translation entries explains: an error that
    follows the head pose rather than the mouth)."""
    rendered, truth = np.asarray(rendered, np.float64), np.asarray(truth, np.float64)
    opening = np.asarray(opening, np.float64)
    resid = rendered - truth
    x = np.concatenate([np.asarray(poses, np.float64)[:, :3].reshape(len(resid), 12),
                        np.ones((len(resid), 1))], axis=1)
    coef = np.linalg.lstsq(x, resid, rcond=None)[0]
    total = float(np.sum((resid - resid.mean()) ** 2))
    r2 = 1.0 - float(np.sum((resid - x @ coef) ** 2)) / total if total > 0 else 0.0
    return dict(slope=float(np.polyfit(opening, rendered, 1)[0]),
                truth_slope=float(np.polyfit(opening, truth, 1)[0]),
                residual_std=float(resid.std()), residual_pose_r2=r2)


def lip_sync_breakdown(pipe, wav, oracle_landmarks, *,
                       options: SynthesisOptions = SynthesisOptions(), own_frames=50,
                       tracker=None, truth_frames=None):
    """Where lip sync is lost: audio -> landmarks -> rendered mouth pixels.

    Renders (no video file) the predicted landmarks of `wav` (16 kHz mono) and the
    ground-truth `oracle_landmarks [N, 68, 3]` of the same audio (the synthetic person's,
    `world.person_oracle`; eyes replaced by the reference track's, as in synthesis), and
    the first `own_frames` frames of the person's own reference track.

    Returns:
      dict: for `predicted` and `oracle`: `pixels_energy` (r of the mouth-region darkening
      with the loudness in dB: `lip_energy_corr`), `pixels_opening` (darkening vs the
      rendered landmarks' mouth opening: how faithfully the NeRF draws the mouth),
      `opening_energy` (opening vs loudness); `reference_pixels_opening` (the same NeRF
      on the person's own landmarks and poses); `frames`. With a `tracker`
      (`render.face_tracking.FrameTracker`) also, per rendering, `face_found` and
      `tracked_opening` (r of the tracked inner-lip opening with the rendered landmarks'
      opening: what a viewer sees of the mouth the landmarks ask for), and
      `reference_tracked_opening`. With `truth_frames` (uint8 `[N, H, W, 3]`: the person's
      ground-truth video of the same audio along the same reference track, e.g.
      `world.person_saying`), `truth`: its `pixels_energy` and `pixels_opening` (mouth
      boxes from the oracle landmarks): what the pixel heuristic gives the truth itself;
      and `darkening_vs_truth` of the oracle's renders against it.
    """
    wav = feat.pad_or_trim(np.asarray(wav, np.float32))
    n = len(wav) // feat.SAMPLES_PER_VIDEO_FRAME
    if options.max_frames:
        n = min(n, options.max_frames)
        wav = wav[:n * feat.SAMPLES_PER_VIDEO_FRAME]
    oracle = np.array(oracle_landmarks[:n], np.float32)
    if oracle.shape != (n, 68, 3):
        raise ShapeError(f"oracle landmarks must be [{n}, 68, 3], got {oracle.shape}")
    ref = pipe.reference
    energy = feat.frame_energy(wav)
    loud = frame_energy_db(energy)[:n]
    track = track_indices(n, len(ref), options.pose_mode)
    res = pipe.landmarks(pipe.features(wav), energy, options=options, track=track)
    oracle[:, EYES] = ref.landmarks[track][:, EYES]

    def rendered(landmarks, frames_track):
        """(mouth-region darkening per frame, tracker figures or {}) of the renders."""
        frames = np.concatenate(list(pipe.render_frames(landmarks, frames_track,
                                                        options=options)))
        boxes = mouth_boxes(landmarks, ref.poses[frames_track], ref.intrinsics,
                            ref.height, ref.width)
        tracked = {}
        if tracker is not None:
            from geneface_jax.render import face_tracking
            s = face_tracking.tracked_sync(frames, lm.mouth_opening(landmarks), tracker)
            tracked = dict(face_found=s["face_found"], tracked_opening=s["r"])
        return mouth_pixel_activity(frames, boxes), tracked

    out = dict(frames=n)
    truth_act = None
    if truth_frames is not None:
        truth_frames = np.asarray(truth_frames)
        if truth_frames.shape != (n, ref.height, ref.width, 3):
            raise ShapeError(f"truth frames must be [{n}, {ref.height}, {ref.width}, 3], got "
                             f"{truth_frames.shape}")
        truth_act = mouth_pixel_activity(truth_frames, mouth_boxes(
            oracle, ref.poses[track], ref.intrinsics, ref.height, ref.width))
        out["truth"] = dict(pixels_energy=pearson(truth_act, loud),
                            pixels_opening=pearson(truth_act, lm.mouth_opening(oracle)))
    for name, lms in (("predicted", res["landmarks"]), ("oracle", oracle)):
        (act, tracked), opening = rendered(lms, track), lm.mouth_opening(lms)
        out[name] = dict(pixels_energy=pearson(act, loud), pixels_opening=pearson(act, opening),
                         opening_energy=pearson(opening, loud), **tracked)
        if name == "oracle" and truth_act is not None:
            out["truth"].update(darkening_vs_truth(act, truth_act, opening,
                                                   ref.poses[track]))
    own = np.arange(min(own_frames, len(ref)))
    act, tracked = rendered(ref.landmarks[own], own)
    out["reference_pixels_opening"] = pearson(act, lm.mouth_opening(ref.landmarks[own]))
    if tracked:
        out["reference_tracked_opening"] = tracked["tracked_opening"]
    return out
