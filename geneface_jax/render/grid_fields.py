"""Stage 3, grid-encoded: GeneFace's RAD-NeRF head (`lm3d_radnerf`) and 2-D torso
(`radnerf_torso`), with occupancy-grid sampling at static shapes.

Head (`GridHeadNeRF`), for a point x of head space (the box `center +- bound`, mapped onto
the unit cube) seen along unit direction d, with the frame's landmark condition c (the
MLP head's `LandmarkEncoder` + 5-frame `AttentionSmoother`) and per-frame code e:

    f   = E3(x)                          3-D multi-resolution grid, L x F = 32 features
    a   = tanh(MLP_amb([f, c]))          ambient coordinates in [-1, 1]^2
    g   = E2((a + 1) / 2)                2-D ambient grid
    h   = MLP_sigma([f, g])              -> 1 + geo_feat_dim
    sigma = trunc_exp(h_0)               exp forward, gradient of exp(clip(h_0, -15, 15))
    rgb = sigmoid(MLP_color([SH4(d), h_1:, e]))

MLPs are RAD-NeRF's: `layers` bias-free Linear layers `hidden` wide with ReLU between
(none after the last). GeneFace's sizes are `GridConfig()`'s defaults.

Sampling (`occupancy_samples`): empty space costs no field evaluations at fixed shapes.
The head keeps an occupancy grid of G^3 cells over its box (variables collection
`occupancy`: `density`, an EMA of the field's density at jittered cell centres, and
`bits`, the occupied cells dilated by one cell so a surface that crosses a cell whose
jittered probe missed it is never dropped). A ray is cut where it crosses the box (and
[near, far]) into M equal bins whose midpoints read the bits; the K samples of the ray are
the inverse CDF of the piecewise-constant pdf "occupied bins" (stratified: u_k = (k +
jitter) / K, midpoints at evaluation), so all K land in occupied space, evenly spread
over it, and each stands for an equal share `delta = (occupied length) / K` of it in
compositing. A ray that meets no occupied bin renders the background. Sample densities are
multiplied by the bit of the sample's bin (0 where the pdf's tiny floor put a sample in
empty space). GeneFace uses 128^3 cells, up to 16 samples per ray and an update every 16
steps with EMA 0.95 (its CUDA ray marcher takes up to 16 steps through occupied cells:
the same budget, on dynamic shapes). The update (`update_occupancy`): density of the
field at one jittered point per cell under a training frame's condition, `density <-
max(decay * density, new)`, occupied where `density > min(sigma_thresh, mean density)`,
with `sigma_thresh` the density whose opacity across one cell is `alpha_thresh`.

Torso (`GridTorso`, GeneFace's `RADNeRFTorso.forward_torso`): a 2-D image-plane model of
the pixels of the first frame's camera: pixel position p in [-1, 1]^2 (x shrunk by
`torso_shrink`), head pose h (`fields.head_pose_vector`: euler angles + translation) and
a per-frame torso code e_t:

    q   = [PE_10(p), PE_4(h), e_t]
    dx  = MLP_deform(q)                                   3 x 64 -> 2
    t   = MLP_torso([E2((clip(p + dx, -1, 1) + 1) / 2), q])  3 x 32 -> 4
    alpha = sigmoid(t_0), rgb = sigmoid(t_1:)

composited head over torso over background:
`head_fg + (1 - head_acc) (alpha rgb + (1 - alpha) background)`: the torso fills every
pixel the head leaves, so there is no gap between them (the neck is the torso's).

Inference uses the mean of the trained per-frame codes (GeneFace takes code 0).
Shapes: R rays, K samples; float32, channel-last.
"""

import dataclasses
from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from geneface_jax.errors import ShapeError
from geneface_jax.initializers import jitted_init, torch_default_kernel_init
from geneface_jax.render import encodings, rays
from geneface_jax.render import grid_encoding as ge
from geneface_jax.render.fields import (NUM_LANDMARKS, AttentionSmoother, LandmarkEncoder,
                                        RayOutput, RenderResult, check_per_ray,
                                        head_pose_vector, landmark_condition, _shape)

RENDERER = "grid"


