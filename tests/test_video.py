"""Video I/O: H.264/AAC round trip, streaming, atomic output, errors, fps resampling."""

import os

import numpy as np
import pytest

from geneface_jax.data import video
from geneface_jax.errors import ShapeError, VideoError

SR = 16000


def pattern(n, h=64, w=64, offset=0):
    """Smooth, per-frame distinct RGB frames: uint8 [n, h, w, 3]."""
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    frames = []
    for i in range(offset, offset + n):
        r = 128 + 80 * np.sin(2 * np.pi * (xx / w + i / 50))
        g = 128 + 80 * np.cos(2 * np.pi * (yy / h - i / 25))
        b = np.full_like(xx, 40 + 3 * (i % 50))
        frames.append(np.stack([r, g, b], -1))
    return np.round(np.stack(frames)).astype(np.uint8)


def sine(seconds=2.0, freq=440.0):
    t = np.arange(int(seconds * SR)) / SR
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def leftovers(directory):
    return sorted(p.name for p in directory.iterdir())


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """50 frames 64x64 at 25 fps + 2.0 s of a 440 Hz sine at 16 kHz, written in chunks."""
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    frames, wav = pattern(50), sine()
    with video.VideoWriter(path, fps=25, size=(64, 64), audio=wav, audio_rate=SR) as w:
        for start in range(0, 50, 7):
            w.write(frames[start:start + 7])
    return path, frames, wav


def test_probe_round_trip(clip):
    path, _, _ = clip
    info = video.probe_video(path)
    assert info["frames"] == 50
    assert info["fps"] == pytest.approx(25.0)
    assert abs(info["duration_s"] - 2.0) <= 1 / 25
    assert (info["width"], info["height"]) == (64, 64)
    assert info["has_audio"] and info["audio_rate"] == SR
    assert abs(info["audio_duration_s"] - 2.0) <= 0.05
    assert not any(p.name.endswith(".tmp.mp4") for p in path.parent.iterdir())


def test_frames_round_trip(clip):
    path, frames, _ = clip
    decoded = np.stack(list(video.read_video(path)))
    assert decoded.shape == frames.shape and decoded.dtype == np.uint8
    err = np.abs(decoded.astype(np.float32) - frames).mean() / 255
    assert err < 3 / 255, err
    # frames stay in order: each decoded frame is closest to its own source frame
    dist = np.abs(decoded[:, None].astype(np.float32) - frames[None]).mean(axis=(2, 3, 4))
    assert np.array_equal(dist.argmin(axis=1), np.arange(50))


def test_audio_round_trip(clip):
    path, _, wav = clip
    out = video.read_audio_track(path, rate=SR)
    assert out.dtype == np.float32 and out.ndim == 1
    assert abs(len(out) - len(wav)) <= 0.05 * SR
    n = min(len(out), len(wav))
    assert np.corrcoef(out[:n], wav[:n])[0, 1] > 0.9
    # the AAC end padding is trimmed to the stream's recorded duration
    assert len(out) == len(wav)


def test_audio_alignment_no_priming_delay(tmp_path):
    t = np.arange(SR) / SR
    chirp = (0.4 * np.sin(2 * np.pi * (200 * t + 900 * t ** 2))).astype(np.float32)
    path = video.write_video(tmp_path / "c.mp4", [pattern(25, 16, 16)], fps=25,
                             audio=chirp, audio_rate=SR, preset="ultrafast")
    out = video.read_audio_track(path)
    seg = slice(2000, 12000)   # a chirp, unlike a sine, has one best lag
    lags = np.arange(-1200, 1201)
    score = [np.dot(out[seg], np.roll(chirp, -lag)[seg]) for lag in lags]
    assert lags[int(np.argmax(score))] == 0
    # int16 input and resampling on read
    pcm = (chirp * 32767).astype(np.int16)
    path = video.write_video(tmp_path / "i.mp4", pattern(25, 16, 16), audio=pcm)
    out8k = video.read_audio_track(path, rate=8000)
    assert abs(len(out8k) - 8000) <= 1
    ref = chirp[::2]
    assert np.corrcoef(out8k[:4000], ref[:4000])[0, 1] > 0.9


