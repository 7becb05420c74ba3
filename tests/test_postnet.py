"""Stage 2 (post-net GAN): the generator's masking and BatchNorm, the discriminator, the
separation of the D and G updates, learning on toy domain shifts, 1 vs 8 devices, exact
resume, the stage-1 sample pool and batches, and the Fréchet distance."""

import jax
import numpy as np
import pytest

from conftest import optimizer_moves, perturbed
from geneface_jax import train
from geneface_jax.data.epochs import epoch_indices
from geneface_jax.errors import ShapeError
from geneface_jax.motion import postnet as pn
from geneface_jax.motion.syncnet import SyncNetConfig, init_syncnet
from geneface_jax.train import postnet as tp

TINY = pn.PostNetConfig(hidden=16, wide=32, disc_hidden=(16, 32, 32, 16))
SYNC = SyncNetConfig(feature_dim=12, base=8, mouth_in=8, layers_per_block=2)
D = 204


def _perturb(tree, seed, scale=0.1):
    return perturbed(tree, seed, scale)


def _mask(lengths, t):
    return (np.arange(t)[None] < np.asarray(lengths)[:, None]).astype(np.float32)[..., None]


def _batch(b=8, t=16, lengths=None, shift=0.0, seed=0, c=12):
    """A toy GAN batch: stage-1 'samples' ~ N(0, 1), real ~ N(shift, 1), some padding."""
    rng = np.random.default_rng(seed)
    lengths = [t] * b if lengths is None else lengths
    mask = _mask(lengths, t)
    real_mask = _mask(lengths[::-1], t)
    return dict(motion=(rng.normal(size=(b, t, D)) * mask).astype(np.float32),
                mel=rng.normal(size=(b, 2 * t, c)).astype(np.float32),
                mask=mask,
                real=((rng.normal(size=(b, t, D)) + shift) * real_mask).astype(np.float32),
                real_mask=real_mask)


def _state(config=TINY, optim=None, sync=False, seed=0):
    optim = optim or tp.PostNetOptimConfig()
    sync_vars = None
    syncnet = None
    if sync:
        syncnet, sync_vars = init_syncnet(SYNC, 3)
        sync_vars = {"params": _perturb(sync_vars["params"], 4),
                     "batch_stats": sync_vars["batch_stats"]}
    gen, disc, state = tp.create_postnet_state(config, optim, seed, sync_vars)
    return gen, disc, syncnet, state


def _run(step_fn, state, batch, key, devices):
    mesh = train.make_mesh(devices)
    fn = train.data_parallel(step_fn, mesh, donate_state=False)
    out, m = fn(train.replicate(state, mesh), train.shard_batch(batch, mesh), key)
    return jax.device_get(out), {k: float(v) for k, v in jax.device_get(m).items()}


ONE = jax.devices()[:1]


# --------------------------------------------------------------------------- modules

def test_generator_is_input_plus_masked_residual_and_padding_free():
    gen, _, v = pn.init_postnet(TINY, 0)
    v = {"params": _perturb(v["generator"]["params"], 1),
         "batch_stats": v["generator"]["batch_stats"]}
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 24, D)).astype(np.float32)
    mask = _mask([24, 17, 9], 24)
    y = np.asarray(gen.apply(v, x, mask))
    # Padded frames carry the input through unchanged; valid frames get a residual.
    np.testing.assert_array_equal(y[1, 17:], x[1, 17:])
    assert np.abs(y[1, :17] - x[1, :17]).max() > 1e-3
    # A sequence gives the same output alone, unpadded, or padded with garbage.
    alone = np.asarray(gen.apply(v, x[2:3, :9], None))
    np.testing.assert_allclose(y[2, :9], alone[0], atol=1e-5)
    np.testing.assert_allclose(pn.refine_motion(TINY, v, x[2, :9], bucket=32), alone[0],
                               atol=1e-5)
    # Receptive field: changing frame 12 moves only frames 12 +- receptive_field.
    rf = TINY.receptive_field
    x2 = x.copy()
    x2[0, 12] += 1.0
    diff = np.abs(np.asarray(gen.apply(v, x2, mask)) - y)[0].max(-1)
    diff[12] = 0.0
    assert rf == 7 and diff[12 - rf] > 0 and diff[12 + rf] > 0
    assert diff[:12 - rf].max() == 0 and diff[13 + rf:].max() == 0


