"""PyTorch state_dict -> Flax params converters (for equivalence tests and real checkpoints)."""

from geneface_jax.convert.vits import (
    conv1d_from_torch,
    coupling_block_from_torch,
    coupling_layer_from_torch,
    join,
    keys_under,
    posterior_encoder_from_torch,
    to_numpy,
    wavenet_from_torch,
)

__all__ = [
    "conv1d_from_torch",
    "coupling_block_from_torch",
    "coupling_layer_from_torch",
    "join",
    "keys_under",
    "posterior_encoder_from_torch",
    "to_numpy",
    "wavenet_from_torch",
]
