"""Stage-3 training: the landmark-conditioned head NeRF, then the head-aware torso NeRF.

Data (`PersonViews`): a person dataset seen as frames of rays. Every step takes
`frames_per_step` frames (an epoch-permutation stream over the split, so a resumed run
sees the same data) and `rays_per_frame` pixels of each, `in_rect_percent` of them inside
the frame's sampling rectangle (the face rectangle for the head, the box of the torso mask
for the torso; `render.rays.sample_pixels`' rule, drawn on the host with NumPy).

A batch is a dict with two parts:
  rays   (sharded over devices): rows, cols int32 [R]; frame int32 [R] (index into the
         step's frames); target [R, 3] pixel colour in [0, 1]; background [R, 3].
  frames (replicated): pose [F, 4, 4] camera-to-world; windows [F, W, 68, 3] normalised
         landmark windows; for the torso also torso_pose [F, 4, 4] (the first train
         frame's camera, the torso's world).
R = frames_per_step * rays_per_frame must divide by the device count.

Head step (`make_head_step`): the head is rendered over "everything but the head": the
ground-truth pixel where the mask says torso, the static background elsewhere, so the head
field only has to explain head pixels (as GeneFace's grid renderer composites the head over
the torso image; its MLP head NeRF, `Lm3dNeRFTask`, instead fits `head_img`, the frame with
everything but the head replaced by the background, rendered over the background).
Loss: MSE of the coarse and of the fine colour, each averaged over the global batch
(`parallel.global_mean`, so 1 and N devices give the same gradient). The attention
smoother is switched on at `config.smooth_warmup_steps` (traced on the step).

Torso step (`make_torso_step`): the head model is frozen (`state.frozen['head']`); for each
ray it gives the head's fine render over the static background (colour input of the torso,
GeneFace's `use_color`), its premultiplied foreground and opacity, and the landmark feature
of the frame. The torso field renders the same pixel from the first frame's camera,
conditioned on that feature and the head pose; the loss is the MSE of
`head_fg + (1 - head_acc) (torso_fg + (1 - torso_acc) background)` (coarse and fine torso)
against the ground-truth frame.

Sample jitter is drawn over the global batch (`parallel.global_uniform`), so 1 and N
devices give the same numbers; Adam with exponential decay, `lr * decay_rate ** (step /
decay_steps)`.

Landmarks enter the head model normalised: `(landmarks - mean) / scale` with the person's
mean train landmarks and one scalar, the RMS of the per-coordinate std (`LandmarkNormalizer`):
a scalar keeps coordinates that never move in training from being blown up at inference.
"""

import dataclasses
import json
import pathlib
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from geneface_jax.data import format as fmt
from geneface_jax.data.epochs import epoch_indices
from geneface_jax.errors import CheckpointError, DatasetError, InputError, ShapeError
from geneface_jax.render import fields
from geneface_jax.render import rays as rays_lib
from geneface_jax.render import sharded
from geneface_jax.train import checkpoint as ckpt_lib
from geneface_jax.train import parallel
from geneface_jax.train.state import TrainState, make_optimizer

HEAD, TORSO = "head", "torso"


@dataclasses.dataclass(frozen=True)
class NeRFOptimConfig:
    """Adam `lr` with exponential decay `lr * decay_rate ** (step / decay_steps)`."""
    lr: float = 5e-4
    decay_rate: float = 0.1
    decay_steps: int = 250_000
    clip_norm: Optional[float] = None


@dataclasses.dataclass(frozen=True)
class RaySamplingConfig:
    """frames_per_step x rays_per_frame rays per step; `in_rect_percent` of a frame's rays
    fall inside its sampling rectangle."""
    frames_per_step: int = 1
    rays_per_frame: int = 2048
    in_rect_percent: float = 0.95
    # Head only: share of a frame's rays drawn inside its mouth box (the projected lip
    # landmarks grown by 30 % of their size each side) before the face-rectangle split
    # of the rest. 0 = GeneFace's sampler; a lip-focused share makes the few-thousand-step
    # CPU runs learn the mouth (GeneFace fine-tunes lips separately at the end instead).
    mouth_percent: float = 0.0

    @property
    def rays_per_step(self) -> int:
        return self.frames_per_step * self.rays_per_frame


# --------------------------------------------------------------------------- data

