r"""Does a trained head render its person's blinks? The tracked eye ratio of blink frames.

  python -m experiments.bench.blink_probe --head=demo_out/checkpoints/head [--out=probe.png]

Renders the head run's person's blink frames (eye aspect ratio of its landmarks below half
the median; training and held-out frames) and 10 open-eye frames, each from its own pose
and landmarks, the head over the ground-truth torso and background; tracks renders and
ground truth with the tracker metric's face mesh and prints, per blink frame, the tracked
eye aspect ratio over the median of the open frames' (renders, then ground truth), and
the smallest open-frame ratio. `--out`: the eye region of the renders above the ground
truth, 3x. Last line: one JSON object.
"""

import json

from absl import app
from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_string("head", None, "A grid or MLP head run.")
flags.DEFINE_string("out", "", "PNG of the blink frames' eyes (renders over ground truth).")
flags.mark_flag_as_required("head")

OPEN_FRAMES = (10, 30, 50, 60, 100, 130, 150, 190, 230, 240)


def main(argv):
    del argv
    import numpy as np
    from PIL import Image

    from geneface_jax.data import format as fmt
    from geneface_jax.data import landmarks as lm
    from geneface_jax.render import frames as rf
    from geneface_jax.render.face_tracking import FrameTracker
    from geneface_jax.train import nerf as tn
    cfg, variables, run, norm = rf.load_nerf(FLAGS.head, "head")
    views = tn.PersonViews(fmt.load_person(run["data"]), norm)
    renderer = rf.FrameRenderer(cfg, variables, views,
                                smooth=rf.head_smooth_enabled(cfg, run["trained_steps"]))
    ear = lm.eye_aspect_ratio(views.landmarks)
    blink = np.flatnonzero(ear < 0.5 * np.median(ear))
    n = len(views.frames)
    idx = np.concatenate([blink, [t for t in OPEN_FRAMES if t < n]]).astype(int)
    lo_v = views.split_range("valid")[0] if "valid" in views.splits else n
    renders = []
    for t in idx:
        split = "train" if t < lo_v else "valid"
        out = renderer.render(views.poses[t], views.windows([t], cfg.smooth_window, split)[0])
        gt = views.frames[t] / 255.0
        under = np.where((views.masks[t] == fmt.TORSO)[..., None], gt, views.background)
        img = out["rgb"] + (1 - out["head_acc"][..., None]) * (under - views.background)
        renders.append((np.clip(img, 0, 1) * 255).astype(np.uint8))
    renders = np.stack(renders)
    tracker = FrameTracker()
    e = lm.eye_aspect_ratio(tracker.track(renders)[0])
    g = lm.eye_aspect_ratio(tracker.track(views.frames[idx])[0])
    k = len(blink)
    me, mg = np.nanmedian(e[k:]), np.nanmedian(g[k:])
    if FLAGS.out and k:
        h, w = views.height, views.width
        rows = slice(int(0.2 * h), int(0.55 * h))
        cols = slice(int(0.23 * w), int(0.78 * w))
        strip = np.concatenate([np.concatenate([im[rows, cols] for im in stack], 1)
                                for stack in (renders[:k], views.frames[blink])], 0)
        Image.fromarray(strip).resize((strip.shape[1] * 3, strip.shape[0] * 3),
                                      Image.NEAREST).save(FLAGS.out)
    print(json.dumps({"bench": "blink_probe", "head": FLAGS.head,
                      "blink_frames": blink.tolist(),
                      "render_ratio": np.round(e[:k] / me, 2).tolist(),
                      "truth_ratio": np.round(g[:k] / mg, 2).tolist(),
                      "render_open_min": round(float(np.nanmin(e[k:] / me)), 3)}))


if __name__ == "__main__":
    app.run(main)
