"""Eye blinks at inference: a natural blink schedule and the person's own eye shapes.

`blink_schedule(seed, num_frames)` draws when the eyes blink and for how long; it is a pure
function of its arguments. The statistics are those of spontaneous human blinking:

- Rate: about 17 blinks a minute at rest (Bentivoglio et al. 1997, "Analysis of blink
  rate patterns in normal subjects", Movement Disorders 12(6):1028-1034: 17 / min at
  rest, 26 in conversation, 4.5 reading). The schedule's default mean interval, 3.5 s,
  gives 17 a minute (the 15-20 range of the literature's resting figures).
- Intervals: never shorter than a refractory `min_interval_s` (1 s), the rest an
  Erlang(2) draw (a skewed, unimodal inter-blink distribution as measured; a pure
  exponential would make many back-to-back blinks).
- Duration: 100 to 400 ms per blink (the commonly cited range, e.g. Schiffman 2001,
  "Sensation and Perception", BioNumbers BNID 100706); drawn log-normally around 200 ms
  and clipped to that range. The lid closes in the first third of a blink and reopens in
  the rest (closing is faster than reopening: Caffier et al. 2003, "Experimental
  evaluation of eye-blink parameters as a drowsiness measure", Eur J Appl Physiol
  89:319-325).

`eye_shapes(landmarks)` takes the person's open and closed eye points (68-point
topology, points 36-47) from its own tracked frames, and `apply_closure` moves the eye
points between them by a closure track in [0, 1].
"""

import dataclasses

import numpy as np

from geneface_jax.data import landmarks as lm
from geneface_jax.errors import InputError, ShapeError

EYES = np.concatenate([lm.RIGHT_EYE, lm.LEFT_EYE])
BLINK_MODES = ("track", "auto", "none")
RATE_PER_MIN = (15.0, 20.0)          # the resting rate range the defaults fall in
DURATION_S = (0.1, 0.4)              # blink duration range
CLOSING_SHARE = 1.0 / 3.0            # share of a blink spent closing the lid


@dataclasses.dataclass(frozen=True)
class BlinkSchedule:
    """Blinks over a clip: `starts` and `durations` in seconds `[B]`, the frame of each
    blink's full closure `peaks [B]` (int), and `closure [N]` in [0, 1] per video frame."""
    starts: np.ndarray
    durations: np.ndarray
    peaks: np.ndarray
    closure: np.ndarray


def blink_schedule(seed, num_frames, fps=25.0, *, mean_interval_s=3.5, min_interval_s=1.0,
                   median_duration_s=0.2, duration_sigma=0.35):
    """A natural blink schedule of `num_frames` video frames (module doc), seeded.

    The first blink comes after a uniform 0.5 s to `mean_interval_s`. Each blink's lid
    closure rises linearly to 1 over its first third and falls back to 0 over the rest,
    sampled at the frame times; the frame nearest the full closure is set to exactly 1
    (so a 100 ms blink, 2.5 frames at 25 fps, still shows a closed frame).

    Returns:
      BlinkSchedule (blinks wholly inside the clip; later draws are dropped).
    """
    if num_frames < 0 or fps <= 0:
        raise InputError(f"need num_frames >= 0 and fps > 0, got {num_frames}, {fps}")
    if not 0 < min_interval_s < mean_interval_s:
        raise InputError("need 0 < min_interval_s < mean_interval_s")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x626C696E6B]))
    seconds = num_frames / fps
    starts, durations = [], []
    t = rng.uniform(0.5, mean_interval_s)
    while True:
        d = float(np.clip(median_duration_s * np.exp(duration_sigma * rng.standard_normal()),
                          *DURATION_S))
        if t + d > seconds:
            break
        starts.append(t)
        durations.append(d)
        t += d + min_interval_s + rng.gamma(2.0, (mean_interval_s - min_interval_s) / 2.0)
    starts, durations = np.asarray(starts, np.float64), np.asarray(durations, np.float64)
    closure = np.zeros(num_frames, np.float32)
    times = np.arange(num_frames) / fps
    peaks = np.zeros(len(starts), np.int64)
    for i, (s, d) in enumerate(zip(starts, durations)):
        x = (times - s) / d
        c = np.where(x < CLOSING_SHARE, x / CLOSING_SHARE,
                     (1.0 - x) / (1.0 - CLOSING_SHARE))
        c = np.where((x > 0) & (x < 1), c, 0.0)
        peaks[i] = min(num_frames - 1, int(round((s + CLOSING_SHARE * d) * fps)))
        c[peaks[i]] = 1.0
        closure = np.maximum(closure, c.astype(np.float32))
    return BlinkSchedule(starts=starts, durations=durations, peaks=peaks, closure=closure)


