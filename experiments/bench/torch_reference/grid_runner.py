"""The PyTorch grid head's training setup (`torch_reference.grid` holds the modules):
`GridLoss` is one training step's objective (MSE + opacity entropy + ambient regulariser
outside the face rectangle), `GridRunner` the training setup (Adam per parameter group,
`torch.optim.Adam(fused=True)`, the occupancy update every N steps) and the chunked
full-frame render.

`grid_step_noise` draws, with JAX, the uniforms the library's `make_grid_head_step` draws
on a one-device mesh (sample jitter and occupancy-cell jitter), so both sides can take the
same step.
"""

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from experiments.bench.torch_reference import PhaseTimer, load_flax, trainable
from experiments.bench.torch_reference.grid import (COMPILE_OPTIONS, GridHead, bin_occupancy,
                                                    update_occupancy)
from experiments.bench.torch_reference.nerf import batch_tensors, rays_for_pixels


def binary_entropy(acc):
    a = acc.clamp(1e-5, 1.0 - 1e-5)
    return -a * torch.log2(a) - (1.0 - a) * torch.log2(1.0 - a)


class GridLoss(nn.Module):
    """One training step's objective (the library's `make_grid_head_step`): condition,
    per-frame code, rays, render over the batch's background; MSE + lambda_entropy x
    opacity entropy + amb_weight x weighted |ambient| of the rays outside the face
    rectangle. Returns (loss, mse, entropy, ambient, mean acc)."""

    def __init__(self, cfg, intrinsics, lambda_entropy):
        super().__init__()
        self.model = GridHead(cfg)
        self.lambda_entropy = lambda_entropy
        self.register_buffer("k", torch.as_tensor(intrinsics, dtype=torch.float32),
                             persistent=False)

    def forward(self, rows, cols, frame, target, background, pose, windows, code_index,
                face_rect, u, bits, amb_weight, smooth: bool = True):
        m = self.model
        cond = m.condition(windows, smooth)[frame]
        code = m.codes(code_index)[frame] if m.cfg.code_dim else None
        origins, dirs = rays_for_pixels(pose[frame], self.k, rows, cols)
        rgb, acc, amb = m.render(origins, dirs, cond, background, code, bits, u)
        rect = face_rect[frame]
        inside = (cols >= rect[:, 0]) & (cols < rect[:, 2]) & (rows >= rect[:, 1]) & \
            (rows < rect[:, 3])
        mse = F.mse_loss(rgb, target)
        ent = binary_entropy(acc).mean()
        amb_out = (amb * ~inside).mean()
        loss = mse + self.lambda_entropy * ent + amb_weight * amb_out
        return loss, mse, ent, amb_out, acc.mean()


def grid_step_noise(key, rays, cfg):
    """(u [R, K] sample jitter, jitter [G^3 / occupancy_stride, 3] of the cells an update
    probes) numpy: what the library's grid head step draws from its key on a one-device
    mesh (mirrors `train.nerf.make_grid_head_step`; if the library changes, the benches'
    start-up check fails)."""
    import jax
    k_occ, k_loss = jax.random.split(key)
    cells = cfg.grid_size ** 3 // cfg.occupancy_stride
    return (np.array(jax.random.uniform(k_loss, (rays, cfg.num_samples))),
            np.array(jax.random.uniform(k_occ, (cells, 3))))


def _tensors(batch):
    """A host ray batch of `train.nerf.make_batch_fn` as the tensors `GridLoss` takes: the
    MLP head's (`nerf.batch_tensors`) and the frames' code indices and face rectangles."""
    frames = batch["frames"]
    return batch_tensors(batch) + (
        torch.from_numpy(np.asarray(frames["code_index"], np.int64)),
        torch.from_numpy(np.asarray(frames["face_rect"], np.int64)))


def param_groups(module, optim):
    """Adam parameter groups of the library's `make_grid_optimizer`: grid tables at
    grid_lr_scale x lr, the attention smoother at smoother_lr_scale x lr, the rest at lr."""
    groups = {"grid": [], "smoother": [], "net": []}
    for name, p in module.named_parameters():
        parts = name.split(".")
        group = "grid" if "table" in parts else "smoother" if "smoother" in parts else "net"
        groups[group].append(p)
    scale = {"grid": optim.grid_lr_scale, "smoother": optim.smoother_lr_scale, "net": 1.0}
    return [{"params": ps, "lr": optim.lr * scale[g]} for g, ps in groups.items() if ps]


