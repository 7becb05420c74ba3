"""HuBERT audio encoder in Flax linen, and GeneFace's HuBERT features on the project's time base.

GeneFace conditions its audio-to-motion model on the last hidden state of
`facebook/hubert-large-ls960-ft` (1024-d at 50 Hz). `HubertModel` computes the same
function as transformers' `HubertModel` in eval mode (no dropout, SpecAugment or layer
drop: this is a frozen feature encoder), channel-last throughout:

    wav [B, n] -> conv feature extractor [B, T, C] -> feature projection [B, T, H]
               -> transformer encoder -> last hidden state [B, T, H]

  * feature extractor: `len(conv_dim)` 1-D convs without padding (kernels 10,3,3,3,3,2,2,
    strides 5,2,2,2,2,2,2: receptive field 400 samples, hop 320), each followed by the
    activation (GELU). `feat_extract_norm="group"` (base models) normalises the first conv's
    output per channel over the whole time axis (GroupNorm with one group per channel);
    `"layer"` (large models) applies LayerNorm over channels after every conv.
  * feature projection: LayerNorm (when `feat_proj_layer_norm`) then Linear C -> H.
  * encoder: positional embedding = grouped conv over time (kernel
    `num_conv_pos_embeddings`, `num_conv_pos_embedding_groups` groups, weight norm over the
    kernel axis: w[k] = g[k] v[k] / ||v[k]||), padded K//2 on the left and K - 1 - K//2 on
    the right (PyTorch pads K//2 on both sides and drops the last frame for even K), then
    the activation; added to the input. Post-LN (`do_stable_layer_norm=False`): LayerNorm,
    then layers h = LN(h + Attn(h)); h = LN(h + FF(h)). Pre-LN (`True`): layers
    h = h + Attn(LN(h)); h = h + FF(LN(h)), then a final LayerNorm.
  * variable-length batches: `attention_mask` `[B, n]` (1 = real sample) gives each clip
    floor-conv-formula valid frames; padded frames are zeroed before the positional conv
    and masked out of attention, as in transformers. GroupNorm (base models) still takes
    its statistics over the padded length, also as in transformers, which is why base
    models should get zero-padded input without a mask (or one clip at a time).

Parameter tree (PyTorch name -> Flax path; `geneface_jax.audio.hubert_weights` converts):
    feature_extractor.conv_layers.{i}.conv / .layer_norm
        -> feature_extractor/conv_layers_{i}/conv/{kernel,bias}, .../layer_norm/{scale,bias}
    feature_projection.{layer_norm,projection} -> feature_projection/{layer_norm,projection}
    encoder.pos_conv_embed.conv                -> encoder/pos_conv_embed/{weight_v,weight_g,bias}
    encoder.layer_norm                          -> encoder/layer_norm
    encoder.layers.{i}.attention.{q,k,v,out}_proj, .layer_norm, .feed_forward.
        {intermediate,output}_dense, .final_layer_norm -> encoder/layers_{i}/... (same names)

Frame alignment (`hubert_features`, the rule of `geneface_jax.audio.features`): the conv
stack maps m samples to floor((m - 400) / 320) + 1 frames, frame k seeing samples
[320 k, 320 k + 400), centred on 320 k + 200. The clip is first padded/trimmed to 640 N
samples (`pad_or_trim`), then 40 zeros are put on each side: output frame i then sees
original samples [320 i - 40, 320 i + 360), centred on 320 i + 160, and
floor((640 N + 80 - 400) / 320) + 1 = 2N frames come out, exactly the project's feature
frames. (GeneFace's own script feeds the unpadded clip, so its frames sit 40 samples =
2.5 ms later and it pads/trims the count afterwards.) In general the padding is
R/2 - 160 samples a side for a receptive field R (even, >= 320) at hop 320.

Long audio (`window_seconds`): windows of `core + 2 * context` frames, all of one shape
(one compilation), start every `core` frames (the last one ends at the clip's end); each
window keeps only frames with at least `context` frames of context on both sides (or the
clip edge), so the kept ranges tile [0, 2N) without seams. Window frame j is computed from
exactly the samples that full-clip frame s + j sees, so the conv stack (LayerNorm models)
and the positional conv (reach +-K/2 frames, K = 128 for HuBERT: 1.28 s) agree exactly with
a single pass when `context >= K/2`. Attention is global, so the transformer output still
depends on audio outside the window: windowed output approximates full-context output.
Measured on tiny random models with 14 s of speech (relative RMS difference, large layout):
3.4 % for 1 s windows without context, 1.0 % with 2 s context, 0.6 % for 4 s windows with
2 s context; trained HuBERT must be measured with its weights. A larger window/context brings it
closer at the cost of memory (attention is quadratic in the window) and compute
((core + 2 context) / core). GroupNorm models also normalise per window. GeneFace itself
processes 20 s windows without overlap; the default here is 20 s windows plus 2 s context
a side.
"""

