"""Stage-3 radiance fields: the landmark-conditioned head NeRF and the head-aware torso NeRF.

Sizes follow GeneFace's `Lm3dNeRF` / `ADNeRFTorso` (AD-NeRF backbone) with the hparams of
`egs/egs_bases/nerf/{base,lm3d_nerf,lm3d_nerf_torso}.yaml`; `NeRFConfig()` holds them (the
presets, the documented CPU configuration among them, are `experiments/configs/nerf.py`).

Backbone (`NeRFMLP`, GeneFace's `NeRFBackbone`), for one sample point:

    in   = [PE_10(x) (63), cond (C)]                            density input, 63 + C
    h    = relu(L_0(in)); for i = 1 .. depth-1: h = relu(L_i(h))
           after layer `skip`: h = [in, h]  (so L_{skip+1} takes width + 63 + C inputs)
    sigma = act(density_out(h))                                    act = ReLU (GeneFace)
    g    = [h, PE_4(view)] -> color_depth x (Linear(color_width) + ReLU)
    rgb  = sigmoid(color_out(g))

i.e. "skip at layer 4" means the input is concatenated to the *output* of layer 4 (0-based)
and consumed by layer 5, as in NeRF and GeneFace. The condition enters only through the
density input (and therefore through the skip), never directly into the colour head, and
the colour head reads the last density hidden layer itself (no separate feature layer):
this is GeneFace's layout (AD-NeRF's, hidden 256, colour width hidden // 2 = 128). View
directions are unit vectors. Density uses ReLU like GeneFace (`raw2alpha(act_fn=relu)`;
`density_activation="softplus"` is available); GeneFace's `+1e-6` inside the alpha is
dropped because `volume.composite` is exact without it, and ReLU lets an empty field
render the background exactly.

Parameter names mirror the PyTorch modules so a converted state_dict maps by renaming:
`density_linears_{i}`, `density_out_linear`, `color_linears_{i}`, `color_out_linear`
(`kernel` = PyTorch `weight.T`).

Landmark condition (GeneFace `lm3d_nerf`, `use_window_cond` with `cond_win_size: 1`,
`with_att`, `smo_win_size: 5`): `LandmarkEncoder` is AD-NeRF's `AudioNet` applied to a
single frame of 68 x 3 normalised landmarks: four "conv" layers 204 -> 32 -> 32 -> 64 -> 64
and two fully connected layers 64 -> 64 -> 64, LeakyReLU(0.02) between them (none after the
last). With a window of one frame and padding 1, a kernel-3 Conv1d only uses its centre tap,
so the convs are written as Dense layers (`encoder_conv_{i}`; a converter takes
`weight[:, :, 1].T`; the two dead side taps of each GeneFace conv are not stored) and the
head has `encoder_fc1_{0,1}`. `AttentionSmoother` is AD-NeRF's `AudioAttNet` over a window
of W = 5 per-frame features: five kernel-3 convs (C -> 16 -> 8 -> 4 -> 2 -> 1,
LeakyReLU(0.02) after each) give one score per frame, a Linear(W, W) + softmax turns them
into weights, and the output is the weighted sum of the window. GeneFace enables it after
`no_smo_iterations` (200k) steps (`NeRFConfig.smooth_warmup_steps`); before that the centre
frame's feature is used.

Torso (GeneFace `ADNeRFTorso`, `use_color: true`): the same backbone whose condition is
`[landmark feature (64), PE_6(euler) (39), PE_6(trans) (39), color_encoder(head rgb) (16)]`
(colour encoder 3 -> 16 -> 32 -> 16, LeakyReLU(0.02)). Departure: GeneFace's first 64
channels are not the head's landmark feature but the torso's own audio feature: an
`AudioNet` over a 16-frame DeepSpeech window (29-d) and an `AudioAttNet` smoother over 8
such windows (`ADNeRFTorso.cal_cond_feat`, fed `deepspeech_wins` by
`Lm3dNeRFTorsoTask.run_model`); here the torso reuses the frozen head's landmark feature,
so stage 3 needs no second audio front-end (docs/geneface_differences.md). Its points
live in the world of the *first frame's camera* (rays from `poses[0]`), so the torso is
static in that frame and only the head pose (`head_pose_vector(poses[t])`) tells it how
the neck moves. The head colour input (the head render over the background, per ray) is
what makes it head-aware in GeneFace; `torso_color_dim = 0` turns it off. Departure:
every TorsoField (coarse and fine) owns its colour encoder (1,136 parameters), where
GeneFace shares one between the two networks; a converter copies GeneFace's
`color_encoder` into both.

Rendering (`render_rays`): stratified coarse samples in [near, far], coarse field,
composite, hierarchical fine samples (`sampling.hierarchical_samples`), fine field on the
sorted union, composite. Background: GeneFace replaces the colour of the *last* sample by
the background colour (`raw2outputs`), so whatever the last, infinitely long interval
absorbs is background. `last_sample_background=True` (default) reproduces that: the
foreground is `sum_{i<S-1} w_i c_i` with opacity `acc = sum_{i<S-1} w_i` and
`rgb = fg + (1 - acc) * background` (identical to GeneFace's formula, and an empty field
gives the background exactly). With `False` the last interval is an ordinary sample.

Compositing the person (`composite_person`), default order head over torso over
background (docs/architecture.md, Stage 3):

    rgb = head_fg + (1 - head_acc) * (torso_fg + (1 - torso_acc) * background)

where `*_fg` are premultiplied foreground colours and `*_acc` foreground opacities from
`RayOutput`. GeneFace's public code composites the other way round,
`rgb = torso_fg + (1 - torso_acc) * head_rgb` with the head rendered over the background
(`order="torso_over_head"`), and relies on the head-colour condition to keep the torso off
the face.

Shapes: R rays, S samples per ray, C condition channels; all float32, channel-last.
"""

