"""Shared pieces of the absl entry points: the common flag vocabulary and error handling.

Every training entry point takes `--data`, `--workdir`, `--steps`, `--seed`,
`--config=paper|cpu|tiny` (a preset of `experiments/configs/STAGE.py`, overridable as
`--config.model.width=64`) and the multi-host flags (`--distributed`, ...); bad input (a
`GenefaceError`, a bad config) is printed as one `error:` line without a traceback and
exits with status 2. A training run stopped by SIGTERM / SIGINT (`errors.Preempted`: the
step it stopped at is saved) prints its `error: ... preempted ...` line and exits with
status 75 (`errors.PREEMPTED_EXIT_STATUS`, EX_TEMPFAIL): rerun the same command to resume.
"""

import ctypes
import hashlib
import os
import pathlib
import platform
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from geneface_jax.errors import PREEMPTED_EXIT_STATUS, GenefaceError, Preempted

FLAGS = flags.FLAGS


CONFIG_DIR = pathlib.Path(__file__).resolve().parent / "configs"


def define_run_flags(stage, *, data_help="Dataset directory.", models=None):
    """Defines the flags of a training command whose hyper-parameters live in
    `experiments/configs/STAGE.py`: --config (a preset name, `FILE.py:preset`, and
    `--config.a.b=value` overrides), --data, --workdir, --steps and --seed (both override
    the config's `run.steps` / `seed` when given) and the multi-host flags.

    `models` ({name: config file stem}, the first the default) also defines --model, which
    picks the config file that --config's preset names (and its default) refer to, e.g.
    {"mlp": "nerf", "grid": "grid"}; `stage` is then the default model's file."""
    define_config_flag(stage)
    if models:
        flags.DEFINE_enum("model", next(iter(models)), list(models),
                          "Model family; picks the config file: " + ", ".join(
                              f"{m} = experiments/configs/{f}.py" for m, f in models.items()))
        _MODEL_FILES.update({m: CONFIG_DIR / f"{f}.py" for m, f in models.items()})
    flags.DEFINE_string("data", None, data_help)
    flags.DEFINE_string("workdir", None, "Run directory: config.json, checkpoints/, "
                        "metrics.jsonl, tb/, metrics.json. An existing run there is resumed.")
    flags.DEFINE_integer("steps", None, "Total training steps (default: the config's).")
    flags.DEFINE_integer("seed", None, "Random seed (default: the config's, 0).")
    define_distributed_flags()


def define_config_flag(stage, default="paper", presets="paper, cpu, tiny"):
    """Defines --config: a preset of `experiments/configs/STAGE.py` by name (`--config=cpu`),
    or `FILE.py:ARG`, with `--config.a.b=value` overrides."""
    config_flags.DEFINE_config_file(
        "config", str(CONFIG_DIR / f"{stage}.py") + f":{default}",
        f"Preset of experiments/configs/{stage}.py ({presets}) or FILE.py:ARG; override "
        "single values with --config.a.b=value.", lock_config=True)
    _CONFIG_FILES["config"] = CONFIG_DIR / f"{stage}.py"


def run_config():
    """The parsed config with --steps / --seed applied (a copy: FLAGS.config stays as
    given)."""
    config = FLAGS.config.copy_and_resolve_references()
    with config.unlocked():
        if FLAGS.steps is not None:
            config.run.steps = FLAGS.steps
        if FLAGS.seed is not None:
            config.seed = FLAGS.seed
    return config


# flag name -> the config file whose preset `--flag=NAME` names (see `_expand_presets`)
_CONFIG_FILES = {}
# --model value -> the config file it picks for --config (`define_run_flags(models=...)`)
_MODEL_FILES = {}


def _expand_presets(argv):
    """`--config=cpu` -> `--config=<the stage's config file>:cpu`: a bare preset name (no
    `.py`, no path) picks a preset of the command's own config file (with --model: the
    model's file, whose `paper` preset is then also the default)."""
    files = dict(_CONFIG_FILES)
    model = _model_value(argv)
    if model in _MODEL_FILES and files.get("config") != _MODEL_FILES[model]:
        files["config"] = _MODEL_FILES[model]
        if not any(a == "--config" or a.startswith("--config=") for a in argv[1:]):
            argv = [*argv[:1], f"--config={files['config']}:paper", *argv[1:]]
    out = []
    for arg in argv:
        for name, path in files.items():
            prefix = f"--{name}="
            if arg.startswith(prefix):
                value = arg[len(prefix):]
                if value and "/" not in value and ".py" not in value:
                    arg = f"{prefix}{path}:{value}"
        out.append(arg)
    return out


def _model_value(argv):
    """The value of the last `--model=X` / `--model X` in `argv` (None if absent)."""
    value = None
    for i, arg in enumerate(argv[1:], 1):
        if arg == "--":
            break
        if arg.startswith("--model="):
            value = arg[len("--model="):]
        elif arg == "--model" and i + 1 < len(argv):
            value = argv[i + 1]
    return value


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


HOST_DEVICES_ENV = "GENEFACE_HOST_DEVICES"
DEFAULT_HOST_DEVICES = 2


