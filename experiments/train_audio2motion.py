r"""Trains stage 1: the audio-to-motion VAE with its flow prior (or the regression baseline).

  python -m experiments.train_audio2motion --data=data/corpus --workdir=runs/a2m \
      --syncnet=runs/syncnet [--config=paper|cpu|tiny] [--config.optim.lr=1e-3] [--steps=N]
  python -m experiments.train_audio2motion --model=regression ...   # mean-face baseline

Hyper-parameters: `experiments/configs/audio2motion.py` (GeneFace's own loss weights:
`--config.loss.lambda_l1=0 --config.loss.lambda_kl=0.4 --config.loss.continuity=geneface`,
docs/geneface_differences.md). The run (`train.audio2motion.train_audio2motion`) trains on
random crops of the corpus' train utterances, with the frozen SyncNet of `--syncnet` for the
sync loss, and writes WORKDIR/config.json (read by `eval_audio2motion` and the pipeline),
checkpoints, metrics.jsonl and metrics.json (`val_l2`, `val_l1`, `val_l2_start`,
`train_kl`, `train_sync`, `steps_per_s`, `minutes`, ...), and prints the final metrics as
JSON.
"""

import json

from absl import flags

from experiments import common

FLAGS = flags.FLAGS
common.define_run_flags("audio2motion", data_help="Corpus directory.")
flags.DEFINE_enum("model", None, ["vae", "regression"],
                  "vae: GeneFace's FVAE + flow prior; regression: same decoder, no latent "
                  "(default: the config's model.kind, vae).")
flags.DEFINE_string("syncnet", None, "Workdir of a trained SyncNet (enables the sync loss).")


def main(argv):
    del argv
    common.require("data", "workdir")
    from geneface_jax.train import audio2motion
    config = common.run_config()
    if FLAGS.model:
        config.model.kind = FLAGS.model
    print(json.dumps(audio2motion.train_audio2motion(config, FLAGS.workdir, FLAGS.data,
                                                     FLAGS.syncnet)))


if __name__ == "__main__":
    common.run(main)
