"""A toy regression trained with the project's training stack (used by the resume tests).

  python tests/scripts/toy_train.py --workdir=DIR --steps=60 --checkpoint_every=10 \
      [--all_devices] [--distributed --coordinator_address=... --num_processes=N --process_id=I]

Writes DIR/final_params.npz and DIR/metrics.json at the end.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from experiments import common  # noqa: E402
from geneface_jax import train  # noqa: E402
from geneface_jax.data.epochs import epoch_indices  # noqa: E402

NUM_EXAMPLES, DIM = 96, 8


class ToyModel(nn.Module):
    """Dense (no bias) -> BatchNorm (synced over the data axis) -> tanh -> Dense."""
    hidden: int = 16

    @nn.compact
    def __call__(self, x, train=False):
        h = nn.Dense(self.hidden, use_bias=False)(x)   # a bias before BN is unidentifiable
        h = nn.BatchNorm(use_running_average=not train, momentum=0.9,
                         axis_name=train_axis() if train else None)(h)
        return nn.Dense(1)(jnp.tanh(h))[..., 0]


def train_axis():
    return train.DATA_AXIS


def make_data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(NUM_EXAMPLES, DIM)).astype(np.float32)
    y = np.sin(x @ rng.normal(size=DIM)).astype(np.float32)
    return x, y


def make_state(seed=0, lr=1e-2):
    model = ToyModel()
    variables = model.init(jax.random.PRNGKey(seed), jnp.zeros((2, DIM)))
    tx = train.make_optimizer(lr, warmup_steps=5, decay_rate=0.5, decay_steps=50,
                              clip_norm=1.0)
    return train.TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                                   rng=seed, batch_stats=variables["batch_stats"])


def step_fn(state, batch, rng):
    """Per-device step: the global mean loss is differentiated (gradients all-reduced)."""
    noise = 0.01 * jax.random.normal(rng, ())   # exercises the step RNG deterministically

    def loss_fn(params):
        out, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats},
                                      batch["x"], train=True, mutable=["batch_stats"])
        return train.pmean(jnp.mean((out + noise - batch["y"]) ** 2)), updates

    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads, batch_stats=updates["batch_stats"])
    return state, {"loss": loss}


def batch_fn(x, y, batch_size, seed=0):
    def get_batch(step):
        idx = epoch_indices(seed, step, NUM_EXAMPLES, batch_size)
        return {"x": x[idx], "y": y[idx]}
    return get_batch


FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Run directory.")
flags.DEFINE_integer("steps", 60, "Total steps.")
flags.DEFINE_integer("checkpoint_every", 10, "Checkpoint interval.")
flags.DEFINE_integer("batch_size", 16, "Global batch size.")
flags.DEFINE_float("sleep", 0.0, "Seconds to sleep per step (lets a test kill mid-run).")
flags.DEFINE_bool("all_devices", False, "Mesh over every device (default: the first one).")
common.define_distributed_flags()


def main(argv):
    del argv
    import time
    x, y = make_data()
    get = batch_fn(x, y, FLAGS.batch_size)

    def slow_get(step):
        time.sleep(FLAGS.sleep)
        return get(step)

    state, last = train.train_loop(
        workdir=FLAGS.workdir, state=make_state(), step_fn=step_fn, get_batch=slow_get,
        num_steps=FLAGS.steps,
        mesh=train.make_mesh(None if FLAGS.all_devices else jax.devices()[:1]), log_every=5,
        checkpoint_every=FLAGS.checkpoint_every, extra={"model": "toy", "dim": DIM})
    params = jax.device_get(state.params)
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    if train.is_main_process():
        np.savez(os.path.join(FLAGS.workdir, "final_params.npz"), **flat)
    train.write_final_metrics(FLAGS.workdir, {"loss": last["loss"], "steps": FLAGS.steps,
                                              "devices": jax.device_count()})


if __name__ == "__main__":
    common.run(main)          # as the entry points: --distributed joins a multi-host run
