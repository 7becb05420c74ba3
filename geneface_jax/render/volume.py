"""Volume rendering (emission-absorption compositing) of sampled rays.

Inputs for R rays with S samples each:

    sigma      [R, S]     densities, >= 0 (the caller applies ReLU/softplus), per metric unit
    rgb        [R, S, 3]  sample colours in [0, 1] (the caller applies the sigmoid)
    t          [R, S]     sorted sample positions (depth along -z, see `render.rays`)
    dir_norm   [R]        |direction| of each ray (None = 1): metric length = dt * dir_norm
    background [R, 3]/[3] colour behind the volume (None = black)

Quadrature (NeRF): sample i represents the interval `[t_i, t_{i+1})`,
`delta_i = (t_{i+1} - t_i) * dir_norm`; the last interval has length `last_delta`
(default 1e10, i.e. "to infinity", as in NeRF/AD-NeRF/GeneFace), so a non-zero density at
the last sample absorbs everything left. Then

    alpha_i = 1 - exp(-sigma_i delta_i)
    T_i     = exp(-sum_{j<i} sigma_j delta_j)          (exclusive transmittance)
    w_i     = alpha_i T_i
    rgb     = sum_i w_i c_i + (1 - acc) * background,  acc = sum_i w_i,  depth = sum_i w_i t_i

Transmittance is computed from the cumulative optical depth (not NeRF's cumprod of
`1 - alpha + 1e-10`), which is exact for piecewise-constant density and avoids the epsilon.
`depth` is the un-normalised expected depth (NeRF's `depth_map`): it tends to 0 where the
ray is empty; divide by `acc` for a normalised depth.
"""

from typing import Any

import flax.struct
import jax.numpy as jnp

from geneface_jax.errors import ShapeError

Array = Any

LAST_DELTA = 1e10


@flax.struct.dataclass
class VolumeOutput:
    """Composited ray outputs (a pytree).

    rgb [R, 3] (background included), depth [R] (expected t), acc [R] (opacity),
    weights [R, S], transmittance [R, S] (exclusive, T_i before sample i)."""
    rgb: Array
    depth: Array
    acc: Array
    weights: Array
    transmittance: Array


def composite(sigma, rgb, t, *, dir_norm=None, background=None,
              last_delta: float = LAST_DELTA) -> VolumeOutput:
    """Alpha-composite samples along rays (see the module doc for the formulas)."""
    sigma = jnp.asarray(sigma)
    rgb = jnp.asarray(rgb)
    t = jnp.asarray(t)
    if sigma.ndim != 2:
        raise ShapeError(f"composite: sigma must be [R, S], got shape {tuple(sigma.shape)}")
    r, s = sigma.shape
    if t.shape != (r, s):
        raise ShapeError(f"composite: t must be [R, S] = {(r, s)} like sigma, got {tuple(t.shape)}")
    if rgb.shape != (r, s, 3):
        raise ShapeError(f"composite: rgb must be [R, S, 3] = {(r, s, 3)}, got {tuple(rgb.shape)}")
    deltas = jnp.concatenate([t[:, 1:] - t[:, :-1],
                              jnp.full((r, 1), last_delta, t.dtype)], axis=-1)
    if dir_norm is not None:
        dir_norm = jnp.asarray(dir_norm, t.dtype)
        if dir_norm.shape not in ((r,), (r, 1)):
            raise ShapeError(f"composite: dir_norm must be [R] = ({r},) or [R, 1], "
                             f"got {tuple(dir_norm.shape)}")
        deltas = deltas * dir_norm.reshape(r, 1)
    tau = sigma * deltas                                              # optical depth per interval
    alpha = -jnp.expm1(-tau)
    cum = jnp.cumsum(tau, axis=-1)
    trans = jnp.exp(-jnp.concatenate([jnp.zeros((r, 1), cum.dtype), cum[:, :-1]], axis=-1))
    weights = alpha * trans
    acc = jnp.sum(weights, axis=-1)
    color = jnp.sum(weights[..., None] * rgb, axis=-2)
    depth = jnp.sum(weights * t, axis=-1)
    if background is not None:
        bg = jnp.asarray(background, color.dtype)
        if bg.shape not in ((3,), (r, 3)):
            raise ShapeError(f"composite: background must be [3] or [R, 3] = ({r}, 3), "
                             f"got {tuple(bg.shape)}")
        color = color + (1.0 - acc)[:, None] * bg
    return VolumeOutput(rgb=color, depth=depth, acc=acc, weights=weights, transmittance=trans)
