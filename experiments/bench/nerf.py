r"""Stage-3 head NeRF: training step and full-frame render, JAX vs PyTorch, rays/s on this CPU.

  python -m experiments.bench.nerf                       # cpu preset, 1024 rays per step
  python -m experiments.bench.nerf --config=paper        # GeneFace's sizes (64 + 128 samples)
  python -m experiments.bench.nerf --torch_compile       # also time torch.compile
  python -m experiments.bench.nerf --smoke               # tiny, < 1 min; for the tests
  python -m experiments.bench.nerf --model=grid          # the grid head (below), 128 x 128

`--model=grid` (`experiments/bench/nerf_grid.py`): the grid head (GeneFace's RAD-NeRF head,
`render.grid_fields`) of `--config`'s preset in experiments/configs/grid.py (cpu: 2048 rays
per step, 16 samples per ray) on a `--size` 128 person: the library's `make_grid_head_step`
(occupancy update every `occupancy_every` steps, MSE + entropy + ambient loss, Adam per
parameter group) and `FrameRenderer` against `torch_reference.grid.GridRunner` eager and
`torch.compile`d (on unless --notorch_compile), and against the library's MLP head of the
same preset name at the same rays and frame (JAX only: `mlp_rays_per_s`, `mlp_render_fps`).
The occupancy starts as a ball (radius 0.6 bound; the first update keeps it, dilated), so
rays cross empty and occupied cells. Checked before timing: the first step (losses,
occupancy bits, parameters after Adam), then with the parameters after it the colours of
the same rays and jitter and the whole frame. `--profile`: the JAX step's ops by kind
(`xla_trace`, classified from the HLO: matmuls, gathers, scatter-adds, the rest) and by
scope (grid encoding, MLPs, sampling, the rest), and PyTorch's top operators.

Sizes: the `model` of `--config`'s preset in experiments/configs/nerf.py (paper, cpu, tiny).
Training: one step of the landmark-conditioned head NeRF (GeneFace/AD-NeRF `Lm3dNeRF`) on
`--rays` rays of one frame: landmark encoder and attention smoother (on from step 0, so
both sides train it), rays, coarse samples and field, inverse-CDF fine samples, fine field,
coarse + fine MSE, backward, Adam with exponential decay. Render: one whole `--size`^2
frame, no gradient, deterministic samples, in chunks of `--chunk` rays.

JAX: the library's `train.nerf.make_head_step` (`train.parallel.data_parallel`, 1-device
mesh) and `render.frames.FrameRenderer`. PyTorch: `torch_reference.nerf.HeadRunner` on
JAX's cores; `--torch_compile` adds `torch.compile` of the loss and render chunk (the
faster of eager and compiled is each speedup's reference). `--eigen_dots` adds the
library's step compiled with XLA:CPU's dots in Eigen instead of YNNPACK (checked to take the
same step); `speedup` stays the default build's.

Start-up check (stops the script): with the JAX initial parameters in PyTorch, the same
rays and jitter (the uniforms the library's step draws, passed explicitly) give the same
colours (`equivalence_max_abs_err` <= 1e-4), the first step the same losses, gradient norm
and parameters (`harness.check_first_step`), the frame renders agree (`render_max_abs_err`).

Timing (`harness.timed_calls`, interleaved; `--timing=blocks`: each contender's calls in a
row): rays/s = rays per call / median call. `peak_fraction`: XLA's FLOP count of the step
per median step over the float32 matmul peak measured between the timed calls (one 2048^3
product per framework, `matmul_peak_during_training_gflops` [min, median, max]: this VM's
rate drifts by 30 %); `render_peak_fraction` likewise for the render's MLP FLOPs;
`*_vs_best` divide by the best rate of the run (`matmul_peak_gflops`: best of 5 512-2048
square products per framework before the timing). The last line printed is one JSON object.
"""

import ast
import dataclasses
import json
import types

from absl import app
from absl import flags

from experiments.bench import harness
from experiments.bench import peak as peak_lib
from experiments.bench.harness import log, median
from experiments.configs import PRESETS
from experiments.configs import grid as grid_presets
from experiments.configs import nerf as nerf_presets

