"""The grid head's benchmark: `python -m experiments.bench.nerf --model=grid` (flags and
the run's description in `experiments/bench/nerf.py`'s module doc; `grid_main` takes its
resolved options).

Contenders, timed interleaved in one process on the same cores: the library's grid head
step (`train.nerf.make_grid_head_step` through `data_parallel` on a one-device mesh) and
whole-frame render (`render.frames.FrameRenderer`); `torch_reference.grid_runner.GridRunner`
eager and `torch.compile`d (loss and render chunk); the library's MLP head step and render
(`train.nerf.make_head_step`, the preset of the same name in experiments/configs/nerf.py,
smoother on) at the same rays per step and frame size. Rates: rays/s = rays per step /
median step; fps = 1 / median whole-frame render.

Occupancy: the bench starts from a ball of occupied cells (`ball_occupancy`, radius
`BALL_RADIUS` x bound, density 1000), which the step-0 update keeps (dilated by one cell):
the rays then cross empty space, the ball and its edge, the inverse-CDF sampling has work
to do, and whole frames trace only the rays that meet the ball (as `FrameRenderer` does).
(From the library's own initial density, `sigma_thresh` everywhere, the first updates
follow that initial value rather than the field: docs/benchmarks.md.) Every contender runs
the occupancy update at the steps where the library does (step % occupancy_every == 0;
the median hides it unless half the timed steps are updates).
"""

import dataclasses
import json

import numpy as np

from experiments.bench import harness
from experiments.bench.harness import log
from experiments.configs import grid as grid_presets
from experiments.configs import nerf as nerf_presets

COLOR_ATOL = 1e-4          # rendered colours, JAX vs PyTorch, same rays, bits and jitter
NUM_BATCHES = 4            # distinct ray batches, cycled through by the timed steps
GRID_METRICS = ("mse", "entropy", "ambient", "acc", "loss", "occupied")
BALL_RADIUS = 0.6          # of the occupancy box's half side
# where the JAX step's ops come from (`xla_trace` scopes: substrings of the HLO op_name)
SCOPES = [("occupancy_update", ("cond/branch",)),
          ("grid_encoding", ("/grid/", "/ambient_grid/")), ("mlps", ("_net/",)),
          ("condition", ("GridHeadNeRF.condition", "GridHeadNeRF.codes")),
          ("sampling_compositing", ("GridHeadNeRF.render",))]
OPTIM_KEYS = ("grid_lr_scale", "smoother_lr_scale", "lambda_entropy", "lambda_ambient",
              "ambient_ramp_steps")


def ball_occupancy(cfg):
    """{"density", "bits"} `[G, G, G]` float32: 1000 and 1 in the cells whose centres lie
    within BALL_RADIUS x bound of the box centre, 0 elsewhere."""
    c = (np.arange(cfg.grid_size) + 0.5) / cfg.grid_size * 2.0 - 1.0
    r2 = c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2
    inside = (r2 < BALL_RADIUS ** 2).astype(np.float32)
    return {"density": 1000.0 * inside, "bits": inside}


def grid_colors_fn(model, intrinsics):
    """Jitted `(variables, batch, u [R, K]) -> rgb [R, 3]` of a ray batch with explicit
    jitter, through the library's `GridHeadNeRF.condition` / `codes` / `render`."""
    import jax
    import jax.numpy as jnp
    from geneface_jax.render import frames, grid_fields
    from geneface_jax.render import rays as rays_lib
    k = jnp.asarray(intrinsics, jnp.float32)
    head = grid_fields.GridHeadNeRF

    @jax.jit
    def colors(variables, batch, u):
        rays, views = batch["rays"], batch["frames"]
        f = rays["frame"]
        cond = frames.head_condition(model, variables["params"], views["windows"], True)[f]
        code = model.apply(variables, views["code_index"], method=head.codes)[f]
        o, d = rays_lib.rays_for_pixels(views["pose"][f], k, rays["rows"], rays["cols"])
        return model.apply(variables, o, d, cond, rays["background"], code, noise=u,
                           method=head.render).coarse.rgb

    return colors


def sizes_of(cfg):
    """The grid model's sizes for the JSON line."""
    names = ("levels", "features", "base", "finest", "log2_table", "ambient_finest",
             "ambient_layers", "ambient_hidden", "sigma_layers", "sigma_hidden",
             "geo_feat_dim", "color_layers", "color_hidden", "code_dim", "num_codes",
             "num_bins", "num_samples", "grid_size", "occupancy_every", "occupancy_stride")
    return {**{n: getattr(cfg, n) for n in names}, "head_table_rows": cfg.head_grid.rows,
            "ambient_table_rows": cfg.ambient_grid.rows,
            "hashed_levels": sum(cfg.head_grid.hashed)}