@dataclasses.dataclass(frozen=True)
class LandmarkNormalizer:
    """`(landmarks - mean) / scale`: mean `[68, 3]`, one scalar scale (head units)."""
    mean: np.ndarray
    scale: float

    @classmethod
    def fit(cls, landmarks):
        lms = np.asarray(landmarks, np.float64)
        if lms.ndim != 3 or lms.shape[1:] != (68, 3) or len(lms) < 2:
            raise ShapeError(f"LandmarkNormalizer.fit: expected [N >= 2, 68, 3], got "
                             f"{lms.shape}")
        scale = float(np.sqrt(np.mean(lms.var(0))))
        return cls(mean=lms.mean(0).astype(np.float32), scale=max(scale, 1e-6))

    def __call__(self, landmarks):
        lms = np.asarray(landmarks, np.float32)
        if lms.shape[-2:] != (68, 3):
            raise ShapeError(f"landmarks must be [..., 68, 3], got {lms.shape}")
        if not np.all(np.isfinite(lms)):
            bad = np.argwhere(~np.isfinite(lms.reshape(-1, 68 * 3)).all(-1)).ravel()
            raise InputError(f"landmarks hold NaN or inf values (frames {bad[:5].tolist()}"
                             f"{' ...' if len(bad) > 5 else ''})")
        return ((lms - self.mean) / self.scale).astype(np.float32)

    def save(self, path):
        np.savez(path, mean=self.mean, scale=np.float32(self.scale))

    @classmethod
    def load(cls, path):
        z = np.load(path)
        return cls(mean=z["mean"], scale=float(z["scale"]))


def landmark_windows(landmarks, indices, window: int, lo: int = 0, hi: Optional[int] = None):
    """Windows `[len(indices), window, ...]` of `landmarks [N, ...]` centred on `indices`,
    frames clamped to `[lo, hi)` (edge frames repeat, as at the ends of a sequence)."""
    hi = len(landmarks) if hi is None else hi
    idx = np.asarray(indices)[:, None] + np.arange(window) - window // 2
    return np.asarray(landmarks)[np.clip(idx, lo, hi - 1)]


def _mask_box(mask, label):
    """(x0, y0, x1, y1) half-open box of `mask == label` (the whole image if absent)."""
    ys, xs = np.nonzero(mask == label)
    if len(ys) == 0:
        return np.array([0, 0, mask.shape[1], mask.shape[0]], np.int32)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.int32)


