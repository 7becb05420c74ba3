"""What every JAX-vs-PyTorch benchmark here does alike: set up the process (cores, host
malloc, start time and load), check that both frameworks took the same first training
step, time the contenders interleaved, measure the machine's matmul peak in the same
minutes, try torch.compile with a fallback, and describe the run in the JSON line.

Timing rule: contenders are called in turn (rotating who goes first), so load from other
processes on this shared VM hits all alike; a rate is work per call over the median call
time. Checking rule: the JAX initial parameters are copied into the PyTorch reference
(`experiments.bench.torch_reference`), one step runs on both with the same batch and
noise, and the losses, gradient norms (relative error <= 1e-4) and parameters after the
first Adam update (`update_diff_over_lr` <= 1e-2) must agree, else the bench stops.
"""

import os
import platform
import resource
import time

from experiments.bench.machine import cpu_name, median, restrict_cores

CHECK_RTOL = 1e-4          # float32 agreement of the first step's losses and gradient norms
UPDATE_TOL = 1e-2          # parameters after the first Adam step, in units of its lr


class Run:
    """The process a benchmark runs in: `threads` cores (0: all allowed; restricted before
    JAX starts), glibc malloc tuned as the entry points tune it unless `system_malloc`
    (`tune_malloc=False`: left alone), the start time and 1-min load average."""

    def __init__(self, threads, system_malloc=False, tune_malloc=True):
        self.threads = restrict_cores(threads)
        self.malloc = None
        if tune_malloc:
            from experiments import common
            self.malloc = common.host_malloc_setting(system_malloc)
        self.t_start, self.load_start = time.perf_counter(), os.getloadavg()[0]

    def load(self):
        """(1-min load average at the start, now)."""
        return (self.load_start, os.getloadavg()[0])

    def info(self):
        """The JSON line's description of the machine and software."""
        import jax
        import torch
        out = {"threads": self.threads}
        if self.malloc is not None:
            out["host_malloc"] = self.malloc
        return {**out,
                "devices": f"1 JAX {jax.devices()[0].platform} device; {cpu_name()}, "
                           f"{os.cpu_count()} cores on the machine",
                "jax_version": jax.__version__, "torch_version": torch.__version__,
                "python": platform.python_version(),
                "loadavg_1min": [round(x, 2) for x in self.load()],
                "wall_seconds": round(time.perf_counter() - self.t_start, 1)}


def define_flags(config, steps, warmup, seed, malloc=True, presets=("paper", "small")):
    """The flags every JAX-vs-PyTorch bench defines: --config (one of `presets`), --steps,
    --warmup (with these defaults), --threads, --seed (`seed`: its help) and with `malloc`
    --system_malloc."""
    from absl import flags
    flags.DEFINE_enum("config", config, list(presets),
                      "paper: GeneFace's sizes; small / cpu: the documented CPU config; "
                      "tiny: the smoke-run sizes (experiments/configs/).")
    flags.DEFINE_integer("steps", steps, "Timed calls per contender.")
    flags.DEFINE_integer("warmup", warmup, "Untimed calls per contender after the first "
                         "(compiling) one.")
    flags.DEFINE_integer("threads", 0, "CPU cores for both sides (0: every core this process "
                         "may use). JAX is restricted by CPU affinity, PyTorch by "
                         "torch.set_num_threads.")
    flags.DEFINE_integer("seed", 0, seed)
    if malloc:
        flags.DEFINE_bool("system_malloc", False, "Leave glibc malloc at its defaults. By "
                          "default the process (both sides) runs with the allocator settings "
                          "the entry points use (experiments.common.tune_host_malloc: big "
                          "blocks reused, not re-mapped and page-faulted every step).")


def log(*args):
    """A progress line, flushed at once (the JSON line stays the last one)."""
    print(*args, flush=True)


def load_note(load, threads):
    """A warning when other processes loaded the machine during a multi-thread run."""
    cores = os.cpu_count() or 1
    if threads > 1 and max(load) > cores:
        return (f"measured under load from other processes (1-min load average up to "
                f"{max(load):.1f} on {cores} cores): PyTorch's OpenMP regions stall on "
                f"descheduled threads far more than XLA's thread pool, which flatters JAX; "
                f"--threads=1 compares per-core speed robustly")
    return ""


# --------------------------------------------------------------------------- checks

def rel_err(a, b):
    """|a - b| / |b| (b floored at 1e-12)."""
    return abs(float(a) - float(b)) / max(abs(float(b)), 1e-12)


