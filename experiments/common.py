"""Shared pieces of the absl entry points: the common flag vocabulary and error handling.

Every training entry point takes `--data`, `--workdir`, `--steps`, `--batch_size`,
`--seed`, `--config=paper|small` and the multi-host flags (`--distributed`, ...); bad
input (a `GenefaceError`) is printed as one line without a traceback and exits with
status 2.
"""

import ctypes
import os
import sys
import time

from absl import app
from absl import flags

from geneface_jax.errors import GenefaceError

FLAGS = flags.FLAGS


def define_common_flags(*, steps, batch_size, data_help="Dataset directory."):
    """Defines --data, --workdir, --steps, --batch_size, --seed, --config."""
    flags.DEFINE_string("data", None, data_help)
    flags.DEFINE_string("workdir", None, "Run directory: checkpoints/, metrics.jsonl, tb/, "
                        "metrics.json. An existing run there is resumed.")
    flags.DEFINE_integer("steps", steps, "Total training steps (paper default).")
    flags.DEFINE_integer("batch_size", batch_size, "Global batch size (split over devices).")
    flags.DEFINE_integer("seed", 0, "Random seed (initialisation, data order, sampling).")
    flags.DEFINE_enum("config", "paper", ["paper", "small"],
                      "paper: GeneFace's sizes; small: the documented CPU config.")
    flags.DEFINE_integer("log_every", 50, "Log/progress interval in steps.")
    flags.DEFINE_integer("checkpoint_every", 500, "Checkpoint interval in steps.")
    define_distributed_flags()


def define_distributed_flags():
    """Defines --distributed, --coordinator_address, --num_processes, --process_id."""
    flags.DEFINE_bool("distributed", False,
                      "Join a multi-host run (jax.distributed.initialize) before any JAX "
                      "work: every host runs the same command. Without the three flags "
                      "below the cluster is detected (SLURM, Open MPI, Cloud TPU pods).")
    flags.DEFINE_string("coordinator_address", None,
                        "With --distributed: host:port of process 0, the same on every host.")
    flags.DEFINE_integer("num_processes", None, "With --distributed: number of processes.")
    flags.DEFINE_integer("process_id", None,
                         "With --distributed: this process' index in [0, num_processes).")


def _maybe_initialize_distributed():
    if "distributed" not in FLAGS:
        return
    explicit = {k: FLAGS[k].value for k in ("coordinator_address", "num_processes",
                                            "process_id") if FLAGS[k].value is not None}
    if not FLAGS.distributed:
        if explicit:
            raise app.UsageError(f"--{sorted(explicit)[0]} needs --distributed")
        return
    n, pid = explicit.get("num_processes"), explicit.get("process_id")
    if n is not None and n < 1:
        raise app.UsageError(f"--num_processes must be >= 1, got {n}")
    if pid is not None and (pid < 0 or n is not None and pid >= n):
        raise app.UsageError(f"--process_id must be in [0, --num_processes), got {pid}")
    from geneface_jax.train import parallel
    parallel.initialize_distributed(**explicit)


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def tune_host_malloc():
    """Keeps XLA:CPU's per-step buffers in reused memory; call before JAX starts.

    XLA:CPU allocates a step's temporaries (hundreds of MB for a NeRF step) with
    `posix_memalign` from its worker threads. glibc serves those threads from per-thread
    arenas, which cannot hold such blocks, so every step maps fresh pages and unmaps them
    again: ~100k page faults and ~0.3 s of kernel time per 1024-ray head-NeRF step on a
    2-core VM (`python -m experiments.bench.nerf --system_malloc` reports them). One arena
    (`M_ARENA_MAX` 1), no `mmap` for large blocks (`M_MMAP_MAX` 0) and no trimming
    (`M_TRIM_THRESHOLD` -1) let the freed block be reused by the next step: the process
    keeps its peak heap instead of returning it to the system. Must run before the threads
    exist (before the first JAX computation). No-op off glibc Linux or when
    `GENEFACE_SYSTEM_MALLOC=1`; returns whether the settings were applied."""
    if os.environ.get("GENEFACE_SYSTEM_MALLOC") == "1" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):      # not glibc (e.g. musl)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all([mallopt(_M_ARENA_MAX, 1) == 1, mallopt(_M_MMAP_MAX, 0) == 1,
                mallopt(_M_TRIM_THRESHOLD, -1) == 1])


def host_malloc_setting(system_malloc: bool) -> str:
    """For benchmarks: tunes the allocator unless `system_malloc` (or the
    GENEFACE_SYSTEM_MALLOC opt-out) says not to; returns the label the bench reports."""
    if system_malloc or not tune_host_malloc():
        return "system"
    return "tuned (experiments.common.tune_host_malloc)"


def require(*names):
    for name in names:
        if not getattr(FLAGS, name):
            raise app.UsageError(f"--{name} is required")


def run(main):
    """`app.run(main)`, printing GenefaceErrors as `error: ...` and exiting with 2; the
    host allocator is tuned for XLA:CPU first (`tune_host_malloc`)."""
    def wrapped(argv):
        tune_host_malloc()
        from absl import logging
        if not FLAGS["verbosity"].present:   # orbax logs every save at INFO
            logging.set_verbosity(logging.WARNING)
        try:
            _maybe_initialize_distributed()
            return main(argv)
        except GenefaceError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    app.run(wrapped)


def prepare_workdir(workdir, run_cfg):
    """Creates `workdir` and writes `config.json`; refuses (CheckpointError) a workdir that
    holds a run with another configuration, before anything in it is touched."""
    import json
    import pathlib
    from geneface_jax.errors import CheckpointError
    from geneface_jax.train.metrics import _plain, write_json_atomic
    from geneface_jax.train.parallel import is_main_process
    workdir = pathlib.Path(workdir)
    path = workdir / "config.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = None
        if old != _plain(run_cfg):
            diff = sorted(k for k in set(old or {}) | set(run_cfg)
                          if (old or {}).get(k) != _plain(run_cfg).get(k))
            raise CheckpointError(f"{workdir}: holds a run with a different configuration "
                                  f"(differs in {diff}); use another --workdir")
    workdir.mkdir(parents=True, exist_ok=True)
    if is_main_process():                 # several hosts: the main process writes
        write_json_atomic(path, run_cfg)
    return workdir


class Timer:
    def __init__(self):
        self.t0 = time.time()

    def minutes(self):
        return (time.time() - self.t0) / 60.0