import dataclasses
from typing import Any, Callable, Optional, Tuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from geneface_jax.errors import InputError, ShapeError
from geneface_jax.initializers import torch_default_bias_init, torch_default_kernel_init
from geneface_jax.render import encodings, rays, sampling, volume

Array = Any
FieldFn = Callable[[Array, Array], Tuple[Array, Array]]

LEAKY_SLOPE = 0.02
NUM_LANDMARKS = 68


# --------------------------------------------------------------------------- config

@dataclasses.dataclass(frozen=True)
class NeRFConfig:
    """Sizes of the stage-3 fields; defaults are GeneFace's (paper) values.

    pos_freqs / view_freqs: positional-encoding bands of x (10) and view directions (4).
    width, depth, skip: density MLP (256 wide, 8 layers, input re-concatenated after layer
      4; `skip=None` disables it). color_width, color_depth: colour head (128, 3 layers).
    cond_dim: landmark feature size (64). landmark_channels, landmark_fc: LandmarkEncoder
      widths (AudioNet: conv 32, 32, 64, 64; fc 64 then cond_dim).
    smooth_window: frames in the attention smoother's window (5, centre = index W // 2);
      smooth_warmup_steps: training steps before the smoother is switched on (200k).
    attention_channels: AudioAttNet conv widths (16, 8, 4, 2, then 1).
    num_coarse, num_fine: samples per ray (64 + 128); near, far: ray bounds (head units).
    pixel_convention: where rays cross the pixels, `render.rays.ray_intrinsics`: "centers"
      (pixel centres, the dataset's principal point) or "geneface" (integer pixel
      coordinates, principal point at the image centre, as GeneFace's `get_rays`).
    density_activation: "relu" (GeneFace) or "softplus".
    last_sample_background: GeneFace's background handling (see the module doc).
    pose_freqs: bands of the torso's head-pose encoding (6 for euler angles and translation).
    torso_color_dim: size of the torso's head-colour feature (16; 0 = no colour input).
    """

    pos_freqs: int = 10
    view_freqs: int = 4
    width: int = 256
    depth: int = 8
    skip: Optional[int] = 4
    color_width: int = 128
    color_depth: int = 3
    cond_dim: int = 64
    landmark_channels: Tuple[int, ...] = (32, 32, 64, 64)
    landmark_fc: int = 64
    smooth_window: int = 5
    smooth_warmup_steps: int = 200_000
    attention_channels: Tuple[int, ...] = (16, 8, 4, 2)
    num_coarse: int = 64
    num_fine: int = 128
    near: float = 0.3
    far: float = 0.9
    density_activation: str = "relu"
    last_sample_background: bool = True
    pose_freqs: int = 6
    torso_color_dim: int = 16
    pixel_convention: str = "centers"

    def __post_init__(self):
        if self.depth < 1 or self.width < 1 or self.color_width < 1 or self.color_depth < 1:
            raise ValueError(f"NeRFConfig: depth/width/color sizes must be positive: {self}")
        if self.skip is not None and not 0 <= self.skip <= self.depth - 2:
            raise ValueError(f"NeRFConfig: skip must be None or in [0, depth - 2] = "
                             f"[0, {self.depth - 2}] (layer skip + 1 consumes the "
                             f"concatenation), got {self.skip}")
        if self.density_activation not in ("relu", "softplus"):
            raise ValueError(f"NeRFConfig: density_activation must be 'relu' or 'softplus', "
                             f"got {self.density_activation!r}")
        if self.num_coarse < 3 or self.num_fine < 0:
            raise ValueError(f"NeRFConfig: need num_coarse >= 3 and num_fine >= 0, got "
                             f"{self.num_coarse} and {self.num_fine}")
        if self.smooth_window < 1 or self.smooth_window % 2 == 0:
            raise ValueError(f"NeRFConfig: smooth_window must be odd (a centre frame), "
                             f"got {self.smooth_window}")
        if not self.far > self.near:
            raise ValueError(f"NeRFConfig: need far > near, got {self.near}, {self.far}")
        if self.pixel_convention not in rays.PIXEL_CONVENTIONS:
            raise ValueError(f"NeRFConfig: pixel_convention must be one of "
                             f"{rays.PIXEL_CONVENTIONS}, got {self.pixel_convention!r}")

    @property
    def pos_dim(self) -> int:
        """Size of the encoded position, 3 (1 + 2 pos_freqs) = 63."""
        return encodings.encoding_dim(3, self.pos_freqs)

    @property
    def view_dim(self) -> int:
        """Size of the encoded view direction, 3 (1 + 2 view_freqs) = 27."""
        return encodings.encoding_dim(3, self.view_freqs)

    @property
    def pose_dim(self) -> int:
        """Size of the encoded head pose: euler and translation, 2 * 3 (1 + 2 pose_freqs)."""
        return 2 * encodings.encoding_dim(3, self.pose_freqs)

    @property
    def torso_cond_dim(self) -> int:
        """Condition size of the torso backbone: cond_dim + pose_dim + torso_color_dim."""
        return self.cond_dim + self.pose_dim + self.torso_color_dim


