"""WaveNet building blocks of stage 1: weight-normed 1-D convs, the gated WaveNet stack and
a VITS-style posterior encoder.

Everything is channel-last: sequences are `[B, T, C]`, masks `[B, T, 1]` float (1 = valid
frame). Parameter names follow PyTorch so a `state_dict` maps onto them by renaming only
(see `geneface_jax.convert.vits`):

    WNConv1d (weight norm)   weight_v [K, C_in, C_out], weight_g [C_out], bias [C_out]
    WNConv1d (plain)         kernel   [K, C_in, C_out],                   bias [C_out]
    WaveNet                  in_layers_{i}, res_skip_layers_{i}, cond_layer
    PosteriorEncoder         conv_pre, wavenet, conv_proj

GeneFace's `WN` (modules/audio2motion/flow_base.py) and transformers' `VitsWaveNet` compute
the same function in eval mode; they differ only in where dropout sits (GeneFace drops the
dilated-conv output before the condition is added, VITS drops the gated activations) and
in the shape of the condition (GeneFace: a per-frame sequence `[B, C_g, T]`; VITS: a speaker
vector `[B, C_g, 1]`). `WaveNet` supports both: `dropout_before_gate=True` selects
GeneFace's dropout placement, and `g` may be `[B, T, C_g]` or `[B, 1, C_g]`.
"""

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import flax.linen as nn

from geneface_jax.errors import ShapeError
from geneface_jax.initializers import torch_default_bias_init, torch_default_kernel_init
from geneface_jax.motion.winograd import winograd_conv1d

Array = Any
Initializer = Callable[..., Array]


# --------------------------------------------------------------------------- shape checks

def check_sequence(x, channels: Optional[int], what: str):
    """Raise ShapeError unless `x` is `[B, T, channels]` (any channel count if None)."""
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) != 3:
        raise ShapeError(f"{what}: expected a [B, T, C] array, got shape {shape}")
    if channels is not None and shape[-1] != channels:
        raise ShapeError(f"{what}: expected {channels} channels (last axis), "
                         f"got shape {tuple(shape)}")


def check_mask(mask, x, what: str):
    """Return `mask` as x's dtype after checking it is `[B, T, 1]` for `x` `[B, T, C]`.

    `mask=None` means every frame is valid and returns ones `[B, T, 1]`.
    """
    if mask is None:
        return jnp.ones(x.shape[:2] + (1,), x.dtype)
    shape = getattr(mask, "shape", None)
    expected = (x.shape[0], x.shape[1], 1)
    if shape is None or tuple(shape) != expected:
        raise ShapeError(f"{what}: mask must be [B, T, 1] = {expected} for input {tuple(x.shape)}, "
                         f"got {None if shape is None else tuple(shape)}")
    return jnp.asarray(mask, x.dtype)


def check_condition(g, x, gin_channels: int, what: str):
    """Check a condition `g` `[B, T, C_g]` or `[B, 1, C_g]` against `x` `[B, T, C]`."""
    if gin_channels == 0:
        raise ShapeError(f"{what}: got a condition g of shape {getattr(g, 'shape', None)} "
                         "but the module was built with gin_channels=0")
    check_sequence(g, gin_channels, f"{what} condition g")
    if g.shape[0] != x.shape[0] or g.shape[1] not in (1, x.shape[1]):
        raise ShapeError(f"{what}: condition g must be [B, T, C_g] or [B, 1, C_g] with "
                         f"B={x.shape[0]}, T={x.shape[1]}, got {tuple(g.shape)}")


def weight_norm_kernel(weight_v, weight_g):
    """Effective kernel of PyTorch's weight_norm(dim=0) in Flax layout.

    weight_v: [K, C_in, C_out]; weight_g: [C_out]. Returns g * v / ||v|| `[K, C_in, C_out]`,
    the norm taken over (K, C_in) separately for every output channel.
    """
    norm = jnp.sqrt(jnp.sum(jnp.square(weight_v), axis=(0, 1), keepdims=True))
    return weight_v * (weight_g / norm)


CONV_ALGORITHMS = ("direct", "winograd", "auto")


def use_winograd(algorithm: str, kernel_size: int) -> bool:
    """Whether a WNConv1d with this `algorithm` and kernel size runs the Winograd conv."""
    if algorithm not in CONV_ALGORITHMS:
        raise ValueError(f"conv algorithm must be one of {CONV_ALGORITHMS}, got {algorithm!r}")
    if kernel_size == 1:
        return False
    return algorithm == "winograd" or (algorithm == "auto" and jax.default_backend() == "cpu")


def same_padding(kernel_size: int, dilation: int) -> int:
    """PyTorch-style symmetric padding `(K*d - d) // 2` (length-preserving for odd K)."""
    return (kernel_size * dilation - dilation) // 2


