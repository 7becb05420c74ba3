"""Stage 1 of GeneFace: the variational audio-to-motion generator (FVAE with a flow prior).

Channel-last throughout. Symbols: B batch, T video frames (25 fps), A = 2T audio feature
frames (50 Hz), C audio feature channels (80 log-mel or 1024 HuBERT), D motion channels
(204 = 68 x 3 normalised landmarks, or 64 expression coefficients), T' = T / 4 latent
frames, Z latent channels (16).

    features [B, 2T, C] --AudioCondNet--> cond [B, T, 64]          (50 -> 25 Hz, conv/BN/GELU/conv)
    cond --g_pre_net (conv k8 s4)--> cond_sqz [B, T', 64]
    training:  motion [B, T, D] --encoder--> q(z|x) = N(m, exp(logs)) on [B, T', Z]
               z ~ q --prior_flow(cond_sqz)--> z_p;  KL = masked mean of
               log q(z|x) - log N(z_p; 0, I), divided by Z (GeneFace's estimator)
               z --decoder(cond)--> motion_hat [B, T, D]
    sampling:  z_p ~ N(0, temperature^2) --prior_flow^-1--> z --decoder--> motion [B, T, D]

T must be a multiple of the stride (4): `pad_to_stride` pads a batch and its mask. Masks are
`[B, T, 1]` float (1 = valid frame); the latent mask is `mask[:, ::4]`.

Parameter names follow GeneFace's `VAEModel` (`mel_encoder`, `vae.g_pre_net`,
`vae.encoder.{pre_net,wn,out_proj}`, `vae.decoder.{pre_net,wn,out_proj}`, `vae.prior_flow`)
so its PyTorch checkpoints convert by renaming and transposing.
With `use_latent=False` the model is the regression baseline of the mean-face test: the
same decoder fed a zero latent (no encoder, no flow, no KL), i.e. a deterministic
audio -> motion regression with the same capacity on the audio path.
"""

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from geneface_jax.errors import ShapeError
from geneface_jax.motion.batchnorm import MaskedBatchNorm
from geneface_jax.motion.flows import ResidualCouplingBlock
from geneface_jax.motion.wavenet import WaveNet, WNConv1d, check_mask, check_sequence
from geneface_jax.initializers import jitted_init

LOG_2PI = math.log(2.0 * math.pi)


@dataclasses.dataclass(frozen=True)
class Audio2MotionConfig:
    """Sizes of the stage-1 generator. Defaults are GeneFace's (`VAEModel(in_out_dim=204)`);
    the presets of a training run are `experiments/configs/audio2motion.py`'s."""
    feature_dim: int = 80        # C: audio feature channels (80 log-mel, 1024 HuBERT)
    motion_dim: int = 204        # D: 68 x 3 normalised landmarks (64 for expression coeffs)
    cond_dim: int = 64           # audio condition channels
    hidden: int = 256            # encoder/decoder WaveNet width
    latent: int = 16             # Z
    kernel_size: int = 5         # encoder/decoder WaveNet kernel
    enc_layers: int = 8
    dec_layers: int = 4
    stride: int = 4              # latent rate = frame rate / stride
    flow_hidden: int = 64
    flow_kernel: int = 3
    flow_layers: int = 4         # WaveNet layers inside each coupling layer
    num_flows: int = 4           # coupling layers
    use_prior_flow: bool = True  # False: standard-normal prior, analytic KL
    use_latent: bool = True      # False: regression baseline (no latent)
    dropout: float = 0.0         # GeneFace's WN dropout (0 in its configs)
    # how the encoder/decoder WaveNets' K-tap convs are computed (same parameters, same
    # function): 'auto' = Winograd F(4, K) on CPU, direct elsewhere; see WNConv1d
    conv_algorithm: str = "auto"


def pad_to_stride(x, mask, stride=4):
    """Pads `[B, T, ...]` arrays `x` (pytree) and `mask` `[B, T, 1]` with zeros along T to a
    multiple of `stride`. Returns (x, mask)."""
    t = mask.shape[1]
    extra = (-t) % stride
    if not extra:
        return x, mask

    def pad(a):
        widths = [(0, 0)] * a.ndim
        widths[1] = (0, extra)
        return jnp.pad(a, widths)
    return jax.tree.map(pad, x), pad(mask)


def gaussian_log_prob(x, mean, log_std):
    """Elementwise log N(x; mean, exp(log_std)^2)."""
    return -0.5 * LOG_2PI - log_std - 0.5 * jnp.square((x - mean) * jnp.exp(-log_std))


