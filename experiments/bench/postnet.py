r"""Post-net GAN training step (generator + discriminator), JAX vs PyTorch, steps/s.

  python -m experiments.bench.postnet                       # paper config, 32 x 64 frames
  python -m experiments.bench.postnet --config=cpu
  python -m experiments.bench.postnet --torch_compile=auto  # also try torch.compile
  python -m experiments.bench.postnet --smoke               # seconds; for the tests

Sizes, loss weights and optimisers are a preset of `experiments/configs/postnet.py` (the
SyncNet: the same preset of `experiments/configs/syncnet.py`); the batch is the preset's
`batch_size` crops of `window` frames unless --batch_size / --frames say otherwise.
Both sides run the same step on the same batch: the generator (GeneFace's `CNNPostNet`)
refines stage-1 motion windows under 0.85 LSGAN + 0.1 SyncNet + 0.05 MSE-to-input loss, the
discriminator (`MLPDiscriminator`, dropout 0.25, on frames scaled by
`discriminator_scale`) is updated on the detached refinement, each with its own Adam
(beta1 0) and global-norm clipping at 1, the generator's BatchNorm in training mode and
an EMA of its variables (decay 0.999). JAX: the library's step
(`train.postnet.create_postnet_state` + `make_postnet_steps(...).train_step` under
`train.parallel.data_parallel` on a 1-device mesh). PyTorch:
`torch_reference.postnet.GANRunner` (GeneFace's task step as a PyTorch user writes it).

Start-up check (`harness.first_step_check`; the script stops if it fails): one step
*without dropout* on both sides from the same initial parameters gives the same loss
terms, gradient norms and parameters after the Adam updates. Timed steps (with dropout)
are interleaved (`harness.timed_calls`); steps/s is 1 / the median step time. The last line
printed is one JSON object.
"""

import json

from absl import app
from absl import flags

from experiments.bench import harness
from experiments.configs import PRESETS
from experiments.bench.harness import log

FLAGS = flags.FLAGS
harness.define_flags("paper", 20, 3, "Seed of the parameters and the random batch.",
                     malloc=False, presets=PRESETS)
flags.DEFINE_integer("batch_size", None, "Windows per step (default: the preset's).")
flags.DEFINE_integer("frames", None, "Frames per window (default: the preset's window).")
flags.DEFINE_integer("feature_dim", 80, "Audio feature channels.")
flags.DEFINE_enum("torch_compile", "off", ["auto", "on", "off"],
                  "Also time a torch.compile'd objective (auto: skip it if it fails).")
flags.DEFINE_bool("smoke", False, "Tiny run for the test suite: tiny preset, batch 4 x 16, "
                  "2 steps, no warm-up.")

STEP_METRICS = ("g_adv", "g_mse", "g_sync", "g_loss", "d_loss", "d_fake_loss", "d_real_loss",
                "g_grad_norm", "d_grad_norm")


def random_batch(rng, batch, frames, feature_dim, motion_dim=204):
    """Stage-1-like motion, the person's 'real' motion (shifted, wider), audio features."""
    import numpy as np
    motion = rng.standard_normal((batch, frames, motion_dim)).astype(np.float32)
    real = (1.5 * rng.standard_normal((batch, frames, motion_dim)) + 0.3).astype(np.float32)
    return {"motion": motion, "real": real,
            "mel": rng.standard_normal((batch, 2 * frames, feature_dim)).astype(np.float32),
            "mask": np.ones((batch, frames, 1), np.float32),
            "real_mask": np.ones((batch, frames, 1), np.float32)}


def build_jax(config, sync_config, losses, optim, frames, seed, disc_scale):
    """(the library's GAN state, its steps, the frozen SyncNet's variables)."""
    from geneface_jax.motion import syncnet as sync_lib
    from geneface_jax.train import postnet as tp
    syncnet, sync_vars = sync_lib.init_syncnet(sync_config, seed + 1)
    gen, disc, state = tp.create_postnet_state(config, optim, seed, sync_vars, disc_scale)
    steps = tp.make_postnet_steps(gen, disc, losses, syncnet, num_frames=frames)
    return state, steps, sync_vars


def torch_variables(state, ema=True):
    """The generator's (EMA or training) and the discriminator's variables of a GAN state,
    as `GANRunner` and `flax_params_in_torch_order` take them."""
    import jax
    return jax.device_get({"generator.": state.generator_variables(ema),
                           "discriminator.": {"params": state.params["discriminator"]}})


