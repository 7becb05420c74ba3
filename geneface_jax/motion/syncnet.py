"""Landmark-audio SyncNet: is this 5-frame mouth motion in sync with this audio?

Two conv encoders map a window of audio features (`[B, 2W, C]`, 2W = 10 feature frames at
50 Hz) and the mouth landmarks of the same W = 5 video frames (`[B, W, 60]`: the 20 mouth
points of the 68, x/y/z, in normalised motion units) to unit vectors `[B, E]`; their cosine
similarity `d` in [0, 1] (ReLU features) is the sync probability, trained with binary cross
entropy on in-sync (label 1) and shifted (label 0) pairs (GeneFace's `LandmarkHubertSyncNet`
sizes: blocks of Conv1d + BatchNorm + ReLU, residual inside blocks, 128 -> 256 -> 512).
Frozen, it gives stages 1 and 2 a sync loss: `-log d` on windows of predicted motion.

Window alignment follows the frame rule: video frames [s, s + W) own feature frames
[2s, 2s + 2W).
"""

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from geneface_jax.data import landmarks as lm_topology
from geneface_jax.errors import ShapeError
from geneface_jax.motion.wavenet import WNConv1d, check_sequence
from geneface_jax.initializers import jitted_init

MOUTH = np.asarray(lm_topology.MOUTH)
EPS = 1e-7


@dataclasses.dataclass(frozen=True)
class SyncNetConfig:
    """SyncNet sizes; defaults are GeneFace's (base 128, 3 layers per block, 512-d output)."""
    feature_dim: int = 80
    window: int = 5            # W video frames (2W audio feature frames)
    base: int = 128
    mouth_in: int = 96         # width of the mouth encoder's first block
    layers_per_block: int = 3

    @property
    def embed_dim(self):
        return 4 * self.base

    @property
    def mouth_dim(self):
        return 3 * len(MOUTH)


def mouth_of_motion(motion):
    """Normalised motion `[..., 204]` (68 x 3, point-major) -> mouth `[..., 60]`."""
    if motion.shape[-1] != 204:
        raise ShapeError(f"SyncNet needs 204-d landmark motion (68 x 3), got {motion.shape}")
    pts = motion.reshape(motion.shape[:-1] + (68, 3))
    return pts[..., MOUTH, :].reshape(motion.shape[:-1] + (3 * len(MOUTH),))


class ConvBlock(nn.Module):
    """Conv1d (with bias) -> BatchNorm -> (+ input if residual) -> ReLU."""
    features: int
    kernel_size: int = 3
    stride: int = 1
    padding: int = 1
    residual: bool = False
    axis_name: Optional[str] = None

    @nn.compact
    def __call__(self, x, train):
        y = WNConv1d(self.features, self.kernel_size, stride=self.stride, padding=self.padding,
                     use_weight_norm=False, name="conv")(x)
        y = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                         axis_name=self.axis_name if train else None, name="bn")(y)
        if self.residual:
            y = y + x
        return nn.relu(y)


def _encoder_plan(first, base, layers, strides):
    """Block list [(features, kernel, stride, padding, residual)] of one encoder."""
    plan = [(first, 3, 1, 1, False), (base, 3, 1, 1, False)]
    plan += [(base, 3, 1, 1, True)] * (layers - 1)
    width = base
    for stride in strides:
        width *= 2
        plan.append((width, 3, stride, 1, False))
        plan += [(width, 3, 1, 1, True)] * (layers - 1)
    plan += [(width, 3, 1, 1, False), (width, 3, 1, 0, False), (width, 1, 1, 0, False)]
    return plan


