r"""Evaluates stage 2 on held-out audio: does the post-net move stage-1 motion to the
target person's style without losing lip sync?

  python -m experiments.eval_postnet --postnet=runs/postnet --workdir=runs/postnet_eval \
      [--data=data/person] [--corpus=data/corpus] [--audio2motion=runs/a2m]

(the dataset and stage-1 flags default to those of the post-net run). Held-out audio: the
corpus' `--splits` (default `test`: speakers never seen in training) and the person's
`--person_split` (default `valid`, the frames the post-net never saw). For every held-out
sequence, `--samples` stage-1 samples are drawn at `--temperature` and refined by the
post-net; both are turned into landmarks with the target person's identity
(`motion * std + identity`, as at inference), then compared with the person's tracked
landmarks (`--reference`: all its frames by default) by `train.postnet.evaluate_postnet`:

  fd_before / fd_after            Fréchet distance between the per-frame 204-d landmark
                                  vectors of the stage-1 / post-net outputs and the real
                                  ones (squared head units; synthetic: ~m^2)
  fd_mouth_before / fd_mouth_after  the same over the 20 mouth points (60-d)
  sync_before / sync_after        Pearson correlation of the mouth opening with the
                                  articulation oracle's, per sequence, averaged weighted by
                                  length (synthetic data only)

plus `fd_reduction` = 1 - fd_after / fd_before (and `fd_mouth_reduction`), `sync_drop`,
per-source figures (in metrics.json, not printed) and `bar_met`: fd_reduction >= 0.5 and
sync_drop <= 0.05 (the bar on the synthetic world).
"""

import json

from absl import flags

from experiments import common

FLAGS = flags.FLAGS
flags.DEFINE_string("postnet", None, "Workdir of a train_postnet run.")
flags.DEFINE_string("workdir", None, "Where metrics.json goes.")
flags.DEFINE_string("data", None, "The person dataset (default: the post-net run's).")
flags.DEFINE_string("corpus", None, "Corpus directory (default: the post-net run's).")
flags.DEFINE_string("audio2motion", None, "Stage-1 run (default: the post-net run's).")
flags.DEFINE_list("splits", ["test"], "Corpus splits of held-out audio.")
flags.DEFINE_string("person_split", "valid", "Person split of held-out audio ('' for none).")
flags.DEFINE_enum("reference", "all", ["all", "train", "valid"],
                  "The person's frames forming the real landmark distribution.")
flags.DEFINE_enum("generator", "selected", ["selected", "final"],
                  "Which post-net to evaluate: the one inference uses (the run's selected "
                  "generator, if any) or the EMA of its last checkpoint.")
flags.DEFINE_integer("samples", 1, "Stage-1 samples per held-out sequence.")
flags.DEFINE_float("temperature", 1.0, "Prior temperature of the stage-1 samples.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_float("bar_fd_reduction", 0.5, "Bar: minimum relative cut of fd.")
flags.DEFINE_float("bar_sync_drop", 0.05, "Bar: maximum drop of the sync correlation.")

SETTINGS = ("data", "corpus", "audio2motion", "splits", "person_split", "reference",
            "generator", "samples", "temperature", "seed", "bar_fd_reduction",
            "bar_sync_drop")


def main(argv):
    del argv
    common.require("postnet", "workdir")
    from geneface_jax.train import postnet
    out = postnet.evaluate_postnet(FLAGS.postnet, FLAGS.workdir,
                                   **{k: FLAGS[k].value for k in SETTINGS})
    print(json.dumps({k: v for k, v in out.items() if k != "per_source"}))


if __name__ == "__main__":
    common.run(main)
