"""GeneFace's own checkpoints into the Flax models (`geneface_jax.convert.geneface`,
`convert.torch_pickle`, `convert.geneface_import`, `experiments.import_geneface`).

No GeneFace code is used. `_Gf*` below are PyTorch modules laid out like GeneFace's
(`modules/audio2motion/{vae,flow_base}.py`, `modules/syncnet/models.py`,
`modules/postnet/models.py`, `modules/nerfs/{lm3d_nerf,adnerf}/*.py`: the same
`nn.Sequential` / `nn.ModuleList` nesting, so `state_dict()` gives GeneFace's key names
and shapes) computing GeneFace's forward passes, written for these tests. Checkpoints are
written the way GeneFace's trainer writes them: `torch.save({'epoch', 'global_step',
'checkpoint_callback_best', 'optimizer_states', 'state_dict': {child: state_dict}},
_use_new_zipfile_serialization=False)` into `model_ckpt_steps_<step>.ckpt`.
"""

import collections
import json
import pickle
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn
import torch.nn.functional as F

from geneface_jax.convert import geneface as gf
from geneface_jax.convert import geneface_import as gi
from geneface_jax.convert import torch_pickle as tp
from geneface_jax.errors import CheckpointError, ShapeError

# GeneFace's checkpoints hold old-style weight norm (weight_g / weight_v), which only the
# deprecated `torch.nn.utils.weight_norm` writes
pytestmark = pytest.mark.filterwarnings("ignore:.*weight_norm:FutureWarning")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- GeneFace's layout

def _wn(conv):
    return torch.nn.utils.weight_norm(conv, name="weight")


