"""Synthetic world: determinism, geometry, oracle behaviour, speakers and styles."""

import hashlib
import pathlib

import numpy as np
import pytest

from geneface_jax.audio import features as feat
from geneface_jax.data import format as fmt
from geneface_jax.data import landmarks as lm
from geneface_jax.data.synthetic import face as face_lib
from geneface_jax.data.synthetic import oracle
from geneface_jax.data.synthetic import raster
from geneface_jax.data.synthetic import speech
from geneface_jax.data.synthetic import world


@pytest.fixture(scope="module")
def person():
    arrays, meta, wav = world.make_person(5, size=64, num_frames=60, progress=False)
    return arrays, meta, wav


@pytest.fixture(scope="module")
def corpus():
    return world.make_corpus(7, num_utterances=12, num_speakers=4, held_out_speakers=1,
                             seconds=(2.0, 3.0), progress=False)


def _digest(directory):
    h = hashlib.sha256()
    for f in sorted(pathlib.Path(directory).iterdir()):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def test_same_seed_gives_byte_identical_datasets(tmp_path, person, corpus):
    a2, m2, w2 = world.make_person(5, size=64, num_frames=60, progress=False)
    fmt.write_person(tmp_path / "p1", *person)
    fmt.write_person(tmp_path / "p2", a2, m2, w2)
    assert _digest(tmp_path / "p1") == _digest(tmp_path / "p2")
    c2 = world.make_corpus(7, num_utterances=12, num_speakers=4, held_out_speakers=1,
                           seconds=(2.0, 3.0), progress=False)
    fmt.write_corpus(tmp_path / "c1", *corpus)
    fmt.write_corpus(tmp_path / "c2", *c2)
    assert _digest(tmp_path / "c1") == _digest(tmp_path / "c2")


def test_different_seeds_differ(person, corpus):
    other, _, wav = world.make_person(6, size=64, num_frames=60, progress=False)
    assert not np.array_equal(other["frames"], person[0]["frames"])
    assert not np.array_equal(other["landmarks"], person[0]["landmarks"])
    assert not np.array_equal(wav, person[2])
    c_other, _ = world.make_corpus(8, num_utterances=12, num_speakers=4,
                                   held_out_speakers=1, seconds=(2.0, 3.0), progress=False)
    assert not np.array_equal(c_other["audio"][:1000], corpus[0]["audio"][:1000])


def test_shapes_and_alignment(person):
    arrays, meta, wav = person
    n = 60
    assert arrays["frames"].shape == (n, 64, 64, 3)
    assert arrays["mel"].shape == (2 * n, 80)
    assert len(wav) == n * feat.SAMPLES_PER_VIDEO_FRAME
    assert meta["splits"] == {"train": [0, 54], "valid": [54, 60]}
    assert np.all(np.isfinite(arrays["landmarks"]))


def test_landmarks_project_into_the_face_mask(person):
    """Project head-space landmarks with the stored pose (c2w) and intrinsics."""
    arrays, meta, _ = person
    c2w = arrays["poses"].astype(np.float64)
    np.testing.assert_allclose(c2w[:, :3, :3] @ np.swapaxes(c2w[:, :3, :3], 1, 2),
                               np.broadcast_to(np.eye(3), c2w[:, :3, :3].shape), atol=1e-6)
    w2c = np.linalg.inv(c2w)
    lms = arrays["landmarks"].astype(np.float64)
    cam = np.einsum("tij,tkj->tki", w2c[:, :3, :3], lms) + w2c[:, None, :3, 3]
    uv = raster.project(cam, meta["intrinsics"])
    np.testing.assert_allclose(uv, arrays["landmarks_2d"], atol=1e-3)
    cols, rows = np.floor(uv[..., 0]).astype(int), np.floor(uv[..., 1]).astype(int)
    t = np.arange(len(uv))[:, None]
    labels = arrays["masks"][t, rows, cols]
    assert np.all(labels == fmt.HEAD), f"{np.sum(labels != fmt.HEAD)} landmarks off the head"
    rect = arrays["face_rect"]
    assert np.all(uv[..., 0] >= rect[:, None, 0]) and np.all(uv[..., 0] < rect[:, None, 2])
    assert np.all(uv[..., 1] >= rect[:, None, 1]) and np.all(uv[..., 1] < rect[:, None, 3])
    # The rectangle is a face box, not the whole image.
    area = (rect[:, 2] - rect[:, 0]) * (rect[:, 3] - rect[:, 1])
    assert np.all(area < 0.5 * 64 * 64)


