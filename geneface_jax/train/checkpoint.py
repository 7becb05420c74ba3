"""Checkpointing with orbax's CheckpointManager: atomic saves, keep-N, exact restore."""

import pathlib

import jax
import orbax.checkpoint as ocp

from geneface_jax.errors import CheckpointError


class Checkpointer:
    """Saves and restores a state pytree (plus a small JSON dict) under `directory`.

    Orbax writes each step to a temporary directory and renames it when complete, so a
    process killed mid-save leaves the previous checkpoints intact and the partial one is
    ignored (and cleaned up) by the next run.
    """

    def __init__(self, directory, *, max_to_keep=3):
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self):
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def all_steps(self):
        return list(self._manager.all_steps())

    def save(self, step, state, *, extra=None, force=False):
        """Saves `state` (and `extra`, a JSON-able dict) as checkpoint `step`."""
        args = {"state": ocp.args.StandardSave(state)}
        if extra is not None:
            args["extra"] = ocp.args.JsonSave(extra)
        return self._manager.save(int(step), args=ocp.args.Composite(**args), force=force)

    def restore(self, template, step=None):
        """Restores the state at `step` (default latest) into `template`'s structure,
        dtypes and shardings (a leaf without one goes to this process' first device);
        returns None if there is no checkpoint."""
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        # Leaves without a sharding (a `jax.eval_shape` template) are restored on this
        # process' first device, whatever topology (devices, hosts) saved them.
        here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

        def target(x):
            s = ocp.utils.to_shape_dtype_struct(x)
            if getattr(s, "sharding", None) is None:
                s = jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=here)
            return s

        abstract = jax.tree.map(target, template)
        try:
            out = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{self.directory}: checkpoint {step} does not match this "
                                  f"model/config ({e})") from e
        return out["state"]

    def restore_extra(self, step=None):
        """The JSON dict saved with `step` (default latest), or None."""
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore()))
        except (ValueError, KeyError, FileNotFoundError):
            return None
        return out["extra"]

    def wait(self):
        self._manager.wait_until_finished()

    def close(self):
        self._manager.wait_until_finished()
        self._manager.close()
