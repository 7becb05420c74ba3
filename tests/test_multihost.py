"""Several hosts on one machine: two JAX processes of 4 simulated CPU devices each
(`--distributed`, gloo collectives) form one 8-device mesh. A run of the training stack
(and, slow, of the SyncNet entry point) that way resumes a 1-process checkpoint and ends
with the parameters of the 1-process 8-device run it was taken from; the files of the run
are written once; sharded rendering returns the whole image to every process."""

import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from geneface_jax.data import format as fmt
from geneface_jax.data.synthetic import world
from geneface_jax.train import audio2motion as a2m

from conftest import REPO, SUBPROCESS_XLA_FLAGS, run_module

SYNC_ARGS = ("--config=cpu", "--config.batch_size=16", "--config.eval_pairs=16",
             "--config.run.eval_every=0", "--config.run.log_every=2",
             "--config.run.checkpoint_every=4")


def _env(devices):
    return dict(os.environ, JAX_PLATFORMS="cpu",
                XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
                + SUBPROCESS_XLA_FLAGS)


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(argv_of, num_processes=2, devices=4, timeout=600):
    """Starts `num_processes` processes (argv_of(process_id)), each seeing `devices` CPU
    devices, and waits for all; returns their CompletedProcess-like (code, out, err)."""
    procs = [subprocess.Popen([sys.executable, *argv_of(i)], cwd=REPO, env=_env(devices),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(num_processes)]
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            results.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return results


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("multihost") / "corpus"
    arrays, meta = world.make_corpus(3, num_utterances=16, num_speakers=4, held_out_speakers=1,
                                     seconds=(1.0, 1.5), progress=False)
    fmt.write_corpus(out, arrays, meta)
    return out


def _params(workdir):
    """{path: array} of a SyncNet run's variables, without each conv bias that feeds a
    BatchNorm and that BN's running mean. Such a bias has a true gradient of 0 (BN
    subtracts the batch mean): Adam turns its float noise, which differs with the
    reduction order of a cross-host psum (~1e-7 in the loss), into steps of up to ~0.3 lr,
    and the running mean follows the bias. The network's output does not depend on them
    beyond that lag; the validation loss (running statistics) checks the function."""
    _, variables, _ = a2m.load_syncnet(workdir)
    flat = {tuple(k.key for k in path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]}
    for key in [k for k in flat if k[0] == "batch_stats" and k[-2:] == ("bn", "mean")]:
        bias = ("params",) + key[1:-2] + ("conv", "bias")
        if bias in flat:
            del flat[key], flat[bias]
    return {"/".join(k): v for k, v in flat.items()}


TOY = str(REPO / "tests" / "scripts" / "toy_train.py")


def test_toy_run_on_two_hosts_resumes_and_matches_one_host(tmp_path):
    """The training stack (`train_loop`, checkpoints, metrics, `--distributed`) on a toy
    regression with a synced BatchNorm: steps 10-19 on two hosts from the one-host run's
    checkpoint of step 10 give its final parameters."""
    ref, multi = tmp_path / "one_host", tmp_path / "two_hosts"
    args = ("--steps=20", "--checkpoint_every=10", "--all_devices")
    p = subprocess.run([sys.executable, TOY, f"--workdir={ref}", *args], cwd=REPO,
                       env=_env(8), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    (multi / "checkpoints").mkdir(parents=True)
    shutil.copytree(ref / "checkpoints" / "10", multi / "checkpoints" / "10")
    port = _free_port()
    res = _launch(lambda i: [TOY, f"--workdir={multi}", *args, "--distributed",
                             f"--coordinator_address=localhost:{port}", "--num_processes=2",
                             f"--process_id={i}"], timeout=300)
    for code, _, err in res:
        assert code == 0, err[-3000:]
    assert "resumed from step 10" in res[0][2] and "resumed from step" not in res[1][2]
    want, got = np.load(ref / "final_params.npz"), np.load(multi / "final_params.npz")
    assert sorted(want.files) == sorted(got.files)
    for k in want.files:
        np.testing.assert_allclose(got[k], want[k], atol=1e-6, err_msg=k)
    m_ref = json.loads((ref / "metrics.json").read_text())
    m = json.loads((multi / "metrics.json").read_text())
    assert m["devices"] == m_ref["devices"] == 8
    assert m["loss"] == pytest.approx(m_ref["loss"], abs=1e-6)
    steps = [json.loads(line)["step"] for line in (multi / "metrics.jsonl").open()]
    assert steps == [15, 20]                                    # written once


@pytest.mark.slow
def test_two_hosts_resume_and_match_one_host(corpus_dir, tmp_path):
    data = f"--data={corpus_dir}"
    ref, multi = tmp_path / "one_host", tmp_path / "two_hosts"
    run_module("experiments.train_syncnet", data, f"--workdir={ref}", "--steps=8", *SYNC_ARGS,
               devices=8)
    # Steps 4-7 on two hosts, resuming the one-host run's checkpoint of step 4 (copied
    # into a fresh run directory).
    (multi / "checkpoints").mkdir(parents=True)
    shutil.copy(ref / "config.json", multi / "config.json")
    shutil.copytree(ref / "checkpoints" / "4", multi / "checkpoints" / "4")
    port = _free_port()
    res = _launch(lambda i: ["-m", "experiments.train_syncnet", data, f"--workdir={multi}",
                             "--steps=8", *SYNC_ARGS, "--distributed",
                             f"--coordinator_address=localhost:{port}", "--num_processes=2",
                             f"--process_id={i}"])
    for code, _, err in res:
        assert code == 0, err[-3000:]
    (_, out0, err0), (_, out1, err1) = res
    assert "resumed from step 4" in err0 and "resumed from step" not in err1
    assert "step 8/8" in err0 and "step 8/8" not in err1        # one progress stream
    m0, m1 = (json.loads(o.strip().splitlines()[-1]) for o in (out0, out1))
    assert m0["devices"] == m1["devices"] == 8
    assert m0["val_loss"] == m1["val_loss"]                      # the same replicated values
    want = json.loads((ref / "metrics.json").read_text())
    got = json.loads((multi / "metrics.json").read_text())
    assert got["val_loss"] == pytest.approx(want["val_loss"], abs=1e-5)
    want, got = _params(ref), _params(multi)                     # the two-host checkpoint
    assert want.keys() == got.keys() and len(want) > 40
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=1e-5, err_msg=k)
    # metrics.jsonl: steps 6 and 8, written once.
    steps = [json.loads(line)["step"] for line in (multi / "metrics.jsonl").open()]
    assert steps == [6, 8]


RENDER_SCRIPT = r"""
import sys
import jax
import numpy as np
from geneface_jax.train import parallel
parallel.initialize_distributed(sys.argv[1], 2, int(sys.argv[2]))
from geneface_jax.render import sharded

def fn(params, rays):
    return {"rgb": jax.numpy.tanh(rays["o"] @ params["w"]), "acc": rays["o"][:, 0] * 2.0}

rng = np.random.default_rng(0)
rays = {"o": rng.normal(size=(1001, 3)).astype(np.float32)}
params = {"w": rng.normal(size=(3, 3)).astype(np.float32)}
mesh = parallel.make_mesh()
out = jax.device_get(sharded.render_image(fn, rays, params=params, mesh=mesh, chunk=32))
local = jax.device_get(sharded.render_image(fn, rays, params=params,
                                            mesh=parallel.make_mesh(jax.local_devices()[:1])))
assert mesh.devices.size == 8 and jax.process_count() == 2
for k in out:
    np.testing.assert_allclose(out[k], local[k], atol=1e-6)
print("ok", out["rgb"].shape, jax.process_index())
"""


def test_sharded_rendering_over_two_hosts():
    port = _free_port()
    res = _launch(lambda i: ["-c", RENDER_SCRIPT, f"localhost:{port}", str(i)], timeout=300)
    for code, out, err in res:
        assert code == 0, err[-3000:]
        assert "\nok (1001, 3)" in "\n" + out      # (gloo logs to stdout too)


def test_distributed_flags_are_checked(tmp_path):
    p = subprocess.run([sys.executable, "-m", "experiments.train_syncnet",
                        f"--data={tmp_path}", f"--workdir={tmp_path / 'w'}",
                        "--process_id=1"], cwd=REPO, env=_env(1), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode != 0 and "--process_id needs --distributed" in p.stderr
    p = subprocess.run([sys.executable, "-m", "experiments.train_syncnet",
                        f"--data={tmp_path}", f"--workdir={tmp_path / 'w'}",
                        "--distributed", "--num_processes=2", "--process_id=2",
                        "--coordinator_address=localhost:1"], cwd=REPO, env=_env(1),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "--process_id must be in [0, --num_processes)" in p.stderr
    assert not (tmp_path / "w").exists()
