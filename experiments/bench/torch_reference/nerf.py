"""GeneFace's landmark-conditioned head NeRF (AD-NeRF `Lm3dNeRF`) in PyTorch: landmark
encoder, attention smoother, coarse and fine fields, stratified + inverse-CDF sampling,
compositing; `HeadLoss` is one training step's objective, `HeadRunner` the training
setup (fused Adam + exponential decay) and the chunked full-frame render.

Written as a PyTorch user writes it: `nn.Linear` layers in `nn.ModuleList`s, `torch.cat`
of the encodings with the expanded per-ray condition (GeneFace's concatenating Linear;
the library multiplies the per-ray inputs once per ray instead), `nn.Conv1d` in the
smoother, `torch.searchsorted(right=True)` + `gather` for the pdf samples under
`torch.no_grad()`, `torch.sort` of the union, `F.mse_loss`, `torch.inference_mode()` for
rendering. Parameter names follow `geneface_jax.render.fields` (see `load_flax`).
"""

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from experiments.bench.torch_reference import PhaseTimer, load_flax, trainable

LEAKY = 0.02


def positional_encoding(x, freqs):
    """[x, sin(f0 x), cos(f0 x), sin(f1 x), ...] with freqs 2^0 .. 2^(L-1)."""
    scaled = x[..., None, :] * freqs[:, None]                      # [..., L, D]
    bands = torch.stack([torch.sin(scaled), torch.cos(scaled)], dim=-2)
    return torch.cat([x, bands.flatten(-3)], dim=-1)


def _skip_fan_in(cfg, i, in_dim):
    """Fan-in of density layer `i`: the input is re-concatenated after layer `skip`."""
    fan_in = in_dim if i == 0 else cfg.width
    return fan_in + (in_dim if cfg.skip is not None and i == cfg.skip + 1 else 0)


class NeRFMLP(nn.Module):
    """GeneFace's NeRFBackbone: density MLP with the input re-concatenated after layer
    `skip`, colour head on [last hidden, encoded view]."""

    def __init__(self, cfg):
        super().__init__()
        in_dim = cfg.pos_dim + cfg.cond_dim
        self.skip = cfg.skip
        self.density_linears = nn.ModuleList(
            nn.Linear(_skip_fan_in(cfg, i, in_dim), cfg.width) for i in range(cfg.depth))
        self.density_out_linear = nn.Linear(cfg.width, 1)
        dims = [cfg.width + cfg.view_dim] + [cfg.color_width] * cfg.color_depth
        self.color_linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:]))
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
        for name, n in (("pos_freqs", cfg.pos_freqs), ("view_freqs", cfg.view_freqs)):
            self.register_buffer(name, 2.0 ** torch.arange(n, dtype=torch.float32),
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
        dims = [68 * 3] + list(cfg.landmark_channels)
        self.encoder_conv = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:]))
        self.encoder_fc1 = nn.ModuleList([nn.Linear(dims[-1], cfg.landmark_fc),
                                          nn.Linear(cfg.landmark_fc, cfg.cond_dim)])

    def forward(self, landmarks):
        h = landmarks.flatten(-2)
        for layer in self.encoder_conv:
            h = F.leaky_relu(layer(h), LEAKY)
        h = F.leaky_relu(self.encoder_fc1[0](h), LEAKY)
        return self.encoder_fc1[1](h)


