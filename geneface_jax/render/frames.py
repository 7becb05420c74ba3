"""Whole frames from trained NeRFs: what inference (`pipeline`), evaluation and training's
own previews share.

- `LandmarkNormalizer`, `landmark_windows`: the head's landmark condition, `(landmarks -
  mean) / scale` with the person's mean train landmarks and one scalar, the RMS of the
  per-coordinate std (a scalar keeps coordinates that never move in training from being
  blown up at inference), in windows of `smooth_window` frames.
- `FrameRenderer`: head (and torso) over the static background for whole frames or pixel
  regions, rays split over every device (`sharded.render_image`).
- `init_nerf`, `load_nerf`: a fresh head or torso field; a trained run's variables, read
  from its latest checkpoint as saved (`checkpoint.restore_run`, no optimizer state built)
  and checked against the shapes of a fresh field of the run's config.
"""

import dataclasses
import json
import pathlib
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from geneface_jax import checkpoint as ckpt_lib
from geneface_jax.errors import CheckpointError, InputError, ShapeError
from geneface_jax.mesh import make_mesh
from geneface_jax.render import fields
from geneface_jax.render import grid_fields
from geneface_jax.render import rays as rays_lib
from geneface_jax.render import sharded
from geneface_jax.initializers import jitted_init

HEAD, TORSO = "head", "torso"


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


def head_condition(head, head_params, windows, smooth):
    """Per-frame landmark features `[F, cond_dim]` of normalised windows `[F, W, 68, 3]`
    (an MLP `fields.HeadNeRF` or a `grid_fields.GridHeadNeRF`)."""
    return head.apply({"params": head_params}, windows, smooth, method=type(head).condition)


def is_grid(config) -> bool:
    """Whether a stage-3 config is the grid renderer's (`GridConfig`) or the MLP's."""
    return isinstance(config, grid_fields.GridConfig)


def head_smooth_enabled(config: fields.NeRFConfig, trained_steps: int) -> bool:
    """Whether a head model trained for `trained_steps` has a trained attention smoother
    (the smoother is switched on at `config.smooth_warmup_steps`)."""
    return int(trained_steps) > int(config.smooth_warmup_steps)


def _ray_intrinsics(intrinsics, config: fields.NeRFConfig, image_size):
    """The intrinsics rays are cast with under `config.pixel_convention`."""
    if config.pixel_convention == "centers":
        return jnp.asarray(intrinsics, jnp.float32)
    if image_size is None:
        raise ValueError(f"pixel_convention={config.pixel_convention!r} needs the image "
                         "size (image_size=(height, width))")
    return rays_lib.ray_intrinsics(intrinsics, int(image_size[0]), int(image_size[1]),
                                   config.pixel_convention)


