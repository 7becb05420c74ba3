"""Stage 3, the MLP head and torso NeRFs: `train_nerf --part=head|torso --config=PRESET`.

`model` holds every field of `render.fields.NeRFConfig` (one model for head and torso; the
torso takes the head run's `cond_dim`, `smooth_window` and `pixel_convention`). `bounds`
says where a run's near/far come from: `dataset` = the person dataset's measured `near`/
`far` (meta.json), `model.near`/`model.far` where it has none; `config` = always
`model.near`/`model.far` (GeneFace's fixed 0.3 / 0.9). `head` and `torso` hold each part's
ray sampling (`rays` per step over `frames_per_step` frames, `in_rect_percent` of them in
the sampling rectangle, the head's `mouth_percent` in the mouth box) and its Adam rate
`lr * lr_decay ** (step / lr_decay_steps)`. `eval`: the held-out frames a run renders for
its `eval_psnr` and the rays per device rendered at once. `run.steps` is the head's step
count and `run.torso_steps` the torso's (`--steps` sets the part being trained); `run` and
`eval` may differ when a run is resumed.

paper: GeneFace's `lm3d_nerf` sizes (8x256 density MLP, skip after layer 4, colour head
  3x128, 64 + 128 samples, smoother on after 200k steps), 2048 rays per step, Adam 5e-4
  decaying 10x over 250k steps, 400k steps per part.
cpu: the documented CPU run (docs/stage3_nerf.md): same encodings, condition and smoother
  as the paper; 6x128 MLP, skip after layer 3, colour head 2x64, 24 + 24 samples (with the
  dataset's tight near/far; on the synthetic person 24 + 24 learned as fast per step as
  32 + 32), smoother on after 1000 steps, 1024 rays, Adam 1e-3 decaying 10x over the run;
  head 2000 steps, torso 300.
tiny: smoke runs and tests: 3x32 MLP (skip after layer 1), colour head 1x16, 8 + 8 samples,
  128 rays, head 10 steps (smoother on after 5), torso 4.

A grid-encoded renderer gets its own file (`--model` picks the file).
"""

import ml_collections

from experiments.configs import check_preset


def get_config(preset="paper"):
    preset = check_preset(preset, "nerf")
    c = ml_collections.ConfigDict()
    c.seed = 0
    # render.fields.NeRFConfig, field by field (its docstring describes each)
    c.model = dict(pos_freqs=10, view_freqs=4, width=256, depth=8, skip=4, color_width=128,
                   color_depth=3, cond_dim=64, landmark_channels=(32, 32, 64, 64),
                   landmark_fc=64, smooth_window=5, smooth_warmup_steps=200_000,
                   attention_channels=(16, 8, 4, 2), num_coarse=64, num_fine=128, near=0.3,
                   far=0.9, density_activation="relu", last_sample_background=True,
                   pose_freqs=6, torso_color_dim=16, pixel_convention="centers")
    c.bounds = "dataset"                                # dataset | config
    # head: 95 % of the rays in the face rectangle (GeneFace); torso: 80 % in the box of
    # the torso mask (GeneFace's torso draws 95 % in the image's lower half).
    c.head = dict(rays=2048, frames_per_step=1, in_rect_percent=0.95, mouth_percent=0.0,
                  eye_percent=0.0, blink_frame_percent=0.0,
                  lr=5e-4, lr_decay=0.1, lr_decay_steps=250_000)
    c.torso = dict(rays=2048, frames_per_step=1, in_rect_percent=0.8,
                   lr=5e-4, lr_decay=0.1, lr_decay_steps=250_000)
    c.eval = dict(frames=3, chunk=4096)
    c.run = dict(steps=400_000, torso_steps=400_000, log_every=50, checkpoint_every=500,
                 eval_every=0)
    if preset in ("cpu", "tiny"):
        c.model.update(width=128, depth=6, skip=3, color_width=64, color_depth=2,
                       num_coarse=24, num_fine=24, smooth_warmup_steps=1000)
        c.head.update(rays=1024, lr=1e-3, lr_decay_steps=2000)
        c.torso.update(rays=1024, lr=1e-3, lr_decay_steps=300)
        c.run.update(steps=2000, torso_steps=300)
    if preset == "tiny":
        c.model.update(width=32, depth=3, skip=1, color_width=16, color_depth=1,
                       num_coarse=8, num_fine=8, smooth_warmup_steps=5)
        c.head.update(rays=128, lr_decay_steps=10)
        c.torso.update(rays=128, lr_decay_steps=4)
        c.eval.update(frames=1, chunk=1024)
        c.run.update(steps=10, torso_steps=4, log_every=5, checkpoint_every=5)
    return c