def sample_pixels_np(rng, rect, height, width, num, in_rect_percent):
    """NumPy twin of `render.rays.sample_pixels` (host-side batches): `num` pixels,
    round(num * in_rect_percent) uniformly inside `rect` (x0, y0, x1, y1), the rest
    uniformly outside it (anywhere if it covers the image). Returns (rows, cols) int32."""
    x0, y0, x1, y1 = (int(v) for v in rect)
    x0, y0 = min(max(x0, 0), width - 1), min(max(y0, 0), height - 1)
    x1, y1 = min(max(x1, x0 + 1), width), min(max(y1, y0 + 1), height)
    n_in = int(round(num * in_rect_percent))
    rows = [rng.integers(y0, y1, n_in)]
    cols = [rng.integers(x0, x1, n_in)]
    n_out = num - n_in
    if n_out:
        inside = np.zeros((height, width), bool)
        inside[y0:y1, x0:x1] = True
        outside = np.flatnonzero(~inside.reshape(-1))
        pool = outside if len(outside) else np.arange(height * width)
        pick = pool[rng.integers(0, len(pool), n_out)]
        rows.append(pick // width)
        cols.append(pick % width)
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    perm = rng.permutation(num)
    return rows[perm].astype(np.int32), cols[perm].astype(np.int32)


class PersonViews:
    """A person dataset (`format.load_person`) as frames of rays for stage 3.

    Attributes: frames uint8 [N, H, W, 3], masks uint8 [N, H, W], background float32
    [H, W, 3] in [0, 1], poses [N, 4, 4], intrinsics [4], face_rect [N, 4], landmarks
    [N, 68, 3] (head space), height, width, splits {name: (start, end)}, normalizer.
    """

    def __init__(self, person, normalizer: Optional[LandmarkNormalizer] = None):
        self.frames = np.asarray(person["frames"])
        self.masks = np.asarray(person["masks"])
        self.background = np.asarray(person["background"], np.float32) / 255.0
        self.poses = np.asarray(person["poses"], np.float32)
        self.face_rect = np.asarray(person["face_rect"])
        self.landmarks = np.asarray(person["landmarks"], np.float32)
        meta = person.meta if hasattr(person, "meta") else person["meta"]
        self.meta = meta
        self.intrinsics = np.asarray(meta["intrinsics"], np.float32)
        self.height, self.width = self.frames.shape[1:3]
        self.splits = {k: tuple(v) for k, v in meta["splits"].items()}
        if "train" not in self.splits:
            raise DatasetError("person dataset has no 'train' split")
        lo, hi = self.splits["train"]
        self.normalizer = normalizer or LandmarkNormalizer.fit(self.landmarks[lo:hi])
        self.torso_box = _mask_box(self.masks[lo:hi].max(0) == fmt.TORSO, True)
        lips = np.asarray(person["landmarks_2d"], np.float32)[:, 48:68]
        lo_uv, hi_uv = lips.min(1), lips.max(1)
        grow = 0.3 * (hi_uv - lo_uv)
        self.mouth_rect = np.concatenate(
            [np.floor(lo_uv - grow), np.ceil(hi_uv + grow)], -1).astype(np.int32)

    def split_range(self, split):
        if split not in self.splits:
            raise DatasetError(f"person dataset has no split {split!r} (has "
                               f"{sorted(self.splits)})")
        return self.splits[split]

    def windows(self, indices, window, split="train", landmarks=None):
        """Normalised landmark windows `[len(indices), window, 68, 3]` (clamped to the
        split; `landmarks` replaces the dataset's)."""
        lo, hi = self.split_range(split)
        lms = self.landmarks if landmarks is None else landmarks
        return self.normalizer(landmark_windows(lms, indices, window, lo, hi))

    def head_background(self, t, rows, cols):
        """What the head is composited over: GT pixel on torso, static background elsewhere."""
        gt = self.frames[t, rows, cols].astype(np.float32) / 255.0
        torso = (self.masks[t, rows, cols] == fmt.TORSO)[:, None]
        return np.where(torso, gt, self.background[rows, cols])

    def torso_pose(self):
        """The torso's camera: the first train frame's pose `[4, 4]`."""
        return self.poses[self.split_range("train")[0]]


def make_batch_fn(views: PersonViews, part: str, sampling: RaySamplingConfig, *, window: int,
                  seed: int, split: str = "train"):
    """`get_batch(step) -> batch` (module doc), a pure function of the step."""
    lo, hi = views.split_range(split)
    f, n = sampling.frames_per_step, sampling.rays_per_frame
    h, w = views.height, views.width

    def get_batch(step):
        ts = lo + epoch_indices(seed, step, hi - lo, f)
        rng = np.random.default_rng([seed, 7, int(step)])
        rows, cols, frame, target, bg = [], [], [], [], []
        for i, t in enumerate(ts):
            rect = views.face_rect[t] if part == HEAD else views.torso_box
            n_mouth = int(round(n * sampling.mouth_percent)) if part == HEAD else 0
            r, c = sample_pixels_np(rng, rect, h, w, n - n_mouth, sampling.in_rect_percent)
            if n_mouth:
                rm, cm = sample_pixels_np(rng, views.mouth_rect[t], h, w, n_mouth, 1.0)
                r, c = np.concatenate([rm, r]), np.concatenate([cm, c])
            rows.append(r)
            cols.append(c)
            frame.append(np.full(n, i, np.int32))
            target.append(views.frames[t, r, c].astype(np.float32) / 255.0)
            bg.append(views.head_background(t, r, c) if part == HEAD
                      else views.background[r, c])
        batch = {"rays": {"rows": np.concatenate(rows), "cols": np.concatenate(cols),
                          "frame": np.concatenate(frame),
                          "target": np.concatenate(target).astype(np.float32),
                          "background": np.concatenate(bg).astype(np.float32)},
                 "frames": {"pose": views.poses[ts],
                            "windows": views.windows(ts, window, split)}}
        if part == TORSO:
            batch["frames"]["torso_pose"] = np.broadcast_to(views.torso_pose(),
                                                            (f, 4, 4)).copy()
        return batch

    return get_batch


# --------------------------------------------------------------------------- state & steps

def create_nerf_state(config: fields.NeRFConfig, optim: NeRFOptimConfig, part: str,
                      seed: int, head_variables=None):
    """(model, TrainState) of the head or torso model; the torso's state holds the frozen
    head variables in `frozen['head']`."""
    key = jax.random.PRNGKey(seed)
    k_init, k_state = jax.random.split(key)
    o, d = jnp.zeros((2, 3)), jnp.array([[0.0, 0.0, -1.0]] * 2)
    bg = jnp.zeros((3,))
    if part == HEAD:
        model = fields.HeadNeRF(config)
        win = jnp.zeros((config.smooth_window, 68, 3))
        params = jax.jit(model.init)(k_init, o, d, win, bg)["params"]   # one program
        frozen = None
    elif part == TORSO:
        if head_variables is None:
            raise ValueError("create_nerf_state: the torso needs the trained head variables")
        model = fields.TorsoNeRF(config)
        rgb = jnp.zeros((2, 3)) if config.torso_color_dim else None
        params = jax.jit(model.init)(k_init, o, d, jnp.zeros((config.cond_dim,)),
                                     jnp.zeros((6,)), bg, rgb)["params"]
        frozen = {"head": head_variables}
    else:
        raise ValueError(f"part must be 'head' or 'torso', got {part!r}")
    tx = make_optimizer(optim.lr, decay_rate=optim.decay_rate, decay_steps=optim.decay_steps,
                        clip_norm=optim.clip_norm)
    state = TrainState.create(apply_fn=model.apply, params=params, tx=tx, rng=k_state,
                              frozen=frozen)
    return model, state


def _psnr(mse):
    return -10.0 * jnp.log10(jnp.maximum(mse, 1e-10))


def _ray_noise(key, r, config):
    k1, k2 = jax.random.split(key)
    return (parallel.global_uniform(k1, (r, config.num_coarse)),
            parallel.global_uniform(k2, (r, config.num_fine)))


def _rays(frames, rays, intrinsics, pose_key="pose"):
    pose = frames[pose_key][rays["frame"]]
    return rays_lib.rays_for_pixels(pose, intrinsics, rays["rows"], rays["cols"])


def head_condition(head: fields.HeadNeRF, head_params, windows, smooth):
    """Per-frame landmark features `[F, cond_dim]` of normalised windows `[F, W, 68, 3]`."""
    return head.apply({"params": head_params}, windows, smooth,
                      method=fields.HeadNeRF.condition)


def ray_bounds(meta, config: fields.NeRFConfig, source: str = "dataset", near=None,
               far=None):
    """(near, far) ray bounds of a NeRF run, floats.

    source="dataset": the person dataset's `meta["near"]`/`meta["far"]` (measured by
    preprocessing), the config's where the dataset has none; source="config": the config's
    (0.3 / 0.9 in both presets: GeneFace's fixed `near`/`far` hparams; its `NeRFDataset`
    ignores the processed bounds). Explicit `near`/`far` override either source.
    """
    if source not in RAY_BOUND_SOURCES:
        raise ValueError(f"ray_bounds: source must be one of {RAY_BOUND_SOURCES}, got "
                         f"{source!r}")
    out = []
    for name, given in (("near", near), ("far", far)):
        v = getattr(config, name)
        if given is not None:
            v = given
        elif source == "dataset":
            v = meta.get(name, v)
        out.append(float(v))
    return tuple(out)


RAY_BOUND_SOURCES = ("dataset", "config")


def _ray_intrinsics(intrinsics, config: fields.NeRFConfig, image_size):
    """The intrinsics rays are cast with under `config.pixel_convention`."""
    if config.pixel_convention == "centers":
        return jnp.asarray(intrinsics, jnp.float32)
    if image_size is None:
        raise ValueError(f"pixel_convention={config.pixel_convention!r} needs the image "
                         "size (image_size=(height, width))")
    return rays_lib.ray_intrinsics(intrinsics, int(image_size[0]), int(image_size[1]),
                                   config.pixel_convention)


def make_head_step(model: fields.HeadNeRF, intrinsics, image_size=None):
    """Per-device `train_step(state, batch, rng) -> (state, metrics)` of the head model.
    `image_size` (height, width) is needed by `config.pixel_convention="geneface"`."""
    cfg = model.config
    k = _ray_intrinsics(intrinsics, cfg, image_size)

    def loss_fn(params, batch, key, smooth):
        rays, frames = batch["rays"], batch["frames"]
        cond = head_condition(model, params, frames["windows"], smooth)[rays["frame"]]
        origins, dirs = _rays(frames, rays, k)
        r = origins.shape[0]
        out = model.apply({"params": params}, origins, dirs, cond, rays["background"],
                          noise=_ray_noise(key, r, cfg), method=fields.HeadNeRF.render)
        ones = jnp.ones((r, 1), jnp.float32)
        mse_c = parallel.global_mean(jnp.square(out.coarse.rgb - rays["target"]), ones)
        mse_f = parallel.global_mean(jnp.square(out.fine.rgb - rays["target"]), ones)
        acc = parallel.global_mean(out.fine.acc[:, None], ones)
        return mse_c + mse_f, {"mse_coarse": mse_c, "mse_fine": mse_f, "psnr": _psnr(mse_f),
                               "acc": acc}

    def train_step(state, batch, rng):
        smooth = state.step >= cfg.smooth_warmup_steps
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, batch, rng, smooth)
        metrics["loss"] = loss
        metrics["grad_norm"] = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads)))
        return state.apply_gradients(grads), metrics

    return train_step