def grid_main(o):
    run = harness.Run(o.threads, o.system_malloc)
    threads, blocks = run.threads, o.timing == "blocks"

    import jax
    import torch
    from geneface_jax.render import fields, frames
    from geneface_jax.train import nerf
    from experiments.bench import xla_trace
    from experiments.bench.torch_reference import grid_runner as tg

    torch.set_num_threads(threads)
    torch.manual_seed(o.seed)
    preset = grid_presets.get_config(o.cfg_name)
    views, host_batches, frame_inputs = harness.nerf_person(o, preset.model.smooth_window,
                                                            NUM_BATCHES)
    lo, hi = views.split_range("train")
    cfg = nerf.grid_model_config(preset.model, num_codes=hi - lo)
    cfg = dataclasses.replace(nerf.grid_model_config(
        preset.model, near_far=nerf.ray_bounds(views.meta, cfg, preset.bounds),
        num_codes=hi - lo), smooth_warmup_steps=0, **o.overrides)
    p = preset.head
    optim = nerf.GridOptimConfig(lr=p.lr, decay_rate=p.lr_decay, decay_steps=p.lr_decay_steps,
                                 **{k: p[k] for k in OPTIM_KEYS})
    n_keys = 1 + o.warmup + o.steps + 2

    # ---- JAX: the library's grid head step on a 1-device mesh, from the ball occupancy
    model, state = nerf.create_grid_state(cfg, optim, nerf.HEAD, o.seed)
    state = state.replace(batch_stats=jax.tree.map(jax.numpy.asarray, ball_occupancy(cfg)))
    js = harness.one_device_step(
        nerf.make_grid_head_step(model, optim, views.intrinsics, (views.height, views.width)),
        state, host_batches, n_keys, ("frames",))
    state = js.state
    variables0 = jax.device_get({"params": state.params, "occupancy": state.batch_stats})
    n_params = fields.count_params(variables0["params"])
    log(f"jax grid head: {n_params} params, step compiled in {js.compile_s:.1f} s")

    def runner(variables, batches, compile_model=False):
        return tg.GridRunner(cfg, optim, views.intrinsics, variables, batches, frame_inputs,
                             o.chunk, compile_model)

    # ---- the first step on both sides (occupancy update, loss, gradients, Adam)
    noise0 = tuple(torch.from_numpy(a) for a in tg.grid_step_noise(js.keys[0], o.rays, cfg))
    eager = runner(variables0, host_batches)

    def first_jax_step():
        nonlocal state
        state, metrics = js.step(state, js.batches[0], js.keys[0])
        return metrics, {"model.": state.params}

    check, jax_metrics = harness.first_step_check(
        GRID_METRICS, first_jax_step, lambda: eager.step(0, noise=noise0), eager.module,
        n_params, optim.lr, "if every term differs, check that grid_step_noise mirrors "
                            "train.nerf.make_grid_head_step")
    variables1 = jax.device_get({"params": state.params, "occupancy": state.batch_stats})
    bits1 = np.asarray(variables1["occupancy"]["bits"])
    bits_diff = int(np.sum(bits1 != eager.bits.numpy()))
    dens1 = np.asarray(variables1["occupancy"]["density"])
    dens_err = float(np.max(np.abs(dens1 - eager.density.numpy()) / np.maximum(dens1, 1.0)))
    if bits_diff or not dens_err <= harness.CHECK_RTOL:
        raise RuntimeError(f"the first occupancy update differs: bits in {bits_diff} cells, "
                           f"densities by {dens_err:.2e} (relative)")

    # ---- with the parameters after that step on both sides: colours, then whole frames
    check_runner = runner(variables1, host_batches[:1])
    colors_j = grid_colors_fn(model, views.intrinsics)(variables1, host_batches[0],
                                                       noise0[0].numpy())
    color_err = harness.check_close("colours (same rays, bits and jitter)", np.asarray(colors_j),
                                    check_runner.render_colors(0, noise0[0]), COLOR_ATOL)
    renderer = frames.FrameRenderer(cfg, variables1, views, mesh=js.mesh, chunk=o.chunk)
    render_jax = lambda timed=False: renderer.render(  # noqa: E731
        frame_inputs["pose"], frame_inputs["window"])["rgb"]
    frame_j = render_jax()
    render_err = harness.check_close(f"full frame {o.size}x{o.size}", frame_j,
                                     check_runner.render_frame(), COLOR_ATOL)
    runners, render_runners = {"torch_eager": eager}, {"torch_eager": check_runner}

    def compiled():
        comp = runner(variables0, host_batches, True)
        out = comp.step(0, noise=noise0)
        err = max(harness.rel_err(out[k], jax_metrics[k]) for k in ("loss", "mse"))
        if err > harness.CHECK_RTOL:
            raise RuntimeError(f"compiled loss / mse differ from JAX by {err:.2e}")
        comp_render = runner(variables1, host_batches[:1], True)
        harness.check_close("compiled full frame", frame_j, comp_render.render_frame(),
                            COLOR_ATOL)
        return comp, comp_render

    comp, torch_compile_s, compile_note = harness.try_torch_compile(
        "auto" if o.use_compile else "off", compiled, "not tried (--notorch_compile / --smoke)")
    if comp:
        runners["torch_compile"], render_runners["torch_compile"] = comp

    # ---- the MLP head (JAX) at the same rays and frame
    mcfg = dataclasses.replace(nerf.model_config(nerf_presets.get_config(o.cfg_name).model),
                               smooth_warmup_steps=0)
    mmodel, mstate = nerf.create_nerf_state(mcfg, nerf.NeRFOptimConfig(), nerf.HEAD, o.seed)
    ms = harness.one_device_step(nerf.make_head_step(mmodel, views.intrinsics), mstate,
                                 host_batches, n_keys, ("frames",))
    mlp_params = jax.device_get(ms.state.params)
    mlp_renderer = frames.FrameRenderer(mcfg, {"params": mlp_params}, views, mesh=ms.mesh,
                                        chunk=o.chunk)
    render_mlp = lambda timed=False: mlp_renderer.render(  # noqa: E731
        frame_inputs["pose"], frame_inputs["window"])["rgb"]
    render_mlp()                                                   # compiles the renderer
    log(f"jax mlp head: {fields.count_params(mlp_params)} params, step compiled in "
        f"{ms.compile_s:.1f} s")

    # ---- timing: training steps (every contender walks batches 1, 2, 3, ...), renders
    run_jax = harness.jax_stepper(js.step, state, js.batches, js.keys, first=1)
    torch_timings = {name: {} for name in runners}
    contenders = [("jax", run_jax),
                  ("jax_mlp", harness.jax_stepper(ms.step, ms.state, ms.batches, ms.keys))]
    contenders += [(n, lambda timed, n=n, r=r: r.step(r.num_steps, timings=torch_timings[n]
                                                      if timed else None))
                   for n, r in runners.items()]
    times, usage = harness.timed_calls(contenders, o.warmup, o.steps, blocks)
    med = harness.log_medians("train", times, o.rays, "rays")
    ref = min(runners, key=lambda n: med[n])
    r_times, _ = harness.timed_calls(
        [("jax", render_jax), ("jax_mlp", render_mlp)]
        + [(n, lambda timed, r=r: r.render_frame()) for n, r in render_runners.items()],
        o.warmup, o.steps, blocks)
    r_med = harness.log_medians("render", r_times, 1, "frames")
    r_ref = min(render_runners, key=lambda n: r_med[n])
    fps = lambda n: round(1.0 / r_med[n], 2) if n in r_med else None  # noqa: E731

    profile = "not profiled (--noprofile / --smoke)"
    if o.profile:       # the JAX step's ops by kind, from the HLO; PyTorch's operators
        top, matmul_share, matmul_ms = xla_trace.torch_top_ops(eager.step, top=10)
        profile = {
            "jax_thunks": xla_trace.thunk_breakdown(lambda: run_jax(False), 2,
                                                    hlo_text=js.step.as_text(), top=12,
                                                    scopes=SCOPES),
            "torch_eager_top_ops": top, "torch_eager_matmul_share": matmul_share,
            "torch_eager_matmul_ms": matmul_ms, "host_usage_per_step": usage,
            **{n: {f"{k}_s": round(v / o.steps, 4) for k, v in tm.items()}
               for n, tm in torch_timings.items()}}
        log("profile:", json.dumps(profile))

    result = {
        **harness.speed_keys(med, ref, o.rays, "rays", digits=1),
        "ratio_vs_best_torch": round(med[ref] / med["jax"], 3),
        "jax_render_fps": fps("jax"), "torch_eager_render_fps": fps("torch_eager"),
        "torch_compile_render_fps": fps("torch_compile"),
        "render_ratio_vs_best_torch": round(r_med[r_ref] / r_med["jax"], 3),
        "torch_render_reference": r_ref,
        "mlp_rays_per_s": round(o.rays / med["jax_mlp"], 1), "mlp_render_fps": fps("jax_mlp"),
        "grid_vs_mlp_train": round(med["jax_mlp"] / med["jax"], 3),
        "grid_vs_mlp_render": round(r_med["jax_mlp"] / r_med["jax"], 3),
        "model": "grid", "config": o.cfg_name, "rays": o.rays, "frame": [o.size, o.size],
        "chunk": o.chunk, "sizes": sizes_of(cfg), "params": n_params,
        "mlp_samples_per_ray": [mcfg.num_coarse, mcfg.num_coarse + mcfg.num_fine],
        "mlp_params": fields.count_params(mlp_params),
        "occupied_fraction": round(float(bits1.mean()), 4),
        "steps": o.steps, "warmup": o.warmup, "timing": o.timing,
        "equivalence_max_abs_err": float(f"{color_err:.2e}"),
        "render_max_abs_err": float(f"{render_err:.2e}"), "first_step_rel_err": check,
        "occupancy_bits_equal": bits_diff == 0,
        "occupancy_density_rel_err": float(f"{dens_err:.2e}"),
        "compile_seconds": round(js.compile_s, 1), "mlp_compile_seconds": round(ms.compile_s, 1),
        "torch_compile": compile_note,
        "torch_compile_seconds": round(torch_compile_s, 1) if torch_compile_s else None,
        "profile": profile, "note": harness.load_note(run.load(), threads), **run.info()}
    print(json.dumps(result), flush=True)
