"""Data parallelism with `jax.shard_map` over a 1-D device mesh.

A step function is written once, per device. Wrapped by `data_parallel`, it runs on a
mesh of 1 device or of N devices: the global batch is split over the `data` axis, the
state and RNG are replicated, and the outputs are replicated.

The gradient convention (shard_map with replication checking, `check_vma=True`): a step
differentiates the *global* loss, `pmean(local_loss)`, with respect to the replicated
params; JAX's transpose of that collective all-reduces the gradients, so `jax.grad`
returns the global-batch gradient, identical on every device. Do not `pmean` the gradients
again (they would be correct only by accident). Metrics are `pmean`-ed; BatchNorm layers
use `axis_name=DATA_AXIS` so their statistics are those of the global batch. With equal
per-device shards, N-device results equal 1-device results up to float reassociation.

Several hosts (multi-controller JAX): every process runs the same program after
`initialize_distributed()`; `make_mesh()` then spans the devices of every host. Each process
computes the step's *global* host batch (`get_batch(step)` is a pure function of the step)
and `shard_batch` transfers only the rows of its own devices; replicated values (state,
metrics) read back identically on every process. Files of a run are written by the main
process only (`is_main_process`); orbax checkpoints are written by all together.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from geneface_jax.errors import ShapeError
from geneface_jax.mesh import DATA_AXIS, make_mesh  # noqa: F401 - the steps' mesh API


def initialize_distributed(coordinator_address=None, num_processes=None, process_id=None):
    """Joins a multi-host run (`jax.distributed.initialize`); call before any JAX work.

    With no arguments the cluster is detected (SLURM, Open MPI, Cloud TPU pods, ...).
    Otherwise every process passes the same `coordinator_address` ("host:port" of process
    0) and `num_processes`, and its own `process_id` in [0, num_processes). On CPU the
    cross-process collectives use gloo (JAX's default), so the multi-host path is testable
    without accelerators.
    """
    kwargs = {k: v for k, v in dict(coordinator_address=coordinator_address,
                                     num_processes=num_processes,
                                     process_id=process_id).items() if v is not None}
    jax.distributed.initialize(**kwargs)


def is_main_process():
    """True on process 0 (the only one that writes a run's files); always on one host."""
    return jax.process_index() == 0





def pmean(x):
    """Mean of `x` (any pytree) over the data axis; call inside a data-parallel step.

    Apply it to the local loss *before* differentiating (see the module doc)."""
    return jax.lax.pmean(x, DATA_AXIS)


def global_mean(values, weights):
    """`sum(values * weights) / sum(weights)` over the *global* batch (psum over the data
    axis); call inside a data-parallel step. `weights` broadcasts against `values`; their
    sum is floored at 1e-8. Unlike `pmean` of per-device means, the result does not depend
    on how unequal masks fall on devices, so it is the same on 1 and N devices."""
    num = jax.lax.psum(jnp.sum(values * weights), DATA_AXIS)
    den = jax.lax.psum(jnp.sum(jnp.broadcast_to(weights, values.shape)), DATA_AXIS)
    return num / jnp.maximum(den, 1e-8)


def device_rng(key):
    """A key distinct per device (for dropout / sampling noise inside a step)."""
    return jax.random.fold_in(key, jax.lax.axis_index(DATA_AXIS))


def global_normal(key, local_shape, dtype=jnp.float32):
    """This device's slice of one standard-normal draw over the *global* batch.

    `local_shape` is `[b, ...]` with `b` the per-device batch; the draw has shape
    `[b * num_devices, ...]` from `key` (the same on every device) and device `i` gets rows
    `[i b, (i + 1) b)`. Per-example noise is then independent of how the batch is split,
    so 1 and N devices give the same numbers. Call inside a data-parallel step."""
    n = jax.lax.axis_size(DATA_AXIS)
    b = local_shape[0]
    full = jax.random.normal(key, (b * n,) + tuple(local_shape[1:]), dtype)
    start = jax.lax.axis_index(DATA_AXIS) * b
    return jax.lax.dynamic_slice_in_dim(full, start, b, axis=0)


def global_uniform(key, local_shape, dtype=jnp.float32):
    """Like `global_normal`, for U[0, 1): this device's rows of one draw over the global
    batch (e.g. per-ray sample jitter, the same on 1 and N devices)."""
    n = jax.lax.axis_size(DATA_AXIS)
    b = local_shape[0]
    full = jax.random.uniform(key, (b * n,) + tuple(local_shape[1:]), dtype)
    start = jax.lax.axis_index(DATA_AXIS) * b
    return jax.lax.dynamic_slice_in_dim(full, start, b, axis=0)


def _batch_spec(batch, replicated):
    """PartitionSpecs of a batch: P(data) per leaf, P() for the top-level dict entries
    named in `replicated` (per-step context every device needs whole)."""
    if not replicated:
        return P(DATA_AXIS)
    if not isinstance(batch, dict) or not set(replicated) <= set(batch):
        raise ShapeError(f"replicated batch entries {sorted(replicated)} must be keys of a "
                         f"dict batch")
    return {k: (P() if k in replicated else P(DATA_AXIS)) for k in batch}


def shard_batch(batch, mesh, replicated=()):
    """Puts a host batch (pytree, leading axis = global batch) sharded over `data`;
    top-level dict entries named in `replicated` go whole to every device. On several
    hosts every process passes the same global batch and only its devices' rows are
    transferred."""
    n = mesh.shape[DATA_AXIS]
    sharded = {k: v for k, v in batch.items() if k not in replicated} if replicated else batch
    for leaf in jax.tree.leaves(sharded):
        if np.ndim(leaf) == 0 or np.shape(leaf)[0] % n:
            raise ShapeError(f"global batch of shape {np.shape(leaf)} cannot be split over "
                             f"{n} devices: its leading size must be a multiple of {n}")
    spec = _batch_spec(batch, replicated)
    if not replicated:
        return jax.device_put(batch, NamedSharding(mesh, spec))
    return {k: jax.device_put(v, NamedSharding(mesh, spec[k])) for k, v in batch.items()}


def replicate(tree, mesh):
    """Puts a pytree replicated on every device of the mesh."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def data_parallel(step_fn, mesh, *, donate_state=True, replicated=()):
    """Wraps `step_fn(state, batch, rng) -> (state, metrics)` for the mesh.

    Returns a jitted function of the same signature taking a replicated state and rng and
    a batch sharded with `shard_batch` (host arrays are sharded automatically). With
    `replicated`, the batch must be a dict and those entries are seen whole by every
    device (e.g. the per-frame context of a ray batch).
    """
    if replicated:
        def mapped(state, batch, rng):
            f = jax.shard_map(step_fn, mesh=mesh,
                              in_specs=(P(), _batch_spec(batch, replicated), P()),
                              out_specs=(P(), P()))
            return f(state, batch, rng)
    else:
        mapped = jax.shard_map(step_fn, mesh=mesh, in_specs=(P(), P(DATA_AXIS), P()),
                               out_specs=(P(), P()))
    return jax.jit(mapped, donate_argnums=(0,) if donate_state else ())