def init_nerf(config: fields.NeRFConfig, part: str, key):
    """(model, params) of a fresh head or torso field (`part` HEAD or TORSO) of an MLP
    (`NeRFConfig`) or grid (`GridConfig`) config; the init runs as one compiled program.
    (A grid head's occupancy collection: `init_variables`.)"""
    if is_grid(config):
        model, variables = grid_fields.init_grid(config, part, key)
        return model, variables["params"]
    o, d = jnp.zeros((2, 3)), jnp.array([[0.0, 0.0, -1.0]] * 2)
    bg = jnp.zeros((3,))
    if part == HEAD:
        model = fields.HeadNeRF(config)
        win = jnp.zeros((config.smooth_window, 68, 3))
        return model, jitted_init(model)(key, o, d, win, bg)["params"]
    if part == TORSO:
        model = fields.TorsoNeRF(config)
        rgb = jnp.zeros((2, 3)) if config.torso_color_dim else None
        return model, jitted_init(model)(key, o, d, jnp.zeros((config.cond_dim,)),
                                          jnp.zeros((6,)), bg, rgb)["params"]
    raise ValueError(f"part must be 'head' or 'torso', got {part!r}")


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
        self.grid = is_grid(head_cfg)
        if torso_vars is not None and is_grid(torso_cfg) != self.grid:
            raise CheckpointError("FrameRenderer: the head and the torso come from different "
                                  "renderers (grid and MLP)")
        if self.grid:
            self.head = grid_fields.GridHeadNeRF(head_cfg)
            self.torso = grid_fields.GridTorso(torso_cfg) if torso_vars is not None else None
        else:
            self.head = fields.HeadNeRF(head_cfg)
            self.torso = fields.TorsoNeRF(torso_cfg) if torso_vars is not None else None
        self.head_vars = head_vars
        self.torso_vars = torso_vars
        self.mesh = mesh or make_mesh()
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
        self._hit_fn = None
        self._trained_head_cfg = head_cfg
        self._render_fns()

    def _render_fns(self):
        if self.grid:
            self._head_fn = _grid_head_render_fn(self.head)
            self._full_fn = _grid_full_render_fn(self.head, self.torso) if self.torso else None
            self._torso_fn = _grid_torso_render_fn(self.torso) if self.torso else None
        else:
            self._head_fn = _head_render_fn(self.head)
            self._full_fn = _full_render_fn(self.head, self.torso) if self.torso else None
            self._torso_fn = _torso_render_fn(self.torso) if self.torso else None

    def set_head_samples(self, samples: int = 0):
        """Renders the grid head with `samples` samples per ray from now on (0: as many as
        it was trained with, `GridConfig.num_samples`). Fewer samples render faster and
        less sharply (docs/stage3_nerf.md, "Rendering speed"): a preview setting. The MLP
        head's coarse and fine samples are part of its model: InputError there."""
        samples = int(samples)
        if samples < 0:
            raise InputError(f"head samples must be >= 0 (0: as trained), got {samples}")
        if not self.grid:
            if samples:
                raise InputError("head samples can only be set for the grid head "
                                 "(the MLP head's samples are part of its model)")
            return
        cfg = self._trained_head_cfg
        if samples:
            cfg = dataclasses.replace(cfg, num_samples=samples)
        if cfg != self.head.config:
            self.head = grid_fields.GridHeadNeRF(cfg)
            self._render_fns()

    def head_hits(self, poses, per_frame=False):
        """Pixels whose head ray meets an occupied cell of the grid head's occupancy grid
        (grid renderer only; a ray that meets none renders the background with zero
        opacity): `[F, H, W]` bool per frame of `poses [F, 4, 4]` with `per_frame`, else
        `[H, W]`, in any of the frames."""
        if self._hit_fn is None:
            cfg, bits = self.head.config, jnp.asarray(self.head_vars["occupancy"]["bits"])
            self._hit_fn = jax.jit(lambda o, d: grid_fields.rays_hit(o, d, bits, cfg))
        o, d = rays_lib.pixel_rays(jnp.asarray(poses), self.head_ray_intrinsics, self.height,
                                   self.width)
        hit = np.asarray(self._hit_fn(o.reshape(-1, 3), d.reshape(-1, 3))).reshape(
            len(poses), self.height, self.width)
        return hit if per_frame else hit.any(0)

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
          regions: `(head, torso)` boolean masks, `[H, W]` or per frame `[F, H, W]`, of
            where each model can be non-empty: a pixel in both is traced through both
            models, a pixel in one only through that model (the other taken as empty:
            zero opacity), a pixel in neither is the background. With regions that hold
            every pixel each model covers, the frame is the full render's for about half
            the work.
        With a grid head, each frame's head pixels are further limited to those whose ray
        meets an occupied cell in that frame (`head_hits`; without `pixels` and `regions`
        the head is traced there and the torso everywhere): the same frames, since the
        others render an empty head.
        Returns:
          dict of float32 `[F, H, W, ...]` arrays: `rgb`, `head_rgb`, `head_acc` and, with
          a torso, `torso_acc`. Several frames per call keep the devices busy on small
          images (the per-call cost is paid once).
        """
        h, w = self.height, self.width
        poses = np.asarray(poses, np.float32).reshape(-1, 4, 4)
        conds = np.asarray(conds, np.float32).reshape(len(poses), -1)
        f = len(poses)
        if regions is not None and self.torso is None:
            raise ValueError("FrameRenderer.render: regions need a torso model")
        if pixels is None:
            sel = np.ones((f, h * w), bool)
        else:
            idx = np.asarray(pixels, np.int64)
            if idx.ndim != 1 or not len(idx) or idx.min() < 0 or idx.max() >= h * w:
                raise ShapeError(f"FrameRenderer.render: pixels must be a non-empty 1-D "
                                 f"array of flat indices in [0, {h * w})")
            sel = np.zeros((f, h * w), bool)
            sel[:, idx] = True
        if regions is not None:
            head_m, torso_m = (np.asarray(m, bool) for m in regions)
            if head_m.shape[-2:] != (h, w) or torso_m.shape[-2:] != (h, w) or \
                    head_m.ndim not in (2, 3) or torso_m.ndim not in (2, 3) or \
                    (head_m.ndim == 3 and len(head_m) != f) or \
                    (torso_m.ndim == 3 and len(torso_m) != f):
                raise ShapeError(f"FrameRenderer.render: regions must be two [{h}, {w}] or "
                                 f"[{f}, {h}, {w}] masks, got {head_m.shape} and "
                                 f"{torso_m.shape}")
            head_m, torso_m = (np.broadcast_to(m.reshape(-1, h * w), (f, h * w)) & sel
                               for m in (head_m, torso_m))
        else:
            head_m = sel
            torso_m = sel if self.torso is not None else np.zeros_like(sel)
        if self.grid:
            head_m = head_m & self.head_hits(poses, per_frame=True).reshape(f, h * w)
        if self.torso is not None and self.grid:
            # One call for every head pixel (the cheap 2-D torso evaluated there too, and
            # switched off outside its region), one for the torso's other pixels: fewer
            # ray counts, so fewer compiled programs, than a call per region overlap.
            parts = ((head_m, self._full_fn), (torso_m & ~head_m, self._torso_fn))
        elif self.torso is not None and regions is None:
            parts = ((head_m, self._full_fn),)
        else:
            parts = ((head_m & torso_m, self._full_fn), (head_m & ~torso_m, self._head_fn),
                     (torso_m & ~head_m, self._torso_fn))
        if self.torso is not None and torso_pose is None:
            raise ValueError("FrameRenderer.render: a torso model needs torso_pose")
        o, d = (np.asarray(a).reshape(f, -1, 3)
                for a in rays_lib.pixel_rays(jnp.asarray(poses), self.head_ray_intrinsics, h,
                                             w))
        params = {"head": self.head_vars}
        if self.torso is not None:
            if self.grid:       # the 2-D torso reads pixel positions, not rays
                yy, xx = np.divmod(np.arange(h * w), w)
                to = np.asarray(grid_fields.pixel_uv(yy, xx, h, w,
                                                     self.torso.config.torso_inputs))
                td = None
            else:
                to, td = (np.asarray(a).reshape(-1, 3) for a in
                          rays_lib.pixel_rays(jnp.asarray(torso_pose),
                                              self.torso_ray_intrinsics, h, w))
            params["torso"] = self.torso_vars
            pose_vec = np.asarray(grid_fields.torso_pose_vector(jnp.asarray(poses),
                                                                self.torso.config)
                                  if self.grid else fields.head_pose_vector(jnp.asarray(poses)),
                                  np.float32)
        bg = self.background.reshape(-1, 3)
        res = {"rgb": np.tile(bg, (f, 1, 1)), "head_rgb": np.tile(bg, (f, 1, 1)),
               "head_acc": np.zeros((f, h * w), np.float32)}
        if self.torso is not None:
            res["torso_acc"] = np.zeros((f, h * w), np.float32)
        for mask, fn in parts:
            fi, pi = np.nonzero(mask)            # frame-major: each frame's pixels in order
            if not len(fi) or fn is None:
                continue
            rays = {"origins": o[fi, pi], "directions": d[fi, pi], "background": bg[pi],
                    "cond": conds[fi]}
            if self.torso is not None and self.grid:
                rays.update(torso_uv=to[pi], pose=pose_vec[fi])
                if fn is self._full_fn:
                    rays["torso_on"] = torso_m[fi, pi].astype(np.float32)
            elif self.torso is not None:
                rays.update(torso_origins=to[pi], torso_directions=td[pi], pose=pose_vec[fi])
            out = sharded.render_image(fn, rays, params=params, mesh=self.mesh,
                                       chunk=self.chunk)         # numpy, on the host
            for k, v in out.items():
                res[k][fi, pi] = np.asarray(v)
        return {k: v.reshape((f, h, w) + v.shape[2:]) for k, v in res.items()}


def _head_render_fn(head):
    def fn(params, rays):
        out = head.apply(params["head"], rays["origins"], rays["directions"],
                         rays["cond"], rays["background"],
                         method=fields.HeadNeRF.render).final
        return {"rgb": out.rgb, "head_rgb": out.rgb, "head_acc": out.acc}
    return fn


def _full_render_fn(head, torso):
    def fn(params, rays):
        bg = rays["background"]
        h = head.apply(params["head"], rays["origins"], rays["directions"],
                       rays["cond"], bg, method=fields.HeadNeRF.render).final
        t = torso.apply(params["torso"], rays["torso_origins"],
                        rays["torso_directions"], rays["cond"], rays["pose"], bg,
                        h.rgb if torso.config.torso_color_dim else None).final
        return {"rgb": fields.composite_person(h, t, bg), "head_rgb": h.rgb,
                "head_acc": h.acc, "torso_acc": t.acc}
    return fn


def _torso_render_fn(torso):
    """The torso where the head is empty (zero opacity: its colour is the background)."""
    def fn(params, rays):
        bg = rays["background"]
        t = torso.apply(params["torso"], rays["torso_origins"],
                        rays["torso_directions"], rays["cond"], rays["pose"], bg,
                        bg if torso.config.torso_color_dim else None).final
        zero = jnp.zeros(bg.shape[:1], bg.dtype)
        return {"rgb": t.fg_rgb + (1.0 - t.acc)[:, None] * bg, "head_rgb": bg,
                "head_acc": zero, "torso_acc": t.acc}
    return fn


def _grid_head_render_fn(head):
    def fn(params, rays):
        out = head.apply(params["head"], rays["origins"], rays["directions"], rays["cond"],
                         rays["background"], method=grid_fields.GridHeadNeRF.render).final
        return {"rgb": out.rgb, "head_rgb": out.rgb, "head_acc": out.acc}
    return fn


def _grid_full_render_fn(head, torso):
    def fn(params, rays):
        bg = rays["background"]
        h = head.apply(params["head"], rays["origins"], rays["directions"], rays["cond"], bg,
                       method=grid_fields.GridHeadNeRF.render).final
        alpha, rgb, _ = torso.apply(params["torso"], rays["torso_uv"], rays["pose"])
        if "torso_on" in rays:          # 0: a pixel outside the torso's region (empty torso)
            alpha = alpha * rays["torso_on"]
        return {"rgb": grid_fields.composite_over_torso(h, alpha, rgb, bg), "head_rgb": h.rgb,
                "head_acc": h.acc, "torso_acc": alpha}
    return fn


def _grid_torso_render_fn(torso):
    def fn(params, rays):
        bg = rays["background"]
        alpha, rgb, _ = torso.apply(params["torso"], rays["torso_uv"], rays["pose"])
        return {"rgb": alpha[:, None] * rgb + (1.0 - alpha[:, None]) * bg, "head_rgb": bg,
                "head_acc": jnp.zeros_like(alpha), "torso_acc": alpha}
    return fn


# --------------------------------------------------------------------------- run loading

def read_config(workdir):
    path = pathlib.Path(workdir) / "config.json"
    if not path.is_file():
        if pathlib.Path(workdir).is_dir() and any(
                p.name.startswith("model_ckpt_steps_") for p in pathlib.Path(workdir).iterdir()):
            raise CheckpointError(f"{workdir}: a GeneFace checkpoint directory, not a NeRF run "
                                  "of this project; import it first: python -m "
                                  f"experiments.import_geneface --ckpt={workdir} "
                                  "--stage=head|torso --out=WORKDIR")
        raise CheckpointError(f"{workdir}: no NeRF run here (no config.json)")
    cfg = json.loads(path.read_text())
    if cfg.get("stage") != "nerf":
        raise CheckpointError(f"{workdir}: config.json is a {cfg.get('stage')!r} run, "
                              "not a NeRF run")
    return cfg


def nerf_config_from(run_cfg, key="model"):
    """The model config of a run's config.json: `GridConfig` for a grid run (`renderer:
    grid`), `NeRFConfig` otherwise."""
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in run_cfg[key].items()}
    if run_cfg.get("renderer") == grid_fields.RENDERER:
        return grid_fields.GridConfig(**values)
    return fields.NeRFConfig(**values)


def init_variables(config, part, key):
    """(model, variables) of a fresh head or torso: {"params"} and, for a grid head, its
    "occupancy" collection."""
    if is_grid(config):
        return grid_fields.init_grid(config, part, key)
    model, params = init_nerf(config, part, key)
    return model, {"params": params}


def check_image_size(run_cfg, height: int, width: int, what: str):
    """InputError when a run trained on frames of another size than `height x width` is
    used on them (`run_cfg["image_size"]`, recorded by training)."""
    size = run_cfg.get("image_size")
    if size is not None and tuple(size) != (int(height), int(width)):
        raise InputError(f"{what}: the run was trained on {size[1]}x{size[0]} frames, the "
                         f"dataset's are {width}x{height}; use the dataset it was trained on "
                         "(or one of the same size)")


def load_nerf(workdir, part):
    """(config, variables, run config, LandmarkNormalizer) of a trained head or torso run
    (its last checkpoint): `NeRFConfig` and {"params"} for the MLP renderer, `GridConfig`
    and {"params", "occupancy"} (a head's occupancy grid) for the grid renderer; the run
    config gets `trained_steps`, the checkpoint's step."""
    run_cfg = read_config(workdir)
    if run_cfg.get("part") != part:
        raise CheckpointError(f"{workdir}: a {run_cfg.get('part')!r} NeRF run, expected "
                              f"{part!r}")
    try:
        cfg = nerf_config_from(run_cfg)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{workdir}: config.json's model is not a "
                              f"{run_cfg.get('renderer', 'mlp')} renderer's config ({e})") from e
    saved = ckpt_lib.restore_run(workdir)
    # checked against the shapes only: nothing is initialised or compiled
    template = jax.eval_shape(lambda: init_variables(cfg, part, jax.random.PRNGKey(0))[1])
    variables = {"params": ckpt_lib.check_like(saved["params"], template["params"],
                                               f"{workdir}")}
    if "occupancy" in template:
        variables["occupancy"] = ckpt_lib.check_like(saved.get("batch_stats", {}),
                                                     template["occupancy"], f"{workdir}")
    normalizer = LandmarkNormalizer.load(pathlib.Path(workdir) / "landmark_norm.npz")
    run_cfg = dict(run_cfg, trained_steps=int(saved["step"]))
    return cfg, variables, run_cfg, normalizer
