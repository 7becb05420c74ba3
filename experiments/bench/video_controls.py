r"""The video a user ships, measured: a static head pose, scheduled blinks, no torso flicker.

  python -m experiments.bench.video_controls --checkpoints=demo_out/checkpoints
      [--workdir=/tmp/geneface-video-controls] [--seconds=60] [--static_seconds=10]
      [--seed=0] [--static_frame=0]

Takes the checkpoints of a trained person (`experiments.demo` writes them to
`demo_out/checkpoints`) and the packaged speech clips in turn, repeated to `--seconds` of
audio. Three syntheses of the crop (no paste-back), each tracked frame by frame with the
face tracker (`render.face_tracking.FrameTracker`, the tracker metric's face mesh) on the
decoded H.264 video, i.e. on what a viewer gets:

  A. `--pose=static:FRAME --blink=auto`
  B. `--pose=loop --blink=none` (the reference track's own head motion)
  C. `--pose=static:FRAME --blink=none`, `--static_seconds` of the same speech

Figures (bars from the paste-back / pose / blink issue):

  head_drift_px       C: the largest distance of the tracked head position (the mean of
                      the brow and nose points 17-35, which move with the head alone: the
                      jaw line follows the mouth) from its mean over `--static_seconds`;
                      bar <= 0.5 px. The position is averaged over `--tracker_shifts`
                      passes of the tracker on the frames shifted by whole pixels
                      (`shifted_track`; shift undone): each pass places the mesh's crop
                      differently, and one pass alone jitters by about as much as the bar
                      (`head_drift_px_one_pass`). Read with the eyes open because the
                      mesh's brow and nose points follow the lids: in A the tracked
                      position jumps at the blinks (a still head that blinks measures
                      more than one that does not, on ground truth as on renders), so
                      A's figure is reported beside it as `head_drift_px_blinking` (the
                      first `--static_seconds` of A, same tracking). `head_drift_px_all`:
                      A over the whole clip (one pass). `source_head_range_px` the same
                      figure for B, whose head follows the person's video (the issue:
                      "several pixels").
  blinks_found_share  A: the tracked eye-aspect-ratio's blinks (`data.blinks.detect_blinks`
                      with `drop=TRACKED_DROP`) matched to the schedule's full closures
                      (`match_blinks`, within 2 frames): share found (bar >= 0.9) and
                      `blinks_extra` detections matching none (bar 0). The tracker's mesh
                      closes a small eye only partly (on the synthetic person's own video
                      its ratio falls to 0.6-0.7 of the median in a blink and stays above
                      0.93 of it otherwise), hence 0.8 rather than the landmarks' 0.5;
                      `tracker_on_source` is the same detector on the person's own video
                      against the blinks of its landmarks (share found, extra).
  blinks_without      B: blinks detected with `--blink=none` (bar 0).
  torso_flicker       A: with the head held still, the mean absolute change between
                      consecutive frames (grey levels) of the pixels below the tracked chin
                      (8 pixels under the lowest jaw point, the torso), in frames within 3 of
                      a blink's closure vs all other frames; a torso that reacts to the eyes
                      shows a larger change near blinks (ratio well above 1).

  paste_*             C: paste-back. The person's own dataset frames are put into an
                      off-centre box (top-left (100, 60) per 128 pixels of crop) of a source
                      video twice the crop's size over a textured background, written as
                      H.264 and recorded with `data.preprocess.source_record` (the crop box is
                      where the frames were put, not one found by the tracker); 4 s are
                      synthesized with `--paste_back` (pose loop, eyes tracked).
                      `paste_outside_max` / `_mean` / `_p99` / `_within_2` (share of
                      values <= 2): |output - source| outside the crop box over pixels and
                      channels, the source after the same H.264 round trip (bar: within 2
                      grey levels; before encoding they are equal, tests/
                      test_paste_pose_blinks.py; after it, two encodes of frames that differ
                      inside the box differ a little everywhere: rate control, so the bar
                      is read on the 99th percentile); `paste_border_step` vs
                      `source_border_step`:
                      mean colour step across the crop box's four edges in the output and
                      in the round-tripped source (bar: no larger). `paste.png`: a source
                      frame beside its pasted output.

  tracker_floor_px    the head-drift figure of the person's own ground truth rendered by
                      the synthetic world with the head held still for `--static_seconds`
                      while it speaks with the eyes open (synthetic persons only; H.264
                      round trip, tracked the same way): how far the tracked position
                      moves when nothing but the mouth does (`tracker_floor_px_one_pass`
                      one pass; `tracker_floor_px_blinking` with the person's own blinks,
                      the floor of `head_drift_px_blinking`). `--floor_only` measures just
                      these.

The last line printed is one JSON object. Each synthesis is skipped when its video is in
`--workdir` (delete the directory to measure again).
"""

