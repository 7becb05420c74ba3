r"""Stage-3 head NeRF: training step and full-frame render, JAX vs PyTorch, rays/s on this CPU.

  python -m experiments.bench.nerf                       # small config, 1024 rays per step
  python -m experiments.bench.nerf --config=paper        # GeneFace's sizes (64 + 128 samples)
  python -m experiments.bench.nerf --torch_compile       # also time torch.compile
  python -m experiments.bench.nerf --smoke               # tiny, < 1 min; for the tests

What is timed. Training: one step of the landmark-conditioned head NeRF on `--rays` rays of
one frame (GeneFace/AD-NeRF `Lm3dNeRF`): the landmark encoder on the frame's 5-frame
window of normalised landmarks, the attention smoother (switched on from step 0 here,
`smooth_warmup_steps=0`, so both sides pay for it and train it), ray generation from the
pose and the pixel indices, stratified coarse samples, the coarse HeadField (positional
encodings, density MLP with the skip, colour head), compositing, hierarchical inverse-CDF
fine samples on the coarse weights (no gradient), the fine HeadField on the sorted union,
compositing over the per-ray background, MSE of the coarse and of the fine colour, the
backward pass and an Adam update with exponential learning-rate decay. Inference: one
whole `--size` x `--size` frame, no gradient, deterministic samples (bin midpoints and
`linspace` pdf samples), in chunks of `--chunk` rays.

The JAX side is the library's own code: `train.nerf.create_nerf_state` + `make_head_step`
under `train.parallel.data_parallel(step, mesh, replicated=("frames",))` (jit of
shard_map) on a 1-device mesh, the batch from `make_batch_fn` put with
`parallel.shard_batch(batch, mesh, ("frames",))`; the render is `train.nerf.FrameRenderer`
(`render.sharded.render_image`). XLA uses every core this process may use. The PyTorch
side is written here as a PyTorch user would write GeneFace's head NeRF: `nn.Linear`
layers in `nn.ModuleList`s, `torch.cat` of the encodings with the expanded condition,
`nn.Conv1d` for the attention smoother, `torch.searchsorted(right=True)` + `gather` for
the pdf sampling under `torch.no_grad()`, `torch.sort` of the union, `F.mse_loss`,
`torch.optim.Adam(fused=True)` + `LambdaLR`, `zero_grad(set_to_none=True)`,
`torch.inference_mode()` for rendering; `torch.set_num_threads` = JAX's core budget.
`--torch_compile` also times `torch.compile` of the loss and of the render chunk; the
faster of eager and compiled is the reference of each speedup. `--eigen_dots` also times
the library's step compiled with XLA:CPU's dots in Eigen instead of YNNPACK (checked to take
the same step) as one more contender; `speedup` stays the default build's.

Start-up equivalence check (the script stops if it fails): the JAX initial parameters are
copied into the PyTorch model (Flax Dense kernel = `Linear.weight.T`, Flax Conv kernel
`[3, C_in, C_out]` = `Conv1d.weight.permute(2, 1, 0)`); the same rays of the first batch
with the same sample jitter (the uniforms the library's step draws from its rng, passed
explicitly: `HeadNeRF.render(..., noise=(u_coarse, u_fine))`) must give the same coarse
and fine colours (max abs error <= 1e-4, `equivalence_max_abs_err`); the first training
step must give the same losses and gradient norm (relative error <= 1e-4) and the same
parameters after Adam; the deterministic full-frame renders must agree (<= 1e-4).

Timed calls of the contenders are interleaved (one JAX step, one PyTorch step, ...) so
that load from other processes hits both alike (`--timing=blocks`: each contender's calls
in a row, so none runs right after the other's; the profile reports the page faults per
timed call of each); rays/s is rays per call / the median call
time. `peak_fraction`: XLA's FLOP count of the whole compiled training step per median
step, over the machine's float32 matmul peak with the same cores, measured in the same
minutes: one 2048^3 product in each framework between the timed calls, as one more
contender, and the median of the faster one's rates is the peak
(`matmul_peak_during_training_gflops`: min, median, max; this shared VM's matmul rate
drifts by 30 % between runs). `render_peak_fraction` likewise with the render's MLP FLOPs
and the products between the renders. `peak_fraction_vs_best` divides by the best rate
seen anywhere in the run instead (stricter), including the best of 5 512-2048 square
products per framework before the timing (`matmul_peak_gflops`). The last line printed is
one JSON object.
"""

import dataclasses
import json
import os
import platform
import re
import time

from absl import app
from absl import flags

from experiments.bench.machine import cpu_name, median, restrict_cores

FLAGS = flags.FLAGS
flags.DEFINE_enum("config", "small", ["paper", "small"],
                  "paper: GeneFace's sizes; small: the documented CPU config.")
flags.DEFINE_integer("rays", 1024, "Rays per training step (one frame).")
flags.DEFINE_integer("steps", 10, "Timed training steps (and frame renders) per contender.")
flags.DEFINE_integer("warmup", 2, "Untimed calls per contender after the first (compiling) "
                     "one.")
flags.DEFINE_integer("threads", 0, "CPU cores for both sides (0: every core this process "
                     "may use). JAX is restricted by CPU affinity, PyTorch by "
                     "torch.set_num_threads.")
flags.DEFINE_integer("size", 64, "Height and width of the synthetic person's frames; the "
                     "render benchmark renders one whole frame (size^2 rays).")
flags.DEFINE_integer("chunk", 4096, "Rays rendered at once in the full-frame render.")
flags.DEFINE_bool("torch_compile", False, "Also time torch.compile'd PyTorch (loss and "
                  "render); falls back to eager if compilation fails.")
flags.DEFINE_bool("profile", True, "Report XLA's FLOP count of the step, the MLP matmuls' "
                  "share and achieved GFLOP/s, and PyTorch's top operators.")
flags.DEFINE_enum("timing", "interleaved", ["interleaved", "blocks"],
                  "interleaved: one call of each contender in turn (load from other "
                  "processes hits both alike); blocks: each contender's calls in a row "
                  "(no contender runs right after another's, e.g. on cold caches).")
flags.DEFINE_bool("system_malloc", False, "Leave glibc malloc at its defaults. By default "
                  "the process (both sides) runs with the allocator settings the entry points "
                  "use (experiments.common.tune_host_malloc: big blocks reused, not re-mapped "
                  "and page-faulted every step).")
flags.DEFINE_bool("smoke", False, "Tiny run for the test suite: small config, 64 rays, "
                  "32 x 32 frames, 2 steps, no warm-up, no profile, no torch.compile, "
                  "1 core unless --threads is given.")
flags.DEFINE_integer("seed", 0, "Seed of the parameters, the synthetic person and the rays.")
flags.DEFINE_bool("eigen_dots", False, "Also time the JAX training step compiled with "
                  "XLA:CPU's dots in Eigen instead of YNNPACK (EIGEN_DOTS below; the same as "
                  "XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-individual_dot), "
                  "interleaved with the others: `jax_eigen_dots_rays_per_s`, "
                  "`eigen_dots_step_ratio`.")

