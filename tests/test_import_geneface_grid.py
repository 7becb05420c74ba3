"""GeneFace's grid renderer (`lm3d_radnerf`, `lm3d_radnerf_torso`) into the grid head and
torso: the torch-ngp grid layouts (`render.grid_encoding`, `ngp_tiled` / `ngp_hash`), the
converters (`convert.geneface.GRID_HEAD` / `GRID_TORSO`) and the import.

No GeneFace code is used. `_Gf*` below are PyTorch modules laid out like GeneFace's
`modules/radnerfs/{radnerf,radnerf_torso}.py` (the same attribute names, so `state_dict()`
gives its keys and shapes) computing its forward passes, written for these tests; the grid
encoder is torch-ngp's CUDA kernel (`gridencoder.cu`) transcribed into plain PyTorch, one
level and one cell corner at a time.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

from geneface_jax.convert import geneface as gf
from geneface_jax.convert import geneface_import as gi
from geneface_jax.errors import CheckpointError
from geneface_jax.render import grid_encoding as ge
from geneface_jax.render import fields, grid_fields
from test_import_geneface import (_GfAttNet, _GfAudioNet, _assert_same_tree, _close,
                                  _gf_state_dict, _pe, _save_geneface)

HPARAMS = {"grid_type": "tiledgrid", "desired_resolution": 64, "log2_hashmap_size": 10,
           "bound": 1, "density_thresh": 10, "min_near": 0.05, "max_steps": 16,
           "grid_size": 8, "torso_shrink": 0.8, "cond_win_size": 1, "smo_win_size": 5,
           "with_att": True, "hidden_dim_ambient": 16, "hidden_dim_sigma": 16,
           "geo_feat_dim": 8, "hidden_dim_color": 16, "individual_embedding_num": 40}
PRIMES = (1, 2654435761, 805459861)


class _GfGridEncoder(nn.Module):
    """torch-ngp's `GridEncoder` (align_corners False, linear interpolation)."""

    def __init__(self, dim, base, log2_size, desired, gridtype, levels=16, features=2):
        super().__init__()
        self.dim, self.base, self.levels, self.gridtype = dim, base, levels, gridtype
        self.per_level_scale = np.exp2(np.log2(desired / base) / (levels - 1))
        offsets, offset = [], 0
        for i in range(levels):
            res = int(np.ceil(base * self.per_level_scale ** i))
            n = int(np.ceil(min(2 ** log2_size, (res + 1) ** dim) / 8) * 8)
            offsets.append(offset)
            offset += n
        offsets.append(offset)
        self.register_buffer("offsets", torch.from_numpy(np.array(offsets, np.int32)))
        self.embeddings = nn.Parameter(torch.empty(offset, features).uniform_(-1e-4, 1e-4))

    def forward(self, inputs, bound=1):
        x = (inputs + bound) / (2 * bound)
        s = np.float32(np.log2(self.per_level_scale))
        out = []
        for level in range(self.levels):
            off = int(self.offsets[level])
            size = int(self.offsets[level + 1]) - off
            scale = np.exp2(np.float32(level) * s) * np.float32(self.base) - np.float32(1)
            res = int(np.ceil(scale)) + 1
            pos = x * torch.tensor(scale) + 0.5
            cell = torch.floor(pos)
            frac, cell = pos - cell, cell.long()
            acc = torch.zeros(x.shape[0], self.embeddings.shape[1])
            for corner in range(2 ** self.dim):
                w = torch.ones(x.shape[0])
                local = []
                for d in range(self.dim):
                    bit = (corner >> d) & 1
                    w = w * (frac[:, d] if bit else 1 - frac[:, d])
                    local.append(cell[:, d] + bit)
                index, stride = torch.zeros(x.shape[0], dtype=torch.long), 1
                for d in range(self.dim):
                    if stride > size:
                        break
                    index = (index + local[d] * stride) & 0xFFFFFFFF
                    stride *= res + 1
                if self.gridtype == "hash" and stride > size:
                    index = torch.zeros_like(index)
                    for d in range(self.dim):
                        index = index ^ ((local[d] * PRIMES[d]) & 0xFFFFFFFF)
                acc = acc + w[:, None] * self.embeddings[off + index % size]
            out.append(acc)
        out = torch.cat(out, -1)
        inside = ((x >= 0) & (x <= 1)).all(-1, keepdim=True)
        return torch.where(inside, out, torch.zeros_like(out))


