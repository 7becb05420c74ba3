"""Stage 2 training: the post-net GAN (generator `CNNPostNet`, critic `MLPDiscriminator`).

One `GANState` holds both networks' parameters, the generator's BatchNorm statistics (the
critic has none), one Adam state per network, an exponential moving average (EMA) of the
generator's variables, the step, the RNG and the frozen SyncNet.
Three pure per-device steps, all `step(state, batch, rng) -> (state, metrics)` for
`train.parallel.data_parallel` (losses are global-batch masked means, so 1 and N devices
give the same numbers):

  d_step      updates only the discriminator: LSGAN `D(fake)^2 + (D(real) - 1)^2`, the
              fakes being the generator's refinement of the batch (train-mode BatchNorm,
              its statistics update discarded, no gradient into the generator).
  g_step      updates only the generator (its BatchNorm statistics and its EMA):
              `adv (D(G(x)) - 1)^2 + sync SyncNet(G(x), audio) + mse |G(x) - x|^2`
              (GeneFace's weights 0.85, 0.1, 0.05) with the discriminator fixed.
  train_step  both from the same pre-step state, sharing one generator forward (GeneFace's
              order: the discriminator update sees the generator output of this step,
              detached): equal to g_step's generator half merged with d_step's
              discriminator half. Advances `step` by one, as does g_step (d_step does not).

Batches (host arrays, `make_batch_fn`): `motion` [B, T, D] stage-1 samples (normalised,
identity-removed), `mel` [B, 2T, C] the audio they were sampled for, `mask` [B, T, 1],
`real` [B, T, D] windows of the target person's motion in the same representation
(`motion.postnet` explains it), `real_mask` [B, T, 1].

Deviations from GeneFace's code, on purpose: Adam (the issue's choice; GeneFace's task uses
RMSprop: the critic's at 1e-4, the generator's at the rate of stage 1's schedule, because
`PostnetAdvSyncTask.build_scheduler` reuses `ExponentialSchedule(lr=5e-4, warm-up 1000)`,
which overwrites `postnet_lr: 1e-4`; `PostNetOptimConfig(lr=5e-4, warmup_steps=1000,
decay_rate=0.1, decay_steps=250_000)` follows that schedule) with beta1 = 0, i.e. without
momentum like RMSprop
(with beta1 0.9 or 0.5 the game oscillated visibly on the synthetic world); the post-net
that inference uses is the EMA of the generator (decay 0.999, bias-corrected:
`ema_decay_at`; `generator_variables()`),
which averages out the remaining oscillation of the adversarial game (on the synthetic
world the raw generator's held-out Fréchet distance swings by +-30 % between checkpoints,
the EMA's stays within a few %); one batch mixing stage-1 samples on corpus audio and
on the person's audio that gets every loss (GeneFace sends corpus samples to the
adversarial and sync losses and its person-audio samples to an MSE against the person's
tracked landmarks), and by default the MSE against the generator's own input ("stay close
to the input", the issue's wording); `PostNetLossConfig(mse_target='person')` is
GeneFace's MSE (person-audio samples against the person's tracked motion of the same
frames, batch `target`/`target_mask`). Optimizers: Adam 1e-4 each (generator constant by
default), discriminator halved every 40k updates (StepLR), global-norm clipping at 1 per
network (GeneFace's `clip_grad_norm` clips the task's parameters together), a non-finite
gradient skips that network's update.
"""

import dataclasses
import pathlib
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from geneface_jax.data.epochs import epoch_indices
from geneface_jax.errors import CheckpointError, DatasetError, InputError, ShapeError
from geneface_jax.files import atomic_path, write_bytes_atomic
from geneface_jax.motion import postnet as pn
from geneface_jax.motion import syncnet as sync_lib
from geneface_jax.motion.predict import SELECTED_FILE, SELECTED_INFO
from geneface_jax.train import parallel
from geneface_jax.train.state import lr_schedule

GENERATOR, DISCRIMINATOR = "generator", "discriminator"


# --------------------------------------------------------------------------- configs

@dataclasses.dataclass(frozen=True)
class PostNetOptimConfig:
    """Two Adams: generator `lr` with an optional linear warm-up over `warmup_steps` and
    decay `decay_rate ** (step / decay_steps)` after it (`train.state.lr_schedule`),
    discriminator `disc_lr` x `disc_decay` every `disc_decay_steps`, gradient clipping at
    global norm 1. GeneFace: critic RMSprop 1e-4 x0.5 every 40k (StepLR); generator RMSprop
    on stage 1's schedule (warm-up over 1000 steps to 5e-4, then x0.1 per 250k steps; its
    `postnet_lr: 1e-4` is overwritten by the scheduler), i.e. `lr=5e-4, warmup_steps=1000,
    decay_rate=0.1, decay_steps=250_000`."""
    lr: float = 1e-4
    disc_lr: float = 1e-4
    disc_decay: float = 0.5
    disc_decay_steps: int = 40_000
    clip_norm: float = 1.0
    b1: float = 0.0          # no momentum (GeneFace's RMSprop has none)
    b2: float = 0.999
    ema_decay: float = 0.999  # EMA of the generator used for inference (0: no averaging)
    warmup_steps: int = 0     # generator warm-up (GeneFace: 1000)
    decay_rate: float = 1.0   # generator decay (GeneFace: 0.1 per 250k steps)
    decay_steps: int = 250_000

    def _adam(self, schedule):
        chain = [optax.clip_by_global_norm(self.clip_norm)] if self.clip_norm else []
        chain.append(optax.adam(schedule, b1=self.b1, b2=self.b2))
        return optax.chain(*chain)

    def generator_tx(self):
        if self.warmup_steps <= 0 and self.decay_rate == 1.0:
            return self._adam(self.lr)
        return self._adam(lr_schedule(self.lr, warmup_steps=self.warmup_steps,
                                      decay_rate=self.decay_rate,
                                      decay_steps=self.decay_steps))

    def discriminator_tx(self):
        return self._adam(optax.exponential_decay(self.disc_lr, self.disc_decay_steps,
                                                  self.disc_decay, staircase=True))


