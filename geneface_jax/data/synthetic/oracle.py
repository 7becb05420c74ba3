"""Articulation oracle: speech -> mouth motion, eye blinks, head pose at 25 fps.

Mouth opening follows the speech loudness (frame RMS energy in dB relative to the
utterance's speech level, smoothed) and mouth width follows the spectral shape (share of
energy in the upper half of the mel bands: bright sounds widen, dark ones round the lips).
During silence the activity is exactly 0, so the mouth is closed.

How much and how wide a person articulates is a per-utterance *style* drawn from a
multi-modal mixture (most utterances subdued, some very expressive). Given the audio, the
motion is therefore one-to-many: a regression to the mean under-articulates (the "mean
face" problem GeneFace's VAE addresses), while sampling a style keeps the true spread.
"""

import dataclasses

import numpy as np

from geneface_jax.audio import features as feat

# Style modes: (weight, opening gain, width gain, smile in head units).
STYLE_MODES = ((0.60, 0.30, 0.4, 0.0000),
               (0.25, 1.20, 1.0, 0.0015),
               (0.15, 2.20, 1.6, 0.0035))


@dataclasses.dataclass(frozen=True)
class Style:
    """Per-utterance articulation style."""
    mode: int
    gain: float        # multiplies the mouth opening
    width_gain: float  # multiplies the spectral width modulation
    smile: float       # constant lip-corner raise (head units)
    rest_width: float  # mouth width factor at rest


def sample_style(rng, weights=None, rest_width=1.0):
    """Draws a Style from the mixture `STYLE_MODES` (optionally re-weighted)."""
    w = np.array([m[0] for m in STYLE_MODES]) if weights is None else np.asarray(weights)
    mode = int(rng.choice(len(STYLE_MODES), p=w / w.sum()))
    _, gain, width_gain, smile = STYLE_MODES[mode]
    return Style(mode=mode, gain=gain * float(np.exp(rng.normal(0.0, 0.08))),
                 width_gain=width_gain * float(np.exp(rng.normal(0.0, 0.1))),
                 smile=smile + float(rng.normal(0.0, 0.0004)), rest_width=rest_width)


def speech_cues(mel, energy):
    """Per-video-frame speech cues from features at 50 Hz.

    Args:
      mel: `[2T, n_mels]` log-mel; energy: `[2T]` RMS amplitude (see audio.features).
    Returns:
      dict of `[T]` float arrays: `energy` (RMS, linear), `activity` in [0, 1] (0 in
      silence), `brightness` in [-1, 1] (spectral shape, 0 in silence).
    """
    num = len(energy) // 2
    e = feat.video_frame_rms(energy)
    db = 20.0 * np.log10(e + 1e-8)
    ref = np.percentile(db, 95)
    activity = np.clip((db - ref + 30.0) / 22.0, 0.0, 1.0)
    power = np.exp(mel[:2 * num]).reshape(num, 2, -1).mean(axis=1)
    half = power.shape[1] // 2
    share = np.log(power[:, half:].sum(-1) + 1e-10) - np.log(power.sum(-1) + 1e-10)
    speaking = activity > 0.2
    if speaking.sum() >= 2:
        mu, sd = share[speaking].mean(), share[speaking].std() + 1e-6
    else:
        mu, sd = share.mean(), share.std() + 1e-6
    brightness = np.clip((share - mu) / (2.0 * sd), -1.0, 1.0) * activity
    return dict(energy=e.astype(np.float32), activity=activity.astype(np.float32),
                brightness=brightness.astype(np.float32))


def _smooth3(x):
    padded = np.pad(x, 1, mode="edge")
    return 0.25 * padded[:-2] + 0.5 * padded[1:-1] + 0.25 * padded[2:]


def articulate(cues, style):
    """Mouth articulation `[T]` arrays (`open`, `width`, `smile`) from speech cues."""
    act = _smooth3(cues["activity"] ** 1.2)
    act = np.where(cues["activity"] + np.roll(cues["activity"], 1)
                   + np.roll(cues["activity"], -1) > 0, act, 0.0)
    open_ = style.gain * act
    width = style.rest_width * (1.0 + 0.12 * style.width_gain * _smooth3(cues["brightness"]))
    smile = np.full_like(open_, style.smile) * (0.6 + 0.4 * act)
    return dict(open=open_.astype(np.float32), width=width.astype(np.float32),
                smile=smile.astype(np.float32))


def blinks(rng, num_frames, *, mean_interval_s=3.5, min_interval_s=1.2):
    """Eye-closure track `[T]` in [0, 1]: blinks of 5 frames at random (Poisson) times."""
    profile = np.array([0.35, 0.85, 1.0, 0.7, 0.3])
    out = np.zeros(num_frames, np.float32)
    t = rng.uniform(0.5, mean_interval_s) * feat.VIDEO_FPS
    while t < num_frames:
        i = int(t)
        n = min(len(profile), num_frames - i)
        out[i:i + n] = np.maximum(out[i:i + n], profile[:n])
        t += (min_interval_s + rng.exponential(mean_interval_s - min_interval_s)) \
            * feat.VIDEO_FPS
    return out


def rotation_matrix(yaw, pitch, roll):
    """`[..., 3, 3]` rotation R = Ry(yaw) Rx(pitch) Rz(roll), angles in radians."""
    yaw, pitch, roll = np.broadcast_arrays(yaw, pitch, roll)
    cy, sy, cp, sp, cr, sr = (np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch),
                              np.cos(roll), np.sin(roll))
    one, zero = np.ones_like(yaw), np.zeros_like(yaw)
    ry = np.stack([np.stack([cy, zero, sy], -1), np.stack([zero, one, zero], -1),
                   np.stack([-sy, zero, cy], -1)], -2)
    rx = np.stack([np.stack([one, zero, zero], -1), np.stack([zero, cp, -sp], -1),
                   np.stack([zero, sp, cp], -1)], -2)
    rz = np.stack([np.stack([cr, -sr, zero], -1), np.stack([sr, cr, zero], -1),
                   np.stack([zero, zero, one], -1)], -2)
    return ry @ rx @ rz


def head_motion(rng, num_frames, *, max_angles_deg=(7.0, 4.0, 3.0),
                max_shift=(0.006, 0.004, 0.008)):
    """Smooth random head motion: (angles `[T, 3]` yaw/pitch/roll in radians, shift `[T, 3]`).

    Each coordinate is a sum of three sinusoids of 0.04-0.4 Hz with random phases, scaled
    so that its amplitude never exceeds the given maximum.
    """
    t = np.arange(num_frames) / feat.VIDEO_FPS
    out = []
    for amp in list(max_angles_deg) + list(max_shift):
        freqs = rng.uniform(0.04, 0.4, 3)
        phases = rng.uniform(0, 2 * np.pi, 3)
        weights = rng.uniform(0.3, 1.0, 3)
        sig = (weights[:, None] * np.sin(2 * np.pi * freqs[:, None] * t + phases[:, None]))
        out.append(amp * sig.sum(0) / weights.sum())
    out = np.stack(out, -1)
    return np.deg2rad(out[:, :3]), out[:, 3:]
