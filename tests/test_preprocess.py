"""Real-data preprocessing on a real face: the astronaut photograph with its mouth warped
open/closed on a known schedule and known in-plane rotations (tests/realface.py), encoded
to mp4 with speech. The face models are MediaPipe's, run through LiteRT; they must have
been fetched (`python -m geneface_jax.data.face_models --fetch`, part of the test
command)."""

import json
import zipfile

import numpy as np
import pytest

from geneface_jax.data.synthetic import realface
from conftest import run_module
from geneface_jax.data import face_models
from geneface_jax.data import format as fmt
from geneface_jax.data import landmarks as lm
from geneface_jax.data import lrs3
from geneface_jax.data import preprocess as pp
from geneface_jax.data import video as video_io
from geneface_jax.errors import VideoError

CFG = pp.PreprocessConfig(size=128, min_frames=25)


def test_reference_face_is_the_synthetic_average_face():
    """Real data's head space is anchored to a stored table (`data.head_space`), so that
    preprocessing needs nothing from the synthetic world; the table is that world's
    average neutral face (16 faces, seed 0) exactly."""
    from geneface_jax.data.synthetic import face as face_lib
    rng = np.random.default_rng(0)
    neutral = dict(open=np.zeros(1), width=np.ones(1), smile=np.zeros(1), blink=np.zeros(1))
    shapes = [face_lib.landmarks_3d(face_lib.sample_face_shape(rng), neutral)[0]
              for _ in range(16)]
    np.testing.assert_array_equal(pp.mean_face_shape(),
                                  np.mean(shapes, axis=0).astype(np.float64))


@pytest.fixture(scope="module")
def models():
    for name in face_models.MODELS:
        face_models.model_path(name)      # a clear ModelError (with the command) if missing
    return face_models.models_dir()


@pytest.fixture(scope="module")
def talking(models, tmp_path_factory, speech_dir):
    """(video path, generator truth, dataset dir, summary) of a 4 s talking photo."""
    root = tmp_path_factory.mktemp("realface")
    video = root / "astronaut.mp4"
    truth = realface.make_talking_photo(video, seconds=4.0, size=256,
                                        speech=speech_dir / "en_us_male.wav")
    out = root / "dataset"
    summary = pp.preprocess_video(video, out, CFG, progress=False)
    return video, truth, out, summary


def test_dataset_is_complete_and_aligned(talking):
    video, truth, out, summary = talking
    ds = fmt.load_person(out)                    # validates every array and size
    n = truth["num_frames"]
    assert ds.num_frames == n == summary["frames"]
    assert ds.meta["source"] == "video" and ds.meta["height"] == ds.meta["width"] == 128
    assert len(ds.audio()) == 640 * n and ds["mel"].shape == (2 * n, 80)
    assert summary["face_found"] == n and summary["interpolated"] == []
    # a photograph rolled in its own plane carries no perspective cue: the focal length is
    # not observable and GeneFace's default is used (and said)
    assert summary["focal_source"] == "default" and ds.meta["focal_source"] == "default"
    np.testing.assert_allclose(ds.meta["intrinsics"][0], pp.GENEFACE_FOCAL * 128)
    # the projected head-space landmarks land where the mesh saw them (pose + focal fit)
    ear = lm.eye_aspect_ratio(ds["landmarks_2d"])
    assert np.all((ear > 0.05) & (ear < 0.6))
    pose = np.asarray(ds["poses"])
    rot = pose[:, :3, :3]
    np.testing.assert_allclose(rot @ np.swapaxes(rot, 1, 2), np.broadcast_to(np.eye(3), rot.shape),
                               atol=1e-5)
    depth = np.einsum("nji,nj->ni", rot, pose[:, :3, 3])[:, 2]   # head origin depth, -t_z
    assert ds.meta["near"] < depth.min() and depth.max() < ds.meta["far"]


def test_mouth_opening_follows_the_schedule(talking):
    _, truth, out, _ = talking
    ds = fmt.load_person(out)
    opening = lm.mouth_opening(ds["landmarks"]) / lm.mouth_width(ds["landmarks"])
    r = np.corrcoef(opening, truth["open"])[0, 1]
    assert r >= 0.9, r


def test_recovered_roll_matches_the_applied_roll(talking):
    _, truth, out, _ = talking
    ds = fmt.load_person(out)
    rot = np.swapaxes(np.asarray(ds["poses"])[:, :3, :3], 1, 2)      # head-to-camera
    roll = pp.roll_degrees(rot)
    applied = truth["roll_deg"] - truth["roll_deg"][0]
    err = np.abs(roll - applied)
    assert err.mean() <= 2.0, (err.mean(), err.max())


