"""Metrics: JSON lines and TensorBoard events per step, metrics.json at the end, progress."""

import json
import math
import os
import pathlib
import sys
import time

import numpy as np

from geneface_jax import files
from geneface_jax.train.parallel import is_main_process


def _plain(value):
    """Converts JAX/NumPy scalars and arrays (nested in dicts/lists) to JSON-able values."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, bool)) or value is None:
        return value
    arr = np.asarray(value)
    if arr.ndim:
        return arr.tolist()
    if np.issubdtype(arr.dtype, np.integer):
        return int(arr)
    if np.issubdtype(arr.dtype, np.bool_):
        return bool(arr)
    return float(arr)


def write_json_atomic(path, obj):
    """Writes `obj` as JSON to `path` via a temporary file and a rename."""
    path = pathlib.Path(path)
    with files.atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_plain(obj), indent=1, sort_keys=True) + "\n")
    return path


def write_final_metrics(workdir, metrics):
    """Writes the run's final figures to `WORKDIR/metrics.json` (atomically; on several
    hosts only the main process writes)."""
    if is_main_process():
        write_json_atomic(pathlib.Path(workdir) / "metrics.json", metrics)


def truncate_jsonl(path, last_step):
    """Drops the rows of a metrics.jsonl whose step is past `last_step` (written by a run
    that was stopped after its last checkpoint) and any torn line; rewrites the file (write
    then rename) only if something goes. Returns the number of rows dropped."""
    path = pathlib.Path(path)
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            if int(row["step"]) <= last_step:
                keep.append(line)
                continue
        except (ValueError, KeyError, TypeError):
            pass
        dropped += 1
    if dropped:
        with files.atomic_path(path) as tmp:
            tmp.write_text("".join(f"{line}\n" for line in keep))
    return dropped


class MetricsWriter:
    """Appends `{"step": s, **scalars}` to WORKDIR/metrics.jsonl and TensorBoard events
    under WORKDIR/tb/ (tensorboardX, no TensorFlow).

    `start_step` (a run resumed from that step, 0 for a fresh one): rows past it are
    dropped from metrics.jsonl and the new events file starts with TensorBoard's purge
    marker at `start_step + 1` (`SummaryWriter(purge_step=)`: events of older files at
    or past it are hidden), so every step appears once, as in an uninterrupted run. Each
    writer opens its own events file (a name unique to the nanosecond and sorting in
    time order), never appending to or overwriting an older one."""

    def __init__(self, workdir, *, tensorboard=True, start_step=None):
        self.workdir = pathlib.Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        if start_step is not None:
            truncate_jsonl(self.workdir / "metrics.jsonl", int(start_step))
        self._jsonl = open(self.workdir / "metrics.jsonl", "a")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter
            tb = self.workdir / "tb"
            resumed = start_step is not None and tb.is_dir() and any(
                "tfevents" in p.name for p in tb.iterdir())
            self._tb = SummaryWriter(logdir=str(tb),
                                     purge_step=int(start_step) + 1 if resumed else None,
                                     filename_suffix=f".{time.time_ns()}.{os.getpid()}")

    def write(self, step, scalars):
        scalars = {k: _plain(v) for k, v in scalars.items()}
        self._jsonl.write(json.dumps({"step": int(step), **scalars}, sort_keys=True) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in scalars.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, int(step))
            self._tb.flush()

    def close(self):
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


class NullWriter:
    """A MetricsWriter that writes nothing (the other processes of a multi-host run)."""

    def write(self, step, scalars):
        del step, scalars

    def close(self):
        pass


def _duration(seconds):
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Progress:
    """A progress line `step 1200/40000 | 8.31 steps/s | ETA 1h17m | loss 0.123`."""

    def __init__(self, total_steps, *, start_step=0, stream=None, name=""):
        self.total = int(total_steps)
        self.start_step = int(start_step)
        self.stream = stream or sys.stderr
        self.name = name
        self._t0 = time.perf_counter()
        self._last = (self.start_step, self._t0)

    def rate(self, step):
        """Steps per second since the previous call (or the start)."""
        last_step, last_t = self._last
        now = time.perf_counter()
        rate = (step - last_step) / max(now - last_t, 1e-9)
        self._last = (step, now)
        return rate

    def line(self, step, scalars=None):
        rate = self.rate(step)
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        parts = [f"{self.name}step {step}/{self.total}", f"{rate:.2f} steps/s",
                 f"ETA {_duration(eta)}"]
        for k, v in (scalars or {}).items():
            v = _plain(v)
            if isinstance(v, float):
                parts.append(f"{k} {v:.4g}")
        return " | ".join(parts)

    def report(self, step, scalars=None):
        """Prints the line (on the main process only: one line per step on several hosts)."""
        if is_main_process():
            print(self.line(step, scalars), file=self.stream, flush=True)
