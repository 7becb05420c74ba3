"""PyTorch's default layer initialisers as Flax initialisers (shared by the motion
networks and the NeRF fields, so fresh models draw from GeneFace's distributions)."""

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Initializer = Callable[..., Any]


def torch_default_kernel_init() -> Initializer:
    """PyTorch's Conv1d weight init (kaiming-uniform, a=sqrt(5)): U(+-1/sqrt(K * C_in))."""
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias_init(fan_in: int) -> Initializer:
    """PyTorch's Conv1d bias init: U(+-1/sqrt(fan_in)) with fan_in = K * C_in."""
    bound = 1.0 / max(fan_in, 1) ** 0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


@functools.lru_cache(maxsize=64)
def _jitted_init(module, kwargs):
    return jax.jit(functools.partial(module.init, **dict(kwargs)))


def jitted_init(module, **kwargs):
    """`jax.jit(module.init)` (keyword arguments bound), one per module configuration:
    linen modules hash and compare by their fields, so a process that builds the same
    model again (the stages of a run, tests) reuses the traced and compiled init instead
    of tracing, lowering and compiling it anew. Results are those of `module.init`."""
    key = tuple(sorted(kwargs.items()))
    try:
        hash((module, key))
    except TypeError:                       # a field that does not hash: no cache
        return jax.jit(functools.partial(module.init, **kwargs))
    return _jitted_init(module, key)
