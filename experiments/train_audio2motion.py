r"""Trains stage 1: the audio-to-motion VAE with its flow prior (or the regression baseline).

  python -m experiments.train_audio2motion --data=data/corpus --workdir=runs/a2m \
      --syncnet=runs/syncnet [--config=paper|small] [--steps=40000] [--batch_size=32]
  python -m experiments.train_audio2motion --model=regression ...   # mean-face baseline

Trains on random `--window`-frame crops of the corpus' train utterances (shorter ones are
padded and masked); targets are identity-removed landmarks (each speaker's mean landmarks
subtracted) divided by their train-split std, 204-d (`data.batching`).
Losses: L2 + L1 + 3 x continuity + 0.5 x KL + lambda_sync x SyncNet loss (the SyncNet
trained by `train_syncnet`, frozen). GeneFace's task has no L1 term, uses KL 0.4 in its
LRS3 config (0.5 in the base one), adds the first frame's error to the continuity term
and switches the sync loss on only once the validation sync loss is <= 0.75:
`--lambda_l1=0 --lambda_kl=0.4 --continuity=geneface` gives its weights
(docs/geneface_differences.md). Validation reconstruction losses on the
valid split are logged every --eval_every steps. Writes WORKDIR/config.json (read by
`eval_audio2motion` and the pipeline), checkpoints, metrics.jsonl and metrics.json
(`val_l2`, `val_l1`, `val_l2_start`, `kl`, `sync`, `steps_per_s`, `minutes`, ...).
"""

import dataclasses
import json
import pathlib

from absl import flags

from experiments import common

FLAGS = flags.FLAGS
common.define_common_flags(steps=40_000, batch_size=32, data_help="Corpus directory.")
flags.DEFINE_enum("model", "vae", ["vae", "regression"],
                  "vae: GeneFace's FVAE + flow prior; regression: same decoder, no latent.")
flags.DEFINE_string("syncnet", None, "Workdir of a trained SyncNet (enables the sync loss).")
flags.DEFINE_integer("window", 100, "Training crop length in frames (multiple of 4).")
flags.DEFINE_float("lr", 5e-4, "Adam learning rate.")
flags.DEFINE_integer("warmup", 1000, "Linear warm-up steps.")
flags.DEFINE_float("lambda_kl", 0.5, "KL weight (GeneFace: 0.5 base config, 0.4 LRS3 "
                   "config).")
flags.DEFINE_float("lambda_l1", 1.0, "L1 reconstruction weight (GeneFace has no L1 term: 0).")
flags.DEFINE_float("lambda_l2", 1.0, "L2 reconstruction weight.")
flags.DEFINE_float("lambda_continuity", 3.0, "Continuity (frame-difference) loss weight.")
flags.DEFINE_enum("continuity", "pairs", ["pairs", "geneface"],
                  "Continuity loss form: pairs = mean over valid consecutive-frame pairs; "
                  "geneface = GeneFace's (first frame's error added, divided by frames x D).")
flags.DEFINE_float("lambda_sync", 0.01, "SyncNet loss weight (needs --syncnet).")
flags.DEFINE_enum("conv_algorithm", "auto", ["auto", "winograd", "direct"],
                  "How the encoder/decoder WaveNets' 5-tap convs are computed (same parameters, "
                  "same function): auto = Winograd F(4, 5) on CPU (~2x faster convs), direct "
                  "(lax.conv) elsewhere.")
flags.DEFINE_integer("eval_every", 1000, "Validation interval in steps (0: only at the end).")


