"""Stage 1 training: pure steps for the landmark SyncNet and the audio-to-motion VAE.

Every step has the signature `step(state, batch, rng) -> (state, metrics)` and runs per
device under `train.parallel.data_parallel`; losses are global-batch means
(`parallel.global_mean`), so 1 and N devices give the same numbers.

Batches (host arrays, from `geneface_jax.data.batching`):
  SyncNet: `audio` [B, 2W, C], `mouth` [B, W, 60], `label` [B] (1 in sync, 0 shifted).
  VAE:     `mel` [B, 2T, C], `motion` [B, T, D] normalised, `mask` [B, T, 1].
"""

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import optax

from geneface_jax.checkpoint import check_like, read_run_config, restore_run
from geneface_jax.errors import InputError, ShapeError
from geneface_jax.motion import predict
from geneface_jax.motion import syncnet as sync_lib
from geneface_jax.motion import vae as vae_lib
from geneface_jax.train import parallel
from geneface_jax.train.state import TrainState, make_optimizer
from geneface_jax.train import loop as loop_lib
from geneface_jax.train import metrics as metrics_lib


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Adam with warm-up and exponential decay (GeneFace: lr 5e-4, warm-up 1000, x0.1 per
    250k steps, gradient clipping at global norm 1), or with `cosine_steps > 0` a cosine
    decay from `lr` to 0 over that many steps (no warm-up; what GeneFace's
    `SyncNetTask.build_scheduler` runs over its 40k steps)."""
    lr: float = 5e-4
    warmup_steps: int = 1000
    decay_rate: float = 0.1
    decay_steps: int = 250_000
    clip_norm: float = 1.0
    cosine_steps: int = 0

    def optimizer(self):
        if self.cosine_steps > 0:
            chain = [optax.clip_by_global_norm(self.clip_norm)] if self.clip_norm else []
            chain.append(optax.adam(optax.cosine_decay_schedule(self.lr, self.cosine_steps)))
            return optax.chain(*chain)
        return make_optimizer(self.lr, warmup_steps=self.warmup_steps,
                              decay_rate=self.decay_rate, decay_steps=self.decay_steps,
                              clip_norm=self.clip_norm)


@dataclasses.dataclass(frozen=True)
class VAELossConfig:
    """Loss weights of the VAE step.

    GeneFace (`VAESyncAudio2MotionTask._training_step`): MSE 1, continuity 3, KL 0.5 in
    its base config (`egs/egs_bases/audio2motion/vae_sync.yaml`; 0.4 in its LRS3 config
    `egs/datasets/lrs3/lm3d_vae_sync.yaml`), sync 0.01 once the validation sync loss has
    reached 0.75, and no L1 term (its `mae_loss` is never added): `l1=0` restores that.
    continuity_form: "pairs" (here: squared error of frame differences, mean over the
    valid pairs of consecutive frames) or "geneface" (its `continuity_loss`: the first
    frame's squared error is added and the sum is divided by valid frames x D).
    """
    kl: float = 0.5
    l2: float = 1.0
    l1: float = 1.0
    continuity: float = 3.0
    sync: float = 0.01
    sync_hop: int = 2   # frames between the starts of the sync-loss windows
    continuity_form: str = "pairs"

    def __post_init__(self):
        if self.continuity_form not in CONTINUITY_FORMS:
            raise ValueError(f"VAELossConfig: continuity_form must be one of "
                             f"{CONTINUITY_FORMS}, got {self.continuity_form!r}")


CONTINUITY_FORMS = ("pairs", "geneface")


# --------------------------------------------------------------------------- SyncNet

def create_syncnet_state(config: sync_lib.SyncNetConfig, optim: OptimConfig, seed: int):
    model, variables = sync_lib.init_syncnet(config, seed, axis_name=parallel.DATA_AXIS)
    return model, TrainState.create(apply_fn=model.apply, params=variables["params"],
                                    batch_stats=variables["batch_stats"],
                                    tx=optim.optimizer(), rng=seed)


def make_syncnet_steps(model):
    """(train_step, eval_step) of SyncNet: BCE of cos(audio, mouth) against the label."""

    def forward(params, batch_stats, batch, train):
        variables = {"params": params, "batch_stats": batch_stats}
        if train:
            (a, m), upd = model.apply(variables, batch["audio"], batch["mouth"], train=True,
                                      mutable=["batch_stats"])
        else:
            a, m = model.apply(variables, batch["audio"], batch["mouth"], train=False)
            upd = {"batch_stats": batch_stats}
        d = sync_lib.sync_probability(a, m)
        label = batch["label"].astype(d.dtype)
        ones = jnp.ones_like(d)
        loss = parallel.global_mean(sync_lib.bce(d, label), ones)
        acc = parallel.global_mean(((d > 0.5) == (label > 0.5)).astype(d.dtype), ones)
        return loss, (upd, {"loss": loss, "accuracy": acc,
                            "d_pos": parallel.global_mean(d, label),
                            "d_neg": parallel.global_mean(d, 1.0 - label)})

    def train_step(state, batch, rng):
        del rng
        grad_fn = jax.value_and_grad(forward, has_aux=True)
        (_, (upd, metrics)), grads = grad_fn(state.params, state.batch_stats, batch, True)
        metrics["grad_norm"] = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads)))
        return state.apply_gradients(grads, batch_stats=upd["batch_stats"]), metrics

    def eval_step(state, batch, rng):
        del rng
        _, (_, metrics) = forward(state.params, state.batch_stats, batch, False)
        return state, metrics

    return train_step, eval_step


# --------------------------------------------------------------------------- VAE

def create_vae_state(config: vae_lib.Audio2MotionConfig, optim: OptimConfig, seed: int,
                     syncnet_variables=None):
    """(model, TrainState); `syncnet_variables` (frozen) go to `state.frozen['syncnet']`."""
    model, variables = vae_lib.init_audio2motion(config, seed, axis_name=parallel.DATA_AXIS)
    frozen = {} if syncnet_variables is None else {"syncnet": syncnet_variables}
    return model, TrainState.create(apply_fn=model.apply, params=variables["params"],
                                    batch_stats=variables["batch_stats"],
                                    tx=optim.optimizer(), rng=seed, frozen=frozen)


def reconstruction_losses(pred, target, mask, continuity_form="pairs"):
    """Global-batch masked L2, L1 and continuity (FACIAL-style, as GeneFace) losses of
    `pred`, `target` `[B, T, D]` under `mask` `[B, T, 1]` (a prefix of valid frames).

    continuity_form "pairs": mean squared error of the frame differences over the pairs
    of valid consecutive frames; "geneface": GeneFace's `continuity_loss`, i.e.
    `(sum of the valid frame-difference errors^2 + sum of the first frame's errors^2) /
    (valid frames x D)`.
    """
    err = pred - target
    l2 = parallel.global_mean(jnp.square(err), mask)
    l1 = parallel.global_mean(jnp.abs(err), mask)
    dpred = pred[:, 1:] - pred[:, :-1]
    dtgt = target[:, 1:] - target[:, :-1]
    if continuity_form == "pairs":
        pair_mask = mask[:, 1:] * mask[:, :-1]
        cont = parallel.global_mean(jnp.square(dpred - dtgt), pair_mask)
    elif continuity_form == "geneface":
        # frame 0 carries its own error, frame t > 0 the error of its difference to t - 1
        terms = jnp.concatenate([err[:, :1], dpred - dtgt], axis=1)
        cont = parallel.global_mean(jnp.square(terms), mask)
    else:
        raise ValueError(f"reconstruction_losses: continuity_form must be one of "
                         f"{CONTINUITY_FORMS}, got {continuity_form!r}")
    return l2, l1, cont


def make_vae_steps(model, losses: VAELossConfig = VAELossConfig(), syncnet=None,
                   num_frames=None):
    """(train_step, eval_step) of the VAE (or, with `use_latent=False`, the regression
    baseline). With `syncnet` (a `SyncNet` module; variables in `state.frozen`) and
    `losses.sync > 0`, adds the sync loss on windows of the reconstruction.
    `num_frames` (the batch's T) fixes the sync window starts."""
    use_sync = syncnet is not None and losses.sync > 0
    if use_sync:
        if num_frames is None:
            raise ValueError("make_vae_steps: num_frames is needed for the sync loss")
        starts = sync_lib.window_starts(num_frames, syncnet.config.window, losses.sync_hop)

    def forward(params, state, batch, key, train):
        variables = {"params": params, "batch_stats": state.batch_stats}
        k_sample, k_drop = jax.random.split(key)
        # Encoder noise drawn over the global batch (same numbers on 1 or N devices);
        # dropout (0 in GeneFace's configs) draws per device.
        mask = batch["mask"]
        lat = (mask.shape[0], mask.shape[1] // model.config.stride, model.config.latent)
        eps = parallel.global_normal(k_sample, lat)
        rngs = {"dropout": parallel.device_rng(k_drop)}
        if train:
            out, upd = model.apply(variables, batch["mel"], batch["motion"], mask,
                                   train=True, eps=eps, rngs=rngs, mutable=["batch_stats"])
        else:
            out = model.apply(variables, batch["mel"], batch["motion"], mask, train=False,
                              eps=eps, rngs=rngs)
            upd = {"batch_stats": state.batch_stats}
        l2, l1, cont = reconstruction_losses(out["recon"], batch["motion"], mask,
                                             losses.continuity_form)
        kl = parallel.global_mean(out["kl_terms"], out["latent_mask"])
        total = losses.l2 * l2 + losses.l1 * l1 + losses.continuity * cont + losses.kl * kl
        metrics = {"l2": l2, "l1": l1, "continuity": cont, "kl": kl}
        if use_sync:
            terms, valid = sync_lib.sync_loss_terms(syncnet, state.frozen["syncnet"],
                                                    out["recon"], batch["mel"], mask, starts)
            sync = parallel.global_mean(terms, valid)
            total = total + losses.sync * sync
            metrics["sync"] = sync
        metrics["loss"] = total
        return total, (upd, metrics)

    def train_step(state, batch, rng):
        grad_fn = jax.value_and_grad(forward, has_aux=True)
        (_, (upd, metrics)), grads = grad_fn(state.params, state, batch, rng, True)
        metrics["grad_norm"] = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads)))
        return state.apply_gradients(grads, batch_stats=upd["batch_stats"]), metrics

    def eval_step(state, batch, rng):
        _, (_, metrics) = forward(state.params, state, batch, rng, False)
        return state, metrics

    return train_step, eval_step