COLOR_ATOL = 1e-4          # rendered colours, JAX vs PyTorch, same rays and jitter
CHECK_RTOL = 1e-4          # first step's losses and gradient norm
NUM_FRAMES = 20            # frames of the synthetic person
NUM_BATCHES = 4            # distinct ray batches, cycled through by the timed steps
# XLA:CPU hands float32 dots to YNNPACK by default (fusion types `individual_dot` and
# `reduce`); keeping only `reduce` leaves the dots to Eigen (the cumulative sums of the
# fine sampling stay in YNNPACK, where they are fast).
EIGEN_DOTS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}


# --------------------------------------------------------------------------- PyTorch model

def torch_modules():
    """The PyTorch implementation (built after `import torch`): a namespace of the classes
    and functions."""
    import types

    import torch
    from torch import nn
    import torch.nn.functional as F

    leaky = 0.02

    def positional_encoding(x, freqs):
        """[x, sin(f0 x), cos(f0 x), sin(f1 x), ...] with freqs 2^0 .. 2^(L-1)."""
        scaled = x[..., None, :] * freqs[:, None]                      # [..., L, D]
        bands = torch.stack([torch.sin(scaled), torch.cos(scaled)], dim=-2)
        return torch.cat([x, bands.flatten(-3)], dim=-1)

    class NeRFMLP(nn.Module):
        """GeneFace's NeRFBackbone: density MLP with the input re-concatenated after layer
        `skip`, colour head on [last hidden, encoded view]."""

        def __init__(self, cfg):
            super().__init__()
            in_dim = cfg.pos_dim + cfg.cond_dim
            self.skip = cfg.skip
            self.density_linears = nn.ModuleList()
            for i in range(cfg.depth):
                fan_in = in_dim if i == 0 else cfg.width
                if cfg.skip is not None and i == cfg.skip + 1:
                    fan_in += in_dim
                self.density_linears.append(nn.Linear(fan_in, cfg.width))
            self.density_out_linear = nn.Linear(cfg.width, 1)
            cin = cfg.width + cfg.view_dim
            self.color_linears = nn.ModuleList()
            for _ in range(cfg.color_depth):
                self.color_linears.append(nn.Linear(cin, cfg.color_width))
                cin = cfg.color_width
            self.color_out_linear = nn.Linear(cfg.color_width, 3)

        def forward(self, pos_enc, cond, view_enc):
            r, s = pos_enc.shape[:2]
            inputs = torch.cat([pos_enc, cond[:, None, :].expand(r, s, -1)], dim=-1)
            h = inputs
            for i, layer in enumerate(self.density_linears):
                h = F.relu(layer(h))
                if i == self.skip:
                    h = torch.cat([inputs, h], dim=-1)
            raw_sigma = self.density_out_linear(h)[..., 0]
            g = torch.cat([h, view_enc[:, None, :].expand(r, s, -1)], dim=-1)
            for layer in self.color_linears:
                g = F.relu(layer(g))
            return raw_sigma, self.color_out_linear(g)

    class HeadField(nn.Module):
        """(points [R, S, 3], unit view dirs [R, 3], cond [R, C]) -> (sigma, rgb)."""

        def __init__(self, cfg):
            super().__init__()
            self.softplus = cfg.density_activation == "softplus"
            self.register_buffer("pos_freqs", 2.0 ** torch.arange(cfg.pos_freqs,
                                                                  dtype=torch.float32),
                                 persistent=False)
            self.register_buffer("view_freqs", 2.0 ** torch.arange(cfg.view_freqs,
                                                                   dtype=torch.float32),
                                 persistent=False)
            self.mlp = NeRFMLP(cfg)

        def forward(self, x, view_dirs, cond):
            raw_sigma, raw_rgb = self.mlp(positional_encoding(x, self.pos_freqs), cond,
                                          positional_encoding(view_dirs, self.view_freqs))
            sigma = F.softplus(raw_sigma) if self.softplus else F.relu(raw_sigma)
            return sigma, torch.sigmoid(raw_rgb)

    class LandmarkEncoder(nn.Module):
        """AD-NeRF's AudioNet on a one-frame window: [..., 68, 3] -> [..., cond_dim]."""

        def __init__(self, cfg):
            super().__init__()
            self.encoder_conv = nn.ModuleList()
            cin = 68 * 3
            for ch in cfg.landmark_channels:
                self.encoder_conv.append(nn.Linear(cin, ch))
                cin = ch
            self.encoder_fc1 = nn.ModuleList([nn.Linear(cin, cfg.landmark_fc),
                                              nn.Linear(cfg.landmark_fc, cfg.cond_dim)])

        def forward(self, landmarks):
            h = landmarks.flatten(-2)
            for layer in self.encoder_conv:
                h = F.leaky_relu(layer(h), leaky)
            h = F.leaky_relu(self.encoder_fc1[0](h), leaky)
            return self.encoder_fc1[1](h)

    class AttentionSmoother(nn.Module):
        """AD-NeRF's AudioAttNet: window [B, W, C] -> [B, C]."""

        def __init__(self, cfg):
            super().__init__()
            self.attention_conv = nn.ModuleList()
            cin = cfg.cond_dim
            for ch in tuple(cfg.attention_channels) + (1,):
                self.attention_conv.append(nn.Conv1d(cin, ch, 3, padding=1))
                cin = ch
            self.attention_linear = nn.Linear(cfg.smooth_window, cfg.smooth_window)

        def forward(self, window, enabled=True):
            if not enabled:
                return window[:, window.shape[1] // 2]
            y = window.transpose(1, 2)                                    # [B, C, W]
            for conv in self.attention_conv:
                y = F.leaky_relu(conv(y), leaky)
            weights = torch.softmax(self.attention_linear(y[:, 0]), dim=-1)
            return (weights[..., None] * window).sum(1)

    def rays_for_pixels(pose, k, rows, cols):
        """Un-normalised world rays (camera depth t) through pixel centres."""
        u = cols.float() + 0.5
        v = rows.float() + 0.5
        d_cam = torch.stack([(u - k[2]) / k[0], -(v - k[3]) / k[1], -torch.ones_like(u)], -1)
        dirs = (pose[..., :3, :3] * d_cam[..., None, :]).sum(-1)
        origins = pose[..., :3, 3].expand_as(dirs)
        return origins, dirs

    def stratified_samples(near, far, r, n, u=None):
        if u is None:
            u = torch.full((r, n), 0.5)
        return near + (far - near) * ((torch.arange(n, dtype=torch.float32) + u) / n)

    def sample_pdf(bins, weights, n, u=None):
        """Inverse-CDF samples of a piecewise-constant pdf (NeRF's sample_pdf)."""
        w = weights + 1e-5
        pdf = w / w.sum(-1, keepdim=True)
        cdf = torch.cat([torch.zeros_like(pdf[:, :1]), torch.cumsum(pdf, -1)], -1)
        if u is None:
            u = torch.linspace(0.0, 1.0, n).expand(cdf.shape[0], n)
        u = u.contiguous()
        above = torch.searchsorted(cdf, u, right=True)
        below = (above - 1).clamp(min=0)
        above = above.clamp(max=weights.shape[1])
        cdf_lo, cdf_hi = cdf.gather(-1, below), cdf.gather(-1, above)
        bin_lo, bin_hi = bins.gather(-1, below), bins.gather(-1, above)
        denom = cdf_hi - cdf_lo
        denom = torch.where(denom < 1e-5, torch.ones_like(denom), denom)
        return bin_lo + (u - cdf_lo) / denom * (bin_hi - bin_lo)

    def composite(sigma, rgb, t, dir_norm, background, last_sample_background=True):
        """(rgb [R, 3] over the background, acc [R], weights [R, S])."""
        deltas = torch.cat([t[:, 1:] - t[:, :-1], torch.full_like(t[:, :1], 1e10)], -1)
        tau = sigma * (deltas * dir_norm[:, None])
        alpha = -torch.expm1(-tau)
        cum = torch.cumsum(tau, -1)
        trans = torch.exp(-torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], -1))
        weights = alpha * trans
        if last_sample_background:
            weights = torch.cat([weights[:, :-1], torch.zeros_like(weights[:, :1])], -1)
        acc = weights.sum(-1)
        color = (weights[..., None] * rgb).sum(-2) + (1.0 - acc)[:, None] * background
        return color, acc, weights

    class HeadNeRF(nn.Module):
        """Landmark encoder + attention smoother + coarse and fine HeadFields."""

        def __init__(self, cfg):
            super().__init__()
            self.cfg = cfg
            self.landmark_encoder = LandmarkEncoder(cfg)
            self.smoother = AttentionSmoother(cfg)
            self.coarse = HeadField(cfg)
            self.fine = HeadField(cfg)

        def condition(self, windows, smooth=True):
            return self.smoother(self.landmark_encoder(windows), smooth)

        def render(self, origins, directions, cond, background, noise=None):
            """((coarse rgb, acc), (fine rgb, acc)); `noise` = (u_coarse, u_fine) or None
            (deterministic samples)."""
            cfg = self.cfg
            r = origins.shape[0]
            dir_norm = directions.norm(dim=-1)
            view_dirs = directions / dir_norm.clamp_min(1e-12)[:, None]
            u_c, u_f = (None, None) if noise is None else noise

            def run(field, t):
                points = origins[:, None, :] + directions[:, None, :] * t[..., None]
                sigma, rgb = field(points, view_dirs, cond)
                return composite(sigma, rgb, t, dir_norm, background,
                                 cfg.last_sample_background)

            t_c = stratified_samples(cfg.near, cfg.far, r, cfg.num_coarse, u_c)
            rgb_c, acc_c, w_c = run(self.coarse, t_c)
            with torch.no_grad():
                mids = 0.5 * (t_c[:, 1:] + t_c[:, :-1])
                t_f = sample_pdf(mids, w_c[:, 1:-1].detach(), cfg.num_fine, u_f)
                t_f, _ = torch.sort(torch.cat([t_c, t_f], -1), -1)
            rgb_f, acc_f, _ = run(self.fine, t_f)
            return (rgb_c, acc_c), (rgb_f, acc_f)

    class HeadLoss(nn.Module):
        """The training objective of one step: condition, rays, render, coarse + fine MSE."""

        def __init__(self, cfg, intrinsics):
            super().__init__()
            self.model = HeadNeRF(cfg)
            self.register_buffer("k", torch.as_tensor(intrinsics, dtype=torch.float32),
                                 persistent=False)

        def forward(self, rows, cols, frame, target, background, pose, windows, u_c, u_f,
                    smooth: bool = True):
            cond = self.model.condition(windows, smooth)[frame]
            origins, dirs = rays_for_pixels(pose[frame], self.k, rows, cols)
            (rgb_c, _), (rgb_f, acc_f) = self.model.render(origins, dirs, cond, background,
                                                           (u_c, u_f))
            mse_c = F.mse_loss(rgb_c, target)
            mse_f = F.mse_loss(rgb_f, target)
            return mse_c + mse_f, mse_c, mse_f, acc_f.mean()

    return types.SimpleNamespace(HeadNeRF=HeadNeRF, HeadLoss=HeadLoss,
                                 rays_for_pixels=rays_for_pixels)