class _GfMLP(nn.Module):
    def __init__(self, dim_in, dim_out, hidden, layers):
        super().__init__()
        self.net = nn.ModuleList(nn.Linear(dim_in if i == 0 else hidden,
                                           dim_out if i == layers - 1 else hidden, bias=False)
                                 for i in range(layers))

    def forward(self, x):
        for i, layer in enumerate(self.net):
            x = layer(x)
            if i < len(self.net) - 1:
                x = torch.relu(x)
        return x


def _sh(d):
    """Degree-4 real spherical harmonics (torch-ngp's SHEncoder), `[N, 3] -> [N, 16]`."""
    x, y, z = d[:, 0], d[:, 1], d[:, 2]
    return torch.stack([
        torch.full_like(x, 0.28209479177387814), -0.48860251190291987 * y,
        0.48860251190291987 * z, -0.48860251190291987 * x, 1.0925484305920792 * x * y,
        -1.0925484305920792 * y * z, 0.94617469575755997 * z * z - 0.31539156525251999,
        -1.0925484305920792 * x * z, 0.54627421529603959 * (x * x - y * y),
        0.59004358992664352 * y * (-3.0 * x * x + y * y), 2.8906114426405538 * x * y * z,
        0.45704579946446572 * y * (1.0 - 5.0 * z * z),
        0.3731763325901154 * z * (5.0 * z * z - 3.0),
        0.45704579946446572 * x * (1.0 - 5.0 * z * z), 1.4453057213202769 * z * (x * x - y * y),
        0.59004358992664352 * x * (-x * x + 3.0 * y * y)], -1)