# --------------------------------------------------------------------------- modules

class WNConv1d(nn.Module):
    """1-D convolution `[B, T, C_in] -> [B, T', features]` with optional weight norm.

    With `use_weight_norm` (default) the params are `weight_v` `[K, C_in, C_out]`,
    `weight_g` `[C_out]` and `bias`, and the kernel is g * v / ||v|| (PyTorch weight_norm,
    dim=0). g is initialised to ||v||, so at init the kernel equals v. Without weight norm
    the params are `kernel` and `bias`. `padding=None` pads `(K*d - d) // 2` frames on both
    sides like the PyTorch modules of GeneFace/VITS; T' = (T + 2p - d(K-1) - 1) // stride + 1.

    `algorithm` chooses how a K > 1 tap conv is computed (the parameters and the function
    are the same): 'direct' (`lax.conv_general_dilated`), 'winograd' (F(4, K) Winograd,
    `geneface_jax.motion.winograd`: 0.4x the multiply-adds for K = 5, ~2x faster on CPU,
    more float32 round-off (tested within 2e-5 of the output scale); stride 1, dilation 1
    and 'same' padding only) or 'auto' (winograd on the CPU backend, direct elsewhere, where
    it has not been measured). 1x1 convs are always direct.
    """

    features: int
    kernel_size: int = 1
    stride: int = 1
    dilation: int = 1
    padding: Optional[int] = None
    use_weight_norm: bool = True
    use_bias: bool = True
    kernel_init: Optional[Initializer] = None
    bias_init: Optional[Initializer] = None
    precision: Any = None
    algorithm: str = "direct"

    @nn.compact
    def __call__(self, x):
        """x: [B, T, C_in] -> [B, T', features]."""
        check_sequence(x, None, f"WNConv1d '{self.name}'")
        in_ch = x.shape[-1]
        shape = (self.kernel_size, in_ch, self.features)
        pname = "weight_v" if self.use_weight_norm else "kernel"
        if self.has_variable("params", pname):
            stored = self.get_variable("params", pname).shape
            if tuple(stored) != shape:
                raise ShapeError(f"WNConv1d '{self.name}': input has {in_ch} channels but its "
                                 f"{pname} is {tuple(stored)} "
                                 f"(expected [K, C_in, C_out] = {shape})")
        pad = self.padding
        if pad is None:
            pad = same_padding(self.kernel_size, self.dilation)
        span = self.dilation * (self.kernel_size - 1) + 1
        if x.shape[1] + 2 * pad < span:
            raise ShapeError(f"WNConv1d '{self.name}': sequence of {x.shape[1]} frames "
                             f"(+2*{pad} padding) is shorter than the kernel span {span}")

        kinit = self.kernel_init or torch_default_kernel_init()
        if self.use_weight_norm:
            v = self.param("weight_v", kinit, shape, jnp.float32)
            g = self.param("weight_g", lambda _key: jnp.sqrt(jnp.sum(jnp.square(v), axis=(0, 1))))
            kernel = weight_norm_kernel(v, g)
        else:
            kernel = self.param("kernel", kinit, shape, jnp.float32)

        if use_winograd(self.algorithm, self.kernel_size):
            if self.stride != 1 or self.dilation != 1 or pad != (self.kernel_size - 1) // 2:
                raise ValueError(f"WNConv1d '{self.name}': algorithm={self.algorithm!r} needs "
                                 f"stride 1, dilation 1 and 'same' padding, got stride "
                                 f"{self.stride}, dilation {self.dilation}, padding {pad}")
            y = winograd_conv1d(x, kernel, precision=self.precision)
        else:
            y = jax.lax.conv_general_dilated(
                x, kernel.astype(x.dtype),
                window_strides=(self.stride,),
                padding=[(pad, pad)],
                rhs_dilation=(self.dilation,),
                dimension_numbers=("NWC", "WIO", "NWC"),
                precision=self.precision)
        if self.use_bias:
            binit = self.bias_init or torch_default_bias_init(self.kernel_size * in_ch)
            bias = self.param("bias", binit, (self.features,), jnp.float32)
            y = y + bias.astype(y.dtype)
        return y


