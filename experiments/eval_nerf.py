r"""Evaluates stage 3 on held-out frames (poses and landmarks never seen in training).

  python -m experiments.eval_nerf --head=runs/head --torso=runs/torso \
      --workdir=runs/nerf_eval [--data=data/person] [--split=valid]

Every frame of `--split` is rendered from its pose and its tracked landmarks (head over
torso over the static background) and compared with the ground truth:

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

Without `--torso` only the head is evaluated (over the ground-truth torso and background)
and psnr_full is that image's. Writes WORKDIR/metrics.json and, with `--save_frames`,
WORKDIR/frames.npz (predictions and ground truth, uint8).
"""

import json
import pathlib

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
flags.DEFINE_bool("save_frames", False, "Also write frames.npz.")


def main(argv):
    del argv
    common.require("head", "workdir")
    import numpy as np

    from geneface_jax.data import format as fmt
    from geneface_jax.data import landmarks as lm
    from geneface_jax.render import frames as rf
    from geneface_jax.render import image_metrics as im
    from geneface_jax.render import rays as rays_lib
    from geneface_jax.train import metrics as metrics_lib
    from geneface_jax.train import nerf as tn

    timer = common.Timer()
    head_cfg, head_vars, head_run, normalizer = rf.load_nerf(FLAGS.head, "head")
    torso_cfg = torso_vars = torso_run = None
    if FLAGS.torso:
        torso_cfg, torso_vars, torso_run, _ = rf.load_nerf(FLAGS.torso, "torso")
        if torso_run.get("head") != str(pathlib.Path(FLAGS.head).absolute()):
            common_head = torso_run.get("head")
            print(f"warning: the torso run was trained with head {common_head}, evaluating "
                  f"with {FLAGS.head}")
    person = fmt.load_person(FLAGS.data or head_run["data"])
    views = tn.PersonViews(person, normalizer)
    renderer = rf.FrameRenderer(head_cfg, head_vars, views, torso_cfg=torso_cfg,
                                torso_vars=torso_vars, chunk=FLAGS.chunk,
                                smooth=rf.head_smooth_enabled(head_cfg,
                                                              head_run["trained_steps"]))
    lo, hi = views.split_range(FLAGS.split)
    ts = np.arange(lo, hi)
    if FLAGS.max_frames and len(ts) > FLAGS.max_frames:
        ts = ts[np.unique(np.linspace(0, len(ts) - 1, FLAGS.max_frames).round().astype(int))]
    w = head_cfg.smooth_window
    torso_pose = views.torso_pose()

    def render(t, landmarks=None):
        win = views.windows([t], w, FLAGS.split, landmarks)[0]
        out = renderer.render(views.poses[t], win, torso_pose)
        if torso_vars is None:
            gt = views.frames[t].astype(np.float32) / 255.0
            under = np.where((views.masks[t] == fmt.TORSO)[..., None], gt, views.background)
            out["rgb"] = out["rgb"] + (1.0 - out["head_acc"][..., None]) * (under - views.background)
        return out["rgb"]

    sq_head, n_head, sq_full, n_full, ssims, preds = 0.0, 0, 0.0, 0, [], []
    for i, t in enumerate(ts):
        pred = render(t)
        gt = views.frames[t].astype(np.float64) / 255.0
        err = np.square(pred - gt)
        rect = im.rect_mask(views.face_rect[t], views.height, views.width)
        sq_head += float(err[rect].sum())
        n_head += int(rect.sum()) * 3
        sq_full += float(err.sum())
        n_full += err.size
        ssims.append(im.ssim(pred, gt))
        preds.append(np.round(np.clip(pred, 0, 1) * 255).astype(np.uint8))
        print(f"\reval_nerf frame {i + 1}/{len(ts)}", end="", flush=True)
    print()

    # Mouth control: most closed / most open training mouths on one held-out frame.
    train_lo, train_hi = views.split_range("train")
    opening = lm.mouth_opening(views.landmarks[train_lo:train_hi])
    closed_t = train_lo + int(np.argmin(opening))
    open_t = train_lo + int(np.argmax(opening))
    t0 = int(ts[0])
    variants, boxes = [], []
    for src in (closed_t, open_t):
        lms = views.landmarks.copy()
        lms[t0, lm.MOUTH] = views.landmarks[src, lm.MOUTH]
        variants.append(render(t0, lms))
        u, v, _ = rays_lib.project_points(lms[t0, lm.MOUTH], views.poses[t0], views.intrinsics)
        boxes.append((np.asarray(u), np.asarray(v)))
    change = np.abs(variants[1] - variants[0]).mean(-1)
    us = np.concatenate([b[0] for b in boxes])
    vs = np.concatenate([b[1] for b in boxes])
    m = FLAGS.mouth_margin
    mouth = im.rect_mask((np.floor(us.min()) - m, np.floor(vs.min()) - m,
                          np.floor(us.max()) + 1 + m, np.floor(vs.max()) + 1 + m),
                         views.height, views.width)
    inside, outside = float(change[mouth].mean()), float(change[~mouth].mean())

    minutes = 0.0
    for run in (FLAGS.head, FLAGS.torso):
        if run and (pathlib.Path(run) / "metrics.json").is_file():
            minutes += float(json.loads((pathlib.Path(run) / "metrics.json").read_text())
                             .get("train_minutes", 0.0))
    out = dict(psnr_head=float(-10 * np.log10(max(sq_head / n_head, 1e-12))),
               psnr_full=float(-10 * np.log10(max(sq_full / n_full, 1e-12))),
               ssim_full=float(np.mean(ssims)),
               mouth_control_ratio=inside / max(outside, 1e-12),
               mouth_change_inside=inside, mouth_change_outside=outside,
               mouth_control_frames=[t0, closed_t, open_t],
               train_minutes=minutes, frames=int(len(ts)), split=FLAGS.split,
               torso=bool(FLAGS.torso), minutes=timer.minutes())
    workdir = pathlib.Path(FLAGS.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if FLAGS.save_frames:
        np.savez_compressed(workdir / "frames.npz", pred=np.stack(preds),
                            gt=views.frames[ts], indices=ts,
                            mouth_closed=np.round(np.clip(variants[0], 0, 1) * 255).astype(np.uint8),
                            mouth_open=np.round(np.clip(variants[1], 0, 1) * 255).astype(np.uint8))
    metrics_lib.write_final_metrics(workdir, out)
    print(json.dumps(out))


if __name__ == "__main__":
    common.run(main)
