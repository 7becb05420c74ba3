"""The landmark-audio SyncNet (stage 1's sync critic): `train_syncnet --config=PRESET`.

paper: GeneFace's SyncNet (base 128, 3 conv layers per block, 5-frame windows), Adam 5e-4
  for 40k steps, batch 256 (GeneFace decays the rate with a cosine to 0: `optim.schedule=
  cosine`; docs/geneface_differences.md).
cpu: base 32 and 2 layers per block, 1500 steps of 64 pairs (the README's stage-1 run).
tiny: the cpu sizes for a handful of steps.
"""

import ml_collections

from experiments.configs import check_preset


def get_config(preset="paper"):
    preset = check_preset(preset, "syncnet")
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = dict(window=5, base=128, mouth_in=96, layers_per_block=3)
    c.optim = dict(lr=5e-4, schedule="constant")      # constant | cosine (to 0 over steps)
    c.batch_size = 256                                 # pairs per step, split over devices
    c.eval_pairs = 512                                 # fixed validation pairs
    c.run = dict(steps=40_000, log_every=50, checkpoint_every=500, eval_every=1000)
    if preset in ("cpu", "tiny"):
        c.model.update(base=32, mouth_in=32, layers_per_block=2)
        c.batch_size = 64
        c.run.steps = 1500
    if preset == "tiny":
        c.batch_size, c.eval_pairs = 16, 32
        c.run.update(steps=10, log_every=5, checkpoint_every=5, eval_every=0)
    return c
