r"""Stage-1 VAE training step, JAX vs PyTorch, steps/s on this machine's CPU.

  python -m experiments.bench.audio2motion                       # paper config, 32 x 200
  python -m experiments.bench.audio2motion --config=cpu
  python -m experiments.bench.audio2motion --sync                # + SyncNet sync loss
  python -m experiments.bench.audio2motion --smoke               # ~20 s; for the tests

Both sides build the same network (GeneFace's FVAE with its flow prior and the audio
condition net) and run the same training step: masked L2 + L1 + 3 * continuity + 0.5 *
KL (+ 0.01 * sync with `--sync`), Adam with warm-up and exponential decay, clipping at
global norm 1, BatchNorm statistics over valid frames. JAX: the library's step
(`train.audio2motion.create_vae_state` + `make_vae_steps` under
`train.parallel.data_parallel` on a 1-device mesh; XLA uses every allowed core). PyTorch:
`torch_reference.vae.VAERunner` (GeneFace's network as a PyTorch user writes it);
`--torch_compile` also times `torch.compile`, and the faster of eager and compiled is the
reference of `speedup`.

Start-up check (`harness.first_step_check`; the script stops if it fails): the JAX initial
parameters in PyTorch, the same batch and encoder noise (the eps the library's step draws
from its rng, passed explicitly) give the same loss terms, gradient norm and parameters
after the first Adam step. Timed steps are interleaved (`harness.timed_calls`); steps/s
is 1 / the median step time. `profile` splits each side's step into forward, backward and
optimizer, lists the JAX step's ops by kind (`xla_trace`) and PyTorch's top operators, and
times one WaveNet conv direct vs Winograd (`jax_one_conv`: the library computes the
WaveNets' 5-tap convs with Winograd F(4, 5) on the CPU, 0.4x the multiply-adds); `limits`
says in words what bounds the step. The runs quoted in the README and what limited them:
docs/benchmarks.md ("Stage 1"). The last line printed is one JSON object.

Sizes: the model and SyncNet of a preset of `experiments/configs/audio2motion.py` and
`syncnet.py` (`--config=paper|cpu|tiny`; `--smoke`: tiny); losses and optimiser are the
library's defaults (the paper preset's).
"""

import json

from absl import app
from absl import flags

from experiments.bench import harness
from experiments.bench.harness import log

FLAGS = flags.FLAGS
harness.define_flags("paper", 5, 1, "Seed of the initial parameters and the random batch.",
                     presets=("paper", "cpu", "tiny"))
flags.DEFINE_integer("batch_size", 32, "Sequences per step.")
flags.DEFINE_integer("frames", 200, "Video frames per sequence (a multiple of 4).")
flags.DEFINE_integer("feature_dim", 80, "Audio feature channels (80 log-mel, 1024 HuBERT).")
flags.DEFINE_enum("conv_algorithm", "auto", ["auto", "winograd", "direct"],
                  "JAX side: how the encoder/decoder WaveNets' K-tap convs are computed "
                  "(Audio2MotionConfig.conv_algorithm; auto = Winograd F(4, K) on CPU).")
flags.DEFINE_bool("sync", False, "Include the SyncNet sync loss term (frozen SyncNet) in "
                  "both steps.")
flags.DEFINE_enum("torch_compile", "auto", ["auto", "on", "off"],
                  "auto/on: also time torch.compile'd model (auto: fall back to eager if it "
                  "fails); off: eager only.")
flags.DEFINE_bool("profile", True, "Time forward / backward / optimizer separately on both "
                  "sides and list PyTorch's top operators.")
flags.DEFINE_bool("smoke", False, "Tiny run for the test suite: tiny preset, batch 2 x 16, "
                  "2 steps, no warm-up, no torch.compile, no profile, 1 core unless "
                  "--threads is given.")

STEP_METRICS = ("l2", "l1", "continuity", "kl", "sync", "loss", "grad_norm")