class _GfRADNeRF(nn.Module):
    """GeneFace's `RADNeRF` (cond_type idexp_lm3d_normalized, cond_win_size 1, with_att)."""

    def __init__(self, h):
        super().__init__()
        b, g, n = h["bound"], h["grid_size"], h["individual_embedding_num"]
        self.bound = b
        self.register_buffer("aabb_train", torch.tensor([-b, -b / 2, -b, b, b / 2, b]))
        self.register_buffer("aabb_infer", torch.tensor([-b, -b / 2, -b, b, b / 2, b]))
        self.individual_embeddings = nn.Parameter(torch.randn(n, 4) * 0.1)
        self.register_buffer("density_grid", torch.zeros(1, g ** 3))
        self.register_buffer("density_bitfield", torch.zeros(g ** 3 // 8, dtype=torch.uint8))
        self.register_buffer("step_counter", torch.zeros(16, 2, dtype=torch.int32))
        self.cond_prenet = _GfAudioNet(204, (32, 32, 64, 64), 64, 64)
        self.cond_att_net = _GfAttNet(64, (16, 8, 4, 2), h["smo_win_size"])
        grid = "tiled" if h["grid_type"] == "tiledgrid" else "hash"
        self.position_embedder = _GfGridEncoder(3, 16, h["log2_hashmap_size"],
                                                h["desired_resolution"] * b, grid)
        self.ambient_net = _GfMLP(32 + 64, 2, h["hidden_dim_ambient"], 3)
        self.ambient_embedder = _GfGridEncoder(2, 16, h["log2_hashmap_size"],
                                               h["desired_resolution"], grid)
        self.sigma_net = _GfMLP(64, 1 + h["geo_feat_dim"], h["hidden_dim_sigma"], 3)
        self.color_net = _GfMLP(16 + h["geo_feat_dim"] + 4, 3, h["hidden_dim_color"], 2)

    def cal_cond_feat(self, cond):                   # [W, 1, 204] -> [64]
        return self.cond_att_net(self.cond_prenet(cond))

    def forward(self, position, direction, cond_feat, code):
        cond_feat = cond_feat.expand(position.shape[0], -1)
        pos = self.position_embedder(position, bound=self.bound)
        ambient = torch.tanh(self.ambient_net(torch.cat([pos, cond_feat], 1)))
        h = self.sigma_net(torch.cat([pos, self.ambient_embedder(ambient, bound=1)], -1))
        sigma = torch.exp(h[..., 0])
        color = torch.sigmoid(self.color_net(torch.cat(
            [_sh(direction), h[..., 1:], code.expand(position.shape[0], -1)], -1)))
        return sigma, color, ambient


class _GfRADNeRFTorso(_GfRADNeRF):
    """GeneFace's `RADNeRFTorso` (torso_head_aware false): the head plus the 2-D torso."""

    def __init__(self, h):
        super().__init__(h)
        self.register_buffer("density_grid_torso", torch.zeros(h["grid_size"] ** 2))
        self.torso_individual_codes = nn.Parameter(
            torch.randn(h["individual_embedding_num"], 8) * 0.1)
        self.torso_embedder = _GfGridEncoder(2, 16, 16, 2048, "tiled")
        self.torso_deform_net = _GfMLP(42 + 54 + 8, 2, 64, 3)
        self.torso_canonicial_net = _GfMLP(32 + 42 + 54 + 8, 4, 32, 3)
        self.shrink = h["torso_shrink"]

    def forward_torso(self, x, poses, c):            # x [N, 2], poses [1, 6], c [1, 8]
        x = x * self.shrink
        h = torch.cat([_pe(x, 10), _pe(poses, 4).expand(x.shape[0], -1),
                       c.expand(x.shape[0], -1)], -1)
        dx = self.torso_deform_net(h)
        x = self.torso_embedder((x + dx).clamp(-1, 1), bound=1)
        h = self.torso_canonicial_net(torch.cat([x, h], -1))
        return torch.sigmoid(h[..., :1]), torch.sigmoid(h[..., 1:]), dx


def _randomize(module, seed, thresh=10.0):
    """Random weights (grid tables +-0.5, so every level matters), a random occupancy
    grid and its bitfield as torch-ngp packs it."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if name.endswith("embeddings") and t.ndim == 2:
                t.copy_(torch.rand(t.shape, generator=g) - 0.5)
            elif t.dtype.is_floating_point and not name.startswith("aabb"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.3)
        dens = torch.rand(module.density_grid.shape, generator=g) * 2 * thresh
        dens[0, :5] = -1.0                              # cells no camera saw
        module.density_grid.copy_(dens)
        module.density_bitfield.copy_(torch.from_numpy(np.packbits(
            (dens[0] > thresh).numpy(), bitorder="little")))
    return module.eval()


def _yaml(h):
    return "".join(f"{k}: {str(v).lower() if isinstance(v, bool) else v}\n"
                   for k, v in h.items())


def _xyz_euler(r):
    """pytorch3d's matrix_to_euler_angles(convention="XYZ")."""
    return np.stack([np.arctan2(-r[..., 1, 2], r[..., 2, 2]), np.arcsin(r[..., 0, 2]),
                     np.arctan2(-r[..., 0, 1], r[..., 0, 0])], -1)


# --------------------------------------------------------------------------- the layouts

@pytest.mark.parametrize("gridtype,dim,log2", [("tiled", 3, 10), ("tiled", 2, 8),
                                               ("hash", 3, 10), ("hash", 2, 8)])
def test_ngp_layouts_compute_torch_ngps_grid_encoding(gridtype, dim, log2):
    """Table rows and offsets as torch-ngp allocates them, and the same features for points
    all over the unit cube and outside it (zeros)."""
    torch.manual_seed(0)
    ref = _GfGridEncoder(dim, 16, log2, 64, gridtype)
    with torch.no_grad():
        ref.embeddings.uniform_(-1, 1)
    spec = ge.GridSpec(dim, 16, 2, 16, 64, log2, "ngp_" + gridtype)
    assert spec.offsets + (spec.rows,) == tuple(ref.offsets.tolist())
    rng = np.random.default_rng(1)
    x = rng.uniform(-1.05, 1.05, (400, dim)).astype(np.float32)
    x[:4] = [[-1.0] * dim, [1.0] * dim, [0.0] * dim, [0.999] * dim]
    with torch.no_grad():
        want = ref(torch.from_numpy(x)).numpy()
    got = jax.jit(lambda t, p: ge.encode((p + 1.0) / 2.0, t, spec))(
        jnp.asarray(ref.embeddings.detach().numpy()), x)
    outside = (np.abs(x) > 1).any(1)
    assert outside.sum() > 20 and np.all(np.asarray(got)[outside] == 0)
    _close(f"{gridtype} {dim}-d features", got, want, rtol=1e-5)


def test_tiled_fine_levels_drop_the_axes_past_the_table():
    """torch-ngp's quirk, kept: a tiled 3-D level whose (N + 1)^2 exceeds the table reads
    the same row for points that differ only in z."""
    spec = ge.GridSpec(3, 16, 2, 16, 64, 10, "ngp_tiled")
    table = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (spec.rows, 2)), jnp.float32)
    a = ge.encode(jnp.asarray([[0.3, 0.6, 0.2]]), table, spec).reshape(16, 2)
    b = ge.encode(jnp.asarray([[0.3, 0.6, 0.7]]), table, spec).reshape(16, 2)
    fine = [(r + 1) ** 2 > s for r, s in zip(spec.resolutions, spec.sizes)]
    assert 0 < sum(fine) < 16
    np.testing.assert_allclose(np.asarray(a)[fine], np.asarray(b)[fine], atol=1e-6)
    assert not np.allclose(np.asarray(a)[~np.asarray(fine)], np.asarray(b)[~np.asarray(fine)])