import dataclasses
import functools
import json
import pathlib
from typing import Any, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from geneface_jax.audio import features as audio_features
from geneface_jax.audio.hubert_weights import hubert_from_torch
from geneface_jax.errors import CheckpointError

Array = Any
Params = Dict[str, Any]

CONV_NORM_EPS = 1e-5          # PyTorch default eps of the conv stack's Group/LayerNorm
NORMALIZE_EPS = 1e-7          # Wav2Vec2FeatureExtractor's zero-mean unit-variance eps

_ACTIVATIONS = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_fast": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


# --------------------------------------------------------------------------- config

@dataclasses.dataclass(frozen=True)
class HubertConfig:
    """The architecture fields of a transformers `HubertConfig` (defaults: hubert-base)."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    feat_extract_norm: str = "group"
    feat_extract_activation: str = "gelu"
    conv_dim: Tuple[int, ...] = (512, 512, 512, 512, 512, 512, 512)
    conv_stride: Tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
    conv_kernel: Tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
    conv_bias: bool = False
    num_conv_pos_embeddings: int = 128
    num_conv_pos_embedding_groups: int = 16
    do_stable_layer_norm: bool = False
    feat_proj_layer_norm: bool = True

    def __post_init__(self):
        for name in ("conv_dim", "conv_stride", "conv_kernel"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        problems = []
        if not len(self.conv_dim) == len(self.conv_stride) == len(self.conv_kernel) > 0:
            problems.append(f"conv_dim/conv_stride/conv_kernel must have one equal, non-zero "
                            f"length, got {self.conv_dim}/{self.conv_stride}/{self.conv_kernel}")
        if self.feat_extract_norm not in ("group", "layer"):
            problems.append(f"feat_extract_norm must be 'group' or 'layer', "
                            f"got {self.feat_extract_norm!r}")
        for name in ("hidden_act", "feat_extract_activation"):
            if getattr(self, name) not in _ACTIVATIONS:
                problems.append(f"{name} {getattr(self, name)!r} is not one of "
                                f"{sorted(_ACTIVATIONS)}")
        if self.num_attention_heads <= 0 or self.hidden_size % self.num_attention_heads:
            problems.append(f"hidden_size {self.hidden_size} is not divisible by "
                            f"num_attention_heads {self.num_attention_heads}")
        groups = self.num_conv_pos_embedding_groups
        if groups <= 0 or self.hidden_size % groups:
            problems.append(f"hidden_size {self.hidden_size} is not divisible by "
                            f"num_conv_pos_embedding_groups {groups}")
        if self.num_conv_pos_embeddings <= 0:
            problems.append(f"num_conv_pos_embeddings must be positive, "
                            f"got {self.num_conv_pos_embeddings}")
        if problems:
            raise CheckpointError("invalid HuBERT config: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "HubertConfig":
        """From a transformers config dict (`config.json`); other keys are ignored.

        Raises CheckpointError for another model type or an unsupported option
        (`conv_pos_batch_norm=True`, an unknown norm or activation).
        """
        model_type = config.get("model_type", "hubert")
        if model_type != "hubert":
            raise CheckpointError(f"config has model_type {model_type!r}, expected 'hubert'")
        if config.get("conv_pos_batch_norm", False):
            raise CheckpointError("config uses conv_pos_batch_norm=True (batch-normed "
                                  "positional conv), which is not supported")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})

    @classmethod
    def from_json_file(cls, path) -> "HubertConfig":
        """From a `config.json`; CheckpointError names the file when it is unusable."""
        path = pathlib.Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: cannot read the HuBERT config ({e})") from e
        if not isinstance(data, dict):
            raise CheckpointError(f"{path}: config is not a JSON object")
        try:
            return cls.from_dict(data)
        except (CheckpointError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: {e}") from e

    @property
    def hop(self) -> int:
        """Samples between consecutive output frames (320 for HuBERT)."""
        return int(np.prod(self.conv_stride))

    @property
    def receptive_field(self) -> int:
        """Samples one output frame sees (400 for HuBERT)."""
        field, jump = 1, 1
        for kernel, stride in zip(self.conv_kernel, self.conv_stride):
            field += (kernel - 1) * jump
            jump *= stride
        return field


def feature_lengths(config: HubertConfig, num_samples):
    """Frames the conv stack makes of `num_samples` samples (int or integer array):
    floor((n - k) / s) + 1 applied layer by layer. Works on NumPy and traced JAX ints."""
    lengths = num_samples
    for kernel, stride in zip(config.conv_kernel, config.conv_stride):
        lengths = (lengths - kernel) // stride + 1
    return lengths


# --------------------------------------------------------------------------- modules

def _layer_norm(eps: float, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=eps, use_fast_variance=False, name=name)


def _linear(features: int, name: str, precision) -> nn.Dense:
    return nn.Dense(features, precision=precision, name=name)


class ChannelNorm(nn.Module):
    """GroupNorm with one group per channel on `[B, T, C]`: every channel is normalised
    over the time axis (transformers' first conv layer of `feat_extract_norm="group"`)."""

    eps: float = CONV_NORM_EPS

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        mean = jnp.mean(x, axis=1, keepdims=True)
        centred = x - mean
        var = jnp.mean(jnp.square(centred), axis=1, keepdims=True)
        return centred * jax.lax.rsqrt(var + self.eps) * scale + bias


class FeatureExtractorLayer(nn.Module):
    """Conv1d (no padding) [-> Group/LayerNorm] -> activation, `[B, T, C_in] -> [B, T', C]`."""

    features: int
    kernel: int
    stride: int
    use_bias: bool
    norm: Optional[str]          # None, "group" or "layer"
    activation: str
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(self.features, (self.kernel,), strides=(self.stride,), padding="VALID",
                    use_bias=self.use_bias, precision=self.precision, name="conv")(x)
        if self.norm == "group":
            x = ChannelNorm(name="layer_norm")(x)
        elif self.norm == "layer":
            x = _layer_norm(CONV_NORM_EPS, "layer_norm")(x)
        return _ACTIVATIONS[self.activation](x)


class FeatureExtractor(nn.Module):
    """The conv stack: waveform `[B, n]` -> features `[B, T, conv_dim[-1]]`."""

    config: HubertConfig
    precision: Any = None

    def setup(self):
        c = self.config
        norms = [("group" if i == 0 else None) if c.feat_extract_norm == "group" else "layer"
                 for i in range(len(c.conv_dim))]
        self.conv_layers = [
            FeatureExtractorLayer(dim, kernel, stride, c.conv_bias, norm,
                                  c.feat_extract_activation, self.precision)
            for dim, kernel, stride, norm in zip(c.conv_dim, c.conv_kernel, c.conv_stride, norms)]

    def __call__(self, wav):
        x = wav[..., None]
        for layer in self.conv_layers:
            x = layer(x)
        return x


class FeatureProjection(nn.Module):
    """[LayerNorm ->] Linear conv_dim[-1] -> hidden_size."""

    config: HubertConfig
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        if self.config.feat_proj_layer_norm:
            x = _layer_norm(self.config.layer_norm_eps, "layer_norm")(x)
        return _linear(self.config.hidden_size, "projection", self.precision)(x)


class PositionalConvEmbedding(nn.Module):
    """Grouped, weight-normed conv over time -> activation, `[B, T, H] -> [B, T, H]`.

    Params: `weight_v` `[K, H / groups, H]`, `weight_g` `[K]` (weight norm over the kernel
    axis: tap k is g[k] v[k] / ||v[k]||, the norm over its whole [H / groups, H] slice),
    `bias` `[H]`. Frame t sees input frames t - K//2 .. t + K - 1 - K//2 (zeros outside).
    """

    config: HubertConfig
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        c = self.config
        k, h, groups = c.num_conv_pos_embeddings, c.hidden_size, c.num_conv_pos_embedding_groups
        std = (2.0 / (k * h // groups)) ** 0.5
        v = self.param("weight_v", nn.initializers.normal(std), (k, h // groups, h), jnp.float32)
        g = self.param("weight_g",
                       lambda _key: jnp.sqrt(jnp.sum(jnp.square(v), axis=(1, 2))))
        b = self.param("bias", nn.initializers.zeros, (h,), jnp.float32)
        kernel = v * (g / jnp.sqrt(jnp.sum(jnp.square(v), axis=(1, 2))))[:, None, None]
        left = k // 2
        y = jax.lax.conv_general_dilated(
            x, kernel.astype(x.dtype), window_strides=(1,), padding=[(left, k - 1 - left)],
            dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=groups,
            precision=self.precision)
        return _ACTIVATIONS[c.feat_extract_activation](y + b)


class SelfAttention(nn.Module):
    """Multi-head self-attention; `mask` `[B, T]` bool hides padded keys."""

    config: HubertConfig
    precision: Any = None

    @nn.compact
    def __call__(self, x, mask=None):
        c = self.config
        heads = c.num_attention_heads
        head_dim = c.hidden_size // heads

        def project(name):
            y = _linear(c.hidden_size, name, self.precision)(x)
            return y.reshape(y.shape[:2] + (heads, head_dim))

        q, k, v = project("q_proj"), project("k_proj"), project("v_proj")
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=self.precision)
        scores = scores * (head_dim ** -0.5)
        if mask is not None:
            scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(scores.dtype).min)
        weights = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v, precision=self.precision)
        out = out.reshape(out.shape[:2] + (c.hidden_size,))
        return _linear(c.hidden_size, "out_proj", self.precision)(out)


class FeedForward(nn.Module):
    """Linear H -> intermediate -> activation -> Linear -> H."""

    config: HubertConfig
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        c = self.config
        x = _linear(c.intermediate_size, "intermediate_dense", self.precision)(x)
        x = _ACTIVATIONS[c.hidden_act](x)
        return _linear(c.hidden_size, "output_dense", self.precision)(x)


class EncoderLayer(nn.Module):
    """One transformer layer, post-LN or (`do_stable_layer_norm`) pre-LN."""

    config: HubertConfig
    precision: Any = None

    @nn.compact
    def __call__(self, h, mask=None):
        c = self.config
        attention = SelfAttention(c, self.precision, name="attention")
        norm1 = _layer_norm(c.layer_norm_eps, "layer_norm")
        feed_forward = FeedForward(c, self.precision, name="feed_forward")
        norm2 = _layer_norm(c.layer_norm_eps, "final_layer_norm")
        if c.do_stable_layer_norm:
            h = h + attention(norm1(h), mask)
            return h + feed_forward(norm2(h))
        h = norm1(h + attention(h, mask))
        return norm2(h + feed_forward(h))


class Encoder(nn.Module):
    """Positional conv embedding + transformer layers, `[B, T, H] -> [B, T, H]`."""

    config: HubertConfig
    precision: Any = None

    @nn.compact
    def __call__(self, h, mask=None):
        c = self.config
        if mask is not None:
            h = h * mask[..., None].astype(h.dtype)
        h = h + PositionalConvEmbedding(c, self.precision, name="pos_conv_embed")(h)
        final_norm = _layer_norm(c.layer_norm_eps, "layer_norm")
        if not c.do_stable_layer_norm:
            h = final_norm(h)
        for i in range(c.num_hidden_layers):
            h = EncoderLayer(c, self.precision, name=f"layers_{i}")(h, mask)
        if c.do_stable_layer_norm:
            h = final_norm(h)
        return h


class HubertModel(nn.Module):
    """HuBERT (inference): waveform `[B, n]` -> last hidden state `[B, T, hidden_size]`,
    T = feature_lengths(config, n). See the module docstring."""

    config: HubertConfig
    precision: Any = None

    def setup(self):
        self.feature_extractor = FeatureExtractor(self.config, self.precision)
        self.feature_projection = FeatureProjection(self.config, self.precision)
        self.encoder = Encoder(self.config, self.precision)

    def extract_features(self, wav):
        """The conv stack alone: `[B, n]` -> `[B, T, conv_dim[-1]]`."""
        return self.feature_extractor(wav)

    def __call__(self, wav, attention_mask=None):
        """wav: float `[B, n]`; attention_mask: `[B, n]` (nonzero = real sample, right
        padding) or None (every sample is real). Returns `[B, T, H]`; with a mask, frames
        at or past feature_lengths(sum of the mask row) are padding (undefined values)."""
        feats = self.feature_extractor(wav)
        frame_mask = None
        if attention_mask is not None:
            lengths = feature_lengths(self.config, jnp.sum(attention_mask != 0, axis=-1))
            frame_mask = jnp.arange(feats.shape[1])[None, :] < lengths[:, None]
        return self.encoder(self.feature_projection(feats), frame_mask)


@functools.lru_cache(maxsize=8)
def _jitted_forward(config: HubertConfig, precision):
    model = HubertModel(config, precision)
    return jax.jit(lambda params, wav, mask: model.apply({"params": params}, wav, mask))


def hubert_forward(params: Params, config: HubertConfig, wav, attention_mask=None, *,
                   precision=None):
    """Jitted `HubertModel(config).apply` (compiled once per config and input shape).

    wav: float `[B, n]`; attention_mask: `[B, n]` or None. Returns `[B, T, H]` (jax array).
    """
    wav = jnp.asarray(wav, jnp.float32)
    mask = None if attention_mask is None else jnp.asarray(attention_mask)
    return _jitted_forward(config, precision)(params, wav, mask)


# --------------------------------------------------------------------------- features

def frame_padding(config: HubertConfig) -> int:
    """Zeros to put on each side of a 640 N-sample clip so that output frame i is centred
    on sample 320 i + 160 and 2N frames come out: R/2 - 160 (40 for HuBERT)."""
    hop, field = config.hop, config.receptive_field
    if hop != audio_features.HOP or field % 2 or field < hop:
        raise CheckpointError(f"HuBERT features need a conv stack of hop {audio_features.HOP} "
                              f"samples and an even receptive field >= {audio_features.HOP}; "
                              f"this config has hop {hop}, receptive field {field}")
    return field // 2 - hop // 2


def aligned_input(config: HubertConfig, wav, *, normalize: bool = True):
    """The model input for 16 kHz mono `wav` `[n]` on the project's frame rule.

    Pads/trims to 640 N samples (`features.pad_or_trim`), optionally normalises the real
    samples to zero mean and unit variance (as GeneFace's Wav2Vec2 processor does, eps 1e-7;
    the statistics cover the kept samples, padding stays zero), then adds
    `frame_padding(config)` zeros on both sides. Returns (float32 `[640 N + 2 P]`, 2 N).
    """
    clip = audio_features.pad_or_trim(wav)
    if normalize:
        real = min(len(np.asarray(wav)), len(clip))
        seg = clip[:real].astype(np.float64)
        clip = clip.copy()
        clip[:real] = (seg - seg.mean()) / np.sqrt(seg.var() + NORMALIZE_EPS)
    pad = frame_padding(config)
    num_frames = 2 * len(clip) // audio_features.SAMPLES_PER_VIDEO_FRAME
    return np.pad(clip, (pad, pad)).astype(np.float32), num_frames


def window_plan(num_frames: int, core: int, context: int):
    """Windows for `num_frames` output frames: a list of (start, keep_from, keep_to) in
    frames; every window spans [start, start + core + 2 context) (a single window
    [0, num_frames) when that is no longer than one window) and keeps [keep_from, keep_to);
    the kept ranges tile [0, num_frames) in order."""
    span = core + 2 * context
    if num_frames <= span:
        return [(0, 0, num_frames)]
    starts = list(range(0, num_frames - span, core)) + [num_frames - span]
    plan, done = [], 0
    for i, start in enumerate(starts):
        stop = num_frames if i == len(starts) - 1 else start + span - context
        plan.append((start, done, stop))
        done = stop
    return plan


def hubert_features(params: Params, config: HubertConfig, wav, *,
                    window_seconds: Optional[float] = 20.0, context_seconds: float = 2.0,
                    normalize: bool = True, batch_size: int = 1, precision=None) -> np.ndarray:
    """GeneFace's HuBERT features of 16 kHz mono audio on the project's frame rule.

    Args:
      params, config: from `load_hubert` (or `audio.hubert_weights.hubert_from_torch`).
      wav: float `[n]` 16 kHz mono (any n >= 640).
      window_seconds: output seconds kept from each window (None: one pass over the clip).
      context_seconds: extra audio each window sees on both sides, discarded afterwards;
        >= num_conv_pos_embeddings / 2 frames (1.28 s for HuBERT) keeps the positional
        conv exact, beyond that only attention benefits (see the module docstring).
      normalize: zero-mean unit-variance input normalisation (hubert-large-ls960-ft's
        processor does this; base models' processors do not).
      batch_size: windows per forward call.
      precision: matmul/conv precision passed to the model (e.g. 'highest' on GPU).
    Returns:
      float32 `[2N, hidden_size]`, N = num_video_frames(n); row i centred on sample
      320 i + 160.
    Raises:
      AudioError: the audio is not 1-D float, shorter than 640 samples or non-finite.
      ValueError: a non-positive window or batch size or a negative context.
    """
    x, num_frames = aligned_input(config, wav, normalize=normalize)
    hop, field = config.hop, config.receptive_field
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if window_seconds is None:
        core, context = num_frames, 0
    else:
        core = int(round(window_seconds * audio_features.FEATURE_RATE))
        context = int(round(context_seconds * audio_features.FEATURE_RATE))
        if core < 1 or context < 0:
            raise ValueError(f"need window_seconds >= 0.02 and context_seconds >= 0, got "
                             f"{window_seconds}, {context_seconds}")
    params = jax.device_put(params)
    plan = window_plan(num_frames, core, context)
    span = min(num_frames, core + 2 * context)
    length = hop * (span - 1) + field
    windows = np.stack([x[hop * start:hop * start + length] for start, _, _ in plan])
    out = np.empty((num_frames, config.hidden_size), np.float32)
    for first in range(0, len(plan), batch_size):
        chunk = windows[first:first + batch_size]
        real = len(chunk)
        if real < batch_size and len(plan) > batch_size:   # keep one compiled shape
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - real, 0)])
        hidden = np.asarray(hubert_forward(params, config, chunk, precision=precision))
        for (start, keep_from, keep_to), h in zip(plan[first:first + real], hidden):
            out[keep_from:keep_to] = h[keep_from - start:keep_to - start]
    return out