def test_static_coordinates_pass_through_and_are_hidden_from_the_critic():
    std = np.full((68, 3), 0.01, np.float32)
    std[:17] = 1e-4                                  # the jaw never moves in this corpus
    static = tp.static_coordinates(std)
    assert static == tuple(range(51))
    cfg = pn.PostNetConfig(hidden=16, wide=32, disc_hidden=(16, 32, 32, 16),
                           static_coords=static)
    gen, _, v = pn.init_postnet(cfg, 0)
    x = np.random.default_rng(0).normal(size=(2, 12, D)).astype(np.float32)
    y = np.asarray(gen.apply(v["generator"], x))
    np.testing.assert_array_equal(y[..., :51], x[..., :51])
    assert np.abs(y[..., 51:] - x[..., 51:]).min() > 0
    scale = tp.discriminator_scale(std, static)
    assert np.all(scale[:51] == 0) and np.allclose(scale[51:], scale[51])
    # std / rms(std): a coordinate's weight is proportional to how far it moves.
    full = tp.discriminator_scale(std)
    np.testing.assert_allclose(full, std.reshape(-1) / np.sqrt(np.mean(std ** 2)), rtol=1e-6)


def test_parameter_tree_matches_geneface():
    _, _, v = pn.init_postnet(pn.PostNetConfig(), 0)
    g, d = v["generator"]["params"], v["discriminator"]["params"]
    assert sorted(g) == ["block1_0", "block1_1", "block1_2", "block2_0", "block2_1",
                         "block2_2", "block3_0", "block3_1"]
    assert g["block1_0"]["conv"]["kernel"].shape == (3, 204, 128)
    assert g["block2_2"]["conv"]["kernel"].shape == (3, 256, 256)
    assert g["block3_1"]["kernel"].shape == (1, 128, 204)
    widths = [(k, d[k]["kernel"].shape) for k in sorted(d, key=lambda s: int(s.split("_")[1]))]
    assert widths == [("backbone_0", (204, 128)), ("backbone_3", (128, 256)),
                      ("backbone_6", (256, 256)), ("backbone_9", (256, 128)),
                      ("backbone_12", (128, 1))]
    assert "bias" not in d["backbone_12"]
    from experiments.configs import postnet as presets
    assert pn.PostNetConfig(**presets.get_config("paper").model) == pn.PostNetConfig()
    cpu = pn.PostNetConfig(**presets.get_config("cpu").model)
    assert (cpu.hidden, cpu.wide, cpu.disc_hidden) == (64, 128, (64, 128, 128, 64))


def test_discriminator_dropout_and_shapes():
    _, disc, v = pn.init_postnet(TINY, 0)
    x = np.random.default_rng(0).normal(size=(4, 10, D)).astype(np.float32)
    dv = v["discriminator"]
    det = disc.apply(dv, x)
    assert det.shape == (4, 10)
    np.testing.assert_array_equal(det, disc.apply(dv, x, deterministic=True))
    a = disc.apply(dv, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)})
    b = disc.apply(dv, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(2)})
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-4
    # Frame-level: a frame's score does not depend on its neighbours.
    np.testing.assert_allclose(disc.apply(dv, x[:, 3:4]), det[:, 3:4], atol=1e-6)


def test_bad_shapes_raise():
    gen, disc, v = pn.init_postnet(TINY, 0)
    with pytest.raises(ShapeError):
        gen.apply(v["generator"], np.zeros((2, 8, 100), np.float32))
    with pytest.raises(ShapeError):
        gen.apply(v["generator"], np.zeros((2, 8, D), np.float32), np.ones((2, 7, 1)))
    with pytest.raises(ShapeError):
        disc.apply(v["discriminator"], np.zeros((2, 8, 10), np.float32))
    with pytest.raises(ShapeError):
        pn.refine_motion(TINY, v["generator"], np.zeros((8, 10), np.float32))
    with pytest.raises(ShapeError):
        tp.frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))


