"""Frequency (sinusoidal) positional encoding of NeRF / AD-NeRF / GeneFace.

For an input `x` `[..., D]` and `L = num_freqs` bands with frequencies `2^0 .. 2^(L-1)`
(log-spaced, no factor of pi), the encoding is the concatenation along the last axis of

    [x, sin(2^0 x), cos(2^0 x), sin(2^1 x), cos(2^1 x), ..., sin(2^(L-1) x), cos(2^(L-1) x)]

where every block is `[..., D]` (one band applied to all D coordinates). Output dim is
`D * (1 + 2L)` (`D * 2L` without the input). This is exactly the layout of AD-NeRF's and
GeneFace's `Embedder` (include_input=True, log_sampling=True, periodic_fns=(sin, cos)), so
first-layer weights of a converted PyTorch checkpoint line up column for column.
GeneFace's head NeRF uses L = 10 for positions and L = 4 for view directions.
"""

from typing import Any

import jax.numpy as jnp

from geneface_jax.errors import ShapeError

Array = Any


def encoding_dim(in_dim: int, num_freqs: int, include_input: bool = True) -> int:
    """Output size of `positional_encoding` for `in_dim` coordinates: D * (1 + 2L)."""
    return int(in_dim) * ((1 if include_input else 0) + 2 * int(num_freqs))


def positional_encoding(x, num_freqs: int, include_input: bool = True) -> Array:
    """Encode `x` `[..., D]` into `[..., encoding_dim(D, num_freqs, include_input)]`.

    Ordering: input first, then for each band k = 0..L-1: sin(2^k x) then cos(2^k x)
    (see the module doc). Frequencies are exact powers of two.
    """
    x = jnp.asarray(x)
    if x.ndim < 1:
        raise ShapeError("positional_encoding: expected an input [..., D], got a scalar")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    num_freqs = int(num_freqs)
    if num_freqs < 0:
        raise ValueError(f"positional_encoding: num_freqs must be >= 0, got {num_freqs}")
    freqs = (2.0 ** jnp.arange(num_freqs)).astype(x.dtype)                # [L]
    scaled = x[..., None, :] * freqs[:, None]                              # [..., L, D]
    bands = jnp.stack([jnp.sin(scaled), jnp.cos(scaled)], axis=-2)         # [..., L, 2, D]
    bands = bands.reshape(x.shape[:-1] + (2 * num_freqs * x.shape[-1],))
    if include_input:
        return jnp.concatenate([x, bands], axis=-1)
    return bands
