"""Stage-1 inference for any length: audio features -> sampled landmarks, chunked, seamless.

The prior noise of the whole sequence is drawn first (`[ceil(T/4), Z]`, one key), then the
sequence is cut into windows of `chunk` frames, each extended by `context` frames of real
neighbouring input on both sides; every window is run through the flow inverse and the
decoder at one fixed shape (one compilation) and only its centre is kept. Every layer is
a finite convolution whose padded frames are masked to zero, so when `context` covers the
network's receptive field (`receptive_field`) the chunked output equals a single pass over
the whole sequence up to float rounding, and memory stays flat in the audio length.

`pad_mode="geneface"` reproduces GeneFace's inference instead
(`inference/audio2motion/audio2motion_infer.py`): the features are zero-padded to whole
latent frames (8 HuBERT frames) and the padded frames count as audio (mask 1), which is
what GeneFace's unmasked audio condition net sees; the output keeps the input's frames.

Trained runs are read for inference here too (`load_audio2motion`, `load_postnet`): the
variables come from the run's latest checkpoint as saved (`checkpoint.restore_run`), checked
against the shapes of a model built from the run's config; nothing of training is imported.
Runs imported from GeneFace (`convert.geneface_import`) load the same way; their motion is
GeneFace's idexp_lm3d array, which `motion_representation` reports and `landmark_std.npy`
turns into landmarks like any run's.
"""

import json
import math
import pathlib

import flax
import jax
import jax.numpy as jnp
import numpy as np

from geneface_jax import checkpoint as ckpt_lib
from geneface_jax.data.batching import denormalize_motion
from geneface_jax.errors import CheckpointError, ShapeError
from geneface_jax.motion import postnet as pn
from geneface_jax.motion.vae import Audio2Motion, Audio2MotionConfig, init_audio2motion


PAD_MODES = ("mask", "geneface")


