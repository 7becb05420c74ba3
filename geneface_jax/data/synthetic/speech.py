"""Speech for the synthetic world: the shipped clips cut, perturbed and concatenated.

The clips shipped with the package (`geneface_jax/data/synthetic/speech_clips/*.wav`,
16 kHz mono, four languages: German, British English, American English, Mandarin) are
the only real audio available offline. Utterances are built from random segments of them,
each pitch-shifted, tempo-changed and gain-changed, separated by silent gaps, with
background noise added at a random SNR, so that a corpus of hundreds of distinct
utterances (with real pauses, which the articulation oracle must close the mouth on) can
be made from four files. Everything is a pure function of a `np.random.Generator`.
"""

import os
import pathlib

import librosa
import numpy as np
import soxr

from geneface_jax.audio import features as feat
from geneface_jax.audio import io as audio_io
from geneface_jax.errors import DatasetError

SR = feat.SAMPLE_RATE
# The clips travel as package data (setup.cfg `package_data`), so an installed package
# (editable or not) finds them next to this module.
PACKAGED_SPEECH_DIR = pathlib.Path(__file__).resolve().parent / "speech_clips"


def default_speech_dir():
    """Directory of the speech clips: `$GENEFACE_SPEECH_DIR` if set, else the packaged ones.

    Raises:
      DatasetError: the directory named by `$GENEFACE_SPEECH_DIR` (or the packaged one, in
        a broken installation) does not exist or holds no `.wav` file.
    """
    env = os.environ.get("GENEFACE_SPEECH_DIR")
    directory = pathlib.Path(env) if env else PACKAGED_SPEECH_DIR
    if not directory.is_dir() or not any(directory.glob("*.wav")):
        origin = ("$GENEFACE_SPEECH_DIR" if env
                  else "the package's speech clips (a broken installation? reinstall it)")
        raise DatasetError(f"{directory}: no .wav speech clips found ({origin})")
    return directory


def default_clip():
    """The English clip (`en_us_male.wav`) that demos and examples use when given none."""
    return default_speech_dir() / "en_us_male.wav"


def load_clips(speech_dir=None):
    """Loads every `*.wav` of the speech directory, sorted by name: list of float32 [n]."""
    speech_dir = pathlib.Path(speech_dir) if speech_dir else default_speech_dir()
    paths = sorted(speech_dir.glob("*.wav"))
    if not paths:
        raise DatasetError(f"{speech_dir}: no .wav speech clips found")
    return [audio_io.load_audio(p) for p in paths]


def perturb(wav, rng, *, pitch_semitones=(-3.0, 3.0), tempo=(0.85, 1.15)):
    """Pitch-shifts and tempo-changes a segment independently (phase vocoder + soxr)."""
    ratio = 2.0 ** (rng.uniform(*pitch_semitones) / 12.0)
    rate = rng.uniform(*tempo)
    # Stretch so that resampling by `ratio` afterwards restores the tempo `rate`.
    stretched = librosa.effects.time_stretch(wav, rate=rate / ratio)
    return soxr.resample(stretched, SR * ratio, SR, "HQ").astype(np.float32)


def _segment(clips, rng, min_s, max_s):
    clip = clips[rng.integers(len(clips))]
    length = int(rng.uniform(min_s, max_s) * SR)
    length = min(length, len(clip))
    start = rng.integers(0, len(clip) - length + 1)
    return clip[start:start + length]


def _normalize(wav, rng, gain_db):
    peak = np.max(np.abs(wav)) + 1e-9
    return wav / peak * 0.5 * 10.0 ** (rng.uniform(*gain_db) / 20.0)


def make_speech(clips, rng, num_samples, *, segment_s=(0.7, 2.2), gap_s=(0.15, 0.6),
                lead_s=(0.1, 0.35), gain_db=(-8.0, 3.0), snr_db=(28.0, 45.0),
                pitch_semitones=(-3.0, 3.0), tempo=(0.85, 1.15)):
    """A speech track of exactly `num_samples` samples: silence, then segments and gaps.

    Each segment is a random cut of a random clip, perturbed (pitch, tempo, gain); gaps are
    digital silence before noise is added to the whole track at a random SNR.
    Returns float32 `[num_samples]` at 16 kHz.
    """
    out = np.zeros(num_samples, np.float32)
    pos = int(rng.uniform(*lead_s) * SR)
    while pos < num_samples - int(0.3 * SR):
        seg = perturb(_segment(clips, rng, *segment_s), rng,
                      pitch_semitones=pitch_semitones, tempo=tempo)
        seg = _normalize(seg, rng, gain_db)
        fade = min(160, len(seg) // 2)
        ramp = np.linspace(0.0, 1.0, fade, dtype=np.float32)
        seg[:fade] *= ramp
        seg[len(seg) - fade:] *= ramp[::-1]
        n = min(len(seg), num_samples - pos)
        out[pos:pos + n] = seg[:n]
        pos += n + int(rng.uniform(*gap_s) * SR)
    speech_power = np.mean(out[out != 0] ** 2) if np.any(out) else 1e-6
    noise_power = speech_power / 10.0 ** (rng.uniform(*snr_db) / 10.0)
    out += rng.normal(0.0, np.sqrt(noise_power), num_samples).astype(np.float32)
    return np.clip(out, -1.0, 1.0)
