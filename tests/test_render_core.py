"""Closed-form tests of the stage-3 rendering core: rays, encodings, sampling, compositing,
and the device-sharded renderer (1 vs 8 simulated devices, any chunk size)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from geneface_jax.errors import InputError, ShapeError
from geneface_jax.mesh import make_mesh
from geneface_jax.render import encodings, rays, sampling, sharded, volume


def random_pose(rng):
    """A random rotation (QR of a Gaussian, det +1) and translation, camera-to-world."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    pose = np.eye(4)
    pose[:3, :3] = q
    pose[:3, 3] = rng.normal(size=3)
    return pose.astype(np.float32)


# --------------------------------------------------------------------------- rays

def test_identity_pose_centre_and_corner_rays():
    h, w = 5, 7
    fx, fy, cx, cy = 10.0, 12.0, 3.5, 2.5
    o, d = rays.pixel_rays(np.eye(4), (fx, fy, cx, cy), h, w)
    assert o.shape == d.shape == (h, w, 3)
    np.testing.assert_array_equal(np.asarray(o), 0.0)
    np.testing.assert_allclose(d[2, 3], [0.0, 0.0, -1.0], atol=1e-7)      # centre pixel: -z
    # top-left pixel (0, 0), centre (0.5, 0.5): left of and above the axis -> x < 0, y > 0
    np.testing.assert_allclose(d[0, 0], [(0.5 - cx) / fx, -(0.5 - cy) / fy, -1.0], atol=1e-7)
    assert d[0, 0, 0] < 0 and d[0, 0, 1] > 0
    # bottom-right pixel (h-1, w-1)
    np.testing.assert_allclose(d[h - 1, w - 1],
                               [(w - 0.5 - cx) / fx, -(h - 0.5 - cy) / fy, -1.0], atol=1e-7)
    assert d[h - 1, w - 1, 0] > 0 and d[h - 1, w - 1, 1] < 0


def test_translated_rotated_pose():
    # camera at (1, 2, 3) turned 90 degrees about +y: camera -z looks along world -x
    pose = np.eye(4, dtype=np.float32)
    pose[:3, :3] = [[0, 0, 1], [0, 1, 0], [-1, 0, 0]]
    pose[:3, 3] = [1, 2, 3]
    o, d = rays.pixel_rays(pose, (4.0, 4.0, 1.5, 1.5), 3, 3)
    np.testing.assert_allclose(o[1, 1], [1, 2, 3])
    np.testing.assert_allclose(d[1, 1], [-1, 0, 0], atol=1e-7)
    u, v, depth = rays.project_points(np.array([-2.0, 2.0, 3.0]), pose, (4.0, 4.0, 1.5, 1.5))
    np.testing.assert_allclose([u, v, depth], [1.5, 1.5, 3.0], atol=1e-6)


def test_projection_round_trip_random_poses():
    rng = np.random.default_rng(0)
    h, w = 9, 11
    poses = np.stack([random_pose(rng) for _ in range(4)])
    intr = np.stack([[rng.uniform(8, 20), rng.uniform(8, 20), rng.uniform(3, 8),
                      rng.uniform(3, 6)] for _ in range(4)]).astype(np.float32)
    o, d = rays.pixel_rays(poses, intr, h, w)                              # [4, H, W, 3]
    assert o.shape == (4, h, w, 3)
    t = rng.uniform(0.3, 3.0, size=(4, h, w, 1)).astype(np.float32)
    pts = o + t * d
    u, v, depth = rays.project_points(pts, poses[:, None, None], intr[:, None, None])
    jj, ii = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    np.testing.assert_allclose(u, np.broadcast_to(jj, u.shape), atol=1e-4)
    np.testing.assert_allclose(v, np.broadcast_to(ii, v.shape), atol=1e-4)
    np.testing.assert_allclose(depth, t[..., 0], rtol=1e-5, atol=1e-5)
    # rays_for_pixels agrees with the full image
    rows = rng.integers(0, h, size=30)
    cols = rng.integers(0, w, size=30)
    o2, d2 = rays.rays_for_pixels(poses[2], intr[2], rows, cols)
    np.testing.assert_allclose(o2, o[2, rows, cols], atol=1e-6)
    np.testing.assert_allclose(d2, d[2, rows, cols], atol=1e-6)