def test_chunk_size_does_not_matter(tmp_path, clip):
    _, frames, wav = clip
    decoded = []
    for name, chunks in [("one", [frames]), ("singles", list(frames)),
                         ("odd", [frames[:1], frames[1:24], frames[24:50]])]:
        path = video.write_video(tmp_path / f"{name}.mp4", iter(chunks), fps=25, audio=wav,
                                 preset="ultrafast")
        info = video.probe_video(path)
        assert info["frames"] == 50 and abs(info["duration_s"] - 2.0) <= 1 / 25
        assert abs(info["audio_duration_s"] - 2.0) <= 0.05
        decoded.append(np.stack(list(video.read_video(path))))
    # the same encoder input whatever the chunking, so the same file
    for other in decoded[1:]:
        np.testing.assert_array_equal(decoded[0], other)


@pytest.mark.parametrize("width", [32, 48, 64])
def test_encoding_is_reproducible(tmp_path, width):
    """The same frames give the same video every time (libx264's AVX-512 code made most
    encodes of a 64x64 clip differ; `video.x264_simd_flags`)."""
    rng = np.random.default_rng(width)
    frames = np.clip(pattern(30, 64, width).astype(np.int16)
                     + rng.integers(0, 20, (30, 64, width, 3)), 0, 255).astype(np.uint8)
    runs = [np.stack(list(video.read_video(video.write_video(tmp_path / f"{i}.mp4", frames))))
            for i in range(4)]
    for other in runs[1:]:
        np.testing.assert_array_equal(runs[0], other)


def test_float_frames(tmp_path):
    frames = pattern(10, 32, 48)
    as_float = video.write_video(tmp_path / "f.mp4", [frames / 255.0], fps=25)
    as_uint8 = video.write_video(tmp_path / "u.mp4", [frames], fps=25)
    decoded = np.stack(list(video.read_video(as_float)))
    assert decoded.shape == (10, 32, 48, 3)
    reference = np.stack(list(video.read_video(as_uint8)))
    assert np.abs(decoded.astype(np.float32) - reference).mean() < 0.5
    assert np.abs(decoded.astype(np.float32) - frames).mean() < 3


def test_exception_inside_with_leaves_nothing(tmp_path):
    path = tmp_path / "out.mp4"
    with pytest.raises(RuntimeError, match="boom"):
        with video.VideoWriter(path, fps=25, size=(64, 64), audio=sine(1.0)) as w:
            w.write(pattern(10))
            raise RuntimeError("boom")
    assert leftovers(tmp_path) == []
    with pytest.raises(KeyboardInterrupt):
        with video.VideoWriter(path, fps=25) as w:
            w.write(pattern(3))
            raise KeyboardInterrupt
    assert leftovers(tmp_path) == []
    # a bad chunk mid-stream also aborts cleanly
    with pytest.raises(ShapeError):
        with video.VideoWriter(path, fps=25) as w:
            w.write(pattern(3))
            w.write(pattern(3, 32, 32))
    assert leftovers(tmp_path) == []


def test_output_appears_only_at_close(tmp_path):
    path = tmp_path / "out.mp4"
    w = video.VideoWriter(path, fps=25, size=(16, 16))
    w.write(pattern(5, 16, 16))
    names = leftovers(tmp_path)
    assert len(names) == 1 and names[0].startswith(".out.mp4.") and names[0].endswith(".tmp.mp4")
    assert w.close() == path
    assert leftovers(tmp_path) == ["out.mp4"]
    # no frames -> VideoError, nothing left
    with pytest.raises(VideoError, match="no frames"):
        with video.VideoWriter(tmp_path / "empty.mp4", fps=25):
            pass
    assert leftovers(tmp_path) == ["out.mp4"]


