"""What the machine's matmuls reach now, and what XLA says a program costs: the
denominators of the benchmarks' peak fractions (`experiments/bench/nerf.py`).

`PeakProbe` times one square float32 product per framework (JAX, PyTorch) as a
`harness.timed_calls` contender, so a peak fraction divides by a rate measured in the same
minutes as the step; `matmul_peak` is the best of several sizes before the timing;
`bare_mlp_gflops` the rate a bare ReLU MLP's gradient step reaches on a network's shapes;
`xla_flops` a compiled executable's FLOP count from XLA's cost analysis.
"""

import time

from experiments.bench.harness import median, time_calls


def bare_mlp_gflops(dims, rows, calls):
    """GFLOP/s of a JAX gradient step of a bare ReLU MLP of layer widths `dims` (no bias,
    mean-square loss) on `rows` random inputs: what the matmuls alone reach on a network's
    shapes."""
    import jax
    import jax.numpy as jnp
    keys = jax.random.split(jax.random.PRNGKey(0), len(dims))
    ws = [jax.random.normal(k, (a, b)) / jnp.sqrt(a)
          for k, a, b in zip(keys[1:], dims[:-1], dims[1:])]
    x = jax.random.normal(keys[0], (rows, dims[0]))

    def loss(ws, x):
        h = x
        for w in ws:
            h = jax.nn.relu(h @ w)
        return jnp.mean(h * h)

    grad = jax.jit(jax.grad(loss)).lower(ws, x).compile()
    call = lambda: jax.block_until_ready(grad(ws, x))  # noqa: E731
    call()
    flops = 3 * 2 * rows * sum(a * b for a, b in zip(dims[:-1], dims[1:]))
    return flops / time_calls(call, max(calls, 3)) / 1e9


def xla_flops(compiled):
    """FLOPs of a compiled XLA executable from its cost analysis (None if unavailable)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend reports costs
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


class PeakProbe:
    """The machine's matmul rate now: one n x n x n float32 product in JAX (jit of
    `jnp.dot`) and one in PyTorch (`torch.mm`) per `measure()`, inputs made and the JAX
    product compiled up front.

    As a contender of `timed_calls` it runs between the timed steps, so a peak fraction
    divides by a rate measured in the same minutes as the step (this shared VM's matmul
    rate drifts between and within runs); `rates` keeps the faster framework's rate of
    each timed call, GFLOP/s."""

    def __init__(self, n):
        import jax
        import jax.numpy as jnp
        import numpy as np
        import torch
        rng = np.random.default_rng(0)
        a, b = (rng.standard_normal((n, n)).astype(np.float32) for _ in range(2))
        self.n, self.torch, self.rates = n, torch, []
        self._jax = (jax.jit(jnp.dot), jax.device_put(a), jax.device_put(b))
        self._torch = (torch.from_numpy(a), torch.from_numpy(b))
        self._jax[0](*self._jax[1:]).block_until_ready()        # compile
        torch.mm(*self._torch)

    def measure(self):
        """{"jax": GFLOP/s, "torch": GFLOP/s} of one product each."""
        dot, ja, jb = self._jax
        flop = 2.0 * self.n ** 3
        t = time.perf_counter()
        dot(ja, jb).block_until_ready()
        t_jax = time.perf_counter() - t
        t = time.perf_counter()
        self.torch.mm(*self._torch)
        t_torch = time.perf_counter() - t
        return {"jax": flop / t_jax / 1e9, "torch": flop / t_torch / 1e9}

    def __call__(self, timed):
        rates = self.measure()
        if timed:
            self.rates.append(max(rates.values()))

    def spread(self):
        """[min, median, max] of the timed calls' rates, GFLOP/s."""
        return [round(min(self.rates), 1), round(median(self.rates), 1),
                round(max(self.rates), 1)]


def matmul_peak(sizes, repeats):
    """The best float32 matmul rate of this process' core budget, GFLOP/s: for each n in
    `sizes`, the fastest of `repeats` n^3 products per framework. Returns {"jax": best,
    "torch": best, "n": the size of the fastest product}."""
    best = {"jax": 0.0, "torch": 0.0}
    best_n, best_rate = sizes[0], 0.0
    for n in sizes:
        probe = PeakProbe(n)
        for _ in range(repeats):
            rates = probe.measure()
            for name, rate in rates.items():
                best[name] = max(best[name], rate)
            if max(rates.values()) > best_rate:
                best_n, best_rate = n, max(rates.values())
    return {**{k: round(v, 1) for k, v in best.items()}, "n": best_n}