def test_geneface_pixel_convention_closed_form():
    """GeneFace's `get_rays`: pixel (i, j) -> ((j - W/2) / fx, -(i - H/2) / fy, -1)
    whatever the dataset's principal point; the default goes through pixel centres."""
    h, w, fx, fy, cx, cy = 6, 8, 5.0, 7.0, 3.2, 2.9
    k = (fx, fy, cx, cy)
    ii, jj = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    pose = np.eye(4)
    k_gf = rays.ray_intrinsics(k, h, w, "geneface")
    np.testing.assert_allclose(k_gf, [fx, fy, w / 2 + 0.5, h / 2 + 0.5])
    _, d = rays.pixel_rays(pose, k_gf, h, w)
    want = np.stack([(jj - w / 2) / fx, -(ii - h / 2) / fy, -np.ones((h, w))], -1)
    np.testing.assert_allclose(d, want, atol=1e-6)
    _, d2 = rays.rays_for_pixels(pose, k_gf, ii.ravel(), jj.ravel())
    np.testing.assert_allclose(d2, want.reshape(-1, 3), atol=1e-6)
    np.testing.assert_array_equal(rays.ray_intrinsics(k, h, w, "centers"), np.float32(k))
    _, d3 = rays.pixel_rays(pose, rays.ray_intrinsics(k, h, w), h, w)
    want = np.stack([(jj + 0.5 - cx) / fx, -(ii + 0.5 - cy) / fy, -np.ones((h, w))], -1)
    np.testing.assert_allclose(d3, want, atol=1e-6)
    # batched intrinsics keep their batch
    assert rays.ray_intrinsics(np.tile(k, (3, 1)), h, w, "geneface").shape == (3, 4)
    with pytest.raises(ValueError):
        rays.ray_intrinsics(k, h, w, "corners")


def test_ray_shape_errors():
    with pytest.raises(ShapeError, match="pose"):
        rays.pixel_rays(np.eye(4)[:3], (1, 1, 1, 1), 4, 4)
    with pytest.raises(ShapeError, match="intrinsics"):
        rays.pixel_rays(np.eye(4), (1, 1, 1), 4, 4)
    with pytest.raises(ShapeError, match="same shape"):
        rays.rays_for_pixels(np.eye(4), (1, 1, 1, 1), np.zeros(3, int), np.zeros(4, int))
    with pytest.raises(ShapeError, match="points"):
        rays.project_points(np.zeros((5, 2)), np.eye(4), (1, 1, 1, 1))
    with pytest.raises(ShapeError, match="image size"):
        rays.pixel_rays(np.eye(4), (1, 1, 1, 1), 0, 4)


def test_bad_pose_values_are_refused():
    scaled = np.eye(4, dtype=np.float32)
    scaled[:3, :3] *= 1.1
    with pytest.raises(InputError, match="orthonormal"):
        rays.pixel_rays(scaled, (1, 1, 1, 1), 4, 4)
    sheared = np.eye(4, dtype=np.float32)
    sheared[0, 1] = 0.2
    with pytest.raises(InputError, match="orthonormal"):
        rays.rays_for_pixels(np.stack([np.eye(4), sheared]), (1, 1, 1, 1),
                             np.zeros(2, int), np.zeros(2, int))
    nan = np.eye(4, dtype=np.float32)
    nan[0, 3] = np.nan
    with pytest.raises(InputError, match="NaN"):
        rays.pixel_rays(nan, (1, 1, 1, 1), 4, 4)
    # Rigid poses pass, also inside jit (traced poses are not inspected).
    good = random_pose(np.random.default_rng(3))
    rays.pixel_rays(good, (1, 1, 1, 1), 4, 4)
    jax.jit(lambda p: rays.pixel_rays(p, (1.0, 1.0, 1.0, 1.0), 4, 4))(good)


