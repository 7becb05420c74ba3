"""Stage-1 building blocks: WNConv1d, WaveNet, coupling flows, posterior encoder.

The equivalence tests build transformers' VITS modules from a tiny random config, fill every
parameter with random normals (VITS zero-initialises nothing here, but GeneFace zeroes the
coupling `post` conv, so random weights keep the comparison non-trivial), run them on a
masked variable-length batch, convert the state_dict and compare with the Flax modules.
PyTorch tensors are [B, C, T]; the Flax modules take [B, T, C].
"""

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from geneface_jax.convert import vits as cv
from geneface_jax.errors import CheckpointError, ShapeError
from geneface_jax.motion.flows import Flip, ResidualCouplingBlock, ResidualCouplingLayer
from geneface_jax.motion.wavenet import (PosteriorEncoder, WaveNet, WNConv1d, use_winograd,
                                         weight_norm_kernel)
from geneface_jax.motion.winograd import winograd_conv1d, winograd_matrices

from conftest import perturbed

B, T = 3, 17
LENGTHS = (17, 11, 5)
HIDDEN, FLOW, BINS, GIN = 16, 8, 10, 6
DILATION_RATE = 2
POST_LAYERS, PRIOR_LAYERS, NUM_FLOWS = 3, 2, 4
ATOL = 1e-5

# condition cases: (name, gin_channels, condition time length or None)
CONDITIONS = [("none", 0, None), ("unused", GIN, None), ("global", GIN, 1), ("sequence", GIN, T)]


def _mask():
    """[B, T, 1] float mask of LENGTHS."""
    return (np.arange(T)[None, :] < np.array(LENGTHS)[:, None]).astype(np.float32)[..., None]


def _assert_close(actual, expected, what, atol=ATOL):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    err = float(np.max(np.abs(actual - expected))) if actual.size else 0.0
    print(f"max abs err {what}: {err:.2e}")
    assert err <= atol, f"{what}: max abs error {err:.3e} > {atol}"


def _random_like(tree, seed, scale=0.3):
    return perturbed(tree, seed, scale, add=False)


def _shapes(tree):
    return jax.tree_util.tree_map(lambda a: tuple(np.shape(a)), tree)


# --------------------------------------------------------------------------- torch helpers

@pytest.fixture(scope="module")
def vits():
    """(torch, VitsConfig, modeling_vits), or skip when the test extras are missing."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import VitsConfig
    from transformers.models.vits import modeling_vits
    torch.set_num_threads(1)
    return torch, VitsConfig, modeling_vits


def _config(VitsConfig, kernel, gin):
    return VitsConfig(hidden_size=HIDDEN, flow_size=FLOW, spectrogram_bins=BINS,
                      speaker_embedding_size=gin, wavenet_kernel_size=kernel,
                      wavenet_dilation_rate=DILATION_RATE, wavenet_dropout=0.0,
                      posterior_encoder_num_wavenet_layers=POST_LAYERS,
                      prior_encoder_num_wavenet_layers=PRIOR_LAYERS,
                      prior_encoder_num_flows=NUM_FLOWS)


def _randomize(torch, module, seed):
    """Every parameter (weight-norm g and v included) <- N(0, 0.3^2); eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return module.eval()


def _inputs(channels, gin, g_len, seed):
    """Channel-last numpy inputs: x [B, T, channels], mask [B, T, 1], g or None."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, T, channels)).astype(np.float32)
    g = None if g_len is None else rng.normal(size=(B, g_len, gin)).astype(np.float32)
    return x, _mask(), g


def _to_torch(torch, a):
    return None if a is None else torch.from_numpy(np.ascontiguousarray(np.swapaxes(a, 1, 2)))


def _from_torch(t):
    return np.swapaxes(t.detach().numpy(), 1, 2)


def _check_tree(module, params, *args, **kwargs):
    """The converted tree has exactly the structure and shapes of the module's own init."""
    init = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args, **kwargs))["params"]
    assert _shapes(params) == _shapes(init)


# --------------------------------------------------------------------------- WNConv1d

