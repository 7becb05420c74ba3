r"""Trains stage 3: the landmark-conditioned head NeRF, then the head-aware torso NeRF.

  python -m experiments.train_nerf --part=head --data=data/person --workdir=runs/head \
      [--config=paper|cpu|tiny] [--config.head.rays=1600] [--steps=N] [--seed=0]
  python -m experiments.train_nerf --part=torso --head=runs/head --workdir=runs/torso \
      [--data=...] [--config=...] [--steps=N]

Hyper-parameters: the config file that `--model` picks (`mlp`: experiments/configs/
nerf.py: model sizes, ray bounds, each part's rays and learning rate, evaluation frames;
`--steps` sets the trained part's `run.steps` / `run.torso_steps`). The run
(`train.nerf.train_nerf`) resumes an existing run in WORKDIR (one of another configuration
is refused), writes WORKDIR/config.json (what `eval_nerf`, `synthesize` and the torso
read), landmark_norm.npz, checkpoints, metrics.jsonl and metrics.json (`train_*` losses and
PSNR of the last logged step, `eval_psnr` of held-out frames, `steps_per_s`, `rays_per_s`,
`train_minutes`), and prints the final metrics as JSON.
"""

import json

from absl import flags

from experiments import common

FLAGS = flags.FLAGS
common.define_run_flags("grid", models={"grid": "grid", "mlp": "nerf"},
                        data_help="The person dataset (default for --part=torso: the head "
                                  "run's).")
flags.DEFINE_enum("part", None, ["head", "torso"], "Which model to train.")
flags.DEFINE_string("head", None, "Workdir of the trained head run (required for the torso).")


def main(argv):
    del argv
    common.require("workdir", "part")
    common.require("head" if FLAGS.part == "torso" else "data")
    config = common.run_config()
    if FLAGS.steps is not None:                 # --steps: the part being trained
        config.run.torso_steps = FLAGS.steps
    from geneface_jax.train import nerf
    print(json.dumps(nerf.train_nerf(config, FLAGS.workdir, FLAGS.part, FLAGS.data,
                                     FLAGS.head)))


if __name__ == "__main__":
    common.run(main)
