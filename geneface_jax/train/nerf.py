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

Runs: `train_nerf(config, workdir, part, data, head)` is a whole head or torso run (the
`train_nerf` command; `config` is experiments/configs/nerf.py's, `model_config` turns its
`model` into a NeRFConfig), `evaluate_nerf` scores trained runs on held-out frames
(`eval_nerf`).

Landmarks enter the head model normalised: `(landmarks - mean) / scale` with the person's
mean train landmarks and one scalar, the RMS of the per-coordinate std (`LandmarkNormalizer`):
a scalar keeps coordinates that never move in training from being blown up at inference.
"""

import dataclasses
import json
import pathlib
import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from geneface_jax import checkpoint as ckpt_lib
from geneface_jax import files
from geneface_jax.checkpoint import Checkpointer
from geneface_jax.data import format as fmt
from geneface_jax.data import landmarks as lm
from geneface_jax.data.epochs import epoch_indices
from geneface_jax.errors import DatasetError, InputError
from geneface_jax.mesh import DATA_AXIS, make_mesh
from geneface_jax.render import fields
from geneface_jax.render import grid_fields
from geneface_jax.render import image_metrics as im
from geneface_jax.render import rays as rays_lib
from geneface_jax.render.frames import (HEAD, TORSO, FrameRenderer, LandmarkNormalizer,
                                        _ray_intrinsics, check_image_size, head_condition,
                                        head_smooth_enabled,
                                        init_nerf, landmark_windows, load_nerf)
from geneface_jax.train import loop as loop_lib
from geneface_jax.train import metrics as metrics_lib
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
    # Head only: share of a frame's rays drawn inside its eye box (the eye landmarks 36-47
    # grown by 20 % of their width each side), and share of the frames drawn whose eyes
    # are closing (`PersonViews.closing_eye_frames`) in place of the epoch's frame. A blink
    # is a few frames of a video and a few pixels of each: without these the few-thousand
    # step runs never learn it and every rendered blink is lost. 0 = GeneFace's sampler.
    eye_percent: float = 0.0
    blink_frame_percent: float = 0.0

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


def _grown_boxes(points, share, by_width=False):
    """`[N, P, 2]` pixel points -> int32 `[N, 4]` (x0, y0, x1, y1): each frame's bounding box
    grown each side by `share` of its size per axis (of its width on both with
    `by_width`), rounded outwards."""
    lo, hi = points.min(1), points.max(1)
    size = hi - lo
    grow = share * (size[:, :1] if by_width else size)
    return np.concatenate([np.floor(lo - grow), np.ceil(hi + grow)], -1).astype(np.int32)


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
        self.landmarks_2d = np.asarray(person["landmarks_2d"], np.float32)
        self.mouth_rect = _grown_boxes(self.landmarks_2d[:, 48:68], 0.3)
        # grown by a share of the width both ways: an eye box is flat
        self.eye_rect = _grown_boxes(self.landmarks_2d[:, 36:48], 0.2, by_width=True)

    def closing_eye_frames(self, split="train", drop=0.75):
        """Frames of `split` (dataset indices, int `[K]`) whose eye aspect ratio
        (`landmarks.eye_aspect_ratio`, head-space landmarks) is below `drop` x the split's
        median: the frames of the video's blinks."""
        lo, hi = self.split_range(split)
        ear = lm.eye_aspect_ratio(self.landmarks[lo:hi])
        return lo + np.flatnonzero(ear < drop * np.median(ear))

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

    head = part == HEAD
    closing = (views.closing_eye_frames(split)
               if head and sampling.blink_frame_percent > 0 else np.zeros(0, np.int64))

    def get_batch(step):
        ts = lo + epoch_indices(seed, step, hi - lo, f)
        rng = np.random.default_rng([seed, 7, int(step)])
        if len(closing):
            swap = rng.random(f) < sampling.blink_frame_percent
            ts = np.where(swap, rng.choice(closing, f), ts)
        rows, cols, frame, target, bg = [], [], [], [], []
        for i, t in enumerate(ts):
            rect = views.face_rect[t] if head else views.torso_box
            n_mouth = int(round(n * sampling.mouth_percent)) if head else 0
            n_eye = int(round(n * sampling.eye_percent)) if head else 0
            r, c = rays_lib.sample_pixels(rng, rect, h, w, n - n_mouth - n_eye,
                                          sampling.in_rect_percent)
            for box, k in ((views.mouth_rect[t], n_mouth), (views.eye_rect[t], n_eye)):
                if k:
                    rb, cb = rays_lib.sample_pixels(rng, box, h, w, k, 1.0)
                    r, c = np.concatenate([rb, r]), np.concatenate([cb, c])
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
                            "windows": views.windows(ts, window, split),
                            # the grid renderer's per-frame codes and ambient regulariser
                            "code_index": (ts - lo).astype(np.int32),
                            "face_rect": views.face_rect[ts].astype(np.int32)}}
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


