"""Stage-3 training: ray batches, the head and torso steps (1 vs 8 devices, learning,
exact resume), rendering whole frames, image metrics, the head/torso runs and their
evaluation (`train.nerf.train_nerf` / `evaluate_nerf` in process, on the `tiny` preset of
experiments/configs/nerf.py) and the train_nerf command line, on a tiny synthetic
person."""

import dataclasses
import json
import shutil

import jax
import numpy as np
from PIL import Image
import pytest

from geneface_jax import train
from geneface_jax.data import format as fmt
from geneface_jax.data.epochs import epoch_indices
from geneface_jax.data.synthetic import world
from geneface_jax.errors import CheckpointError, InputError, ShapeError
from geneface_jax.render import fields
from geneface_jax.render import frames as rf
from geneface_jax.render import image_metrics as im
from geneface_jax.train import nerf as tn

from conftest import run_module
from experiments.configs import nerf as nerf_presets

# the tiny preset's model: 3x32 MLP, skip after layer 1, colour head 1x16, 8 + 8 samples
TINY = dataclasses.replace(tn.model_config(nerf_presets.get_config("tiny").model),
                           smooth_warmup_steps=3, near=0.4, far=0.8)


@pytest.fixture(scope="module")
def person_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("stage3") / "person"
    arrays, meta, wav = world.make_person(5, size=32, num_frames=24, progress=False)
    fmt.write_person(out, arrays, meta, wav)
    return out


@pytest.fixture(scope="module")
def views(person_dir):
    return tn.PersonViews(fmt.load_person(person_dir))


def test_landmark_normalizer_and_windows(views, tmp_path):
    norm = views.normalizer
    lo, hi = views.split_range("train")
    z = norm(views.landmarks[lo:hi])
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(np.sqrt(np.mean(z.var(0))), 1.0, rtol=1e-4)
    norm.save(tmp_path / "n.npz")
    back = rf.LandmarkNormalizer.load(tmp_path / "n.npz")
    np.testing.assert_array_equal(back.mean, norm.mean)
    assert back.scale == pytest.approx(norm.scale)
    with pytest.raises(ShapeError):
        norm(np.zeros((3, 67, 3)))
    seq = np.arange(10)[:, None]
    w = rf.landmark_windows(seq, [0, 5, 9], 5, lo=0, hi=10)[..., 0]
    np.testing.assert_array_equal(w, [[0, 0, 0, 1, 2], [3, 4, 5, 6, 7], [7, 8, 9, 9, 9]])
    # Clamped to the split: the valid split's windows never read training frames.
    w = rf.landmark_windows(seq, [6], 5, lo=6, hi=10)[..., 0]
    np.testing.assert_array_equal(w, [[6, 6, 6, 7, 8]])


def test_batches_are_pure_and_sample_the_rect(views):
    samp = tn.RaySamplingConfig(frames_per_step=2, rays_per_frame=400, in_rect_percent=0.75)
    get = tn.make_batch_fn(views, "head", samp, window=5, seed=3)
    a, b = get(7), get(7)
    for k in a["rays"]:
        np.testing.assert_array_equal(a["rays"][k], b["rays"][k])
    r = a["rays"]
    assert r["rows"].shape == (800,) and r["target"].shape == (800, 3)
    assert a["frames"]["windows"].shape == (2, 5, 68, 3)
    assert set(np.unique(r["frame"])) == {0, 1}
    lo, hi = views.split_range("train")
    ts = lo + epoch_indices(3, 7, hi - lo, 2)
    np.testing.assert_array_equal(a["frames"]["pose"], views.poses[ts])
    for i, t in enumerate(ts):
        sel = r["frame"] == i
        x0, y0, x1, y1 = views.face_rect[t]
        inside = ((r["cols"][sel] >= x0) & (r["cols"][sel] < x1) & (r["rows"][sel] >= y0)
                  & (r["rows"][sel] < y1))
        assert inside.sum() == 300
        np.testing.assert_allclose(
            r["target"][sel], views.frames[t, r["rows"][sel], r["cols"][sel]] / 255.0, atol=1e-6)
        # The head's background is the GT torso where the mask says torso, else the plate.
        torso = views.masks[t, r["rows"][sel], r["cols"][sel]] == fmt.TORSO
        assert torso.any() and (~torso).any()
        np.testing.assert_allclose(r["background"][sel][torso], r["target"][sel][torso])
        np.testing.assert_allclose(r["background"][sel][~torso],
                                   views.background[r["rows"][sel], r["cols"][sel]][~torso])
    assert not np.array_equal(get(8)["rays"]["rows"], r["rows"])
    t = tn.make_batch_fn(views, "torso", samp, window=5, seed=3)(7)
    np.testing.assert_array_equal(t["frames"]["torso_pose"][1], views.torso_pose())


