"""PyTorch reference implementations of the GeneFace networks: what the benchmarks under
`experiments/bench/` time the library against (after checking that both take the same
training step), and what `tests/test_torch_reference.py` checks the library's forward
passes against.

Each network is written as a PyTorch user would write GeneFace's: channels-first
`nn.Conv1d` / `nn.BatchNorm1d`, `nn.Linear` in `nn.ModuleList`s, weight norm through
`torch.nn.utils.parametrizations`, `zero_grad(set_to_none=True)`. The
submodules are named after the library's Flax modules (`name_3` in Flax is item 3 of the
`nn.ModuleList` / `nn.Sequential` `name`), so `load_flax` copies any of the library's
parameter trees into its PyTorch twin without a per-network map.

  vae.py      stage 1: GeneFace's audio condition net + FVAE + flow prior, its training
              objective and a training runner
  syncnet.py  the landmark SyncNet (frozen in stages 1 and 2)
  postnet.py  stage 2: CNN post-net, MLP discriminator and the GAN step
  nerf.py     stage 3: landmark-conditioned head NeRF, training step and frame render
  grid.py     stage 3: the grid head (RAD-NeRF), occupancy sampling and update, training
              step and frame render

torch is a test / benchmark extra, never a dependency of `geneface_jax`: only the benches
and tests import this package (and the modules import torch at their top).
"""

import copy
import re

import numpy as np
import torch
from torch import nn

_LEAF = {"scale": "weight", "mean": "running_mean", "var": "running_var"}


def load_flax(module, variables, prefix=""):
    """Copies a Flax variable tree (`{'params': ..., 'batch_stats': ...}` or a bare params
    tree) into `module`'s submodule at `prefix` (e.g. "model."). Flax `name_3` is item 3 of
    the PyTorch `nn.ModuleList` / `nn.Sequential` `name`. Dense kernels `[in, out]` ->
    `weight [out, in]`; Conv kernels `[K, C_in, C_out]` -> `[C_out, C_in, K]`;
    ConvTranspose kernels `[s, C_in, C_out]` -> `[C_in, C_out, s]`; weight norm `weight_v`,
    `weight_g` -> `parametrizations.weight.original1`, `original0`; BatchNorm `scale`,
    `mean`, `var` -> `weight`, `running_mean`, `running_var`. Raises if a Flax tensor has no
    counterpart, a shape disagrees or a PyTorch tensor under `prefix` is left out
    (`num_batches_tracked` aside). Returns the number of tensors copied."""
    from flax.traverse_util import flatten_dict
    state = module.state_dict()
    root = module.get_submodule(prefix.rstrip(".")) if prefix else module
    done = set()
    for path, value in flatten_dict(variables).items():
        if path[0] in ("params", "batch_stats"):
            path = path[1:]
        owner, names = root, []
        for part in path[:-1]:
            m = re.fullmatch(r"(.+)_(\d+)", part)
            if m and isinstance(getattr(owner, m[1], None), (nn.ModuleList, nn.Sequential)):
                owner, names = getattr(owner, m[1])[int(m[2])], names + [m[1], m[2]]
            elif isinstance(getattr(owner, part, None), nn.Module):
                owner, names = getattr(owner, part), names + [part]
            else:
                raise KeyError(f"{'/'.join(path)}: no PyTorch submodule {part!r} under "
                               f"{prefix}{'.'.join(names)}")
        value, leaf = np.asarray(value, np.float32), path[-1]
        if leaf == "kernel":
            perm = (1, 2, 0) if isinstance(owner, nn.ConvTranspose1d) else (2, 1, 0)
            value, name = (value.T if value.ndim == 2 else value.transpose(perm)), "weight"
        elif leaf == "weight_v":
            value, name = value.transpose(2, 1, 0), "parametrizations.weight.original1"
        elif leaf == "weight_g":
            value, name = value[:, None, None], "parametrizations.weight.original0"
        else:
            name = _LEAF.get(leaf, leaf)
        key = prefix + ".".join(names + [name])
        if key not in state:
            raise KeyError(f"{'/'.join(path)} has no PyTorch counterpart {key}")
        if tuple(state[key].shape) != value.shape:
            raise ValueError(f"{key}: PyTorch shape {tuple(state[key].shape)} != converted "
                             f"{value.shape}")
        with torch.no_grad():
            state[key].copy_(torch.from_numpy(np.array(value, order="C")))
        done.add(key)
    missing = [k for k in state if k.startswith(prefix) and k not in done
               and not k.endswith("num_batches_tracked")]
    if missing:
        raise KeyError(f"PyTorch tensors without a JAX counterpart: {missing[:5]}")
    return len(done)


def trainable(module):
    """`module`'s parameters that take gradients, in registration order."""
    return [p for p in module.parameters() if p.requires_grad]


def numpy_params(module):
    """Copies of `module`'s trainable parameters (numpy, `trainable` order)."""
    return [p.detach().numpy().copy() for p in trainable(module)]


def flax_params_in_torch_order(module, trees):
    """Flax variable trees `{prefix: variables}` loaded into a copy of `module`: its
    trainable parameters, numpy, in `trainable(module)` order (to compare with PyTorch's
    own after a step)."""
    clone = copy.deepcopy(module)
    for prefix, variables in trees.items():
        load_flax(clone, variables, prefix)
    return numpy_params(clone)


class PhaseTimer:
    """Adds the seconds between `mark(name)` calls to `timings[name]` (a dict, or None to
    time nothing): the forward / backward / optimizer split of a PyTorch step."""

    def __init__(self, timings):
        import time
        self._clock, self.timings = time.perf_counter, timings
        self._t = self._clock()

    def mark(self, name):
        if self.timings is not None:
            t = self._clock()
            self.timings[name] = self.timings.get(name, 0.0) + t - self._t
            self._t = t