def main(argv):
    del argv
    from experiments.configs import postnet as postnet_presets
    from experiments.configs import syncnet as syncnet_presets
    cfg_name, batch_size, frames = FLAGS.config, FLAGS.batch_size, FLAGS.frames
    steps, warmup, compile_mode = FLAGS.steps, FLAGS.warmup, FLAGS.torch_compile
    if FLAGS.smoke:
        cfg_name, batch_size, frames, steps, warmup, compile_mode = "tiny", 4, 16, 2, 0, "off"
    preset = postnet_presets.get_config(cfg_name)
    batch_size = preset.batch_size if batch_size is None else batch_size
    frames = preset.window if frames is None else frames
    if frames < 8 or batch_size < 1 or steps < 1:
        raise app.UsageError("--frames >= 8, --batch_size >= 1 and --steps >= 1 are needed")
    run = harness.Run(FLAGS.threads, tune_malloc=False)

    import dataclasses
    import time
    import jax
    import numpy as np
    import torch
    from geneface_jax.motion import postnet as pn
    from geneface_jax.motion import syncnet as sync_lib
    from geneface_jax.train import parallel
    from geneface_jax.train import postnet as tp
    from experiments.bench.torch_reference.postnet import GANRunner

    torch.set_num_threads(run.threads)
    config = pn.PostNetConfig(**preset.model)
    sync_config = sync_lib.SyncNetConfig(feature_dim=FLAGS.feature_dim,
                                         **syncnet_presets.get_config(cfg_name).model)
    losses = tp.PostNetLossConfig(**preset.loss)
    optim = tp.PostNetOptimConfig(**preset.optim)
    rng = np.random.default_rng(FLAGS.seed)
    batch = random_batch(rng, batch_size, frames, FLAGS.feature_dim)
    disc_scale = (0.5 + rng.random(204)).astype(np.float32)
    mesh = parallel.make_mesh(jax.devices()[:1])
    jbatch = parallel.shard_batch(batch, mesh)

    def runner(cfg, init, compile_model=False):
        return GANRunner(cfg, sync_config, losses, optim, init, sync_vars, disc_scale, batch,
                         dropout=cfg.disc_dropout, compile_model=compile_model)

    # ---- first-step check without dropout
    nodrop = dataclasses.replace(config, disc_dropout=0.0)
    state0, steps0, sync_vars = build_jax(nodrop, sync_config, losses, optim, frames,
                                          FLAGS.seed, disc_scale)
    sync_vars = jax.device_get(sync_vars)
    ref = runner(nodrop, torch_variables(state0))
    check_step = parallel.data_parallel(steps0.train_step, mesh, donate_state=False)

    def first_jax_step():
        s1, metrics = check_step(parallel.replicate(state0, mesh), jbatch,
                                 jax.random.PRNGKey(0))
        return metrics, torch_variables(s1, ema=False)

    report, _ = harness.first_step_check(STEP_METRICS, first_jax_step, ref.step, ref.module,
                                         pn.num_params(state0.params), optim.lr)

    # ---- the timed contenders (dropout on)
    state, steps_j, _ = build_jax(config, sync_config, losses, optim, frames, FLAGS.seed,
                                  disc_scale)
    n_params = pn.num_params(state.params)
    init_full = torch_variables(state)
    state = parallel.replicate(state, mesh)
    keys = [jax.random.PRNGKey(i) for i in range(warmup + steps)]
    t = time.perf_counter()
    jax_step = parallel.data_parallel(steps_j.train_step, mesh).lower(
        state, jbatch, keys[0]).compile()
    compile_s = time.perf_counter() - t
    runners = {"torch_eager": runner(config, init_full)}

    def compiled():
        comp = runner(config, init_full, compile_model=True)
        comp.step()
        return comp

    comp, _, compile_note = harness.try_torch_compile(compile_mode, compiled,
                                                      "not tried (--torch_compile=off)")
    if comp:
        runners["torch_compile"] = comp
    log(f"jax: {n_params} params, step compiled in {compile_s:.1f} s; torch.compile: "
        f"{compile_note}")
    contenders = [("jax", harness.jax_stepper(jax_step, state, [jbatch], keys))] + [
        (n, lambda timed, r=r: r.step()) for n, r in runners.items()]
    times, _ = harness.timed_calls(contenders, warmup, steps)
    med = harness.log_medians("train", times)
    best = min(runners, key=lambda n: med[n])
    info = run.info()
    result = {
        **harness.speed_keys(med, best, digits=3),
        "torch_compile": compile_note,
        "config": cfg_name, "batch": batch_size, "frames": frames,
        "feature_dim": FLAGS.feature_dim, "syncnet": cfg_name, "params": n_params,
        "steps": steps, "warmup": warmup,
        "compile_seconds": round(compile_s, 1), "first_step_rel_err": report, **info}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    app.run(main)
