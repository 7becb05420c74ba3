"""Shared pieces of the absl entry points: the common flag vocabulary and error handling.

Every training entry point takes `--data`, `--workdir`, `--steps`, `--batch_size`,
`--seed` and `--config=paper|small`; bad input (a `GenefaceError`) is printed as one line
without a traceback and exits with status 2.
"""

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


def require(*names):
    for name in names:
        if not getattr(FLAGS, name):
            raise app.UsageError(f"--{name} is required")


def run(main):
    """`app.run(main)`, printing GenefaceErrors as `error: ...` and exiting with 2."""
    def wrapped(argv):
        from absl import logging
        if not FLAGS["verbosity"].present:   # orbax logs every save at INFO
            logging.set_verbosity(logging.WARNING)
        try:
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
    write_json_atomic(path, run_cfg)
    return workdir


class Timer:
    def __init__(self):
        self.t0 = time.time()

    def minutes(self):
        return (time.time() - self.t0) / 60.0
