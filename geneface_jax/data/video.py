"""Video file input/output through PyAV (FFmpeg): H.264 + AAC mp4 writing, reading, probing.

Writing (`VideoWriter`, `write_video`) streams frames into an mp4 with H.264 video
(libx264, yuv420p, BT.709 limited range, tagged as such) and, optionally, the audio muxed in
as AAC. Frames are encoded as they arrive, so memory is flat in the video length. The file
is written under a temporary name in the output's directory (`.NAME.XXXXXXXX.tmp.mp4`)
and renamed to its final name only by a successful `close()`: an exception (or Ctrl-C)
inside the `with` block, or a failed close, removes the temporary file and leaves no
output.

Reading (`probe_video`, `read_video`, `read_audio_track`) accepts anything FFmpeg reads
(mp4, mov, mkv, avi, webm, ...). Frames come back RGB uint8 `[H, W, 3]`, upright (the
container's display rotation is applied), audio mono float32 at the requested rate.

Conventions: sizes are `(H, W)` in pixels, rates in frames or samples per second, times in
seconds. Every problem with a file raises `VideoError` naming the file; bad arrays raise
`ShapeError` / `InputError` and bad audio arrays `AudioError`.

AAC timing: the AAC encoder delays its output by 1024 "priming" samples and pads the last
packet to 1024 samples. Audio frames are given explicit timestamps starting at 0, so the
muxer writes an edit list that hides the priming (decoders drop it: the decoded track
starts at sample 0 of the input, tested to the sample), and `read_audio_track` trims the
end padding to the stream's duration.
"""

import functools
import math
import os
import pathlib
import secrets
from fractions import Fraction

import av
import numpy as np
import tqdm
from av.video.reformatter import ColorRange, Colorspace, Interpolation, VideoReformatter

from geneface_jax.errors import AudioError, InputError, ShapeError, VideoError

FPS = 25
AUDIO_RATE = 16000
DEFAULT_CRF = 18          # libx264 constant rate factor (0 lossless .. 51 worst)
AUDIO_BIT_RATE = 64000    # AAC bits per second for a mono track
# Sample rates AAC supports (MPEG-4 sampling frequency table).
_AAC_RATES = (7350, 8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000,
              88200, 96000)
_AVCOL_BT709 = 1           # AVColorPrimaries / AVColorTransferCharacteristic / AVColorSpace
_AVCOL_RANGE_MPEG = 1      # limited ("TV") range
# swscale flags for RGB <-> YUV, both ways. The default (fast) path truncates: a round
# trip RGB -> yuv420p -> RGB without encoding came back 1.2 levels dark on gradients and
# up to 2.3 on flat colours; with accurate rounding and full chroma interpolation the
# bias is ~0.02 levels and the mean error 0.44 (64x64 gradient).
_SWS = (Interpolation.BILINEAR | Interpolation.ACCURATE_RND | Interpolation.FULL_CHR_H_INT
        | Interpolation.FULL_CHR_H_INP)


# --------------------------------------------------------------------------- writing


def _as_fps(fps):
    """A frame rate as an exact positive Fraction (29.97 -> 2997/100)."""
    try:
        rate = Fraction(fps).limit_denominator(1_000_000)
    except (TypeError, ValueError) as e:
        raise InputError(f"fps must be a positive number, got {fps!r}") from e
    if not rate > 0:
        raise InputError(f"fps must be a positive number, got {fps!r}")
    return rate


def _check_size(size, path):
    height, width = (int(s) for s in size)
    if height <= 0 or width <= 0:
        raise VideoError(f"{path}: frame size must be positive, got (H, W) = {size}")
    if height % 2 or width % 2:
        raise VideoError(f"{path}: H.264 yuv420p needs an even frame size, got (H, W) = "
                         f"({height}, {width}); crop or pad the frames by one pixel")
    return height, width


