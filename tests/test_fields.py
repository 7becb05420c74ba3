"""Tests of the stage-3 fields (geneface_jax/render/fields.py): layer layout, condition
paths, the attention smoother, background handling, head/torso compositing, a tiny overfit,
and the paper configuration's parameter counts."""

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from geneface_jax.errors import ShapeError
from geneface_jax.mesh import make_mesh
from geneface_jax.render import fields as F
from geneface_jax.render import rays, sharded

from experiments.configs import nerf as nerf_presets

CPU = F.NeRFConfig(**nerf_presets.get_config("cpu").model)     # the documented CPU sizes
TINY = F.NeRFConfig(width=32, depth=4, skip=1, color_width=16, color_depth=2,
                    num_coarse=8, num_fine=8, smooth_warmup_steps=10)


def init_vars(module, *args, seed=0):
    """Variables of `module` for inputs `args`, drawn on the host: PyTorch's nn.Linear /
    Conv1d scheme, kernel and bias uniform in +-1/sqrt(fan_in). Shapes come from
    `jax.eval_shape(module.init)`, so no JAX RNG graph is compiled (that costs seconds per
    module on CPU); `test_module_init_matches_torch_scheme` checks the real `init`."""
    shapes = jax.eval_shape(lambda k: module.init(k, *args), jax.random.PRNGKey(0))
    rng = np.random.default_rng(seed)

    def fill(tree):
        if "kernel" in tree:
            k = tree["kernel"].shape
            bound = 1.0 / np.sqrt(np.prod(k[:-1]))
            return {name: jnp.asarray(rng.uniform(-bound, bound, leaf.shape), jnp.float32)
                    for name, leaf in tree.items()}
        return {name: fill(sub) for name, sub in tree.items()}

    return fill(shapes)


def init_field(cfg, key=0, r=2, s=3):
    field = F.HeadField(cfg)
    x = jnp.zeros((r, s, 3))
    d = jnp.tile(jnp.array([0.0, 0.0, -1.0]), (r, 1))
    return field, init_vars(field, x, d, jnp.zeros(cfg.cond_dim), seed=key)


def random_points(rng, r=6, s=5):
    x = rng.uniform(-0.2, 0.2, (r, s, 3)).astype(np.float32)
    d = rng.normal(size=(r, 3)).astype(np.float32)
    d /= np.linalg.norm(d, axis=-1, keepdims=True)
    return jnp.asarray(x), jnp.asarray(d)


def set_param(variables, path, fn):
    """A copy of `variables` with the leaf at `path` (tuple of keys) replaced by fn(leaf)."""
    flat = jax.tree_util.tree_flatten_with_path(variables)[0]
    treedef = jax.tree.structure(variables)
    leaves = []
    for kp, leaf in flat:
        keys = tuple(k.key for k in kp)
        leaves.append(fn(leaf) if keys == path else leaf)
    return jax.tree.unflatten(treedef, leaves)


# --------------------------------------------------------------------------- config

