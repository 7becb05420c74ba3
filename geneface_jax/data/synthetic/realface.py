"""Test data: a "real-face" talking video made at test time from one photograph.

Needs scikit-image (a test extra), which ships the photograph.

The photograph is scikit-image's `skimage.data.astronaut()` (512x512 RGB, public domain,
NASA). `render_frame` crops it to a square around the face, opens the mouth by a known
amount with a smooth image warp and rolls the whole image in-plane by a known angle, in
one bilinear resampling; `make_talking_photo` writes such frames, driven by known
schedules (`default_schedules`), as an H.264 mp4 with speech muxed in. The schedules are
the ground truth a face tracker's output can be checked against.

Coordinates: `(u, v)` = (column, row) in pixels with the origin at the centre of the
top-left pixel (pixel centres are integers), u to the right, v down. "Photo" coordinates
are on the 512x512 photograph, "frame" coordinates on the `size x size` output.

The mouth warp: in the photo the woman smiles with her upper teeth showing and her lips
parted along a curved "lip line" (the lower edge of the upper teeth, where they meet the
inner edge of the lower lip). Opening moves everything below that line - lower lip, chin,
jaw - down by up to `OPEN_MAX_PX * open_amount`: the most at the lip line's middle,
nothing at the mouth corners (the gap between the lips is a crescent), widening into a
jaw-wide displacement further down and fading out smoothly over the neck, so the image
has no seams. The gap itself is painted as a dark mouth interior with soft edges; the
upper teeth stay where they are, at its top.

Functions: `default_schedules`, `render_frame`, `crop_photo`, `frame_point`,
`make_talking_photo`.
"""

import functools
import math

import numpy as np
from scipy import ndimage

from geneface_jax.audio import io as audio_io
from geneface_jax.data.synthetic import speech as speech_lib
from geneface_jax.data.video import write_video

FPS = 25
AUDIO_RATE = audio_io.SAMPLE_RATE                     # 16 kHz

# ---------------------------------------------------------------- facts about the photo
# Measured once on the 512x512 photo, in photo pixels (u, v): the face centre, eyes and
# mouth corners with the MediaPipe face-mesh model (468 landmarks, run on a 1.5x square
# crop of the face); the lip line by eye on an 8x nearest-neighbour zoom with a pixel grid.
FACE_CENTER = (225.0, 123.0)      # centre of the landmarks' bounding box (u 179..272,
                                  # v 71..175: forehead to chin); the roll pivots here
EYE_OUTER = ((194.4, 100.6), (256.5, 103.7))   # outer eye corners (mesh 33, 263): the
                                  # photo's own eye line is tilted ~2.9 deg clockwise
MOUTH_CORNERS = ((201.1, 139.3), (246.2, 141.2))  # mesh 61, 291 (outer lip corners)
# The lip line, where the lower edge of the upper teeth meets the lower lip: its left
# end, lowest point and right end; the line is the parabola through the three, the
# mouth's middle is halfway between the ends.
LIP_LINE = ((205.0, 141.0), (222.5, 149.0), (241.0, 142.5))
CHIN_V = 175.0                    # bottom of the chin (mesh 152) at the face's middle

# ---------------------------------------------------------------- the crop
# A 288-pixel square, face centred horizontally, touching the photo's top edge: the face
# (forehead to chin, ~95x105 px; ~150 px with the hair) fills the middle third to half
# of the frame, with the suit's collar ring and the shoulders' tops below it.
CROP_ORIGIN = (81.0, 0.0)         # photo (u, v) of the crop's top-left pixel centre
CROP_SIDE = 288                   # photo pixels

# ---------------------------------------------------------------- the mouth warp
# Gap at the lip line's middle for open_amount = 1, in photo pixels: 39% of the lip
# line's length, 31% of the mouth width (mesh 61-291). Tuned with the face-mesh model: its
# inner-lip gap (13-14 over 61-291) follows open_amount linearly (Pearson r ~0.99) up to
# here; from ~16 px on it stops believing the opening and the fit collapses (the chin
# landmark jumps into the mouth).
OPEN_MAX_PX = 14.0
CRESCENT_POWER = 0.5              # the gap's profile across the mouth (see _profile)
JAW_HALF_WIDTH = 42.0             # half-width of the moving jaw well below the mouth
FAN_PX = 26.0                     # depth below the gap over which the moving region
                                  # widens from the mouth's to the jaw's width