# --------------------------------------------------------------------------- outputs

@flax.struct.dataclass
class RayOutput:
    """One composited pass (coarse or fine) over R rays with S samples each.

    rgb [R, 3]: colour including the background. fg_rgb [R, 3]: premultiplied foreground
    colour (no background). acc [R]: foreground opacity, rgb = fg_rgb + (1 - acc) bg.
    depth [R]: expected depth of the foreground, sum_i w_i t_i (divide by acc to normalise).
    weights [R, S]: foreground compositing weights (the last one is 0 when the last sample
    stands for the background). t [R, S]: sample positions (depth along -z)."""
    rgb: Array
    fg_rgb: Array
    acc: Array
    depth: Array
    weights: Array
    t: Array


@flax.struct.dataclass
class RenderResult:
    """Coarse and fine passes; `fine` is None when no fine samples were drawn."""
    coarse: RayOutput
    fine: Optional[RayOutput]

    @property
    def final(self) -> RayOutput:
        """The fine pass if there is one, else the coarse pass."""
        return self.coarse if self.fine is None else self.fine


# --------------------------------------------------------------------------- checks

def _shape(x):
    return tuple(getattr(x, "shape", ()))


def check_points(x, dirs, what: str):
    """x `[R, S, 3]` and view directions `[R, 3]`; returns (R, S)."""
    if len(_shape(x)) != 3 or x.shape[-1] != 3:
        raise ShapeError(f"{what}: points must be [R, S, 3], got shape {_shape(x)}")
    r, s = x.shape[:2]
    if _shape(dirs) != (r, 3):
        raise ShapeError(f"{what}: view directions must be [R, 3] = ({r}, 3) for points "
                         f"{_shape(x)}, got {_shape(dirs)}")
    return r, s


def check_per_ray(v, r: int, dim: int, what: str):
    """A per-frame `[dim]` or per-ray `[R, dim]` vector, returned broadcast to `[R, dim]`."""
    shape = _shape(v)
    if shape not in ((dim,), (r, dim)):
        raise ShapeError(f"{what}: expected [{dim}] (per frame) or [R, {dim}] = ({r}, {dim}) "
                         f"(per ray), got {shape}")
    return jnp.broadcast_to(jnp.asarray(v, jnp.float32), (r, dim))


# --------------------------------------------------------------------------- layers

class Linear(nn.Module):
    """`y = x @ kernel + bias` with PyTorch's `nn.Linear` initialisation (kernel and bias
    uniform in +-1/sqrt(fan_in)). Params: `kernel` [in, features] (PyTorch `weight.T`),
    `bias` [features]."""

    features: int

    @nn.compact
    def __call__(self, x):
        fan_in = x.shape[-1]
        kernel = self.param("kernel", torch_default_kernel_init(), (fan_in, self.features),
                            jnp.float32)
        bias = self.param("bias", torch_default_bias_init(fan_in), (self.features,),
                          jnp.float32)
        return _matmul_2d(x, kernel) + bias


def _matmul_2d(x, kernel):
    """`x [..., k] @ kernel [k, f]` as one 2-D GEMM on `x` flattened to `[prod(...), k]`.

    The result is the same as `jnp.matmul`; the point is the gradient. Autodiff of a
    matmul over `[R, S, k]` gives a weight gradient that contracts two axes (R and S),
    which XLA:CPU lowers by first transposing the output gradient to `[f, R S]` and then
    running a transposed-operand dot in Eigen, outside YNNPACK. On 2-D operands the weight
    gradient is a plain `[R S, k]^T [R S, f]` product with one contracting axis, which
    Eigen reads in place (no transpose pass)."""
    if x.ndim == 2:
        return jnp.matmul(x, kernel)
    lead = x.shape[:-1]
    return jnp.matmul(x.reshape(-1, x.shape[-1]), kernel).reshape(lead + (kernel.shape[-1],))