def ray_bounds(meta, config: fields.NeRFConfig, source: str = "dataset"):
    """(near, far) ray bounds of a NeRF run, floats.

    source="dataset": the person dataset's `meta["near"]`/`meta["far"]` (measured by
    preprocessing), the config's where the dataset has none; source="config": the config's
    (0.3 / 0.9 in every preset: GeneFace's fixed `near`/`far` hparams; its `NeRFDataset`
    ignores the processed bounds).
    """
    if source not in RAY_BOUND_SOURCES:
        raise ValueError(f"ray_bounds: source must be one of {RAY_BOUND_SOURCES}, got "
                         f"{source!r}")
    if source == "config":
        return float(config.near), float(config.far)
    return float(meta.get("near", config.near)), float(meta.get("far", config.far))


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


# --------------------------------------------------------------------------- grid renderer

@dataclasses.dataclass(frozen=True)
class GridOptimConfig:
    """GeneFace's RAD-NeRF optimiser: Adam (eps 1e-15) at `lr` for the networks,
    `grid_lr_scale` x lr for the grid tables and `smoother_lr_scale` x lr for the attention
    smoother, all decaying as `decay_rate ** (step / decay_steps)`. Loss weights: weight
    entropy `lambda_entropy` (1e-4), ambient regulariser `lambda_ambient` (0.1) on rays
    outside the face rectangle, ramped up linearly over `ambient_ramp_steps` (250k)."""
    lr: float = 5e-4
    grid_lr_scale: float = 10.0
    smoother_lr_scale: float = 5.0
    decay_rate: float = 0.1
    decay_steps: int = 250_000
    lambda_entropy: float = 1e-4
    lambda_ambient: float = 0.1
    ambient_ramp_steps: int = 250_000


def _param_group(path):
    keys = [getattr(k, "key", str(k)) for k in path]
    if "table" in keys:
        return "grid"
    if "smoother" in keys:
        return "smoother"
    return "net"


def make_grid_optimizer(optim: GridOptimConfig, params):
    """Adam per parameter group (`GridOptimConfig`)."""

    def adam(scale):
        sched = lambda step: optim.lr * scale * optim.decay_rate ** (        # noqa: E731
            step / optim.decay_steps)
        return optax.adam(sched, eps=1e-15)

    labels = jax.tree_util.tree_map_with_path(lambda p, _: _param_group(p), params)
    return optax.multi_transform({"grid": adam(optim.grid_lr_scale),
                                  "smoother": adam(optim.smoother_lr_scale),
                                  "net": adam(1.0)}, labels)


def create_grid_state(config: grid_fields.GridConfig, optim: GridOptimConfig, part: str,
                      seed: int, head_variables=None):
    """(model, TrainState) of the grid head (its occupancy collection in `batch_stats`) or
    the grid torso (the frozen head's variables in `frozen['head']`)."""
    k_init, k_state = jax.random.split(jax.random.PRNGKey(seed))
    if part == TORSO and head_variables is None:
        raise ValueError("create_grid_state: the torso needs the trained head variables")
    model, variables = grid_fields.init_grid(config, part, k_init)
    state = TrainState.create(apply_fn=model.apply, params=variables["params"],
                              tx=make_grid_optimizer(optim, variables["params"]),
                              rng=k_state, batch_stats=variables.get("occupancy"),
                              frozen={"head": head_variables} if part == TORSO else None)
    return model, state


def _in_rects(rows, cols, rects):
    """Whether pixels lie in their frame's (x0, y0, x1, y1) rectangle `[R]` bool."""
    return ((cols >= rects[:, 0]) & (cols < rects[:, 2]) & (rows >= rects[:, 1])
            & (rows < rects[:, 3]))


def _binary_entropy(acc):
    a = jnp.clip(acc, 1e-5, 1.0 - 1e-5)
    return -a * jnp.log2(a) - (1.0 - a) * jnp.log2(1.0 - a)


