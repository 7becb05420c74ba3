"""Multi-resolution grid encoding (Instant-NGP / RAD-NeRF style) and spherical harmonics.

A `GridSpec` describes L levels of a d-dimensional grid (d = 2 or 3) with F features per
vertex. Level l has `N_l = floor(base * b^l)` vertices per side, with the growth factor
`b = exp((ln finest - ln base) / (L - 1))` so the last level has `finest` vertices per
side. Level l's table holds `min(N_l^d, 2^T)` rows (rounded up to a multiple of 8): a
level whose vertices fit is stored densely (vertex `v` at row `sum_i v_i N_l^i`), a
finer one is hashed (Instant-NGP's spatial hash: `xor_i (v_i * pi_i) mod size`, primes
pi = (1, 2654435761, 805459861), computed in wrapping uint32 arithmetic), so hash
collisions share rows. All levels live in one parameter table `[sum of rows, F]` at
`GridSpec.offsets`.

Encoding a point `x` in `[0, 1]^d` (callers map their box onto the unit cube): on level
l the point sits at `p = x (N_l - 1)`, its cell's lower vertex is `v0 = clip(floor(p), 0,
N_l - 2)` and `w = p - v0`; the level's feature is the d-linear interpolation
`sum_{c in {0,1}^d} prod_i (c_i w_i + (1 - c_i)(1 - w_i)) table[row(v0 + c)]`; the output
concatenates the levels, `[..., L F]` (level-major). Points outside the unit cube are
clipped onto it. A grid holding a linear function of the vertex positions therefore
reproduces it exactly inside every cell, and the gradient with respect to `x` flows
through the weights (the ambient path of the head needs it).

Layouts (`GridSpec.layout`). Everything above is the `native` layout. `ngp_tiled` and
`ngp_hash` compute torch-ngp's GridEncoder (GeneFace's `tiledgrid` / `hashgrid` with
align_corners off, linear interpolation), so a GeneFace table imports as is: per-level
scale `p = 2^(log2(finest / base) / (L - 1))`; level l reads at `s_l = base 2^(l log2 p)
- 1` (float32), `N_l = ceil(s_l) + 1`; a point sits at `x s_l + 1/2`, its lower vertex is
`floor` of that (no clipping); the table has `min((ceil(base p^l) + 1)^d, 2^T)` rows
(rounded up to 8); a vertex's row is the dense index with strides `(N_l + 1)^i`, summed
over the axes while the stride is at most the table size (so very fine tiled levels drop
their last axes), or, for `ngp_hash` where the full dense index would not fit, the spatial
hash above; either taken modulo the table size. A point outside `[0, 1]^d` gets zero
features (every level). The features are level-major as above.

Two forms of the native layout, the same numbers: evaluated on its own (rendering, the
occupancy update) the rows and weights of all levels are built at once from `[N, L]`
per-axis positions; differentiated (training) the per-level form is used, whose autodiff
is faster on XLA:CPU (a `jax.custom_jvp` switches; docs/stage3_nerf.md, "Rendering
speed"). Backward pass: autodiff of the one gather of all `L 2^d` corner rows is one
scatter-add into the table (XLA's sorted/serial scatter on CPU, atomics on GPU);
`docs/benchmarks.md` has its share of a training step.

Spherical harmonics (`spherical_harmonics`): the real SH basis of degree 4 (bands 0..3,
16 values) of unit directions, the colour input of the grid head (Instant-NGP / RAD-NeRF).
"""

import dataclasses
import functools
import math
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

from geneface_jax.errors import ShapeError

PRIMES = (1, 2654435761, 805459861)
LAYOUTS = ("native", "ngp_tiled", "ngp_hash")
INIT_SCALE = 1e-4        # tables start uniform in +-1e-4 (Instant-NGP)