def _leaky(x):
    return nn.leaky_relu(x, LEAKY_SLOPE)


@flax.struct.dataclass
class SampleFeatures:
    """A per-sample input stored feature-major: `values` `[k, R S]`, column `r S + s` for
    ray r and sample s (see `position_features`). `PartsLinear` multiplies it by
    contracting axis 0, so it is never transposed."""
    values: Array
    samples: int = flax.struct.field(pytree_node=False)

    @property
    def size(self) -> int:
        return self.values.shape[0]


def position_features(x, num_freqs: int) -> SampleFeatures:
    """Encoded points `[R, S, 3]` as feature-major `SampleFeatures` `[3 (1 + 2L), R S]`
    (`encodings.positional_encoding_features` on the points viewed as `[3, R, S]`): the
    encoding vectorises along the samples, and XLA computes the points o + t d inside the
    same loop."""
    r, s = x.shape[:2]
    xt = jnp.transpose(jnp.asarray(x, jnp.float32), (2, 0, 1))                 # [3, R, S]
    enc = encodings.positional_encoding_features(xt, num_freqs)               # [P, R, S]
    return SampleFeatures(enc.reshape(enc.shape[0], r * s), s)


def _part_size(p):
    return p.size if isinstance(p, SampleFeatures) else p.shape[-1]


class PartsLinear(nn.Module):
    """`Linear` on the concatenation of `parts` without materialising it: each part is
    per sample (`[R, S, k]`, or `SampleFeatures` `[k, R S]`) or per ray `[R, k]`
    (constant along the samples, e.g. the landmark condition or the view encoding), and a
    per-ray part is multiplied by its kernel rows once per ray instead of once per sample.
    Same parameters (`kernel` [sum k, features], `bias`) and, up to float reassociation,
    the same result as `Linear(features)(concatenate(broadcast(parts)))`: `[R, S,
    features]` (at least one part must be per sample)."""

    features: int

    @nn.compact
    def __call__(self, parts):
        sizes = [_part_size(p) for p in parts]
        fan_in = sum(sizes)
        kernel = self.param("kernel", torch_default_kernel_init(), (fan_in, self.features),
                            jnp.float32)
        bias = self.param("bias", torch_default_bias_init(fan_in), (self.features,),
                          jnp.float32)
        out_samples, out_rays, start = None, None, 0
        for p, k in zip(parts, sizes):
            w = kernel[start:start + k]
            start += k
            if isinstance(p, SampleFeatures):
                y = jax.lax.dot_general(p.values, w, (((0,), (0,)), ((), ())))
                y = y.reshape(-1, p.samples, self.features)
            else:
                y = _matmul_2d(p, w)
            if isinstance(p, SampleFeatures) or p.ndim == 3:
                out_samples = y if out_samples is None else out_samples + y
            else:
                out_rays = y if out_rays is None else out_rays + y
        if out_samples is None:
            raise ShapeError("PartsLinear: at least one part must be per sample")
        if out_rays is None:
            return out_samples + bias
        return out_samples + (out_rays + bias)[:, None, :]


class NeRFMLP(nn.Module):
    """GeneFace's `NeRFBackbone` on encoded inputs (layout in the module doc).

    Call: `(pos_enc [R, S, P] or SampleFeatures [P, R S], cond [R, C], view_enc [R, V])
    -> (raw_sigma [R, S], raw_rgb [R, S, 3])` before activations (the fields pass
    `position_features`). Submodules: `density_linears_{0..depth-1}`
    (`density_linears_{skip+1}` takes width + P + C inputs), `density_out_linear`,
    `color_linears_{0..color_depth-1}`, `color_out_linear`. The per-ray inputs (condition,
    view encoding) go through `PartsLinear`, so their share of the first, skip and first
    colour layers is computed once per ray (12 % fewer FLOPs in the small config).
    """

    config: NeRFConfig

    @nn.compact
    def __call__(self, pos_enc, cond, view_enc):
        cfg = self.config
        h = None
        for i in range(cfg.depth):
            if i == 0:
                parts = [pos_enc, cond]
            elif cfg.skip is not None and i == cfg.skip + 1:
                parts = [pos_enc, cond, h]            # GeneFace: cat([inputs, h])
            else:
                parts = [h]
            h = nn.relu(PartsLinear(cfg.width, name=f"density_linears_{i}")(parts))
        raw_sigma = Linear(1, name="density_out_linear")(h)[..., 0]
        g = nn.relu(PartsLinear(cfg.color_width, name="color_linears_0")([h, view_enc]))
        for i in range(1, cfg.color_depth):
            g = nn.relu(Linear(cfg.color_width, name=f"color_linears_{i}")(g))
        raw_rgb = Linear(3, name="color_out_linear")(g)
        return raw_sigma, raw_rgb


def _density(raw, activation: str):
    return nn.relu(raw) if activation == "relu" else nn.softplus(raw)