@dataclasses.dataclass(frozen=True)
class GridConfig:
    """Sizes of the grid head and torso; defaults are GeneFace's `lm3d_radnerf` values.

    Condition (as `fields.NeRFConfig`): cond_dim, landmark_channels, landmark_fc,
      smooth_window, smooth_warmup_steps, attention_channels. `eye_feature`: the
      condition also carries the window centre's eye opening (`eye_opening`, one number
      appended: `cond_width` = cond_dim + 1), which the sigma MLP takes directly as well
      as the ambient MLP (RAD-NeRF's eye input; GeneFace's head has none: False).
    Box: center (3 floats), bound (half side, head units: the synthetic skull is ~0.2).
    Grids: levels x features, base -> finest vertices per side, 2^log2_table rows per
      level (head 3-D grid; the ambient and torso 2-D grids use `ambient_finest` /
      `torso_finest`).
    MLPs: ambient (layers, hidden, 2 outputs), sigma (layers, hidden -> 1 + geo_feat_dim),
      color (layers, hidden -> 3); code_dim per-frame head code size (0 = none),
      num_codes how many (the training frames; set by training).
    Sampling: num_bins (M) occupancy reads per ray, num_samples (K) field evaluations per
      ray; occupancy grid_size (G), occupancy_decay, occupancy_every (steps),
      occupancy_stride (an update probes 1 / stride of the cells, in turn), alpha_thresh;
      near, far (ray bounds, intersected with the box); pixel_convention.
    Torso: torso_levels/features/base/finest, torso_deform (layers, hidden), torso_mlp
      (layers, hidden), torso_code_dim, torso_shrink, torso_pos_freqs, torso_pose_freqs.
    torso_log2_table: the torso grid's table bound (None: `log2_table`; GeneFace's is
      always 16).
    grid_layout: how every grid indexes its table (`grid_encoding.GridSpec.layout`):
      "native", or torch-ngp's "ngp_tiled" / "ngp_hash" (what GeneFace's checkpoints hold).
    torso_inputs: what the torso reads: "native" (`pixel_uv` of the pixel centres as
      (column, row); `fields.head_pose_vector`) or "radnerf", GeneFace's RADNeRFTorso
      (`torso_pose_vector`, `pixel_uv`).
    inference_code: the per-frame code row (head and torso) a frame without one of its
      own gets (synthesis, held-out frames): -1 the mean of the table, k >= 0 row k
      (GeneFace renders unseen frames with row 0).
    """

    cond_dim: int = 64
    landmark_channels: Tuple[int, ...] = (32, 32, 64, 64)
    landmark_fc: int = 64
    smooth_window: int = 5
    smooth_warmup_steps: int = 200_000
    attention_channels: Tuple[int, ...] = (16, 8, 4, 2)
    eye_feature: bool = False
    center: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    bound: float = 0.16
    levels: int = 16
    features: int = 2
    base: int = 16
    finest: int = 2048
    log2_table: int = 16
    ambient_finest: int = 2048
    ambient_layers: int = 3
    ambient_hidden: int = 128
    sigma_layers: int = 3
    sigma_hidden: int = 128
    geo_feat_dim: int = 128
    color_layers: int = 2
    color_hidden: int = 128
    code_dim: int = 4
    num_codes: int = 1
    num_bins: int = 128
    num_samples: int = 16
    grid_size: int = 128
    occupancy_decay: float = 0.95
    occupancy_every: int = 16
    occupancy_stride: int = 1
    alpha_thresh: float = 0.01
    near: float = 0.3
    far: float = 0.9
    pixel_convention: str = "centers"
    torso_levels: int = 16
    torso_features: int = 2
    torso_base: int = 16
    torso_finest: int = 2048
    torso_deform: Tuple[int, int] = (3, 64)
    torso_mlp: Tuple[int, int] = (3, 32)
    torso_code_dim: int = 8
    torso_shrink: float = 0.8
    torso_pos_freqs: int = 10
    torso_pose_freqs: int = 4
    torso_log2_table: Optional[int] = None
    grid_layout: str = "native"
    torso_inputs: str = "native"
    inference_code: int = -1

    @property
    def cond_width(self) -> int:
        """Size of the head's per-frame condition: cond_dim (+ 1 with eye_feature)."""
        return self.cond_dim + int(self.eye_feature)

    def __post_init__(self):
        if self.bound <= 0:
            raise ValueError(f"GridConfig: bound must be positive, got {self.bound}")
        if self.num_samples < 1 or self.num_bins < 1 or self.grid_size < 2:
            raise ValueError(f"GridConfig: need num_samples, num_bins >= 1 and grid_size "
                             f">= 2: {self.num_samples}, {self.num_bins}, {self.grid_size}")
        if not self.far > self.near:
            raise ValueError(f"GridConfig: need far > near, got {self.near}, {self.far}")
        if self.smooth_window < 1 or self.smooth_window % 2 == 0:
            raise ValueError(f"GridConfig: smooth_window must be odd, got {self.smooth_window}")
        if not 0.0 < self.alpha_thresh < 1.0 or not 0.0 <= self.occupancy_decay <= 1.0:
            raise ValueError("GridConfig: need 0 < alpha_thresh < 1 and 0 <= occupancy_decay "
                             "<= 1")
        if self.pixel_convention not in rays.PIXEL_CONVENTIONS:
            raise ValueError(f"GridConfig: pixel_convention must be one of "
                             f"{rays.PIXEL_CONVENTIONS}, got {self.pixel_convention!r}")
        if self.occupancy_stride < 1 or (self.grid_size ** 3) % self.occupancy_stride:
            raise ValueError(f"GridConfig: occupancy_stride must divide grid_size^3 = "
                             f"{self.grid_size ** 3}, got {self.occupancy_stride}")
        if self.num_codes < 1 or self.code_dim < 0 or self.torso_code_dim < 0:
            raise ValueError("GridConfig: need num_codes >= 1 and code sizes >= 0")
        if self.torso_inputs not in TORSO_INPUTS:
            raise ValueError(f"GridConfig: torso_inputs must be one of {TORSO_INPUTS}, got "
                             f"{self.torso_inputs!r}")
        if not -1 <= self.inference_code < self.num_codes:
            raise ValueError(f"GridConfig: inference_code must be -1 (the mean) or a row "
                             f"below num_codes={self.num_codes}, got {self.inference_code}")
        for spec in ("head_grid", "ambient_grid", "torso_grid"):     # validates them
            getattr(self, spec)

    @property
    def head_grid(self) -> ge.GridSpec:
        return ge.GridSpec(3, self.levels, self.features, self.base, self.finest,
                           self.log2_table, self.grid_layout)

    @property
    def ambient_grid(self) -> ge.GridSpec:
        return ge.GridSpec(2, self.levels, self.features, self.base, self.ambient_finest,
                           self.log2_table, self.grid_layout)

    @property
    def torso_grid(self) -> ge.GridSpec:
        log2 = self.log2_table if self.torso_log2_table is None else self.torso_log2_table
        return ge.GridSpec(2, self.torso_levels, self.torso_features, self.torso_base,
                           self.torso_finest, log2, self.grid_layout)

    @property
    def cell_size(self) -> float:
        return 2.0 * self.bound / self.grid_size

    @property
    def sigma_thresh(self) -> float:
        """Density whose opacity across one occupancy cell is `alpha_thresh`."""
        return float(-np.log1p(-self.alpha_thresh) / self.cell_size)


