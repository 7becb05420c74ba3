r"""Speed of the tracker metric (`render.face_tracking`), frames/s.

  python -m experiments.bench.tracking [--size=128] [--frames=100] [--repeats=3]

Tracks `--frames` ground-truth frames of the synthetic person at `--size` pixels (each
frame upsampled to >= 384 px, BlazeFace + face mesh through LiteRT, one frame at a time)
and prints the median frames/s over `--repeats` passes, the share of frames with a face,
where a frame's time goes (upsampling, detection, mesh) from one more pass, and the
metric's calibration on the same frames: the figures of the frames shifted right by one
pixel (`shift_*`: LMD should read ~1 px) and of their H.264 round trip (`floor_*`: the
noise floor). The last line printed is one JSON object. There is no PyTorch reference:
the metric runs the same LiteRT models any implementation would.
"""

import json
import tempfile
import time

from absl import app
from absl import flags

flags.DEFINE_integer("size", 128, "Frame size in pixels (square).")
flags.DEFINE_integer("frames", 100, "Frames tracked per pass.")
flags.DEFINE_integer("repeats", 3, "Timed passes (median reported).")
FLAGS = flags.FLAGS


def _breakdown(tracker, frames):
    """Seconds per frame of upsampling, detection and the two mesh passes."""
    import numpy as np
    from PIL import Image

    from geneface_jax.render import face_tracking as ft
    n, h, w, _ = frames.shape
    k = ft.upsample_factor(h, w, tracker.min_side)
    finder = tracker._finder
    times = dict(upsample=0.0, detect=0.0, mesh=0.0)
    for frame in frames:
        t0 = time.perf_counter()
        image = np.asarray(Image.fromarray(frame).resize((w * k, h * k), Image.BICUBIC))
        t1 = time.perf_counter()
        dets = finder.detector.detect(image)
        t2 = time.perf_counter()
        if dets:
            pts, _ = finder.mesh.from_detection(image, dets[0])
            finder.mesh.from_points(image, pts)
        times["upsample"] += t1 - t0
        times["detect"] += t2 - t1
        times["mesh"] += time.perf_counter() - t2
    return {key: round(1000 * v / n, 2) for key, v in times.items()}


def main(argv):
    del argv
    import numpy as np

    from geneface_jax.data.synthetic import world
    from geneface_jax.render import face_tracking as ft

    frames = world.make_person(0, size=FLAGS.size, num_frames=FLAGS.frames)[0]["frames"]
    tracker = ft.FrameTracker()
    tracker.track(frames[:2])                                   # warm-up
    rates, found = [], None
    for _ in range(FLAGS.repeats):
        t0 = time.perf_counter()
        _, found = tracker.track(frames)
        rates.append(len(frames) / (time.perf_counter() - t0))
    shifted = np.concatenate([frames[:, :, :1], frames[:, :, :-1]], axis=2)
    shift = ft.track_and_compare(shifted, frames, tracker)
    with tempfile.TemporaryDirectory() as tmp:
        floor = ft.noise_floor(frames, tmp, tracker)
    calibration = {f"shift_{k}": round(v, 3) for k, v in shift.items()
                   if k.startswith(("lmd", "tracked"))}
    calibration.update({k: round(v, 3) for k, v in floor.items()})
    out = dict(size=FLAGS.size, frames=FLAGS.frames, upsample=ft.upsample_factor(
        FLAGS.size, FLAGS.size), frames_per_s=round(float(np.median(rates)), 1),
        frames_per_s_all=[round(r, 1) for r in rates], face_found=float(found.mean()),
        ms_per_frame=_breakdown(tracker, frames), **calibration)
    print(json.dumps(out))


if __name__ == "__main__":
    app.run(main)
