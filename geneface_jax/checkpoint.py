"""Checkpoints and run directories: orbax's CheckpointManager (atomic saves, keep-N, exact
restore) and what inference needs to read a training run without building its optimizer.

Training saves and resumes whole states (`Checkpointer.save` / `restore` into a template).
Inference reads a run's `config.json` (`read_run_config`) and its latest checkpoint as
saved (`restore_run`: plain nested dicts of arrays, no template, so no optimizer, optax or
training code is needed), then checks the variables it takes against the shapes its model
expects (`check_like`).

Every read first checks the checkpoint's files (`Checkpointer.verify`): truncated or
missing array files and unreadable metadata raise `CheckpointDamaged` naming the step's
directory, never a traceback and never a configuration mismatch; a checkpoint that reads
on its own terms but not into the template is the configuration error (`CheckpointError`).
Training moves a damaged step aside (`move_aside`: `<step>.damaged`, never deleted) and
resumes from the newest intact one (`train.loop`).
"""

import json
import os
import pathlib
import shutil

import jax
import orbax.checkpoint as ocp

from geneface_jax.errors import CheckpointDamaged, CheckpointError

DAMAGED_SUFFIX = ".damaged"


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

    def step_dir(self, step):
        """The directory of checkpoint `step`."""
        return self.directory / str(int(step))

    def verify(self, step):
        """Checks checkpoint `step`'s files without a template: its state's metadata parses
        and every byte of its array database can be read (a truncated or missing data file
        fails), and its `extra` JSON parses. Raises CheckpointDamaged naming the step's
        directory and the first problem; returns None when the files are intact."""
        problem = damage(self.step_dir(step))
        if problem:
            raise CheckpointDamaged(f"{self.step_dir(step)}: checkpoint {int(step)} is "
                                    f"damaged ({problem})", step=int(step))

    def move_aside(self, step):
        """Renames checkpoint `step` to `<step>.damaged` (`.damaged.1`, ... if taken) so the
        run resumes from an older step; nothing is deleted. On several hosts every process
        calls this and process 0 renames. Returns the new path."""
        src = self.step_dir(step)
        dst = src.with_name(src.name + DAMAGED_SUFFIX)
        i = 0
        while dst.exists():
            i += 1
            dst = src.with_name(f"{src.name}{DAMAGED_SUFFIX}.{i}")
        _sync_hosts(f"geneface_move_aside_{int(step)}_a")
        if jax.process_index() == 0:
            os.rename(src, dst)
        _sync_hosts(f"geneface_move_aside_{int(step)}_b")
        self._manager.reload()
        return dst

    def reached_preemption(self, step):
        """True when every host of a multi-host run has reached the preemption sync point
        `step` (the JAX preemption service, through orbax); False on one host."""
        return self._manager.reached_preemption(int(step))

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

        self.verify(step)
        abstract = jax.tree.map(target, template)
        try:
            out = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        except Exception as e:                  # noqa: BLE001 - classified below
            # Intact files that do not restore into the template: read the checkpoint on
            # its own terms; if that works, the model/config differs, else it is damaged.
            try:
                saved = self._read_saved(step)
            except CheckpointDamaged:
                raise
            except Exception as e2:             # noqa: BLE001
                raise CheckpointDamaged(f"{self.step_dir(step)}: checkpoint {step} is "
                                        f"damaged (cannot be decoded: {_short(e2)})",
                                        step=step) from e
            detail = tree_difference(saved, template) or _short(e)
            raise CheckpointError(f"{self.directory}: checkpoint {step} does not match this "
                                  f"model/config ({detail})") from e
        return out["state"]

    def restore_saved(self, step=None):
        """The state saved at `step` (default latest) as it was saved: nested dicts (lists
        for tuples) of arrays, whatever type the saved state had. No template is needed:
        the tree and the shapes come from the checkpoint's metadata, and every leaf is
        restored on this process' first device. None if there is no checkpoint."""
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        self.verify(step)
        try:
            return self._read_saved(step)
        except Exception as e:                  # noqa: BLE001 - any failure to decode
            raise CheckpointDamaged(f"{self.step_dir(step)}: checkpoint {step} is damaged "
                                    f"(cannot be decoded: {_short(e)})", step=step) from e

    def _read_saved(self, step):
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
        finally:
            reader.close()
        return out["state"]

    def restore_extra(self, step=None):
        """The JSON dict saved with `step` (default latest), or None (no checkpoint, or
        one saved without it); CheckpointDamaged if it is there but unreadable."""
        step = self.latest_step() if step is None else step
        if step is None or not (self.step_dir(step) / "extra").is_dir():
            return None
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore()))
        except Exception as e:                  # noqa: BLE001 - any unreadable JSON
            raise CheckpointDamaged(f"{self.step_dir(step)}: checkpoint {step} is damaged "
                                    f"(extra: {_short(e)})", step=step) from e
        return out["extra"]

    def wait(self):
        self._manager.wait_until_finished()

    def close(self):
        self._manager.wait_until_finished()
        self._manager.close()


