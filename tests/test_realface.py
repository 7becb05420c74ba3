"""Tests of the real-face test-data generator (tests/realface.py)."""

import numpy as np
import pytest
import soundfile as sf
from scipy import ndimage

from geneface_jax.data.synthetic import realface, speech
from geneface_jax.audio import io as audio_io
from geneface_jax.data.video import probe_video, read_audio_track, read_video


# ------------------------------------------------------------------ schedules


def test_schedules_shapes_ranges_determinism():
    n = 250                                               # 10 s
    opening, roll = realface.default_schedules(n, seed=3)
    assert opening.shape == roll.shape == (n,)
    assert opening.dtype == roll.dtype == np.float32
    assert opening.min() == 0.0 and 0.9 < opening.max() <= 1.0
    assert np.abs(roll).max() <= 8.0 and np.ptp(roll) > 6.0
    assert np.abs(np.diff(roll)).max() < 0.81             # slow, smooth roll
    again = realface.default_schedules(n, seed=3)
    np.testing.assert_array_equal(opening, again[0])
    np.testing.assert_array_equal(roll, again[1])
    other = realface.default_schedules(n, seed=4)
    assert not np.array_equal(opening, other[0]) and not np.array_equal(roll, other[1])
    # A prefix of a longer schedule is the shorter schedule.
    np.testing.assert_array_equal(realface.default_schedules(40, seed=3)[0], opening[:40])


def test_schedules_talk_like_speech():
    opening, _ = realface.default_schedules(500, seed=0)  # 20 s
    closed = opening == 0.0
    # Fully closed stretches: a leading pause and at least one of >= 0.3 s later on.
    assert closed[:7].all()
    runs = np.diff(np.flatnonzero(np.diff(np.r_[0, closed.astype(np.int8), 0])))[::2]
    assert (runs >= 7).sum() >= 2
    # Several openings a second (local maxima above 0.2), with varying peaks.
    peak = (opening[1:-1] > opening[:-2]) & (opening[1:-1] >= opening[2:]) & (
        opening[1:-1] > 0.2)
    assert 2.0 <= peak.sum() / 20.0 <= 9.0
    assert np.std(opening[1:-1][peak]) > 0.1


# ------------------------------------------------------------------ frames


def test_render_frame_shape_dtype_determinism():
    for size in (256, 128):
        frame = realface.render_frame(0.7, -5.0, size)
        assert frame.shape == (size, size, 3) and frame.dtype == np.uint8
        np.testing.assert_array_equal(frame, realface.render_frame(0.7, -5.0, size))
    with pytest.raises(ValueError):
        realface.render_frame(1.5, 0.0)


def test_closed_unrolled_frame_is_the_plain_crop():
    np.testing.assert_array_equal(realface.render_frame(0.0, 0.0), realface.crop_photo())
    # At the crop's own size no resampling happens: the photo's pixels, exactly.
    from skimage import data
    side = realface.CROP_SIDE
    u0, v0 = (int(c) for c in realface.CROP_ORIGIN)
    np.testing.assert_array_equal(realface.render_frame(0.0, 0.0, side),
                                  data.astronaut()[v0:v0 + side, u0:u0 + side])


def _luma(img):
    return img.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def test_opening_darkens_the_mouth_and_leaves_the_upper_face():
    size = 256
    closed = realface.render_frame(0.0, 0.0, size)
    mouth_u, mouth_v = realface.frame_point(realface.LIP_LINE[1], size)
    lum = {}
    for amount in (0.0, 0.5, 1.0):
        frame = realface.render_frame(amount, 0.0, size)
        # Nothing above the lip line moves (rows above the mouth corners).
        corner_v = min(v for _, v in realface.LIP_LINE)
        top = int(realface.frame_point((0.0, corner_v), size)[1]) - 1
        np.testing.assert_array_equal(frame[:top], closed[:top])
        # The middle of the gap, below the lip line, darkens with the opening.
        gap_v = mouth_v + 0.5 * amount * realface.OPEN_MAX_PX * size / realface.CROP_SIDE
        v, u = int(round(gap_v)), int(round(mouth_u))
        lum[amount] = _luma(frame[v - 1:v + 2, u - 3:u + 4]).mean()
    assert lum[1.0] < 30 and lum[0.5] < 40 and lum[0.0] > 150     # teeth when closed