def test_eye_rays_and_closing_eye_frames(tmp_path):
    """`eye_percent` of a frame's rays fall in its eye box (which holds the eye points);
    `blink_frame_percent` of the frames are drawn among those whose eyes close; both
    pure functions of the step, and nothing of the kind for the torso."""
    from geneface_jax.data import landmarks as lm
    arrays, meta, wav = world.make_person(5, size=32, num_frames=125, progress=False)
    fmt.write_person(tmp_path / "person", arrays, meta, wav)
    views = tn.PersonViews(fmt.load_person(tmp_path / "person"))     # 5 s: a few blinks
    lo, hi = views.split_range("train")
    closing = views.closing_eye_frames()
    ear = lm.eye_aspect_ratio(views.landmarks[lo:hi])
    assert 0 < len(closing) < (hi - lo) // 4
    np.testing.assert_array_equal(closing, lo + np.flatnonzero(ear < 0.75 * np.median(ear)))
    eyes = views.landmarks_2d[:, 36:48]
    x0, y0, x1, y1 = views.eye_rect.T
    assert ((eyes[..., 0] >= x0[:, None]) & (eyes[..., 0] <= x1[:, None])
            & (eyes[..., 1] >= y0[:, None]) & (eyes[..., 1] <= y1[:, None])).all()
    samp = tn.RaySamplingConfig(frames_per_step=4, rays_per_frame=200, in_rect_percent=1.0,
                                eye_percent=0.25, blink_frame_percent=0.5)
    get = tn.make_batch_fn(views, "head", samp, window=5, seed=3)
    drawn = []
    for step in range(40):
        a = get(step)
        np.testing.assert_array_equal(a["rays"]["rows"], get(step)["rays"]["rows"])
        ts = lo + a["frames"]["code_index"]
        np.testing.assert_array_equal(a["frames"]["pose"], views.poses[ts])
        drawn.extend(ts)
        r = a["rays"]
        for i, t in enumerate(ts):
            sel = r["frame"] == i
            x0, y0, x1, y1 = views.eye_rect[t]
            inside = ((r["cols"][sel] >= x0) & (r["cols"][sel] < x1)
                      & (r["rows"][sel] >= y0) & (r["rows"][sel] < y1))
            assert inside.sum() >= 50
    share = np.isin(drawn, closing).mean()
    base = len(closing) / (hi - lo)
    assert share > base + 0.25, (share, base)          # about half of them, not ~base
    plain = tn.make_batch_fn(views, "torso", samp, window=5, seed=3)(0)
    np.testing.assert_array_equal(plain["frames"]["code_index"],
                                  epoch_indices(3, 0, hi - lo, 4))


def test_ray_bounds_from_the_dataset_or_the_config():
    cfg = fields.NeRFConfig()                       # GeneFace's fixed 0.3 / 0.9
    meta = {"near": 0.45, "far": 0.7}
    assert tn.ray_bounds(meta, cfg) == (0.45, 0.7)
    assert tn.ray_bounds(meta, cfg, "config") == (0.3, 0.9)
    assert tn.ray_bounds({}, cfg, "dataset") == (0.3, 0.9)
    mine = dataclasses.replace(cfg, near=0.2)       # --config.bounds=config --config.model.near
    assert tn.ray_bounds(meta, mine, "config") == (0.2, 0.9)
    with pytest.raises(ValueError):
        tn.ray_bounds(meta, cfg, "person")


