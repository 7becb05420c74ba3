"""Stage 1 generator: KL against NumPy, flow invertibility inside the FVAE, sampling,
chunked inference without seams, shape errors, and training-step behaviour."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import optimizer_moves, perturbed
from geneface_jax import train
from geneface_jax.data.epochs import epoch_indices
from geneface_jax.errors import ShapeError
from geneface_jax.motion import vae as vae_lib
from geneface_jax.motion.predict import MotionPredictor, receptive_field
from geneface_jax.motion.syncnet import SyncNetConfig, init_syncnet
from geneface_jax.train import audio2motion as a2m

TINY = vae_lib.Audio2MotionConfig(feature_dim=12, hidden=16, latent=4, kernel_size=3,
                                  enc_layers=2, dec_layers=2, flow_hidden=8, flow_layers=2,
                                  num_flows=2, cond_dim=8)


def _perturb(tree, seed, scale=0.05):
    """Adds noise to every leaf so zero-initialised layers (the coupling `post`) act."""
    return perturbed(tree, seed, scale)


def _batch(b=3, t=24, lengths=(24, 17, 9), c=12, d=204, seed=0):
    rng = np.random.default_rng(seed)
    mask = (np.arange(t)[None] < np.array(lengths)[:, None]).astype(np.float32)[..., None]
    feats = rng.normal(size=(b, 2 * t, c)).astype(np.float32) * np.repeat(mask, 2, axis=1)
    motion = rng.normal(size=(b, t, d)).astype(np.float32) * mask
    return feats, motion, mask


@pytest.fixture(scope="module")
def tiny():
    model, variables = vae_lib.init_audio2motion(TINY, 0)
    return model, {"params": _perturb(variables["params"], 1),
                   "batch_stats": variables["batch_stats"]}


def test_kl_matches_numpy(tiny):
    model, variables = tiny
    feats, motion, mask = _batch()
    out = model.apply(variables, feats, motion, mask, train=False,
                      rngs={"sample": jax.random.PRNGKey(5)})
    m, logs, z, zp = (np.asarray(out[k], np.float64) for k in ("m_q", "logs_q", "z_q", "z_p"))
    lmask = np.asarray(mask[:, ::4], np.float64)
    # log N(z; m, e^logs) - log N(zp; 0, 1), written out longhand.
    logq = -0.5 * np.log(2 * np.pi) - logs - 0.5 * ((z - m) / np.exp(logs)) ** 2
    logp = -0.5 * np.log(2 * np.pi) - 0.5 * zp ** 2
    expected = ((logq - logp) * lmask).sum() / lmask.sum() / z.shape[-1]
    got = float(vae_lib.kl_loss(out["z_q"], out["m_q"], out["logs_q"], out["z_p"],
                                jnp.asarray(lmask, jnp.float32)))
    assert abs(got - expected) <= 1e-5 * max(1.0, abs(expected))
    np.testing.assert_allclose(out["kl_terms"], (logq - logp) * lmask, atol=1e-5)
    # The encoder really samples: z = m + eps * exp(logs) with unit-variance eps.
    eps = (z - m) / np.exp(logs)
    assert 0.6 < eps.std() < 1.4 and not np.allclose(z, m)


def test_prior_flow_inverse_of_forward_and_volume_preserving(tiny):
    model, variables = tiny
    feats, motion, mask = _batch()
    out = model.apply(variables, feats, motion, mask, train=False,
                      rngs={"sample": jax.random.PRNGKey(2)})
    params = variables["params"]["vae"]
    lmask = mask[:, ::4]

    def flow(z, reverse, g, lmask=lmask):
        blk = vae_lib.ResidualCouplingBlock(TINY.latent, TINY.flow_hidden, TINY.flow_kernel, 1,
                                            TINY.flow_layers, TINY.num_flows,
                                            gin_channels=TINY.cond_dim, dropout_before_gate=True)
        return blk.apply({"params": params["prior_flow"]}, z, lmask, g, reverse=reverse)

    g_sqz = vae_lib.WNConv1d(TINY.cond_dim, 8, stride=4, padding=2, use_weight_norm=False).apply(
        {"params": params["g_pre_net"]}, out["cond"])
    zp = flow(out["z_q"] * lmask, False, g_sqz)
    np.testing.assert_allclose(zp, out["z_p"] * lmask, atol=1e-5)
    assert float(jnp.max(jnp.abs(zp - out["z_q"] * lmask))) > 1e-3   # the flow does something
    back = flow(zp, True, g_sqz)
    np.testing.assert_allclose(back, out["z_q"] * lmask, atol=1e-5)
    jac = jax.jacfwd(lambda z: flow(z, False, g_sqz[:1, :2], lmask[:1, :2])[0].ravel())(
        out["z_q"][:1, :2])
    jac = np.asarray(jac).reshape(2 * TINY.latent, 2 * TINY.latent)
    assert abs(np.linalg.slogdet(jac)[1]) < 1e-4


def test_sampling_temperature_and_determinism(tiny):
    model, variables = tiny
    feats, _, mask = _batch()
    noise = jax.random.normal(jax.random.PRNGKey(0), (3, 6, TINY.latent))
    a = model.apply(variables, feats, mask, noise, 1.0, method=model.sample)
    b = model.apply(variables, feats, mask, noise, 1.0, method=model.sample)
    c = model.apply(variables, feats, mask, noise, 0.0, method=model.sample)
    d = model.apply(variables, feats, mask, 2 * noise, 0.5, method=model.sample)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, d, atol=1e-6)
    assert float(jnp.max(jnp.abs(a - c))) > 1e-3
    assert a.shape == (3, 24, 204)
    np.testing.assert_array_equal(np.asarray(a)[1, 17:], 0.0)   # padding stays masked


def test_regression_baseline_has_no_latent():
    cfg = vae_lib.Audio2MotionConfig(**{**TINY.__dict__, "use_latent": False})
    model, variables = vae_lib.init_audio2motion(cfg, 0)
    assert "encoder" not in variables["params"]["vae"]
    assert "prior_flow" not in variables["params"]["vae"]
    feats, motion, mask = _batch()
    out = model.apply(variables, feats, motion, mask, train=False,
                      rngs={"sample": jax.random.PRNGKey(0)})
    assert float(jnp.abs(out["kl_terms"]).max()) == 0.0
    n1 = jax.random.normal(jax.random.PRNGKey(1), (3, 6, cfg.latent))
    s1 = model.apply(variables, feats, mask, n1, 1.0, method=model.sample)
    s2 = model.apply(variables, feats, mask, 3 * n1, 1.0, method=model.sample)
    np.testing.assert_array_equal(s1, s2)                  # deterministic in the noise
    np.testing.assert_allclose(s1, out["recon"], atol=1e-5)


def test_bad_shapes_raise(tiny):
    model, variables = tiny
    feats, motion, mask = _batch()
    rngs = {"sample": jax.random.PRNGKey(0)}
    with pytest.raises(ShapeError, match="2 frames per motion frame"):
        model.apply(variables, feats[:, :-2], motion, mask, rngs=rngs)
    with pytest.raises(ShapeError, match="multiple of the latent stride"):
        model.apply(variables, feats[:, :-4], motion[:, :-2], mask[:, :-2], rngs=rngs)
    with pytest.raises(ShapeError, match="204 channels"):
        model.apply(variables, feats, motion[..., :-3], mask, rngs=rngs)
    with pytest.raises(ShapeError, match="12 channels"):
        model.apply(variables, feats[..., :5], motion, mask, rngs=rngs)
    with pytest.raises(ShapeError, match="noise must be"):
        model.apply(variables, feats, mask, jnp.zeros((3, 5, 4)), 1.0, method=model.sample)
    pred = MotionPredictor(TINY, variables, chunk=16)
    with pytest.raises(ShapeError, match="even number"):
        pred.sample_motion(np.zeros((7, 12), np.float32), jax.random.PRNGKey(0))
    with pytest.raises(ShapeError, match=r"\[2T, 12\]"):
        pred.sample_motion(np.zeros((8, 80), np.float32), jax.random.PRNGKey(0))
    with pytest.raises(ShapeError, match="NaN"):
        pred.sample_motion(np.full((8, 12), np.nan, np.float32), jax.random.PRNGKey(0))
    with pytest.raises(ShapeError, match="multiples"):
        MotionPredictor(TINY, variables, chunk=30)


def test_chunked_inference_has_no_seams(tiny):
    _, variables = tiny
    num = 203                                   # not a multiple of the stride or the chunk
    feats = np.random.default_rng(3).normal(size=(2 * num, 12)).astype(np.float32)
    key = jax.random.PRNGKey(7)
    whole = MotionPredictor(TINY, variables, chunk=208).sample_motion(feats, key)
    chunked_pred = MotionPredictor(TINY, variables, chunk=16)
    chunked = chunked_pred.sample_motion(feats, key)
    assert whole.shape == chunked.shape == (num, 204)
    np.testing.assert_allclose(chunked, whole, atol=1e-5)
    assert chunked_pred.context >= receptive_field(TINY)
    # Too little context shows the seams: the test can tell.
    short = MotionPredictor(TINY, variables, chunk=16, context=4).sample_motion(feats, key)
    assert np.abs(short - whole).max() > 1e-4
    # A 10-minute input (15000 frames) runs window by window at one compiled shape.
    long_feats = np.random.default_rng(4).normal(size=(30000, 12)).astype(np.float32)
    out = chunked_pred.sample_motion(long_feats, key)
    assert out.shape == (15000, 204) and np.all(np.isfinite(out))
    assert chunked_pred._run._cache_size() == 1


def _steps_on(devices, use_sync, num_steps=3):
    mesh = train.make_mesh(devices)
    sc = SyncNetConfig(feature_dim=12, base=8, mouth_in=8, layers_per_block=2)
    syncnet, sync_vars = init_syncnet(sc, 3)
    sync_vars = {"params": _perturb(sync_vars["params"], 4, 0.1),
                 "batch_stats": sync_vars["batch_stats"]}
    model, state = a2m.create_vae_state(TINY, a2m.OptimConfig(warmup_steps=2), 0,
                                        sync_vars if use_sync else None)
    state = state.replace(params=_perturb(state.params, 1))
    losses = a2m.VAELossConfig(sync=0.5 if use_sync else 0.0)
    step, _ = a2m.make_vae_steps(model, losses, syncnet if use_sync else None, num_frames=24)
    run = train.data_parallel(step, mesh)
    state = train.replicate(state, mesh)
    history = []
    for s in range(num_steps):
        feats, motion, mask = _batch(b=8, lengths=(24, 17, 9, 24, 20, 12, 24, 8), seed=s)
        batch = {"mel": feats, "motion": motion, "mask": mask}
        state, m = run(state, train.shard_batch(batch, mesh), train.step_key(state, s))
        history.append({k: float(v) for k, v in jax.device_get(m).items()})
    return jax.device_get(state), history


def test_continuity_forms_closed_form():
    """'pairs': mean over valid consecutive pairs; 'geneface': GeneFace's
    `continuity_loss`, (sum of pair errors^2 + first frame's error^2) / (frames x D)."""
    rng = np.random.default_rng(3)
    b, t, d = 2, 6, 4
    lengths = np.array([6, 4])
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.float32)[..., None]
    pred = rng.normal(size=(b, t, d)).astype(np.float32) * mask
    tgt = rng.normal(size=(b, t, d)).astype(np.float32) * mask

    def losses(form):
        fn = lambda p, q, m: a2m.reconstruction_losses(p, q, m, form)  # noqa: E731
        return [float(x[0]) for x in jax.vmap(fn, axis_name=train.DATA_AXIS)(
            pred[None], tgt[None], mask[None])]

    pair_sq, first_sq, n_pairs = 0.0, 0.0, 0
    for i, n in enumerate(lengths):
        dp, dt = np.diff(pred[i, :n], axis=0), np.diff(tgt[i, :n], axis=0)
        pair_sq += np.sum((dp - dt) ** 2)
        n_pairs += n - 1
        first_sq += np.sum((pred[i, 0] - tgt[i, 0]) ** 2)
    l2, l1, cont = losses("pairs")
    assert cont == pytest.approx(pair_sq / (n_pairs * d), rel=1e-5)
    assert l2 == pytest.approx(np.sum((pred - tgt) ** 2) / (lengths.sum() * d), rel=1e-5)
    _, _, cont_gf = losses("geneface")
    assert cont_gf == pytest.approx((pair_sq + first_sq) / (lengths.sum() * d), rel=1e-5)
    with pytest.raises(ValueError):
        a2m.VAELossConfig(continuity_form="frames")


