"""The grid renderer (render.grid_encoding, render.grid_fields, its training in
train.nerf): the encoding against a NumPy reference, closed forms (a linear function, an
opaque sphere), gradients against a dense reference, 1 vs 8 devices, exact resume, and bad
inputs."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from geneface_jax.data import format as fmt
from geneface_jax.data.synthetic import world
from geneface_jax.errors import CheckpointError, InputError, ShapeError
from geneface_jax.mesh import make_mesh
from geneface_jax.render import frames as rf
from geneface_jax.render import grid_encoding as ge
from geneface_jax.render import grid_fields as gf
from geneface_jax.render import rays as rays_lib
from geneface_jax.render import sharded
from geneface_jax.train import nerf as tn

from experiments.configs import grid as grid_presets
from experiments.configs import nerf as nerf_presets

from conftest import perturbed

PRIMES = (1, 2654435761, 805459861)


# --------------------------------------------------------------------------- encoding

def numpy_encode(x, table, spec):
    """Per point, per level, per corner: the module doc's formula, in float64 loops."""
    out = np.zeros((len(x), spec.levels, spec.features))
    for n, p in enumerate(np.clip(np.asarray(x, np.float64), 0, 1)):
        for lv, (res, size, off) in enumerate(zip(spec.resolutions, spec.sizes,
                                                  spec.offsets)):
            pos = p * (res - 1)
            v0 = np.clip(np.floor(pos), 0, res - 2).astype(np.int64)
            w = pos - v0
            for c in range(1 << spec.dims):
                bits = [(c >> i) & 1 for i in range(spec.dims)]
                v = v0 + bits
                weight = np.prod([w[i] if b else 1 - w[i] for i, b in enumerate(bits)])
                if res ** spec.dims > size:                      # hashed
                    h = 0
                    for i in range(spec.dims):
                        h ^= (int(v[i]) * PRIMES[i]) & 0xFFFFFFFF
                    row = h % size
                else:
                    row = sum(int(v[i]) * res ** i for i in range(spec.dims))
                out[n, lv] += weight * table[off + row]
    return out.reshape(len(x), -1)


@pytest.mark.parametrize("dims", [2, 3])
def test_encoding_equals_numpy_reference_with_hash_collisions(dims):
    spec = ge.GridSpec(dims=dims, levels=5, features=2, base=3, finest=40, log2_table=7)
    assert any(spec.hashed) and not all(spec.hashed)       # dense and hashed levels
    table = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (spec.rows, 2)))
    x = np.array(jax.random.uniform(jax.random.PRNGKey(1), (50, dims)))
    x[0] = 0.0
    x[1] = 1.0                                             # the cube's far corner
    got = np.asarray(ge.encode(x, jnp.asarray(table, jnp.float32), spec))
    want = numpy_encode(x, table.astype(np.float32).astype(np.float64), spec)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # hashing collides: a hashed level has more vertices than rows
    assert max(r ** dims for r, h in zip(spec.resolutions, spec.hashed) if h) > \
        spec.sizes[-1]


def test_dense_grid_holding_a_linear_function_reproduces_it():
    spec = ge.GridSpec(dims=3, levels=3, features=1, base=4, finest=12, log2_table=16)
    assert not any(spec.hashed)
    a, c = np.array([0.7, -1.3, 2.1]), 0.25
    table = np.zeros((spec.rows, 1))
    for res, off in zip(spec.resolutions, spec.offsets):
        v = np.stack(np.meshgrid(*(np.arange(res),) * 3, indexing="ij"), -1).reshape(-1, 3)
        rows = v[:, 0] + v[:, 1] * res + v[:, 2] * res * res
        table[off + rows, 0] = (v / (res - 1)) @ a + c
    x = np.asarray(jax.random.uniform(jax.random.PRNGKey(2), (200, 3)))
    got = np.asarray(ge.encode(x, jnp.asarray(table, jnp.float32), spec))
    for lv in range(spec.levels):
        np.testing.assert_allclose(got[:, lv], x @ a + c, atol=2e-6)


