"""Audio front-end: frame rule, format/rate invariance, alignment, errors, memory."""

import tracemalloc

import numpy as np
import pytest
import soundfile as sf
import soxr

from geneface_jax import audio
from geneface_jax.errors import AudioError


@pytest.fixture(scope="module")
def clip(speech_dir):
    """First 3 s of a real 16 kHz mono speech clip."""
    wav, rate = sf.read(speech_dir / "en_us_male.wav", dtype="float32")
    assert rate == 16000 and wav.ndim == 1
    return wav[:48000]


@pytest.mark.parametrize("seconds,frames", [(1.0, 25), (1.02, 26), (0.98, 25), (0.04, 1),
                                            (2.0, 50)])
def test_frame_rule(seconds, frames):
    n = int(round(seconds * 16000))
    assert audio.num_video_frames(n) == frames
    wav = np.random.default_rng(0).normal(0, 0.1, n).astype(np.float32)
    f = audio.compute_features(wav)
    assert f["mel"].shape == (2 * frames, 80) and f["energy"].shape == (2 * frames,)
    assert len(audio.pad_or_trim(wav)) == 640 * frames


def test_shorter_than_a_frame_is_refused():
    with pytest.raises(AudioError, match="shorter than one video frame"):
        audio.compute_features(np.zeros(480, np.float32))
    with pytest.raises(AudioError, match="1-D float"):
        audio.compute_features(np.zeros((2, 800), np.float32))
    with pytest.raises(AudioError, match="NaN"):
        audio.compute_features(np.full(800, np.nan, np.float32))


@pytest.mark.parametrize("sample", [1, 100, 319, 3210, 8000 + 161])
def test_impulse_lands_in_its_feature_frame(sample):
    wav = np.zeros(16000, np.float32)
    wav[sample] = 1.0
    mel = audio.log_mel(wav)
    assert int(np.argmax(np.exp(mel).sum(1))) == sample // 320
    energy = audio.frame_energy(wav)
    assert int(np.argmax(energy)) == sample // 320


def test_chunked_equals_unchunked(clip):
    full = audio.log_mel(clip)
    for chunk in (7, 64, 149):
        np.testing.assert_allclose(audio.log_mel(clip, chunk_frames=chunk), full, atol=1e-5)


def test_resample_equals_librosa_soxr_hq():
    """`io.resample` gives librosa's soxr_hq samples (length ceil(n * target / rate))."""
    import librosa
    from geneface_jax.audio import io as audio_io
    rng = np.random.default_rng(0)
    for n, rate in ((44100, 44100), (12345, 8000), (96007, 48000), (999, 22050)):
        x = 0.1 * rng.standard_normal(n).astype(np.float32)
        np.testing.assert_array_equal(
            audio_io.resample(x, rate, 16000),
            librosa.resample(x, orig_sr=rate, target_sr=16000, res_type="soxr_hq"))


def test_formats_rates_and_channels_agree(clip, tmp_path):
    ref = audio.log_mel(clip)
    stereo = soxr.resample(clip, 16000, 44100, "VHQ")
    stereo = np.stack([stereo, stereo], axis=1)
    bounds = {"wav": 0.05, "flac": 0.05, "ogg": 0.6, "mp3": 0.6}
    for ext, bound in bounds.items():
        path = tmp_path / f"clip44k.{ext}"
        sf.write(path, stereo, 44100)
        wav = audio.load_audio(path)
        assert abs(len(wav) - len(clip)) <= 2400, ext   # codec padding (mp3) is allowed
        mel = audio.log_mel(wav[:len(clip)] if len(wav) >= len(clip) else wav)
        n = min(len(mel), len(ref))
        speech = ref[:n].max(1) > np.log(1e-3)          # compare where there is signal
        err = np.abs(mel[:n] - ref[:n])[speech]
        assert err.mean() < bound, (ext, err.mean())
    # 8 kHz mono: band-limited, so compare only the mel bands below 3.5 kHz.
    low = soxr.resample(clip, 16000, 8000, "VHQ")
    sf.write(tmp_path / "clip8k.wav", low, 8000)
    mel8 = audio.log_mel(audio.load_audio(tmp_path / "clip8k.wav"))
    assert mel8.shape == ref.shape
    bands = slice(0, 55)
    speech = ref.max(1) > np.log(1e-3)
    assert np.abs(mel8[:, bands] - ref[:, bands])[speech].mean() < 0.3


def test_featurize_file(clip, tmp_path):
    path = tmp_path / "c.wav"
    sf.write(path, clip, 16000, subtype="FLOAT")
    out = audio.featurize_file(path)
    assert out["num_frames"] == 75 and out["mel"].shape == (150, 80)
    np.testing.assert_allclose(out["wav"], clip, atol=1e-7)


def test_bad_files_raise_audio_error(tmp_path):
    missing = tmp_path / "missing.wav"
    with pytest.raises(AudioError, match="missing.wav.*does not exist"):
        audio.load_audio(missing)
    text = tmp_path / "notes.wav"
    text.write_text("this is not audio\n" * 50)
    with pytest.raises(AudioError, match="notes.wav.*not a readable audio file"):
        audio.load_audio(text)
    png = tmp_path / "image.wav"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    with pytest.raises(AudioError, match="image.wav"):
        audio.load_audio(png)
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(AudioError, match="empty.wav.*empty file"):
        audio.load_audio(empty)
    zero = tmp_path / "zero.wav"
    sf.write(zero, np.zeros(0, np.float32), 16000)
    with pytest.raises(AudioError, match="zero.wav.*no samples"):
        audio.load_audio(zero)
    short = tmp_path / "short.wav"
    sf.write(short, np.zeros(160, np.float32), 16000)
    with pytest.raises(AudioError, match="short.wav.*shorter than one video frame"):
        audio.load_audio(short)
    nan = tmp_path / "nan.wav"
    data = np.zeros(1600, np.float32)
    data[100] = np.nan
    sf.write(nan, data, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="nan.wav.*NaN"):
        audio.load_audio(nan)
    with pytest.raises(AudioError, match="is a directory"):
        audio.load_audio(tmp_path)


def test_energy_silence_vs_speech(clip):
    e_speech = audio.frame_energy(clip)
    e_silence = audio.frame_energy(np.zeros(16000, np.float32))
    assert e_silence.max() == 0.0
    assert np.percentile(e_speech, 90) > 0.01
    np.testing.assert_allclose(audio.energy_db(np.array([1.0, 0.1])), [0.0, -20.0], atol=1e-5)


def test_save_wav_round_trip_and_atomic(tmp_path, clip):
    path = audio.save_wav(tmp_path / "out.wav", clip)
    back = audio.load_audio(path)
    np.testing.assert_allclose(back, clip, atol=1.0 / 32000)
    with pytest.raises(AudioError):
        audio.save_wav(tmp_path / "bad.wav", np.full(10, np.inf, np.float32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.wav"]


def test_ten_minutes_in_bounded_memory():
    wav = np.random.default_rng(0).normal(0, 0.1, 600 * 16000).astype(np.float32)
    tracemalloc.start()
    mel = audio.log_mel(wav)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert mel.shape == (30000, 80)
    assert peak < 200 * 2 ** 20, f"peak {peak / 2 ** 20:.0f} MiB"
