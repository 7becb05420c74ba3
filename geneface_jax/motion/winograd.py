"""Winograd (Toom-Cook) 1-D convolution: the WaveNet's K-tap convs with fewer multiplies.

A 'same'-padded, stride-1, undilated correlation `y[t] = sum_k x[t + k - p] @ w[k]`
(x `[B, T, C]`, w `[K, C, O]`, p = (K - 1) / 2, zeros outside the sequence) computed tile by
tile: `m` outputs of a tile need `n = m + K - 1` inputs, and the minimal filtering algorithm
F(m, K) gets them with n channel-mixing products instead of m * K:

    Y_tile = A^T [ (G w) (.) (B^T X_tile) ]        A^T [m, n], G [n, K], B^T [n, n]

where (.) is, per evaluation point, a `[C] x [C, O]` matrix product. Batched over all
tiles, the conv becomes n GEMMs `[B * T/m, C] x [C, O]` plus cheap linear transforms of
the input (B^T) and of the GEMM outputs (A^T). With the default F(4, 5) the GEMMs do
8 / 20 = 0.4 of the direct conv's multiply-adds. JAX differentiates it as written: the
transpose of the algorithm is again n GEMMs (dW: `[C, P] x [P, O]`, dX: `[P, O] x [O, C]`)
between transposed transforms, so both gradients share the saving.

The transforms are the Cook-Toom construction on the points 0, +-1, +-2, +-1/2, ... and
infinity: G and A evaluate the filter and the output polynomial at the points
(Vandermonde rows), B^T is the transposed inverse Vandermonde of the product polynomial
(`winograd_matrices`). Float32 round-off grows with the tile: tests/test_wavenet_flows.py
bounds the error of F(4, K) (and of its gradients) by 2e-5 of the output's scale, F(6, 5)
by 2e-4, against a float64 reference; `experiments/bench/audio2motion.py` reports the
difference from the direct conv on GeneFace's 256 -> 512 layer.
"""

import functools

import jax.numpy as jnp
import numpy as np
from jax import lax

from geneface_jax.errors import ShapeError

# Interpolation points, in the order the construction takes them (infinity is always the
# last point and is not listed). Small magnitudes keep the transforms well conditioned.
POINTS = (0.0, 1.0, -1.0, 2.0, -2.0, 0.5, -0.5, 3.0, -3.0, 1.0 / 3.0, -1.0 / 3.0)


@functools.lru_cache(maxsize=None)
def winograd_matrices(m: int, k: int):
    """(A^T `[m, n]`, G `[n, k]`, B^T `[n, n]`) of F(m, k), float64 numpy, n = m + k - 1.

    For x of length n and w of length k: `A^T @ ((G @ w) * (B^T @ x))` equals
    `[sum_j x[i + j] w[j] for i in range(m)]` (tested against the direct sum).
    """
    n = m + k - 1
    if m < 1 or k < 1 or n - 1 > len(POINTS):
        raise ValueError(f"F({m}, {k}) needs {n - 1} finite points; {len(POINTS)} are defined")
    pts = POINTS[:n - 1]

    def vandermonde(cols):
        v = np.zeros((n, cols))
        for i, p in enumerate(pts):
            v[i] = [p ** j for j in range(cols)]
        v[n - 1, cols - 1] = 1.0          # the point at infinity: leading coefficient
        return v

    a = vandermonde(m)                     # evaluates a length-m polynomial at the points
    g = vandermonde(k)                     # evaluates the filter
    b_t = np.linalg.inv(vandermonde(n)).T  # transposed interpolation of the product
    return a.T, g, b_t


def _combine(coefs, arrays):
    """sum_i coefs[i] * arrays[i], skipping zero coefficients (coefs are Python floats)."""
    acc = None
    for c, a in zip(coefs, arrays):
        if c == 0.0:
            continue
        term = a if c == 1.0 else (-a if c == -1.0 else a * jnp.asarray(c, a.dtype))
        acc = term if acc is None else acc + term
    return acc if acc is not None else jnp.zeros_like(arrays[0])


