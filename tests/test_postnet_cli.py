"""Stage 2's runs on a tiny synthetic person and corpus: `train.postnet.train_postnet`
(what `train_postnet` calls; here in process on the `tiny` preset of
experiments/configs/postnet.py) builds its stage-1 pool and trains, `evaluate_postnet`
writes the issue's figures, bad input gives one clear error (the commands: one `error:`
line, exit status 2, no partial output), an interrupted run resumes exactly and (slow)
the benchmark's smoke run agrees with PyTorch. The stage-1 and SyncNet runs are written
directly (initial parameters, a checkpoint and config.json, as the trainers leave them):
these tests check the plumbing; learning is checked in test_postnet.py and on the real
runs."""

import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from geneface_jax.checkpoint import Checkpointer
from geneface_jax.data import batching
from geneface_jax.data import format as fmt
from geneface_jax.data.synthetic import world
from geneface_jax.errors import CheckpointError, GenefaceError, InputError, ShapeError
from geneface_jax.mesh import make_mesh
from geneface_jax.motion import predict
from geneface_jax.motion.syncnet import SyncNetConfig
from geneface_jax.motion.vae import Audio2MotionConfig
from geneface_jax.train import audio2motion as a2m
from geneface_jax.train import postnet as tp
from geneface_jax.train.metrics import write_json_atomic

from conftest import SUBPROCESS_XLA_FLAGS
from experiments.configs import postnet as presets

REPO = pathlib.Path(__file__).resolve().parents[1]


def _run(module, *args, check=True):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=SUBPROCESS_XLA_FLAGS)
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def _save_run(workdir, state, cfg):
    ck = Checkpointer(pathlib.Path(workdir) / "checkpoints")
    ck.save(0, state, force=True)
    ck.close()
    write_json_atomic(pathlib.Path(workdir) / "config.json", cfg)


@pytest.fixture(scope="module")
def world_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage2")
    arrays, meta = world.make_corpus(3, num_utterances=16, num_speakers=4, held_out_speakers=1,
                                     seconds=(1.0, 2.0), progress=False)
    corpus = fmt.write_corpus(root / "corpus", arrays, meta)
    p_arrays, p_meta, wav = world.make_person(1, size=24, num_frames=80, progress=False)
    fmt.write_person(root / "person", p_arrays, p_meta, wav)
    # A SyncNet run and a stage-1 run at their initial parameters.
    sc = SyncNetConfig(feature_dim=80, base=8, mouth_in=8, layers_per_block=2)
    optim = a2m.OptimConfig(warmup_steps=10)
    _, s_state = a2m.create_syncnet_state(sc, optim, 0)
    _save_run(root / "sync", s_state, dict(stage="syncnet", model=dataclasses.asdict(sc),
                                            optim=dataclasses.asdict(optim)))
    mc = Audio2MotionConfig(feature_dim=80, hidden=16, latent=4, kernel_size=3, enc_layers=2,
                            dec_layers=2, flow_hidden=8, flow_layers=2, num_flows=2,
                            cond_dim=8)
    _, v_state = a2m.create_vae_state(mc, optim, 0)
    _save_run(root / "a2m", v_state, dict(stage="audio2motion", model=dataclasses.asdict(mc),
                                          optim=dataclasses.asdict(optim), data=str(corpus),
                                          syncnet=None, syncnet_model=None))
    c = fmt.load_corpus(corpus)
    np.save(root / "a2m" / "landmark_std.npy", batching.expression_std(c))
    return root


def _config(**overrides):
    """The `tiny` preset (6 steps of 8 x 16 frames, pool checks every 2 steps) with
    `overrides` of its top-level keys and sections (`run={'steps': 3}`)."""
    c = presets.get_config("tiny")
    for key, value in overrides.items():
        if isinstance(value, dict):
            c[key].update(value)
        else:
            c[key] = value
    return c


def _train(root, workdir, **overrides):
    """`train_postnet --config=tiny` in process, on one device (as the command runs on a
    one-device machine)."""
    return tp.train_postnet(_config(**overrides), workdir, root / "person", root / "a2m",
                            syncnet=root / "sync", mesh=make_mesh(jax.devices()[:1]))


@pytest.fixture(scope="module")
def trained(world_dirs):
    work = world_dirs / "postnet"
    _train(world_dirs, work)
    return work