def _np_conv1d(x, w, b, stride, dilation, pad):
    """Reference cross-correlation: x [B, T, Ci], w [K, Ci, Co] -> [B, T', Co]."""
    k = w.shape[0]
    xp = np.pad(x, ((0, 0), (pad, pad), (0, 0)))
    t_out = (xp.shape[1] - dilation * (k - 1) - 1) // stride + 1
    y = np.zeros((x.shape[0], t_out, w.shape[-1]), np.float64)
    for t in range(t_out):
        for j in range(k):
            y[:, t] += xp[:, t * stride + j * dilation] @ w[j]
    return y + b


@pytest.mark.parametrize("seed", range(4))
def test_wnconv_effective_weight_is_g_v_over_norm(seed):
    rng = np.random.default_rng(seed)
    k, d, s = int(rng.choice([1, 3, 5])), int(rng.choice([1, 2, 3])), int(rng.choice([1, 2]))
    cin, cout = (int(c) for c in rng.integers(1, 6, size=2))
    conv = WNConv1d(cout, k, stride=s, dilation=d)
    x = rng.normal(size=(2, 13, cin)).astype(np.float32)
    params = conv.init(jax.random.PRNGKey(seed), x)["params"]
    assert _shapes(params) == {"weight_v": (k, cin, cout), "weight_g": (cout,), "bias": (cout,)}
    # PyTorch's weight_norm starts at g = ||v||: the effective kernel is v.
    np.testing.assert_allclose(weight_norm_kernel(params["weight_v"], params["weight_g"]),
                               params["weight_v"], atol=1e-6)

    v = rng.normal(size=(k, cin, cout)).astype(np.float32)
    g = rng.normal(size=(cout,)).astype(np.float32)
    b = rng.normal(size=(cout,)).astype(np.float32)
    w = np.asarray(weight_norm_kernel(v, g))
    v_dir = v / np.linalg.norm(v.reshape(-1, cout), axis=0)
    np.testing.assert_allclose(np.linalg.norm(w.reshape(-1, cout), axis=0), np.abs(g), rtol=1e-5)
    np.testing.assert_allclose(w, v_dir * g, rtol=1e-5, atol=1e-6)

    y = conv.apply({"params": {"weight_v": v, "weight_g": g, "bias": b}}, x)
    _assert_close(y, _np_conv1d(x, w, b, s, d, (k * d - d) // 2), f"WNConv1d seed {seed}")
    # The output depends on v only through its direction, per output channel.
    c = rng.uniform(0.1, 10.0, size=(cout,)).astype(np.float32)
    y2 = conv.apply({"params": {"weight_v": v * c, "weight_g": g, "bias": b}}, x)
    _assert_close(y2, y, f"WNConv1d scale invariance seed {seed}")


def test_wnconv_matches_torch_conv(vits):
    torch = vits[0]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 19, 5)).astype(np.float32)
    xt = _to_torch(torch, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        old = torch.nn.utils.weight_norm(torch.nn.Conv1d(5, 7, 3, stride=2, dilation=2, padding=2))
    new = torch.nn.utils.parametrizations.weight_norm(
        torch.nn.Conv1d(5, 7, 5, dilation=3, padding=6))
    plain = torch.nn.Conv1d(5, 4, 8, stride=4, padding=2)  # GeneFace's strided pre-net shape
    cases = [("old weight_g/weight_v", old, WNConv1d(7, 3, stride=2, dilation=2), None),
             ("parametrizations", new, WNConv1d(7, 5, dilation=3), None),
             ("parametrizations folded", new,
              WNConv1d(7, 5, dilation=3, use_weight_norm=False), False),
             ("plain", plain, WNConv1d(4, 8, stride=4, padding=2, use_weight_norm=False), None),
             ("plain as weight norm", plain, WNConv1d(4, 8, stride=4, padding=2), True)]
    for what, tmod, fmod, weight_norm in cases:
        _randomize(torch, tmod, 1)
        sd = tmod.state_dict()
        params = cv.conv1d_from_torch(sd, "", weight_norm=weight_norm)
        _check_tree(fmod, params, x)
        with torch.no_grad():
            ref = _from_torch(tmod(xt))
        _assert_close(fmod.apply({"params": params}, x), ref, f"conv {what}")


# --------------------------------------------------------------------------- Winograd conv

@pytest.mark.parametrize("m,k", [(4, 5), (4, 3), (2, 5), (6, 5), (4, 7), (3, 1)])
def test_winograd_matrices_compute_the_correlation(m, k):
    """A^T ((G w) * (B^T x)) = [sum_j x[i + j] w[j]] for random x, w (float64, exact up to
    round-off)."""
    a_t, g, b_t = winograd_matrices(m, k)
    n = m + k - 1
    assert a_t.shape == (m, n) and g.shape == (n, k) and b_t.shape == (n, n)
    rng = np.random.default_rng(m * 10 + k)
    for _ in range(5):
        x, w = rng.normal(size=n), rng.normal(size=k)
        direct = np.array([x[i:i + k] @ w for i in range(m)])
        np.testing.assert_allclose(a_t @ ((g @ w) * (b_t @ x)), direct, rtol=0, atol=1e-10)


@pytest.mark.parametrize("t,k,tile", [(200, 5, 4), (17, 5, 4), (3, 5, 4), (23, 3, 4),
                                      (19, 7, 4), (30, 5, 6)])
def test_winograd_conv_matches_the_direct_conv_and_its_gradients(t, k, tile):
    """Forward against a float64 NumPy correlation; dx, dw (autodiff of the Winograd
    form) against autodiff of `lax.conv_general_dilated`. Lengths not a multiple of the
    tile and shorter than the kernel included. Errors relative to the output / gradient scale."""
    rng = np.random.default_rng(t * 100 + k)
    c_in, c_out = 24, 40
    x = rng.normal(size=(3, t, c_in)).astype(np.float32)
    w = (rng.normal(size=(k, c_in, c_out)) / np.sqrt(k * c_in)).astype(np.float32)
    r = rng.normal(size=(3, t, c_out)).astype(np.float32)
    pad = (k - 1) // 2
    ref = _np_conv1d(x.astype(np.float64), w.astype(np.float64), 0.0, 1, 1, pad)
    y = np.asarray(jax.jit(lambda x, w: winograd_conv1d(x, w, tile))(x, w))
    tol = 2e-5 if tile <= 4 else 2e-4
    assert y.shape == ref.shape
    assert np.max(np.abs(y - ref)) <= tol * np.max(np.abs(ref))

    def direct(x, w):
        return jax.lax.conv_general_dilated(x, w, (1,), [(pad, pad)],
                                            dimension_numbers=("NWC", "WIO", "NWC"))
    grads = [jax.jit(jax.grad(lambda x, w, f=f: jnp.sum(f(x, w) * r), argnums=(0, 1)))(x, w)
             for f in (direct, lambda x, w: winograd_conv1d(x, w, tile))]
    for name, d, wg in zip(("dx", "dw"), *grads):
        d, wg = np.asarray(d), np.asarray(wg)
        err = np.max(np.abs(wg - d)) / np.max(np.abs(d))
        assert err <= tol, f"{name}: relative error {err:.2e}"


def test_winograd_conv_rejects_bad_input():
    x = np.zeros((2, 9, 4), np.float32)
    for bad in [lambda: winograd_conv1d(x, np.zeros((4, 4, 3), np.float32)),   # even kernel
                lambda: winograd_conv1d(x, np.zeros((3, 5, 3), np.float32)),   # C_in mismatch
                lambda: winograd_conv1d(x[0], np.zeros((3, 4, 3), np.float32)),  # rank 2
                lambda: winograd_conv1d(x[:, :0], np.zeros((3, 4, 3), np.float32))]:  # T = 0
        with pytest.raises(ShapeError):
            bad()
    with pytest.raises(ValueError, match="dilation 1"):
        WNConv1d(4, 3, dilation=2, algorithm="winograd").init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match="one of"):
        WNConv1d(4, 3, algorithm="fft").init(jax.random.PRNGKey(0), x)
    assert use_winograd("auto", 5) == (jax.default_backend() == "cpu")
    assert not use_winograd("winograd", 1) and not use_winograd("direct", 5)


