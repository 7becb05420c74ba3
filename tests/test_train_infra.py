"""Training infrastructure: 1 vs 8 devices, checkpoints, exact resume after SIGKILL."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from geneface_jax import train
from geneface_jax.checkpoint import Checkpointer
from geneface_jax.data.epochs import epoch_indices
from geneface_jax.errors import CheckpointError, ShapeError

from conftest import toy_train_module, SUBPROCESS_XLA_FLAGS

HERE = pathlib.Path(__file__).resolve().parent
toy = toy_train_module()


def _run_steps(devices, num_steps=5, batch_size=32):
    mesh = train.make_mesh(devices)
    x, y = toy.make_data()
    get = toy.batch_fn(x, y, batch_size)
    state = train.replicate(toy.make_state(), mesh)
    run = train.data_parallel(toy.step_fn, mesh)
    losses = []
    for step in range(num_steps):
        state, m = run(state, train.shard_batch(get(step), mesh), train.step_key(state, step))
        losses.append(float(m["loss"]))
    return jax.device_get(state), losses


def test_one_device_equals_eight_devices():
    assert len(jax.devices()) == 8, "conftest should simulate 8 CPU devices"
    s1, l1 = _run_steps(jax.devices()[:1])
    s8, l8 = _run_steps(jax.devices())
    np.testing.assert_allclose(l1, l8, atol=1e-5)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s8.params)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    for a, b in zip(jax.tree.leaves(s1.batch_stats), jax.tree.leaves(s8.batch_stats)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert int(s8.step) == 5
    # Training actually changed the parameters and lowered the loss.
    s0 = toy.make_state()
    assert not np.allclose(jax.tree.leaves(s0.params)[0], jax.tree.leaves(s8.params)[0])


def test_shard_batch_rejects_indivisible_batch():
    mesh = train.make_mesh()
    with pytest.raises(ShapeError, match="multiple of 8"):
        train.shard_batch({"x": np.zeros((12, 3))}, mesh)


def test_epoch_indices():
    n, b = 10, 4
    stream = np.concatenate([epoch_indices(3, s, n, b) for s in range(10)])  # 4 epochs
    for e in range(4):
        assert sorted(stream[e * n:(e + 1) * n]) == list(range(n))
    assert not np.array_equal(stream[:n], stream[n:2 * n])
    np.testing.assert_array_equal(epoch_indices(3, 7, n, b), stream[28:32])
    assert not np.array_equal(epoch_indices(4, 0, n, b), stream[:4])


def test_checkpointer_round_trip_keep_n_and_partial(tmp_path):
    state = toy.make_state()
    ck = Checkpointer(tmp_path / "ck", max_to_keep=2)
    for step in (1, 2, 3):
        bumped = state.replace(step=jnp.asarray(step, jnp.int32),
                               params=jax.tree.map(lambda p, s=step: p + s, state.params))
        ck.save(step, bumped, extra={"config": "small"}, force=True)
    ck.wait()
    assert ck.all_steps() == [2, 3]
    restored = ck.restore(state)
    assert int(restored.step) == 3
    for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(a, b + 3)
    assert ck.restore_extra() == {"config": "small"}
    ck.close()
    # A half-written checkpoint (orbax temp dir, never finalized) is ignored.
    partial = tmp_path / "ck" / "4.orbax-checkpoint-tmp-123"
    partial.mkdir()
    (partial / "junk").write_text("x")
    ck2 = Checkpointer(tmp_path / "ck", max_to_keep=2)
    assert ck2.latest_step() == 3
    assert int(ck2.restore(state).step) == 3
    ck2.close()


def test_optimizer_schedule_clipping_and_nan_guard():
    sched = train.lr_schedule(1.0, warmup_steps=10, decay_rate=0.5, decay_steps=20)
    np.testing.assert_allclose(float(sched(0)), 0.1, rtol=1e-6)
    np.testing.assert_allclose(float(sched(9)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(float(sched(30)), 0.5, rtol=1e-6)
    np.testing.assert_allclose(float(sched(50)), 0.25, rtol=1e-6)
    clip = optax.clip_by_global_norm(1.0)
    g = {"a": jnp.full((4,), 3.0)}
    out, _ = clip.update(g, clip.init(g))
    np.testing.assert_allclose(float(optax.global_norm(out)), 1.0, rtol=1e-6)
    state = toy.make_state()
    bad = jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), state.params)
    new = state.apply_gradients(bad)
    assert int(new.step) == 1 and not bool(train.grads_finite(bad))
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(a, b)


def test_metrics_writer_and_progress(tmp_path):
    w = train.MetricsWriter(tmp_path)
    w.write(5, {"loss": jnp.float32(0.5), "lr": 1e-3})
    w.write(10, {"loss": 0.25})
    w.close()
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": 5, "loss": 0.5, "lr": 0.001}, {"step": 10, "loss": 0.25}]
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    train.write_final_metrics(tmp_path, {"psnr": np.float32(27.5), "n": np.int64(3)})
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"psnr": 27.5, "n": 3}
    p = train.Progress(100, start_step=0)
    time.sleep(0.01)
    line = p.line(10, {"loss": 0.123456})
    assert line.startswith("step 10/100 | ") and "steps/s" in line and "ETA" in line
    assert "loss 0.1235" in line


def _toy(workdir, *extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=SUBPROCESS_XLA_FLAGS)
    return subprocess.Popen(
        [sys.executable, str(HERE / "scripts" / "toy_train.py"), f"--workdir={workdir}",
         "--steps=60", "--checkpoint_every=10", *extra],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_and_resume_is_exact(tmp_path):
    a = _toy(tmp_path / "a")
    b = _toy(tmp_path / "b", "--sleep=0.2")   # slow enough to be killed mid-run under load
    assert a.wait(timeout=240) == 0, a.stderr.read()
    ckdir = tmp_path / "b" / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline:
        steps = [int(p.name) for p in ckdir.glob("*") if p.name.isdigit()] if ckdir.exists() else []
        if steps and max(steps) >= 20:
            break
        assert b.poll() is None, b.stderr.read()
        time.sleep(0.05)
    b.send_signal(signal.SIGKILL)
    b.wait()
    assert not (tmp_path / "b" / "final_params.npz").exists()
    resumed = _toy(tmp_path / "b")
    _, err = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, err
    assert "resumed from step" in err
    pa = np.load(tmp_path / "a" / "final_params.npz")
    pb = np.load(tmp_path / "b" / "final_params.npz")
    assert sorted(pa.files) == sorted(pb.files)
    for k in pa.files:
        assert np.array_equal(pa[k], pb[k]), k
    ma = json.loads((tmp_path / "a" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert ma == mb and ma["steps"] == 60


def test_resume_with_other_config_is_refused(tmp_path):
    state = toy.make_state()
    x, y = toy.make_data()
    kw = dict(workdir=tmp_path, step_fn=toy.step_fn, get_batch=toy.batch_fn(x, y, 8),
              num_steps=2, mesh=train.make_mesh(jax.devices()[:1]), progress=False)
    train.train_loop(state=state, extra={"config": "small"}, **kw)
    with pytest.raises(CheckpointError, match="different configuration"):
        train.train_loop(state=toy.make_state(), extra={"config": "paper"}, **kw)


_MALLOC_PROBE = r"""
import json, resource, sys, threading
import numpy as np
from experiments import common
applied = common.tune_host_malloc() if sys.argv[1] == "tuned" else False
faults = []