def make_torso_step(model: fields.TorsoNeRF, head: fields.HeadNeRF, intrinsics,
                    head_smooth: bool = True, image_size=None):
    """Per-device `train_step(state, batch, rng)` of the torso model (head frozen in
    `state.frozen['head']`; `head_smooth`: whether the head's attention smoother was
    trained, i.e. the head run reached its warm-up, `head_smooth_enabled`; `image_size`
    (height, width): needed by a "geneface" pixel convention)."""
    cfg = model.config
    k_head = _ray_intrinsics(intrinsics, head.config, image_size)
    k = _ray_intrinsics(intrinsics, cfg, image_size)

    def loss_fn(params, head_params, batch, key):
        rays, frames = batch["rays"], batch["frames"]
        bg = rays["background"]
        r = bg.shape[0]
        k_head, k_torso = jax.random.split(key)
        head_out, cond = _frozen_head(head, head_params, frames, rays, k_head, bg,
                                      _ray_noise(k_head, r, head.config), head_smooth)
        origins, dirs = _rays(frames, rays, k, "torso_pose")
        pose = fields.head_pose_vector(frames["pose"])[rays["frame"]]
        out = model.apply({"params": params}, origins, dirs, cond, pose, bg,
                          head_out.rgb if cfg.torso_color_dim else None,
                          noise=_ray_noise(k_torso, r, cfg))
        ones = jnp.ones((r, 1), jnp.float32)
        comp_c = fields.composite_person(head_out, out.coarse, bg)
        comp_f = fields.composite_person(head_out, out.fine, bg)
        mse_c = parallel.global_mean(jnp.square(comp_c - rays["target"]), ones)
        mse_f = parallel.global_mean(jnp.square(comp_f - rays["target"]), ones)
        acc = parallel.global_mean(out.fine.acc[:, None], ones)
        return mse_c + mse_f, {"mse_coarse": mse_c, "mse_fine": mse_f, "psnr": _psnr(mse_f),
                               "torso_acc": acc}

    def train_step(state, batch, rng):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.frozen["head"]["params"], batch, rng)
        metrics["loss"] = loss
        metrics["grad_norm"] = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads)))
        return state.apply_gradients(grads), metrics

    return train_step


