r"""Trains stage 2: the domain-adaptive post-net (GeneFace's adversarial refinement).

  python -m experiments.train_postnet --data=data/person --audio2motion=runs/a2m \
      --workdir=runs/postnet [--syncnet=runs/syncnet] [--corpus=data/corpus] \
      [--config=paper|small] [--steps=12000] [--batch_size=32]

`--data` is the target person's dataset; `--audio2motion` a trained stage-1 run, whose
corpus (`--corpus`) and SyncNet (`--syncnet`) are the defaults for those flags.

1. Representation: the person's train frames become identity-removed motion in stage 1's
   units, `(landmarks - identity) / std` with identity = the person's mean train
   landmarks and std = the corpus std of the stage-1 run (`motion.postnet` explains why);
   `identity.npy` and `landmark_std.npy` are written to the workdir for inference.
   Coordinates the corpus never moves (std at its floor) are left unchanged by the
   post-net (`PostNetConfig.static_coords`) and hidden from the discriminator, which
   sees frames in landmark geometry (`--disc_view`, `train.postnet.discriminator_scale`).
2. Pool: stage-1 samples at `--temperature` are drawn once, `--samples_per_utterance` per
   utterance of the corpus' `--corpus_splits` (the multi-speaker domain) and
   `--person_samples` on the audio of the person's train frames, and cached in
   `WORKDIR/pool.npz` (a resumed run reuses it).
3. Adversarial training (`train.postnet`): every step refines `--batch_size` random
   `--window`-frame crops of pool samples (`--person_fraction` of them on the person's
   audio) and updates the generator (0.85 LSGAN + 0.1 SyncNet against the driving audio
   + 0.05 MSE to the input) and the frame-level discriminator (real = crops of the
   person's train motion). Adam 1e-4 each (beta1 0: no momentum, like GeneFace's
   RMSprop), discriminator lr halved every 40k steps. (GeneFace's generator RMSprop runs
   on stage 1's schedule, warm-up over 1000 steps to 5e-4 then x0.1 per 250k, which
   overwrites its `postnet_lr: 1e-4`: `--lr=5e-4 --warmup=1000 --lr_decay=0.1`; its MSE
   is `--mse_target=person`.) The post-net saved for inference is
   the exponential moving average of the generator (`--ema_decay`); with `--select`
   (default) it is the EMA of the pool check (below; every `--eval_every` steps) with
   the lowest pool Fréchet distance, kept in `selected_generator.msgpack` (the last EMA
   when no check ran). Checks fall on a fixed grid of steps, so a resumed or extended run
   selects what an uninterrupted one does.
   The adversarial game does not converge: after a few thousand steps the critic starts
   to win (it sees the same few hundred real frames again and again) and the refined
   motion drifts away from the person's again, so the last step is not the best one.

Held out for `eval_postnet`: the person's `valid` frames and the corpus' `test` split.
Writes WORKDIR/config.json, pool.npz, checkpoints, metrics.jsonl and metrics.json (the
last logged losses as `train_*`, `pool_fd_before` / `pool_fd_after`: Fréchet distance
between the identity-removed landmarks (head units) of `--eval_samples` corpus samples of
the pool, before / after refinement, and the person's train frames; `pool_fd_selected`
and `selected_step` of the generator inference uses; `steps_per_s`, `minutes`). The pool
check sees only training data (train-speaker samples, the person's train frames).
"""

import dataclasses
import json
import pathlib

from absl import flags

from experiments import common

FLAGS = flags.FLAGS
common.define_common_flags(steps=12_000, batch_size=32,
                           data_help="The target person's dataset directory.")
flags.DEFINE_string("audio2motion", None, "Workdir of a trained stage-1 run "
                    "(train_audio2motion --model=vae).")
flags.DEFINE_string("corpus", None, "Corpus directory (default: the stage-1 run's).")
flags.DEFINE_string("syncnet", None, "Workdir of a trained SyncNet (default: the stage-1 "
                    "run's).")