# --------------------------------------------------------------------------- the import

def _grid_checkpoints(tmp_path):
    head = _randomize(_GfRADNeRF(HPARAMS), 3)
    torso = _randomize(_GfRADNeRFTorso(HPARAMS), 4)
    torso.load_state_dict(head.state_dict(), strict=False)   # GeneFace's torso holds its head
    lpips = {"criterion_lpips.net.slice1.0.weight": np.ones((4, 3, 3, 3), np.float32)}
    _save_geneface(tmp_path / "gf_head", {"model": _gf_state_dict(head), "criterion_lpips":
                                          {"net.slice1.0.weight": lpips[next(iter(lpips))]}},
                   step=250000, zip_format=True)
    (tmp_path / "gf_head" / "config.yaml").write_text(_yaml(HPARAMS))
    _save_geneface(tmp_path / "gf_torso", {"model": _gf_state_dict(torso)}, step=200000)
    (tmp_path / "gf_torso" / "config.yaml").write_text(_yaml(HPARAMS))
    rng = np.random.default_rng(3)
    mean = rng.standard_normal((1, 68, 3)).astype(np.float32)
    std = rng.uniform(0.5, 2.0, (1, 68, 3)).astype(np.float32)
    np.savez(tmp_path / "stats.npz", idexp_lm3d_mean=mean, idexp_lm3d_std=std)
    return head, torso, mean, std


