r"""Post-net GAN training step (generator + discriminator), JAX vs PyTorch, steps/s.

  python -m experiments.bench.postnet                       # paper config, 32 x 64 frames
  python -m experiments.bench.postnet --config=small
  python -m experiments.bench.postnet --torch_compile=auto  # also try torch.compile
  python -m experiments.bench.postnet --smoke               # seconds; for the tests

Both sides run the same step on the same batch: the generator (GeneFace's `CNNPostNet`)
refines stage-1 motion windows; its loss is 0.85 LSGAN `(D(G(x)) - 1)^2` + 0.1 SyncNet
loss (a frozen landmark SyncNet on 5-frame windows every 2 frames against the driving
audio) + 0.05 `|G(x) - x|^2`; the discriminator (GeneFace's `MLPDiscriminator`, dropout
0.25, on frames scaled by `discriminator_scale`) gets `D(G(x))^2 + (D(real) - 1)^2` on the
detached refinement; each network has its own Adam (beta1 0) with global-norm clipping
at 1, the generator's BatchNorm runs in training mode and an EMA of the generator's
variables (decay 0.999) is updated. The JAX side is the library's step
(`train.postnet.create_postnet_state` + `make_postnet_steps(...).train_step` under
`train.parallel.data_parallel` on a 1-device mesh). The PyTorch side is written here the way
a PyTorch user writes GeneFace's task: channels-first `nn.Conv1d` + `nn.BatchNorm1d` +
`nn.LeakyReLU`, `nn.Sequential` MLP with `nn.Dropout`, `Tensor.unfold` for the sync
windows, the discriminator's `requires_grad` switched off during the generator update,
`zero_grad(set_to_none=True)`, `clip_grad_norm_`, `torch.optim.Adam` (+ `StepLR` for the
discriminator), the EMA with `torch._foreach_lerp_` (as timm's ModelEmaV3). The batch has no padding, so plain BatchNorm1d equals the library's masked
BatchNorm.

At start-up the JAX initial parameters are copied into PyTorch and one step *without
dropout* is compared on both sides (every loss term, both gradient norms, the parameters
after the Adam updates); the script stops if they disagree beyond float32 tolerance.
Timed steps (with dropout) are interleaved, one JAX step then one PyTorch step, so load
from other processes hits both alike; steps/s is 1 / the median step time. The last line
printed is one JSON object.
"""

import json
import os
import platform
import time

from absl import app
from absl import flags

from experiments.bench.machine import median, restrict_cores

FLAGS = flags.FLAGS
flags.DEFINE_enum("config", "paper", ["paper", "small"],
                  "paper: GeneFace's sizes; small: the documented CPU config.")
flags.DEFINE_integer("batch_size", 32, "Windows per step.")
flags.DEFINE_integer("frames", 64, "Frames per window.")
flags.DEFINE_integer("feature_dim", 80, "Audio feature channels.")
flags.DEFINE_integer("steps", 20, "Timed steps per contender.")
flags.DEFINE_integer("warmup", 3, "Untimed steps per contender before timing.")
flags.DEFINE_integer("threads", 0, "CPU cores for both sides (0: all this process may use).")
flags.DEFINE_enum("torch_compile", "off", ["auto", "on", "off"],
                  "Also time a torch.compile'd objective (auto: skip it if it fails).")
flags.DEFINE_bool("smoke", False, "Tiny run for the test suite: small config, batch 4 x 16, "
                  "2 steps, no warm-up.")
flags.DEFINE_integer("seed", 0, "Seed of the parameters and the random batch.")

CHECK_RTOL = 1e-4


def random_batch(rng, batch, frames, feature_dim, motion_dim=204):
    """Stage-1-like motion, the person's 'real' motion (shifted, wider), audio features."""
    import numpy as np
    motion = rng.standard_normal((batch, frames, motion_dim)).astype(np.float32)
    real = (1.5 * rng.standard_normal((batch, frames, motion_dim)) + 0.3).astype(np.float32)
    return {"motion": motion, "real": real,
            "mel": rng.standard_normal((batch, 2 * frames, feature_dim)).astype(np.float32),
            "mask": np.ones((batch, frames, 1), np.float32),
            "real_mask": np.ones((batch, frames, 1), np.float32)}


# --------------------------------------------------------------------------- PyTorch side