# --------------------------------------------------------------------------- runs

def train_syncnet(config, workdir, data, *, mesh=None):
    """Trains (or resumes) the landmark-audio SyncNet on a corpus; the `train_syncnet` run.

    Pairs of a 5-frame mouth window and the audio of the same frames (label 1) or of frames
    shifted by >= 3 (label 0) come from the train split, one pair per utterance; validation
    uses fixed pairs of the valid split.

    Args:
      config: `experiments/configs/syncnet.py`'s ConfigDict (model, optim, batch_size,
        eval_pairs, seed, run: steps / log_every / checkpoint_every / eval_every).
      workdir: run directory; writes config.json (what `load_syncnet` reads), checkpoints,
        metrics.jsonl and metrics.json.
      data: corpus directory (`data.format.load_corpus`).
      mesh: the device mesh (default: every device, `mesh.make_mesh()`).
    Returns:
      the final metrics (`loss`, `accuracy` of the last logged step; `val_loss`,
      `val_accuracy`, `val_d_pos`, `val_d_neg` on the validation pairs; `steps_per_s`,
      `minutes`, `devices`), also written to metrics.json.
    """
    import time

    import numpy as np

    from geneface_jax.data import batching
    from geneface_jax.data import format as fmt
    from geneface_jax.mesh import DATA_AXIS, make_mesh

    t0 = time.time()
    corpus = fmt.load_corpus(data)
    identities = batching.speaker_identities(corpus)
    std = batching.expression_std(corpus, identities)
    train_set = batching.UtteranceSet.from_corpus(corpus, "train", std, identities)
    valid_set = batching.UtteranceSet.from_corpus(corpus, "valid", std, identities)
    cfg = sync_lib.SyncNetConfig(feature_dim=int(corpus.meta["feature_dim"]),
                                 **config.model)
    steps = int(config.run.steps)
    if config.optim.schedule not in ("constant", "cosine"):
        raise ValueError(f"optim.schedule must be constant or cosine, "
                         f"got {config.optim.schedule!r}")
    optim = OptimConfig(lr=config.optim.lr, warmup_steps=0, decay_rate=1.0, decay_steps=1,
                        cosine_steps=steps if config.optim.schedule == "cosine" else 0)

    mesh = make_mesh() if mesh is None else mesh
    n_dev = mesh.shape[DATA_AXIS]
    batch_size = config.batch_size - config.batch_size % n_dev or n_dev
    get_batch = batching.make_sync_batch_fn(train_set, batch_size=batch_size,
                                            seed=config.seed)
    n_eval = max(n_dev, config.eval_pairs - config.eval_pairs % n_dev)
    eval_batch = batching.sync_pairs(valid_set, np.arange(n_eval) % len(valid_set),
                                     cfg.window, np.random.default_rng([config.seed, 99]))
    run_cfg = dict(stage="syncnet", model=dataclasses.asdict(cfg),
                   data=str(pathlib.Path(data).absolute()), seed=config.seed,
                   batch_size=batch_size, optim=dataclasses.asdict(optim),
                   eval_pairs=n_eval, run=config.run.to_dict())
    workdir = loop_lib.prepare_workdir(workdir, run_cfg)
    model, state = create_syncnet_state(cfg, optim, config.seed)
    train_step, eval_step = make_syncnet_steps(model)
    run_eval = parallel.data_parallel(eval_step, mesh, donate_state=False)

    def evaluate(st, step):
        _, m = run_eval(st, parallel.shard_batch(eval_batch, mesh),
                        loop_lib.step_key(st, step))
        return {k: float(v) for k, v in jax.device_get(m).items()}

    start = time.time()
    state, last = loop_lib.train_configured(
        run=config.run, run_config=run_cfg, workdir=workdir, state=state,
        step_fn=train_step, get_batch=get_batch, num_steps=steps, mesh=mesh,
        eval_fn=evaluate, name="syncnet ")
    final = evaluate(state, steps)
    out = dict(loss=last.get("loss"), accuracy=last.get("accuracy"),
               val_loss=final["loss"], val_accuracy=final["accuracy"],
               val_d_pos=final["d_pos"], val_d_neg=final["d_neg"], steps=steps,
               steps_per_s=steps / max(time.time() - start, 1e-9),
               minutes=(time.time() - t0) / 60.0, devices=n_dev)
    metrics_lib.write_final_metrics(workdir, out)
    return out