FLAGS = flags.FLAGS
flags.DEFINE_enum("model", "mlp", ["mlp", "grid"], "mlp: the MLP head NeRF; grid: the "
                  "grid head vs PyTorch and vs the MLP head (module doc).")
flags.DEFINE_integer("rays", 0, "Rays per training step (one frame; 0: mlp 1024, grid the "
                     "preset's head.rays).")
flags.DEFINE_integer("size", 0, "Height and width of the synthetic person's frames (0: mlp "
                     "64, grid 128); the render benchmark renders one whole frame.")
flags.DEFINE_list("model_overrides", [], "field=value of the model config (NeRFConfig or "
                  "GridConfig), e.g. num_samples=32,finest=2048.")
flags.DEFINE_integer("chunk", 4096, "Rays rendered at once in the full-frame render.")
flags.DEFINE_bool("torch_compile", False, "Also time torch.compile'd PyTorch (loss and "
                  "render; on by default with --model=grid); falls back to eager if "
                  "compilation fails.")
flags.DEFINE_bool("profile", True, "Report XLA's FLOP count of the step, the MLP matmuls' "
                  "share and achieved GFLOP/s, and PyTorch's top operators.")
flags.DEFINE_enum("timing", "interleaved", ["interleaved", "blocks"],
                  "interleaved: one call of each contender in turn; blocks: each "
                  "contender's calls in a row (none runs right after another's).")
flags.DEFINE_bool("smoke", False, "Tiny run for the test suite: cpu preset (grid: tiny), "
                  "64 rays, 32 x 32 frames, 2 steps, no warm-up, no profile, no "
                  "torch.compile, 1 core unless --threads is given.")
harness.define_flags("cpu", 10, 2, "Seed of the parameters, the synthetic person and the "
                     "rays.", presets=PRESETS)
flags.DEFINE_bool("eigen_dots", False, "Also time the JAX step compiled with XLA:CPU's dots "
                  "in Eigen instead of YNNPACK (EIGEN_DOTS below; = XLA_FLAGS=--xla_cpu_"
                  "experimental_ynn_fusion_type=-individual_dot).")

COLOR_ATOL = 1e-4          # rendered colours, JAX vs PyTorch, same rays and jitter
NUM_FRAMES = 20            # frames of the synthetic person
NUM_BATCHES = 4            # distinct ray batches, cycled through by the timed steps
STEP_METRICS = ("mse_coarse", "mse_fine", "loss", "grad_norm")
# XLA:CPU hands float32 dots to YNNPACK by default (fusion types `individual_dot` and
# `reduce`); keeping only `reduce` leaves the dots to Eigen (the cumulative sums of the
# fine sampling stay in YNNPACK, where they are fast).
EIGEN_DOTS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}


def jax_colors_fn(model, intrinsics):
    """Jitted `(params, batch, noise) -> (coarse rgb, fine rgb)` of a ray batch with
    explicit jitter, through the library's `HeadNeRF.condition` / `HeadNeRF.render`."""
    import jax
    import jax.numpy as jnp
    from geneface_jax.render import fields, frames
    from geneface_jax.render import rays as rays_lib
    k = jnp.asarray(intrinsics, jnp.float32)

    @jax.jit
    def colors(params, batch, noise):
        rays, views = batch["rays"], batch["frames"]
        cond = frames.head_condition(model, params, views["windows"], True)[rays["frame"]]
        o, d = rays_lib.rays_for_pixels(views["pose"][rays["frame"]], k, rays["rows"],
                                        rays["cols"])
        out = model.apply({"params": params}, o, d, cond, rays["background"], noise=noise,
                          method=fields.HeadNeRF.render)
        return out.coarse.rgb, out.fine.rgb

    return colors


