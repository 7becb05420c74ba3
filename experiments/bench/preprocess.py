r"""Real-video preprocessing speed and accuracy on the real-face test video, frames/s.

  python -m experiments.bench.preprocess                      # 20 s, 512 px in and out
  python -m experiments.bench.preprocess --seconds=4 --source=256 --size=128   # seconds

Makes the talking astronaut (`geneface_jax.data.synthetic.realface`: a real photograph,
mouth warped open on a known schedule, known in-plane rolls, speech muxed in) at
`--source` pixels, runs `preprocess.preprocess_video` at `--size`, and prints frames/s of
the tracking pass (decode + BlazeFace + face mesh through LiteRT), of the mask pass
(decode + crop + selfie segmentation + mask labels + background accumulation) and
overall, a per-stage time breakdown of the mask pass measured on the same frames, and the
accuracy against the known schedules: Pearson r of the mouth opening, mean/max roll error
in degrees. The last line printed is one JSON object. There is no PyTorch reference:
GeneFace's preprocessing (3DMM fitting, BiSeNet parsing) is a different algorithm.
"""

import json
import os
import tempfile
import time

from absl import app
from absl import flags

flags.DEFINE_float("seconds", 20.0, "Length of the test video.")
flags.DEFINE_integer("source", 512, "Source video size in pixels (square).")
flags.DEFINE_integer("size", 512, "Output dataset size in pixels.")
FLAGS = flags.FLAGS


def _breakdown(video, cfg, summary, frames=25):
    """Seconds per frame of each mask-pass step on the first `frames` frames."""
    import numpy as np
    from scipy import ndimage

    from geneface_jax.data import face_models
    from geneface_jax.data import preprocess as pp
    from geneface_jax.data import video as video_io

    u0, v0, side = summary["crop"]
    seg = face_models.PersonSegmenter()
    times = dict(decode=0.0, crop=0.0, segment=0.0, labels=0.0)
    it = video_io.read_video(video, fps=25)
    pts = np.full((68, 2), cfg.size / 2.0)
    pts[8, 1] += cfg.size / 6
    for _ in range(frames):
        t = time.perf_counter()
        img = next(it)
        times["decode"] += time.perf_counter() - t
        t = time.perf_counter()
        crop = face_models.resize(img[v0:v0 + side, u0:u0 + side], cfg.size, cfg.size)
        times["crop"] += time.perf_counter() - t
        t = time.perf_counter()
        person = seg.probability(crop) > 0.5
        times["segment"] += time.perf_counter() - t
        t = time.perf_counter()
        pp.head_torso_masks(person, pts)
        ndimage.binary_dilation(person, iterations=max(1, cfg.size // 64))
        times["labels"] += time.perf_counter() - t
    return {k: round(v / frames * 1000, 2) for k, v in times.items()}


def main(argv):
    del argv
    import numpy as np

    from geneface_jax.data import format as fmt
    from geneface_jax.data import landmarks as lm
    from geneface_jax.data import preprocess as pp
    from geneface_jax.data.synthetic import realface

    with tempfile.TemporaryDirectory() as tmp:
        video = os.path.join(tmp, "astronaut.mp4")
        truth = realface.make_talking_photo(video, seconds=FLAGS.seconds, size=FLAGS.source)
        cfg = pp.PreprocessConfig(size=FLAGS.size)
        t0 = time.time()
        summary = pp.preprocess_video(video, os.path.join(tmp, "ds"), cfg, progress=False)
        seconds = time.time() - t0
        ds = fmt.load_person(os.path.join(tmp, "ds"))
        lms = np.asarray(ds["landmarks"])
        r = float(np.corrcoef(lm.mouth_opening(lms) / lm.mouth_width(lms), truth["open"])[0, 1])
        roll = pp.roll_degrees(np.swapaxes(np.asarray(ds["poses"])[:, :3, :3], 1, 2))
        err = np.abs(roll - (truth["roll_deg"] - truth["roll_deg"][0]))
        ms = _breakdown(video, cfg, summary)
    out = dict(bench="preprocess", frames=summary["frames"], source=FLAGS.source,
               size=FLAGS.size, track_fps=summary["track_fps"],
               mask_fps=summary["mask_fps"], total_fps=round(summary["frames"] / seconds, 2),
               mask_pass_ms_per_frame=ms, mouth_r=round(r, 4),
               roll_err_mean_deg=round(float(err.mean()), 3),
               roll_err_max_deg=round(float(err.max()), 3), cpu_count=os.cpu_count())
    print(json.dumps(out))


if __name__ == "__main__":
    app.run(main)
