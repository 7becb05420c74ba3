r"""Evaluates stage 1 on held-out speakers and utterances, with the mean-face test.

  python -m experiments.eval_audio2motion --data=data/corpus --vae=runs/a2m \
      --regression=runs/a2m_regression --workdir=runs/a2m_eval [--temperature=1.0]

For every utterance of the evaluated splits (default: `test`, whole speakers never seen
in training, and `valid`, held-out utterances of training speakers) landmarks are sampled
from the VAE (prior noise x temperature, chunked inference; `--samples` independent samples,
the VAE's figures are their means and metrics.json keeps each sample's sync correlation and
std ratio under per_split/vae/all) and predicted by the regression baseline, and the
speaker's identity (its mean landmarks, as the target person's identity is at inference)
is added back; then they are compared with the tracked landmarks
(`train.audio2motion.evaluate_audio2motion`):

  lmd        mean over frames of the mean L2 distance of the 68 points (landmark units,
             head space; ~metres in the synthetic world)
  lmd_mouth  the same over the 20 mouth points
  sync_corr  Pearson correlation of the predicted mouth opening with the articulation
             oracle's, per utterance, averaged weighted by length (synthetic data only)
  std_ratio  std of the predicted mouth opening / std of the true one, over all frames:
             ~1 when samples keep the variety of real motion, < 1 for the "mean face"

metrics.json: `lmd`, `lmd_mouth`, `sync_corr`, `std_ratio_vae` (the VAE's figures) and
`std_ratio_regression`, `lmd_regression`, `sync_corr_regression`, plus per-split figures.
"""

import json

from absl import app
from absl import flags

from experiments import common

FLAGS = flags.FLAGS
flags.DEFINE_string("data", None, "Corpus directory.")
flags.DEFINE_string("vae", None, "Workdir of a `train_audio2motion --model=vae` run.")
flags.DEFINE_string("regression", None, "Workdir of a `--model=regression` run (optional).")
flags.DEFINE_string("workdir", None, "Where metrics.json goes.")
flags.DEFINE_list("splits", ["test", "valid"], "Corpus splits to evaluate.")
flags.DEFINE_float("temperature", 1.0, "Prior temperature of the VAE samples.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_integer("samples", 4, "Prior samples per utterance for the VAE; its figures are "
                     "the means over samples (one sample's sync correlation moves by ~0.02 "
                     "with the seed). The regression baseline is deterministic: 1.")


def main(argv):
    del argv
    common.require("data", "vae", "workdir")
    if FLAGS.samples < 1:
        raise app.UsageError(f"--samples must be >= 1, got {FLAGS.samples}")
    from geneface_jax.train import audio2motion
    out = audio2motion.evaluate_audio2motion(
        FLAGS.data, FLAGS.workdir, FLAGS.vae, FLAGS.regression, splits=FLAGS.splits,
        temperature=FLAGS.temperature, seed=FLAGS.seed, samples=FLAGS.samples)
    for name, per_split in out["per_split"].items():
        print(f"{name}: " + json.dumps(per_split["all"]))
    print(json.dumps({k: v for k, v in out.items() if k != "per_split"}))


if __name__ == "__main__":
    common.run(main)