class WaveNet(nn.Module):
    """Non-causal gated WaveNet stack of GeneFace (`WN`) / VITS (`VitsWaveNet`).

    Layer i: h = in_layers_i(x) (K-tap conv, dilation `dilation_rate**i`, H -> 2H) plus
    slice i of `cond_layer(g)` (1x1 conv C_g -> 2H*L); acts = tanh(h[:H]) * sigmoid(h[H:]);
    res_skip_layers_i (1x1, H -> 2H, the last H -> H) splits into a residual added to x
    (then masked) and a skip summed into the output. Returns skip_sum * mask `[B, T, H]`.

    All convs are weight-normed. When `gin_channels > 0` the `cond_layer` params are
    created at init even if no condition is passed.
    """

    hidden: int
    kernel_size: int
    dilation_rate: int
    num_layers: int
    gin_channels: int = 0
    dropout: float = 0.0
    dropout_before_gate: bool = False  # True: GeneFace's placement; False: VITS'
    precision: Any = None
    conv_algorithm: str = "direct"     # of the K-tap in_layers (see WNConv1d.algorithm)

    @nn.compact
    def __call__(self, x, mask, g=None, deterministic: bool = True):
        """x: [B, T, H]; mask: [B, T, 1] or None; g: [B, T, C_g] / [B, 1, C_g] or None.

        Returns [B, T, H]. Dropout (when `dropout > 0` and not `deterministic`) draws from
        the 'dropout' RNG stream.
        """
        what = f"WaveNet '{self.name}'"
        if self.kernel_size % 2 == 0:
            raise ShapeError(f"{what}: kernel_size must be odd to keep the length, "
                             f"got {self.kernel_size}")
        check_sequence(x, self.hidden, what)
        mask = check_mask(mask, x, what)
        hid, layers = self.hidden, self.num_layers

        cond = None
        if self.gin_channels > 0:
            cond_layer = WNConv1d(2 * hid * layers, 1, precision=self.precision, name="cond_layer")
            if g is not None:
                check_condition(g, x, self.gin_channels, what)
                cond = cond_layer(g)
            elif self.is_initializing():
                cond_layer(jnp.zeros((1, 1, self.gin_channels), x.dtype))
        elif g is not None:
            check_condition(g, x, self.gin_channels, what)

        def drop(a):
            if self.dropout > 0.0:
                return nn.Dropout(self.dropout)(a, deterministic=deterministic)
            return a

        output = jnp.zeros_like(x)
        for i in range(layers):
            h = WNConv1d(2 * hid, self.kernel_size, dilation=self.dilation_rate ** i,
                         precision=self.precision, algorithm=self.conv_algorithm,
                         name=f"in_layers_{i}")(x)
            if self.dropout_before_gate:
                h = drop(h)
            if cond is not None:
                h = h + cond[..., 2 * hid * i: 2 * hid * (i + 1)]
            acts = jnp.tanh(h[..., :hid]) * jax.nn.sigmoid(h[..., hid:])
            if not self.dropout_before_gate:
                acts = drop(acts)
            last = i == layers - 1
            res_skip = WNConv1d(hid if last else 2 * hid, 1, precision=self.precision,
                                name=f"res_skip_layers_{i}")(acts)
            if last:
                output = output + res_skip
            else:
                x = (x + res_skip[..., :hid]) * mask
                output = output + res_skip[..., hid:]
        return output * mask


class PosteriorEncoder(nn.Module):
    """VITS posterior encoder: conv_pre (1x1) -> WaveNet -> conv_proj (1x1) -> (mean, log_std).

    Matches transformers' `VitsPosteriorEncoder`: z = (mean + eps * exp(log_std)) * mask with
    eps ~ N(0, I). (GeneFace's FVAE encoder differs: a strided pre-net and an unmasked z.)
    """

    in_channels: int
    out_channels: int
    hidden: int
    kernel_size: int
    dilation_rate: int
    num_layers: int
    gin_channels: int = 0
    dropout: float = 0.0
    precision: Any = None

    @nn.compact
    def __call__(self, x, mask, g=None, noise=None, deterministic: bool = True):
        """x: [B, T, C_in]; mask: [B, T, 1]; g: as WaveNet; noise: [B, T, C_out] or None.

        Returns (z, mean, log_std), each [B, T, C_out]. Without `noise`, eps is drawn from
        the 'sample' RNG stream.
        """
        what = f"PosteriorEncoder '{self.name}'"
        check_sequence(x, self.in_channels, what)
        mask = check_mask(mask, x, what)
        h = WNConv1d(self.hidden, 1, use_weight_norm=False, precision=self.precision,
                     name="conv_pre")(x) * mask
        h = WaveNet(self.hidden, self.kernel_size, self.dilation_rate, self.num_layers,
                    self.gin_channels, self.dropout, precision=self.precision,
                    name="wavenet")(h, mask, g, deterministic)
        stats = WNConv1d(2 * self.out_channels, 1, use_weight_norm=False, precision=self.precision,
                         name="conv_proj")(h) * mask
        mean, log_std = stats[..., :self.out_channels], stats[..., self.out_channels:]
        if noise is None:
            noise = jax.random.normal(self.make_rng("sample"), mean.shape, mean.dtype)
        elif tuple(noise.shape) != tuple(mean.shape):
            raise ShapeError(f"{what}: noise must be {tuple(mean.shape)}, got {tuple(noise.shape)}")
        z = (mean + noise * jnp.exp(log_std)) * mask
        return z, mean, log_std
