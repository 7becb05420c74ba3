"""Stage 3, the grid renderer (GeneFace's RAD-NeRF head and 2-D torso, the default):
`train_nerf --part=head|torso [--model=grid] --config=PRESET`.

`model` holds every field of `render.grid_fields.GridConfig` but `num_codes` (training
sets it to the number of training frames); the torso takes the head run's condition sizes
and pixel convention. `bounds` as in `nerf.py` (`dataset`: the person's measured near/far;
`config`: `model.near`/`model.far`). `head` and `torso`: rays per step over
`frames_per_step` frames (`in_rect_percent` in the face rectangle / torso box, the head's
`mouth_percent` in the mouth box, `eye_percent` in the eye box, `blink_frame_percent` of
the frames drawn among the closing-eye ones), Adam `lr` for the networks with
`grid_lr_scale` x lr for the grid tables and `smoother_lr_scale` x lr for the attention
smoother, all decaying as `lr_decay ** (step / lr_decay_steps)`; the head's loss weights
`lambda_entropy` (opacity entropy) and `lambda_ambient` (ambient coordinates outside the
face rectangle, ramped up over `ambient_ramp_steps`). `eval` and `run` as in `nerf.py`.

Every preset sets `model.eye_feature` (the head also takes each frame's eye opening, as
RAD-NeRF does; GeneFace's head does not), and `cpu` / `tiny` spend 20 % of the head's rays
in the eye box and draw 30 % of its frames among the closing-eye ones: without these the
rendered eyes never close (docs/stage3_nerf.md, "Eyes").

paper: GeneFace's `lm3d_radnerf` / `radnerf_torso` (16 levels x 2 features, base 16,
  finest 2048, 2^16 rows per level; MLPs 3x128 ambient, 3x128 sigma -> 1 + 128, 2x128
  colour; occupancy 128^3 updated every 16 steps, EMA 0.95, 16 samples per ray; torso
  deform 3x64, torso MLP 3x32, codes 4 / 8), 65536 rays per step (GeneFace's `n_rays`),
  Adam 5e-4 (grids x10, smoother x5) decaying 10x over 250k steps, 250k steps per part.
cpu: the documented CPU run (docs/stage3_nerf.md): same structure; finest 512 (the head is
  ~80 pixels wide at 128x128), MLPs 64 wide, 64 geometry features, occupancy 64^3 read at 64
  points per ray, a quarter of the cells probed per update; 2048 rays per step, Adam 1e-3
  (grids 1e-2, smoother 5e-3) decaying 10x over the run.
tiny: smoke runs and tests: 4 levels up to 32, MLPs 16 wide, 4 samples per ray, 16^3
  occupancy, 128 rays, head 10 steps (smoother after 5), torso 4.
"""

import ml_collections

from experiments.configs import check_preset


def get_config(preset="paper"):
    preset = check_preset(preset, "grid")
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.renderer = "grid"
    # render.grid_fields.GridConfig, field by field (its docstring describes each)
    c.model = dict(cond_dim=64, landmark_channels=(32, 32, 64, 64), landmark_fc=64,
                   smooth_window=5, smooth_warmup_steps=200_000,
                   attention_channels=(16, 8, 4, 2), eye_feature=True,
                   center=(0.0, 0.0, 0.0), bound=0.16,
                   levels=16, features=2, base=16, finest=2048, log2_table=16,
                   ambient_finest=2048, ambient_layers=3, ambient_hidden=128,
                   sigma_layers=3, sigma_hidden=128, geo_feat_dim=128, color_layers=2,
                   color_hidden=128, code_dim=4, num_bins=128, num_samples=16, grid_size=128,
                   occupancy_decay=0.95, occupancy_every=16, occupancy_stride=1,
                   alpha_thresh=0.01, near=0.3,
                   far=0.9, pixel_convention="centers", torso_levels=16, torso_features=2,
                   torso_base=16, torso_finest=2048, torso_deform=(3, 64), torso_mlp=(3, 32),
                   torso_code_dim=8, torso_shrink=0.8, torso_pos_freqs=10, torso_pose_freqs=4)
    c.bounds = "dataset"                                # dataset | config
    c.head = dict(rays=65536, frames_per_step=1, in_rect_percent=0.95, mouth_percent=0.0,
                  eye_percent=0.0, blink_frame_percent=0.0,
                  lr=5e-4, grid_lr_scale=10.0, smoother_lr_scale=5.0, lr_decay=0.1,
                  lr_decay_steps=250_000, lambda_entropy=1e-4, lambda_ambient=0.1,
                  ambient_ramp_steps=250_000)
    c.torso = dict(rays=65536, frames_per_step=1, in_rect_percent=0.8, lr=5e-4,
                   grid_lr_scale=10.0, smoother_lr_scale=5.0, lr_decay=0.1,
                   lr_decay_steps=250_000)
    c.eval = dict(frames=3, chunk=4096)
    c.run = dict(steps=250_000, torso_steps=250_000, log_every=50, checkpoint_every=500,
                 eval_every=0)
    if preset in ("cpu", "tiny"):
        c.model.update(finest=512, ambient_finest=512, torso_finest=512, ambient_hidden=64,
                       sigma_hidden=64, geo_feat_dim=64, color_hidden=64, grid_size=64,
                       num_bins=64, occupancy_stride=4, smooth_warmup_steps=1000)
        c.head.update(rays=2048, lr=1e-3, lr_decay_steps=3000, ambient_ramp_steps=3000,
                      eye_percent=0.2, blink_frame_percent=0.3)
        c.torso.update(rays=2048, lr=1e-3, lr_decay_steps=500)
        c.run.update(steps=3000, torso_steps=500)
    if preset == "tiny":
        c.model.update(levels=4, base=4, finest=32, ambient_finest=32, torso_levels=4,
                       torso_base=4, torso_finest=32, log2_table=10, ambient_hidden=16,
                       sigma_hidden=16, geo_feat_dim=8, color_hidden=16, grid_size=16,
                       num_bins=16, num_samples=4, torso_deform=(2, 16), torso_mlp=(2, 16),
                       occupancy_every=4, occupancy_stride=1, smooth_warmup_steps=5)
        c.head.update(rays=128, lr_decay_steps=10, ambient_ramp_steps=10)
        c.torso.update(rays=128, lr_decay_steps=4)
        c.eval.update(frames=1, chunk=1024)
        c.run.update(steps=10, torso_steps=4, log_every=5, checkpoint_every=5)
    return c