# --------------------------------------------------------------------------- JAX -> torch

def load_jax_params(torch_module, params, prefix=""):
    """Copies Flax `params` of `HeadNeRF` into the PyTorch `HeadNeRF` above (under
    `prefix`). `name_3` -> ModuleList index `name.3`; Dense kernels `[in, out]` ->
    `weight [out, in]` (transpose); Conv kernels `[3, C_in, C_out]` -> `weight [C_out, C_in,
    3]`. Raises if a tensor has no counterpart, a shape disagrees or a PyTorch parameter is
    left out. Returns the number of tensors copied."""
    import numpy as np
    import torch
    from flax.traverse_util import flatten_dict

    state = torch_module.state_dict()
    done = set()
    for path, value in flatten_dict(params).items():
        value = np.asarray(value, np.float32)
        mod = ".".join(re.sub(r"^(.+)_(\d+)$", r"\1.\2", p) for p in path[:-1])
        leaf = path[-1]
        if leaf == "kernel":
            value = value.T if value.ndim == 2 else value.transpose(2, 1, 0)
            leaf = "weight"
        key = f"{prefix}{mod}.{leaf}"
        if key not in state:
            raise KeyError(f"{'/'.join(path)} has no PyTorch counterpart {key}")
        if tuple(state[key].shape) != value.shape:
            raise ValueError(f"{key}: PyTorch shape {tuple(state[key].shape)} != converted "
                             f"{value.shape}")
        with torch.no_grad():
            state[key].copy_(torch.from_numpy(np.array(value, np.float32)))
        done.add(key)
    missing = [k for k in state if k.startswith(prefix) and k not in done]
    if missing:
        raise KeyError(f"PyTorch tensors without a JAX counterpart: {missing[:5]}")
    return len(done)


# --------------------------------------------------------------------------- PyTorch runner