def check_first_step(names, jax_metrics, torch_metrics, before, jax_after, torch_after,
                     grads, lr0, hint=""):
    """Compares the first training step of both frameworks; returns {name: error} (3
    significant digits), raises RuntimeError (with `hint`) on disagreement.

    `names`: the metrics to compare (those JAX reports), relative error <= CHECK_RTOL.
    `before`, `jax_after`, `torch_after`, `grads`: numpy parameters (and PyTorch's
    gradients) in one order. Adam's first update is lr0 * g / (|g| + eps) ~ lr0 sign(g) per
    entry, so the parameters after it are compared by the largest difference beyond two
    float32 spacings of the parameter, in units of lr0, over the entries whose gradient is
    at least 1e-6 (below, float noise of g decides the sign): `update_diff_over_lr`."""
    import numpy as np
    report, bad = {}, []
    for name in names:
        if name not in jax_metrics:
            continue
        err = rel_err(torch_metrics[name], jax_metrics[name])
        report[name] = err
        if err > CHECK_RTOL:
            bad.append(f"{name}: jax {float(jax_metrics[name]):.7g} vs torch "
                       f"{float(torch_metrics[name]):.7g} (rel {err:.2e})")
    upd = 0.0
    for p, a, b, g in zip(before, jax_after, torch_after, grads):
        slack = 2 * np.spacing(np.abs(p).astype(np.float32))
        diff = np.maximum(0.0, np.abs(a - b) - slack)
        upd = max(upd, float(np.max(np.where(np.abs(g) >= 1e-6, diff, 0.0), initial=0.0)))
    report["update_diff_over_lr"] = upd / lr0
    if upd / lr0 > UPDATE_TOL:
        bad.append(f"parameters after the first Adam step differ by {upd / lr0:.3g} x lr")
    if bad:
        raise RuntimeError("JAX and PyTorch training steps disagree: " + "; ".join(bad) +
                           (f" ({hint})" if hint else ""))
    return {k: float(f"{v:.2e}") for k, v in report.items()}


def check_close(what, jax_out, torch_out, atol):
    """The largest |JAX - PyTorch| over arrays (or pairs of sequences of arrays), logged;
    raises RuntimeError when it exceeds `atol`."""
    import numpy as np
    pairs = zip(jax_out, torch_out) if isinstance(jax_out, (list, tuple)) else \
        [(jax_out, torch_out)]
    err = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in pairs)
    log(f"{what}: max abs err {err:.2e}")
    if not err <= atol:
        raise RuntimeError(f"JAX and PyTorch differ: {what}: max abs err {err:.3g} > {atol}")
    return err


def first_step_check(names, jax_step, torch_step, module, jax_params, lr0, hint=""):
    """The start-up check of a bench: `module` is the PyTorch reference initialised with
    the JAX initial parameters (`jax_params` of them, which must be its trainable count).
    Runs `jax_step()` -> (metrics, {prefix in `module`: Flax variables after the step})
    and `torch_step()` -> metrics, and compares them (`check_first_step`). Returns (the
    report, JAX's metrics as floats)."""
    import jax
    from experiments.bench import torch_reference as tr
    num_torch = sum(p.numel() for p in tr.trainable(module))
    if num_torch != jax_params:
        raise RuntimeError(f"parameter counts differ: jax {jax_params}, torch {num_torch}")
    jax_metrics, trees = jax.device_get(jax_step())
    jax_metrics = {k: float(v) for k, v in jax_metrics.items()}
    before = tr.numpy_params(module)
    torch_metrics = torch_step()
    grads = [p.grad.numpy() for p in tr.trainable(module)]
    report = check_first_step(names, jax_metrics, torch_metrics, before,
                              tr.flax_params_in_torch_order(module, trees),
                              tr.numpy_params(module), grads, lr0, hint)
    log(f"first training step agrees (relative errors): {report}")
    return report, jax_metrics


def try_torch_compile(mode, build, off_note):
    """`mode` 'off': (None, None, off_note). Else runs `build()` (makes the compiled
    contender(s), runs and checks their first call) and returns (its result, seconds,
    note); on any failure 'on' re-raises, 'auto' returns (None, None, why)."""
    if mode == "off":
        return None, None, off_note
    try:
        t = time.perf_counter()
        out = build()
        seconds = time.perf_counter() - t
        log(f"torch.compile: first call (compile) {seconds:.1f} s")
        return out, seconds, f"compiled in {seconds:.0f} s"
    except Exception as e:  # noqa: BLE001 - report any failure of the compiler
        if mode == "on":
            raise
        note = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
        log(f"torch.compile {note}; using eager")
        return None, None, note


# --------------------------------------------------------------------------- timing

def jax_stepper(step, state, batches, keys, first=0):
    """`run(timed)`: one call of a compiled JAX training `step` on its own state, batch
    and key `i` (cycled) at its `i`-th call, counting from `first`, blocking until done.
    `run.box["state"]` is the state after the last call."""
    import jax
    box = {"state": state, "call": first}

    def run(timed=False):
        i = box["call"]
        box["state"], _ = step(box["state"], batches[i % len(batches)], keys[i % len(keys)])
        box["call"] += 1
        jax.block_until_ready(box["state"])

    run.box = box
    return run