def _frozen_head(head, head_params, frames, rays, k, background, noise, smooth):
    """The frozen head's fine render over `background` and the per-ray landmark feature."""
    head_params = jax.lax.stop_gradient(head_params)
    cond_f = head_condition(head, head_params, frames["windows"], smooth)
    cond = cond_f[rays["frame"]]
    origins, dirs = _rays(frames, rays, k)
    out = head.apply({"params": head_params}, origins, dirs, cond, background, noise=noise,
                     method=fields.HeadNeRF.render)
    return jax.lax.stop_gradient(out.final), jax.lax.stop_gradient(cond)


# --------------------------------------------------------------------------- rendering

class FrameRenderer:
    """Renders whole frames with trained head (and torso) variables over every device.

    `render(pose [4, 4], window [W, 68, 3] normalised, torso_pose [4, 4] or None,
    pixels=None)` -> dict of float32 numpy arrays: `rgb [H, W, 3]` (the composited frame,
    or the head over the background without a torso), `head_rgb`, `head_acc [H, W]`, and
    with a torso `torso_acc`. Rays are split over the mesh and chunked
    (`sharded.render_image`). `pixels` (flat indices `row * W + col`) renders only those
    pixels: the others get the static background colour and zero opacity (what an empty
    ray returns), so a region that holds every pixel the person can cover renders the
    same frame for less work.
    `smooth`: use the attention smoother (only if the head run trained it,
    `head_smooth_enabled`); otherwise the window's centre frame conditions the head.
    """

    def __init__(self, head_cfg, head_vars, views_or_meta, *, torso_cfg=None, torso_vars=None,
                 mesh=None, chunk=4096, smooth=True):
        self.head = fields.HeadNeRF(head_cfg)
        self.head_vars = head_vars
        self.torso = fields.TorsoNeRF(torso_cfg) if torso_vars is not None else None
        self.torso_vars = torso_vars
        self.mesh = mesh or parallel.make_mesh()
        self.chunk = chunk
        v = views_or_meta
        self.intrinsics = np.asarray(v.intrinsics, np.float32)
        self.height, self.width = v.height, v.width
        size = (self.height, self.width)
        # what rays are cast with (the configs' pixel conventions; `intrinsics` stays the
        # dataset's)
        self.head_ray_intrinsics = np.asarray(_ray_intrinsics(self.intrinsics, head_cfg, size))
        self.torso_ray_intrinsics = None if torso_vars is None else np.asarray(
            _ray_intrinsics(self.intrinsics, torso_cfg, size))
        self.background = np.asarray(v.background, np.float32)
        self._cond = jax.jit(lambda p, w: head_condition(self.head, p, w, bool(smooth)))
        self._head_fn = _head_render_fn(self.head)
        self._full_fn = _full_render_fn(self.head, self.torso) if self.torso else None
        self._torso_fn = _torso_render_fn(self.torso) if self.torso else None

    def condition(self, windows):
        return np.asarray(self._cond(self.head_vars["params"], jnp.asarray(windows)))

    def render(self, pose, window, torso_pose=None, cond=None, pixels=None, regions=None):
        """Renders one frame (see the class doc; `render_many` for the arguments)."""
        if cond is None:
            cond = self.condition(np.asarray(window)[None])[0]
        out = self.render_many(np.asarray(pose)[None], np.asarray(cond)[None], torso_pose,
                               pixels=pixels, regions=regions)
        return {k: v[0] for k, v in out.items()}

    def render_many(self, poses, conds, torso_pose=None, *, pixels=None, regions=None):
        """Renders F frames in one pass over the devices.

        Args:
          poses: camera-to-world `[F, 4, 4]`; conds: landmark conditions `[F, C]`
            (`condition(windows)`); torso_pose: `[4, 4]` (needed with a torso model).
          pixels: flat indices (`row * W + col`) of the only pixels to trace; the others
            are the background with zero opacity (what an empty ray returns).
          regions: `(head, torso)` boolean `[H, W]` masks of where each model can be
            non-empty: a pixel in both is traced through both models, a pixel in one only
            through that model (the other taken as empty: zero opacity), a pixel in
            neither is the background. With regions that hold every pixel each model
            covers, the frame is the full render's for about half the work.
        Returns:
          dict of float32 `[F, H, W, ...]` arrays: `rgb`, `head_rgb`, `head_acc` and, with
          a torso, `torso_acc`. Several frames per call keep the devices busy on small
          images (the per-call cost is paid once).
        """
        h, w = self.height, self.width
        poses = np.asarray(poses, np.float32).reshape(-1, 4, 4)
        conds = np.asarray(conds, np.float32).reshape(len(poses), -1)
        f = len(poses)
        if regions is not None:
            if self.torso is None:
                raise ValueError("FrameRenderer.render: regions need a torso model")
            head_m, torso_m = (np.asarray(m, bool).reshape(-1) for m in regions)
            if head_m.shape != (h * w,) or torso_m.shape != (h * w,):
                raise ShapeError(f"FrameRenderer.render: regions must be two [{h}, {w}] masks")
            parts = ((np.flatnonzero(head_m & torso_m), self._full_fn),
                     (np.flatnonzero(head_m & ~torso_m), self._head_fn),
                     (np.flatnonzero(torso_m & ~head_m), self._torso_fn))
        else:
            if pixels is None:
                sel = np.arange(h * w)
            else:
                sel = np.asarray(pixels, np.int64)
                if sel.ndim != 1 or not len(sel) or sel.min() < 0 or sel.max() >= h * w:
                    raise ShapeError(f"FrameRenderer.render: pixels must be a non-empty 1-D "
                                     f"array of flat indices in [0, {h * w})")
            parts = ((sel, self._full_fn if self.torso else self._head_fn),)
        if self.torso is not None and torso_pose is None:
            raise ValueError("FrameRenderer.render: a torso model needs torso_pose")
        o, d = (np.asarray(a).reshape(f, -1, 3)
                for a in rays_lib.pixel_rays(jnp.asarray(poses), self.head_ray_intrinsics, h,
                                             w))
        params = {"head": self.head_vars["params"]}
        if self.torso is not None:
            to, td = (np.asarray(a).reshape(-1, 3) for a in
                      rays_lib.pixel_rays(jnp.asarray(torso_pose), self.torso_ray_intrinsics,
                                          h, w))
            params["torso"] = self.torso_vars["params"]
            pose_vec = np.asarray(fields.head_pose_vector(jnp.asarray(poses)), np.float32)
        bg = self.background.reshape(-1, 3)
        res = {"rgb": np.tile(bg, (f, 1, 1)), "head_rgb": np.tile(bg, (f, 1, 1)),
               "head_acc": np.zeros((f, h * w), np.float32)}
        if self.torso is not None:
            res["torso_acc"] = np.zeros((f, h * w), np.float32)
        for sel, fn in parts:
            n = len(sel)
            if not n:
                continue
            rays = {"origins": o[:, sel].reshape(-1, 3), "directions": d[:, sel].reshape(-1, 3),
                    "background": np.tile(bg[sel], (f, 1)),
                    "cond": np.repeat(conds, n, axis=0)}
            if self.torso is not None:
                rays.update(torso_origins=np.tile(to[sel], (f, 1)),
                            torso_directions=np.tile(td[sel], (f, 1)),
                            pose=np.repeat(pose_vec, n, axis=0))
            out = sharded.render_image(fn, rays, params=params, mesh=self.mesh,
                                       chunk=self.chunk)         # numpy, on the host
            for k, v in out.items():
                res[k][:, sel] = np.asarray(v).reshape((f, n) + np.shape(v)[1:])
        return {k: v.reshape((f, h, w) + v.shape[2:]) for k, v in res.items()}