def test_masks_and_background(person):
    arrays, _, _ = person
    masks, frames, bg = arrays["masks"], arrays["frames"], arrays["background"]
    assert set(np.unique(masks)) == {0, 1, 2}
    # Background pixels away from the person equal the stored background image.
    person_px = masks > 0
    grown = person_px.copy()
    for axis in (1, 2):
        for shift in (-1, 1):
            grown |= np.roll(person_px, shift, axis=axis)
    far = ~grown
    diff = np.abs(frames.astype(int) - bg[None].astype(int))[far]
    assert diff.max() <= 1
    # The head moves: its mask centroid changes over time.
    ys, xs = np.nonzero(masks[0] == 1)
    ys2, xs2 = np.nonzero(masks[-1] == 1)
    assert abs(xs.mean() - xs2.mean()) + abs(ys.mean() - ys2.mean()) > 0.1


def test_mouth_opening_follows_speech_energy(corpus):
    arrays, _ = corpus
    energy = arrays["energy"].reshape(-1, 2)
    e = np.sqrt((energy ** 2).mean(1))
    for key, opening in (("oracle", arrays["oracle_open"]),
                         ("landmarks", lm.mouth_opening(arrays["landmarks"]))):
        rs = []
        for _, start, num, _ in arrays["utterances"]:
            sl = slice(start, start + num)
            rs.append(np.corrcoef(opening[sl], e[sl])[0, 1])
        assert np.median(rs) > 0.6, (key, rs)


def test_person_mouth_follows_its_audio(person):
    arrays, _, _ = person
    energy = arrays["energy"].reshape(-1, 2)
    e = np.sqrt((energy ** 2).mean(1))
    assert np.corrcoef(arrays["oracle_open"], e)[0, 1] > 0.6
    assert np.corrcoef(lm.mouth_opening(arrays["landmarks"]), e)[0, 1] > 0.6


def test_mouth_closed_during_silence(speech_dir):
    clips = speech.load_clips(speech_dir)
    rng = np.random.default_rng(0)
    talk = clips[0][:16000]
    noise = rng.normal(0, 1e-4, 32000).astype(np.float32)
    wav = np.concatenate([talk, np.zeros(16000, np.float32)]) + noise
    f = feat.compute_features(wav)
    cues = oracle.speech_cues(f["mel"], f["energy"])
    artic = oracle.articulate(cues, oracle.Style(1, 1.2, 1.0, 0.0, 1.0))
    silent = artic["open"][27:]          # frames 25.. are silence (1 frame of smoothing)
    assert silent.max() < 1e-6
    assert artic["open"][:25].max() > 0.5
    shape = face_lib.sample_face_shape(rng)
    lms = face_lib.landmarks_3d(shape, dict(artic, blink=np.zeros_like(artic["open"])))
    assert lm.mouth_opening(lms)[27:].max() < 1e-6
    assert lm.mouth_opening(lms)[:25].max() > 0.005


def test_one_to_many_styles(speech_dir):
    """The same audio under different styles gives different motion; modes all occur."""
    rng = np.random.default_rng(1)
    modes = [oracle.sample_style(rng).mode for _ in range(300)]
    counts = np.bincount(modes, minlength=3)
    weights = np.array([m[0] for m in oracle.STYLE_MODES])
    np.testing.assert_allclose(counts / 300, weights, atol=0.07)
    wav = speech.load_clips(speech_dir)[1][:48000]
    f = feat.compute_features(wav)
    cues = oracle.speech_cues(f["mel"], f["energy"])
    opens = [oracle.articulate(cues, oracle.Style(m, g, wg, s, 1.0))["open"]
             for m, (_, g, wg, s) in enumerate(oracle.STYLE_MODES)]
    assert opens[2].std() > 3 * opens[0].std()
    # A regression to the mean under-articulates: std of E[open | audio] vs pooled std.
    gains = np.array([m[1] for m in oracle.STYLE_MODES])
    mean_open = (weights * gains).sum() / gains[1] * opens[1]
    pooled = np.sqrt((weights[:, None] * np.stack(opens) ** 2).sum(0).mean()
                     - ((weights[:, None] * np.stack(opens)).sum(0).mean()) ** 2)
    assert mean_open.std() / pooled < 0.8


def test_blinks_and_eyes():
    rng = np.random.default_rng(3)
    blink = oracle.blinks(rng, 500)
    assert blink.max() == 1.0 and (blink == 0).mean() > 0.7
    onsets = np.sum(np.diff((blink > 0.5).astype(int)) == 1)
    assert 2 <= onsets <= 10       # one blink every 1.2-6 s over 20 s
    zeros = np.zeros(500, np.float32)
    artic = dict(open=zeros, width=zeros + 1, smile=zeros, blink=blink)
    lms = face_lib.landmarks_3d(face_lib.sample_face_shape(rng), artic)
    ear = lm.eye_aspect_ratio(lms)
    assert ear[blink == 1.0].max() < 1e-6
    assert ear[blink == 0.0].min() > 0.2


