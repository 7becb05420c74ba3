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
landmarks (`--reference`: all its frames by default):

  fd_before / fd_after            Fréchet distance between the per-frame 204-d landmark
                                  vectors of the stage-1 / post-net outputs and the real
                                  ones (squared head units; synthetic: ~m^2)
  fd_mouth_before / fd_mouth_after  the same over the 20 mouth points (60-d)
  sync_before / sync_after        Pearson correlation of the mouth opening with the
                                  articulation oracle's, per sequence, averaged weighted by
                                  length (synthetic data only)

plus `fd_reduction` = 1 - fd_after / fd_before (and `fd_mouth_reduction`), `sync_drop`,
per-source figures and `bar_met`: fd_reduction >= 0.5 and sync_drop <= 0.05 (the bar on
the synthetic world).
"""

import json
import pathlib

from absl import flags

from experiments import common
from geneface_jax.pipeline import pearson

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


def held_out_sequences(corpus, person, splits, person_split):
    """[(name, source, mel [2T, C], oracle_open [T] or None)] of the held-out audio."""
    import numpy as np
    out = []
    for split in splits:
        for i in corpus.split(split):
            u = corpus.utterance(int(i))
            out.append((f"corpus/{int(i)}", "corpus", u["mel"], u.get("oracle_open")))
    if person_split:
        idx = person.split(person_split)
        if len(idx):
            lo, hi = int(idx[0]), int(idx[-1]) + 1
            oracle = person["oracle_open"][lo:hi] if "oracle_open" in person.arrays else None
            out.append((f"person/{person_split}", "person",
                        np.asarray(person["mel"][2 * lo:2 * hi]),
                        None if oracle is None else np.asarray(oracle)))
    return out


def figures(outputs, reference, oracles):
    """FD (whole face, mouth) against `reference` [N, 68, 3] and the sync correlation of
    the landmark sequences `outputs` (list of [T, 68, 3])."""
    import numpy as np
    from geneface_jax.data import landmarks as lm
    from geneface_jax.train.postnet import frechet_distance
    frames = np.concatenate(outputs)
    ref = np.asarray(reference)
    corr, weights = [], []
    for seq, oracle in zip(outputs, oracles):
        if oracle is not None and len(seq) > 2 and np.std(oracle) > 1e-6:
            corr.append(pearson(lm.mouth_opening(seq), oracle))
            weights.append(len(seq))
    out = dict(sync=float(np.average(corr, weights=weights)) if corr else float("nan"),
               frames=int(len(frames)), sequences=len(outputs))
    if len(frames) >= 2:
        x, r = frames.reshape(len(frames), -1), ref.reshape(len(ref), -1)
        out["fd"] = frechet_distance(x, r)
        # Diagnostics: the FD's mean term and the ratio of total variances.
        out["fd_mean_term"] = float(np.sum(np.square(x.mean(0) - r.mean(0))))
        out["var_ratio"] = float(x.var(0, ddof=1).sum() / max(r.var(0, ddof=1).sum(), 1e-30))
        out["fd_mouth"] = frechet_distance(frames[:, lm.MOUTH].reshape(len(frames), -1),
                                           ref[:, lm.MOUTH].reshape(len(ref), -1))
    return out


def main(argv):
    del argv
    common.require("postnet", "workdir")
    import jax
    import numpy as np
    from geneface_jax import train
    from geneface_jax.data import format as fmt
    from geneface_jax.data.batching import denormalize_motion
    from geneface_jax.errors import DatasetError
    from geneface_jax.motion.postnet import refine_motion
    from geneface_jax.motion import predict
    from geneface_jax.motion.predict import MotionPredictor

    timer = common.Timer()
    config, g_vars, run_cfg, std, identity = predict.load_postnet(
        FLAGS.postnet, selected=FLAGS.generator == "selected")
    person = fmt.load_person(FLAGS.data or run_cfg["data"])
    corpus = fmt.load_corpus(FLAGS.corpus or run_cfg["corpus"])
    mc, a2m_vars, _, a2m_std = predict.load_audio2motion(FLAGS.audio2motion or
                                                     run_cfg["audio2motion"])
    if not np.allclose(a2m_std, std):
        raise DatasetError(f"{FLAGS.postnet}: the post-net was trained in the units of another "
                           "stage-1 run (landmark_std.npy differs)")
    predictor = MotionPredictor(mc, a2m_vars, chunk=128)
    sequences = held_out_sequences(corpus, person, FLAGS.splits, FLAGS.person_split)
    if not sequences:
        raise DatasetError(f"no held-out audio in corpus splits {FLAGS.splits} / person split "
                           f"{FLAGS.person_split!r}")
    before, after, oracles, sources = [], [], [], []
    for s, (name, source, mel, oracle) in enumerate(sequences):
        for k in range(FLAGS.samples):
            key = jax.random.fold_in(jax.random.PRNGKey(FLAGS.seed), s * 1000 + k)
            motion = predictor.sample_motion(mel, key, FLAGS.temperature)
            refined = refine_motion(config, g_vars, motion)
            before.append(denormalize_motion(motion, identity, std))
            after.append(denormalize_motion(refined, identity, std))
            oracles.append(oracle)
            sources.append(source)
    ref_idx = (np.arange(person.num_frames) if FLAGS.reference == "all"
               else person.split(FLAGS.reference))
    reference = np.asarray(person["landmarks"])[ref_idx]

    def pick(seqs, src=None):
        keep = [i for i, s in enumerate(sources) if src is None or s == src]
        return [seqs[i] for i in keep], [oracles[i] for i in keep]

    per_source = {}
    for src in [None] + sorted(set(sources)):
        b, orc = pick(before, src)
        a, _ = pick(after, src)
        fb, fa = figures(b, reference, orc), figures(a, reference, orc)
        per_source[src or "all"] = {f"{k}_before": v for k, v in fb.items()
                                    if k not in ("frames", "sequences")}
        per_source[src or "all"].update({f"{k}_after": v for k, v in fa.items()
                                         if k not in ("frames", "sequences")})
        per_source[src or "all"].update(frames=fb["frames"], sequences=fb["sequences"])
    al = per_source["all"]
    out = dict(fd_before=al["fd_before"], fd_after=al["fd_after"],
               fd_mouth_before=al["fd_mouth_before"], fd_mouth_after=al["fd_mouth_after"],
               sync_before=al["sync_before"], sync_after=al["sync_after"],
               fd_mean_term_before=al["fd_mean_term_before"],
               fd_mean_term_after=al["fd_mean_term_after"],
               var_ratio_before=al["var_ratio_before"], var_ratio_after=al["var_ratio_after"])
    out.update(fd_reduction=1.0 - out["fd_after"] / max(out["fd_before"], 1e-30),
               fd_mouth_reduction=1.0 - out["fd_mouth_after"] / max(out["fd_mouth_before"],
                                                                      1e-30),
               sync_drop=out["sync_before"] - out["sync_after"])
    out["bar_met"] = bool(out["fd_reduction"] >= FLAGS.bar_fd_reduction
                          and out["sync_drop"] <= FLAGS.bar_sync_drop)
    out.update(per_source=per_source, inference_generator=run_cfg["inference_generator"],
               reference=FLAGS.reference, splits=FLAGS.splits,
               person_split=FLAGS.person_split, samples=FLAGS.samples,
               temperature=FLAGS.temperature, reference_frames=int(len(reference)),
               units="fd in squared landmark (head) units", minutes=timer.minutes())
    pathlib.Path(FLAGS.workdir).mkdir(parents=True, exist_ok=True)
    train.write_final_metrics(FLAGS.workdir, out)
    print(json.dumps({k: v for k, v in out.items() if k != "per_source"}))


if __name__ == "__main__":
    common.run(main)