def mlp_macs(cfg):
    """(multiply-accumulates of one field evaluation's Linear layers, the part of them on
    per-ray inputs: the landmark condition in the first and skip layers and the view
    encoding in the first colour layer, which the library's `fields.PartsLinear` computes
    once per ray and pass and the PyTorch side, concatenating as GeneFace, per sample)."""
    in_dim, macs = cfg.pos_dim + cfg.cond_dim, cfg.width
    for i in range(cfg.depth):
        skip = cfg.skip is not None and i == cfg.skip + 1
        macs += ((in_dim if i == 0 else cfg.width) + (in_dim if skip else 0)) * cfg.width
    cin = cfg.width + cfg.view_dim
    for _ in range(cfg.color_depth):
        macs, cin = macs + cin * cfg.color_width, cfg.color_width
    per_ray = cfg.cond_dim * cfg.width * (2 if cfg.skip is not None else 1)
    return macs + 3 * cin, per_ray + cfg.view_dim * cfg.color_width


def options():
    """The run's sizes from the flags (`--smoke` and the per-model defaults applied)."""
    grid = FLAGS.model == "grid"
    o = dict(cfg_name=FLAGS.config, rays=FLAGS.rays, size=FLAGS.size or (128 if grid else 64),
             steps=FLAGS.steps, warmup=FLAGS.warmup, threads=FLAGS.threads,
             use_compile=FLAGS.torch_compile or (grid and not FLAGS["torch_compile"].present),
             profile=FLAGS.profile, num_frames=NUM_FRAMES, chunk=FLAGS.chunk, seed=FLAGS.seed,
             timing=FLAGS.timing, system_malloc=FLAGS.system_malloc)
    if FLAGS.smoke:
        o.update(cfg_name="tiny" if grid else "cpu", rays=64, size=32, steps=2, warmup=0,
                 num_frames=8, use_compile=False, profile=False, threads=FLAGS.threads or 1)
    if not o["rays"]:
        o["rays"] = (grid_presets.get_config(o["cfg_name"]).head.rays if grid else 1024)
    if o["steps"] < 1 or o["rays"] < 1 or o["warmup"] < 0 or o["chunk"] < 1:
        raise app.UsageError("--steps, --rays and --chunk must be >= 1, --warmup >= 0")
    if o["size"] < 16:
        raise app.UsageError(f"--size must be >= 16, got {o['size']}")
    try:
        o["overrides"] = {k: ast.literal_eval(v) for k, v in
                          (item.split("=", 1) for item in FLAGS.model_overrides)}
    except (ValueError, SyntaxError) as e:
        raise app.UsageError(f"--model_overrides: expected field=value items: {e}") from e
    return types.SimpleNamespace(**o)


def main(argv):
    del argv
    o = options()
    if FLAGS.model == "grid":
        from experiments.bench import nerf_grid
        return nerf_grid.grid_main(o)
    return mlp_main(o)


