"""geneface-jax: audio-driven 3D talking-face synthesis (GeneFace) in pure JAX.

Stages (see docs/architecture.md):
  audio/   audio loading and features          data/    datasets and the synthetic world
  motion/  stage 1 VAE + flow, stage 2 post-net render/  stage 3 NeRFs
  train/   train states, steps, checkpoints     convert/ PyTorch -> Flax weights
"""

__version__ = "0.1.0"