class GridRunner:
    """One PyTorch setup initialised from the library's Flax variables (`variables`:
    {"params", "occupancy"}): `GridLoss`, fused Adam per parameter group (`optim`:
    `train.nerf.GridOptimConfig`, eps 1e-15) + exponential decay, the occupancy update
    every `occupancy_every` steps, training steps on the host `batches`, and a chunked
    full-frame render of `frame_inputs` (pose, window, background) with the mean code.
    `compile_model`: `torch.compile` the loss and the render chunk (`COMPILE_OPTIONS`)."""

    def __init__(self, cfg, optim, intrinsics, variables, batches, frame_inputs, chunk,
                 compile_model=False):
        self.cfg, self.optim, self.chunk = cfg, optim, chunk
        self.module = GridLoss(cfg, intrinsics, optim.lambda_entropy)
        load_flax(self.module, variables["params"], prefix="model.")
        self.density = torch.from_numpy(np.array(variables["occupancy"]["density"],
                                                 np.float32))
        self.bits = torch.from_numpy(np.array(variables["occupancy"]["bits"], np.float32))
        self.params = trainable(self.module)
        self.opt = torch.optim.Adam(param_groups(self.module, optim), lr=optim.lr,
                                    eps=1e-15, fused=True)
        rate, every = optim.decay_rate, optim.decay_steps
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: rate ** (s / every))
        self.num_steps = 0
        compiled = lambda f: torch.compile(f, options=COMPILE_OPTIONS)  # noqa: E731
        self.loss_fn = compiled(self.module) if compile_model else self.module
        self.render_chunk = compiled(self._render_chunk) if compile_model else self._render_chunk
        self.batches = [_tensors(b) for b in batches]
        self.frame = {k: torch.from_numpy(np.ascontiguousarray(v, np.float32))
                      for k, v in frame_inputs.items()}

    def update_occupancy(self, windows, smooth, jitter=None):
        """The occupancy update of this step under the condition of `windows[:1]`
        (`update_occupancy`, update index = step // occupancy_every; `jitter` None: fresh
        uniforms)."""
        cfg = self.cfg
        if jitter is None:
            jitter = torch.rand(cfg.grid_size ** 3 // cfg.occupancy_stride, 3)
        with torch.no_grad():
            cond = self.module.model.condition(windows[:1], smooth)
            self.density, self.bits = update_occupancy(
                self.module.model, self.density, cond, cfg, jitter,
                self.num_steps // cfg.occupancy_every)

    def step(self, index=0, noise=None, timings=None):
        """One training step on batch `index` (the occupancy update first every
        `occupancy_every` steps); `noise` = (u [R, K], cell jitter) tensors
        (default: fresh uniforms). With `timings` (a dict) adds the seconds of forward,
        backward and optimizer. Returns the metrics (tensors)."""
        clock = PhaseTimer(timings)
        cfg, optim = self.cfg, self.optim
        batch = self.batches[index % len(self.batches)]
        u, jitter = (None, None) if noise is None else noise
        smooth = self.num_steps >= cfg.smooth_warmup_steps
        if self.num_steps % cfg.occupancy_every == 0:
            self.update_occupancy(batch[6], smooth, jitter)
            clock.mark("occupancy")
        u = torch.rand(batch[0].shape[0], cfg.num_samples) if u is None else u
        amb_weight = torch.tensor(optim.lambda_ambient * min(
            self.num_steps / max(optim.ambient_ramp_steps, 1), 1.0))
        self.opt.zero_grad(set_to_none=True)
        loss, mse, ent, amb, acc = self.loss_fn(*batch, u, self.bits, amb_weight,
                                                smooth=smooth)
        clock.mark("forward")
        loss.backward()
        clock.mark("backward")
        self.opt.step()
        self.sched.step()
        self.num_steps += 1
        clock.mark("optimizer")
        return {"loss": loss.detach(), "mse": mse.detach(), "entropy": ent.detach(),
                "ambient": amb.detach(), "acc": acc.detach(),
                "occupied": self.bits.mean()}

    def render_colors(self, batch_index, u):
        """Colours `[R, 3]` (numpy) of a training batch's rays with jitter `u` under the
        current bits, without gradient (the equivalence check)."""
        rows, cols, frame, _, bg, pose, windows, code_index, _ = self.batches[batch_index]
        m = self.module.model
        with torch.no_grad():
            cond = m.condition(windows, True)[frame]
            code = m.codes(code_index)[frame] if self.cfg.code_dim else None
            o, d = rays_for_pixels(pose[frame], self.module.k, rows, cols)
            return m.render(o, d, cond, bg, code, self.bits, u)[0].numpy()

    def _render_chunk(self, origins, directions, cond, background, code, bits):
        return self.module.model.render(origins, directions, cond, background, code, bits)[0]

    def render_frame(self):
        """The whole frame `[H, W, 3]` (numpy) of `frame_inputs`, as the library's
        `FrameRenderer` renders a grid head: condition, mean code, pixel rays; the rays
        that meet an occupied bin rendered at the bin midpoints in chunks of `chunk` (the
        last one padded with copies of its last ray: one compiled shape), the others the
        background; under `torch.inference_mode()`."""
        f, c = self.frame, self.chunk
        h, w = f["background"].shape[:2]
        m = self.module.model
        with torch.inference_mode():
            cond = m.condition(f["window"][None], True)[0]
            code = m.mean_code()[None] if self.cfg.code_dim else None
            rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            o, d = rays_for_pixels(f["pose"], self.module.k, rows.reshape(-1),
                                   cols.reshape(-1))
            bg = f["background"].reshape(-1, 3)
            hit = bin_occupancy(o, d, self.bits, self.cfg)[2].amax(-1) > 0
            sel = hit.nonzero()[:, 0]
            sel = torch.cat([sel, sel[-1:].expand(-len(sel) % c)]) if len(sel) else sel
            out = bg.clone()
            for i in range(0, len(sel), c):
                s = sel[i:i + c]
                out[s] = self.render_chunk(o[s], d[s], cond.expand(c, -1), bg[s],
                                           None if code is None else code.expand(c, -1),
                                           self.bits)
            return out.reshape(h, w, 3).numpy()
