"""The resumable training loop every stage uses: data in, pure step, metrics, checkpoints."""

import json
import pathlib
import sys

import jax
from absl import logging

from geneface_jax.errors import CheckpointError
from geneface_jax import checkpoint as ckpt_lib
from geneface_jax.train import metrics as metrics_lib
from geneface_jax.train import parallel


def prepare_workdir(workdir, run_config, run_controls=("run",)):
    """Creates `workdir` and writes the run's `config.json`; refuses a workdir that holds a
    run with another configuration before anything in it is touched.

    Args:
      workdir: the run directory.
      run_config: JSON-able dict of everything the run depends on (model, optimiser, data).
      run_controls: top-level keys that may differ on resume (steps, logging intervals).
    Raises:
      CheckpointError: `workdir/config.json` records another configuration; names the keys.
    Returns:
      the workdir as a `pathlib.Path`.
    """
    workdir = pathlib.Path(workdir)
    path = workdir / "config.json"
    new = metrics_lib._plain(run_config)
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = {}
        keys = (set(old) | set(new)) - set(run_controls)
        diff = sorted(k for k in keys if old.get(k) != new.get(k))
        if diff:
            raise CheckpointError(f"{workdir}: holds a run with a different configuration "
                                  f"(differs in {diff}); use another --workdir")
    workdir.mkdir(parents=True, exist_ok=True)
    if parallel.is_main_process():             # several hosts: the main process writes
        metrics_lib.write_json_atomic(path, new)
    return workdir


def train_configured(*, run, run_config, run_controls=("run",), **kwargs):
    """`train_loop` driven by a run's configuration: the log, checkpoint and evaluation
    intervals from `run` (a config's `run` section), and `run_config` without its run
    controls (what `prepare_workdir` lets differ on resume) saved with every checkpoint."""
    return train_loop(log_every=run.log_every, checkpoint_every=run.checkpoint_every,
                      eval_every=run.eval_every,
                      extra={k: v for k, v in run_config.items() if k not in run_controls},
                      **kwargs)


def step_key(state, step):
    """The RNG key of `step`: a pure function of the state's key and the step number."""
    return jax.random.fold_in(state.rng, step)


def train_loop(*, workdir, state, step_fn, get_batch, num_steps, mesh=None, log_every=50,
               checkpoint_every=500, max_to_keep=3, extra=None, eval_fn=None, eval_every=0,
               progress=True, name="", replicated=()):
    """Runs (or resumes) training to `num_steps` steps.

    Args:
      workdir: run directory: `checkpoints/`, `metrics.jsonl`, `tb/`.
      state: a fresh TrainState (the template a checkpoint is restored into).
      step_fn: per-device `step_fn(state, batch, rng) -> (state, metrics)` averaging with
        `parallel.pmean`; wrapped here with `parallel.data_parallel`.
      get_batch: `get_batch(step) -> batch` (host arrays, global batch), a pure function of
        the step (use `data.epochs.epoch_indices`) so that a resumed run sees the same data.
      num_steps: total steps of the run (resuming at or past it only returns).
      mesh: device mesh (default: all devices).
      log_every, checkpoint_every: intervals in steps.
      extra: JSON-able dict saved with every checkpoint (e.g. the config); a resume whose
        `extra` differs from the saved one raises CheckpointError.
      eval_fn: optional `eval_fn(state, step) -> dict` run every `eval_every` steps.
      replicated: top-level batch entries every device sees whole (`parallel.shard_batch`).
    On several hosts (`parallel.initialize_distributed`) every process calls this with the
    same arguments; metrics.jsonl / tb / progress come from the main process only.
    Returns:
      (final state, last logged metrics as floats).
    """
    workdir = pathlib.Path(workdir)
    mesh = mesh or parallel.make_mesh()
    main = parallel.is_main_process()      # several hosts: one writes logs, all checkpoint
    progress = progress and main
    ckpt = ckpt_lib.Checkpointer(workdir / "checkpoints", max_to_keep=max_to_keep)
    state = parallel.replicate(state, mesh)
    if ckpt.latest_step() is not None:
        saved_extra = ckpt.restore_extra()
        if extra is not None and saved_extra is not None and saved_extra != \
                metrics_lib._plain(extra):
            raise CheckpointError(
                f"{ckpt.directory}: checkpoints were written with a different configuration "
                f"({saved_extra}) than this run ({extra}); use another --workdir")
        state = ckpt.restore(state)
        logging.info("%sresumed from step %d", name, int(state.step))
        if progress:
            print(f"{name}resumed from step {int(state.step)} ({ckpt.directory})",
                  file=sys.stderr, flush=True)
    step = int(state.step)
    run_step = parallel.data_parallel(step_fn, mesh, replicated=replicated)
    writer = metrics_lib.MetricsWriter(workdir) if main else metrics_lib.NullWriter()
    prog = metrics_lib.Progress(num_steps, start_step=step, name=name)
    last = {}
    try:
        while step < num_steps:
            batch = parallel.shard_batch(get_batch(step), mesh, replicated)
            state, metrics = run_step(state, batch, step_key(state, step))
            step += 1
            if step % log_every == 0 or step == num_steps:
                last = {k: float(v) for k, v in jax.device_get(metrics).items()}
                writer.write(step, last)
                if progress:
                    prog.report(step, last)
            if eval_fn is not None and eval_every and step % eval_every == 0:
                ev = {f"eval_{k}": v for k, v in eval_fn(state, step).items()}
                writer.write(step, ev)
                last.update(metrics_lib._plain(ev))
            if step % checkpoint_every == 0 and step < num_steps:
                ckpt.save(step, state, extra=extra)
        if ckpt.latest_step() != step:
            ckpt.save(step, state, extra=extra, force=True)
    finally:
        ckpt.close()
        writer.close()
    return state, last