def mlp_main(o):
    cfg_name, rays_per_step, size, steps, warmup = o.cfg_name, o.rays, o.size, o.steps, o.warmup
    use_compile, do_profile = o.use_compile, o.profile
    run = harness.Run(o.threads, o.system_malloc)
    threads, blocks = run.threads, o.timing == "blocks"

    import jax
    import torch
    from geneface_jax.render import fields, frames
    from geneface_jax.train import nerf, parallel
    from experiments.bench import xla_trace
    from experiments.bench.torch_reference.nerf import HeadRunner, step_noise

    torch.set_num_threads(threads)
    torch.manual_seed(o.seed)
    cfg = dataclasses.replace(nerf.model_config(nerf_presets.get_config(cfg_name).model),
                              smooth_warmup_steps=0, **o.overrides)
    optim = nerf.NeRFOptimConfig()
    views, host_batches, frame_inputs = harness.nerf_person(o, cfg.smooth_window, NUM_BATCHES)
    frame_rays = size * size

    # ---- JAX: the library's step on a 1-device mesh
    model, state = nerf.create_nerf_state(cfg, optim, nerf.HEAD, o.seed)
    js = harness.one_device_step(nerf.make_head_step(model, views.intrinsics), state,
                                 host_batches, 1 + warmup + steps + 1, ("frames",))
    mesh, state, jbatches, keys, jax_step = js.mesh, js.state, js.batches, js.keys, js.step
    lowered_step, jax_compile_s = js.lowered, js.compile_s
    init_params = jax.device_get(state.params)       # host copy: the step donates the state
    jax_params = fields.count_params(init_params)
    log(f"jax: {jax_params} params, step compiled in {jax_compile_s:.1f} s")

    # ---- equivalence: same rays, same jitter -> same colours; then the first step
    def runner(batches, compile_model=False):
        return HeadRunner(cfg, optim, views.intrinsics, init_params, batches, frame_inputs,
                          o.chunk, compile_model)

    noise0 = step_noise(keys[0], rays_per_step, cfg)
    tnoise0 = tuple(torch.from_numpy(u) for u in noise0)
    colors_j = jax.device_get(jax_colors_fn(model, views.intrinsics)(
        init_params, host_batches[0], noise0))
    eager = runner(host_batches)
    color_err = harness.check_close("colours (coarse, fine; same rays and jitter)", colors_j,
                                    eager.render_colors(0, tnoise0), COLOR_ATOL)

    def first_jax_step():
        nonlocal state
        state, metrics = jax_step(state, jbatches[0], keys[0])
        return metrics, {"model.": state.params}

    check, jax_metrics = harness.first_step_check(
        STEP_METRICS, first_jax_step, lambda: eager.step(0, noise=tnoise0), eager.module,
        jax_params, optim.lr, "if every term differs, check that step_noise mirrors "
                              "train.nerf._ray_noise")
    runners = {"torch_eager": eager}

    # ---- optional: the same step with XLA:CPU's dots in Eigen, from a copy of the state
    eigen, eigen_result = None, {}
    if FLAGS.eigen_dots:
        eigen_state = parallel.replicate(jax.device_get(state), mesh)
        eigen_step = lowered_step.compile(compiler_options=EIGEN_DOTS)
        state, m_ynn = jax_step(state, jbatches[1], keys[1])    # both take the same step
        eigen_state, m_eigen = eigen_step(eigen_state, jbatches[1], keys[1])
        m_ynn, m_eigen = jax.device_get((m_ynn, m_eigen))
        eigen_err = max(harness.rel_err(m_eigen[k], m_ynn[k]) for k in ("loss", "grad_norm"))
        if not eigen_err <= harness.CHECK_RTOL:
            raise RuntimeError(f"the step with dots in Eigen differs: rel err {eigen_err:.2e}")
        fusions = {name: exe.as_text().count('"kind":"__ynn_fusion"')   # what changed
                   for name, exe in (("default", jax_step), ("eigen_dots", eigen_step))}
        eigen = harness.jax_stepper(eigen_step, eigen_state, jbatches, keys, first=1)
        eigen_result = {"eigen_dots_rel_err": float(f"{eigen_err:.2e}"), "ynn_fusions": fusions}
        log(f"dots in Eigen: same step (rel err {eigen_err:.2e}); YNNPACK fusions {fusions}")

    # ---- full-frame renders (deterministic samples), initial parameters on both sides
    renderer = frames.FrameRenderer(cfg, {"params": init_params}, views, mesh=mesh,
                                  chunk=o.chunk)
    render_jax = lambda timed=False: renderer.render(  # noqa: E731
        frame_inputs["pose"], frame_inputs["window"])["rgb"]
    frame_j = render_jax()
    eager_render = runner(host_batches[:1])
    render_err = harness.check_close(f"full frame {size}x{size}", frame_j,
                                     eager_render.render_frame(), COLOR_ATOL)
    render_runners = {"torch_eager": eager_render}

    # ---- torch.compile (inductor) of the loss and of the render chunk
    def compiled():
        comp, comp_render = runner(host_batches, True), runner(host_batches[:1], True)
        out = comp.step(0, noise=tnoise0)
        err = max(harness.rel_err(out[k], jax_metrics[k]) for k in ("loss", "grad_norm"))
        if err > harness.CHECK_RTOL:
            raise RuntimeError(f"compiled loss / gradient norm differ from JAX by {err:.2e}")
        harness.check_close("compiled full frame", frame_j, comp_render.render_frame(),
                            COLOR_ATOL)
        return comp, comp_render

    comp, torch_compile_s, compile_note = harness.try_torch_compile(
        "auto" if use_compile else "off", compiled, "not tried (--notorch_compile)")
    if comp:
        runners["torch_compile"], render_runners["torch_compile"] = comp

    # ---- the machine's matmul peak: the best of each size first, then one product of
    # the largest size per framework between the timed calls
    sizes = (256,) if FLAGS.smoke else (512, 1024, 2048)
    peak = peak_lib.matmul_peak(sizes, 2 if FLAGS.smoke else 5)
    train_probe, render_probe = peak_lib.PeakProbe(sizes[-1]), peak_lib.PeakProbe(sizes[-1])

    # ---- timing: training steps (every contender walks batches and keys 1, 2, 3, ...)
    run_jax = harness.jax_stepper(jax_step, state, jbatches, keys, first=1)
    torch_timings = {name: {} for name in runners}
    contenders = [("jax", run_jax)] + [
        (n, lambda timed, n=n, r=r: r.step(r.num_steps, timings=torch_timings[n] if timed
                                           else None)) for n, r in runners.items()]
    if eigen is not None:
        contenders.append(("jax_eigen_dots", eigen))
    times, train_usage = harness.timed_calls(contenders + [("matmul_peak", train_probe)],
                                             warmup, steps, blocks)
    del times["matmul_peak"], train_usage["matmul_peak"]
    med = harness.log_medians("train", times, rays_per_step, "rays")
    ref = min(runners, key=lambda n: med[n])
    if eigen is not None:
        eigen_result.update({
            "jax_eigen_dots_rays_per_s": round(rays_per_step / med["jax_eigen_dots"], 1),
            "eigen_dots_speedup": round(med[ref] / med["jax_eigen_dots"], 3),
            # median step time with YNNPACK dots / with Eigen dots (> 1: Eigen faster)
            "eigen_dots_step_ratio": round(med["jax"] / med["jax_eigen_dots"], 3)})

    # ---- timing: full-frame renders
    r_times, _ = harness.timed_calls(
        [("jax", render_jax)] + [(n, lambda timed, r=r: r.render_frame())
                                 for n, r in render_runners.items()]
        + [("matmul_peak", render_probe)], warmup, steps, blocks)
    del r_times["matmul_peak"]
    r_med = harness.log_medians("render", r_times, frame_rays, "rays")
    r_ref = min(render_runners, key=lambda n: r_med[n])

    # ---- FLOP counts against the matmul peak measured between the timed calls (medians;
    # the best rate seen anywhere is the stricter `*_vs_best` denominator)
    per_ray_evals = 2 * cfg.num_coarse + cfg.num_fine
    samples = rays_per_step * per_ray_evals
    macs, ray_macs = mlp_macs(cfg)
    mlp_flops = 3 * 2 * samples * macs          # forward + 2 products in the backward
    jax_mlp_flops = 3 * 2 * (samples * (macs - ray_macs) + rays_per_step * 2 * ray_macs)
    step_flops = peak_lib.xla_flops(jax_step)
    render_flops = 2 * frame_rays * per_ray_evals * macs
    jax_render_flops = 2 * frame_rays * (per_ray_evals * (macs - ray_macs) + 2 * ray_macs)
    peak_gflops, render_peak_gflops = median(train_probe.rates), median(render_probe.rates)
    best_gflops = max(peak["jax"], peak["torch"], *train_probe.rates, *render_probe.rates)
    jax_step_gflops = (step_flops or jax_mlp_flops) / med["jax"] / 1e9
    jax_render_gflops = jax_render_flops / r_med["jax"] / 1e9
    log(f"matmul peak: best {best_gflops:.1f} GFLOP/s, between the steps "
        f"{train_probe.spread()}, the renders {render_probe.spread()}; JAX step "
        f"{jax_step_gflops:.1f} GFLOP/s, render {jax_render_gflops:.1f} GFLOP/s")

    profile = "not profiled (--noprofile / --smoke)"
    if do_profile:
        top, matmul_share, torch_mm_ms = xla_trace.torch_top_ops(eager.step)
        try:
            temp_mb = round(jax_step.memory_analysis().temp_size_in_bytes / 2 ** 20, 1)
        except Exception:  # noqa: BLE001 - not every backend reports it
            temp_mb = None
        bare_gflops = peak_lib.bare_mlp_gflops([cfg.pos_dim] + [cfg.width] * cfg.depth,
                                              samples, steps)
        profile = {
            "field_evaluations_per_step": samples, "mlp_matmul_flops_per_step": mlp_flops,
            "jax_mlp_matmul_flops_per_step": jax_mlp_flops, "xla_flops_per_step": step_flops,
            "mlp_share_of_xla_flops": (round(jax_mlp_flops / step_flops, 3) if step_flops
                                       else None),
            "jax_mlp_gflops": round(jax_mlp_flops / med["jax"] / 1e9, 2),
            f"{ref}_mlp_gflops": round(mlp_flops / med[ref] / 1e9, 2),
            "jax_render_mlp_gflops": round(jax_render_flops / r_med["jax"] / 1e9, 2),
            f"{r_ref}_render_mlp_gflops": round(render_flops / r_med[r_ref] / 1e9, 2),
            "torch_eager_matmul_share": matmul_share, "torch_eager_matmul_ms": torch_mm_ms,
            "torch_eager_top_ops": top,
            "jax_thunks": xla_trace.thunk_breakdown(lambda: run_jax(False)),  # ops by kind
            # host memory: the step's XLA temporaries; page faults and kernel seconds per
            # timed training call of each contender
            "jax_step_temp_mb": temp_mb, "host_usage_per_step": train_usage,
            # calibration: what a bare density trunk's matmuls alone reach in JAX
            "jax_bare_mlp_gflops": round(bare_gflops, 1),
            "jax_bare_mlp_peak_fraction": round(bare_gflops / peak_gflops, 3),
            **{n: {f"{k}_s": round(v / steps, 4) for k, v in tm.items()}
               for n, tm in torch_timings.items()}}
        log("profile:", json.dumps(profile))

    info = run.info()
    result = {
        **harness.speed_keys(med, ref, rays_per_step, "rays", digits=1),
        "jax_render_rays_per_s": round(frame_rays / r_med["jax"], 1),
        "torch_render_rays_per_s": round(frame_rays / r_med[r_ref], 1),
        "render_speedup": round(r_med[r_ref] / r_med["jax"], 3),
        "torch_render_reference": r_ref,
        "peak_fraction": round(jax_step_gflops / peak_gflops, 3),
        "render_peak_fraction": round(jax_render_gflops / render_peak_gflops, 3),
        "peak_fraction_vs_best": round(jax_step_gflops / best_gflops, 3),
        "render_peak_fraction_vs_best": round(jax_render_gflops / best_gflops, 3),
        "jax_step_gflops": round(jax_step_gflops, 2),
        "jax_render_gflops": round(jax_render_gflops, 2),
        "matmul_peak_gflops": peak,    # best per framework before the timing, fastest size
        "matmul_peak_during_training_gflops": train_probe.spread(),   # [min, median, max]
        "matmul_peak_during_render_gflops": render_probe.spread(),
        "matmul_peak_best_gflops": round(best_gflops, 1),
        "step_flops_source": "xla cost analysis" if step_flops else "analytic MLP count",
        "torch_compile": compile_note, "config": cfg_name, "rays": rays_per_step,
        "samples_per_ray": [cfg.num_coarse, cfg.num_coarse + cfg.num_fine],
        "frame": [size, size], "chunk": o.chunk, "steps": steps, "warmup": warmup,
        "timing": o.timing, "params": jax_params,
        "equivalence_max_abs_err": float(f"{color_err:.2e}"),
        "render_max_abs_err": float(f"{render_err:.2e}"), "first_step_rel_err": check,
        "compile_seconds": round(jax_compile_s, 1),
        "torch_compile_seconds": round(torch_compile_s, 1) if torch_compile_s else None,
        "profile": profile, "note": harness.load_note(run.load(), threads),
        **info, **eigen_result}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    app.run(main)