def kl_terms(z_q, m_q, logs_q, z_p):
    """Elementwise `log q(z_q | x) - log N(z_p; 0, I)` (GeneFace's single-sample estimator,
    exact because the flow is volume preserving). All `[B, T', Z]`."""
    return gaussian_log_prob(z_q, m_q, logs_q) - gaussian_log_prob(z_p, 0.0, 0.0)


def kl_loss(z_q, m_q, logs_q, z_p, latent_mask):
    """GeneFace's KL: sum(kl_terms * mask) / sum(mask) / Z (a scalar)."""
    terms = kl_terms(z_q, m_q, logs_q, z_p) * latent_mask
    return jnp.sum(terms) / jnp.maximum(jnp.sum(latent_mask), 1.0) / z_q.shape[-1]


# --------------------------------------------------------------------------- modules

class ConvTranspose1dStrided(nn.Module):
    """PyTorch `ConvTranspose1d(C_in, features, kernel_size=s, stride=s)`: every input frame
    becomes `s` output frames, `[B, T, C_in] -> [B, s T, features]`.

    Params: `kernel` `[s, C_in, features]` (PyTorch weight `[C_in, features, s]` transposed),
    `bias` `[features]`; PyTorch's default init U(+-1/sqrt(features * s)).
    """
    features: int
    stride: int

    @nn.compact
    def __call__(self, x):
        check_sequence(x, None, f"ConvTranspose1dStrided '{self.name}'")
        bound = 1.0 / math.sqrt(self.features * self.stride)
        init = lambda key, shape: jax.random.uniform(key, shape, jnp.float32, -bound, bound)  # noqa
        kernel = self.param("kernel", init, (self.stride, x.shape[-1], self.features))
        bias = self.param("bias", init, (self.features,))
        b, t, c = x.shape
        # one [B T, C] x [C, s O] GEMM; laid out so the weight gradient's GEMM reads the
        # output gradient as it is ([B T, s O]) instead of transposing it (with an einsum
        # XLA fused that transpose with the decoder's whole input-gradient chain: 0.6 s)
        y = jnp.dot(x.reshape(b * t, c),
                    kernel.transpose(1, 0, 2).reshape(c, self.stride * self.features))
        return y.reshape(b, t * self.stride, self.features) + bias


class AudioCondNet(nn.Module):
    """GeneFace's `mel_encoder` after its 50 -> 25 Hz down-sampler:
    `[B, 2T, C] -> [B, T, cond_dim]`.

    Down-sampling is nearest-neighbour by 0.5 (keeps feature frame 2j for video frame j),
    then Conv1d(k3, no bias) -> BatchNorm -> GELU (exact) -> Conv1d(k3, no bias). BatchNorm
    statistics are taken over valid frames only (`mask`) and, with `axis_name`, over the
    global batch of a data-parallel step (`MaskedBatchNorm`).
    """
    cond_dim: int = 64
    axis_name: Optional[str] = None

    @nn.compact
    def __call__(self, features, mask=None, train: bool = False):
        """features: [B, 2T, C]; mask: [B, T, 1] or None. Returns [B, T, cond_dim]."""
        check_sequence(features, None, "AudioCondNet features")
        if features.shape[1] % 2:
            raise ShapeError(f"AudioCondNet: features must hold 2 frames per video frame "
                             f"(an even count), got shape {tuple(features.shape)}")
        x = features[:, ::2]
        mask = check_mask(mask, x, "AudioCondNet")
        x = WNConv1d(64, 3, use_weight_norm=False, use_bias=False, name="conv_0")(x * mask)
        x = MaskedBatchNorm(0.9, 1e-5, self.axis_name if train else None, name="bn")(
            x, mask, train)
        # Masking here (GeneFace does not) makes padded frames behave like the end of the
        # sequence, so chunked inference equals a single pass.
        x = nn.gelu(x, approximate=False) * mask
        return WNConv1d(self.cond_dim, 3, use_weight_norm=False, use_bias=False,
                        name="conv_1")(x)