# --------------------------------------------------------------------------- layers

@jax.custom_jvp
def trunc_exp(x):
    """exp(x) whose derivative is exp(clip(x, -15, 15)) (RAD-NeRF's density activation)."""
    return jnp.exp(x)


@trunc_exp.defjvp
def _trunc_exp_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return jnp.exp(x), t * jnp.exp(jnp.clip(x, -15.0, 15.0))


class GroupedDense(nn.Module):
    """A bias-free Linear layer (`kernel` [sum k, features], PyTorch's init) on the
    concatenation of `parts` without building it: each part is per sample `[N, k]` or per
    group `[N / group, k]` (shared by `group` consecutive samples, e.g. a ray's
    condition, view direction or code), multiplied once per group. Returns `[N, features]`,
    the same as the Linear layer on the broadcast concatenation."""
    features: int

    @nn.compact
    def __call__(self, parts, group: int = 1):
        sizes = [p.shape[-1] for p, _ in parts]
        kernel = self.param("kernel", torch_default_kernel_init(),
                            (sum(sizes), self.features), jnp.float32)
        n = next(p.shape[0] for p, shared in parts if not shared)
        out, start = 0.0, 0
        for (p, shared), k in zip(parts, sizes):
            y = p @ kernel[start:start + k]
            start += k
            out = out + (y[:, None, :] if shared else y.reshape(n // group, group, -1))
        return out.reshape(n, self.features)


class MLP(nn.Module):
    """RAD-NeRF's MLP: `layers` bias-free Linear layers (`net_{i}`), `hidden` wide, ReLU
    between; `[N, in] -> [N, out]`. The input may be given as `GroupedDense` parts (a list
    of `(array, shared)`) with their `group` size."""
    out: int
    hidden: int
    layers: int

    @nn.compact
    def __call__(self, x, group: int = 1):
        for i in range(self.layers):
            last = i == self.layers - 1
            width = self.out if last else self.hidden
            if i == 0 and isinstance(x, list):
                x = GroupedDense(width, name=f"net_{i}")(x, group)
            else:
                x = nn.Dense(width, use_bias=False, name=f"net_{i}",
                             kernel_init=torch_default_kernel_init())(x)
            if not last:
                x = nn.relu(x)
        return x


class Grid(nn.Module):
    """A multi-resolution grid's table (`table` [rows, F]) and its encoding of points in
    [0, 1]^d."""
    spec: ge.GridSpec

    @nn.compact
    def __call__(self, x):
        table = self.param("table", lambda k: ge.init_table(k, self.spec))
        return ge.encode(x, table, self.spec)


# --------------------------------------------------------------------------- sampling

def box_interval(origins, directions, center, bound, near, far):
    """`(t0, t1)` `[R]`: where rays `o + t d` cross the box `center +- bound`, clipped to
    [near, far] (t1 <= t0 when a ray misses)."""
    c = jnp.asarray(center, jnp.float32)
    inv = 1.0 / jnp.where(jnp.abs(directions) < 1e-9, 1e-9, directions)
    ta = (c - bound - origins) * inv
    tb = (c + bound - origins) * inv
    t0 = jnp.max(jnp.minimum(ta, tb), axis=-1)
    t1 = jnp.min(jnp.maximum(ta, tb), axis=-1)
    return jnp.maximum(t0, near), jnp.minimum(t1, far)


def cell_index(points, config: GridConfig):
    """Flat occupancy-cell index `[...]` int32 of head-space points `[..., 3]` (clipped
    into the box)."""
    g = config.grid_size
    u = (points - jnp.asarray(config.center, jnp.float32)) / (2 * config.bound) + 0.5
    v = jnp.clip(jnp.floor(u * g), 0, g - 1).astype(jnp.int32)
    return (v[..., 0] * g + v[..., 1]) * g + v[..., 2]


def bin_occupancy(origins, directions, bits, config: GridConfig):
    """Where the rays cross the box cut into `num_bins` equal bins: (t0 [R], bin length
    h [R], occupied [R, M] float 0/1 read at the bin midpoints)."""
    m = config.num_bins
    t0, t1 = box_interval(origins, directions, config.center, config.bound, config.near,
                          config.far)
    length = jnp.maximum(t1 - t0, 0.0)
    h = length / m
    mids = t0[:, None] + (jnp.arange(m, dtype=jnp.float32) + 0.5)[None] * h[:, None]
    pts = origins[:, None, :] + directions[:, None, :] * mids[..., None]
    occ = jnp.asarray(bits).reshape(-1).at[cell_index(pts, config)].get(
        mode="promise_in_bounds") * (
        length[:, None] > 0)
    return t0, h, jax.lax.stop_gradient(occ.astype(jnp.float32))


def rays_hit(origins, directions, bits, config: GridConfig):
    """`[R]` bool: whether a ray meets an occupied bin (a ray that does not renders the
    background with zero opacity, so it need not be traced)."""
    return jnp.any(bin_occupancy(origins, directions, bits, config)[2] > 0, axis=-1)


def occupancy_samples(origins, directions, bits, config: GridConfig, u=None):
    """K samples per ray in occupied space (module doc).

    Args: origins, directions `[R, 3]`; bits `[G, G, G]` (1 = occupied); u `[R, K]`
      uniforms for the stratified jitter (None: bin midpoints, evaluation).
    Returns: t `[R, K]` sorted, delta `[R]` (t-length each sample stands for), inside
      `[R, K]` (1 where the sample's bin is occupied).
    """
    r = origins.shape[0]
    m, k = config.num_bins, config.num_samples
    t0, h, occ = bin_occupancy(origins, directions, bits, config)
    n_occ = jnp.sum(occ, axis=-1)
    pdf = occ + 1e-6
    cdf = jnp.cumsum(pdf, axis=-1)
    cdf = jnp.concatenate([jnp.zeros((r, 1)), cdf / cdf[:, -1:]], axis=-1)    # [R, M + 1]
    jitter = 0.5 if u is None else u
    q = (jnp.arange(k, dtype=jnp.float32)[None] + jitter) / k                 # [R, K]
    q = jnp.broadcast_to(q, (r, k))
    idx = jax.vmap(lambda c, v: jnp.searchsorted(c, v, side="right"))(cdf, q)
    idx = jnp.clip(idx - 1, 0, m - 1)
    lo = jnp.take_along_axis(cdf, idx, axis=-1)
    hi = jnp.take_along_axis(cdf, idx + 1, axis=-1)
    frac = jnp.clip((q - lo) / jnp.maximum(hi - lo, 1e-12), 0.0, 1.0)
    t = t0[:, None] + (idx.astype(jnp.float32) + frac) * h[:, None]
    inside = jnp.take_along_axis(occ, idx, axis=-1)
    delta = n_occ * h / k
    return t, delta, inside


def composite_equal(sigma, rgb, delta, dir_norm, background):
    """Compositing of K samples that each stand for `delta [R]` of ray parameter:
    alpha_k = 1 - exp(-sigma_k delta |d|), weights w_k = alpha_k prod_{j<k} (1 - alpha_j);
    returns (weights [R, K], fg [R, 3], acc [R], rgb over `background` [R, 3])."""
    tau = sigma * (delta * dir_norm)[:, None]
    alpha = 1.0 - jnp.exp(-tau)
    trans = jnp.exp(-jnp.concatenate([jnp.zeros_like(tau[:, :1]),
                                      jnp.cumsum(tau, axis=-1)[:, :-1]], axis=-1))
    w = alpha * trans
    fg = jnp.sum(w[..., None] * rgb, axis=-2)
    acc = jnp.sum(w, axis=-1)
    return w, fg, acc, fg + (1.0 - acc)[:, None] * background


# --------------------------------------------------------------------------- head

# upper and lower lid points of the 68-point topology (right eye 37, 38 over 41, 40; left
# eye 43, 44 over 47, 46)
UPPER_LIDS, LOWER_LIDS = (37, 38, 43, 44), (41, 40, 47, 46)


def eye_opening(landmarks):
    """`[..., 68, 3]` normalised landmarks -> `[...]`: the mean vertical gap between the
    lids (y of the upper lid points minus the lower ones'), in the normaliser's units
    (`render.frames.LandmarkNormalizer`): about 0 for the person's mean eyes, several units
    away from it when they close."""
    y = jnp.asarray(landmarks)[..., 1]
    return jnp.mean(y[..., UPPER_LIDS] - y[..., LOWER_LIDS], axis=-1)


def _inference_code(table, row):
    """`GridConfig.inference_code` of a code table `[num_codes, D]` -> `[D]`."""
    return jnp.mean(table, axis=0) if row < 0 else table[row]


class GridHeadNeRF(nn.Module):
    """The grid head (module doc). Methods, used with `apply(variables, ..., method=)`;
    `variables` = {"params", "occupancy"}:

      condition(landmark_windows [B, W, 68, 3], smooth) -> cond [B, cond_width]
      field(points [N, 3], view_dirs [N, 3] or None, cond [N, C], code [N, D] or None)
        -> (sigma [N], rgb [N, 3] or None, ambient [N, 2])
      render(origins [R, 3], directions [R, 3], cond [R, C] or [C], background [R, 3] or
        [3], code=None ([R, D] or [D]; None = the mean code), *, key=None, noise=None
        ([R, K] uniforms), near=None, far=None, return_ambient=False) -> RenderResult
        (coarse = the one pass, fine = None), with return_ambient also the per-ray
        weighted |ambient| [R] (the ambient regulariser)
      codes(index [N] int) -> the per-frame codes [N, D]
      __call__(origins, directions, landmark_window [W, 68, 3], background): one frame,
        initialises every variable.
    """

    config: GridConfig

    def setup(self):
        cfg = self.config
        self.landmark_encoder = LandmarkEncoder(cfg)
        self.smoother = AttentionSmoother(cfg)
        self.grid = Grid(cfg.head_grid)
        self.ambient_grid = Grid(cfg.ambient_grid)
        self.ambient_net = MLP(2, cfg.ambient_hidden, cfg.ambient_layers)
        self.sigma_net = MLP(1 + cfg.geo_feat_dim, cfg.sigma_hidden, cfg.sigma_layers)
        self.color_net = MLP(3, cfg.color_hidden, cfg.color_layers)
        if cfg.code_dim:
            self.code_table = self.param(
                "code_table", lambda k: 0.1 * jax.random.normal(k, (cfg.num_codes,
                                                                    cfg.code_dim)))
        g = cfg.grid_size
        # The occupancy collection is only needed by `render` (`condition` and `field`
        # run with the params alone).
        if self.is_initializing() or self.has_variable("occupancy", "bits"):
            self.density = self.variable("occupancy", "density",
                                         lambda: jnp.full((g, g, g), cfg.sigma_thresh))
            self.bits = self.variable("occupancy", "bits", lambda: jnp.ones((g, g, g)))

    def condition(self, landmark_windows, smooth=True):
        cond = landmark_condition(self, landmark_windows, smooth)
        if not self.config.eye_feature:
            return cond
        centre = jnp.asarray(landmark_windows)[:, self.config.smooth_window // 2]
        return jnp.concatenate([cond, eye_opening(centre)[:, None]], axis=-1)

    def codes(self, index):
        cfg = self.config
        if not cfg.code_dim:
            return jnp.zeros((jnp.shape(index)[0], 0), jnp.float32)
        return jnp.take(self.code_table, jnp.clip(index, 0, cfg.num_codes - 1), axis=0)

    def mean_code(self):
        """The code of a frame without one (`GridConfig.inference_code`)."""
        return (_inference_code(self.code_table, self.config.inference_code)
                if self.config.code_dim else jnp.zeros((0,), jnp.float32))

    def _unit(self, points):
        cfg = self.config
        return (points - jnp.asarray(cfg.center, jnp.float32)) / (2 * cfg.bound) + 0.5

    def field(self, points, view_dirs, cond, code=None, group: int = 1):
        """Density, colour and ambient coordinates of `points [N, 3]`; `view_dirs`,
        `cond` and `code` are given once per `group` consecutive points (`[N / group,
        ...]`: per ray with group = samples per ray); `view_dirs=None` skips the colour.
        Returns (sigma [N], rgb [N, 3] or None, ambient [N, 2])."""
        cfg = self.config
        f = self.grid(self._unit(points))
        amb = jnp.tanh(self.ambient_net([(f, False), (cond, True)], group))
        g = self.ambient_grid((amb + 1.0) * 0.5)
        h = jnp.concatenate([f, g], axis=-1)
        h = self.sigma_net([(h, False), (cond[..., -1:], True)] if cfg.eye_feature else h,
                           group)
        sigma = trunc_exp(h[..., 0])
        if view_dirs is None:
            return sigma, None, amb
        parts = [(ge.spherical_harmonics(view_dirs), True), (h[..., 1:], False)]
        if cfg.code_dim:
            parts.append((code, True))
        rgb = nn.sigmoid(self.color_net(parts, group))
        return sigma, rgb, amb

    def render(self, origins, directions, cond, background, code=None, *, key=None,
               noise=None, near=None, far=None, return_ambient=False):
        cfg = self.config
        origins = jnp.asarray(origins, jnp.float32)
        directions = jnp.asarray(directions, jnp.float32)
        if len(_shape(origins)) != 2 or origins.shape[-1] != 3 or \
                _shape(directions) != _shape(origins):
            raise ShapeError(f"GridHeadNeRF.render: origins and directions must both be "
                             f"[R, 3], got {_shape(origins)} and {_shape(directions)}")
        r, k = origins.shape[0], cfg.num_samples
        cond = check_per_ray(cond, r, cfg.cond_width, "GridHeadNeRF condition")
        if cfg.code_dim:
            code = check_per_ray(self.mean_code() if code is None else code, r,
                                 cfg.code_dim, "GridHeadNeRF code")
        bg = jnp.broadcast_to(jnp.asarray(background, jnp.float32), (r, 3))
        if near is not None or far is not None:
            cfg = dataclasses.replace(cfg, near=cfg.near if near is None else float(near),
                                      far=cfg.far if far is None else float(far))
        u = noise
        if u is None and key is not None:
            u = jax.random.uniform(key, (r, k))
        if not self.has_variable("occupancy", "bits"):
            raise ShapeError("GridHeadNeRF.render: the variables hold no 'occupancy' "
                             "collection (pass {'params': ..., 'occupancy': ...})")
        t, delta, inside = occupancy_samples(origins, directions, self.bits.value, cfg, u)
        dir_norm = jnp.linalg.norm(directions, axis=-1)
        view = directions / jnp.maximum(dir_norm, 1e-12)[:, None]
        pts = origins[:, None, :] + directions[:, None, :] * t[..., None]
        sigma, rgb, amb = self.field(pts.reshape(-1, 3), view, cond,
                                     code if cfg.code_dim else None, group=k)
        sigma = sigma.reshape(r, k) * inside
        rgb = rgb.reshape(r, k, 3)
        w, fg, acc, color = composite_equal(sigma, rgb, delta, dir_norm, bg)
        out = RayOutput(rgb=color, fg_rgb=fg, acc=acc, depth=jnp.sum(w * t, axis=-1),
                        weights=w, t=t)
        res = RenderResult(coarse=out, fine=None)
        if return_ambient:
            amb_sum = jnp.sum(w * jnp.sum(jnp.abs(amb.reshape(r, k, 2)), -1), axis=-1)
            return res, amb_sum
        return res

    def __call__(self, origins, directions, landmark_window, background):
        cond = self.condition(jnp.asarray(landmark_window)[None], False)[0]
        if self.config.code_dim:
            self.codes(jnp.zeros((1,), jnp.int32))
        return self.render(origins, directions, cond, background)


def update_occupancy(density_fn, occupancy, key, config: GridConfig, update_index=0,
                     chunk: int = 1 << 16):
    """The occupancy collection after one update (module doc).

    density_fn: `points [c, 3] -> sigma [c]` (e.g. `head_density`); occupancy: the
    current {"density", "bits"} `[G, G, G]` each; key: the cell jitter; update_index (may
    be traced): which `1 / occupancy_stride` of the cells this update probes (cells
    `i = update_index mod stride (mod stride)`; stride 1 probes all of them, GeneFace's
    update). The density runs in chunks of `chunk` points (`lax.map`)."""
    g, stride = config.grid_size, config.occupancy_stride
    n = g ** 3
    m = n // stride
    cells = jnp.arange(m, dtype=jnp.int32) * stride + jnp.asarray(update_index,
                                                                  jnp.int32) % stride
    ijk = jnp.stack([cells // (g * g), (cells // g) % g, cells % g], -1)
    jitter = jax.random.uniform(key, (m, 3))
    pts = (jnp.asarray(config.center, jnp.float32) - config.bound
           + (ijk.astype(jnp.float32) + jitter) * config.cell_size)
    c = min(chunk, m)
    pad = -m % c
    pts = jnp.concatenate([pts, jnp.broadcast_to(pts[-1:], (pad, 3))]).reshape(-1, c, 3)
    sigma = jax.lax.stop_gradient(jax.lax.map(density_fn, pts).reshape(-1)[:m])
    old = occupancy["density"].reshape(-1)
    dens = old.at[cells].set(jnp.maximum(old[cells] * config.occupancy_decay, sigma))
    dens = dens.reshape(g, g, g)
    thresh = jnp.minimum(config.sigma_thresh, jnp.mean(dens))
    # A field that has not yet told cells apart (every cell at the mean, e.g. the start
    # value decayed) keeps them all occupied instead of dropping them all: the comparison
    # allows the mean's float round-off.
    occ = (dens >= thresh * (1.0 - 1e-4)).astype(jnp.float32)
    dil = jax.lax.reduce_window(occ, -jnp.inf, jax.lax.max, (3, 3, 3), (1, 1, 1), "SAME")
    return {"density": dens, "bits": dil}


def head_density(model: GridHeadNeRF, params, cond):
    """`points [c, 3] -> sigma [c]` of a grid head under one condition `[C]`."""
    def fn(points):
        return model.apply({"params": params}, points, None, jnp.reshape(cond, (1, -1)),
                           group=points.shape[0], method=GridHeadNeRF.field)[0]
    return fn


# --------------------------------------------------------------------------- torso

TORSO_INPUTS = ("native", "radnerf")


def torso_pose_vector(pose, config: GridConfig):
    """The torso's head-pose input `[..., 6]` of camera-to-world poses `[..., 4, 4]`:
    `fields.head_pose_vector`, or with `torso_inputs="radnerf"` GeneFace's
    `convert_poses`: the XYZ Euler angles (R = Rx(a) Ry(b) Rz(c), pytorch3d's convention)
    of the rotation in RAD-NeRF's camera axes (x right, y down, z forward: `R diag(1, -1,
    -1)`) and the translation."""
    if config.torso_inputs != "radnerf":
        return head_pose_vector(pose)
    pose = jnp.asarray(pose, jnp.float32)
    r = pose[..., :3, :3] * jnp.asarray([1.0, -1.0, -1.0], jnp.float32)
    b = jnp.arcsin(jnp.clip(r[..., 0, 2], -1.0, 1.0))
    a = jnp.arctan2(-r[..., 1, 2], r[..., 2, 2])
    c = jnp.arctan2(-r[..., 0, 1], r[..., 0, 0])
    return jnp.concatenate([jnp.stack([a, b, c], -1), pose[..., :3, 3]], -1)


def pixel_uv(rows, cols, height: int, width: int, torso_inputs: str = "native"):
    """Pixels' positions on the torso's image plane, `[R, 2]` in [-1, 1]^2: (column, row)
    of the pixel centres; with `torso_inputs="radnerf"` (`GridConfig.torso_inputs`)
    GeneFace's (row, column) with the first and last pixel at -1 and 1 (its
    `get_bg_coords`)."""
    rows, cols = jnp.asarray(rows, jnp.float32), jnp.asarray(cols, jnp.float32)
    if torso_inputs == "radnerf":
        return jnp.stack([rows / max(height - 1, 1) * 2.0 - 1.0,
                          cols / max(width - 1, 1) * 2.0 - 1.0], axis=-1)
    x = (cols + 0.5) / width * 2.0 - 1.0
    y = (rows + 0.5) / height * 2.0 - 1.0
    return jnp.stack([x, y], axis=-1)


class GridTorso(nn.Module):
    """The 2-D torso (module doc). Call: `(uv [R, 2] in [-1, 1], head_pose [R, 6] or [6],
    code [R, D] or [D] or None (None = mean code)) -> (alpha [R], rgb [R, 3], dx [R, 2])`.
    Params: deform_net, grid, torso_net, code_table."""

    config: GridConfig

    @nn.compact
    def __call__(self, uv, head_pose, code=None):
        cfg = self.config
        uv = jnp.asarray(uv, jnp.float32)
        if len(_shape(uv)) != 2 or uv.shape[-1] != 2:
            raise ShapeError(f"GridTorso: uv must be [R, 2], got {_shape(uv)}")
        r = uv.shape[0]
        pose = check_per_ray(head_pose, r, 6, "GridTorso head_pose")
        x = uv * cfg.torso_shrink
        parts = [encodings.positional_encoding(x, cfg.torso_pos_freqs),
                 encodings.positional_encoding(pose, cfg.torso_pose_freqs)]
        if cfg.torso_code_dim:
            table = self.param("code_table", lambda k: 0.1 * jax.random.normal(
                k, (cfg.num_codes, cfg.torso_code_dim)))
            code = _inference_code(table, cfg.inference_code) if code is None else code
            parts.append(check_per_ray(code, r, cfg.torso_code_dim, "GridTorso code"))
        q = jnp.concatenate(parts, axis=-1)
        dx = MLP(2, cfg.torso_deform[1], cfg.torso_deform[0], name="deform_net")(q)
        y = jnp.clip(x + dx, -1.0, 1.0)
        feat = Grid(cfg.torso_grid, name="grid")((y + 1.0) * 0.5)
        t = MLP(4, cfg.torso_mlp[1], cfg.torso_mlp[0], name="torso_net")(
            jnp.concatenate([feat, q], axis=-1))
        return nn.sigmoid(t[:, 0]), nn.sigmoid(t[:, 1:]), dx

    def codes(self, index):
        table = self.get_variable("params", "code_table")
        return jnp.take(table, jnp.clip(index, 0, table.shape[0] - 1), axis=0)


def composite_over_torso(head: RayOutput, torso_alpha, torso_rgb, background):
    """`head_fg + (1 - head_acc) (alpha rgb + (1 - alpha) background)` `[R, 3]`."""
    bg = jnp.broadcast_to(jnp.asarray(background, jnp.float32), torso_rgb.shape)
    under = torso_alpha[:, None] * torso_rgb + (1.0 - torso_alpha[:, None]) * bg
    return head.fg_rgb + (1.0 - head.acc)[:, None] * under


def init_grid(config: GridConfig, part: str, key):
    """(model, variables) of a fresh grid head ({"params", "occupancy"}) or torso
    ({"params"}); the init runs as one compiled program."""
    o, d = jnp.zeros((2, 3)), jnp.array([[0.0, 0.0, -1.0]] * 2)
    if part == "head":
        model = GridHeadNeRF(config)
        win = jnp.zeros((config.smooth_window, NUM_LANDMARKS, 3))
        return model, dict(jitted_init(model)(key, o, d, win, jnp.zeros((3,))))
    if part == "torso":
        model = GridTorso(config)
        return model, dict(jitted_init(model)(key, jnp.zeros((2, 2)), jnp.zeros((6,))))
    raise ValueError(f"part must be 'head' or 'torso', got {part!r}")
