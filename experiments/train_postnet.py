r"""Trains stage 2: the domain-adaptive post-net (GeneFace's adversarial refinement).

  python -m experiments.train_postnet --data=data/person --audio2motion=runs/a2m \
      --workdir=runs/postnet [--syncnet=runs/syncnet] [--corpus=data/corpus] \
      [--config=paper|cpu|tiny] [--config.loss.mse_target=person] [--steps=N] [--seed=0]

`--data` is the target person's dataset; `--audio2motion` a trained stage-1 run, whose
corpus (`--corpus`) and SyncNet (`--syncnet`) are the defaults for those flags.
Hyper-parameters: `experiments/configs/postnet.py` (GeneFace's own generator schedule and
MSE: `--config.optim.lr=5e-4 --config.optim.warmup_steps=1000 --config.optim.decay_rate=0.1
--config.loss.mse_target=person`). The run (`train.postnet.train_postnet`, which explains
the representation, the stage-1 sample pool and the selection of the generator inference
uses) writes WORKDIR/config.json, identity.npy, landmark_std.npy, pool.npz, checkpoints,
metrics.jsonl, metrics.json and selected_generator.msgpack / .json, and prints the final
metrics as JSON. Held out for `eval_postnet`: the person's `valid` frames and the corpus'
`test` split.
"""

import json

from absl import flags

from experiments import common

FLAGS = flags.FLAGS
common.define_run_flags("postnet", data_help="The target person's dataset directory.")
flags.DEFINE_string("audio2motion", None, "Workdir of a trained stage-1 run "
                    "(train_audio2motion --model=vae).")
flags.DEFINE_string("corpus", None, "Corpus directory (default: the stage-1 run's).")
flags.DEFINE_string("syncnet", None, "Workdir of a trained SyncNet (default: the stage-1 "
                    "run's).")


def main(argv):
    del argv
    common.require("data", "audio2motion", "workdir")
    from geneface_jax.train import postnet
    print(json.dumps(postnet.train_postnet(common.run_config(), FLAGS.workdir, FLAGS.data,
                                           FLAGS.audio2motion, corpus=FLAGS.corpus,
                                           syncnet=FLAGS.syncnet)))


if __name__ == "__main__":
    common.run(main)