def test_wavenet_winograd_equals_direct_on_a_masked_batch():
    """Same parameters, both algorithms: outputs and parameter gradients agree."""
    x, mask, g = _inputs(HIDDEN, GIN, T, 21)
    nets = [WaveNet(HIDDEN, 5, 1, 2, gin_channels=GIN, conv_algorithm=a)
            for a in ("direct", "winograd")]
    params = _random_like(nets[0].init(jax.random.PRNGKey(0), x, mask, g)["params"], 4)
    outs, grads = [], []
    for net in nets:
        def f(p, net=net):
            return net.apply({"params": p}, x, mask, g)
        out, vjp = jax.vjp(f, params)
        outs.append(np.asarray(out))
        grads.append(vjp(jnp.cos(out))[0])   # the gradient of sum(sin(out))
    _assert_close(outs[1], outs[0], "WaveNet winograd vs direct")
    assert np.max(np.abs(outs[0])) > 0.1
    for path, a, b in zip(jax.tree_util.tree_leaves_with_path(grads[0]),
                          jax.tree_util.tree_leaves(grads[0]), jax.tree_util.tree_leaves(grads[1])):
        _assert_close(b, a, f"grad {jax.tree_util.keystr(path[0])}",
                      atol=1e-5 * max(1.0, float(np.max(np.abs(a)))))


