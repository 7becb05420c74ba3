"""Sample positions along rays: stratified (coarse) and hierarchical inverse-CDF (fine).

All positions are ray parameters `t` (depths along the camera's -z axis with the
un-normalised directions of `geneface_jax.render.rays`), float32, sorted increasingly.

- `stratified_samples`: `[near, far]` is cut into S equal bins; bin i is
  `[near + i h, near + (i+1) h)`, `h = (far - near) / S`. With a key, each sample is
  uniform in its bin (training jitter); without one, it is the bin midpoint. (NeRF's own
  deterministic samples are `linspace(near, far, S)`, endpoints included; midpoints make
  "every sample lies in its bin" hold in both modes.) GeneFace (`render_rays` in
  modules/nerfs/commons/volume_rendering.py) jitters `linspace(near, far, S)` between the
  midpoints of its neighbours, pins the last sample to `far`, and keeps the jitter (and
  random fine samples) at inference too; here evaluation is deterministic.
- `sample_pdf`: NeRF's `sample_pdf` — piecewise-constant pdf over given bin edges from
  weights + 1e-5, inverse CDF at `u` (uniform random with a key; `linspace(0, 1, N)`
  without one).
- `hierarchical_samples`: NeRF's fine pass — bins are the midpoints between coarse samples,
  the pdf comes from the interior coarse weights (`weights[:, 1:-1]`), gradients are
  stopped, and the result is the sorted union of coarse and fine samples.
"""

from typing import Any, Optional

import jax
import jax.numpy as jnp

from geneface_jax.errors import ShapeError

Array = Any

PDF_PADDING = 1e-5


def _bounds(near, far, num_rays: Optional[int]):
    near = jnp.asarray(near, jnp.float32)
    far = jnp.asarray(far, jnp.float32)
    for name, b in (("near", near), ("far", far)):
        if b.ndim > 1 or (b.ndim == 1 and b.shape[0] == 0):
            raise ShapeError(f"stratified_samples: {name} must be a scalar or [R], "
                             f"got shape {tuple(b.shape)}")
    sizes = {b.shape[0] for b in (near, far) if b.ndim == 1}
    if num_rays is not None:
        sizes.add(int(num_rays))
    if len(sizes) > 1:
        raise ShapeError(f"stratified_samples: near {tuple(near.shape)}, far {tuple(far.shape)} "
                         f"and num_rays={num_rays} disagree on the ray count")
    if not sizes:
        raise ShapeError("stratified_samples: near and far are scalars; pass num_rays")
    r = sizes.pop()
    return jnp.broadcast_to(near, (r,)), jnp.broadcast_to(far, (r,))


def _explicit_uniform(u, r, n, what):
    u = jnp.asarray(u, jnp.float32)
    if u.shape != (r, n):
        raise ShapeError(f"{what}: explicit uniforms u must be [R, S] = [{r}, {n}], got "
                         f"{tuple(u.shape)}")
    return u


def stratified_samples(near, far, num_samples: int, *, key=None,
                       num_rays: Optional[int] = None, u=None) -> Array:
    """Stratified sample positions `[R, num_samples]` between `near` and `far`.

    Args:
      near, far: scalars or `[R]` (`num_rays` is required if both are scalars).
      num_samples: S, samples per ray (static).
      key: PRNG key for training jitter (uniform within each bin); None = bin midpoints.
      num_rays: R when it cannot be read from `near`/`far`.
      u: explicit jitter `[R, num_samples]` in [0, 1) instead of drawing it from `key`
        (a data-parallel step draws it over the global batch so that the result does not
        depend on the device count).
    """
    num_samples = int(num_samples)
    if num_samples <= 0:
        raise ShapeError(f"stratified_samples: num_samples must be positive, got {num_samples}")
    near, far = _bounds(near, far, num_rays)
    r = near.shape[0]
    if u is not None:
        offsets = _explicit_uniform(u, r, num_samples, "stratified_samples")
    elif key is None:
        offsets = jnp.full((r, num_samples), 0.5, jnp.float32)
    else:
        offsets = jax.random.uniform(key, (r, num_samples), jnp.float32)
    frac = (jnp.arange(num_samples, dtype=jnp.float32) + offsets) / num_samples
    return near[:, None] + (far - near)[:, None] * frac