# --------------------------------------------------------------------------- loading

def _load_safetensors(files):
    from safetensors.numpy import load_file  # optional dependency
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def _load_torch_bin(path):
    import torch  # lazy: only for PyTorch-format checkpoints
    return torch.load(str(path), map_location="cpu", weights_only=True)


def _read_state_dict(directory: pathlib.Path):
    """(state_dict, the file it came from) from model.safetensors, a sharded safetensors
    index, or pytorch_model.bin, in that order of preference."""
    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    torch_bin = directory / "pytorch_model.bin"
    source = None
    try:
        if single.is_file() or index.is_file():
            try:
                import safetensors.numpy  # noqa: F401
            except ImportError:
                if not torch_bin.is_file():
                    raise CheckpointError(
                        f"{directory}: holds safetensors weights but the `safetensors` package "
                        f"is not installed (pip install safetensors)") from None
            else:
                if single.is_file():
                    source = single
                    return _load_safetensors([single]), source
                source = index
                weight_map = json.loads(index.read_text())["weight_map"]
                shards = sorted({directory / name for name in weight_map.values()})
                missing = [str(s) for s in shards if not s.is_file()]
                if missing:
                    raise CheckpointError(f"{index}: shard files missing: {missing}")
                return _load_safetensors(shards), source
        if torch_bin.is_file():
            source = torch_bin
            return _load_torch_bin(torch_bin), source
    except CheckpointError:
        raise
    except Exception as e:  # corrupt files raise many unrelated types
        raise CheckpointError(f"{source}: cannot read the weights ({type(e).__name__}: {e})") from e
    raise CheckpointError(f"{directory}: no weights found (expected model.safetensors, "
                          f"model.safetensors.index.json or pytorch_model.bin)")


def load_hubert(checkpoint_dir) -> Tuple[Params, HubertConfig]:
    """Loads a Hugging Face HuBERT checkpoint directory (e.g. a snapshot of
    facebook/hubert-large-ls960-ft, or a `save_pretrained` output) of `HubertModel` or
    `HubertForCTC` (the `hubert.` prefix is found automatically; heads are ignored).

    Returns:
      (params, config): Flax params (float32 NumPy) for `HubertModel(config)`.
    Raises:
      CheckpointError: missing directory, config.json or weights, an unsupported config,
        unreadable files, or weights that miss a key or do not fit the config (names the
        path and the key).
    """
    directory = pathlib.Path(checkpoint_dir)
    if not directory.exists():
        raise CheckpointError(f"{directory}: HuBERT checkpoint directory does not exist")
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: is not a directory (expected a HuBERT "
                              f"checkpoint directory with config.json and weights)")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{directory}: no config.json in the HuBERT checkpoint directory")
    config = HubertConfig.from_json_file(config_path)
    state_dict, source = _read_state_dict(directory)
    try:
        params = hubert_from_torch(state_dict, config)
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}") from e
    return params, config
