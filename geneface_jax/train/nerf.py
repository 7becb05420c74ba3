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
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from geneface_jax.data import format as fmt
from geneface_jax.data.epochs import epoch_indices
from geneface_jax.errors import DatasetError
from geneface_jax.render import fields
from geneface_jax.render import rays as rays_lib
from geneface_jax.render.frames import (HEAD, TORSO, LandmarkNormalizer, head_condition,
                                        init_nerf, landmark_windows, _ray_intrinsics)
from geneface_jax.train import parallel
from geneface_jax.train.state import TrainState, make_optimizer


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

def _mask_box(mask, label):
    """(x0, y0, x1, y1) half-open box of `mask == label` (the whole image if absent)."""
    ys, xs = np.nonzero(mask == label)
    if len(ys) == 0:
        return np.array([0, 0, mask.shape[1], mask.shape[0]], np.int32)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.int32)


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
            r, c = rays_lib.sample_pixels(rng, rect, h, w, n - n_mouth, sampling.in_rect_percent)
            if n_mouth:
                rm, cm = rays_lib.sample_pixels(rng, views.mouth_rect[t], h, w, n_mouth, 1.0)
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
    if part == TORSO and head_variables is None:
        raise ValueError("create_nerf_state: the torso needs the trained head variables")
    model, params = init_nerf(config, part, k_init)
    frozen = {"head": head_variables} if part == TORSO else None
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
    head_k = _ray_intrinsics(intrinsics, head.config, image_size)
    k = _ray_intrinsics(intrinsics, cfg, image_size)

    def loss_fn(params, head_params, batch, key):
        rays, frames = batch["rays"], batch["frames"]
        bg = rays["background"]
        r = bg.shape[0]
        k_head, k_torso = jax.random.split(key)
        head_out, cond = _frozen_head(head, head_params, frames, rays, head_k, bg,
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