class _GfWN(nn.Module):
    """GeneFace's `WN` (dilation rate 1, no dropout): weight-normed convs."""

    def __init__(self, hidden, kernel, layers, gin):
        super().__init__()
        self.h, self.n = hidden, layers
        self.cond_layer = _wn(nn.Conv1d(gin, 2 * hidden * layers, 1))
        self.in_layers = nn.ModuleList(_wn(nn.Conv1d(hidden, 2 * hidden, kernel,
                                                     padding=kernel // 2))
                                       for _ in range(layers))
        self.res_skip_layers = nn.ModuleList(
            _wn(nn.Conv1d(hidden, 2 * hidden if i < layers - 1 else hidden, 1))
            for i in range(layers))

    def forward(self, x, mask, g):
        g = self.cond_layer(g)
        out = 0
        for i in range(self.n):
            h = self.in_layers[i](x) + g[:, 2 * self.h * i:2 * self.h * (i + 1)]
            acts = torch.tanh(h[:, :self.h]) * torch.sigmoid(h[:, self.h:])
            rs = self.res_skip_layers[i](acts)
            if i < self.n - 1:
                x = (x + rs[:, :self.h]) * mask
                out = out + rs[:, self.h:]
            else:
                out = out + rs
        return out * mask


class _GfCoupling(nn.Module):
    def __init__(self, channels, hidden, kernel, layers, gin):
        super().__init__()
        self.half = channels // 2
        self.pre = nn.Conv1d(self.half, hidden, 1)
        self.enc = _GfWN(hidden, kernel, layers, gin)
        self.post = nn.Conv1d(hidden, self.half, 1)

    def forward(self, x, mask, g, reverse):
        x0, x1 = x[:, :self.half], x[:, self.half:]
        m = self.post(self.enc(self.pre(x0) * mask, mask, g)) * mask
        x1 = (x1 - m) * mask if reverse else m + x1 * mask
        return torch.cat([x0, x1], 1)


class _GfFlip(nn.Module):
    def forward(self, x, mask, g, reverse):
        return torch.flip(x, [1])


class _GfFlowBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.flows = nn.ModuleList()
        for _ in range(c.num_flows):
            self.flows.append(_GfCoupling(c.latent, c.flow_hidden, c.flow_kernel,
                                          c.flow_layers, c.cond_dim))
            self.flows.append(_GfFlip())

    def forward(self, x, mask, g, reverse=False):
        for f in (reversed(self.flows) if reverse else self.flows):
            x = f(x, mask, g, reverse)
        return x


class _GfEncoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        s = c.stride
        self.pre_net = nn.Sequential(nn.Conv1d(c.motion_dim, c.hidden, 2 * s, s, s // 2))
        self.wn = _GfWN(c.hidden, c.kernel_size, c.enc_layers, c.cond_dim)
        self.out_proj = nn.Conv1d(c.hidden, 2 * c.latent, 1)


class _GfDecoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.pre_net = nn.Sequential(nn.ConvTranspose1d(c.latent, c.hidden, c.stride,
                                                        c.stride))
        self.wn = _GfWN(c.hidden, c.kernel_size, c.dec_layers, c.cond_dim)
        self.out_proj = nn.Conv1d(c.hidden, c.motion_dim, 1)

    def forward(self, z, mask, g):
        return self.out_proj(self.wn(self.pre_net(z) * mask, mask, g))


class _GfFVAE(nn.Module):
    def __init__(self, c):
        super().__init__()
        s = c.stride
        self.g_pre_net = nn.Sequential(nn.Conv1d(c.cond_dim, c.cond_dim, 2 * s, s, s // 2))
        self.encoder = _GfEncoder(c)
        self.prior_flow = _GfFlowBlock(c)
        self.decoder = _GfDecoder(c)
        self.c = c


class _GfVAEModel(nn.Module):
    """GeneFace's `VAEModel` (one stride, flow prior): `sample` is its infer path with the
    prior noise given, `encode` its training path with the encoder noise given."""

    def __init__(self, c):
        super().__init__()
        self.mel_encoder = nn.Sequential(
            nn.Conv1d(c.feature_dim, 64, 3, 1, 1, bias=False), nn.BatchNorm1d(64),
            nn.GELU(), nn.Conv1d(64, c.cond_dim, 3, 1, 1, bias=False))
        self.vae = _GfFVAE(c)

    def cond(self, feats):                      # [B, 2T, C] -> [B, C_g, T]
        return self.mel_encoder(feats[:, ::2].transpose(1, 2))

    def sample(self, feats, z_p):               # z_p [B, Z, T/4]
        g = self.cond(feats)
        z = self.vae.prior_flow(z_p, 1, self.vae.g_pre_net(g), reverse=True)
        return self.vae.decoder(z, 1, g).transpose(1, 2)

    def encode(self, feats, motion, eps):       # motion [B, T, D], eps [B, Z, T/4]
        g = self.cond(feats)
        g_sqz = self.vae.g_pre_net(g)
        enc = self.vae.encoder
        h = enc.pre_net(motion.transpose(1, 2))
        stats = enc.out_proj(enc.wn(h, 1, g_sqz))
        m, logs = stats.chunk(2, dim=1)
        z = m + eps * torch.exp(logs)
        return self.vae.decoder(z, 1, g).transpose(1, 2), m.transpose(1, 2)


class _GfConvBN(nn.Module):
    def __init__(self, cin, cout, k, s, p, residual=False, slope=None):
        super().__init__()
        self.conv_block = nn.Sequential(nn.Conv1d(cin, cout, k, s, p), nn.BatchNorm1d(cout))
        self.act = nn.ReLU() if slope is None else nn.LeakyReLU(slope)
        self.residual = residual

    def forward(self, x):
        out = self.conv_block(x)
        return self.act(out + x if self.residual else out)


def _sync_plan(first, base, layers, strides):
    plan = [(first, 3, 1, 1, False), (base, 3, 1, 1, False)]
    plan += [(base, 3, 1, 1, True)] * (layers - 1)
    width = base
    for s in strides:
        width *= 2
        plan += [(width, 3, s, 1, False)] + [(width, 3, 1, 1, True)] * (layers - 1)
    return plan + [(width, 3, 1, 1, False), (width, 3, 1, 0, False), (width, 1, 1, 0, False)]


def _blocks(cin, plan, slope=None):
    out = []
    for f, k, s, p, res in plan:
        out.append(_GfConvBN(cin, f, k, s, p, res, slope))
        cin = f
    return nn.Sequential(*out)


class _GfSyncNet(nn.Module):
    """GeneFace's `LandmarkHubertSyncNet` (lm_dim=60), its sizes from a SyncNetConfig."""

    def __init__(self, c):
        super().__init__()
        self.hubert_encoder = _blocks(c.feature_dim, _sync_plan(c.base, c.base,
                                                                c.layers_per_block, (2, 2)))
        self.mouth_encoder = _blocks(c.mouth_dim, _sync_plan(c.mouth_in, c.base,
                                                             c.layers_per_block, (2, 1)))

    def forward(self, audio, mouth):
        a = self.hubert_encoder(audio.transpose(1, 2)).flatten(1)
        m = self.mouth_encoder(mouth.transpose(1, 2)).flatten(1)
        return F.normalize(a, dim=1), F.normalize(m, dim=1)


class _GfPostNet(nn.Module):
    """GeneFace's `CNNPostNet`: blocks of conv-BN-LeakyReLU, mask from all-zero frames."""

    def __init__(self, c):
        super().__init__()

        def block(cin, width):
            return [_GfConvBN(cin, width, 3, 1, 1, False, 0.2)] + [
                _GfConvBN(width, width, 3, 1, 1, True, 0.2) for _ in range(c.residual_layers)]
        self.block1 = nn.Sequential(*block(c.motion_dim, c.hidden))
        self.block2 = nn.Sequential(*block(c.hidden, c.wide))
        self.block3 = nn.Sequential(_GfConvBN(c.wide, c.hidden, 3, 1, 1, False, 0.2),
                                    nn.Conv1d(c.hidden, c.motion_dim, 1, 1, 0))

    def forward(self, x):
        mask = (x.abs().sum(-1) != 0).float()[..., None]
        d = self.block1(x.transpose(1, 2)).transpose(1, 2) * mask
        d = self.block2(d.transpose(1, 2)).transpose(1, 2) * mask
        d = self.block3(d.transpose(1, 2)).transpose(1, 2) * mask
        return x + d


class _GfDisc(nn.Module):
    def __init__(self, c):
        super().__init__()
        layers, cin = [], c.motion_dim
        for width, slope in zip(c.disc_hidden, c.disc_slopes):
            layers += [nn.Linear(cin, width), nn.LeakyReLU(slope), nn.Dropout(0.25)]
            cin = width
        self.backbone = nn.Sequential(*layers, nn.Linear(cin, 1, bias=False))

    def forward(self, x):
        return self.backbone(x)[..., 0]


def _pe(x, n):
    return torch.cat([x] + [f(x * 2.0 ** k) for k in range(n) for f in (torch.sin,
                                                                        torch.cos)], -1)


class _GfBackbone(nn.Module):
    """GeneFace's `NeRFBackbone` (returns raw rgb, raw sigma)."""

    def __init__(self, pos_dim, cond_dim, view_dim, c):
        super().__init__()
        inp = pos_dim + cond_dim
        self.skip = c.skip
        self.density_linears = nn.ModuleList(
            [nn.Linear(inp, c.width)] + [nn.Linear(c.width + (inp if i == c.skip else 0),
                                                   c.width) for i in range(c.depth - 1)])
        self.density_out_linear = nn.Linear(c.width, 1)
        dims = [c.width + view_dim] + [c.color_width] * c.color_depth
        self.color_linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:]))
        self.color_out_linear = nn.Linear(c.color_width, 3)

    def forward(self, pos, cond, view):          # pos [R, S, P], cond [R, C], view [R, V]
        r, s = pos.shape[:2]
        inp = torch.cat([pos, cond[:, None].expand(r, s, -1)], -1)
        h = inp
        for i, layer in enumerate(self.density_linears):
            h = F.relu(layer(h))
            if i == self.skip:
                h = torch.cat([inp, h], -1)
        sigma = self.density_out_linear(h)[..., 0]
        h = torch.cat([h, view[:, None].expand(r, s, -1)], -1)
        for layer in self.color_linears:
            h = F.relu(layer(h))
        return self.color_out_linear(h), sigma


class _GfAudioNet(nn.Module):
    """AD-NeRF's / GeneFace's `AudioNet` with strides 1 (window 1) or 2 (window 16)."""

    def __init__(self, in_dim, channels, fc, out_dim, stride=1):
        super().__init__()
        convs, cin = [], in_dim
        for ch in channels:
            convs += [nn.Conv1d(cin, ch, 3, stride, 1), nn.LeakyReLU(0.02)]
            cin = ch
        self.encoder_conv = nn.Sequential(*convs)
        self.encoder_fc1 = nn.Sequential(nn.Linear(cin, fc), nn.LeakyReLU(0.02),
                                         nn.Linear(fc, out_dim))

    def forward(self, x):                        # [B, W, C]
        return self.encoder_fc1(self.encoder_conv(x.permute(0, 2, 1)).squeeze(-1))


class _GfAttNet(nn.Module):
    def __init__(self, dim, channels, window):
        super().__init__()
        convs, cin = [], dim
        for ch in tuple(channels) + (1,):
            convs += [nn.Conv1d(cin, ch, 3, 1, 1), nn.LeakyReLU(0.02)]
            cin = ch
        self.attentionConvNet = nn.Sequential(*convs)
        self.attentionNet = nn.Sequential(nn.Linear(window, window), nn.Softmax(dim=1))
        self.window = window

    def forward(self, x):                        # [W, C] -> [C]
        y = self.attentionConvNet(x.permute(1, 0)[None])
        y = self.attentionNet(y.view(1, self.window)).view(self.window, 1)
        return (y * x).sum(0)


class _GfLm3dNeRF(nn.Module):
    """GeneFace's `Lm3dNeRF` (use_window_cond, cond_win_size 1, with_att)."""

    def __init__(self, c):
        super().__init__()
        pos, view = c.pos_dim, c.view_dim
        self.model_coarse = _GfBackbone(pos, c.cond_dim, view, c)
        self.model_fine = _GfBackbone(pos, c.cond_dim, view, c)
        self.lm_encoder = _GfAudioNet(204, c.landmark_channels, c.landmark_fc, c.cond_dim)
        self.lmatt_encoder = _GfAttNet(c.cond_dim, c.attention_channels, c.smooth_window)


class _GfTorso(nn.Module):
    """GeneFace's `ADNeRFTorso` (use_color)."""

    def __init__(self, c):
        super().__init__()
        cond = c.cond_dim + c.pose_dim + c.torso_color_dim
        self.color_encoder = nn.Sequential(nn.Linear(3, 16), nn.LeakyReLU(0.02),
                                           nn.Linear(16, 32), nn.LeakyReLU(0.02),
                                           nn.Linear(32, c.torso_color_dim))
        self.model_coarse = _GfBackbone(c.pos_dim, cond, c.view_dim, c)
        self.model_fine = _GfBackbone(c.pos_dim, cond, c.view_dim, c)
        self.aud_net = _GfAudioNet(29, (32, 32, 64, 64), 64, c.cond_dim, stride=2)
        self.audatt_net = _GfAttNet(c.cond_dim, (16, 8, 4, 2), 8)
        self.c = c

    def cond(self, feat, pose, rgb):
        n = self.c.pose_freqs
        return torch.cat([feat, _pe(pose[:, :3], n), _pe(pose[:, 3:], n),
                          self.color_encoder(rgb)], -1)


def _randomize(module, seed):
    """Every parameter and BatchNorm statistic of `module` drawn at random."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if t.dtype.is_floating_point:
                v = torch.randn(t.shape, generator=g) * 0.2
                t.copy_(v.abs() + 0.5 if name.endswith("running_var") else v)
    return module.eval()


def _gf_state_dict(module):
    """`module.state_dict()` as flat numpy (GeneFace's keys), num_batches_tracked dropped."""
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()
            if not k.endswith("num_batches_tracked")}


def _save_geneface(path, children, step=40000, zip_format=False, **extra):
    """Writes `children` ({child: {key: numpy}}) the way GeneFace's trainer does."""
    path.mkdir(parents=True, exist_ok=True)
    state_dict = {name: collections.OrderedDict((k, torch.tensor(np.asarray(v)))
                                                for k, v in sd.items())
                  for name, sd in children.items()}
    ckpt = {"epoch": 7, "global_step": step, "checkpoint_callback_best": np.float64(0.25),
            "optimizer_states": [{"state": {0: {"step": torch.tensor(3.0),
                                                "exp_avg": torch.zeros(4)}},
                                  "param_groups": [{"lr": 5e-4, "betas": (0.9, 0.999),
                                                    "params": [0]}]}],
            "state_dict": state_dict, **extra}
    file = path / f"model_ckpt_steps_{step}.ckpt"
    torch.save(ckpt, file, _use_new_zipfile_serialization=zip_format)
    return file


def _flat(tree):
    return {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def _assert_same_tree(got, want):
    got, want = _flat(got), _flat(want)
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == np.float32 and np.array_equal(got[k], want[k]), k


def _close(what, a, b, rtol=1e-4):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (what, a.shape, b.shape)
    err = float(np.max(np.abs(a - b)))
    scale = max(float(np.max(np.abs(b))), 1e-3)
    assert err <= rtol * scale, f"{what}: max abs err {err:.2e} (scale {scale:.2e})"
    return err


# --------------------------------------------------------------------------- small configs

def _a2m_config():
    from geneface_jax.motion.vae import Audio2MotionConfig
    return Audio2MotionConfig(feature_dim=80, cond_dim=16, hidden=16, enc_layers=2,
                              dec_layers=2, flow_hidden=8, flow_layers=2, num_flows=2)


def _sync_config():
    from geneface_jax.motion.syncnet import SyncNetConfig
    return SyncNetConfig(feature_dim=80, base=8, mouth_in=8, layers_per_block=2)


def _postnet_config():
    from geneface_jax.motion.postnet import PostNetConfig
    return PostNetConfig(hidden=16, wide=24, residual_layers=2,
                         disc_hidden=(16, 24, 24, 16))


def _nerf_config():
    from geneface_jax.render.fields import NeRFConfig
    return NeRFConfig(width=32, depth=4, skip=1, color_width=16, color_depth=2,
                      num_coarse=8, num_fine=8, pixel_convention="geneface")


def _a2m_state_dict():
    """A random stage-1 model (`_a2m_config`) in GeneFace's layout."""
    return _gf_state_dict(_randomize(_GfVAEModel(_a2m_config()), 9))


def _flax_from_geneface(stage, config, module, roots=("model.",)):
    """Converts a `_Gf*` module's random weights (as a GeneFace state_dict)."""
    return gf.convert(gf.STAGES[stage], {roots[0] + k: v for k, v in
                                         _gf_state_dict(module).items()}, config, roots)


# --------------------------------------------------------------------------- the reader

def test_reader_reads_both_torch_save_layouts_bit_for_bit(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6) / 7
    obj = {"epoch": 2, "state_dict": {"model": collections.OrderedDict(
        w=base, t=base.t(), v=base[1:3, 2:5], h=base.half(), b=base.bfloat16(),
        i=torch.arange(5), flag=torch.tensor([True, False]), s=torch.tensor(3.5),
        e=torch.zeros(0, 3))}, "best": np.float64(0.5), "lr": [1e-3, (0.9, 0.999)],
        "name": "x", "none": None}
    for zip_format in (False, True):
        path = tmp_path / f"f{zip_format}.ckpt"
        torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
        got = tp.load_torch_file(path)
        sd = got["state_dict"]["model"]
        assert isinstance(sd, collections.OrderedDict) and list(sd) == list(obj["state_dict"]
                                                                            ["model"])
        for k, t in obj["state_dict"]["model"].items():
            want = t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()
            have = sd[k].astype(np.float32) if k == "b" else sd[k]
            assert have.shape == tuple(t.shape) and np.array_equal(have, want), k
        assert sd["h"].dtype == np.float16 and sd["i"].dtype == np.int64
        assert got["best"] == 0.5 and got["lr"] == [1e-3, (0.9, 0.999)]
        assert got["epoch"] == 2 and got["name"] == "x" and got["none"] is None


class _Evil:
    def __reduce__(self):
        import os
        return (os.system, ("touch /tmp/geneface_import_pwned",))


@pytest.mark.parametrize("payload", ["os.system", "module", "numpy_object", "storage_lie"])
def test_reader_refuses_any_other_callable(tmp_path, payload):
    import os
    marker = "/tmp/geneface_import_pwned"
    if os.path.exists(marker):
        os.remove(marker)
    path = tmp_path / "evil.ckpt"
    if payload == "os.system":
        # a legacy torch.save file whose main pickle names os.system
        torch.save({"state_dict": {}}, path, _use_new_zipfile_serialization=False)
        evil = pickle.dumps({"state_dict": {}, "x": _Evil()}, protocol=2)
        head = b"".join(pickle.dumps(x, protocol=2) for x in (
            tp.LEGACY_MAGIC, tp.LEGACY_PROTOCOL, {"protocol_version": 1001,
                                                  "little_endian": True}))
        path.write_bytes(head + evil + pickle.dumps([], protocol=2))
        match = "os.system|posix.system"
    elif payload == "module":
        torch.save(nn.Linear(2, 2), path)                  # a whole module, not weights
        match = "torch.nn.modules.linear.Linear"
    elif payload == "numpy_object":
        np.save(tmp_path / "evil.npy", np.array([{"a": _Evil()}], dtype=object),
                allow_pickle=True)
        with pytest.raises(CheckpointError, match="system"):
            tp.load_pickled_numpy(tmp_path / "evil.npy")
        assert not os.path.exists(marker)
        return
    else:
        torch.save({"w": torch.zeros(3)}, path, _use_new_zipfile_serialization=False)
        raw = bytearray(path.read_bytes())
        raw[-12 - 8:-12] = (10 ** 6).to_bytes(8, "little")  # element count of the storage
        path.write_bytes(bytes(raw))
        match = "elements"
    with pytest.raises(CheckpointError, match=match):
        tp.load_torch_file(path)
    assert not os.path.exists(marker)


def test_checkpoint_naming_newest_step_or_the_given_one(tmp_path):
    for step in (600, 40000, 2000):
        _save_geneface(tmp_path, {"model": {"w": np.full(2, step, np.float32)}}, step=step)
    assert gf.read_checkpoint(tmp_path).step == 40000
    ck = gf.read_checkpoint(tmp_path, step=2000)
    assert ck.step == 2000 and ck.state_dict["model.w"][0] == 2000 and ck.epoch == 7
    with pytest.raises(CheckpointError, match=r"no checkpoint of step 5 .*600, 2000, 40000"):
        gf.find_checkpoint(tmp_path, 5)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "model_ckpt_best.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no GeneFace checkpoint.*model_ckpt_best.pt"):
        gf.find_checkpoint(tmp_path / "empty")


# --------------------------------------------------------------------------- key tables

@pytest.mark.parametrize("stage", ["audio2motion", "syncnet", "postnet", "head", "torso"])
def test_geneface_layout_of_the_paper_networks_is_the_converters_table(stage):
    """GeneFace's modules at the sizes of its code and egs/ configs (VAEModel(204) on
    1024-d HuBERT, LandmarkHubertSyncNet(60), CNNPostNet(204) + MLPDiscriminator(204),
    Lm3dNeRF / ADNeRFTorso with hidden_size 256, cond_dim 64, smo_win_size 5, use_color):
    every key and shape of their state_dicts is an entry of the converter or listed as
    deliberately unused, and every entry is one of their keys."""
    c = gf.paper_configs()[stage]
    module = {"audio2motion": lambda: _GfVAEModel(c), "syncnet": lambda: _GfSyncNet(c),
              "head": lambda: _GfLm3dNeRF(c),
              "torso": lambda: _GfTorso(gf.torso_config(
                  {f"model.{k}": v for k, v in _gf_state_dict(_GfTorso(c)).items()},
                  "model.", {}, c))}
    if stage == "postnet":
        sd = {**{f"model.{k}": v.shape for k, v in _GfPostNet(c).state_dict().items()},
              **{f"disc_model.{k}": v.shape for k, v in _GfDisc(c).state_dict().items()}}
        roots = ("model.", "disc_model.")
    else:
        sd = {f"model.{k}": v.shape for k, v in module[stage]().state_dict().items()}
        roots = ("model.",)
    expected = {e.key: e.shape for e in gf.entries(gf.STAGES[stage], c, roots)}
    unused = [p for p, _ in gf.STAGES[stage].unused]
    import re
    got = {k: tuple(s) for k, s in sd.items() if not any(re.search(p, k) for p in unused)}
    assert got == expected


def test_the_key_table_in_the_docs_is_the_converters():
    from conftest import REPO
    text = (REPO / "docs" / "geneface_differences.md").read_text()
    assert gf.key_table_markdown() in text


# --------------------------------------------------------------------------- stages

def test_stage1_imports_bit_for_bit_and_computes_genefaces_function(tmp_path):
    from geneface_jax.motion import predict
    from geneface_jax.motion.vae import Audio2Motion, init_audio2motion
    c = _a2m_config()
    # this project's model (its variable tree) with random weights, in GeneFace's layout
    rng = np.random.default_rng(0)
    variables = jax.tree.map(
        lambda x: 0.2 * rng.standard_normal(x.shape).astype(np.float32),
        jax.eval_shape(lambda: init_audio2motion(c, 3)[1]))
    variables["batch_stats"]["mel_encoder"]["bn"]["var"] = np.abs(
        variables["batch_stats"]["mel_encoder"]["bn"]["var"]) + 0.5
    sd = gf.to_state_dict(gf.STAGES["audio2motion"], variables, c, ("",))
    sync = _gf_state_dict(_GfSyncNet(_sync_config()))
    _save_geneface(tmp_path / "gf", {"model": {**sd, "mel_encoder.1.num_batches_tracked":
                                               np.array(5)},
                                     "syncnet_task": {f"model.{k}": v
                                                      for k, v in sync.items()}})
    summary = gi.import_geneface(tmp_path / "gf", "audio2motion", tmp_path / "a2m")
    assert summary["step"] == 40000 and summary["converted_keys"] == len(sd)
    mc, loaded, run, std = predict.load_audio2motion(tmp_path / "a2m")
    assert mc == c
    _assert_same_tree(loaded, variables)
    np.testing.assert_array_equal(std, np.full((68, 3), 0.1, np.float32))
    assert predict.motion_representation(run)["kind"] == "geneface_idexp_lm3d"
    assert run["imported"]["global_step"] == 40000

    # GeneFace's forward passes on the same weights (its layout, loaded strictly)
    ref = _GfVAEModel(c)
    ref.load_state_dict({**{k: torch.from_numpy(v) for k, v in sd.items()},
                         "mel_encoder.1.num_batches_tracked": torch.tensor(5)})
    ref.eval()
    t = 22                                         # not a multiple of 4: GeneFace pads
    feats = rng.standard_normal((2 * t, c.feature_dim)).astype(np.float32)
    key = jax.random.PRNGKey(1)
    pred = predict.MotionPredictor(mc, loaded, chunk=16, pad_mode="geneface").sample_motion(
        feats, key)
    total = -(-t // c.stride) * c.stride
    noise = np.asarray(jax.random.normal(key, (total // c.stride, c.latent)))
    padded = np.zeros((2 * total, c.feature_dim), np.float32)
    padded[:2 * t] = feats
    with torch.no_grad():
        want = ref.sample(torch.from_numpy(padded)[None],
                          torch.from_numpy(noise.T.copy())[None])[0, :t].numpy()
    err = _close("stage-1 sample (GeneFace padding)", pred, want)
    # training path: encoder (strided pre-net) and decoder with the encoder noise given
    motion = rng.standard_normal((1, 16, 204)).astype(np.float32)
    eps = rng.standard_normal((1, 4, c.latent)).astype(np.float32)
    out = jax.jit(lambda v, f, x, e: Audio2Motion(c).apply(v, f, x, jnp.ones((1, 16, 1)),
                                                           eps=e))(loaded, feats[None, :32],
                                                                   motion, eps)
    with torch.no_grad():
        recon, m = ref.encode(torch.from_numpy(feats[None, :32]), torch.from_numpy(motion),
                              torch.from_numpy(eps.transpose(0, 2, 1).copy()))
    _close("encoder mean", out["m_q"], m.numpy())
    _close("reconstruction", out["recon"], recon.numpy())
    print(f"stage 1 max abs err {err:.2e}")


def test_syncnet_imports_from_its_run_and_from_a_stage1_run(tmp_path):
    from geneface_jax.motion.syncnet import SyncNet
    from geneface_jax.train.audio2motion import load_syncnet
    c = _sync_config()
    ref = _randomize(_GfSyncNet(c), 4)
    sd = _gf_state_dict(ref)
    _save_geneface(tmp_path / "sync", {"model": sd})
    _save_geneface(tmp_path / "a2m", {"model": _a2m_state_dict(),
                                       "syncnet_task": {f"model.{k}": v
                                                        for k, v in sd.items()}})
    want = _flax_from_geneface("syncnet", c, ref)
    rng = np.random.default_rng(1)
    audio = rng.standard_normal((3, 10, c.feature_dim)).astype(np.float32)
    mouth = rng.standard_normal((3, 5, 60)).astype(np.float32)
    with torch.no_grad():
        a_t, m_t = ref(torch.from_numpy(audio), torch.from_numpy(mouth))
    conv = gi.convert_stage(tmp_path / "sync", "syncnet")
    assert conv.roots == ("model.",)
    _assert_same_tree(conv.variables, want)
    gi.import_geneface(tmp_path / "a2m", "syncnet", tmp_path / "out")
    # the workdir holds the variables alone: no optimizer state is built for it
    from geneface_jax.checkpoint import restore_run
    assert set(restore_run(tmp_path / "out")) == {"step", "params", "batch_stats"}
    model, variables, run = load_syncnet(tmp_path / "out")
    assert "optim" not in run and run["representation"]["kind"] == "geneface_idexp_lm3d"
    assert run["model"]["feature_dim"] == c.feature_dim
    assert run["imported"]["networks"] == ["syncnet_task.model."]
    _assert_same_tree(jax.device_get(variables), want)
    a, m = jax.jit(SyncNet(c).apply)(variables, audio, mouth)
    _close("audio embedding", a, a_t.numpy())
    _close("mouth embedding", m, m_t.numpy())


def test_postnet_and_critic_import_and_match_genefaces(tmp_path):
    from geneface_jax.checkpoint import restore_run
    from geneface_jax.motion import predict
    from geneface_jax.motion.postnet import MLPDiscriminator, refine_motion
    c = _postnet_config()
    gen, disc = _randomize(_GfPostNet(c), 5), _randomize(_GfDisc(c), 6)
    a2m = _a2m_state_dict()
    _save_geneface(tmp_path / "gf", {
        "model": _gf_state_dict(gen), "disc_model": _gf_state_dict(disc),
        "audio2motion_task": {f"model.{k}": v for k, v in a2m.items()},
        "syncnet_task": {f"model.{k}": v for k, v in _gf_state_dict(
            _GfSyncNet(_sync_config())).items()}}, step=6000)
    gi.import_geneface(tmp_path / "gf", "postnet", tmp_path / "pn")
    config, variables, run, std, identity = predict.load_postnet(tmp_path / "pn")
    assert config == c and run["inference_generator"]["step"] == 6000
    want = gf.convert(gf.STAGES["postnet"], {**{f"model.{k}": v for k, v in
                                                 _gf_state_dict(gen).items()},
                                              **{f"disc_model.{k}": v for k, v in
                                                 _gf_state_dict(disc).items()}},
                      c, ("model.", "disc_model."))
    _assert_same_tree(variables, want["generator"])
    _assert_same_tree(restore_run(tmp_path / "pn")["discriminator"], want["discriminator"])
    np.testing.assert_array_equal(identity, np.zeros((68, 3)))
    x = np.random.default_rng(2).standard_normal((30, 204)).astype(np.float32)
    with torch.no_grad():
        want_x = gen(torch.from_numpy(x)[None])[0].numpy()
        want_d = disc(torch.from_numpy(x)).numpy()
    _close("refined motion", refine_motion(config, variables, x, bucket=16), want_x)
    _close("critic scores", jax.jit(MLPDiscriminator(config).apply)(want["discriminator"], x),
           want_d)
    # the same checkpoint also holds stage 1
    gi.import_geneface(tmp_path / "gf", "audio2motion", tmp_path / "a2m_from_pn")
    _assert_same_tree(predict.load_audio2motion(tmp_path / "a2m_from_pn")[1],
                      gf.convert(gf.STAGES["audio2motion"],
                                 {f"model.{k}": v for k, v in a2m.items()}, _a2m_config(),
                                 ("model.",)))


def test_head_and_torso_import_and_render_genefaces_fields(tmp_path):
    from geneface_jax.render import fields, frames
    c = _nerf_config()
    head = _randomize(_GfLm3dNeRF(c), 7)
    torso = _randomize(_GfTorso(c), 8)
    with torch.no_grad():                   # densities on both sides of the ReLU
        for net in (head.model_fine, torso.model_coarse):
            net.density_out_linear.bias.fill_(0.3)
    _save_geneface(tmp_path / "gf_head", {"model": _gf_state_dict(head)}, step=250000,
                   zip_format=True)
    (tmp_path / "gf_head" / "config.yaml").write_text(
        "near: 0.25\nfar: 0.95\nn_samples_per_ray: 8\nn_samples_per_ray_fine: 8\n"
        "no_smo_iterations: 200000\nuse_window_cond: true\ncond_win_size: 1\n"
        "with_att: true\nhidden_size: 32\n")
    _save_geneface(tmp_path / "gf_torso", {"model": _gf_state_dict(torso),
                                           "head_model": _gf_state_dict(head)})
    rng = np.random.default_rng(3)
    mean = rng.standard_normal((1, 68, 3)).astype(np.float32)
    std = rng.uniform(0.5, 2.0, (1, 68, 3)).astype(np.float32)
    np.savez(tmp_path / "stats.npz", idexp_lm3d_mean=mean, idexp_lm3d_std=std)
    gi.import_geneface(tmp_path / "gf_head", "head", tmp_path / "head",
                       lm3d_stats=tmp_path / "stats.npz", landmark_unit=2.0)
    gi.import_geneface(tmp_path / "gf_torso", "torso", tmp_path / "torso",
                       head=tmp_path / "head")
    hcfg, hvars, hrun, norm = frames.load_nerf(tmp_path / "head", frames.HEAD)
    tcfg, tvars, trun, tnorm = frames.load_nerf(tmp_path / "torso", frames.TORSO)
    assert (hcfg.near, hcfg.far, hcfg.smooth_warmup_steps) == (0.25, 0.95, 200000)
    assert hrun["trained_steps"] == 250000 and frames.head_smooth_enabled(hcfg, 250000)
    assert trun["head_model"] == hrun["model"] and trun["head"] == str(tmp_path / "head")
    np.testing.assert_array_equal(norm.mean, np.zeros((68, 3)))
    assert tnorm.scale == norm.scale == pytest.approx(0.2)
    # parameters: bit for bit but for the folded first layer
    raw = _flax_from_geneface("head", hcfg, head)
    folded = gi.fold_landmark_stats(raw["params"], mean[0], std[0])
    _assert_same_tree(hvars, {"params": folded})
    _assert_same_tree(tvars, _flax_from_geneface("torso", tcfg, torso))
    # the condition: landmarks here -> normaliser -> folded encoder = GeneFace's encoder on
    # (idexp_lm3d - mean) / std, with idexp_lm3d = landmarks * 10 / landmark_unit
    idexp = mean + std * rng.standard_normal((5, 68, 3)).astype(np.float32)
    landmarks = idexp / 10.0 * 2.0
    condition = jax.jit(lambda p, w, smooth: frames.head_condition(
        fields.HeadNeRF(hcfg), p, w, smooth), static_argnums=2)
    cond = condition(hvars["params"], norm(landmarks)[None], True)[0]
    with torch.no_grad():
        x = torch.from_numpy(((idexp - mean) / std).reshape(5, 1, 204))
        want = head.lmatt_encoder(head.lm_encoder(x))
        centre = head.lm_encoder(x)[2]
    _close("landmark condition (smoothed)", cond, want.numpy())
    _close("landmark condition (centre frame)",
           condition(hvars["params"], norm(landmarks)[None], False)[0], centre.numpy())
    # the fields
    r, s = 6, 5
    pts = rng.uniform(-0.5, 0.5, (r, s, 3)).astype(np.float32)
    dirs = rng.standard_normal((r, 3)).astype(np.float32)
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    feat = rng.standard_normal((r, hcfg.cond_dim)).astype(np.float32)
    pose = rng.uniform(-1, 1, (r, 6)).astype(np.float32)
    rgb_in = rng.uniform(0, 1, (r, 3)).astype(np.float32)
    sigma, rgb = jax.jit(fields.HeadField(hcfg).apply)(
        {"params": hvars["params"]["fine"]}, pts, dirs, feat)
    tsigma, trgb = jax.jit(fields.TorsoField(tcfg).apply)(
        {"params": tvars["params"]["coarse"]}, pts, dirs, feat, pose, rgb_in)
    with torch.no_grad():
        p, v = _pe(torch.from_numpy(pts), c.pos_freqs), _pe(torch.from_numpy(dirs),
                                                            c.view_freqs)
        raw_rgb, raw_sigma = head.model_fine(p, torch.from_numpy(feat), v)
        t_cond = torso.cond(torch.from_numpy(feat), torch.from_numpy(pose),
                            torch.from_numpy(rgb_in))
        traw_rgb, traw_sigma = torso.model_coarse(p, t_cond, v)
    assert 0 < np.mean(np.asarray(sigma) > 0) < 1
    _close("head density", sigma, F.relu(raw_sigma).numpy())
    _close("head colour", rgb, torch.sigmoid(raw_rgb).numpy())
    _close("torso density", tsigma, F.relu(traw_sigma).numpy())
    _close("torso colour", trgb, torch.sigmoid(traw_rgb).numpy())


def test_imported_stages_belong_together_in_the_pipeline(tmp_path):
    """Imported stage 1, post-net, head and torso pass the pipeline's compatibility check
    (same landmark std, the post-net's identity = the head's normaliser mean, the torso's
    head): `TalkingFacePipeline.load` takes them with a reference track in the NeRF's
    camera frame."""
    from geneface_jax import pipeline
    from geneface_jax.motion import predict
    from geneface_jax.render import frames
    a2m = _a2m_state_dict()
    pn = _postnet_config()
    _save_geneface(tmp_path / "gf_pn", {"model": _gf_state_dict(_GfPostNet(pn)),
                                        "disc_model": _gf_state_dict(_GfDisc(pn)),
                                        "audio2motion_task": {f"model.{k}": v
                                                              for k, v in a2m.items()}})
    n = _nerf_config()
    _save_geneface(tmp_path / "gf_head", {"model": _gf_state_dict(_GfLm3dNeRF(n))})
    _save_geneface(tmp_path / "gf_torso", {"model": _gf_state_dict(_GfTorso(n))})
    # GeneFace's trainval_dataset.npy: a pickled dict of arrays, numbers, strings, lists
    np.save(tmp_path / "trainval_dataset.npy", {
        "idexp_lm3d_mean": np.zeros((1, 68, 3), np.float32),
        "idexp_lm3d_std": np.ones((1, 68, 3), np.float32), "H": 32, "focal": 1200.0,
        "bg_img": np.zeros((4, 4, 3), np.uint8), "video": "May",
        "train_samples": [{"idx": 0, "c2w": np.eye(4), "euler": np.zeros(3),
                           "focal": np.float64(1.5)}]}, allow_pickle=True)
    root = tmp_path / "checkpoints"
    gi.import_geneface(tmp_path / "gf_pn", "audio2motion", root / "audio2motion")
    gi.import_geneface(tmp_path / "gf_pn", "postnet", root / "postnet")
    gi.import_geneface(tmp_path / "gf_head", "head", root / "head",
                       lm3d_stats=tmp_path / "trainval_dataset.npy")
    gi.import_geneface(tmp_path / "gf_torso", "torso", root / "torso", head=root / "head")
    pipeline._check_compatible(root, predict.load_audio2motion(root / "audio2motion"),
                               predict.load_postnet(root / "postnet"),
                               frames.load_nerf(root / "head", frames.HEAD),
                               frames.load_nerf(root / "torso", frames.TORSO))


# --------------------------------------------------------------------------- refusals

def test_missing_wrong_shape_and_unexpected_keys_are_named(tmp_path):
    c = _postnet_config()
    gen, disc = _gf_state_dict(_GfPostNet(c)), _gf_state_dict(_GfDisc(c))

    def attempt(gen_sd, disc_sd=disc, out="x"):
        _save_geneface(tmp_path / out, {"model": gen_sd, "disc_model": disc_sd})
        return gi.import_geneface(tmp_path / out, "postnet", tmp_path / f"{out}_run")

    missing = {k: v for k, v in gen.items() if k != "block2.1.conv_block.1.running_var"}
    with pytest.raises(CheckpointError, match=r"missing key 'model\.block2\.1\.conv_block"
                                              r"\.1\.running_var'"):
        attempt(missing, out="missing")
    bad = dict(gen, **{"block1.2.conv_block.0.weight": np.zeros((16, 16, 5), np.float32)})
    with pytest.raises(ShapeError, match=r"'model\.block1\.2\.conv_block\.0\.weight' has "
                                         r"shape \[16, 16, 5\], expected \[16, 16, 3\]"):
        attempt(bad, out="shape")
    extra = dict(gen, **{"block1.0.adapter.weight": np.zeros(3, np.float32)})
    with pytest.raises(CheckpointError, match=r"unexpected key 'model\.block1\.0\.adapter"):
        attempt(extra, out="extra")
    for out in ("missing", "shape", "extra"):
        assert not (tmp_path / f"{out}_run").exists()       # nothing partial is written
    with pytest.raises(CheckpointError, match="holds no LandmarkHubertSyncNet"):
        gi.convert_stage(tmp_path / "missing", "syncnet")
    with pytest.raises(CheckpointError, match="needs --lm3d_stats"):
        gi.import_geneface(tmp_path / "missing", "head", tmp_path / "h")


def test_parametrization_style_weight_norm_keys_are_read(tmp_path):
    c = _a2m_config()
    ref = _GfVAEModel(c)
    sd = _gf_state_dict(ref)
    renamed = {k.replace(".weight_g", ".parametrizations.weight.original0")
               .replace(".weight_v", ".parametrizations.weight.original1"): v
               for k, v in sd.items()}
    assert any("original0" in k for k in renamed)
    _save_geneface(tmp_path / "gf", {"model": renamed})
    conv = gi.convert_stage(tmp_path / "gf", "audio2motion")
    _assert_same_tree(conv.variables, _flax_from_geneface("audio2motion", c, ref))


def test_conv_transpose1d_from_torch_orientation():
    from geneface_jax.convert import conv_transpose1d_from_torch
    from geneface_jax.motion.vae import ConvTranspose1dStrided
    conv = nn.ConvTranspose1d(5, 7, 4, 4)
    x = np.random.default_rng(4).standard_normal((2, 3, 5)).astype(np.float32)
    params = conv_transpose1d_from_torch({k: v.detach().numpy() for k, v in
                                          conv.state_dict().items()}, "")
    with torch.no_grad():
        want = conv(torch.from_numpy(x).transpose(1, 2)).transpose(1, 2).numpy()
    _close("ConvTranspose1d", ConvTranspose1dStrided(7, 4).apply({"params": params}, x), want)


def test_loaders_point_a_geneface_directory_to_the_import(tmp_path):
    from geneface_jax.motion import predict
    from geneface_jax.train.audio2motion import load_syncnet
    _save_geneface(tmp_path, {"model": {"w": np.zeros(2, np.float32)}})
    for load, stage in ((predict.load_audio2motion, "audio2motion"),
                        (predict.load_postnet, "postnet"), (load_syncnet, "syncnet")):
        hint = (f"import it first: python -m experiments.import_geneface --ckpt={tmp_path} "
                f"--stage={stage} ")
        with pytest.raises(CheckpointError, match=re.escape(hint)):
            load(tmp_path)


def test_command_line_import(tmp_path):
    from conftest import run_module
    c = _postnet_config()
    _save_geneface(tmp_path / "gf", {"model": _gf_state_dict(_GfPostNet(c)),
                                     "disc_model": _gf_state_dict(_GfDisc(c))}, step=6000)
    p = run_module("experiments.import_geneface", f"--ckpt={tmp_path / 'gf'}",
                   "--stage=postnet", f"--out={tmp_path / 'pn'}")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["stage"] == "postnet" and out["step"] == 6000
    p = run_module("experiments.import_geneface", f"--ckpt={tmp_path / 'gf'}",
                   "--stage=syncnet", f"--out={tmp_path / 'sn'}", check=False)
    assert p.returncode == 2 and "holds no LandmarkHubertSyncNet" in p.stderr


@pytest.mark.slow
def test_an_imported_stage1_and_syncnet_feed_a_postnet_trained_here(tmp_path):
    """`train_postnet` (tiny preset, in process) on an imported stage 1 and SyncNet (80-d
    features, so the synthetic world's datasets fit): the pool is drawn in GeneFace's
    units, the person's frames are put in them through landmark_std, and the run's
    workdir loads for inference."""
    from experiments.configs import postnet as presets
    from geneface_jax.data import format as fmt
    from geneface_jax.data.synthetic import world
    from geneface_jax.mesh import make_mesh
    from geneface_jax.motion import predict
    from geneface_jax.train import postnet as tp
    arrays, meta = world.make_corpus(3, num_utterances=16, num_speakers=4,
                                     held_out_speakers=1, seconds=(1.0, 2.0), progress=False)
    corpus = fmt.write_corpus(tmp_path / "corpus", arrays, meta)
    p_arrays, p_meta, wav = world.make_person(1, size=24, num_frames=80, progress=False)
    fmt.write_person(tmp_path / "person", p_arrays, p_meta, wav)
    _save_geneface(tmp_path / "gf_a2m", {
        "model": _a2m_state_dict(),
        "syncnet_task": {f"model.{k}": v for k, v in
                         _gf_state_dict(_randomize(_GfSyncNet(_sync_config()), 2)).items()}})
    gi.import_geneface(tmp_path / "gf_a2m", "audio2motion", tmp_path / "a2m",
                       landmark_unit=0.05)
    gi.import_geneface(tmp_path / "gf_a2m", "syncnet", tmp_path / "sync")
    out = tp.train_postnet(presets.get_config("tiny"), tmp_path / "pn", tmp_path / "person",
                           tmp_path / "a2m", corpus=corpus, syncnet=tmp_path / "sync",
                           mesh=make_mesh(jax.devices()[:1]))
    assert np.isfinite(out["pool_fd_after"])
    config, variables, run, std, identity = predict.load_postnet(tmp_path / "pn")
    np.testing.assert_allclose(std, 0.005)
    assert run["audio2motion"] == str(tmp_path / "a2m")