def main(argv):
    del argv
    common.require("data", "workdir")
    import jax
    from geneface_jax import train
    from geneface_jax.data import batching, format as fmt
    from geneface_jax.errors import ShapeError
    from geneface_jax.motion.vae import Audio2MotionConfig
    from geneface_jax.train import audio2motion as a2m

    timer = common.Timer()
    if FLAGS.window % 4:
        raise ShapeError(f"--window must be a multiple of 4, got {FLAGS.window}")
    corpus = fmt.load_corpus(FLAGS.data)
    identities = batching.speaker_identities(corpus)
    std = batching.expression_std(corpus, identities)
    train_set = batching.UtteranceSet.from_corpus(corpus, "train", std, identities)
    valid_set = batching.UtteranceSet.from_corpus(corpus, "valid", std, identities)
    cfg = Audio2MotionConfig.named(FLAGS.config, feature_dim=int(corpus.meta["feature_dim"]),
                                   motion_dim=train_set.motion[0].shape[1],
                                   use_latent=FLAGS.model == "vae",
                                   conv_algorithm=FLAGS.conv_algorithm)
    optim = a2m.OptimConfig(lr=FLAGS.lr, warmup_steps=FLAGS.warmup)
    losses = a2m.VAELossConfig(kl=FLAGS.lambda_kl, l1=FLAGS.lambda_l1, l2=FLAGS.lambda_l2,
                               continuity=FLAGS.lambda_continuity,
                               continuity_form=FLAGS.continuity,
                               sync=FLAGS.lambda_sync if FLAGS.syncnet else 0.0)
    syncnet, sync_vars, sync_cfg = None, None, None
    if FLAGS.syncnet and losses.sync > 0:
        syncnet, sync_vars, sync_cfg = a2m.load_syncnet(FLAGS.syncnet)

    mesh = train.make_mesh()
    n_dev = mesh.shape[train.DATA_AXIS]
    batch_size = FLAGS.batch_size - FLAGS.batch_size % n_dev or n_dev
    keys = ("mel", "motion", "mask")
    window_fn = batching.make_batch_fn(train_set, batch_size=batch_size, window=FLAGS.window,
                                       seed=FLAGS.seed)
    get_batch = lambda step: {k: v for k, v in window_fn(step).items() if k in keys}  # noqa

    # Validation: every valid utterance whole, padded to a common length (one compile).
    eval_batches = []
    for _, b in batching.full_batches(valid_set, n_dev * max(1, 32 // n_dev)):
        eval_batches.append({k: b[k] for k in keys})
    longest = max(b["mask"].shape[1] for b in eval_batches)
    import numpy as np
    for b in eval_batches:
        pad = longest - b["mask"].shape[1]
        for k in keys:
            widths = [(0, 0)] * b[k].ndim
            widths[1] = (0, pad * (2 if k == "mel" else 1))
            b[k] = np.pad(b[k], widths)
        rows = b["mask"].shape[0]
        if rows % n_dev:
            for k in keys:
                b[k] = np.concatenate([b[k], np.zeros((n_dev - rows % n_dev,) + b[k].shape[1:],
                                                      b[k].dtype)])

    def evaluate(st, step):
        tot, weight = {}, 0.0
        for i, b in enumerate(eval_batches):
            _, m = run_eval(st, train.shard_batch(b, mesh), jax.random.PRNGKey(1000 + i))
            w = float(b["mask"].sum())
            for k, v in jax.device_get(m).items():
                tot[k] = tot.get(k, 0.0) + float(v) * w
            weight += w
        return {k: v / weight for k, v in tot.items()}

    run_cfg = dict(stage="audio2motion", model_type=FLAGS.model, model=dataclasses.asdict(cfg),
                   config=FLAGS.config, data=str(pathlib.Path(FLAGS.data).absolute()),
                   seed=FLAGS.seed, batch_size=batch_size, window=FLAGS.window,
                   optim=dataclasses.asdict(optim), losses=dataclasses.asdict(losses),
                   syncnet=str(pathlib.Path(FLAGS.syncnet).absolute()) if syncnet else None,
                   syncnet_model=sync_cfg["model"] if syncnet else None)
    workdir = common.prepare_workdir(FLAGS.workdir, run_cfg)
    if train.is_main_process():
        np.save(workdir / "landmark_std.npy", std)   # motion = (landmarks - identity) / std
    # The model is built (and compiled) once the workdir has accepted this configuration.
    model, state = a2m.create_vae_state(cfg, optim, FLAGS.seed, sync_vars)
    train_step, eval_step = a2m.make_vae_steps(model, losses, syncnet, num_frames=FLAGS.window)
    _, eval_step_nosync = a2m.make_vae_steps(model, dataclasses.replace(losses, sync=0.0))
    run_eval = train.data_parallel(eval_step_nosync, mesh, donate_state=False)
    start_eval = evaluate(train.replicate(state, mesh), 0)
    start = common.Timer()
    state, last = train.train_loop(
        workdir=workdir, state=state, step_fn=train_step, get_batch=get_batch,
        num_steps=FLAGS.steps, mesh=mesh, log_every=FLAGS.log_every,
        checkpoint_every=FLAGS.checkpoint_every, extra=run_cfg, eval_fn=evaluate,
        eval_every=FLAGS.eval_every, name=f"{FLAGS.model} ")
    final = evaluate(state, FLAGS.steps)
    out = dict(val_l2=final["l2"], val_l1=final["l1"], val_kl=final["kl"],
               val_l2_start=start_eval["l2"], val_l1_start=start_eval["l1"],
               **{f"train_{k}": v for k, v in last.items() if not k.startswith("eval_")},
               steps=FLAGS.steps, steps_per_s=FLAGS.steps / max(start.minutes() * 60, 1e-9),
               minutes=timer.minutes(), devices=n_dev, model_type=FLAGS.model)
    train.write_final_metrics(workdir, out)
    print(json.dumps(out))


if __name__ == "__main__":
    common.run(main)
