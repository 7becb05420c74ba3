r"""The grid head at 512x512 on an accelerator: training steps/s and whole-frame render fps.

  python -m experiments.bench.gpu_grid [--size=512] [--frames=60] [--steps=1000]
      [--preset=paper] [--render_frames=30] [--workdir=/tmp/geneface-gpu-grid]

The prepared device check of the grid-renderer issue (target: >= 25 frames/s at 512x512
on one H100, the whole run inside 10 minutes). In one process: the synthetic person of
`--seed` at `--size` (`world.make_person`, `--frames` frames; rendered on the host, about
0.85 s a frame per core at 512), the grid head of `--preset` (experiments/configs/grid.py;
paper: GeneFace's sizes, 65536 rays per step) trained for `--steps` steps with the
library's `train.nerf.train_nerf` on every device (its `steps_per_s` / `rays_per_s` count
the timed steps after the first log interval, compilation excluded), then
`--render_frames` held-out frames rendered whole by `render.frames.FrameRenderer` (the
first frame compiles and is not timed; fps over the rest). Runs on CPU too (`--size=64
--preset=tiny --steps=4` is the test suite's smoke run). The last line printed is one
JSON object: device, size, steps, steps_per_s, rays_per_s, render_fps, eval_psnr,
seconds per phase, and `meets_target` (render_fps >= 25).
"""

import json
import pathlib
import time

from absl import app
from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("size", 512, "Frame height and width (pixels).")
flags.DEFINE_integer("frames", 60, "Frames of the synthetic person (the last 10 % held out).")
flags.DEFINE_integer("steps", 1000, "Training steps of the grid head.")
flags.DEFINE_enum("preset", "paper", ["paper", "cpu", "tiny"], "experiments/configs/grid.py.")
flags.DEFINE_integer("render_frames", 30, "Held-out frames rendered (cycled if fewer).")
flags.DEFINE_integer("seed", 0, "Synthetic person seed.")
flags.DEFINE_string("workdir", "/tmp/geneface-gpu-grid", "Dataset and head run (replaced).")

TARGET_FPS = 25.0


def log(msg):
    print(f"[gpu_grid] {msg}", flush=True)


def main(argv):
    del argv
    import shutil

    from absl import logging
    logging.set_verbosity(logging.WARNING)          # orbax's per-save INFO lines

    import jax
    import numpy as np

    from experiments.configs import grid as presets
    from geneface_jax.data import format as fmt
    from geneface_jax.data.synthetic import world
    from geneface_jax.render import frames as rf
    from geneface_jax.train import nerf
    root = pathlib.Path(FLAGS.workdir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    device = f"{jax.devices()[0].device_kind} x{jax.device_count()}"
    log(f"{device}; person {FLAGS.size}x{FLAGS.size}, {FLAGS.frames} frames")
    t0 = time.time()
    arrays, meta, wav = world.make_person(FLAGS.seed, size=FLAGS.size,
                                          num_frames=FLAGS.frames, progress=False)
    fmt.write_person(root / "person", arrays, meta, wav)
    t_data = time.time() - t0

    config = presets.get_config(FLAGS.preset)
    config.run.steps = FLAGS.steps
    config.run.log_every = max(1, min(config.run.log_every, FLAGS.steps // 4))
    config.run.checkpoint_every = FLAGS.steps        # one checkpoint, at the end
    config.eval.frames = 1
    t0 = time.time()
    metrics = nerf.train_nerf(config, root / "head", "head", root / "person")
    t_train = time.time() - t0
    log(f"trained {FLAGS.steps} steps: {metrics['steps_per_s']:.2f} steps/s, "
        f"{metrics['rays_per_s']:.0f} rays/s")

    cfg, variables, run, norm = rf.load_nerf(root / "head", rf.HEAD)
    views = nerf.PersonViews(fmt.load_person(root / "person"), norm)
    renderer = rf.FrameRenderer(cfg, variables, views,
                                smooth=rf.head_smooth_enabled(cfg, run["trained_steps"]))
    lo, hi = views.split_range("valid")
    idx = [lo + i % (hi - lo) for i in range(FLAGS.render_frames + 1)]
    wins = views.windows(idx, cfg.smooth_window, "valid")
    conds = renderer.condition(wins)
    t0 = time.time()
    renderer.render_many(views.poses[idx[:1]], conds[:1])        # compiles
    t_compile = time.time() - t0
    t0 = time.time()
    for i in range(1, len(idx)):
        out = renderer.render_many(views.poses[idx[i:i + 1]], conds[i:i + 1])
    np.asarray(out["rgb"])
    fps = (len(idx) - 1) / (time.time() - t0)
    log(f"rendered {len(idx) - 1} frames: {fps:.2f} frames/s")
    print(json.dumps({
        "bench": "gpu_grid", "device": device, "size": FLAGS.size, "preset": FLAGS.preset,
        "steps": FLAGS.steps, "rays_per_step": config.head.rays,
        "steps_per_s": round(metrics["steps_per_s"], 3),
        "rays_per_s": round(metrics["rays_per_s"]), "render_fps": round(fps, 2),
        "eval_psnr": round(float(metrics["eval_psnr"]), 2),
        "seconds": {"dataset": round(t_data, 1), "train": round(t_train, 1),
                    "render_compile": round(t_compile, 1)},
        "target_fps": TARGET_FPS, "meets_target": bool(fps >= TARGET_FPS)}))


if __name__ == "__main__":
    app.run(main)