def test_train_and_evaluate(world_dirs, trained, tmp_path):
    m = json.loads((trained / "metrics.json").read_text())
    print("train", m)
    for key in ("train_g_adv", "train_g_sync", "train_g_mse", "train_d_loss", "pool_fd_before",
                "pool_fd_after"):
        assert np.isfinite(m[key]), key
    n_train = len(fmt.load_corpus(world_dirs / "corpus").split("train"))
    assert m["pool_samples"] == n_train + 2 and m["train_g_sync"] > 0
    cfg = json.loads((trained / "config.json").read_text())
    assert cfg["stage"] == "postnet" and cfg["corpus"] == str(world_dirs / "corpus")
    assert cfg["run"] == presets.get_config("tiny").run.to_dict()
    # Identity = the person's mean train landmarks; units = the stage-1 run's std.
    person = fmt.load_person(world_dirs / "person")
    np.testing.assert_allclose(np.load(trained / "identity.npy"),
                               np.asarray(person["landmarks"])[person.split("train")].mean(0),
                               atol=1e-6)
    config, g_vars, _, std, _ = predict.load_postnet(trained)
    np.testing.assert_array_equal(std, np.load(world_dirs / "a2m" / "landmark_std.npy"))
    assert config.hidden == presets.get_config("tiny").model.hidden
    assert "block3_1" in g_vars["params"]

    ev = tmp_path / "eval"
    out = tp.evaluate_postnet(trained, ev)
    e = json.loads((ev / "metrics.json").read_text())
    assert e == json.loads(json.dumps(out))
    print("eval", {k: v for k, v in e.items() if k != "per_source"})
    for key in ("fd_before", "fd_after", "fd_mouth_before", "fd_mouth_after", "sync_before",
                "sync_after"):
        assert np.isfinite(e[key]) and (e[key] >= 0 or key.startswith("sync")), key
    # The diagnostics decompose the FD: mean term <= fd, variance ratio positive.
    for tag in ("before", "after"):
        assert 0 <= e[f"fd_mean_term_{tag}"] <= e[f"fd_{tag}"] + 1e-12
        assert e[f"var_ratio_{tag}"] > 0
    assert e["per_source"]["corpus"]["sequences"] == 4      # the held-out speaker's
    assert e["per_source"]["person"]["frames"] == 8          # the person's valid frames


def test_bad_inputs_raise_one_clear_error(world_dirs, trained, tmp_path):
    with pytest.raises(CheckpointError, match="different configuration"):
        _train(world_dirs, trained, window=20)
    with pytest.raises(CheckpointError, match="expected 'audio2motion'"):
        tp.train_postnet(_config(), tmp_path / "w", world_dirs / "person",
                         world_dirs / "sync")
    with pytest.raises(GenefaceError, match="corpus"):
        tp.train_postnet(_config(), tmp_path / "w", world_dirs / "corpus", world_dirs / "a2m")
    with pytest.raises(ShapeError, match="window must be at least 8"):
        _train(world_dirs, tmp_path / "w", window=4)
    with pytest.raises(InputError, match="mse_target must be one of"):
        _train(world_dirs, tmp_path / "w", loss={"mse_target": "nearest"})
    with pytest.raises(InputError, match="needs samples on the person's audio"):
        _train(world_dirs, tmp_path / "w", loss={"mse_target": "person"},
               pool={"person_samples": 0})
    assert not (tmp_path / "w").exists()
    with pytest.raises(CheckpointError, match="expected 'postnet'"):
        tp.evaluate_postnet(world_dirs / "a2m", tmp_path / "e")
    assert not (tmp_path / "e").exists()


def test_commands_print_one_error_line_and_write_nothing(world_dirs, tmp_path):
    """The command-line contract: flags (a preset, a --config override) parsed, a bad input
    is one `error:` line with exit status 2 and no traceback, nothing written."""
    p = _run("experiments.train_postnet", f"--data={world_dirs / 'person'}",
             f"--audio2motion={world_dirs / 'sync'}", f"--workdir={tmp_path / 'w'}",
             "--config=tiny", "--config.loss.mse_target=person", "--steps=1", check=False)
    assert p.returncode == 2 and "expected 'audio2motion'" in p.stderr
    assert p.stderr.startswith("error: ") and "Traceback" not in p.stderr
    assert not (tmp_path / "w").exists()
    p = _run("experiments.eval_postnet", f"--postnet={world_dirs / 'a2m'}",
             f"--workdir={tmp_path / 'e'}", check=False)
    assert p.returncode == 2 and "expected 'postnet'" in p.stderr
    assert p.stderr.startswith("error: ") and "Traceback" not in p.stderr
    assert not (tmp_path / "e").exists()


