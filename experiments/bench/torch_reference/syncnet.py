"""The landmark SyncNet (`geneface_jax.motion.syncnet.SyncNet`) in PyTorch: an audio and
a mouth encoder, each a stack of Conv1d -> BatchNorm1d (-> + x) -> ReLU blocks on the
library's layer plan, ending in an L2-normalised embedding. Stages 1 and 2 use it frozen
(`.eval().requires_grad_(False)`) for their sync loss."""

import torch
from torch import nn
import torch.nn.functional as F


class ConvBlock(nn.Module):
    def __init__(self, cin, features, kernel, stride, padding, residual):
        super().__init__()
        self.conv = nn.Conv1d(cin, features, kernel, stride, padding)
        self.bn = nn.BatchNorm1d(features)
        self.residual = residual

    def forward(self, x):
        y = self.bn(self.conv(x))
        return F.relu(y + x if self.residual else y)


class SyncEncoder(nn.Module):
    """[N, C, L] -> unit embeddings [N, E]."""

    def __init__(self, cin, plan):
        super().__init__()
        blocks = []
        for f, k, s, p, res in plan:
            blocks.append(ConvBlock(cin, f, k, s, p, res))
            cin = f
        self.block = nn.Sequential(*blocks)

    def forward(self, x):
        return F.normalize(self.block(x)[:, :, 0], dim=-1, eps=1e-12)


class SyncNet(nn.Module):
    """(audio [N, C, 2W], mouth [N, 60, W]) -> (audio embedding, mouth embedding)."""

    def __init__(self, sc):
        super().__init__()
        from geneface_jax.motion.syncnet import _encoder_plan
        self.audio_encoder = SyncEncoder(
            sc.feature_dim, _encoder_plan(sc.base, sc.base, sc.layers_per_block, (2, 2)))
        self.mouth_encoder = SyncEncoder(
            sc.mouth_dim, _encoder_plan(sc.mouth_in, sc.base, sc.layers_per_block, (2, 1)))

    def forward(self, audio, mouth):
        return self.audio_encoder(audio), self.mouth_encoder(mouth)


def sync_loss(syncnet, audio, mouth, valid=None):
    """GeneFace's sync BCE `-log cos(a, m)` of windows `audio` [N, C, 2W], `mouth`
    [N, 60, W]; mean over the windows (weighted by `valid` [N] when given)."""
    a, m = syncnet(audio, mouth)
    nll = -torch.log((a * m).sum(-1).clamp(1e-7, 1.0 - 1e-7))
    if valid is None:
        return nll.mean()
    return (nll * valid).sum() / valid.sum().clamp_min(1e-8)
