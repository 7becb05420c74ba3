"""The PyTorch reference networks the benchmarks time against the library
(`experiments.bench.torch_reference`) compute what the library's Flax modules compute:
parameters copied with `load_flax`, same inputs, same outputs to float32 tolerance. The
benches' smoke runs (slow tests in test_stage1_cli, test_postnet_cli, test_nerf_bench)
check whole training steps; these check each network's forward pass in seconds."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import perturbed

torch = pytest.importorskip("torch")

from experiments.bench import torch_reference as tr  # noqa: E402 - needs torch

ATOL = 1e-4


def _t(a, channels_first=False):
    """numpy [B, T, C] -> a float32 tensor (with `channels_first`: [B, C, T])."""
    a = np.asarray(a, np.float32)
    return torch.from_numpy(np.ascontiguousarray(np.swapaxes(a, 1, 2) if channels_first else a))


def _close(what, jax_out, torch_out, atol=ATOL):
    jax_out, torch_out = np.asarray(jax_out), torch_out.detach().numpy()
    assert jax_out.shape == torch_out.shape, (what, jax_out.shape, torch_out.shape)
    err = float(np.max(np.abs(jax_out - torch_out)))
    assert err <= atol, f"{what}: max abs err {err:.2e} > {atol}"


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_load_flax_refuses_mismatched_trees():
    from experiments.bench.torch_reference.syncnet import ConvBlock
    block = ConvBlock(3, 4, 3, 1, 1, False)
    params = {"conv": {"kernel": np.zeros((3, 3, 4), np.float32),
                       "bias": np.zeros(4, np.float32)},
              "bn": {"scale": np.ones(4, np.float32), "bias": np.zeros(4, np.float32)}}
    stats = {"bn": {"mean": np.zeros(4, np.float32), "var": np.ones(4, np.float32)}}
    assert tr.load_flax(block, {"params": params, "batch_stats": stats}) == 6
    with pytest.raises(KeyError, match="without a JAX counterpart"):
        tr.load_flax(block, {"params": params})
    with pytest.raises(ValueError, match="shape"):
        tr.load_flax(block, {"params": {**params, "conv": {
            "kernel": np.zeros((5, 3, 4), np.float32), "bias": np.zeros(4, np.float32)}},
            "batch_stats": stats})
    with pytest.raises(KeyError, match="no PyTorch"):
        tr.load_flax(block, {"params": {**params, "extra": {"bias": np.zeros(4)}},
                             "batch_stats": stats})


def test_vae_training_pass_matches_the_library():
    from geneface_jax.motion import vae
    from experiments.bench.torch_reference.vae import Audio2Motion
    cfg = vae.Audio2MotionConfig(feature_dim=8, cond_dim=16, hidden=16, enc_layers=2,
                                 dec_layers=2, flow_hidden=8, flow_layers=2, num_flows=2)
    model, variables = vae.init_audio2motion(cfg, 0)
    variables = perturbed(variables, 1)
    rng = np.random.default_rng(0)
    b, t = 2, 16
    mask = (np.arange(t)[None, :, None] < np.array([t, 10])[:, None, None]).astype(np.float32)
    mel = rng.standard_normal((b, 2 * t, 8)).astype(np.float32)
    motion = rng.standard_normal((b, t, cfg.motion_dim)).astype(np.float32) * mask
    eps = rng.standard_normal((b, t // cfg.stride, cfg.latent)).astype(np.float32)
    out, _ = jax.jit(lambda v, *a: model.apply(
        v, *a, train=True, eps=eps, rngs={"dropout": jax.random.PRNGKey(0)},
        mutable=["batch_stats"]))(variables, mel, motion, mask)
    ref = Audio2Motion(cfg)
    tr.load_flax(ref, variables)
    with torch.no_grad():
        recon, kl_terms, lmask = ref.train()(_t(mel, True), _t(motion, True), _t(mask, True),
                                             _t(eps, True))
    _close("recon", np.swapaxes(np.asarray(out["recon"]) * mask, 1, 2), recon * _t(mask, True))
    lm = np.swapaxes(np.asarray(out["latent_mask"]), 1, 2)
    _close("latent mask", lm, lmask)
    _close("kl terms", np.swapaxes(np.asarray(out["kl_terms"]), 1, 2) * lm, kl_terms * lmask)


@pytest.mark.parametrize("static_coords", [(), (0, 5, 203)])
def test_postnet_and_discriminator_match_the_library(static_coords):
    from geneface_jax.motion import postnet as pn
    from experiments.bench.torch_reference.postnet import GAN
    from experiments.configs import postnet as presets
    cfg = pn.PostNetConfig(static_coords=static_coords, **presets.get_config("cpu").model)
    gen, disc, variables = pn.init_postnet(cfg, 0)
    variables = perturbed(variables, 2)
    x = np.random.default_rng(0).standard_normal((2, 16, cfg.motion_dim)).astype(np.float32)
    refined, _ = jax.jit(lambda v, x: gen.apply(v, x, jnp.ones((2, 16, 1)), train=True,
                                                mutable=["batch_stats"]))(
        variables["generator"], x)
    ref = GAN(cfg, dropout=0.0)
    tr.load_flax(ref, variables["generator"], "generator.")
    tr.load_flax(ref, variables["discriminator"], "discriminator.")
    with torch.no_grad():
        refined_t = ref.train().generator(_t(x))
        _close("refined motion", refined, refined_t)
        _close("critic scores", jax.jit(disc.apply)(variables["discriminator"], x),
               ref.discriminator(_t(x)))
    if static_coords:
        np.testing.assert_array_equal(refined_t.numpy()[..., static_coords],
                                      x[..., static_coords])


def test_syncnet_matches_the_library():
    from geneface_jax.motion import syncnet as sync_lib
    from experiments.bench.torch_reference.syncnet import SyncNet
    from experiments.configs import syncnet as sync_presets
    sc = sync_lib.SyncNetConfig(feature_dim=8, **sync_presets.get_config("cpu").model)
    model, variables = sync_lib.init_syncnet(sc, 0)
    variables = perturbed(variables, 3)
    rng = np.random.default_rng(0)
    audio = rng.standard_normal((3, 2 * sc.window, 8)).astype(np.float32)
    mouth = rng.standard_normal((3, sc.window, sc.mouth_dim)).astype(np.float32)
    a, m = jax.jit(model.apply)(variables, audio, mouth)
    ref = SyncNet(sc)
    tr.load_flax(ref, variables)
    with torch.no_grad():
        a_t, m_t = ref.eval()(_t(audio, True), _t(mouth, True))
    _close("audio embedding", a, a_t)
    _close("mouth embedding", m, m_t)


def test_head_nerf_matches_the_library():
    from geneface_jax.render import fields
    from experiments.bench.torch_reference.nerf import HeadNeRF
    from experiments.configs import nerf as nerf_presets
    cfg = dataclasses.replace(fields.NeRFConfig(**nerf_presets.get_config("cpu").model),
                              width=32, depth=4, skip=1, color_width=16, num_coarse=8,
                              num_fine=8)
    rng = np.random.default_rng(0)
    r = 32
    origins = np.tile(np.array([[0.0, 0.0, 0.6]], np.float32), (r, 1))
    directions = np.concatenate([0.3 * rng.uniform(-1, 1, (r, 2)), -np.ones((r, 1))],
                                1).astype(np.float32)
    windows = 0.3 * rng.standard_normal((1, cfg.smooth_window, 68, 3)).astype(np.float32)
    background = rng.uniform(size=(r, 3)).astype(np.float32)
    noise = (rng.uniform(size=(r, cfg.num_coarse)).astype(np.float32),
             rng.uniform(size=(r, cfg.num_fine)).astype(np.float32))
    model = fields.HeadNeRF(cfg)
    params = perturbed(jax.jit(model.init)(jax.random.PRNGKey(0), origins, directions,
                                            windows[0], background)["params"], 4, scale=0.05)

    @jax.jit
    def forward(params):
        cond = model.apply({"params": params}, windows, True,
                           method=fields.HeadNeRF.condition)
        return cond, model.apply({"params": params}, origins, directions,
                                 jnp.repeat(cond, r, 0), background, noise=noise,
                                 method=fields.HeadNeRF.render)

    cond, out = forward(params)
    ref = HeadNeRF(cfg)
    tr.load_flax(ref, params)
    with torch.no_grad():
        cond_t = ref.condition(_t(windows), True)
        (rgb_c, _), (rgb_f, _) = ref.render(_t(origins), _t(directions),
                                            cond_t.expand(r, -1), _t(background),
                                            tuple(_t(u) for u in noise))
    _close("landmark condition", cond, cond_t)
    _close("coarse colours", out.coarse.rgb, rgb_c)
    _close("fine colours", out.fine.rgb, rgb_f)



def test_grid_head_matches_the_library():
    """The PyTorch grid head (`torch_reference.grid`) against `grid_fields.GridHeadNeRF` on
    the tiny preset (dense and hashed levels): same colours, opacities and ambient sums for
    the same rays, occupancy bits and jitter (a ray that misses the box included), the same
    gradients of a loss of all three on the grids' tables, MLP layers and codes, and the
    same occupancy update."""
    from geneface_jax.render import grid_fields as gf
    from geneface_jax.train import nerf as tn
    from experiments.bench.torch_reference import grid as tg
    from experiments.configs import grid as grid_presets
    model_cfg = grid_presets.get_config("tiny").model
    model_cfg.eye_feature = True                   # the eye input's path too
    cfg = tn.grid_model_config(model_cfg, num_codes=3)
    assert any(cfg.head_grid.hashed) and not all(cfg.head_grid.hashed)
    rng = np.random.default_rng(0)
    r, k, g = 48, cfg.num_samples, cfg.grid_size
    origins = np.tile(np.array([[0.0, 0.0, 0.6]], np.float32), (r, 1))
    directions = np.concatenate([0.35 * rng.uniform(-1, 1, (r, 2)), -np.ones((r, 1))],
                                1).astype(np.float32)
    directions[0] = (1.0, 0.0, 0.0)                        # misses the box: background
    cond = rng.standard_normal((r, cfg.cond_width)).astype(np.float32)
    index = rng.integers(0, cfg.num_codes, r).astype(np.int32)
    background, target = (rng.uniform(size=(r, 3)).astype(np.float32) for _ in range(2))
    u = rng.uniform(size=(r, k)).astype(np.float32)
    bits = jnp.asarray(rng.uniform(size=(g, g, g)) < 0.3, jnp.float32)
    model, variables = gf.init_grid(cfg, "head", jax.random.PRNGKey(0))
    params = perturbed(variables["params"], 5, scale=0.1)

    def loss(params):
        variables = {"params": params, "occupancy": {"bits": bits, "density": bits}}
        code = model.apply(variables, index, method=gf.GridHeadNeRF.codes)
        res, amb = model.apply(variables, origins, directions, cond, background, code,
                               noise=u, return_ambient=True, method=gf.GridHeadNeRF.render)
        rgb, acc = res.coarse.rgb, res.coarse.acc
        return jnp.mean(jnp.square(rgb - target)) + 0.1 * jnp.mean(acc) + 0.5 * jnp.mean(
            amb), (rgb, acc, amb)

    (_, outs), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    head = tg.GridHead(cfg)
    tr.load_flax(head, params)
    outs_t = head.render(_t(origins), _t(directions), _t(cond), _t(background),
                         head.codes(torch.from_numpy(index.astype(np.int64))),
                         _t(np.array(bits)), _t(u))
    rgb_t, acc_t, amb_t = outs_t
    (torch.mean(torch.square(rgb_t - _t(target))) + 0.1 * acc_t.mean()
     + 0.5 * amb_t.mean()).backward()
    acc = np.asarray(outs[1])
    assert acc[0] == 0.0 and np.mean(acc[1:] > 1e-3) > 0.5        # not an empty scene
    for name, a, b in zip(("colours", "opacity", "ambient"), outs, outs_t):
        _close(name, a, b, 1e-5)
    for path, name in ((("grid", "table"), "grid.table"),
                       (("ambient_grid", "table"), "ambient_grid.table"),
                       (("ambient_net", "net_0", "kernel"), "ambient_net.net.0.weight"),
                       (("sigma_net", "net_2", "kernel"), "sigma_net.net.2.weight"),
                       (("color_net", "net_0", "kernel"), "color_net.net.0.weight"),
                       (("code_table",), "code_table")):
        want = grads
        for key in path:
            want = want[key]
        want = np.asarray(want).T if path[-1] == "kernel" else np.asarray(want)
        scale = float(np.max(np.abs(want)))
        assert scale > 0, name
        _close(f"gradient of {name} / its max", want / scale,
               head.get_parameter(name).grad / scale, 1e-5)

    # the occupancy update of a quarter of the cells (threshold above the field's
    # densities, a ball of occupied cells): same densities, same dilated bits
    ucfg = dataclasses.replace(cfg, alpha_thresh=0.9, occupancy_stride=4)
    key, update_index = jax.random.PRNGKey(1), 3
    ijk = np.stack(np.meshgrid(*(np.arange(g),) * 3, indexing="ij"), -1)
    density = np.where(np.sum((ijk - g / 2) ** 2, -1) < 9, 200.0, 0.0).astype(np.float32)
    new = jax.jit(lambda p: gf.update_occupancy(
        gf.head_density(model, p, jnp.asarray(cond[1])),
        {"density": jnp.asarray(density), "bits": bits}, key, ucfg, update_index))(params)
    with torch.no_grad():
        dens_t, bits_t = tg.update_occupancy(
            head, _t(density), _t(cond[1:2]), ucfg,
            torch.from_numpy(np.array(jax.random.uniform(key, (g ** 3 // 4, 3)))),
            update_index)
    _close("occupancy density", new["density"], dens_t, 1e-4)
    np.testing.assert_array_equal(np.asarray(new["bits"]), bits_t.numpy())
    assert 0.0 < float(np.mean(bits_t.numpy())) < 0.5
