"""The resumable training loop every stage uses: data in, pure step, metrics, checkpoints.

What an interruption costs (`train_loop`):
- kill -9 (or a crash, a power cut): the steps since the last periodic checkpoint; a save
  in flight is discarded (orbax writes to a temporary directory and renames it).
- SIGTERM / SIGINT (a scheduler's preemption, Ctrl-C): nothing. The current step finishes,
  a checkpoint of that step is written and waited for, one line is logged and `Preempted`
  is raised (entry points exit with status 75); the same command resumes from that step.
  On several hosts the JAX preemption service picks one step at which every host saves.
- a damaged checkpoint (truncated or missing array files, unreadable metadata): it is
  named, moved aside to `checkpoints/<step>.damaged` (never deleted) and the run resumes
  from the newest intact one.
A resumed run equals the uninterrupted one bit for bit (data, RNG and schedule are pure
functions of the step), and so does its log: rows past the restored step are dropped from
`metrics.jsonl` and hidden from TensorBoard (`MetricsWriter(start_step=)`).
"""

import json
import os
import pathlib
import signal
import sys
import threading

import jax
import numpy as np
from absl import logging

from geneface_jax.errors import CheckpointDamaged, CheckpointError, Preempted, WorkdirError
from geneface_jax import checkpoint as ckpt_lib
from geneface_jax.train import metrics as metrics_lib
from geneface_jax.train import parallel


def check_workdir(workdir):
    """Creates `workdir` and proves it writable by writing and removing a small file;
    WorkdirError naming the path otherwise (before anything is built or compiled)."""
    workdir = pathlib.Path(workdir)
    probe = workdir / f".write_probe.{jax.process_index()}.{os.getpid()}"
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"geneface-jax")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise WorkdirError(f"{workdir}: the run directory cannot be written "
                           f"({e.strerror or e}); use another --workdir") from e
    return workdir


def checkpoint_bytes(state):
    """About the bytes one checkpoint of `state` takes on disk: its arrays' bytes (shapes
    and dtypes, so a `jax.eval_shape` template works too)."""
    return int(sum(int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(state) if hasattr(x, "dtype")))


def check_disk(directory, state, max_to_keep=1):
    """WorkdirError when the disk holding `directory` has too little free space for one
    checkpoint of `state` (its array bytes + 10 % + 1 MiB), with the path and both sizes;
    a warning when it cannot hold `max_to_keep` + 1 of them (a save precedes the deletion
    of the oldest)."""
    size = checkpoint_bytes(state)
    need = int(size * 1.1) + (1 << 20)
    free = ckpt_lib.free_bytes(directory)
    mb = 1e6
    if free < need:
        raise WorkdirError(f"{directory}: its disk has {free / mb:.1f} MB free, too little "
                           f"for one checkpoint of this run (about {need / mb:.1f} MB: "
                           f"{size / mb:.1f} MB of arrays); free space or use another "
                           "--workdir")
    if free < need * (max_to_keep + 1):
        logging.warning("%s: %.1f MB free holds fewer than the %d checkpoints of %.1f MB "
                        "the run keeps while saving", directory, free / mb, max_to_keep + 1,
                        need / mb)


def prepare_workdir(workdir, run_config, run_controls=("run",)):
    """Creates `workdir` and writes the run's `config.json`; refuses a workdir that holds a
    run with another configuration before anything in it is touched.

    Args:
      workdir: the run directory.
      run_config: JSON-able dict of everything the run depends on (model, optimiser, data).
      run_controls: top-level keys that may differ on resume (steps, logging intervals).
    Raises:
      CheckpointError: `workdir/config.json` records another configuration; names the keys.
      WorkdirError: the workdir cannot be created or written.
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
    check_workdir(workdir)
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

    Before anything is compiled the workdir is proved writable and its disk checked to
    hold a checkpoint (WorkdirError). The newest intact checkpoint is resumed: a damaged
    one is moved aside (`<step>.damaged`) with a warning naming it. SIGTERM and SIGINT
    (for the loop's duration; the previous handlers are restored after) finish the
    current step, save it and raise `Preempted` (the module doc says what each
    interruption costs).
    Returns:
      (final state, last logged metrics as floats).
    Raises:
      WorkdirError, CheckpointError (another configuration; no intact checkpoint left),
      Preempted.
    """
    workdir = check_workdir(workdir)
    check_disk(workdir, state, max_to_keep)
    mesh = mesh or parallel.make_mesh()
    main = parallel.is_main_process()      # several hosts: one writes logs, all checkpoint
    progress = progress and main
    ckpt = ckpt_lib.Checkpointer(workdir / "checkpoints", max_to_keep=max_to_keep)
    try:
        state = _resume(ckpt, parallel.replicate(state, mesh), extra, name, progress)
    except BaseException:
        ckpt.close()
        raise
    step = int(state.step)
    run_step = parallel.data_parallel(step_fn, mesh, replicated=replicated)
    writer = (metrics_lib.MetricsWriter(workdir, start_step=step) if main
              else metrics_lib.NullWriter())
    prog = metrics_lib.Progress(num_steps, start_step=step, name=name)
    stop = StopRequest(ckpt, step)
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
            if step < num_steps and stop.requested(step):
                if ckpt.latest_step() != step:
                    ckpt.save(step, state, extra=extra, force=True)
                ckpt.wait()
                cause = stop.cause()
                logging.warning("%spreempted (%s) at step %d: checkpoint %d saved in %s",
                                name, cause, step, step, ckpt.directory)
                raise Preempted(f"{name}preempted ({cause}) at step {step}, checkpoint "
                                f"saved in {ckpt.directory}; rerun the same command to "
                                "resume", step=step)
        if ckpt.latest_step() != step:
            ckpt.save(step, state, extra=extra, force=True)
    finally:
        stop.restore()
        ckpt.close()
        writer.close()
    return state, last


