"""PyTorch `state_dict` -> Flax params for the WaveNet / coupling-flow modules.

Every function takes a `state_dict` (a mapping of names to torch tensors or numpy arrays)
and a `prefix` (the dotted path of the module inside it, '' for the root) and returns the
module's `params` collection as nested dicts of float32 numpy arrays; apply it with
`module.apply({'params': params}, ...)`.

Key mapping (PyTorch -> Flax; conv weights [C_out, C_in, K] -> [K, C_in, C_out]):

    conv.weight_g, conv.parametrizations.weight.original0   [C_out, 1, 1] -> weight_g [C_out]
    conv.weight_v, conv.parametrizations.weight.original1   -> weight_v [K, C_in, C_out]
    conv.weight                                             -> kernel   [K, C_in, C_out]
    conv.bias                                               -> bias     [C_out]
    wn.in_layers.{i}, wn.res_skip_layers.{i}, wn.cond_layer
                                -> in_layers_{i}, res_skip_layers_{i}, cond_layer
    VITS coupling layer  conv_pre, wavenet, conv_post       -> pre, enc, post
    GeneFace coupling    pre, enc, post                     -> pre, enc, post
    VITS block flows.{i}; GeneFace block flows.{2i} (odd entries are Flip) -> flows_{i}
    VITS posterior enc.  conv_pre, wavenet, conv_proj       -> conv_pre, wavenet, conv_proj
    ConvTranspose1d weight [C_in, C_out, K]                 -> kernel [K, C_in, C_out]

GeneFace checkpoints use old-style weight-norm keys under prefixes such as
`vae.encoder.wn` (a WaveNet) or `vae.prior_flow` (a coupling block); whole GeneFace
checkpoints, every stage, convert with `convert.geneface` (which checks every key).
"""

import re
from typing import Any, Dict, Mapping, Optional

import numpy as np

from geneface_jax.errors import CheckpointError, ShapeError
from geneface_jax.state_dict import join, keys_under, to_numpy

Params = Dict[str, Any]

_WN_KEYS = (("weight_g", "weight_v"),
            ("parametrizations.weight.original0", "parametrizations.weight.original1"))


def _get(state_dict, key):
    if key not in state_dict:
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        near = keys_under(state_dict, parent)[:8]
        raise CheckpointError(f"state_dict has no key '{key}' (keys under '{parent}': {near})")
    return to_numpy(state_dict[key])


def _torch_conv_to_flax(weight: np.ndarray, key: str) -> np.ndarray:
    if weight.ndim != 3:
        raise ShapeError(f"'{key}': expected a Conv1d weight [C_out, C_in, K], got {weight.shape}")
    return np.ascontiguousarray(weight.transpose(2, 1, 0))


def conv1d_from_torch(state_dict: Mapping[str, Any], prefix: str,
                      weight_norm: Optional[bool] = None) -> Params:
    """Params of one `WNConv1d` from the PyTorch Conv1d at `prefix` (Conv1d only: a
    ConvTranspose1d's weight is `[C_in, C_out, K]`, see `conv_transpose1d_from_torch`).

    Finds old-style (`weight_g`/`weight_v`), parametrization-style
    (`parametrizations.weight.original0/1`) or plain (`weight`) keys. `weight_norm=None`
    keeps what was found; `False` folds g * v / ||v|| into a plain `kernel`; `True` turns a
    plain weight into (v = w, g = ||w||). The bias is copied when present.
    """
    params: Params = {}
    found = None
    for g_name, v_name in _WN_KEYS:
        if join(prefix, v_name) in state_dict:
            found = (join(prefix, g_name), join(prefix, v_name))
            break
    if found is not None:
        g_key, v_key = found
        v = _torch_conv_to_flax(_get(state_dict, v_key), v_key)
        g = _get(state_dict, g_key).reshape(-1)
        if g.shape[0] != v.shape[-1]:
            raise ShapeError(f"'{g_key}' has {g.shape[0]} entries for "
                             f"{v.shape[-1]} output channels")
        if weight_norm is False:
            params["kernel"] = v * (g / np.sqrt(np.sum(v * v, axis=(0, 1), keepdims=True)))
        else:
            params["weight_v"], params["weight_g"] = v, g
    else:
        w_key = join(prefix, "weight")
        w = _torch_conv_to_flax(_get(state_dict, w_key), w_key)
        if weight_norm:
            params["weight_v"] = w
            params["weight_g"] = np.sqrt(np.sum(w * w, axis=(0, 1))).astype(np.float32)
        else:
            params["kernel"] = w
    b_key = join(prefix, "bias")
    if b_key in state_dict:
        params["bias"] = _get(state_dict, b_key).reshape(-1)
    return params