class AttentionSmoother(nn.Module):
    """AD-NeRF's AudioAttNet: window [B, W, C] -> [B, C]."""

    def __init__(self, cfg):
        super().__init__()
        dims = [cfg.cond_dim] + list(cfg.attention_channels) + [1]
        self.attention_conv = nn.ModuleList(nn.Conv1d(a, b, 3, padding=1)
                                            for a, b in zip(dims, dims[1:]))
        self.attention_linear = nn.Linear(cfg.smooth_window, cfg.smooth_window)

    def forward(self, window, enabled=True):
        if not enabled:
            return window[:, window.shape[1] // 2]
        y = window.transpose(1, 2)                                    # [B, C, W]
        for conv in self.attention_conv:
            y = F.leaky_relu(conv(y), LEAKY)
        weights = torch.softmax(self.attention_linear(y[:, 0]), dim=-1)
        return (weights[..., None] * window).sum(1)


def rays_for_pixels(pose, k, rows, cols):
    """Un-normalised world rays (camera depth t) through pixel centres."""
    u = cols.float() + 0.5
    v = rows.float() + 0.5
    d_cam = torch.stack([(u - k[2]) / k[0], -(v - k[3]) / k[1], -torch.ones_like(u)], -1)
    dirs = (pose[..., :3, :3] * d_cam[..., None, :]).sum(-1)
    return pose[..., :3, 3].expand_as(dirs), dirs


def stratified_samples(near, far, r, n, u=None):
    """`n` depths per ray in `n` equal bins, at `u` within each (bin midpoints if None)."""
    if u is None:
        u = torch.full((r, n), 0.5)
    return near + (far - near) * ((torch.arange(n, dtype=torch.float32) + u) / n)


def sample_pdf(bins, weights, n, u=None):
    """Inverse-CDF samples of a piecewise-constant pdf (NeRF's sample_pdf); `u` None:
    `linspace(0, 1, n)`."""
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
        dir_norm = directions.norm(dim=-1)
        view_dirs = directions / dir_norm.clamp_min(1e-12)[:, None]
        u_c, u_f = (None, None) if noise is None else noise

        def run(field, t):
            points = origins[:, None, :] + directions[:, None, :] * t[..., None]
            sigma, rgb = field(points, view_dirs, cond)
            return composite(sigma, rgb, t, dir_norm, background, cfg.last_sample_background)

        t_c = stratified_samples(cfg.near, cfg.far, origins.shape[0], cfg.num_coarse, u_c)
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


def batch_tensors(batch):
    """A host ray batch of `train.nerf.make_batch_fn` as the tensors `HeadLoss` takes."""
    rays, frames = batch["rays"], batch["frames"]
    as_long = lambda a: torch.from_numpy(np.asarray(a, np.int64))              # noqa: E731
    as_float = lambda a: torch.from_numpy(np.ascontiguousarray(a, np.float32))  # noqa: E731
    return (as_long(rays["rows"]), as_long(rays["cols"]), as_long(rays["frame"]),
            as_float(rays["target"]), as_float(rays["background"]),
            as_float(frames["pose"]), as_float(frames["windows"]))


class HeadRunner:
    """One PyTorch setup initialised from the library's Flax `params`: `HeadLoss`, Adam
    (fused, PyTorch's fastest on the CPU) + exponential decay (`optim`:
    `train.nerf.NeRFOptimConfig`), a training step on the host `batches` and a chunked
    full-frame render of `frame_inputs` (pose, window, background). `compile_model`:
    `torch.compile` the loss and the render chunk."""

    def __init__(self, cfg, optim, intrinsics, params, batches, frame_inputs, chunk,
                 compile_model=False):
        self.cfg, self.chunk = cfg, chunk
        self.module = HeadLoss(cfg, intrinsics)
        load_flax(self.module, params, prefix="model.")
        self.module.train()
        self.params = trainable(self.module)
        self.num_params = sum(p.numel() for p in self.params)
        self.opt = torch.optim.Adam(self.params, lr=optim.lr, betas=(0.9, 0.999), eps=1e-8,
                                    fused=True)
        rate, every = optim.decay_rate, optim.decay_steps
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: rate ** (s / every))
        self.num_steps = 0
        self.loss_fn = torch.compile(self.module) if compile_model else self.module
        self.render_chunk = (torch.compile(self._render_chunk) if compile_model
                             else self._render_chunk)
        self.batches = [batch_tensors(b) for b in batches]
        self.frame = {k: torch.from_numpy(np.ascontiguousarray(v, np.float32))
                      for k, v in frame_inputs.items()}

    def step(self, index=0, noise=None, timings=None):
        """One training step on batch `index`; `noise` = (u_coarse, u_fine) tensors
        (default: fresh uniforms). With `timings` (a dict) adds the seconds of forward,
        backward and optimizer. Returns the metrics (tensors)."""
        clock = PhaseTimer(timings)
        batch = self.batches[index % len(self.batches)]
        r = batch[0].shape[0]
        if noise is None:
            noise = (torch.rand(r, self.cfg.num_coarse), torch.rand(r, self.cfg.num_fine))
        smooth = self.num_steps >= self.cfg.smooth_warmup_steps
        self.opt.zero_grad(set_to_none=True)
        loss, mse_c, mse_f, acc = self.loss_fn(*batch, *noise, smooth=smooth)
        clock.mark("forward")
        loss.backward()
        clock.mark("backward")
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.params])
        self.opt.step()
        self.sched.step()
        self.num_steps += 1
        clock.mark("optimizer")
        return {"loss": loss.detach(), "mse_coarse": mse_c.detach(),
                "mse_fine": mse_f.detach(), "psnr": -10.0 * torch.log10(mse_f.detach()),
                "acc": acc.detach(), "grad_norm": grad_norm}

    def render_colors(self, batch_index, noise):
        """(coarse rgb, fine rgb) numpy of a training batch's rays with explicit jitter,
        without gradient (for the equivalence check)."""
        rows, cols, frame, _, bg, pose, windows = self.batches[batch_index]
        model = self.module.model
        with torch.no_grad():
            cond = model.condition(windows, True)[frame]
            o, d = rays_for_pixels(pose[frame], self.module.k, rows, cols)
            (rgb_c, _), (rgb_f, _) = model.render(o, d, cond, bg, noise)
        return rgb_c.numpy(), rgb_f.numpy()

    def _render_chunk(self, origins, directions, cond, background):
        (_, _), (rgb, acc) = self.module.model.render(origins, directions, cond, background)
        return rgb, acc

    def render_frame(self):
        """The whole frame `[H, W, 3]` (numpy) of `frame_inputs`: condition, pixel rays,
        chunked deterministic render under `torch.inference_mode()`."""
        f = self.frame
        h, w = f["background"].shape[:2]
        model = self.module.model
        with torch.inference_mode():
            cond = model.condition(f["window"][None], True)[0]
            rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            o, d = rays_for_pixels(f["pose"], self.module.k, rows.reshape(-1),
                                   cols.reshape(-1))
            bg = f["background"].reshape(-1, 3)
            out = []
            for i in range(0, h * w, self.chunk):
                c = min(self.chunk, h * w - i)
                rgb, _ = self.render_chunk(o[i:i + c], d[i:i + c], cond.expand(c, -1),
                                           bg[i:i + c])
                out.append(rgb)
            return torch.cat(out).reshape(h, w, 3).numpy()


def step_noise(key, r, cfg):
    """The sample jitter (u_coarse [R, num_coarse], u_fine [R, num_fine]) numpy that the
    library's head step draws from its rng on a 1-device mesh (mirrors
    `train.nerf._ray_noise` + `parallel.global_uniform`; if the library changes, the
    bench's start-up check fails)."""
    import jax
    k1, k2 = jax.random.split(key)
    return (np.array(jax.random.uniform(k1, (r, cfg.num_coarse))),
            np.array(jax.random.uniform(k2, (r, cfg.num_fine))))