def test_presets_hold_every_model_field_and_the_documented_runs():
    """config.model is NeRFConfig field by field (paper = its defaults, GeneFace's); cpu is
    the documented CPU run; a bad model is one InputError naming config.model."""
    paper, cpu = nerf_presets.get_config("paper"), nerf_presets.get_config("cpu")
    assert set(paper.model) == {f.name for f in dataclasses.fields(fields.NeRFConfig)}
    assert tn.model_config(paper.model) == fields.NeRFConfig()
    small = tn.model_config(cpu.model)
    assert (small.width, small.depth, small.skip, small.color_width, small.color_depth,
            small.num_coarse, small.num_fine, small.smooth_warmup_steps) == (
        128, 6, 3, 64, 2, 24, 24, 1000)
    assert (cpu.head.rays, cpu.head.lr, cpu.head.lr_decay_steps, cpu.run.steps) == (
        1024, 1e-3, 2000, 2000)
    assert (cpu.torso.rays, cpu.torso.lr_decay_steps, cpu.run.torso_steps) == (1024, 300, 300)
    assert (paper.head.rays, paper.head.lr, paper.head.lr_decay, paper.head.lr_decay_steps,
            paper.head.in_rect_percent, paper.torso.in_rect_percent) == (
        2048, 5e-4, 0.1, 250_000, 0.95, 0.8)
    with pytest.raises(InputError, match=r"config.model: .*\[0, depth - 2\] = \[0, 2\]"):
        tn.model_config(dict(cpu.model, depth=4, skip=3))


def _run_steps(step_fn, state, get, steps, devices):
    mesh = train.make_mesh(jax.devices()[:devices])
    run = train.data_parallel(step_fn, mesh, replicated=("frames",))
    state = train.replicate(state, mesh)
    ms = []
    for s in range(steps):
        batch = train.shard_batch(get(s), mesh, ("frames",))
        state, m = run(state, batch, jax.random.PRNGKey(s))
        ms.append({k: float(v) for k, v in jax.device_get(m).items()})
    return jax.device_get(state), ms


def _close(a, b, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=1e-4)


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (simulated) devices")
def test_head_and_torso_steps_equal_on_1_and_8_devices(views):
    samp = tn.RaySamplingConfig(frames_per_step=2, rays_per_frame=64)
    optim = tn.NeRFOptimConfig(lr=1e-3)
    head, st = tn.create_nerf_state(TINY, optim, "head", 0)
    step = tn.make_head_step(head, views.intrinsics)
    get = tn.make_batch_fn(views, "head", samp, window=5, seed=0)
    s1, m1 = _run_steps(step, st, get, 4, 1)      # crosses the smoother warm-up (3)
    s8, m8 = _run_steps(step, tn.create_nerf_state(TINY, optim, "head", 0)[1], get, 4, 8)
    _close(s1.params, s8.params, 1e-5)
    for a, b in zip(m1, m8):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    assert int(s1.step) == 4

    torso, tst = tn.create_nerf_state(TINY, optim, "torso", 1, {"params": s1.params})
    tstep = tn.make_torso_step(torso, head, views.intrinsics)
    tget = tn.make_batch_fn(views, "torso", samp, window=5, seed=0)
    t1, n1 = _run_steps(tstep, tst, tget, 2, 1)
    t8, n8 = _run_steps(tstep, tn.create_nerf_state(TINY, optim, "torso", 1,
                                                    {"params": s1.params})[1], tget, 2, 8)
    _close(t1.params, t8.params, 1e-5)
    # The head is frozen: carried unchanged through the torso steps.
    _close(t1.frozen["head"]["params"], s1.params, 0.0)
    assert n1[-1]["loss"] == pytest.approx(n8[-1]["loss"], rel=1e-4)