def split_host_cores():
    """Splits the host's cores into several XLA:CPU devices; call before JAX starts.

    Every command shards its rays (training batches, rendered frames) over all devices
    (`mesh.make_mesh`), but one XLA:CPU device runs many of a step's small operations on
    one thread; with the cores split into devices, the shards run side by side. On the
    2-core machine these commands are measured on, 2 devices instead of 1 render,
    synthesize and train faster (the figures: docs/stage3_nerf.md, "Rendering speed").
    Results agree to float rounding (the shards' gradients are summed across devices).

    The count: `$GENEFACE_HOST_DEVICES` if set, else `min(usable cores,
    DEFAULT_HOST_DEVICES)` (more devices were not measured: a bigger host may set it).
    Only the CPU backend is split (a GPU or TPU run is unchanged); nothing is changed
    when `$XLA_FLAGS` already sets `--xla_force_host_platform_device_count` or JAX has
    already started (no command module starts it on import: tested). Returns the count
    set, or None.
    """
    flags_now = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" in flags_now or _jax_started():
        return None
    env = os.environ.get(HOST_DEVICES_ENV, "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            raise GenefaceError(f"${HOST_DEVICES_ENV} must be a positive integer, got "
                                f"{env!r}") from None
        if n < 1:
            raise GenefaceError(f"${HOST_DEVICES_ENV} must be a positive integer, got {n}")
    else:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:                   # not Linux
            cores = os.cpu_count() or 1
        n = min(cores, DEFAULT_HOST_DEVICES)
    os.environ["XLA_FLAGS"] = (flags_now + f" --xla_force_host_platform_device_count={n}"
                               ).strip()
    return n


def _jax_started():
    """Whether JAX has created its backends (XLA_FLAGS are read then, once)."""
    try:
        from jax._src import xla_bridge
        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):       # another JAX: assume not started
        return False


CACHE_ENV = "GENEFACE_XLA_CACHE"
CACHE_MAX_BYTES = 2 << 30


def compilation_cache_dir():
    """Where the commands keep their compiled XLA programs between runs, or None (off).

    `$GENEFACE_XLA_CACHE` names the directory (`off` or `0` turns the cache off); by default
    `$XDG_CACHE_HOME/geneface_jax/xla` (`~/.cache/geneface_jax/xla`, beside the face
    models). Programs go to a subdirectory per host CPU (`_host_fingerprint`). None too
    when `$JAX_COMPILATION_CACHE_DIR` is set: JAX then uses that one itself (the test
    suite sets it).
    """
    env = os.environ.get(CACHE_ENV)
    if env is not None and env.strip().lower() in ("", "0", "off", "none", "false"):
        return None
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return None
    if env:
        base = pathlib.Path(env).expanduser()
    else:
        home = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
        base = pathlib.Path(home) / "geneface_jax" / "xla"
    return base / _host_fingerprint()


def _host_fingerprint():
    """A short hash of the machine's architecture, CPU model and CPU feature flags.
    XLA:CPU compiles for the host's instruction set, so a cache directory shared by
    different machines (a home directory on a network file system) keeps their programs
    apart."""
    text = [platform.machine()]
    try:
        with open("/proc/cpuinfo") as f:
            seen = set()
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("model name", "flags", "Features", "CPU part") and key not in seen:
                    seen.add(key)
                    text.append(line.strip())
    except OSError:
        text.append(platform.processor())
    return "host-" + hashlib.sha256("\n".join(text).encode()).hexdigest()[:12]


def enable_compilation_cache():
    """Points JAX's persistent compilation cache at `compilation_cache_dir()` (at most
    `CACHE_MAX_BYTES`, least recently used programs evicted first), so a command run again
    loads the programs it compiled before instead of compiling them (the renderer's
    compiles are most of a short clip's synthesis time). Every program is stored, also
    those that compile in under a second (JAX's default leaves them out; a synthesis has
    several, together ~3 s of a second run on the demo's clip, docs/stage3_nerf.md), unless
    `$JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS` says otherwise. A cached program is the
    compiled program itself, so results are unchanged. Returns the directory, or None
    when the cache is off or the directory cannot be created (then everything compiles
    as before)."""
    d = compilation_cache_dir()
    if d is None:
        return None
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    import jax
    jax.config.update("jax_compilation_cache_dir", str(d))
    jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return d


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
    """`app.run(main)`, printing GenefaceErrors as `error: ...` and exiting with 2 (75,
    `PREEMPTED_EXIT_STATUS`, for a preempted training run: rerunning resumes it); the
    host allocator is tuned for XLA:CPU first (`tune_host_malloc`)."""
    def wrapped(argv):
        tune_host_malloc()
        from absl import logging
        if not FLAGS["verbosity"].present:   # orbax logs every save at INFO
            logging.set_verbosity(logging.WARNING)
        try:
            if not ("distributed" in FLAGS and FLAGS.distributed):
                split_host_cores()
            _maybe_initialize_distributed()
            enable_compilation_cache()
            return main(argv)
        except Preempted as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(PREEMPTED_EXIT_STATUS)
        except GenefaceError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    app.run(wrapped, argv=_expand_presets(sys.argv), flags_parser=_parse_flags)


def _parse_flags(argv):
    """absl's flag parsing, except that a missing config file, an unknown preset or a bad
    `--config.*` override is one `error:` line with exit status 2, not a traceback (config
    files load lazily, so the config is loaded here once)."""
    try:
        rest = FLAGS(argv)
        for name in _CONFIG_FILES:
            FLAGS[name].value.to_dict()       # loads the file, applies the overrides
        return rest
    except flags.Error as e:
        cause = e.__cause__ or e.__context__
        other_flag = str(e).startswith("flag --") and not str(e).startswith("flag --config")
        if cause is not None and not other_flag:     # e.g. a bad --model is absl's error
            _config_error(cause)
        print(f"FATAL Flags parsing error: {e}\nPass --helpshort or --helpfull to see help "
              "on flags.", file=sys.stderr)
        sys.exit(1)
    except Exception as e:                   # noqa: BLE001 - any failure of a config file
        _config_error(e)


def _config_error(e):
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    message = lines[-1] if lines else repr(e)
    if isinstance(e, (AttributeError, KeyError)):
        message = f"no such key {message} in the config"
    print(f"error: --config: {message}", file=sys.stderr)
    sys.exit(2)