def random_batch(rng, batch, frames, feature_dim, motion_dim):
    """Channel-last host batch: random features, random normalised motion, and a mask in
    which a quarter of the sequences (at least one) are shorter than `frames`."""
    import numpy as np
    mask = np.ones((batch, frames, 1), np.float32)
    short = max(1, batch // 4)
    for i in range(short):
        mask[i, max(4, int(frames * (0.5 + 0.4 * i / short))):] = 0.0
    mel = rng.standard_normal((batch, 2 * frames, feature_dim)).astype(np.float32)
    motion = rng.standard_normal((batch, frames, motion_dim)).astype(np.float32) * mask
    return {"mel": mel, "motion": motion, "mask": mask}


def jax_forward_fn(model, losses, syncnet, starts, mesh):
    """Jitted `fwd(state, batch, rng) -> (loss, eps)` and `grad(state, batch, rng) ->
    grads`: what the library's VAE step differentiates (its model, losses, noise and
    BatchNorm mode), for the start-up check (`eps`: the encoder noise of the step with this
    rng) and the forward/backward profile. The noise mirrors `make_vae_steps` (split, then
    `parallel.global_normal` of the first key); if the library changes how it draws it,
    the start-up check fails and this function must follow."""
    import jax
    from jax.sharding import PartitionSpec as P
    from geneface_jax.motion import syncnet as sync_lib
    from geneface_jax.train import audio2motion as a2m
    from geneface_jax.train import parallel

    def loss_fn(params, state, batch, rng):
        k_sample, k_drop = jax.random.split(rng)
        mask, c = batch["mask"], model.config
        eps = parallel.global_normal(k_sample, (mask.shape[0], mask.shape[1] // c.stride,
                                                c.latent))
        out, _ = model.apply({"params": params, "batch_stats": state.batch_stats},
                             batch["mel"], batch["motion"], mask, train=True, eps=eps,
                             rngs={"dropout": parallel.device_rng(k_drop)},
                             mutable=["batch_stats"])
        l2, l1, cont = a2m.reconstruction_losses(out["recon"], batch["motion"], mask)
        kl = parallel.global_mean(out["kl_terms"], out["latent_mask"])
        total = losses.l2 * l2 + losses.l1 * l1 + losses.continuity * cont + losses.kl * kl
        if syncnet is not None:
            terms, valid = sync_lib.sync_loss_terms(syncnet, state.frozen["syncnet"],
                                                    out["recon"], batch["mel"], mask, starts)
            total = total + losses.sync * parallel.global_mean(terms, valid)
        return total, eps

    def grad(state, batch, rng):
        return jax.grad(lambda p: loss_fn(p, state, batch, rng)[0])(state.params)

    specs = dict(mesh=mesh, in_specs=(P(), P(parallel.DATA_AXIS), P()))
    fwd_j = jax.jit(jax.shard_map(lambda s, b, r: loss_fn(s.params, s, b, r),
                                  out_specs=(P(), P(parallel.DATA_AXIS)), **specs))
    return fwd_j, jax.jit(jax.shard_map(grad, out_specs=P(), **specs))


def conv_algorithms_ms(batch, frames, hidden, kernel, repeats=5):
    """One WaveNet in_layer conv (`hidden` -> 2 `hidden`, `kernel` taps, 'same') on
    `[batch, frames, hidden]`, direct (`lax.conv_general_dilated`) vs Winograd
    (`geneface_jax.motion.winograd`): median ms of the forward and of the input + weight
    gradients (the loss is linear in the output, so the forward is not recomputed), and
    the largest difference of the two outputs relative to the output's scale."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from geneface_jax.motion.winograd import winograd_conv1d
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, frames, hidden)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((kernel, hidden, 2 * hidden)) / np.sqrt(kernel * hidden),
                    jnp.float32)
    r = jnp.asarray(rng.standard_normal((batch, frames, 2 * hidden)), jnp.float32)
    pad = (kernel - 1) // 2
    convs = {"direct": lambda x, w: jax.lax.conv_general_dilated(
                 x, w, (1,), [(pad, pad)], dimension_numbers=("NWC", "WIO", "NWC")),
             "winograd": winograd_conv1d}
    y_direct = np.asarray(jax.jit(convs["direct"])(x, w))
    y_wino = np.asarray(jax.jit(winograd_conv1d)(x, w))
    out = {"winograd_max_err_over_output_scale": float(
        f"{np.abs(y_wino - y_direct).max() / np.abs(y_direct).max():.2e}")}
    for name, conv in convs.items():
        fwd = jax.jit(conv)
        grad = jax.jit(jax.grad(lambda x, w, c=conv: jnp.sum(c(x, w) * r), argnums=(0, 1)))
        for label, fn in (("forward", fwd), ("gradients", grad)):
            call = lambda fn=fn: jax.block_until_ready(fn(x, w))  # noqa: E731
            call()
            out[f"{name}_{label}_ms"] = round(1e3 * harness.time_calls(call, repeats), 1)
    return out


def hlo_op_counts(hlo_text):
    """Instruction counts of an optimized HLO module: convolutions, dots, fusions, and the
    layout/aliasing copies (`copy`, `transpose`; `state_copies` = copies of a donated
    state buffer, which XLA inserts when an in-place update cannot alias its input)."""
    import collections
    import re
    counts = collections.Counter(re.findall(r"= \S+ (convolution|dot|fusion|copy|transpose)\(",
                                            hlo_text))
    counts["state_copies"] = len(re.findall(r" copy\(%state", hlo_text))
    return dict(counts)


def limits_note(profile, med, ref, load, threads, conv_algorithm):
    """1-3 sentences on what bounds the step, from this run's profile."""
    j, t = profile["jax"], profile[ref]
    conv = sum(share for name, _, share in profile["torch_eager"]["top_ops"] if "conv" in name)
    th = {k: j.get("thunks", {}).get(k, float("nan"))
          for k in ("ops_ms", "matmul_ms", "conv_ms", "other_ms")}
    note = (f"JAX step {med['jax']:.2f} s = forward {j['forward_s']:.2f} + backward "
            f"{j['backward_s']:.2f} + Adam/clip/non-finite guard {j['optimizer_s']:.2f} "
            f"({j['hlo_ops'].get('state_copies', 0)} copies of donated optimizer-state "
            f"buffers in the step's HLO); PyTorch ({ref}) {med[ref]:.2f} s = forward "
            f"{t['forward_s']:.2f} + backward {t['backward_s']:.2f} + clip/Adam "
            f"{t['optimizer_s']:.2f}. PyTorch is compute-bound in the WaveNet convolutions "
            f"(conv forward + backward ops are {conv:.0%} of its eager self time). JAX "
            f"(5-tap convs: {conv_algorithm}; 'auto' = Winograd F(4, 5) on CPU) spends its "
            f"ops' {th['ops_ms']:.0f} ms in GEMMs {th['matmul_ms']:.0f}, convolutions "
            f"{th['conv_ms']:.0f} (direct and 1x1 convs) and the rest {th['other_ms']:.0f}.")
    warning = harness.load_note(load, threads)
    return note + (f" {warning[0].upper()}{warning[1:]}." if warning else "")


def main(argv):
    del argv
    cfg_name, batch_size, frames = FLAGS.config, FLAGS.batch_size, FLAGS.frames
    steps, warmup, compile_mode, do_profile = (FLAGS.steps, FLAGS.warmup, FLAGS.torch_compile,
                                               FLAGS.profile)
    threads_wanted = FLAGS.threads
    if FLAGS.smoke:
        cfg_name, batch_size, frames, steps, warmup = "tiny", 2, 16, 2, 0
        compile_mode, do_profile = "off", False
        # 1 core unless asked: on a loaded machine a tiny 2-thread PyTorch step can stall
        # for seconds in OpenMP barriers; 1 thread halves the smoke run (~40 s).
        threads_wanted = FLAGS.threads or 1
    if frames % 4 or frames < 8:
        raise app.UsageError(f"--frames must be a multiple of 4 and >= 8, got {frames}")
    if steps < 1 or batch_size < 1:
        raise app.UsageError("--steps and --batch_size must be >= 1")
    run = harness.Run(threads_wanted, FLAGS.system_malloc)

    import time
    import jax
    import numpy as np
    import torch
    from geneface_jax.motion import syncnet as sync_lib
    from geneface_jax.motion import vae as vae_lib
    from geneface_jax.train import audio2motion as a2m
    from geneface_jax.train import loop, parallel
    from experiments.bench import xla_trace
    from experiments.bench.torch_reference.vae import VAERunner

    torch.set_num_threads(run.threads)
    torch.manual_seed(FLAGS.seed)
    from experiments.configs import audio2motion as a2m_configs, syncnet as sync_configs
    run_config = a2m_configs.get_config(cfg_name)
    run_config.model.conv_algorithm = FLAGS.conv_algorithm
    config, _ = a2m.model_config(run_config, FLAGS.feature_dim, motion_dim=204)
    losses, optim = a2m.VAELossConfig(), a2m.OptimConfig()
    sync_config = syncnet = sync_vars = starts = None
    if FLAGS.sync:
        sync_config = sync_lib.SyncNetConfig(
            feature_dim=FLAGS.feature_dim, **sync_configs.get_config(cfg_name).model)
        starts = sync_lib.window_starts(frames, sync_config.window, losses.sync_hop)
        syncnet, sync_vars = sync_lib.init_syncnet(sync_config, FLAGS.seed + 1)
    batch = random_batch(np.random.default_rng(FLAGS.seed), batch_size, frames,
                         FLAGS.feature_dim, config.motion_dim)
    lr0 = optim.lr * min(1.0, 1.0 / max(optim.warmup_steps, 1))

    # ---- JAX: the library's step on a 1-device mesh
    model, state = a2m.create_vae_state(config, optim, FLAGS.seed, syncnet_variables=sync_vars)
    train_step, _ = a2m.make_vae_steps(model, losses, syncnet=syncnet, num_frames=frames)
    mesh = parallel.make_mesh(jax.devices()[:1])
    state = parallel.replicate(state, mesh)
    jbatch = parallel.shard_batch(batch, mesh)
    keys = [loop.step_key(state, i) for i in range(1 + warmup + steps + 2)]  # + 2 profiled
    # host copies: the step donates the state (and with it the frozen SyncNet variables)
    init_vars = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    sync_vars = jax.device_get(sync_vars)
    jax_params = vae_lib.num_params(state.params)
    fwd_j, grad_j = jax_forward_fn(model, losses, syncnet, starts, mesh)
    _, eps0 = jax.device_get(fwd_j(state, jbatch, keys[0]))
    teps0 = torch.from_numpy(np.ascontiguousarray(eps0.transpose(0, 2, 1), np.float32))
    t = time.perf_counter()
    jax_step = parallel.data_parallel(train_step, mesh).lower(state, jbatch, keys[0]).compile()
    jax_compile_s = time.perf_counter() - t
    log(f"jax: {jax_params} params, step compiled in {jax_compile_s:.1f} s")
    hlo_counts = hlo_op_counts(jax_step.as_text()) if do_profile else None

    # ---- PyTorch eager, checked against the JAX step
    def runner(compile_model=False):
        return VAERunner(config, losses, optim, sync_config, starts, init_vars, sync_vars,
                         batch, compile_model)

    def first_jax_step():
        nonlocal state
        state, metrics = jax_step(state, jbatch, keys[0])
        return metrics, {"model.": {"params": state.params, "batch_stats": state.batch_stats}}

    eager = runner()
    check, jax_metrics = harness.first_step_check(
        STEP_METRICS, first_jax_step, lambda: eager.step(eps=teps0), eager.module,
        jax_params, lr0, "if every term differs, check jax_forward_fn's noise against "
                         "make_vae_steps")
    runners = {"torch_eager": eager}

    # ---- torch.compile (inductor) of the whole objective, forward and backward
    def compiled():
        comp = runner(compile_model=True)
        out = comp.step(eps=teps0)
        err = max(harness.rel_err(out[k].detach(), jax_metrics[k]) for k in ("loss", "grad_norm"))
        if err > harness.CHECK_RTOL:
            raise RuntimeError(f"compiled loss / gradient norm differ from JAX by {err:.2e}")
        return comp

    comp, torch_compile_s, compile_note = harness.try_torch_compile(
        compile_mode, compiled, "not tried (--torch_compile=off)")
    if comp:
        runners["torch_compile"] = comp

    # ---- interleaved timing
    run_jax = harness.jax_stepper(jax_step, state, [jbatch], keys, first=1)
    torch_timings = {name: {} for name in runners}
    contenders = [("jax", run_jax)] + [
        (n, lambda timed, n=n, r=r: r.step(timings=torch_timings[n] if timed else None))
        for n, r in runners.items()]
    times, _ = harness.timed_calls(contenders, warmup, steps)
    med = harness.log_medians("train", times)
    ref = min(runners, key=lambda n: med[n])

    # ---- profile: where the time goes
    profile = {}
    if do_profile:
        reps, st = 3, run_jax.box["state"]
        grad_c = grad_j.lower(st, jbatch, keys[0]).compile()
        jgrads = grad_c(st, jbatch, keys[0])
        apply_c = jax.jit(lambda s, g: s.apply_gradients(g, batch_stats=s.batch_stats),
                          donate_argnums=(0,)).lower(st, jgrads).compile()
        fwd_s = harness.time_calls(lambda: jax.block_until_ready(fwd_j(st, jbatch, keys[0])),
                                   reps)
        grad_s = harness.time_calls(lambda: jax.block_until_ready(grad_c(st, jbatch, keys[0])),
                                    reps)

        def run_apply():
            run_jax.box["state"] = apply_c(run_jax.box["state"], jgrads)
            jax.block_until_ready(run_jax.box["state"])
        opt_s = harness.time_calls(run_apply, reps)
        profile["jax"] = {"forward_s": round(fwd_s, 3), "backward_s": round(grad_s - fwd_s, 3),
                          "optimizer_s": round(opt_s, 3), "hlo_ops": hlo_counts,
                          # the whole step's ops by kind (experiments/bench/xla_trace.py)
                          "thunks": xla_trace.thunk_breakdown(run_jax)}
        for name, tm in torch_timings.items():
            profile[name] = {f"{k}_s": round(v / steps, 3) for k, v in tm.items()}
        profile["torch_eager"]["top_ops"] = xla_trace.torch_top_ops(eager.step)[0]
        profile["jax_one_conv"] = {"shape": f"[{batch_size}, {frames}, {config.hidden}] -> "
                                            f"{2 * config.hidden}, {config.kernel_size} taps",
                                   **conv_algorithms_ms(batch_size, frames, config.hidden,
                                                        config.kernel_size)}
        log("profile:", json.dumps(profile))

    result = {
        **harness.speed_keys(med, ref),
        "torch_compile": compile_note, "torch_adam": "fused",
        "config": cfg_name, "batch": batch_size, "frames": frames,
        "feature_dim": FLAGS.feature_dim, "sync": bool(FLAGS.sync),
        "jax_conv_algorithm": FLAGS.conv_algorithm, "steps": steps, "warmup": warmup,
        "params": jax_params, "compile_seconds": round(jax_compile_s, 1),
        "torch_compile_seconds": round(torch_compile_s, 1) if torch_compile_s else None,
        "first_step_rel_err": check, "profile": profile,
        "limits": (limits_note(profile, med, ref, run.load(), run.threads,
                               FLAGS.conv_algorithm) if profile
                   else "not profiled (--noprofile / --smoke)"),
        **run.info()}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    app.run(main)
