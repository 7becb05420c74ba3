"""Stage 2 of GeneFace: the domain-adaptive post-net and its frame-level discriminator.

Stage 1 is trained on a multi-speaker corpus, so its samples move like "a corpus speaker";
the post-net (a generator) refines them so they move like the *target person*, and a
discriminator judges single frames against the person's tracked landmarks (LSGAN).

Representation (the same for generator input, output and the discriminator's real frames):
204-d normalised, identity-removed motion, point-major 68 x 3 (`data.batching`):

    stage-1 sample        m = decoder(...)                    (what `MotionPredictor` gives)
    target person's real  m = (landmarks - identity) / std

where `std` `[68, 3]` is the corpus' expression std that stage 1 was trained with (kept
in the stage-1 workdir as `landmark_std.npy`) and `identity` `[68, 3]` is the target
person's mean landmarks over its *train* frames. Removing the person's mean face (rather
than normalising by its own statistics) makes the two domains differ only in how they
move: the post-net learns the person's articulation style (e.g. a wider mouth, a smile
that grows with speech), never its face shape, which inference adds back:
`landmarks = refined * std + identity`.

Generator (`CNNPostNet`, GeneFace's sizes; channel-last `[B, T, D]`):

    block1: conv3 D->128, conv3 128->128 (+res), conv3 128->128 (+res)
    block2: conv3 128->256, conv3 256->256 (+res), conv3 256->256 (+res)
    block3: conv3 256->128, then a 1x1 conv 128->D
    out = x + residual * mask

each conv3 followed by BatchNorm and LeakyReLU(0.2) (the residual is added before the
activation). GeneFace derives its mask from all-zero frames and masks only between
blocks; here the mask is explicit and applied after every layer and the BatchNorm is
`MaskedBatchNorm` (statistics over valid frames of the global batch). Padded frames then
behave like the zero padding at a sequence end, so a sequence gives the same output alone,
in a batch, or padded to any length (inference pads to length buckets, one compile each).

Discriminator (`MLPDiscriminator`): per frame, Linear D->128->256->256->128->1 (the last
without bias), LeakyReLU after each hidden layer (GeneFace's slopes 0.2, 0.25, 0.25,
0.25) and dropout 0.25. The caller masks padded frames out of its loss. Dropout draws its
mask over the *global* batch and keeps this device's slice (`GlobalDropout`), so a
data-parallel step equals the single-device one.

Parameter names follow GeneFace's PyTorch modules (`block1_0.conv`, `block1_0.bn`, ...,
`block3_1`; `backbone_0`, `backbone_3`, ..., `backbone_12` for the Linear layers of its
`nn.Sequential`) so a checkpoint converts by renaming.
"""

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from geneface_jax.errors import ShapeError
from geneface_jax.initializers import (jitted_init, torch_default_bias_init,
                                      torch_default_kernel_init)
from geneface_jax.motion.batchnorm import MaskedBatchNorm
from geneface_jax.motion.wavenet import WNConv1d, check_mask, check_sequence