def test_masks_cover_the_face(talking):
    _, _, out, _ = talking
    ds = fmt.load_person(out)
    masks = np.asarray(ds["masks"])
    pts = np.floor(np.asarray(ds["landmarks_2d"])).astype(int)
    inner = np.concatenate([np.arange(17, 68)])        # brows, nose, eyes, lips
    rows = np.clip(pts[:, inner, 1], 0, 127)
    cols = np.clip(pts[:, inner, 0], 0, 127)
    labels = masks[np.arange(len(masks))[:, None], rows, cols]
    assert (labels == fmt.HEAD).mean() >= 0.99
    assert (masks == fmt.TORSO).sum((1, 2)).min() > 0          # the shoulders are torso
    # the background never shows the face: its colour differs from the frame's face
    x0, y0, x1, y1 = np.asarray(ds["face_rect"])[0]
    face = np.asarray(ds["frames"])[0, y0:y1, x0:x1].astype(float)
    bg = np.asarray(ds["background"])[y0:y1, x0:x1].astype(float)
    assert np.abs(face - bg).mean() > 20


def test_rerun_is_deterministic(talking, tmp_path):
    video, _, out, _ = talking
    again = tmp_path / "again"
    pp.preprocess_video(video, again, CFG, progress=False)
    a, b = fmt.load_person(out), fmt.load_person(again)
    for name in fmt.PERSON_ARRAYS:
        np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]), err_msg=name)


def test_mesh_mapping_is_mirror_symmetric(models):
    from skimage import data
    img = data.astronaut()
    tracker = pp.FaceTracker()
    pts = face_models.mesh_to_68(tracker(img))[:, :2]
    # left/right pairs of the 68-point topology
    pairs = [(0, 16), (3, 13), (6, 10), (17, 26), (19, 24), (21, 22), (31, 35), (36, 45),
             (39, 42), (37, 44), (41, 46), (48, 54), (50, 52), (58, 56), (60, 64)]
    axis = pts[[27, 28, 29, 30, 33, 51, 57, 8]]            # points on the midline
    centre_u = np.median(axis[:, 0])
    face_w = pts[16, 0] - pts[0, 0]
    for a, b in pairs:
        assert pts[a, 0] < centre_u < pts[b, 0], (a, b)     # right side is image-left
        mid = (pts[a, 0] + pts[b, 0]) / 2
        assert abs(mid - centre_u) < 0.12 * face_w, (a, b, mid, centre_u)


def test_similarity_fit_recovers_a_known_transform():
    rng = np.random.default_rng(0)
    src = rng.normal(size=(5, 30, 3))
    q, _ = np.linalg.qr(rng.normal(size=(5, 3, 3)))
    q *= np.sign(np.linalg.det(q))[:, None, None]
    s = rng.uniform(0.5, 3, size=5)
    t = rng.normal(size=(5, 3))
    dst = s[:, None, None] * np.einsum("nij,nkj->nki", q, src) + t[:, None]
    s2, q2, t2 = pp.similarity_fit(src, dst)
    np.testing.assert_allclose(s2, s, rtol=1e-9)
    np.testing.assert_allclose(q2, q, atol=1e-9)
    np.testing.assert_allclose(t2, t, atol=1e-9)


def _posed_views(ratio, size=256, n=80, yaw=25.0, pitch=10.0, noise=0.2, seed=0):
    """Mesh-like points `[n, 68, 3]` of the mean face seen by a pinhole camera with focal
    `ratio * size` while the head turns: perspective (u, v) plus 0.2 px noise and the
    weak-perspective depth a face mesh reports (pixels, nearer = smaller)."""
    from geneface_jax.data.synthetic import oracle
    rng = np.random.default_rng(seed)
    shape = pp.mean_face_shape()
    t = np.arange(n)
    rot = oracle.rotation_matrix(np.radians(yaw) * np.sin(t / 9.0),
                                 np.radians(pitch) * np.sin(t / 7.0 + 1),
                                 np.radians(4.0) * np.sin(t / 11.0))
    f, c = ratio * size, size / 2
    d = f * 0.17 / 90                                    # the face ~90 px wide
    trans = np.stack([0.01 * np.sin(t / 5.0), 0.01 * np.cos(t / 6.0),
                      -d * (1 + 0.05 * np.sin(t / 8.0))], -1)
    cam = np.einsum("nij,kj->nki", rot, shape) + trans[:, None]
    uv = np.stack([f * cam[..., 0] / -cam[..., 2] + c, -f * cam[..., 1] / -cam[..., 2] + c], -1)
    uv += rng.normal(0, noise, uv.shape)
    z = (-cam[..., 2] - d) * f / d
    return np.concatenate([uv, z[..., None]], -1)