# --------------------------------------------------------------------------- VITS equivalence

@pytest.mark.parametrize("kernel", [5, 3])
@pytest.mark.parametrize("cond", CONDITIONS, ids=[c[0] for c in CONDITIONS])
def test_wavenet_matches_vits(vits, kernel, cond):
    torch, VitsConfig, mv = vits
    name, gin, g_len = cond
    config = _config(VitsConfig, kernel, gin)
    tmod = _randomize(torch, mv.VitsWaveNet(config, num_layers=POST_LAYERS), 2)
    x, mask, g = _inputs(HIDDEN, gin, g_len, 3)
    with torch.no_grad():
        ref = _from_torch(tmod(_to_torch(torch, x), _to_torch(torch, mask), _to_torch(torch, g)))

    sd = tmod.state_dict()
    params = cv.wavenet_from_torch(sd, "", POST_LAYERS)
    assert len(jax.tree_util.tree_leaves(params)) == len(sd)
    fmod = WaveNet(HIDDEN, kernel, DILATION_RATE, POST_LAYERS, gin_channels=gin)
    _check_tree(fmod, params, x, mask, g)
    out = np.asarray(fmod.apply({"params": params}, x, mask, g))
    _assert_close(out, ref, f"WaveNet k{kernel} {name}")
    assert np.all(out[mask[..., 0] == 0] == 0)
    assert np.max(np.abs(out)) > 0.1  # non-trivial


@pytest.mark.parametrize("cond", CONDITIONS[1:3], ids=[c[0] for c in CONDITIONS[1:3]])
def test_posterior_encoder_matches_vits(vits, cond):
    torch, VitsConfig, mv = vits
    name, gin, g_len = cond
    tmod = _randomize(torch, mv.VitsPosteriorEncoder(_config(VitsConfig, 5, gin)), 4)
    x, mask, g = _inputs(BINS, gin, g_len, 5)
    with torch.no_grad():
        torch.manual_seed(11)
        z_t, m_t, logs_t = tmod(_to_torch(torch, x), _to_torch(torch, mask), _to_torch(torch, g))
        torch.manual_seed(11)
        noise = _from_torch(torch.randn(B, FLOW, T))  # the draw randn_like(mean) made

    sd = tmod.state_dict()
    params = cv.posterior_encoder_from_torch(sd, "", POST_LAYERS)
    assert len(jax.tree_util.tree_leaves(params)) == len(sd)
    fmod = PosteriorEncoder(BINS, FLOW, HIDDEN, 5, DILATION_RATE, POST_LAYERS, gin_channels=gin)
    _check_tree(fmod, params, x, mask, g, noise=noise)
    z, m, logs = fmod.apply({"params": params}, x, mask, g, noise=noise)
    _assert_close(m, _from_torch(m_t), f"PosteriorEncoder mean {name}")
    _assert_close(logs, _from_torch(logs_t), f"PosteriorEncoder log_std {name}")
    _assert_close(z, _from_torch(z_t), f"PosteriorEncoder z {name}")
    assert np.all(np.asarray(z)[mask[..., 0] == 0] == 0)