class TorchRunner:
    """One PyTorch setup: loss module, Adam + decay, a training step and a frame render."""

    def __init__(self, cfg, optim, intrinsics, params, batches, frame_inputs, chunk,
                 compile_model=False):
        import numpy as np
        import torch
        mods = torch_modules()
        self.cfg, self.chunk = cfg, chunk
        self.module = mods.HeadLoss(cfg, intrinsics)
        load_jax_params(self.module, params, prefix="model.")
        self.module.train()
        self.params = list(self.module.parameters())
        self.num_params = sum(p.numel() for p in self.params)
        # fused=True: PyTorch's fastest CPU Adam
        self.opt = torch.optim.Adam(self.params, lr=optim.lr, betas=(0.9, 0.999), eps=1e-8,
                                    fused=True)
        rate, every = optim.decay_rate, optim.decay_steps
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt,
                                                       lambda s: rate ** (s / every))
        self.num_steps = 0
        self.loss_fn = torch.compile(self.module) if compile_model else self.module
        self.render_chunk = (torch.compile(self._render_chunk) if compile_model
                             else self._render_chunk)
        self.batches = [self._tensors(b) for b in batches]
        self.frame = {k: torch.from_numpy(np.ascontiguousarray(v, np.float32))
                      for k, v in frame_inputs.items()}
        self.rays_for_pixels = mods.rays_for_pixels

    @staticmethod
    def _tensors(batch):
        import numpy as np
        import torch
        rays, frames = batch["rays"], batch["frames"]
        as_long = lambda a: torch.from_numpy(np.asarray(a, np.int64))          # noqa: E731
        as_float = lambda a: torch.from_numpy(np.ascontiguousarray(a, np.float32))  # noqa
        return (as_long(rays["rows"]), as_long(rays["cols"]), as_long(rays["frame"]),
                as_float(rays["target"]), as_float(rays["background"]),
                as_float(frames["pose"]), as_float(frames["windows"]))

    def step(self, index=0, noise=None, timings=None):
        """One training step on batch `index`; `noise` = (u_coarse, u_fine) tensors
        (default: fresh uniforms). Returns the metrics (tensors)."""
        import torch
        t0 = time.perf_counter()
        batch = self.batches[index % len(self.batches)]
        r = batch[0].shape[0]
        if noise is None:
            noise = (torch.rand(r, self.cfg.num_coarse), torch.rand(r, self.cfg.num_fine))
        smooth = self.num_steps >= self.cfg.smooth_warmup_steps
        self.opt.zero_grad(set_to_none=True)
        loss, mse_c, mse_f, acc = self.loss_fn(*batch, *noise, smooth=smooth)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.params])
        self.opt.step()
        self.sched.step()
        self.num_steps += 1
        t3 = time.perf_counter()
        if timings is not None:
            for name, dt in (("forward", t1 - t0), ("backward", t2 - t1), ("optimizer", t3 - t2)):
                timings[name] = timings.get(name, 0.0) + dt
        return {"loss": loss.detach(), "mse_coarse": mse_c.detach(),
                "mse_fine": mse_f.detach(), "psnr": -10.0 * torch.log10(mse_f.detach()),
                "acc": acc.detach(), "grad_norm": grad_norm}

    def render_colors(self, batch_index, noise):
        """(coarse rgb, fine rgb) numpy of a training batch's rays with explicit jitter,
        without gradient (for the equivalence check)."""
        import torch
        rows, cols, frame, _, bg, pose, windows = self.batches[batch_index]
        model = self.module.model
        with torch.no_grad():
            cond = model.condition(windows, True)[frame]
            o, d = self.rays_for_pixels(pose[frame], self.module.k, rows, cols)
            (rgb_c, _), (rgb_f, _) = model.render(o, d, cond, bg, noise)
        return rgb_c.numpy(), rgb_f.numpy()

    def _render_chunk(self, origins, directions, cond, background):
        (_, _), (rgb, acc) = self.module.model.render(origins, directions, cond, background)
        return rgb, acc

    def render_frame(self):
        """The whole frame `[H, W, 3]` (numpy) of `frame_inputs`: condition, pixel rays,
        chunked deterministic render under `torch.inference_mode()`."""
        import torch
        f = self.frame
        h, w = f["background"].shape[:2]
        model = self.module.model
        with torch.inference_mode():
            cond = model.condition(f["window"][None], True)[0]
            rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            o, d = self.rays_for_pixels(f["pose"], self.module.k, rows.reshape(-1),
                                        cols.reshape(-1))
            bg = f["background"].reshape(-1, 3)
            out = []
            for i in range(0, h * w, self.chunk):
                c = min(self.chunk, h * w - i)
                rgb, _ = self.render_chunk(o[i:i + c], d[i:i + c], cond.expand(c, -1),
                                           bg[i:i + c])
                out.append(rgb)
            return torch.cat(out).reshape(h, w, 3).numpy()


# --------------------------------------------------------------------------- checks

def rel_err(a, b):
    return abs(float(a) - float(b)) / max(abs(float(b)), 1e-12)


def check_first_step(jax_metrics, torch_metrics, before, jax_after, torch_after, grads, lr0):
    """Losses and gradient norm (relative error) and the parameters after the first Adam
    step, whose update is lr0 * g / (|g| + 1e-8) per entry: the largest difference beyond
    two float32 spacings of the parameter, in units of lr0, over entries whose (PyTorch)
    gradient is at least 1e-6. Returns a dict of errors; raises on disagreement."""
    import numpy as np
    report, bad = {}, []
    for name in ("mse_coarse", "mse_fine", "loss", "grad_norm"):
        err = rel_err(torch_metrics[name], jax_metrics[name])
        report[name] = err
        if err > CHECK_RTOL:
            bad.append(f"{name}: jax {float(jax_metrics[name]):.7g} vs torch "
                       f"{float(torch_metrics[name]):.7g} (rel {err:.2e})")
    upd = 0.0
    for p, a, b, g in zip(before, jax_after, torch_after, grads):
        diff = np.maximum(0.0, np.abs(a - b) - 2 * np.spacing(np.abs(p)))
        upd = max(upd, float(np.max(np.where(np.abs(g) >= 1e-6, diff, 0.0))) / lr0)
    report["update_diff_over_lr"] = upd
    if upd > 1e-2:
        bad.append(f"parameters after the first Adam step differ by {upd:.3g} x lr")
    if bad:
        raise RuntimeError("JAX and PyTorch training steps disagree: " + "; ".join(bad) +
                           " (if every term differs, check that the noise mirrors "
                           "train.nerf._ray_noise)")
    return {k: float(f"{v:.2e}") for k, v in report.items()}


def jax_params_in_torch_order(runner, params):
    """Flax `params` converted into a copy of the PyTorch module; its parameters in
    `runner.params` order."""
    import copy
    clone = copy.deepcopy(runner.module)
    load_jax_params(clone, params, prefix="model.")
    return [p.detach().numpy().copy() for p in clone.parameters()]


def step_noise(key, r, cfg):
    """The sample jitter (u_coarse [R, num_coarse], u_fine [R, num_fine]) that the library's
    head step draws from its rng on a 1-device mesh (mirrors `train.nerf._ray_noise` +
    `parallel.global_uniform`). If the library changes how it draws it, the first-step
    check fails and this function must follow."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    k1, k2 = jax.random.split(key)
    return (np.array(jax.random.uniform(k1, (r, cfg.num_coarse), jnp.float32)),
            np.array(jax.random.uniform(k2, (r, cfg.num_fine), jnp.float32)))


def jax_colors_fn(model, intrinsics):
    """Jitted `(params, batch, noise) -> (coarse rgb, fine rgb)` of a ray batch with
    explicit jitter, through the library's `HeadNeRF.condition` / `HeadNeRF.render`."""
    import jax
    import jax.numpy as jnp
    from geneface_jax.render import fields
    from geneface_jax.render import rays as rays_lib
    from geneface_jax.train import nerf
    k = jnp.asarray(intrinsics, jnp.float32)

    @jax.jit
    def colors(params, batch, noise):
        rays, frames = batch["rays"], batch["frames"]
        cond = nerf.head_condition(model, params, frames["windows"], True)[rays["frame"]]
        o, d = rays_lib.rays_for_pixels(frames["pose"][rays["frame"]], k, rays["rows"],
                                        rays["cols"])
        out = model.apply({"params": params}, o, d, cond, rays["background"], noise=noise,
                          method=fields.HeadNeRF.render)
        return out.coarse.rgb, out.fine.rgb

    return colors