def test_geneface_pixel_convention_in_the_step_and_the_renderer(views):
    """pixel_convention='geneface' casts the rays of `ray_intrinsics(..., 'geneface')` in
    training and rendering: a step equals the default step given those intrinsics."""
    h, w = views.height, views.width
    k_gf = np.array([views.intrinsics[0], views.intrinsics[1], w / 2 + 0.5, h / 2 + 0.5],
                    np.float32)
    gf = dataclasses.replace(TINY, pixel_convention="geneface")
    with pytest.raises(ValueError):
        dataclasses.replace(TINY, pixel_convention="corners")
    with pytest.raises(ValueError):                 # needs the image size
        tn.make_head_step(fields.HeadNeRF(gf), views.intrinsics)
    samp = tn.RaySamplingConfig(frames_per_step=1, rays_per_frame=32)
    get = tn.make_batch_fn(views, "head", samp, window=5, seed=0)
    optim = tn.NeRFOptimConfig()
    head_gf, st_gf = tn.create_nerf_state(gf, optim, "head", 0)
    head_c = fields.HeadNeRF(TINY)
    fresh = lambda: tn.create_nerf_state(TINY, optim, "head", 0)[1]  # noqa: E731 (donated)
    r = rf.FrameRenderer(gf, {"params": st_gf.params}, views)
    _, m_gf = _run_steps(tn.make_head_step(head_gf, views.intrinsics, (h, w)), st_gf, get, 1, 1)
    _, m_eq = _run_steps(tn.make_head_step(head_c, k_gf), fresh(), get, 1, 1)
    _, m_c = _run_steps(tn.make_head_step(head_c, views.intrinsics, (h, w)), fresh(), get, 1, 1)
    assert m_gf[0]["loss"] == pytest.approx(m_eq[0]["loss"], rel=1e-6)
    assert m_gf[0]["loss"] != pytest.approx(m_c[0]["loss"], rel=1e-6)
    np.testing.assert_allclose(r.head_ray_intrinsics, k_gf)
    np.testing.assert_array_equal(r.intrinsics, views.intrinsics)


def test_head_overfits_four_frames_and_renders_them(views):
    """~1 minute of training (on a 2-core CPU) on 4 frames: the rendered frames exceed
    22 dB PSNR (head over the ground-truth torso and background)."""
    cfg = dataclasses.replace(TINY, width=64, depth=4, skip=2, color_width=32,
                              num_coarse=16, num_fine=16, smooth_warmup_steps=10_000)
    four = tn.PersonViews.__new__(tn.PersonViews)
    four.__dict__.update(views.__dict__, splits={**views.splits, "four": (0, 4)})
    head, st = tn.create_nerf_state(cfg, tn.NeRFOptimConfig(lr=2e-3, decay_steps=200),
                                    "head", 0)
    get = tn.make_batch_fn(four, "head", tn.RaySamplingConfig(rays_per_frame=512),
                           window=5, seed=0, split="four")
    st, ms = _run_steps(tn.make_head_step(head, views.intrinsics), st, get, 200, 1)
    r = rf.FrameRenderer(cfg, {"params": st.params}, four, chunk=300, smooth=False)
    scores = []
    for t in range(4):
        out = r.render(views.poses[t], four.windows([t], 5, "four")[0])
        gt = views.frames[t] / 255.0
        under = np.where((views.masks[t] == fmt.TORSO)[..., None], gt, views.background)
        pred = out["rgb"] + (1 - out["head_acc"][..., None]) * (under - views.background)
        scores.append(im.psnr(pred, gt))
    print("4-frame overfit PSNR", scores)
    assert min(scores) > 22.0
    # The head occupies the head pixels and leaves the background alone.
    head_px = views.masks[3] == fmt.HEAD
    assert out["head_acc"][head_px].mean() > 0.7
    far = np.ones_like(head_px)
    far[:, 6:26] = False
    assert out["head_acc"][far].mean() < 0.3
    # Another chunk size gives the same image up to matmul reassociation (the exact
    # 1e-6 chunk/device invariance of the renderer is tested in test_render_core; on a
    # trained field's sharp weights float noise moves a ray's fine samples, and a pixel
    # can change by ~1e-4).
    r2 = rf.FrameRenderer(cfg, {"params": st.params}, four, chunk=97, smooth=False)
    diff = np.abs(r2.render(views.poses[3], four.windows([3], 5, "four")[0])["rgb"] - out["rgb"])
    assert diff.mean() < 1e-6 and diff.max() < 1e-3, (diff.mean(), diff.max())