# --------------------------------------------------------------------------- condition

class LandmarkEncoder(nn.Module):
    """Per-frame landmark encoder: `[..., 68, 3]` normalised landmarks -> `[..., cond_dim]`.

    AD-NeRF's AudioNet on a one-frame window (see the module doc): Dense layers
    `encoder_conv_{0..3}` (204 -> 32 -> 32 -> 64 -> 64) and `encoder_fc1_{0,1}`
    (64 -> 64 -> cond_dim), LeakyReLU(0.02) after every layer but the last.
    """

    config: NeRFConfig

    @nn.compact
    def __call__(self, landmarks):
        shape = _shape(landmarks)
        if len(shape) < 2 or shape[-2:] != (NUM_LANDMARKS, 3):
            raise ShapeError(f"LandmarkEncoder: expected landmarks [..., {NUM_LANDMARKS}, 3], "
                             f"got shape {shape}")
        # Host values only (NumPy, so nothing is staged inside a jit trace).
        if not isinstance(landmarks, jax.core.Tracer) and not np.all(
                np.isfinite(np.asarray(landmarks))):
            raise InputError("LandmarkEncoder: the landmarks hold NaN or inf values")
        h = jnp.asarray(landmarks, jnp.float32).reshape(shape[:-2] + (NUM_LANDMARKS * 3,))
        for i, ch in enumerate(self.config.landmark_channels):
            h = _leaky(Linear(ch, name=f"encoder_conv_{i}")(h))
        h = _leaky(Linear(self.config.landmark_fc, name="encoder_fc1_0")(h))
        return Linear(self.config.cond_dim, name="encoder_fc1_1")(h)