@dataclasses.dataclass(frozen=True)
class GridSpec:
    """A d-dimensional multi-resolution grid: `levels` x `features`, resolutions from
    `base` to `finest` vertices per side, at most `2^log2_table` rows per level."""
    dims: int = 3
    levels: int = 16
    features: int = 2
    base: int = 16
    finest: int = 2048
    log2_table: int = 16
    layout: str = "native"

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"GridSpec: layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.dims not in (2, 3):
            raise ValueError(f"GridSpec: dims must be 2 or 3, got {self.dims}")
        if self.levels < 1 or self.features < 1:
            raise ValueError(f"GridSpec: levels and features must be positive: {self}")
        if self.base < 2 or self.finest < self.base:
            raise ValueError(f"GridSpec: need 2 <= base <= finest, got {self.base}, "
                             f"{self.finest}")
        if not 4 <= self.log2_table <= 30:
            raise ValueError(f"GridSpec: log2_table must be in [4, 30], got {self.log2_table}")

    @property
    def ngp_scales(self) -> Tuple[float, ...]:
        """torch-ngp layouts: `s_l` of each level (float32 arithmetic, as its kernel)."""
        growth = (np.log2(self.finest / self.base) / (self.levels - 1)
                  if self.levels > 1 else 0.0)
        s = np.float32(np.log2(np.exp2(growth)))
        return tuple(float(np.exp2(np.float32(lv) * s) * np.float32(self.base)
                           - np.float32(1.0)) for lv in range(self.levels))

    @property
    def resolutions(self) -> Tuple[int, ...]:
        """Vertices per side of each level."""
        if self.layout != "native":
            return tuple(int(math.ceil(np.float32(s))) + 1 for s in self.ngp_scales)
        if self.levels == 1:
            return (self.base,)
        growth = math.exp((math.log(self.finest) - math.log(self.base)) / (self.levels - 1))
        res = [int(math.floor(self.base * growth ** lv + 1e-6)) for lv in range(self.levels)]
        res[-1] = self.finest
        return tuple(max(2, r) for r in res)

    @property
    def sizes(self) -> Tuple[int, ...]:
        """Rows of each level's table: the dense vertex count, capped at 2^log2_table,
        rounded up to a multiple of 8."""
        cap = 1 << self.log2_table
        if self.layout != "native":
            growth = (np.exp2(np.log2(self.finest / self.base) / (self.levels - 1))
                      if self.levels > 1 else 1.0)
            dense = [(int(np.ceil(self.base * growth ** lv)) + 1) ** self.dims
                     for lv in range(self.levels)]
            return tuple(-(-min(cap, n) // 8) * 8 for n in dense)
        return tuple(min(cap, -(-(r ** self.dims) // 8) * 8) for r in self.resolutions)

    @property
    def hashed(self) -> Tuple[bool, ...]:
        """Whether each level is hashed (its dense vertex count exceeds its table; never
        in the `ngp_tiled` layout, which wraps the dense index instead)."""
        if self.layout == "ngp_tiled":
            return (False,) * self.levels
        side = (lambda r: r + 1) if self.layout == "ngp_hash" else (lambda r: r)
        return tuple(side(r) ** self.dims > s for r, s in zip(self.resolutions, self.sizes))

    @property
    def offsets(self) -> Tuple[int, ...]:
        """First row of each level in the joint table."""
        return tuple(int(v) for v in np.cumsum((0,) + self.sizes[:-1]))

    @property
    def rows(self) -> int:
        return int(sum(self.sizes))

    @property
    def output_dim(self) -> int:
        return self.levels * self.features


def _corner_offsets(dims):
    """`[2^d, d]` int32: the corners of a cell, bit i of corner c = offset along axis i."""
    return np.array([[(c >> i) & 1 for i in range(dims)] for c in range(1 << dims)],
                    np.int32)


def _level_rows(v, res, size, hashed):
    """Rows of integer vertices `v [..., d]` (int32) in one level's table."""
    if hashed:
        h = _hash(v.astype(jnp.uint32))
        return (h & jnp.uint32(size - 1)).astype(jnp.int32) if size & (size - 1) == 0 \
            else (h % jnp.uint32(size)).astype(jnp.int32)
    row = v[..., 0]
    stride = 1
    for i in range(1, v.shape[-1]):
        stride *= res
        row = row + v[..., i] * stride
    return row


def _hash(vu):
    h = vu[..., 0] * jnp.uint32(PRIMES[0])
    for i in range(1, vu.shape[-1]):
        h = h ^ (vu[..., i] * jnp.uint32(PRIMES[i]))
    return h


def _ngp_corner_rows_and_weights(x, spec: GridSpec):
    """`corner_rows_and_weights` in the torch-ngp layouts (module doc)."""
    x = jnp.asarray(x, jnp.float32)
    inside = jnp.all((x >= 0.0) & (x <= 1.0), axis=-1)                      # [N]
    corners = jnp.asarray(_corner_offsets(spec.dims))
    rows, weights = [], []
    for scale, res, size, hashed, off in zip(spec.ngp_scales, spec.resolutions, spec.sizes,
                                             spec.hashed, spec.offsets):
        p = x * jnp.float32(scale) + jnp.float32(0.5)
        v0 = jnp.floor(p)
        w = p - v0
        v = (v0.astype(jnp.int32)[:, None, :] + corners).astype(jnp.uint32)    # [N, C, d]
        index, stride = jnp.zeros(v.shape[:-1], jnp.uint32), 1
        for i in range(spec.dims):
            if stride > size:
                break
            index = index + v[..., i] * jnp.uint32(stride)
            stride *= res + 1
        if hashed and stride > size:
            index = _hash(v)
        rows.append((index % jnp.uint32(size)).astype(jnp.int32) + off)
        wc = jnp.where(corners == 1, w[:, None, :], 1.0 - w[:, None, :])
        weights.append(jnp.where(inside[:, None], jnp.prod(wc, axis=-1), 0.0))
    return jnp.stack(rows, axis=1), jnp.stack(weights, axis=1)


def corner_rows_and_weights(x, spec: GridSpec):
    """Where a point reads the table: rows `[N, L, 2^d]` (int32, joint-table rows) and
    d-linear weights `[N, L, 2^d]` of points `x [N, d]` in `[0, 1]^d`."""
    if spec.layout != "native":
        return _ngp_corner_rows_and_weights(x, spec)
    x = jnp.clip(jnp.asarray(x, jnp.float32), 0.0, 1.0)
    corners = jnp.asarray(_corner_offsets(spec.dims))                       # [C, d]
    rows, weights = [], []
    for res, size, hashed, off in zip(spec.resolutions, spec.sizes, spec.hashed,
                                      spec.offsets):
        p = x * (res - 1)
        v0 = jnp.clip(jnp.floor(p), 0, res - 2)
        w = p - v0                                                          # [N, d]
        v = v0.astype(jnp.int32)[:, None, :] + corners                      # [N, C, d]
        rows.append(_level_rows(v, res, size, hashed) + off)
        wc = jnp.where(corners == 1, w[:, None, :], 1.0 - w[:, None, :])    # [N, C, d]
        weights.append(jnp.prod(wc, axis=-1))
    return jnp.stack(rows, axis=1), jnp.stack(weights, axis=1)


def _level_constants(spec: GridSpec):
    """Per-level constants of the native layout as numpy arrays: vertices per side `[L]`,
    whether each level is hashed `[L]`, the dense row stride of each axis (`d` arrays
    `[L]`, 0 on hashed levels), the table rows `[L]` and the first row `[L]`."""
    res = np.array(spec.resolutions, np.int64)
    hashed = np.array(spec.hashed)
    strides = [np.where(hashed, 0, res ** i) for i in range(spec.dims)]
    return res, hashed, strides, np.array(spec.sizes, np.int64), np.array(spec.offsets)


def _corner_rows_and_weights_vectorised(x, spec: GridSpec):
    """`corner_rows_and_weights` (native layout) with every level computed at once:
    `[N, L, 2^d]` arrays built from `[N, L]` per-axis positions, no per-level stack and no
    reduction over the small axis d (`encode`'s forward-only path)."""
    x = jnp.clip(jnp.asarray(x, jnp.float32), 0.0, 1.0)
    res, hashed, strides, sizes, offsets = _level_constants(spec)
    corners = _corner_offsets(spec.dims)
    dense, hashes, weights = None, None, None
    for i in range(spec.dims):
        p = x[:, i:i + 1] * jnp.asarray((res - 1).astype(np.float32))         # [N, L]
        v0 = jnp.clip(jnp.floor(p), 0.0, jnp.asarray((res - 2).astype(np.float32)))
        w = (p - v0)[:, :, None]                                            # [N, L, 1]
        bit = jnp.asarray(corners[:, i])                                    # [C]
        v = v0.astype(jnp.int32)[:, :, None] + bit                          # [N, L, C]
        wi = jnp.where(bit == 1, w, 1.0 - w)
        weights = wi if weights is None else weights * wi
        term = v * jnp.asarray(strides[i].astype(np.int32))[:, None]
        dense = term if dense is None else dense + term
        hu = v.astype(jnp.uint32) * jnp.uint32(PRIMES[i])
        hashes = hu if hashes is None else hashes ^ hu
    rows = dense
    if hashed.any():
        if all(s & (s - 1) == 0 for s in sizes[hashed]):
            h = hashes & jnp.asarray(np.where(hashed, sizes - 1, 0).astype(np.uint32))[:, None]
        else:
            h = hashes % jnp.asarray(np.where(hashed, sizes, 1).astype(np.uint32))[:, None]
        rows = jnp.where(jnp.asarray(hashed)[:, None], h.astype(jnp.int32), dense)
    return rows + jnp.asarray(offsets.astype(np.int32))[:, None], weights


def _interpolate_with(rows_and_weights, x, table, spec):
    rows, weights = rows_and_weights(x, spec)
    # rows are in range by construction (clipped vertices, masked hashes): no bounds
    # handling in the gather or in its scatter-add gradient
    feats = table.at[rows].get(mode="promise_in_bounds")                    # [N, L, C, F]
    return jnp.einsum("nlc,nlcf->nlf", weights, feats).reshape(x.shape[0], -1)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _interpolate_native(x, table, spec):
    """The native layout's encoding of `x [N, d]`: `[N, L F]`. Evaluated on its own (a
    render) it builds the corner rows and weights of all levels at once; differentiated
    (training), it is the per-level form, whose derivatives autodiff takes. Both give the
    same rows and weights (`tests/test_grid.py::test_encoding_forms_agree`); on XLA:CPU
    the vectorised form renders faster and the per-level form's autodiff trains faster
    (docs/stage3_nerf.md, "Rendering speed")."""
    return _interpolate_with(_corner_rows_and_weights_vectorised, x, table, spec)


def _interpolate_native_jvp(spec, primals, tangents):
    # symbolic zeros: the head grid's points carry no tangent (they do not depend on the
    # parameters), and a zero tangent passed as an array would be multiplied through
    x, table = primals
    tx, tt = (None if isinstance(t, jax.custom_derivatives.SymbolicZero) else t
              for t in tangents)
    f = lambda a, b: _interpolate_with(corner_rows_and_weights, a, b, spec)  # noqa: E731
    if tx is None and tt is None:
        out = f(x, table)
        return out, jnp.zeros_like(out)
    if tx is None:
        return jax.jvp(lambda b: f(x, b), (table,), (tt,))
    if tt is None:
        return jax.jvp(lambda a: f(a, table), (x,), (tx,))
    return jax.jvp(f, (x, table), (tx, tt))


_interpolate_native.defjvp(_interpolate_native_jvp, symbolic_zeros=True)


def encode(x, table, spec: GridSpec):
    """Grid features `[..., L F]` of points `x [..., d]` in `[0, 1]^d` (module doc);
    `table` is the joint `[spec.rows, F]` table."""
    x = jnp.asarray(x, jnp.float32)
    if x.ndim < 1 or x.shape[-1] != spec.dims:
        raise ShapeError(f"grid encode: points must be [..., {spec.dims}], got {x.shape}")
    if tuple(table.shape) != (spec.rows, spec.features):
        raise ShapeError(f"grid encode: table must be [{spec.rows}, {spec.features}], got "
                         f"{tuple(table.shape)}")
    table = jnp.asarray(table)
    lead = x.shape[:-1]
    flat = x.reshape(-1, spec.dims)
    if spec.layout == "native":
        out = _interpolate_native(flat, table, spec)
    else:
        out = _interpolate_with(corner_rows_and_weights, flat, table, spec)
    return out.reshape(lead + (spec.output_dim,))


def init_table(key, spec: GridSpec):
    """A fresh table `[rows, F]`, uniform in +-INIT_SCALE."""
    return jax.random.uniform(key, (spec.rows, spec.features), jnp.float32,
                              -INIT_SCALE, INIT_SCALE)


# --------------------------------------------------------------------------- SH

SH_DIM = 16


def spherical_harmonics(d):
    """Real spherical harmonics of bands 0..3 of unit directions `d [..., 3]` ->
    `[..., 16]` (band-major; the basis Instant-NGP's degree-4 SH encoding uses)."""
    d = jnp.asarray(d, jnp.float32)
    if d.shape[-1] != 3:
        raise ShapeError(f"spherical_harmonics: directions must be [..., 3], got {d.shape}")
    x, y, z = d[..., 0], d[..., 1], d[..., 2]
    xx, yy, zz = x * x, y * y, z * z
    xy, yz, xz = x * y, y * z, x * z
    out = [jnp.full_like(x, 0.28209479177387814),
           -0.48860251190291987 * y, 0.48860251190291987 * z, -0.48860251190291987 * x,
           1.0925484305920792 * xy, -1.0925484305920792 * yz,
           0.94617469575755997 * zz - 0.31539156525251999, -1.0925484305920792 * xz,
           0.54627421529603959 * (xx - yy),
           0.59004358992664352 * y * (-3.0 * xx + yy), 2.8906114426405538 * xy * z,
           0.45704579946446572 * y * (1.0 - 5.0 * zz), 0.3731763325901154 * z * (5.0 * zz - 3.0),
           0.45704579946446572 * x * (1.0 - 5.0 * zz), 1.4453057213202769 * z * (xx - yy),
           0.59004358992664352 * x * (-xx + 3.0 * yy)]
    return jnp.stack(out, axis=-1)