def test_nan_landmarks_are_refused(views):
    lms = views.landmarks.copy()
    lms[4, 50, 1] = np.nan
    with pytest.raises(InputError, match="NaN"):
        views.windows([3, 4], 5, "train", lms)
    head = fields.HeadNeRF(TINY)
    _, st = tn.create_nerf_state(TINY, tn.NeRFOptimConfig(), "head", 0)
    bad = np.full((1, 5, 68, 3), np.nan, np.float32)
    with pytest.raises(InputError, match="NaN"):
        head.apply({"params": st.params}, bad, True, method=fields.HeadNeRF.condition)


def test_psnr_and_ssim():
    rng = np.random.default_rng(0)
    a = rng.uniform(size=(24, 24, 3))
    assert im.ssim(a, a) == pytest.approx(1.0)
    assert im.psnr(a, a + 0.1) == pytest.approx(20.0, abs=1e-6)
    mask = np.zeros((24, 24), bool)
    mask[:4] = True
    b = a.copy()
    b[~mask] += 0.5
    assert im.psnr(a, b, mask) > 100
    assert im.ssim(a, np.clip(a + rng.normal(0, 0.2, a.shape), 0, 1)) < 0.9
    with pytest.raises(ShapeError):
        im.ssim(a, a[..., 0])
    m = im.rect_mask((2, 3, 5, 4), 6, 6)
    assert m.sum() == 3 and m[3, 2:5].all()


# --------------------------------------------------------------------------- runs

