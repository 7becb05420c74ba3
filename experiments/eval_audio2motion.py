r"""Evaluates stage 1 on held-out speakers and utterances, with the mean-face test.

  python -m experiments.eval_audio2motion --data=data/corpus --vae=runs/a2m \
      --regression=runs/a2m_regression --workdir=runs/a2m_eval [--temperature=1.0]

For every utterance of the evaluated splits (default: `test`, whole speakers never seen
in training, and `valid`, held-out utterances of training speakers) landmarks are sampled
from the VAE (prior noise x temperature, chunked inference) and predicted by the
regression baseline, and the speaker's identity (its mean landmarks, as the target
person's identity is at inference) is added back; then they are compared with the tracked
landmarks:

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
import pathlib

from absl import flags

from experiments import common
from geneface_jax.train.metrics import pearson

FLAGS = flags.FLAGS
flags.DEFINE_string("data", None, "Corpus directory.")
flags.DEFINE_string("vae", None, "Workdir of a `train_audio2motion --model=vae` run.")
flags.DEFINE_string("regression", None, "Workdir of a `--model=regression` run (optional).")
flags.DEFINE_string("workdir", None, "Where metrics.json goes.")
flags.DEFINE_list("splits", ["test", "valid"], "Corpus splits to evaluate.")
flags.DEFINE_float("temperature", 1.0, "Prior temperature of the VAE samples.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")


def evaluate_model(predictor, corpus, indices, identities, std, seed, temperature):
    """Figures of one model over the utterances `indices`."""
    import jax
    import numpy as np
    from geneface_jax.data import landmarks as lm
    lmd, lmd_m, corr, weights, pred_open, true_open = [], [], [], [], [], []
    for i in indices:
        u = corpus.utterance(int(i))
        pred = predictor.predict_landmarks(u["mel"], jax.random.PRNGKey(seed * 100003 + int(i)),
                                           temperature, identity=identities[u["speaker"]], std=std)
        dist = np.linalg.norm(pred - u["landmarks"], axis=-1)        # [T, 68]
        lmd.append(dist.mean(1))
        lmd_m.append(dist[:, lm.MOUTH].mean(1))
        po = lm.mouth_opening(pred)
        pred_open.append(po)
        true_open.append(lm.mouth_opening(u["landmarks"]))
        if "oracle_open" in u and np.std(u["oracle_open"]) > 1e-6:
            corr.append(pearson(po, u["oracle_open"]))
            weights.append(len(po))
    pred_open, true_open = np.concatenate(pred_open), np.concatenate(true_open)
    return dict(lmd=float(np.concatenate(lmd).mean()), lmd_mouth=float(np.concatenate(lmd_m).mean()),
                sync_corr=float(np.average(corr, weights=weights)) if corr else float("nan"),
                std_ratio=float(pred_open.std() / max(true_open.std(), 1e-12)),
                frames=int(len(pred_open)), utterances=int(len(indices)))


def main(argv):
    del argv
    common.require("data", "vae", "workdir")
    import numpy as np
    from geneface_jax import train
    from geneface_jax.data import batching, format as fmt
    from geneface_jax.motion.predict import MotionPredictor
    from geneface_jax.train import audio2motion as a2m

    timer = common.Timer()
    corpus = fmt.load_corpus(FLAGS.data)
    identities = batching.speaker_identities(corpus)   # each speaker's mean landmarks
    models = {"vae": FLAGS.vae}
    if FLAGS.regression:
        models["regression"] = FLAGS.regression
    results = {}
    for name, workdir in models.items():
        mc, variables, _, std = a2m.load_audio2motion(workdir)
        predictor = MotionPredictor(mc, variables, chunk=256)
        per_split, all_idx = {}, []
        for split in FLAGS.splits:
            idx = corpus.split(split)
            if len(idx):
                per_split[split] = evaluate_model(predictor, corpus, idx, identities, std,
                                                  FLAGS.seed, FLAGS.temperature)
                all_idx.extend(idx)
        per_split["all"] = evaluate_model(predictor, corpus, np.asarray(all_idx), identities, std,
                                          FLAGS.seed, FLAGS.temperature)
        results[name] = per_split
        print(f"{name}: " + json.dumps(per_split["all"]))
    vae = results["vae"]["all"]
    out = dict(lmd=vae["lmd"], lmd_mouth=vae["lmd_mouth"], sync_corr=vae["sync_corr"],
               std_ratio_vae=vae["std_ratio"], temperature=FLAGS.temperature,
               splits=FLAGS.splits, per_split=results, minutes=timer.minutes())
    if "regression" in results:
        reg = results["regression"]["all"]
        out.update(std_ratio_regression=reg["std_ratio"], lmd_regression=reg["lmd"],
                   lmd_mouth_regression=reg["lmd_mouth"], sync_corr_regression=reg["sync_corr"])
    out["bar_met"] = bool(0.8 <= out["std_ratio_vae"] <= 1.25 and out["sync_corr"] >= 0.7
                          and out.get("std_ratio_regression", 0.0) < 0.8)
    pathlib.Path(FLAGS.workdir).mkdir(parents=True, exist_ok=True)
    train.write_final_metrics(FLAGS.workdir, out)
    print(json.dumps({k: v for k, v in out.items() if k != "per_split"}))


if __name__ == "__main__":
    common.run(main)