NECK_FADE = (CHIN_V + 7.0, CHIN_V + 57.0)  # rows (photo v) over which the jaw's
                                  # displacement fades out: the dark neck and collar
GAP_FEATHER_PX = 1.2              # soft edge of the painted mouth interior (photo px)
# Mouth interior colours (RGB in [0, 1]): very dark red at the lips, near black deeper
# in (a lighter, lip-like red made the landmark model take the gap's bottom for lip).
INTERIOR_EDGE = np.array([0.22, 0.06, 0.07])
INTERIOR_DEEP = np.array([0.05, 0.01, 0.015])


_MOUTH_U = (LIP_LINE[0][0] + LIP_LINE[2][0]) / 2      # the mouth's middle column
_MOUTH_HALF_WIDTH = (LIP_LINE[2][0] - LIP_LINE[0][0]) / 2


def _lip_line_coeffs():
    """(a, b, c) of the lip line v = a + b x + c x^2, x = u - _MOUTH_U (photo pixels)."""
    a_mat = np.array([[1.0, u - _MOUTH_U, (u - _MOUTH_U) ** 2] for u, _ in LIP_LINE])
    return np.linalg.solve(a_mat, np.array([v for _, v in LIP_LINE]))


_LIP_COEFFS = _lip_line_coeffs()


def _smoothstep(x):
    """0 below 0, 1 above 1, 3x^2 - 2x^3 between (C1-continuous)."""
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


# ---------------------------------------------------------------- schedules


def default_schedules(num_frames, seed=0):
    """Known, deterministic mouth-opening and head-roll schedules.

    Opening: a run of syllables, each a smooth sin^2 bump 0 -> peak -> 0 lasting 0.12 to
    0.32 s (so the mouth opens and closes 3-8 times a second) with a peak drawn from
    [0.3, 1], and a pause (mouth closed, exactly 0) of 0.3-0.6 s before the first
    syllable and after about one syllable in five.
    Roll: a slow oscillation, 6 deg at 0.3 Hz plus 2 deg at 0.71 Hz with random phases,
    so it stays within +-8 deg and changes by less than 0.81 deg per frame.

    Args:
      num_frames: N, the number of 25-fps frames.
      seed: the random seed (the same seed gives the same schedules).
    Returns:
      (open_amount float32 [N] in [0, 1], roll_deg float32 [N]).
    """
    n = int(num_frames)
    if n < 0:
        raise ValueError(f"num_frames must be >= 0, got {num_frames}")
    rng = np.random.default_rng(seed)
    t = np.arange(n) / FPS                                   # seconds
    phase1, phase2 = rng.uniform(0.0, 2 * np.pi, size=2)
    roll = 6.0 * np.sin(2 * np.pi * 0.3 * t + phase1) + 2.0 * np.sin(
        2 * np.pi * 0.71 * t + phase2)

    opening = np.zeros(n)
    start = rng.uniform(0.3, 0.6)                            # leading pause, seconds
    end_s = n / FPS
    while start < end_s:
        length = rng.uniform(0.12, 0.32)
        peak = rng.uniform(0.3, 1.0)
        inside = (t >= start) & (t < start + length)
        opening[inside] = peak * np.sin(np.pi * (t[inside] - start) / length) ** 2
        start += length
        if rng.random() < 0.2:
            start += rng.uniform(0.3, 0.6)                   # closed stretch
    return opening.astype(np.float32), roll.astype(np.float32)


# ---------------------------------------------------------------- rendering


@functools.lru_cache(maxsize=8)
def _source(size):
    """The photo as float32 [512, 512, 3] in [0, 1], low-passed for a frame of `size`.

    Shrinking the 288-pixel crop to `size` pixels samples the photo every
    `scale = 288 / size` pixels; a Gaussian of sigma (scale - 1) / 2 (skimage's
    anti-aliasing rule) removes what that would alias. No filter when not shrinking.
    """
    try:
        from skimage import data as skimage_data
    except ImportError as e:  # pragma: no cover - a test/bench extra
        raise ImportError("the real-face test video needs scikit-image "
                          "(pip install -e '.[test]')") from e
    photo = skimage_data.astronaut().astype(np.float32) / 255.0
    sigma = (CROP_SIDE / size - 1.0) / 2.0
    if sigma > 0:
        photo = ndimage.gaussian_filter(photo, sigma=(sigma, sigma, 0), mode="nearest")
    photo.setflags(write=False)
    return photo


