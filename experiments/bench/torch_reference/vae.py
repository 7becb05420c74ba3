"""Stage 1 in PyTorch: GeneFace's audio condition net + FVAE (WaveNet encoder / decoder)
+ residual-coupling flow prior (`geneface_jax.motion.vae.Audio2Motion`), its training
objective (`VAETrainLoss`: masked L2 + L1 + continuity + KL, + the frozen SyncNet's sync
loss) and a training setup (`VAERunner`).

Channels-first `[B, C, T]`, `nn.Conv1d` with `torch.nn.utils.parametrizations.weight_norm`
on the WaveNet convs (in_layers, res_skip_layers, cond_layer), `nn.ConvTranspose1d(k=s=4)`
up-sampling, `torch.distributions.Normal` log-probs for the KL, fused Adam + `LambdaLR`
(warm-up, exponential decay) + `clip_grad_norm_`. BatchNorm takes its statistics over the
valid frames only, as the library's `MaskedBatchNorm` (a `nn.BatchNorm1d` subclass).
"""

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import weight_norm

from experiments.bench.torch_reference import PhaseTimer, load_flax, trainable
from experiments.bench.torch_reference.syncnet import SyncNet, sync_loss


class WN(nn.Module):
    """GeneFace's `WN`: gated non-causal WaveNet with a per-frame condition; every conv
    weight-normed; dropout 0."""

    def __init__(self, hidden, kernel_size, num_layers, gin_channels):
        super().__init__()
        self.hidden, self.num_layers = hidden, num_layers
        self.cond_layer = weight_norm(nn.Conv1d(gin_channels, 2 * hidden * num_layers, 1))
        self.in_layers = nn.ModuleList(
            weight_norm(nn.Conv1d(hidden, 2 * hidden, kernel_size,
                                  padding=(kernel_size - 1) // 2))
            for _ in range(num_layers))
        self.res_skip_layers = nn.ModuleList(
            weight_norm(nn.Conv1d(hidden, 2 * hidden if i < num_layers - 1 else hidden, 1))
            for i in range(num_layers))

    def forward(self, x, mask, g):
        hid = self.hidden
        g = self.cond_layer(g)
        output = torch.zeros_like(x)
        for i in range(self.num_layers):
            h = self.in_layers[i](x) + g[:, 2 * hid * i: 2 * hid * (i + 1)]
            acts = torch.tanh(h[:, :hid]) * torch.sigmoid(h[:, hid:])
            res_skip = self.res_skip_layers[i](acts)
            if i < self.num_layers - 1:
                x = (x + res_skip[:, :hid]) * mask
                output = output + res_skip[:, hid:]
            else:
                output = output + res_skip
        return output * mask


class MaskedBatchNorm1d(nn.BatchNorm1d):
    """`nn.BatchNorm1d` whose training statistics cover valid frames only (as the JAX
    model's `MaskedBatchNorm`); running variance updated with the unbiased estimate."""

    def forward(self, x, mask):
        if not self.training:
            return super().forward(x)
        count = mask.sum().clamp_min(1.0)
        mean = (x * mask).sum((0, 2)) / count
        var = (torch.square(x - mean[:, None]) * mask).sum((0, 2)) / count
        with torch.no_grad():
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * count / (count - 1.0).clamp_min(1.0), self.momentum)
        scale = self.weight * torch.rsqrt(var + self.eps)
        return (x - mean[:, None]) * scale[:, None] + self.bias[:, None]


class AudioCondNet(nn.Module):
    """features [B, C, 2T] -> cond [B, 64, T]: keep every other frame, conv k3 ->
    BatchNorm -> GELU -> conv k3 (no biases)."""

    def __init__(self, feature_dim, cond_dim):
        super().__init__()
        self.conv_0 = nn.Conv1d(feature_dim, 64, 3, padding=1, bias=False)
        self.bn = MaskedBatchNorm1d(64)
        self.conv_1 = nn.Conv1d(64, cond_dim, 3, padding=1, bias=False)

    def forward(self, features, mask):
        x = self.conv_0(features[:, :, ::2] * mask)
        x = F.gelu(self.bn(x, mask)) * mask
        return self.conv_1(x)


class Encoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        s = c.stride
        self.pre_net = nn.Conv1d(c.motion_dim, c.hidden, 2 * s, stride=s, padding=s // 2)
        self.wn = WN(c.hidden, c.kernel_size, c.enc_layers, c.cond_dim)
        self.out_proj = nn.Conv1d(c.hidden, 2 * c.latent, 1)

    def forward(self, x, lmask, g):
        h = self.wn(self.pre_net(x) * lmask, lmask, g)
        return self.out_proj(h * lmask).chunk(2, dim=1)


class Decoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.pre_net = nn.ConvTranspose1d(c.latent, c.hidden, c.stride, stride=c.stride)
        self.wn = WN(c.hidden, c.kernel_size, c.dec_layers, c.cond_dim)
        self.out_proj = nn.Conv1d(c.hidden, c.motion_dim, 1)

    def forward(self, z, mask, g):
        h = self.wn(self.pre_net(z) * mask, mask, g)
        return self.out_proj(h * mask)


class CouplingLayer(nn.Module):
    """Mean-only residual coupling: x1 <- m(x0) + x1 (volume preserving)."""

    def __init__(self, channels, hidden, kernel_size, num_layers, gin_channels):
        super().__init__()
        self.half = channels // 2
        self.pre = nn.Conv1d(self.half, hidden, 1)
        self.enc = WN(hidden, kernel_size, num_layers, gin_channels)
        self.post = nn.Conv1d(hidden, self.half, 1)
        nn.init.zeros_(self.post.weight)
        nn.init.zeros_(self.post.bias)

    def forward(self, x, mask, g):
        x0, x1 = torch.split(x, [self.half, self.half], dim=1)
        h = self.enc(self.pre(x0) * mask, mask, g)
        return torch.cat([x0, self.post(h) * mask + x1 * mask], dim=1)


class CouplingBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.flows = nn.ModuleList(
            CouplingLayer(c.latent, c.flow_hidden, c.flow_kernel, c.flow_layers, c.cond_dim)
            for _ in range(c.num_flows))

    def forward(self, x, mask, g):
        for flow in self.flows:
            x = torch.flip(flow(x, mask, g), [1])
        return x


class FVAE(nn.Module):
    def __init__(self, c):
        super().__init__()
        s = c.stride
        self.stride = s
        self.g_pre_net = nn.Conv1d(c.cond_dim, c.cond_dim, 2 * s, stride=s, padding=s // 2)
        self.encoder = Encoder(c)
        self.prior_flow = CouplingBlock(c)
        self.decoder = Decoder(c)

    def forward(self, x, mask, g, eps):
        """Returns (recon [B, D, T], kl_terms [B, Z, T'], latent mask [B, 1, T'])."""
        lmask = mask[:, :, ::self.stride]
        g_sqz = self.g_pre_net(g)
        m_q, logs_q = self.encoder(x, lmask, g_sqz)
        z_q = m_q + eps * torch.exp(logs_q)
        z_p = self.prior_flow(z_q, lmask, g_sqz)
        q = torch.distributions.Normal(m_q, torch.exp(logs_q), validate_args=False)
        prior = torch.distributions.Normal(torch.zeros_like(z_p), torch.ones_like(z_p),
                                           validate_args=False)
        kl_terms = q.log_prob(z_q) - prior.log_prob(z_p)
        recon = self.decoder(z_q, mask, g) * mask
        return recon, kl_terms, lmask


class Audio2Motion(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.mel_encoder = AudioCondNet(c.feature_dim, c.cond_dim)
        self.vae = FVAE(c)

    def forward(self, mel, motion, mask, eps):
        g = self.mel_encoder(mel, mask) * mask
        return self.vae(motion, mask, g, eps)


class VAETrainLoss(nn.Module):
    """The whole training objective: forward pass and every loss term (`weights`:
    `train.audio2motion.VAELossConfig`); with `sync_config`, a frozen SyncNet on the
    windows starting at `sync_starts`."""

    def __init__(self, c, weights, sync_config=None, sync_starts=None):
        super().__init__()
        self.model = Audio2Motion(c)
        self.w = weights
        self.syncnet = None
        if sync_config is not None:
            from geneface_jax.motion.syncnet import MOUTH
            self.syncnet = SyncNet(sync_config).eval().requires_grad_(False)
            w, starts = sync_config.window, np.asarray(sync_starts)
            chans = (3 * np.asarray(MOUTH)[:, None] + np.arange(3)[None]).reshape(-1)
            for name, idx in (("mouth_idx", chans),
                              ("frame_idx", starts[:, None] + np.arange(w)[None]),
                              ("feat_idx", 2 * starts[:, None] + np.arange(2 * w)[None])):
                self.register_buffer(name, torch.as_tensor(idx), persistent=False)

    def train(self, mode=True):
        super().train(mode)
        if self.syncnet is not None:
            self.syncnet.eval()   # frozen: BatchNorm on its stored statistics
        return self

    def sync_loss(self, recon, mel, mask):
        b, k = recon.shape[0], self.frame_idx.shape[0]
        mouth = recon.index_select(1, self.mouth_idx)[:, :, self.frame_idx]   # B,60,K,W
        mouth = mouth.permute(0, 2, 1, 3).reshape(b * k, mouth.shape[1], -1)
        audio = mel[:, :, self.feat_idx]                                      # B,C,K,2W
        audio = audio.permute(0, 2, 1, 3).reshape(b * k, audio.shape[1], -1)
        valid = mask[:, 0][:, self.frame_idx].amin(-1).reshape(b * k)
        return sync_loss(self.syncnet, audio, mouth, valid)

    def forward(self, mel, motion, mask, eps):
        recon, kl_terms, lmask = self.model(mel, motion, mask, eps)
        d, z = recon.shape[1], kl_terms.shape[1]
        err = recon - motion
        count = (mask.sum() * d).clamp_min(1e-8)
        l2 = (torch.square(err) * mask).sum() / count
        l1 = (torch.abs(err) * mask).sum() / count
        pair = mask[:, :, 1:] * mask[:, :, :-1]
        dd = (recon[:, :, 1:] - recon[:, :, :-1]) - (motion[:, :, 1:] - motion[:, :, :-1])
        cont = (torch.square(dd) * pair).sum() / (pair.sum() * d).clamp_min(1e-8)
        kl = (kl_terms * lmask).sum() / (lmask.sum() * z).clamp_min(1e-8)
        w = self.w
        loss = w.l2 * l2 + w.l1 * l1 + w.continuity * cont + w.kl * kl
        out = {"l2": l2, "l1": l1, "continuity": cont, "kl": kl}
        if self.syncnet is not None:
            out["sync"] = self.sync_loss(recon, mel, mask)
            loss = loss + w.sync * out["sync"]
        out["loss"] = loss
        return out


class VAERunner:
    """One PyTorch training setup initialised from the library's Flax `variables` (and the
    SyncNet's `sync_variables`): `VAETrainLoss`, fused Adam with warm-up + exponential
    decay (`optim`: `train.audio2motion.OptimConfig`), clipping, on the channel-last host
    `batch` (mel, motion, mask) transposed once to channels-first."""

    def __init__(self, config, losses, optim, sync_config, starts, variables,
                 sync_variables, batch, compile_model=False):
        self.module = VAETrainLoss(config, losses, sync_config, starts)
        load_flax(self.module, variables, prefix="model.")
        if sync_config is not None:
            load_flax(self.module, sync_variables, prefix="syncnet.")
        self.module.train()
        self.params = trainable(self.module)
        self.num_params = sum(p.numel() for p in self.params)
        # fused=True: the fastest Adam here (clip + step at 11M parameters: ~3x faster
        # than the default for-loop implementation, ~1.5x faster than foreach=True)
        self.opt = torch.optim.Adam(self.params, lr=optim.lr, betas=(0.9, 0.999), eps=1e-8,
                                    fused=True)
        warm, rate, every = optim.warmup_steps, optim.decay_rate, optim.decay_steps
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: min(1.0, (s + 1.0) / max(warm, 1))
            * rate ** (max(0.0, s - warm) / every))
        self.clip = optim.clip_norm
        self.forward = torch.compile(self.module) if compile_model else self.module
        self.batch = [torch.from_numpy(np.ascontiguousarray(batch[k].transpose(0, 2, 1)))
                      for k in ("mel", "motion", "mask")]
        b, t = batch["mask"].shape[:2]
        self.eps_shape = (b, config.latent, t // config.stride)

    def step(self, eps=None, timings=None):
        """One training step; `eps` [B, Z, T'] (default: fresh N(0, 1)). With `timings` (a
        dict), adds the seconds of forward, backward and clip + optimizer."""
        clock = PhaseTimer(timings)
        if eps is None:
            eps = torch.randn(self.eps_shape)
        self.opt.zero_grad(set_to_none=True)
        out = self.forward(*self.batch, eps)
        clock.mark("forward")
        out["loss"].backward()
        clock.mark("backward")
        out["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        self.sched.step()
        clock.mark("optimizer")
        return out
