"""Checkpoints and run directories: orbax's CheckpointManager (atomic saves, keep-N, exact
restore) and what inference needs to read a training run without building its optimizer.

Training saves and resumes whole states (`Checkpointer.save` / `restore` into a template).
Inference reads a run's `config.json` (`read_run_config`) and its latest checkpoint as
saved (`restore_run`: plain nested dicts of arrays, no template, so no optimizer, optax or
training code is needed), then checks the variables it takes against the shapes its model
expects (`check_like`).
"""

import json
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

    def restore_saved(self, step=None):
        """The state saved at `step` (default latest) as it was saved: nested dicts (lists
        for tuples) of arrays, whatever type the saved state had. No template is needed:
        the tree and the shapes come from the checkpoint's metadata, and every leaf is
        restored on this process' first device. None if there is no checkpoint."""
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        reader = ocp.CheckpointManager(
            self.directory, item_handlers={"state": ocp.StandardCheckpointHandler(),
                                           "extra": ocp.JsonCheckpointHandler()})
        try:
            meta = reader.item_metadata(step)["state"]
            tree = getattr(meta, "tree", meta)
            here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            abstract = jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here), tree)
            out = reader.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
            raise CheckpointError(f"{self.directory}: checkpoint {step} cannot be read "
                                  f"({type(e).__name__}: {e})") from e
        finally:
            reader.close()
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


# --------------------------------------------------------------------------- reading runs

def read_run_config(workdir, stage):
    """The `config.json` of a training run in `workdir`, checked to be of `stage`
    ('syncnet', 'audio2motion', 'postnet' or 'nerf'); CheckpointError otherwise."""
    path = pathlib.Path(workdir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{workdir}: no {stage} run here (missing config.json)")
    try:
        cfg = json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if cfg.get("stage") != stage:
        raise CheckpointError(f"{workdir}: holds a {cfg.get('stage')!r} run, expected {stage!r}")
    return cfg


def restore_run(workdir):
    """The latest checkpoint of the run in `workdir` (under `workdir/checkpoints`) as saved
    (`Checkpointer.restore_saved`), as host arrays; CheckpointError if there is none."""
    ck = Checkpointer(pathlib.Path(workdir) / "checkpoints")
    try:
        saved = ck.restore_saved()
    finally:
        ck.close()
    if saved is None:
        raise CheckpointError(f"{workdir}: no checkpoint under {workdir}/checkpoints")
    return jax.device_get(saved)


def check_like(tree, template, what):
    """`tree` (e.g. restored variables) if it has `template`'s structure and leaf shapes
    (`template`: arrays or `jax.eval_shape` output); CheckpointError naming `what` and the
    first difference otherwise."""
    want = {jax.tree_util.keystr(k): tuple(v.shape)
            for k, v in jax.tree_util.tree_leaves_with_path(template)}
    got = {jax.tree_util.keystr(k): tuple(getattr(v, "shape", ()))
           for k, v in jax.tree_util.tree_leaves_with_path(tree)}
    if want != got:
        missing = sorted(set(want) - set(got))
        extra = sorted(set(got) - set(want))
        shapes = sorted(k for k in set(want) & set(got) if want[k] != got[k])
        detail = (f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}" if extra
                  else f"{shapes[0]} is {got[shapes[0]]}, the model's is {want[shapes[0]]}")
        raise CheckpointError(f"{what}: checkpoint does not match this model/config ({detail})")
    return tree