@dataclasses.dataclass(frozen=True)
class PostNetLossConfig:
    """Generator loss weights (GeneFace: adversarial 0.85, sync 0.1, MSE 0.05).

    mse_target: what the MSE pulls the refined motion towards. `input`: the generator's own
    input, on every sample (the issue's "distance to the input landmarks"). `person`:
    GeneFace's task: only the samples drawn on the target person's audio, towards the
    person's tracked motion of the same frames (batch `target`, `target_mask`).
    """
    adv: float = 0.85
    sync: float = 0.1
    mse: float = 0.05
    sync_hop: int = 2       # frames between the starts of the sync-loss windows
    mse_target: str = "input"

    def __post_init__(self):
        if self.mse_target not in MSE_TARGETS:
            raise ValueError(f"PostNetLossConfig: mse_target must be one of {MSE_TARGETS}, "
                             f"got {self.mse_target!r}")


MSE_TARGETS = ("input", "person")


# --------------------------------------------------------------------------- state

class GANState(flax.struct.PyTreeNode):
    """Everything a resumed post-net run needs, as one pytree.

    Attributes:
      step: int32 scalar, training iterations done (g_step / train_step advance it).
      params: `{'generator': ..., 'discriminator': ...}`.
      batch_stats: `{'generator': ...}` (BatchNorm running statistics).
      opt_state: `{'generator': ..., 'discriminator': ...}` (one Adam each).
      ema: `{'params', 'batch_stats'}`: exponential moving average of the generator's
        variables (what inference uses).
      rng: raw uint32 key data `[2]`.
      frozen: `{'syncnet': variables}` when the sync loss is used (read, never updated).
      g_tx, d_tx: the two optimizers (static).
    """
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    ema: Any
    rng: jax.Array
    g_tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
    d_tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
    frozen: Any = flax.struct.field(default_factory=dict)
    ema_decay: float = flax.struct.field(pytree_node=False, default=0.0)

    @classmethod
    def create(cls, *, variables, optim: PostNetOptimConfig, rng, frozen=None):
        """A fresh state from `init_postnet` variables; `rng` an int seed or a key."""
        if isinstance(rng, int):
            rng = jax.random.PRNGKey(rng)
        if jnp.issubdtype(jnp.asarray(rng).dtype, jax.dtypes.prng_key):
            rng = jax.random.key_data(rng)
        g_tx, d_tx = optim.generator_tx(), optim.discriminator_tx()
        params = {GENERATOR: variables[GENERATOR]["params"],
                  DISCRIMINATOR: variables[DISCRIMINATOR]["params"]}
        # Copies: steps donate the state, which must not delete the caller's arrays.
        copy = lambda t: jax.tree.map(jnp.array, t)  # noqa: E731
        return cls(step=jnp.zeros((), jnp.int32), params=copy(params),
                   batch_stats={GENERATOR: copy(variables[GENERATOR]["batch_stats"])},
                   opt_state={GENERATOR: g_tx.init(params[GENERATOR]),
                              DISCRIMINATOR: d_tx.init(params[DISCRIMINATOR])},
                   ema=copy(variables[GENERATOR]),
                   rng=jnp.asarray(rng, jnp.uint32), g_tx=g_tx, d_tx=d_tx,
                   frozen={} if frozen is None else copy(frozen),
                   ema_decay=float(optim.ema_decay))

    def generator_variables(self, ema=True):
        """`{'params', 'batch_stats'}` of the generator: the EMA (what inference uses) or,
        with `ema=False`, the current training variables."""
        if ema:
            return self.ema
        return {"params": self.params[GENERATOR], "batch_stats": self.batch_stats[GENERATOR]}

    def _update(self, name, tx, grads):
        """(new params, new opt state) of one network; a non-finite gradient keeps both."""
        updates, new_opt = tx.update(grads, self.opt_state[name], self.params[name])
        new_params = optax.apply_updates(self.params[name], updates)
        ok = jnp.isfinite(optax.global_norm(grads))
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa
        return keep(new_params, self.params[name]), keep(new_opt, self.opt_state[name])

    def apply_generator_gradients(self, grads, batch_stats):
        """Updates the generator, its BatchNorm statistics and its EMA."""
        p, o = self._update(GENERATOR, self.g_tx, grads)
        d = ema_decay_at(self.ema_decay, self.step + 1)
        ema = jax.tree.map(lambda e, v: d * e + (1.0 - d) * v, self.ema,
                           {"params": p, "batch_stats": batch_stats})
        return self.replace(params={**self.params, GENERATOR: p},
                            opt_state={**self.opt_state, GENERATOR: o},
                            batch_stats={**self.batch_stats, GENERATOR: batch_stats}, ema=ema)

    def apply_discriminator_gradients(self, grads):
        p, o = self._update(DISCRIMINATOR, self.d_tx, grads)
        return self.replace(params={**self.params, DISCRIMINATOR: p},
                            opt_state={**self.opt_state, DISCRIMINATOR: o})


def ema_decay_at(decay, t):
    """The decay of the `t`-th (1-based) update of a bias-corrected EMA.

    With `decay_t = decay (1 - decay^(t-1)) / (1 - decay^t)` the average after t updates
    is `sum_s (1 - decay) decay^(t-s) v_s / (1 - decay^t)`: the normalised exponential
    average of the updates' values with no weight left on the initial value (the first
    update copies its value). A plain EMA initialised with the random initial generator
    keeps `decay^t` of it (37 % after 1000 steps at 0.999), which a short run (the demo's)
    would otherwise ship."""
    t = jnp.asarray(t, jnp.float32)
    return decay * (1.0 - decay ** (t - 1.0)) / (1.0 - decay ** t)


def static_coordinates(std, min_std=1e-4):
    """Indices of the motion coordinates the corpus never moves: those whose expression std
    `[68, 3]` sits at its floor `min_std` (`batching.expression_std`). In the normalised
    representation they are `(landmarks - identity) / 1e-4`, pure noise amplifiers; the
    post-net leaves them as they are (`PostNetConfig.static_coords`)."""
    s = np.asarray(std, np.float64).reshape(-1)
    return tuple(int(i) for i in np.flatnonzero(s <= min_std * (1.0 + 1e-3)))


