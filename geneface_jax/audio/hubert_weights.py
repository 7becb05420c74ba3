"""PyTorch / safetensors HuBERT `state_dict` -> Flax params of `geneface_jax.audio.hubert`.

Takes the state_dict of transformers' `HubertModel` (keys `feature_extractor...`) or of
`HubertForCTC` (the same under `hubert.`, plus an `lm_head` that is ignored); values may be
torch tensors or NumPy arrays (safetensors). Returns nested dicts of float32 NumPy arrays
for `HubertModel(config).apply({'params': params}, ...)`. Every tensor's shape is checked
against the config.

Key mapping (PyTorch -> Flax):

    feature_extractor.conv_layers.{i}.conv.weight [C_out, C_in, K]
        -> feature_extractor/conv_layers_{i}/conv/kernel [K, C_in, C_out]   (+ bias)
    feature_extractor.conv_layers.{i}.layer_norm.{weight,bias}
        -> .../layer_norm/{scale,bias}   (layer 0 only for feat_extract_norm="group")
    feature_projection.layer_norm, .projection   -> feature_projection/layer_norm, /projection
    encoder.pos_conv_embed.conv.weight_g [1, 1, K] / parametrizations.weight.original0
        -> encoder/pos_conv_embed/weight_g [K]
    encoder.pos_conv_embed.conv.weight_v [H, H/G, K] / parametrizations.weight.original1
        -> encoder/pos_conv_embed/weight_v [K, H/G, H]
    encoder.pos_conv_embed.conv.bias              -> encoder/pos_conv_embed/bias
    encoder.layer_norm                            -> encoder/layer_norm
    encoder.layers.{i}.attention.{q,k,v,out}_proj, .layer_norm, .feed_forward.
        {intermediate,output}_dense, .final_layer_norm      -> encoder/layers_{i}/...
    Linear weight [out, in] -> kernel [in, out]; LayerNorm weight -> scale.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Mapping

import numpy as np

from geneface_jax.errors import CheckpointError
from geneface_jax.state_dict import join, keys_under, to_numpy

if TYPE_CHECKING:   # only for annotations: `audio.hubert` imports this module
    from geneface_jax.audio.hubert import HubertConfig

Params = Dict[str, Any]

_PROBE = "feature_projection.projection.weight"
_WEIGHT_NORM_KEYS = (("weight_g", "weight_v"),
                     ("parametrizations.weight.original0", "parametrizations.weight.original1"))


def _tensor(state_dict: Mapping[str, Any], key: str, shape) -> np.ndarray:
    """`state_dict[key]` as float32 NumPy, checked to have `shape`."""
    if key not in state_dict:
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        near = keys_under(state_dict, parent)[:8]
        raise CheckpointError(f"HuBERT state_dict has no key '{key}' "
                              f"(keys under '{parent}': {near})")
    value = to_numpy(state_dict[key])
    if tuple(value.shape) != tuple(shape):
        raise CheckpointError(f"HuBERT state_dict key '{key}' has shape {tuple(value.shape)}, "
                              f"the config needs {tuple(shape)}")
    return value


def _linear(sd, prefix: str, d_in: int, d_out: int) -> Params:
    return {"kernel": np.ascontiguousarray(_tensor(sd, join(prefix, "weight"), (d_out, d_in)).T),
            "bias": _tensor(sd, join(prefix, "bias"), (d_out,))}


def _layer_norm(sd, prefix: str, dim: int) -> Params:
    return {"scale": _tensor(sd, join(prefix, "weight"), (dim,)),
            "bias": _tensor(sd, join(prefix, "bias"), (dim,))}


def _feature_extractor(sd, prefix: str, config: HubertConfig) -> Params:
    params: Params = {}
    c_in = 1
    for i, (dim, kernel) in enumerate(zip(config.conv_dim, config.conv_kernel)):
        layer = join(prefix, f"conv_layers.{i}")
        w = _tensor(sd, join(layer, "conv.weight"), (dim, c_in, kernel))
        conv = {"kernel": np.ascontiguousarray(w.transpose(2, 1, 0))}
        if config.conv_bias:
            conv["bias"] = _tensor(sd, join(layer, "conv.bias"), (dim,))
        entry = {"conv": conv}
        if config.feat_extract_norm == "layer" or i == 0:
            entry["layer_norm"] = _layer_norm(sd, join(layer, "layer_norm"), dim)
        params[f"conv_layers_{i}"] = entry
        c_in = dim
    return params


def _pos_conv(sd, prefix: str, config: HubertConfig) -> Params:
    """weight-normed grouped conv (old or parametrization keys; a plain `weight` is
    accepted too and split into v = w, g = ||w|| per tap)."""
    k, h = config.num_conv_pos_embeddings, config.hidden_size
    shape_v = (h, h // config.num_conv_pos_embedding_groups, k)
    conv = join(prefix, "conv")
    for g_name, v_name in _WEIGHT_NORM_KEYS:
        if join(conv, v_name) in sd:
            v = _tensor(sd, join(conv, v_name), shape_v)
            g_key = join(conv, g_name)
            g = to_numpy(sd[g_key]) if g_key in sd else _tensor(sd, g_key, (1, 1, k))
            if g.size != k:
                raise CheckpointError(f"HuBERT state_dict key '{g_key}' has shape "
                                      f"{tuple(g.shape)}, the config needs (1, 1, {k})")
            break
    else:
        if join(conv, "weight") not in sd:
            raise CheckpointError(
                f"HuBERT state_dict has no key '{join(conv, 'weight_v')}' (nor "
                f"'{join(conv, 'parametrizations.weight.original1')}' or "
                f"'{join(conv, 'weight')}'; keys under '{conv}': {keys_under(sd, conv)[:8]})")
        v = _tensor(sd, join(conv, "weight"), shape_v)
        g = np.sqrt(np.sum(v * v, axis=(0, 1)))
    return {"weight_v": np.ascontiguousarray(v.transpose(2, 1, 0)),
            "weight_g": g.reshape(k).astype(np.float32),
            "bias": _tensor(sd, join(conv, "bias"), (h,))}


def _encoder_layer(sd, prefix: str, config: HubertConfig) -> Params:
    h, f = config.hidden_size, config.intermediate_size
    att = join(prefix, "attention")
    ff = join(prefix, "feed_forward")
    return {
        "attention": {name: _linear(sd, join(att, name), h, h)
                      for name in ("q_proj", "k_proj", "v_proj", "out_proj")},
        "layer_norm": _layer_norm(sd, join(prefix, "layer_norm"), h),
        "feed_forward": {"intermediate_dense": _linear(sd, join(ff, "intermediate_dense"), h, f),
                         "output_dense": _linear(sd, join(ff, "output_dense"), f, h)},
        "final_layer_norm": _layer_norm(sd, join(prefix, "final_layer_norm"), h),
    }


def resolve_prefix(state_dict: Mapping[str, Any], prefix: str = "") -> str:
    """`prefix`, or `prefix.hubert` when the HuBERT weights sit under `hubert.` (a
    `HubertForCTC` checkpoint). Raises CheckpointError when neither holds them."""
    if join(prefix, _PROBE) in state_dict:
        return prefix
    nested = join(prefix, "hubert")
    if join(nested, _PROBE) in state_dict:
        return nested
    raise CheckpointError(f"HuBERT state_dict has no key '{join(prefix, _PROBE)}' (nor "
                          f"'{join(nested, _PROBE)}'): not a HuBERT checkpoint under "
                          f"prefix '{prefix}' ({len(state_dict)} keys, e.g. "
                          f"{sorted(state_dict)[:5]})")


def hubert_from_torch(state_dict: Mapping[str, Any], config: HubertConfig,
                      prefix: str = "") -> Params:
    """Flax params of `HubertModel(config)` from a transformers HuBERT state_dict.

    `prefix` is the dotted path of the HuBERT model inside the state_dict ('' for a
    `HubertModel`); a further `hubert.` level (`HubertForCTC`) is detected. Keys outside
    the model (`lm_head`, `masked_spec_embed`) are ignored.

    Raises:
      CheckpointError: a missing key (named) or a tensor whose shape does not fit `config`.
    """
    prefix = resolve_prefix(state_dict, prefix)
    sd = state_dict
    c = config
    projection: Params = {}
    if c.feat_proj_layer_norm:
        projection["layer_norm"] = _layer_norm(sd, join(prefix, "feature_projection.layer_norm"),
                                               c.conv_dim[-1])
    projection["projection"] = _linear(sd, join(prefix, "feature_projection.projection"),
                                       c.conv_dim[-1], c.hidden_size)
    encoder: Params = {
        "pos_conv_embed": _pos_conv(sd, join(prefix, "encoder.pos_conv_embed"), c),
        "layer_norm": _layer_norm(sd, join(prefix, "encoder.layer_norm"), c.hidden_size),
    }
    for i in range(c.num_hidden_layers):
        encoder[f"layers_{i}"] = _encoder_layer(sd, join(prefix, f"encoder.layers.{i}"), c)
    extra = join(prefix, f"encoder.layers.{c.num_hidden_layers}")
    if keys_under(sd, extra):
        raise CheckpointError(f"HuBERT state_dict has more encoder layers than the config's "
                              f"num_hidden_layers={c.num_hidden_layers} (found '{extra}.*')")
    return {"feature_extractor": _feature_extractor(sd, join(prefix, "feature_extractor"), c),
            "feature_projection": projection,
            "encoder": encoder}