# --------------------------------------------------------------------------- steps

def test_batchnorm_stats_update_in_training_and_are_frozen_in_inference():
    gen, disc, _, state = _state()
    steps = tp.make_postnet_steps(gen, disc, tp.PostNetLossConfig(sync=0.0))
    batch = _batch(lengths=[16, 16, 12, 9, 16, 5, 16, 16])
    new, _ = _run(steps.g_step, state, batch, jax.random.PRNGKey(0), ONE)
    # Running mean of the first BatchNorm = 0.9 * 0 + 0.1 * mean of its conv output over the
    # valid frames only; the running variance moved too.
    conv = pn.WNConv1d(TINY.hidden, 3, use_weight_norm=False)
    h = np.asarray(conv.apply({"params": state.params["generator"]["block1_0"]["conv"]},
                              batch["motion"] * batch["mask"]))
    m = batch["mask"]
    expected = 0.1 * (h * m).sum((0, 1)) / m.sum()
    bn = new.batch_stats["generator"]["block1_0"]["bn"]
    np.testing.assert_allclose(bn["mean"], expected, rtol=1e-4, atol=1e-6)
    assert np.abs(bn["var"] - 1.0).max() > 1e-3
    # Inference uses the stored statistics: a sequence's output does not depend on the rest
    # of the batch, while the training-mode output does.
    v = jax.device_get(new.generator_variables())
    x = batch["motion"]
    solo = np.asarray(gen.apply(v, x[:1], batch["mask"][:1]))
    full = np.asarray(gen.apply(v, x, batch["mask"]))
    np.testing.assert_allclose(full[:1], solo, atol=1e-5)
    plain = pn.CNNPostNet(TINY)        # no data-parallel axis outside a step
    t_solo, _ = plain.apply(v, x[:1], batch["mask"][:1], train=True, mutable=["batch_stats"])
    t_full, _ = plain.apply(v, x, batch["mask"], train=True, mutable=["batch_stats"])
    assert np.abs(np.asarray(t_full[:1]) - np.asarray(t_solo)).max() > 1e-3
    # ... and inference changes when (only) the stored statistics change.
    shifted = jax.tree.map(lambda a: a, v)
    shifted["batch_stats"]["block1_0"]["bn"]["mean"] = bn["mean"] + 0.5
    assert np.abs(np.asarray(gen.apply(shifted, x[:1], batch["mask"][:1])) - solo).max() > 1e-3


def _assert_tree_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def _assert_tree_differs(a, b):
    assert max(float(np.abs(np.asarray(x) - np.asarray(y)).max())
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))) > 0