def torch_modules():
    import torch
    from torch import nn
    import torch.nn.functional as F

    class ConvBN(nn.Module):
        """GeneFace's post-net block: Conv1d -> BatchNorm1d (-> + x) -> LeakyReLU."""

        def __init__(self, cin, cout, residual, slope=0.2):
            super().__init__()
            self.conv = nn.Conv1d(cin, cout, 3, 1, 1)
            self.bn = nn.BatchNorm1d(cout, momentum=0.1, eps=1e-5)
            self.act = nn.LeakyReLU(slope)
            self.residual = residual

        def forward(self, x):
            y = self.bn(self.conv(x))
            return self.act(y + x if self.residual else y)

    class PostNet(nn.Module):
        def __init__(self, c):
            super().__init__()
            blocks = []
            for width, cin in ((c.hidden, c.motion_dim), (c.wide, c.hidden)):
                blocks.append(ConvBN(cin, width, False, c.slope))
                blocks += [ConvBN(width, width, True, c.slope) for _ in range(c.residual_layers)]
            blocks.append(ConvBN(c.wide, c.hidden, False, c.slope))
            self.body = nn.Sequential(*blocks)
            self.out = nn.Conv1d(c.hidden, c.motion_dim, 1)

        def forward(self, x):                     # x: [B, T, D]
            return x + self.out(self.body(x.transpose(1, 2))).transpose(1, 2)

    class Discriminator(nn.Module):
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

    class SyncBlock(nn.Module):
        def __init__(self, cin, f, k, s, p, res):
            super().__init__()
            self.conv = nn.Conv1d(cin, f, k, s, p)
            self.bn = nn.BatchNorm1d(f, eps=1e-5)
            self.res = res

        def forward(self, x):
            y = self.bn(self.conv(x))
            return F.relu(y + x if self.res else y)

    class SyncEncoder(nn.Module):
        def __init__(self, cin, plan):
            super().__init__()
            blocks = []
            for f, k, s, p, res in plan:
                blocks.append(SyncBlock(cin, f, k, s, p, res))
                cin = f
            self.blocks = nn.Sequential(*blocks)

        def forward(self, x):                     # [N, C, L] -> [N, E]
            return F.normalize(self.blocks(x)[..., 0], dim=-1, eps=1e-12)

    return torch, nn, F, PostNet, Discriminator, SyncEncoder


class TorchRunner:
    """GeneFace's post-net task step in PyTorch, initialised from the JAX variables."""

    def __init__(self, config, sync_config, losses, optim, variables, sync_vars, disc_scale,
                 batch, *, dropout, compile_model=False):
        import numpy as np
        torch, nn, F, PostNet, Discriminator, SyncEncoder = torch_modules()
        from geneface_jax.motion import syncnet as sync_lib
        self.torch, self.F, self.losses, self.sync_config = torch, F, losses, sync_config
        self.gen = PostNet(config)
        self.disc = Discriminator(config, dropout)
        sc = sync_config
        self.audio_enc = SyncEncoder(sc.feature_dim, sync_lib._encoder_plan(
            sc.base, sc.base, sc.layers_per_block, (2, 2)))
        self.mouth_enc = SyncEncoder(sc.mouth_dim, sync_lib._encoder_plan(
            sc.mouth_in, sc.base, sc.layers_per_block, (2, 1)))
        load_postnet(self.gen, self.disc, variables)
        load_syncnet(self.audio_enc, self.mouth_enc, sync_vars)
        for m in (self.audio_enc, self.mouth_enc):
            m.eval()
            m.requires_grad_(False)
        self.gen.train()
        self.disc.train()
        self.mouth_idx = torch.from_numpy(np.asarray(sync_lib.MOUTH))
        self.scale = torch.from_numpy(np.asarray(disc_scale, np.float32))
        self.batch = {k: torch.from_numpy(v) for k, v in batch.items()}
        self.opt_g = torch.optim.Adam(self.gen.parameters(), lr=optim.lr, betas=(optim.b1, optim.b2))
        self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=optim.disc_lr,
                                      betas=(optim.b1, optim.b2))
        self.sched_d = torch.optim.lr_scheduler.StepLR(self.opt_d, optim.disc_decay_steps,
                                                       optim.disc_decay)
        self.clip = optim.clip_norm
        # EMA of the generator (parameters and BatchNorm statistics), timm-style.
        self.ema_decay = optim.ema_decay
        self.ema_src = [t for t in list(self.gen.parameters()) + list(self.gen.buffers())
                        if t.is_floating_point()]
        self.ema = [t.detach().clone() for t in self.ema_src]
        self.gen_fn, self.disc_fn = self.gen, self.disc
        if compile_model:
            self.gen_fn, self.disc_fn = torch.compile(self.gen), torch.compile(self.disc)
        self.num_params = sum(p.numel() for p in self.gen.parameters()) + \
            sum(p.numel() for p in self.disc.parameters())

    def sync_loss(self, refined, mel):
        b, t, _ = refined.shape
        w, hop = self.sync_config.window, self.losses.sync_hop
        mouth = refined.view(b, t, 68, 3)[:, :, self.mouth_idx].reshape(b, t, -1)
        mouth = mouth.unfold(1, w, hop)                       # [B, K, 60, W]
        audio = mel.unfold(1, 2 * w, 2 * hop)                 # [B, K, C, 2W]
        mouth = mouth.reshape(-1, mouth.shape[2], w)
        audio = audio.reshape(-1, audio.shape[2], 2 * w)
        cos = (self.audio_enc(audio) * self.mouth_enc(mouth)).sum(-1)
        return -self.torch.log(cos.clamp(1e-7, 1 - 1e-7)).mean()

    def step(self):
        torch, lw = self.torch, self.losses
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