class FVAEEncoder(nn.Module):
    """motion `[B, T, D]` -> (m, logs) `[B, T/s, Z]` each: strided conv pre-net (kernel 2s,
    stride s, padding s/2) -> WaveNet conditioned on cond_sqz -> 1x1 out_proj."""
    config: Audio2MotionConfig

    @nn.compact
    def __call__(self, x, latent_mask, g, deterministic=True):
        c = self.config
        s = c.stride
        h = WNConv1d(c.hidden, 2 * s, stride=s, padding=s // 2, use_weight_norm=False,
                     name="pre_net")(x) * latent_mask
        h = WaveNet(c.hidden, c.kernel_size, 1, c.enc_layers, c.cond_dim, c.dropout,
                    dropout_before_gate=True, conv_algorithm=c.conv_algorithm,
                    name="wn")(h, latent_mask, g, deterministic)
        stats = WNConv1d(2 * c.latent, 1, use_weight_norm=False, name="out_proj")(h * latent_mask)
        return stats[..., :c.latent], stats[..., c.latent:]


class FVAEDecoder(nn.Module):
    """latent `[B, T/s, Z]` -> motion `[B, T, D]`: ConvTranspose1d up-sampling (x s) ->
    WaveNet conditioned on the full-rate cond -> 1x1 out_proj."""
    config: Audio2MotionConfig

    @nn.compact
    def __call__(self, z, mask, g, deterministic=True):
        c = self.config
        h = ConvTranspose1dStrided(c.hidden, c.stride, name="pre_net")(z) * mask
        h = WaveNet(c.hidden, c.kernel_size, 1, c.dec_layers, c.cond_dim, c.dropout,
                    dropout_before_gate=True, conv_algorithm=c.conv_algorithm,
                    name="wn")(h, mask, g, deterministic)
        return WNConv1d(c.motion_dim, 1, use_weight_norm=False, name="out_proj")(h * mask)


class FVAE(nn.Module):
    """The VAE with its flow prior, given the audio condition (see the module doc)."""
    config: Audio2MotionConfig

    def setup(self):
        c = self.config
        s = c.stride
        self.g_pre_net = WNConv1d(c.cond_dim, 2 * s, stride=s, padding=s // 2,
                                  use_weight_norm=False)
        if c.use_latent:
            self.encoder = FVAEEncoder(c)
            if c.use_prior_flow:
                self.prior_flow = ResidualCouplingBlock(
                    c.latent, c.flow_hidden, c.flow_kernel, 1, c.flow_layers, c.num_flows,
                    gin_channels=c.cond_dim, dropout=c.dropout, dropout_before_gate=True)
        self.decoder = FVAEDecoder(c)

    def _latent_mask(self, mask):
        return mask[:, ::self.config.stride]

    def __call__(self, x, mask, g, deterministic=True, eps=None):
        """Training pass. x: [B, T, D]; mask: [B, T, 1]; g: [B, T, cond_dim];
        eps: [B, T', Z] standard-normal encoder noise, or None to draw it from the 'sample'
        RNG stream.

        Returns dict: `recon` [B, T, D] (masked), `kl_terms` [B, T', Z] (masked),
        `latent_mask` [B, T', 1], `m_q`, `logs_q`, `z_q`, `z_p` [B, T', Z].
        """
        c = self.config
        lmask = self._latent_mask(mask)
        g_sqz = self.g_pre_net(g)
        out = {"latent_mask": lmask}
        if c.use_latent:
            m_q, logs_q = self.encoder(x, lmask, g_sqz, deterministic)
            if eps is None:
                eps = jax.random.normal(self.make_rng("sample"), m_q.shape, m_q.dtype)
            elif tuple(eps.shape) != tuple(m_q.shape):
                raise ShapeError(f"FVAE: eps must be {tuple(m_q.shape)}, got {tuple(eps.shape)}")
            z_q = m_q + eps * jnp.exp(logs_q)
            if c.use_prior_flow:
                z_p = self.prior_flow(z_q, lmask, g_sqz, reverse=False,
                                      deterministic=deterministic)
                terms = kl_terms(z_q, m_q, logs_q, z_p)
            else:
                z_p = z_q   # analytic KL(N(m, s^2) || N(0, 1)) per element
                terms = -logs_q + 0.5 * (jnp.exp(2 * logs_q) + jnp.square(m_q)) - 0.5
            out.update(m_q=m_q, logs_q=logs_q, z_q=z_q, z_p=z_p, kl_terms=terms * lmask)
        else:
            z_q = jnp.zeros(lmask.shape[:2] + (c.latent,), x.dtype)
            out.update(kl_terms=jnp.zeros_like(z_q))
        out["recon"] = self.decoder(z_q, mask, g, deterministic) * mask
        return out

    def sample(self, mask, g, z_p):
        """Inference. mask: [B, T, 1]; g: [B, T, cond_dim]; z_p: [B, T', Z] prior noise
        (already scaled by the temperature). Returns motion [B, T, D] (masked)."""
        c = self.config
        lmask = self._latent_mask(mask)
        if c.use_latent:
            z = z_p
            if c.use_prior_flow:
                z = self.prior_flow(z_p, lmask, self.g_pre_net(g), reverse=True)
        else:
            z = jnp.zeros_like(z_p)
            self.g_pre_net(g)   # keep the parameter tree identical to training
        return self.decoder(z, mask, g) * mask


