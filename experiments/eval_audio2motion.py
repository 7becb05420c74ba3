r"""Evaluates stage 1 on held-out speakers and utterances, with the mean-face test.

  python -m experiments.eval_audio2motion --data=data/corpus --vae=runs/a2m \
      --regression=runs/a2m_regression --workdir=runs/a2m_eval [--temperature=1.0]

For every utterance of the evaluated splits (default: `test`, whole speakers never seen
in training, and `valid`, held-out utterances of training speakers) landmarks are sampled
from the VAE (prior noise x temperature, chunked inference; `--samples` independent samples,
the VAE's figures are their means and metrics.json keeps each sample's sync correlation and
std ratio under per_split/vae/all) and predicted by the
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

from absl import app
from absl import flags

from experiments import common
from geneface_jax.pipeline import pearson

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


def utterance_stats(predictor, corpus, i, identities, std, seed, temperature, s):
    """One prior sample `s` of utterance `i`: (per-frame mean landmark distance [T], its
    mouth part [T], predicted and tracked mouth opening [T], (pearson with the oracle
    opening, T) or None). Sample 0 uses key `PRNGKey(seed * 100003 + i)`, sample s > 0 that
    key folded with s, so one sample reproduces single-sample evaluations."""
    import jax
    import numpy as np
    from geneface_jax.data import landmarks as lm
    u = corpus.utterance(int(i))
    key = jax.random.PRNGKey(seed * 100003 + int(i))
    if s:
        key = jax.random.fold_in(key, s)
    pred = predictor.predict_landmarks(u["mel"], key, temperature,
                                       identity=identities[u["speaker"]], std=std)
    dist = np.linalg.norm(pred - u["landmarks"], axis=-1)        # [T, 68]
    po = lm.mouth_opening(pred)
    corr = None
    if "oracle_open" in u and np.std(u["oracle_open"]) > 1e-6:
        corr = (pearson(po, u["oracle_open"]), len(po))
    return dist.mean(1), dist[:, lm.MOUTH].mean(1), po, lm.mouth_opening(u["landmarks"]), corr


def evaluate_model(predictor, corpus, indices, identities, std, seed, temperature, samples=1,
                   cache=None):
    """Figures of one model over the utterances `indices`, averaged over `samples`
    independent prior samples per utterance (`*_per_sample` lists keep each sample's).
    `cache` (a dict, shared between calls for the same model and settings) keeps each
    utterance's `utterance_stats`, so an utterance evaluated for its split is not
    predicted again for "all"."""
    import numpy as np
    cache = {} if cache is None else cache
    figures = []
    for s in range(samples):
        lmd, lmd_m, corr, weights, pred_open, true_open = [], [], [], [], [], []
        for i in indices:
            if (int(i), s) not in cache:
                cache[int(i), s] = utterance_stats(predictor, corpus, i, identities, std,
                                                   seed, temperature, s)
            d, dm, po, to, c = cache[int(i), s]
            lmd.append(d)
            lmd_m.append(dm)
            pred_open.append(po)
            true_open.append(to)
            if c is not None:
                corr.append(c[0])
                weights.append(c[1])
        pred_open, true_open = np.concatenate(pred_open), np.concatenate(true_open)
        figures.append(dict(
            lmd=float(np.concatenate(lmd).mean()), lmd_mouth=float(np.concatenate(lmd_m).mean()),
            sync_corr=float(np.average(corr, weights=weights)) if corr else float("nan"),
            std_ratio=float(pred_open.std() / max(true_open.std(), 1e-12))))
    out = {k: float(np.mean([f[k] for f in figures])) for k in figures[0]}
    if samples > 1:
        out.update({f"{k}_per_sample": [f[k] for f in figures]
                    for k in ("sync_corr", "std_ratio")})
    return dict(out, samples=samples, frames=int(len(pred_open)),
                utterances=int(len(indices)))


def main(argv):
    del argv
    common.require("data", "vae", "workdir")
    import numpy as np
    from geneface_jax import train
    from geneface_jax.data import batching, format as fmt
    from geneface_jax.motion import predict
    from geneface_jax.motion.predict import MotionPredictor

    timer = common.Timer()
    corpus = fmt.load_corpus(FLAGS.data)
    identities = batching.speaker_identities(corpus)   # each speaker's mean landmarks
    models = {"vae": FLAGS.vae}
    if FLAGS.regression:
        models["regression"] = FLAGS.regression
    if FLAGS.samples < 1:
        raise app.UsageError(f"--samples must be >= 1, got {FLAGS.samples}")
    samples = {"vae": FLAGS.samples, "regression": 1}
    results = {}
    for name, workdir in models.items():
        mc, variables, _, std = predict.load_audio2motion(workdir)
        predictor = MotionPredictor(mc, variables, chunk=256)
        per_split, all_idx, cache = {}, [], {}
        for split in FLAGS.splits:
            idx = corpus.split(split)
            if len(idx):
                per_split[split] = evaluate_model(predictor, corpus, idx, identities, std,
                                                  FLAGS.seed, FLAGS.temperature,
                                                  samples[name], cache)
                all_idx.extend(idx)
        per_split["all"] = evaluate_model(predictor, corpus, np.asarray(all_idx), identities, std,
                                          FLAGS.seed, FLAGS.temperature, samples[name], cache)
        results[name] = per_split
        print(f"{name}: " + json.dumps(per_split["all"]))
    vae = results["vae"]["all"]
    out = dict(lmd=vae["lmd"], lmd_mouth=vae["lmd_mouth"], sync_corr=vae["sync_corr"],
               std_ratio_vae=vae["std_ratio"], temperature=FLAGS.temperature,
               samples=FLAGS.samples,
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
