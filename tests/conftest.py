"""Test configuration: 8 simulated CPU devices so multi-device behaviour is checked.

The flag must be set before JAX initialises its backend; single-device tests simply use
`jax.devices()[:1]`.
"""
import os

# The suite is compile-bound (tiny models, many small programs): LLVM's O0 backend halves
# XLA's CPU compile time (measured: the two heaviest stage-2 tests 105 s -> 55 s) while
# XLA's own HLO passes (fusion, layout) run as always. Entry points started as
# subprocesses get the same flag (`SUBPROCESS_XLA_FLAGS`).
XLA_TEST_OPT = "--xla_backend_optimization_level=0"
SUBPROCESS_XLA_FLAGS = XLA_TEST_OPT
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " " + XLA_TEST_OPT
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The commands split the host's cores into XLA devices (`experiments.common.
# split_host_cores`); the tests' subprocesses keep the device count they ask for (1
# unless `--xla_force_host_platform_device_count` says otherwise).
os.environ.setdefault("GENEFACE_HOST_DEVICES", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import atexit  # noqa: E402
import sys  # noqa: E402
import pathlib  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

# One persistent XLA compilation cache for the session, shared with the entry points the
# tests start as subprocesses (they inherit the environment): the same tiny models are
# compiled by many tests and CLI runs. A cached executable is the compiled program
# itself, so results are unchanged; the cache is removed when the session ends.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="geneface-jax-xla-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def speech_dir():
    """Directory of the packaged 16 kHz mono speech clips (`$GENEFACE_SPEECH_DIR` if set)."""
    from geneface_jax.data.synthetic import speech
    return speech.default_speech_dir()


# The tiny end-to-end run: `experiments.demo --config=tiny` (every stage's `tiny` preset for
# a few steps on a 32-pixel person; NeRFs 32 wide, 3 layers, 8 + 8 samples: the synthesis
# tests render hundreds of frames), then a 1.2 s clip is synthesized. Shared by the
# end-to-end tests and the entry-point tests of the stages.
TINY_DEMO = ("--config=tiny",)


def run_module(module, *args, check=True, devices=1, timeout=1800, env_update=None):
    """`python -m module args` in the repository; entry points see `devices` CPU devices;
    `env_update` sets (or, with None, removes) environment variables."""
    import subprocess
    import sys
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=(f"--xla_force_host_platform_device_count={devices} "
                          if devices > 1 else "") + SUBPROCESS_XLA_FLAGS)
    for k, v in (env_update or {}).items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    p = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{module} failed ({p.returncode}):\n{p.stdout[-3000:]}\n"
                             f"{p.stderr[-3000:]}")
    return p


@pytest.fixture(scope="session")
def speech_clip(speech_dir, tmp_path_factory):
    """1.2 s of the shipped English clip (16 kHz mono WAV)."""
    import soundfile as sf
    from geneface_jax.audio import io as audio_io
    wav = audio_io.load_audio(speech_dir / "en_us_male.wav")[:19_200]
    path = tmp_path_factory.mktemp("audio") / "clip.wav"
    sf.write(path, wav, 16000, subtype="PCM_16")
    return path


@pytest.fixture(scope="session")
def tiny_demo(speech_clip, tmp_path_factory):
    """(output directory, metrics) of the tiny demo (`TINY_DEMO`), run in process
    (`experiments.demo_lib.run_demo`) on one device, as its command runs on a one-device
    machine."""
    import jax
    from experiments import demo_lib
    from experiments.configs import demo as demo_configs
    from geneface_jax.mesh import make_mesh
    out = tmp_path_factory.mktemp("demo") / "out"
    metrics = demo_lib.run_demo(demo_configs.get_config("tiny"), out, audio=speech_clip,
                                mesh=make_mesh(jax.devices()[:1]))
    return out, metrics


# Heaviest test files first (seconds of one full run, `--durations=0` summed per file, on
# a 2-core CPU shared with other work, so about 2.5x an idle machine's): with `--dist
# loadfile` the files are handed to the two workers in collection order, so starting the
# long ones first keeps a long file from being the last one left running on one worker
# while the other sits idle.
_FILE_WEIGHT = {"test_nerf_train.py": 395, "test_grid.py": 382, "test_end_to_end.py": 380,
                "test_postnet.py": 202, "test_paste_pose_blinks.py": 20, "test_vae.py": 185,
                "test_fields.py": 128,
                "test_preprocess.py": 114, "test_preemption.py": 110,
                "test_stage1_cli.py": 98, "test_postnet_cli.py": 91,
                "test_wavenet_flows.py": 87, "test_torch_reference.py": 77,
                "test_hubert.py": 65, "test_render_core.py": 64, "test_face_tracking.py": 60,
                "test_import_geneface.py": 57, "test_train_infra.py": 40,
                "test_standalone.py": 32, "test_multihost.py": 27, "test_pipeline.py": 23}


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: -_FILE_WEIGHT.get(item.path.name, 0))     # stable


def perturbed(tree, seed, scale=0.1, *, add=True):
    """Every leaf of `tree` plus N(0, scale^2) noise (only the noise with `add=False`), as
    float32 jax arrays, drawn with NumPy: `jax.random` per leaf compiles a few small
    programs for every leaf shape, seconds per call on this CPU."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    rng = np.random.default_rng(seed)
    out = []
    for x in leaves:
        noise = scale * rng.standard_normal(np.shape(x))
        out.append(jnp.asarray((np.asarray(x) + noise) if add else noise, jnp.float32))
    return jax.tree_util.tree_unflatten(treedef, out)


def optimizer_moves(tx, steps):
    """How far an optax optimizer moves a parameter under a constant unit gradient, step
    by step (Adam's first steps move by ~ the learning rate): list of `steps` floats."""
    import jax.numpy as jnp
    params = {"w": jnp.zeros(3)}
    opt = tx.init(params)
    moves = []
    for _ in range(steps):
        upd, opt = tx.update({"w": jnp.ones(3)}, opt, params)
        moves.append(float(-upd["w"][0]))
    return moves


def toy_train_module():
    """tests/scripts/toy_train.py as a module, loaded once per process (it defines absl
    flags, which a second load would define again)."""
    import importlib.util
    if "toy_train" not in sys.modules:
        path = pathlib.Path(__file__).resolve().parent / "scripts" / "toy_train.py"
        spec = importlib.util.spec_from_file_location("toy_train", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["toy_train"] = module
        spec.loader.exec_module(module)
    return sys.modules["toy_train"]
