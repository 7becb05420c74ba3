"""Residual-coupling normalizing flow of the stage-1 prior (GeneFace / VITS).

Channel-last throughout: x `[B, T, C]`, mask `[B, T, 1]`, condition g `[B, T, C_g]` or
`[B, 1, C_g]`. Parameter tree (names follow GeneFace's `ResidualCouplingLayer`):

    ResidualCouplingLayer   pre (plain 1x1 conv), enc (WaveNet), post (plain 1x1 conv)
    ResidualCouplingBlock   flows_{i} for i < num_flows (channel flips have no params)

GeneFace keeps layers and flips in one list (layers at `flows.0, .2, .4, ...`), VITS keeps
only the layers (`flows.0, .1, ...`) and flips inline; both apply layer-then-flip forward
and flip-then-inverse-layer in reverse, which is what `ResidualCouplingBlock` does.
`geneface_jax.convert.vits.coupling_block_from_torch` handles both key layouts.
"""

from typing import Any

import jax.numpy as jnp
import flax.linen as nn

from geneface_jax.errors import ShapeError
from geneface_jax.motion.wavenet import WaveNet, WNConv1d, check_mask, check_sequence


def flip_channels(x):
    """Reverse the channel (last) axis: [B, T, C] -> [B, T, C]."""
    return x[..., ::-1]


class Flip(nn.Module):
    """Channel flip as a flow step; volume preserving, its own inverse."""

    @nn.compact
    def __call__(self, x, mask=None, g=None, reverse: bool = False, deterministic: bool = True):
        """x: [B, T, C] -> (x flipped on C [B, T, C], logdet zeros [B])."""
        check_sequence(x, None, "Flip")
        return flip_channels(x), jnp.zeros((x.shape[0],), x.dtype)


class ResidualCouplingLayer(nn.Module):
    """Affine coupling: x1 <- m(x0) + x1 * exp(logs(x0)), x0 unchanged.

    h = enc(pre(x0) * mask, mask, g); stats = post(h) * mask holds m (and logs unless
    `mean_only`, in which case logs = 0 and the layer is volume preserving). `post` starts
    at zero (weights and bias), so a fresh layer is the identity on masked inputs.
    """

    channels: int
    hidden: int
    kernel_size: int
    dilation_rate: int
    num_layers: int
    gin_channels: int = 0
    mean_only: bool = True
    dropout: float = 0.0
    dropout_before_gate: bool = False
    precision: Any = None

    @nn.compact
    def __call__(self, x, mask, g=None, reverse: bool = False, deterministic: bool = True):
        """x: [B, T, channels]; mask: [B, T, 1]; g: [B, T|1, gin_channels] or None.

        Returns (y [B, T, channels], logdet [B]); logdet = sum(logs * mask) forward and its
        negative in reverse (zeros when `mean_only`).
        """
        what = f"ResidualCouplingLayer '{self.name}'"
        if self.channels % 2:
            raise ShapeError(f"{what}: channels must be even, got {self.channels}")
        check_sequence(x, self.channels, what)
        mask = check_mask(mask, x, what)
        half = self.channels // 2
        x0, x1 = x[..., :half], x[..., half:]

        h = WNConv1d(self.hidden, 1, use_weight_norm=False, precision=self.precision,
                     name="pre")(x0) * mask
        h = WaveNet(self.hidden, self.kernel_size, self.dilation_rate, self.num_layers,
                    self.gin_channels, self.dropout, self.dropout_before_gate,
                    precision=self.precision, name="enc")(h, mask, g, deterministic)
        stats_ch = half * (1 if self.mean_only else 2)
        stats = WNConv1d(stats_ch, 1, use_weight_norm=False, kernel_init=nn.initializers.zeros,
                         bias_init=nn.initializers.zeros, precision=self.precision,
                         name="post")(h) * mask
        if self.mean_only:
            m, logs = stats, jnp.zeros_like(stats)
        else:
            m, logs = stats[..., :half], stats[..., half:]

        if not reverse:
            x1 = m + x1 * jnp.exp(logs) * mask
            logdet = jnp.sum(logs * mask, axis=(1, 2))
        else:
            x1 = (x1 - m) * jnp.exp(-logs) * mask
            logdet = -jnp.sum(logs * mask, axis=(1, 2))
        return jnp.concatenate([x0, x1], axis=-1), logdet


class ResidualCouplingBlock(nn.Module):
    """`num_flows` mean-only coupling layers, each followed by a channel flip.

    Forward: for i in 0..n-1: x = flip(layer_i(x)). Reverse: for i in n-1..0:
    x = layer_i^{-1}(flip(x)). Volume preserving, so no log-determinant is returned.
    """

    channels: int
    hidden: int
    kernel_size: int
    dilation_rate: int
    num_layers: int
    num_flows: int = 4
    gin_channels: int = 0
    dropout: float = 0.0
    dropout_before_gate: bool = False
    precision: Any = None

    @nn.compact
    def __call__(self, x, mask, g=None, reverse: bool = False, deterministic: bool = True):
        """x: [B, T, channels]; mask: [B, T, 1]; g: [B, T|1, gin_channels] or None.

        Returns [B, T, channels].
        """
        what = f"ResidualCouplingBlock '{self.name}'"
        check_sequence(x, self.channels, what)
        mask = check_mask(mask, x, what)
        layers = [ResidualCouplingLayer(self.channels, self.hidden, self.kernel_size,
                                        self.dilation_rate, self.num_layers, self.gin_channels,
                                        mean_only=True, dropout=self.dropout,
                                        dropout_before_gate=self.dropout_before_gate,
                                        precision=self.precision, name=f"flows_{i}")
                  for i in range(self.num_flows)]
        if not reverse:
            for layer in layers:
                x, _ = layer(x, mask, g, reverse=False, deterministic=deterministic)
                x = flip_channels(x)
        else:
            for layer in reversed(layers):
                x = flip_channels(x)
                x, _ = layer(x, mask, g, reverse=True, deterministic=deterministic)
        return x
