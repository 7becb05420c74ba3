"""The synthetic talking-head world: a target person video dataset and a speaker corpus.

`make_person` and `make_corpus` are pure functions of their arguments (a seed, sizes and
the shipped speech clips): the same seed gives byte-identical datasets. They return the
arrays of the on-disk formats in `geneface_jax.data.format`; `write_*` helpers save them.
"""

import numpy as np
import tqdm

from geneface_jax.audio import features as feat
from geneface_jax.data import format as fmt
from geneface_jax.data.head_space import camera_to_world
from geneface_jax.data import landmarks as lm_topology
from geneface_jax.data.synthetic import face as face_lib
from geneface_jax.data.synthetic import oracle
from geneface_jax.data.synthetic import raster
from geneface_jax.data.synthetic import speech
from geneface_jax.errors import DatasetError

CAMERA_DISTANCE = 0.6                       # head centre to camera (head units)
HEAD_REST = np.array([0.0, 0.025, -CAMERA_DISTANCE])   # rest head translation, camera frame
# Ray bounds of the NeRFs (camera depth, head units), measured on the geometry as real
# preprocessing measures them per person: every visible surface (nose tip to the back of
# the shoulders, every pose of seed 0, mouth open) lies in [0.49, 0.65]; GeneFace's generic
# defaults are 0.3 / 0.9.
NEAR, FAR = 0.4, 0.8
FOCAL_PER_PIXEL = 1.6                       # focal length / image size
TORSO_FOLLOW = 0.35                         # torso translation / head translation
# The target person's own articulation style (outside the corpus' mixture): wide, smiling.
TARGET_STYLE = oracle.Style(mode=-1, gain=1.1, width_gain=1.5, smile=0.003, rest_width=1.1)


def _streams(seed, tag, n):
    return [np.random.default_rng(s) for s in np.random.SeedSequence([seed, tag]).spawn(n)]


def intrinsics_for(size):
    """Pinhole intrinsics (fx, fy, cx, cy) in pixels of the synthetic camera."""
    f = FOCAL_PER_PIXEL * size
    return np.array([f, f, size / 2.0, size / 2.0], np.float32)


def _articulation(wav, style, blink):
    f = feat.compute_features(wav)
    cues = oracle.speech_cues(f["mel"], f["energy"])
    artic = oracle.articulate(cues, style)
    artic["blink"] = blink
    return f, cues, artic


def _scene(r_pose, r_bg, num_frames, size, static_pose=False):
    """The person video's head rotations `[T, 3, 3]`, head and torso translations `[T, 3]`,
    intrinsics and background, from its pose and background streams."""
    angles, shift = oracle.head_motion(r_pose, num_frames)
    if static_pose:
        angles, shift = (np.broadcast_to(a[:1], a.shape).copy() for a in (angles, shift))
    rot = oracle.rotation_matrix(angles[:, 0], angles[:, 1], angles[:, 2])
    trans = HEAD_REST + shift
    torso_trans = HEAD_REST + TORSO_FOLLOW * shift
    return rot, trans, torso_trans, intrinsics_for(size), raster.make_background(r_bg, size,
                                                                                 size)


def _render_frames(shape, artic, scene, pose_index, supersample, progress, desc):
    """uint8 frames `[N, H, W, 3]` and mask labels `[N, H, W]`: frame t shows the
    articulation `artic[...][t]` in the head pose of the scene's (`_scene`) frame
    `pose_index[t]`, N = len(pose_index)."""
    rot, trans, torso_trans, k, background = scene
    size = background.shape[0]
    frames = np.zeros((len(pose_index), size, size, 3), np.uint8)
    masks = np.zeros((len(pose_index), size, size), np.uint8)
    for t in tqdm.trange(len(pose_index), desc=desc, unit="frame", disable=not progress,
                         leave=False):
        frame = {key: float(artic[key][t]) for key in ("open", "width", "smile", "blink")}
        i = pose_index[t]
        rgb, labels = raster.render_frame(shape, frame, rot[i], trans[i], torso_trans[i], k,
                                          background, supersample)
        frames[t] = np.round(rgb * 255).astype(np.uint8)
        masks[t] = labels
    return frames, masks


