"""Training infrastructure: state, data parallelism, metrics, the loop (checkpoints:
`geneface_jax.checkpoint`; the device mesh: `geneface_jax.mesh`)."""

from geneface_jax.train.loop import step_key, train_loop
from geneface_jax.train.metrics import (MetricsWriter, Progress, write_final_metrics,
                                        write_json_atomic)
from geneface_jax.train.parallel import (DATA_AXIS, data_parallel, device_rng, global_mean,
                                         global_normal, initialize_distributed,
                                         is_main_process, make_mesh, pmean, replicate,
                                         shard_batch)
from geneface_jax.train.state import TrainState, grads_finite, lr_schedule, make_optimizer

__all__ = ["step_key", "train_loop", "MetricsWriter",
           "Progress", "write_final_metrics", "write_json_atomic", "DATA_AXIS",
           "data_parallel", "device_rng", "global_mean", "global_normal",
           "initialize_distributed", "is_main_process", "make_mesh", "pmean", "replicate",
           "shard_batch",
           "TrainState", "grads_finite", "lr_schedule", "make_optimizer"]