def test_encoding_gradients_equal_a_dense_reference():
    spec = ge.GridSpec(dims=3, levels=4, features=2, base=3, finest=30, log2_table=8)
    table = jax.random.normal(jax.random.PRNGKey(3), (spec.rows, 2))
    x = jax.random.uniform(jax.random.PRNGKey(4), (64, 3))
    g = jax.random.normal(jax.random.PRNGKey(5), (64, spec.output_dim))

    # dense reference: out = W table per level, W [N, rows] built by one-hot rows
    rows, weights = ge.corner_rows_and_weights(x, spec)

    def dense(tab, xx):
        r, w = ge.corner_rows_and_weights(xx, spec)
        onehot = jax.nn.one_hot(r, spec.rows) * w[..., None]          # [N, L, C, rows]
        return jnp.einsum("nlcr,rf->nlf", onehot, tab).reshape(len(xx), -1)

    f = lambda tab, xx: jnp.sum(ge.encode(xx, tab, spec) * g)          # noqa: E731
    fd = lambda tab, xx: jnp.sum(dense(tab, xx) * g)                   # noqa: E731
    gt, gx = jax.grad(f, argnums=(0, 1))(table, x)
    dt, dx = jax.grad(fd, argnums=(0, 1))(table, x)
    np.testing.assert_allclose(gt, dt, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gx, dx, rtol=1e-4, atol=1e-5)
    # and the table gradient is the scatter-add of weight x upstream gradient
    want = np.zeros((spec.rows, 2))
    gl = np.asarray(g).reshape(64, spec.levels, 2)
    np.add.at(want, np.asarray(rows).reshape(-1),
              (np.asarray(weights)[..., None] * gl[:, :, None, :]).reshape(-1, 2))
    np.testing.assert_allclose(gt, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dims", [2, 3])
def test_encoding_forms_agree(dims):
    """`encode` evaluates the native layout with every level at once when it is not
    differentiated (a render) and with the per-level form when it is (training): the same
    rows, weights and features, and derivatives equal to the per-level form's autodiff
    whichever inputs carry a tangent (points only, table only, both)."""
    spec = ge.GridSpec(dims=dims, levels=6, features=2, base=3, finest=60, log2_table=8)
    assert any(spec.hashed) and not all(spec.hashed)
    table = jax.random.normal(jax.random.PRNGKey(6), (spec.rows, 2))
    x = jax.random.uniform(jax.random.PRNGKey(7), (300, dims), minval=-0.1, maxval=1.1)
    r1, w1 = ge.corner_rows_and_weights(x, spec)
    r2, w2 = ge._corner_rows_and_weights_vectorised(x, spec)
    np.testing.assert_array_equal(r1, r2)
    np.testing.assert_allclose(w1, w2, rtol=1e-6, atol=1e-7)

    def per_level(xx, tab):
        r, w = ge.corner_rows_and_weights(xx, spec)
        return jnp.einsum("nlc,nlcf->nlf", w, tab[r]).reshape(len(xx), -1)

    np.testing.assert_allclose(jax.jit(lambda a, b: ge.encode(a, b, spec))(x, table),
                               per_level(x, table), rtol=1e-6, atol=1e-6)
    g = jax.random.normal(jax.random.PRNGKey(8), (300, spec.output_dim))
    for argnums in (0, 1, (0, 1)):
        got = jax.jit(jax.grad(lambda a, b: jnp.sum(ge.encode(a, b, spec) * g), argnums))(
            x, table)
        want = jax.grad(lambda a, b: jnp.sum(per_level(a, b) * g), argnums)(x, table)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    tx, tt = jnp.ones_like(x), jax.random.normal(jax.random.PRNGKey(9), table.shape)
    np.testing.assert_allclose(
        jax.jvp(lambda a, b: ge.encode(a, b, spec), (x, table), (tx, tt))[1],
        jax.jvp(per_level, (x, table), (tx, tt))[1], rtol=1e-5, atol=1e-5)


def test_spherical_harmonics_are_orthonormal_on_the_sphere():
    n = 200_000
    d = jax.random.normal(jax.random.PRNGKey(6), (n, 3))
    d = d / jnp.linalg.norm(d, axis=-1, keepdims=True)
    y = np.asarray(ge.spherical_harmonics(d), np.float64)
    gram = 4 * np.pi * (y.T @ y) / n                                   # Monte Carlo
    np.testing.assert_allclose(gram, np.eye(16), atol=0.03)


# --------------------------------------------------------------------------- sampler

SPHERE_CFG = gf.GridConfig(bound=0.16, grid_size=32, num_bins=128, num_samples=48,
                           near=0.2, far=1.0, occupancy_decay=0.0)


def sphere_density(radius):
    return lambda p: jnp.where(jnp.linalg.norm(p, axis=-1) < radius, 5e3, 0.0)


def test_occupancy_sampler_renders_an_opaque_sphere_exactly():
    cfg, radius = SPHERE_CFG, 0.1
    occ = {"density": jnp.zeros((32,) * 3), "bits": jnp.zeros((32,) * 3)}
    occ = jax.jit(lambda o, k: gf.update_occupancy(sphere_density(radius), o, k, cfg))(
        occ, jax.random.PRNGKey(0))
    # never drops occupied space: every cell that meets the sphere is occupied
    g, cs = cfg.grid_size, cfg.cell_size
    centres = -cfg.bound + (np.stack(np.meshgrid(*(np.arange(g),) * 3, indexing="ij"), -1)
                            + 0.5) * cs
    meets = np.linalg.norm(centres, axis=-1) < radius + cs * np.sqrt(3) / 2
    assert np.all(np.asarray(occ["bits"])[meets] == 1)
    assert np.asarray(occ["bits"]).mean() < 0.4                        # and skips the rest

    # rays from a camera at z = 0.6 towards the sphere, some missing it
    xs = np.linspace(-0.14, 0.14, 29)
    origins = np.tile([[0.0, 0.0, 0.6]], (len(xs), 1)).astype(np.float32)
    dirs = np.stack([xs / 0.6, np.zeros_like(xs), -np.ones_like(xs)], -1).astype(np.float32)
    t, delta, inside = gf.occupancy_samples(jnp.asarray(origins), jnp.asarray(dirs),
                                            occ["bits"], cfg)
    pts = origins[:, None] + dirs[:, None] * np.asarray(t)[..., None]
    sigma = np.asarray(sphere_density(radius)(jnp.asarray(pts))) * np.asarray(inside)
    rgb = np.broadcast_to([0.9, 0.2, 0.1], sigma.shape + (3,))
    dn = np.linalg.norm(dirs, axis=-1)
    w, fg, acc, color = gf.composite_equal(jnp.asarray(sigma), jnp.asarray(rgb), delta,
                                           jnp.asarray(dn), jnp.asarray([0.0, 0.0, 1.0]))
    # analytic: a ray hits iff its distance to the centre is below the radius
    u = dirs / dn[:, None]
    proj = -(origins * u).sum(-1)
    dist = np.linalg.norm(origins + proj[:, None] * u, axis=-1)
    hit = dist < radius - 0.01
    miss = dist > radius + 0.01
    np.testing.assert_allclose(np.asarray(acc)[hit], 1.0, atol=1e-4)
    np.testing.assert_allclose(np.asarray(color)[hit], [[0.9, 0.2, 0.1]] * hit.sum(),
                               atol=1e-4)
    np.testing.assert_array_equal(np.asarray(acc)[miss], 0.0)
    np.testing.assert_array_equal(np.asarray(color)[miss], [[0.0, 0.0, 1.0]] * miss.sum())
    # depth (t along -z) of the first intersection, within one sample spacing
    t_hit = (proj - np.sqrt(np.maximum(radius ** 2 - dist ** 2, 0))) / dn
    depth = np.asarray((w * t).sum(-1) / jnp.maximum(acc, 1e-9))
    spacing = np.asarray(delta)
    assert np.all(np.abs(depth - t_hit)[hit] <= spacing[hit])


def test_box_interval_and_empty_rays():
    o = jnp.array([[0.0, 0.0, 0.6], [1.0, 1.0, 0.6]])
    d = jnp.array([[0.0, 0.0, -1.0], [0.0, 0.0, -1.0]])
    t0, t1 = gf.box_interval(o, d, (0.0, 0.0, 0.0), 0.16, 0.3, 0.9)
    np.testing.assert_allclose(np.asarray([t0[0], t1[0]]), [0.44, 0.76], atol=1e-6)
    assert float(t1[1]) <= float(t0[1])                                # misses the box
    _, delta, inside = gf.occupancy_samples(o, d, jnp.ones((8, 8, 8)),
                                            dataclasses.replace(SPHERE_CFG, grid_size=8))
    assert float(delta[1]) == 0.0 and float(inside[1].sum()) == 0.0


# --------------------------------------------------------------------------- models

TINY_GRID = tn.grid_model_config(grid_presets.get_config("tiny").model, num_codes=16,
                                 near_far=(0.4, 0.8))


@pytest.fixture(scope="module")
def person_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("grid") / "person"
    arrays, meta, wav = world.make_person(5, size=32, num_frames=24, progress=False)
    fmt.write_person(out, arrays, meta, wav)
    return out


@pytest.fixture(scope="module")
def tiny_runs(person_dir, tmp_path_factory):
    """A tiny grid head run (10 steps) and torso run (4 steps), in process on one device
    (compiles in 17 s instead of 24 s on the 8 simulated ones; grid training on 8 devices:
    `test_killed_grid_run_resumes_to_the_same_numbers`)."""
    root = tmp_path_factory.mktemp("grid_runs")
    c = grid_presets.get_config("tiny")
    one = make_mesh(jax.devices()[:1])
    head = tn.train_nerf(c, root / "head", "head", person_dir, mesh=one)
    torso = tn.train_nerf(c, root / "torso", "torso", None, root / "head", mesh=one)
    return root, head, torso


def test_grid_runs_train_and_record_the_renderer(tiny_runs):
    root, head, torso = tiny_runs
    for part, m in (("head", head), ("torso", torso)):
        assert np.isfinite(m["eval_psnr"]) and m["eval_psnr"] > 10
        cfg = json.loads((root / part / "config.json").read_text())
        assert cfg["renderer"] == "grid" and cfg["part"] == part
    hcfg, hvars, hrun, _ = rf.load_nerf(root / "head", "head")
    assert isinstance(hcfg, gf.GridConfig) and set(hvars) == {"params", "occupancy"}
    assert hvars["occupancy"]["bits"].shape == (16, 16, 16)
    tcfg, tvars, _, _ = rf.load_nerf(root / "torso", "torso")
    assert isinstance(tcfg, gf.GridConfig) and set(tvars) == {"params"}


def test_grid_frames_equal_on_1_and_8_devices(tiny_runs, person_dir):
    root, _, _ = tiny_runs
    hcfg, hvars, _, norm = rf.load_nerf(root / "head", "head")
    tcfg, tvars, _, _ = rf.load_nerf(root / "torso", "torso")
    views = tn.PersonViews(fmt.load_person(person_dir), norm)
    t = views.split_range("valid")[0]
    win = views.windows([t], hcfg.smooth_window, "valid")[0]
    outs = []
    for n in (1, 8):
        r = rf.FrameRenderer(hcfg, hvars, views, torso_cfg=tcfg, torso_vars=tvars,
                             mesh=make_mesh(jax.devices()[:n]), chunk=128)
        outs.append(r.render(views.poses[t], win, views.torso_pose()))
    for k in outs[0]:
        np.testing.assert_allclose(outs[0][k], outs[1][k], atol=1e-6)
    assert outs[0]["rgb"].shape == (32, 32, 3)
    assert 0.0 < outs[0]["torso_acc"].mean() < 1.0


def test_grid_frames_trace_each_frames_own_hit_pixels(tiny_runs, person_dir, monkeypatch):
    """Several frames in one call: the head is traced only at each frame's own pixels
    whose rays meet an occupied cell (not the union over the frames), and the frames equal
    every pixel traced through head and torso; per-frame region masks give each frame's
    own region render."""
    root, _, _ = tiny_runs
    hcfg, hvars, _, norm = rf.load_nerf(root / "head", "head")
    tcfg, tvars, _, _ = rf.load_nerf(root / "torso", "torso")
    bits = np.array(hvars["occupancy"]["bits"])
    bits[:, :, : bits.shape[2] // 2] = 0.0           # half the head's box empty
    hvars = dict(hvars, occupancy=dict(hvars["occupancy"], bits=jnp.asarray(bits)))
    views = tn.PersonViews(fmt.load_person(person_dir), norm)
    lo, hi = views.split_range("train")
    ts = np.linspace(lo, hi - 1, 3).astype(int)
    r = rf.FrameRenderer(hcfg, hvars, views, torso_cfg=tcfg, torso_vars=tvars,
                         mesh=make_mesh(jax.devices()[:2]), chunk=128)
    conds = r.condition(views.windows(ts, hcfg.smooth_window))
    hits = r.head_hits(views.poses[ts], per_frame=True)
    assert hits.shape == (3, 32, 32) and hits.any() and not hits.all()
    traced = []
    real = sharded.render_image

    def counting(fn, rays, **kw):
        traced.append((fn, len(rays["origins"])))
        return real(fn, rays, **kw)

    monkeypatch.setattr(sharded, "render_image", counting)
    out = r.render_many(views.poses[ts], conds, views.torso_pose())
    assert dict(traced)[r._full_fn] == hits.sum() < 3 * hits.any(0).sum()
    # Every pixel of every frame through head and torso: the same frames.
    o, d = (np.asarray(a).reshape(-1, 3) for a in rays_lib.pixel_rays(
        jnp.asarray(views.poses[ts]), r.head_ray_intrinsics, 32, 32))
    yy, xx = np.divmod(np.tile(np.arange(32 * 32), 3), 32)
    pose_vec = np.asarray(gf.torso_pose_vector(jnp.asarray(views.poses[ts]), tcfg))
    every = real(r._full_fn, {
        "origins": o, "directions": d, "background": np.tile(r.background.reshape(-1, 3),
                                                             (3, 1)),
        "cond": np.repeat(conds, 32 * 32, axis=0),
        "torso_uv": np.asarray(gf.pixel_uv(yy, xx, 32, 32, tcfg.torso_inputs)),
        "pose": np.repeat(pose_vec, 32 * 32, axis=0)},
        params={"head": hvars, "torso": tvars}, mesh=r.mesh, chunk=128)
    for k in ("rgb", "head_acc", "torso_acc"):
        np.testing.assert_allclose(out[k].reshape(np.shape(every[k])), every[k], atol=1e-6)
    # Per-frame regions: each frame as if rendered alone with its own mask.
    rng = np.random.default_rng(0)
    heads = rng.uniform(size=(3, 32, 32)) < 0.5
    torso = np.ones((32, 32), bool)
    many = r.render_many(views.poses[ts], conds, views.torso_pose(), regions=(heads, torso))
    for i in range(3):
        one = r.render_many(views.poses[ts[i:i + 1]], conds[i:i + 1], views.torso_pose(),
                            regions=(heads[i], torso))
        for k in one:
            np.testing.assert_allclose(many[k][i], one[k][0], atol=1e-6)
    # A head pixel outside the torso's region: the head over the background, no torso.
    half = np.zeros((32, 32), bool)
    half[16:] = True
    split = r.render_many(views.poses[ts], conds, views.torso_pose(), regions=(heads, half))
    alone = rf.FrameRenderer(hcfg, hvars, views, mesh=r.mesh, chunk=128).render_many(
        views.poses[ts], conds)
    only_head = heads & ~half & hits
    assert only_head.sum() > 20
    np.testing.assert_allclose(split["rgb"][only_head], alone["rgb"][only_head], atol=1e-6)
    assert split["torso_acc"][heads & ~half].max() == 0.0
    both = heads & half
    np.testing.assert_allclose(split["rgb"][both], many["rgb"][both], atol=1e-6)
    with pytest.raises(ShapeError, match="regions"):
        r.render_many(views.poses[ts], conds, views.torso_pose(), regions=(heads[:2], torso))


def test_grid_head_samples_are_a_render_setting(tiny_runs, person_dir, tmp_path):
    """`FrameRenderer.set_head_samples` (`--head_samples` of synthesize and eval_nerf):
    another sample count renders another frame, 0 goes back to the trained one exactly;
    negative counts and the MLP head are refused."""
    root, _, _ = tiny_runs
    hcfg, hvars, _, norm = rf.load_nerf(root / "head", "head")
    tcfg, tvars, _, _ = rf.load_nerf(root / "torso", "torso")
    # a 10-step head is nearly uniform haze: perturbed weights give it structure
    hvars = dict(hvars, params=perturbed(hvars["params"], 1, 0.5))
    views = tn.PersonViews(fmt.load_person(person_dir), norm)
    t = views.split_range("valid")[0]
    win = views.windows([t], hcfg.smooth_window, "valid")[0]
    r = rf.FrameRenderer(hcfg, hvars, views, torso_cfg=tcfg, torso_vars=tvars,
                         mesh=make_mesh(jax.devices()[:1]), chunk=128)
    full = r.render(views.poses[t], win, views.torso_pose())["rgb"]
    r.set_head_samples(2 * hcfg.num_samples)
    assert r.head.config.num_samples == 2 * hcfg.num_samples
    more = r.render(views.poses[t], win, views.torso_pose())["rgb"]
    assert np.abs(more - full).max() > 1e-4
    r.set_head_samples(0)
    np.testing.assert_array_equal(r.render(views.poses[t], win, views.torso_pose())["rgb"],
                                  full)
    with pytest.raises(InputError, match="head samples"):
        r.set_head_samples(-1)
    m = tn.evaluate_nerf(root / "head", tmp_path / "ev", torso=root / "torso", max_frames=2,
                         track=False, head_samples=2 * hcfg.num_samples,
                         mesh=make_mesh(jax.devices()[:1]))
    assert m["head_samples"] == 2 * hcfg.num_samples
    mlp_cfg = rf.nerf_config_from({"model": nerf_presets.get_config("tiny").model.to_dict()})
    _, mlp_vars = rf.init_variables(mlp_cfg, "head", jax.random.PRNGKey(0))
    mlp = rf.FrameRenderer(mlp_cfg, mlp_vars, views, mesh=make_mesh(jax.devices()[:1]))
    mlp.set_head_samples(0)
    with pytest.raises(InputError, match="grid head"):
        mlp.set_head_samples(8)
    from geneface_jax import pipeline as pl
    with pytest.raises(InputError, match="head_samples"):
        pl.SynthesisOptions(head_samples=-1)


def test_killed_grid_run_resumes_to_the_same_numbers(person_dir, tmp_path):
    c = grid_presets.get_config("tiny")
    c.run.update(steps=8, checkpoint_every=4)
    whole = tn.train_nerf(c, tmp_path / "whole", "head", person_dir)
    c.run.steps = 4                                                   # "killed" at step 4
    tn.train_nerf(c, tmp_path / "cut", "head", person_dir)
    c.run.steps = 8
    resumed = tn.train_nerf(c, tmp_path / "cut", "head", person_dir)
    assert resumed["resumed_from"] == 4
    a = rf.load_nerf(tmp_path / "whole", "head")[1]
    b = rf.load_nerf(tmp_path / "cut", "head")[1]
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    assert resumed["train_loss"] == whole["train_loss"]
    assert resumed["eval_psnr"] == whole["eval_psnr"]


def test_grid_bad_inputs(tiny_runs, person_dir, tmp_path):
    root, _, _ = tiny_runs
    # NaN landmarks
    hcfg, hvars, _, norm = rf.load_nerf(root / "head", "head")
    bad = np.zeros((5, 68, 3), np.float32)
    bad[2, 10] = np.nan
    with pytest.raises(InputError, match="NaN"):
        norm(bad)
    # a grid head given to an MLP torso run
    with pytest.raises(InputError, match="grid renderer"):
        tn.train_nerf(nerf_presets.get_config("tiny"), tmp_path / "t", "torso", None,
                      root / "head")
    # a grid checkpoint whose config.json claims the MLP renderer
    fake = tmp_path / "fake"
    fake.mkdir()
    cfg = json.loads((root / "head" / "config.json").read_text())
    cfg["renderer"] = "mlp"
    (fake / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="renderer"):
        rf.load_nerf(fake, "head")
    # a dataset of another image size than the run's
    other = tmp_path / "person64"
    arrays, meta, wav = world.make_person(5, size=48, num_frames=12, progress=False)
    fmt.write_person(other, arrays, meta, wav)
    with pytest.raises(InputError, match="32x32"):
        tn.evaluate_nerf(root / "head", tmp_path / "ev", data=other, track=False)
    # render without the occupancy collection
    with pytest.raises(ShapeError, match="occupancy"):
        gf.GridHeadNeRF(hcfg).apply({"params": hvars["params"]}, jnp.zeros((2, 3)),
                                    jnp.ones((2, 3)), jnp.zeros((hcfg.cond_width,)),
                                    jnp.zeros(3), method=gf.GridHeadNeRF.render)


def test_region_rects_from_landmarks():
    from geneface_jax.render import image_metrics as im
    p = np.zeros((68, 2))
    p[36:48] = [[30 + i, 40 + (i % 2)] for i in range(12)]      # eyes: x 30..41, y 40..41
    p[48:68] = [[40 + (i % 10), 70 + i // 10] for i in range(20)]  # mouth x 40..49, y 70..71
    p[27] = [45, 40]
    p[8] = [45, 90]
    p[5], p[11] = [30, 80], [60, 80]
    r = im.region_rects(p, 128, 100)
    # grown by max(0.3 x size, 2) each side, outward to whole pixels (half-open)
    assert r["eyes"] == (26, 38, 45, 43)           # x 30 - 3.3 .. 41 + 3.3, y 40 - 2 .. 41 + 2
    assert r["mouth"] == (37, 68, 52, 73)
    assert r["neck"] == (30, 90, 60, 120)          # chin 90 + 0.6 x (90 - 40)
    assert im.region_rects(p, 100, 100)["neck"] == (30, 90, 60, 100)   # clipped


def test_grid_evaluation_reports_regions_and_render_speed(tiny_runs, tmp_path):
    root, _, _ = tiny_runs
    m = tn.evaluate_nerf(root / "head", tmp_path, torso=root / "torso", track=False,
                         save_frames=True)
    for k in ("psnr_eyes", "psnr_mouth", "psnr_neck", "psnr_full", "render_fps"):
        assert np.isfinite(m[k]) and m[k] > 0, (k, m[k])
    assert m["frames"] == 2 and m["torso"]             # the tiny person's valid split
    # frames rendered several per call (the default, 8) are the frames rendered one by one
    one = tn.evaluate_nerf(root / "head", tmp_path / "one", torso=root / "torso",
                           track=False, save_frames=True, frames_per_call=1)
    assert m["frames_per_call"] == 8 and one["frames_per_call"] == 1
    a, b = (np.load(d / "frames.npz") for d in (tmp_path, tmp_path / "one"))
    assert np.abs(a["pred"].astype(int) - b["pred"]).max() <= 1     # uint8 rounding
    for k in ("psnr_full", "psnr_head", "psnr_mouth"):
        assert m[k] == pytest.approx(one[k], abs=1e-4)
    with pytest.raises(InputError, match="frames_per_call"):
        tn.evaluate_nerf(root / "head", tmp_path / "bad", track=False, frames_per_call=0)


def test_a_geneface_directory_is_pointed_to_the_import(tmp_path):
    (tmp_path / "model_ckpt_steps_1000.ckpt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="import_geneface"):
        rf.load_nerf(tmp_path, "head")


def test_an_untrained_field_keeps_every_cell_occupied():
    """The occupancy grid starts at the threshold density; while the field's density is
    the same everywhere (below the decayed start), no cell may be dropped."""
    cfg = dataclasses.replace(SPHERE_CFG, occupancy_decay=0.95, grid_size=8)
    occ = {"density": jnp.full((8,) * 3, cfg.sigma_thresh), "bits": jnp.ones((8,) * 3)}
    flat = lambda p: jnp.full(p.shape[:1], 1e-3)                       # noqa: E731
    for i in range(20):
        occ = gf.update_occupancy(flat, occ, jax.random.PRNGKey(i), cfg, i)
        assert float(occ["bits"].min()) == 1.0, i


def test_eye_feature_is_the_lid_gap_and_reaches_the_density():
    """With `eye_feature` the head's condition ends with the window centre's eye opening
    (upper minus lower lid y, normalised units), and the density depends on it directly
    (the sigma MLP takes it), so a closing eye can change the rendered surface."""
    cfg = dataclasses.replace(TINY_GRID, eye_feature=True)
    assert cfg.cond_width == cfg.cond_dim + 1
    model, variables = gf.init_grid(cfg, "head", jax.random.PRNGKey(1))
    rng = np.random.default_rng(0)
    win = rng.standard_normal((2, cfg.smooth_window, 68, 3)).astype(np.float32)
    centre = win[:, cfg.smooth_window // 2]
    gap = (centre[:, [37, 38, 43, 44], 1] - centre[:, [41, 40, 47, 46], 1]).mean(-1)
    cond = model.apply(variables, jnp.asarray(win), False, method=gf.GridHeadNeRF.condition)
    assert cond.shape == (2, cfg.cond_width)
    np.testing.assert_allclose(cond[:, -1], gap, rtol=1e-6)
    # only the centre frame counts: other frames' lids do not move the feature
    other = win.copy()
    other[:, 0, 37:48, 1] += 3.0
    np.testing.assert_allclose(model.apply(variables, jnp.asarray(other), False,
                                           method=gf.GridHeadNeRF.condition)[:, -1], gap,
                               rtol=1e-6)
    params = perturbed(variables["params"], 2, 0.1)
    pts = jnp.asarray(rng.uniform(-0.1, 0.1, (64, 3)), jnp.float32)
    c0 = cond[:1]
    c1 = c0.at[0, -1].add(-5.0)
    sig = [model.apply({"params": params}, pts, None, c, group=64,
                       method=gf.GridHeadNeRF.field)[0] for c in (c0, c1)]
    assert float(jnp.abs(sig[0] - sig[1]).mean()) > 1e-3 * float(jnp.abs(sig[0]).mean())
    # the same change with the feature cut from the sigma MLP's input (ambient path only)
    # moves the density less: the direct input carries it
    k = params["sigma_net"]["net_0"]["kernel"]
    cut = jax.tree_util.tree_map(lambda x: x, params)
    cut["sigma_net"]["net_0"]["kernel"] = k.at[-1].set(0.0)
    sig_cut = [model.apply({"params": cut}, pts, None, c, group=64,
                           method=gf.GridHeadNeRF.field)[0] for c in (c0, c1)]
    assert float(jnp.abs(sig_cut[0] - sig_cut[1]).mean()) < float(
        jnp.abs(sig[0] - sig[1]).mean())
    old = dataclasses.replace(cfg, eye_feature=False)         # GeneFace's head: no input
    assert old.cond_width == cfg.cond_dim