def _head_render_fn(head):
    def fn(params, rays):
        out = head.apply({"params": params["head"]}, rays["origins"], rays["directions"],
                         rays["cond"], rays["background"],
                         method=fields.HeadNeRF.render).final
        return {"rgb": out.rgb, "head_rgb": out.rgb, "head_acc": out.acc}
    return fn


def _full_render_fn(head, torso):
    def fn(params, rays):
        bg = rays["background"]
        h = head.apply({"params": params["head"]}, rays["origins"], rays["directions"],
                       rays["cond"], bg, method=fields.HeadNeRF.render).final
        t = torso.apply({"params": params["torso"]}, rays["torso_origins"],
                        rays["torso_directions"], rays["cond"], rays["pose"], bg,
                        h.rgb if torso.config.torso_color_dim else None).final
        return {"rgb": fields.composite_person(h, t, bg), "head_rgb": h.rgb,
                "head_acc": h.acc, "torso_acc": t.acc}
    return fn


def _torso_render_fn(torso):
    """The torso where the head is empty (zero opacity: its colour is the background)."""
    def fn(params, rays):
        bg = rays["background"]
        t = torso.apply({"params": params["torso"]}, rays["torso_origins"],
                        rays["torso_directions"], rays["cond"], rays["pose"], bg,
                        bg if torso.config.torso_color_dim else None).final
        zero = jnp.zeros(bg.shape[:1], bg.dtype)
        return {"rgb": t.fg_rgb + (1.0 - t.acc)[:, None] * bg, "head_rgb": bg,
                "head_acc": zero, "torso_acc": t.acc}
    return fn