def test_bad_output_path(tmp_path):
    with pytest.raises(VideoError, match="does not exist") as e:
        video.VideoWriter(tmp_path / "missing" / "out.mp4", size=(64, 64))
    assert "missing" in str(e.value)
    (tmp_path / "file").write_text("x")
    with pytest.raises(VideoError, match="cannot write"):
        video.VideoWriter(tmp_path / "file" / "out.mp4")
    with pytest.raises(VideoError, match="is a directory"):
        video.VideoWriter(tmp_path)
    if os.geteuid() != 0:   # root ignores directory permissions
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(VideoError, match="cannot write"):
                video.VideoWriter(ro / "out.mp4")
        finally:
            ro.chmod(0o700)


def test_odd_frame_size(tmp_path):
    with pytest.raises(VideoError, match="even frame size"):
        video.VideoWriter(tmp_path / "a.mp4", size=(63, 64))
    path = tmp_path / "b.mp4"
    with pytest.raises(VideoError, match="even frame size"):
        with video.VideoWriter(path) as w:
            w.write(pattern(2, 64, 65))
    assert leftovers(tmp_path) == []


def test_unreadable_inputs(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("this is not a video\n" * 20)
    missing = tmp_path / "missing.mp4"
    for fn in (video.probe_video, video.read_video, video.read_audio_track):
        with pytest.raises(VideoError, match="notes.txt"):
            fn(text)
        with pytest.raises(VideoError, match="missing.mp4.*does not exist"):
            fn(missing)
    # audio only: no video stream; video only: no audio track
    wav_path = tmp_path / "speech.wav"
    import soundfile as sf
    sf.write(wav_path, sine(0.5), SR)
    with pytest.raises(VideoError, match="speech.wav: has no video stream"):
        video.probe_video(wav_path)
    silent = video.write_video(tmp_path / "silent.mp4", pattern(3, 16, 16))
    assert video.probe_video(silent)["has_audio"] is False
    with pytest.raises(VideoError, match="silent.mp4: has no audio track"):
        video.read_audio_track(silent)


def test_fps_resampling(tmp_path):
    frames = pattern(50, 32, 32)
    path = video.write_video(tmp_path / "50.mp4", frames, fps=50, preset="ultrafast")
    info = video.probe_video(path)
    assert info["frames"] == 50 and info["fps"] == pytest.approx(50.0)
    assert abs(info["duration_s"] - 1.0) <= 1 / 50
    at25 = np.stack(list(video.read_video(path, fps=25)))
    assert len(at25) == 25
    # nearest timestamp keeps the even frames
    every = np.stack(list(video.read_video(path)))
    assert np.array_equal(at25, every[::2])
    # up-sampling repeats frames
    assert len(list(video.read_video(path, fps=100))) == 100


def test_display_rotation_is_applied(tmp_path):
    import av
    image = np.zeros((16, 32, 3), np.uint8)
    image[:4, :4] = 255                                       # top-left corner marked
    path = tmp_path / "rot.mp4"
    with av.open(str(path), "w") as container:                # tagged as a phone would
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 32, 16, "yuv420p"
        stream.set_display_rotation(90)
        for i in range(2):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    info = video.probe_video(path)
    assert (info["width"], info["height"]) == (16, 32)
    first = next(video.read_video(path))
    assert first.shape == (32, 16, 3)
    # 90 degrees counter-clockwise: the top-left corner goes to the bottom-left
    assert first[-4:, :4].mean() > 200 and first[:4, :4].mean() < 50


def test_memory_flat_in_video_length(tmp_path):
    import tracemalloc

    def peak(chunks):
        gen = (pattern(10, offset=10 * i) for i in range(chunks))
        wav = sine(2.0)                   # the audio is an input, held whole by design
        tracemalloc.start()
        try:
            video.write_video(tmp_path / f"{chunks}.mp4", gen, audio=wav, preset="ultrafast")
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    short, long = peak(5), peak(40)      # 50 vs 400 frames (0.6 MB vs 4.9 MB of RGB)
    assert long < short + 500_000, (short, long)