def test_grid_head_and_torso_import_and_compute_genefaces_fields(tmp_path):
    from geneface_jax.render import frames
    head, torso, mean, std = _grid_checkpoints(tmp_path)
    h_sum = gi.import_geneface(tmp_path / "gf_head", "head", tmp_path / "head",
                               lm3d_stats=tmp_path / "stats.npz")
    gi.import_geneface(tmp_path / "gf_torso", "torso", tmp_path / "torso",
                       head=tmp_path / "head")
    hcfg, hvars, hrun, norm = frames.load_nerf(tmp_path / "head", frames.HEAD)
    tcfg, tvars, trun, _ = frames.load_nerf(tmp_path / "torso", frames.TORSO)
    assert hrun["renderer"] == trun["renderer"] == "grid" and hrun["trained_steps"] == 250000
    assert (hcfg.grid_layout, hcfg.finest, hcfg.log2_table, hcfg.grid_size) == (
        "ngp_tiled", 64, 10, 8)
    assert (hcfg.eye_feature, hcfg.inference_code, tcfg.torso_inputs) == (False, 0, "radnerf")
    assert hcfg.sigma_thresh == pytest.approx(10.0, rel=1e-5)   # GeneFace's density_thresh
    assert any("criterion_lpips" in u for u in h_sum["unused_keys"])
    # parameters and occupancy bit for bit (but the folded first layer)
    raw = gf.convert(gf.GRID_HEAD, {f"model.{k}": v for k, v in _gf_state_dict(head).items()},
                     hcfg, ("model.",))
    raw["params"] = gi.fold_landmark_stats(raw["params"], mean[0], std[0])
    _assert_same_tree(hvars, raw)
    dens = hvars["occupancy"]["density"]
    assert dens.shape == (8, 8, 8) and dens.min() == 0.0      # unseen cells (-1) are empty
    np.testing.assert_array_equal(hvars["occupancy"]["bits"].reshape(-1).sum(),
                                  int((head.density_grid[0] > 10).sum()))
    # the mapping back gives GeneFace's tensors (the unfolded params)
    back = gf.to_state_dict(gf.GRID_HEAD, gf.convert(gf.GRID_HEAD, {
        f"model.{k}": v for k, v in _gf_state_dict(head).items()}, hcfg, ("model.",)),
        hcfg, ("model.",))
    sd = _gf_state_dict(head)
    sd["density_grid"] = np.maximum(sd["density_grid"], 0.0)
    for k, v in back.items():
        key = k[len("model."):]
        if "encoder_conv" in key and key.endswith("weight"):
            np.testing.assert_array_equal(v[:, :, 1], sd[key][:, :, 1])   # centre taps
        else:
            np.testing.assert_array_equal(v, sd[key], err_msg=key)
    # the condition: as test_import_geneface's head test, GeneFace's smoothed encoder
    rng = np.random.default_rng(5)
    idexp = mean + std * rng.standard_normal((5, 68, 3)).astype(np.float32)
    model = grid_fields.GridHeadNeRF(hcfg)
    cond = jax.jit(lambda p, w: model.apply({"params": p}, w, True,
                                            method=grid_fields.GridHeadNeRF.condition))(
        hvars["params"], norm(idexp / 10.0)[None])[0]
    with torch.no_grad():
        want = head.cal_cond_feat(torch.from_numpy(((idexp - mean) / std).reshape(5, 1, 204)))
    _close("condition", cond, want.numpy())
    # the head field
    n = 300
    pts = rng.uniform(-0.9, 0.9, (n, 3)).astype(np.float32)
    dirs = rng.standard_normal((n, 3)).astype(np.float32)
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    code = model.apply(hvars, method=grid_fields.GridHeadNeRF.mean_code)  # inference code
    sigma, rgb, amb = jax.jit(lambda p, x, d, c, e: model.apply(
        {"params": p}, x, d, jnp.broadcast_to(c, (n, c.shape[0])),
        jnp.broadcast_to(e, (n, e.shape[0])), method=grid_fields.GridHeadNeRF.field))(
        hvars["params"], pts, dirs, cond, code)
    with torch.no_grad():
        ws, wrgb, wamb = head(torch.from_numpy(pts), torch.from_numpy(dirs), want[None],
                              head.individual_embeddings[0:1])   # GeneFace's test-time code
    _close("ambient coordinates", amb, wamb.numpy())
    _close("density", np.log(np.asarray(sigma)), np.log(ws.numpy()))
    _close("colour", rgb, wrgb.numpy())
    # the torso: pixels of a 6x5 image, a head pose in this project's camera convention
    tmodel = grid_fields.GridTorso(tcfg)
    rows, cols = np.divmod(np.arange(30), 5)
    uv = grid_fields.pixel_uv(rows, cols, 6, 5, "radnerf")
    a, b, c = 0.2, -0.3, 0.1
    rot = np.asarray(fields.rotation_from_euler(jnp.asarray([a, b, c])))
    pose = np.eye(4, dtype=np.float32)
    pose[:3, :3], pose[:3, 3] = rot, [0.1, -0.2, 3.0]
    vec = grid_fields.torso_pose_vector(jnp.asarray(pose), tcfg)
    alpha, trgb, dx = jax.jit(tmodel.apply)({"params": tvars["params"]}, uv, vec)
    with torch.no_grad():
        ii, jj = torch.meshgrid(torch.arange(6) / 5 * 2 - 1, torch.arange(5) / 4 * 2 - 1,
                                indexing="ij")
        coords = torch.stack([ii.reshape(-1), jj.reshape(-1)], -1)   # get_bg_coords
        ngp = pose[:3, :3] * np.array([1.0, -1.0, -1.0], np.float32)  # RAD-NeRF's camera
        p6 = torch.from_numpy(np.concatenate([_xyz_euler(ngp), pose[:3, 3]])[None].astype(
            np.float32))
        wa, wc, wdx = torso.forward_torso(coords, p6, torso.torso_individual_codes[0:1])
    _close("torso pixel positions", uv, coords.numpy(), rtol=1e-6)
    _close("torso deformation", dx, wdx.numpy())
    # the torso grid's finest level has 2048 vertices a side: a rounding difference of
    # 1e-7 in the deformed position moves the read by 2e-4 of a cell
    _close("torso alpha", alpha, wa[:, 0].numpy(), rtol=1e-3)
    _close("torso colour", trgb, wc.numpy(), rtol=1e-3)