def test_inference_uses_the_generator_with_the_lowest_pool_fd(world_dirs, trained, tmp_path):
    """select (default): every pool check (here every 2 steps) may replace the
    generator inference uses; load_postnet returns the one with the lowest pool FD."""
    # A run without a selected generator (no pool check ran; here its record removed):
    # inference uses the last EMA.
    unselected = tmp_path / "unselected"
    shutil.copytree(trained, unselected)
    (unselected / predict.SELECTED_INFO).unlink()
    assert predict.read_selected_info(unselected) is None
    assert predict.load_postnet(unselected)[2]["inference_generator"] == dict(source="final_ema",
                                                                         step=6)
    work = trained
    checks = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    fds = {c["step"]: c["eval_pool_fd"] for c in checks if "eval_pool_fd" in c}
    m = json.loads((work / "metrics.json").read_text())
    assert sorted(fds) == [2, 4, 6] and abs(fds[6] - m["pool_fd_after"]) < 1e-12
    best = min(fds, key=fds.get)
    info = predict.read_selected_info(work)
    assert info == {"step": best, "pool_fd": fds[best]}
    assert (m["selected_step"], m["pool_fd_selected"]) == (best, fds[best])
    _, g_vars, cfg, std, _ = predict.load_postnet(work)
    assert cfg["inference_generator"] == dict(source="selected", **info)
    assert predict.load_postnet(work, selected=False)[2]["inference_generator"] == dict(
        source="final_ema", step=6)
    # The selected variables give the selected pool FD (the check's own computation).
    pool = tp.SamplePool.load(work / "pool.npz")
    person = fmt.load_person(world_dirs / "person")
    real, _ = tp.person_motion(person, std, "train")
    ids = pool.domain_samples(0)
    ids = ids[np.random.default_rng(0).permutation(len(ids))[:4]]
    config = predict.load_postnet(work)[0]
    assert abs(tp.pool_fd_fn(pool, real, config, ids, std)(g_vars) - fds[best]) \
        <= 1e-6 * fds[best]
    # select=False: no selection file, inference uses the last checkpoint's EMA.
    plain = tmp_path / "plain"
    _train(world_dirs, plain, select=False, run={"steps": 4})
    assert predict.read_selected_info(plain) is None
    assert predict.load_postnet(plain)[2]["inference_generator"] == dict(source="final_ema", step=4)


def _imported_syncnet(root, config):
    """A SyncNet imported from GeneFace (`experiments.import_geneface --stage=syncnet`):
    random weights written the way GeneFace's trainer writes its checkpoints
    (`convert.geneface.to_state_dict`, `torch.save` of {'global_step', 'state_dict':
    {'model': ...}} as model_ckpt_steps_<step>.ckpt), then imported into `root/sync_gf`."""
    torch = pytest.importorskip("torch")
    from geneface_jax.convert import geneface as gf
    from geneface_jax.convert import geneface_import as gi
    from geneface_jax.motion.syncnet import init_syncnet
    variables = jax.device_get(init_syncnet(config, 1)[1])
    sd = gf.to_state_dict(gf.STAGES["syncnet"], variables, config, ("",))
    gdir = root / "sync_geneface"
    gdir.mkdir()
    torch.save({"epoch": 1, "global_step": 100,
                "state_dict": {"model": {k: torch.tensor(v) for k, v in sd.items()}}},
               gdir / "model_ckpt_steps_100.ckpt")
    gi.import_geneface(gdir, "syncnet", root / "sync_gf")
    return root / "sync_gf", variables