@pytest.mark.parametrize("ratio", [1.2, 1.6, 2.34])
def test_focal_length_is_estimated_from_head_motion(ratio):
    fit = pp.fit_head_pose(_posed_views(ratio), 256)
    assert fit["focal_source"] == "estimated"
    assert abs(fit["focal"] / ratio - 1) < 0.05, fit["focal"]
    # and the poses it gives reproject the points
    err = np.abs(fit["landmarks_2d"] - _posed_views(ratio)[..., :2]).mean()
    assert err < 1.0, err


def test_focal_length_falls_back_when_unobservable():
    fit = pp.fit_head_pose(_posed_views(1.6, yaw=0.0, pitch=0.0), 256)   # frontal, still
    assert fit["focal_source"] == "default" and fit["focal"] == pp.GENEFACE_FOCAL
    fixed = pp.fit_head_pose(_posed_views(1.6), 256, pp.PreprocessConfig(focal=3.0))
    assert fixed["focal_source"] == "flag" and fixed["intrinsics"][0] == 3.0 * 256


def test_short_gaps_are_interpolated_long_gaps_refused():
    pts = np.arange(10, dtype=np.float32)[:, None, None] * np.ones((10, 468, 3), np.float32)
    found = np.ones(10, bool)
    found[[3, 4]] = False
    found[0] = False
    filled, gaps = pp._fill_gaps(pts, found, 2, "clip.mp4")
    assert gaps == [(0, 0), (3, 4)]
    np.testing.assert_allclose(filled[3:5, 0, 0], [3, 4])      # linear between 2 and 5
    np.testing.assert_allclose(filled[0, 0, 0], 1)             # the nearest found frame
    with pytest.raises(VideoError, match="frames 3-4"):
        pp._fill_gaps(pts, found, 1, "clip.mp4")
    with pytest.raises(VideoError, match="no face"):
        pp._fill_gaps(pts, np.zeros(10, bool), 5, "clip.mp4")


def _noise_video(path, frames, audio=True, seed=0):
    rng = np.random.default_rng(seed)
    smooth = rng.integers(0, 255, size=(1, 8, 8, 3)).repeat(16, 1).repeat(16, 2)
    clip = np.repeat(smooth, frames, 0).astype(np.uint8)
    wav = 0.1 * np.sin(np.arange(frames * 640) / 10.0).astype(np.float32) if audio else None
    video_io.write_video(path, clip, audio=wav)
    return path


@pytest.mark.parametrize("case,match", [
    ("not_video", "not a readable video"),
    ("no_audio", "no audio track"),
    ("no_face", "no face found"),
    ("too_short", "only 10 frames"),
])
def test_bad_videos_are_refused_and_leave_nothing(models, tmp_path, case, match):
    src = tmp_path / "in.mp4"
    if case == "not_video":
        src.write_text("this is not a video")
    elif case == "no_audio":
        frames = np.stack([realface.render_frame(0.0, 0.0, 128)] * 30)
        video_io.write_video(src, frames)
    elif case == "no_face":
        _noise_video(src, 30)
    else:
        frames = np.stack([realface.render_frame(0.0, 0.0, 128)] * 10)
        video_io.write_video(src, frames, audio=np.zeros(6400, np.float32))
    out = tmp_path / "out"
    with pytest.raises(VideoError, match=match):
        pp.preprocess_video(src, out, CFG, progress=False)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [src]           # no scratch or temp directory left