def sample_pdf(bins, weights, num_samples: int, *, key=None, u=None) -> Array:
    """Inverse-CDF samples `[R, num_samples]` from piecewise-constant pdfs.

    Args:
      bins: bin edges `[R, B + 1]`, increasing.
      weights: non-negative bin weights `[R, B]` (padded by 1e-5 before normalising, so
        all-zero weights give a uniform pdf).
      num_samples: N (static).
      key: PRNG key for `u ~ U[0, 1)`; None = deterministic `u = linspace(0, 1, N)`.
      u: explicit `[R, N]` uniforms (overrides `key`).

    Returns unsorted samples for random `u`, increasing ones for deterministic `u`. Not
    differentiable through bins/weights by intent: callers stop gradients.
    """
    bins = jnp.asarray(bins, jnp.float32)
    weights = jnp.asarray(weights, jnp.float32)
    if (bins.ndim != 2 or weights.ndim != 2
            or bins.shape != (weights.shape[0], weights.shape[1] + 1)):
        raise ShapeError(f"sample_pdf: expected bins [R, B+1] and weights [R, B], got "
                         f"{tuple(bins.shape)} and {tuple(weights.shape)}")
    num_samples = int(num_samples)
    r = weights.shape[0]
    w = weights + PDF_PADDING
    pdf = w / jnp.sum(w, axis=-1, keepdims=True)
    cdf = jnp.concatenate([jnp.zeros((r, 1), jnp.float32), jnp.cumsum(pdf, axis=-1)], axis=-1)
    if u is not None:
        u = _explicit_uniform(u, r, num_samples, "sample_pdf")
    elif key is None:
        u = jnp.broadcast_to(jnp.linspace(0.0, 1.0, num_samples, dtype=jnp.float32),
                             (r, num_samples))
    else:
        u = jax.random.uniform(key, (r, num_samples), jnp.float32)
    # index of the first cdf entry > u (searchsorted 'right'), in [0, B + 1]
    above = jnp.sum(cdf[:, None, :] <= u[:, :, None], axis=-1)
    below = jnp.maximum(above - 1, 0)
    above = jnp.minimum(above, weights.shape[1])
    cdf_lo = jnp.take_along_axis(cdf, below, axis=-1)
    cdf_hi = jnp.take_along_axis(cdf, above, axis=-1)
    bin_lo = jnp.take_along_axis(bins, below, axis=-1)
    bin_hi = jnp.take_along_axis(bins, above, axis=-1)
    denom = cdf_hi - cdf_lo
    denom = jnp.where(denom < PDF_PADDING, 1.0, denom)
    frac = (u - cdf_lo) / denom
    return bin_lo + frac * (bin_hi - bin_lo)


def hierarchical_samples(t_coarse, weights, num_fine: int, *, key=None, u=None) -> Array:
    """NeRF's fine sampling: sorted union `[R, S + num_fine]` of coarse and fine positions.

    Args:
      t_coarse: coarse sample positions `[R, S]`, sorted, S >= 3.
      weights: coarse compositing weights `[R, S]` (from `volume.composite`).
      num_fine: fine samples per ray (static).
      key: PRNG key (training); None = deterministic (evaluation).
      u: explicit `[R, num_fine]` uniforms (overrides `key`).

    The fine pdf lives on the bins between midpoints of consecutive coarse samples and uses
    the interior weights `weights[:, 1:-1]`; gradients do not flow into the samples.
    """
    t_coarse = jnp.asarray(t_coarse, jnp.float32)
    weights = jnp.asarray(weights, jnp.float32)
    if t_coarse.ndim != 2 or t_coarse.shape != weights.shape or t_coarse.shape[1] < 3:
        raise ShapeError(f"hierarchical_samples: expected t_coarse and weights of the same "
                         f"shape [R, S] with S >= 3, got {tuple(t_coarse.shape)} and "
                         f"{tuple(weights.shape)}")
    mids = 0.5 * (t_coarse[:, 1:] + t_coarse[:, :-1])                      # [R, S-1]
    fine = sample_pdf(jax.lax.stop_gradient(mids), jax.lax.stop_gradient(weights[:, 1:-1]),
                      num_fine, key=key, u=u)
    fine = jax.lax.stop_gradient(fine)
    return jnp.sort(jnp.concatenate([t_coarse, fine], axis=-1), axis=-1)