def _t(a):
    import numpy as np
    import torch
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a, np.float32)))


def _conv(conv, p):
    conv.weight.data.copy_(_t(p["kernel"]).permute(2, 1, 0))
    conv.bias.data.copy_(_t(p["bias"]))


def _bn(bn, p, s):
    bn.weight.data.copy_(_t(p["scale"]))
    bn.bias.data.copy_(_t(p["bias"]))
    bn.running_mean.copy_(_t(s["mean"]))
    bn.running_var.copy_(_t(s["var"]))


def load_postnet(gen, disc, variables):
    """Flax post-net variables -> the PyTorch modules (weights transposed)."""
    gp, gs = variables["generator"]["params"], variables["generator"]["batch_stats"]
    names = sorted((k for k in gp if k != "block3_1"),
                   key=lambda k: (k.split("_")[0], int(k.split("_")[1])))
    for block, name in zip(gen.body, names):
        _conv(block.conv, gp[name]["conv"])
        _bn(block.bn, gp[name]["bn"], gs[name]["bn"])
    _conv(gen.out, gp["block3_1"])
    dp = variables["discriminator"]["params"]
    for i, layer in enumerate(disc.backbone):
        if hasattr(layer, "weight"):
            layer.weight.data.copy_(_t(dp[f"backbone_{i}"]["kernel"]).T)
            if layer.bias is not None:
                layer.bias.data.copy_(_t(dp[f"backbone_{i}"]["bias"]))


def load_syncnet(audio_enc, mouth_enc, sync_vars):
    p, s = sync_vars["params"], sync_vars["batch_stats"]
    for enc, name in ((audio_enc, "audio_encoder"), (mouth_enc, "mouth_encoder")):
        for i, block in enumerate(enc.blocks):
            _conv(block.conv, p[name][f"block_{i}"]["conv"])
            _bn(block.bn, p[name][f"block_{i}"]["bn"], s[name][f"block_{i}"]["bn"])


def torch_postnet_params(runner, grads=False):
    """The PyTorch generator and discriminator parameters (or their gradients), in the JAX
    layout and order."""
    out = {"generator": {}, "discriminator": {}}
    gen, disc = runner.gen, runner.disc
    get = (lambda p: p.grad.detach()) if grads else (lambda p: p.detach())  # noqa: E731
    for i, block in enumerate(gen.body):
        out["generator"][i] = (get(block.conv.weight).permute(2, 1, 0).numpy(),
                               get(block.conv.bias).numpy(),
                               get(block.bn.weight).numpy(), get(block.bn.bias).numpy())
    out["generator"]["out"] = (get(gen.out.weight).permute(2, 1, 0).numpy(),
                               get(gen.out.bias).numpy())
    for i, layer in enumerate(disc.backbone):
        if hasattr(layer, "weight"):
            out["discriminator"][i] = (get(layer.weight).T.numpy(),) + (
                (get(layer.bias).numpy(),) if layer.bias is not None else ())
    return out


def jax_postnet_params(variables):
    gp, dp = variables["generator"]["params"], variables["discriminator"]["params"]
    names = sorted((k for k in gp if k != "block3_1"),
                   key=lambda k: (k.split("_")[0], int(k.split("_")[1])))
    out = {"generator": {i: (gp[n]["conv"]["kernel"], gp[n]["conv"]["bias"], gp[n]["bn"]["scale"],
                             gp[n]["bn"]["bias"]) for i, n in enumerate(names)},
           "discriminator": {}}
    out["generator"]["out"] = (gp["block3_1"]["kernel"], gp["block3_1"]["bias"])
    for k, v in dp.items():
        i = int(k.split("_")[1])
        out["discriminator"][i] = (v["kernel"],) + ((v["bias"],) if "bias" in v else ())
    return out