def model_config(config, feature_dim, motion_dim):
    """(`Audio2MotionConfig` of `config.model` for the corpus' widths, model kind);
    InputError for an unknown kind, conv algorithm or continuity form."""
    from geneface_jax.motion.wavenet import CONV_ALGORITHMS
    model = dict(config.model)
    kind = model.pop("kind")
    for key, value, allowed in (("model.kind", kind, MODEL_KINDS),
                                ("model.conv_algorithm", model["conv_algorithm"],
                                 CONV_ALGORITHMS),
                                ("loss.continuity", config.loss.continuity, CONTINUITY_FORMS)):
        if value not in allowed:
            raise InputError(f"config.{key} must be one of {allowed}, got {value!r}")
    return vae_lib.Audio2MotionConfig(feature_dim=feature_dim, motion_dim=motion_dim,
                                      use_latent=kind == "vae", **model), kind


MODEL_KINDS = ("vae", "regression")


def _validation_batches(valid_set, n_dev, keys, rows=32):
    """Every valid utterance whole, `rows` (rounded to the devices) at a time, all padded
    to the longest utterance (one compiled eval step) and to a multiple of the devices."""
    import numpy as np

    from geneface_jax.data import batching

    batches = [{k: b[k] for k in keys}
               for _, b in batching.full_batches(valid_set, n_dev * max(1, rows // n_dev))]
    longest = max(b["mask"].shape[1] for b in batches)
    for b in batches:
        pad = longest - b["mask"].shape[1]
        for k in keys:
            widths = [(0, 0)] * b[k].ndim
            widths[1] = (0, pad * (2 if k == "mel" else 1))    # mel: 2 frames per video frame
            b[k] = np.pad(b[k], widths)
        extra = -b["mask"].shape[0] % n_dev
        if extra:
            for k in keys:
                b[k] = np.concatenate([b[k], np.zeros((extra,) + b[k].shape[1:], b[k].dtype)])
    return batches


def train_audio2motion(config, workdir, data, syncnet=None, *, mesh=None):
    """Trains (or resumes) stage 1, the audio-to-motion VAE with its flow prior or the
    regression baseline; the `train_audio2motion` run.

    Random `config.window`-frame crops of the corpus' train utterances (shorter ones padded
    and masked); targets are identity-removed landmarks (each speaker's mean landmarks
    subtracted) divided by their train-split std (`data.batching`). Losses: L2 + L1 +
    continuity + KL (+ the frozen SyncNet's sync loss with `syncnet`), weights from
    `config.loss`. Validation reconstruction losses over the whole valid split are logged
    every `config.run.eval_every` steps and computed at the start and the end.

    Args:
      config: `experiments/configs/audio2motion.py`'s ConfigDict (model incl. kind,
        optim, loss, batch_size, window, seed, run: steps / log_every / checkpoint_every /
        eval_every).
      workdir: run directory; writes config.json (what `motion.predict.load_audio2motion`
        reads: model, data, syncnet), landmark_std.npy, checkpoints, metrics.jsonl and
        metrics.json.
      data: corpus directory (`data.format.load_corpus`).
      syncnet: workdir of a `train_syncnet` run, or None (no sync loss); one whose
        motion is not this project's normalised landmarks (an imported GeneFace SyncNet)
        is refused (InputError, `check_syncnet_pairing`).
      mesh: the device mesh (default: every device, `mesh.make_mesh()`).
    Returns:
      the final metrics (`val_l2`, `val_l1`, `val_kl`, `val_l2_start`, `val_l1_start`,
      `train_*` of the last logged step, `steps`, `steps_per_s`, `minutes`, `devices`,
      `model_type`), also written to metrics.json.
    """
    import time

    import numpy as np

    from geneface_jax.data import batching
    from geneface_jax.data import format as fmt
    from geneface_jax.mesh import DATA_AXIS, make_mesh

    t0 = time.time()
    window, steps, seed = int(config.window), int(config.run.steps), int(config.seed)
    if window % 4 or window < 4:
        raise ShapeError(f"config.window must be a positive multiple of 4, got {window}")
    corpus = fmt.load_corpus(data)
    identities = batching.speaker_identities(corpus)
    std = batching.expression_std(corpus, identities)
    train_set = batching.UtteranceSet.from_corpus(corpus, "train", std, identities)
    valid_set = batching.UtteranceSet.from_corpus(corpus, "valid", std, identities)
    cfg, kind = model_config(config, int(corpus.meta["feature_dim"]),
                              train_set.motion[0].shape[1])
    optim = OptimConfig(lr=config.optim.lr, warmup_steps=config.optim.warmup,
                        decay_rate=config.optim.decay_rate,
                        decay_steps=config.optim.decay_steps, clip_norm=config.optim.clip_norm)
    lc = config.loss
    losses = VAELossConfig(kl=lc.lambda_kl, l1=lc.lambda_l1, l2=lc.lambda_l2,
                           continuity=lc.lambda_continuity, continuity_form=lc.continuity,
                           sync=lc.lambda_sync if syncnet else 0.0, sync_hop=lc.sync_hop)
    sync_net, sync_vars, sync_cfg = None, None, None
    if syncnet and losses.sync > 0:
        sync_net, sync_vars, sync_cfg = load_syncnet(syncnet)
        # stage 1 trains on the corpus' landmarks normalised here
        check_syncnet_pairing(syncnet, sync_cfg, f"the corpus {data} (train_audio2motion "
                              "normalises its landmarks)", {})

    mesh = make_mesh() if mesh is None else mesh
    n_dev = mesh.shape[DATA_AXIS]
    batch_size = config.batch_size - config.batch_size % n_dev or n_dev
    keys = ("mel", "motion", "mask")
    crops = batching.make_batch_fn(train_set, batch_size=batch_size, window=window, seed=seed)
    get_batch = lambda step: {k: v for k, v in crops(step).items() if k in keys}  # noqa: E731
    eval_batches = _validation_batches(valid_set, n_dev, keys)

    def evaluate(st, step):
        tot, weight = {}, 0.0
        for i, b in enumerate(eval_batches):
            _, m = run_eval(st, parallel.shard_batch(b, mesh), jax.random.PRNGKey(1000 + i))
            w = float(b["mask"].sum())
            for k, v in jax.device_get(m).items():
                tot[k] = tot.get(k, 0.0) + float(v) * w
            weight += w
        return {k: v / weight for k, v in tot.items()}

    run_cfg = dict(stage="audio2motion", model_type=kind, model=dataclasses.asdict(cfg),
                   data=str(pathlib.Path(data).absolute()), seed=seed,
                   batch_size=batch_size, window=window, optim=dataclasses.asdict(optim),
                   losses=dataclasses.asdict(losses),
                   syncnet=str(pathlib.Path(syncnet).absolute()) if sync_net else None,
                   syncnet_model=sync_cfg["model"] if sync_net else None,
                   run=config.run.to_dict())
    workdir = loop_lib.prepare_workdir(workdir, run_cfg)
    if parallel.is_main_process():
        np.save(workdir / "landmark_std.npy", std)   # motion = (landmarks - identity) / std
    # The model is built (and compiled) once the workdir has accepted this configuration.
    model, state = create_vae_state(cfg, optim, seed, sync_vars)
    train_step, _ = make_vae_steps(model, losses, sync_net, num_frames=window)
    _, eval_step = make_vae_steps(model, dataclasses.replace(losses, sync=0.0))
    run_eval = parallel.data_parallel(eval_step, mesh, donate_state=False)
    start_eval = evaluate(parallel.replicate(state, mesh), 0)
    start = time.time()
    state, last = loop_lib.train_configured(
        run=config.run, run_config=run_cfg, workdir=workdir, state=state,
        step_fn=train_step, get_batch=get_batch, num_steps=steps, mesh=mesh,
        eval_fn=evaluate, name=f"{kind} ")
    final = evaluate(state, steps)
    out = dict(val_l2=final["l2"], val_l1=final["l1"], val_kl=final["kl"],
               val_l2_start=start_eval["l2"], val_l1_start=start_eval["l1"],
               **{f"train_{k}": v for k, v in last.items() if not k.startswith("eval_")},
               steps=steps, steps_per_s=steps / max(time.time() - start, 1e-9),
               minutes=(time.time() - t0) / 60.0, devices=n_dev, model_type=kind)
    metrics_lib.write_final_metrics(workdir, out)
    return out


# --------------------------------------------------------------------------- evaluation

def utterance_stats(predictor, corpus, i, identities, std, seed, temperature, s):
    """One prior sample `s` of utterance `i`: (per-frame mean landmark distance [T], its
    mouth part [T], predicted and tracked mouth opening [T], (pearson with the oracle
    opening, T) or None). Sample 0 uses key `PRNGKey(seed * 100003 + i)`, sample s > 0 that
    key folded with s, so one sample reproduces single-sample evaluations."""
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
        corr = (lm.pearson(po, u["oracle_open"]), len(po))
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


def evaluate_audio2motion(data, workdir, vae, regression=None, *, splits=("test", "valid"),
                          temperature=1.0, seed=0, samples=4):
    """Stage 1 on held-out speakers and utterances, with the mean-face test; the
    `eval_audio2motion` run.

    For every utterance of `splits`, landmarks are sampled from the VAE run `vae` (prior
    noise x `temperature`, chunked inference, `samples` independent samples whose figures
    are averaged) and predicted by the regression run `regression` (deterministic: one
    sample), the speaker's identity (its mean landmarks) is added back, and they are
    compared with the tracked landmarks: `lmd` / `lmd_mouth` (mean L2 distance of the 68 /
    20 mouth points), `sync_corr` (Pearson r of the predicted mouth opening with the
    articulation oracle's, length-weighted; synthetic data only), `std_ratio` (std of the
    predicted / true mouth opening: < 1 for the "mean face").

    Returns the figures written to `workdir/metrics.json`: `lmd`, `lmd_mouth`,
    `sync_corr`, `std_ratio_vae`, with `regression` also `std_ratio_regression`,
    `lmd_regression`, `lmd_mouth_regression`, `sync_corr_regression`; `bar_met`,
    `temperature`, `samples`, `splits`, `minutes` and `per_split[model][split | 'all']`.
    """
    import time

    import numpy as np

    from geneface_jax.data import batching
    from geneface_jax.data import format as fmt

    t0 = time.time()
    if samples < 1:
        raise InputError(f"samples must be >= 1, got {samples}")
    corpus = fmt.load_corpus(data)
    identities = batching.speaker_identities(corpus)   # each speaker's mean landmarks
    models = {"vae": (vae, samples)}
    if regression:
        models["regression"] = (regression, 1)
    results = {}
    for name, (run_dir, n_samples) in models.items():
        mc, variables, _, std = predict.load_audio2motion(run_dir)
        predictor = predict.MotionPredictor(mc, variables, chunk=256)
        per_split, all_idx, cache = {}, [], {}
        for split in splits:
            idx = corpus.split(split)
            if len(idx):
                per_split[split] = evaluate_model(predictor, corpus, idx, identities, std,
                                                  seed, temperature, n_samples, cache)
                all_idx.extend(idx)
        per_split["all"] = evaluate_model(predictor, corpus, np.asarray(all_idx), identities,
                                          std, seed, temperature, n_samples, cache)
        results[name] = per_split
    v = results["vae"]["all"]
    out = dict(lmd=v["lmd"], lmd_mouth=v["lmd_mouth"], sync_corr=v["sync_corr"],
               std_ratio_vae=v["std_ratio"], temperature=temperature, samples=samples,
               splits=list(splits), per_split=results)
    if "regression" in results:
        r = results["regression"]["all"]
        out.update(std_ratio_regression=r["std_ratio"], lmd_regression=r["lmd"],
                   lmd_mouth_regression=r["lmd_mouth"], sync_corr_regression=r["sync_corr"])
    out["bar_met"] = bool(0.8 <= out["std_ratio_vae"] <= 1.25 and out["sync_corr"] >= 0.7
                          and out.get("std_ratio_regression", 0.0) < 0.8)
    out["minutes"] = (time.time() - t0) / 60.0
    pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)
    metrics_lib.write_final_metrics(workdir, out)
    return out


# --------------------------------------------------------------------------- loading runs
# (inference reads stage-1 runs with `motion.predict.load_audio2motion`)

def load_syncnet(workdir):
    """(SyncNet module, frozen variables, run config) of a `train_syncnet` run or of one
    imported from GeneFace (`experiments.import_geneface --stage=syncnet`).

    The variables are the run's latest checkpoint as saved (`checkpoint.restore_run`: no
    optimizer state is built or read, so a checkpoint holding the variables alone loads
    like a training state), checked against the shapes of the SyncNet of the run's
    config. A GeneFace work dir is refused with the import command to run first."""
    predict._refuse_geneface_dir(workdir, "syncnet")
    cfg = read_run_config(workdir, "syncnet")
    sc = sync_lib.SyncNetConfig(**cfg["model"])
    model = sync_lib.SyncNet(sc, axis_name=parallel.DATA_AXIS)   # as create_syncnet_state
    saved = restore_run(workdir)
    variables = {"params": saved.get("params"), "batch_stats": saved.get("batch_stats")}
    # the expected shapes only: nothing is initialised or compiled
    check_like(variables, jax.eval_shape(lambda: sync_lib.init_syncnet(sc, 0)[1]),
               f"{workdir}")
    return model, variables, cfg


def motion_units(run_config):
    """What the numbers of a run's motion arrays are, as far as a network fed them cares:
    `motion.predict.motion_representation` less what only maps them to head space
    (`landmark_unit`) and its prose (`note`)."""
    rep = predict.motion_representation(run_config)
    return {k: v for k, v in rep.items() if k not in ("landmark_unit", "note")}


def check_syncnet_pairing(syncnet, sync_cfg, what, other_cfg):
    """InputError unless the SyncNet run `syncnet` (config `sync_cfg`) was trained on
    motion in the units of `what` (a stage-1 run or a dataset, whose run config, or
    `{}` for motion normalised here, is `other_cfg`): a SyncNet scores mouths only in
    the units it learned, and an imported one expects GeneFace's idexp_lm3d."""
    mine, theirs = motion_units(sync_cfg), motion_units(other_cfg)
    if mine != theirs:
        raise InputError(
            f"the SyncNet run {syncnet} works on motion {mine}, but {what} gives motion "
            f"{theirs}: a SyncNet only scores mouths in the units it was trained on; pair "
            f"an imported (GeneFace) SyncNet with an imported stage 1, or train a SyncNet "
            f"here (experiments.train_syncnet) for motion trained here")
