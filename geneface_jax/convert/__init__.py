"""PyTorch state_dict -> Flax params converters of the motion networks (for equivalence
tests and real checkpoints). HuBERT's converter is `audio.hubert_weights` (the audio layer
loads HuBERT checkpoints itself); the key helpers are `geneface_jax.state_dict`'s."""

from geneface_jax.convert.vits import (
    conv1d_from_torch,
    coupling_block_from_torch,
    coupling_layer_from_torch,
    posterior_encoder_from_torch,
    wavenet_from_torch,
)
from geneface_jax.state_dict import join, keys_under, to_numpy

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