def test_grid_import_refusals(tmp_path):
    head, torso, *_ = _grid_checkpoints(tmp_path)
    gf_head = tmp_path / "gf_head"
    # an audio-driven RAD-NeRF (DeepSpeech condition) is named as such
    sd = {f"model.{k}": v for k, v in _gf_state_dict(head).items()}
    sd["model.cond_prenet.encoder_conv.0.weight"] = np.zeros((32, 29, 3), np.float32)
    with pytest.raises(CheckpointError, match="audio-driven RAD-NeRF"):
        gf.GRID_HEAD.config_from(sd, "model.", HPARAMS)
    with pytest.raises(CheckpointError, match="smoothstep"):
        gf.GRID_HEAD.config_from({f"model.{k}": v for k, v in _gf_state_dict(head).items()},
                                 "model.", dict(HPARAMS, grid_interpolation_type="smoothstep"))
    # a table allocated for another resolution
    bad = dict(HPARAMS, desired_resolution=128)
    (gf_head / "config.yaml").write_text(_yaml(bad))
    with pytest.raises(CheckpointError, match=r"ambient_embedder\.offsets. = \[0, 296, 664"):
        gi.import_geneface(gf_head, "head", tmp_path / "x", lm3d_stats=tmp_path / "stats.npz")
    (gf_head / "config.yaml").write_text(_yaml(HPARAMS))
    gi.import_geneface(gf_head, "head", tmp_path / "head", lm3d_stats=tmp_path / "stats.npz")
    # a head-aware torso
    sd = _gf_state_dict(torso)
    sd["head_color_weights_encoder.0.weight"] = np.zeros((16, 4), np.float32)
    _save_geneface(tmp_path / "gf_aware", {"model": sd})
    with pytest.raises(CheckpointError, match="head-aware"):
        gi.import_geneface(tmp_path / "gf_aware", "torso", tmp_path / "y",
                           head=tmp_path / "head")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_radnerf_pose_casts_radnerfs_rays():
    """A GeneFace c2w through `radnerf_pose` casts, with this project's pixel-centre rays,
    the rays RAD-NeRF's `get_rays` casts from `nerf_matrix_to_ngp(c2w)`."""
    from geneface_jax.render import rays
    rng = np.random.default_rng(2)
    rot = np.asarray(fields.rotation_from_euler(jnp.asarray(rng.uniform(-0.4, 0.4, 3))))
    c2w = np.eye(4)
    c2w[:3, :3], c2w[:3, 3] = rot, rng.uniform(-0.2, 0.2, 3) + [0, 0, 1.0]
    scale, offset = 4.0, np.array([0.0, 0.1, -0.2])
    ngp = np.array([[c2w[1, 0], -c2w[1, 1], -c2w[1, 2], c2w[1, 3] * scale + offset[0]],
                    [c2w[2, 0], -c2w[2, 1], -c2w[2, 2], c2w[2, 3] * scale + offset[1]],
                    [c2w[0, 0], -c2w[0, 1], -c2w[0, 2], c2w[0, 3] * scale + offset[2]],
                    [0, 0, 0, 1]])
    h, w, k = 6, 5, np.array([7.0, 7.5, 2.4, 3.1], np.float32)
    jj, ii = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")  # get_rays
    d = np.stack([(ii - k[2]) / k[0], (jj - k[3]) / k[1], np.ones_like(ii)], -1)
    want = d / np.linalg.norm(d, axis=-1, keepdims=True) @ ngp[:3, :3].T
    o, got = rays.pixel_rays(jnp.asarray(gi.radnerf_pose(c2w, scale, offset)), k, h, w)
    got = np.asarray(got) / np.linalg.norm(np.asarray(got), axis=-1, keepdims=True)
    _close("ray directions", got, want, rtol=1e-5)
    _close("ray origins", np.asarray(o)[0, 0], ngp[:3, 3], rtol=1e-6)


