"""Stage 1 end to end through its entry points on a tiny synthetic corpus: SyncNet learns
to tell in-sync from shifted pairs, the VAE lowers the validation reconstruction loss by
>= 50 %, the evaluation writes its figures, bad input gives one clear error, and (slow) an
interrupted run resumes to exactly the same parameters. The in-process resume test of the
same step is in test_vae.py."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from geneface_jax.data import format as fmt
from geneface_jax.data.synthetic import world
from geneface_jax.motion import predict

from conftest import SUBPROCESS_XLA_FLAGS

REPO = pathlib.Path(__file__).resolve().parents[1]


def _run(module, *args, check=True):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=SUBPROCESS_XLA_FLAGS)
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1") / "corpus"
    arrays, meta = world.make_corpus(3, num_utterances=48, num_speakers=6, held_out_speakers=1,
                                     seconds=(1.5, 3.0), progress=False)
    fmt.write_corpus(out, arrays, meta)
    return out


@pytest.fixture(scope="module")
def syncnet_dir(corpus_dir):
    work = corpus_dir.parent / "syncnet"
    _run("experiments.train_syncnet", f"--data={corpus_dir}", f"--workdir={work}",
         "--config=cpu", "--steps=200", "--config.run.eval_every=0",
         "--config.run.log_every=100")
    return work


def test_syncnet_learns(syncnet_dir):
    m = json.loads((syncnet_dir / "metrics.json").read_text())
    print("syncnet", m)
    assert m["val_accuracy"] > 0.75 and m["val_d_pos"] > m["val_d_neg"] + 0.2


A2M_ARGS = ("--config=small", "--batch_size=8", "--window=48", "--warmup=20", "--lr=1e-3",
            "--eval_every=0", "--log_every=20", "--checkpoint_every=40")


def _params(workdir):
    _, variables, _, _ = predict.load_audio2motion(workdir)
    return jax.tree.leaves(variables)


@pytest.fixture(scope="module")
def vae_dir(corpus_dir, syncnet_dir):
    full = corpus_dir.parent / "vae"
    # 60 steps: the validation L2 is at ~0.30 of its start (0.35 at 40, 0.24 at 120).
    _run("experiments.train_audio2motion", f"--workdir={full}", "--steps=60",
         f"--data={corpus_dir}", f"--syncnet={syncnet_dir}", *A2M_ARGS)
    return full


def test_vae_learns_and_evaluates(corpus_dir, vae_dir, tmp_path):
    full = vae_dir
    m = json.loads((full / "metrics.json").read_text())
    print("vae", m)
    assert m["val_l2"] <= 0.5 * m["val_l2_start"]
    assert np.isfinite(m["train_sync"]) and m["train_kl"] > 0

    ev = tmp_path / "eval"
    _run("experiments.eval_audio2motion", f"--data={corpus_dir}", f"--vae={full}",
         f"--regression={full}", f"--workdir={ev}", "--samples=2")
    e = json.loads((ev / "metrics.json").read_text())
    for key in ("lmd", "lmd_mouth", "sync_corr", "std_ratio_vae", "std_ratio_regression"):
        assert np.isfinite(e[key]), key
    assert 0 < e["lmd_mouth"] < 0.05 and e["per_split"]["vae"]["test"]["utterances"] > 0
    # two prior samples per utterance: the figures are their means, and they differ
    vae, reg = e["per_split"]["vae"]["all"], e["per_split"]["regression"]["all"]
    assert e["samples"] == vae["samples"] == 2 and reg["samples"] == 1
    per = vae["sync_corr_per_sample"]
    assert len(per) == 2 and per[0] != per[1]
    assert abs(e["sync_corr"] - np.mean(per)) < 1e-9
    assert abs(e["std_ratio_vae"] - np.mean(vae["std_ratio_per_sample"])) < 1e-9


@pytest.mark.slow
def test_cli_resume_is_exact(corpus_dir, syncnet_dir, vae_dir, tmp_path):
    part = tmp_path / "part"
    common = (f"--data={corpus_dir}", f"--syncnet={syncnet_dir}", *A2M_ARGS)
    # Interrupted at step 40 (a checkpoint), then resumed to 60: the same parameters.
    _run("experiments.train_audio2motion", f"--workdir={part}", "--steps=40", *common)
    resumed = _run("experiments.train_audio2motion", f"--workdir={part}", "--steps=60", *common)
    assert "resumed from step 40" in resumed.stderr
    for a, b in zip(_params(vae_dir), _params(part)):
        np.testing.assert_array_equal(a, b)


def test_bad_inputs_give_one_clear_error(tmp_path, corpus_dir, vae_dir):
    # A different configuration in an existing workdir is refused.
    clash = _run("experiments.train_audio2motion", f"--workdir={vae_dir}", "--steps=200",
                 f"--data={corpus_dir}", *A2M_ARGS[:2], "--window=52", check=False)
    assert clash.returncode == 2 and "different configuration" in clash.stderr
    p = _run("experiments.train_audio2motion", f"--data={tmp_path / 'nope'}",
             f"--workdir={tmp_path / 'w'}", "--steps=1", check=False)
    assert p.returncode == 2 and "does not exist" in p.stderr and "Traceback" not in p.stderr
    p = _run("experiments.train_audio2motion", f"--data={corpus_dir}",
             f"--workdir={tmp_path / 'w'}", "--steps=1", "--window=30", check=False)
    assert p.returncode == 2 and "multiple of 4" in p.stderr
    p = _run("experiments.train_audio2motion", f"--data={corpus_dir}",
             f"--workdir={tmp_path / 'w2'}", "--steps=1", f"--syncnet={tmp_path}", check=False)
    assert p.returncode == 2 and "config.json" in p.stderr and "Traceback" not in p.stderr
    p = _run("experiments.eval_audio2motion", f"--data={corpus_dir}", f"--vae={tmp_path}",
             f"--workdir={tmp_path / 'e'}", check=False)
    assert p.returncode == 2 and "no audio2motion run" in p.stderr


@pytest.mark.slow
def test_benchmark_smoke():
    """The stage-1 benchmark runs (tiny sizes) and ends with its JSON line."""
    p = _run("experiments.bench.audio2motion", "--smoke")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["jax_steps_per_s"] > 0 and out["torch_steps_per_s"] > 0
    # Both rates and the ratio are rounded in the JSON line (4 and 3 decimals), so the
    # ratio of the printed rates can differ from the printed ratio by a rounding step.
    assert out["speedup"] == pytest.approx(out["jax_steps_per_s"] / out["torch_steps_per_s"],
                                           rel=5e-3, abs=2e-3)