class SyncEncoder(nn.Module):
    """Stack of ConvBlocks reducing a window to one frame: `[B, L, C] -> [B, E]` (unit norm)."""
    plan: tuple
    axis_name: Optional[str] = None

    @nn.compact
    def __call__(self, x, train=False):
        for i, (f, k, s, p, res) in enumerate(self.plan):
            x = ConvBlock(f, k, s, p, res, self.axis_name, name=f"block_{i}")(x, train)
        if x.shape[1] != 1:
            raise ShapeError(f"SyncEncoder '{self.name}': the window reduces to {x.shape[1]} "
                             "frames, expected 1 (wrong window length)")
        x = x[:, 0]
        return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class SyncNet(nn.Module):
    """`(audio [B, 2W, C], mouth [B, W, 60]) -> (audio_emb [B, E], mouth_emb [B, E])`."""
    config: SyncNetConfig
    axis_name: Optional[str] = None

    def setup(self):
        c = self.config
        self.audio_encoder = SyncEncoder(
            tuple(_encoder_plan(c.base, c.base, c.layers_per_block, (2, 2))), self.axis_name)
        self.mouth_encoder = SyncEncoder(
            tuple(_encoder_plan(c.mouth_in, c.base, c.layers_per_block, (2, 1))), self.axis_name)

    def __call__(self, audio, mouth, train: bool = False):
        c = self.config
        check_sequence(audio, c.feature_dim, "SyncNet audio window")
        check_sequence(mouth, c.mouth_dim, "SyncNet mouth window")
        if audio.shape[1] != 2 * c.window or mouth.shape[1] != c.window \
                or audio.shape[0] != mouth.shape[0]:
            raise ShapeError(f"SyncNet: expected audio [B, {2 * c.window}, {c.feature_dim}] and "
                             f"mouth [B, {c.window}, {c.mouth_dim}], got {tuple(audio.shape)} and "
                             f"{tuple(mouth.shape)}")
        return self.audio_encoder(audio, train), self.mouth_encoder(mouth, train)


def sync_probability(audio_emb, mouth_emb):
    """Cosine similarity of unit embeddings `[B, E]` -> `[B]`, clipped to (0, 1)."""
    return jnp.clip(jnp.sum(audio_emb * mouth_emb, axis=-1), EPS, 1.0 - EPS)


def bce(d, label):
    """Elementwise binary cross entropy of probabilities `d` against labels in {0, 1}."""
    return -(label * jnp.log(d) + (1.0 - label) * jnp.log1p(-d))


def init_syncnet(config: SyncNetConfig, rng, axis_name=None):
    """(model, variables) with `params` and `batch_stats`."""
    model = SyncNet(config, axis_name=axis_name)
    key = jax.random.PRNGKey(rng) if isinstance(rng, int) else rng
    variables = jitted_init(model)(key, jnp.zeros((2, 2 * config.window, config.feature_dim)),
                                    jnp.zeros((2, config.window, config.mouth_dim)))
    return model, variables


def window_starts(num_frames, window, hop):
    """Start frames of the windows a sync loss looks at in a `num_frames` sequence."""
    if num_frames < window:
        raise ShapeError(f"a sequence of {num_frames} frames is shorter than the sync "
                         f"window ({window})")
    return np.arange(0, num_frames - window + 1, hop, dtype=np.int32)


def gather_windows(motion, features, mask, starts, window):
    """Cuts sync windows out of whole sequences.

    motion: [B, T, 204]; features: [B, 2T, C]; mask: [B, T, 1]; starts: [K] int.
    Returns mouth [B*K, W, 60], audio [B*K, 2W, C], valid [B*K] (1 where the window lies
    wholly inside the valid frames).
    """
    starts = jnp.asarray(starts)
    frame_idx = starts[:, None] + jnp.arange(window)[None, :]              # [K, W]
    feat_idx = 2 * starts[:, None] + jnp.arange(2 * window)[None, :]       # [K, 2W]
    mouth = mouth_of_motion(motion)[:, frame_idx]                          # [B, K, W, 60]
    audio = features[:, feat_idx]                                          # [B, K, 2W, C]
    valid = jnp.min(mask[:, frame_idx, 0], axis=-1)                        # [B, K]
    b, k = valid.shape
    return (mouth.reshape((b * k,) + mouth.shape[2:]), audio.reshape((b * k,) + audio.shape[2:]),
            valid.reshape(b * k))


def sync_loss_terms(syncnet, variables, motion, features, mask, starts):
    """Per-window `-log d` of a frozen SyncNet on predicted motion, and the window mask.

    Returns (terms [B*K], valid [B*K]); the caller averages terms over valid windows.
    BatchNorm runs on its stored statistics; no SyncNet variable is updated.
    """
    mouth, audio, valid = gather_windows(motion, features, mask, starts, syncnet.config.window)
    a, m = syncnet.apply(variables, audio, mouth, train=False)
    return -jnp.log(sync_probability(a, m)), valid
