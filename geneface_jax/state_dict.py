"""Reading PyTorch `state_dict`s (torch tensors or NumPy arrays, e.g. from safetensors):
dotted keys and float32 copies. Shared by the HuBERT loader (`audio.hubert_weights`) and
the converters of `geneface_jax.convert`; torch itself is never imported here."""

from typing import Any, Mapping

import numpy as np


def join(prefix: str, name: str) -> str:
    """Dotted key `prefix.name` ('' prefix -> `name`)."""
    return f"{prefix}.{name}" if prefix else name


def to_numpy(value) -> np.ndarray:
    """A torch tensor or array-like -> float32 numpy array (copied, detached, on CPU)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().float().numpy()
    return np.array(value, dtype=np.float32)


def keys_under(state_dict: Mapping[str, Any], prefix: str):
    """Sorted keys of `state_dict` that lie inside the module at `prefix`."""
    if not prefix:
        return sorted(state_dict)
    return sorted(k for k in state_dict if k.startswith(prefix + "."))