# Slow (~40 s): the default suite checks exact resume of the shared train loop with a
# SIGKILL (test_train_infra.py), as for stages 1 and 2; this torso round trip (the frozen
# head travels in the checkpoint) runs with `-m slow`, next to the run resume test.
@pytest.mark.slow
def test_torso_training_resumes_exactly_in_process(views, tmp_path):
    """train_loop stopped at step 3 and resumed to 6 equals an uninterrupted 6-step run
    (torso: the frozen head travels in the checkpoint)."""
    optim = tn.NeRFOptimConfig(lr=1e-3)
    head = fields.HeadNeRF(TINY)
    _, hs = tn.create_nerf_state(TINY, optim, "head", 0)
    samp = tn.RaySamplingConfig(frames_per_step=2, rays_per_frame=32)
    get = tn.make_batch_fn(views, "torso", samp, window=5, seed=1)
    mesh = train.make_mesh(jax.devices()[:2])

    def run(workdir, steps):
        torso, st = tn.create_nerf_state(TINY, optim, "torso", 2, {"params": hs.params})
        out, _ = train.train_loop(workdir=workdir, state=st,
                                  step_fn=tn.make_torso_step(torso, head, views.intrinsics),
                                  get_batch=get, num_steps=steps, mesh=mesh, log_every=1,
                                  checkpoint_every=100, progress=False, replicated=("frames",))
        return jax.device_get(out)

    full = run(tmp_path / "a", 6)
    run(tmp_path / "b", 3)
    resumed = run(tmp_path / "b", 6)
    assert int(resumed.step) == 6
    for x, y in zip(jax.tree.leaves((full.params, full.opt_state, full.rng)),
                    jax.tree.leaves((resumed.params, resumed.opt_state, resumed.rng))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _one_device():
    # 8 simulated devices on a 2-core CPU only cost time here (the steps' 1-vs-8 equality
    # is tested above, the renderer's in test_render_core)
    return train.make_mesh(jax.devices()[:1])


@pytest.fixture(scope="module")
def runs(person_dir, tmp_path_factory):
    """(root, head metrics, torso metrics): `train_nerf` of the tiny preset, head (10
    steps) then torso (4 steps) in root/head and root/torso."""
    root = tmp_path_factory.mktemp("nerf_runs")
    config = nerf_presets.get_config("tiny")
    head = tn.train_nerf(config, root / "head", "head", person_dir, mesh=_one_device())
    torso = tn.train_nerf(config, root / "torso", "torso", head=root / "head",
                          mesh=_one_device())
    return root, head, torso


def test_head_and_torso_runs_write_what_the_loaders_read(runs, person_dir):
    root, m, tm = runs
    head, torso = root / "head", root / "torso"
    assert json.loads((head / "metrics.json").read_text()) == pytest.approx(m)
    assert json.loads((torso / "metrics.json").read_text()) == pytest.approx(tm)
    for metrics in (m, tm):
        for k in ("train_loss", "train_mse_coarse", "train_mse_fine", "train_psnr",
                  "train_grad_norm", "eval_psnr", "steps_per_s", "rays_per_s",
                  "train_minutes", "minutes"):
            assert np.isfinite(metrics[k]) and metrics[k] >= 0, k
        assert metrics["resumed_from"] == 0 and metrics["devices"] == 1
    assert (m["part"], m["steps"], tm["part"], tm["steps"]) == ("head", 10, "torso", 4)
    assert "train_acc" in m and "train_torso_acc" in tm
    cfg = json.loads((head / "config.json").read_text())
    assert (cfg["model"]["near"], cfg["model"]["far"]) == (0.4, 0.8)   # from the dataset
    assert cfg["data"] == str(person_dir.absolute()) and cfg["run"]["steps"] == 10
    for part in (head, torso):            # the preset's sizes reach both models
        model = json.loads((part / "config.json").read_text())["model"]
        assert [model[k] for k in ("width", "depth", "skip", "num_coarse", "num_fine")] == [
            32, 3, 1, 8, 8], part
    assert (head / "landmark_norm.npz").is_file() and (torso / "landmark_norm.npz").is_file()
    tcfg = json.loads((torso / "config.json").read_text())
    assert tcfg["head"] == str(head.absolute()) and tcfg["head_model"] == cfg["model"]
    assert tcfg["data"] == str(person_dir.absolute())            # the head run's
    assert tcfg["sampling"]["in_rect_percent"] == 0.8 and tcfg["run"]["steps"] == 4
    # What synthesize and eval_nerf load (render.frames.load_nerf)
    hcfg, hvars, hrun, _ = rf.load_nerf(head, "head")
    tcfg_, _, trun, _ = rf.load_nerf(torso, "torso")
    assert hcfg == tn.model_config(cfg["model"]) and hrun["trained_steps"] == 10
    assert trun["trained_steps"] == 4 and tcfg_.cond_dim == hcfg.cond_dim
    with pytest.raises(CheckpointError):
        rf.load_nerf(head, "torso")


def test_evaluate_nerf_scores_held_out_frames(runs, tmp_path):
    root, m, tm = runs
    e = tn.evaluate_nerf(root / "head", tmp_path / "ev", torso=root / "torso", max_frames=2,
                         save_frames=True, mesh=_one_device())
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text()) == pytest.approx(
        e, nan_ok=True)
    for k in ("psnr_head", "psnr_full", "ssim_full", "mouth_control_ratio",
              "mouth_change_inside", "mouth_change_outside", "minutes"):
        assert np.isfinite(e[k]), k
    assert e["frames"] == 2 and e["torso"] and e["split"] == "valid"
    assert e["train_minutes"] == pytest.approx(m["train_minutes"] + tm["train_minutes"])
    saved = np.load(tmp_path / "ev" / "frames.npz")
    assert saved["pred"].shape == saved["gt"].shape == (2, 32, 32, 3)
    assert saved["pred"].dtype == np.uint8 and len(saved["indices"]) == 2
    assert saved["mouth_closed"].shape == saved["mouth_open"].shape == (32, 32, 3)
    assert saved["mouth_open"].dtype == np.uint8
    assert e["mouth_control_frames"][0] == saved["indices"][0]
    strip = np.asarray(Image.open(tmp_path / "ev" / "frames.png"))   # renders over truth
    assert strip.shape == (2 * 32 * 3, 2 * 32 * 3, 3)
    np.testing.assert_array_equal(strip[::3, ::3][32:, :32], saved["gt"][0])
    # The tracker figures: counted frames, and the noise floor of the ground truth.
    assert e["tracked_face_found_reference"] in (0.0, 0.5, 1.0)
    assert 0 <= e["tracked_frames_both"] <= 2 and 0.0 <= e["tracked_face_found"] <= 1.0
    assert {"tracked_lmd_mouth", "tracked_lmd_face_512", "tracked_mouth_r",
            "floor_lmd_mouth", "floor_tracked_mouth_r"} <= set(e)
    # The head alone: over the ground-truth torso; no frames.npz unless asked; untracked.
    h = tn.evaluate_nerf(root / "head", tmp_path / "h", max_frames=1, mesh=_one_device(),
                         track=False)
    assert not h["torso"] and h["frames"] == 1 and np.isfinite(h["psnr_full"])
    assert not (tmp_path / "h" / "frames.npz").exists()
    assert not any(k.startswith(("tracked_", "floor_")) for k in h)