def test_roll_turns_counter_clockwise_about_the_face_centre():
    """The rolled frame, sampled where `frame_point` says each face pixel went, is the
    unrolled frame; sampled with the opposite roll it is not."""
    size, roll = 256, 8.0
    flat = realface.render_frame(0.0, 0.0, size).astype(np.float64)
    rolled = realface.render_frame(0.0, roll, size).astype(np.float64)
    # Face pixels of the unrolled frame, in frame and then photo coordinates.
    fu, fv = realface.frame_point(realface.FACE_CENTER, size)
    half = 0.3 * size
    v, u = np.mgrid[int(fv - half):int(fv + half), int(fu - half):int(fu + half)]
    scale = realface.CROP_SIDE / size
    pu = realface.CROP_ORIGIN[0] + (u + 0.5) * scale - 0.5
    pv = realface.CROP_ORIGIN[1] + (v + 0.5) * scale - 0.5

    def error(angle):
        ru, rv = realface.frame_point((pu, pv), size, angle)
        back = np.stack([ndimage.map_coordinates(rolled[..., c], [rv, ru], order=1)
                         for c in range(3)], axis=-1)
        return np.abs(back - flat[v, u]).mean()

    assert error(roll) < 4.0 < 4 * error(roll) < error(-roll)
    # The pivot stays put.
    np.testing.assert_allclose(realface.frame_point(realface.FACE_CENTER, size, roll),
                               (fu, fv), atol=1e-9)


# ------------------------------------------------------------------ the video


@pytest.fixture(scope="module")
def tone_wav(tmp_path_factory):
    """A 0.25 s 440 Hz tone (16 kHz mono WAV), shorter than the videos: to be looped."""
    t = np.arange(4000) / 16000
    path = tmp_path_factory.mktemp("realface") / "tone.wav"
    sf.write(path, (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000)
    return path


def test_make_talking_photo_writes_the_schedule(tmp_path, tone_wav):
    path = tmp_path / "talk.mp4"
    info = realface.make_talking_photo(path, seconds=1.0, size=128, speech=tone_wav,
                                       seed=1)
    n = 25
    assert info["num_frames"] == n and info["size"] == 128
    expected = realface.default_schedules(n, seed=1)
    np.testing.assert_array_equal(info["open"], expected[0])
    np.testing.assert_array_equal(info["roll_deg"], expected[1])
    for key in ("mouth_center", "face_center"):
        assert all(0 < c < 128 for c in info[key])
    assert info["mouth_center"][1] > info["face_center"][1]   # the mouth is lower

    probe = probe_video(path)
    assert probe["frames"] == n and probe["fps"] == 25.0
    assert (probe["width"], probe["height"]) == (128, 128)
    assert probe["has_audio"] and probe["audio_duration_s"] == pytest.approx(1.0, abs=1e-3)
    frames = list(read_video(path))
    assert len(frames) == n
    for i in (0, n // 2, n - 1):
        ref = realface.render_frame(float(info["open"][i]), float(info["roll_deg"][i]), 128)
        assert np.abs(frames[i].astype(np.float64) - ref).mean() < 5.0   # H.264, crf 18
    audio = read_audio_track(path)
    assert abs(len(audio) - 16000) <= 16
    # The 0.25 s tone, looped four times.
    t = np.arange(len(audio)) / 16000
    assert np.corrcoef(audio, 0.5 * np.sin(2 * np.pi * 440 * t))[0, 1] > 0.95


def test_make_talking_photo_custom_schedules_and_errors(tmp_path, tone_wav):
    path = tmp_path / "custom.mp4"
    opening = np.linspace(0.0, 1.0, 5)
    info = realface.make_talking_photo(path, seconds=0.2, size=64, speech=tone_wav,
                                       open_schedule=opening, roll_schedule=np.zeros(5))
    np.testing.assert_allclose(info["open"], opening)
    assert probe_video(path)["frames"] == 5
    # 0.2 s of a 0.25 s clip: cut.
    assert abs(len(read_audio_track(path)) - 3200) <= 16
    with pytest.raises(ValueError):
        realface.make_talking_photo(tmp_path / "x.mp4", seconds=0.2, speech=tone_wav,
                                    open_schedule=np.zeros(4))
    with pytest.raises(ValueError):
        realface.make_talking_photo(tmp_path / "x.mp4", seconds=0.2, speech=tone_wav,
                                    open_schedule=np.full(5, 1.5))
    assert not (tmp_path / "x.mp4").exists()


def test_make_talking_photo_default_speech(tmp_path, speech_dir):
    assert speech.default_clip() == speech_dir / "en_us_male.wav"
    path = tmp_path / "speech.mp4"
    realface.make_talking_photo(path, seconds=0.8, size=64)
    audio = read_audio_track(path)
    wav = audio_io.load_audio(speech.default_clip())[:len(audio)]
    assert len(audio) == pytest.approx(12800, abs=16)
    assert np.corrcoef(audio, wav)[0, 1] > 0.9