@pytest.mark.parametrize("stage", ["grid_head", "grid_torso"])
def test_genefaces_radnerf_layout_is_the_converters_table(stage):
    """RADNeRF / RADNeRFTorso at egs/egs_bases/radnerf/base.yaml's sizes: every key and
    shape of their state_dicts is an entry of the converter or deliberately unused, and
    every entry is one of their keys."""
    paper = dict(HPARAMS, desired_resolution=2048, log2_hashmap_size=16, grid_size=128,
                 hidden_dim_ambient=128, hidden_dim_sigma=128, geo_feat_dim=128,
                 hidden_dim_color=128, individual_embedding_num=13000)
    module = (_GfRADNeRF if stage == "grid_head" else _GfRADNeRFTorso)(paper)
    sd = {f"model.{k}": tuple(v.shape) for k, v in module.state_dict().items()}
    sd.update({"criterion_lpips.net.slice1.0.weight": (64, 3, 11, 11)})
    expected = {e.key: e.shape for e in gf.entries(gf.STAGES[stage],
                                                   gf.paper_configs()[stage], ("model.",))}
    unused = [p for p, _ in gf.STAGES[stage].unused]
    import re
    got = {k: s for k, s in sd.items() if not any(re.search(p, k) for p in unused)}
    assert got == expected


def test_imported_grid_nerfs_render_frames_with_genefaces_torso(tmp_path):
    """The imported head + torso through `FrameRenderer` (the renderer eval_nerf and the
    pipeline use): where no head ray meets an occupied cell, the frame is GeneFace's torso
    over the background at that pixel and pose (pixel positions, pose vector and code row
    0 plumbed through the render path)."""
    import types

    from geneface_jax.render import frames
    from geneface_jax.train import make_mesh
    _, torso, mean, std = _grid_checkpoints(tmp_path)
    gi.import_geneface(tmp_path / "gf_head", "head", tmp_path / "head",
                       lm3d_stats=tmp_path / "stats.npz")
    gi.import_geneface(tmp_path / "gf_torso", "torso", tmp_path / "torso",
                       head=tmp_path / "head")
    hcfg, hvars, _, norm = frames.load_nerf(tmp_path / "head", frames.HEAD)
    tcfg, tvars, _, _ = frames.load_nerf(tmp_path / "torso", frames.TORSO)
    g = hcfg.grid_size                      # only a central ball of the head is occupied
    c = (np.arange(g) + 0.5) / g * 2 - 1
    ball = ((c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None] ** 2) < 0.2)
    hvars = dict(hvars, occupancy=dict(hvars["occupancy"], bits=ball.astype(np.float32)))
    h, w = 8, 7
    bg = np.full((h, w, 3), 0.25, np.float32)
    meta = types.SimpleNamespace(intrinsics=np.array([9.0, 9.0, 3.5, 4.0], np.float32),
                                 height=h, width=w, background=bg)
    renderer = frames.FrameRenderer(hcfg, hvars, meta, torso_cfg=tcfg, torso_vars=tvars,
                                    mesh=make_mesh(jax.devices()[:1]), chunk=64)
    c2w = np.eye(4)
    c2w[:3, 3] = [0.0, 0.0, 0.6]            # a GeneFace camera 0.6 in front of the head
    pose = gi.radnerf_pose(c2w)
    window = norm(np.repeat((mean / 10.0), 5, axis=0))
    out = renderer.render(pose, window, pose)
    assert out["rgb"].shape == (h, w, 3) and np.isfinite(out["rgb"]).all()
    empty = out["head_acc"] == 0
    assert empty.any() and (~empty).any()
    rows, cols = np.nonzero(empty)
    with torch.no_grad():
        coords = torch.from_numpy(np.stack([rows / (h - 1) * 2 - 1, cols / (w - 1) * 2 - 1],
                                            -1).astype(np.float32))
        ngp = pose[:3, :3] * np.array([1.0, -1.0, -1.0], np.float32)
        p6 = torch.from_numpy(np.concatenate([_xyz_euler(ngp), pose[:3, 3]])[None].astype(
            np.float32))
        a, c, _ = torso.forward_torso(coords, p6, torso.torso_individual_codes[0:1])
    want = a.numpy() * c.numpy() + (1 - a.numpy()) * 0.25
    _close("torso pixels of the frame", out["rgb"][empty], want, rtol=1e-3)