def discriminator_scale(std, static_coords=()):
    """The discriminator's fixed input scaling `[D]` for motion normalised by `std`
    `[68, 3]`: `std / rms(std)`, 0 on `static_coords`. The critic thus judges frames in
    landmark geometry (each coordinate in proportion to how far it really moves, as
    GeneFace's critic sees un-normalised identity-removed landmarks) and only on
    coordinates the generator may change. In per-coordinate z-scores a coordinate that
    barely moves becomes a large, trivially detectable signal the generator cannot match,
    and the critic wins on it instead of on the person's style."""
    s = np.asarray(std, np.float64).reshape(-1)
    scale = s / np.sqrt(np.mean(s * s))
    scale[list(static_coords)] = 0.0
    return scale.astype(np.float32)


def create_postnet_state(config: pn.PostNetConfig, optim: PostNetOptimConfig, seed: int,
                         syncnet_variables=None, disc_scale=None):
    """(generator, discriminator, GANState); modules built for the data-parallel axis.

    `syncnet_variables` (the sync loss' SyncNet) and `disc_scale` `[D]` (the critic's input
    scaling, `discriminator_scale(std)`; None for none) go to `state.frozen`."""
    gen, disc, variables = pn.init_postnet(config, seed, axis_name=parallel.DATA_AXIS)
    frozen = {}
    if syncnet_variables is not None:
        frozen["syncnet"] = syncnet_variables
    if disc_scale is not None:
        scale = np.asarray(disc_scale, np.float32)
        if scale.shape != (config.motion_dim,):
            raise ShapeError(f"disc_scale must be [{config.motion_dim}], got {scale.shape}")
        frozen["disc_scale"] = scale
    return gen, disc, GANState.create(variables=variables, optim=optim, rng=seed,
                                      frozen=frozen)


# --------------------------------------------------------------------------- steps

class PostNetSteps(NamedTuple):
    train_step: Any
    g_step: Any
    d_step: Any
    eval_step: Any


def _norm(tree):
    return optax.global_norm(tree)


def make_postnet_steps(gen, disc, losses: PostNetLossConfig = PostNetLossConfig(),
                       syncnet=None, num_frames=None):
    """The per-device steps (see the module doc). With `syncnet` (a `SyncNet` module, its
    variables in `state.frozen['syncnet']`) and `losses.sync > 0` the generator loss has
    the sync term on windows of the refined motion; `num_frames` (the batch's T) fixes the
    window starts."""
    use_sync = syncnet is not None and losses.sync > 0
    if use_sync:
        if num_frames is None:
            raise ValueError("make_postnet_steps: num_frames is needed for the sync loss")
        starts = sync_lib.window_starts(num_frames, syncnet.config.window, losses.sync_hop)

    def generate(g_params, state, batch, train):
        """Refined motion and the generator's new batch statistics."""
        variables = {"params": g_params, "batch_stats": state.batch_stats[GENERATOR]}
        if train:
            out, upd = gen.apply(variables, batch["motion"], batch["mask"], train=True,
                                 mutable=["batch_stats"])
            return out, upd["batch_stats"]
        return gen.apply(variables, batch["motion"], batch["mask"], train=False), \
            state.batch_stats[GENERATOR]

    def critic(d_params, state, x, key, train):
        scale = state.frozen.get("disc_scale")
        if scale is not None:
            x = x * scale
        return disc.apply({"params": d_params}, x, deterministic=not train,
                          rngs={"dropout": key})

    def generator_loss(g_params, state, batch, key, train):
        mask = batch["mask"]
        refined, new_stats = generate(g_params, state, batch, train)
        score = critic(state.params[DISCRIMINATOR], state, refined, key, train)
        adv = parallel.global_mean(jnp.square(score - 1.0)[..., None], mask)
        if losses.mse_target == "person":
            mse = parallel.global_mean(jnp.square(refined - batch["target"]),
                                       batch["target_mask"])
        else:
            mse = parallel.global_mean(jnp.square(refined - batch["motion"]), mask)
        total = losses.adv * adv + losses.mse * mse
        metrics = {"g_adv": adv, "g_mse": mse}
        if use_sync:
            terms, valid = sync_lib.sync_loss_terms(syncnet, state.frozen["syncnet"], refined,
                                                    batch["mel"], mask, starts)
            sync = parallel.global_mean(terms, valid)
            total = total + losses.sync * sync
            metrics["g_sync"] = sync
        metrics["g_loss"] = total
        return total, (refined, new_stats, metrics)

    def discriminator_loss(d_params, state, fake, batch, key, train):
        k_fake, k_real = jax.random.split(key)
        s_fake = critic(d_params, state, jax.lax.stop_gradient(fake), k_fake, train)
        s_real = critic(d_params, state, batch["real"], k_real, train)
        mask, rmask = batch["mask"], batch["real_mask"]
        fake_loss = parallel.global_mean(jnp.square(s_fake)[..., None], mask)
        real_loss = parallel.global_mean(jnp.square(s_real - 1.0)[..., None], rmask)
        acc_fake = parallel.global_mean((s_fake < 0.5).astype(s_fake.dtype)[..., None], mask)
        acc_real = parallel.global_mean((s_real > 0.5).astype(s_real.dtype)[..., None], rmask)
        metrics = {"d_loss": fake_loss + real_loss, "d_fake_loss": fake_loss,
                   "d_real_loss": real_loss,
                   "d_fake_score": parallel.global_mean(s_fake[..., None], mask),
                   "d_real_score": parallel.global_mean(s_real[..., None], rmask),
                   "d_accuracy": 0.5 * (acc_fake + acc_real)}
        return fake_loss + real_loss, metrics

    def keys(rng):
        k_g, k_d = jax.random.split(rng)
        return k_g, k_d

    def g_update(state, batch, k_g):
        grad_fn = jax.value_and_grad(generator_loss, has_aux=True)
        (_, (refined, stats, metrics)), grads = grad_fn(state.params[GENERATOR], state, batch,
                                                        k_g, True)
        metrics["g_grad_norm"] = _norm(grads)
        return grads, stats, refined, metrics

    def d_update(state, fake, batch, k_d):
        grad_fn = jax.value_and_grad(discriminator_loss, has_aux=True)
        (_, metrics), grads = grad_fn(state.params[DISCRIMINATOR], state, fake, batch, k_d,
                                     True)
        metrics["d_grad_norm"] = _norm(grads)
        return grads, metrics

    def train_step(state, batch, rng):
        k_g, k_d = keys(rng)
        g_grads, stats, refined, g_metrics = g_update(state, batch, k_g)
        d_grads, d_metrics = d_update(state, refined, batch, k_d)
        new = state.apply_generator_gradients(g_grads, stats)
        new = new.apply_discriminator_gradients(d_grads)
        return new.replace(step=state.step + 1), {**g_metrics, **d_metrics}

    def g_step(state, batch, rng):
        k_g, _ = keys(rng)
        grads, stats, _, metrics = g_update(state, batch, k_g)
        new = state.apply_generator_gradients(grads, stats)
        return new.replace(step=state.step + 1), metrics

    def d_step(state, batch, rng):
        _, k_d = keys(rng)
        fake, _ = generate(state.params[GENERATOR], state, batch, True)
        grads, metrics = d_update(state, fake, batch, k_d)
        return state.apply_discriminator_gradients(grads), metrics

    def eval_step(state, batch, rng):
        k_g, k_d = keys(rng)
        _, (refined, _, g_metrics) = generator_loss(state.params[GENERATOR], state, batch,
                                                    k_g, False)
        _, d_metrics = discriminator_loss(state.params[DISCRIMINATOR], state, refined, batch,
                                          k_d, False)
        return state, {**g_metrics, **d_metrics}

    return PostNetSteps(train_step, g_step, d_step, eval_step)