def _frame_grid(size):
    """Photo coordinates (u, v), each float64 [size, size], of the frame's pixel centres."""
    scale = CROP_SIDE / size
    idx = (np.arange(size) + 0.5) * scale - 0.5
    v, u = np.meshgrid(CROP_ORIGIN[1] + idx, CROP_ORIGIN[0] + idx, indexing="ij")
    return u, v


def _unrotate(u, v, roll_deg):
    """Photo coordinates before a counter-clockwise (on screen) roll about FACE_CENTER.

    The forward roll takes a point at offset (du, dv) from the face centre (v down) to
    (du cos a + dv sin a, -du sin a + dv cos a): a point right of the centre moves up,
    one above it moves left. This is its inverse, for backward sampling.
    """
    a = math.radians(roll_deg)
    cos_a, sin_a = math.cos(a), math.sin(a)
    du, dv = u - FACE_CENTER[0], v - FACE_CENTER[1]
    return (FACE_CENTER[0] + du * cos_a - dv * sin_a,
            FACE_CENTER[1] + du * sin_a + dv * cos_a)


def _profile(x):
    """The opening's horizontal profile: (1 - x^2)^CRESCENT_POWER for |x| < 1, else 0."""
    return np.clip(1.0 - x * x, 0.0, None) ** CRESCENT_POWER


def _lip_line(u):
    """(row of the lip line, offset from the mouth's middle, gap profile), each like `u`.

    The lip line is flat beyond the mouth corners; the gap profile (the crescent of the
    opening: 1 at the middle, 0 at and beyond the corners) is `_profile` of the offset
    over the mouth's half-width.
    """
    x = u - _MOUTH_U
    xc = np.clip(x, -_MOUTH_HALF_WIDTH, _MOUTH_HALF_WIDTH)
    a, b, c = _LIP_COEFFS
    return a + b * xc + c * xc * xc, x, _profile(x / _MOUTH_HALF_WIDTH)


def _jaw_shift(x, line, y, open_amount):
    """Forward displacement (photo pixels, down) of the photo point at row `y` under the lip
    line (offset `x` from the mouth's middle), for `open_amount`.

    At the lip line it is the gap (OPEN_MAX_PX * open * crescent profile), so the lower
    lip's inner edge moves down by exactly the opening. Deeper, the moving region widens
    from the mouth's to the jaw's width over FAN_PX (the cheeks beside the mouth are
    stretched, never folded: the shift only grows with depth there), and it fades out
    over the neck (NECK_FADE) slowly enough (slope > -1) that the map stays monotonic.
    """
    depth = y - line
    width = _MOUTH_HALF_WIDTH + (JAW_HALF_WIDTH - _MOUTH_HALF_WIDTH) * _smoothstep(
        depth / FAN_PX)
    spread = _profile(x / width)
    fade = 1.0 - _smoothstep((y - NECK_FADE[0]) / (NECK_FADE[1] - NECK_FADE[0]))
    return OPEN_MAX_PX * open_amount * spread * fade