def work():   # a 256 MB block freed and asked for again by a worker thread, as XLA:CPU does
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        a = np.ones(64 * 2 ** 20, np.float32)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        del a


t = threading.Thread(target=work)
t.start()
t.join()
print(json.dumps({"applied": applied, "faults": faults}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_tune_host_malloc_reuses_big_blocks_instead_of_faulting_them_in_again():
    repo = pathlib.Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.pop("GENEFACE_SYSTEM_MALLOC", None)

    def probe(mode, **extra):
        proc = subprocess.run([sys.executable, "-c", _MALLOC_PROBE, mode], cwd=repo,
                              env=dict(env, **extra), capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    tuned, system = probe("tuned"), probe("system")
    assert tuned["applied"] is True and system["applied"] is False
    # glibc defaults: every block is a fresh mapping, faulted in again (how many faults a
    # block costs depends on the kernel's page sizes; here ~130 to 100k)
    assert min(system["faults"]) >= 16, system
    # tuned: the first block is faulted in once, the next ones reuse it
    assert tuned["faults"][0] >= 16, tuned
    assert max(tuned["faults"][1:]) <= min(system["faults"]) // 8, (tuned, system)
    # the opt-out leaves glibc alone
    assert probe("tuned", GENEFACE_SYSTEM_MALLOC="1")["applied"] is False


_DEVICES_PROBE = r"""
import json
from experiments import common
from geneface_jax.errors import GenefaceError
try:
    n = common.split_host_cores()
except GenefaceError as e:
    print(json.dumps({"error": str(e)}))
else:
    import jax
    print(json.dumps({"set": n, "cpu_devices": len(jax.devices("cpu"))}))
"""


def test_commands_split_the_host_cores_into_xla_devices():
    """`experiments.common.split_host_cores` (every command, before JAX starts): by
    default min(usable cores, 2) CPU devices; `$GENEFACE_HOST_DEVICES` picks the count, a
    count already in `$XLA_FLAGS` wins, a bad value is one clear error."""
    repo = pathlib.Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("GENEFACE_HOST_DEVICES",
                                                            "XLA_FLAGS")}

    def probe(**extra):
        proc = subprocess.run([sys.executable, "-c", _DEVICES_PROBE], cwd=repo,
                              env=dict(env, JAX_PLATFORMS="cpu", **extra),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    default = min(len(os.sched_getaffinity(0)), 2)
    assert probe() == {"set": default, "cpu_devices": default}
    assert probe(GENEFACE_HOST_DEVICES="3") == {"set": 3, "cpu_devices": 3}
    assert probe(GENEFACE_HOST_DEVICES="3",
                 XLA_FLAGS="--xla_force_host_platform_device_count=5") == {
        "set": None, "cpu_devices": 5}
    assert "GENEFACE_HOST_DEVICES must be a positive integer" in probe(
        GENEFACE_HOST_DEVICES="two")["error"]
    assert "positive integer" in probe(GENEFACE_HOST_DEVICES="0")["error"]
    # The split must come before JAX starts: no command module starts it on import.
    commands = sorted(p.stem for p in (repo / "experiments").glob("*.py")
                      if "common.run(main)" in p.read_text())
    assert {"synthesize", "eval_nerf", "train_nerf", "demo"} <= set(commands)
    for m in commands:            # one process each: the commands share flag names
        code = ("import importlib, json\nfrom jax._src import xla_bridge\n"
                f"importlib.import_module('experiments.{m}')\n"
                "print(json.dumps(xla_bridge.backends_are_initialized()))")
        proc = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, (m, proc.stderr[-2000:])
        assert proc.stdout.strip().splitlines()[-1] == "false", m


def test_compilation_cache_directory_follows_the_environment(monkeypatch, tmp_path):
    """`experiments.common.compilation_cache_dir`: `$GENEFACE_XLA_CACHE` (a path, or `off`),
    else `$XDG_CACHE_HOME/geneface_jax/xla`, always in a per-CPU subdirectory; None when
    JAX already has its own directory (`$JAX_COMPILATION_CACHE_DIR`)."""
    from experiments import common
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.delenv("GENEFACE_XLA_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    d = common.compilation_cache_dir()
    assert d.parent == tmp_path / "xdg" / "geneface_jax" / "xla"
    assert d.name.startswith("host-") and d.name == common.compilation_cache_dir().name
    monkeypatch.setenv("GENEFACE_XLA_CACHE", str(tmp_path / "mine"))
    assert common.compilation_cache_dir() == tmp_path / "mine" / d.name
    for off in ("off", "0", "none"):
        monkeypatch.setenv("GENEFACE_XLA_CACHE", off)
        assert common.compilation_cache_dir() is None
    monkeypatch.setenv("GENEFACE_XLA_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))
    assert common.compilation_cache_dir() is None


def test_xla_trace_summary_sorts_thunks_by_kind():
    from experiments.bench import xla_trace
    ev = [{"ph": "X", "name": "ynn_fusion.3", "dur": 4000},
          {"ph": "X", "name": "dot.7", "dur": 1000},
          {"ph": "X", "name": "convolution.2", "dur": 2000},
          {"ph": "X", "name": "maximum_bitcast_fusion.4", "dur": 1500},
          {"ph": "X", "name": "maximum_bitcast_fusion.5", "dur": 500},
          {"ph": "X", "name": "ThunkExecutor::Execute", "dur": 99000},   # runtime spans
          {"ph": "X", "name": "$api.py:2479 block_until_ready", "dur": 99000},
          {"ph": "i", "name": "dot.9", "dur": 5000}]                      # not a span
    s = xla_trace.summarize(ev, calls=2)
    assert (s["matmul_ms"], s["conv_ms"], s["other_ms"], s["ops_ms"]) == (2.5, 1.0, 1.0, 4.5)
    assert s["matmul_conv_share"] == pytest.approx(3.5 / 4.5, abs=1e-3)
    assert s["top_ops_ms"][0] == ["ynn_fusion", 2.0]
    assert ["maximum_bitcast_fusion", 1.0] in s["top_ops_ms"]
    # a trace with no op spans (e.g. a step the profiler did not see): zeros, no share
    empty = xla_trace.summarize([{"ph": "X", "name": "ThunkExecutor::Execute", "dur": 5}], 1)
    assert (empty["ops_ms"], empty["matmul_ms"], empty["matmul_conv_share"]) == (0.0, 0.0, None)
    assert empty["top_ops_ms"] == []


def test_model_inits_compile_one_program_each():
    """Every stage's init is one jitted program: op by op, each initializer and forward op
    is lowered and compiled on its own (hundreds of small programs), which every entry
    point paid at start-up. Checked on the traced init: its top level holds the jitted
    init and a few key/shape ops, not the network's hundreds of operations (same
    random bits and initializer formulas as Flax's op-by-op init, so the same weights).
    Tracing only: nothing is compiled here."""
    from geneface_jax.motion import postnet, syncnet, vae
    from geneface_jax.render import fields
    from geneface_jax.train import nerf
    from experiments.configs import nerf as nerf_presets
    from experiments.configs import postnet as postnet_presets
    from experiments.configs import syncnet as syncnet_presets

    inits = {
        "syncnet": lambda: syncnet.init_syncnet(
            syncnet.SyncNetConfig(feature_dim=13, **syncnet_presets.get_config("cpu").model),
            0)[1],
        "audio2motion": lambda: vae.init_audio2motion(vae.Audio2MotionConfig(), 0)[1],
        "postnet": lambda: postnet.init_postnet(
            postnet.PostNetConfig(**postnet_presets.get_config("cpu").model), 0)[2],
        "nerf": lambda: nerf.create_nerf_state(
            fields.NeRFConfig(**nerf_presets.get_config("cpu").model),
            nerf.NeRFOptimConfig(), nerf.HEAD, 0)[1].params,
    }
    for name, init in inits.items():
        eqns = jax.make_jaxpr(init)().jaxpr.eqns
        jitted = [e for e in eqns if e.primitive.name in ("pjit", "jit")]
        assert len(eqns) <= 24 and jitted, (name, len(eqns))    # op by op: 758 and up


def test_jitted_init_is_one_program_per_module_configuration():
    """`initializers.jitted_init`: modules equal by their fields share one jitted init
    (so a second build of the same model compiles nothing), others do not; the variables
    are `module.init`'s."""
    import flax.linen as nn

    from geneface_jax.initializers import jitted_init

    class Toy(nn.Module):
        width: int

        @nn.compact
        def __call__(self, x, scale=1.0):
            return scale * nn.Dense(self.width)(x)

    x = jnp.ones((2, 3))
    key = jax.random.PRNGKey(0)
    assert jitted_init(Toy(4)) is jitted_init(Toy(4))
    assert jitted_init(Toy(4)) is not jitted_init(Toy(5))
    assert jitted_init(Toy(4), scale=2.0) is not jitted_init(Toy(4))
    got = jitted_init(Toy(4))(key, x)
    want = Toy(4).init(key, x)
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)