# --------------------------------------------------------------------------- metrics

def psnr(a, b, mask=None):
    """PSNR (dB) between images in [0, 1]; `mask [H, W]` restricts it to a region."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    err = np.square(a - b)
    if mask is not None:
        m = np.asarray(mask, bool)
        err = err[m]
    mse = float(np.mean(err)) if err.size else 0.0
    return float(-10.0 * np.log10(max(mse, 1e-12)))


def ssim(a, b, sigma=1.5, size=11, c1=0.01 ** 2, c2=0.03 ** 2):
    """SSIM of two `[H, W, 3]` images in [0, 1] (Gaussian window 11, sigma 1.5, valid
    region, mean over channels: Wang et al. 2004 with the usual constants)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 3:
        raise ShapeError(f"ssim: expected two [H, W, C] images, got {a.shape}, {b.shape}")
    x = np.arange(size) - size // 2
    g = np.exp(-0.5 * (x / sigma) ** 2)
    g /= g.sum()

    def blur(img):
        v = np.apply_along_axis(lambda s: np.convolve(s, g, "valid"), 0, img)
        return np.apply_along_axis(lambda s: np.convolve(s, g, "valid"), 1, v)

    mu_a, mu_b = blur(a), blur(b)
    s_aa = blur(a * a) - mu_a ** 2
    s_bb = blur(b * b) - mu_b ** 2
    s_ab = blur(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * s_ab + c2)
    den = (mu_a ** 2 + mu_b ** 2 + c1) * (s_aa + s_bb + c2)
    return float(np.mean(num / den))