def make_grid_head_step(model: grid_fields.GridHeadNeRF, optim: GridOptimConfig, intrinsics,
                        image_size=None):
    """Per-device `train_step(state, batch, rng)` of the grid head: every
    `occupancy_every` steps the occupancy grid is updated first (under the condition of the
    step's first frame), then one render of the rays over "everything but the head" (as
    the MLP head) and the loss MSE + lambda_entropy * binary entropy of the opacity +
    ramped lambda_ambient * weighted |ambient| outside the face rectangle."""
    cfg = model.config
    k = _ray_intrinsics(intrinsics, cfg, image_size)

    def loss_fn(params, occupancy, batch, key, smooth, amb_weight):
        rays, frames = batch["rays"], batch["frames"]
        variables = {"params": params, "occupancy": occupancy}
        cond = head_condition(model, params, frames["windows"], smooth)[rays["frame"]]
        code = model.apply(variables, frames["code_index"],
                           method=grid_fields.GridHeadNeRF.codes)[rays["frame"]]
        origins, dirs = _rays(frames, rays, k)
        r = origins.shape[0]
        u = parallel.global_uniform(key, (r, cfg.num_samples))
        out, amb = model.apply(variables, origins, dirs, cond, rays["background"], code,
                               noise=u, return_ambient=True,
                               method=grid_fields.GridHeadNeRF.render)
        out = out.coarse
        ones = jnp.ones((r, 1), jnp.float32)
        mse = parallel.global_mean(jnp.square(out.rgb - rays["target"]), ones)
        ent = parallel.global_mean(_binary_entropy(out.acc)[:, None], ones)
        outside = ~_in_rects(rays["rows"], rays["cols"], frames["face_rect"][rays["frame"]])
        amb_out = parallel.global_mean((amb * outside)[:, None], ones)
        loss = mse + optim.lambda_entropy * ent + amb_weight * amb_out
        return loss, {"mse": mse, "psnr": _psnr(mse), "entropy": ent, "ambient": amb_out,
                      "acc": parallel.global_mean(out.acc[:, None], ones)}

    def train_step(state, batch, rng):
        k_occ, k_loss = jax.random.split(rng)
        smooth = state.step >= cfg.smooth_warmup_steps

        def update(_):
            cond0 = head_condition(model, state.params, batch["frames"]["windows"][:1],
                                   smooth)[0]
            return grid_fields.update_occupancy(
                grid_fields.head_density(model, state.params, jax.lax.stop_gradient(cond0)),
                state.batch_stats, k_occ, cfg, state.step // cfg.occupancy_every)

        occupancy = jax.lax.cond(state.step % cfg.occupancy_every == 0, update,
                                 lambda _: state.batch_stats, None)
        amb_weight = optim.lambda_ambient * jnp.minimum(
            state.step.astype(jnp.float32) / max(optim.ambient_ramp_steps, 1), 1.0)
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, occupancy, batch, k_loss, smooth, amb_weight)
        metrics["loss"] = loss
        metrics["occupied"] = jnp.mean(occupancy["bits"])
        return state.apply_gradients(grads, batch_stats=occupancy), metrics

    return train_step


def make_grid_torso_step(model: grid_fields.GridTorso, head: grid_fields.GridHeadNeRF,
                         intrinsics, head_smooth: bool = True, image_size=None):
    """Per-device `train_step(state, batch, rng)` of the 2-D torso: the frozen grid head
    renders each ray in its frame's camera; the loss is the MSE of `head_fg + (1 -
    head_acc) (alpha rgb + (1 - alpha) background)` against the frame."""
    head_k = _ray_intrinsics(intrinsics, head.config, image_size)
    h, w = image_size

    def loss_fn(params, head_vars, batch, key):
        rays, frames = batch["rays"], batch["frames"]
        bg = rays["background"]
        r = bg.shape[0]
        head_vars = jax.lax.stop_gradient(head_vars)
        cond = head_condition(head, head_vars["params"], frames["windows"],
                              head_smooth)[rays["frame"]]
        origins, dirs = _rays(frames, rays, head_k)
        u = parallel.global_uniform(key, (r, head.config.num_samples))
        head_out = head.apply(head_vars, origins, dirs, cond, bg, noise=u,
                              method=grid_fields.GridHeadNeRF.render).coarse
        head_out = jax.lax.stop_gradient(head_out)
        pose = grid_fields.torso_pose_vector(frames["pose"], model.config)[rays["frame"]]
        code = None
        if model.config.torso_code_dim:
            code = model.apply({"params": params}, frames["code_index"],
                               method=grid_fields.GridTorso.codes)[rays["frame"]]
        uv = grid_fields.pixel_uv(rays["rows"], rays["cols"], h, w,
                                  model.config.torso_inputs)
        alpha, rgb, _ = model.apply({"params": params}, uv, pose, code)
        comp = grid_fields.composite_over_torso(head_out, alpha, rgb, bg)
        ones = jnp.ones((r, 1), jnp.float32)
        mse = parallel.global_mean(jnp.square(comp - rays["target"]), ones)
        return mse, {"mse": mse, "psnr": _psnr(mse),
                     "torso_alpha": parallel.global_mean(alpha[:, None], ones)}

    def train_step(state, batch, rng):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.frozen["head"], batch, rng)
        metrics["loss"] = loss
        return state.apply_gradients(grads), metrics

    return train_step