class AttentionSmoother(nn.Module):
    """AD-NeRF's attention smoother: window `[B, W, C]` -> `[B, C]`.

    Scores: kernel-3 'same' convs over the window axis (C -> 16 -> 8 -> 4 -> 2 -> 1, each
    followed by LeakyReLU(0.02); `attention_conv_{i}`), then `attention_linear` (W -> W)
    and a softmax over the window. Output: `sum_w weights[b, w] * window[b, w]`.

    `enabled` (a Python bool or a traced boolean scalar, e.g. `step >= warmup`) selects
    between the smoothed feature and the centre frame `window[:, W // 2]` (returned
    unchanged). With `return_weights=True` returns `(features, weights [B, W])` (the
    softmax weights, whatever `enabled` is).
    """

    config: NeRFConfig

    @nn.compact
    def __call__(self, window, enabled=True, return_weights: bool = False):
        cfg = self.config
        w = cfg.smooth_window
        shape = _shape(window)
        if len(shape) != 3 or shape[1] != w or shape[2] != cfg.cond_dim:
            raise ShapeError(f"AttentionSmoother: expected a window [B, {w}, {cfg.cond_dim}], "
                             f"got shape {shape}")
        window = jnp.asarray(window, jnp.float32)
        y = window
        for i, ch in enumerate(tuple(cfg.attention_channels) + (1,)):
            fan_in = 3 * y.shape[-1]
            y = nn.Conv(ch, (3,), padding=((1, 1),), name=f"attention_conv_{i}",
                        kernel_init=torch_default_kernel_init(),
                        bias_init=torch_default_bias_init(fan_in))(y)
            y = _leaky(y)
        scores = Linear(w, name="attention_linear")(y[..., 0])           # [B, W]
        weights = jax.nn.softmax(scores, axis=-1)
        smoothed = jnp.sum(weights[..., None] * window, axis=1)
        centre = window[:, w // 2]
        out = jnp.where(jnp.asarray(enabled, bool), smoothed, centre)
        return (out, weights) if return_weights else out


# --------------------------------------------------------------------------- fields

class HeadField(nn.Module):
    """Landmark-conditioned head radiance field (one of the coarse / fine networks).

    Call: `(x [R, S, 3] head-space points, view_dirs [R, 3] unit directions,
    cond [R, C] or [C]) -> (sigma [R, S] >= 0 (ReLU or softplus), rgb [R, S, 3] in [0, 1]
    (sigmoid))`. Params: `mlp` (a `NeRFMLP` with condition size cond_dim).
    """

    config: NeRFConfig

    @nn.compact
    def __call__(self, x, view_dirs, cond):
        cfg = self.config
        r, _ = check_points(x, view_dirs, "HeadField")
        cond = check_per_ray(cond, r, cfg.cond_dim, "HeadField condition")
        pos_enc = position_features(x, cfg.pos_freqs)
        view_enc = encodings.positional_encoding(jnp.asarray(view_dirs, jnp.float32),
                                                 cfg.view_freqs)
        raw_sigma, raw_rgb = NeRFMLP(cfg, name="mlp")(pos_enc, cond, view_enc)
        return _density(raw_sigma, cfg.density_activation), nn.sigmoid(raw_rgb)


def _euler_from_rotation(rot):
    beta = jnp.arcsin(jnp.clip(-rot[..., 2, 0], -1.0, 1.0))
    alpha = jnp.arctan2(rot[..., 2, 1], rot[..., 2, 2])
    gamma = jnp.arctan2(rot[..., 1, 0], rot[..., 0, 0])
    return jnp.stack([alpha, beta, gamma], axis=-1)


def rotation_from_euler(angles):
    """`[..., 3]` angles (a, b, c) in radians -> `[..., 3, 3]` R = Rz(c) Ry(b) Rx(a)."""
    a, b, c = angles[..., 0], angles[..., 1], angles[..., 2]
    ca, sa, cb, sb, cc, sc = jnp.cos(a), jnp.sin(a), jnp.cos(b), jnp.sin(b), jnp.cos(c), jnp.sin(c)
    row0 = jnp.stack([cc * cb, cc * sb * sa - sc * ca, cc * sb * ca + sc * sa], -1)
    row1 = jnp.stack([sc * cb, sc * sb * sa + cc * ca, sc * sb * ca - cc * sa], -1)
    row2 = jnp.stack([-sb, cb * sa, cb * ca], -1)
    return jnp.stack([row0, row1, row2], axis=-2)


def head_pose_vector(pose):
    """Head-pose input of the torso: `[..., 4, 4]` camera-to-world -> `[..., 6]`.

    Returns (a, b, c, tx, ty, tz): euler angles in radians with R = Rz(c) Ry(b) Rx(a)
    (`rotation_from_euler` inverts it for |b| < pi/2) and the translation column of the
    pose. Since world = head space, this is the per-frame head pose relative to the camera
    (inverted), which is all the torso needs to know.
    """
    pose = jnp.asarray(pose, jnp.float32)
    if pose.ndim < 2 or pose.shape[-2:] != (4, 4):
        raise ShapeError(f"head_pose_vector: expected poses [..., 4, 4], got {tuple(pose.shape)}")
    return jnp.concatenate([_euler_from_rotation(pose[..., :3, :3]), pose[..., :3, 3]], axis=-1)


class TorsoField(nn.Module):
    """Head-aware torso radiance field (one of the coarse / fine networks).

    Call: `(x [R, S, 3] points in the world of the first frame's camera, view_dirs [R, 3]
    unit directions, cond [R, C] or [C] landmark feature, head_pose [R, 6] or [6] from
    `head_pose_vector`, head_rgb [R, 3] or [3] (the head rendered over the background;
    required iff torso_color_dim > 0)) -> (sigma [R, S], rgb [R, S, 3])`, activations as in
    `HeadField`. The backbone condition is `[cond, PE(euler), PE(trans), color_encoder(rgb)]`
    (`torso_cond_dim` channels). Params: `mlp`, `color_encoder_{0,1,2}` (3 -> 16 -> 32 ->
    torso_color_dim, LeakyReLU(0.02) between).
    """

    config: NeRFConfig

    @nn.compact
    def __call__(self, x, view_dirs, cond, head_pose, head_rgb=None):
        cfg = self.config
        r, _ = check_points(x, view_dirs, "TorsoField")
        cond = check_per_ray(cond, r, cfg.cond_dim, "TorsoField condition")
        pose = check_per_ray(head_pose, r, 6, "TorsoField head_pose")
        parts = [cond,
                 encodings.positional_encoding(pose[:, :3], cfg.pose_freqs),
                 encodings.positional_encoding(pose[:, 3:], cfg.pose_freqs)]
        if cfg.torso_color_dim > 0:
            if head_rgb is None:
                raise ShapeError("TorsoField: head_rgb [R, 3] is required when "
                                 f"torso_color_dim = {cfg.torso_color_dim} > 0")
            c = check_per_ray(head_rgb, r, 3, "TorsoField head_rgb")
            c = _leaky(Linear(16, name="color_encoder_0")(c))
            c = _leaky(Linear(32, name="color_encoder_1")(c))
            parts.append(Linear(cfg.torso_color_dim, name="color_encoder_2")(c))
        elif head_rgb is not None:
            raise ShapeError("TorsoField: got head_rgb but the config has torso_color_dim = 0")
        full_cond = jnp.concatenate(parts, axis=-1)
        pos_enc = position_features(x, cfg.pos_freqs)
        view_enc = encodings.positional_encoding(jnp.asarray(view_dirs, jnp.float32),
                                                 cfg.view_freqs)
        raw_sigma, raw_rgb = NeRFMLP(cfg, name="mlp")(pos_enc, full_cond, view_enc)
        return _density(raw_sigma, cfg.density_activation), nn.sigmoid(raw_rgb)


# --------------------------------------------------------------------------- rendering

def composite_samples(sigma, rgb, t, dir_norm, background, *,
                      last_sample_background: bool = True) -> RayOutput:
    """Composite one pass with the background handling of the module doc.

    sigma [R, S], rgb [R, S, 3], t [R, S], dir_norm [R], background [R, 3] or [3].
    """
    r = _shape(sigma)[0] if len(_shape(sigma)) == 2 else None
    bg = jnp.asarray(background, jnp.float32)
    if r is None or _shape(bg) not in ((3,), (r, 3)):
        raise ShapeError(f"composite_samples: expected sigma [R, S] and background [3] or "
                         f"[R, 3], got {_shape(sigma)} and {_shape(bg)}")
    out = volume.composite(sigma, rgb, t, dir_norm=dir_norm)
    weights = out.weights
    if last_sample_background:
        weights = weights.at[:, -1].set(0.0)
    fg = jnp.sum(weights[..., None] * rgb, axis=-2)
    acc = jnp.sum(weights, axis=-1)
    depth = jnp.sum(weights * t, axis=-1)
    color = fg + (1.0 - acc)[:, None] * bg
    return RayOutput(rgb=color, fg_rgb=fg, acc=acc, depth=depth, weights=weights, t=t)


def render_rays(coarse_fn: FieldFn, fine_fn: Optional[FieldFn], origins, directions,
                background, *, near, far, num_coarse: int, num_fine: int, key=None,
                noise=None, last_sample_background: bool = True) -> RenderResult:
    """Coarse -> hierarchical fine volume rendering of R rays.

    Args:
      coarse_fn, fine_fn: `(points [R, S, 3], unit view dirs [R, 3]) -> (sigma [R, S],
        rgb [R, S, 3])` (activated; e.g. a bound `HeadField` with its condition closed
        over). `fine_fn` may be None when `num_fine == 0`.
      origins, directions: `[R, 3]` rays from `render.rays` (un-normalised directions,
        t = camera depth).
      background: `[R, 3]` or `[3]` colour behind the person, in [0, 1].
      near, far: scalars or `[R]` ray bounds.
      num_coarse, num_fine: samples per ray (static); the fine pass evaluates
        num_coarse + num_fine points (the sorted union, as in NeRF/GeneFace).
      key: PRNG key for stratified jitter and random pdf samples (training); None =
        deterministic (evaluation).
      noise: explicit uniforms `(u_coarse [R, num_coarse], u_fine [R, num_fine])` used
        instead of `key` (a data-parallel step draws them over the global batch, so the
        render does not depend on the device count).
      last_sample_background: GeneFace's background handling (module doc).

    Returns:
      RenderResult(coarse, fine): RayOutputs with S = num_coarse and num_coarse + num_fine.
    """
    origins = jnp.asarray(origins, jnp.float32)
    directions = jnp.asarray(directions, jnp.float32)
    if len(_shape(origins)) != 2 or origins.shape[-1] != 3 or _shape(directions) != _shape(origins):
        raise ShapeError(f"render_rays: origins and directions must both be [R, 3], got "
                         f"{_shape(origins)} and {_shape(directions)}")
    num_fine = int(num_fine)
    if num_fine > 0 and fine_fn is None:
        raise ValueError("render_rays: num_fine > 0 needs a fine field")
    r = origins.shape[0]
    dir_norm = jnp.linalg.norm(directions, axis=-1)
    view_dirs = directions / jnp.maximum(dir_norm, 1e-12)[:, None]
    k_coarse, k_fine = (None, None) if key is None else tuple(jax.random.split(key))
    u_coarse, u_fine = (None, None) if noise is None else noise

    def run(field_fn, t):
        points = origins[:, None, :] + directions[:, None, :] * t[..., None]
        sigma, rgb = field_fn(points, view_dirs)
        return composite_samples(sigma, rgb, t, dir_norm, background,
                                 last_sample_background=last_sample_background)

    t_coarse = sampling.stratified_samples(near, far, num_coarse, key=k_coarse, num_rays=r,
                                           u=u_coarse)
    coarse = run(coarse_fn, t_coarse)
    fine = None
    if num_fine > 0:
        t_fine = sampling.hierarchical_samples(t_coarse, coarse.weights, num_fine, key=k_fine,
                                               u=u_fine)
        fine = run(fine_fn, t_fine)
    return RenderResult(coarse=coarse, fine=fine)


def composite_person(head: RayOutput, torso: RayOutput, background,
                     order: str = "head_over_torso"):
    """The final pixel colours `[R, 3]` of head, torso and background.

    order="head_over_torso" (default, docs/architecture.md):
        head.fg_rgb + (1 - head.acc) * (torso.fg_rgb + (1 - torso.acc) * background)
    order="torso_over_head" (GeneFace's public code):
        torso.fg_rgb + (1 - torso.acc) * (head.fg_rgb + (1 - head.acc) * background)
    background: `[R, 3]` or `[3]`.
    """
    bg = jnp.asarray(background, jnp.float32)
    r = _shape(head.fg_rgb)[0]
    if _shape(torso.fg_rgb) != (r, 3) or _shape(bg) not in ((3,), (r, 3)):
        raise ShapeError(f"composite_person: head {_shape(head.fg_rgb)} and torso "
                         f"{_shape(torso.fg_rgb)} must be [R, 3] and background [3] or [R, 3], "
                         f"got background {_shape(bg)}")
    if order == "head_over_torso":
        front, back = head, torso
    elif order == "torso_over_head":
        front, back = torso, head
    else:
        raise ValueError(f"composite_person: order must be 'head_over_torso' or "
                         f"'torso_over_head', got {order!r}")
    behind = back.fg_rgb + (1.0 - back.acc)[:, None] * bg
    return front.fg_rgb + (1.0 - front.acc)[:, None] * behind


# --------------------------------------------------------------------------- models

def landmark_condition(head, landmark_windows, smooth):
    """A head model's per-frame condition: its `landmark_encoder` on every frame of the
    windows `[B, W, 68, 3]`, then its `smoother` -> `[B, cond_dim]` (shared by the MLP and
    the grid heads)."""
    shape = _shape(landmark_windows)
    w = head.config.smooth_window
    if len(shape) != 4 or shape[1:] != (w, NUM_LANDMARKS, 3):
        raise ShapeError(f"{type(head).__name__}.condition: expected landmark windows "
                         f"[B, {w}, {NUM_LANDMARKS}, 3], got {shape}")
    return head.smoother(head.landmark_encoder(landmark_windows), smooth)


class HeadNeRF(nn.Module):
    """The head model: landmark encoder, attention smoother, coarse and fine HeadFields.

    Methods (use with `module.apply(variables, ..., method=...)`):
      condition(landmark_windows [B, W, 68, 3], smooth) -> cond [B, cond_dim]
      render(origins [R, 3], directions [R, 3], cond [R, C] or [C], background [R, 3] or
        [3], *, key=None, near=None, far=None, noise=None) -> RenderResult
      __call__(origins, directions, landmark_window [W, 68, 3], background, *,
        smooth=True, key=None, near=None, far=None) -> RenderResult
        (one frame: condition then render; initialises every parameter).
    `smooth` may be traced (`step >= config.smooth_warmup_steps`); near/far default to
    the config's. Params: landmark_encoder, smoother, coarse, fine.
    """

    config: NeRFConfig

    def setup(self):
        self.landmark_encoder = LandmarkEncoder(self.config)
        self.smoother = AttentionSmoother(self.config)
        self.coarse = HeadField(self.config)
        self.fine = HeadField(self.config)

    def condition(self, landmark_windows, smooth=True):
        return landmark_condition(self, landmark_windows, smooth)

    def render(self, origins, directions, cond, background, *, key=None, near=None, far=None,
               noise=None):
        cfg = self.config
        return render_rays(
            lambda x, d: self.coarse(x, d, cond), lambda x, d: self.fine(x, d, cond),
            origins, directions, background,
            near=cfg.near if near is None else near, far=cfg.far if far is None else far,
            num_coarse=cfg.num_coarse, num_fine=cfg.num_fine, key=key, noise=noise,
            last_sample_background=cfg.last_sample_background)

    def __call__(self, origins, directions, landmark_window, background, *, smooth=True,
                 key=None, near=None, far=None):
        if len(_shape(landmark_window)) != 3:
            raise ShapeError(f"HeadNeRF: expected one frame's landmark window "
                             f"[W, {NUM_LANDMARKS}, 3], got {_shape(landmark_window)}")
        cond = self.condition(jnp.asarray(landmark_window)[None], smooth)[0]
        return self.render(origins, directions, cond, background, key=key, near=near, far=far)


class TorsoNeRF(nn.Module):
    """The torso model: coarse and fine TorsoFields (the landmark feature comes from the
    trained head model).

    Call: `(origins [R, 3], directions [R, 3] (rays of the FIRST frame's camera), cond
    [R, C] or [C], head_pose [R, 6] or [6], background [R, 3] or [3], head_rgb [R, 3] or
    None, *, key=None, near=None, far=None, noise=None) -> RenderResult`. Params: coarse,
    fine. (`noise`: see `render_rays`.)
    """

    config: NeRFConfig

    @nn.compact
    def __call__(self, origins, directions, cond, head_pose, background, head_rgb=None, *,
                 key=None, near=None, far=None, noise=None):
        cfg = self.config
        coarse = TorsoField(cfg, name="coarse")
        fine = TorsoField(cfg, name="fine")
        return render_rays(
            lambda x, d: coarse(x, d, cond, head_pose, head_rgb),
            lambda x, d: fine(x, d, cond, head_pose, head_rgb),
            origins, directions, background,
            near=cfg.near if near is None else near, far=cfg.far if far is None else far,
            num_coarse=cfg.num_coarse, num_fine=cfg.num_fine, key=key, noise=noise,
            last_sample_background=cfg.last_sample_background)


def count_params(tree) -> int:
    """Total number of scalars in a pytree of arrays (or ShapeDtypeStructs)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        n = 1
        for d in leaf.shape:
            n *= int(d)
        total += n
    return total
