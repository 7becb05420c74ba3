"""PyTorch -> Flax converters. `vits`: state_dict -> params of the motion networks'
WaveNets, flows and convs (equivalence tests, real checkpoints). `torch_pickle`:
`torch.save` files read without PyTorch and without running pickled code. `geneface`:
GeneFace's own checkpoints, every stage, key by key; `geneface_import`: such a checkpoint
-> a workdir the project's loaders read (`python -m experiments.import_geneface`,
docs/import_geneface.md). HuBERT's converter is `audio.hubert_weights` (the audio layer
loads HuBERT checkpoints itself); the key helpers are `geneface_jax.state_dict`'s."""

from geneface_jax.convert.vits import (
    conv1d_from_torch,
    conv_transpose1d_from_torch,
    coupling_block_from_torch,
    coupling_layer_from_torch,
    posterior_encoder_from_torch,
    wavenet_from_torch,
)
from geneface_jax.state_dict import join, keys_under, to_numpy

__all__ = [
    "conv1d_from_torch",
    "conv_transpose1d_from_torch",
    "coupling_block_from_torch",
    "coupling_layer_from_torch",
    "join",
    "keys_under",
    "posterior_encoder_from_torch",
    "to_numpy",
    "wavenet_from_torch",
]
