"""GeneFace's grid head (RAD-NeRF `lm3d_radnerf`, the library's `grid_fields.GridHeadNeRF`)
in plain PyTorch: multi-resolution grids looked up by index arithmetic and
`index_select` (no CUDA extension), the ambient 2-D grid, bias-free MLPs, degree-4
spherical harmonics, occupancy-grid sampling (inverse CDF of the occupied bins, K samples
per ray, equal deltas), compositing, and the occupancy update. The training step and
render around them: `grid_runner.py`.

Written as a PyTorch user writes it: every level's corner rows and weights from per-axis
`[N, L, 2]` terms broadcast over the corners (int64 hashes keep the low 32 bits the uint32
hash needs), one `index_select` of all `L 2^d` corners, `torch.searchsorted` for the
inverse CDF under `torch.no_grad()`, a custom `autograd.Function` for RAD-NeRF's truncated
exp, `F.max_pool3d` for the occupancy dilation, `torch.optim.Adam(fused=True)` with three
parameter groups. Parameter names follow the library's Flax modules (`load_flax`).
"""

import torch
from torch import nn
import torch.nn.functional as F

from experiments.bench.torch_reference.nerf import AttentionSmoother, LandmarkEncoder

PRIMES = (1, 2654435761, 805459861)
# torch.compile's inductor options: reductions of fewer than 9 terms (the 8 corners of the
# 3-D interpolation) unrolled into element-wise code. With the default (fewer than 8),
# inductor lowers that reduction with an OpenMP region inside its loops over points and
# levels, ~1M regions per call: 10-70x slower than eager with 2 threads (no effect with 1).
COMPILE_OPTIONS = {"unroll_reductions_threshold": 9}


