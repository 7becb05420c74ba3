"""The domain-adaptive post-net (stage 2): `train_postnet --config=PRESET`.

paper: GeneFace's sizes (generator 128/256 wide, critic 128-256-256-128) and loss weights
  (0.85 LSGAN, 0.1 SyncNet, 0.05 MSE), Adam 1e-4 for both networks with beta1 0, critic
  halved every 40k, 12k steps of 32 crops of 64 frames; the generator EMA with the lowest
  pool Fréchet distance (checked every 1000 steps) is kept for inference. GeneFace's own
  generator schedule is `--config.optim.lr=5e-4 --config.optim.warmup_steps=1000
  --config.optim.decay_rate=0.1` and its MSE `--config.loss.mse_target=person`
  (docs/geneface_differences.md, items 15-16).
cpu: every width halved, otherwise as paper (docs/stage2_postnet.md's CPU run).
tiny: 16-wide networks, 8 crops of 16 frames from a small pool, 6 steps with a pool check
  every 2 (smoke runs and tests).

`model` are `motion.postnet.PostNetConfig`'s fields (motion_dim and static_coords come
from the stage-1 run), `optim` `train.postnet.PostNetOptimConfig`'s, `loss`
`train.postnet.PostNetLossConfig`'s.
"""

import ml_collections

from experiments.configs import check_preset


def get_config(preset="paper"):
    preset = check_preset(preset, "postnet")
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = dict(hidden=128, wide=256, residual_layers=2, kernel_size=3, slope=0.2,
                   disc_hidden=(128, 256, 256, 128), disc_slopes=(0.2, 0.25, 0.25, 0.25),
                   disc_dropout=0.25)
    # Generator: Adam lr, linear warm-up over warmup_steps, then x decay_rate per
    # decay_steps; critic: disc_lr x disc_decay every disc_decay_steps; beta1 0 = no
    # momentum (GeneFace's RMSprop); ema_decay 0: inference uses the raw generator.
    c.optim = dict(lr=1e-4, warmup_steps=0, decay_rate=1.0, decay_steps=250_000,
                   disc_lr=1e-4, disc_decay=0.5, disc_decay_steps=40_000, clip_norm=1.0,
                   b1=0.0, b2=0.999, ema_decay=0.999)
    # Generator loss weights; mse_target: input (the generator's own input, every sample)
    # or person (GeneFace: person-audio samples towards the person's tracked motion).
    c.loss = dict(adv=0.85, sync=0.1, mse=0.05, sync_hop=2, mse_target="input")
    # The stage-1 sample pool, drawn once per workdir (pool.npz).
    c.pool = dict(samples_per_utterance=4,    # per utterance of the corpus splits
                  person_samples=32,          # on the person's train audio
                  temperature=1.0,            # prior temperature of the samples
                  corpus_splits=("train",))
    c.batch_size = 32                # crops per step, split over devices
    c.window = 64                    # crop length in frames (>= 8)
    c.person_fraction = 0.25         # share of each batch sampled on the person's audio
    c.disc_view = "landmarks"        # landmarks (GeneFace's geometry) | normalized
    c.select = True                  # inference: the checked EMA with the lowest pool FD
    c.eval_samples = 128             # corpus pool samples in the pool FD check
    c.run = dict(steps=12_000, log_every=50, checkpoint_every=500,
                 eval_every=1000)    # pool FD check interval (0: only at the end)
    if preset in ("cpu", "tiny"):
        c.model.update(hidden=64, wide=128, disc_hidden=(64, 128, 128, 64))
    if preset == "tiny":
        c.model.update(hidden=16, wide=32, disc_hidden=(16, 32, 32, 16))
        c.pool.update(samples_per_utterance=1, person_samples=2)
        c.batch_size, c.window, c.eval_samples = 8, 16, 4
        c.run.update(steps=6, log_every=3, checkpoint_every=3, eval_every=2)
    return c
