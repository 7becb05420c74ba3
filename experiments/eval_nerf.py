r"""Evaluates stage 3 on held-out frames (poses and landmarks never seen in training).

  python -m experiments.eval_nerf --head=runs/head --torso=runs/torso \
      --workdir=runs/nerf_eval [--data=data/person] [--split=valid]

Every frame of `--split` is rendered from its pose and its tracked landmarks (head over
torso over the static background) and compared with the ground truth
(`train.nerf.evaluate_nerf`):

  psnr_head    PSNR (dB) inside the face rectangle of each frame (the head's sampling
               region), pooled over frames (one MSE)
  psnr_full    PSNR of the whole composited frame, pooled
  ssim_full    SSIM of the whole frame (Gaussian window 11, sigma 1.5), mean over frames
  mouth_control_ratio
               the first held-out frame is rendered twice, with the mouth points
               (48-67) of its landmarks replaced by those of the most closed and of the
               most open training frame; ratio of the mean absolute change inside the
               mouth region (box of both projected mouths grown by `--mouth_margin` px)
               to the mean change outside it
  train_minutes  head + torso training minutes (their metrics.json)
  render_fps   whole frames (head + torso) rendered per second, `--frames_per_call` (8)
               per renderer call as synthesis renders them; every frame is rendered twice
               and the second pass timed (compiling excluded)
  head_samples samples per ray of a grid head (`--head_samples`, 0 = as trained; 0 in
               the metrics for the MLP head)
  tracked_*, floor_*
               renders and ground truth tracked with the face tracker: faces found,
               landmark distance (px and at 512 px), tracked mouth-opening r, and the
               same figures of the ground truth's own H.264 round trip
               (docs/tracking_metric.md; `--notrack` skips them)

Without `--torso` only the head is evaluated (over the ground-truth torso and background)
and psnr_full is that image's. Writes WORKDIR/metrics.json and, with `--save_frames`,
WORKDIR/frames.npz (predictions and ground truth, uint8) and WORKDIR/frames.png (six
renders over their ground truth); prints the metrics as JSON.
"""

import json

from absl import flags

from experiments import common

FLAGS = flags.FLAGS
flags.DEFINE_string("head", None, "Workdir of the head run.")
flags.DEFINE_string("torso", None, "Workdir of the torso run (optional).")
flags.DEFINE_string("workdir", None, "Where metrics.json goes.")
flags.DEFINE_string("data", None, "Person dataset (default: the head run's).")
flags.DEFINE_string("split", "valid", "Held-out split.")
flags.DEFINE_integer("max_frames", 0, "Evaluate only this many evenly spaced frames (0: all).")
flags.DEFINE_integer("mouth_margin", 3, "Pixels added around the mouth box.")
flags.DEFINE_integer("chunk", 4096, "Rays per device evaluated at once.")
flags.DEFINE_integer("head_samples", 0, "Samples per ray of a grid head (0: as trained; "
                     "fewer render faster and less sharply).")
flags.DEFINE_integer("frames_per_call", 8, "Held-out frames rendered per renderer call "
                     "(render_fps is measured over these calls).")
flags.DEFINE_bool("save_frames", False, "Also write frames.npz and frames.png.")
flags.DEFINE_bool("track", True, "Track renders and ground truth with the face tracker "
                  "(needs the face models).")


def main(argv):
    del argv
    common.require("head", "workdir")
    from geneface_jax.train import nerf
    print(json.dumps(nerf.evaluate_nerf(
        FLAGS.head, FLAGS.workdir, torso=FLAGS.torso, data=FLAGS.data, split=FLAGS.split,
        max_frames=FLAGS.max_frames, mouth_margin=FLAGS.mouth_margin, chunk=FLAGS.chunk,
        save_frames=FLAGS.save_frames, track=FLAGS.track, head_samples=FLAGS.head_samples,
        frames_per_call=FLAGS.frames_per_call)))


if __name__ == "__main__":
    common.run(main)