# --------------------------------------------------------------------------- profile

def mlp_macs_per_sample(cfg):
    """Multiply-accumulates of one HeadField evaluation's Linear layers (one sample)."""
    in_dim = cfg.pos_dim + cfg.cond_dim
    macs = 0
    for i in range(cfg.depth):
        fan_in = in_dim if i == 0 else cfg.width
        if cfg.skip is not None and i == cfg.skip + 1:
            fan_in += in_dim
        macs += fan_in * cfg.width
    macs += cfg.width
    cin = cfg.width + cfg.view_dim
    for _ in range(cfg.color_depth):
        macs += cin * cfg.color_width
        cin = cfg.color_width
    return macs + 3 * cin


def per_ray_macs(cfg):
    """The part of `mlp_macs_per_sample` that multiplies per-ray inputs (the landmark
    condition in the first and skip layers, the view encoding in the first colour
    layer): the library's `fields.PartsLinear` computes it once per ray and pass, the
    PyTorch side (concatenation, as GeneFace) once per sample."""
    macs = cfg.cond_dim * cfg.width * (2 if cfg.skip is not None else 1)
    return macs + cfg.view_dim * cfg.color_width


def bare_mlp_gflops(cfg, rows, calls):
    """GFLOP/s of a JAX gradient step of a bare `cfg.depth` x `cfg.width` ReLU MLP (no
    bias, input = the encoded position, loss = mean square) on `rows` samples: the
    matmul speed this CPU gives JAX on the network's shapes, with no other work."""
    import jax
    import jax.numpy as jnp
    keys = jax.random.split(jax.random.PRNGKey(0), cfg.depth + 1)
    dims = [cfg.pos_dim] + [cfg.width] * cfg.depth
    ws = [jax.random.normal(k, (a, b)) / jnp.sqrt(a) for k, a, b in
          zip(keys[1:], dims[:-1], dims[1:])]
    x = jax.random.normal(keys[0], (rows, cfg.pos_dim))

    def loss(ws, x):
        h = x
        for w in ws:
            h = jax.nn.relu(h @ w)
        return jnp.mean(h * h)

    grad = jax.jit(jax.grad(loss)).lower(ws, x).compile()
    jax.block_until_ready(grad(ws, x))
    times = []
    for _ in range(max(calls, 3)):
        t = time.perf_counter()
        jax.block_until_ready(grad(ws, x))
        times.append(time.perf_counter() - t)
    flops = 3 * 2 * rows * sum(a * b for a, b in zip(dims[:-1], dims[1:]))
    return flops / median(times) / 1e9


