r"""The NeRF MLPs' matrix products alone, JAX (XLA:CPU) vs PyTorch, GFLOP/s on this CPU.

  python -m experiments.bench.matmul_shapes                 # widths 64, 128, 256
  python -m experiments.bench.matmul_shapes --rows=196608   # the paper config's fine pass
  python -m experiments.bench.matmul_shapes --smoke         # tiny, for the tests

Why: a NeRF training step is mostly products of a `[M, k]` activation with a `[k, n]`
kernel (M = rays x samples), and `experiments.bench.nerf` compares whole steps. This
script times the three products each dense layer costs per step, with the dimension
numbers JAX's autodiff emits for `fields.Linear` (a 2-D `x @ kernel`):

  fwd  y = x @ W              [M, k] x [k, n]      (contracting dims 1 / 0)
  dx   g @ W^T                [M, n] x [k, n]      (1 / 1)
  dW   x^T @ g                [M, k] x [M, n]      (0 / 0: the long axis M is contracted)

and one `--square`^3 product (the "matmul peak" of `bench.nerf`). PyTorch runs the same
products as a PyTorch user's autograd does (`x @ w`, `g @ w.t()`, `x.t() @ g` on
contiguous tensors; aten::mm / addmm call the BLAS with transpose flags), with
`torch.set_num_threads` = the cores JAX uses. Both sides multiply the same float32 numbers
and must agree (relative error <= 1e-4, else the script stops). Calls alternate between the
frameworks (`harness.timed_calls`) so load from elsewhere hits both alike; each rate is the
FLOPs over the median (and the best) of `--repeats` calls. The last line printed is one
JSON object: per shape `jax_gflops`, `torch_gflops` (medians) and `ratio` (JAX / PyTorch).
"""

import json
import os

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("rows", 49152, "M: sample points per product (default: 1024 rays x 48 "
                     "fine samples, the small config's fine pass).")
flags.DEFINE_list("widths", ["64", "128", "256"], "Layer widths k = n to time.")
flags.DEFINE_integer("square", 2048, "Size of the square product (0: skip it).")
flags.DEFINE_integer("repeats", 9, "Timed calls per framework and product.")
flags.DEFINE_integer("threads", 0, "CPU cores for both sides (0: every core this process "
                     "may use).")
flags.DEFINE_bool("smoke", False, "Tiny run for the test suite (rows 512, widths 16 and 32, "
                  "square 64, 2 repeats).")

RTOL = 1e-4


def _sig(x: float, digits: int = 4) -> float:
    """`x` rounded to `digits` significant digits (tiny smoke-test rates stay non-zero and
    their ratio stays recomputable from the rounded rates)."""
    return float(f"{x:.{digits}g}")


def main(argv):
    del argv
    rows, widths, square, repeats = (FLAGS.rows, [int(w) for w in FLAGS.widths],
                                     FLAGS.square, FLAGS.repeats)
    if FLAGS.smoke:
        rows, widths, square, repeats = 512, [16, 32], 64, 2
    if rows < 1 or repeats < 1 or square < 0 or not widths or min(widths) < 1:
        raise app.UsageError("--rows, --repeats and --widths must be >= 1, --square >= 0")
    from experiments.bench import harness
    from experiments.bench.machine import cpu_name, median
    run = harness.Run(FLAGS.threads)
    threads, malloc = run.threads, run.malloc

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    torch.set_num_threads(threads)

    def dot(dims):
        return jax.jit(lambda a, b: jax.lax.dot_general(a, b, (dims, ((), ()))))

    jax_fns = {"fwd": dot(((1,), (0,))), "dx": dot(((1,), (1,))), "dW": dot(((0,), (0,)))}
    torch_fns = {"fwd": lambda a, b: a @ b, "dx": lambda a, b: a @ b.t(),
                 "dW": lambda a, b: a.t() @ b}
    rng = np.random.default_rng(0)
    cases = []                     # (name, flops, operands as numpy, kind)
    for w in widths:
        x = rng.standard_normal((rows, w), np.float32)
        k = (rng.standard_normal((w, w)) / np.sqrt(w)).astype(np.float32)
        cases += [(f"fwd_{w}", 2.0 * rows * w * w, (x, k), "fwd"),
                  (f"dx_{w}", 2.0 * rows * w * w, (x, k), "dx"),
                  (f"dW_{w}", 2.0 * rows * w * w, (x, x[::-1].copy()), "dW")]
    if square:
        a = rng.standard_normal((square, square), np.float32)
        cases.append((f"square_{square}", 2.0 * square ** 3, (a, a.T.copy()), "fwd"))

    results = {}
    for name, flops, operands, kind in cases:
        ja = [jnp.asarray(o) for o in operands]
        ta = [torch.from_numpy(o) for o in operands]
        jf, tf = jax_fns[kind], torch_fns[kind]
        with torch.inference_mode():
            yj = np.asarray(jax.block_until_ready(jf(*ja)))
            yt = tf(*ta).numpy()
        err = float(np.max(np.abs(yj - yt)) / max(float(np.max(np.abs(yt))), 1e-30))
        if not err <= RTOL:
            raise RuntimeError(f"{name}: JAX and PyTorch products differ (rel err {err:.2e})")
        with torch.inference_mode():       # the frameworks take turns
            times, _ = harness.timed_calls(
                [("jax", lambda timed, f=jf, a=ja: jax.block_until_ready(f(*a))),
                 ("torch", lambda timed, f=tf, a=ta: f(*a))], 0, repeats)
        rate = {side: flops / median(ts) / 1e9 for side, ts in times.items()}
        best = {side: flops / min(ts) / 1e9 for side, ts in times.items()}
        results[name] = {"jax_gflops": _sig(rate["jax"]),
                         "torch_gflops": _sig(rate["torch"]),
                         "ratio": _sig(rate["jax"] / rate["torch"]),
                         "jax_best_gflops": _sig(best["jax"]),
                         "torch_best_gflops": _sig(best["torch"]),
                         "rel_err": float(f"{err:.2e}")}
        print(f"{name:12s} JAX {rate['jax']:7.1f}  PyTorch {rate['torch']:7.1f} GFLOP/s "
              f"(median of {repeats}; best {best['jax']:.1f} / {best['torch']:.1f})  "
              f"JAX/PyTorch {rate['jax'] / rate['torch']:.2f}", flush=True)
    print(json.dumps({"products": results, "rows": rows, "widths": widths, "square": square,
                      "repeats": repeats, "threads": threads, "host_malloc": malloc,
                      "devices": f"{cpu_name()}, {os.cpu_count()} cores on the machine",
                      "jax_version": jax.__version__, "torch_version": torch.__version__}))


if __name__ == "__main__":
    app.run(main)
