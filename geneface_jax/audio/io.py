"""Audio file input/output: any readable file -> 16 kHz mono float32, and WAV writing."""

import pathlib
import warnings

import librosa
import numpy as np
import soundfile as sf

from geneface_jax import files
from geneface_jax.errors import AudioError

SAMPLE_RATE = 16000
MIN_SAMPLES = 640   # one 25-fps video frame at 16 kHz


def _read(path):
    """(samples [n, channels] float32, rate) via soundfile, else librosa/audioread."""
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
        return data, rate
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as sf_err:
        first_error = sf_err
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data, rate = librosa.load(str(path), sr=None, mono=False)
    except Exception as e:  # audioread raises many unrelated types
        raise AudioError(f"{path}: not a readable audio file ({first_error}; {e})") from e
    data = np.asarray(data, np.float32)
    return (data[:, None] if data.ndim == 1 else data.T), rate


def resample(wav, rate, target_rate):
    """Mono `wav [n]` from `rate` to `target_rate` Hz with soxr (HQ), `ceil(n * target /
    rate)` samples long: the samples of `librosa.resample(res_type="soxr_hq")`, without
    importing librosa's audio module (seconds at start-up)."""
    import soxr
    out = soxr.resample(np.asarray(wav, np.float32), rate, target_rate, quality="soxr_hq")
    n = -(-len(wav) * int(target_rate) // int(rate))
    return np.pad(out, (0, max(0, n - len(out))))[:n]


def load_audio(path, *, sample_rate=SAMPLE_RATE):
    """Reads an audio file as mono float32 at `sample_rate`.

    Any format soundfile (libsndfile: WAV, FLAC, OGG, MP3, ...) or, failing that,
    librosa/audioread can read; channels are averaged; resampling uses soxr (HQ).

    Args:
      path: the audio file.
      sample_rate: output rate in Hz.
    Returns:
      float32 `[n]`, nominally in [-1, 1].
    Raises:
      AudioError: missing file, not audio, no samples, shorter than one video frame
        (40 ms) after resampling, or NaN/inf samples.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise AudioError(f"{path}: audio file does not exist")
    if path.is_dir():
        raise AudioError(f"{path}: is a directory, not an audio file")
    if path.stat().st_size == 0:
        raise AudioError(f"{path}: empty file (0 bytes)")
    data, rate = _read(path)
    if data.size == 0:
        raise AudioError(f"{path}: audio file has no samples")
    if not np.all(np.isfinite(data)):
        raise AudioError(f"{path}: audio contains NaN or infinite samples")
    wav = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if rate != sample_rate:
        wav = resample(wav, rate, sample_rate)
    wav = np.ascontiguousarray(wav, np.float32)
    min_samples = MIN_SAMPLES * sample_rate // SAMPLE_RATE
    if len(wav) < min_samples:
        raise AudioError(f"{path}: audio is {len(wav) / sample_rate * 1000:.1f} ms long, "
                         f"shorter than one video frame (40 ms)")
    return wav


def save_wav(path, wav, sample_rate=SAMPLE_RATE):
    """Writes mono float audio `[n]` as 16-bit PCM WAV, atomically (temp file + rename)."""
    path = pathlib.Path(path)
    wav = np.asarray(wav, np.float32)
    if wav.ndim != 1 or not np.all(np.isfinite(wav)):
        raise AudioError(f"{path}: refusing to write audio that is not 1-D and finite "
                         f"(shape {wav.shape})")
    with files.atomic_path(path, ".wav") as tmp:
        sf.write(tmp, np.clip(wav, -1.0, 1.0), sample_rate, subtype="PCM_16", format="WAV")
    return path
