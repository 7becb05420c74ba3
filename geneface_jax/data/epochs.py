"""The order in which training reads examples: a pure function of (seed, step).

Every stage's batches come from `epoch_indices`, so a run killed at any step and resumed
from its checkpoint sees exactly the data the uninterrupted run would have seen.
"""

import numpy as np

from geneface_jax.errors import ShapeError


def epoch_indices(seed, step, num_examples, batch_size):
    """Example indices `[batch_size]` of training step `step`.

    Examples are read as one endless stream made of one fresh permutation per epoch
    (seeded by `seed` and the epoch number); step s takes stream positions
    [s * batch_size, (s + 1) * batch_size). Every example appears exactly once per epoch,
    and any step's batch is computable directly, which makes resumed runs exact.
    """
    if num_examples < 1 or batch_size < 1:
        raise ShapeError(f"need num_examples >= 1 and batch_size >= 1, got "
                         f"{num_examples}, {batch_size}")
    pos = np.arange(step * batch_size, (step + 1) * batch_size, dtype=np.int64)
    epochs, offsets = np.divmod(pos, num_examples)
    out = np.empty(batch_size, np.int64)
    for epoch in np.unique(epochs):
        perm = np.random.default_rng([seed, int(epoch)]).permutation(num_examples)
        sel = epochs == epoch
        out[sel] = perm[offsets[sel]]
    return out
