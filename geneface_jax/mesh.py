"""The device mesh every multi-device piece shares: one axis, `data`, over the devices.

Rendering (`render.sharded`) splits rays over it and training (`train.parallel`) splits the
global batch over it; both take a `Mesh` built here, so neither needs the other.
"""

import jax
import numpy as np
from jax.sharding import Mesh

DATA_AXIS = "data"


def make_mesh(devices=None):
    """A 1-D mesh with axis `data` over `devices` (default: every device of every host)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.array(devices), (DATA_AXIS,))