def receptive_field(config: Audio2MotionConfig) -> int:
    """A bound, in video frames, on how far (each side) an output frame of `sample` sees."""
    c = config
    cond = 2                                                   # two k3 convs at 25 Hz
    g_sqz = cond + 2 * c.stride                                # k=2s, s, pad s/2
    flow = c.num_flows * c.flow_layers * (c.flow_kernel // 2) if c.use_prior_flow else 0
    dec = c.dec_layers * (c.kernel_size // 2) + cond
    return c.stride * (flow + 1) + g_sqz + dec + c.stride


class MotionPredictor:
    """Samples normalised motion / landmarks from a trained stage-1 model.

    Args:
      config: the model's `Audio2MotionConfig`.
      variables: `{'params': ..., 'batch_stats': ...}` of `Audio2Motion`.
      chunk: frames kept per window (multiple of 4).
      context: frames of context on each side (multiple of 4; default: the receptive
        field rounded up to a multiple of 4).
      pad_mode: how a sequence is completed to whole latent frames (4 video frames):
        "mask" (padded frames are masked: they act like the end of the sequence) or
        "geneface" (zero features that count as audio, GeneFace's inference).
    """

    def __init__(self, config: Audio2MotionConfig, variables, *, chunk=1024, context=None,
                 pad_mode="mask"):
        if pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")
        self.pad_mode = pad_mode
        s = config.stride
        rf = receptive_field(config)
        context = -(-rf // s) * s if context is None else int(context)
        if chunk % s or context % s or chunk <= 0 or context < 0:
            raise ShapeError(f"chunk ({chunk}) and context ({context}) must be positive "
                             f"multiples of the latent stride {s}")
        self.config, self.variables = config, variables
        self.chunk, self.context = int(chunk), context
        self.window = self.chunk + 2 * self.context
        self.model = Audio2Motion(config)
        self._run = jax.jit(self._sample_window)

    def _sample_window(self, variables, feats, mask, noise, temperature):
        return self.model.apply(variables, feats, mask, noise, temperature,
                                method=Audio2Motion.sample)

    def sample_motion(self, features, rng, temperature=1.0):
        """features: `[2T, C]` (50 Hz) -> normalised motion `[T, D]` (25 fps).

        `rng` is a JAX key; `temperature` scales the prior noise (0 gives the flow's mode
        path, 1 the trained distribution).
        """
        feats = np.asarray(features, np.float32)
        c = self.config
        if feats.ndim != 2 or feats.shape[1] != c.feature_dim:
            raise ShapeError(f"features must be [2T, {c.feature_dim}], got {feats.shape}")
        if feats.shape[0] < 2 or feats.shape[0] % 2:
            raise ShapeError(f"features must hold an even number (>= 2) of 50 Hz frames "
                             f"(2 per video frame), got {feats.shape[0]}")
        if not np.all(np.isfinite(feats)):
            raise ShapeError("features contain NaN or inf")
        num = feats.shape[0] // 2
        s, chunk, ctx, win = c.stride, self.chunk, self.context, self.window
        total = -(-num // s) * s
        noise = np.asarray(jax.random.normal(rng, (total // s, c.latent), jnp.float32))
        # Pad the whole sequence by `ctx` masked frames on each side and up to whole chunks.
        n_chunks = max(1, math.ceil(total / chunk))
        padded = n_chunks * chunk + 2 * ctx
        f_pad = np.zeros((2 * padded, feats.shape[1]), np.float32)
        f_pad[2 * ctx:2 * (ctx + num)] = feats
        m_pad = np.zeros((padded, 1), np.float32)
        m_pad[ctx:ctx + (total if self.pad_mode == "geneface" else num)] = 1.0
        z_pad = np.zeros((padded // s, c.latent), np.float32)
        z_pad[ctx // s:ctx // s + total // s] = noise
        out = np.zeros((n_chunks * chunk, c.motion_dim), np.float32)
        temp = jnp.float32(temperature)
        for k in range(n_chunks):
            lo = k * chunk                         # window [lo, lo + win) of the padded axis
            y = self._run(self.variables, f_pad[None, 2 * lo:2 * (lo + win)],
                          m_pad[None, lo:lo + win], z_pad[None, lo // s:(lo + win) // s], temp)
            out[lo:lo + chunk] = np.asarray(y[0, ctx:ctx + chunk])
        return out[:num]

    def predict_landmarks(self, features, rng, temperature=1.0, *, identity, std):
        """features `[2T, C]` -> landmarks `[T, 68, 3]` in head space: the sampled motion
        times the training `std` `[68, 3]` plus the target's `identity` `[68, 3]` (its
        mean landmarks)."""
        return denormalize_motion(self.sample_motion(features, rng, temperature), identity, std)


def predict_landmarks(config, variables, features, rng, temperature=1.0, *, identity, std,
                      chunk=1024):
    """One-shot `MotionPredictor(config, variables).predict_landmarks(...)`."""
    return MotionPredictor(config, variables, chunk=chunk).predict_landmarks(
        features, rng, temperature, identity=identity, std=std)


# --------------------------------------------------------------------------- loading runs

SELECTED_FILE = "selected_generator.msgpack"   # post-net variables inference uses
SELECTED_INFO = "selected_generator.json"      # {"step": int, "pool_fd": float}


def _read_npy(workdir, name):
    path = pathlib.Path(workdir) / f"{name}.npy"
    if not path.is_file():
        raise CheckpointError(f"{workdir}: missing {name}.npy")
    return np.load(path)


def motion_representation(run_config):
    """What a run's motion is: `{'kind': 'normalized'}` for runs trained here ((landmarks
    - identity) / std) or the `representation` an imported run records
    (`{'kind': 'geneface_idexp_lm3d', 'scale': 10, 'landmark_unit': ...}`)."""
    return dict(run_config.get("representation") or {"kind": "normalized"})


def _refuse_geneface_dir(workdir, stage):
    """A clear error for a GeneFace work dir passed where a run of this project is read."""
    path = pathlib.Path(workdir)
    if path.is_dir() and not (path / "config.json").exists() and any(
            p.name.startswith("model_ckpt_steps_") for p in path.iterdir()):
        raise CheckpointError(f"{workdir}: a GeneFace checkpoint directory, not a {stage} "
                              f"run of this project; import it first: python -m "
                              f"experiments.import_geneface --ckpt={workdir} --stage={stage} "
                              f"--out=WORKDIR")


def load_audio2motion(workdir):
    """(Audio2MotionConfig, variables, run config, landmark std) of a `train_audio2motion`
    run (or one imported from GeneFace); landmarks = motion * std + the target's identity
    (its mean landmarks)."""
    _refuse_geneface_dir(workdir, "audio2motion")
    cfg = ckpt_lib.read_run_config(workdir, "audio2motion")
    mc = Audio2MotionConfig(**cfg["model"])
    saved = ckpt_lib.restore_run(workdir)
    variables = {"params": saved["params"], "batch_stats": saved["batch_stats"]}
    # the expected shapes only: nothing is initialised or compiled
    ckpt_lib.check_like(variables, jax.eval_shape(lambda: init_audio2motion(mc, 0)[1]),
                        f"{workdir}")
    return mc, variables, cfg, _read_npy(workdir, "landmark_std")


def read_selected_info(workdir):
    """`{'step', 'pool_fd'}` of the run's selected generator, or None (none selected)."""
    path = pathlib.Path(workdir) / SELECTED_INFO
    if not path.is_file() or not (pathlib.Path(workdir) / SELECTED_FILE).is_file():
        return None
    try:
        info = json.loads(path.read_text())
        return {"step": int(info["step"]), "pool_fd": float(info["pool_fd"])}
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable ({e}); delete it and the .msgpack next "
                              "to it to fall back to the final generator") from e


def load_selected_generator(workdir, template):
    """(variables, info) of the selected generator, `template` giving the tree; or
    (None, None) when the run has no selection."""
    info = read_selected_info(workdir)
    if info is None:
        return None, None
    data = (pathlib.Path(workdir) / SELECTED_FILE).read_bytes()
    try:
        return flax.serialization.from_bytes(template, data), info
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{workdir}/{SELECTED_FILE}: does not hold this run's "
                              f"generator ({e})") from e


def load_postnet(workdir, selected=True):
    """(PostNetConfig, generator variables `{'params', 'batch_stats'}`, run config, std
    [68, 3], identity [68, 3]) of a `train_postnet` run: landmarks of a refined sequence
    are `refined * std + identity` (identity = the target person's mean landmarks).

    The variables are the run's selected generator (`selected_generator.msgpack`, the EMA
    with the lowest pool Fréchet distance among its evaluations) when it has one, else the
    EMA of its last checkpoint (always with `selected=False`); the run config's
    `inference_generator` says which."""
    _refuse_geneface_dir(workdir, "postnet")
    cfg = ckpt_lib.read_run_config(workdir, "postnet")
    config = pn.PostNetConfig(**cfg["model"])
    saved = ckpt_lib.restore_run(workdir)
    # the generator's EMA (`train.postnet.GANState.ema`), checked against the shapes only
    variables = ckpt_lib.check_like(
        saved["ema"], jax.eval_shape(lambda: pn.init_postnet(config, 0)[2]["generator"]),
        f"{workdir}")
    std, identity = _read_npy(workdir, "landmark_std"), _read_npy(workdir, "identity")
    chosen, info = (load_selected_generator(workdir, variables) if selected
                    else (None, None))
    if chosen is not None:
        variables = chosen
        cfg = dict(cfg, inference_generator=dict(source="selected", **info))
    else:
        cfg = dict(cfg, inference_generator=dict(source="final_ema", step=int(saved["step"])))
    return config, variables, cfg, std, identity