def make_person(seed, *, size=128, num_frames=250, speech_dir=None, supersample=2,
                valid_fraction=0.1, progress=True, static_pose=False, blinks=True):
    """Generates the target person's video dataset.

    Args:
      seed: integer seed; the same seed gives byte-identical output.
      size: image height and width in pixels.
      num_frames: number of 25-fps frames (the audio lasts num_frames / 25 s).
      speech_dir: directory of speech clips (default: the packaged clips, or
        `$GENEFACE_SPEECH_DIR`).
      supersample: s x s rays per pixel in the ground-truth renderer.
      valid_fraction: the last fraction of frames forms the 'valid' split.
      progress: show a progress bar while rendering.
      static_pose: hold the head (and torso) in the first frame's pose throughout; the
        person, speech, mouth and blinks are the same as without it.
      blinks: False holds the eyes open throughout (everything else unchanged).
    Returns:
      (arrays, meta, wav) as taken by `format.write_person`.
    """
    if size < 16 or num_frames < 2:
        raise DatasetError(f"person dataset needs size >= 16 and frames >= 2, got "
                           f"size={size}, frames={num_frames}")
    r_face, r_speech, r_blink, r_pose, r_bg = _streams(seed, 1, 5)
    shape = face_lib.sample_face_shape(r_face)
    clips = speech.load_clips(speech_dir)
    voice = r_speech.uniform(-2.0, 2.0)
    wav = speech.make_speech(clips, r_speech, num_frames * feat.SAMPLES_PER_VIDEO_FRAME,
                             pitch_semitones=(voice - 0.5, voice + 0.5))
    blink = oracle.blinks(r_blink, num_frames)
    if not blinks:
        blink = np.zeros_like(blink)
    f, _, artic = _articulation(wav, TARGET_STYLE, blink)
    rot, trans, torso_trans, k, background = _scene(r_pose, r_bg, num_frames, size,
                                                    static_pose)
    background_u8 = np.round(background * 255).astype(np.uint8)
    frames, masks = _render_frames(shape, artic, (rot, trans, torso_trans, k, background),
                                   np.arange(num_frames), supersample, progress,
                                   "rendering person")
    lms = face_lib.landmarks_3d(shape, artic)
    lms_cam = np.einsum("tij,tkj->tki", rot, lms) + trans[:, None]
    lms_2d = raster.project(lms_cam, k).astype(np.float32)
    mean, std = fmt.landmark_stats(lms)
    n_train = max(1, int(round(num_frames * (1.0 - valid_fraction))))
    arrays = dict(
        frames=frames, masks=masks, background=background_u8, landmarks=lms,
        landmarks_2d=lms_2d, poses=camera_to_world(rot, trans).astype(np.float32),
        face_rect=lm_topology.face_rectangle(lms_2d, size), blink=blink.astype(np.float32),
        mel=f["mel"].astype(np.float32), energy=f["energy"].astype(np.float32),
        landmark_mean=mean, landmark_std=std,
        oracle_open=artic["open"], oracle_width=artic["width"], oracle_smile=artic["smile"])
    meta = dict(source="synthetic", seed=int(seed), intrinsics=[float(v) for v in k],
                near=NEAR, far=FAR, feature="logmel80", camera="opengl",
                splits=dict(train=[0, n_train], valid=[n_train, num_frames]))
    return arrays, meta, wav


def person_oracle(seed, wav):
    """Ground truth of the target person of `make_person(seed)` saying `wav`.

    What the synthetic person would do for any 16 kHz mono audio `wav [n]` (eyes open):
    the articulation oracle with the person's style on its face shape. Used to score
    generated videos (`experiments.demo`).

    Returns:
      dict: `landmarks` float32 `[N, 68, 3]` (head space), `open`, `width`, `activity`
      `[N]` (N = num_video_frames(n)).
    """
    shape = face_lib.sample_face_shape(_streams(seed, 1, 5)[0])
    wav = feat.pad_or_trim(np.asarray(wav, np.float32))
    num = len(wav) // feat.SAMPLES_PER_VIDEO_FRAME
    _, cues, artic = _articulation(wav, TARGET_STYLE, np.zeros(num, np.float32))
    return dict(landmarks=face_lib.landmarks_3d(shape, artic), open=artic["open"],
                width=artic["width"], activity=cues["activity"])


