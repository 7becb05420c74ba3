"""Stage 1 end to end on a tiny synthetic corpus: SyncNet learns to tell in-sync from
shifted pairs, the VAE (the `tiny` preset) lowers the validation reconstruction loss by
>= 50 %, the evaluation writes its figures, bad input gives one clear error, and (slow) an
interrupted run resumes to exactly the same parameters. The runs call the library
(`train.audio2motion`) in process on one device; the command-line contract (flags,
`--model`, printed JSON, one `error:` line with exit status 2, no partial output) is checked
through the entry points. The in-process resume test of the step alone is in
test_vae.py."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments.configs import audio2motion as a2m_configs
from experiments.configs import syncnet as sync_configs
from geneface_jax.data import format as fmt
from geneface_jax.data.synthetic import world
from geneface_jax.errors import CheckpointError, DatasetError, InputError, ShapeError
from geneface_jax.mesh import make_mesh
from geneface_jax.motion import predict
from geneface_jax.train import audio2motion as a2m

from conftest import SUBPROCESS_XLA_FLAGS

REPO = pathlib.Path(__file__).resolve().parents[1]


def _run(module, *args, check=True):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=SUBPROCESS_XLA_FLAGS)
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def _one_device():
    return make_mesh(jax.devices()[:1])


def _train(workdir, corpus_dir, syncnet_dir=None, steps=None, **overrides):
    """The `tiny` preset's run in process on one device (`overrides`: top-level keys)."""
    config = a2m_configs.get_config("tiny")
    if steps is not None:
        config.run.steps = steps
    config.update(overrides)
    return a2m.train_audio2motion(config, workdir, corpus_dir, syncnet_dir, mesh=_one_device())


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
    config = sync_configs.get_config("cpu")
    config.run.update(steps=200, eval_every=0, log_every=100)
    a2m.train_syncnet(config, work, corpus_dir, mesh=_one_device())
    return work


def test_syncnet_learns(syncnet_dir):
    m = json.loads((syncnet_dir / "metrics.json").read_text())
    print("syncnet", m)
    assert m["val_accuracy"] > 0.75 and m["val_d_pos"] > m["val_d_neg"] + 0.2


def _params(workdir):
    _, variables, _, _ = predict.load_audio2motion(workdir)
    return jax.tree.leaves(variables)


@pytest.fixture(scope="module")
def vae_dir(corpus_dir, syncnet_dir):
    full = corpus_dir.parent / "vae"
    # tiny: 60 steps, the validation L2 at ~0.31 of its start
    _train(full, corpus_dir, syncnet_dir)
    return full


def test_vae_learns_and_evaluates(corpus_dir, vae_dir, tmp_path):
    full = vae_dir
    m = json.loads((full / "metrics.json").read_text())
    print("vae", m)
    assert m["val_l2"] <= 0.5 * m["val_l2_start"]
    assert np.isfinite(m["train_sync"]) and m["train_kl"] > 0

    ev = tmp_path / "eval"
    out = a2m.evaluate_audio2motion(corpus_dir, ev, full, full, samples=2)
    e = json.loads((ev / "metrics.json").read_text())
    assert e == json.loads(json.dumps(out))
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
def test_resume_is_exact(corpus_dir, syncnet_dir, vae_dir, tmp_path, capfd):
    part = tmp_path / "part"
    # Interrupted at step 40 (a checkpoint), then resumed to 60: the same parameters.
    _train(part, corpus_dir, syncnet_dir, steps=40)
    capfd.readouterr()
    _train(part, corpus_dir, syncnet_dir, steps=60)
    assert "resumed from step 40" in capfd.readouterr().err
    for a, b in zip(_params(vae_dir), _params(part)):
        np.testing.assert_array_equal(a, b)