flags.DEFINE_integer("window", 64, "Training crop length in frames.")
flags.DEFINE_integer("samples_per_utterance", 4, "Stage-1 samples per corpus utterance.")
flags.DEFINE_integer("person_samples", 32, "Stage-1 samples on the person's train audio.")
flags.DEFINE_float("person_fraction", 0.25, "Share of each batch sampled on the person's "
                   "audio (the rest on corpus audio).")
flags.DEFINE_list("corpus_splits", ["train"], "Corpus splits whose audio feeds the pool.")
flags.DEFINE_float("temperature", 1.0, "Prior temperature of the stage-1 samples.")
flags.DEFINE_float("lr", 1e-4, "Generator Adam learning rate (GeneFace's generator runs at "
                   "5e-4 after a 1000-step warm-up: --lr=5e-4 --warmup=1000 --lr_decay=0.1).")
flags.DEFINE_integer("warmup", 0, "Linear warm-up steps of the generator's rate.")
flags.DEFINE_float("lr_decay", 1.0, "Generator rate decay factor reached after "
                   "--lr_decay_steps (1: constant).")
flags.DEFINE_integer("lr_decay_steps", 250_000, "Steps of one --lr_decay factor.")
flags.DEFINE_float("disc_lr", 1e-4, "Discriminator Adam learning rate.")
flags.DEFINE_integer("disc_decay_steps", 40_000, "Steps between halvings of disc_lr.")
flags.DEFINE_float("b1", 0.0, "Adam beta1 of both networks (0: no momentum, as GeneFace's "
                   "RMSprop).")
flags.DEFINE_float("ema_decay", 0.999, "Decay of the generator EMA used for inference.")
flags.DEFINE_float("lambda_adv", 0.85, "Adversarial (LSGAN) weight.")
flags.DEFINE_float("lambda_sync", 0.1, "SyncNet loss weight.")
flags.DEFINE_float("lambda_mse", 0.05, "Weight of the MSE term (see --mse_target).")
flags.DEFINE_enum("mse_target", "input", ["input", "person"],
                  "What the MSE pulls towards: input (the generator's input, every sample) "
                  "or person (GeneFace's task: samples on the person's audio towards the "
                  "person's tracked motion of the same frames).")
flags.DEFINE_enum("disc_view", "landmarks", ["landmarks", "normalized"],
                  "What the discriminator sees: landmarks (motion x std / rms(std), "
                  "GeneFace's un-normalised geometry) or the normalised motion itself.")
flags.DEFINE_integer("eval_every", 1000, "Interval of the pool Fréchet-distance check "
                     "(0: only at the end).")
flags.DEFINE_bool("select", True, "Inference uses the generator EMA of the pool check "
                  "(every --eval_every steps) with the lowest pool Fréchet distance "
                  "(selected_generator.msgpack), not necessarily the last; without any "
                  "check, the last.")
flags.DEFINE_integer("eval_samples", 128, "Corpus pool samples in the Fréchet check.")