def grid_model_config(model, *, near_far=None, head=None, num_codes=1):
    """The `model` section of a grid config (`experiments/configs/grid.py`: every field of
    `GridConfig`) as a GridConfig with `num_codes` per-frame codes; `near_far` replaces the
    bounds and a torso takes the head run's condition sizes and pixel convention."""
    return model_config(model, near_far=near_far, head=head,
                        config_class=grid_fields.GridConfig, num_codes=int(num_codes))


# --------------------------------------------------------------------------- runs

def model_config(model, *, near_far=None, head=None, config_class=fields.NeRFConfig,
                 **fixed):
    """The `model` section of a stage-3 config (`experiments/configs/nerf.py`: every field
    of `NeRFConfig`; `config_class` another config, e.g. the grid's, with `fixed` values)
    as a config; `near_far` replaces the bounds, and a torso takes the head run's
    `cond_dim`, `smooth_window` and `pixel_convention`. InputError naming what is wrong
    when the values make no model."""
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in dict(model).items()}
    values.update(fixed)
    if near_far is not None:
        values["near"], values["far"] = near_far
    if head is not None:
        values.update(cond_dim=head.cond_dim, smooth_window=head.smooth_window,
                      pixel_convention=head.pixel_convention)
        if hasattr(head, "eye_feature"):
            values["eye_feature"] = head.eye_feature
    try:
        return config_class(**values)
    except (TypeError, ValueError) as e:
        raise InputError(f"config.model: {e}") from e