def test_cli_refuses_with_one_line_and_no_output(models, tmp_path):
    src = tmp_path / "notes.mp4"
    src.write_text("not a video")
    p = run_module("experiments.make_dataset", "--kind=video", f"--video={src}",
                   f"--out={tmp_path / 'ds'}", check=False)
    assert p.returncode == 2
    errors = [l for l in p.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "not a readable video" in errors[0], p.stderr[-2000:]
    assert "Traceback" not in p.stderr and not (tmp_path / "ds").exists()


def test_model_files_are_checked(tmp_path):
    with pytest.raises(face_models.ModelError, match="--fetch"):
        face_models.model_path("face_landmark", tmp_path)
    (tmp_path / "face_landmark.tflite").write_bytes(b"garbage")
    with pytest.raises(face_models.ModelError, match="corrupt"):
        face_models.model_path("face_landmark", tmp_path)
    fake = tmp_path / "mediapipe-0.10.21-fake.whl"
    with zipfile.ZipFile(fake, "w") as z:
        for inner, _ in face_models.MODELS.values():
            z.writestr(inner, b"not the model")
    with pytest.raises(face_models.ModelError, match="sha256"):
        face_models.fetch(tmp_path / "dest", wheel=fake, quiet=True)


def test_lrs3_tree_builds_a_corpus_that_stage1_trains_on(models, tmp_path, speech_dir):
    root = tmp_path / "LRS3"
    truths = {}
    for split, spk, clip, seed in (("pretrain", "spkA", "00001", 1), ("trainval", "spkA",
                                   "00002", 2), ("test", "spkB", "00001", 3)):
        (root / split / spk).mkdir(parents=True, exist_ok=True)
        truths[f"{split}/{spk}/{clip}"] = realface.make_talking_photo(
            root / split / spk / f"{clip}.mp4", seconds=1.4, size=160, seed=seed,
            speech=speech_dir / "en_gb_female.wav")
    (root / "test" / "spkB" / "00002.mp4").write_text("broken clip")
    out = tmp_path / "corpus"
    summary = lrs3.build(root, out, workers=2, progress=False)
    assert summary["clips"] == 3 and list(summary["failed_clips"]) == ["test/spkB/00002"]
    corpus = fmt.load_corpus(out)
    utt = np.asarray(corpus["utterances"])
    assert sorted(utt[:, 3].tolist()) == [0, 1, 2]             # train, valid, test
    assert corpus.meta["held_out_speakers"] == [1]
    # statistics over the training clips (accumulated while streaming the export)
    train = np.concatenate([np.arange(s, s + n) for _, s, n, sp in utt if sp == 0])
    mean, std = fmt.landmark_stats(np.asarray(corpus["landmarks"])[train])
    np.testing.assert_allclose(corpus["landmark_mean"], mean, atol=1e-7)
    np.testing.assert_allclose(corpus["landmark_std"], std, rtol=1e-4, atol=1e-7)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # scratch gone
    # the corpus landmarks follow each clip's mouth schedule too
    for (_, start, num, _), key in zip(utt, truths):
        lms = np.asarray(corpus["landmarks"])[start:start + num]
        r = np.corrcoef(lm.mouth_opening(lms) / lm.mouth_width(lms), truths[key]["open"])[0, 1]
        assert r >= 0.85, (key, r)
    # the TFDS build reads back without TensorFlow
    import tensorflow_datasets as tfds
    src = tfds.builder_from_directory(str(out / "tfds" / "lrs3" / "1.0.0")).as_data_source()
    assert sorted(src) == ["test", "train", "valid"] and len(src["test"]) == 1
    ex = src["test"][0]
    assert ex["clip"] in ("test/spkB/00001", b"test/spkB/00001")
    assert ex["mel"].shape[0] == 2 * len(ex["landmarks"])
    # interrupted/resumed: a rerun reuses every cached clip and retries no failed one
    cache = sorted((tmp_path / "corpus_work" / "clips").rglob("*.npz"))
    stamps = [p.stat().st_mtime_ns for p in cache]
    log = (tmp_path / "corpus_work" / "failed.jsonl").read_text()
    lrs3.build(root, out, workers=2, progress=False, overwrite=True, tfds_build=False)
    assert [p.stat().st_mtime_ns for p in cache] == stamps
    assert (tmp_path / "corpus_work" / "failed.jsonl").read_text() == log
    # stage 1 trains on it
    work = tmp_path / "a2m"
    run_module("experiments.train_audio2motion", f"--data={out}", f"--workdir={work}",
               "--config=tiny", "--steps=2", "--config.batch_size=2", "--config.window=40",
               "--config.optim.warmup=1")
    metrics = json.loads((work / "metrics.json").read_text())
    assert metrics["steps"] == 2 and np.isfinite(metrics["train_loss"])


def test_hubert_features_from_a_user_checkpoint(talking, tmp_path):
    """--hubert_checkpoint: the video's audio is featurized by HuBERT (a tiny random HF
    checkpoint here), 2 features per frame, width from the checkpoint."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from geneface_jax.audio import hubert as hb
    video, truth, _, _ = talking
    cfg = transformers.HubertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                    intermediate_size=37, conv_dim=(8, 12, 12, 16, 16, 16, 24),
                                    num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)
    torch.manual_seed(0)
    transformers.HubertModel(cfg).save_pretrained(tmp_path / "hubert")
    n = truth["num_frames"]
    wav, features, energy, name = pp.video_audio(video, n, tmp_path / "hubert")
    assert name == "hubert" and features.shape == (2 * n, 32) and energy.shape == (2 * n,)
    params, config = hb.load_hubert(tmp_path / "hubert")
    np.testing.assert_allclose(features, np.asarray(hb.hubert_features(params, config, wav)),
                               atol=1e-6)
