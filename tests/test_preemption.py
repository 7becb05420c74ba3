"""Nothing lost on preemption or a damaged checkpoint (`train.loop`, `checkpoint`).

A toy regression (tests/scripts/toy_train.py) through `train_loop` on one device, in
process: SIGTERM / SIGINT at a given step leave a checkpoint of that step and the rerun
ends on the uninterrupted run's parameters (bit for bit) and log rows; a run stopped past
its last checkpoint leaves no duplicate rows after the resume (metrics.jsonl and
TensorBoard); a truncated newest checkpoint is moved aside and the run resumes from the
one before; another configuration is still refused as such; inference reads name a
damaged checkpoint; an unwritable workdir or a full disk is refused before any compile.
Subprocesses: the entry-point contract (exit status 75) and two hosts preempted together.
"""

import json
import os
import pathlib
import signal
import struct
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from geneface_jax import checkpoint as ckpt_lib
from geneface_jax import train
from geneface_jax.errors import (PREEMPTED_EXIT_STATUS, CheckpointDamaged, CheckpointError,
                                 Preempted, WorkdirError)
from geneface_jax.train import loop as loop_lib

from conftest import toy_train_module, REPO

HERE = pathlib.Path(__file__).resolve().parent
TOY_SCRIPT = HERE / "scripts" / "toy_train.py"
toy = toy_train_module()

STEPS = 12
EXTRA = {"model": "toy", "dim": toy.DIM}


def _batches(kill=None):
    """The toy's batches; `kill=(signum, step)` sends the signal while step `step` runs
    (its batch is being made), so the loop stops after it."""
    x, y = toy.make_data()
    get = toy.batch_fn(x, y, 8)

    def get_batch(step):
        if kill is not None and step == kill[1] - 1:
            os.kill(os.getpid(), kill[0])
        return get(step)
    return get_batch


def _run(workdir, num_steps=STEPS, *, get_batch=None, checkpoint_every=5, state=None,
         extra=EXTRA, step_fn=toy.step_fn, max_to_keep=3):
    return train.train_loop(
        workdir=workdir, state=toy.make_state() if state is None else state,
        step_fn=step_fn, get_batch=get_batch or _batches(), num_steps=num_steps,
        mesh=train.make_mesh(jax.devices()[:1]), log_every=1,
        checkpoint_every=checkpoint_every, max_to_keep=max_to_keep, extra=extra,
        progress=False)


def _flat(state):
    return {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_leaves_with_path(jax.device_get(state.params))}