def train_nerf(config, workdir, part, data=None, head=None, *, mesh=None):
    """Trains (or resumes) the head or the torso NeRF: the `train_nerf` run.

    Head (`make_head_step`): every step draws `frames_per_step` training frames and `rays`
    rays among them, `in_rect_percent` inside each frame's face rectangle (`mouth_percent`
    in its mouth box and `eye_percent` in its eye box first; `blink_frame_percent` of the
    frames drawn among those whose eyes are closing); the head is rendered over the
    ground-truth torso and the static background. Torso (`make_torso_step`): the head
    run's model is frozen; rays (`in_rect_percent` in the box of the torso mask) are
    rendered by the head in the frame's camera and by the torso in the first frame's
    camera, composited head over torso over background. Adam with exponential decay,
    data-parallel over rays.

    Args:
      config: `experiments/configs/nerf.py`'s ConfigDict (model, bounds, head, torso, eval,
        seed, run: steps (head) / torso_steps / log_every / checkpoint_every / eval_every).
      workdir: run directory; an existing run of the same configuration is resumed, one of
        another is refused before anything is written.
      part: "head" or "torso".
      data: the person dataset (default for the torso: the head run's).
      head: the trained head run's workdir (the torso's, required).
      mesh: the device mesh rays are split over (default: every device).
    Writes config.json (what `render.frames.load_nerf` reads: stage, part, model, data,
    head), landmark_norm.npz, checkpoints, metrics.jsonl and metrics.json.
    Returns:
      the final metrics: `train_*` of the last logged step, `eval_psnr` of `eval.frames`
      held-out frames (head: over the ground-truth torso; torso: the composited frame),
      steps, part, resumed_from, steps_per_s, rays_per_s, train_minutes, minutes, devices.
    """
    t0 = time.time()
    if part not in (HEAD, TORSO):
        raise InputError(f"train_nerf: part must be {HEAD!r} or {TORSO!r}, got {part!r}")
    head_cfg = head_vars = head_run = normalizer = None
    if part == TORSO:
        if head is None:
            raise InputError("train_nerf: the torso needs the trained head run (head=)")
        head_cfg, head_vars, head_run, normalizer = load_nerf(head, HEAD)
        data = data or head_run["data"]
    elif data is None:
        raise InputError("train_nerf: the head needs a person dataset (data=)")
    renderer = config.get("renderer", "mlp")
    grid = renderer == grid_fields.RENDERER
    if head_run is not None and head_run.get("renderer", "mlp") != renderer:
        raise InputError(f"train_nerf: the head run {head} is a "
                         f"{head_run.get('renderer', 'mlp')} renderer's; this torso config "
                         f"is the {renderer} renderer's (--model={head_run.get('renderer', 'mlp')}"
                         " trains the matching torso)")
    person = fmt.load_person(data)
    views = PersonViews(person, normalizer)
    if config.bounds not in RAY_BOUND_SOURCES:
        raise InputError(f"config.bounds must be one of {RAY_BOUND_SOURCES}, got "
                         f"{config.bounds!r}")
    if grid:
        lo_t, hi_t = views.split_range("train")
        cfg = grid_model_config(config.model, head=head_cfg, num_codes=hi_t - lo_t)
        cfg = grid_model_config(config.model, near_far=ray_bounds(person.meta, cfg,
                                                                  config.bounds),
                                head=head_cfg, num_codes=hi_t - lo_t)
    else:
        cfg = model_config(config.model)
        cfg = model_config(config.model, near_far=ray_bounds(person.meta, cfg, config.bounds),
                           head=head_cfg)

    mesh = mesh or make_mesh()
    n_dev = mesh.shape[DATA_AXIS]
    p = config[part]
    fps, rays = int(p.frames_per_step), int(p.rays)
    if fps < 1 or rays < 1 or rays % (fps * n_dev):
        raise InputError(f"config.{part}.rays={rays} must be a positive multiple of "
                         f"frames_per_step x devices = {fps} x {n_dev}")
    sampling = RaySamplingConfig(frames_per_step=fps, rays_per_frame=rays // fps,
                                 in_rect_percent=p.in_rect_percent,
                                 **{k: p.get(k, 0.0) if part == HEAD else 0.0
                                    for k in ("mouth_percent", "eye_percent",
                                              "blink_frame_percent")})
    if grid:
        optim = GridOptimConfig(lr=p.lr, decay_rate=p.lr_decay, decay_steps=p.lr_decay_steps,
                                **{k: p[k] for k in ("grid_lr_scale", "smoother_lr_scale",
                                                     "lambda_entropy", "lambda_ambient",
                                                     "ambient_ramp_steps") if k in p})
    else:
        optim = NeRFOptimConfig(lr=p.lr, decay_rate=p.lr_decay, decay_steps=p.lr_decay_steps)
    get_batch = make_batch_fn(views, part, sampling, window=cfg.smooth_window,
                              seed=config.seed)
    steps = int(config.run.steps if part == HEAD else config.run.torso_steps)
    run = dict(steps=steps, log_every=config.run.log_every,
               checkpoint_every=config.run.checkpoint_every, eval_every=config.run.eval_every)
    run_cfg = dict(stage="nerf", part=part, renderer=renderer, model=dataclasses.asdict(cfg),
                   bounds=config.bounds, data=str(pathlib.Path(data).absolute()),
                   seed=config.seed, sampling=dataclasses.asdict(sampling),
                   optim=dataclasses.asdict(optim),
                   head=str(pathlib.Path(head).absolute()) if head_run else None,
                   head_model=head_run["model"] if head_run else None,
                   eval=config.eval.to_dict(), run=run,
                   image_size=[int(views.height), int(views.width)])
    if head_run is not None:
        check_image_size(head_run, views.height, views.width, f"train_nerf: head run {head}")
    workdir = loop_lib.prepare_workdir(workdir, run_cfg, run_controls=("run", "eval"))
    if parallel.is_main_process():
        views.normalizer.save(workdir / "landmark_norm.npz")
    size = (views.height, views.width)
    head_smooth = head_run is not None and head_smooth_enabled(head_cfg,
                                                               head_run["trained_steps"])
    if grid and part == HEAD:
        model, state = create_grid_state(cfg, optim, HEAD, config.seed)
        step_fn = make_grid_head_step(model, optim, views.intrinsics, size)
    elif grid:
        model, state = create_grid_state(cfg, optim, TORSO, config.seed, head_vars)
        step_fn = make_grid_torso_step(model, grid_fields.GridHeadNeRF(head_cfg),
                                       views.intrinsics, head_smooth, size)
    elif part == HEAD:
        model, state = create_nerf_state(cfg, optim, HEAD, config.seed)
        step_fn = make_head_step(model, views.intrinsics, size)
    else:
        model, state = create_nerf_state(cfg, optim, TORSO, config.seed, head_vars)
        step_fn = make_torso_step(model, fields.HeadNeRF(head_cfg), views.intrinsics,
                                  head_smooth, size)

    split = "valid" if "valid" in views.splits else "train"
    lo, hi = views.split_range(split)
    eval_ts = np.unique(np.linspace(lo, hi - 1, max(1, config.eval.frames)).round()
                        .astype(int))

    def evaluate(st, step):
        params = {"params": jax.device_get(st.params)}
        if grid and part == HEAD:
            params["occupancy"] = jax.device_get(st.batch_stats)
        if part == HEAD:
            r = FrameRenderer(cfg, params, views, mesh=mesh, chunk=config.eval.chunk,
                              smooth=head_smooth_enabled(cfg, step))
        else:
            r = FrameRenderer(head_cfg, head_vars, views, torso_cfg=cfg, torso_vars=params,
                              mesh=mesh, chunk=config.eval.chunk, smooth=head_smooth)
        scores = []
        for t in eval_ts:
            out = r.render(views.poses[t], views.windows([t], cfg.smooth_window, split)[0],
                           views.torso_pose())
            gt = views.frames[t].astype(np.float32) / 255.0
            pred = out["rgb"] if part == TORSO else _over_gt_torso(views, t, out, gt)
            scores.append(im.psnr(pred, gt))
        return {"psnr": float(np.mean(scores))}

    ck = Checkpointer(workdir / "checkpoints")
    # the step the loop resumes from: the newest intact checkpoint (damaged ones are moved
    # aside by the loop)
    start_step = next((s for s in sorted(ck.all_steps(), reverse=True)
                       if not ckpt_lib.damage(ck.step_dir(s))), 0)
    ck.close()
    start = time.time()
    state, last = loop_lib.train_configured(
        run=config.run, run_config=run_cfg, run_controls=("run", "eval"), workdir=workdir,
        state=state, step_fn=step_fn, get_batch=get_batch, num_steps=steps, mesh=mesh,
        eval_fn=evaluate, name=f"{part} nerf ", replicated=("frames",))
    train_s = max(time.time() - start, 1e-9)
    ran = max(steps - start_step, 0)
    final = evaluate(state, steps)
    sps = ran / train_s if ran else float("nan")
    out = dict(**{f"train_{k}": v for k, v in last.items() if not k.startswith("eval_")},
               eval_psnr=final["psnr"], steps=steps, part=part, resumed_from=start_step,
               steps_per_s=sps, rays_per_s=sps * rays,
               # Wall-clock of the training loop; a resumed run extrapolates the whole
               # run's time from this invocation's speed.
               train_minutes=(train_s / 60.0 if start_step == 0 or not ran
                              else steps / sps / 60.0),
               minutes=(time.time() - t0) / 60.0, devices=n_dev)
    metrics_lib.write_final_metrics(workdir, out)
    return out


