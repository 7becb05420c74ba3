r"""Trains the landmark-audio SyncNet on a corpus (stage 1's sync critic).

  python -m experiments.train_syncnet --data=data/corpus --workdir=runs/syncnet \
      [--config=paper|small] [--steps=40000] [--batch_size=256]

Pairs of a 5-frame mouth window and the audio of the same frames (label 1) or of frames
shifted by >= 3 (label 0) are drawn from the train split, one pair per utterance (GeneFace
draws >= 1024 pairs from each batch of utterances, its negatives at any other offset of
the same utterance); validation uses fixed pairs of the
valid split. Writes WORKDIR/config.json (what `train_audio2motion --syncnet` reads),
checkpoints, metrics.jsonl and metrics.json (`loss`, `accuracy`, `val_loss`,
`val_accuracy`, `steps_per_s`, `minutes`).
"""

import dataclasses
import json
import pathlib

from absl import flags

from experiments import common

FLAGS = flags.FLAGS
common.define_common_flags(steps=40_000, batch_size=256, data_help="Corpus directory.")
flags.DEFINE_float("lr", 5e-4, "Adam learning rate (see --lr_schedule). GeneFace's config "
                   "says scheduler: none, but its SyncNetTask.build_scheduler runs a cosine "
                   "decay from 5e-4 to 0 over max_updates = 40k steps.")
flags.DEFINE_enum("lr_schedule", "constant", ["constant", "cosine"],
                  "constant, or cosine: decay from --lr to 0 over --steps (GeneFace's "
                  "SyncNet schedule).")
flags.DEFINE_integer("eval_pairs", 512, "Validation pairs.")
flags.DEFINE_integer("eval_every", 1000, "Validation interval in steps (0: only at the end).")


def main(argv):
    del argv
    common.require("data", "workdir")
    import jax
    import numpy as np
    from geneface_jax import train
    from geneface_jax.data import batching, format as fmt
    from geneface_jax.motion.syncnet import SyncNetConfig
    from geneface_jax.train import audio2motion as a2m

    timer = common.Timer()
    corpus = fmt.load_corpus(FLAGS.data)
    identities = batching.speaker_identities(corpus)
    std = batching.expression_std(corpus, identities)
    train_set = batching.UtteranceSet.from_corpus(corpus, "train", std, identities)
    valid_set = batching.UtteranceSet.from_corpus(corpus, "valid", std, identities)
    cfg = SyncNetConfig.named(FLAGS.config, feature_dim=int(corpus.meta["feature_dim"]))
    optim = a2m.OptimConfig(lr=FLAGS.lr, warmup_steps=0, decay_rate=1.0, decay_steps=1,
                            cosine_steps=FLAGS.steps if FLAGS.lr_schedule == "cosine" else 0)

    mesh = train.make_mesh()
    n_dev = mesh.shape[train.DATA_AXIS]
    batch_size = FLAGS.batch_size - FLAGS.batch_size % n_dev or n_dev
    get_batch = batching.make_sync_batch_fn(train_set, batch_size=batch_size, seed=FLAGS.seed)
    n_eval = max(n_dev, FLAGS.eval_pairs - FLAGS.eval_pairs % n_dev)
    eval_batch = batching.sync_pairs(valid_set, np.arange(n_eval) % len(valid_set), cfg.window,
                                     np.random.default_rng([FLAGS.seed, 99]))

    def evaluate(st, step):
        _, m = run_eval(st, train.shard_batch(eval_batch, mesh), train.step_key(st, step))
        return {k: float(v) for k, v in jax.device_get(m).items()}

    run_cfg = dict(stage="syncnet", model=dataclasses.asdict(cfg), config=FLAGS.config,
                   data=str(pathlib.Path(FLAGS.data).absolute()), seed=FLAGS.seed,
                   batch_size=batch_size, lr=FLAGS.lr, optim=dataclasses.asdict(optim))
    workdir = common.prepare_workdir(FLAGS.workdir, run_cfg)
    model, state = a2m.create_syncnet_state(cfg, optim, FLAGS.seed)
    train_step, eval_step = a2m.make_syncnet_steps(model)
    run_eval = train.data_parallel(eval_step, mesh, donate_state=False)
    start = common.Timer()
    state, last = train.train_loop(
        workdir=workdir, state=state, step_fn=train_step, get_batch=get_batch,
        num_steps=FLAGS.steps, mesh=mesh, log_every=FLAGS.log_every,
        checkpoint_every=FLAGS.checkpoint_every, extra=run_cfg, eval_fn=evaluate,
        eval_every=FLAGS.eval_every, name="syncnet ")
    final = evaluate(state, FLAGS.steps)
    out = dict(loss=last.get("loss"), accuracy=last.get("accuracy"),
               val_loss=final["loss"], val_accuracy=final["accuracy"],
               val_d_pos=final["d_pos"], val_d_neg=final["d_neg"], steps=FLAGS.steps,
               steps_per_s=FLAGS.steps / max(start.minutes() * 60, 1e-9),
               minutes=timer.minutes(), devices=n_dev)
    train.write_final_metrics(workdir, out)
    print(json.dumps(out))


if __name__ == "__main__":
    common.run(main)