def _prepare_audio(audio, path):
    """Mono samples (float in [-1, 1] or int16) -> float32 [n], clipped to [-1, 1]."""
    audio = np.asarray(audio)
    if audio.ndim == 2 and audio.shape[1] == 1:
        audio = audio[:, 0]
    if audio.ndim != 1:
        raise AudioError(f"{path}: audio to mux must be mono samples [n], got shape "
                         f"{audio.shape}")
    if audio.size == 0:
        raise AudioError(f"{path}: audio to mux has no samples")
    if audio.dtype == np.int16:
        audio = audio.astype(np.float32) / 32768.0
    elif np.issubdtype(audio.dtype, np.floating):
        if not np.all(np.isfinite(audio)):
            raise AudioError(f"{path}: audio to mux contains NaN or infinite samples")
        audio = np.clip(audio.astype(np.float32, copy=False), -1.0, 1.0)
    else:
        raise AudioError(f"{path}: audio must be float (in [-1, 1]) or int16 samples, "
                         f"got dtype {audio.dtype}")
    return np.ascontiguousarray(audio, np.float32)


def _to_uint8_frames(frames, size, path):
    """[N, H, W, 3] (or one [H, W, 3]) uint8 or float in [0, 1] -> uint8 [N, H, W, 3]."""
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ShapeError(f"{path}: frames must be RGB [N, H, W, 3] (or one [H, W, 3]), got "
                         f"shape {frames.shape}")
    if size is not None and frames.shape[1:3] != size:
        raise ShapeError(f"{path}: frames are {frames.shape[1:3]} (H, W) but the video is "
                         f"{size}")
    if frames.dtype == np.uint8:
        return frames
    if np.issubdtype(frames.dtype, np.floating):
        if not np.all(np.isfinite(frames)):
            raise InputError(f"{path}: frames contain NaN or infinite values")
        return (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    raise ShapeError(f"{path}: frames must be uint8 or float in [0, 1], got dtype "
                     f"{frames.dtype}")


def _create_temp(path):
    """Creates the empty temporary file next to `path`; VideoError if that is impossible."""
    parent = path.parent
    if path.is_dir():
        raise VideoError(f"{path}: output path is a directory")
    if not parent.is_dir():
        raise VideoError(f"{path}: cannot write the video, directory {parent} does not exist")
    tmp = parent / f".{path.name}.{secrets.token_hex(4)}.tmp.mp4"
    try:
        # O_EXCL: never clobber; mode 0o666 so the final file gets the usual umask perms.
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as e:
        raise VideoError(f"{path}: cannot write the video in {parent} "
                         f"({e.strerror or e})") from e
    return tmp


# /proc/cpuinfo flag -> x264's name for the same instruction set
_X264_SIMD = (("mmxext", "MMX2"), ("sse", "SSE"), ("sse2", "SSE2"), ("pni", "SSE3"),
              ("ssse3", "SSSE3"), ("sse4_1", "SSE4.1"), ("sse4_2", "SSE4.2"),
              ("abm", "LZCNT"), ("avx", "AVX"), ("fma", "FMA3"), ("bmi1", "BMI1"),
              ("bmi2", "BMI2"), ("avx2", "AVX2"))


@functools.lru_cache(maxsize=None)
def x264_simd_flags():
    """The SIMD sets libx264 may use here: on a Linux x86 CPU with AVX-512, every set it
    has but AVX-512 (x264's names); None elsewhere (x264 picks its own).

    libx264's AVX-512 code made encodes of the same frames differ from run to run, even
    with one thread, so synthesis was not reproducible; without it every encode measured
    is identical and no slower (`python -m experiments.bench.video_encoding`;
    docs/benchmarks.md, "Video encoding").
    """
    try:
        with open("/proc/cpuinfo") as f:
            line = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        return None
    have = set(line.split(":", 1)[-1].split())
    if "avx512f" not in have:
        return None
    # Intel reports MMX2 as part of SSE ("mmxext" is AMD's name)
    return tuple(name for flag, name in _X264_SIMD
                 if flag in have or (flag == "mmxext" and "sse" in have))


class VideoWriter:
    """Streams RGB frames (and optional mono audio) into an H.264/AAC mp4 file.

    Usage::

        with VideoWriter("out.mp4", fps=25, size=(512, 512), audio=wav) as w:
            for chunk in frame_chunks:        # uint8 [N, H, W, 3] or float [0, 1]
                w.write(chunk)
        # out.mp4 exists only here, after a successful close()

    Frames are encoded as they are written (any chunk size, memory flat in the video
    length). The video is libx264, yuv420p (BT.709, limited range), constant frame rate
    `fps`, frame i at time i / fps; the container is always mp4 whatever the suffix.

    Output is atomic: everything goes to `.NAME.XXXXXXXX.tmp.mp4` in the output's directory,
    which `close()` renames to `path` (replacing an existing file). An exception or
    KeyboardInterrupt inside the `with` block, a failing `close()`, `abort()`, or a writer
    dropped without closing removes the temporary file and leaves no output (a process
    killed by a signal may leave the hidden temporary file behind).

    Args:
      path: output file. Its directory must exist and be writable: checked at
        construction, before any work (VideoError).
      fps: frame rate in frames per second (int, float or Fraction; 25 by default).
      size: `(H, W)` in pixels, both even (yuv420p halves the chroma planes); None takes
        the size of the first frames written.
      audio: optional mono samples `[n]`, float in [-1, 1] or int16, muxed as AAC from
        time 0. Kept at its own length (not cut or padded to the video).
      audio_rate: sample rate of `audio` in Hz. AAC rates (8000, 16000, 22050, 44100,
        48000, ...) are encoded as is; other rates are resampled to the next AAC rate.
      crf: libx264 constant rate factor (0 = lossless but rarely playable, 18 = visually
        lossless, 23 =
        x264's default, 51 = worst).
      preset: libx264 preset (speed vs. size, "ultrafast" .. "veryslow").
      progress: False; True for a tqdm bar (its total is the audio's frame count when
        there is audio); or a callable `progress(frames_written, total_or_None)`.

    Raises:
      VideoError: unwritable output path, odd or non-positive frame size, no frame
        written, or an encoder/muxer failure (naming the file).
      ShapeError / InputError: frames of the wrong shape or dtype / NaN values.
      AudioError: audio that is not 1-D, empty, NaN, or of an unsupported dtype.
    """

    def __init__(self, path, fps=FPS, size=None, audio=None, audio_rate=AUDIO_RATE,
                 crf=DEFAULT_CRF, preset="medium", progress=False):
        self.path = pathlib.Path(path)
        self.fps = _as_fps(fps)
        self.size = None if size is None else _check_size(size, self.path)
        self.crf = int(crf)
        if not 0 <= self.crf <= 51:
            raise InputError(f"crf must be in [0, 51], got {crf}")
        self.preset = str(preset)
        self.audio = None if audio is None else _prepare_audio(audio, self.path)
        self.audio_rate = int(audio_rate)
        if self.audio is not None and self.audio_rate <= 0:
            raise AudioError(f"{self.path}: audio_rate must be positive, got {audio_rate}")
        self.frames_written = 0
        self._audio_sent = 0
        self._container = None
        self._video = None
        self._audio_stream = None
        self._reformatter = VideoReformatter()
        self._bar = None
        self._closed = True                     # nothing to clean up until the temp exists
        self._tmp = _create_temp(self.path)     # last check: fails before any work
        self._closed = False
        total = None
        if self.audio is not None:
            total = int(round(len(self.audio) * self.fps / self.audio_rate))
        self._total = total
        self._callback = progress if callable(progress) else None
        if progress and self._callback is None:
            self._bar = tqdm.tqdm(total=total, desc=self.path.name, unit="frame", leave=False)

    # -- context manager

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False

    def __del__(self):
        if not getattr(self, "_closed", True):
            self.abort()

    # -- writing

    def _open(self, height, width):
        try:
            container = av.open(str(self._tmp), mode="w", format="mp4",
                                container_options={"movflags": "+faststart"})
        except (av.FFmpegError, OSError) as e:
            raise VideoError(f"{self.path}: cannot open the output for writing ({e})") from e
        self._container = container
        video = container.add_stream("libx264", rate=self.fps)
        video.width, video.height = width, height
        video.pix_fmt = "yuv420p"
        video.codec_context.time_base = 1 / self.fps
        options = {"crf": str(self.crf), "preset": self.preset}
        flags = x264_simd_flags()
        if flags:
            options["x264-params"] = "asm=" + ",".join(flags)
        video.options = options
        cc = video.codec_context
        cc.colorspace = cc.color_primaries = cc.color_trc = _AVCOL_BT709
        cc.color_range = _AVCOL_RANGE_MPEG
        self._video = video
        if self.audio is not None:
            rate = next((r for r in _AAC_RATES if r >= self.audio_rate), _AAC_RATES[-1])
            self._audio_stream = container.add_stream("aac", rate=rate, layout="mono")
            self._audio_stream.bit_rate = min(AUDIO_BIT_RATE, 6 * rate)  # AAC cap 6144*rate/1024

    def _mux(self, packets):
        self._container.mux(packets)

    def _send_audio(self, stop):
        """Encodes audio samples [sent, stop): interleaves audio with the video written."""
        stop = min(stop, len(self.audio))
        if stop <= self._audio_sent:
            return
        chunk = self.audio[self._audio_sent:stop]
        frame = av.AudioFrame.from_ndarray(chunk[None], format="flt", layout="mono")
        frame.sample_rate = self.audio_rate
        # Explicit timestamps from 0: the muxer then hides the encoder's priming samples
        # with an edit list (without them the audio would start 1024 samples late).
        frame.time_base = Fraction(1, self.audio_rate)
        frame.pts = self._audio_sent
        self._mux(self._audio_stream.encode(frame))
        self._audio_sent = stop

    def write(self, frames):
        """Encodes frames: uint8 `[N, H, W, 3]` (or one `[H, W, 3]`) or float in [0, 1].

        Any N (chunks of different sizes give the same file). Float frames are clipped to
        [0, 1] and rounded to uint8.
        """
        if self._closed:
            raise VideoError(f"{self.path}: write() on a closed VideoWriter")
        frames = _to_uint8_frames(frames, self.size, self.path)
        if len(frames) == 0:
            return
        if self._container is None:
            if self.size is None:
                self.size = _check_size(frames.shape[1:3], self.path)
            self._open(*self.size)
        try:
            for image in frames:
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
                frame = self._reformatter.reformat(
                    frame, format="yuv420p", dst_colorspace=Colorspace.ITU709,
                    dst_color_range=ColorRange.MPEG, interpolation=_SWS)
                frame.pts = self.frames_written
                self._mux(self._video.encode(frame))
                self.frames_written += 1
            if self.audio is not None:
                self._send_audio(math.ceil(self.frames_written * self.audio_rate / self.fps))
        except av.FFmpegError as e:
            raise VideoError(f"{self.path}: encoding failed ({e})") from e
        if self._bar is not None:
            self._bar.update(len(frames))
        if self._callback is not None:
            self._callback(self.frames_written, self._total)

    def close(self):
        """Flushes the encoders, finishes the mp4 and renames it to `path`.

        Returns the output path. On any failure (or interruption) the temporary file is
        removed and no output is left. Closing twice is a no-op.
        """
        if self._closed:
            return self.path
        try:
            if self.frames_written == 0:
                raise VideoError(f"{self.path}: no frames were written; refusing to make an "
                                 f"empty video")
            try:
                if self.audio is not None:
                    self._send_audio(len(self.audio))
                    self._mux(self._audio_stream.encode(None))
                self._mux(self._video.encode(None))
                self._container.close()
            except av.FFmpegError as e:
                raise VideoError(f"{self.path}: finishing the video failed ({e})") from e
            self._container = None
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        self._closed = True
        self._close_bar()
        return self.path

    def abort(self):
        """Stops writing and removes the temporary file; no output is left."""
        self._closed = True
        self._close_bar()
        if self._container is not None:
            try:
                self._container.close()
            except Exception:  # noqa: BLE001 - half-written file, being deleted anyway
                pass
            self._container = None
        try:
            os.remove(self._tmp)
        except FileNotFoundError:
            pass

    def _close_bar(self):
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def write_video(path, frames, fps=FPS, audio=None, audio_rate=AUDIO_RATE, **kwargs):
    """Writes an mp4 from an iterable of frame chunks (or one array), atomically.

    Args:
      path: output file (temporary name in the same directory, renamed when done).
      frames: an array `[N, H, W, 3]`, or an iterable of `[n, H, W, 3]` chunks and/or
        `[H, W, 3]` frames (uint8, or float in [0, 1]); consumed lazily, so a generator
        keeps memory flat.
      fps, audio, audio_rate, **kwargs: as `VideoWriter` (size, crf, preset, progress).
    Returns:
      the output path.
    """
    if isinstance(frames, np.ndarray):
        frames = [frames]
    with VideoWriter(path, fps=fps, audio=audio, audio_rate=audio_rate, **kwargs) as writer:
        for chunk in frames:
            writer.write(chunk)
    return writer.path


# --------------------------------------------------------------------------- reading


def _open_input(path):
    """Opens a media file for reading; VideoError naming the file on any problem."""
    path = pathlib.Path(path)
    if not path.exists():
        raise VideoError(f"{path}: video file does not exist")
    if path.is_dir():
        raise VideoError(f"{path}: is a directory, not a video file")
    if path.stat().st_size == 0:
        raise VideoError(f"{path}: empty file (0 bytes)")
    try:
        return path, av.open(str(path), mode="r")
    except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise VideoError(f"{path}: not a readable video file ({e})") from e


def _video_stream(container, path):
    if not container.streams.video:
        container.close()
        raise VideoError(f"{path}: has no video stream")
    return container.streams.video[0]


def _stream_seconds(stream):
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    return None


def _frame_rgb(frame):
    """A decoded frame -> upright RGB uint8 [H, W, 3] (range and display rotation honoured)."""
    kwargs = {"interpolation": _SWS}
    if frame.color_range in (ColorRange.MPEG, ColorRange.JPEG):
        kwargs["src_color_range"] = frame.color_range
        kwargs["dst_color_range"] = ColorRange.JPEG
    rgb = frame.to_ndarray(format="rgb24", **kwargs)
    rotation = frame.rotation or 0
    if rotation % 90 == 0 and rotation % 360:
        rgb = np.ascontiguousarray(np.rot90(rgb, k=rotation // 90))   # counter-clockwise
    return rgb


def probe_video(path):
    """Describes a video file.

    Returns a dict:
      frames: number of video frames (from the container index, else by counting packets);
      fps: average frame rate (frames per second, float);
      duration_s: video stream duration in seconds;
      width, height: upright frame size in pixels (display rotation applied);
      has_audio: whether there is an audio stream;
      audio_rate: its sample rate in Hz (None without audio);
      audio_duration_s: its duration in seconds, encoder priming and padding excluded
        when the container records them (None without audio).
    Raises:
      VideoError: missing, empty or unreadable file, or no video stream.
    """
    path, container = _open_input(path)
    try:
        stream = _video_stream(container, path)
        rate = stream.average_rate or stream.guessed_rate
        frames = stream.frames
        rotation = 0
        try:
            if not frames:
                frames = sum(1 for p in container.demux(stream) if p.size)
                container.seek(0)
            for frame in container.decode(stream):
                rotation = frame.rotation or 0
                break
        except av.FFmpegError as e:
            raise VideoError(f"{path}: video stream cannot be decoded ({e})") from e
        duration = _stream_seconds(stream)
        if duration is None and container.duration:
            duration = container.duration / av.time_base
        fps = float(rate) if rate else (frames / duration if duration else None)
        if duration is None and fps:
            duration = frames / fps
        width, height = stream.codec_context.width, stream.codec_context.height
        if rotation % 180 == 90:
            width, height = height, width
        audio = container.streams.audio[0] if container.streams.audio else None
        return {
            "frames": int(frames),
            "fps": fps,
            "duration_s": duration,
            "width": int(width),
            "height": int(height),
            "has_audio": audio is not None,
            "audio_rate": None if audio is None else int(audio.rate),
            "audio_duration_s": None if audio is None else _stream_seconds(audio),
        }
    finally:
        container.close()


def read_video(path, fps=None):
    """Iterates over the frames of a video as upright RGB uint8 `[H, W, 3]` arrays.

    The file is opened and checked when called (errors are raised here, not at the first
    `next()`); frames are decoded one at a time, so memory is flat in the video length.

    Args:
      path: any video file FFmpeg reads.
      fps: None yields every decoded frame. Otherwise the output is resampled to `fps` by
        nearest timestamp: output frame k (time t0 + k / fps, t0 = the first frame's time)
        is the input frame whose timestamp is nearest (ties go to the earlier frame), for
        every k whose time falls before the end of the last input frame. A 50-fps clip
        read at 25 fps keeps every second frame; a 25-fps clip read at 50 fps repeats
        each frame twice.
    Returns:
      a generator of uint8 `[H, W, 3]`.
    Raises:
      VideoError: missing, empty or unreadable file, no video stream, or (while iterating)
        a decoding failure.
    """
    path, container = _open_input(path)
    stream = _video_stream(container, path)
    target = None if fps is None else _as_fps(fps)
    return _iter_frames(path, container, stream, target)


def _iter_frames(path, container, stream, target):
    try:
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate or Fraction(FPS)
        index = 0
        t0 = None
        prev = None                 # [time, frame, cached rgb]
        k = 0                       # next output frame
        step = None if target is None else 1 / target
        try:
            for frame in container.decode(stream):
                if frame.pts is not None and frame.time_base is not None:
                    t = frame.pts * frame.time_base
                else:
                    t = index / Fraction(rate)
                index += 1
                if target is None:
                    yield _frame_rgb(frame)
                    continue
                if t0 is None:
                    t0 = t
                if prev is not None:
                    mid = (prev[0] + t) / 2
                    while t0 + k * step <= mid:
                        if prev[2] is None:
                            prev[2] = _frame_rgb(prev[1])
                        yield prev[2]
                        k += 1
                prev = [t, frame, None]
        except av.FFmpegError as e:
            raise VideoError(f"{path}: decoding failed ({e})") from e
        if prev is not None:
            last = prev[1]
            if last.duration and last.time_base is not None:
                length = last.duration * last.time_base
            else:
                length = 1 / Fraction(rate)
            end = prev[0] + length
            while t0 + k * step < end:
                if prev[2] is None:
                    prev[2] = _frame_rgb(last)
                yield prev[2]
                k += 1
    finally:
        container.close()


def read_audio_track(path, rate=AUDIO_RATE):
    """Reads the audio track of a video (or any media file) as mono float32.

    Channels are averaged and the audio resampled to `rate` by FFmpeg (swresample). The
    samples start at the stream's first presented sample (AAC priming dropped through
    the container's edit list) and are trimmed to the stream's recorded duration, so the
    encoder's end padding is removed.

    Args:
      path: the media file.
      rate: output sample rate in Hz.
    Returns:
      float32 `[n]`, nominally in [-1, 1].
    Raises:
      VideoError: missing, empty or unreadable file, no audio track, no samples, or a
        decoding failure.
    """
    path, container = _open_input(path)
    try:
        if not container.streams.audio:
            raise VideoError(f"{path}: has no audio track")
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=int(rate))
        chunks = []
        try:
            for frame in container.decode(stream):
                frame.pts = None        # timestamps are not needed; avoids resampler gaps
                chunks.extend(f.to_ndarray()[0] for f in resampler.resample(frame))
            chunks.extend(f.to_ndarray()[0] for f in resampler.resample(None))
        except av.FFmpegError as e:
            raise VideoError(f"{path}: audio decoding failed ({e})") from e
    finally:
        container.close()
    wav = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    duration = _stream_seconds(stream)
    if duration is not None:
        wav = wav[:int(round(duration * rate))]
    if wav.size == 0:
        raise VideoError(f"{path}: audio track has no samples")
    return np.ascontiguousarray(wav)