def _resume(ckpt, state, extra, name, progress):
    """`state` restored from the newest intact checkpoint (`state` itself when there is
    none). Damaged checkpoints are moved aside, newest first, each with a warning; one of
    another configuration is a CheckpointError, as is having none intact left."""
    moved = []
    while (step := ckpt.latest_step()) is not None:
        try:
            saved_extra = ckpt.restore_extra(step)
            if extra is not None and saved_extra is not None and saved_extra != \
                    metrics_lib._plain(extra):
                raise CheckpointError(
                    f"{ckpt.directory}: checkpoints were written with a different "
                    f"configuration ({saved_extra}) than this run ({extra}); use another "
                    "--workdir")
            restored = ckpt.restore(state, step)
        except CheckpointDamaged as e:
            dst = ckpt.move_aside(step)
            moved.append(dst)
            logging.warning("%s%s; moved aside to %s", name, e, dst)
            continue
        if moved:
            logging.warning("%sresuming from step %d, the newest intact checkpoint in %s "
                            "(damaged, moved aside: %s)", name, step, ckpt.directory,
                            ", ".join(p.name for p in moved))
        logging.info("%sresumed from step %d", name, step)
        if progress:
            print(f"{name}resumed from step {step} ({ckpt.directory})", file=sys.stderr,
                  flush=True)
        return restored
    if moved:
        raise CheckpointError(f"{ckpt.directory}: no intact checkpoint left (damaged, moved "
                              f"aside: {', '.join(p.name for p in moved)}); rerunning starts "
                              "the run over from step 0")
    return state


class StopRequest:
    """SIGTERM / SIGINT as a request to stop after the current step (`requested(step)`).

    One host: the handlers (installed from the main thread only, for the loop's duration)
    set a flag. Several hosts: the JAX preemption service (`jax.distributed`, on by
    default) owns SIGTERM and tells every host; `requested` is orbax's
    `CheckpointManager.reached_preemption(step)` (`multihost_utils.
    reached_preemption_sync_point`), true on every host at the same step; SIGINT is
    passed on to it as a SIGTERM. With the service disabled the hosts share their flags
    each step (an all-gather). A second signal acts as it would without the loop."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, ckpt, step):
        self._ckpt = ckpt
        self._signal = None
        self._previous = {}
        self._hosts = jax.process_count()
        self._service = False
        if self._hosts > 1:
            from jax.experimental import multihost_utils
            try:
                multihost_utils.reached_preemption_sync_point(int(step))
                self._service = True
            except RuntimeError:               # jax_enable_preemption_service is off
                self._service = False
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in self.SIGNALS:
            if self._service and sig == signal.SIGTERM:
                continue                       # the preemption service's own handler
            previous = signal.getsignal(sig)
            if previous is None:               # a handler installed outside Python: keep
                continue
            self._previous[sig] = previous
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self._signal is not None:           # asked twice: behave as without the loop
            previous = self._previous.get(signum, signal.SIG_DFL)
            self.restore()
            if callable(previous):
                previous(signum, frame)
            elif previous == signal.SIG_DFL:
                os.kill(os.getpid(), signum)
            return
        self._signal = signal.Signals(signum).name
        if self._service:                      # tell every host through the service
            os.kill(os.getpid(), signal.SIGTERM)

    def requested(self, step):
        """Whether to stop after `step` (every host gets the same answer)."""
        if self._service:
            return self._ckpt.reached_preemption(step)
        if self._hosts > 1:
            from jax.experimental import multihost_utils
            flags = multihost_utils.process_allgather(np.int32(self._signal is not None))
            return bool(np.any(flags))
        return self._signal is not None

    def cause(self):
        return self._signal or "a preemption notice"

    def restore(self):
        """Puts the handlers back as they were before the loop."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}