# --------------------------------------------------------------------------- data

def person_motion(person, std, split="train"):
    """The target person's real frames in the stage-1 representation.

    Returns (motion [n, 204] of `split`'s frames, identity [68, 3]): identity = the
    person's mean landmarks over its *train* frames; motion = (landmarks - identity) / std
    with `std` the corpus' expression std of the stage-1 run.
    """
    lms = np.asarray(person["landmarks"], np.float64)
    identity = lms[person.split("train")].mean(0).astype(np.float32)
    from geneface_jax.data.batching import normalize_landmarks
    idx = person.split(split)
    return normalize_landmarks(lms[idx], identity, np.asarray(std, np.float32)), identity


@dataclasses.dataclass
class SamplePool:
    """Stage-1 samples precomputed for training, with the audio they were drawn for.

    Attributes:
      mel: `[A, C]` features of every source sequence, concatenated (sequence s owns
        rows `[2 first_s, 2 (first_s + frames_s))`).
      sequences: `[S, 3]` int64: first frame, frames, domain (0 corpus, 1 target person).
      motion: `[F, D]` every sample, concatenated.
      samples: `[M, 2]` int64: first row in `motion`, sequence id (its length is the
        sequence's).
    """
    mel: np.ndarray
    sequences: np.ndarray
    motion: np.ndarray
    samples: np.ndarray

    FIELDS = ("mel", "sequences", "motion", "samples")

    def save(self, path):
        """Atomic `.npz` write."""
        path = pathlib.Path(path)
        with atomic_path(path, ".npz") as tmp:
            np.savez(tmp, **{k: getattr(self, k) for k in self.FIELDS})
        return path

    @classmethod
    def load(cls, path):
        try:
            with np.load(path) as z:
                return cls(**{k: z[k] for k in cls.FIELDS})
        except (OSError, KeyError, ValueError) as e:
            raise CheckpointError(f"{path}: unreadable stage-1 sample pool ({e}); delete it "
                                  "to rebuild") from e

    def domain_samples(self, domain):
        """Sample ids whose sequence is of `domain` (0 corpus, 1 person)."""
        return np.flatnonzero(self.sequences[self.samples[:, 1], 2] == domain)

    def sample(self, i):
        """(motion [T, D], mel [2T, C], domain) of sample `i`."""
        row, seq = (int(v) for v in self.samples[i])
        first, num, domain = (int(v) for v in self.sequences[seq])
        return (self.motion[row:row + num], self.mel[2 * first:2 * (first + num)], domain)


def build_pool(sample_fn, sequences, *, seed, progress=None):
    """Draws stage-1 samples for training.

    Args:
      sample_fn: `sample_fn(mel [2T, C], key) -> motion [T, D]` (e.g. a
        `MotionPredictor.sample_motion` at the chosen temperature).
      sequences: list of `(mel [2T, C], domain, num_samples)`.
      seed: sample k of sequence s uses key `fold_in(fold_in(PRNGKey(seed), s), k)`.
      progress: optional callable `progress(done, total)`.
    Returns a SamplePool.
    """
    base = jax.random.PRNGKey(seed)
    mels, seq_rows, motions, sample_rows = [], [], [], []
    first = row = 0
    total = sum(n for _, _, n in sequences)
    done = 0
    for s, (mel, domain, n) in enumerate(sequences):
        mel = np.asarray(mel, np.float32)
        if mel.ndim != 2 or len(mel) % 2 or not len(mel):
            raise ShapeError(f"pool sequence {s}: features must be [2T, C], got {mel.shape}")
        frames = len(mel) // 2
        mels.append(mel)
        seq_rows.append((first, frames, int(domain)))
        key = jax.random.fold_in(base, s)
        for k in range(int(n)):
            m = np.asarray(sample_fn(mel, jax.random.fold_in(key, k)), np.float32)
            if m.shape[0] != frames:
                raise ShapeError(f"pool sequence {s}: sample has {m.shape[0]} frames, "
                                 f"expected {frames}")
            motions.append(m)
            sample_rows.append((row, s))
            row += frames
            done += 1
            if progress is not None:
                progress(done, total)
        first += frames
    return SamplePool(mel=np.concatenate(mels), sequences=np.asarray(seq_rows, np.int64),
                      motion=np.concatenate(motions),
                      samples=np.asarray(sample_rows, np.int64).reshape(-1, 2))


def _crop(seq, window, rng, scale=1):
    """(start, n) of a random `window`-frame crop of a sequence of len(seq) // scale."""
    num = len(seq) // scale
    start = int(rng.integers(0, num - window + 1)) if num > window else 0
    return start, min(num, window)