import json
import os
import pathlib
import sys
import time

from absl import app
from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoints", "demo_out/checkpoints",
                    "A trained person's checkpoints (what `synthesize --checkpoints` takes).")
flags.DEFINE_string("workdir", "/tmp/geneface-video-controls", "Audio, videos and tracks.")
flags.DEFINE_float("seconds", 60.0, "Seconds of speech synthesized per run.")
flags.DEFINE_float("static_seconds", 10.0, "Head drift is measured over this first span.")
flags.DEFINE_integer("seed", 0, "Blink schedule seed.")
flags.DEFINE_integer("static_frame", 0, "Reference frame the static pose holds.")
flags.DEFINE_bool("floor_only", False, "Measure only the tracker floor (module doc).")
flags.DEFINE_integer("tracker_shifts", 4, "Tracker passes (frames shifted by 0/1 pixel down "
                     "and right) averaged for the head-position figures.")

STATIC_BAR_PX = 0.5
BLINK_FOUND_BAR = 0.9
BLINK_TOLERANCE = 2         # frames
FLICKER_WINDOW = 3          # frames either side of a blink's closure
CHIN_MARGIN = 8             # pixels under the lowest jaw point
TRACKED_DROP = 0.8          # blink threshold on a tracked eye-aspect ratio (module doc)


def head_points(points):
    """`[N, 68, 2]` -> `[N, 2]`: the mean of the brow and nose points (17-35)."""
    import numpy as np
    return np.asarray(points, np.float64)[:, 17:36].mean(1)


def shift_offsets(count):
    """The first `count` (dy, dx) whole-pixel shifts of (0,0), (1,0), (0,1), (1,1), (-1,0),
    (0,-1), (-1,-1), (1,-1), (-1,1)."""
    order = [(0, 0), (1, 0), (0, 1), (1, 1), (-1, 0), (0, -1), (-1, -1), (1, -1), (-1, 1)]
    if not 1 <= count <= len(order):
        raise ValueError(f"tracker_shifts must be in [1, {len(order)}], got {count}")
    return order[:count]