@pytest.mark.parametrize("kernel", [5, 3])
@pytest.mark.parametrize("cond", CONDITIONS[1:], ids=[c[0] for c in CONDITIONS[1:]])
def test_coupling_layer_matches_vits(vits, kernel, cond):
    torch, VitsConfig, mv = vits
    name, gin, g_len = cond
    tmod = _randomize(torch, mv.VitsResidualCouplingLayer(_config(VitsConfig, kernel, gin)), 6)
    x, mask, g = _inputs(FLOW, gin, g_len, 7)
    xt, mt, gt = _to_torch(torch, x), _to_torch(torch, mask), _to_torch(torch, g)
    with torch.no_grad():
        fwd_t, logdet_t = tmod(xt, mt, gt)
        rev_t, _ = tmod(xt, mt, gt, reverse=True)

    sd = tmod.state_dict()
    params = cv.coupling_layer_from_torch(sd, "", PRIOR_LAYERS)
    assert len(jax.tree_util.tree_leaves(params)) == len(sd)
    fmod = ResidualCouplingLayer(FLOW, HIDDEN, kernel, DILATION_RATE, PRIOR_LAYERS,
                                 gin_channels=gin)
    _check_tree(fmod, params, x, mask, g)
    fwd, logdet = fmod.apply({"params": params}, x, mask, g)
    rev, logdet_rev = fmod.apply({"params": params}, x, mask, g, reverse=True)
    _assert_close(fwd, _from_torch(fwd_t), f"coupling forward k{kernel} {name}")
    _assert_close(rev, _from_torch(rev_t), f"coupling reverse k{kernel} {name}")
    np.testing.assert_array_equal(logdet, logdet_t.numpy())
    np.testing.assert_array_equal(logdet, np.zeros(B))  # mean-only: volume preserving
    np.testing.assert_array_equal(logdet_rev, np.zeros(B))
    assert np.max(np.abs(np.asarray(fwd) - x * np.concatenate(
        [np.ones((B, T, FLOW // 2)), np.repeat(mask, FLOW // 2, -1)], -1))) > 0.1  # non-trivial


@pytest.mark.parametrize("kernel", [5, 3])
@pytest.mark.parametrize("cond", CONDITIONS[1:], ids=[c[0] for c in CONDITIONS[1:]])
def test_coupling_block_matches_vits(vits, kernel, cond):
    torch, VitsConfig, mv = vits
    name, gin, g_len = cond
    tmod = _randomize(torch, mv.VitsResidualCouplingBlock(_config(VitsConfig, kernel, gin)), 8)
    x, mask, g = _inputs(FLOW, gin, g_len, 9)
    xt, mt, gt = _to_torch(torch, x), _to_torch(torch, mask), _to_torch(torch, g)
    with torch.no_grad():
        fwd_t = _from_torch(tmod(xt, mt, gt))
        rev_t = _from_torch(tmod(xt, mt, gt, reverse=True))

    sd = tmod.state_dict()
    params = cv.coupling_block_from_torch(sd, "", PRIOR_LAYERS, NUM_FLOWS)
    assert len(jax.tree_util.tree_leaves(params)) == len(sd)
    fmod = ResidualCouplingBlock(FLOW, HIDDEN, kernel, DILATION_RATE, PRIOR_LAYERS, NUM_FLOWS, gin)
    _check_tree(fmod, params, x, mask, g)
    fwd = np.asarray(fmod.apply({"params": params}, x, mask, g))
    rev = np.asarray(fmod.apply({"params": params}, x, mask, g, reverse=True))
    _assert_close(fwd, fwd_t, f"coupling block forward k{kernel} {name}")
    _assert_close(rev, rev_t, f"coupling block reverse k{kernel} {name}")
    # after 4 flips every channel has been a masked x1 half: all padding is zero
    assert np.all(fwd[mask[..., 0] == 0] == 0) and np.all(rev[mask[..., 0] == 0] == 0)
    # and the Flax block inverts itself
    back = np.asarray(fmod.apply({"params": params}, jnp.asarray(fwd), mask, g, reverse=True))
    _assert_close(back, x * mask, f"coupling block inverse(forward) k{kernel} {name}")


def _geneface_keys(state_dict, prefix):
    """VITS coupling-block keys -> GeneFace's layout with old-style weight-norm names."""
    out = {}
    for key, value in state_dict.items():
        idx, rest = re.match(r"flows\.(\d+)\.(.*)", key).groups()
        rest = (rest.replace("conv_pre", "pre").replace("conv_post", "post")
                .replace("wavenet", "enc")
                .replace("parametrizations.weight.original0", "weight_g")
                .replace("parametrizations.weight.original1", "weight_v"))
        out[f"{prefix}.flows.{2 * int(idx)}.{rest}"] = value
    return out


def test_geneface_key_layout_converts_like_vits(vits):
    torch, VitsConfig, mv = vits
    tmod = _randomize(torch, mv.VitsResidualCouplingBlock(_config(VitsConfig, 3, GIN)), 10)
    sd = tmod.state_dict()
    gsd = _geneface_keys(sd, "vae.prior_flow")
    assert "vae.prior_flow.flows.6.enc.in_layers.1.weight_g" in gsd
    from_vits = cv.coupling_block_from_torch(sd, "")
    from_geneface = cv.coupling_block_from_torch(gsd, "vae.prior_flow")
    jax.tree_util.tree_map(np.testing.assert_array_equal, from_geneface, from_vits)
    wn = cv.wavenet_from_torch(gsd, "vae.prior_flow.flows.2.enc")
    jax.tree_util.tree_map(np.testing.assert_array_equal, wn, from_vits["flows_1"]["enc"])

    with pytest.raises(CheckpointError, match="in_layers"):
        cv.wavenet_from_torch(gsd, "vae.prior_flow.flows.2.enc", num_layers=3)
    with pytest.raises(CheckpointError, match="coupling"):
        cv.coupling_block_from_torch(gsd, "vae.prior_flow", num_flows=5)
    del gsd["vae.prior_flow.flows.4.post.bias"]
    gsd.pop("vae.prior_flow.flows.4.post.weight")
    with pytest.raises(CheckpointError, match="flows.4.post.weight"):
        cv.coupling_block_from_torch(gsd, "vae.prior_flow")


# --------------------------------------------------------------------------- Flax-only properties

def _random_params(module, seed, *args, **kwargs):
    params = module.init(jax.random.PRNGKey(seed), *args, **kwargs)["params"]
    return _random_like(params, seed + 1)


def test_coupling_layer_starts_as_identity():
    x, mask, g = _inputs(FLOW, GIN, T, 12)
    layer = ResidualCouplingLayer(FLOW, HIDDEN, 3, 1, 2, gin_channels=GIN)
    params = layer.init(jax.random.PRNGKey(0), x, mask, g)["params"]
    assert not np.any(params["post"]["kernel"]) and not np.any(params["post"]["bias"])
    y, logdet = layer.apply({"params": params}, x * mask, mask, g)
    _assert_close(y, x * mask, "fresh coupling layer == identity", atol=0.0)
    np.testing.assert_array_equal(logdet, np.zeros(B))


def test_coupling_block_inverse_roundtrip():
    x, mask, g = _inputs(FLOW, GIN, T, 13)
    block = ResidualCouplingBlock(FLOW, HIDDEN, 3, 2, 3, num_flows=4, gin_channels=GIN)
    params = _random_params(block, 14, x, mask, g)
    z = block.apply({"params": params}, x * mask, mask, g)
    assert np.max(np.abs(np.asarray(z) - x * mask)) > 0.1
    back = block.apply({"params": params}, z, mask, g, reverse=True)
    _assert_close(back, x * mask, "block inverse(forward)")
    fwd_of_rev = block.apply({"params": params}, block.apply({"params": params}, x * mask, mask, g,
                                                             reverse=True), mask, g)
    _assert_close(fwd_of_rev, x * mask, "block forward(inverse)")


def test_affine_coupling_logdet_is_jacobian_logdet():
    """mean_only=False: logdet equals log|det dy/dx| (full mask, one sequence)."""
    rng = np.random.default_rng(15)
    x = rng.normal(size=(1, 5, 4)).astype(np.float32)
    mask = np.ones((1, 5, 1), np.float32)
    layer = ResidualCouplingLayer(4, 8, 3, 1, 2, mean_only=False)
    params = _random_params(layer, 16, x, mask)

    def flat(v):
        return layer.apply({"params": params}, v.reshape(x.shape), mask)[0].reshape(-1)

    jac = jax.jit(jax.jacfwd(flat))(jnp.asarray(x).reshape(-1))
    _, logabsdet = np.linalg.slogdet(np.asarray(jac, np.float64))
    y, logdet = layer.apply({"params": params}, x, mask)
    assert abs(float(logdet[0])) > 0.1
    np.testing.assert_allclose(float(logdet[0]), logabsdet, atol=1e-4)
    back, logdet_rev = layer.apply({"params": params}, y, mask, reverse=True)
    _assert_close(back, x, "affine coupling inverse(forward)")
    np.testing.assert_allclose(logdet_rev, -logdet, atol=1e-5)


def test_flip_and_dropout():
    x = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    y, logdet = Flip().apply({}, x)
    np.testing.assert_array_equal(y, x[..., ::-1])
    np.testing.assert_array_equal(logdet, np.zeros(2))

    xs, mask, _ = _inputs(HIDDEN, 0, None, 17)
    for before in (False, True):
        net = WaveNet(HIDDEN, 3, 1, 2, dropout=0.5, dropout_before_gate=before)
        params = _random_params(net, 18, xs, mask)
        a = net.apply({"params": params}, xs, mask)
        b = WaveNet(HIDDEN, 3, 1, 2).apply({"params": params}, xs, mask)
        _assert_close(a, b, "deterministic dropout == no dropout", atol=0.0)
        c = net.apply({"params": params}, xs, mask, deterministic=False,
                      rngs={"dropout": jax.random.PRNGKey(1)})
        assert np.max(np.abs(np.asarray(c) - np.asarray(a))) > 1e-3


def test_bad_shapes_raise_shape_error():
    x, mask, g = _inputs(HIDDEN, GIN, 1, 19)
    net = WaveNet(HIDDEN, 3, 2, 2, gin_channels=GIN)
    params = net.init(jax.random.PRNGKey(0), x, mask, g)
    bad_calls = [
        lambda: net.apply(params, x[..., :-1], mask, g),              # wrong channel count
        lambda: net.apply(params, x, mask[:, :-1], g),                # mask of the wrong length
        lambda: net.apply(params, x, mask[..., 0], g),                # mask [B, T]
        lambda: net.apply(params, x, mask, g[..., :-1]),              # wrong condition channels
        lambda: net.apply(params, x, mask, np.repeat(g, 2, axis=1)),  # condition length 2 != 1, T
        lambda: net.apply(params, x[0], mask[0], g[0]),               # unbatched
        lambda: WaveNet(HIDDEN, 3, 2, 2).init(jax.random.PRNGKey(0), x, mask, g),  # g, gin=0
        lambda: WaveNet(HIDDEN, 4, 1, 2).init(jax.random.PRNGKey(0), x, mask),     # even kernel
        lambda: ResidualCouplingLayer(7, HIDDEN, 3, 1, 2).init(
            jax.random.PRNGKey(0), np.zeros((B, T, 7), np.float32), mask),       # odd channels
        lambda: ResidualCouplingBlock(FLOW, HIDDEN, 3, 1, 2).init(
            jax.random.PRNGKey(0), x[..., :FLOW + 1], mask),                     # channels
        lambda: ResidualCouplingBlock(FLOW, HIDDEN, 3, 1, 2).init(
            jax.random.PRNGKey(0), x[..., :FLOW], mask[:2]),                     # mask batch
        lambda: PosteriorEncoder(HIDDEN, 4, 8, 3, 1, 2).init(
            jax.random.PRNGKey(0), x, mask, noise=np.zeros((B, T, 5), np.float32)),  # noise
        lambda: WNConv1d(4, 3).init(jax.random.PRNGKey(0), x[0]),               # rank 2
        lambda: WNConv1d(4, 7, dilation=4, padding=0).init(jax.random.PRNGKey(0), x),  # too short
    ]
    conv = WNConv1d(4, 3)
    conv_params = conv.init(jax.random.PRNGKey(0), x)
    bad_calls.append(lambda: conv.apply(conv_params, x[..., :5]))               # params' C_in
    for i, call in enumerate(bad_calls):
        with pytest.raises(ShapeError):
            call()
            pytest.fail(f"bad call {i} did not raise")