def make_batch_fn(pool: SamplePool, real_motion, *, batch_size, window, seed,
                  person_fraction=0.25, paired=None):
    """`get_batch(step)` for `train_loop`: a pure function of (seed, step).

    Each batch holds `batch_size` random `window`-frame crops of stage-1 samples
    (`round(batch_size * person_fraction)` of them drawn on the person's audio when the
    pool has any, the rest on corpus audio; samples are drawn with `epoch_indices`) and
    `batch_size` crops of the person's real motion `real_motion` ([n, D] or a list of
    such segments). Shorter sequences are padded and masked.

    `paired`: the person's real motion `[n, D]` frame-aligned with the pool's person
    sequence (the one its person-audio samples were drawn for): the batch then also holds
    `target` `[B, T, D]`, the real frames under each person-audio crop, and `target_mask`
    `[B, T, 1]` (1 on those frames, 0 on corpus samples and padding), for
    `PostNetLossConfig(mse_target='person')`.
    """
    segments = [np.asarray(real_motion, np.float32)] if np.ndim(real_motion) == 2 \
        else [np.asarray(r, np.float32) for r in real_motion]
    if not segments or not sum(len(s) for s in segments):
        raise ShapeError("make_batch_fn: no real frames of the target person")
    corpus_ids, person_ids = pool.domain_samples(0), pool.domain_samples(1)
    n_person = int(round(batch_size * person_fraction)) if len(person_ids) else 0
    if not len(corpus_ids):
        n_person = batch_size
    n_corpus = batch_size - n_person
    if (n_person and not len(person_ids)) or (n_corpus and not len(corpus_ids)):
        raise ShapeError("make_batch_fn: the sample pool is empty")
    d = pool.motion.shape[1]
    c = pool.mel.shape[1]
    seg_weights = np.array([len(s) for s in segments], np.float64)
    seg_weights /= seg_weights.sum()
    if paired is not None:
        paired = np.asarray(paired, np.float32)
        seqs = {int(pool.samples[i, 1]) for i in person_ids}
        if not n_person or len(seqs) != 1 or paired.shape != (
                int(pool.sequences[seqs.pop(), 1]), d):
            raise ShapeError(f"make_batch_fn: paired motion {paired.shape} must be "
                             "[frames, D] of the pool's one person sequence (and the batch "
                             "must hold person-audio samples: person_fraction > 0)")

    def get_batch(step):
        rng = np.random.default_rng([seed, step, 17])
        ids = []
        if n_corpus:
            ids += list(corpus_ids[epoch_indices(seed, step, len(corpus_ids), n_corpus)])
        if n_person:
            ids += list(person_ids[epoch_indices(seed + 1, step, len(person_ids), n_person)])
        out = dict(motion=np.zeros((batch_size, window, d), np.float32),
                   mel=np.zeros((batch_size, 2 * window, c), np.float32),
                   mask=np.zeros((batch_size, window, 1), np.float32),
                   real=np.zeros((batch_size, window, d), np.float32),
                   real_mask=np.zeros((batch_size, window, 1), np.float32))
        if paired is not None:
            out["target"] = np.zeros((batch_size, window, d), np.float32)
            out["target_mask"] = np.zeros((batch_size, window, 1), np.float32)
        for slot, i in enumerate(ids):
            motion, mel, domain = pool.sample(int(i))
            start, n = _crop(motion, window, rng)
            out["motion"][slot, :n] = motion[start:start + n]
            out["mel"][slot, :2 * n] = mel[2 * start:2 * (start + n)]
            out["mask"][slot, :n] = 1.0
            if paired is not None and domain == 1:
                out["target"][slot, :n] = paired[start:start + n]
                out["target_mask"][slot, :n] = 1.0
        for slot in range(batch_size):
            seg = segments[int(rng.choice(len(segments), p=seg_weights))]
            start, n = _crop(seg, window, rng)
            out["real"][slot, :n] = seg[start:start + n]
            out["real_mask"][slot, :n] = 1.0
        return out

    return get_batch


# --------------------------------------------------------------------------- evaluation