def test_bad_inputs_raise_one_clear_error(tmp_path, corpus_dir, vae_dir):
    # A different configuration in an existing workdir is refused.
    with pytest.raises(CheckpointError, match="different configuration"):
        _train(vae_dir, corpus_dir, steps=200, window=52)
    with pytest.raises(DatasetError, match="does not exist"):
        _train(tmp_path / "w", tmp_path / "nope", steps=1)
    with pytest.raises(ShapeError, match="multiple of 4"):
        _train(tmp_path / "w", corpus_dir, steps=1, window=30)
    with pytest.raises(InputError, match="config.model.kind must be one of"):
        _train(tmp_path / "w", corpus_dir, steps=1, model={"kind": "gan"})
    with pytest.raises(CheckpointError, match="config.json"):
        _train(tmp_path / "w2", corpus_dir, tmp_path, steps=1)
    with pytest.raises(CheckpointError, match="no audio2motion run"):
        a2m.evaluate_audio2motion(corpus_dir, tmp_path / "e", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_an_imported_syncnet_is_refused(tmp_path, corpus_dir):
    """Stage 1 trains on the corpus' landmarks normalised here; a SyncNet imported from
    GeneFace (`experiments.import_geneface --stage=syncnet`: random weights written as
    GeneFace's trainer writes them, then imported) scores idexp_lm3d mouths, so pairing
    them is an InputError naming both and their representations, before anything is
    written. The import itself loads (variables only, no optimizer state), and its
    GeneFace work dir given as --syncnet points to the import."""
    torch = pytest.importorskip("torch")
    from geneface_jax.checkpoint import restore_run
    from geneface_jax.convert import geneface as gf
    from geneface_jax.convert import geneface_import as gi
    from geneface_jax.motion.syncnet import SyncNetConfig, init_syncnet
    sc = SyncNetConfig(feature_dim=80, base=8, mouth_in=8, layers_per_block=2)
    sd = gf.to_state_dict(gf.STAGES["syncnet"], jax.device_get(init_syncnet(sc, 1)[1]), sc,
                          ("",))
    gdir = tmp_path / "geneface_syncnet"
    gdir.mkdir()
    torch.save({"epoch": 1, "global_step": 100,
                "state_dict": {"model": {k: torch.tensor(v) for k, v in sd.items()}}},
               gdir / "model_ckpt_steps_100.ckpt")
    with pytest.raises(CheckpointError, match="import it first"):
        _train(tmp_path / "w", corpus_dir, gdir, steps=1)
    imported = tmp_path / "sync_gf"
    gi.import_geneface(gdir, "syncnet", imported)
    assert set(restore_run(imported)) == {"step", "params", "batch_stats"}
    a2m.load_syncnet(imported)
    with pytest.raises(InputError) as e:
        _train(tmp_path / "w", corpus_dir, imported, steps=1)
    msg = str(e.value)
    for part in (str(imported), str(corpus_dir), "geneface_idexp_lm3d", "normalized"):
        assert part in msg, (part, msg)
    assert not (tmp_path / "w").exists()


def test_commands(tmp_path, corpus_dir):
    """The entry points' command-line contract: --model and --config overrides reach the
    run and the final metrics are printed as JSON; a bad config value or a bad run
    directory is one `error:` line, exit status 2, no output. The run the command trained
    is evaluated in process on one split."""
    work, ev = tmp_path / "reg", tmp_path / "eval"
    p = _run("experiments.train_audio2motion", f"--data={corpus_dir}", f"--workdir={work}",
             "--config=tiny", "--steps=2", "--model=regression", "--config.window=32")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out == json.loads((work / "metrics.json").read_text())
    assert out["model_type"] == "regression" and out["steps"] == 2
    cfg = json.loads((work / "config.json").read_text())
    assert cfg["window"] == 32 and cfg["run"]["steps"] == 2 and not cfg["model"]["use_latent"]
    out = a2m.evaluate_audio2motion(corpus_dir, ev, work, samples=1, splits=["test"])
    assert out["splits"] == ["test"] and np.isfinite(out["lmd"])
    assert set(out["per_split"]["vae"]) == {"test", "all"}
    for module, args, message in [
            ("experiments.train_audio2motion", ("--config=tiny", "--config.model.kind=gan"),
             "config.model.kind must be one of"),
            ("experiments.eval_audio2motion", (f"--vae={tmp_path}",), "no audio2motion run")]:
        out_dir = tmp_path / "bad"
        p = _run(module, f"--data={corpus_dir}", f"--workdir={out_dir}", *args, check=False)
        assert p.returncode == 2 and p.stderr.startswith("error: ") and message in p.stderr
        assert "Traceback" not in p.stderr and not out_dir.exists()


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
