"""The stage-3 benchmark (head NeRF training step and full-frame render, JAX vs PyTorch;
`--model=grid`: the grid head vs PyTorch and vs the MLP head) runs at tiny sizes, passes
its start-up equivalence check and ends with its JSON line; so does the per-product
comparison `experiments.bench.matmul_shapes`. The profile's op classes (`xla_trace`:
gathers, scatter-adds, matmuls from the compiled HLO) are checked on a small program."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from conftest import SUBPROCESS_XLA_FLAGS

REPO = pathlib.Path(__file__).resolve().parents[1]


def _bench(module, *args, timeout=300):
    """`python -m experiments.bench.<module> args` on the CPU (CompletedProcess)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=SUBPROCESS_XLA_FLAGS)
    return subprocess.run([sys.executable, "-m", f"experiments.bench.{module}", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _bench_json(module, *args, timeout=300):
    """`_bench` that must succeed: its last stdout line, parsed."""
    proc = _bench(module, *args, timeout=timeout)
    assert proc.returncode == 0, f"bench failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_nerf_benchmark_smoke():
    out = _bench_json("nerf", "--smoke", "--eigen_dots", timeout=600)
    for key in ("jax_rays_per_s", "torch_rays_per_s", "jax_render_rays_per_s",
                "torch_render_rays_per_s"):
        assert out[key] > 0, key
    # rates (1 decimal) and ratios (3 decimals) are rounded separately in the JSON line
    assert out["speedup"] == pytest.approx(out["jax_rays_per_s"] / out["torch_rays_per_s"],
                                           rel=5e-3, abs=2e-3)
    assert out["render_speedup"] == pytest.approx(
        out["jax_render_rays_per_s"] / out["torch_render_rays_per_s"], rel=5e-3, abs=2e-3)
    # the two sides did the same work: same colours for the same rays and jitter
    assert 0.0 <= out["equivalence_max_abs_err"] <= 1e-4
    assert 0.0 <= out["render_max_abs_err"] <= 1e-4
    # --eigen_dots: the step rebuilt with XLA:CPU's dots in Eigen takes the same step, has
    # fewer YNNPACK fusions, and was timed as one more contender
    assert 0.0 <= out["eigen_dots_rel_err"] <= 1e-4
    assert out["ynn_fusions"]["eigen_dots"] < out["ynn_fusions"]["default"]
    assert out["jax_eigen_dots_rays_per_s"] > 0
    assert out["eigen_dots_step_ratio"] == pytest.approx(
        out["jax_eigen_dots_rays_per_s"] / out["jax_rays_per_s"], rel=5e-3, abs=2e-3)
    assert out["config"] == "cpu" and out["rays"] > 0 and out["threads"] >= 1
    # achieved FLOP/s against the measured matmul peak
    # (the median rate of the products timed between the steps; the best rate of the run)
    low, peak, high = out["matmul_peak_during_training_gflops"]
    assert 0 < low <= peak <= high <= out["matmul_peak_best_gflops"]
    assert out["matmul_peak_gflops"]["n"] == 256 and out["jax_step_gflops"] > 0
    assert out["peak_fraction"] == pytest.approx(out["jax_step_gflops"] / peak, rel=0.02)
    assert out["peak_fraction_vs_best"] == pytest.approx(
        out["jax_step_gflops"] / out["matmul_peak_best_gflops"], rel=0.02)


@pytest.mark.slow
def test_grid_nerf_benchmark_smoke():
    out = _bench_json("nerf", "--model=grid", "--smoke", timeout=600)
    for key in ("jax_rays_per_s", "torch_eager_rays_per_s", "mlp_rays_per_s",
                "jax_render_fps", "torch_eager_render_fps", "mlp_render_fps"):
        assert out[key] > 0, key
    assert out["torch_compile_rays_per_s"] is None and out["torch_reference"] == "torch_eager"
    # rates and ratios are rounded separately in the JSON line
    approx = lambda v: pytest.approx(v, rel=1e-2, abs=2e-3)  # noqa: E731
    assert out["ratio_vs_best_torch"] == out["speedup"] == approx(
        out["jax_rays_per_s"] / out["torch_eager_rays_per_s"])
    assert out["render_ratio_vs_best_torch"] == approx(
        out["jax_render_fps"] / out["torch_eager_render_fps"])
    assert out["grid_vs_mlp_train"] == approx(out["jax_rays_per_s"] / out["mlp_rays_per_s"])
    assert out["grid_vs_mlp_render"] == approx(out["jax_render_fps"] / out["mlp_render_fps"])
    # the two sides did the same work: same first step (losses, occupancy, Adam update),
    # same colours for the same rays, bits and jitter, same frame
    assert out["occupancy_bits_equal"] is True and 0.0 < out["occupied_fraction"] <= 1.0
    assert all(0.0 <= v <= 1e-4 for k, v in out["first_step_rel_err"].items()
               if k != "update_diff_over_lr")
    assert out["first_step_rel_err"]["update_diff_over_lr"] <= 1e-2
    assert 0.0 <= out["equivalence_max_abs_err"] <= 1e-4
    assert 0.0 <= out["render_max_abs_err"] <= 1e-4
    assert out["model"] == "grid" and out["config"] == "tiny" and out["frame"] == [32, 32]
    assert out["sizes"]["num_samples"] == 4 and out["sizes"]["hashed_levels"] >= 1


@pytest.mark.slow
def test_gpu_grid_script_runs_small_on_cpu(tmp_path):
    """The prepared accelerator check (`experiments.bench.gpu_grid`), shrunk: it trains,
    renders and reports the figures the device run is read by."""
    out = _bench_json("gpu_grid", "--size=48", "--frames=20", "--preset=tiny", "--steps=4",
                      "--render_frames=3", f"--workdir={tmp_path / 'w'}")
    assert out["size"] == 48 and out["steps"] == 4 and out["steps_per_s"] > 0
    assert out["render_fps"] > 0 and out["eval_psnr"] > 0
    assert out["meets_target"] == (out["render_fps"] >= 25)


def test_profile_classifies_gathers_scatters_and_matmuls():
    """`xla_trace.hlo_kinds` on a compiled gradient of a table lookup followed by a matmul:
    the lookup is a gather, its gradient a scatter-add, the product a matmul; the trace
    summary then splits the ops' time by those kinds."""
    import jax
    import jax.numpy as jnp
    from experiments.bench import xla_trace
    table, w = jnp.ones((512, 8)), jnp.ones((8, 16))
    rows = jax.random.randint(jax.random.PRNGKey(0), (4096,), 0, 512)
    grad = jax.jit(jax.grad(lambda t, w: jnp.sum(jnp.take(t, rows, axis=0) @ w) ** 2,
                            argnums=(0, 1)))
    compiled = grad.lower(table, w).compile()
    kinds = xla_trace.hlo_kinds(compiled.as_text())
    assert {"gather", "scatter", "matmul"} <= set(kinds.values()), kinds
    summary = xla_trace.thunk_breakdown(lambda: jax.block_until_ready(compiled(table, w)),
                                        2, hlo_text=compiled.as_text())
    if "error" not in summary:          # the profiler wrote a trace
        assert sum(summary["shares"].values()) == pytest.approx(1.0, abs=0.01)
        assert summary["gather_ms"] >= 0 and summary["scatter_ms"] >= 0
    # by name alone (no HLO) the classes stay matmul / conv / other
    text = "ENTRY %m {\n  %f.1 = f32[4]{0} fusion(%a), calls=%g, metadata={op_name=\"a/b\"}\n" \
        "}\n%g (p: f32[4]) -> f32[4] {\n  ROOT %x = f32[4]{0} gather(%p, %p)\n}\n"
    kinds, op_names = xla_trace.hlo_ops(text)
    assert kinds["f.1"] == "gather" and op_names["f.1"] == "a/b" and op_names["x"] == ""
    events = [{"ph": "X", "name": "f.1", "dur": 3000}, {"ph": "X", "name": "dot.2", "dur": 1000}]
    s = xla_trace.summarize(events, 1, kinds={"f.1": "gather"},
                            scopes=[("grid", ("/grid/",))], op_names={"f.1": "f/grid/take"})
    assert (s["gather_ms"], s["matmul_ms"], s["shares"]["gather"]) == (3.0, 1.0, 0.75)
    assert s["scopes_ms"] == {"grid": 3.0, "rest": 1.0}
    assert "gather_ms" not in xla_trace.summarize(events, 1)


def test_matmul_shapes_smoke():
    """The per-product comparison (fwd, dx, dW of a dense layer, a square product) runs,
    checks that both frameworks computed the same products, and ends with its JSON line."""
    out = _bench_json("matmul_shapes", "--smoke")
    assert set(out["products"]) == {"fwd_16", "dx_16", "dW_16", "fwd_32", "dx_32", "dW_32",
                                    "square_64"}
    for name, r in out["products"].items():
        assert r["jax_gflops"] > 0 and r["torch_gflops"] > 0, name
        assert 0.0 <= r["rel_err"] <= 1e-4, name
        j, t = r["jax_gflops"], r["torch_gflops"]     # all three to 4 significant digits
        assert r["ratio"] == pytest.approx(j / t, rel=2e-3), name


def test_matmul_shapes_refuses_bad_sizes():
    proc = _bench("matmul_shapes", "--rows=0")
    assert proc.returncode != 0
    assert "--rows, --repeats and --widths must be >= 1" in proc.stderr