def _mouth_warp(u, v, open_amount, feather):
    """Backward mouth-opening map, on unrolled photo coordinates.

    The forward warp moves each photo point (u, y) under the lip line to
    (u, y + _jaw_shift(...)); y + shift increases with y, so each output row v below the
    gap has one source row, found by bisection. Output pixels between the lip line and
    the displaced lower lip are the gap: the mouth interior.

    Args:
      u, v: float64 [...] photo coordinates of output pixels (after undoing the roll).
      open_amount: 0 (the photo's mouth) .. 1 (wide open).
      feather: soft-edge width of the painted interior in photo pixels.
    Returns:
      (source v [...]: the row to sample the photo at (the column is unchanged),
       alpha [...] in [0, 1]: coverage of the painted mouth interior,
       frac [...] in [0, 1]: relative height in the gap, 0 at its top (the lip line)
       and 1 at its bottom (the lower lip), 0 outside it).
    """
    open_amount = float(open_amount)
    zeros = np.zeros_like(v)
    if open_amount <= 0.0:
        return v, zeros, zeros            # exactly the photo's geometry
    line, x, crescent = _lip_line(u)
    gap = OPEN_MAX_PX * open_amount * crescent
    into = v - line                                       # depth under the lip line
    in_gap = (into >= 0.0) & (into < gap)
    # Pixels the jaw can have moved into: under the gap, within the jaw's width, above
    # the end of the fade (plus the largest shift).
    moved = ((into >= gap) & (np.abs(x) < JAW_HALF_WIDTH)
             & (v < NECK_FADE[1] + OPEN_MAX_PX * open_amount))
    src_v = np.where(in_gap, line, v)   # in the gap: the lip line's pixels, painted over
    xm, linem, vm = x[moved], line[moved], v[moved]
    lo, hi = linem, vm.copy()           # the source row lies in [lip line, v]
    for _ in range(24):                 # bracket / 2^24: well below 1e-4 px
        mid = 0.5 * (lo + hi)
        past = mid + _jaw_shift(xm, linem, mid, open_amount) > vm
        hi = np.where(past, mid, hi)
        lo = np.where(past, lo, mid)
    src_v[moved] = 0.5 * (lo + hi)
    # Interior coverage: rises over `feather` pixels inside each edge of the gap.
    alpha = np.where(in_gap, _smoothstep(into / feather) * _smoothstep((gap - into) / feather),
                     0.0)
    frac = np.where(in_gap, into / np.maximum(gap, 1e-9), 0.0)
    return src_v, alpha, frac


def _interior_colour(frac):
    """Mouth-interior RGB [..., 3] in [0, 1] at relative gap height `frac` [...]: dark red
    at the lips, near black in the middle."""
    depth = 1.0 - np.abs(2.0 * frac - 1.0)
    return INTERIOR_EDGE + (INTERIOR_DEEP - INTERIOR_EDGE) * np.sqrt(depth)[..., None]


def _render(open_amount, roll_deg, size, warp=True):
    if int(size) != size or size <= 0:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    if not 0.0 <= open_amount <= 1.0:
        raise ValueError(f"open_amount must be in [0, 1], got {open_amount}")
    photo = _source(int(size))
    u, v = _unrotate(*_frame_grid(int(size)), float(roll_deg))
    if warp:
        src_v, alpha, frac = _mouth_warp(
            u, v, open_amount, feather=max(GAP_FEATHER_PX, 0.75 * CROP_SIDE / size))
    else:
        src_v, alpha, frac = v, None, None
    coords = np.stack([src_v, u])
    out = np.stack([ndimage.map_coordinates(photo[..., ch], coords, order=1,
                                            mode="nearest") for ch in range(3)],
                   axis=-1).astype(np.float64)   # float64 either way: identical roundings
    if alpha is not None and np.any(alpha > 0):
        out = out + alpha[..., None] * (_interior_colour(frac) - out)
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


def render_frame(open_amount, roll_deg, size=256):
    """One frame of the talking photo.

    The frame is the 288-pixel square crop of the photo at CROP_ORIGIN, resampled to
    `size` pixels, with the mouth opened by `open_amount` and the whole picture rolled
    by `roll_deg` about the face centre, in one bilinear resampling (edge pixels repeated
    where the rolled crop reaches past the photo's top edge).

    Roll direction: positive `roll_deg` turns the picture counter-clockwise as seen on
    screen, so the top of the head moves towards the image's left and the eye on the
    image's right rises; the landmark eye line (image-left eye -> image-right eye),
    measured as atan2(-(dv), du) in degrees, increases by `roll_deg`. The photo's own
    eye line is at about -2.9 deg (see EYE_OUTER).

    Args:
      open_amount: mouth opening in [0, 1]: 0 is the photo's mouth (a smile, lips
        parted over the upper teeth), 1 opens the lips' middle by OPEN_MAX_PX photo
        pixels (31% of the mouth width), linearly in between.
      roll_deg: in-plane rotation in degrees, counter-clockwise on screen.
      size: output side in pixels (even for video).
    Returns:
      uint8 [size, size, 3] RGB. open_amount = 0 and roll_deg = 0 give exactly
      `crop_photo(size)`.
    """
    return _render(open_amount, roll_deg, size)