def test_d_step_and_g_step_only_touch_their_own_network():
    gen, disc, _, state = _state(optim=tp.PostNetOptimConfig(ema_decay=0.9))
    steps = tp.make_postnet_steps(gen, disc, tp.PostNetLossConfig(sync=0.0))
    batch = _batch(lengths=[16, 12, 16, 9, 16, 16, 7, 16], shift=0.5)
    key = jax.random.PRNGKey(3)
    host = jax.device_get(state)
    after_d, md = _run(steps.d_step, state, batch, key, ONE)
    _assert_tree_equal(after_d.params["generator"], host.params["generator"])
    _assert_tree_equal(after_d.batch_stats, host.batch_stats)
    _assert_tree_equal(after_d.opt_state["generator"], host.opt_state["generator"])
    _assert_tree_equal(after_d.ema, host.ema)
    _assert_tree_differs(after_d.params["discriminator"], host.params["discriminator"])
    assert int(after_d.step) == 0 and md["d_loss"] > 0

    after_g, mg = _run(steps.g_step, state, batch, key, ONE)
    _assert_tree_equal(after_g.params["discriminator"], host.params["discriminator"])
    _assert_tree_equal(after_g.opt_state["discriminator"], host.opt_state["discriminator"])
    _assert_tree_differs(after_g.params["generator"], host.params["generator"])
    _assert_tree_differs(after_g.batch_stats, host.batch_stats)
    assert int(after_g.step) == 1 and mg["g_adv"] > 0 and mg["g_mse"] > 0
    # The bias-corrected EMA: the first update copies the new generator variables (no
    # weight left on the random initial ones), the second weighs the two updates
    # 0.9 : 1 (decay 0.9 (1 - 0.9) / (1 - 0.81)).
    first = jax.device_get(after_g.generator_variables(ema=False))
    for e, new in zip(jax.tree.leaves(after_g.ema), jax.tree.leaves(first)):
        np.testing.assert_allclose(e, new, rtol=1e-6, atol=1e-7)
    twice, _ = _run(steps.g_step, after_g, batch,
                    jax.random.PRNGKey(4), ONE)
    second = twice.generator_variables(ema=False)
    d2 = 0.9 * 0.1 / 0.19
    assert abs(float(tp.ema_decay_at(0.9, 2)) - d2) < 1e-6
    for e, a, b in zip(jax.tree.leaves(twice.ema), jax.tree.leaves(first),
                       jax.tree.leaves(second)):
        np.testing.assert_allclose(e, d2 * a + (1 - d2) * b, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(e, (0.9 * a + b) / 1.9, rtol=1e-5, atol=1e-7)

    # The combined step = the generator half of g_step + the discriminator half of d_step.
    both, mb = _run(steps.train_step, state, batch, key, ONE)
    for a, b in ((both.params["generator"], after_g.params["generator"]),
                 (both.batch_stats, after_g.batch_stats), (both.ema, after_g.ema),
                 (both.params["discriminator"], after_d.params["discriminator"]),
                 (both.opt_state, {"generator": after_g.opt_state["generator"],
                                   "discriminator": after_d.opt_state["discriminator"]})):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    assert int(both.step) == 1
    assert abs(mb["g_loss"] - mg["g_loss"]) < 1e-5 and abs(mb["d_loss"] - md["d_loss"]) < 1e-5


def test_discriminator_separates_a_shifted_distribution():
    gen, disc, _, state = _state(optim=tp.PostNetOptimConfig(disc_lr=1e-3))
    steps = tp.make_postnet_steps(gen, disc, tp.PostNetLossConfig(sync=0.0))
    mesh = train.make_mesh(ONE)
    d_step = train.data_parallel(steps.d_step, mesh)
    evaluate = train.data_parallel(steps.eval_step, mesh, donate_state=False)
    state = train.replicate(state, mesh)
    _, m0 = evaluate(state, train.shard_batch(_batch(shift=0.25, seed=999), mesh),
                     jax.random.PRNGKey(0))
    for s in range(60):
        state, _ = d_step(state, train.shard_batch(_batch(shift=0.25, seed=s), mesh),
                          jax.random.PRNGKey(s))
    _, m = evaluate(state, train.shard_batch(_batch(shift=0.25, seed=999), mesh),
                    jax.random.PRNGKey(0))
    print("d accuracy", float(m0["d_accuracy"]), "->", float(m["d_accuracy"]))
    assert float(m["d_accuracy"]) > 0.9 and float(m0["d_accuracy"]) < 0.8


def test_gan_moves_the_generator_output_towards_the_target():
    """Toy domain shift: inputs N(0, 1), the 'person' N(mu, 1) on 30 coordinates. The
    adversarial game (no SyncNet) pulls the refined output's mean towards mu."""
    mu = np.zeros(D, np.float32)
    mu[:30] = 1.0
    optim = tp.PostNetOptimConfig(lr=1e-3, disc_lr=1e-3)
    gen, disc, _, state = _state(optim=optim)
    steps = tp.make_postnet_steps(gen, disc, tp.PostNetLossConfig(sync=0.0))
    mesh = train.make_mesh(ONE)
    step = train.data_parallel(steps.train_step, mesh)
    state = train.replicate(state, mesh)
    rng = np.random.default_rng(0)

    def toy(seed):
        b = _batch(seed=seed)
        b["real"] = (rng.normal(size=b["real"].shape) + mu).astype(np.float32)
        return b

    def gap(st):
        b = toy(1000)
        out = gen.apply(jax.device_get({"params": st.params["generator"],
                                        "batch_stats": st.batch_stats["generator"]}),
                        b["motion"], b["mask"])
        return float(np.linalg.norm(np.asarray(out).reshape(-1, D).mean(0) - mu))

    start = gap(state)
    for s in range(300):
        state, m = step(state, train.shard_batch(toy(s), mesh), jax.random.PRNGKey(s))
    end = gap(state)
    print("mean gap", start, "->", end, {k: float(v) for k, v in m.items()})
    assert end < 0.5 * start


def _steps_on(devices, num_steps=3):
    gen, disc, syncnet, state = _state(sync=True)
    state = state.replace(params=_perturb(state.params, 5, 0.02))
    steps = tp.make_postnet_steps(gen, disc, tp.PostNetLossConfig(), syncnet, num_frames=16)
    mesh = train.make_mesh(devices)
    run = train.data_parallel(steps.train_step, mesh)
    state = train.replicate(state, mesh)
    history = []
    for s in range(num_steps):
        batch = _batch(lengths=[16, 12, 16, 9, 16, 16, 7, 16], shift=0.5, seed=s)
        state, m = run(state, train.shard_batch(batch, mesh), train.step_key(state, s))
        history.append({k: float(v) for k, v in jax.device_get(m).items()})
    return jax.device_get(state), history


def test_one_device_equals_eight_devices():
    s1, h1 = _steps_on(jax.devices()[:1])
    s8, h8 = _steps_on(jax.devices()[:8])
    assert len(jax.devices()) >= 8
    for a, b in zip(h1, h8):
        for k in a:
            assert abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])), (k, a[k], b[k])
    for a, b in zip(jax.tree.leaves((s1.params, s1.batch_stats, s1.opt_state)),
                    jax.tree.leaves((s8.params, s8.batch_stats, s8.opt_state))):
        np.testing.assert_allclose(a, b, atol=2e-5)
    assert h1[0]["g_sync"] > 0 and h1[-1]["d_loss"] > 0
    # The frozen SyncNet is carried unchanged.
    _, _, _, fresh = _state(sync=True)
    _assert_tree_equal(s8.frozen, jax.device_get(fresh.frozen))