def _input_transform(x, m, k, precision=None):
    """x `[B, T, C]` -> B^T applied to every tile's n inputs: `[n, B * tiles, C]`."""
    _, _, b_t = winograd_matrices(m, k)
    n = m + k - 1
    b, t, c = x.shape
    tiles = -(-t // m)
    left = (k - 1) // 2
    extra = -(-(n - m) // m)                   # tiles a window reaches beyond its own
    xp = jnp.pad(x, ((0, 0), (left, (tiles + extra) * m - t - left), (0, 0)))
    x4 = xp.reshape(b, tiles + extra, m, c)    # frame s * m + r of the padded input
    # window position j of tile s is padded frame s * m + j: unit-stride slices of the
    # [tile, phase] view, stacked [n, B, tiles, C] ...
    windows = jnp.concatenate([x4[:, q: q + tiles] for q in range(extra + 1)], axis=2)
    windows = jnp.moveaxis(windows[:, :, :n], 2, 0)
    # ... and B^T as one [n, n] x [n, B tiles C] GEMM. Its transpose (the input gradient)
    # is then again one GEMM writing its own buffer, followed by a single-input
    # overlap-add; with B^T as element-wise sums instead, XLA fused the n window
    # gradients of every layer into the residual-gradient chain and recomputed it per
    # layer (~0.1 s per decoder layer).
    u = jnp.dot(jnp.asarray(b_t, x.dtype), windows.reshape(n, -1), precision=precision)
    return u.reshape(n, b * tiles, c)


def _output_transform(mats, m, k, shape):
    """`[n, B * tiles, O]` products -> A^T per tile -> `[B, T, O]` (shape = (B, T, O))."""
    a_t, _, _ = winograd_matrices(m, k)
    b, t, o = shape
    n = mats.shape[0]
    rows = [mats[i] for i in range(n)]
    y = jnp.stack([_combine(a_t[j], rows) for j in range(m)], axis=1)  # [B*tiles, m, O]
    return y.reshape(b, -1, o)[:, :t]


def _filter_transform(w, m, precision=None):
    """w `[K, C, O]` -> G w `[n, C, O]` (one small GEMM: fewer ops for XLA to compile than
    n element-wise sums, and the weights are small)."""
    k, c, o = w.shape
    _, g, _ = winograd_matrices(m, k)
    gw = jnp.dot(jnp.asarray(g, w.dtype), w.reshape(k, c * o), precision=precision)
    return gw.reshape(g.shape[0], c, o)


def _forward(x, w, m, precision):
    k = w.shape[0]
    u = _input_transform(x, m, k, precision)                    # [n, P, C]
    v = _filter_transform(w, m, precision)                      # [n, C, O]
    prods = lax.dot_general(u, v, (((2,), (1,)), ((0,), (0,))),  # [n, P, O]
                            precision=precision)
    return _output_transform(prods, m, k, x.shape[:2] + (w.shape[-1],))


def winograd_conv1d(x, w, tile: int = 4, precision=None):
    """'Same'-padded stride-1 correlation of x `[B, T, C]` with w `[K, C, O]` (K odd),
    by the F(tile, K) Winograd algorithm. Returns `[B, T, O]` in x's dtype; no bias.

    Equals `lax.conv_general_dilated(x, w, (1,), [((K-1)//2,)*2], dimension_numbers=
    ('NWC', 'WIO', 'NWC'))` up to float round-off (see the module docstring);
    differentiable in both modes by JAX's autodiff. `precision` goes to the GEMMs
    (`lax.dot_general`).
    """
    if getattr(x, "ndim", None) != 3 or getattr(w, "ndim", None) != 3:
        raise ShapeError(f"winograd_conv1d: expected x [B, T, C] and w [K, C, O], got "
                         f"{getattr(x, 'shape', None)} and {getattr(w, 'shape', None)}")
    k, c, _ = w.shape
    if k % 2 == 0:
        raise ShapeError(f"winograd_conv1d: kernel size must be odd for 'same' padding, got {k}")
    if x.shape[-1] != c:
        raise ShapeError(f"winograd_conv1d: x has {x.shape[-1]} channels, w expects {c}")
    if x.shape[1] < 1:
        raise ShapeError("winograd_conv1d: empty sequence (T = 0)")
    return _forward(x, w.astype(x.dtype), int(tile), precision)