class Audio2Motion(nn.Module):
    """GeneFace's `VAEModel`: `mel_encoder` (AudioCondNet) + `vae` (FVAE).

    `__call__(features, motion, mask, train)` is the training pass (see `FVAE.__call__`);
    `sample(features, mask, noise, temperature)` draws motion. `axis_name` makes BatchNorm
    synchronise over the data-parallel axis in training.
    """
    config: Audio2MotionConfig
    axis_name: Optional[str] = None

    def setup(self):
        self.mel_encoder = AudioCondNet(self.config.cond_dim, self.axis_name)
        self.vae = FVAE(self.config)

    def _check(self, features, mask, motion=None):
        c = self.config
        check_sequence(features, c.feature_dim, "Audio2Motion features")
        check_sequence(mask, 1, "Audio2Motion mask")
        b, t = mask.shape[:2]
        if features.shape[:2] != (b, 2 * t):
            raise ShapeError(f"Audio2Motion: features {tuple(features.shape)} must have 2 frames "
                             f"per motion frame: expected [{b}, {2 * t}, {c.feature_dim}] for "
                             f"mask {tuple(mask.shape)}")
        if t % c.stride:
            raise ShapeError(f"Audio2Motion: T={t} frames is not a multiple of the latent "
                             f"stride {c.stride}; pad with `pad_to_stride`")
        if motion is not None:
            check_sequence(motion, c.motion_dim, "Audio2Motion motion")
            if motion.shape[:2] != (b, t):
                raise ShapeError(f"Audio2Motion: motion {tuple(motion.shape)} does not match "
                                 f"mask {tuple(mask.shape)}")

    def condition(self, features, mask, train=False):
        """features [B, 2T, C] -> audio condition [B, T, cond_dim] (masked)."""
        return self.mel_encoder(features, mask, train) * mask

    def __call__(self, features, motion, mask, train: bool = False, eps=None):
        """features: [B, 2T, C]; motion: [B, T, D] normalised; mask: [B, T, 1];
        eps: optional encoder noise [B, T/4, Z] (default: the 'sample' RNG stream).

        Returns the dict of `FVAE.__call__` plus `cond` [B, T, cond_dim].
        """
        self._check(features, mask, motion)
        g = self.condition(features, mask, train)
        out = self.vae(motion, mask, g, deterministic=not train, eps=eps)
        out["cond"] = g
        return out

    def sample(self, features, mask, noise, temperature=1.0):
        """features: [B, 2T, C]; mask: [B, T, 1]; noise: [B, T/4, Z] standard normal.

        Returns motion [B, T, D]: the decoder applied to flow^-1(temperature * noise).
        """
        self._check(features, mask)
        want = (mask.shape[0], mask.shape[1] // self.config.stride, self.config.latent)
        if tuple(noise.shape) != want:
            raise ShapeError(f"Audio2Motion.sample: noise must be {want}, got {tuple(noise.shape)}")
        g = self.condition(features, mask, False)
        return self.vae.sample(mask, g, noise * temperature)


def init_audio2motion(config: Audio2MotionConfig, rng, frames=16, axis_name=None):
    """(model, variables) with `params` and `batch_stats` for `config`."""
    model = Audio2Motion(config, axis_name=axis_name)
    t = frames
    feats = jnp.zeros((1, 2 * t, config.feature_dim))
    motion = jnp.zeros((1, t, config.motion_dim))
    mask = jnp.ones((1, t, 1))
    k1, k2 = jax.random.split(jax.random.PRNGKey(rng) if isinstance(rng, int) else rng)
    # One compiled program, not one per initializer and forward op (op by op).
    variables = jitted_init(model, train=False)(
        {"params": k1, "sample": k2}, feats, motion, mask)
    return model, variables


def num_params(tree) -> int:
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))