def main(argv):
    del argv
    common.require("data", "audio2motion", "workdir")
    import jax
    import numpy as np
    from geneface_jax import train
    from geneface_jax.data import format as fmt
    from geneface_jax.errors import DatasetError, ShapeError
    from geneface_jax.motion.postnet import PostNetConfig
    from geneface_jax.motion import predict
    from geneface_jax.motion.predict import MotionPredictor
    from geneface_jax.train import audio2motion as a2m
    from geneface_jax.train import postnet as tp

    timer = common.Timer()
    if FLAGS.window < 8:
        raise ShapeError(f"--window must be at least 8 frames, got {FLAGS.window}")
    if not 0.0 <= FLAGS.person_fraction <= 1.0:
        raise ShapeError(f"--person_fraction must be in [0, 1], got {FLAGS.person_fraction}")
    person = fmt.load_person(FLAGS.data)
    mc, a2m_vars, a2m_cfg, std = predict.load_audio2motion(FLAGS.audio2motion)
    corpus_dir = FLAGS.corpus or a2m_cfg.get("data")
    corpus = fmt.load_corpus(corpus_dir)
    for name, dim in (("person dataset", person.meta["feature_dim"]),
                      ("corpus", corpus.meta["feature_dim"])):
        if int(dim) != mc.feature_dim:
            raise DatasetError(f"{FLAGS.data if name.startswith('person') else corpus_dir}: "
                               f"{name} has {dim}-d audio features, the stage-1 run "
                               f"{FLAGS.audio2motion} expects {mc.feature_dim}")
    syncnet_dir = FLAGS.syncnet or a2m_cfg.get("syncnet")
    syncnet, sync_vars, sync_cfg = None, None, None
    if FLAGS.lambda_sync > 0 and syncnet_dir:
        syncnet, sync_vars, sync_cfg = a2m.load_syncnet(syncnet_dir)
    real, identity = tp.person_motion(person, std, "train")

    cfg = PostNetConfig.named(FLAGS.config, motion_dim=mc.motion_dim,
                              static_coords=tp.static_coordinates(std))
    optim = tp.PostNetOptimConfig(lr=FLAGS.lr, disc_lr=FLAGS.disc_lr,
                                  disc_decay_steps=FLAGS.disc_decay_steps, b1=FLAGS.b1,
                                  ema_decay=FLAGS.ema_decay, warmup_steps=FLAGS.warmup,
                                  decay_rate=FLAGS.lr_decay,
                                  decay_steps=FLAGS.lr_decay_steps)
    losses = tp.PostNetLossConfig(adv=FLAGS.lambda_adv, mse=FLAGS.lambda_mse,
                                  sync=FLAGS.lambda_sync if syncnet else 0.0,
                                  mse_target=FLAGS.mse_target)
    if FLAGS.mse_target == "person" and (FLAGS.person_samples < 1
                                         or FLAGS.person_fraction <= 0):
        raise ShapeError("--mse_target=person needs samples on the person's audio "
                         "(--person_samples >= 1, --person_fraction > 0)")
    mesh = train.make_mesh()
    n_dev = mesh.shape[train.DATA_AXIS]
    batch_size = FLAGS.batch_size - FLAGS.batch_size % n_dev or n_dev
    absolute = lambda p: str(pathlib.Path(p).absolute()) if p else None  # noqa: E731
    pool_cfg = dict(samples_per_utterance=FLAGS.samples_per_utterance,
                    person_samples=FLAGS.person_samples, temperature=FLAGS.temperature,
                    corpus_splits=list(FLAGS.corpus_splits))
    run_cfg = dict(stage="postnet", model=dataclasses.asdict(cfg), config=FLAGS.config,
                   data=absolute(FLAGS.data), corpus=absolute(corpus_dir),
                   audio2motion=absolute(FLAGS.audio2motion), seed=FLAGS.seed,
                   batch_size=batch_size, window=FLAGS.window,
                   person_fraction=FLAGS.person_fraction, pool=pool_cfg,
                   optim=dataclasses.asdict(optim), losses=dataclasses.asdict(losses),
                   disc_view=FLAGS.disc_view,
                   syncnet=absolute(syncnet_dir) if syncnet else None,
                   syncnet_model=sync_cfg["model"] if syncnet else None)
    workdir = common.prepare_workdir(FLAGS.workdir, run_cfg)
    if train.is_main_process():
        for name, arr in (("landmark_std", std), ("identity", identity)):
            tmp = workdir / f".{name}.tmp.npy"
            np.save(tmp, arr)
            tmp.replace(workdir / f"{name}.npy")

    # The stage-1 sample pool, drawn once per run directory.
    pool_path = workdir / "pool.npz"
    if pool_path.is_file():
        pool = tp.SamplePool.load(pool_path)
    else:
        predictor = MotionPredictor(mc, a2m_vars, chunk=128)
        sequences = []
        for split in FLAGS.corpus_splits:
            for i in corpus.split(split):
                sequences.append((corpus.utterance(int(i))["mel"], 0,
                                  FLAGS.samples_per_utterance))
        train_idx = person.split("train")
        person_mel = np.asarray(person["mel"][2 * train_idx[0]:2 * (train_idx[-1] + 1)])
        if FLAGS.person_samples > 0:
            sequences.append((person_mel, 1, FLAGS.person_samples))
        if not sequences:
            raise DatasetError(f"{corpus_dir}: no utterances in splits {FLAGS.corpus_splits} "
                               "and --person_samples=0: nothing to train on")
        progress = train.Progress(sum(n for _, _, n in sequences), name="stage-1 pool ")
        report = lambda done, total: (progress.report(done) if done % 200 == 0  # noqa
                                      or done == total else None)
        pool = tp.build_pool(
            lambda mel, key: predictor.sample_motion(mel, key, FLAGS.temperature),
            sequences, seed=FLAGS.seed, progress=report)
        if train.is_main_process():        # every process drew the same pool
            pool.save(pool_path)

    disc_scale = (tp.discriminator_scale(std, cfg.static_coords)
                  if FLAGS.disc_view == "landmarks" else None)
    gen, disc, state = tp.create_postnet_state(cfg, optim, FLAGS.seed, sync_vars, disc_scale)
    steps = tp.make_postnet_steps(gen, disc, losses, syncnet, num_frames=FLAGS.window)
    get_batch = tp.make_batch_fn(pool, real, batch_size=batch_size, window=FLAGS.window,
                                 seed=FLAGS.seed, person_fraction=FLAGS.person_fraction,
                                 paired=real if FLAGS.mse_target == "person" else None)
    corpus_ids = pool.domain_samples(0)
    if not len(corpus_ids):
        corpus_ids = pool.domain_samples(1)
    eval_ids = corpus_ids[np.random.default_rng(FLAGS.seed).permutation(
        len(corpus_ids))[:FLAGS.eval_samples]]
    pool_fd = tp.pool_fd_fn(pool, real, cfg, eval_ids, std)

    selected = [predict.read_selected_info(workdir)]

    def consider(variables, step, fd):
        """Keeps `variables` as the inference generator if they beat the selection."""
        best = selected[0]
        if FLAGS.select and (best is None or fd < best["pool_fd"]):
            selected[0] = {"step": int(step), "pool_fd": float(fd)}
            if train.is_main_process():
                tp.save_selected_generator(workdir, variables, step, fd)

    def evaluate(st, step):
        variables = jax.device_get(st.generator_variables())
        fd = pool_fd(variables)
        consider(variables, step, fd)
        return {"pool_fd": fd}

    fd_before = pool_fd(None)
    start = common.Timer()
    state, last = train.train_loop(
        workdir=workdir, state=state, step_fn=steps.train_step, get_batch=get_batch,
        num_steps=FLAGS.steps, mesh=mesh, log_every=FLAGS.log_every,
        checkpoint_every=FLAGS.checkpoint_every, extra=run_cfg, eval_fn=evaluate,
        eval_every=FLAGS.eval_every, name="postnet ")
    fd_after = pool_fd(jax.device_get(state.generator_variables()))
    sel = selected[0] or {"step": FLAGS.steps, "pool_fd": fd_after}
    out = dict(pool_fd_before=fd_before, pool_fd_after=fd_after,
               pool_fd_selected=sel["pool_fd"], selected_step=sel["step"],
               **{f"train_{k}": v for k, v in last.items() if not k.startswith("eval_")},
               steps=FLAGS.steps, steps_per_s=FLAGS.steps / max(start.minutes() * 60, 1e-9),
               minutes=timer.minutes(), devices=n_dev, pool_samples=int(len(pool.samples)),
               pool_frames=int(len(pool.motion)))
    train.write_final_metrics(workdir, out)
    print(json.dumps(out))


if __name__ == "__main__":
    common.run(main)