def test_a_syncnet_in_other_motion_units_is_refused(world_dirs, tmp_path):
    """The sync loss scores refined stage-1 motion, so the SyncNet must have learnt that
    motion's units: an imported (GeneFace idexp_lm3d) SyncNet with a stage 1 trained here,
    or a SyncNet trained here with an imported stage 1, is an InputError naming both runs
    and both representations, raised before anything is written. The imported SyncNet
    itself loads (variables only, no optimizer state)."""
    from geneface_jax.convert.geneface_import import geneface_representation
    sc = SyncNetConfig(feature_dim=80, base=8, mouth_in=8, layers_per_block=2)
    sync_gf, want = _imported_syncnet(tmp_path, sc)
    _, variables, _ = a2m.load_syncnet(sync_gf)
    for x, y in zip(jax.tree.leaves(variables), jax.tree.leaves(want)):
        np.testing.assert_array_equal(x, y)
    work = tmp_path / "w"
    with pytest.raises(InputError) as e:
        tp.train_postnet(_config(), work, world_dirs / "person", world_dirs / "a2m",
                         syncnet=sync_gf, mesh=make_mesh(jax.devices()[:1]))
    msg = str(e.value)
    for part in (str(sync_gf), str(world_dirs / "a2m"), "geneface_idexp_lm3d", "normalized"):
        assert part in msg, (part, msg)
    # an imported stage 1 (its config records GeneFace's representation) with the SyncNet
    # trained here
    a2m_gf = tmp_path / "a2m_gf"
    shutil.copytree(world_dirs / "a2m", a2m_gf)
    cfg = json.loads((a2m_gf / "config.json").read_text())
    write_json_atomic(a2m_gf / "config.json",
                      dict(cfg, representation=geneface_representation(0.05)))
    with pytest.raises(InputError) as e:
        tp.train_postnet(_config(), work, world_dirs / "person", a2m_gf,
                         syncnet=world_dirs / "sync", mesh=make_mesh(jax.devices()[:1]))
    msg = str(e.value)
    for part in (str(world_dirs / "sync"), str(a2m_gf), "geneface_idexp_lm3d", "normalized"):
        assert part in msg, (part, msg)
    assert not work.exists()


def test_a_selection_made_after_the_resume_step_is_dropped(world_dirs, trained, tmp_path):
    """A launch killed after a pool check and before its next checkpoint leaves a
    selected generator of a step past the checkpoint the next launch resumes from. Here
    (in process): a run to step 1 (its checkpoint), then a selection file as such a
    launch could leave it (step 4, a pool FD below every real one: one the resumed run's
    checks would never replace). The resumed run drops it, redoes the checks at 2, 4, 6
    and ends with the uninterrupted run's selection: same step, FD and variables."""
    part = tmp_path / "part"
    _train(world_dirs, part, run={"steps": 1})
    assert predict.read_selected_info(part) is None          # no pool check before step 2
    ck = Checkpointer(part / "checkpoints")
    assert ck.all_steps() == [1]
    ck.close()
    whole = json.loads((trained / "metrics.json").read_text())
    _, g_vars, _, _, _ = predict.load_postnet(trained)
    tp.save_selected_generator(part, g_vars, 4, 0.5 * whole["pool_fd_selected"])
    out = _train(world_dirs, part)
    assert (out["selected_step"], out["pool_fd_selected"]) == (whole["selected_step"],
                                                              whole["pool_fd_selected"])
    assert predict.read_selected_info(part) == predict.read_selected_info(trained)
    for x, y in zip(jax.tree.leaves(predict.load_postnet(trained)[1]),
                    jax.tree.leaves(predict.load_postnet(part)[1])):
        np.testing.assert_array_equal(x, y)
    # a selection at or before the step a launch resumes from is the run's own: kept
    # (here a launch with nothing left to do, resuming from its last step)
    _train(world_dirs, part)
    assert predict.read_selected_info(part) == predict.read_selected_info(trained)


@pytest.mark.slow
def test_resume_is_exact(world_dirs, trained, tmp_path, capsys):
    whole, part = tmp_path / "whole", tmp_path / "part"
    _train(world_dirs, whole, run={"eval_every": 0})
    _train(world_dirs, part, run={"steps": 3, "eval_every": 0})
    capsys.readouterr()
    _train(world_dirs, part, run={"eval_every": 0})
    assert "resumed from step 3" in capsys.readouterr().err
    a = jax.tree.leaves(predict.load_postnet(whole)[1])
    b = jax.tree.leaves(predict.load_postnet(part)[1])
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    # With pool checks every 2 steps (the `trained` run) the selection survives the
    # interruption too.
    split = tmp_path / "split"
    _train(world_dirs, split, run={"steps": 3})
    _train(world_dirs, split)
    assert predict.read_selected_info(split) == predict.read_selected_info(trained)
    for x, y in zip(jax.tree.leaves(predict.load_postnet(trained)[1]),
                    jax.tree.leaves(predict.load_postnet(split)[1])):
        np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_bench_smoke():
    proc = _run("experiments.bench.postnet", "--smoke")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["jax_steps_per_s"] > 0 and result["torch_steps_per_s"] > 0
    assert result["first_step_rel_err"]["g_loss"] < 1e-4