def eye_shapes(landmarks, open_quantile=0.75):
    """The person's open and closed eyes from its own frames `[L, 68, 3]`.

    Open: the mean eye points (36-47) of the frames whose eye aspect ratio is at or above
    its `open_quantile`; closed: the eye points of the frame with the smallest ratio.
    Returns (open `[12, 3]`, closed `[12, 3]`, dict(open_ear, closed_ear)).
    """
    lms = np.asarray(landmarks, np.float64)
    if lms.ndim != 3 or lms.shape[1:] != (68, 3) or not len(lms):
        raise ShapeError(f"landmarks must be [L, 68, 3] with L >= 1, got {lms.shape}")
    ear = lm.eye_aspect_ratio(lms)
    opened = ear >= np.quantile(ear, open_quantile)
    open_eyes = lms[opened][:, EYES].mean(0)
    closed_eyes = lms[int(np.argmin(ear))][EYES]
    return (open_eyes.astype(np.float32), closed_eyes.astype(np.float32),
            dict(open_ear=float(ear[opened].mean()), closed_ear=float(ear.min())))


def apply_closure(landmarks, closure, open_eyes, closed_eyes):
    """`landmarks [N, 68, 3]` with the eye points set to `open + closure (closed - open)`
    per frame (`closure [N]` in [0, 1]); other points unchanged."""
    out = np.array(landmarks, np.float32, copy=True)
    c = np.asarray(closure, np.float32)
    if c.shape != (len(out),):
        raise ShapeError(f"closure must be [{len(out)}], got {c.shape}")
    c = np.clip(c, 0.0, 1.0)[:, None, None]
    out[:, EYES] = (1.0 - c) * np.asarray(open_eyes, np.float32) + c * np.asarray(
        closed_eyes, np.float32)
    return out


def detect_blinks(ear, *, drop=0.5, min_gap=3):
    """Blink frames from an eye-aspect-ratio track `[N]` (NaN where no face): runs of
    frames whose ratio falls below `drop` x its median (runs less than `min_gap` frames
    apart are one blink), each given by its lowest frame. Returns int frame indices `[B]`."""
    ear = np.asarray(ear, np.float64)
    ok = np.isfinite(ear)
    if not ok.any():
        return np.zeros(0, np.int64)
    thr = drop * np.median(ear[ok])
    filled = np.where(ok, ear, np.inf)
    idx = np.flatnonzero(filled < thr)
    if not len(idx):
        return np.zeros(0, np.int64)
    # runs of low frames; runs closer than `min_gap` frames are one blink
    breaks = np.flatnonzero(np.diff(idx) > min_gap) + 1
    out = [run[np.argmin(filled[run])] for run in np.split(idx, breaks)]
    return np.asarray(out, np.int64)


def match_blinks(scheduled, detected, tolerance=2):
    """(share of `scheduled` frames with a detection within `tolerance` frames, number of
    detections matching no scheduled blink)."""
    scheduled, detected = np.asarray(scheduled), np.asarray(detected)
    if not len(scheduled):
        return 1.0, int(len(detected))
    hit = [np.any(np.abs(detected - s) <= tolerance) for s in scheduled]
    extra = sum(not np.any(np.abs(scheduled - d) <= tolerance) for d in detected)
    return float(np.mean(hit)), int(extra)
