"""Stage 2 in PyTorch: GeneFace's CNN post-net (generator), its frame-level MLP
discriminator and the GAN task step (`GANRunner`).

Generator loss 0.85 LSGAN `(D(G(x)) - 1)^2` + 0.1 SyncNet loss (frozen landmark SyncNet on
5-frame windows every 2 frames, `Tensor.unfold`) + 0.05 `|G(x) - x|^2`; discriminator loss
`D(G(x))^2 + (D(real) - 1)^2` on the detached refinement, with its `requires_grad`
switched off during the generator update. Each network has its own Adam (beta1 0) with
global-norm clipping (`clip_grad_norm_`), the discriminator a `StepLR`; an EMA of the
generator (parameters and BatchNorm statistics) is updated with `torch._foreach_lerp_`
(as timm's ModelEmaV3). Plain `nn.BatchNorm1d` equals the library's masked BatchNorm on
batches without padding (the only ones used here).
"""

import numpy as np
import torch
from torch import nn

from experiments.bench.torch_reference import load_flax
from experiments.bench.torch_reference.syncnet import SyncNet, sync_loss


class ConvBN(nn.Module):
    """GeneFace's post-net block: Conv1d -> BatchNorm1d (-> + x) -> LeakyReLU."""

    def __init__(self, cin, cout, kernel, residual, slope):
        super().__init__()
        self.conv = nn.Conv1d(cin, cout, kernel, 1, kernel // 2)
        self.bn = nn.BatchNorm1d(cout, momentum=0.1, eps=1e-5)
        self.act = nn.LeakyReLU(slope)
        self.residual = residual

    def forward(self, x):
        y = self.bn(self.conv(x))
        return self.act(y + x if self.residual else y)


class PostNet(nn.Module):
    """`[B, T, D]` motion -> motion + a residual from blocks of `ConvBN` (hidden -> wide ->
    hidden channels) and a 1x1 conv; coordinates in `static_coords` pass unchanged."""

    def __init__(self, c):
        super().__init__()
        k, s = c.kernel_size, c.slope
        for name, cin, width in (("block1", c.motion_dim, c.hidden),
                                 ("block2", c.hidden, c.wide)):
            setattr(self, name, nn.Sequential(
                ConvBN(cin, width, k, False, s),
                *(ConvBN(width, width, k, True, s) for _ in range(c.residual_layers))))
        self.block3 = nn.Sequential(ConvBN(c.wide, c.hidden, k, False, s),
                                    nn.Conv1d(c.hidden, c.motion_dim, 1))
        self.register_buffer("residual_mask", torch.from_numpy(c.residual_mask())
                             if c.static_coords else None, persistent=False)

    def forward(self, x):
        residual = self.block3(self.block2(self.block1(x.transpose(1, 2)))).transpose(1, 2)
        if self.residual_mask is not None:
            residual = residual * self.residual_mask
        return x + residual


class Discriminator(nn.Module):
    """Frame-level critic `[..., D] -> [...]`: Linear + LeakyReLU + Dropout layers, then a
    bias-free Linear to one score."""

    def __init__(self, c, dropout):
        super().__init__()
        layers, cin = [], c.motion_dim
        for width, slope in zip(c.disc_hidden, c.disc_slopes):
            layers += [nn.Linear(cin, width), nn.LeakyReLU(slope), nn.Dropout(dropout)]
            cin = width
        layers.append(nn.Linear(cin, 1, bias=False))
        self.backbone = nn.Sequential(*layers)

    def forward(self, x):
        return self.backbone(x).squeeze(-1)


class GAN(nn.Module):
    """The two trained networks side by side (`generator`, `discriminator`): one parameter
    order for both frameworks' comparisons."""

    def __init__(self, c, dropout):
        super().__init__()
        self.generator = PostNet(c)
        self.discriminator = Discriminator(c, dropout)


class GANRunner:
    """GeneFace's post-net task step in PyTorch, initialised from the library's Flax
    variables, `trees` = {"generator.": {'params', 'batch_stats'}, "discriminator.":
    {'params'}}, and the SyncNet's `sync_vars`; `losses`, `optim`: `train.postnet`'s
    configs; `disc_scale` [D] scales frames before the critic; `batch`: channel-last host
    arrays (motion, real, mel)."""

    def __init__(self, config, sync_config, losses, optim, trees, sync_vars, disc_scale,
                 batch, *, dropout, compile_model=False):
        from geneface_jax.motion.syncnet import MOUTH
        self.losses, self.window = losses, sync_config.window
        self.module = GAN(config, dropout)
        self.gen, self.disc = self.module.generator, self.module.discriminator
        for prefix, variables in trees.items():
            load_flax(self.module, variables, prefix)
        self.syncnet = SyncNet(sync_config)
        load_flax(self.syncnet, sync_vars)
        self.syncnet.eval().requires_grad_(False)
        self.module.train()
        self.params = list(self.module.parameters())
        self.num_params = sum(p.numel() for p in self.params)
        self.mouth_idx = torch.from_numpy(np.asarray(MOUTH))
        self.scale = torch.from_numpy(np.asarray(disc_scale, np.float32))
        self.batch = {k: torch.from_numpy(v) for k, v in batch.items()}
        betas = (optim.b1, optim.b2)
        self.opt_g = torch.optim.Adam(self.gen.parameters(), lr=optim.lr, betas=betas)
        self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=optim.disc_lr, betas=betas)
        self.sched_d = torch.optim.lr_scheduler.StepLR(self.opt_d, optim.disc_decay_steps,
                                                       optim.disc_decay)
        self.clip = optim.clip_norm
        # EMA of the generator (parameters and BatchNorm statistics), timm-style.
        self.ema_decay = optim.ema_decay
        self.ema_src = [t for t in list(self.gen.parameters()) + list(self.gen.buffers())
                        if t.is_floating_point() and t is not self.gen.residual_mask]
        self.ema = [t.detach().clone() for t in self.ema_src]
        self.gen_fn, self.disc_fn = self.gen, self.disc
        if compile_model:
            self.gen_fn, self.disc_fn = torch.compile(self.gen), torch.compile(self.disc)

    def sync_loss(self, refined, mel):
        b, t, _ = refined.shape
        w, hop = self.window, self.losses.sync_hop
        mouth = refined.view(b, t, 68, 3)[:, :, self.mouth_idx].reshape(b, t, -1)
        mouth = mouth.unfold(1, w, hop)                       # [B, K, 60, W]
        audio = mel.unfold(1, 2 * w, 2 * hop)                 # [B, K, C, 2W]
        return sync_loss(self.syncnet, audio.reshape(-1, audio.shape[2], 2 * w),
                         mouth.reshape(-1, mouth.shape[2], w))

    def step(self):
        """One generator update, the EMA, one discriminator update; the metrics (tensors)
        under the library's names."""
        lw = self.losses
        x, real, mel = self.batch["motion"], self.batch["real"], self.batch["mel"]
        # generator update (the discriminator fixed)
        self.disc.requires_grad_(False)
        refined = self.gen_fn(x)
        adv = (self.disc_fn(refined * self.scale) - 1).pow(2).mean()
        mse = (refined - x).pow(2).mean()
        sync = self.sync_loss(refined, mel)
        g_loss = lw.adv * adv + lw.sync * sync + lw.mse * mse
        self.opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        g_norm = torch.nn.utils.clip_grad_norm_(self.gen.parameters(), self.clip)
        self.opt_g.step()
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, self.ema_src, 1.0 - self.ema_decay)
        # discriminator update on the detached refinement
        self.disc.requires_grad_(True)
        fake_loss = self.disc_fn(refined.detach() * self.scale).pow(2).mean()
        real_loss = (self.disc_fn(real * self.scale) - 1).pow(2).mean()
        d_loss = fake_loss + real_loss
        self.opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        d_norm = torch.nn.utils.clip_grad_norm_(self.disc.parameters(), self.clip)
        self.opt_d.step()
        self.sched_d.step()
        return {"g_adv": adv, "g_mse": mse, "g_sync": sync, "g_loss": g_loss, "d_loss": d_loss,
                "d_fake_loss": fake_loss, "d_real_loss": real_loss, "g_grad_norm": g_norm,
                "d_grad_norm": d_norm}