def person_saying(seed, wav, track, *, size=128, num_frames=250, supersample=2,
                  progress=False):
    """The ground-truth video of the target person of `make_person(seed, size=size,
    num_frames=num_frames)` saying `wav` (16 kHz mono) with its eyes open: frame t shows
    `person_oracle(seed, wav)`'s articulation at t in the head pose (and over the
    background) of the person's own frame `track[t]`, i.e. what the person would look
    like saying this audio along a synthesis's reference track
    (`pipeline.track_indices`). Used to score renders of new audio against the truth
    (`experiments.lip_breakdown`).

    Returns: uint8 frames `[len(track), size, size, 3]`.
    """
    track = np.asarray(track, np.int64)
    wav = feat.pad_or_trim(np.asarray(wav, np.float32))
    num = len(wav) // feat.SAMPLES_PER_VIDEO_FRAME
    if track.ndim != 1 or len(track) > num or (len(track) and (
            track.min() < 0 or track.max() >= num_frames)):
        raise DatasetError(f"person_saying: track must be at most {num} indices into the "
                           f"person's {num_frames} frames, got shape {track.shape}")
    r_face, _, _, r_pose, r_bg = _streams(seed, 1, 5)
    shape = face_lib.sample_face_shape(r_face)
    _, _, artic = _articulation(wav, TARGET_STYLE, np.zeros(num, np.float32))
    scene = _scene(r_pose, r_bg, num_frames, size)
    return _render_frames(shape, artic, scene, track, supersample, progress,
                          "rendering the truth")[0]


def make_corpus(seed, *, num_utterances=200, num_speakers=20, held_out_speakers=3,
                seconds=(2.0, 5.0), valid_fraction=0.1, speech_dir=None, progress=True):
    """Generates a multi-speaker audio->motion corpus.

    Each speaker has a face shape, a voice (pitch offset) and its own weights over the
    style mixture; each utterance draws a style. The last `held_out_speakers` speakers
    form the 'test' split; `valid_fraction` of the other speakers' utterances form 'valid'.

    Returns:
      (arrays, meta) as taken by `format.write_corpus`.
    """
    if num_utterances < 1 or num_speakers < 1 or not 0 <= held_out_speakers < num_speakers:
        raise DatasetError(f"corpus needs utterances >= 1 and 0 <= held_out_speakers < "
                           f"speakers, got {num_utterances}, {held_out_speakers}, "
                           f"{num_speakers}")
    r_spk, r_assign, r_utt = _streams(seed, 2, 3)
    base_w = np.array([m[0] for m in oracle.STYLE_MODES])
    speakers = [dict(shape=face_lib.sample_face_shape(r_spk),
                     weights=r_spk.dirichlet(20.0 * base_w),
                     rest_width=r_spk.uniform(0.92, 1.06), voice=r_spk.uniform(-3.0, 3.0))
                for _ in range(num_speakers)]
    order = np.arange(num_utterances) % num_speakers
    speaker_of = r_assign.permutation(order)
    clips = speech.load_clips(speech_dir)
    keys = ("mel", "energy", "landmarks", "audio", "oracle_open", "oracle_width",
            "oracle_smile", "oracle_blink")
    parts = {key: [] for key in keys}
    index, modes = [], []
    start = 0
    utt_rngs = [np.random.default_rng(s)
                for s in np.random.SeedSequence([seed, 3]).spawn(num_utterances)]
    for i in tqdm.trange(num_utterances, desc="building corpus", unit="utt",
                         disable=not progress, leave=False):
        rng = utt_rngs[i]
        spk = speakers[speaker_of[i]]
        num = int(round(rng.uniform(*seconds) * feat.VIDEO_FPS))
        wav = speech.make_speech(clips, rng, num * feat.SAMPLES_PER_VIDEO_FRAME,
                                 pitch_semitones=(spk["voice"] - 1.0, spk["voice"] + 1.0))
        style = oracle.sample_style(rng, spk["weights"], spk["rest_width"])
        f, _, artic = _articulation(wav, style, oracle.blinks(rng, num))
        lms = face_lib.landmarks_3d(spk["shape"], artic)
        parts["mel"].append(f["mel"])
        parts["energy"].append(f["energy"])
        parts["landmarks"].append(lms)
        parts["audio"].append(np.round(np.clip(wav, -1, 1) * 32767).astype(np.int16))
        for key in ("open", "width", "smile", "blink"):
            parts["oracle_" + key].append(artic[key].astype(np.float32))
        if speaker_of[i] >= num_speakers - held_out_speakers:
            split = 2
        else:
            split = 1 if rng.uniform() < valid_fraction else 0
        index.append((speaker_of[i], start, num, split))
        modes.append(style.mode)
        start += num
    arrays = {key: np.concatenate(v) for key, v in parts.items()}
    arrays["utterances"] = np.array(index, np.int64)
    arrays["style_mode"] = np.array(modes, np.int64)
    train_frames = np.concatenate([
        arrays["landmarks"][s:s + n] for _, s, n, sp in index if sp == 0])
    arrays["landmark_mean"], arrays["landmark_std"] = fmt.landmark_stats(train_frames)
    meta = dict(source="synthetic", seed=int(seed), feature="logmel80",
                held_out_speakers=list(range(num_speakers - held_out_speakers, num_speakers)))
    return arrays, meta
