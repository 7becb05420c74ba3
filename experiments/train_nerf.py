r"""Trains stage 3: the landmark-conditioned head NeRF, then the head-aware torso NeRF.

  python -m experiments.train_nerf --part=head --data=data/person --workdir=runs/head \
      [--config=paper|small] [--steps=400000] [--batch_size=2048]
  python -m experiments.train_nerf --part=torso --head=runs/head --workdir=runs/torso \
      [--data=...] [--steps=...]

Head (`train.nerf.make_head_step`): every step draws `--frames_per_step` training frames
and `--batch_size` rays among them, `--in_rect_percent` inside each frame's face
rectangle; the head is rendered over the ground-truth torso and the static background and
fits the frame with an MSE on its coarse and fine colours. Torso: the trained head is
frozen; rays (`--in_rect_percent` inside the box of the torso mask) are rendered by the
head in the frame's camera and by the torso in the first frame's camera, composited head
over torso over background. Adam `--lr` with exponential decay (`--lr_decay` every
`--lr_decay_steps`), data-parallel over rays, resumable (a second run continues from the
last checkpoint; a workdir of another configuration is refused).

Ray bounds (`train.nerf.ray_bounds`): with `--bounds=dataset` (default) the dataset's
`near`/`far` (meta.json; preprocessing measures them per person), the model config's
0.3 / 0.9 when the dataset has none; with `--bounds=config` the config's 0.3 / 0.9
whatever the dataset says, which is GeneFace's behaviour (its `NeRFDataset` takes the
`near`/`far` hparams and ignores the processed bounds). `--near`/`--far` override both.
Rays cross the pixels at `--pixel_convention` (`render.rays.ray_intrinsics`): pixel
centres with the dataset's principal point, or GeneFace's integer pixel coordinates with
the principal point at the image centre; the torso takes the head run's.

Writes WORKDIR/config.json, landmark_norm.npz (the landmark normalisation the model was
trained with), checkpoints, metrics.jsonl and metrics.json (`train_*` losses and PSNR of
the last logged step, `eval_psnr` of `--eval_frames` held-out frames (head: head over the
ground-truth torso; torso: the composited frame), `steps_per_s`, `rays_per_s`,
`train_minutes`). `eval_nerf` computes the full held-out figures.
"""

import dataclasses
import json
import pathlib

from absl import app
from absl import flags

from experiments import common

FLAGS = flags.FLAGS
common.define_common_flags(steps=400_000, batch_size=2048,
                           data_help="The person dataset (default for --part=torso: the "
                                     "head run's).")
flags.DEFINE_enum("part", None, ["head", "torso"], "Which model to train.")
flags.DEFINE_string("head", None, "Workdir of the trained head run (required for the torso).")
flags.DEFINE_integer("frames_per_step", 1, "Frames the rays of one step come from.")
flags.DEFINE_float("in_rect_percent", None, "Share of rays inside the sampling rectangle "
                   "(default: 0.95 head as GeneFace; 0.8 torso, whose rectangle is the box of the "
                   "torso mask, where GeneFace's torso draws 0.95 in the image's lower half).")
flags.DEFINE_float("mouth_percent", 0.0, "Head: share of rays drawn inside the mouth box "
                   "(0: GeneFace's sampler; a lip-focused share helps short runs).")
flags.DEFINE_float("lr", 5e-4, "Adam learning rate.")
flags.DEFINE_float("lr_decay", 0.1, "Exponential decay factor of the learning rate...")
flags.DEFINE_integer("lr_decay_steps", 250_000, "... reached after this many steps.")
flags.DEFINE_float("near", None, "Near ray bound (default: from --bounds).")
flags.DEFINE_float("far", None, "Far ray bound (default: from --bounds).")
flags.DEFINE_enum("bounds", "dataset", ["dataset", "config"],
                  "Where near/far come from: dataset = the person dataset's measured bounds; "
                  "config = the model config's 0.3 / 0.9 (GeneFace's fixed near/far; its "
                  "dataset's bounds are ignored).")
flags.DEFINE_enum("pixel_convention", None, ["centers", "geneface"],
                  "Where rays cross the pixels: centers = pixel centres (j + 0.5, i + 0.5) "
                  "with the dataset's principal point (default for the head); geneface = "
                  "integer pixel coordinates (j, i) with cx = W/2, cy = H/2 (GeneFace's "
                  "get_rays). The torso takes the head run's.")
flags.DEFINE_integer("smooth_warmup", None, "Steps before the attention smoother is on "
                     "(default: the config's; 200k paper, 2000 small).")