def _over_gt_torso(views, t, out, gt):
    """A head-only render re-composited over the ground-truth torso (what the head trains
    on): the head over the frame's torso pixels and the static background elsewhere."""
    under = np.where((views.masks[t] == fmt.TORSO)[..., None], gt, views.background)
    return out["rgb"] + (1.0 - out["head_acc"][..., None]) * (under - views.background)


def evaluate_nerf(head, workdir, torso=None, data=None, split="valid", max_frames=0,
                  mouth_margin=3, chunk=4096, save_frames=False, mesh=None, track=True,
                  head_samples=0, frames_per_call=8):
    """Scores trained NeRFs on held-out frames: the `eval_nerf` run.

    Every frame of `split` (`max_frames` evenly spaced ones when > 0) is rendered from its
    pose and tracked landmarks, head over torso over the static background (without
    `torso`: the head over the ground-truth torso), and compared with the ground truth.

    Args:
      head, torso: workdirs of the head run and (optional) the torso run.
      workdir: where metrics.json (and with `save_frames` frames.npz: predictions, ground
        truth, indices, the two mouth-control renders, uint8; and frames.png: six evenly
        spaced renders over their ground truth, 3x nearest-neighbour) go.
      data: the person dataset (default: the head run's).
      mouth_margin: pixels added around the mouth box of the mouth-control ratio.
      chunk, mesh: rays per device rendered at once; the devices (default: all).
      track: also track renders and ground truth with the face tracker
        (`render.face_tracking`, needs the face models; checked before rendering).
      head_samples: samples per ray of a grid head (0: as trained;
        `FrameRenderer.set_head_samples`), recorded as `head_samples` in the metrics.
      frames_per_call: held-out frames rendered per renderer call (`render_many`; 8, as
        synthesis renders them: a call's fixed cost is shared), recorded in the metrics;
        each frame is rendered as it would be alone (per-frame hit masks).
    Returns:
      psnr_head (face rectangle, pooled MSE), psnr_full, ssim_full (mean over frames),
      psnr_eyes, psnr_mouth, psnr_neck (pooled over `image_metrics.region_rects`' boxes
      from each frame's landmarks), render_fps (whole frames, head and torso, in calls of
      `frames_per_call` frames; the frames are rendered twice and the second pass timed,
      so compiling is excluded),
      mouth_control_ratio (the first frame rendered with the most closed and the most open
      training mouth: mean change inside the mouth box over the mean change outside) with
      mouth_change_inside/outside and mouth_control_frames, train_minutes (head + torso
      metrics.json), frames, split, torso, minutes; with `track` the tracker figures
      prefixed `tracked_` (face_found, face_found_reference, lmd_mouth, lmd_face and their
      `_512` forms, mouth_r, frames_both) and their H.264 noise floor `floor_*`
      (docs/tracking_metric.md); also written to metrics.json.
    """
    if frames_per_call < 1:
        raise InputError(f"eval_nerf: frames_per_call must be >= 1, got {frames_per_call}")
    t_start = time.time()
    tracker = None
    if track:                              # missing face models fail before any rendering
        from geneface_jax.render import face_tracking
        tracker = face_tracking.FrameTracker()
    head_cfg, head_vars, head_run, normalizer = load_nerf(head, HEAD)
    torso_cfg = torso_vars = torso_run = None
    if torso:
        torso_cfg, torso_vars, torso_run, _ = load_nerf(torso, TORSO)
        if torso_run.get("head") != str(pathlib.Path(head).absolute()):
            print(f"warning: the torso run was trained with head {torso_run.get('head')}, "
                  f"evaluating with {head}", file=sys.stderr)
    views = PersonViews(fmt.load_person(data or head_run["data"]), normalizer)
    for run_cfg, name in ((head_run, head), (torso_run if torso else None, torso)):
        if run_cfg is not None:
            check_image_size(run_cfg, views.height, views.width, f"eval_nerf: {name}")
    renderer = FrameRenderer(head_cfg, head_vars, views, torso_cfg=torso_cfg,
                             torso_vars=torso_vars, mesh=mesh, chunk=chunk,
                             smooth=head_smooth_enabled(head_cfg, head_run["trained_steps"]))
    renderer.set_head_samples(head_samples)
    lo, hi = views.split_range(split)
    ts = np.arange(lo, hi)
    if max_frames and len(ts) > max_frames:
        ts = ts[np.unique(np.linspace(0, len(ts) - 1, max_frames).round().astype(int))]
    torso_pose = views.torso_pose()

    def render_many(frame_ids, landmarks=None):
        frame_ids = np.asarray(frame_ids)
        conds = renderer.condition(views.windows(frame_ids, head_cfg.smooth_window, split,
                                                 landmarks))
        out = renderer.render_many(views.poses[frame_ids], conds, torso_pose)
        if torso_vars is None:
            return [_over_gt_torso(views, t, {k: v[i] for k, v in out.items()},
                                   views.frames[t].astype(np.float32) / 255.0)
                    for i, t in enumerate(frame_ids)]
        return list(out["rgb"])

    def render(t, landmarks=None):
        return render_many([t], landmarks)[0]

    sq_head, n_head, sq_full, n_full, ssims, preds = 0.0, 0, 0.0, 0, [], []
    sq_region = {k: [0.0, 0] for k in im.REGIONS}
    calls = [ts[i:i + frames_per_call] for i in range(0, len(ts), frames_per_call)]
    # Two passes: the first compiles the renderers of every call's ray count (not part of
    # render_fps), the second is timed and scored (the same frames: rendering is
    # deterministic).
    render_s = 0.0
    bar = tqdm(total=2 * len(ts), desc="eval_nerf", unit="frame", file=sys.stderr)
    for timed in (False, True):
        rendered = []
        for call in calls:
            start = time.perf_counter()
            rendered += zip(call, render_many(call))
            render_s += (time.perf_counter() - start) if timed else 0.0
            bar.update(len(call))
    bar.close()
    for t, pred in rendered:
        gt = views.frames[t].astype(np.float64) / 255.0
        err = np.square(pred - gt)
        rect = im.rect_mask(views.face_rect[t], views.height, views.width)
        sq_head += float(err[rect].sum())
        n_head += int(rect.sum()) * 3
        sq_full += float(err.sum())
        n_full += err.size
        for name, box in im.region_rects(views.landmarks_2d[t], views.height,
                                         views.width).items():
            m = im.rect_mask(box, views.height, views.width)
            sq_region[name][0] += float(err[m].sum())
            sq_region[name][1] += int(m.sum()) * 3
        ssims.append(im.ssim(pred, gt))
        preds.append(_to_uint8(pred))

    # Mouth control: most closed / most open training mouths on one held-out frame.
    train_lo, train_hi = views.split_range("train")
    opening = lm.mouth_opening(views.landmarks[train_lo:train_hi])
    closed_t = train_lo + int(np.argmin(opening))
    open_t = train_lo + int(np.argmax(opening))
    t0 = int(ts[0])
    variants, us, vs = [], [], []
    for src in (closed_t, open_t):
        lms = views.landmarks.copy()
        lms[t0, lm.MOUTH] = views.landmarks[src, lm.MOUTH]
        variants.append(render(t0, lms))
        u, v, _ = rays_lib.project_points(lms[t0, lm.MOUTH], views.poses[t0], views.intrinsics)
        us.append(np.asarray(u))
        vs.append(np.asarray(v))
    change = np.abs(variants[1] - variants[0]).mean(-1)
    us, vs, m = np.concatenate(us), np.concatenate(vs), mouth_margin
    mouth = im.rect_mask((np.floor(us.min()) - m, np.floor(vs.min()) - m,
                          np.floor(us.max()) + 1 + m, np.floor(vs.max()) + 1 + m),
                         views.height, views.width)
    inside, outside = float(change[mouth].mean()), float(change[~mouth].mean())

    minutes = 0.0
    for run in (head, torso):
        if run and (pathlib.Path(run) / "metrics.json").is_file():
            minutes += float(json.loads((pathlib.Path(run) / "metrics.json").read_text())
                             .get("train_minutes", 0.0))
    out = dict(psnr_head=float(-10 * np.log10(max(sq_head / n_head, 1e-12))),
               psnr_full=float(-10 * np.log10(max(sq_full / n_full, 1e-12))),
               **{f"psnr_{k}": float(-10 * np.log10(max(sq / max(n, 1), 1e-12)))
                  for k, (sq, n) in sq_region.items()},
               render_fps=len(ts) / max(render_s, 1e-9), frames_per_call=frames_per_call,
               ssim_full=float(np.mean(ssims)),
               mouth_control_ratio=inside / max(outside, 1e-12),
               mouth_change_inside=inside, mouth_change_outside=outside,
               mouth_control_frames=[t0, closed_t, open_t],
               train_minutes=minutes, frames=int(len(ts)), split=split,
               torso=bool(torso), head_samples=int(getattr(renderer.head.config,
                                                           "num_samples", 0)))
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if tracker is not None:
        import tempfile
        tracked = face_tracking.track_and_compare(np.stack(preds), views.frames[ts], tracker)
        out.update({k if k.startswith("tracked_") else f"tracked_{k}": v
                    for k, v in tracked.items() if k != "frames"})
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            out.update(face_tracking.noise_floor(views.frames[ts], tmp, tracker))
    out["minutes"] = (time.time() - t_start) / 60.0
    if save_frames:
        with files.atomic_path(workdir / "frames.npz", ".npz") as tmp:
            np.savez_compressed(tmp, pred=np.stack(preds), gt=views.frames[ts], indices=ts,
                                mouth_closed=_to_uint8(variants[0]),
                                mouth_open=_to_uint8(variants[1]))
        save_frame_strip(workdir / "frames.png", np.stack(preds), views.frames[ts])
    metrics_lib.write_final_metrics(workdir, out)
    return out


def save_frame_strip(path, renders, references, count=6, scale=3):
    """A PNG of `count` evenly spaced renders (top row) over their references (bottom
    row), each `scale`x nearest-neighbour enlarged: uint8 `[N, H, W, 3]` each."""
    from PIL import Image
    idx = np.unique(np.linspace(0, len(renders) - 1, count).round().astype(int))
    grid = np.concatenate([np.concatenate(list(renders[idx]), 1),
                           np.concatenate(list(references[idx]), 1)], 0)
    image = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale),
                                         Image.NEAREST)
    with files.atomic_path(path, ".png") as tmp:
        image.save(tmp)
    return path


def _to_uint8(image):
    return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