def frechet_distance(a, b, eps=0.0):
    """Fréchet distance between Gaussians fitted to the rows of `a` [N, F] and `b` [M, F]:
    `|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)`.

    Computed in float64 with symmetric eigendecompositions (exact for the rank-deficient
    covariances of landmark motion, where `sqrtm(S_a S_b)` is unstable); `eps` adds a
    ridge to both covariances."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ShapeError(f"frechet_distance needs [N, F] and [M, F] with N, M >= 2, got "
                         f"{a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a = np.cov(a, rowvar=False) + eps * np.eye(a.shape[1])
    s_b = np.cov(b, rowvar=False) + eps * np.eye(a.shape[1])

    def psd_sqrt(s):
        w, v = np.linalg.eigh(0.5 * (s + s.T))
        return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T

    root_a = psd_sqrt(s_a)
    mid = root_a @ s_b @ root_a
    w = np.linalg.eigvalsh(0.5 * (mid + mid.T))
    cross = np.sqrt(np.clip(w, 0.0, None)).sum()
    return float(np.sum(np.square(mu_a - mu_b)) + np.trace(s_a) + np.trace(s_b) - 2.0 * cross)


def pool_fd_fn(pool, real, config, ids, std):
    """`fd(generator_variables or None) -> float`: Fréchet distance between the landmark
    vectors (identity removed, head units) of the pool samples `ids` (refined by the
    generator when variables are given) and of the real frames `real` `[n, D]`."""
    seqs = [pool.sample(int(i))[0] for i in ids]
    scale = np.asarray(std, np.float32).reshape(-1)

    def fd(variables=None):
        out = [pn.refine_motion(config, variables, m) if variables is not None else m
               for m in seqs]
        return frechet_distance(np.concatenate(out) * scale, np.asarray(real) * scale)
    return fd


# --------------------------------------------------------------------------- selection

def save_selected_generator(workdir, variables, step, pool_fd):
    """Writes the generator variables `{'params', 'batch_stats'}` chosen for inference
    (`train_postnet` keeps the EMA with the lowest pool Fréchet distance) and their step
    and score; both files are replaced atomically (variables first, so the JSON never
    names variables that are not on disk)."""
    from geneface_jax.train.metrics import write_json_atomic
    w = pathlib.Path(workdir)
    write_bytes_atomic(w / SELECTED_FILE, flax.serialization.to_bytes(jax.device_get(variables)))
    write_json_atomic(w / SELECTED_INFO, {"step": int(step), "pool_fd": float(pool_fd)})


# --------------------------------------------------------------------------- runs

def _check_config(config):
    """ShapeError / InputError for settings no run can train with (before anything is
    written)."""
    if config.window < 8:
        raise ShapeError(f"window must be at least 8 frames, got {config.window}")
    if not 0.0 <= config.person_fraction <= 1.0:
        raise InputError(f"person_fraction must be in [0, 1], got {config.person_fraction}")
    if config.loss.mse_target not in MSE_TARGETS:
        raise InputError(f"loss.mse_target must be one of {MSE_TARGETS}, "
                         f"got {config.loss.mse_target!r}")
    if config.loss.mse_target == "person" and (config.pool.person_samples < 1
                                               or config.person_fraction <= 0):
        raise InputError("loss.mse_target=person needs samples on the person's audio "
                         "(pool.person_samples >= 1, person_fraction > 0)")
    if config.disc_view not in ("landmarks", "normalized"):
        raise InputError(f"disc_view must be landmarks or normalized, got "
                         f"{config.disc_view!r}")


def _draw_pool(path, predictor, corpus, corpus_dir, person, pool_cfg, seed):
    """The stage-1 sample pool of a run: read from `path`, or drawn and saved there."""
    from geneface_jax.train.metrics import Progress
    if path.is_file():
        return SamplePool.load(path)
    sequences = [(corpus.utterance(int(i))["mel"], 0, pool_cfg.samples_per_utterance)
                 for split in pool_cfg.corpus_splits for i in corpus.split(split)]
    train_idx = person.split("train")
    person_mel = np.asarray(person["mel"][2 * train_idx[0]:2 * (train_idx[-1] + 1)])
    if pool_cfg.person_samples > 0:
        sequences.append((person_mel, 1, pool_cfg.person_samples))
    if not sequences:
        raise DatasetError(f"{corpus_dir}: no utterances in splits "
                           f"{list(pool_cfg.corpus_splits)} and pool.person_samples=0: "
                           "nothing to train on")
    progress = Progress(sum(n for _, _, n in sequences), name="stage-1 pool ")
    report = lambda done, total: (progress.report(done) if done % 200 == 0  # noqa: E731
                                  or done == total else None)
    pool = build_pool(lambda mel, key: predictor.sample_motion(mel, key, pool_cfg.temperature),
                      sequences, seed=seed, progress=report)
    if parallel.is_main_process():        # every process drew the same pool
        pool.save(path)
    return pool


def train_postnet(config, workdir, data, audio2motion, *, corpus=None, syncnet=None,
                  mesh=None):
    """Trains (or resumes) the post-net of a target person; the `train_postnet` run.

    1. Representation: the person's train frames become identity-removed motion in stage
       1's units, `(landmarks - identity) / std` (identity = the person's mean train
       landmarks, std = the corpus std of the stage-1 run; `motion.postnet`);
       `identity.npy` and `landmark_std.npy` go to the workdir for inference. Coordinates
       the corpus never moves (std at its floor) are left unchanged by the post-net
       (`PostNetConfig.static_coords`) and hidden from the critic, which sees frames in
       landmark geometry (`disc_view`, `discriminator_scale`).
    2. Pool: stage-1 samples at `pool.temperature`, `pool.samples_per_utterance` per
       utterance of the corpus' `pool.corpus_splits` and `pool.person_samples` on the audio
       of the person's train frames, drawn once and cached in `WORKDIR/pool.npz`.
    3. Adversarial training: every step refines `batch_size` random `window`-frame crops of
       pool samples (`person_fraction` of them on the person's audio) and updates the
       generator (`loss`: LSGAN + SyncNet against the driving audio + MSE) and the
       frame-level critic (real = crops of the person's train motion); `optim` gives the
       two Adams and the generator EMA. With `select`, every pool check (every
       `run.eval_every` steps, on a fixed grid, so a resumed run selects what an
       uninterrupted one does; a selection an interrupted launch made after the step
       the run resumes from is dropped, its checks being redone) may replace the EMA
       inference uses (`selected_generator.msgpack`, the one with the lowest pool
       Fréchet distance); the game does not converge, so the last step is not the best
       one.

    Args:
      config: `experiments/configs/postnet.py`'s ConfigDict.
      workdir: run directory: config.json (what `motion.predict.load_postnet` reads),
        identity.npy, landmark_std.npy, pool.npz, checkpoints, metrics.jsonl, metrics.json,
        selected_generator.msgpack / .json.
      data: the target person's dataset directory.
      audio2motion: a trained stage-1 run (`train_audio2motion --model=vae`).
      corpus, syncnet: corpus directory and SyncNet run (default: the stage-1 run's); no
        SyncNet (or `loss.sync` 0) trains without the sync term. A SyncNet whose motion
        representation is not the stage-1 run's (an imported GeneFace SyncNet with a
        stage 1 trained here, or the reverse) is refused (InputError).
      mesh: the device mesh (default: every device; the global batch is rounded down to a
        multiple of its size).
    Returns:
      the final metrics, also in metrics.json: the last logged losses as `train_*`,
      `pool_fd_before` / `pool_fd_after` (Fréchet distance between the identity-removed
      landmarks, head units, of `eval_samples` corpus samples of the pool before / after
      refinement and the person's train frames), `pool_fd_selected` and `selected_step` of
      the generator inference uses, `steps`, `steps_per_s`, `minutes`, `devices`,
      `pool_samples`, `pool_frames`.
    """
    import time

    from geneface_jax.data import format as fmt
    from geneface_jax.mesh import DATA_AXIS, make_mesh
    from geneface_jax.motion import predict
    from geneface_jax.train import audio2motion as a2m
    from geneface_jax.train import loop as loop_lib
    from geneface_jax.train import metrics as metrics_lib

    t0 = time.time()
    _check_config(config)
    person = fmt.load_person(data)
    mc, a2m_vars, a2m_cfg, std = predict.load_audio2motion(audio2motion)
    corpus_dir = corpus or a2m_cfg.get("data")
    corpus = fmt.load_corpus(corpus_dir)
    for where, name, dim in ((data, "person dataset", person.meta["feature_dim"]),
                             (corpus_dir, "corpus", corpus.meta["feature_dim"])):
        if int(dim) != mc.feature_dim:
            raise DatasetError(f"{where}: {name} has {dim}-d audio features, the stage-1 run "
                               f"{audio2motion} expects {mc.feature_dim}")
    syncnet_dir = syncnet or a2m_cfg.get("syncnet")
    sync_model, sync_vars, sync_cfg = None, None, None
    if config.loss.sync > 0 and syncnet_dir:
        sync_model, sync_vars, sync_cfg = a2m.load_syncnet(syncnet_dir)
        # the sync loss scores refined stage-1 motion: the SyncNet must know its units
        a2m.check_syncnet_pairing(syncnet_dir, sync_cfg, f"the stage-1 run {audio2motion}",
                                  a2m_cfg)
    real, identity = person_motion(person, std, "train")
    cfg = pn.PostNetConfig(motion_dim=mc.motion_dim, static_coords=static_coordinates(std),
                           **config.model)
    optim = PostNetOptimConfig(**config.optim)
    losses = PostNetLossConfig(**dict(config.loss.to_dict(),
                                      sync=config.loss.sync if sync_model else 0.0))
    mesh = mesh or make_mesh()
    n_dev = mesh.shape[DATA_AXIS]
    batch_size = config.batch_size - config.batch_size % n_dev or n_dev
    absolute = lambda p: str(pathlib.Path(p).absolute()) if p else None  # noqa: E731
    pool_cfg = dict(config.pool.to_dict(), corpus_splits=list(config.pool.corpus_splits))
    run_cfg = dict(stage="postnet", model=dataclasses.asdict(cfg), data=absolute(data),
                   corpus=absolute(corpus_dir), audio2motion=absolute(audio2motion),
                   seed=config.seed, batch_size=batch_size, window=config.window,
                   person_fraction=config.person_fraction, pool=pool_cfg,
                   optim=dataclasses.asdict(optim), losses=dataclasses.asdict(losses),
                   disc_view=config.disc_view, select=config.select,
                   eval_samples=config.eval_samples,
                   syncnet=absolute(syncnet_dir) if sync_model else None,
                   syncnet_model=sync_cfg["model"] if sync_model else None,
                   run=config.run.to_dict())
    workdir = loop_lib.prepare_workdir(workdir, run_cfg)
    if parallel.is_main_process():
        for name, arr in (("landmark_std", std), ("identity", identity)):
            with atomic_path(workdir / f"{name}.npy", ".npy") as tmp:
                np.save(tmp, arr)
    pool = _draw_pool(workdir / "pool.npz", predict.MotionPredictor(mc, a2m_vars, chunk=128),
                      corpus, corpus_dir, person, config.pool, config.seed)

    disc_scale = (discriminator_scale(std, cfg.static_coords)
                  if config.disc_view == "landmarks" else None)
    gen, disc, state = create_postnet_state(cfg, optim, config.seed, sync_vars, disc_scale)
    steps = make_postnet_steps(gen, disc, losses, sync_model, num_frames=config.window)
    get_batch = make_batch_fn(pool, real, batch_size=batch_size, window=config.window,
                              seed=config.seed, person_fraction=config.person_fraction,
                              paired=real if config.loss.mse_target == "person" else None)
    corpus_ids = pool.domain_samples(0)
    if not len(corpus_ids):
        corpus_ids = pool.domain_samples(1)
    eval_ids = corpus_ids[np.random.default_rng(config.seed).permutation(
        len(corpus_ids))[:config.eval_samples]]
    pool_fd = pool_fd_fn(pool, real, cfg, eval_ids, std)
    on_disk = predict.read_selected_info(workdir)     # what earlier launches selected
    selected = [on_disk]
    resumed_from = []

    def batches(step):
        # The loop asks first for the batch of the step it resumed from (0 if new).
        if not resumed_from:
            resumed_from.append(int(step))
        return get_batch(step)

    def forget_later_selection(resumed):
        """A launch killed after a pool check and before its next checkpoint leaves a
        selection made after the step this run resumes from: it is not this run's
        history (its pool checks are redone from there), so it is dropped and its files
        deleted; the redone checks select what an uninterrupted run does. Only the
        selection read at the start can be such. Called at every pool check (after a
        step: every host has read the files by then) and once after the loop."""
        if on_disk is None or selected[0] is not on_disk or on_disk["step"] <= resumed:
            return
        selected[0] = None
        logging.warning("postnet: %s holds a generator selected at step %d, after step %d "
                        "this run resumes from (an interrupted launch); dropped",
                        workdir, on_disk["step"], resumed)
        if parallel.is_main_process():      # the record first: it names the variables
            for name in (SELECTED_INFO, SELECTED_FILE):
                (workdir / name).unlink(missing_ok=True)

    def evaluate(st, step):
        """The pool check; keeps the EMA as the inference generator if it beats the
        selection."""
        forget_later_selection(resumed_from[0])
        variables = jax.device_get(st.generator_variables())
        fd = pool_fd(variables)
        best = selected[0]
        if config.select and (best is None or fd < best["pool_fd"]):
            selected[0] = {"step": int(step), "pool_fd": float(fd)}
            if parallel.is_main_process():
                save_selected_generator(workdir, variables, step, fd)
        return {"pool_fd": fd}

    num_steps = int(config.run.steps)
    fd_before = pool_fd(None)
    start = time.time()
    state, last = loop_lib.train_configured(
        run=config.run, run_config=run_cfg, workdir=workdir, state=state,
        step_fn=steps.train_step, get_batch=batches, num_steps=num_steps, mesh=mesh,
        eval_fn=evaluate, name="postnet ")
    # no batch asked for: the run had already reached num_steps, at its last checkpoint
    forget_later_selection(resumed_from[0] if resumed_from else int(state.step))
    fd_after = pool_fd(jax.device_get(state.generator_variables()))
    sel = selected[0] or {"step": num_steps, "pool_fd": fd_after}
    out = dict(pool_fd_before=fd_before, pool_fd_after=fd_after,
               pool_fd_selected=sel["pool_fd"], selected_step=sel["step"],
               **{f"train_{k}": v for k, v in last.items() if not k.startswith("eval_")},
               steps=num_steps, steps_per_s=num_steps / max(time.time() - start, 1e-9),
               minutes=(time.time() - t0) / 60.0, devices=n_dev,
               pool_samples=int(len(pool.samples)), pool_frames=int(len(pool.motion)))
    metrics_lib.write_final_metrics(workdir, out)
    return out


# --------------------------------------------------------------------------- evaluation

def held_out_sequences(corpus, person, splits, person_split):
    """[(name, source, mel [2T, C], oracle_open [T] or None)] of the held-out audio."""
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


def landmark_figures(outputs, reference, oracles):
    """FD (whole face, mouth) against `reference` [N, 68, 3] and the sync correlation of
    the landmark sequences `outputs` (list of [T, 68, 3]) with their `oracles` (mouth
    openings or None), averaged weighted by length."""
    from geneface_jax.data import landmarks as lm
    frames = np.concatenate(outputs)
    ref = np.asarray(reference)
    corr, weights = [], []
    for seq, oracle in zip(outputs, oracles):
        if oracle is not None and len(seq) > 2 and np.std(oracle) > 1e-6:
            corr.append(lm.pearson(lm.mouth_opening(seq), oracle))
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


def evaluate_postnet(postnet, workdir, *, data=None, corpus=None, audio2motion=None,
                     splits=("test",), person_split="valid", reference="all",
                     generator="selected", samples=1, temperature=1.0, seed=0,
                     bar_fd_reduction=0.5, bar_sync_drop=0.05):
    """Evaluates a post-net run on held-out audio; the `eval_postnet` run.

    For every held-out sequence (the corpus' `splits`, the person's `person_split`),
    `samples` stage-1 samples at `temperature` are refined by the post-net (`generator`:
    `selected`, the one inference uses, or `final`, the EMA of the last checkpoint); both
    become landmarks with the person's identity (`motion * std + identity`) and are
    compared with the person's tracked landmarks (`reference`: all, train or valid
    frames).

    Args:
      postnet: a `train_postnet` workdir; data, corpus, audio2motion default to its own.
      workdir: where metrics.json goes (created only once the figures are computed).
    Returns:
      the metrics of metrics.json: `fd_before` / `fd_after` (Fréchet distance of the 204-d
      landmark vectors, squared head units), `fd_mouth_*` (the 20 mouth points),
      `sync_*` (Pearson correlation of the mouth opening with the articulation oracle's),
      `fd_mean_term_*`, `var_ratio_*`, `fd_reduction`, `fd_mouth_reduction`,
      `sync_drop`, `bar_met` (fd_reduction >= bar_fd_reduction and sync_drop <=
      bar_sync_drop), `per_source` figures, `inference_generator`, the settings,
      `reference_frames`, `units`, `minutes`.
    """
    import time

    from geneface_jax.data import format as fmt
    from geneface_jax.data.batching import denormalize_motion
    from geneface_jax.motion import predict
    from geneface_jax.train import metrics as metrics_lib

    t0 = time.time()
    config, g_vars, run_cfg, std, identity = predict.load_postnet(
        postnet, selected=generator == "selected")
    person = fmt.load_person(data or run_cfg["data"])
    corpus = fmt.load_corpus(corpus or run_cfg["corpus"])
    mc, a2m_vars, _, a2m_std = predict.load_audio2motion(audio2motion
                                                         or run_cfg["audio2motion"])
    if not np.allclose(a2m_std, std):
        raise DatasetError(f"{postnet}: the post-net was trained in the units of another "
                           "stage-1 run (landmark_std.npy differs)")
    predictor = predict.MotionPredictor(mc, a2m_vars, chunk=128)
    sequences = held_out_sequences(corpus, person, splits, person_split)
    if not sequences:
        raise DatasetError(f"no held-out audio in corpus splits {list(splits)} / person "
                           f"split {person_split!r}")
    before, after, oracles, sources = [], [], [], []
    for s, (_, source, mel, oracle) in enumerate(sequences):
        for k in range(samples):
            key = jax.random.fold_in(jax.random.PRNGKey(seed), s * 1000 + k)
            motion = predictor.sample_motion(mel, key, temperature)
            refined = pn.refine_motion(config, g_vars, motion)
            before.append(denormalize_motion(motion, identity, std))
            after.append(denormalize_motion(refined, identity, std))
            oracles.append(oracle)
            sources.append(source)
    ref_idx = (np.arange(person.num_frames) if reference == "all"
               else person.split(reference))
    ref = np.asarray(person["landmarks"])[ref_idx]

    per_source = {}
    for src in [None, *sorted(set(sources))]:
        keep = [i for i, s in enumerate(sources) if src is None or s == src]
        orc = [oracles[i] for i in keep]
        fb = landmark_figures([before[i] for i in keep], ref, orc)
        fa = landmark_figures([after[i] for i in keep], ref, orc)
        entry = {f"{k}_before": v for k, v in fb.items() if k not in ("frames", "sequences")}
        entry.update({f"{k}_after": v for k, v in fa.items()
                      if k not in ("frames", "sequences")})
        per_source[src or "all"] = dict(entry, frames=fb["frames"], sequences=fb["sequences"])
    al = per_source["all"]
    out = {}
    for name in ("fd", "fd_mouth", "sync", "fd_mean_term", "var_ratio"):
        for tag in ("before", "after"):
            out[f"{name}_{tag}"] = al[f"{name}_{tag}"]
    out.update(fd_reduction=1.0 - out["fd_after"] / max(out["fd_before"], 1e-30),
               fd_mouth_reduction=1.0 - out["fd_mouth_after"] / max(out["fd_mouth_before"],
                                                                      1e-30),
               sync_drop=out["sync_before"] - out["sync_after"])
    out["bar_met"] = bool(out["fd_reduction"] >= bar_fd_reduction
                          and out["sync_drop"] <= bar_sync_drop)
    out.update(per_source=per_source, inference_generator=run_cfg["inference_generator"],
               reference=reference, splits=list(splits), person_split=person_split,
               samples=samples, temperature=temperature, reference_frames=int(len(ref)),
               units="fd in squared landmark (head) units", minutes=(time.time() - t0) / 60)
    pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)
    metrics_lib.write_final_metrics(workdir, out)
    return out
