"""Machine helpers shared by the benchmarks: the cores a run may use, the CPU's name, and
the median of a list of timings."""

import os
import platform


def restrict_cores(threads):
    """Limits this process to `threads` cores (before JAX starts its CPU backend, whose
    thread pool is sized by the CPU affinity; 0 = every core it may use). Returns the core
    count in use."""
    allowed = sorted(os.sched_getaffinity(0))
    if threads <= 0 or threads >= len(allowed):
        return len(allowed)
    os.sched_setaffinity(0, allowed[:threads])
    return threads


def cpu_name():
    """The CPU model from /proc/cpuinfo (Linux), else platform's guess."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def median(xs):
    """The median of a non-empty sequence of numbers."""
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])