def xla_flops(compiled):
    """FLOPs of a compiled XLA executable from its cost analysis (None if unavailable)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend reports costs
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


def matmul_peak(sizes, repeats, torch):
    """The best float32 matmul rate of this process' core budget, GFLOP/s: for each n in
    `sizes`, the fastest of `repeats` n x n x n products, in JAX (jit of `jnp.dot`) and in
    PyTorch (`torch.mm`). Returns {"jax": best GFLOP/s, "torch": best GFLOP/s, "n": the
    size of the fastest product}."""
    best = {"jax": 0.0, "torch": 0.0}
    best_n, best_rate = sizes[0], 0.0
    for n in sizes:
        probe = PeakProbe(n, torch)
        for _ in range(repeats):
            rates = probe.measure()
            for name, rate in rates.items():
                best[name] = max(best[name], rate)
            if max(rates.values()) > best_rate:
                best_n, best_rate = n, max(rates.values())
    return {**{k: round(v, 1) for k, v in best.items()}, "n": best_n}


class PeakProbe:
    """The machine's matmul rate now: one n x n x n float32 product in JAX and one in
    PyTorch per `measure()` (inputs made and the JAX product compiled up front).

    As a contender of `timed_calls` it runs between the timed steps, so the peak that
    `peak_fraction` divides by is measured in the same minutes as the step (this shared
    VM's matmul rate drifts between and within runs); `rates` keeps the faster of the
    two products of each timed call, GFLOP/s."""

    def __init__(self, n, torch):
        import jax
        import jax.numpy as jnp
        import numpy as np
        rng = np.random.default_rng(0)
        a, b = (rng.standard_normal((n, n)).astype(np.float32) for _ in range(2))
        self.n, self.torch, self.rates = n, torch, []
        self._jax = (jax.jit(jnp.dot), jax.device_put(a), jax.device_put(b))
        self._torch = (torch.from_numpy(a), torch.from_numpy(b))
        self._jax[0](*self._jax[1:]).block_until_ready()        # compile
        torch.mm(*self._torch)

    def measure(self):
        """{"jax": GFLOP/s, "torch": GFLOP/s} of one product each."""
        dot, ja, jb = self._jax
        flop = 2.0 * self.n ** 3
        t = time.perf_counter()
        dot(ja, jb).block_until_ready()
        t_jax = time.perf_counter() - t
        t = time.perf_counter()
        self.torch.mm(*self._torch)
        t_torch = time.perf_counter() - t
        return {"jax": flop / t_jax / 1e9, "torch": flop / t_torch / 1e9}

    def __call__(self, timed):
        rates = self.measure()
        if timed:
            self.rates.append(max(rates.values()))

    def spread(self):
        """[min, median, max] of the timed calls' rates, GFLOP/s."""
        return [round(min(self.rates), 1), round(median(self.rates), 1),
                round(max(self.rates), 1)]


def load_note(load, threads):
    """A warning when other processes loaded the machine during a multi-thread run."""
    cores = os.cpu_count() or 1
    if threads > 1 and max(load) > cores:
        return (f"measured under load from other processes (1-min load average up to "
                f"{max(load):.1f} on {cores} cores): PyTorch's OpenMP regions stall on "
                f"descheduled threads far more than XLA's thread pool, which flatters JAX; "
                f"--threads=1 compares per-core speed robustly")
    return ""


# --------------------------------------------------------------------------- main

def timed_calls(contenders, warmup, steps, blocks=False):
    """Runs `contenders` [(name, fn(timed: bool))] `warmup + steps` times each: in turn,
    rotating who goes first, or with `blocks` each contender's calls in a row. Returns
    ({name: [seconds of the timed calls]}, {name: {"minor_faults": per timed call,
    "system_s": kernel CPU seconds per timed call}}) (this process' rusage over the call)."""
    import resource
    times = {name: [] for name, _ in contenders}
    faults = {name: 0 for name, _ in contenders}
    system = {name: 0.0 for name, _ in contenders}
    n = len(contenders)
    if blocks:
        order = [(i, c) for c in contenders for i in range(warmup + steps)]
    else:
        order = [(i, c) for i in range(warmup + steps)
                 for c in contenders[i % n:] + contenders[:i % n]]
    for i, (name, fn) in order:
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t = time.perf_counter()
        fn(i >= warmup)
        if i >= warmup:
            times[name].append(time.perf_counter() - t)
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            faults[name] += r1.ru_minflt - r0.ru_minflt
            system[name] += r1.ru_stime - r0.ru_stime
    usage = {name: {"minor_faults": round(faults[name] / steps),
                    "system_s": round(system[name] / steps, 3)} for name in times}
    return times, usage


def main(argv):
    del argv
    cfg_name, rays_per_step, size, steps, warmup = (FLAGS.config, FLAGS.rays, FLAGS.size,
                                                    FLAGS.steps, FLAGS.warmup)
    use_compile, do_profile, threads_wanted = FLAGS.torch_compile, FLAGS.profile, FLAGS.threads
    num_frames = NUM_FRAMES
    if FLAGS.smoke:
        cfg_name, rays_per_step, size, steps, warmup, num_frames = "small", 64, 32, 2, 0, 8
        use_compile, do_profile = False, False
        threads_wanted = FLAGS.threads or 1
    if steps < 1 or rays_per_step < 1 or warmup < 0 or FLAGS.chunk < 1:
        raise app.UsageError("--steps, --rays and --chunk must be >= 1, --warmup >= 0")
    if size < 16:
        raise app.UsageError(f"--size must be >= 16, got {size}")
    threads = restrict_cores(threads_wanted)
    from experiments import common
    malloc = common.host_malloc_setting(FLAGS.system_malloc)
    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]

    import jax
    import numpy as np
    import torch
    from geneface_jax.data.synthetic import world
    from geneface_jax.render import fields
    from geneface_jax.train import loop, nerf, parallel
    from experiments.bench import xla_trace

    torch.set_num_threads(threads)
    torch.manual_seed(FLAGS.seed)
    log = lambda *a: print(*a, flush=True)  # noqa: E731

    # smoother on from the first step: both sides run (and train) the attention smoother
    cfg = dataclasses.replace(fields.NeRFConfig.small() if cfg_name == "small"
                              else fields.NeRFConfig.paper(), smooth_warmup_steps=0)
    optim = nerf.NeRFOptimConfig()
    arrays, meta, _ = world.make_person(FLAGS.seed, size=size, num_frames=num_frames,
                                        progress=False)
    views = nerf.PersonViews(dict(arrays, meta=meta))
    sampling = nerf.RaySamplingConfig(frames_per_step=1, rays_per_frame=rays_per_step)
    get_batch = nerf.make_batch_fn(views, nerf.HEAD, sampling, window=cfg.smooth_window,
                                   seed=FLAGS.seed)
    host_batches = [get_batch(i) for i in range(NUM_BATCHES)]
    t_frame = views.split_range("train")[0]
    frame_inputs = {"pose": views.poses[t_frame],
                    "window": views.windows([t_frame], cfg.smooth_window)[0],
                    "background": views.background}
    frame_rays = size * size

    # ---- JAX: the library's step on a 1-device mesh
    model, state = nerf.create_nerf_state(cfg, optim, nerf.HEAD, FLAGS.seed)
    mesh = parallel.make_mesh(jax.devices()[:1])
    state = parallel.replicate(state, mesh)
    jbatches = [parallel.shard_batch(b, mesh, ("frames",)) for b in host_batches]
    n_calls = 1 + warmup + steps + 1
    keys = [loop.step_key(state, i) for i in range(n_calls)]
    init_params = jax.device_get(state.params)       # host copy: the step donates the state
    jax_params = fields.count_params(init_params)
    step_fn = nerf.make_head_step(model, views.intrinsics)
    t = time.perf_counter()
    lowered_step = parallel.data_parallel(step_fn, mesh, replicated=("frames",)).lower(
        state, jbatches[0], keys[0])
    jax_step = lowered_step.compile()
    jax_compile_s = time.perf_counter() - t
    log(f"jax: {jax_params} params, step compiled in {jax_compile_s:.1f} s")

    # ---- equivalence: same rays, same jitter -> same colours
    noise0 = step_noise(keys[0], rays_per_step, cfg)
    colors_j = jax.device_get(jax_colors_fn(model, views.intrinsics)(
        init_params, host_batches[0], noise0))
    eager = TorchRunner(cfg, optim, views.intrinsics, init_params, host_batches,
                        frame_inputs, FLAGS.chunk)
    if eager.num_params != jax_params:
        raise RuntimeError(f"parameter counts differ: jax {jax_params}, torch "
                           f"{eager.num_params}")
    tnoise0 = tuple(torch.from_numpy(u) for u in noise0)
    colors_t = eager.render_colors(0, tnoise0)
    color_err = max(float(np.max(np.abs(a - b))) for a, b in zip(colors_j, colors_t))
    log(f"rendered colours (coarse, fine; same rays and jitter): max abs err {color_err:.2e}")
    if not color_err <= COLOR_ATOL:
        raise RuntimeError(f"JAX and PyTorch render different colours: max abs err "
                           f"{color_err:.3g} > {COLOR_ATOL}")

    # ---- the first training step on both sides
    state, jax_metrics = jax_step(state, jbatches[0], keys[0])
    jax_metrics = {k: float(v) for k, v in jax.device_get(jax_metrics).items()}
    jax_after = jax.device_get(state.params)
    before = [p.detach().numpy().copy() for p in eager.params]
    torch_metrics = eager.step(0, noise=tnoise0)
    torch_after = [p.detach().numpy().copy() for p in eager.params]
    grads = [p.grad.numpy().copy() for p in eager.params]
    check = check_first_step(jax_metrics, torch_metrics, before,
                             jax_params_in_torch_order(eager, jax_after), torch_after, grads,
                             optim.lr)
    log(f"first training step agrees (relative errors): {check}")
    runners = {"torch_eager": eager}

    # ---- optional: the same step with XLA:CPU's dots in Eigen, from a copy of the state
    eigen = None
    if FLAGS.eigen_dots:
        eigen_state = parallel.replicate(jax.device_get(state), mesh)
        t = time.perf_counter()
        eigen_step = lowered_step.compile(compiler_options=EIGEN_DOTS)
        log(f"jax (dots in Eigen): step compiled in {time.perf_counter() - t:.1f} s")
        # both executables take the same step from the same state
        state, m_ynn = jax_step(state, jbatches[1], keys[1])
        eigen_state, m_eigen = eigen_step(eigen_state, jbatches[1], keys[1])
        m_ynn, m_eigen = jax.device_get((m_ynn, m_eigen))
        eigen_err = max(rel_err(float(m_eigen[k]), float(m_ynn[k]))
                        for k in ("loss", "grad_norm"))
        log(f"dots in Eigen: same step to rel err {eigen_err:.2e} (loss, gradient norm)")
        if not eigen_err <= CHECK_RTOL:
            raise RuntimeError(f"the step with dots in Eigen differs: rel err {eigen_err:.2e}")
        # what the option changed: the YNNPACK fusions of each compiled step
        fusions = {name: exe.as_text().count('"kind":"__ynn_fusion"')
                   for name, exe in (("default", jax_step), ("eigen_dots", eigen_step))}
        log(f"YNNPACK fusions in the compiled step: {fusions}")
        eigen = {"step": eigen_step, "box": {"state": eigen_state, "call": 1},
                 "rel_err": eigen_err, "ynn_fusions": fusions}

    # ---- full-frame renders (deterministic samples)
    renderer = nerf.FrameRenderer(cfg, {"params": init_params}, views, mesh=mesh,
                                  chunk=FLAGS.chunk)
    t = time.perf_counter()
    frame_j = renderer.render(frame_inputs["pose"], frame_inputs["window"])["rgb"]
    jax_render_compile_s = time.perf_counter() - t
    eager_render = TorchRunner(cfg, optim, views.intrinsics, init_params, host_batches[:1],
                               frame_inputs, FLAGS.chunk)   # initial params, like `renderer`
    frame_t = eager_render.render_frame()
    render_err = float(np.max(np.abs(frame_j - frame_t)))
    log(f"full frame {size}x{size}: max abs err {render_err:.2e} "
        f"(jax render compiled in {jax_render_compile_s:.1f} s)")
    if not render_err <= COLOR_ATOL:
        raise RuntimeError(f"JAX and PyTorch full-frame renders differ: max abs err "
                           f"{render_err:.3g} > {COLOR_ATOL}")
    render_runners = {"torch_eager": eager_render}

    # ---- torch.compile (inductor) of the loss and of the render chunk
    torch_compile_s, compile_note = None, "not tried (--notorch_compile)"
    if use_compile:
        try:
            t = time.perf_counter()
            comp = TorchRunner(cfg, optim, views.intrinsics, init_params, host_batches,
                               frame_inputs, FLAGS.chunk, compile_model=True)
            out_c = comp.step(0, noise=tnoise0)
            comp_render = TorchRunner(cfg, optim, views.intrinsics, init_params,
                                      host_batches[:1], frame_inputs, FLAGS.chunk,
                                      compile_model=True)
            frame_c = comp_render.render_frame()
            torch_compile_s = time.perf_counter() - t
            for name in ("loss", "grad_norm"):
                err = rel_err(out_c[name], jax_metrics[name])
                if err > CHECK_RTOL:
                    raise RuntimeError(f"compiled {name} differs from JAX by {err:.2e}")
            err = float(np.max(np.abs(frame_c - frame_j)))
            if err > COLOR_ATOL:
                raise RuntimeError(f"compiled full-frame render differs from JAX by {err:.2e}")
            runners["torch_compile"] = comp
            render_runners["torch_compile"] = comp_render
            compile_note = f"compiled in {torch_compile_s:.0f} s"
            log(f"torch.compile: first step + render (compile) {torch_compile_s:.1f} s")
        except Exception as e:  # noqa: BLE001 - report any failure of the compiler
            compile_note = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
            log(f"torch.compile {compile_note}; using eager")

    # ---- the machine's matmul peak: the best of each product size first, then one
    # product of the largest size (the steadiest rate: a 512^3 product takes ~3 ms) per
    # framework between the timed calls (a contender of `timed_calls`)
    sizes = (256,) if FLAGS.smoke else (512, 1024, 2048)
    peak = matmul_peak(sizes, 2 if FLAGS.smoke else 5, torch)
    train_probe, render_probe = PeakProbe(sizes[-1], torch), PeakProbe(sizes[-1], torch)

    # ---- timing (--timing order): training steps
    def stepper(step, box):
        """One training call of a compiled JAX `step` on `box`'s state; every stepper walks
        the same batch and key sequence: 1, 2, 3, ..."""
        def run(timed):
            i = box["call"]
            box["state"], _ = step(box["state"], jbatches[i % NUM_BATCHES],
                                   keys[i % len(keys)])
            box["call"] += 1
            jax.block_until_ready(box["state"])
        return run

    run_jax = stepper(jax_step, {"state": state, "call": 1})

    torch_timings = {name: {} for name in runners}

    def torch_step(name, r, timed):   # the same batch sequence as JAX: 1, 2, 3, ...
        r.step(r.num_steps, timings=torch_timings[name] if timed else None)

    contenders = [("jax", run_jax)] + [
        (name, lambda timed, n=name, r=r: torch_step(n, r, timed)) for name, r in runners.items()]
    if eigen is not None:
        contenders.append(("jax_eigen_dots", stepper(eigen["step"], eigen["box"])))
    times, train_usage = timed_calls(contenders + [("matmul_peak", train_probe)], warmup,
                                     steps, FLAGS.timing == "blocks")
    del times["matmul_peak"], train_usage["matmul_peak"]
    med = {name: median(ts) for name, ts in times.items()}
    for name, ts in times.items():
        log(f"train {name}: median step {med[name] * 1e3:.1f} ms (min {min(ts) * 1e3:.1f}, "
            f"max {max(ts) * 1e3:.1f}) = {rays_per_step / med[name]:.0f} rays/s")
    ref = min(runners, key=lambda n: med[n])
    eigen_result = {}
    if eigen is not None:
        eigen_result = {
            "jax_eigen_dots_rays_per_s": round(rays_per_step / med["jax_eigen_dots"], 1),
            "eigen_dots_speedup": round(med[ref] / med["jax_eigen_dots"], 3),
            # median step time with YNNPACK dots / with Eigen dots (> 1: Eigen faster)
            "eigen_dots_step_ratio": round(med["jax"] / med["jax_eigen_dots"], 3),
            "eigen_dots_rel_err": float(f"{eigen['rel_err']:.2e}"),
            "ynn_fusions": eigen["ynn_fusions"]}

    # ---- timing (--timing order): full-frame renders
    r_contenders = [("jax", lambda timed: renderer.render(frame_inputs["pose"],
                                                          frame_inputs["window"]))] + [
        (name, lambda timed, r=r: r.render_frame()) for name, r in render_runners.items()]
    r_times, _ = timed_calls(r_contenders + [("matmul_peak", render_probe)], warmup, steps,
                             FLAGS.timing == "blocks")
    del r_times["matmul_peak"]
    r_med = {name: median(ts) for name, ts in r_times.items()}
    for name, ts in r_times.items():
        log(f"render {name}: median frame {r_med[name] * 1e3:.1f} ms = "
            f"{frame_rays / r_med[name]:.0f} rays/s")
    r_ref = min(render_runners, key=lambda n: r_med[n])

    # ---- FLOP counts and the machine's measured matmul peak
    per_ray_evals = 2 * cfg.num_coarse + cfg.num_fine
    samples = rays_per_step * per_ray_evals
    # fwd + 2 matmuls in bwd. PyTorch multiplies the per-ray inputs per sample; the
    # JAX side once per ray and pass (2 passes: coarse, fine).
    mlp_flops = 3 * 2 * samples * mlp_macs_per_sample(cfg)
    jax_mlp_flops = 3 * 2 * (samples * (mlp_macs_per_sample(cfg) - per_ray_macs(cfg))
                             + rays_per_step * 2 * per_ray_macs(cfg))
    step_flops = xla_flops(jax_step)
    render_flops = 2 * frame_rays * per_ray_evals * mlp_macs_per_sample(cfg)
    jax_render_flops = 2 * frame_rays * (per_ray_evals * (mlp_macs_per_sample(cfg)
                                                          - per_ray_macs(cfg))
                                         + 2 * per_ray_macs(cfg))
    # The peak of each fraction: the median matmul rate measured between its timed calls
    # (the step's time is a median too); the best rate seen anywhere in the run is the
    # stricter denominator of the `*_vs_best` fractions.
    peak_gflops = median(train_probe.rates)
    render_peak_gflops = median(render_probe.rates)
    best_gflops = max(peak["jax"], peak["torch"], *train_probe.rates, *render_probe.rates)
    # Achieved: XLA's FLOP count of the whole compiled step (the analytic MLP count where
    # the backend reports none) per median step; the render's MLP FLOPs per median frame.
    jax_step_gflops = (step_flops or jax_mlp_flops) / med["jax"] / 1e9
    jax_render_gflops = jax_render_flops / r_med["jax"] / 1e9
    log(f"matmul peak: best {best_gflops:.1f} GFLOP/s ({peak['n']}^3 products), between "
        f"the training steps {train_probe.spread()}, between the renders "
        f"{render_probe.spread()} (min, median, max); JAX training step "
        f"{jax_step_gflops:.1f} GFLOP/s ({jax_step_gflops / peak_gflops:.0%} of peak), "
        f"render {jax_render_gflops:.1f} GFLOP/s ({jax_render_gflops / render_peak_gflops:.0%})")

    # ---- profile
    profile = {}
    if do_profile:
        top, matmul_share, torch_mm_ms = xla_trace.torch_top_ops(eager.step)
        xla_ops = xla_trace.thunk_breakdown(lambda: run_jax(False))
        try:
            temp_mb = round(jax_step.memory_analysis().temp_size_in_bytes / 2 ** 20, 1)
        except Exception:  # noqa: BLE001 - not every backend reports it
            temp_mb = None
        bare_gflops = bare_mlp_gflops(cfg, samples, steps)
        profile = {
            "field_evaluations_per_step": samples,
            "mlp_matmul_flops_per_step": mlp_flops,
            "jax_mlp_matmul_flops_per_step": jax_mlp_flops,
            "xla_flops_per_step": step_flops,
            "mlp_share_of_xla_flops": (round(jax_mlp_flops / step_flops, 3) if step_flops
                                       else None),
            "jax_mlp_gflops": round(jax_mlp_flops / med["jax"] / 1e9, 2),
            f"{ref}_mlp_gflops": round(mlp_flops / med[ref] / 1e9, 2),
            "jax_render_mlp_gflops": round(jax_render_flops / r_med["jax"] / 1e9, 2),
            f"{r_ref}_render_mlp_gflops": round(render_flops / r_med[r_ref] / 1e9, 2),
            "torch_eager_matmul_share": matmul_share,
            "torch_eager_matmul_ms": torch_mm_ms,
            "torch_eager_top_ops": top,
            # the JAX step's ops by kind (experiments/bench/xla_trace.py)
            "jax_thunks": xla_ops,
            # host memory: the step's XLA temporaries, and the page faults and kernel
            # seconds per timed training call of each contender
            "jax_step_temp_mb": temp_mb,
            "host_usage_per_step": train_usage,
            # calibration: a bare density trunk (depth x width, ReLU, no bias) fwd + bwd
            # on the step's field evaluations, in JAX: what the matmuls alone reach
            "jax_bare_mlp_gflops": round(bare_gflops, 1),
            "jax_bare_mlp_peak_fraction": round(bare_gflops / peak_gflops, 3),
        }
        if "matmul_ms" in xla_ops:
            log(f"matmuls per step: JAX {xla_ops['matmul_ms']:.0f} ms of "
                f"{xla_ops['ops_ms']:.0f} ms of ops; PyTorch eager "
                f"{torch_mm_ms:.0f} ms")
        for name, tm in torch_timings.items():
            profile[name] = {f"{k}_s": round(v / steps, 4) for k, v in tm.items()}
        log("profile:", json.dumps(profile))

    load = (load_start, os.getloadavg()[0])
    jax_rps = rays_per_step / med["jax"]
    torch_rps = rays_per_step / med[ref]
    jax_render_rps = frame_rays / r_med["jax"]
    torch_render_rps = frame_rays / r_med[r_ref]
    result = {
        "jax_rays_per_s": round(jax_rps, 1),
        "torch_rays_per_s": round(torch_rps, 1),
        "speedup": round(jax_rps / torch_rps, 3),
        "torch_reference": ref,
        "torch_eager_rays_per_s": round(rays_per_step / med["torch_eager"], 1),
        "torch_compile_rays_per_s": (round(rays_per_step / med["torch_compile"], 1)
                                     if "torch_compile" in med else None),
        "jax_render_rays_per_s": round(jax_render_rps, 1),
        "torch_render_rays_per_s": round(torch_render_rps, 1),
        "render_speedup": round(jax_render_rps / torch_render_rps, 3),
        "torch_render_reference": r_ref,
        "peak_fraction": round(jax_step_gflops / peak_gflops, 3),
        "render_peak_fraction": round(jax_render_gflops / render_peak_gflops, 3),
        "peak_fraction_vs_best": round(jax_step_gflops / best_gflops, 3),
        "render_peak_fraction_vs_best": round(jax_render_gflops / best_gflops, 3),
        "jax_step_gflops": round(jax_step_gflops, 2),
        "jax_render_gflops": round(jax_render_gflops, 2),
        # best of 5 products per size before the timing, per framework, and the fastest
        # size; the 2048^3 products between the timed calls: [min, median, max]
        "matmul_peak_gflops": peak,
        "matmul_peak_during_training_gflops": train_probe.spread(),
        "matmul_peak_during_render_gflops": render_probe.spread(),
        "matmul_peak_best_gflops": round(best_gflops, 1),
        "step_flops_source": "xla cost analysis" if step_flops else "analytic MLP count",
        "torch_compile": compile_note,
        "config": cfg_name, "rays": rays_per_step,
        "samples_per_ray": [cfg.num_coarse, cfg.num_coarse + cfg.num_fine],
        "frame": [size, size], "chunk": FLAGS.chunk,
        "steps": steps, "warmup": warmup, "threads": threads, "host_malloc": malloc,
        "timing": FLAGS.timing,
        "devices": f"1 JAX {jax.devices()[0].platform} device; {cpu_name()}, "
                   f"{os.cpu_count()} cores on the machine",
        "params": jax_params,
        "equivalence_max_abs_err": float(f"{color_err:.2e}"),
        "render_max_abs_err": float(f"{render_err:.2e}"),
        "first_step_rel_err": check,
        "compile_seconds": round(jax_compile_s, 1),
        "torch_compile_seconds": (round(torch_compile_s, 1) if torch_compile_s else None),
        "jax_version": jax.__version__, "torch_version": torch.__version__,
        "python": platform.python_version(),
        "profile": profile if profile else "not profiled (--noprofile / --smoke)",
        "loadavg_1min": [round(x, 2) for x in load],
        "note": load_note(load, threads),
        "wall_seconds": round(time.perf_counter() - t_start, 1),
        **eigen_result,
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    app.run(main)