def test_speakers_differ_and_target_has_its_own_style(person, corpus):
    arrays, meta = corpus
    utt = arrays["utterances"]
    assert set(utt[:, 0]) == {0, 1, 2, 3}
    assert set(utt[utt[:, 3] == 2, 0]) == {3}          # held-out speaker only in test
    assert meta["held_out_speakers"] == [3]
    means = [arrays["landmarks"][s:s + n].mean(0) for spk in range(4)
             for _, s, n, _ in utt[utt[:, 0] == spk][:1]]
    assert min(np.abs(means[i] - means[j]).max() for i in range(4)
               for j in range(i + 1, 4)) > 1e-3
    target_width = lm.mouth_width(person[0]["landmarks"]).mean()
    corpus_width = lm.mouth_width(arrays["landmarks"]).mean()
    assert target_width > corpus_width * 1.03


def test_bad_sizes_raise():
    from geneface_jax.errors import DatasetError
    with pytest.raises(DatasetError):
        world.make_person(0, size=8, num_frames=10, progress=False)
    with pytest.raises(DatasetError):
        world.make_corpus(0, num_utterances=4, num_speakers=2, held_out_speakers=2,
                          progress=False)


def test_static_pose_person_holds_the_first_pose_and_keeps_the_rest():
    """`make_person(static_pose=True)`: every frame has the first frame's pose; the
    speech, landmarks (mouth, blinks) are those of the moving person; pixels differ."""
    moving, _, wav = world.make_person(4, size=24, num_frames=20, progress=False)
    still, _, wav_s = world.make_person(4, size=24, num_frames=20, progress=False,
                                        static_pose=True)
    np.testing.assert_array_equal(still["poses"], np.broadcast_to(moving["poses"][0],
                                                                  moving["poses"].shape))
    assert not np.allclose(moving["poses"], moving["poses"][:1])
    np.testing.assert_array_equal(still["landmarks"], moving["landmarks"])
    np.testing.assert_array_equal(wav_s, wav)
    np.testing.assert_array_equal(still["frames"][0], moving["frames"][0])
    assert not np.array_equal(still["frames"][-1], moving["frames"][-1])


def test_person_without_blinks_keeps_its_eyes_open_and_everything_else():
    """`make_person(blinks=False)`: no blink in the track and the eye landmarks never
    close (the eye opening stays at its open value), while the speech, the pose, the mouth
    and the frames without a blink are those of the blinking person."""
    blinking, _, wav = world.make_person(4, size=24, num_frames=120, progress=False)
    open_, _, wav_o = world.make_person(4, size=24, num_frames=120, progress=False,
                                        blinks=False)
    assert blinking["blink"].max() > 0.9 and open_["blink"].max() == 0.0
    np.testing.assert_array_equal(wav_o, wav)
    np.testing.assert_array_equal(open_["poses"], blinking["poses"])
    np.testing.assert_array_equal(open_["landmarks"][:, 48:], blinking["landmarks"][:, 48:])
    lids = lambda lms: lms[:, [37, 38, 43, 44], 1] - lms[:, [41, 40, 47, 46], 1]  # noqa: E731
    gap_b, gap_o = np.abs(lids(blinking["landmarks"])), np.abs(lids(open_["landmarks"]))
    shut = blinking["blink"] > 0.9
    assert (gap_b[shut].mean(1) < 0.5 * gap_o[shut].mean(1)).all()
    still = blinking["blink"] == 0.0
    np.testing.assert_array_equal(open_["frames"][still], blinking["frames"][still])


def test_person_saying_its_own_audio_is_its_own_video():
    """`world.person_saying(seed, wav, track)` with the person's own audio and frame
    order reproduces the person's frames wherever it does not blink (the truth of new
    audio is drawn by the same renderer, pose and background); a frame order changes the
    pose only; a track that does not fit is refused."""
    arrays, meta, wav = world.make_person(5, size=24, num_frames=60, progress=False)
    truth = world.person_saying(5, wav, np.arange(60), size=24, num_frames=60)
    still = arrays["blink"] == 0.0
    assert still.sum() > 30
    np.testing.assert_array_equal(truth[still], arrays["frames"][still])
    shuffled = world.person_saying(5, wav, np.arange(60)[::-1], size=24, num_frames=60)
    assert not np.array_equal(shuffled[0], truth[0])
    from geneface_jax.errors import DatasetError
    with pytest.raises(DatasetError):
        world.person_saying(5, wav, np.arange(61), size=24, num_frames=60)
    with pytest.raises(DatasetError):
        world.person_saying(5, wav, [60], size=24, num_frames=60)