def test_cosine_learning_rate_schedule():
    """`cosine_steps`: GeneFace's SyncNet schedule, 0.5 (1 + cos(pi step / N)) lr."""
    optim = a2m.OptimConfig(lr=1e-3, warmup_steps=0, decay_rate=1.0, decay_steps=1,
                            clip_norm=0.0, cosine_steps=4)
    moves = optimizer_moves(optim.optimizer(), 5)
    # Adam moves ~lr per step on a constant unit gradient
    want = [1e-3 * 0.5 * (1 + np.cos(np.pi * k / 4)) for k in range(5)]
    np.testing.assert_allclose(moves, want, rtol=1e-3, atol=1e-9)


def test_vae_step_one_device_equals_eight_devices():
    s1, h1 = _steps_on(jax.devices()[:1], use_sync=True)
    s8, h8 = _steps_on(jax.devices(), use_sync=True)
    for a, b in zip(h1, h8):
        for k in a:
            assert abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])), (k, a[k], b[k])
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s8.params)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    for a, b in zip(jax.tree.leaves(s1.batch_stats), jax.tree.leaves(s8.batch_stats)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert h1[0]["sync"] > 0 and h1[0]["kl"] != 0
    # The frozen SyncNet is carried unchanged; the BatchNorm statistics did move.
    _, init_vars = vae_lib.init_audio2motion(TINY, 0)
    moved = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(s8.batch_stats),
                                                 jax.tree.leaves(init_vars["batch_stats"]))]
    assert max(moved) > 1e-4