def test_runs_refuse_bad_input_before_writing(runs, person_dir, tmp_path):
    root = runs[0]
    tiny = nerf_presets.get_config("tiny")
    with pytest.raises(CheckpointError, match="expected 'head'"):
        tn.train_nerf(tiny, tmp_path / "x", "torso", head=root / "torso")
    with pytest.raises(InputError, match="head run"):
        tn.train_nerf(tiny, tmp_path / "x", "torso")
    with pytest.raises(CheckpointError, match="no NeRF run"):
        tn.evaluate_nerf(tmp_path / "nothing", tmp_path / "ev")
    copy = tmp_path / "head"
    shutil.copytree(root / "head", copy)
    with pytest.raises(CheckpointError, match="different configuration"):
        tn.train_nerf(nerf_presets.get_config("paper"), copy, "head", person_dir)
    bad = [("model.skip", 2, r"config.model: .*\[0, depth - 2\] = \[0, 1\]"),
           ("head.frames_per_step", 3, r"config.head.rays=128 must be a positive multiple"),
           ("bounds", "person", "config.bounds must be one of")]
    for key, value, message in bad:
        c = nerf_presets.get_config("tiny")
        section, _, name = key.rpartition(".")
        (c[section] if section else c)[name] = value
        with pytest.raises(InputError, match=message):
            tn.train_nerf(c, tmp_path / "bad", "head", person_dir, mesh=_one_device())
    assert not (tmp_path / "x").exists() and not (tmp_path / "bad").exists()
    assert not (tmp_path / "ev").exists()


@pytest.mark.slow
def test_head_run_resumes_exactly(person_dir, tmp_path):
    """A run stopped at step 10 and continued to 20 equals an uninterrupted 20-step run;
    the resume may change run controls (steps, intervals) but nothing else."""
    def config(steps):
        c = nerf_presets.get_config("tiny")
        c.run.update(steps=steps, log_every=10, checkpoint_every=10)
        return c

    a, b = tmp_path / "a", tmp_path / "b"
    tn.train_nerf(config(20), a, "head", person_dir, mesh=_one_device())
    tn.train_nerf(config(10), b, "head", person_dir, mesh=_one_device())
    out = tn.train_nerf(config(20), b, "head", person_dir, mesh=_one_device())
    _, va, _, _ = rf.load_nerf(a, "head")
    _, vb, _, _ = rf.load_nerf(b, "head")
    for x, y in zip(jax.tree.leaves(va), jax.tree.leaves(vb)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert out["resumed_from"] == 10
    assert json.loads((b / "metrics.json").read_text())["resumed_from"] == 10
    assert json.loads((b / "config.json").read_text())["run"]["steps"] == 20


def test_train_nerf_command_line(person_dir, tmp_path):
    """The command's contract: a missing flag or an unknown --model is absl's usage error;
    a config that makes no model is one `error:` line, exit status 2, nothing written
    (`--model=mlp` picks experiments/configs/nerf.py; the grid renderer is the default)."""
    p = run_module("experiments.train_nerf", "--part=torso", f"--workdir={tmp_path / 'x'}",
                   check=False)
    assert p.returncode != 0 and "--head is required" in p.stderr
    p = run_module("experiments.train_nerf", "--part=head", f"--data={person_dir}",
                   f"--workdir={tmp_path / 'x'}", "--model=voxels", check=False)
    assert p.returncode != 0 and "flag --model=voxels" in p.stderr
    p = run_module("experiments.train_nerf", "--part=head", f"--data={person_dir}",
                   f"--workdir={tmp_path / 'x'}", "--model=mlp", "--config=tiny",
                   "--config.model.depth=4",
                   "--config.model.skip=3", check=False)
    assert p.returncode == 2 and p.stderr.startswith("error: config.model: "), p.stderr
    assert "[0, depth - 2] = [0, 2]" in p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "x").exists()
