"""Batch normalisation over the valid frames of masked sequences, exact under data parallelism.

Flax's `nn.BatchNorm(axis_name=...)` averages per-device means, which equals the global
statistic only when every device holds the same number of valid frames. `MaskedBatchNorm`
sums values and counts with `psum` instead, so its statistics are those of the valid frames
of the global batch on any number of devices. Variables use Flax's names (`params`:
`scale`, `bias`; `batch_stats`: `mean`, `var`) and PyTorch's semantics (running variance
updated with the unbiased estimate, `momentum` = 1 - PyTorch's momentum).
"""

from typing import Optional

import jax
import jax.numpy as jnp
import flax.linen as nn


class MaskedBatchNorm(nn.Module):
    """BatchNorm over the last axis of `x` `[..., C]`, statistics over valid positions."""
    momentum: float = 0.9
    epsilon: float = 1e-5
    axis_name: Optional[str] = None

    @nn.compact
    def __call__(self, x, mask=None, train: bool = False):
        """x: [..., C]; mask: broadcastable to x[..., :1] (1 = valid) or None.

        In training, normalises with the batch statistics of the valid positions (summed
        over `axis_name` when given) and updates the running statistics; otherwise uses the
        running statistics.
        """
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        if train and not self.is_initializing():
            m = jnp.ones(x.shape[:-1] + (1,), x.dtype) if mask is None else \
                jnp.broadcast_to(mask, x.shape[:-1] + (1,)).astype(x.dtype)
            axes = tuple(range(x.ndim - 1))
            total = jnp.sum(x * m, axes)
            count = jnp.sum(m)
            if self.axis_name is not None:
                total, count = jax.lax.psum((total, count), self.axis_name)
            count = jnp.maximum(count, 1.0)
            mean = total / count
            sq = jnp.sum(jnp.square(x - mean) * m, axes)
            if self.axis_name is not None:
                sq = jax.lax.psum(sq, self.axis_name)
            var = sq / count
            unbiased = sq / jnp.maximum(count - 1.0, 1.0)
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * unbiased
        else:
            mean, var = ra_mean.value, ra_var.value
        return (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