class TruncExp(torch.autograd.Function):
    """exp(x) whose gradient is exp(clamp(x, -15, 15)) (RAD-NeRF's density activation)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.exp(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * torch.exp(x.clamp(-15.0, 15.0))


class GridEncoder(nn.Module):
    """A multi-resolution grid (`spec`: a `grid_encoding.GridSpec`): `table [rows, F]`;
    points `[N, d]` in [0, 1]^d -> features `[N, L F]`, d-linear interpolation of each
    level's cell corners.

    Per axis i the two corner coordinates' row terms (`v_i s_i` dense, `v_i pi_i` hashed)
    and weights (`1 - w_i`, `w_i`) are `[N, L, 2]`; the `2^d` corners are their broadcast
    sums / xors / products (corner c has bit i = its offset along axis i, as in the
    library), one `index_select` reads every corner row (its backward is one
    `index_add_`; `F.embedding`'s CPU backward is ~6x slower here), and an einsum
    interpolates (see `COMPILE_OPTIONS` for its compiled form)."""

    def __init__(self, spec):
        super().__init__()
        self.dims, self.out_dim, self.features = spec.dims, spec.output_dim, spec.features
        self.table = nn.Parameter(torch.zeros(spec.rows, spec.features))
        # levels whose vertices fit are dense, the finer ones hashed (always a suffix)
        self.num_dense = spec.hashed.index(True) if any(spec.hashed) else spec.levels
        nd = self.num_dense
        coef = [[r ** i for i in range(spec.dims)] for r in spec.resolutions[:nd]]
        coef += [list(PRIMES[:spec.dims])] * (spec.levels - nd)   # dense strides | primes
        for name, value in (("res", torch.tensor(spec.resolutions, dtype=torch.float32)),
                            ("coef", torch.tensor(coef)[:, :, None]),         # [L, d, 1]
                            ("mask", torch.tensor(spec.sizes[nd:], dtype=torch.long)[:, None] - 1),
                            ("offsets", torch.tensor(spec.offsets)[:, None]),
                            ("bit", torch.tensor([0, 1]))):
            self.register_buffer(name, value, persistent=False)

    def _corners(self, per_axis, combine):
        """`[N, L, d, 2]` per-axis terms -> `[N, L, 2^d]` over corners (bit i = axis i)."""
        out = per_axis[:, :, -1]
        for i in range(self.dims - 2, -1, -1):
            out = combine(out[..., :, None], per_axis[:, :, i, None, :]).flatten(-2)
        return out

    def forward(self, x):
        n = x.shape[0]
        p = x.clamp(0.0, 1.0)[:, None, :] * (self.res - 1.0)[:, None]     # [N, L, d]
        v0 = torch.minimum(p.floor(), (self.res - 2.0)[:, None]).clamp_min(0.0)
        w = p - v0
        terms = (v0.long()[..., None] + self.bit) * self.coef              # [N, L, d, 2]
        nd = self.num_dense
        dense = self._corners(terms[:, :nd], torch.add)
        hashed = self._corners(terms[:, nd:], torch.bitwise_xor) & self.mask
        rows = torch.cat([dense, hashed], 1) + self.offsets                  # [N, L, C]
        wc = self._corners(torch.stack([1.0 - w, w], -1), torch.mul)         # [N, L, C]
        feats = self.table.index_select(0, rows.reshape(-1)).view(*rows.shape, -1)
        return torch.einsum("nlc,nlcf->nlf", wc, feats).reshape(n, self.out_dim)


class MLP(nn.Module):
    """RAD-NeRF's MLP: bias-free Linear layers (`net`), ReLU between. The input is a list
    of parts `(tensor, shared)`, concatenated in that order in the first layer's columns:
    a per-sample part is `[N, k]`, a shared one `[N / group, k]` (one row per ray), which
    the first layer multiplies once per ray and broadcasts (the library's
    `GroupedDense`; the same as `Linear` on the expanded concatenation)."""

    def __init__(self, d_in, d_out, hidden, layers):
        super().__init__()
        dims = [d_in] + [hidden] * (layers - 1) + [d_out]
        self.net = nn.ModuleList(nn.Linear(a, b, bias=False) for a, b in zip(dims, dims[1:]))

    def forward(self, parts, group=1):
        w0, start = self.net[0].weight, 0
        n = next(p.shape[0] for p, shared in parts if not shared)
        x = None
        for p, shared in parts:
            y = p @ w0[:, start:start + p.shape[-1]].t()
            start += p.shape[-1]
            y = y[:, None, :] if shared else y.view(n // group, group, -1)
            x = y if x is None else x + y
        x = x.reshape(n, -1)
        for layer in self.net[1:]:
            x = layer(F.relu(x))
        return x


def spherical_harmonics(d):
    """Real SH of bands 0..3 of unit directions `[N, 3]` -> `[N, 16]`."""
    x, y, z = d.unbind(-1)
    xx, yy, zz = x * x, y * y, z * z
    xy, yz, xz = x * y, y * z, x * z
    return torch.stack([
        torch.full_like(x, 0.28209479177387814),
        -0.48860251190291987 * y, 0.48860251190291987 * z, -0.48860251190291987 * x,
        1.0925484305920792 * xy, -1.0925484305920792 * yz,
        0.94617469575755997 * zz - 0.31539156525251999, -1.0925484305920792 * xz,
        0.54627421529603959 * (xx - yy),
        0.59004358992664352 * y * (-3.0 * xx + yy), 2.8906114426405538 * xy * z,
        0.45704579946446572 * y * (1.0 - 5.0 * zz), 0.3731763325901154 * z * (5.0 * zz - 3.0),
        0.45704579946446572 * x * (1.0 - 5.0 * zz), 1.4453057213202769 * z * (xx - yy),
        0.59004358992664352 * x * (-xx + 3.0 * yy)], -1)


def bin_occupancy(origins, directions, bits, cfg):
    """(t0 [R], bin length h [R], occupied [R, M] 0/1): the rays' stretch inside the box
    (and [near, far]) cut into M equal bins, whose midpoints read `bits [G, G, G]`."""
    m, g = cfg.num_bins, cfg.grid_size
    center = torch.tensor(cfg.center, dtype=torch.float32)
    inv = 1.0 / torch.where(directions.abs() < 1e-9, torch.full_like(directions, 1e-9),
                            directions)
    ta = (center - cfg.bound - origins) * inv
    tb = (center + cfg.bound - origins) * inv
    t0 = torch.minimum(ta, tb).amax(-1).clamp_min(cfg.near)
    t1 = torch.maximum(ta, tb).amin(-1).clamp_max(cfg.far)
    length = (t1 - t0).clamp_min(0.0)
    h = length / m
    mids = t0[:, None] + (torch.arange(m, dtype=torch.float32) + 0.5) * h[:, None]
    pts = origins[:, None, :] + directions[:, None, :] * mids[..., None]
    cell = ((pts - center) / (2 * cfg.bound) + 0.5) * g
    v = cell.floor().clamp(0, g - 1).long()
    occ = bits.reshape(-1)[(v[..., 0] * g + v[..., 1]) * g + v[..., 2]] * (length > 0)[:, None]
    return t0, h, occ


def occupancy_samples(origins, directions, bits, cfg, u=None):
    """(t [R, K], delta [R], inside [R, K]): K samples per ray by the inverse CDF of the
    occupied ones of the ray's M bins (`bin_occupancy`); `u [R, K]` jitter (None: 0.5)."""
    r, m, k = origins.shape[0], cfg.num_bins, cfg.num_samples
    t0, h, occ = bin_occupancy(origins, directions, bits, cfg)
    cdf = torch.cumsum(occ + 1e-6, -1)
    cdf = torch.cat([torch.zeros(r, 1), cdf / cdf[:, -1:]], -1)                # [R, M + 1]
    q = (torch.arange(k, dtype=torch.float32) + (0.5 if u is None else u)) / k
    q = q.expand(r, k).contiguous()
    idx = (torch.searchsorted(cdf, q, right=True) - 1).clamp(0, m - 1)
    lo, hi = cdf.gather(-1, idx), cdf.gather(-1, idx + 1)
    frac = ((q - lo) / (hi - lo).clamp_min(1e-12)).clamp(0.0, 1.0)
    t = t0[:, None] + (idx + frac) * h[:, None]
    return t, occ.sum(-1) * h / k, occ.gather(-1, idx)


def composite_equal(sigma, rgb, delta, dir_norm, background):
    """(weights [R, K], acc [R], rgb over the background [R, 3]) of samples that each stand
    for `delta` of the ray."""
    tau = sigma * (delta * dir_norm)[:, None]
    alpha = 1.0 - torch.exp(-tau)
    cum = torch.cumsum(tau, -1)
    trans = torch.exp(-torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], -1))
    w = alpha * trans
    acc = w.sum(-1)
    return w, acc, (w[..., None] * rgb).sum(-2) + (1.0 - acc)[:, None] * background