def crop_photo(size=256):
    """The plain crop, no mouth warp, no roll: uint8 [size, size, 3].

    Resampled from the photo as `render_frame` does; at size = CROP_SIDE it is exactly
    `astronaut()[0:288, 81:369]`.
    """
    return _render(0.0, 0.0, size, warp=False)


def frame_point(point, size=256, roll_deg=0.0):
    """Where the photo point `(u, v)` is in a frame of `size` rolled by `roll_deg`.

    Args:
      point: photo coordinates (u, v); floats or arrays of the same shape.
      size: frame side in pixels.
      roll_deg: the frame's roll (degrees, counter-clockwise on screen).
    Returns:
      frame coordinates (u, v) in pixels (pixel centres at integers). Points under the
      lip line also move down when the mouth is open; this ignores that.
    """
    pu, pv = point
    a = math.radians(roll_deg)
    du, dv = pu - FACE_CENTER[0], pv - FACE_CENTER[1]
    pu = FACE_CENTER[0] + du * math.cos(a) + dv * math.sin(a)
    pv = FACE_CENTER[1] - du * math.sin(a) + dv * math.cos(a)
    scale = size / CROP_SIDE
    return ((pu - CROP_ORIGIN[0] + 0.5) * scale - 0.5,
            (pv - CROP_ORIGIN[1] + 0.5) * scale - 0.5)


# ---------------------------------------------------------------- the video


def _speech_track(speech, num_samples):
    """The speech file as float32 [num_samples] at 16 kHz, looped or cut to that length."""
    wav = audio_io.load_audio(speech_lib.default_clip() if speech is None else speech,
                              sample_rate=AUDIO_RATE)
    reps = -(-num_samples // len(wav))
    return np.ascontiguousarray(np.tile(wav, reps)[:num_samples])


def _schedule(values, n, name):
    values = np.asarray(values, np.float32)
    if values.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) (one value per frame), got "
                         f"{values.shape}")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return values


def make_talking_photo(path, *, seconds=4.0, size=256, speech=None, open_schedule=None,
                       roll_schedule=None, seed=0):
    """Writes the talking photo as an H.264 mp4 (25 fps) with speech muxed in as AAC.

    Args:
      path: the output mp4 (its directory must exist).
      seconds: video length; N = round(seconds * 25) frames.
      size: frame side in pixels (even).
      speech: a speech audio file (any format `geneface_jax.audio.io.load_audio` reads),
        by default the packaged `en_us_male.wav` (`speech.default_clip()`); resampled to 16 kHz
        mono and looped or cut to exactly N / 25 s (N * 640 samples).
      open_schedule: mouth opening per frame, [N] in [0, 1]; default from
        `default_schedules(N, seed)`.
      roll_schedule: roll per frame in degrees, [N]; default from `default_schedules`.
      seed: seed of the default schedules.
    Returns:
      dict(open=float32 [N], roll_deg=float32 [N], num_frames=N, size=size,
           mouth_center=(u, v), face_center=(u, v)): the schedules used, and in frame
      pixels of the unrolled frame the middle of the lip line (the top middle of the
      opening: the mouth's centre when closed) and the face centre (the roll's pivot,
      so also where it stays in rolled frames).
    """
    n = int(round(seconds * FPS))
    if n <= 0:
        raise ValueError(f"seconds must give at least one frame, got {seconds}")
    default_open, default_roll = default_schedules(n, seed)
    opening = _schedule(default_open if open_schedule is None else open_schedule, n,
                        "open_schedule")
    roll = _schedule(default_roll if roll_schedule is None else roll_schedule, n,
                     "roll_schedule")
    if np.any(opening < 0) or np.any(opening > 1):
        raise ValueError("open_schedule values must be in [0, 1]")
    audio = _speech_track(speech, n * AUDIO_RATE // FPS)
    frames = (render_frame(float(o), float(r), size) for o, r in zip(opening, roll))
    write_video(path, frames, fps=FPS, audio=audio, audio_rate=AUDIO_RATE)
    mouth = frame_point((_MOUTH_U, float(_LIP_COEFFS[0])), size)
    return dict(open=opening, roll_deg=roll, num_frames=n, size=int(size),
                mouth_center=tuple(map(float, mouth)),
                face_center=tuple(map(float, frame_point(FACE_CENTER, size))))