# --------------------------------------------------------------------------- sampler

RECT = (10, 20, 30, 44)           # x0, y0, x1, y1 (cols 10..29, rows 20..43)


def _inside(rows, cols, rect):
    x0, y0, x1, y1 = rect
    return (cols >= x0) & (cols < x1) & (rows >= y0) & (rows < y1)


def test_sample_pixels_fraction_and_bounds():
    h, w, n, p = 64, 48, 4000, 0.95
    rows, cols = rays.sample_pixels(np.random.default_rng(0), RECT, h, w, n, p)
    assert rows.shape == cols.shape == (n,) and rows.dtype == np.int32
    assert rows.min() >= 0 and rows.max() < h and cols.min() >= 0 and cols.max() < w
    inside = _inside(rows, cols, RECT)
    tol = 4 * math.sqrt(p * (1 - p) / n)
    assert abs(inside.mean() - p) < tol
    # inside: uniform over the rectangle (means near its centre, every row/col reached)
    assert abs(rows[inside].mean() - 31.5) < 0.5 and abs(cols[inside].mean() - 19.5) < 0.5
    assert set(rows[inside]) == set(range(20, 44)) and set(cols[inside]) == set(range(10, 30))
    # the shuffle mixes inside and outside samples
    assert 0.85 < inside[: n // 4].mean() < 1.0


def test_sample_pixels_outside_is_uniform_over_the_complement():
    h, w, n = 64, 48, 20000
    rows, cols = rays.sample_pixels(np.random.default_rng(1), RECT, h, w, n, 0.0)
    assert not _inside(rows, cols, RECT).any()
    area_out = h * w - 20 * 24
    regions = {"above": rows < 20, "below": rows >= 44,
               "left": (rows >= 20) & (rows < 44) & (cols < 10),
               "right": (rows >= 20) & (rows < 44) & (cols >= 30)}
    areas = {"above": 20 * w, "below": 20 * w, "left": 24 * 10, "right": 24 * 18}
    for name, mask in regions.items():
        expected = areas[name] / area_out
        assert abs(mask.mean() - expected) < 4 * math.sqrt(expected * (1 - expected) / n), name
    # whole-image rectangle: no outside pixels exist, all samples stay in the image
    rows, cols = rays.sample_pixels(np.random.default_rng(2), (0, 0, w, h), h, w, 100, 0.5)
    assert rows.max() < h and cols.max() < w and rows.min() >= 0 and cols.min() >= 0


def test_sample_pixels_is_a_function_of_the_generator_and_checks_its_arguments():
    a = rays.sample_pixels(np.random.default_rng(5), RECT, 64, 48, 300, 0.8)
    b = rays.sample_pixels(np.random.default_rng(5), RECT, 64, 48, 300, 0.8)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    # an empty rectangle becomes one pixel
    rows, cols = rays.sample_pixels(np.random.default_rng(0), (5, 7, 5, 7), 16, 16, 50, 1.0)
    assert set(rows) == {7} and set(cols) == {5}
    with pytest.raises(ShapeError, match="rect"):
        rays.sample_pixels(np.random.default_rng(0), (0, 0, 4), 16, 16, 10)
    with pytest.raises(ValueError, match="in_rect_percent"):
        rays.sample_pixels(np.random.default_rng(0), RECT, 64, 48, 10, 1.5)
    with pytest.raises(ShapeError, match="positive"):
        rays.sample_pixels(np.random.default_rng(0), RECT, 64, 48, 0)


# --------------------------------------------------------------------------- encodings

def test_positional_encoding_formula_and_dim():
    x = np.array([[0.5, -1.0, 2.0], [0.0, 0.25, -3.0]], np.float32)
    num_freqs = 3
    got = np.asarray(encodings.positional_encoding(x, num_freqs))
    assert got.shape == (2, encodings.encoding_dim(3, num_freqs)) == (2, 21)
    for row in range(2):
        expected = list(x[row])
        for k in range(num_freqs):
            expected += [math.sin(2.0 ** k * c) for c in x[row]]
            expected += [math.cos(2.0 ** k * c) for c in x[row]]
        np.testing.assert_allclose(got[row], expected, atol=1e-6)
    # e.g. column 3 is sin(x0), column 6 is cos(x0), column 9 is sin(2 x0)
    np.testing.assert_allclose(got[0, [3, 6, 9]], [math.sin(0.5), math.cos(0.5), math.sin(1.0)],
                               atol=1e-6)
    no_input = encodings.positional_encoding(x, num_freqs, include_input=False)
    np.testing.assert_array_equal(no_input, got[:, 3:])
    assert encodings.encoding_dim(3, 10) == 63 and encodings.encoding_dim(3, 4) == 27
    assert encodings.positional_encoding(np.zeros((4, 5, 3)), 10).shape == (4, 5, 63)


def test_sincos_matches_float64_over_its_range():
    """The vectorisable sin/cos: within 2e-7 of float64 on |y| < SINCOS_MAX_ARG, at the
    quadrant boundaries (multiples of pi/4) and at exact zeros; the reduction constants
    sum to pi/2."""
    assert abs(sum(float(p) for p in encodings._PIO2) - math.pi / 2) < 1e-14
    rng = np.random.default_rng(0)
    top = encodings.SINCOS_MAX_ARG
    y = np.concatenate([np.linspace(-top, top, 400_001), rng.uniform(-8, 8, 100_000),
                        np.arange(-64, 65) * (math.pi / 4), [0.0, -0.0, 1e-30]])
    y = y.astype(np.float32)
    s, c = (np.asarray(v, np.float64) for v in encodings.sincos(y))
    y64 = y.astype(np.float64)
    assert np.max(np.abs(s - np.sin(y64))) <= 2e-7
    assert np.max(np.abs(c - np.cos(y64))) <= 2e-7
    assert s[-3] == 0.0 and c[-3] == 1.0


def test_feature_major_encoding_is_the_transpose():
    rng = np.random.default_rng(1)
    x = rng.uniform(-2.0, 2.0, (7, 5, 3)).astype(np.float32)       # [R, S, 3]
    for num_freqs, include in ((10, True), (4, True), (3, False), (0, True)):
        ref = np.asarray(encodings.positional_encoding(x, num_freqs, include_input=include))
        got = np.asarray(encodings.positional_encoding_features(
            np.transpose(x, (2, 0, 1)), num_freqs, include_input=include))
        assert got.shape == (ref.shape[-1], 7, 5)
        np.testing.assert_allclose(np.transpose(got, (1, 2, 0)), ref, atol=2e-7, rtol=0)
    with pytest.raises(ShapeError):
        encodings.positional_encoding_features(np.float32(1.0), 4)
    with pytest.raises(ValueError):
        encodings.positional_encoding_features(x, -1)


# --------------------------------------------------------------------------- compositing

def test_constant_density_slab_exact():
    # grid t_i = i h, density s on samples 100..149 -> slab thickness d = 50 h exactly
    r, s_count, h = 3, 400, 0.01
    t = np.broadcast_to(np.arange(s_count, dtype=np.float32) * h, (r, s_count))
    sig = np.zeros((r, s_count), np.float32)
    sig[:, 100:150] = np.array([0.5, 2.0, 7.0], np.float32)[:, None]
    rgb = np.full((r, s_count, 3), 0.3, np.float32)
    out = volume.composite(sig, rgb, t)
    d = 0.5
    expected_t = np.exp(-sig[:, 120] * d)
    np.testing.assert_allclose(out.transmittance[:, 150], expected_t, rtol=1e-5)
    np.testing.assert_allclose(out.transmittance[:, -1], expected_t, rtol=1e-5)
    np.testing.assert_allclose(out.acc, 1 - expected_t, rtol=1e-5)
    np.testing.assert_allclose(out.transmittance[:, :101], 1.0)            # nothing before
    # direction norm scales the metric path length
    out2 = volume.composite(sig, rgb, t, dir_norm=np.full(r, 2.0, np.float32))
    np.testing.assert_allclose(out2.acc, 1 - np.exp(-2 * sig[:, 120] * d), rtol=1e-5)
    # weights sum to acc, colour = acc * constant colour over black
    np.testing.assert_allclose(out.weights.sum(-1), out.acc, rtol=1e-5)
    np.testing.assert_allclose(out.rgb, np.broadcast_to(0.3 * np.asarray(out.acc)[:, None], (r, 3)),
                               rtol=1e-5)


def test_constant_density_slab_many_samples():
    # a slab [a, a + d] sampled by stratified midpoints that do not align with it
    a, d, sigma = 0.37, 0.4113, 3.0
    t = sampling.stratified_samples(0.0, 2.0, 4096, num_rays=2)
    sig = jnp.where((t >= a) & (t < a + d), sigma, 0.0)
    out = volume.composite(sig, jnp.ones(t.shape + (3,)), t)
    np.testing.assert_allclose(out.acc, 1 - math.exp(-sigma * d), atol=3e-3)


def test_opaque_plane_and_empty_space():
    rng = np.random.default_rng(3)
    r, s = 4, 64
    t = np.asarray(sampling.stratified_samples(0.3, 0.9, s, num_rays=r))
    k0 = np.array([5, 20, 40, 63])
    sig = np.zeros((r, s), np.float32)
    sig[np.arange(r), k0] = 1e5
    rgb = rng.uniform(size=(r, s, 3)).astype(np.float32)
    bg = rng.uniform(size=(r, 3)).astype(np.float32)
    out = volume.composite(sig, rgb, t, background=bg)
    np.testing.assert_allclose(out.acc, 1.0, atol=1e-6)
    np.testing.assert_allclose(out.depth, t[np.arange(r), k0], atol=1e-5)
    np.testing.assert_allclose(out.rgb, rgb[np.arange(r), k0], atol=1e-5)
    # empty space: the background exactly
    empty = volume.composite(np.zeros((r, s), np.float32), rgb, t, background=bg)
    np.testing.assert_array_equal(np.asarray(empty.rgb), bg)
    np.testing.assert_array_equal(np.asarray(empty.acc), 0.0)
    np.testing.assert_array_equal(np.asarray(empty.depth), 0.0)
    # a [3] background broadcasts
    grey = volume.composite(np.zeros((r, s), np.float32), rgb, t, background=np.full(3, 0.5))
    np.testing.assert_array_equal(np.asarray(grey.rgb), 0.5)


def test_composite_shape_errors():
    t = np.zeros((4, 8), np.float32)
    with pytest.raises(ShapeError, match="rgb"):
        volume.composite(t, np.zeros((4, 8, 4)), t)
    with pytest.raises(ShapeError, match="t must be"):
        volume.composite(t, np.zeros((4, 8, 3)), t[:, :7])
    with pytest.raises(ShapeError, match="background"):
        volume.composite(t, np.zeros((4, 8, 3)), t, background=np.zeros((3, 3)))
    with pytest.raises(ShapeError, match="sigma"):
        volume.composite(t[0], np.zeros((8, 3)), t[0])


# --------------------------------------------------------------------------- sampling

def test_stratified_samples_bins_and_midpoints():
    near = np.array([0.3, 0.1, 1.0], np.float32)
    far = np.array([0.9, 0.2, 5.0], np.float32)
    s = 16
    t = np.asarray(sampling.stratified_samples(near, far, s, key=jax.random.PRNGKey(0)))
    assert t.shape == (3, s)
    h = (far - near) / s
    lo = near[:, None] + np.arange(s) * h[:, None]
    assert np.all(t >= lo - 1e-6) and np.all(t < lo + h[:, None] + 1e-6)
    assert np.all(np.diff(t, axis=-1) > 0)
    # jitter is real: not the midpoints
    mid = lo + 0.5 * h[:, None]
    assert np.abs(t - mid).max() > 0.1 * h.min()
    np.testing.assert_allclose(sampling.stratified_samples(near, far, s), mid, atol=1e-6)
    # scalar bounds need num_rays; mismatched sizes are rejected
    assert sampling.stratified_samples(0.3, 0.9, 4, num_rays=5).shape == (5, 4)
    with pytest.raises(ShapeError, match="num_rays"):
        sampling.stratified_samples(0.3, 0.9, 4)
    with pytest.raises(ShapeError, match="disagree"):
        sampling.stratified_samples(near, far[:2], 4)


def test_fine_samples_concentrate_on_a_weight_spike():
    r, s, n = 8, 64, 128
    t = sampling.stratified_samples(0.3, 0.9, s, num_rays=r)
    spike = np.arange(r) * 7 + 3                                            # coarse index
    w = np.zeros((r, s), np.float32)
    w[np.arange(r), spike] = 1.0
    mids = 0.5 * (np.asarray(t)[:, 1:] + np.asarray(t)[:, :-1])
    lo = mids[np.arange(r), spike - 1]
    hi = mids[np.arange(r), spike]
    for key in (None, jax.random.PRNGKey(4)):
        fine = np.asarray(sampling.sample_pdf(mids, w[:, 1:-1], n, key=key))
        inside = (fine >= lo[:, None] - 1e-6) & (fine <= hi[:, None] + 1e-6)
        assert inside.mean() > 0.97
    union = np.asarray(sampling.hierarchical_samples(t, w, n, key=jax.random.PRNGKey(5)))
    assert union.shape == (r, s + n)
    assert np.all(np.diff(union, axis=-1) >= 0)
    in_spike = (union >= lo[:, None]) & (union <= hi[:, None])
    assert np.all(in_spike.sum(-1) >= 0.97 * n)
    # two bins with weights 3 : 1 share the samples 3 : 1
    w2 = np.zeros((r, s), np.float32)
    w2[:, 10], w2[:, 40] = 3.0, 1.0
    fine = np.asarray(sampling.sample_pdf(mids, w2[:, 1:-1], 4000, key=jax.random.PRNGKey(6)))
    frac = ((fine >= mids[:, 9:10]) & (fine <= mids[:, 10:11])).mean()
    assert abs(frac - 0.75) < 0.02


def test_fine_samples_follow_the_coarse_weights_ks():
    """Random fine samples are distributed as the piecewise-constant pdf of the coarse
    weights (plus its 1e-5 padding): one-sample KS test against the exact CDF."""
    r, s, n = 16, 32, 256
    t = np.asarray(sampling.stratified_samples(0.3, 0.9, s, num_rays=r))
    mids = 0.5 * (t[:, 1:] + t[:, :-1])
    rng = np.random.default_rng(8)
    w = rng.gamma(0.5, size=(r, s)).astype(np.float32)                 # uneven weights
    fine = np.asarray(sampling.sample_pdf(mids, w[:, 1:-1], n, key=jax.random.PRNGKey(9)))
    for i in range(r):
        p = w[i, 1:-1].astype(np.float64) + sampling.PDF_PADDING
        cdf_edges = np.concatenate([[0.0], np.cumsum(p / p.sum())])
        # exact CDF at each sample: linear inside its bin
        x = np.sort(fine[i])
        cdf = np.interp(x, mids[i], cdf_edges)
        m = len(x)
        ks = max(np.max(np.arange(1, m + 1) / m - cdf), np.max(cdf - np.arange(m) / m))
        assert ks < 1.95 / math.sqrt(m), (i, ks)            # KS at p = 0.001 per ray


def test_fine_samples_from_uniform_weights_are_uniform():
    r, s, n = 32, 64, 128
    t = sampling.stratified_samples(0.3, 0.9, s, num_rays=r)
    mids = np.asarray(0.5 * (t[:, 1:] + t[:, :-1]))
    w = np.ones((r, s), np.float32)
    fine = np.asarray(sampling.sample_pdf(mids, w[:, 1:-1], n, key=jax.random.PRNGKey(7)))
    a, b = mids[0, 0], mids[0, -1]
    x = np.sort(((fine - a) / (b - a)).ravel())
    m = x.size
    ks = max(np.max(np.arange(1, m + 1) / m - x), np.max(x - np.arange(m) / m))
    assert ks < 1.63 / math.sqrt(m)                                         # KS at p = 0.01
    # deterministic mode: u = linspace(0, 1) maps to evenly spaced samples
    det = np.asarray(sampling.sample_pdf(mids, w[:, 1:-1], n))
    np.testing.assert_allclose(det, np.broadcast_to(np.linspace(a, b, n), det.shape), atol=1e-5)


def test_fine_sampling_stops_gradients():
    t = sampling.stratified_samples(0.3, 0.9, 16, num_rays=2)

    def f(w):
        return sampling.hierarchical_samples(t, w, 8).sum()

    g = jax.grad(f)(jnp.ones((2, 16)))
    np.testing.assert_array_equal(g, 0.0)


# --------------------------------------------------------------------------- sharded

SPHERE = {"center": jnp.array([0.0, 0.0, -0.6]), "radius": jnp.array(0.2),
          "sigma": jnp.array(6.0), "color": jnp.array([0.9, 0.4, 0.1])}


def sphere_render(params, ray_chunk, num_samples=96):
    """Analytic field: uniform-density ball, composited over the per-ray background."""
    o, d = ray_chunk["origins"], ray_chunk["directions"]
    t = sampling.stratified_samples(0.3, 0.9, num_samples, num_rays=o.shape[0])
    pts = o[:, None] + t[..., None] * d[:, None]
    inside = jnp.sum((pts - params["center"]) ** 2, -1) < params["radius"] ** 2
    sig = jnp.where(inside, params["sigma"], 0.0)
    rgb = jnp.broadcast_to(params["color"], sig.shape + (3,))
    out = volume.composite(sig, rgb, t, dir_norm=jnp.linalg.norm(d, axis=-1),
                           background=ray_chunk["background"])
    return {"rgb": out.rgb, "depth": out.depth, "acc": out.acc}


def _image_rays(h, w):
    o, d = rays.pixel_rays(np.eye(4), (0.9 * w, 0.9 * w, w / 2, h / 2), h, w)
    bg = jnp.linspace(0, 1, h * w * 3).reshape(h * w, 3)
    return {"origins": o.reshape(-1, 3), "directions": d.reshape(-1, 3), "background": bg}


def test_render_image_same_on_1_and_8_devices_any_chunk():
    h, w = 12, 13                                      # 156 rays: not a multiple of 8 * 7
    ray_tree = _image_rays(h, w)
    r = h * w
    reference = jax.jit(sphere_render)(SPHERE, ray_tree)
    one = make_mesh(jax.devices()[:1])
    eight = make_mesh(jax.devices())
    assert eight.shape["data"] == 8
    for mesh in (one, eight):
        for chunk in (7, 64, r + 5):
            out = sharded.render_image(sphere_render, ray_tree, params=SPHERE, mesh=mesh,
                                       chunk=chunk)
            for k in reference:
                assert out[k].shape == reference[k].shape
                np.testing.assert_allclose(out[k], reference[k], atol=1e-6,
                                           err_msg=f"{k} mesh={mesh.shape} chunk={chunk}")
    # closed form at the centre ray: chord 2 r through a ball of density sigma
    centre = (h // 2) * w + w // 2
    o, d = ray_tree["origins"][centre], ray_tree["directions"][centre]
    # the ray passes within a pixel of the centre; chord length from the exact geometry
    dn = d / jnp.linalg.norm(d)
    off = SPHERE["center"] - o
    b = jnp.dot(off, dn)
    chord = 2 * jnp.sqrt(SPHERE["radius"] ** 2 - (jnp.dot(off, off) - b ** 2))
    acc = sharded.render_image(sphere_render, ray_tree, params=SPHERE, mesh=eight,
                               chunk=64)["acc"][centre]
    np.testing.assert_allclose(acc, 1 - jnp.exp(-SPHERE["sigma"] * chord), atol=2e-2)
    # fewer rays than devices
    few = jax.tree.map(lambda x: x[:5], ray_tree)
    out = sharded.render_image(sphere_render, few, params=SPHERE, mesh=eight, chunk=64)
    np.testing.assert_allclose(out["rgb"], reference["rgb"][:5], atol=1e-6)


def test_render_image_ray_counts_share_compiled_programs():
    """Ray counts are padded (on the host) to `padded_layout`'s size: a device's rays split
    evenly into whole chunks, the chunk rounded up to a quarter of its power of two, so
    counts that pad alike run one compiled program, with the same rays' results as
    rendering them alone."""
    assert sharded.padded_layout(100, 1, 4096) == (112, 112)   # 100 -> multiple of 16
    assert sharded.padded_layout(5000, 1, 4096) == (2560, 5120)  # 2 chunks of 2500 -> 2560
    assert sharded.padded_layout(4590, 1, 4096) == (2560, 5120)   # was 8192
    assert sharded.padded_layout(156, 8, 7) == (7, 168)        # 20 per device: 3 chunks
    assert sharded.padded_layout(1, 8, 64) == (1, 8)
    for r in range(1, 3000, 7):                                  # at most 25 % padding
        c, total = sharded.padded_layout(r, 2, 256)
        assert c <= 256 and total >= r and (total - r) <= 0.25 * r + 2 * 256 / 4
    ray_tree = _image_rays(12, 13)
    reference = jax.jit(sphere_render)(SPHERE, ray_tree)
    one = make_mesh(jax.devices()[:1])
    program = sharded._compiled(sphere_render, one, 64)
    before = program._cache_size()
    for r in (97, 100, 112):                                    # all pad to 2 chunks of 56
        few = jax.tree.map(lambda x, r=r: np.asarray(x)[:r], ray_tree)
        out = sharded.render_image(sphere_render, few, params=SPHERE, mesh=one, chunk=64)
        assert isinstance(out["rgb"], np.ndarray) and out["rgb"].shape == (r, 3)
        np.testing.assert_allclose(out["rgb"], reference["rgb"][:r], atol=1e-6)
    assert program._cache_size() == before + 1


def test_render_image_shape_errors():
    ray_tree = _image_rays(4, 4)
    bad = dict(ray_tree, background=ray_tree["background"][:7])
    with pytest.raises(ShapeError, match="ray count"):
        sharded.render_image(sphere_render, bad, params=SPHERE)
    with pytest.raises(ShapeError, match="leading ray axis"):
        sharded.render_image(sphere_render, dict(ray_tree, background=jnp.array(0.0)),
                             params=SPHERE)

    def wrong_output(params, ray_chunk):
        return {"rgb": jnp.zeros((3,))}

    with pytest.raises(ShapeError, match="chunk"):
        sharded.render_image(wrong_output, ray_tree, params=SPHERE, chunk=4)
