"""The stage-3 benchmark (head NeRF training step and full-frame render, JAX vs PyTorch)
runs at tiny sizes, passes its start-up equivalence check and ends with its JSON line; so
does the per-product comparison `experiments.bench.matmul_shapes`."""

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


@pytest.mark.slow
def test_nerf_benchmark_smoke():
    proc = _bench("nerf", "--smoke", "--eigen_dots", timeout=600)
    assert proc.returncode == 0, f"bench failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    out = json.loads(proc.stdout.strip().splitlines()[-1])
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


def test_matmul_shapes_smoke():
    """The per-product comparison (fwd, dx, dW of a dense layer, a square product) runs,
    checks that both frameworks computed the same products, and ends with its JSON line."""
    proc = _bench("matmul_shapes", "--smoke")
    assert proc.returncode == 0, f"bench failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    out = json.loads(proc.stdout.strip().splitlines()[-1])
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
