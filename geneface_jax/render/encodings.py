"""Frequency (sinusoidal) positional encoding of NeRF / AD-NeRF / GeneFace.

For an input `x` `[..., D]` and `L = num_freqs` bands with frequencies `2^0 .. 2^(L-1)`
(log-spaced, no factor of pi), the encoding is the concatenation along the last axis of

    [x, sin(2^0 x), cos(2^0 x), sin(2^1 x), cos(2^1 x), ..., sin(2^(L-1) x), cos(2^(L-1) x)]

where every block is `[..., D]` (one band applied to all D coordinates). Output dim is
`D * (1 + 2L)` (`D * 2L` without the input). This is exactly the layout of AD-NeRF's and
GeneFace's `Embedder` (include_input=True, log_sampling=True, periodic_fns=(sin, cos)), so
first-layer weights of a converted PyTorch checkpoint line up column for column.
GeneFace's head NeRF uses L = 10 for positions and L = 4 for view directions.

`positional_encoding_features` is the same encoding feature-major (coordinates on the
first axis, `[D, ...] -> [D (1 + 2L), ...]`), for the NeRF MLP's first layers: its sines
and cosines come from `sincos`, a range reduction and polynomial in element-wise ops that
XLA:CPU vectorises along the trailing (sample) axis, where `jnp.sin` / `jnp.cos` run
value by value (in the small-config head-NeRF step of `python -m experiments.bench.nerf`
the encoding fusion went from 50 to 5 ms; README "Benchmark").
"""

from typing import Any, Tuple

import jax.numpy as jnp
import numpy as np

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


def _split_pio2():
    """pi / 2 as three float32 parts, the first two of at most 12 significant bits (the
    last one rounded): for |k| < 2^12, k * part is exact in float32 (Cody and Waite)."""
    rest, parts = np.pi / 2, []
    for _ in range(2):
        m, e = np.frexp(rest)
        part = np.ldexp(np.floor(np.ldexp(m, 12)), e - 12)
        parts.append(np.float32(part))
        rest -= part
    parts.append(np.float32(rest))
    return tuple(parts)


_PIO2 = _split_pio2()
_TWO_OVER_PI = np.float32(2.0 / np.pi)
# Taylor coefficients on |r| <= pi/4; truncation error below 2e-9 (sin, up to r^9) and
# 2e-10 (cos, up to r^10), under float32 rounding
_SIN = tuple(np.float32((-1.0) ** i / np.prod(np.arange(1.0, 2 * i + 2))) for i in range(1, 5))
_COS = tuple(np.float32((-1.0) ** i / np.prod(np.arange(1.0, 2 * i + 1))) for i in range(1, 6))
SINCOS_MAX_ARG = 6433.0      # below (2^12 - 1/2) pi / 2: the reduction is exact


def sincos(y) -> Tuple[Array, Array]:
    """`(sin y, cos y)` of a float32 array, in element-wise arithmetic only.

    y = k pi/2 + r with k = round(2 y / pi), |r| <= pi/4 (three-part Cody-Waite
    reduction, exact for |y| < `SINCOS_MAX_ARG`); sin r and cos r from their Taylor
    polynomials; the quadrant k mod 4 picks and signs them. Absolute error <= 2e-7 of
    float64 for |y| < SINCOS_MAX_ARG (tests); beyond it the error grows with |y|.
    """
    y = jnp.asarray(y, jnp.float32)
    k = jnp.round(y * _TWO_OVER_PI)
    r = ((y - k * _PIO2[0]) - k * _PIO2[1]) - k * _PIO2[2]
    z = r * r
    s = r + r * z * (_SIN[0] + z * (_SIN[1] + z * (_SIN[2] + z * _SIN[3])))
    c = 1.0 + z * (_COS[0] + z * (_COS[1] + z * (_COS[2] + z * (_COS[3] + z * _COS[4]))))
    q = k - 4.0 * jnp.floor(0.25 * k)                 # k mod 4, as a float in {0, 1, 2, 3}
    swap = (q == 1.0) | (q == 3.0)
    sin = jnp.where(swap, c, s)
    cos = jnp.where(swap, s, c)
    return (jnp.where(q >= 2.0, -sin, sin),
            jnp.where((q == 1.0) | (q == 2.0), -cos, cos))


def positional_encoding_features(xt, num_freqs: int, include_input: bool = True) -> Array:
    """Feature-major `positional_encoding`: points `xt` `[D, ...]` (coordinates first) ->
    `[encoding_dim(D, L), ...]`, where `out[:, i] = positional_encoding(xt[:, i])`.

    Same row order as `positional_encoding`'s columns (input, then sin and cos of each
    band); the sines and cosines come from `sincos` (within 2e-7 of `jnp.sin` /
    `jnp.cos` for |2^(L-1) x| < SINCOS_MAX_ARG). Put the long (sample) axis last: XLA
    vectorises along it.
    """
    xt = jnp.asarray(xt)
    if xt.ndim < 1:
        raise ShapeError("positional_encoding_features: expected points [D, ...], got a "
                         "scalar")
    xt = xt.astype(jnp.float32)
    num_freqs = int(num_freqs)
    if num_freqs < 0:
        raise ValueError(f"positional_encoding_features: num_freqs must be >= 0, got "
                         f"{num_freqs}")
    freqs = np.float32(2.0) ** np.arange(num_freqs, dtype=np.float32)
    scaled = freqs.reshape((num_freqs,) + (1,) * xt.ndim) * xt[None]         # [L, D, ...]
    sin, cos = sincos(scaled)
    bands = jnp.stack([sin, cos], axis=1)                                     # [L, 2, D, ...]
    bands = bands.reshape((2 * num_freqs * xt.shape[0],) + xt.shape[1:])
    if include_input:
        return jnp.concatenate([xt, bands], axis=0)
    return bands