class GridHead(nn.Module):
    """Landmark condition + grid field + occupancy sampling (`cfg`: a `GridConfig`)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.landmark_encoder = LandmarkEncoder(cfg)
        self.smoother = AttentionSmoother(cfg)
        self.grid = GridEncoder(cfg.head_grid)
        self.ambient_grid = GridEncoder(cfg.ambient_grid)
        f = self.grid.out_dim
        eye = int(getattr(cfg, "eye_feature", False))
        self.ambient_net = MLP(f + cfg.cond_dim + eye, 2, cfg.ambient_hidden,
                               cfg.ambient_layers)
        self.sigma_net = MLP(f + self.ambient_grid.out_dim + eye, 1 + cfg.geo_feat_dim,
                             cfg.sigma_hidden, cfg.sigma_layers)
        self.color_net = MLP(16 + cfg.geo_feat_dim + cfg.code_dim, 3, cfg.color_hidden,
                             cfg.color_layers)
        if cfg.code_dim:
            self.code_table = nn.Parameter(torch.zeros(cfg.num_codes, cfg.code_dim))
        self.register_buffer("center", torch.tensor(cfg.center, dtype=torch.float32),
                             persistent=False)

    def condition(self, windows, smooth=True):
        cond = self.smoother(self.landmark_encoder(windows), smooth)
        if not getattr(self.cfg, "eye_feature", False):
            return cond
        # the centre frame's mean gap between the upper (37, 38, 43, 44) and lower (41,
        # 40, 47, 46) lid points, y in the normaliser's units, appended
        y = windows[:, self.cfg.smooth_window // 2, :, 1]
        gap = (y[:, [37, 38, 43, 44]] - y[:, [41, 40, 47, 46]]).mean(-1, keepdim=True)
        return torch.cat([cond, gap], -1)

    def codes(self, index):
        return self.code_table[index.clamp(0, self.cfg.num_codes - 1)]

    def mean_code(self):
        return self.code_table.mean(0)

    def density(self, points, cond, group=1):
        """(sigma [N], geometry features [N, geo], ambient [N, 2]) of head-space points
        `[N, 3]` under `cond` `[N / group, C]` (one row per `group` consecutive points)."""
        f = self.grid((points - self.center) / (2 * self.cfg.bound) + 0.5)
        amb = torch.tanh(self.ambient_net([(f, False), (cond, True)], group))
        g = self.ambient_grid((amb + 1.0) * 0.5)
        parts = [(torch.cat([f, g], -1), False)]
        if getattr(self.cfg, "eye_feature", False):
            parts.append((cond[:, -1:], True))
        h = self.sigma_net(parts, group)
        return TruncExp.apply(h[:, 0]), h[:, 1:], amb

    def render(self, origins, directions, cond, background, code, bits, u=None):
        """(rgb [R, 3], acc [R], weighted |ambient| [R]); `cond [R, C]`, `code [R, D]`."""
        r, k = origins.shape[0], self.cfg.num_samples
        with torch.no_grad():
            t, delta, inside = occupancy_samples(origins, directions, bits, self.cfg, u)
        dir_norm = directions.norm(dim=-1)
        view = directions / dir_norm.clamp_min(1e-12)[:, None]
        pts = (origins[:, None, :] + directions[:, None, :] * t[..., None]).reshape(-1, 3)
        sigma, geo, amb = self.density(pts, cond, k)
        parts = [(spherical_harmonics(view), True), (geo, False)]
        if self.cfg.code_dim:
            parts.append((code, True))
        rgb = torch.sigmoid(self.color_net(parts, k)).reshape(r, k, 3)
        w, acc, color = composite_equal(sigma.reshape(r, k) * inside, rgb, delta, dir_norm,
                                        background)
        return color, acc, (w * amb.abs().sum(-1).reshape(r, k)).sum(-1)


def update_occupancy(head, density, cond, cfg, jitter, update_index=0, chunk=1 << 16):
    """(density, bits) `[G, G, G]` after the library's `update_occupancy`: the density of
    `head` under `cond [1, C]` at one point per probed cell (the cells `i = update_index
    mod occupancy_stride (mod stride)`; `jitter [G^3 / stride, 3]` within each), those
    cells' density `max(decay * density, new)`, occupied above `min(sigma_thresh, mean)`,
    dilated by one cell. Call under `torch.no_grad()`."""
    g, stride = cfg.grid_size, cfg.occupancy_stride
    cells = torch.arange(g ** 3 // stride) * stride + update_index % stride
    ijk = torch.stack([cells // (g * g), (cells // g) % g, cells % g], -1)
    pts = head.center - cfg.bound + (ijk + jitter) * cfg.cell_size
    sigma = torch.cat([head.density(p, cond, len(p))[0] for p in pts.split(chunk)])
    dens = density.reshape(-1).clone()
    dens[cells] = torch.maximum(dens[cells] * cfg.occupancy_decay, sigma)
    dens = dens.reshape(g, g, g)
    occ = (dens > min(cfg.sigma_thresh, float(dens.mean()))).float()
    return dens, F.max_pool3d(occ[None, None], 3, 1, 1)[0, 0]