def _rows(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _steps(workdir):
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: (final parameters, metrics.jsonl rows, final metrics)."""
    workdir = tmp_path_factory.mktemp("reference")
    state, last = _run(workdir)
    return _flat(state), _rows(workdir), last


def _assert_equals_reference(state, last, workdir, reference):
    want_params, want_rows, want_last = reference
    got = _flat(state)
    assert got.keys() == want_params.keys()
    for k in got:
        assert np.array_equal(got[k], want_params[k]), k          # bit for bit
    assert last == want_last
    assert _rows(workdir) == want_rows                             # each step once


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_that_step_and_the_rerun_equals_the_uninterrupted_run(
        tmp_path, reference, signum, caplog):
    before = signal.getsignal(signum)
    with pytest.raises(Preempted, match=r"preempted \(SIG(TERM|INT)\) at step 7, checkpoint "
                                        r"saved in .*rerun the same command to resume") as e:
        _run(tmp_path, get_batch=_batches(kill=(signum, 7)))
    assert e.value.step == 7
    assert signal.getsignal(signum) is before                      # handlers restored
    assert _steps(tmp_path) == [5, 7]                              # the periodic one and 7
    assert [r["step"] for r in _rows(tmp_path)] == list(range(1, 8))
    assert any("preempted" in r.getMessage() and "step 7" in r.getMessage()
               for r in caplog.records)
    state, last = _run(tmp_path)                                   # the same command
    _assert_equals_reference(state, last, tmp_path, reference)


def test_signal_on_a_periodic_checkpoint_step_and_outside_the_loop(tmp_path, reference):
    # Stopped on a step that was just checkpointed: no second save, same resume.
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(Preempted, match="at step 5"):
        _run(tmp_path, get_batch=_batches(kill=(signal.SIGTERM, 5)))
    assert _steps(tmp_path) == [5]
    state, last = _run(tmp_path)
    _assert_equals_reference(state, last, tmp_path, reference)
    # Outside the loop the previous handlers are back: SIGINT is a KeyboardInterrupt
    # again. (Read, not sent: a SIGINT that lands while the interpreter runs a garbage
    # collector callback, such as JAX's, has its KeyboardInterrupt swallowed, which made
    # a delivered signal flaky here.)
    assert {s: signal.getsignal(s) for s in before} == before


def _read_events(path):
    """(step, kind) of the records of one TensorBoard events file: `purge` for a
    `file_version` record carrying a step (the purge marker), the tag otherwise."""
    from tensorboardX.proto import event_pb2
    data, out, i = path.read_bytes(), [], 0
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i:i + 8])
        event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
        i += 12 + n + 4
        if event.file_version and event.step:
            out.append((event.step, "purge"))
        for v in event.summary.value:
            out.append((event.step, v.tag))
    return out


def _tensorboard_steps(tb):
    """The steps TensorBoard shows for `loss`, reading the files in name order and
    applying its purge rule (a marker at step s hides the earlier files' events >= s)."""
    shown = []
    for path in sorted(p for p in tb.iterdir() if "tfevents" in p.name):
        for step, kind in _read_events(path):
            if kind == "purge":
                shown = [s for s in shown if s < step]
            elif kind == "loss":
                shown.append(step)
    return shown


def test_rows_past_the_restored_step_are_dropped_on_resume(tmp_path, reference):
    """A run killed after step 8 (its last checkpoint: 5) wrote rows 6-8 and half a line;
    the resumed run's metrics.jsonl and TensorBoard show every step once."""
    x, y = toy.make_data()
    get = toy.batch_fn(x, y, 8)

    def crash_at_8(step):
        if step == 8:
            raise RuntimeError("killed")
        return get(step)
    with pytest.raises(RuntimeError, match="killed"):
        _run(tmp_path, get_batch=crash_at_8)
    assert [r["step"] for r in _rows(tmp_path)] == list(range(1, 9))
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"loss": 0.1, "st')                               # torn by the kill
    state, last = _run(tmp_path)
    _assert_equals_reference(state, last, tmp_path, reference)
    assert _tensorboard_steps(tmp_path / "tb") == list(range(1, STEPS + 1))


def _truncate_arrays(step_dir):
    files = [p for p in (step_dir / "state" / "d").iterdir() if p.is_file()]
    assert files
    for p in files:
        p.write_bytes(p.read_bytes()[:len(p.read_bytes()) // 2])


def test_truncated_newest_checkpoint_is_moved_aside_and_the_run_resumes_before_it(
        tmp_path, reference, caplog):
    _run(tmp_path, num_steps=10, checkpoint_every=4)               # checkpoints 4, 8, 10
    assert _steps(tmp_path) == [4, 8, 10]
    _truncate_arrays(tmp_path / "checkpoints" / "10")
    state, last = _run(tmp_path)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "checkpoint 10 is damaged" in text and "10.damaged" in text
    assert "resuming from step 8" in text
    assert (tmp_path / "checkpoints" / "10.damaged" / "state").is_dir()   # kept
    _assert_equals_reference(state, last, tmp_path, reference)


def test_no_intact_checkpoint_left_is_an_error_naming_the_directory(tmp_path):
    _run(tmp_path, num_steps=4, checkpoint_every=2)                 # checkpoints 2, 4
    for step in (2, 4):
        _truncate_arrays(tmp_path / "checkpoints" / str(step))
    (tmp_path / "checkpoints" / "4" / "state" / "_METADATA").write_text("{not json")
    with pytest.raises(CheckpointError, match="no intact checkpoint left") as e:
        _run(tmp_path)
    assert str(tmp_path / "checkpoints") in str(e.value)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "2.damaged", "4.damaged"]


def test_another_configuration_is_still_a_configuration_error(tmp_path):
    _run(tmp_path, num_steps=2, checkpoint_every=2)
    with pytest.raises(CheckpointError, match="different configuration") as e:
        _run(tmp_path, extra=dict(EXTRA, dim=9))
    assert not isinstance(e.value, CheckpointDamaged)
    # Same extra, another model (hidden 8, not 16): the checkpoint is intact and named as
    # not matching the model, and it stays where it is.
    model = toy.ToyModel(hidden=8)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((2, toy.DIM)))
    other = train.TrainState.create(apply_fn=model.apply, params=variables["params"],
                                    tx=train.make_optimizer(1e-2), rng=0,
                                    batch_stats=variables["batch_stats"])
    with pytest.raises(CheckpointError, match="does not match this model/config") as e:
        _run(tmp_path, state=other)
    assert not isinstance(e.value, CheckpointDamaged)
    assert _steps(tmp_path) == [2]


def test_inference_reads_name_a_damaged_checkpoint(tmp_path):
    _run(tmp_path, num_steps=2, checkpoint_every=2)
    assert ckpt_lib.restore_run(tmp_path)["step"] == 2
    step_dir = tmp_path / "checkpoints" / "2"
    _truncate_arrays(step_dir)
    with pytest.raises(CheckpointDamaged, match=f"{step_dir}: checkpoint 2 is damaged"):
        ckpt_lib.restore_run(tmp_path)
    ck = ckpt_lib.Checkpointer(tmp_path / "checkpoints")
    try:
        with pytest.raises(CheckpointDamaged, match="checkpoint 2 is damaged"):
            ck.restore(toy.make_state())                            # into a template
    finally:
        ck.close()
    for p in (step_dir / "state" / "d").iterdir():                  # a missing array file
        p.unlink()
    with pytest.raises(CheckpointDamaged, match="NOT_FOUND"):
        ckpt_lib.restore_run(tmp_path)


def _never_traced(calls):
    def step_fn(state, batch, rng):
        calls.append(1)
        return toy.step_fn(state, batch, rng)
    return step_fn


def test_unwritable_workdir_and_full_disk_are_refused_before_compiling(tmp_path,
                                                                       monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    calls = []
    state = toy.make_state()
    with pytest.raises(WorkdirError, match=f"{blocker / 'run'}: the run directory cannot be "
                                           "written"):
        _run(blocker / "run", state=state, step_fn=_never_traced(calls))
    with pytest.raises(WorkdirError, match="cannot be written"):
        loop_lib.prepare_workdir(blocker / "run", {"stage": "toy"})
    # A disk with 100 kB free cannot hold one checkpoint of this state.
    monkeypatch.setattr(ckpt_lib, "free_bytes", lambda path: 100_000)
    with pytest.raises(WorkdirError, match=r"its disk has 0\.1 MB free, too little for one "
                                           r"checkpoint of this run \(about 1\.\d MB"):
        _run(tmp_path / "run", state=state, step_fn=_never_traced(calls))
    assert not calls                                                # nothing was compiled
    assert not (tmp_path / "run" / "checkpoints").exists()


def _env(devices):
    return dict(os.environ, JAX_PLATFORMS="cpu",
                XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
                "--xla_backend_optimization_level=0")


def _wait_for_rows(workdir, procs, rows=2, timeout=240):
    deadline = time.time() + timeout
    path = workdir / "metrics.jsonl"
    while time.time() < deadline:
        if path.is_file() and len(path.read_text().splitlines()) >= rows:
            return
        for p in procs:
            assert p.poll() is None, p.communicate()[1][-3000:]
        time.sleep(0.05)
    raise AssertionError("the run did not log in time")


def test_entry_point_exits_75_on_sigterm_and_resumes(tmp_path):
    args = [sys.executable, str(TOY_SCRIPT), f"--workdir={tmp_path}", "--steps=40",
            "--checkpoint_every=100"]
    p = subprocess.Popen([*args, "--sleep=0.05"], cwd=REPO, env=_env(1),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_rows(tmp_path, [p])
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == PREEMPTED_EXIT_STATUS == 75, err[-3000:]
    assert "Traceback" not in err
    line = [x for x in err.splitlines() if x.startswith("error: ")]
    assert len(line) == 1 and "preempted (SIGTERM) at step" in line[0]
    step = int(line[0].split("at step ")[1].split(",")[0])
    assert 10 <= step < 40 and _steps(tmp_path) == [step]
    p = subprocess.run(args, cwd=REPO, env=_env(1), capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"resumed from step {step}" in p.stderr
    assert [r["step"] for r in _rows(tmp_path)] == list(range(5, 41, 5))


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_hosts_are_preempted_at_one_step_and_resume(tmp_path):
    """Two processes of 4 devices (one 8-device mesh): SIGTERM to process 1 reaches both
    through the JAX preemption service; both save the same step and exit 75, and the rerun
    ends on the one-process 8-device run's parameters with each logged step once."""
    steps, workdir = 20, tmp_path / "two_hosts"
    x, y = toy.make_data()
    ref_state, ref_last = train.train_loop(
        workdir=tmp_path / "one_host", state=toy.make_state(), step_fn=toy.step_fn,
        get_batch=toy.batch_fn(x, y, 16), num_steps=steps, mesh=train.make_mesh(),
        log_every=5, checkpoint_every=100, extra=EXTRA, progress=False)

    def launch(*extra):
        port = _free_port()
        return [subprocess.Popen(
            [sys.executable, str(TOY_SCRIPT), f"--workdir={workdir}", f"--steps={steps}",
             "--checkpoint_every=100", "--all_devices", "--distributed",
             f"--coordinator_address=localhost:{port}", "--num_processes=2",
             f"--process_id={i}", *extra], cwd=REPO, env=_env(4), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True) for i in range(2)]

    def finish(procs):
        try:
            errs = [p.communicate(timeout=240)[1] for p in procs]
            return [(p.returncode, err) for p, err in zip(procs, errs)]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()

    procs = launch("--sleep=0.1")
    _wait_for_rows(workdir, procs, rows=1)
    procs[1].send_signal(signal.SIGTERM)
    res = finish(procs)
    stopped = []
    for code, err in res:
        assert code == PREEMPTED_EXIT_STATUS, err[-3000:]
        line = [x for x in err.splitlines() if x.startswith("error: ")]
        assert len(line) == 1 and "preempted" in line[0], err[-3000:]
        stopped.append(int(line[0].split("at step ")[1].split(",")[0]))
    assert stopped[0] == stopped[1] and 5 <= stopped[0] < steps
    assert _steps(workdir) == [stopped[0]]
    res = finish(launch())
    for code, err in res:
        assert code == 0, err[-3000:]
    assert f"resumed from step {stopped[0]}" in res[0][1]
    got = np.load(workdir / "final_params.npz")
    want = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v) for path, v in
            jax.tree_util.tree_flatten_with_path(jax.device_get(ref_state.params))[0]}
    assert sorted(got.files) == sorted(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=1e-6, err_msg=k)
    rows = _rows(workdir)
    assert [r["step"] for r in rows] == list(range(5, steps + 1, 5))       # once each
    np.testing.assert_allclose([r["loss"] for r in rows],
                               [r["loss"] for r in _rows(tmp_path / "one_host")], atol=1e-6)
    assert json.loads((workdir / "metrics.json").read_text())["loss"] == pytest.approx(
        ref_last["loss"], abs=1e-6)