# Slow (~40 s): the default suite checks exact resume of the shared train loop with a
# SIGKILL (test_train_infra.py); this stage 2 state round trip runs with `-m slow`, next to
# the CLI resume test.
@pytest.mark.slow
def test_training_resumes_exactly(tmp_path):
    gen, disc, syncnet, _ = _state(sync=True)
    steps = tp.make_postnet_steps(gen, disc, tp.PostNetLossConfig(), syncnet, num_frames=16)
    data = _batch(b=16, lengths=list(range(6, 17)) + [16] * 5, shift=0.5, seed=7)

    def get_batch(step):
        idx = epoch_indices(0, step, 16, 4)
        return {k: v[idx] for k, v in data.items()}

    def run(workdir, num):
        _, _, _, state = _state(sync=True)
        state, _ = train.train_loop(workdir=workdir, state=state, step_fn=steps.train_step,
                                    get_batch=get_batch, num_steps=num,
                                    mesh=train.make_mesh(jax.devices()[:2]), log_every=2,
                                    checkpoint_every=3, extra={"t": 1}, progress=False)
        return jax.device_get(state)

    full = run(tmp_path / "full", 6)
    run(tmp_path / "part", 3)
    resumed = run(tmp_path / "part", 6)
    assert int(resumed.step) == 6
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(a, b)


def test_discriminator_learning_rate_halves_on_schedule():
    optim = tp.PostNetOptimConfig(disc_lr=1e-3, disc_decay_steps=2, clip_norm=0.0)
    moves = optimizer_moves(optim.discriminator_tx(), 5)
    # Adam's first steps move by ~lr per unit-sign gradient: 1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4.
    np.testing.assert_allclose(moves, [1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4], rtol=1e-3)