def _sync_hosts(name):
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def _short(e, limit=400):
    text = f"{type(e).__name__}: {e}" if not isinstance(e, OSError) else str(e)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + " ..."


def damage(step_dir):
    """What is wrong with the files of the checkpoint in `step_dir` (a string naming the
    first problem found), or None when they are intact: the state's `_METADATA` must parse,
    every value of its OCDBT array database must read in full (tensorstore checks each
    stored byte range against its file: a truncated or missing file fails), `extra`'s JSON
    must parse. Reads without a template, so a model or config mismatch is not damage."""
    step_dir = pathlib.Path(step_dir)
    if not step_dir.is_dir():
        return "its directory is missing"
    state = step_dir / "state"
    if not state.is_dir():
        return "state/ is missing"
    try:
        meta = json.loads((state / "_METADATA").read_text())
        if not isinstance(meta, dict) or "tree_metadata" not in meta:
            raise ValueError("no tree_metadata")
    except (OSError, ValueError, UnicodeDecodeError) as e:
        return f"state/_METADATA is unreadable: {_short(e)}"
    if meta.get("use_ocdbt", True):
        problem = _ocdbt_damage(state)
        if problem:
            return problem
    extra = step_dir / "extra"
    if extra.is_dir():
        try:
            json.loads((extra / "metadata").read_text())
        except (OSError, ValueError, UnicodeDecodeError) as e:
            return f"extra/metadata is unreadable: {_short(e)}"
    return None


def _ocdbt_damage(state):
    import tensorstore as ts
    if not (state / "manifest.ocdbt").is_file():
        return "state/manifest.ocdbt is missing"
    try:
        kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{state}/"}).result()
        keys = kv.list().result()
        if not keys:
            return "state/ holds no arrays"
        for key in keys:
            kv.read(key).result()
    except Exception as e:                      # noqa: BLE001 - tensorstore's errors
        return f"array data unreadable: {_short(e)}"
    return None


def _path_shapes(tree):
    """{path of names: shape} of a pytree's leaves: attribute, key and index entries all
    become names, so a dataclass state and the nested dicts it is saved as compare."""
    def name(k):
        for attr in ("name", "key", "idx"):
            if hasattr(k, attr):
                return str(getattr(k, attr))
        return str(k)
    return {"/".join(name(k) for k in path): tuple(getattr(v, "shape", ()))
            for path, v in jax.tree_util.tree_leaves_with_path(tree)}


def tree_difference(saved, template):
    """The first difference between a saved tree and a template (leaf paths and shapes) as
    a short string, or None when they agree."""
    got, want = _path_shapes(saved), _path_shapes(template)
    missing = sorted(set(want) - set(got))
    unexpected = sorted(set(got) - set(want))
    shapes = sorted(k for k in set(want) & set(got) if want[k] != got[k])
    if missing:
        return f"the checkpoint lacks {missing[:3]}"
    if unexpected:
        return f"the checkpoint has {unexpected[:3]}, which this model does not"
    if shapes:
        return f"{shapes[0]} is {got[shapes[0]]}, this model's is {want[shapes[0]]}"
    return None


def free_bytes(path):
    """Free bytes on the disk that holds `path` (its nearest existing ancestor)."""
    path = pathlib.Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


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
    (`Checkpointer.restore_saved`), as host arrays; CheckpointError if there is none,
    CheckpointDamaged (naming the step's directory and what is wrong) if it is damaged:
    inference never falls back to an older step on its own."""
    ck = Checkpointer(pathlib.Path(workdir) / "checkpoints")
    try:
        saved = ck.restore_saved()
    except CheckpointDamaged as e:
        older = sorted((s for s in ck.all_steps() if s != e.step), reverse=True)
        hint = (f"; rerunning the training command on {workdir} moves it aside and resumes "
                f"from step {older[0]}" if older else "")
        raise CheckpointDamaged(f"{e}{hint}", step=e.step) from e
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