def test_sync_loss_only_touches_the_generator():
    s_sync, _ = _steps_on(jax.devices()[:1], use_sync=True, num_steps=1)
    s_plain, _ = _steps_on(jax.devices()[:1], use_sync=False, num_steps=1)
    # Same data and keys: only the sync term differs, so params differ but SyncNet does not.
    diffs = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(s_sync.params),
                                                 jax.tree.leaves(s_plain.params))]
    assert max(diffs) > 0
    sc = SyncNetConfig(feature_dim=12, base=8, mouth_in=8, layers_per_block=2)
    _, sv = init_syncnet(sc, 3)
    sv = {"params": _perturb(sv["params"], 4, 0.1), "batch_stats": sv["batch_stats"]}
    for a, b in zip(jax.tree.leaves(s_sync.frozen["syncnet"]), jax.tree.leaves(sv)):
        np.testing.assert_array_equal(a, b)


# Slow (~40 s): the default suite checks exact resume of the shared train loop with a
# SIGKILL (test_train_infra.py); this stage 1 state round trip runs with `-m slow`, next to
# the CLI resume test.
@pytest.mark.slow
def test_training_resumes_exactly(tmp_path):
    """A run stopped at a checkpoint and restarted reaches the uninterrupted parameters
    bit for bit (data, noise and the frozen SyncNet all come back from the workdir)."""
    sc = SyncNetConfig(feature_dim=12, base=8, mouth_in=8, layers_per_block=2)
    syncnet, sync_vars = init_syncnet(sc, 3)
    losses = a2m.VAELossConfig(sync=0.5)
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(16, 48, 12)).astype(np.float32)
    motion = rng.normal(size=(16, 24, 204)).astype(np.float32)
    mask = (np.arange(24)[None] < rng.integers(9, 25, size=16)[:, None]).astype(np.float32)

    def get_batch(step):
        idx = epoch_indices(0, step, 16, 4)
        return {"mel": feats[idx], "motion": motion[idx], "mask": mask[idx, :, None]}

    def run(workdir, steps):
        model, state = a2m.create_vae_state(TINY, a2m.OptimConfig(warmup_steps=2), 0, sync_vars)
        step, _ = a2m.make_vae_steps(model, losses, syncnet, num_frames=24)
        state, _ = train.train_loop(workdir=workdir, state=state, step_fn=step,
                                    get_batch=get_batch, num_steps=steps,
                                    mesh=train.make_mesh(jax.devices()[:2]), log_every=2,
                                    checkpoint_every=3, extra={"t": 1}, progress=False)
        return jax.device_get(state)

    full = run(tmp_path / "full", 6)
    run(tmp_path / "part", 3)
    resumed = run(tmp_path / "part", 6)
    assert int(resumed.step) == 6
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(a, b)
