"""Where a benchmark step spends its time on the CPU: JAX's compiled step by op kind
(matmuls, convolutions, the rest) and PyTorch's eager step by operator (`torch_top_ops`).

`thunk_breakdown(call, calls)` runs `call()` (which must block until its result is ready)
`calls` times under `jax.profiler` and sums the durations of the XLA:CPU runtime's thunks
(one event per executed HLO op or fusion; the CPU runtime runs them one after another,
each one spread over the allowed cores) by kind:

  matmul  dot thunks: `dot.*`, and the library fusions XLA hands to YNNPACK / XNNPACK /
          oneDNN (`ynn_fusion.*`, `xnn_fusion.*`, `onednn_*`) - in these steps those
          fusions are dots (their HLO shows a `dot` root), optionally with fused epilogues
  conv    `convolution.*` thunks and convolution fusions (`conv_general_dilated.*`)
  other   every other fusion, copy, sort, reduce, collective ... (XLA's own loops: the
          element-wise work, the transposes layout assignment inserts, sampling)

Runtime bookkeeping events (the executor's own spans, Python frames, thread-pool waits)
are left out, so `matmul + conv + other` is the time the step's ops ran, a little under
the wall time. Used by the benchmarks' profiles to say what limits a step, next to
PyTorch's operator profile of the same network.
"""

import collections
import glob
import gzip
import json
import os
import re
import tempfile

MATMUL_PREFIXES = ("ynn_fusion", "xnn_fusion", "onednn", "dot")
CONV_PREFIXES = ("convolution", "conv_general_dilated")  # the latter: fused convs
# runtime spans, not ops: executor scopes, host callbacks, waits
_RUNTIME = re.compile(r"^(\$|ThunkExecutor|PjitFunction|SlinkyThreadPool|ParseArguments|"
                      r"CommonPjRt|Allocate|Handle inputs|end: )")


def kind_of(name: str) -> str:
    """'matmul', 'conv' or 'other' for a thunk name such as 'ynn_fusion.52'."""
    if name.startswith(MATMUL_PREFIXES):
        return "matmul"
    if name.startswith(CONV_PREFIXES):
        return "conv"
    return "other"


def summarize(events, calls: int, top: int = 8):
    """Per-call milliseconds by kind from Chrome-trace complete events ('ph' == 'X')."""
    by_kind = collections.Counter()
    by_op = collections.Counter()
    for e in events:
        if e.get("ph") != "X" or _RUNTIME.match(e.get("name", "")):
            continue
        name = e["name"]
        by_kind[kind_of(name)] += e.get("dur", 0)
        by_op[re.sub(r"\.\d+$", "", name)] += e.get("dur", 0)
    ms = lambda us: round(us / 1e3 / calls, 1)  # noqa: E731
    total = sum(by_kind.values())
    return {"ops_ms": ms(total),
            "matmul_ms": ms(by_kind["matmul"]), "conv_ms": ms(by_kind["conv"]),
            "other_ms": ms(by_kind["other"]),
            "matmul_conv_share": round((by_kind["matmul"] + by_kind["conv"]) / total, 3)
            if total else None,
            "top_ops_ms": [[k, ms(v)] for k, v in by_op.most_common(top)]}


def thunk_breakdown(call, calls: int = 2):
    """Runs `call()` `calls` times under the JAX profiler; `summarize` of its trace, or
    {"error": ...} when the profiler wrote no readable trace."""
    import jax
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        try:
            for _ in range(calls):
                call()
        finally:
            jax.profiler.stop_trace()
        files = glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)
        if not files:
            return {"error": "jax.profiler wrote no *.trace.json.gz"}
        with gzip.open(files[0]) as f:
            events = json.load(f).get("traceEvents", [])
    return summarize(events, calls)


def torch_top_ops(step, top=6):
    """Of one call of `step()` (an eager PyTorch training step), from torch.profiler:
    ([(op, self CPU ms, share of the step)] of the `top` operators, matmul share, matmul
    ms), matmul being aten::mm, addmm, bmm and matmul."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: -e.self_cpu_time_total)
    matmul = sum(e.self_cpu_time_total for e in events
                 if e.key in ("aten::addmm", "aten::mm", "aten::bmm", "aten::matmul"))
    return ([(e.key, round(e.self_cpu_time_total / 1e3, 1),
              round(e.self_cpu_time_total / total, 3)) for e in events[:top]],
            round(matmul / total, 3), round(matmul / 1e3, 1))