def test_config_paper_and_small():
    p = F.NeRFConfig()
    assert (p.pos_freqs, p.view_freqs, p.width, p.depth, p.skip) == (10, 4, 256, 8, 4)
    assert (p.color_width, p.color_depth, p.cond_dim) == (128, 3, 64)
    assert (p.num_coarse, p.num_fine, p.near, p.far) == (64, 128, 0.3, 0.9)
    assert (p.smooth_window, p.smooth_warmup_steps) == (5, 200_000)
    assert (p.pos_dim, p.view_dim, p.pose_dim, p.torso_cond_dim) == (63, 27, 78, 158)
    s = CPU
    assert (s.width, s.depth, s.skip, s.num_coarse, s.num_fine) == (128, 6, 3, 24, 24)
    with pytest.raises(ValueError):
        F.NeRFConfig(depth=4, skip=3)          # layer 4 does not exist
    with pytest.raises(ValueError):
        F.NeRFConfig(smooth_window=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.width = 3


# --------------------------------------------------------------------------- head field

def test_head_field_shapes_ranges_and_errors():
    field, v = init_field(TINY)
    x, d = random_points(np.random.default_rng(0))
    cond = jnp.asarray(np.random.default_rng(1).normal(size=64), jnp.float32)
    apply = field.apply
    sigma, rgb = apply(v, x, d, cond)
    assert sigma.shape == (6, 5) and rgb.shape == (6, 5, 3)
    assert bool(jnp.all(sigma >= 0)) and bool(jnp.all((rgb >= 0) & (rgb <= 1)))
    # a per-frame condition equals the same condition given per ray
    sigma2, rgb2 = apply(v, x, d, jnp.tile(cond, (6, 1)))
    np.testing.assert_allclose(sigma, sigma2, atol=1e-6)
    np.testing.assert_allclose(rgb, rgb2, atol=1e-6)
    with pytest.raises(ShapeError):
        field.apply(v, x[0], d, cond)                    # points not [R, S, 3]
    with pytest.raises(ShapeError):
        field.apply(v, x, d[:3], cond)                   # dirs not [R, 3]
    with pytest.raises(ShapeError):
        field.apply(v, x, d, cond[:32])                  # wrong condition size
    with pytest.raises(ShapeError):
        field.apply(v, x, d, jnp.zeros((5, 64)))         # wrong ray count


def test_softplus_density_is_positive():
    cfg = dataclasses.replace(TINY, density_activation="softplus")
    field, v = init_field(cfg)
    x, d = random_points(np.random.default_rng(2))
    sigma, _ = field.apply(v, x, d, jnp.zeros(64))
    assert bool(jnp.all(sigma > 0))


def head_field_shapes(cfg):
    """Parameter shapes of a HeadField (no computation)."""
    x, d = jnp.zeros((2, 3, 3)), jnp.zeros((2, 3))
    v = jax.eval_shape(lambda k: F.HeadField(cfg).init(k, x, d, jnp.zeros(cfg.cond_dim)),
                       jax.random.PRNGKey(0))
    return jax.tree.map(lambda a: a.shape, v["params"]["mlp"],
                        is_leaf=lambda a: isinstance(a, jax.ShapeDtypeStruct))


def test_skip_layer_concatenates_the_input():
    cfg = CPU
    mlp = head_field_shapes(cfg)
    d_in = cfg.pos_dim + cfg.cond_dim                   # 63 + 64 = 127
    assert mlp["density_linears_0"]["kernel"] == (d_in, cfg.width)
    for i in range(1, cfg.depth):
        expect = (cfg.width + d_in if i == cfg.skip + 1 else cfg.width, cfg.width)
        assert mlp[f"density_linears_{i}"]["kernel"] == expect, i
    assert f"density_linears_{cfg.depth}" not in mlp
    assert mlp["density_out_linear"]["kernel"] == (cfg.width, 1)
    # colour head reads the last hidden layer and the encoded view direction only
    assert mlp["color_linears_0"]["kernel"] == (cfg.width + cfg.view_dim, cfg.color_width)
    assert mlp["color_out_linear"]["kernel"] == (cfg.color_width, 3)
    noskip = head_field_shapes(dataclasses.replace(cfg, skip=None))
    for i in range(1, cfg.depth):
        assert noskip[f"density_linears_{i}"]["kernel"] == (128, 128)
    paper = head_field_shapes(F.NeRFConfig())
    assert paper["density_linears_5"]["kernel"] == (256 + 127, 256)   # skip at layer 4


def test_condition_enters_through_input_and_skip_only():
    cfg = TINY
    field, v = init_field(cfg, key=3)
    x, d = random_points(np.random.default_rng(3))
    rng = np.random.default_rng(4)
    c1 = jnp.asarray(rng.normal(size=64), jnp.float32)
    c2 = jnp.asarray(rng.normal(size=64), jnp.float32)
    p = cfg.pos_dim
    apply = field.apply
    s1, r1 = apply(v, x, d, c1)
    s2, r2 = apply(v, x, d, c2)
    assert float(jnp.max(jnp.abs(r1 - r2))) > 1e-4
    assert float(jnp.max(jnp.abs(s1 - s2))) > 1e-5

    zero_rows = lambda k: k.at[p:p + cfg.cond_dim].set(0.0)   # noqa: E731
    # zeroing the condition rows of layer 0 only: the skip still carries the condition
    v0 = set_param(v, ("params", "mlp", "density_linears_0", "kernel"), zero_rows)
    _, a1 = apply(v0, x, d, c1)
    _, a2 = apply(v0, x, d, c2)
    assert float(jnp.max(jnp.abs(a1 - a2))) > 1e-5
    # zeroing them in layer 0 and in the skip layer removes every condition path
    skip_layer = f"density_linears_{cfg.skip + 1}"
    vz = set_param(v0, ("params", "mlp", skip_layer, "kernel"), zero_rows)
    sa, ra = apply(vz, x, d, c1)
    sb, rb = apply(vz, x, d, c2)
    np.testing.assert_array_equal(np.asarray(sa), np.asarray(sb))
    np.testing.assert_array_equal(np.asarray(ra), np.asarray(rb))


def _dot_generals(jaxpr):
    """Every dot_general equation in a closed jaxpr, sub-jaxprs (pjit, custom_vjp) included."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            out.append(eqn)
        for sub in jax.core.jaxprs_in_params(eqn.params):
            out += _dot_generals(sub)
    return out


def test_field_gradient_dots_are_plain_2d_products():
    """The MLP runs its matmuls on samples flattened to [R S, k]: then every product in the
    forward and backward pass (weight gradients included) contracts one axis of 2-D
    operands, which XLA:CPU hands to its GEMM libraries as they are. A [R, S, k] matmul
    would give weight gradients contracting two axes (R and S), which XLA:CPU lowers with a
    transpose pass over every output gradient first (1.3x slower training step)."""
    cfg = TINY
    field, v = init_field(cfg, key=5)
    x, d = random_points(np.random.default_rng(5))
    cond = jnp.zeros((x.shape[0], cfg.cond_dim))

    def loss(params, cond):
        sigma, rgb = field.apply({"params": params}, x, d, cond)
        return jnp.sum(sigma) + jnp.sum(rgb)

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(v["params"], cond)
    dots = _dot_generals(jaxpr.jaxpr)
    # forward, input gradient and weight gradient of each MLP layer (at least)
    assert len(dots) >= 3 * (cfg.depth + cfg.color_depth)
    for eqn in dots:
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        shapes = [tuple(a.aval.shape) for a in eqn.invars]
        assert not lb and not rb, shapes
        assert len(lc) == len(rc) == 1, (shapes, lc, rc)
        assert all(len(sh) == 2 for sh in shapes), shapes


def test_view_direction_changes_colour_not_density():
    field, v = init_field(TINY, key=5)
    x, d = random_points(np.random.default_rng(5))
    apply = field.apply
    s1, r1 = apply(v, x, d, jnp.ones(64))
    s2, r2 = apply(v, x, -d, jnp.ones(64))
    np.testing.assert_array_equal(np.asarray(s1), np.asarray(s2))
    assert float(jnp.max(jnp.abs(r1 - r2))) > 1e-5


# --------------------------------------------------------------------------- condition nets

def test_landmark_encoder_shapes_and_layers():
    enc = F.LandmarkEncoder(F.NeRFConfig())
    lm = jnp.asarray(np.random.default_rng(6).normal(size=(4, 5, 68, 3)), jnp.float32)
    v = init_vars(enc, lm[0])
    assert enc.apply(v, lm[0]).shape == (5, 64)
    out = enc.apply(v, lm)
    assert out.shape == (4, 5, 64)
    np.testing.assert_allclose(out[2], enc.apply(v, lm[2]), atol=1e-6)
    p = v["params"]
    sizes = [204, 32, 32, 64, 64]
    for i in range(4):
        assert p[f"encoder_conv_{i}"]["kernel"].shape == (sizes[i], sizes[i + 1])
    assert p["encoder_fc1_1"]["kernel"].shape == (64, 64)
    assert float(jnp.std(out[:, 0] - out[:, 1])) > 1e-4    # different frames, different features
    with pytest.raises(ShapeError):
        enc.apply(v, jnp.zeros((4, 67, 3)))


def test_attention_smoother():
    cfg = F.NeRFConfig()
    sm = F.AttentionSmoother(cfg)
    rng = np.random.default_rng(7)
    window = jnp.asarray(rng.normal(size=(3, 5, 64)), jnp.float32)
    v = init_vars(sm, window, seed=1)
    apply = sm.apply
    out, w = apply(v, window, return_weights=True)
    assert out.shape == (3, 64) and w.shape == (3, 5)
    assert bool(jnp.all(w > 0))
    np.testing.assert_allclose(jnp.sum(w, -1), 1.0, atol=1e-6)
    np.testing.assert_allclose(out, jnp.einsum("bw,bwc->bc", w, window), atol=1e-5)
    # a window of identical frames returns that frame
    same = jnp.broadcast_to(window[:, 2:3], window.shape)
    np.testing.assert_allclose(apply(v, same), window[:, 2], rtol=1e-6, atol=1e-6)
    # disabled: the centre frame, unchanged (also with a traced flag)
    np.testing.assert_array_equal(np.asarray(apply(v, window, False)), np.asarray(window[:, 2]))
    run = jax.jit(lambda step: sm.apply(v, window, step >= cfg.smooth_warmup_steps))
    np.testing.assert_array_equal(np.asarray(run(0)), np.asarray(window[:, 2]))
    np.testing.assert_allclose(run(cfg.smooth_warmup_steps), out, atol=1e-6)
    assert float(jnp.max(jnp.abs(out - window[:, 2]))) > 1e-3
    with pytest.raises(ShapeError):
        sm.apply(v, window[:, :4])


# --------------------------------------------------------------------------- rendering

def camera_rays(h=4, w=5):
    pose = np.eye(4, dtype=np.float32)
    pose[2, 3] = 0.6
    o, d = rays.pixel_rays(pose, (6.0, 6.0, w / 2, h / 2), h, w)
    return o.reshape(-1, 3), d.reshape(-1, 3)


def test_empty_field_renders_the_background_exactly():
    field, v = init_field(TINY, key=8)
    v = set_param(v, ("params", "mlp", "density_out_linear", "kernel"), jnp.zeros_like)
    v = set_param(v, ("params", "mlp", "density_out_linear", "bias"), lambda b: b * 0 - 1.0)
    o, d = camera_rays()
    bg = jnp.asarray(np.random.default_rng(9).uniform(size=(o.shape[0], 3)), jnp.float32)
    fn = lambda x, vd: field.apply(v, x, vd, jnp.ones(64))   # noqa: E731
    render = lambda key: F.render_rays(fn, fn, o, d, bg, near=0.3, far=0.9,   # noqa: E731
                                       num_coarse=8, num_fine=8, key=key)
    for res in (render(None), render(jax.random.PRNGKey(0))):
        for out in (res.coarse, res.fine):
            np.testing.assert_array_equal(np.asarray(out.rgb), np.asarray(bg))
            np.testing.assert_array_equal(np.asarray(out.acc), 0.0)
            np.testing.assert_array_equal(np.asarray(out.fg_rgb), 0.0)


def test_constant_field_closed_form_and_fine_samples():
    sigma0, colour = 3.0, jnp.array([0.9, 0.2, 0.4])

    def const(x, vd):
        return (jnp.full(x.shape[:2], sigma0), jnp.broadcast_to(colour, x.shape))

    o, d = camera_rays()
    bg = jnp.array([0.1, 0.5, 0.0])
    near, far, nc, nf = 0.3, 0.9, 16, 24
    res = F.render_rays(const, const, o, d, bg, near=near, far=far, num_coarse=nc,
                        num_fine=nf)
    assert res.coarse.t.shape == (20, nc) and res.fine.t.shape == (20, nc + nf)
    assert bool(jnp.all(jnp.diff(res.fine.t, axis=-1) >= 0))
    norm = jnp.linalg.norm(d, axis=-1)
    h = (far - near) / nc
    # last-sample-as-background: foreground spans [t_0, t_{S-1}] = [near + h/2, far - h/2]
    expect_acc = 1.0 - jnp.exp(-sigma0 * norm * (far - near - h))
    for out in (res.coarse, res.fine):
        np.testing.assert_allclose(out.acc, expect_acc, atol=1e-5)
        np.testing.assert_allclose(out.rgb, expect_acc[:, None] * colour
                                   + (1 - expect_acc)[:, None] * bg, atol=1e-5)
        np.testing.assert_allclose(out.weights[:, -1], 0.0)
    # GeneFace's formula literally: last sample coloured by the background
    out = res.coarse
    plain = F.composite_samples(jnp.full((20, nc), sigma0),
                                jnp.broadcast_to(colour, (20, nc, 3)).at[:, -1].set(bg),
                                out.t, norm, bg, last_sample_background=False)
    np.testing.assert_allclose(out.rgb, plain.rgb, atol=1e-5)
    # without it, the infinite last interval is opaque foreground
    res2 = F.render_rays(const, None, o, d, bg, near=near, far=far, num_coarse=nc,
                         num_fine=0, last_sample_background=False)
    assert res2.fine is None and res2.final is res2.coarse
    np.testing.assert_allclose(res2.coarse.acc, 1.0, atol=1e-6)
    np.testing.assert_allclose(res2.coarse.rgb, jnp.broadcast_to(colour, (20, 3)), atol=1e-5)
    with pytest.raises(ShapeError):
        F.render_rays(const, const, o, d[:3], bg, near=near, far=far, num_coarse=nc,
                      num_fine=nf)
    with pytest.raises(ShapeError):
        F.render_rays(const, const, o, d, bg[:2], near=near, far=far, num_coarse=nc,
                      num_fine=nf)


def _ray_output(fg, acc):
    r = fg.shape[0]
    return F.RayOutput(rgb=fg, fg_rgb=fg, acc=acc, depth=jnp.zeros(r),
                       weights=jnp.zeros((r, 2)), t=jnp.zeros((r, 2)))


def test_composite_person_order():
    rng = np.random.default_rng(10)
    r = 7
    acc_h = jnp.asarray(rng.uniform(size=r), jnp.float32)
    acc_t = jnp.asarray(rng.uniform(size=r), jnp.float32)
    head = _ray_output(jnp.asarray(rng.uniform(size=(r, 3)), jnp.float32) * acc_h[:, None], acc_h)
    torso = _ray_output(jnp.asarray(rng.uniform(size=(r, 3)), jnp.float32) * acc_t[:, None], acc_t)
    bg = jnp.asarray(rng.uniform(size=(r, 3)), jnp.float32)
    out = F.composite_person(head, torso, bg)
    expect = head.fg_rgb + (1 - acc_h)[:, None] * (torso.fg_rgb + (1 - acc_t)[:, None] * bg)
    np.testing.assert_allclose(out, expect, atol=1e-6)
    # an opaque head hides the torso; an empty head shows torso over background
    opaque = _ray_output(jnp.full((r, 3), 0.3), jnp.ones(r))
    np.testing.assert_allclose(F.composite_person(opaque, torso, bg), 0.3, atol=1e-6)
    empty = _ray_output(jnp.zeros((r, 3)), jnp.zeros(r))
    np.testing.assert_allclose(F.composite_person(empty, torso, bg),
                               torso.fg_rgb + (1 - acc_t)[:, None] * bg, atol=1e-6)
    np.testing.assert_allclose(F.composite_person(empty, empty, bg[0]),
                               jnp.broadcast_to(bg[0], (r, 3)), atol=1e-7)
    swapped = F.composite_person(head, torso, bg, order="torso_over_head")
    np.testing.assert_allclose(swapped, F.composite_person(torso, head, bg), atol=1e-7)
    with pytest.raises(ValueError):
        F.composite_person(head, torso, bg, order="sideways")


# --------------------------------------------------------------------------- torso

def test_head_pose_vector_round_trip():
    angles = jnp.array([[0.1, -0.3, 0.7], [-1.2, 0.4, -2.5]])
    rot = F.rotation_from_euler(angles)
    def axis_rot(angle, i, j):
        m = np.eye(3)
        m[i, i] = m[j, j] = np.cos(angle)
        m[i, j], m[j, i] = -np.sin(angle), np.sin(angle)
        return m

    for (x, y, z), r in zip(np.asarray(angles), np.asarray(rot)):
        expect = axis_rot(z, 0, 1) @ axis_rot(y, 2, 0) @ axis_rot(x, 1, 2)   # Rz Ry Rx
        np.testing.assert_allclose(r, expect, atol=1e-6)
    pose = jnp.zeros((2, 4, 4)).at[:, :3, :3].set(rot).at[:, :3, 3].set(
        jnp.array([[0.1, 0.2, 0.3], [-1.0, 0.0, 2.0]])).at[:, 3, 3].set(1.0)
    vec = F.head_pose_vector(pose)
    assert vec.shape == (2, 6)
    np.testing.assert_allclose(vec[:, :3], angles, atol=1e-5)
    np.testing.assert_allclose(vec[:, 3:], pose[:, :3, 3])
    with pytest.raises(ShapeError):
        F.head_pose_vector(jnp.zeros((3, 4)))


def test_torso_field_conditions():
    cfg = TINY
    field = F.TorsoField(cfg)
    x, d = random_points(np.random.default_rng(11))
    rng = np.random.default_rng(12)
    cond = jnp.asarray(rng.normal(size=64), jnp.float32)
    pose = jnp.asarray([0.05, -0.02, 0.01, 0.0, 0.01, 0.6], jnp.float32)
    head_rgb = jnp.asarray(rng.uniform(size=(6, 3)), jnp.float32)
    v = init_vars(field, x, d, cond, pose, head_rgb, seed=2)
    apply = field.apply
    assert v["params"]["mlp"]["density_linears_0"]["kernel"].shape == (
        cfg.pos_dim + cfg.torso_cond_dim, cfg.width)
    sigma, rgb = apply(v, x, d, cond, pose, head_rgb)
    assert sigma.shape == (6, 5) and rgb.shape == (6, 5, 3)
    assert bool(jnp.all(sigma >= 0)) and bool(jnp.all((rgb >= 0) & (rgb <= 1)))
    _, rgb_pose = apply(v, x, d, cond, pose.at[0].add(0.2), head_rgb)
    _, rgb_col = apply(v, x, d, cond, pose, 1.0 - head_rgb)
    _, rgb_cond = apply(v, x, d, -cond, pose, head_rgb)
    for other in (rgb_pose, rgb_col, rgb_cond):
        assert float(jnp.max(jnp.abs(other - rgb))) > 1e-5
    with pytest.raises(ShapeError):
        field.apply(v, x, d, cond, pose)                 # head colour required
    with pytest.raises(ShapeError):
        field.apply(v, x, d, cond, pose[:5], head_rgb)
    nocolour = F.TorsoField(dataclasses.replace(cfg, torso_color_dim=0))
    v0 = init_vars(nocolour, x, d, cond, pose)
    assert "color_encoder_0" not in v0["params"]
    assert nocolour.apply(v0, x, d, cond, pose)[0].shape == (6, 5)


# --------------------------------------------------------------------------- models

def test_head_and_torso_models_and_sharded_render():
    cfg = TINY
    o, d = camera_rays()
    r = o.shape[0]
    bg = jnp.asarray(np.random.default_rng(14).uniform(size=(r, 3)), jnp.float32)
    lm = jnp.asarray(np.random.default_rng(13).normal(size=(5, 68, 3)), jnp.float32)
    head = F.HeadNeRF(cfg)
    v = init_vars(head, o, d, lm, bg)
    assert set(v["params"]) == {"landmark_encoder", "smoother", "coarse", "fine"}
    res = head.apply(v, o, d, lm, bg, smooth=False)
    res_smooth = head.apply(v, o, d, lm, bg, smooth=True, key=jax.random.PRNGKey(1))
    assert res.coarse.rgb.shape == (r, 3) and res.fine.weights.shape == (r, 16)
    assert bool(jnp.all((res.fine.rgb >= 0) & (res.fine.rgb <= 1)))
    assert float(jnp.max(jnp.abs(res.fine.rgb - res_smooth.fine.rgb))) > 1e-6
    # unsmoothed condition = the centre frame's encoding
    cond = head.apply(v, lm[None], False, method=F.HeadNeRF.condition)
    enc = head.apply(v, lm[2], method=lambda m, x: m.landmark_encoder(x))
    np.testing.assert_allclose(cond[0], enc, atol=1e-6)
    with pytest.raises(ShapeError):
        head.apply(v, lm[None, :4], True, method=F.HeadNeRF.condition)

    # the same frame through the sharded renderer (8 devices, chunks of 2 rays), with the
    # condition given per ray
    def render_fn(params, ray_batch):
        out = head.apply(params, ray_batch["o"], ray_batch["d"], ray_batch["cond"],
                         ray_batch["bg"], method=F.HeadNeRF.render)
        return {"rgb": out.fine.rgb, "acc": out.fine.acc}

    batch = {"o": o, "d": d, "bg": bg, "cond": jnp.tile(cond, (r, 1))}
    out = sharded.render_image(render_fn, batch, params=v, mesh=make_mesh(), chunk=2)
    np.testing.assert_allclose(out["rgb"], res.fine.rgb, atol=1e-5)
    np.testing.assert_allclose(out["acc"], res.fine.acc, atol=1e-5)

    torso = F.TorsoNeRF(cfg)
    pose = jnp.zeros(6)
    tv = init_vars(torso, o, d, cond[0], pose, bg, res.fine.rgb, seed=3)
    tres = torso.apply(tv, o, d, cond[0], pose, bg, res.fine.rgb)
    assert set(tv["params"]) == {"coarse", "fine"}
    final = F.composite_person(res.fine, tres.fine, bg)
    assert final.shape == (r, 3) and bool(jnp.all((final >= 0) & (final <= 1)))


# --------------------------------------------------------------------------- sizes

def _linear(n_in, n_out):
    return n_in * n_out + n_out


def expected_field_params(cfg, cond_dim):
    d_in = cfg.pos_dim + cond_dim
    n = _linear(d_in, cfg.width) + _linear(cfg.width, 1)
    for i in range(1, cfg.depth):
        n += _linear(cfg.width + (d_in if i == cfg.skip + 1 else 0), cfg.width)
    n += _linear(cfg.width + cfg.view_dim, cfg.color_width)
    n += (cfg.color_depth - 1) * _linear(cfg.color_width, cfg.color_width)
    return n + _linear(cfg.color_width, 3)


def test_paper_parameter_counts():
    cfg = F.NeRFConfig()
    o = jnp.zeros((2, 3))
    d = jnp.tile(jnp.array([0.0, 0.0, -1.0]), (2, 1))
    key = jax.random.PRNGKey(0)
    hv = jax.eval_shape(lambda k: F.HeadNeRF(cfg).init(k, o, d, jnp.zeros((5, 68, 3)),
                                                       jnp.zeros(3)), key)["params"]
    tv = jax.eval_shape(lambda k: F.TorsoNeRF(cfg).init(k, o, d, jnp.zeros(64), jnp.zeros(6),
                                                        jnp.zeros(3), jnp.zeros((2, 3))),
                        key)["params"]
    counts = {name: F.count_params(p) for name, p in hv.items()}
    head_field = expected_field_params(cfg, cfg.cond_dim)
    assert counts["coarse"] == counts["fine"] == head_field == 595_844
    assert counts["landmark_encoder"] == (_linear(204, 32) + _linear(32, 32) + _linear(32, 64)
                                          + _linear(64, 64) + 2 * _linear(64, 64))
    assert counts["smoother"] == (3 * (64 * 16 + 16 * 8 + 8 * 4 + 4 * 2 + 2 * 1)
                                  + 16 + 8 + 4 + 2 + 1 + _linear(5, 5))
    colour_enc = _linear(3, 16) + _linear(16, 32) + _linear(32, 16)
    torso_field = expected_field_params(cfg, cfg.torso_cond_dim) + colour_enc
    assert F.count_params(tv["coarse"]) == F.count_params(tv["fine"]) == torso_field
    print(f"\nparam counts (paper config): head field {head_field:,} x2 (coarse+fine), "
          f"landmark encoder {counts['landmark_encoder']:,}, smoother {counts['smoother']:,}, "
          f"head total {F.count_params(hv):,}; torso field {torso_field:,} x2, "
          f"torso total {F.count_params(tv):,}")


# --------------------------------------------------------------------------- init

_SMALL = CPU
_small_init = jax.jit(lambda key: F.HeadField(_SMALL).init(
    key, jnp.zeros((1, 2, 3)), jnp.ones((1, 3)), jnp.zeros(_SMALL.cond_dim)))


def small_field_init(key):
    """`HeadField(CPU).init` (the cpu preset's sizes), compiled once for this file."""
    return _small_init(key)


def test_module_init_matches_torch_scheme():
    v = small_field_init(jax.random.PRNGKey(0))
    mlp = v["params"]["mlp"]
    assert jax.tree.map(lambda a: a.shape, mlp) == head_field_shapes(_SMALL)
    for name, layer in mlp.items():
        bound = 1.0 / np.sqrt(layer["kernel"].shape[0])
        for leaf in (layer["kernel"], layer["bias"]):
            assert float(jnp.max(jnp.abs(leaf))) <= bound + 1e-7, name
        if layer["kernel"].size > 1000:            # uniform: std = bound / sqrt(3)
            np.testing.assert_allclose(float(jnp.std(layer["kernel"])), bound / np.sqrt(3),
                                       rtol=0.1, err_msg=name)
    other = small_field_init(jax.random.PRNGKey(1))["params"]["mlp"]
    assert not np.allclose(other["density_linears_0"]["kernel"], mlp["density_linears_0"]["kernel"])


# --------------------------------------------------------------------------- overfit

def sphere_scene(size=8, radius=0.15):
    """Rays of a size x size camera at z = 0.6 looking at a sphere at the origin: target
    colour 0.5 + 0.4 * normal where a ray hits it, a per-ray background elsewhere."""
    pose = np.eye(4, dtype=np.float32)
    pose[2, 3] = 0.6
    o, d = rays.pixel_rays(pose, (size * 1.25, size * 1.25, size / 2, size / 2), size, size)
    o = np.asarray(o).reshape(-1, 3)
    d = np.asarray(d).reshape(-1, 3)
    dn = d / np.linalg.norm(d, axis=-1, keepdims=True)
    b = np.sum(o * dn, -1)
    disc = b * b - (np.sum(o * o, -1) - radius ** 2)
    hit = disc > 0
    p = o + dn * (-b - np.sqrt(np.maximum(disc, 0)))[:, None]
    n = size * size
    bg = np.stack([np.linspace(0.1, 0.3, n), np.full(n, 0.2), np.full(n, 0.8)], -1)
    target = np.where(hit[:, None], 0.5 + 0.4 * p / radius, bg)
    return (jnp.asarray(o), jnp.asarray(d), jnp.asarray(bg, jnp.float32),
            jnp.asarray(target, jnp.float32), hit)


def test_small_head_field_overfits_a_sphere():
    cfg = CPU
    o, d, bg, target, hit = sphere_scene()
    assert 0.2 < hit.mean() < 0.6
    field = F.HeadField(cfg)
    cond = jnp.linspace(-1.0, 1.0, cfg.cond_dim)
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    params = {"coarse": small_field_init(k1), "fine": small_field_init(k2)}

    def loss_fn(params, key):
        res = F.render_rays(lambda x, v: field.apply(params["coarse"], x, v, cond),
                            lambda x, v: field.apply(params["fine"], x, v, cond),
                            o, d, bg, near=cfg.near, far=cfg.far, num_coarse=cfg.num_coarse,
                            num_fine=cfg.num_fine, key=key)
        return (jnp.mean((res.fine.rgb - target) ** 2)
                + jnp.mean((res.coarse.rgb - target) ** 2))

    opt = optax.adam(5e-3)

    @jax.jit
    def step(params, opt_state, key):
        loss, grads = jax.value_and_grad(loss_fn)(params, key)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    evaluate = jax.jit(lambda p: loss_fn(p, None))
    start = time.time()
    loss0 = float(evaluate(params))
    opt_state = opt.init(params)
    key = jax.random.PRNGKey(1)
    for _ in range(100):
        key, sub = jax.random.split(key)
        params, opt_state, _ = step(params, opt_state, sub)
    loss1 = float(evaluate(params))
    print(f"\noverfit: loss {loss0:.4g} -> {loss1:.4g} ({1 - loss1 / loss0:.2%} lower) in "
          f"{time.time() - start:.1f} s")
    assert loss1 <= 0.1 * loss0
