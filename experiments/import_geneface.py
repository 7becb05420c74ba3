r"""Imports one stage of GeneFace's own PyTorch checkpoints as a workdir of this project.

  python -m experiments.import_geneface --ckpt=checkpoints/lrs3/lm3d_vae_sync \
      --stage=audio2motion --out=runs/geneface_a2m
  python -m experiments.import_geneface --ckpt=checkpoints/lrs3/syncnet --stage=syncnet \
      --out=runs/geneface_syncnet
  python -m experiments.import_geneface --ckpt=checkpoints/May/lm3d_postnet_sync \
      --stage=postnet --out=runs/geneface_postnet
  python -m experiments.import_geneface --ckpt=checkpoints/May/lm3d_nerf --stage=head \
      --lm3d_stats=data/binary/videos/May/trainval_dataset.npy --out=runs/geneface_head
  python -m experiments.import_geneface --ckpt=checkpoints/May/lm3d_nerf_torso \
      --stage=torso --head=runs/geneface_head --out=runs/geneface_torso
  python -m experiments.import_geneface --ckpt=checkpoints/May/lm3d_radnerf --stage=head \
      --lm3d_stats=data/binary/videos/May/trainval_dataset.npy --out=runs/geneface_grid_head

`--ckpt` is a GeneFace work dir (its newest `model_ckpt_steps_*.ckpt`, or `--step`) or one
checkpoint file; it is read without PyTorch and without running pickled code. The workdir
(`--out`) is what the stage's own training run writes, so `eval_*`, `train_postnet
--audio2motion=`, `train_audio2motion --syncnet=`, `synthesize` and the pipeline take it
(docs/import_geneface.md). Stage 1 and the SyncNet are found in their own runs and inside
a post-net run (`audio2motion_task`, `syncnet_task`); `--stage=head|torso` takes both of
GeneFace's renderers (lm3d_nerf and the grid lm3d_radnerf, told apart by their keys).
Prints a JSON summary.
"""

import json

from absl import flags

from experiments import common

FLAGS = flags.FLAGS
flags.DEFINE_string("ckpt", None, "GeneFace work dir or model_ckpt_steps_*.ckpt file.")
flags.DEFINE_enum("stage", None, ["audio2motion", "syncnet", "postnet", "head", "torso"],
                  "Which network to import.")
flags.DEFINE_string("out", None, "The workdir to write (must not hold anything yet).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest in --ckpt).")
flags.DEFINE_string("lm3d_stats", None, "Head: the person's GeneFace trainval_dataset.npy "
                    "(or an .npz with idexp_lm3d_mean / idexp_lm3d_std).")
flags.DEFINE_string("head", None, "Torso: the workdir of the imported head.")
flags.DEFINE_float("landmark_unit", 1.0, "Head-space units per BFM unit: landmarks of the "
                   "imported runs are GeneFace's idexp_lm3d / 10 times this.")
flags.DEFINE_bool("overwrite", False, "Replace a non-empty --out.")


def main(argv):
    del argv
    common.require("ckpt", "stage", "out")
    from geneface_jax.convert.geneface_import import import_geneface
    out = import_geneface(FLAGS.ckpt, FLAGS.stage, FLAGS.out, step=FLAGS.step,
                          lm3d_stats=FLAGS.lm3d_stats, head=FLAGS.head,
                          landmark_unit=FLAGS.landmark_unit, overwrite=FLAGS.overwrite)
    print(json.dumps({k: v for k, v in out.items() if k != "model"}))


if __name__ == "__main__":
    common.run(main)