def conv_transpose1d_from_torch(state_dict: Mapping[str, Any], prefix: str) -> Params:
    """Params of `motion.vae.ConvTranspose1dStrided` from the PyTorch ConvTranspose1d at
    `prefix` (GeneFace's `vae.decoder.pre_net.0`): weight `[C_in, C_out, K]` -> kernel
    `[K, C_in, C_out]` (`conv1d_from_torch` reads Conv1d's `[C_out, C_in, K]` and would
    give the wrong orientation here)."""
    key = join(prefix, "weight")
    w = _get(state_dict, key)
    if w.ndim != 3:
        raise ShapeError(f"'{key}': expected a ConvTranspose1d weight [C_in, C_out, K], got "
                         f"{w.shape}")
    params = {"kernel": np.ascontiguousarray(w.transpose(2, 0, 1))}
    b_key = join(prefix, "bias")
    if b_key in state_dict:
        params["bias"] = _get(state_dict, b_key).reshape(-1)
    return params


def _count_indexed(state_dict, prefix: str) -> int:
    pattern = re.compile(re.escape(join(prefix, "")) + r"(\d+)\.")
    found = {int(m.group(1)) for k in state_dict for m in [pattern.match(k)] if m}
    return max(found) + 1 if found else 0


def wavenet_from_torch(state_dict: Mapping[str, Any], prefix: str,
                       num_layers: Optional[int] = None) -> Params:
    """Params of `WaveNet` from GeneFace's `WN` or VITS' `VitsWaveNet` at `prefix`.

    `num_layers=None` counts `in_layers.{i}`; a given count must match the state_dict.
    `cond_layer` is converted when present.
    """
    found = _count_indexed(state_dict, join(prefix, "in_layers"))
    if num_layers is None:
        num_layers = found
    if found != num_layers or num_layers == 0:
        raise CheckpointError(f"state_dict holds {found} WaveNet layers under "
                              f"'{join(prefix, 'in_layers')}', expected {num_layers}")
    params: Params = {}
    if keys_under(state_dict, join(prefix, "cond_layer")):
        params["cond_layer"] = conv1d_from_torch(state_dict, join(prefix, "cond_layer"),
                                                 weight_norm=True)
    for i in range(num_layers):
        params[f"in_layers_{i}"] = conv1d_from_torch(state_dict, join(prefix, f"in_layers.{i}"),
                                                     weight_norm=True)
        params[f"res_skip_layers_{i}"] = conv1d_from_torch(
            state_dict, join(prefix, f"res_skip_layers.{i}"), weight_norm=True)
    return params


_COUPLING_NAMES = {"vits": ("conv_pre", "wavenet", "conv_post"),
                   "geneface": ("pre", "enc", "post")}


def _coupling_style(state_dict, prefix: str) -> str:
    for style, (pre, _, _) in _COUPLING_NAMES.items():
        if join(prefix, f"{pre}.weight") in state_dict:
            return style
    raise CheckpointError(f"no coupling layer (conv_pre.weight or pre.weight) under "
                          f"'{prefix}' in the state_dict")


def coupling_layer_from_torch(state_dict: Mapping[str, Any], prefix: str,
                              num_layers: Optional[int] = None,
                              style: Optional[str] = None) -> Params:
    """Params of `ResidualCouplingLayer` from a VITS or GeneFace coupling layer at `prefix`.

    `style` is 'vits' (conv_pre/wavenet/conv_post) or 'geneface' (pre/enc/post); None
    detects it from the keys.
    """
    style = style or _coupling_style(state_dict, prefix)
    if style not in _COUPLING_NAMES:
        raise ValueError(f"style must be one of {sorted(_COUPLING_NAMES)}, got {style!r}")
    pre, enc, post = _COUPLING_NAMES[style]
    return {"pre": conv1d_from_torch(state_dict, join(prefix, pre), weight_norm=False),
            "enc": wavenet_from_torch(state_dict, join(prefix, enc), num_layers),
            "post": conv1d_from_torch(state_dict, join(prefix, post), weight_norm=False)}


def coupling_block_from_torch(state_dict: Mapping[str, Any], prefix: str,
                              num_layers: Optional[int] = None,
                              num_flows: Optional[int] = None,
                              style: Optional[str] = None) -> Params:
    """Params of `ResidualCouplingBlock` from VITS' (`flows.{i}`) or GeneFace's
    (`flows.{2i}`, flips in between) residual coupling block at `prefix`."""
    flows = join(prefix, "flows")
    style = style or _coupling_style(state_dict, join(flows, "0"))
    stride = 2 if style == "geneface" else 1
    found = (_count_indexed(state_dict, flows) + stride - 1) // stride
    if num_flows is None:
        num_flows = found
    if found != num_flows or num_flows == 0:
        raise CheckpointError(f"state_dict holds {found} coupling layers under '{flows}', "
                              f"expected {num_flows}")
    return {f"flows_{i}": coupling_layer_from_torch(state_dict, join(flows, str(stride * i)),
                                                    num_layers, style)
            for i in range(num_flows)}


def posterior_encoder_from_torch(state_dict: Mapping[str, Any], prefix: str = "",
                                 num_layers: Optional[int] = None) -> Params:
    """Params of `PosteriorEncoder` from transformers' `VitsPosteriorEncoder` at `prefix`."""
    return {"conv_pre": conv1d_from_torch(state_dict, join(prefix, "conv_pre"), False),
            "wavenet": wavenet_from_torch(state_dict, join(prefix, "wavenet"), num_layers),
            "conv_proj": conv1d_from_torch(state_dict, join(prefix, "conv_proj"), False)}
