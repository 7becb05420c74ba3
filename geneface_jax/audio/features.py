"""Audio features at exactly 50 Hz: 80-band log-mel and frame energy.

Frame alignment, the rule the whole project follows:
  * video runs at 25 fps; video frame j owns samples [640 j, 640 j + 640) at 16 kHz;
  * a clip of n samples has N = round(n / 640) video frames (half rounds up), and its
    audio is zero-padded or trimmed to exactly 640 N samples (`pad_or_trim`);
  * feature frame i (50 Hz) is centred on sample 320 i + 160, the centre of the hop
    [320 i, 320 i + 320); video frame j owns feature frames 2j and 2j + 1;
  * so 1 s of audio gives 25 video frames and 50 feature frames.
The STFT window (1024-point Hann) reaches 512 samples either side of a frame centre; the
signal is zero-padded outside [0, 640 N).
"""

import functools

import librosa
import numpy as np

from geneface_jax.audio import io as audio_io
from geneface_jax.errors import AudioError

SAMPLE_RATE = 16000
VIDEO_FPS = 25
FEATURE_RATE = 50
HOP = SAMPLE_RATE // FEATURE_RATE                     # 320 samples per feature frame
SAMPLES_PER_VIDEO_FRAME = SAMPLE_RATE // VIDEO_FPS    # 640
N_FFT = 1024
N_MELS = 80
FMIN, FMAX = 55.0, 7600.0
LOG_FLOOR = 1e-5
CHUNK_FRAMES = 3000                                   # 60 s of feature frames per block


def num_video_frames(num_samples):
    """Video frames of a clip of `num_samples` 16 kHz samples: round(n / 640), half up."""
    return int((2 * int(num_samples) + SAMPLES_PER_VIDEO_FRAME) // (2 * SAMPLES_PER_VIDEO_FRAME))


def _check_wav(wav):
    wav = np.asarray(wav)
    if wav.ndim != 1 or not np.issubdtype(wav.dtype, np.floating):
        raise AudioError(f"audio must be a 1-D float array, got shape {wav.shape} "
                         f"dtype {wav.dtype}")
    if len(wav) < SAMPLES_PER_VIDEO_FRAME:
        raise AudioError(f"audio has {len(wav)} samples, shorter than one video frame "
                         f"(640 samples = 40 ms at 16 kHz)")
    if not np.all(np.isfinite(wav)):
        raise AudioError("audio contains NaN or infinite samples")
    return wav.astype(np.float32, copy=False)


def pad_or_trim(wav):
    """Zero-pads or trims 16 kHz audio `[n]` to exactly 640 * num_video_frames(n) samples."""
    wav = _check_wav(wav)
    target = num_video_frames(len(wav)) * SAMPLES_PER_VIDEO_FRAME
    if len(wav) >= target:
        return wav[:target]
    return np.concatenate([wav, np.zeros(target - len(wav), np.float32)])


@functools.lru_cache(maxsize=1)
def _mel_basis():
    return librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS, fmin=FMIN,
                               fmax=FMAX, htk=False, norm="slaney").astype(np.float32)


def log_mel(wav, *, chunk_frames=CHUNK_FRAMES):
    """80-band log-mel power spectrogram at 50 Hz.

    Args:
      wav: float `[n]` 16 kHz mono; it is padded/trimmed to the frame rule first.
      chunk_frames: frames computed per block (bounds peak memory for long audio; the
        result does not depend on it).
    Returns:
      float32 `[2 N, 80]`, N = num_video_frames(n); natural log of mel power, floored
      at 1e-5.
    """
    wav = pad_or_trim(wav)
    num = 2 * len(wav) // SAMPLES_PER_VIDEO_FRAME
    left = N_FFT // 2 - HOP // 2
    window = np.hanning(N_FFT + 1)[:-1].astype(np.float32)   # periodic Hann
    basis = _mel_basis()
    out = np.empty((num, N_MELS), np.float32)
    for start in range(0, num, chunk_frames):
        stop = min(num, start + chunk_frames)
        # The block's samples of the clip zero-padded by `left` in front (and at the end):
        # only this block is copied, never the whole clip.
        lo, hi = start * HOP - left, (stop - 1) * HOP + N_FFT - left
        seg = np.zeros(hi - lo, np.float32)
        seg[max(0, -lo):max(0, -lo) + len(wav[max(0, lo):hi])] = wav[max(0, lo):hi]
        frames = np.lib.stride_tricks.sliding_window_view(seg, N_FFT)[::HOP]
        spec = np.fft.rfft(frames * window, axis=-1)
        power = (spec.real ** 2 + spec.imag ** 2).astype(np.float32)
        out[start:stop] = np.log(np.maximum(power @ basis.T, LOG_FLOOR))
    return out


def frame_energy(wav):
    """RMS amplitude of each 20 ms hop [320 i, 320 i + 320): float32 `[2 N]`."""
    hops = pad_or_trim(wav).reshape(-1, HOP)
    out = np.empty(len(hops), np.float32)
    for start in range(0, len(hops), CHUNK_FRAMES):   # float64 copies of one block only
        block = hops[start:start + CHUNK_FRAMES].astype(np.float64)
        out[start:start + CHUNK_FRAMES] = np.sqrt(np.mean(block * block, axis=1))
    return out


def video_frame_rms(energy):
    """RMS amplitude per video frame `[N]` from the RMS of its two feature hops `[2N]`
    (in the input's float dtype)."""
    e = np.asarray(energy)
    num = len(e) // 2
    return np.sqrt(0.5 * (e[0:2 * num:2] ** 2 + e[1:2 * num:2] ** 2))


def energy_db(energy, floor_db=-100.0):
    """RMS amplitude -> dBFS (20 log10), floored."""
    return np.maximum(20.0 * np.log10(np.maximum(energy, 1e-12)), floor_db).astype(np.float32)


def compute_features(wav):
    """`dict(mel=[2N, 80], energy=[2N])` of 16 kHz mono audio `[n]` (see module doc)."""
    return dict(mel=log_mel(wav), energy=frame_energy(wav))


def featurize_file(path):
    """Loads any audio file and computes its features.

    Returns:
      dict with `wav` float32 `[640 N]` (16 kHz mono, padded/trimmed to the frame rule),
      `mel` `[2N, 80]`, `energy` `[2N]`, `num_frames` N.
    Raises:
      AudioError: unreadable, empty, too short or non-finite audio (names the file).
    """
    wav = audio_io.load_audio(path)
    try:
        wav = pad_or_trim(wav)
    except AudioError as e:
        raise AudioError(f"{path}: {e}") from e
    feats = compute_features(wav)
    return dict(wav=wav, num_frames=len(wav) // SAMPLES_PER_VIDEO_FRAME, **feats)
