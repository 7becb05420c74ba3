"""Render many rays on every device: `jax.shard_map` over the `data` mesh axis + chunking.

`render_image(render_rays_fn, rays, params=..., mesh=..., chunk=...)` evaluates
`render_rays_fn(params, rays_chunk) -> pytree of [chunk, ...]` on all R rays:

1. a device's rays `ceil(R / n_devices)` are split evenly into `n = ceil(per device /
   chunk)` chunks, and the chunk size is rounded up to a quarter of its power of two
   (`padded_layout`): at most 25 % of padding (a power-of-two rounding wasted up to half:
   a head region of 4590 rays ran as 8192), and only four chunk sizes per octave, so
   ray counts that vary from frame to frame reuse a few compiled programs;
2. the rays (a pytree whose leaves all have the leading ray axis `[R, ...]`) are padded
   (before the compiled program) to `R_pad = n_devices * n_chunks * c` by repeating the
   last ray (so padding never feeds a degenerate ray, e.g. a zero direction, into the
   field);
3. `jax.shard_map` splits the padded rays over the devices (params are replicated), and on
   each device `jax.lax.map` runs the chunks one after another, bounding memory to one
   chunk's activations;
4. the outputs are concatenated, copied to the host and the padding is removed: every
   leaf is a numpy array `[R, ...]`.

Each ray's result depends only on that ray, so the output is the same on 1 or N devices and
for any chunk size (up to float reassociation inside the field, ~1e-7). The compiled
renderer is cached per `(render_rays_fn, mesh, chunk)` and per padded shapes: ray counts
that pad to the same `R_pad` share one program, so rendering clips of other lengths (whose
last call renders fewer frames) compiles no new renderer for most of them. `rays` are host
or single-device arrays; on a mesh spanning several hosts every process passes
the same rays and gets the whole output back (it is replicated to every device).
"""

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from geneface_jax.errors import ShapeError
from geneface_jax.mesh import DATA_AXIS, make_mesh

Array = Any

DEFAULT_CHUNK = 4096


def num_rays_of(rays) -> int:
    """The common leading size R of every leaf of `rays`; ShapeError if there is none."""
    leaves = jax.tree.leaves(rays)
    if not leaves:
        raise ShapeError("render_image: rays is an empty pytree")
    sizes = set()
    for leaf in leaves:
        shape = jnp.shape(leaf)
        if len(shape) == 0:
            raise ShapeError("render_image: every leaf of rays needs a leading ray axis "
                             f"[R, ...], got a scalar (shapes: {_shapes(rays)})")
        sizes.add(shape[0])
    if len(sizes) != 1:
        raise ShapeError(f"render_image: leaves of rays disagree on the ray count R: "
                         f"{_shapes(rays)}")
    r = sizes.pop()
    if r == 0:
        raise ShapeError("render_image: no rays to render (R = 0)")
    return r


def _shapes(tree):
    return jax.tree.map(lambda x: tuple(jnp.shape(x)), tree)


def padded_layout(r: int, n_dev: int, chunk: int):
    """`(c, r_pad)`: the per-device chunk and the padded ray count for `r` rays on `n_dev`
    devices with at most `chunk` rays per device at once (module docstring, steps 1-2)."""
    per_device = -(-r // n_dev)
    n_chunks = -(-per_device // chunk)
    even = -(-per_device // n_chunks)                 # the rays split evenly over the chunks
    granule = 1 << max((even.bit_length() - 1) - 2, 0)   # a quarter of its power of two
    c = min(chunk, -(-even // granule) * granule)
    return c, n_dev * c * n_chunks


def _pad_rows(x, total):
    """`x [R, ...]` padded to `[total, ...]` by repeating its last row (numpy stays numpy)."""
    xp = np if isinstance(x, np.ndarray) else jnp
    x = xp.asarray(x)
    extra = total - x.shape[0]
    if extra == 0:
        return x
    return xp.concatenate([x, xp.broadcast_to(x[-1:], (extra,) + x.shape[1:])], axis=0)


@functools.lru_cache(maxsize=64)
def _compiled(render_rays_fn: Callable, mesh, chunk: int):
    """Jitted `(params, padded rays) -> padded outputs` for one function, mesh and
    (requested) chunk; the per-device chunk is `padded_layout`'s, read from the shapes."""

    def per_device(params, rays_local):
        n_local = jax.tree.leaves(rays_local)[0].shape[0]
        n_chunks = -(-n_local // chunk)                 # padded_layout's: c * n_chunks
        c = n_local // n_chunks
        chunks = jax.tree.map(lambda x: x.reshape((n_chunks, c) + x.shape[1:]), rays_local)

        def one(rays_chunk):
            out = render_rays_fn(params, rays_chunk)
            for leaf in jax.tree.leaves(out):
                if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] != c:
                    raise ShapeError(
                        f"render_image: render_rays_fn must return leaves [chunk, ...] with "
                        f"chunk = {c}, got {_shapes(out)}")
            return out

        outs = jax.lax.map(one, chunks)
        return jax.tree.map(lambda y: y.reshape((n_chunks * c,) + y.shape[2:]), outs)

    mapped = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(DATA_AXIS)),
                           out_specs=P(DATA_AXIS))

    if len({d.process_index for d in mesh.devices.flat}) > 1:
        # Several hosts: each process can read back only what its own devices hold.
        return jax.jit(mapped, out_shardings=NamedSharding(mesh, P()))
    return jax.jit(mapped)


def render_image(render_rays_fn: Callable, rays, *, params=None, mesh=None,
                 chunk: int = DEFAULT_CHUNK):
    """Evaluate `render_rays_fn(params, rays_chunk)` on all rays over every mesh device.

    Args:
      render_rays_fn: pure `(params, rays_chunk) -> pytree of [chunk, ...]`; must be
        hashable (a function) and is traced once per input shapes.
      rays: pytree, every leaf `[R, ...]` (e.g. `{"origins": [R, 3], "directions": [R, 3],
        "background": [R, 3]}`; per-frame conditions can be broadcast to `[R, C]` or put
        in `params`).
      params: pytree replicated on every device (network weights, per-frame condition).
      mesh: 1-D mesh with axis `data` (default `make_mesh()`: all devices).
      chunk: rays evaluated at once on one device (bounds memory).

    Returns:
      the pytree of `render_rays_fn` with every leaf a host (numpy) array `[R, ...]`:
      the padding is cut on the host, which compiles nothing per ray count.
    """
    chunk = int(chunk)
    if chunk <= 0:
        raise ValueError(f"render_image: chunk must be positive, got {chunk}")
    mesh = make_mesh() if mesh is None else mesh
    if DATA_AXIS not in mesh.shape or len(mesh.shape) != 1:
        raise ShapeError(f"render_image: expected a 1-D mesh with axis '{DATA_AXIS}', "
                         f"got axes {dict(mesh.shape)}")
    r = num_rays_of(rays)
    _, total = padded_layout(r, mesh.shape[DATA_AXIS], chunk)
    padded = jax.tree.map(lambda x: _pad_rows(x, total), rays)
    out = jax.device_get(_compiled(render_rays_fn, mesh, chunk)(params, padded))
    return jax.tree.map(lambda y: y[:r], out)