def one_device_step(step_fn, state, host_batches, num_keys, replicated=()):
    """A library training step (`train_step(state, batch, rng)`) through
    `train.parallel.data_parallel` on a one-device mesh, lowered and compiled for the first
    batch. Returns a namespace: mesh, lowered, step (compiled), state and batches (on the
    mesh), keys (`loop.step_key(state, i)` for i < `num_keys`), compile_s."""
    import types
    import jax
    from geneface_jax.train import loop, parallel
    mesh = parallel.make_mesh(jax.devices()[:1])
    state = parallel.replicate(state, mesh)
    batches = [parallel.shard_batch(b, mesh, replicated) for b in host_batches]
    keys = [loop.step_key(state, i) for i in range(num_keys)]
    t = time.perf_counter()
    lowered = parallel.data_parallel(step_fn, mesh, replicated=replicated).lower(
        state, batches[0], keys[0])
    compiled = lowered.compile()
    return types.SimpleNamespace(mesh=mesh, lowered=lowered, step=compiled, state=state,
                                 batches=batches, keys=keys,
                                 compile_s=time.perf_counter() - t)


def nerf_person(o, window, num_batches):
    """The stage-3 benches' data: (views, `num_batches` host head-ray batches of `o.rays`
    rays of one frame, the first train frame's pose, landmark window and background) of a
    synthetic person (`o.seed`, `o.size`^2 pixels, `o.num_frames` frames)."""
    from geneface_jax.data.synthetic import world
    from geneface_jax.train import nerf
    arrays, meta, _ = world.make_person(o.seed, size=o.size, num_frames=o.num_frames,
                                        progress=False)
    views = nerf.PersonViews(dict(arrays, meta=meta))
    sampling = nerf.RaySamplingConfig(frames_per_step=1, rays_per_frame=o.rays)
    get_batch = nerf.make_batch_fn(views, nerf.HEAD, sampling, window=window, seed=o.seed)
    t = views.split_range("train")[0]
    return views, [get_batch(i) for i in range(num_batches)], {
        "pose": views.poses[t], "window": views.windows([t], window)[0],
        "background": views.background}


def timed_calls(contenders, warmup, steps, blocks=False):
    """Runs `contenders` [(name, fn(timed: bool))] `warmup + steps` times each: in turn,
    rotating who goes first, or with `blocks` each contender's calls in a row. Returns
    ({name: [seconds of the timed calls]}, {name: {"minor_faults": per timed call,
    "system_s": kernel CPU seconds per timed call}}) (this process' rusage over the call)."""
    times = {name: [] for name, _ in contenders}
    faults = {name: 0 for name, _ in contenders}
    system = {name: 0.0 for name, _ in contenders}
    n = len(contenders)
    if blocks:
        order = [(i, c) for c in contenders for i in range(warmup + steps)]
    else:
        order = [(i, c) for i in range(warmup + steps)
                 for c in contenders[i % n:] + contenders[:i % n]]
    for i, (name, fn) in order:
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t = time.perf_counter()
        fn(i >= warmup)
        if i >= warmup:
            times[name].append(time.perf_counter() - t)
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            faults[name] += r1.ru_minflt - r0.ru_minflt
            system[name] += r1.ru_stime - r0.ru_stime
    usage = {name: {"minor_faults": round(faults[name] / steps),
                    "system_s": round(system[name] / steps, 3)} for name in times}
    return times, usage


def log_medians(label, times, work=1.0, unit="steps"):
    """Logs each contender's median, min and max call in ms and `work` / median per
    second; returns {name: median seconds}."""
    med = {name: median(ts) for name, ts in times.items()}
    for name, ts in times.items():
        log(f"{label} {name}: median {med[name] * 1e3:.1f} ms (min {min(ts) * 1e3:.1f}, "
            f"max {max(ts) * 1e3:.1f}) = {work / med[name]:.4g} {unit}/s")
    return med


def speed_keys(med, ref, work=1.0, unit="steps", digits=4):
    """The JSON line's rates of JAX, of the reference PyTorch contender `ref` and of each
    PyTorch variant (`work` per median call of `med`, rounded to `digits`), and
    `speedup` = JAX's rate over the reference's."""
    rate = lambda n: round(work / med[n], digits) if n in med else None  # noqa: E731
    return {f"jax_{unit}_per_s": rate("jax"), f"torch_{unit}_per_s": rate(ref),
            "speedup": round(med[ref] / med["jax"], 3), "torch_reference": ref,
            f"torch_eager_{unit}_per_s": rate("torch_eager"),
            f"torch_compile_{unit}_per_s": rate("torch_compile")}


def time_calls(fn, repeats):
    """Median seconds of `repeats` calls of `fn` (which must block until done)."""
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return median(out)


def speech_audio(path, minutes):
    """The packaged speech clips in turn, repeated to `minutes` of 16 kHz mono audio."""
    import numpy as np

    from geneface_jax.audio import io as audio_io
    from geneface_jax.data.synthetic import speech
    if path.is_file():
        return path
    clips = [audio_io.load_audio(p) for p in sorted(speech.default_speech_dir().glob("*.wav"))]
    one = np.concatenate(clips)
    n = int(round(minutes * 60 * 16000))
    wav = np.tile(one, n // len(one) + 1)[:n]
    audio_io.save_wav(path, wav)
    return path