def shifted_track(tracker, frames, count):
    """Points `[N, 68, 2]` averaged over `count` tracker passes on `frames [N, H, W, 3]`
    shifted by whole pixels (edges repeated), each pass's shift subtracted again; and the
    first pass's points (the frames unshifted: one pass of the tracker)."""
    import numpy as np
    h, w = frames.shape[1:3]
    padded = np.pad(frames, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    passes = []
    for dy, dx in shift_offsets(count):
        moved = np.ascontiguousarray(padded[:, 1 - dy:1 - dy + h, 1 - dx:1 - dx + w])
        pts, _ = tracker.track(moved)
        passes.append(pts - np.asarray([dx, dy], np.float32))
    with np.errstate(invalid="ignore"):
        return (np.nanmean(np.stack(passes), axis=0) if count > 1 else passes[0]), passes[0]


def drift_px(centres):
    """Largest distance (px) of `[N, 2]` positions from their mean (NaN rows dropped)."""
    import numpy as np
    c = centres[np.isfinite(centres).all(1)]
    return float(np.linalg.norm(c - c.mean(0), axis=1).max()) if len(c) else float("nan")


def torso_flicker(frames, points, peaks):
    """(mean |frame step| below the chin near blink closures, elsewhere) in grey levels."""
    import numpy as np
    jaw = points[:, :17, 1]
    if not np.isfinite(jaw).any():                            # no face found anywhere
        return float("nan"), float("nan")
    top = int(np.ceil(np.nanmax(jaw))) + CHIN_MARGIN          # under the lowest jaw point
    if top >= frames.shape[1] - 1:
        return float("nan"), float("nan")
    step = np.abs(np.diff(frames[:, top:].astype(np.float64), axis=0)).mean(axis=(1, 2, 3))
    near = np.zeros(len(step), bool)
    for p in peaks:
        near[max(0, p - FLICKER_WINDOW - 1):p + FLICKER_WINDOW] = True
    far = ~near
    return (float(step[near].mean()) if near.any() else float("nan"),
            float(step[far].mean()) if far.any() else float("nan"))


def border_step(frames, crop):
    """Mean |pixel just inside - pixel just outside| over the crop box's four edges."""
    import numpy as np
    u0, v0, s = crop
    v = frames.astype(np.float64)
    edges = [v[:, v0:v0 + s, u0] - v[:, v0:v0 + s, u0 - 1],
             v[:, v0:v0 + s, u0 + s - 1] - v[:, v0:v0 + s, u0 + s],
             v[:, v0, u0:u0 + s] - v[:, v0 - 1, u0:u0 + s],
             v[:, v0 + s - 1, u0:u0 + s] - v[:, v0 + s, u0:u0 + s]]
    return float(np.mean([np.abs(e).mean() for e in edges]))


def measure_paste(pipe, person, root, log, seconds=4.0):
    """Part C of the module doc (`person`: the head run's dataset): figures dict, and
    `paste.png` in `root`."""
    import dataclasses

    import numpy as np
    from PIL import Image

    from experiments.bench.harness import speech_audio
    from geneface_jax import pipeline as pl
    from geneface_jax.data import preprocess
    from geneface_jax.data.synthetic import raster
    from geneface_jax.data.video import read_video, write_video
    ref = pipe.reference
    s = ref.height
    h = w = 2 * s
    u0, v0 = 100 * s // 128, 60 * s // 128
    bg = np.round(raster.make_background(np.random.default_rng(1), h, w) * 255).astype(np.uint8)
    canvas = np.repeat(bg[None], person.num_frames, 0)
    canvas[:, v0:v0 + s, u0:u0 + s] = np.asarray(person["frames"])
    src = root / "paste_source.mp4"
    if not src.is_file():
        write_video(src, canvas)
    rec = preprocess.source_record(src, w, h, 25.0, (u0, v0, s), range(person.num_frames))
    lo, hi = person.meta["splits"]["train"]
    pipe.reference = dataclasses.replace(
        ref, source=json.dumps(dict(rec, frames=rec["frames"][lo:hi])))
    audio = speech_audio(root / f"speech_{seconds:g}s.wav", seconds / 60.0)
    out = root / "paste_out.mp4"
    res = pipe.synthesize(audio, out, pl.SynthesisOptions(pose="loop", blink="track"))
    pipe.reference = ref
    assert res["pasted"]
    got = np.stack(list(read_video(out))).astype(np.int64)
    src_dec = np.stack(list(read_video(src)))
    behind = src_dec[np.asarray(rec["frames"][lo:hi])[res["track"]]]
    rt_path = root / "paste_source_roundtrip.mp4"
    write_video(rt_path, behind)                       # the output's own H.264 round trip
    rt = np.stack(list(read_video(rt_path))).astype(np.int64)
    outside = np.ones((h, w), bool)
    outside[v0:v0 + s, u0:u0 + s] = False
    diff = np.abs(got - rt)[:, outside]
    k = len(got) // 2
    img = np.concatenate([behind[k], np.full((h, 8, 3), 255, np.uint8),
                          got[k].astype(np.uint8)], 1)
    Image.fromarray(img).save(root / "paste.png")
    log(f"paste-back: {len(got)} frames at {w}x{h}, crop {(u0, v0, s)}")
    return {"paste_size": [h, w], "paste_crop": [u0, v0, s],
            "paste_outside_max": int(diff.max()),
            "paste_outside_mean": round(float(diff.mean()), 4),
            "paste_outside_within_2": round(float((diff <= 2).mean()), 5),
            "paste_outside_p99": float(np.percentile(diff, 99)),
            "paste_border_step": round(border_step(got, (u0, v0, s)), 3),
            "source_border_step": round(border_step(rt, (u0, v0, s)), 3)}


def tracker_floor(person, root, seconds, tracker, blinks=False):
    """`tracker_floor_px` (with `blinks`, `tracker_floor_px_blinking`) of the module doc for
    a person dataset: (shift-averaged, one pass) px, or None for a person not from the
    synthetic world."""
    import numpy as np

    from geneface_jax.data.synthetic import world
    from geneface_jax.data.video import read_video, write_video
    if person.meta.get("source") != "synthetic":
        return None
    arrays, _, _ = world.make_person(int(person.meta["seed"]),
                                     size=int(person["frames"].shape[1]),
                                     num_frames=int(round(seconds * 25)), progress=False,
                                     static_pose=True, blinks=blinks)
    path = root / f"floor_static_truth_{'blinking' if blinks else 'open'}.mp4"
    write_video(path, arrays["frames"])
    decoded = np.stack(list(read_video(path)))
    shifted, one = shifted_track(tracker, decoded, FLAGS.tracker_shifts)
    return (round(drift_px(head_points(shifted)), 3), round(drift_px(head_points(one)), 3))


def run(pipe, audio, out, options, log):
    """Synthesizes (unless `out` exists) and returns the decoded frames `[N, H, W, 3]`."""
    import numpy as np

    from geneface_jax.data.video import read_video
    if not out.is_file():
        t0 = time.time()
        res = pipe.synthesize(audio, out, options)
        log(f"{out.name}: {res['frames']} frames in {time.time() - t0:.0f} s "
            f"({res['render_fps']:.2f} frames/s)")
    return np.stack(list(read_video(out)))


def main(argv):
    del argv
    import numpy as np

    import jax

    from experiments.bench.machine import cpu_name
    from experiments.bench.harness import speech_audio
    from geneface_jax import pipeline as pl
    from geneface_jax.data import blinks
    from geneface_jax.data import format as fmt
    from geneface_jax.data import landmarks as lm
    from geneface_jax.mesh import make_mesh
    from geneface_jax.render.face_tracking import FrameTracker
    from geneface_jax.render.frames import read_config

    def log(msg):
        print(f"[video_controls] {msg}", file=sys.stderr, flush=True)

    root = pathlib.Path(FLAGS.workdir).absolute()
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if FLAGS.floor_only:
        person = fmt.load_person(read_config(pathlib.Path(FLAGS.checkpoints) / "head")["data"])
        tracker = FrameTracker()
        floor = tracker_floor(person, root, FLAGS.static_seconds, tracker)
        floor_b = tracker_floor(person, root, FLAGS.static_seconds, tracker, blinks=True)
        print(json.dumps({"bench": "video_controls",
                          "tracker_floor_px": floor and floor[0],
                          "tracker_floor_px_one_pass": floor and floor[1],
                          "tracker_floor_px_blinking": floor_b and floor_b[0],
                          "tracker_shifts": FLAGS.tracker_shifts,
                          "seconds": FLAGS.static_seconds,
                          "wall_seconds": round(time.time() - t0, 1)}))
        return
    audio = speech_audio(root / f"speech_{FLAGS.seconds:g}s.wav", FLAGS.seconds / 60.0)
    pipe = pl.TalkingFacePipeline.load(FLAGS.checkpoints, mesh=make_mesh(jax.devices()))
    person = fmt.load_person(pipe.head_run["data"])
    fps = 25.0
    static = pl.SynthesisOptions(pose=f"static:{FLAGS.static_frame}", blink="auto",
                                 seed=FLAGS.seed, paste_back=False)
    moving = pl.SynthesisOptions(pose="loop", blink="none", seed=FLAGS.seed, paste_back=False)
    frames_a = run(pipe, audio, root / f"static_auto_{FLAGS.seconds:g}s.mp4", static, log)
    frames_b = run(pipe, audio, root / f"loop_none_{FLAGS.seconds:g}s.mp4", moving, log)
    still = pl.SynthesisOptions(pose=f"static:{FLAGS.static_frame}", blink="none",
                                seed=FLAGS.seed, paste_back=False)
    audio_c = speech_audio(root / f"speech_{FLAGS.static_seconds:g}s.wav",
                           FLAGS.static_seconds / 60.0)
    frames_c = run(pipe, audio_c, root / f"static_none_{FLAGS.static_seconds:g}s.mp4", still,
                   log)
    tracker = FrameTracker()
    t1 = time.time()
    pts_a, found_a = tracker.track(frames_a)
    pts_b, found_b = tracker.track(frames_b)
    log(f"tracked {len(frames_a) + len(frames_b)} frames in {time.time() - t1:.0f} s")

    first = int(round(FLAGS.static_seconds * fps))
    centres_a, centres_b = head_points(pts_a), head_points(pts_b)
    schedule = blinks.blink_schedule(FLAGS.seed, len(frames_a), fps)
    found_a_blinks = blinks.detect_blinks(lm.eye_aspect_ratio(pts_a), drop=TRACKED_DROP)
    share, extra = blinks.match_blinks(schedule.peaks, found_a_blinks, BLINK_TOLERANCE)
    without = blinks.detect_blinks(lm.eye_aspect_ratio(pts_b), drop=TRACKED_DROP)
    pts_src, _ = tracker.track(np.asarray(person["frames"]))
    floor = tracker_floor(person, root, FLAGS.static_seconds, tracker)
    floor_b = tracker_floor(person, root, FLAGS.static_seconds, tracker, blinks=True)
    src_share, src_extra = blinks.match_blinks(
        blinks.detect_blinks(lm.eye_aspect_ratio(np.asarray(person["landmarks"]))),
        blinks.detect_blinks(lm.eye_aspect_ratio(pts_src), drop=TRACKED_DROP),
        BLINK_TOLERANCE)
    near, far = torso_flicker(frames_a, pts_a, schedule.peaks)
    shifted_c, pts_c = shifted_track(tracker, frames_c, FLAGS.tracker_shifts)
    drift = drift_px(head_points(shifted_c))
    drift_blinking = drift_px(head_points(shifted_track(tracker, frames_a[:first],
                                                        FLAGS.tracker_shifts)[0]))
    figures = {
        "head_drift_px": round(drift, 3),
        "head_drift_px_one_pass": round(drift_px(head_points(pts_c)), 3),
        "head_drift_px_blinking": round(drift_blinking, 3),
        "tracker_shifts": FLAGS.tracker_shifts,
        "head_drift_px_all": round(drift_px(centres_a), 3),
        "source_head_range_px": round(drift_px(centres_b[:first]), 3),
        "tracker_floor_px": floor and floor[0],
        "tracker_floor_px_one_pass": floor and floor[1],
        "tracker_floor_px_blinking": floor_b and floor_b[0],
        "blinks_scheduled": int(len(schedule.peaks)),
        "blinks_found_share": round(share, 3),
        "blinks_extra": extra,
        "blinks_without": int(len(without)),
        "tracker_on_source": [round(src_share, 3), src_extra],
        "torso_step_near_blinks": round(near, 3),
        "torso_step_elsewhere": round(far, 3),
        "face_found": [round(float(found_a.mean()), 4), round(float(found_b.mean()), 4)],
    }
    bars = {
        "static_pose": bool(drift <= STATIC_BAR_PX),
        "blinks_auto": bool(share >= BLINK_FOUND_BAR and extra == 0),
        "blinks_none": bool(len(without) == 0),
    }
    paste = measure_paste(pipe, person, root, log)
    figures.update(paste)
    bars["paste_outside_p99"] = bool(paste["paste_outside_p99"] <= 2)
    bars["paste_border"] = bool(paste["paste_border_step"] <= paste["source_border_step"])
    np.savez(root / "tracks.npz", points_static=pts_a, points_loop=pts_b, points_still=pts_c,
             peaks=schedule.peaks, detected=found_a_blinks, detected_none=without)
    print(json.dumps({
        "bench": "video_controls", "checkpoints": str(pathlib.Path(FLAGS.checkpoints)),
        "renderer": pipe.head_run.get("renderer", "mlp"), "size": int(frames_a.shape[1]),
        "seconds": FLAGS.seconds, "frames": int(len(frames_a)), **figures,
        "bars": bars, "bars_met": all(bars.values()),
        "wall_seconds": round(time.time() - t0, 1), "cpu": cpu_name(),
        "cores": os.cpu_count()}))


if __name__ == "__main__":
    app.run(main)