# --------------------------------------------------------------------------- JAX side

def build_jax(config, sync_config, losses, optim, frames, seed, disc_scale):
    from geneface_jax.motion import syncnet as sync_lib
    from geneface_jax.train import postnet as tp
    syncnet, sync_vars = sync_lib.init_syncnet(sync_config, seed + 1)
    gen, disc, state = tp.create_postnet_state(config, optim, seed, sync_vars, disc_scale)
    steps = tp.make_postnet_steps(gen, disc, losses, syncnet, num_frames=frames)
    return state, steps, sync_vars


def main(argv):
    del argv
    cfg_name, batch_size, frames = FLAGS.config, FLAGS.batch_size, FLAGS.frames
    steps, warmup, compile_mode = FLAGS.steps, FLAGS.warmup, FLAGS.torch_compile
    if FLAGS.smoke:
        cfg_name, batch_size, frames, steps, warmup, compile_mode = "small", 4, 16, 2, 0, "off"
    if frames < 8 or batch_size < 1 or steps < 1:
        raise app.UsageError("--frames >= 8, --batch_size >= 1 and --steps >= 1 are needed")
    threads = restrict_cores(FLAGS.threads)
    t_start = time.perf_counter()

    import dataclasses
    import jax
    import numpy as np
    import torch
    from geneface_jax.motion import postnet as pn
    from geneface_jax.motion import syncnet as sync_lib
    from geneface_jax.train import parallel
    from geneface_jax.train import postnet as tp

    torch.set_num_threads(threads)
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    config = pn.PostNetConfig.named(cfg_name)
    sync_config = sync_lib.SyncNetConfig.named(cfg_name, feature_dim=FLAGS.feature_dim)
    losses, optim = tp.PostNetLossConfig(), tp.PostNetOptimConfig()
    rng = np.random.default_rng(FLAGS.seed)
    batch = random_batch(rng, batch_size, frames, FLAGS.feature_dim)
    disc_scale = (0.5 + rng.random(204)).astype(np.float32)
    mesh = parallel.make_mesh(jax.devices()[:1])
    jbatch = parallel.shard_batch(batch, mesh)

    # ---- first-step check without dropout
    nodrop = dataclasses.replace(config, disc_dropout=0.0)
    state0, steps0, sync_vars = build_jax(nodrop, sync_config, losses, optim, frames,
                                          FLAGS.seed, disc_scale)
    sync_vars = jax.device_get(sync_vars)
    init = jax.device_get({"generator": state0.generator_variables(),
                           "discriminator": {"params": state0.params["discriminator"]}})
    check_step = parallel.data_parallel(steps0.train_step, mesh, donate_state=False)
    s1, jm = check_step(parallel.replicate(state0, mesh), jbatch, jax.random.PRNGKey(0))
    jm = {k: float(v) for k, v in jax.device_get(jm).items()}
    after = jax.device_get({"generator": {"params": s1.params["generator"]},
                            "discriminator": {"params": s1.params["discriminator"]}})
    ref = TorchRunner(nodrop, sync_config, losses, optim, init, sync_vars, disc_scale, batch,
                      dropout=0.0)
    tm = {k: float(v) for k, v in ref.step().items()}
    report, bad = {}, []
    for k, v in tm.items():
        err = abs(v - jm[k]) / max(abs(v), 1e-6)
        report[k] = float(f"{err:.2e}")
        if err > CHECK_RTOL:
            bad.append(f"{k}: jax {jm[k]:.7g} vs torch {v:.7g}")
    # Adam's first update is ~lr * sign(g): compared where |g| >= 1e-6 (below, float noise
    # in g decides the sign), with two float32 ulps of slack.
    upd = 0.0
    tp_after, t_grads = torch_postnet_params(ref), torch_postnet_params(ref, grads=True)
    jp_after = jax_postnet_params(after)
    jp_before = jax_postnet_params(init)
    for net in ("generator", "discriminator"):
        for key in tp_after[net]:
            for a, b, p, g in zip(jp_after[net][key], tp_after[net][key], jp_before[net][key],
                                  t_grads[net][key]):
                a, b, p = np.asarray(a), np.asarray(b), np.asarray(p)
                slack = 2 * np.spacing(np.abs(p).astype(np.float32))
                diff = np.where(np.abs(g) >= 1e-6, np.maximum(np.abs(a - b) - slack, 0.0), 0.0)
                upd = max(upd, float(np.max(diff)))
    report["update_diff_over_lr"] = float(f"{upd / optim.lr:.2e}")
    if upd / optim.lr > 1e-2:
        bad.append(f"parameters after the first updates differ by {upd / optim.lr:.3g} x lr")
    if bad:
        raise RuntimeError("JAX and PyTorch steps disagree: " + "; ".join(bad))
    log(f"first step agrees (relative errors): {report}")

    # ---- the timed contenders (dropout on)
    state, steps_j, _ = build_jax(config, sync_config, losses, optim, frames, FLAGS.seed,
                                  disc_scale)
    n_params = pn.num_params(state.params)
    state = parallel.replicate(state, mesh)
    t = time.perf_counter()
    jax_step = parallel.data_parallel(steps_j.train_step, mesh).lower(
        state, jbatch, jax.random.PRNGKey(0)).compile()
    compile_s = time.perf_counter() - t
    box = {"state": state, "i": 0}

    def run_jax():
        box["state"], m = jax_step(box["state"], jbatch, jax.random.PRNGKey(box["i"]))
        box["i"] += 1
        jax.block_until_ready((box["state"], m))

    init_full = jax.device_get({"generator": state.generator_variables(),
                                "discriminator": {"params": state.params["discriminator"]}})
    runners = {"torch_eager": TorchRunner(config, sync_config, losses, optim, init_full,
                                          sync_vars, disc_scale, batch,
                                          dropout=config.disc_dropout)}
    if runners["torch_eager"].num_params != n_params:
        raise RuntimeError(f"parameter counts differ: jax {n_params}, torch "
                           f"{runners['torch_eager'].num_params}")
    compile_note = "not tried (--torch_compile=off)"
    if compile_mode != "off":
        try:
            comp = TorchRunner(config, sync_config, losses, optim, init_full, sync_vars,
                               disc_scale, batch, dropout=config.disc_dropout,
                               compile_model=True)
            t = time.perf_counter()
            comp.step()
            compile_note = f"compiled in {time.perf_counter() - t:.0f} s"
            runners["torch_compile"] = comp
        except Exception as e:  # noqa: BLE001 - report any failure of the compiler
            if compile_mode == "on":
                raise
            compile_note = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    log(f"jax: {n_params} params, step compiled in {compile_s:.1f} s; torch.compile: "
        f"{compile_note}")
    contenders = [("jax", run_jax)] + [(n, r.step) for n, r in runners.items()]
    times = {n: [] for n, _ in contenders}
    for i in range(warmup + steps):
        k = i % len(contenders)
        for name, fn in contenders[k:] + contenders[:k]:
            t = time.perf_counter()
            fn()
            if i >= warmup:
                times[name].append(time.perf_counter() - t)
    med = {n: median(ts) for n, ts in times.items()}
    for n, ts in times.items():
        log(f"{n}: median step {med[n] * 1e3:.1f} ms (min {min(ts) * 1e3:.1f}, "
            f"max {max(ts) * 1e3:.1f})")
    best = min(runners, key=lambda n: med[n])
    result = {
        "jax_steps_per_s": round(1.0 / med["jax"], 3),
        "torch_steps_per_s": round(1.0 / med[best], 3),
        "speedup": round(med[best] / med["jax"], 3),
        "torch_reference": best,
        "torch_eager_steps_per_s": round(1.0 / med["torch_eager"], 3),
        "torch_compile_steps_per_s": (round(1.0 / med["torch_compile"], 3)
                                      if "torch_compile" in med else None),
        "torch_compile": compile_note,
        "config": cfg_name, "batch": batch_size, "frames": frames,
        "feature_dim": FLAGS.feature_dim, "syncnet": cfg_name, "params": n_params,
        "steps": steps, "warmup": warmup, "threads": threads,
        "devices": f"1 x {jax.devices()[0].device_kind} ({platform.processor() or 'cpu'}, "
                   f"{os.cpu_count()} cores on the machine)",
        "compile_seconds": round(compile_s, 1), "first_step_rel_err": report,
        "jax_version": jax.__version__, "torch_version": torch.__version__,
        "wall_seconds": round(time.perf_counter() - t_start, 1),
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    app.run(main)