def rect_mask(rect, height, width):
    """Boolean `[H, W]` of the half-open rectangle (x0, y0, x1, y1)."""
    m = np.zeros((height, width), bool)
    x0, y0, x1, y1 = (int(v) for v in rect)
    m[max(y0, 0):min(y1, height), max(x0, 0):min(x1, width)] = True
    return m


# --------------------------------------------------------------------------- run loading

def read_config(workdir):
    path = pathlib.Path(workdir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{workdir}: no NeRF run here (no config.json)")
    cfg = json.loads(path.read_text())
    if cfg.get("stage") != "nerf":
        raise CheckpointError(f"{workdir}: config.json is a {cfg.get('stage')!r} run, "
                              "not a NeRF run")
    return cfg


def nerf_config_from(run_cfg, key="model"):
    return fields.NeRFConfig(**{k: tuple(v) if isinstance(v, list) else v
                                for k, v in run_cfg[key].items()})


def head_smooth_enabled(config: fields.NeRFConfig, trained_steps: int) -> bool:
    """Whether a head model trained for `trained_steps` has a trained attention smoother
    (the smoother is switched on at `config.smooth_warmup_steps`)."""
    return int(trained_steps) > int(config.smooth_warmup_steps)


def load_nerf(workdir, part):
    """(NeRFConfig, variables {'params'}, run config, LandmarkNormalizer) of a trained
    head or torso run (its last checkpoint); the run config gets `trained_steps`, the
    checkpoint's step."""
    run_cfg = read_config(workdir)
    if run_cfg.get("part") != part:
        raise CheckpointError(f"{workdir}: a {run_cfg.get('part')!r} NeRF run, expected "
                              f"{part!r}")
    cfg = nerf_config_from(run_cfg)
    optim = NeRFOptimConfig(**run_cfg["optim"])

    def template():
        head_vars = None
        if part == TORSO:
            _, head_state = create_nerf_state(nerf_config_from(run_cfg, "head_model"), optim,
                                              HEAD, 0)
            head_vars = {"params": head_state.params}
        return create_nerf_state(cfg, optim, part, 0, head_vars)[1]

    # the restore target is only shapes: nothing is initialised or compiled
    state = jax.eval_shape(template)
    ckpt = ckpt_lib.Checkpointer(pathlib.Path(workdir) / "checkpoints")
    try:
        restored = ckpt.restore(state)
    finally:
        ckpt.close()
    if restored is None:
        raise CheckpointError(f"{workdir}: no checkpoint under {workdir}/checkpoints")
    restored = jax.device_get(restored)
    normalizer = LandmarkNormalizer.load(pathlib.Path(workdir) / "landmark_norm.npz")
    run_cfg = dict(run_cfg, trained_steps=int(restored.step))
    return cfg, {"params": restored.params}, run_cfg, normalizer