def test_generator_learning_rate_warms_up_and_decays():
    """GeneFace's generator schedule: linear warm-up, then decay_rate ** (t / steps)."""
    optim = tp.PostNetOptimConfig(lr=1e-3, warmup_steps=2, decay_rate=0.5, decay_steps=2,
                                  clip_norm=0.0)
    moves = optimizer_moves(optim.generator_tx(), 5)
    # lr(t) = 1e-3 min(1, (t + 1) / 2) 0.5 ** (max(0, t - 2) / 2)
    want = [1e-3 * min(1.0, (k + 1) / 2) * 0.5 ** (max(0, k - 2) / 2) for k in range(5)]
    np.testing.assert_allclose(moves, want, rtol=1e-3)
    # the default stays constant
    tx = tp.PostNetOptimConfig(lr=1e-3, clip_norm=0.0).generator_tx()
    assert optimizer_moves(tx, 3)[-1] == pytest.approx(1e-3, rel=1e-3)


# --------------------------------------------------------------------------- data

def test_pool_batches_and_person_representation(tmp_path):
    rng = np.random.default_rng(0)
    seqs = [(rng.normal(size=(2 * n, 12)).astype(np.float32), dom, k)
            for n, dom, k in ((10, 0, 2), (30, 0, 2), (40, 1, 3))]
    calls = []

    def sample_fn(mel, key):
        calls.append(np.asarray(jax.random.key_data(key)))
        return np.full((len(mel) // 2, D), float(len(calls)), np.float32)

    pool = tp.build_pool(sample_fn, seqs, seed=0)
    assert pool.motion.shape == (2 * 10 + 2 * 30 + 3 * 40, D) and len(pool.samples) == 7
    assert len({tuple(c) for c in calls}) == 7          # one key per sample
    m, mel, dom = pool.sample(6)
    assert m.shape == (40, D) and dom == 1 and np.all(m == 7)
    np.testing.assert_array_equal(mel, seqs[2][0])
    pool.save(tmp_path / "pool.npz")
    again = tp.SamplePool.load(tmp_path / "pool.npz")
    for f in tp.SamplePool.FIELDS:
        np.testing.assert_array_equal(getattr(again, f), getattr(pool, f))

    real = rng.normal(size=(50, D)).astype(np.float32)
    get = tp.make_batch_fn(pool, real, batch_size=8, window=16, seed=3, person_fraction=0.25)
    b = get(5)
    assert b["motion"].shape == (8, 16, D) and b["mel"].shape == (8, 32, 12)
    # 2 of 8 from the person's audio (value 5, 6 or 7), the last ones; the 10-frame
    # sequence is padded and masked.
    assert all(b["motion"][i, 0, 0] >= 5 for i in (6, 7))
    assert all(b["motion"][i, 0, 0] <= 4 for i in range(6))
    short = [i for i in range(8) if b["mask"][i, :, 0].sum() == 10]
    for i in short:
        assert np.all(b["motion"][i, 10:] == 0)
    assert b["real_mask"].all()
    # Every real crop is a window of the real frames, in order.
    starts = [int(np.flatnonzero(np.all(real == b["real"][i, 0], axis=1))[0]) for i in range(8)]
    for i, s in enumerate(starts):
        np.testing.assert_array_equal(b["real"][i], real[s:s + 16])
    # Pure in (seed, step).
    for k, v in get(5).items():
        np.testing.assert_array_equal(v, b[k])
    assert not np.array_equal(get(6)["real"], b["real"])

    # GeneFace's MSE target: person-audio crops carry the person's real frames under them.
    paired = rng.normal(size=(40, D)).astype(np.float32)
    pb = tp.make_batch_fn(pool, real, batch_size=8, window=16, seed=3, person_fraction=0.25,
                          paired=paired)(5)
    for k, v in b.items():
        np.testing.assert_array_equal(pb[k], v)          # the same draws otherwise
    for i in range(8):
        if i < 6:
            assert not pb["target_mask"][i].any() and not pb["target"][i].any()
            continue
        start = next(s for s in range(40 - 16 + 1)
                     if np.array_equal(pb["mel"][i], seqs[2][0][2 * s:2 * s + 32]))
        np.testing.assert_array_equal(pb["target"][i], paired[start:start + 16])
        assert pb["target_mask"][i].all()
    with pytest.raises(ShapeError, match="paired motion"):
        tp.make_batch_fn(pool, real, batch_size=8, window=16, seed=3, paired=paired[:39])
    with pytest.raises(ShapeError, match="paired motion"):
        tp.make_batch_fn(pool, real, batch_size=8, window=16, seed=3, person_fraction=0.0,
                         paired=paired)


def test_mse_term_pulls_towards_the_input_or_the_persons_frames():
    gen, disc, _, state = _state()
    state = state.replace(params=_perturb(state.params, 2))
    batch = _batch(lengths=[16, 12, 16, 9, 16, 16, 7, 16], seed=4)
    rng = np.random.default_rng(5)
    batch["target"] = rng.normal(size=batch["motion"].shape).astype(np.float32)
    batch["target_mask"] = np.zeros_like(batch["mask"])
    batch["target_mask"][5:, :7] = 1.0
    v = jax.device_get(state.generator_variables(ema=False))
    refined = np.asarray(gen.apply(v, batch["motion"], batch["mask"]), np.float64)
    for target, want in (
            ("input", (np.square(refined - batch["motion"]) * batch["mask"]).sum()
             / (batch["mask"].sum() * D)),
            ("person", (np.square(refined - batch["target"]) * batch["target_mask"]).sum()
             / (batch["target_mask"].sum() * D))):
        steps = tp.make_postnet_steps(gen, disc, tp.PostNetLossConfig(sync=0.0,
                                                                      mse_target=target))
        _, m = _run(steps.eval_step, state, batch, jax.random.PRNGKey(0), ONE)
        assert m["g_mse"] == pytest.approx(want, rel=1e-5), target
    with pytest.raises(ValueError, match="mse_target"):
        tp.PostNetLossConfig(mse_target="corpus")


def test_person_motion_removes_the_train_mean():
    class FakePerson(dict):
        def split(self, name):
            return np.arange(0, 8) if name == "train" else np.arange(8, 10)
    rng = np.random.default_rng(0)
    lms = (rng.normal(size=(10, 68, 3)) * 0.01 + 1.0).astype(np.float32)
    std = np.full((68, 3), 0.02, np.float32)
    motion, identity = tp.person_motion(FakePerson(landmarks=lms), std, "train")
    np.testing.assert_allclose(identity, lms[:8].mean(0), atol=1e-6)
    np.testing.assert_allclose(motion.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(motion.reshape(8, 68, 3) * std + identity, lms[:8], atol=1e-6)
    valid, _ = tp.person_motion(FakePerson(landmarks=lms), std, "valid")
    assert valid.shape == (2, D)


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3)) @ np.diag([1.0, 2.0, 0.5])
    assert abs(tp.frechet_distance(a, a)) < 1e-9
    # A pure shift adds |delta|^2.
    assert abs(tp.frechet_distance(a, a + [3.0, 0.0, 4.0]) - 25.0) < 1e-6
    # Commuting covariances: sum (s_a - s_b)^2 over the std deviations.
    b = rng.normal(size=(4000, 3)) @ np.diag([3.0, 2.0, 0.5])
    sa, sb = np.sqrt(np.diag(np.cov(a, rowvar=False))), np.sqrt(np.diag(np.cov(b, rowvar=False)))
    ref = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.sum((sa - sb) ** 2)
    assert abs(tp.frechet_distance(a, b) - ref) < 0.05
    # Against the textbook formula with scipy's sqrtm on a full-rank pair.
    import scipy.linalg
    c = rng.normal(size=(500, 5)) @ rng.normal(size=(5, 5))
    d = rng.normal(size=(600, 5)) @ rng.normal(size=(5, 5)) + 0.3
    s1, s2 = np.cov(c, rowvar=False), np.cov(d, rowvar=False)
    text = (np.sum((c.mean(0) - d.mean(0)) ** 2) + np.trace(s1 + s2)
            - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real))
    assert abs(tp.frechet_distance(c, d) - text) < 1e-6 * max(1.0, text)
    # Rank-deficient (landmark-like) data stays finite and non-negative.
    low = rng.normal(size=(300, 2)) @ rng.normal(size=(2, 60))
    assert 0 <= tp.frechet_distance(low, low * 1.5) < np.inf