@dataclasses.dataclass(frozen=True)
class PostNetConfig:
    """Sizes of the post-net and its discriminator; defaults are GeneFace's
    (`CNNPostNet(in_out_dim=204)`, `MLPDiscriminator(in_dim=204)`). The presets (paper,
    cpu, tiny) are `experiments/configs/postnet.py`'s `model` dicts."""
    motion_dim: int = 204                       # D
    hidden: int = 128                           # width of blocks 1 and 3
    wide: int = 256                             # width of block 2
    residual_layers: int = 2                    # residual convs after each block's first
    kernel_size: int = 3
    slope: float = 0.2                          # LeakyReLU of the generator
    disc_hidden: tuple = (128, 256, 256, 128)
    disc_slopes: tuple = (0.2, 0.25, 0.25, 0.25)
    disc_dropout: float = 0.25
    static_coords: tuple = ()                   # coordinates the post-net leaves unchanged

    def __post_init__(self):
        # JSON round trips turn tuples into lists; keep the config hashable.
        object.__setattr__(self, "disc_hidden", tuple(int(v) for v in self.disc_hidden))
        object.__setattr__(self, "disc_slopes", tuple(float(v) for v in self.disc_slopes))
        object.__setattr__(self, "static_coords", tuple(int(v) for v in self.static_coords))
        if any(not 0 <= v < self.motion_dim for v in self.static_coords):
            raise ValueError(f"static_coords must index the {self.motion_dim} motion "
                             "coordinates")
        if len(self.disc_hidden) != len(self.disc_slopes):
            raise ValueError(f"disc_hidden {self.disc_hidden} and disc_slopes "
                             f"{self.disc_slopes} must have the same length")
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {self.kernel_size}")

    def residual_mask(self):
        """`[D]` float32: 0 on `static_coords`, 1 elsewhere."""
        m = np.ones(self.motion_dim, np.float32)
        m[list(self.static_coords)] = 0.0
        return m

    @property
    def receptive_field(self):
        """Frames each side an output frame depends on (every k-tap conv adds k // 2)."""
        return (2 * (1 + self.residual_layers) + 1) * (self.kernel_size // 2)


class ConvBNBlock(nn.Module):
    """GeneFace's post-net `Conv1d` block: conv -> BatchNorm (-> + input) -> LeakyReLU,
    masked: `[B, T, C_in] -> [B, T, features]` with padded frames set to zero."""
    features: int
    kernel_size: int = 3
    residual: bool = False
    slope: float = 0.2
    axis_name: Optional[str] = None

    @nn.compact
    def __call__(self, x, mask, train):
        y = WNConv1d(self.features, self.kernel_size, use_weight_norm=False, name="conv")(x)
        y = MaskedBatchNorm(0.9, 1e-5, self.axis_name if train else None, name="bn")(
            y, mask, train)
        if self.residual:
            y = y + x
        return nn.leaky_relu(y, self.slope) * mask


class CNNPostNet(nn.Module):
    """The generator: `(motion [B, T, D], mask [B, T, 1]) -> refined [B, T, D]`.

    `train=True` normalises with the batch statistics of the valid frames (all devices
    along `axis_name`) and updates the running statistics (call with
    `mutable=['batch_stats']`); `train=False` uses the running statistics.
    """
    config: PostNetConfig
    axis_name: Optional[str] = None

    @nn.compact
    def __call__(self, x, mask=None, train: bool = False):
        c = self.config
        check_sequence(x, c.motion_dim, "CNNPostNet input")
        mask = check_mask(mask, x, "CNNPostNet")
        h = x * mask
        plan = (("block1", c.hidden), ("block2", c.wide))
        for name, width in plan:
            for i in range(1 + c.residual_layers):
                h = ConvBNBlock(width, c.kernel_size, i > 0, c.slope, self.axis_name,
                                name=f"{name}_{i}")(h, mask, train)
        h = ConvBNBlock(c.hidden, c.kernel_size, False, c.slope, self.axis_name,
                        name="block3_0")(h, mask, train)
        residual = WNConv1d(c.motion_dim, 1, use_weight_norm=False, name="block3_1")(h) * mask
        if c.static_coords:
            residual = residual * jnp.asarray(c.residual_mask(), residual.dtype)
        return x + residual


class GlobalDropout(nn.Module):
    """Inverted dropout whose mask is one draw over the global batch.

    With `axis_name` (inside a data-parallel step) the keep-mask is drawn for
    `[b * num_devices, ...]` from the same key on every device and this device takes rows
    `[i b, (i + 1) b)`, so 1 and N devices drop the same units of the same examples.
    Draws from the 'dropout' RNG stream.
    """
    rate: float
    axis_name: Optional[str] = None

    @nn.compact
    def __call__(self, x, deterministic: bool):
        if deterministic or self.rate <= 0.0:
            return x
        keep = 1.0 - self.rate
        key = self.make_rng("dropout")
        if self.axis_name is None:
            mask = jax.random.bernoulli(key, keep, x.shape)
        else:
            n = jax.lax.axis_size(self.axis_name)
            b = x.shape[0]
            full = jax.random.bernoulli(key, keep, (b * n,) + x.shape[1:])
            mask = jax.lax.dynamic_slice_in_dim(full, jax.lax.axis_index(self.axis_name) * b,
                                                b, axis=0)
        return jnp.where(mask, x / keep, 0.0).astype(x.dtype)


class MLPDiscriminator(nn.Module):
    """Frame-level critic: `[B, T, D]` (or `[N, D]`) -> scores `[B, T]` (`[N]`).

    LSGAN targets: 1 for the target person's real frames, 0 for refined stage-1 frames.
    Dropout is active when `deterministic=False` (GeneFace trains it that way in both the
    generator and the discriminator update).
    """
    config: PostNetConfig
    axis_name: Optional[str] = None

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        c = self.config
        if x.ndim < 2 or x.shape[-1] != c.motion_dim:
            raise ShapeError(f"MLPDiscriminator: expected [..., {c.motion_dim}] frames, got "
                             f"shape {tuple(x.shape)}")
        h = x
        in_dim = c.motion_dim
        for i, (width, slope) in enumerate(zip(c.disc_hidden, c.disc_slopes)):
            h = nn.Dense(width, kernel_init=torch_default_kernel_init(),
                         bias_init=torch_default_bias_init(in_dim), name=f"backbone_{3 * i}")(h)
            h = nn.leaky_relu(h, slope)
            h = GlobalDropout(c.disc_dropout, self.axis_name)(h, deterministic)
            in_dim = width
        out = nn.Dense(1, use_bias=False, kernel_init=torch_default_kernel_init(),
                       name=f"backbone_{3 * len(c.disc_hidden)}")(h)
        return out[..., 0]


def init_postnet(config: PostNetConfig, rng, axis_name=None):
    """(generator, discriminator, variables) with variables =
    `{'generator': {'params', 'batch_stats'}, 'discriminator': {'params'}}`."""
    key = jax.random.PRNGKey(rng) if isinstance(rng, int) else rng
    k_g, k_d = jax.random.split(key)
    gen = CNNPostNet(config, axis_name=axis_name)
    disc = MLPDiscriminator(config, axis_name=axis_name)
    x = jnp.zeros((1, 4, config.motion_dim), jnp.float32)
    g_vars = jitted_init(gen)(k_g, x)         # one program each, not op by op
    d_vars = jitted_init(disc)(k_d, x)
    return gen, disc, {"generator": {"params": g_vars["params"],
                                     "batch_stats": g_vars["batch_stats"]},
                       "discriminator": {"params": d_vars["params"]}}


def num_params(tree):
    return int(sum(np.prod(np.shape(v)) for v in jax.tree.leaves(tree)))


# --------------------------------------------------------------------------- inference

@functools.lru_cache(maxsize=8)
def _refine_fn(config):
    gen = CNNPostNet(config)

    def run(variables, x, mask):
        return gen.apply(variables, x, mask, train=False)
    return jax.jit(run)


def refine_motion(config: PostNetConfig, variables, motion, *, bucket=256):
    """Refines one stage-1 sequence: normalised motion `[T, D]` -> `[T, D]` (inference:
    BatchNorm on its running statistics).

    `variables` are the generator's `{'params', 'batch_stats'}`. The sequence is padded
    and masked up to a multiple of `bucket` frames (one compilation per bucket); padding
    does not change the result (see the module doc).
    """
    m = np.asarray(motion, np.float32)
    if m.ndim != 2 or m.shape[1] != config.motion_dim:
        raise ShapeError(f"refine_motion: motion must be [T, {config.motion_dim}], got "
                         f"{m.shape}")
    if not len(m):
        raise ShapeError("refine_motion: empty sequence")
    t = len(m)
    padded = -(-t // bucket) * bucket
    x = np.zeros((1, padded, m.shape[1]), np.float32)
    x[0, :t] = m
    mask = np.zeros((1, padded, 1), np.float32)
    mask[0, :t] = 1.0
    out = _refine_fn(config)(variables, x, mask)
    return np.asarray(out[0, :t])
