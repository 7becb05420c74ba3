r"""Trains the landmark-audio SyncNet on a corpus (stage 1's sync critic).

  python -m experiments.train_syncnet --data=data/corpus --workdir=runs/syncnet \
      [--config=paper|cpu|tiny] [--config.batch_size=64] [--steps=N] [--seed=0]

Hyper-parameters: `experiments/configs/syncnet.py`. The run (`train.audio2motion.
train_syncnet`) writes WORKDIR/config.json (what `train_audio2motion --syncnet` reads),
checkpoints, metrics.jsonl and metrics.json, and prints the final metrics as JSON.
"""

import json

from absl import flags

from experiments import common

FLAGS = flags.FLAGS
common.define_run_flags("syncnet", data_help="Corpus directory.")


def main(argv):
    del argv
    common.require("data", "workdir")
    from geneface_jax.train import audio2motion
    print(json.dumps(audio2motion.train_syncnet(common.run_config(), FLAGS.workdir,
                                                FLAGS.data)))


if __name__ == "__main__":
    common.run(main)