flags.DEFINE_integer("eval_every", 0, "Held-out PSNR every this many steps (0: only at "
                     "the end).")
flags.DEFINE_integer("eval_frames", 3, "Held-out frames rendered for eval_psnr.")
flags.DEFINE_integer("chunk", 4096, "Rays per device evaluated at once when rendering.")
# Model sizes (default: the --config's; NeRFConfig documents each).
flags.DEFINE_integer("width", None, "Density MLP width (paper 256, small 128).")
flags.DEFINE_integer("depth", None, "Density MLP layers (paper 8, small 6).")
flags.DEFINE_integer("skip", None, "Layer after which the input is concatenated again "
                     "(paper 4, small 3).")
flags.DEFINE_integer("num_coarse", None, "Coarse samples per ray (paper 64, small 24).")
flags.DEFINE_integer("num_fine", None, "Fine samples per ray (paper 128, small 24).")
flags.DEFINE_integer("pos_freqs", None, "Position encoding bands (paper 10).")
flags.DEFINE_integer("cond_dim", None, "Landmark condition size (paper 64).")
SIZE_FLAGS = ("width", "depth", "skip", "num_coarse", "num_fine", "pos_freqs", "cond_dim")


def main(argv):
    del argv
    common.require("workdir", "part")
    if FLAGS.part == "torso":
        common.require("head")
    import jax
    import numpy as np

    from geneface_jax import train
    from geneface_jax.checkpoint import Checkpointer
    from geneface_jax.data import format as fmt
    from geneface_jax.errors import InputError
    from geneface_jax.render import fields
    from geneface_jax.render import frames as rf
    from geneface_jax.render import image_metrics as im
    from geneface_jax.train import nerf as tn

    timer = common.Timer()
    head_run = None
    if FLAGS.part == "torso":
        head_cfg, head_vars, head_run, normalizer = rf.load_nerf(FLAGS.head, "head")
        data = FLAGS.data or head_run["data"]
    else:
        common.require("data")
        data, normalizer = FLAGS.data, None
    person = fmt.load_person(data)
    views = tn.PersonViews(person, normalizer)

    base = fields.NeRFConfig.small() if FLAGS.config == "small" else fields.NeRFConfig()
    overrides = {}
    overrides["near"], overrides["far"] = tn.ray_bounds(person.meta, base, FLAGS.bounds,
                                                        FLAGS.near, FLAGS.far)
    if head_run is not None and FLAGS.pixel_convention not in (None,
                                                                head_cfg.pixel_convention):
        raise InputError(f"--pixel_convention={FLAGS.pixel_convention}: the torso casts rays "
                         f"as its head run does ({head_cfg.pixel_convention})")
    if FLAGS.pixel_convention is not None:
        overrides["pixel_convention"] = FLAGS.pixel_convention
    if FLAGS.smooth_warmup is not None:
        overrides["smooth_warmup_steps"] = FLAGS.smooth_warmup
    overrides.update({k: getattr(FLAGS, k) for k in SIZE_FLAGS
                      if getattr(FLAGS, k) is not None})
    if head_run is not None and FLAGS.cond_dim is not None:
        raise InputError("--cond_dim: the torso takes the head run's condition size")
    try:
        cfg = dataclasses.replace(base, **overrides)
    except ValueError as e:
        raise InputError(f"model size flags: {e}") from e
    if head_run is not None:
        # The torso samples the same depth range as the head it is composited with.
        cfg = dataclasses.replace(cfg, smooth_window=head_cfg.smooth_window,
                                  cond_dim=head_cfg.cond_dim,
                                  pixel_convention=head_cfg.pixel_convention)

    mesh = train.make_mesh()
    n_dev = mesh.shape[train.DATA_AXIS]
    rays = FLAGS.batch_size
    fps = FLAGS.frames_per_step
    if rays % (fps * n_dev):
        raise app.UsageError(f"--batch_size={rays} rays must be a multiple of "
                             f"--frames_per_step x devices = {fps * n_dev}")
    in_rect = FLAGS.in_rect_percent
    if in_rect is None:
        in_rect = 0.95 if FLAGS.part == "head" else 0.8
    sampling = tn.RaySamplingConfig(frames_per_step=fps, rays_per_frame=rays // fps,
                                    in_rect_percent=in_rect,
                                    mouth_percent=FLAGS.mouth_percent if FLAGS.part == "head"
                                    else 0.0)
    optim = tn.NeRFOptimConfig(lr=FLAGS.lr, decay_rate=FLAGS.lr_decay,
                               decay_steps=FLAGS.lr_decay_steps)
    get_batch = tn.make_batch_fn(views, FLAGS.part, sampling, window=cfg.smooth_window,
                                 seed=FLAGS.seed)

    run_cfg = dict(stage="nerf", part=FLAGS.part, model=dataclasses.asdict(cfg),
                   config=FLAGS.config, data=str(pathlib.Path(data).absolute()),
                   seed=FLAGS.seed, sampling=dataclasses.asdict(sampling),
                   optim=dataclasses.asdict(optim),
                   head=str(pathlib.Path(FLAGS.head).absolute()) if head_run else None,
                   head_model=head_run["model"] if head_run else None)
    workdir = common.prepare_workdir(FLAGS.workdir, run_cfg)
    if train.is_main_process():
        views.normalizer.save(workdir / "landmark_norm.npz")
    if FLAGS.part == "head":
        model, state = tn.create_nerf_state(cfg, optim, "head", FLAGS.seed)
        step_fn = tn.make_head_step(model, views.intrinsics, (views.height, views.width))
    else:
        model, state = tn.create_nerf_state(cfg, optim, "torso", FLAGS.seed, head_vars)
        head_smooth = rf.head_smooth_enabled(head_cfg, head_run["trained_steps"])
        step_fn = tn.make_torso_step(model, fields.HeadNeRF(head_cfg), views.intrinsics,
                                     head_smooth, (views.height, views.width))

    lo, hi = views.split_range("valid") if "valid" in views.splits else views.split_range("train")
    eval_ts = np.unique(np.linspace(lo, hi - 1, max(1, FLAGS.eval_frames)).round().astype(int))

    def evaluate(st, step):
        params = jax.device_get(st.params)
        if FLAGS.part == "head":
            r = rf.FrameRenderer(cfg, {"params": params}, views, mesh=mesh, chunk=FLAGS.chunk,
                                 smooth=rf.head_smooth_enabled(cfg, step))
        else:
            r = rf.FrameRenderer(head_cfg, head_vars, views, torso_cfg=cfg,
                                 torso_vars={"params": params}, mesh=mesh, chunk=FLAGS.chunk,
                                 smooth=head_smooth)
        split = "valid" if "valid" in views.splits else "train"
        scores = []
        for t in eval_ts:
            win = views.windows([t], cfg.smooth_window, split)[0]
            out = r.render(views.poses[t], win, views.torso_pose())
            gt = views.frames[t].astype(np.float32) / 255.0
            pred = out["rgb"]
            if FLAGS.part == "head":
                # Re-composite the head over the ground-truth torso (what it trains on).
                acc = out["head_acc"][..., None]
                under = np.where((views.masks[t] == fmt.TORSO)[..., None], gt, views.background)
                pred = pred + (1.0 - acc) * (under - views.background)
            scores.append(im.psnr(pred, gt))
        return {"psnr": float(np.mean(scores))}

    ck = Checkpointer(workdir / "checkpoints")
    start_step = ck.latest_step() or 0
    ck.close()
    start = common.Timer()
    state, last = train.train_loop(
        workdir=workdir, state=state, step_fn=step_fn, get_batch=get_batch,
        num_steps=FLAGS.steps, mesh=mesh, log_every=FLAGS.log_every,
        checkpoint_every=FLAGS.checkpoint_every, extra=run_cfg, eval_fn=evaluate,
        eval_every=FLAGS.eval_every, name=f"{FLAGS.part} nerf ", replicated=("frames",))
    train_s = max(start.minutes() * 60, 1e-9)
    ran = max(FLAGS.steps - start_step, 0)
    final = evaluate(state, FLAGS.steps)
    sps = ran / train_s if ran else float("nan")
    out = dict(**{f"train_{k}": v for k, v in last.items() if not k.startswith("eval_")},
               eval_psnr=final["psnr"], steps=FLAGS.steps, part=FLAGS.part,
               resumed_from=start_step, steps_per_s=sps, rays_per_s=sps * rays,
               # Wall-clock of the training loop; a resumed run extrapolates the whole
               # run's time from this invocation's speed.
               train_minutes=(start.minutes() if start_step == 0 or not ran
                              else FLAGS.steps / sps / 60.0),
               minutes=timer.minutes(), devices=n_dev)
    train.write_final_metrics(workdir, out)
    print(json.dumps(out))


if __name__ == "__main__":
    common.run(main)
